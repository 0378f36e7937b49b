//! The sweeper: one per projection across all instances. It keeps the projection's low-water
//! mark (`projection_checkpoints.position`) moving and heals what Redis lost. Apply
//! transactions move the mark too, in the transaction that applies (`apply::advance_mark`), so
//! a write is visible to read-your-writes the moment it is applied; the sweeper covers what they
//! leave behind (several instances finishing a prefix together, a parked stream, a row another
//! apply held) and never moves the mark backwards.
//!
//! Leadership: whoever holds the session advisory lock
//! [`ProjectionKind::sweeper_lock_key`] on a dedicated connection; the others retry every
//! [`LEADER_RETRY`]. If the leader dies its connection closes, the lock is released, and
//! another instance takes over. Every instance, leading or not, exports the projection's lag
//! (`projector_lag_events`, `projector_lag_seconds`) and its parked streams
//! (`projector_parked_streams`), so none exports a stale one; a read of them that fails leaves
//! them as they were, and `projector_lag_last_success_timestamp_seconds`, which stops, shows it.
//!
//! The low-water mark P means: every event with position ≤ P has been applied, or is held back
//! by a parked stream. Each sweep looks up, in position order, the first event after P whose
//! `projection_streams` row shows it neither applied (`version ≥ stream_version`) nor parked
//! (`parked_version ≤ stream_version`), and moves P to just before it. Positions are dense and
//! in commit order (see the `store` crate), so nothing behind P can appear later.
//! After moving P it sends `pg_notify('projection_position', '<projection>:<P>')`, which the
//! query service's read-your-writes waits listen for.
//!
//! Self-healing: the first event that is neither applied nor parked is the *blocker*. If it is
//! still the blocker [`SweeperSettings::grace`] after the sweeper first saw it (measured from
//! then, not from `recorded_at`, so clock skew and old events do not matter), the sweeper
//! applies it and the events after it, in batches from the event store, through the same
//! engine the consumers use ([`Healing`]): batch after batch while each comes back full (a
//! backlog), then each new blocker once it is a tick old, until someone else moves the mark
//! past where the last heal left it (the consumers apply again, and the sweeper stops racing
//! them for the events in flight). That is how the read model converges after Redis was
//! flushed, restarted without persistence, or trimmed entries, and keeps up while Redis is
//! down, with no operator action. A blocker that
//! keeps failing is retried with backoff and finally dead-lettered and parked like a consumer
//! would, each event once the sweeper has seen that event itself fail `max_attempts` times
//! (counted per event, so a blocker never inherits the count of the one before it), and only if
//! no consumer has applied it meanwhile; when Redis refuses the dead letter, the order is
//! parked without one, so that an outage of Redis never stops the read model at a failing
//! event. One a newer release wrote is only held (see [`crate::failure`]).
//!
//! Wake-ups: `LISTEN projection_applied`, sent by an apply of this projection that could not
//! move the mark over all of its own events (see [`crate::apply`]); an apply that could wakes
//! nobody. Plus a fallback tick ([`SweeperSettings::tick`]) that also covers healing
//! and events held behind parked streams, since notifications are only hints; a sweeper
//! healing a backlog sweeps again at once instead.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bus::{DeadLetterQueue, StreamEntry, encode_fields};
use events::RecordedEvent;
use sqlx::postgres::PgListener;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::apply::{APPLIED_CHANNEL, Poisoned, applied_version, apply_isolating};
use crate::consumer::park_with_retries;
use crate::failure::{
    Backoff, Failure, NEWER_RELEASE_LOG_INTERVAL, classify_sql, newer_release_retry_delay,
    poison_retry_delay,
};
use crate::metrics;
use crate::projections::ProjectionKind;

