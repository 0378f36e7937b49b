//! `projector rebuild <projection>`: the read model folded anew from the event store alone,
//! while the live one keeps serving and keeps being applied.
//!
//! 1. **Shadow tables.** A schema of its own (`projector_rebuild_<projection>`) gets empty
//!    copies of the projection's tables and of its bookkeeping (`projection_streams`,
//!    `projection_checkpoints`).
//! 2. **Fold without the lock.** The events are folded into the shadow tables page by page, each
//!    page its own transaction, through the same engine the consumers use: each transaction
//!    puts the shadow schema first on its `search_path` (`<shadow>, <live>`), so the engine's
//!    unqualified table names reach the shadow copies and `events` the live log. Inside a
//!    caller's transaction the engine leaves the low-water mark alone and announces no
//!    position, so no listener hears of one the live read model has not reached. Live
//!    consumers, the sweeper and readers carry on meanwhile. Passes repeat while new events
//!    arrived.
//! 3. **Swap under the lock.** One transaction takes the projection's exclusive lock (live
//!    writers wait), folds the few events appended since, replaces the live rows with the
//!    shadow ones (plain `DELETE` and `INSERT … SELECT`, so readers keep seeing the old rows
//!    until the commit, and the tables, their indexes and their names stay those of the
//!    migrations), sets the checkpoint to the head and announces it. Live writers then resume
//!    on the rebuilt rows and bookkeeping, which hold every event up to the head: a
//!    redelivery of one of those is a duplicate to the version guard, and later events apply
//!    as usual.
//! 4. The shadow schema is dropped, on success or failure; a rebuild that died leaves it behind
//!    and the next one starts by dropping it.
//!
//! The live read model is untouched until the swap commits, and the events that failed are
//! dead-lettered (their live entries acknowledged; at most [`LETTERS_KEPT`] of them, the
//! others parked without a letter) only after it, so a failed rebuild changes
//! nothing, in PostgreSQL or in Redis; a rebuild meeting an event a newer release wrote fails (the release that wrote it
//! can rebuild) instead of parking that order in the new model. Two rebuilds of one projection
//! never run at once: each holds a session lock for its whole run, and a second one fails at
//! once.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use events::RecordedEvent;
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Postgres};

use crate::apply::{apply_isolating, park_stream};
use crate::metrics;
use crate::projections::ProjectionKind;
use crate::sweeper::{DeadLetters, POSITION_CHANNEL, entry_of, position_payload};

/// Passes over new events before the locked swap: enough to leave that swap a short tail under
/// steady appends, bounded so that appends faster than the fold still end in a swap (which
/// then folds the rest under the lock).
const CATCH_UP_PASSES: usize = 5;
/// The tail (in events) small enough to fold under the lock instead of another pass.
const SWAP_TAIL: i64 = 10_000;
/// Most failed events a rebuild keeps, each with its error, to dead-letter once its swap has
/// committed. A systematic fault (a bug that fails one event of every order) would otherwise
/// keep an event per order in memory; the orders past this many are parked without a letter
/// (`projector status` counts every parked stream, `dlq parked` lists them).
pub const LETTERS_KEPT: usize = 10_000;

/// What a rebuild did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildOutcome {
    /// Events folded.
    pub events: u64,
    /// The checkpoint afterwards: the head when the swap took the lock.
    pub position: i64,
    /// Streams parked because an event failed.
    pub parked: usize,
    /// Events folded while holding the exclusive lock (live writers waited for them).
    pub events_under_lock: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// How long live writers of the projection waited for the swap.
    pub locked: Duration,
}

/// Rebuilds `projection` from the event store, folding `batch_size` events per transaction; see
/// the module docs. Events that fail are parked in the new read model and, when `dead_letters`
/// is given, dead-lettered once the swap has committed, as a consumer would.
pub async fn rebuild(
    pool: &PgPool,
    projection: ProjectionKind,
    batch_size: i64,
    dead_letters: Option<&DeadLetters>,
) -> anyhow::Result<RebuildOutcome> {
    rebuild_keeping_letters(pool, projection, batch_size, dead_letters, LETTERS_KEPT).await
}

