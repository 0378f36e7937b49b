//! The `serve` subcommand: per configured projection a consumer task and a sweeper task, plus
//! the HTTP server for `/healthz`, `/readyz` (Postgres and Redis) and `/metrics`.
//!
//! Shutdown (SIGTERM): the token stops the loops between steps, so the batch in hand is
//! finished and acknowledged; the HTTP server drains; then the process exits 0.

use anyhow::Context as _;
use axum::Router;
use bus::{Consumer, DeadLetterQueue, StreamKeys};
use platform::health::{Readiness, health_router};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Cli;
use crate::consumer::ProjectionConsumer;
use crate::sweeper::{DeadLetters, Sweeper};

/// The service's name in metrics and in PostgreSQL's `application_name`.
pub const SERVICE_NAME: &str = "projector";

/// Connects Postgres (creating the database and running migrations; with `SKIP_MIGRATIONS`,
/// checking that they are applied) for an admin command, which reports an unreachable server at once.
pub async fn connect_db(cli: &Cli) -> anyhow::Result<PgPool> {
    connect_db_waiting(cli, std::time::Duration::ZERO).await
}

/// [`connect_db`] for the service, which first waits up to `wait` for a server that cannot be
/// reached yet (`DB_CONNECT_WAIT_SECS`).
async fn connect_db_waiting(cli: &Cli, wait: std::time::Duration) -> anyhow::Result<PgPool> {
    let migrations = platform::db::Migrations::of(&store::MIGRATOR, cli.common.skip_migrations);
    platform::db::connect_when_reachable(
        &cli.common.database_url,
        SERVICE_NAME,
        cli.common.db_max_connections,
        migrations,
        platform::db::Use::Writes,
        platform::db::Planning::EveryExecution,
        wait,
    )
    .await
}

/// The Redis client, a lazily connecting shared connection, and the stream keys.
pub fn connect_redis(
    cli: &Cli,
) -> anyhow::Result<(redis::Client, bus::ConnectionManager, StreamKeys)> {
    let client = cli.common.redis_client()?;
    let conn = bus::connect_lazy(&client).context("connect to Redis (REDIS_URL)")?;
    Ok((
        client,
        conn,
        StreamKeys::new(cli.common.event_stream.clone()),
    ))
}

/// A built, not yet running, projector service.
pub struct Application {
    cli: Cli,
    listener: TcpListener,
    router: Router,
    pool: PgPool,
    client: redis::Client,
    redis: bus::ConnectionManager,
    keys: StreamKeys,
}

impl Application {
    /// Connects, migrates and binds `LISTEN_ADDR`.
    pub async fn build(cli: Cli) -> anyhow::Result<Self> {
        let pool = connect_db_waiting(&cli, cli.common.db_connect_wait()).await?;
        let (client, redis, keys) = connect_redis(&cli)?;
        let handle = platform::metrics::install(SERVICE_NAME);
        let router = health_router(Readiness::new(pool.clone(), redis.clone()), handle);
        let listener = TcpListener::bind(&cli.settings.listen_addr)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (LISTEN_ADDR)",
                    cli.settings.listen_addr
                )
            })?;
        Ok(Self {
            cli,
            listener,
            router,
            pool,
            client,
            redis,
            keys,
        })
    }

    /// The bound port (useful with `LISTEN_ADDR=127.0.0.1:0`).
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_default()
    }

    /// Runs until `shutdown` is cancelled, then drains and returns, within `SHUTDOWN_GRACE_SECS`
    /// of the cancellation: a task still busy then (PostgreSQL not answering its query, say)
    /// is dropped, which loses nothing (its entries stay pending, its transaction rolls back).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let settings = &self.cli.settings;
        let name = settings.consumer_name();
        let mut tasks = tokio::task::JoinSet::new();
        for projection in settings.projections.iter().copied() {
            crate::metrics::register(projection);
            let consumer = Consumer::new(
                &self.client,
                self.redis.clone(),
                self.keys.clone(),
                projection.name(),
                name.clone(),
                settings.consumer().block,
            )
            .context("create the Redis consumer")?;
            if let Err(e) = consumer.ensure_group(bus::FROM_BEGINNING).await {
                // Redis may be down at start; the loop recreates the group once it is back.
                tracing::warn!(projection = %projection, error = %e, "cannot create the consumer group yet");
            }
            let worker = ProjectionConsumer::new(
                projection,
                self.pool.clone(),
                consumer,
                settings.consumer(),
            );
            tasks.spawn(worker.run(shutdown.clone()));
            let sweeper = Sweeper::new(
                projection,
                self.pool.clone(),
                Some(DeadLetters {
                    queue: DeadLetterQueue::new(self.redis.clone(), self.keys.clone()),
                    consumer: format!("{name}/sweeper"),
                }),
                settings.sweeper(),
            );
            tasks.spawn(sweeper.run(shutdown.clone()));
        }
        tracing::info!(consumer = %name, projections = ?settings.projections, port = self.port(), "projector running");
        let grace = self.cli.common.shutdown_grace();
        let serve = async {
            let served = platform::shutdown::serve_with_limits(
                self.listener,
                self.router,
                shutdown.clone().cancelled_owned(),
                grace,
                self.cli.common.connection_limits(),
            )
            .await;
            shutdown.cancel();
            served
        };
        let stop_began = async {
            shutdown.cancelled().await;
            tokio::time::Instant::now()
        };
        let (served, stop_began) = tokio::join!(serve, stop_began);
        let drained = tokio::time::timeout_at(stop_began + grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "projections still busy after the grace period (is PostgreSQL answering?); \
                 stopping them: their unacknowledged entries stay pending for the next instance"
            );
            tasks.abort_all();
        }
        served
    }
}
