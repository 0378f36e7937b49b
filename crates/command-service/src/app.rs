//! Putting the service together: `Application::build(config)` connects, migrates, starts the
//! group committer and binds the listener; `run_until_stopped(shutdown)` serves until
//! `shutdown` resolves, running the relay and the idempotency-key expiry beside the server.
//!
//! Shutdown order: serve on for `SHUTDOWN_DELAY_MS` with `/readyz` answering 503 (out of
//! rotation), stop accepting and drain in-flight requests, then cancel the relay and the
//! background tasks, wait for them and close the pool. Everything after the delay shares one
//! deadline, `SHUTDOWN_GRACE_SECS` from when draining began: whatever is still running then
//! (a request, the relay, a query on a database that stopped answering) is abandoned with a
//! warning and the service still returns `Ok` (exit 0), so that delay plus grace bound the
//! whole stop, as `terminationGracePeriodSeconds` requires. The group committer stops by
//! itself once the router (its last handle) is dropped, after answering everything queued.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use platform::db_gate::DbGate;
use platform::health::Readiness;
use platform::http::HttpLimits;
use platform::{db, redis_conn, shutdown};
use sqlx::PgPool;
use store::{CommitterConfig, GroupCommitter};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::commands::{CommandHandler, HandlerConfig};
use crate::config::Config;
use crate::http::{self, AppState, RouterParts};
use crate::relay;

/// Name of the service: the `service` label on every metric and its PostgreSQL `application_name`.
pub const SERVICE_NAME: &str = "command-service";

/// How often expired idempotency keys are deleted. Keys live for hours, so a coarse sweep is
/// enough, and each sweep is one indexed `DELETE`.
pub const IDEMPOTENCY_EXPIRY_INTERVAL: Duration = Duration::from_secs(600);

/// A built service, listening but not yet serving.
pub struct Application {
    listener: TcpListener,
    port: u16,
    router: Router,
    pool: PgPool,
    /// Opens the relay's Redis connections (`REDIS_URL` with its TLS files).
    redis_client: redis::Client,
    config: Config,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("port", &self.port)
            .finish()
    }
}

impl Application {
    /// Connects to Postgres (creating the database and migrating, or with `SKIP_MIGRATIONS`
    /// waiting until the migrations are applied), starts the group committer and binds
    /// `LISTEN_ADDR`. Redis is connected lazily: the write path does not need it, and `/readyz`
    /// reports it.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        let metrics = platform::metrics::install(SERVICE_NAME);
        // `relay_is_leader` 0 and the relay's counters at 0, also where the relay is disabled:
        // the alerts sum and increase them over every instance. The command path's counters
        // too, for the RUNBOOK's readers.
        relay::telemetry::exported_from_start();
        crate::commands::export_counters_at_zero();
        let migrations = db::Migrations::of(&store::MIGRATOR, config.common.skip_migrations);
        let pool = db::connect_when_reachable(
            &config.common.database_url,
            SERVICE_NAME,
            config.common.db_max_connections,
            migrations,
            db::Use::Writes,
            db::Planning::EveryExecution,
            config.common.db_connect_wait(),
        )
        .await?;
        let redis_client = config.common.redis_client()?;
        let redis = redis_conn::lazy_manager(&redis_client, redis_conn::DEFAULT_RESPONSE_TIMEOUT)?;

        let db_gate = DbGate::new(&pool);
        let committer = GroupCommitter::spawn_with_reachability(
            pool.clone(),
            CommitterConfig::default(),
            db_gate.shut_state(),
        );
        let handler = CommandHandler::new(
            pool.clone(),
            db_gate.clone(),
            committer,
            HandlerConfig {
                snapshot_every: i64::try_from(config.commands.snapshot_every).unwrap_or(i64::MAX),
                retries: config.commands.command_retries,
                cache_capacity: usize::try_from(config.commands.order_cache_capacity)
                    .unwrap_or(usize::MAX),
                cache_max_bytes: usize::try_from(config.commands.order_cache_max_bytes)
                    .unwrap_or(usize::MAX),
            },
            http::error::rejection_answer,
        );
        let router = http::router(RouterParts {
            state: AppState { handler },
            token: config.auth.tokens(),
            // A failed `postgres` check probes the server, so `database_unreachable` tells an
            // outage even when no request comes in (the instance is out of rotation then).
            readiness: Readiness::new(pool.clone(), redis).with_db_gate(db_gate.clone()),
            db_gate,
            metrics,
            limits: HttpLimits {
                body_limit_bytes: config.commands.body_limit(),
                request_timeout: config.commands.request_timeout(),
                max_in_flight: config.http.max_in_flight(),
            },
            allowed_origins: config.http.allowed_origins()?,
        });

