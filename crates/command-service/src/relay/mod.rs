//! The outbox relay: the event store *is* the outbox. The relay tails the event log in position
//! order and publishes every committed event to the Redis stream (`EVENT_STREAM`, default
//! `es:events`), each as the entry `<global_position>-0` with the fields of the contract.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`leader`] | leadership: the session advisory lock on a dedicated Postgres connection |
//! | [`checkpoint`] | the stored publish checkpoint (`relay_checkpoints`, one row per stream key) |
//! | [`step`] | [`publish_step`]: one read → publish → checkpoint round, testable on its own |
//! | [`wake`] | wake-ups: `LISTEN` on [`store::APPENDED_CHANNEL`], turned into a [`tokio::sync::Notify`] |
//! | [`backoff`] | exponential backoff with jitter for Redis and Postgres outages |
//! | [`status`] | [`RelayStatus`]: is this instance the leader, and its checkpoint |
//! | [`telemetry`] | metric names and their recording |
//!
//! # Guarantees and how they are kept
//!
//! - **Exactly one active relay** across all instances: the leader holds the session advisory
//!   lock [`leader::relay_lock_key`] on its own connection (not from the pool). Standbys retry
//!   every `RELAY_STANDBY_POLL_MS`. When the leader's connection dies, Postgres releases the lock
//!   and a standby takes over. Every leader cycle runs a query on that connection (the read, the
//!   checkpoint write, or a ping), and any error there drops the connection and the leadership;
//!   so does a query left unanswered for `RELAY_QUERY_TIMEOUT_MS`, since a server that went
//!   silent (dead host, fail-over) would otherwise hold every relay for as long as TCP retries.
//! - **Never skips a position**: positions are dense and in commit order (the store's global
//!   append lock), so tailing by position is gap-free. The relay still checks every batch is
//!   contiguous with what it published; at a gap it publishes only the prefix before it, logs,
//!   and retries later (it never moves past a missing position).
//! - **Never publishes twice** while Redis keeps its data: entry ids are positions and Redis
//!   refuses ids at or below the top, so republishing after a crash is a no-op. A new leader
//!   resumes after `max(checkpoint, newest relayed entry)`, that entry being the newest
//!   `<position>-0` one whose event the store holds at that position: never after the raw top
//!   id, which an entry added with a time-based id (`XADD … *`) makes a timestamp far beyond
//!   the log. The checkpoint never passes the store's head, and a stored one beyond it is
//!   forgotten ([`checkpoint::forget_beyond_head`]).
//! - **Never publishes onto another history**: each leadership first compares the stream's
//!   newest entry with the store's event at its position, and again every
//!   `RELAY_TRIM_INTERVAL_MS`. A stream the store contradicts
//!   (the database restored from a backup, another deployment on the same key) gets nothing
//!   more (`relay_stream_diverged` = 1, logged) until it is renamed or deleted; then the relay
//!   publishes from the stored checkpoint ([`step`]).
//! - **Redis outages** never block commands (only the relay talks to Redis on the write side).
//!   The relay retries with exponential backoff and jitter (100 ms → 5 s) and publishes the
//!   backlog when Redis is back. If Redis lost the stream, or its newest entries (a restart
//!   from an older snapshot), publishing continues after the checkpoint: a running leader's
//!   own, so nothing it had published is published again, or for a new leadership the stored
//!   one (written at most every `RELAY_CHECKPOINT_INTERVAL_MS`, so up to that much is published
//!   again, and projectors skip it as duplicates). The entries Redis lost stay lost to the
//!   stream's readers; the projectors' sweepers apply their events from the event store.
//! - **Bounded stream**: every XADD carries `MAXLEN ~ STREAM_MAX_LEN_HARD`, and every
//!   `RELAY_TRIM_INTERVAL_MS` the leader trims to `STREAM_RETAIN` entries without dropping
//!   anything a consumer group has not read or acknowledged ([`bus::Publisher::trim`]).
//! - **Bounded memory**: at most `RELAY_BATCH` events are held at a time.
//!
//! The relay must never write the `events` table, and never publish a batch out of position
//! order.

pub mod backoff;
pub mod checkpoint;
pub mod leader;
pub mod status;
pub mod step;
pub mod telemetry;
pub mod wake;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use leader::{RELAY_LOCK_NAMESPACE, relay_lock_key};
pub use status::RelayStatus;
pub use step::{Gap, RelayContext, StepError, StepOutcome, publish_step};

use backoff::Backoff;
use leader::Candidate;
use platform::outage::OutageLog;

/// First pause after a failed publish or read; doubles per failure up to [`RETRY_MAX_DELAY`].
pub const RETRY_MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest pause between two retries while Redis (or Postgres) is unavailable: short enough
/// that the backlog starts moving within seconds of Redis coming back.
pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(5);

