//! `Application`: connect, start the checkpoint watcher, bind, and serve until shutdown.
//!
//! `build` does everything that can fail at start (database, migrations, listen address), so a
//! misconfigured service exits before it reports healthy; `run_until_stopped` serves until the
//! shutdown future resolves, drains in-flight requests (bounded by `SHUTDOWN_GRACE_SECS`), then
//! stops the watcher's and the tail's tasks, which end at once even while a database call of
//! theirs waits on a server that stopped answering.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use platform::db_gate::DbGate;
use platform::health::Readiness;
use platform::http::cors::with_cors;
use platform::http::{HttpLimits, standard_layers};
use platform::shutdown::CancellationToken;
use platform::{db, redis_conn};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::consistency::{CheckpointWatcher, WatcherStats};
use crate::history::{History, HistoryStats};
use crate::log_stream::{LogStreams, StreamStats};
use crate::log_tail::{LogTail, TailStats};
use crate::read_models::{ReadModels, ReadStats};
use crate::routes::{self, AppState};

/// Service name, the `service` label of every metric and its PostgreSQL `application_name`.
pub const SERVICE_NAME: &str = "query-service";

/// How PostgreSQL plans this service's statements: every one of them is index probes or an
/// ordered index scan (`read_models`, and the store's reads behind `history`), but for the
/// checkpoint poll's read of `projection_checkpoints` whole (a row per projection), so their
/// plans are cached on each connection, with scans that only suit small tables ruled out,
/// instead of planned at every read. Test `plans`.
pub const PLANNING: db::Planning = db::Planning::CachedIndexScans;

/// Longest shutdown waits for the background tasks (watcher, tail) once they are cancelled.
const TASKS_STOP_WITHIN: Duration = Duration::from_secs(1);

/// A built, bound, not yet serving query service.
pub struct Application {
    listener: TcpListener,
    router: Router,
    port: u16,
    cancel: CancellationToken,
    /// Ends the event streams when shutdown begins.
    streams_stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    grace: std::time::Duration,
    /// `MAX_CONNECTIONS` and the server's other bounds on connections.
    connection_limits: platform::shutdown::ConnectionLimits,
    /// `SHUTDOWN_DELAY_MS`: how long it goes on serving, out of rotation, before it drains.
    delay: std::time::Duration,
    watcher_stats: Arc<WatcherStats>,
    read_stats: Arc<ReadStats>,
    stream_stats: Arc<StreamStats>,
    tail_stats: Arc<TailStats>,
    history_stats: Arc<HistoryStats>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Connects to PostgreSQL (creating the database and running migrations, or with
    /// `SKIP_MIGRATIONS` waiting until they are applied), starts the checkpoint watcher and
    /// binds `LISTEN_ADDR`.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let metrics = platform::metrics::install(SERVICE_NAME);
        let migrations = db::Migrations::of(&store::MIGRATOR, config.common.skip_migrations);
        let pool = db::connect_when_reachable(
            &config.common.database_url,
            SERVICE_NAME,
            config.common.db_max_connections,
            migrations,
            db::Use::ReadsOnly,
            PLANNING,
            config.common.db_connect_wait(),
        )
        .await?;
        // The query service does not use Redis itself, but the contract's /readyz reports it;
        // a lazy manager lets the service start (and say not-ready) while Redis is down.
        let redis = redis_conn::lazy_manager(
            &config.common.redis_client()?,
            redis_conn::DEFAULT_RESPONSE_TIMEOUT,
        )?;

        let cancel = CancellationToken::new();
        let watcher = CheckpointWatcher::new();
        // One poll before serving, so the first requests see real positions.
        watcher
            .poll_once(&pool)
            .await
            .context("read projection_checkpoints")?;
        let mut tasks = watcher.spawn(pool.clone(), config.reads.checkpoint_poll(), cancel.clone());
        let (tail, tail_task) = LogTail::spawn(pool.clone(), watcher.clone(), cancel.clone());
        tasks.push(tail_task);

        let read_models = ReadModels::new(pool.clone(), watcher.clone());
        let history = History::new(
            pool.clone(),
            watcher.clone(),
            tail.clone(),
            config.reads.events_scan_span,
        );
        // Ended as soon as shutdown begins (not after the drain, like `cancel`): the drain
        // waits for open responses, and a follower's stream never ends by itself.
        let streams_stop = CancellationToken::new();
        let streams = LogStreams::new(
            history.clone(),
            tail.clone(),
            config.reads.event_streams_max(),
            Duration::from_millis(config.reads.event_stream_progress_ms),
            streams_stop.clone(),
        );
        let stream_stats = streams.stats();
        let history_stats = history.stats();
        let state = AppState {
            read_models: read_models.clone(),
            streams,
            history,
            reads: config.reads.clone(),
        };
        let db_gate = DbGate::new(&pool);
        let router = routes::router(
            state,
            config.auth.tokens(),
            // A failed `postgres` check probes the server, so `database_unreachable` tells an
            // outage even when no request comes in (the instance is out of rotation then).
            Readiness::new(pool.clone(), redis).with_db_gate(db_gate.clone()),
            db_gate,
            metrics,
        );
        let router = standard_layers(
            router,
            HttpLimits {
                request_timeout: config.reads.request_timeout(),
                max_in_flight: config.http.max_in_flight(),
                ..HttpLimits::default()
            },
        );
        let router = with_cors(router, config.http.allowed_origins()?.as_ref());

        let listener = TcpListener::bind(&config.listen_addr)
            .await
            .with_context(|| format!("cannot listen on {} (LISTEN_ADDR)", config.listen_addr))?;
        let port = listener
            .local_addr()
            .context("read the bound address")?
            .port();
        Ok(Self {
            listener,
            router,
            port,
            cancel,
            streams_stop,
            tasks,
            grace: config.common.shutdown_grace(),
            connection_limits: config.common.connection_limits(),
            delay: config.http.shutdown_delay(),
            watcher_stats: watcher.stats(),
            read_stats: read_models.stats(),
            stream_stats,
            tail_stats: tail.stats(),
            history_stats,
        })
    }