/// NOTIFY channel announcing a new low-water mark; payload `<projection>:<position>`. The query
/// service waits on it for `?min_position=`.
pub const POSITION_CHANNEL: &str = "projection_position";
/// Most events the mark moves over in one sweep transaction.
pub const SWEEP_PAGE: i64 = 1_000;
/// [`HEAL_BATCH`] as a count of events in memory.
const HEAL_BATCH_EVENTS: usize = HEAL_BATCH as usize;
/// Events the sweeper applies itself per transaction when healing.
pub const HEAL_BATCH: i64 = 1_000;
/// Least time between two log lines saying the sweeper applied events itself.
const HEAL_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How often a non-leader tries to become the sweeper.
pub const LEADER_RETRY: Duration = Duration::from_secs(2);
/// Longest wait for the lock connection to open, or for the leader's check that it still
/// lives: a server that went silent would otherwise hold either until TCP gives up (minutes).
const LOCK_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a shutdown lets the sweep under way finish (so it does not stop between a dead
/// letter and its park) before dropping it: a sweep waiting on a silent server never would.
const STOP_WAIT: Duration = Duration::from_secs(2);
/// Shortest pause between two sweeps, so a flood of notifications coalesces into one sweep;
/// short, because read-your-writes waits on the mark.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(5);
/// How often the lag gauges are refreshed, by the sweeper from the mark it moves and by every
/// other instance from the stored mark.
const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// SQL of the position of the first event after the mark `cp.position`, within
/// [`SWEEP_PAGE`] (`$2`), that projection `$1` has neither applied nor parked; NULL when there
/// is none. The bookkeeping is looked up per event (a correlated subquery, never turned into a
/// join): one primary-key probe each, whatever the planner believes about the table's size. A
/// macro so that the sweep and [`crate::apply`] share one text with `concat!`.
macro_rules! first_unfinished_sql {
    () => {
        "SELECT e.global_position FROM events e \
         WHERE e.global_position > cp.position \
           AND e.global_position <= cp.position + $2 \
           AND NOT COALESCE( \
               (SELECT ps.version >= e.stream_version \
                       OR COALESCE(ps.parked_version <= e.stream_version, false) \
                FROM projection_streams ps \
                WHERE ps.projection = $1 AND ps.stream_id = e.stream_id), \
               false) \
         ORDER BY e.global_position LIMIT 1"
    };
}
pub(crate) use first_unfinished_sql;

/// SQL of the number of streams projection `$1` has parked, as the column `parked`: the
/// partial index `projection_streams_parked` holds exactly those rows, so the count reads only
/// them. A macro so that both lag queries share one text with `concat!`.
macro_rules! parked_count_sql {
    () => {
        "(SELECT count(*) FROM projection_streams \
          WHERE projection = $1 AND parked_version IS NOT NULL) AS parked"
    };
}

/// The `pg_notify` payload of [`POSITION_CHANNEL`].
pub fn position_payload(projection: ProjectionKind, position: i64) -> String {
    format!("{}:{position}", projection.name())
}

/// Tuning of a sweeper.
#[derive(Debug, Clone)]
pub struct SweeperSettings {
    /// How long the blocker must stay unapplied before the sweeper applies it itself, when it
    /// is not healing already.
    pub grace: Duration,
    /// Fallback wake-up period; also how long a blocker waits for a consumer once the sweeper
    /// is healing (see [`Healing`]; never longer than `grace`).
    pub tick: Duration,
    /// Attempts before a blocker that keeps failing is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay of a failing blocker; doubles per attempt.
    pub retry_base: Duration,
}

impl Default for SweeperSettings {
    fn default() -> Self {
        Self {
            grace: Duration::from_millis(3000),
            tick: Duration::from_millis(200),
            max_attempts: 5,
            retry_base: Duration::from_millis(200),
        }
    }
}

/// Where dead letters of events the sweeper gives up on go.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    /// The dead-letter streams.
    pub queue: DeadLetterQueue,
    /// Recorded as the `consumer` field.
    pub consumer: String,
}

/// What one page of a sweep found.
struct Page {
    /// The mark after this page.
    position: i64,
    /// The first event neither applied nor parked, if the page holds one.
    blocker: Option<i64>,
    /// The page was full and wholly covered: the mark may go further.
    more: bool,
}

/// What one sweep found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    /// The low-water mark afterwards.
    pub position: i64,
    /// The first event neither applied nor parked, if any.
    pub blocker: Option<i64>,
    /// Events the sweeper applied itself.
    pub healed: usize,
    /// A backlog is being healed and a blocker remains: the next sweep should come at once,
    /// not a tick later.
    pub backlog: bool,
    /// The blocker is an event a newer release wrote, found so by an earlier sweep: it was
    /// not tried again (an instance of that release applies it, and the blocker moves on).
    pub held_for_newer_release: bool,
}