/// Relay settings (flattened into command-service's config).
#[derive(clap::Args, Debug, Clone)]
pub struct RelayArgs {
    /// Run the outbox relay in this instance (one instance is active at a time; others stand by).
    #[arg(long, env = "RELAY_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub relay_enabled: bool,

    /// Most events the relay reads and publishes in one cycle (one read, one pipelined publish,
    /// the checkpoint write when due). Bounds the relay's memory.
    #[arg(long, env = "RELAY_BATCH", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub relay_batch: u64,

    /// Fallback wake-up of the relay in milliseconds: commits wake it through LISTEN/NOTIFY,
    /// but notifications are lost while the listener reconnects, so it also looks this often.
    #[arg(long, env = "RELAY_POLL_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub relay_poll_ms: u64,

    /// How often a standby relay tries to take the leadership, in milliseconds (this bounds the
    /// fail-over time after the leader dies).
    #[arg(long, env = "RELAY_STANDBY_POLL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub relay_standby_poll_ms: u64,

    /// Safety cap on the stream length carried by every XADD (`MAXLEN ~`); only matters when a
    /// consumer group is stuck, and may then drop entries it has not read.
    #[arg(long, env = "STREAM_MAX_LEN_HARD", default_value_t = bus::DEFAULT_HARD_CAP as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_max_len_hard: u64,

    /// Entries the periodic trim keeps at least (it never drops entries a consumer group has
    /// not read or acknowledged).
    #[arg(long, env = "STREAM_RETAIN", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_retain: u64,

    /// How often the leader trims the stream to `STREAM_RETAIN`, in milliseconds.
    #[arg(long, env = "RELAY_TRIM_INTERVAL_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..=platform::config::MAX_INTERVAL_MS))]
    pub relay_trim_interval_ms: u64,

    /// Least time between two writes of the stored publish checkpoint, in milliseconds; 0
    /// writes it after every batch. Each write is a WAL flush, and the stored checkpoint only
    /// matters when Redis has lost the stream (a lagging one republishes a few duplicates).
    #[arg(long, env = "RELAY_CHECKPOINT_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub relay_checkpoint_interval_ms: u64,

    /// How long each PostgreSQL query (and connect) of the relay's leader or standby may wait
    /// for an answer, in milliseconds; past it the connection counts as dead and the leadership
    /// as lost. Bounds how long a server that stopped answering without closing the connection
    /// (a dead host, a fail-over) can stall publishing.
    #[arg(long, env = "RELAY_QUERY_TIMEOUT_MS", default_value_t = leader::DEFAULT_QUERY_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub relay_query_timeout_ms: u64,
}

impl Default for RelayArgs {
    fn default() -> Self {
        Self {
            relay_enabled: true,
            relay_batch: 1000,
            relay_poll_ms: 500,
            relay_standby_poll_ms: 1000,
            stream_max_len_hard: bus::DEFAULT_HARD_CAP as u64,
            stream_retain: 100_000,
            relay_trim_interval_ms: 5000,
            relay_checkpoint_interval_ms: 1000,
            relay_query_timeout_ms: leader::DEFAULT_QUERY_TIMEOUT.as_millis() as u64,
        }
    }
}

impl RelayArgs {
    /// Checks the settings against each other; the error names the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.stream_retain > self.stream_max_len_hard {
            anyhow::bail!(
                "STREAM_RETAIN ({}) must not exceed STREAM_MAX_LEN_HARD ({})",
                self.stream_retain,
                self.stream_max_len_hard
            );
        }
        if self.relay_batch == 0 {
            anyhow::bail!("RELAY_BATCH must be at least 1");
        }
        Ok(())
    }

    fn poll(&self) -> Duration {
        Duration::from_millis(self.relay_poll_ms.max(1))
    }

    fn standby_poll(&self) -> Duration {
        Duration::from_millis(self.relay_standby_poll_ms.max(1))
    }

    fn trim_interval(&self) -> Duration {
        Duration::from_millis(self.relay_trim_interval_ms.max(1))
    }

    fn checkpoint_interval(&self) -> Duration {
        Duration::from_millis(self.relay_checkpoint_interval_ms)
    }

    fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.relay_query_timeout_ms.max(1))
    }
}

/// Runs the relay until `shutdown` is cancelled: stands by, leads when it gets the lock, and goes
/// back to standby when it loses it. Returns `Err` only on a misconfiguration.
pub async fn run(
    pool: PgPool,
    redis: redis::Client,
    stream_key: String,
    args: RelayArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_status(
        pool,
        redis,
        stream_key,
        args,
        shutdown,
        RelayStatus::default(),
    )
    .await
}