    /// The bound port (useful with `LISTEN_ADDR=127.0.0.1:0`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Counters of the watcher's database work (checkpoint polls, notifications).
    pub fn watcher_stats(&self) -> Arc<WatcherStats> {
        Arc::clone(&self.watcher_stats)
    }

    /// Counters of the event streams' reads of the store.
    pub fn stream_stats(&self) -> Arc<StreamStats> {
        Arc::clone(&self.stream_stats)
    }

    /// Counters of the log tail's reads.
    pub fn tail_stats(&self) -> Arc<TailStats> {
        Arc::clone(&self.tail_stats)
    }

    /// Counters of the event store reads of history and time travel.
    pub fn history_stats(&self) -> Arc<HistoryStats> {
        Arc::clone(&self.history_stats)
    }

    /// Counters of read-model queries.
    pub fn read_stats(&self) -> Arc<ReadStats> {
        Arc::clone(&self.read_stats)
    }

    /// Serves until `shutdown` resolves and `SHUTDOWN_DELAY_MS` later (with `/readyz` answering
    /// 503 meanwhile), drains in-flight requests, then stops the watcher.
    pub async fn run_until_stopped(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(port = self.port, "query service listening");
        let streams_stop = self.streams_stop.clone();
        // Streams end when the drain begins, not at the signal: until then the instance serves.
        let (router, shutdown) =
            platform::shutdown::leave_rotation_first(self.router, shutdown, self.delay);
        let shutdown = async move {
            shutdown.await;
            streams_stop.cancel();
        };
        let result = platform::shutdown::serve_with_limits(
            self.listener,
            router,
            shutdown,
            self.grace,
            self.connection_limits,
        )
        .await;
        self.cancel.cancel();
        // The tasks end at the cancel, even in the middle of a database call; the bound only
        // keeps a future regression from holding the process past its grace period.
        let stopped = futures::future::join_all(self.tasks.iter_mut());
        if tokio::time::timeout(TASKS_STOP_WITHIN, stopped)
            .await
            .is_err()
        {
            tracing::warn!("background tasks still running at shutdown; exiting anyway");
            for task in &self.tasks {
                task.abort();
            }
        }
        tracing::info!("query service stopped");
        result
    }
}