/// A sweeper that has healed, and how it goes on: the consumers may be gone (Redis down or
/// flushed), so it does not wait out a grace for each blocker as it did for the first.
/// Ended by a heal that meets a failing event or one of a newer release, by a sweep that finds
/// a blocker with the mark past [`Healing::healed_to`] outside a backlog, and by a change of
/// leader.
#[derive(Debug, Clone, Copy)]
struct Healing {
    /// The last event of the last heal's batch: every event up to it is finished, so the mark
    /// reaches it. Once a sweep finds the mark further, someone else applied (the consumers
    /// are back, or the mark passed new events of a parked order), and a blocker gets its
    /// grace again: the sweeper stops racing the consumers for the events in flight.
    healed_to: i64,
    /// The last heal's batch was full and the heal applied most of it itself (the consumers
    /// never had those events), so more may follow: the next blocker is healed at once
    /// and the sweeper sweeps again without waiting for its tick, batch after batch, whatever
    /// the consumers do meanwhile (they may fill in earlier events of the backlog's orders and
    /// move the mark over a few). Cleared by a sweep that finds no blocker. Otherwise a new
    /// blocker is healed once it has been one for a tick: while Redis is down that keeps the
    /// read models within a tick or two of the head, and a consumer that is there applies its
    /// event first.
    backlog: bool,
}

/// The sweeper of one projection (the loop runs only while it is the leader).
#[derive(Debug)]
pub struct Sweeper {
    projection: ProjectionKind,
    pool: PgPool,
    dead_letters: Option<DeadLetters>,
    settings: SweeperSettings,
    blocking: Option<(i64, Instant)>,
    /// Set by a heal that met no failing event; see [`Healing`] for what ends it.
    healing: Option<Healing>,
    /// Events healed since the last log line about it, and when that line was written: a
    /// sweeper that heals every tick through an outage logs once a minute, not every tick.
    healed_unlogged: usize,
    heal_logged_at: Option<Instant>,
    /// Failed heals of each event (stream, version) that failed in the sweeper's last heal:
    /// an event is dead-lettered only once the sweeper itself has seen it fail
    /// `max_attempts` times, so a blocker never inherits the count of the one before it, and
    /// another event of the heal batch, failing for the first time, is not given up with it.
    failures: HashMap<(String, i64), u32>,
    next_try: Instant,
    /// When the lag gauges were last refreshed (they cost a query, so at most every
    /// [`LAG_INTERVAL`]).
    lag_recorded: Instant,
    /// When an event held for a newer release was last logged.
    newer_release_logged_at: Option<Instant>,
    /// The blocker's position when a heal found it to be an event of a newer release: while
    /// it stays the blocker, healing would only fail on it again, at the cost of a failing
    /// transaction per order of the batch after it (the isolation of a failed batch).
    newer_release_blocker: Option<i64>,
}

impl Sweeper {
    /// A sweeper of `projection`. Without `dead_letters` a blocker that keeps failing is only
    /// parked.
    pub fn new(
        projection: ProjectionKind,
        pool: PgPool,
        dead_letters: Option<DeadLetters>,
        settings: SweeperSettings,
    ) -> Self {
        Self {
            projection,
            pool,
            dead_letters,
            settings,
            blocking: None,
            healing: None,
            healed_unlogged: 0,
            heal_logged_at: None,
            failures: HashMap::new(),
            next_try: Instant::now(),
            lag_recorded: Instant::now()
                .checked_sub(LAG_INTERVAL)
                .unwrap_or_else(Instant::now),
            newer_release_logged_at: None,
            newer_release_blocker: None,
        }
    }