/// Spawns [`run`] on the current runtime and returns its handle together with the status it
/// reports to (for `/readyz`-style reporting and tests).
pub fn spawn(
    pool: PgPool,
    redis: redis::Client,
    stream_key: String,
    args: RelayArgs,
    shutdown: CancellationToken,
) -> (JoinHandle<anyhow::Result<()>>, RelayStatus) {
    let status = RelayStatus::default();
    let handle = tokio::spawn(run_with_status(
        pool,
        redis,
        stream_key,
        args,
        shutdown,
        status.clone(),
    ));
    (handle, status)
}

/// [`run`], reporting to a status the caller keeps.
pub async fn run_with_status(
    pool: PgPool,
    redis: redis::Client,
    stream_key: String,
    args: RelayArgs,
    shutdown: CancellationToken,
    status: RelayStatus,
) -> anyhow::Result<()> {
    telemetry::exported_from_start();
    if !args.relay_enabled {
        tracing::info!("outbox relay disabled (RELAY_ENABLED=false) in this instance");
        shutdown.cancelled().await;
        return Ok(());
    }
    args.validate()?;
    // Lazy: the relay (and the service) must start while Redis is down.
    let conn = bus::connect_lazy(&redis).context("invalid REDIS_URL for the outbox relay")?;
    let publisher = bus::Publisher::new(
        conn,
        bus::StreamKeys::new(stream_key.clone()),
        usize::try_from(args.stream_max_len_hard).unwrap_or(usize::MAX),
    );
    let options = (*pool.connect_options()).clone();
    let relay = Relay {
        options,
        publisher,
        stream_key,
        args,
        status,
        shutdown,
    };
    relay.stand_by_and_lead().await;
    Ok(())
}

/// Everything one relay instance needs across leaderships.
struct Relay {
    options: PgConnectOptions,
    publisher: bus::Publisher,
    stream_key: String,
    args: RelayArgs,
    status: RelayStatus,
    shutdown: CancellationToken,
}

impl Relay {
    /// The outer loop: try to become leader; lead until the leadership is lost or shutdown.
    async fn stand_by_and_lead(self) {
        let lock_key = relay_lock_key(&self.stream_key);
        let mut candidate =
            Candidate::new(self.options.clone(), lock_key, self.args.query_timeout());
        let mut standby_logged = false;
        // A standby that cannot reach PostgreSQL fails every RELAY_STANDBY_POLL_MS, on every
        // instance: the first failure, a reminder a minute and the recovery are logged.
        let mut unreachable = OutageLog::new();
        telemetry::set_leader(false);
        telemetry::stream_diverged(false);
        while !self.shutdown.is_cancelled() {
            let attempt = candidate.try_acquire().await;
            if attempt.is_ok()
                && let Some(recovered) = unreachable.recovered()
            {
                tracing::info!(stream = %self.stream_key, failures = recovered.failures,
                    failed_ms = recovered.failed_ms(), "relay standby reaches PostgreSQL again");
            }
            match attempt {
                Ok(Some(conn)) => {
                    standby_logged = false;
                    tracing::info!(stream = %self.stream_key, lock_key, "relay leadership gained");
                    self.status.set_leader(true);
                    telemetry::set_leader(true);
                    let result = self.lead(conn).await;
                    self.status.set_leader(false);
                    telemetry::leadership_ended();
                    match result {
                        Ok(()) => {
                            tracing::info!(stream = %self.stream_key, "relay leadership released at shutdown");
                        }
                        Err(err) => {
                            tracing::warn!(stream = %self.stream_key, error = %platform::config::error_chain(err.as_ref()),
                                "relay leadership lost; back to standby");
                        }
                    }
                }
                Ok(None) => {
                    if !standby_logged {
                        tracing::info!(stream = %self.stream_key, "another instance leads the relay; standing by");
                        standby_logged = true;
                    }
                }
                Err(err) => {
                    let error = platform::config::error_chain(&err);
                    match unreachable.failed() {
                        Some(failing) if failing.first => {
                            tracing::warn!(stream = %self.stream_key, %error,
                                "relay standby cannot reach PostgreSQL; retrying (logged again \
                                 every minute while it lasts, and when it is reachable)");
                        }
                        Some(failing) => {
                            tracing::warn!(stream = %self.stream_key, %error,
                                failures = failing.failures, failing_ms = failing.failing_ms(),
                                "relay standby still cannot reach PostgreSQL; retrying");
                        }
                        None => {
                            tracing::debug!(stream = %self.stream_key, %error,
                                "relay standby still cannot reach PostgreSQL");
                        }
                    }
                }
            }
            self.pause(self.args.standby_poll()).await;
        }
        candidate.close().await;
    }