/// [`rebuild`], keeping at most `letters_kept` failed events to dead-letter ([`LETTERS_KEPT`]
/// for the admin command; tests use a small bound).
pub async fn rebuild_keeping_letters(
    pool: &PgPool,
    projection: ProjectionKind,
    batch_size: i64,
    dead_letters: Option<&DeadLetters>,
    letters_kept: usize,
) -> anyhow::Result<RebuildOutcome> {
    let started = Instant::now();
    let mut guard = pool.acquire().await.context("connect to Postgres")?;
    let running: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(projection.rebuild_lock_key())
        .fetch_one(&mut *guard)
        .await
        .context("take the rebuild lock")?;
    if !running {
        bail!("another rebuild of {projection} is running");
    }
    let shadow = match Shadow::create(pool, projection).await {
        Ok(shadow) => shadow,
        Err(e) => {
            release(guard, projection).await;
            return Err(e);
        }
    };
    let result = run(
        pool,
        &shadow,
        batch_size,
        dead_letters,
        letters_kept,
        started,
    )
    .await;
    // Whatever happened, the shadow copies go; the live read model was not touched unless the
    // swap committed.
    if let Err(e) = shadow.drop(pool).await {
        tracing::warn!(projection = %projection, error = %platform::config::error_chain(e.as_ref()), "could not drop the rebuild's shadow schema; the next rebuild drops it");
    }
    release(guard, projection).await;
    result
}

async fn release(mut guard: PoolConnection<Postgres>, projection: ProjectionKind) {
    let released = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(projection.rebuild_lock_key())
        .execute(&mut *guard)
        .await;
    if released.is_err() {
        // The session lock would outlive the rebuild in the pool: close the session instead.
        let _ = guard.detach().close().await;
    }
}

async fn run(
    pool: &PgPool,
    shadow: &Shadow,
    batch_size: i64,
    dead_letters: Option<&DeadLetters>,
    letters_kept: usize,
    started: Instant,
) -> anyhow::Result<RebuildOutcome> {
    let projection = shadow.projection;
    let fold = Fold {
        projection,
        batch_size,
        letters_kept,
    };
    let mut outcome = RebuildOutcome::default();
    // The events that failed, dead-lettered only once the swap has committed: a rebuild that
    // fails changes nothing, in Redis either (no letter, no entry of the live group acked).
    let mut failed: Vec<(RecordedEvent, String)> = Vec::new();
    let mut folded = 0;
    let progress = Progress::new(store::head_position(pool).await.context("read the head")?);
    for pass in 0..CATCH_UP_PASSES {
        let head = store::head_position(pool).await.context("read the head")?;
        if pass > 0 && head - folded <= SWAP_TAIL {
            break;
        }
        while folded < head {
            let mut conn = pool.acquire().await.context("connect to Postgres")?;
            let mut tx = shadow.begin(&mut conn).await?;
            folded = fold
                .page(&mut tx, folded, head, &mut outcome, &mut failed)
                .await?;
            tx.commit().await.context("commit a page of the rebuild")?;
            progress.update(folded, outcome.events);
        }
    }

    tracing::info!(projection = %projection, folded, "rebuild folded; swapping it in under the projection's lock");
    let mut conn = pool.acquire().await.context("connect to Postgres")?;
    let mut tx = shadow.begin(&mut conn).await?;
    let lock_wait = Instant::now();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(projection.lock_key())
        .execute(&mut *tx)
        .await
        .context("take the projection's exclusive lock")?;
    let head = store::head_position(&mut *tx)
        .await
        .context("read the head")?;
    let before_tail = outcome.events;
    while folded < head {
        folded = fold
            .page(&mut tx, folded, head, &mut outcome, &mut failed)
            .await?;
        progress.update(folded, outcome.events);
    }
    outcome.events_under_lock = outcome.events - before_tail;
    shadow.swap_in(&mut tx, head).await?;
    tx.commit().await.context("commit the rebuild")?;
    outcome.locked = lock_wait.elapsed();
    progress.finish();
    if let Some(dl) = dead_letters {
        for (event, error) in &failed {
            dead_letter(dl, projection, event, error)
                .await
                .context("the rebuild is swapped in, but not every dead letter was written")?;
        }
    }
    outcome.position = head;
    outcome.elapsed = started.elapsed();
    if outcome.parked > 0 {
        tracing::warn!(
            parked = outcome.parked,
            "some streams failed during the rebuild and are parked; see `projector dlq list`"
        );
    }
    if outcome.parked > failed.len() && dead_letters.is_some() {
        tracing::warn!(
            parked = outcome.parked,
            dead_lettered = failed.len(),
            "more streams failed than a rebuild dead-letters; the others are parked without a \
             letter: `projector status` counts them, `projector dlq parked` lists them"
        );
    }
    Ok(outcome)
}