        let listener = TcpListener::bind(&config.listen_addr)
            .await
            .with_context(|| format!("cannot listen on {} (LISTEN_ADDR)", config.listen_addr))?;
        let port = listener
            .local_addr()
            .context("cannot read the listening address")?
            .port();
        Ok(Self {
            listener,
            port,
            router,
            pool,
            redis_client,
            config,
        })
    }

    /// The port the service listens on (useful with `LISTEN_ADDR=…:0`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The service's database pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Serves until `shutdown` resolves (or the relay fails), then shuts down in order; see the
    /// module docs. Returns the relay's error if it failed.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            port,
            router,
            pool,
            redis_client,
            config,
        } = self;
        // Background work stops on `workers`; the server also stops when the relay fails, so an
        // orchestrator restarts a process that no longer publishes.
        let workers = CancellationToken::new();
        let relay_failed = CancellationToken::new();

        let relay = config.relay.relay_enabled.then(|| {
            let run = relay::run(
                pool.clone(),
                redis_client,
                config.common.event_stream.clone(),
                config.relay.clone(),
                workers.child_token(),
            );
            let relay_failed = relay_failed.clone();
            tokio::spawn(async move {
                let result = run.await;
                if let Err(err) = &result {
                    tracing::error!(error = %platform::config::error_chain(err.as_ref()), "the relay stopped with an error");
                    relay_failed.cancel();
                }
                result
            })
        });
        let expiry = tokio::spawn(expire_idempotency_keys(
            pool.clone(),
            config.commands.idempotency_ttl_secs(),
            workers.child_token(),
        ));

        if !config.relay.relay_enabled {
            tracing::info!("outbox relay disabled (RELAY_ENABLED=false) in this instance");
        }
        tracing::info!(addr = %config.listen_addr, port, relay = config.relay.relay_enabled, "listening");
        let grace = config.common.shutdown_grace();
        let (drain_began, drain_began_at) = tokio::sync::oneshot::channel();
        let stop = async move {
            tokio::select! {
                () = shutdown => {}
                () = relay_failed.cancelled() => {}
            }
            tracing::info!("shutting down: draining in-flight requests");
        };
        let (router, stop) =
            shutdown::leave_rotation_first(router, stop, config.http.shutdown_delay());
        let stop = async move {
            stop.await;
            let _ = drain_began.send(tokio::time::Instant::now());
        };
        let served = shutdown::serve_with_limits(
            listener,
            router,
            stop,
            grace,
            config.common.connection_limits(),
        )
        .await;

        // One deadline for everything after the delay; counted from now should the server
        // have returned before draining began (it returns only once told to stop).
        let deadline = drain_began_at
            .await
            .unwrap_or_else(|_| tokio::time::Instant::now())
            + grace;
        workers.cancel();
        let relay_result = match relay {
            Some(mut task) => match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(result)) => result,
                Ok(Err(join)) => Err(anyhow::anyhow!("the relay task panicked: {join}")),
                Err(_) => {
                    tracing::warn!(
                        grace_secs = grace.as_secs(),
                        "the relay did not stop within the grace period (is PostgreSQL \
                         answering?); abandoning it: the events it had not published are \
                         published by the next relay"
                    );
                    task.abort();
                    Ok(())
                }
            },
            None => Ok(()),
        };
        let mut expiry = expiry;
        let rest = async {
            let _ = (&mut expiry).await;
            pool.close().await;
        };
        if tokio::time::timeout_at(deadline, rest).await.is_err() {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "database work still running after the grace period (is PostgreSQL \
                 answering?); exiting anyway"
            );
            expiry.abort();
        }
        tracing::info!("stopped");
        served?;
        relay_result
    }
}

/// `command-service migrate`: creates the database if needed and runs the migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    db::migrate(
        &config.common.database_url,
        SERVICE_NAME,
        &store::MIGRATOR,
        config.common.db_connect_wait(),
    )
    .await
}

/// Deletes idempotency keys older than `ttl_secs`, now and every
/// [`IDEMPOTENCY_EXPIRY_INTERVAL`], until `stop` is cancelled.
async fn expire_idempotency_keys(pool: PgPool, ttl_secs: i64, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(IDEMPOTENCY_EXPIRY_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match store::idempotency::expire(&pool, ttl_secs).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "expired idempotency keys"),
            Err(err) => tracing::warn!(error = %err, "cannot expire idempotency keys"),
        }
    }
}