    /// Sleeps for `delay` or until shutdown.
    async fn pause(&self, delay: Duration) {
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }

    /// Leads until shutdown (`Ok`) or until the leader connection fails (`Err`). The connection
    /// (and with it the lock) is closed in both cases.
    async fn lead(&self, conn: sqlx::PgConnection) -> anyhow::Result<()> {
        let wake = Arc::new(Notify::new());
        // The listener lives exactly as long as this leadership.
        let _listener = wake::spawn_listener(self.options.clone(), wake.clone());
        let mut ctx = leader::answered_within(
            self.args.query_timeout(),
            RelayContext::resume(
                conn,
                self.publisher.clone(),
                self.stream_key.clone(),
                i64::try_from(self.args.relay_batch).unwrap_or(i64::MAX),
                self.status.clone(),
            ),
        )
        .await?
        .with_checkpoint_interval(self.args.checkpoint_interval())
        .with_query_timeout(self.args.query_timeout());
        let result = self.publish_loop(&mut ctx, &wake).await;
        if result.is_ok()
            && let Err(err) = ctx.flush_checkpoint().await
        {
            // Only costs a successor some duplicates it will recognise, if Redis lost the stream.
            tracing::warn!(stream = %self.stream_key, error = %err,
                "could not store the relay checkpoint at shutdown");
        }
        ctx.close().await;
        result
    }

    async fn publish_loop(&self, ctx: &mut RelayContext, wake: &Notify) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(RETRY_MIN_DELAY, RETRY_MAX_DELAY);
        let mut redis_down_since: Option<Instant> = None;
        let mut last_trim = Instant::now();
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            match publish_step(ctx).await {
                Ok(outcome) => {
                    if let Some(since) = redis_down_since.take() {
                        tracing::info!(stream = %self.stream_key, down_for = ?since.elapsed(),
                            backlog = ctx.backlog_estimate(),
                            "redis takes events again; publishing the backlog");
                    }
                    backoff.reset();
                    if outcome.diverged.is_some() {
                        // Logged by the step when it began; the stream is left as it is (no
                        // trim either) for the operator to keep or remove.
                        self.pause(self.args.poll()).await;
                        continue;
                    }
                    if last_trim.elapsed() >= self.args.trim_interval() {
                        last_trim = Instant::now();
                        self.trim().await;
                        // The stream may also have been replaced under a running leader (a
                        // Redis restored or failed over from elsewhere): look again.
                        ctx.recheck_history();
                    }
                    if let Some(gap) = outcome.gap {
                        tracing::error!(stream = %self.stream_key, expected = gap.expected,
                            found = gap.found, "gap in the event log: relay stops before it and retries");
                        self.pause(self.args.poll()).await;
                    } else if outcome.caught_up {
                        self.wait_for_commit(wake, ctx.checkpoint_due_in()).await;
                    }
                }
                Err(StepError::Leadership(err)) => {
                    return Err(err).context("relay leader connection failed");
                }
                Err(StepError::Publish(err)) => {
                    telemetry::publish_error();
                    if redis_down_since.is_none() {
                        redis_down_since = Some(Instant::now());
                        tracing::warn!(stream = %self.stream_key, error = %err,
                            backlog = ctx.backlog_estimate(),
                            "redis cannot take the events (down, unreachable, or refusing writes, e.g. full): \
                             they stay in the event store and are published once it can");
                    } else {
                        tracing::debug!(error = %err, "publish still failing");
                    }
                    // Stay honest about leadership while Redis is down: a dead leader
                    // connection must hand over to a standby, not keep retrying.
                    ctx.ping().await.map_err(|e| {
                        anyhow::Error::new(e).context("relay leader connection failed")
                    })?;
                    self.pause(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Waits for a commit notification, the fallback tick, the pending checkpoint falling due,
    /// or shutdown.
    async fn wait_for_commit(&self, wake: &Notify, checkpoint_due_in: Option<Duration>) {
        let tick = checkpoint_due_in.map_or(self.args.poll(), |due| due.min(self.args.poll()));
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            () = wake.notified() => {}
            () = tokio::time::sleep(tick) => {}
        }
    }

    /// Trims the stream; a failure only delays the trim (the `MAXLEN ~` cap still bounds it).
    async fn trim(&self) {
        let retain = usize::try_from(self.args.stream_retain).unwrap_or(usize::MAX);
        match self.publisher.trim(retain).await {
            Ok(outcome) => {
                if outcome.removed > 0 {
                    tracing::debug!(stream = %self.stream_key, removed = outcome.removed, "trimmed the event stream");
                }
            }
            Err(err) => {
                tracing::warn!(stream = %self.stream_key, error = %err, "trimming the event stream failed")
            }
        }
    }
}