/// What every page of one rebuild folds with.
struct Fold {
    projection: ProjectionKind,
    batch_size: i64,
    /// Most failed events kept for their dead letters ([`LETTERS_KEPT`]).
    letters_kept: usize,
}

impl Fold {
    /// Folds the events after `after` (up to `head`, at most a batch) into the shadow tables of
    /// the transaction, parking there the streams whose event fails and adding those events to
    /// `failed`; returns the position reached.
    async fn page(
        &self,
        tx: &mut PgConnection,
        after: i64,
        head: i64,
        outcome: &mut RebuildOutcome,
        failed: &mut Vec<(RecordedEvent, String)>,
    ) -> anyhow::Result<i64> {
        let projection = self.projection;
        let mut events = store::read_all(&mut *tx, after, self.batch_size)
            .await
            .context("read the event store")?;
        events.retain(|e| e.global_position <= head);
        let Some(last) = events.last().map(|e| e.global_position) else {
            // Positions are dense up to the head; nothing above `after` means nothing to fold.
            return Ok(head);
        };
        let (_, poisoned) = apply_isolating(&mut *tx, projection, &events)
            .await
            .map_err(|f| anyhow!("apply events after position {after}: {f}"))?;
        if let Some(p) = poisoned.iter().find(|p| p.newer_release) {
            // A rebuild by this build would park that order in the new read model for an
            // event that is not broken; the release that wrote it can rebuild.
            bail!(
                "event {} of {} was written by a newer release than this projector ({}): \
                 run the rebuild with that release",
                p.version,
                p.stream_id,
                p.error
            );
        }
        for p in &poisoned {
            let event = events
                .iter()
                .find(|e| e.stream_id == p.stream_id && e.stream_version == p.version);
            if let Some(event) = event
                && failed.len() < self.letters_kept
            {
                failed.push((event.clone(), p.error.clone()));
            }
            park_stream(&mut *tx, projection, &p.stream_id, p.version, &p.error)
                .await
                .map_err(|f| anyhow!("park {}: {f}", p.stream_id))?;
            outcome.parked += 1;
        }
        outcome.events += events.len() as u64;
        Ok(last)
    }
}

async fn dead_letter(
    dl: &DeadLetters,
    projection: ProjectionKind,
    event: &RecordedEvent,
    error: &str,
) -> anyhow::Result<()> {
    dl.queue
        .dead_letter(projection.name(), &entry_of(event), error, 1, &dl.consumer)
        .await
        .context("dead-letter a failing event")?;
    metrics::record_dead_letter(projection);
    Ok(())
}

/// The shadow schema of one rebuild.
struct Shadow {
    projection: ProjectionKind,
    /// [`SHADOW_SCHEMA_PREFIX`] and the projection's name.
    schema: String,
    /// The schema of the live tables (the connections' `current_schema()`).
    live: String,
}

/// The shadow schema of a projection's rebuild is this prefix and the projection's name; a
/// leftover one (a rebuild that died) is dropped by the next rebuild of that projection.
pub const SHADOW_SCHEMA_PREFIX: &str = "projector_rebuild_";

/// The bookkeeping copied next to the projection's own tables. The checkpoints' copy stays
/// empty: the engine leaves the mark alone inside a caller's transaction, and were that to
/// change, the fold would still never write the live mark.
const BOOKKEEPING: [&str; 2] = ["projection_streams", "projection_checkpoints"];