    /// Advances the low-water mark as far as it goes, then heals the blocker if it has waited
    /// long enough: its grace, or while healing a tick, or nothing in a backlog. One testable
    /// step.
    pub async fn sweep_once(&mut self) -> Result<SweepOutcome, Failure> {
        let started = Instant::now();
        let (position, blocker) = self.advance_all().await?;
        metrics::record_sweep(self.projection, started.elapsed().as_secs_f64());
        let mut outcome = SweepOutcome {
            position,
            blocker,
            ..SweepOutcome::default()
        };
        if self.lag_recorded.elapsed() >= LAG_INTERVAL {
            self.lag_recorded = Instant::now();
            self.record_lag(position).await;
        }
        let Some(blocker) = blocker else {
            // Healing survives a sweep that found the head applied (while Redis is down, the
            // next event is the sweeper's to apply too, a tick after it appears, not a grace),
            // but any backlog is gone.
            if let Some(healing) = self.healing.as_mut() {
                healing.backlog = false;
            }
            self.blocking = None;
            self.failures.clear();
            self.newer_release_blocker = None;
            return Ok(outcome);
        };
        if self.newer_release_blocker == Some(blocker) {
            // Still held, still counted: the alert sees the hold last.
            metrics::newer_release_holds(self.projection, 1);
            outcome.held_for_newer_release = true;
            return Ok(outcome);
        }
        self.newer_release_blocker = None;
        let now = Instant::now();
        let since = match self.blocking {
            Some((pos, since)) if pos == blocker => since,
            _ => {
                self.blocking = Some((blocker, now));
                now
            }
        };
        if self
            .healing
            .is_some_and(|h| !h.backlog && position > h.healed_to)
        {
            self.healing = None;
        }
        let wait = match self.healing {
            Some(Healing { backlog: true, .. }) => Duration::ZERO,
            Some(_) => self.settings.tick.min(self.settings.grace),
            None => self.settings.grace,
        };
        if now.duration_since(since) >= wait && now >= self.next_try {
            outcome.healed = self.heal(position).await?;
            let (position, blocker) = self.advance_all().await?;
            outcome.position = position;
            outcome.blocker = blocker;
        }
        outcome.backlog = outcome.blocker.is_some() && self.healing.is_some_and(|h| h.backlog);
        Ok(outcome)
    }

    /// One short transaction: find the first event after P (within one page) that is neither
    /// applied nor parked, and move P to just before it, or over the whole page if there is
    /// none. The query stops at that first event, so a sweep costs what it advances, not a page:
    /// under load the mark trails the consumers by a few events, and sweeps run hundreds of
    /// times a second.
    async fn advance(&mut self) -> Result<Page, Failure> {
        let sql = |e: sqlx::Error| classify_sql(&e);
        let mut conn = self.pool.acquire().await.map_err(sql)?;
        // Shared with apply transactions, exclusive for a rebuild: a rebuild resetting the
        // bookkeeping never interleaves with a sweep computing P from it. The commit need not
        // wait for its WAL flush: the mark is derived from durable bookkeeping, so a mark lost in
        // a server crash is only recomputed by the next sweep, and the sweep (which read-your-
        // writes waits on) saves a disk flush. Then the checkpoint row is locked, waiting for an
        // apply transaction that holds it, so that the scan below, a statement of its own with
        // a snapshot taken after that wait, sees that apply: an apply that covered its own
        // events wakes no sweeper, and the one whose wake-up brought this sweep may have been
        // kept short by exactly that transaction. All in the round trip that begins.
        let mut tx = conn
            .begin_with(AssertSqlSafe(format!(
                "BEGIN; SELECT pg_advisory_xact_lock_shared({}); \
                 SET LOCAL synchronous_commit = off; \
                 SELECT 1 FROM projection_checkpoints WHERE projection = '{}' FOR UPDATE",
                // Both are the projection's fixed identifiers, never input.
                self.projection.lock_key(),
                self.projection.name()
            )))
            .await
            .map_err(sql)?;
        // Positions are dense and in commit order, so every position between P and the first
        // unfinished event exists and is finished, and `head` bounds the page when there is
        // none. A sweep that moves nothing writes nothing.
        let scan = loop {
            let row: Option<(i64, Option<i64>, Option<i64>)> = sqlx::query_as(concat!(
                "SELECT cp.position, (",
                first_unfinished_sql!(),
                "), (SELECT max(global_position) FROM events) \
                     FROM projection_checkpoints cp WHERE cp.projection = $1"
            ))
            .bind(self.projection.name())
            .bind(SWEEP_PAGE)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql)?;
            match row {
                Some(scan) => break scan,
                // First use: create the row, then read again.
                None => {
                    sqlx::query(
                        "INSERT INTO projection_checkpoints (projection) VALUES ($1) \
                         ON CONFLICT (projection) DO NOTHING",
                    )
                    .bind(self.projection.name())
                    .execute(&mut *tx)
                    .await
                    .map_err(sql)?;
                }
            }
        };
        let (start, blocker, head) = scan;
        let (position, more) = match blocker {
            Some(blocker) => (blocker - 1, false),
            None => {
                let page_end = start.saturating_add(SWEEP_PAGE);
                let head = head.unwrap_or(0);
                (head.min(page_end).max(start), head > page_end)
            }
        };
        if position > start {
            sqlx::query(
                // Never backwards. The row lock taken at BEGIN already keeps applies
                // (`apply::advance_mark`, which skip a locked row) from moving it meanwhile;
                // the guard keeps that true should the locking ever change.
                "WITH moved AS ( \
                     UPDATE projection_checkpoints SET position = $2, updated_at = now() \
                     WHERE projection = $1 AND position < $2 RETURNING position) \
                 SELECT pg_notify($3, $4) FROM moved",
            )
            .bind(self.projection.name())
            .bind(position)
            .bind(POSITION_CHANNEL)
            .bind(position_payload(self.projection, position))
            .execute(&mut *tx)
            .await
            .map_err(sql)?;
        }
        tx.commit().await.map_err(sql)?;
        Ok(Page {
            position,
            blocker,
            more,
        })
    }

    /// Advances the mark page by page, each page its own short transaction: a long sweep
    /// transaction would hold back PostgreSQL's cleanup horizon and let every updated row of the
    /// database (read models, bookkeeping, checkpoints) bloat while the projector catches up.
    async fn advance_all(&mut self) -> Result<(i64, Option<i64>), Failure> {
        loop {
            let page = self.advance().await?;
            if !page.more {
                return Ok((page.position, page.blocker));
            }
        }
    }

    async fn record_lag(&self, position: i64) {
        let lag = sqlx::query(concat!(
            "SELECT (SELECT COALESCE(max(global_position), 0) FROM events) AS head, \
                    (SELECT EXTRACT(EPOCH FROM now() - recorded_at)::float8 FROM events \
                      WHERE global_position = $2 + 1) AS age, ",
            parked_count_sql!(),
        ))
        .bind(self.projection.name())
        .bind(position)
        .fetch_one(&self.pool);
        // A lag read that hangs must not hold up the sweep; the gauges' age shows it.
        if let Ok(lag) = tokio::time::timeout(LOCK_CONNECTION_TIMEOUT, lag).await {
            self.set_lag(lag, position);
        }
    }

    /// Sets the lag gauges from the stored low-water mark, at most every [`LAG_INTERVAL`]: what
    /// an instance that is not the sweeper exports. Every instance exports the projection's
    /// lag, so none keeps exporting the value of a leadership it lost (the alerts and the
    /// autoscaler take the maximum over all instances). Three primary-key probes, the head and
    /// the parked streams, one query.
    pub async fn record_lag_from_mark(&mut self) {
        if self.lag_recorded.elapsed() < LAG_INTERVAL {
            return;
        }
        self.lag_recorded = Instant::now();
        let lag = sqlx::query(concat!(
            "WITH cp AS (SELECT COALESCE((SELECT position FROM projection_checkpoints \
                                           WHERE projection = $1), 0) AS position) \
             SELECT cp.position, \
                    (SELECT COALESCE(max(global_position), 0) FROM events) AS head, \
                    (SELECT EXTRACT(EPOCH FROM now() - recorded_at)::float8 FROM events \
                      WHERE global_position = cp.position + 1) AS age, ",
            parked_count_sql!(),
            " FROM cp",
        ))
        .bind(self.projection.name())
        .fetch_one(&self.pool);
        // A server that went silent must not keep this instance from trying to lead.
        let Ok(lag) = tokio::time::timeout(LOCK_CONNECTION_TIMEOUT, lag).await else {
            return;
        };
        let position = match &lag {
            Ok(row) => row.try_get("position").unwrap_or(0),
            Err(_) => 0,
        };
        self.set_lag(lag, position);
    }

    /// Sets the lag gauges, the parked streams and the time of this successful read. A failed
    /// read leaves them all as they were: the lag alerts cannot tell a frozen value, but the
    /// alert on `projector_lag_last_success_timestamp_seconds` sees the time stop.
    fn set_lag(&self, lag: Result<sqlx::postgres::PgRow, sqlx::Error>, position: i64) {
        match lag {
            Ok(row) => {
                let head: i64 = row.try_get("head").unwrap_or(position);
                let age: Option<f64> = row.try_get("age").unwrap_or(None);
                let parked: i64 = row.try_get("parked").unwrap_or(0);
                metrics::record_lag(
                    self.projection,
                    (head - position).max(0),
                    age.unwrap_or(0.0).max(0.0),
                    parked,
                );
            }
            Err(e) => {
                tracing::debug!(projection = %self.projection, error = %e, "cannot read the lag");
            }
        }
    }

    /// Applies events after `position` from the event store; returns how many were applied.
    async fn heal(&mut self, position: i64) -> Result<usize, Failure> {
        let sql = |e: sqlx::Error| classify_sql(&e);
        let mut conn = self.pool.acquire().await.map_err(sql)?;
        let events = store::read_all(&mut *conn, position, HEAL_BATCH)
            .await
            .map_err(sql)?;
        let (outcome, poisoned) = apply_isolating(&mut conn, self.projection, &events).await?;
        drop(conn);
        if outcome.applied > 0 {
            metrics::record_healed(self.projection, outcome.applied);
            self.healed_unlogged += outcome.applied;
            if self
                .heal_logged_at
                .is_none_or(|at| at.elapsed() >= HEAL_LOG_INTERVAL)
            {
                self.heal_logged_at = Some(Instant::now());
                tracing::info!(projection = %self.projection,
                    applied = std::mem::take(&mut self.healed_unlogged), after = position,
                    "sweeper applied events the consumers had not (Redis lost, trimmed or did \
                     not deliver them); `applied` counts them since the last such line, \
                     written at most once a minute");
            }
        }
        let (newer_release, poisoned): (Vec<Poisoned>, Vec<Poisoned>) =
            poisoned.into_iter().partition(|p| p.newer_release);
        // The first of them is where the mark stops now; the next sweep need not try again
        // while it does.
        self.newer_release_blocker = events
            .iter()
            .filter(|e| {
                newer_release
                    .iter()
                    .any(|p| p.stream_id == e.stream_id && p.version == e.stream_version)
            })
            .map(|e| e.global_position)
            .min();
        if let Some(first) = newer_release.first() {
            // Not poison: held, never counted towards a dead letter; an instance of the newer
            // release applies it (its consumers, or its sweeper once it leads).
            metrics::newer_release_holds(self.projection, newer_release.len());
            if self
                .newer_release_logged_at
                .is_none_or(|at| at.elapsed() >= NEWER_RELEASE_LOG_INTERVAL)
            {
                self.newer_release_logged_at = Some(Instant::now());
                tracing::warn!(projection = %self.projection, stream = %first.stream_id,
                    version = first.version, error = %first.error,
                    "the sweeper cannot apply an event a newer release wrote: holding it \
                     (RUNBOOK: ProjectorNeedsNewerRelease)");
            }
            if poisoned.is_empty() {
                self.healing = None;
                self.next_try = Instant::now()
                    + newer_release_retry_delay(
                        self.settings.retry_base,
                        self.settings.max_attempts,
                    );
                return Ok(outcome.applied);
            }
        }
        if poisoned.is_empty() {
            self.healing = Some(Healing {
                healed_to: events.last().map_or(position, |e| e.global_position),
                // A full batch the heal mostly applied itself: the consumers never had those
                // events, and more like them may follow. A full batch they had mostly applied
                // (one event stuck behind a slow or killed consumer) is no backlog, or the
                // sweeper would race them for as long as they trail the head by a batch.
                backlog: events.len() >= HEAL_BATCH_EVENTS
                    && outcome.applied.saturating_mul(2) >= HEAL_BATCH_EVENTS,
            });
            self.failures.clear();
            return Ok(outcome.applied);
        }
        self.healing = None;
        // One more failure for each event that failed; events that no longer fail (applied, or
        // parked by a consumer meanwhile) are forgotten.
        let mut failures = HashMap::with_capacity(poisoned.len());
        for p in &poisoned {
            let key = (p.stream_id.clone(), p.version);
            let n = self.failures.get(&key).copied().unwrap_or(0) + 1;
            failures.insert(key, n);
        }
        self.failures = failures;
        let mut most = 0;
        for p in &poisoned {
            let key = (p.stream_id.clone(), p.version);
            let n = self.failures.get(&key).copied().unwrap_or(0);
            if n >= self.settings.max_attempts {
                self.give_up(p, &events, n).await?;
                self.failures.remove(&key);
            } else {
                most = most.max(n);
            }
        }
        if most > 0 {
            metrics::record_retry(self.projection);
            self.next_try = Instant::now() + poison_retry_delay(self.settings.retry_base, most);
        }
        Ok(outcome.applied)
    }

    /// Dead-letters (when dead letters are configured) and parks the event `p`, which failed
    /// `attempts` heals; unless the projection has applied it meanwhile (a consumer did, after
    /// the last heal failed): then nothing failed for good, and there is neither a letter nor a
    /// park.
    async fn give_up(
        &self,
        p: &Poisoned,
        batch: &[RecordedEvent],
        attempts: u32,
    ) -> Result<(), Failure> {
        let applied = applied_version(&self.pool, self.projection, &p.stream_id).await?;
        if applied >= p.version {
            tracing::info!(projection = %self.projection, stream = %p.stream_id,
                version = p.version, applied, attempts,
                "not dead-lettering an event the sweeper gave up on: it is applied already");
            return Ok(());
        }
        let event = match batch
            .iter()
            .find(|e| e.stream_id == p.stream_id && e.stream_version == p.version)
        {
            Some(e) => Some(e.clone()),
            None => store::read_stream(&self.pool, &p.stream_id, p.version - 1, 1)
                .await
                .map_err(|e| classify_sql(&e))?
                .into_iter()
                .next(),
        };
        if let (Some(dl), Some(event)) = (&self.dead_letters, event) {
            let letter = dl
                .queue
                .dead_letter(
                    self.projection.name(),
                    &entry_of(&event),
                    &p.error,
                    attempts,
                    &dl.consumer,
                )
                .await;
            match letter {
                Ok(_) => metrics::record_dead_letter(self.projection),
                // Parked all the same. While Redis is down (or full) the sweeper is the only
                // one applying, and an event neither applied nor parked would hold the mark,
                // and every heal (which reads from the mark), at it until Redis is back: every
                // order after one heal batch would wait. The park is recorded in PostgreSQL
                // with its error; `dlq parked` lists it, and `dlq replay|purge --stream`
                // resolves it without a letter.
                Err(e) => tracing::error!(
                    projection = %self.projection, stream = %p.stream_id, version = p.version,
                    attempts, failure = %p.error, error = %e,
                    "cannot write the dead letter of an event the sweeper gave up on (Redis); \
                     parking its order without one: `projector dlq parked` lists it"
                ),
            }
        }
        // Should a consumer apply the event between the look above and the park, the park
        // finds it applied and parks nothing.
        park_with_retries(
            &self.pool,
            self.projection,
            &p.stream_id,
            p.version,
            &p.error,
        )
        .await;
        Ok(())
    }

    /// Competes for leadership and sweeps while leader, until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // Retried every LEADER_RETRY while PostgreSQL is down: the first failure, a reminder a
        // minute and the recovery are logged, the rest at debug.
        let mut lost = platform::outage::OutageLog::new();
        while !shutdown.is_cancelled() {
            let led = {
                let lead = self.lead(&shutdown, &mut lost);
                tokio::pin!(lead);
                tokio::select! {
                    led = &mut lead => led,
                    () = shutdown.cancelled() => {
                        match tokio::time::timeout(STOP_WAIT, &mut lead).await {
                            Ok(led) => led,
                            Err(_) => Err(anyhow::anyhow!("stopped while waiting for PostgreSQL")),
                        }
                    }
                }
            };
            match led {
                Ok(()) => {}
                Err(e) => match lost.failed() {
                    Some(failing) if failing.first => tracing::warn!(projection = %self.projection,
                        error = %e, "sweeper lost its connection; retrying (logged again every \
                        minute while it lasts, and when it is back)"),
                    Some(failing) => tracing::warn!(projection = %self.projection, error = %e,
                        failures = failing.failures, failing_ms = failing.failing_ms(),
                        "sweeper still has no connection; retrying"),
                    None => tracing::debug!(projection = %self.projection, error = %e,
                        "sweeper still has no connection"),
                },
            }
            // Not leading: the lag is still this instance's to export (see
            // `record_lag_from_mark`), refreshed while it waits to try again.
            let retry_at = Instant::now() + LEADER_RETRY;
            while !shutdown.is_cancelled() && Instant::now() < retry_at {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = self.record_lag_from_mark() => {}
                }
                let pause = LAG_INTERVAL.min(retry_at.saturating_duration_since(Instant::now()));
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// Returns when not (or no longer) the leader, or on shutdown. Ends `lost`'s outage (and
    /// logs so) once PostgreSQL answers again.
    async fn lead(
        &mut self,
        shutdown: &CancellationToken,
        lost: &mut platform::outage::OutageLog,
    ) -> anyhow::Result<()> {
        let options = self.pool.connect_options();
        let mut lock_conn = tokio::time::timeout(
            LOCK_CONNECTION_TIMEOUT,
            PgConnection::connect_with(&options),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no answer from PostgreSQL to a new connection"))??;
        let leader: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(self.projection.sweeper_lock_key())
            .fetch_one(&mut lock_conn)
            .await?;
        if let Some(recovered) = lost.recovered() {
            tracing::info!(projection = %self.projection, failures = recovered.failures,
                failed_ms = recovered.failed_ms(), "sweeper reaches PostgreSQL again");
        }
        if !leader {
            let _ = lock_conn.close().await;
            return Ok(());
        }
        tracing::info!(projection = %self.projection, "this instance is the sweeper");
        // What a leadership of earlier knew of the blocker and of healing is stale: another
        // leader may have healed, or the consumers come back, meanwhile.
        self.healing = None;
        self.blocking = None;
        let mut listener: Option<PgListener> = None;
        let mut backoff = Backoff::default();
        let mut last_alive_check = Instant::now();
        while !shutdown.is_cancelled() {
            if listener.is_none()
                && let Ok(mut l) = PgListener::connect_with(&self.pool).await
                && l.listen(APPLIED_CHANNEL).await.is_ok()
            {
                listener = Some(l);
            }
            let mut backlog = false;
            match self.sweep_once().await {
                Ok(outcome) => {
                    backoff.reset();
                    backlog = outcome.backlog;
                }
                Err(f) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(projection = %self.projection, error = %f, "sweep failed");
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
            if last_alive_check.elapsed() > Duration::from_secs(5) {
                last_alive_check = Instant::now();
                // Losing this connection loses the lock: stop leading.
                tokio::time::timeout(
                    LOCK_CONNECTION_TIMEOUT,
                    sqlx::query("SELECT 1").execute(&mut lock_conn),
                )
                .await
                .map_err(|_| anyhow::anyhow!("the lock connection does not answer"))??;
            }
            tokio::time::sleep(MIN_SWEEP_INTERVAL).await;
            if backlog {
                // More of a backlog to heal: at once, not a tick later.
                continue;
            }
            let tick = self.settings.tick;
            // Only an apply of this projection can move its mark (the tick covers the rest:
            // healing after the grace period, events held behind a parked stream), so other
            // projections' applies and new appends do not cost a sweep.
            let own = self.projection.name();
            let woke = async {
                match listener.as_mut() {
                    Some(l) => loop {
                        match l.recv().await {
                            Ok(n) if n.payload() == own => return Ok(()),
                            Ok(_) => {}
                            Err(e) => return Err(e),
                        }
                    },
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(tick) => {}
                result = woke => if result.is_err() { listener = None },
            }
            // Everything already received is covered by the next sweep: drop it instead of
            // sweeping once per notification.
            if let Some(l) = listener.as_mut() {
                while l.next_buffered().is_some() {}
            }
        }
        let _ = lock_conn.close().await;
        Ok(())
    }
}

/// The stream entry the relay would have published for `event` (id `<position>-0`), for
/// dead-lettering an event that came from the store.
pub fn entry_of(event: &RecordedEvent) -> StreamEntry {
    StreamEntry {
        id: format!("{}-0", event.global_position),
        fields: encode_fields(event)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    }
}