impl Shadow {
    /// Drops what an earlier rebuild left, then creates the empty copies.
    async fn create(pool: &PgPool, projection: ProjectionKind) -> anyhow::Result<Self> {
        let live: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(pool)
            .await
            .context("read the live schema")?;
        let shadow = Self {
            projection,
            schema: format!("{SHADOW_SCHEMA_PREFIX}{}", projection.name()),
            live,
        };
        let (schema, live) = (quoted(&shadow.schema), quoted(&shadow.live));
        let mut ddl = format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; ");
        for table in projection.tables().iter().chain(&BOOKKEEPING) {
            let table = quoted(table);
            ddl.push_str(&format!(
                "CREATE TABLE {schema}.{table} (LIKE {live}.{table} INCLUDING ALL); "
            ));
        }
        sqlx::raw_sql(AssertSqlSafe(ddl))
            .execute(pool)
            .await
            .context("create the rebuild's shadow tables")?;
        Ok(shadow)
    }

    /// A transaction whose unqualified names reach the shadow tables first, without a limit on
    /// idle time: the fold works between its statements, and a rebuild an operator runs is not
    /// the frozen process that limit is there for.
    async fn begin<'c>(
        &self,
        conn: &'c mut PgConnection,
    ) -> anyhow::Result<sqlx::Transaction<'c, Postgres>> {
        conn.begin_with(AssertSqlSafe(format!(
            "BEGIN; SET LOCAL search_path = {}, {}; \
             SET LOCAL idle_in_transaction_session_timeout = 0",
            quoted(&self.schema),
            quoted(&self.live)
        )))
        .await
        .context("begin a rebuild transaction")
    }

    /// Replaces the live rows of the projection with the shadow's, sets the live checkpoint to
    /// `head` and announces it.
    async fn swap_in(&self, tx: &mut PgConnection, head: i64) -> anyhow::Result<()> {
        let (schema, live) = (quoted(&self.schema), quoted(&self.live));
        let name = self.projection.name();
        let mut swap = String::new();
        for table in self.projection.tables() {
            let table = quoted(table);
            swap.push_str(&format!(
                "DELETE FROM {live}.{table}; \
                 INSERT INTO {live}.{table} SELECT * FROM {schema}.{table}; "
            ));
        }
        swap.push_str(&format!(
            "DELETE FROM {live}.projection_streams WHERE projection = '{name}'; \
             INSERT INTO {live}.projection_streams SELECT * FROM {schema}.projection_streams; \
             INSERT INTO {live}.projection_checkpoints (projection, position) \
                 VALUES ('{name}', {head}) \
             ON CONFLICT (projection) DO UPDATE SET position = {head}, updated_at = now(); \
             SELECT pg_notify('{POSITION_CHANNEL}', '{}');",
            position_payload(self.projection, head)
        ));
        sqlx::raw_sql(AssertSqlSafe(swap))
            .execute(&mut *tx)
            .await
            .context("swap the rebuilt read model in")?;
        Ok(())
    }

    async fn drop(&self, pool: &PgPool) -> anyhow::Result<()> {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quoted(&self.schema)
        )))
        .execute(pool)
        .await
        .context("drop the rebuild's shadow schema")?;
        Ok(())
    }
}

/// An identifier in double quotes. Only ever given the projector's own names and the server's
/// `current_schema()`.
fn quoted(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// A progress bar on a terminal, periodic log lines otherwise. (A rebuild is a process of its
/// own with no `/metrics` to scrape, so it reports here and in its summary line.)
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    head: i64,
    started: Instant,
    last_log: std::cell::Cell<Instant>,
}

/// How often the non-terminal progress is logged.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    fn new(head: i64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(head.max(0) as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} events {per_sec} ETA {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Self {
            bar,
            head,
            started: Instant::now(),
            last_log: std::cell::Cell::new(Instant::now()),
        }
    }

    fn update(&self, position: i64, events: u64) {
        let fraction = if self.head > 0 {
            (position as f64 / self.head as f64).min(1.0)
        } else {
            1.0
        };
        if let Some(bar) = &self.bar {
            bar.set_position(position.max(0) as u64);
        } else if self.last_log.get().elapsed() >= PROGRESS_LOG_EVERY {
            self.last_log.set(Instant::now());
            let rate = events as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                position,
                head = self.head,
                events_per_sec = rate as u64,
                percent = (fraction * 100.0) as u64,
                "rebuilding"
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
