//! Consuming the event stream for one projection: one consumer group per projection (named
//! after it), one consumer per instance (`PROJECTOR_CONSUMER_NAME`).
//!
//! [`ProjectionConsumer::process_batch`] is one testable step; [`ProjectionConsumer::run`]
//! repeats it until shutdown. A step: retry the poison entries that are due, then take new
//! work (first this consumer's own pending entries after a restart, periodically entries of
//! dead consumers via [`bus::Consumer::autoclaim`], never those this consumer holds itself,
//! otherwise `XREADGROUP >`), apply it through the engine
//! ([`crate::apply`]) and acknowledge only what was committed.
//!
//! Failures (classified in [`crate::failure`]):
//! - transient (Postgres or Redis down): the step returns [`Outcome::Transient`], the loop
//!   backs off (100 ms → 10 s, jittered) and retries the *same* entries, counting no attempt;
//! - poison: the entry stays unacknowledged in an in-memory retry queue keyed by its stream,
//!   retried after `RETRY_BASE_MS · 2^(n-1)`; later entries of that stream wait behind it in
//!   order, other streams flow. After `MAX_ATTEMPTS` it is dead-lettered (`bus` XADD to
//!   `<stream>:dlq:<group>` + XACK, only while the entry is still pending for this consumer)
//!   and its stream parked in Postgres at its event ([`crate::apply::park_stream`]), so it
//!   and the later events of the order are held back until `projector dlq replay`. Whenever
//!   the consumer gives up on an entry it first looks whether the projection has applied the
//!   entry's event meanwhile (another instance's sweeper applied it from the store, or another
//!   consumer did): then nothing failed for good, and the entry is acknowledged and its
//!   unfinished tries forgotten, with no letter and no park. An entry that cannot be decoded
//!   is no event of any order (the relay never writes one; the store holds the real events,
//!   and the sweeper applies what Redis lacks), whatever stream it names: it is queued under
//!   its own entry id, holds back nothing, and is dead-lettered without parking anything. An
//!   entry that arrives already delivered `MAX_ATTEMPTS` times (claimed from other consumers,
//!   or this consumer's own pending entry after a restart under the same name) is tried once,
//!   on its own, and dead-lettered only if that try fails, or if earlier such tries never
//!   ended (it stops whoever tries it), and in either case only if its event is not applied
//!   already (while Redis is full and refuses to record a try, the try goes ahead unrecorded
//!   rather than stop the consumer). A failure met while filling an order's gap from the event
//!   store (the earlier event's entry is another consumer's, or gone) is the earlier event's,
//!   which the engine names: the later entry waits in a queue of its own, counting no attempt,
//!   until that event is applied or dead-lettered and parked by whoever holds it (the sweeper,
//!   for an event no consumer holds); should this consumer come to hold the earlier entry, it
//!   tries it at once, as its own;
//! - newer release (an event of a type or schema version this build does not know): the entry
//!   is held like a poison entry, its stream's later entries behind it, but counts no attempt
//!   and is never dead-lettered. An instance of the newer release gets it from the store (its
//!   sweeper heals the blocked mark) or from Redis (this consumer leaves the entry pending, so
//!   it is claimed once idle for `claim_idle`; while both run, their reclaims race for it).
//!   At the pace of the last poison retry, one query over all held orders finds those such an
//!   instance has applied (or parked); only they are processed again, as duplicates;
//! - `NOGROUP` (Redis lost its data): the group is recreated and the sweeper fills the gap.
//!
//! Memory is bounded: while the retry queues hold `max_queued` entries or more, the consumer
//! takes no work at all (no new entries, none of its own pending ones, no claims) until a
//! retry frees room, so they never hold more than `max_queued + batch_size - 1`. What it does
//! not take stays pending in Redis, for it later or for another instance to claim.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bus::{BusError, Consumer, StreamEntry, decode_entry};
use events::RecordedEvent;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::apply::{Poisoned, applied_version, apply_isolating, park_stream};
use crate::failure::{
    Backoff, Failure, NEWER_RELEASE_LOG_INTERVAL, classify_bus, classify_sql,
    newer_release_retry_delay, poison_retry_delay,
};
use crate::linger::Linger;
use crate::metrics;
use crate::projections::ProjectionKind;

/// Consumers idle for longer than this with nothing pending are removed from the group.
pub const STALE_CONSUMER_IDLE: Duration = Duration::from_secs(3600);
/// How often a failed park (after a dead letter) is retried before giving up on it (the
/// sweeper then finds the event unapplied and dead-letters it again).
const PARK_ATTEMPTS: usize = 8;
/// How many tries of an entry delivered `max_attempts` times may have begun and never ended
/// (each stopped the consumer making it) before the entry is dead-lettered without another
/// try. Above one, so that one instance killed during such a try (a rolling deploy) does not
/// cost an entry its try.
pub const UNFINISHED_TRIES_LIMIT: u32 = 2;
/// Least time between two log lines about entries of another history: after a restore there
/// may be thousands, and the counter counts every one.
const FOREIGN_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Tuning of one consumer (from the service configuration).
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Entries read per `XREADGROUP`.
    pub batch_size: usize,
    /// After a read of fewer than `batch_size` new entries, how long to wait for more to join
    /// the same apply transaction when the arrival rate brings at least one within it
    /// ([`crate::linger`]); zero applies at once.
    pub linger: Duration,
    /// Attempts before an entry is dead-lettered; an entry delivered this often already gets
    /// one try ([`ProjectionConsumer`]'s `try_delivered_often`).
    pub max_attempts: u32,
    /// First poison retry delay; doubles per attempt.
    pub retry_base: Duration,
    /// Idle time after which a pending entry of another consumer is claimed.
    pub claim_idle: Duration,
    /// How often to look for such entries.
    pub reclaim_interval: Duration,
    /// Longest block of one `XREADGROUP`.
    pub block: Duration,
    /// Entries in the retry queues at which the consumer stops taking work until a retry
    /// frees room (they may hold up to one batch more: the last batch taken).
    pub max_queued: usize,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            linger: Duration::from_millis(5),
            max_attempts: 5,
            retry_base: Duration::from_millis(200),
            claim_idle: Duration::from_secs(30),
            reclaim_interval: Duration::from_secs(5),
            block: Duration::from_secs(1),
            max_queued: 10_000,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Entries were processed (applied, acknowledged, queued for retry or dead-lettered).
    Worked(usize),
    /// Nothing to do.
    Idle,
    /// Postgres or Redis failed; the same entries will be retried after a pause.
    Transient(Failure),
}

/// An entry to process and how often it was attempted before.
#[derive(Debug, Clone)]
struct Work {
    entry: StreamEntry,
    prior_attempts: u32,
}

/// A stream whose front entry failed: it and the stream's later entries, in order.
#[derive(Debug)]
struct RetryQueue {
    entries: VecDeque<StreamEntry>,
    attempts: u32,
    due: Instant,
    /// Why the front entry is queued.
    kind: QueueKind,
}

/// Why the front entry of a [`RetryQueue`] is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueKind {
    /// Its own event failed: each retry counts an attempt, the last one dead-letters it.
    Failed,
    /// Its event was written by a newer release (see [`crate::failure`]): held, never
    /// dead-lettered.
    NewerRelease,
    /// An earlier event of its order failed, at this version, while its apply filled the gap
    /// ([`ProjectionConsumer::wait_for_earlier_failure`]): it waits, counting no attempt.
    WaitingFor(i64),
}

/// The consumer of one projection in this instance.
pub struct ProjectionConsumer {
    projection: ProjectionKind,
    pool: PgPool,
    consumer: Consumer,
    settings: ConsumerSettings,
    in_hand: Vec<Work>,
    retry: HashMap<String, RetryQueue>,
    queued_ids: HashSet<String>,
    finalized: HashSet<String>,
    /// Entries whose try this consumer recorded in Redis and has not ended yet
    /// ([`Self::try_delivered_often`]).
    trying: HashSet<String>,
    /// Streams whose failing entry was given up on during the current step (dead-lettered and
    /// parked, or found applied meanwhile and acknowledged): their later entries go back to the
    /// engine (which holds them back, or applies them) instead of starting a retry queue of
    /// their own.
    settled_now: HashSet<String>,
    pending_drained: bool,
    /// Where the next read of this consumer's own pending entries starts (after this id; `0`
    /// at first): each is read once, so one held in a retry queue meanwhile is not delivered
    /// again by the next page's read.
    own_pending_after: String,
    next_reclaim: Instant,
    linger: Linger,
    /// When entries of another history were last logged ([`FOREIGN_LOG_INTERVAL`]).
    foreign_logged_at: Option<Instant>,
    /// When entries held for a newer release were last logged ([`NEWER_RELEASE_LOG_INTERVAL`]).
    newer_release_logged_at: Option<Instant>,
    /// Tries Redis, full, refused to record: the first is logged, then a reminder a minute
    /// while it lasts, and the first recorded again.
    uncounted_tries: platform::outage::OutageLog,
}

impl std::fmt::Debug for ProjectionConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionConsumer")
            .field("projection", &self.projection)
            .field("consumer", &self.consumer)
            .field("queued", &self.queued_ids.len())
            .finish_non_exhaustive()
    }
}

/// The key a failing entry's retry queue is filed under: its event's stream, or the entry
/// itself when it is no event (it could not be decoded: nothing is ordered behind it, and the
/// stream it may name is not held back by it).
fn queue_key(entry: &StreamEntry, stream: Option<&str>) -> String {
    match stream {
        Some(stream) => stream.to_owned(),
        None => format!("entry:{}", entry.id),
    }
}

/// Whether `entry`, decoded from the event stream, is `stored`, the event store's event at its
/// position: the same event id, stream, version, type, schema version and data. Metadata and
/// `recorded_at` are not compared (the store's copy is applied), so a relay formatting them
/// another way never turns the store's own events away.
fn same_event(entry: &RecordedEvent, stored: &RecordedEvent) -> bool {
    entry.global_position == stored.global_position
        && entry.event_id == stored.event_id
        && entry.stream_id == stored.stream_id
        && entry.stream_version == stored.stream_version
        && entry.event_type == stored.event_type
        && entry.schema_version == stored.schema_version
        && entry.data == stored.data
}

impl ProjectionConsumer {
    /// A consumer of `projection` through `consumer` (whose group must be the projection's
    /// name).
    pub fn new(
        projection: ProjectionKind,
        pool: PgPool,
        consumer: Consumer,
        settings: ConsumerSettings,
    ) -> Self {
        Self {
            projection,
            pool,
            consumer,
            linger: Linger::new(settings.linger),
            settings,
            in_hand: Vec::new(),
            retry: HashMap::new(),
            queued_ids: HashSet::new(),
            finalized: HashSet::new(),
            trying: HashSet::new(),
            settled_now: HashSet::new(),
            pending_drained: false,
            own_pending_after: "0".to_owned(),
            next_reclaim: Instant::now(),
            foreign_logged_at: None,
            newer_release_logged_at: None,
            uncounted_tries: platform::outage::OutageLog::new(),
        }
    }

    /// Entries waiting in the retry queues.
    pub fn queued(&self) -> usize {
        self.queued_ids.len()
    }

    /// Repeats [`Self::process_batch`] until `shutdown` is cancelled; the batch in hand is
    /// finished and acknowledged first.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        while !shutdown.is_cancelled() {
            match self.process_batch().await {
                Outcome::Transient(failure) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(projection = %self.projection, error = %failure,
                        delay_ms = delay.as_millis() as u64, "transient failure; pausing");
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Outcome::Worked(_) | Outcome::Idle => backoff.reset(),
            }
        }
        tracing::info!(projection = %self.projection, "consumer stopped");
    }

    /// One step: due retries, then new work. Never panics; failures come back as an
    /// [`Outcome`].
    pub async fn process_batch(&mut self) -> Outcome {
        let step = self.step().await;
        metrics::record_retry_queued(self.projection, self.queued_ids.len());
        match step {
            Ok(0) => Outcome::Idle,
            Ok(n) => Outcome::Worked(n),
            Err(failure) => Outcome::Transient(failure),
        }
    }

    async fn step(&mut self) -> Result<usize, Failure> {
        self.settled_now.clear();
        let mut handled = self.run_due_retries().await?;
        if self.in_hand.is_empty() {
            self.in_hand = self.fetch().await?;
        }
        if !self.in_hand.is_empty() {
            let work = std::mem::take(&mut self.in_hand);
            if let Err(failure) = self.process(&work).await {
                self.in_hand.splice(0..0, work);
                return Err(failure);
            }
            handled += work.len();
            self.finalized.clear();
        }
        Ok(handled)
    }

    async fn run_due_retries(&mut self) -> Result<usize, Failure> {
        let now = Instant::now();
        let (held, mut due): (Vec<String>, Vec<String>) = self
            .retry
            .iter()
            .filter(|(_, q)| q.due <= now)
            .map(|(k, _)| k.clone())
            .partition(|k| {
                self.retry
                    .get(k)
                    .is_some_and(|q| q.kind == QueueKind::NewerRelease)
            });
        if !held.is_empty() {
            // This build still cannot read them, so trying each would only cost a failing
            // transaction per order per round (thousands while a new event version rolls
            // out). One query finds those an instance of the newer release applied, or
            // parked, meanwhile: only they are processed (their entries are then duplicates,
            // acknowledged); the others wait another round untouched.
            let settled = self.settled_elsewhere(&held).await?;
            let delay = self.newer_release_retry();
            let mut waiting = 0;
            for key in held {
                if settled.contains(&key) {
                    due.push(key);
                } else if let Some(queue) = self.retry.get_mut(&key) {
                    queue.due = now + delay;
                    waiting += 1;
                }
            }
            metrics::newer_release_holds(self.projection, waiting);
        }
        let mut handled = 0;
        for key in due {
            let Some(queue) = self.retry.remove(&key) else {
                continue;
            };
            let attempts = queue.attempts;
            let work: Vec<Work> = queue
                .entries
                .into_iter()
                .enumerate()
                .map(|(i, entry)| Work {
                    prior_attempts: if i == 0 { attempts } else { 0 },
                    entry,
                })
                .collect();
            for w in &work {
                self.queued_ids.remove(&w.entry.id);
            }
            handled += work.len();
            if let Err(failure) = self.process(&work).await {
                // Retried as ordinary work after the pause; attempts are kept on the front.
                self.in_hand.splice(0..0, work);
                return Err(failure);
            }
        }
        Ok(handled)
    }

    async fn handle_bus<T>(&mut self, result: Result<T, BusError>) -> Result<Option<T>, Failure> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(e) if e.is_no_group() => {
                tracing::warn!(projection = %self.projection, "consumer group is gone (Redis lost its data); recreating it");
                self.consumer
                    .ensure_group(bus::FROM_BEGINNING)
                    .await
                    .map_err(|e| classify_bus(&e))?;
                // Our pending entries went with the group; the sweeper fills in what was lost.
                self.pending_drained = true;
                Ok(None)
            }
            Err(e) => Err(classify_bus(&e)),
        }
    }

    async fn fetch(&mut self) -> Result<Vec<Work>, Failure> {
        if self.queued_ids.len() >= self.settings.max_queued.max(1) {
            let until_due = self.until_next_retry();
            // Full: take nothing until a retry frees room. Own pending and claimed entries
            // count too: after a restart, or when another instance stopped, they can be as
            // many as the stream's whole backlog, all failing alike.
            let pause = until_due
                .unwrap_or(self.settings.block)
                .min(self.settings.block);
            tokio::time::sleep(pause).await;
            return Ok(Vec::new());
        }
        // Own pending entries first, before any claim: reading them (`XREADGROUP … 0`) counts
        // a delivery of each, which entries claimed and held meanwhile must not get.
        // Each counts its deliveries as a claimed entry does: an entry that stopped this
        // instance (a crash, an OOM kill) comes back here after the restart, under the same
        // name, and would otherwise be tried at every restart, for ever, never dead-lettered.
        while !self.pending_drained {
            let own = self
                .consumer
                .read_own_pending_counted(self.settings.batch_size, &self.own_pending_after)
                .await;
            let own = self.handle_bus(own).await?.unwrap_or_default();
            let Some((last, _)) = own.last() else {
                self.pending_drained = true;
                break;
            };
            self.own_pending_after = last.id.clone();
            let work: Vec<Work> = own
                .into_iter()
                .filter(|(e, _)| !self.queued_ids.contains(&e.id))
                .map(|(entry, deliveries)| Work {
                    entry,
                    prior_attempts: deliveries.saturating_sub(1),
                })
                .collect();
            if !work.is_empty() {
                return Ok(work);
            }
        }
        let now = Instant::now();
        if now >= self.next_reclaim {
            self.next_reclaim = now + self.settings.reclaim_interval;
            // What this consumer holds on purpose (retry queues, holds for a newer release)
            // is left alone: claiming it would count a delivery nobody tried, and reset the
            // idle time that lets an instance of a newer release claim it.
            let queued = &self.queued_ids;
            let claimed = self
                .consumer
                .autoclaim(self.settings.claim_idle, self.settings.batch_size, |id| {
                    queued.contains(id)
                })
                .await;
            let claimed = self.handle_bus(claimed).await?.unwrap_or_default();
            if let Err(e) = self
                .consumer
                .remove_stale_consumers(STALE_CONSUMER_IDLE)
                .await
            {
                tracing::debug!(error = %e, "cannot remove stale consumers");
            }
            let work: Vec<Work> = claimed
                .into_iter()
                .map(|(entry, deliveries)| Work {
                    entry,
                    prior_attempts: deliveries.saturating_sub(1),
                })
                .collect();
            if !work.is_empty() {
                tracing::info!(projection = %self.projection, count = work.len(), "claimed entries of a stopped consumer");
                return Ok(work);
            }
        }
        let block = self
            .until_next_retry()
            .map_or(self.settings.block, |d| d.min(self.settings.block));
        let fresh = self
            .consumer
            .read_new(self.settings.batch_size, block)
            .await;
        let mut fresh = self.handle_bus(fresh).await?.unwrap_or_default();
        self.linger.record(fresh.len(), Instant::now());
        let room = self.settings.batch_size.saturating_sub(fresh.len());
        if let Some(wait) = self.linger.wait()
            && !fresh.is_empty()
            && room > 0
        {
            tokio::time::sleep(wait).await;
            // A failure here is left to the next read, which meets and handles it: what was
            // read already is applied now rather than dropped from this step.
            if let Ok(more) = self.consumer.read_new(room, Duration::ZERO).await {
                self.linger.record(more.len(), Instant::now());
                fresh.extend(more);
            }
        }
        Ok(fresh
            .into_iter()
            .map(|entry| Work {
                entry,
                prior_attempts: 0,
            })
            .collect())
    }

    /// How long until the first retry queue is due; `None` when there is none.
    fn until_next_retry(&self) -> Option<Duration> {
        let next_due = self.retry.values().map(|q| q.due).min()?;
        Some(next_due.saturating_duration_since(Instant::now()))
    }

    /// Applies `work` (in stream order), acknowledging what was committed and queueing or
    /// dead-lettering what failed. An entry delivered `max_attempts` times or more is tried on
    /// its own ([`Self::try_delivered_often`]), after the entries before it.
    async fn process(&mut self, work: &[Work]) -> Result<(), Failure> {
        let mut start = 0;
        for (i, w) in work.iter().enumerate() {
            if w.prior_attempts >= self.settings.max_attempts {
                self.apply_work(&work[start..i]).await?;
                self.try_delivered_often(w).await?;
                start = i + 1;
            }
        }
        self.apply_work(&work[start..]).await
    }

    /// Tries an entry delivered `max_attempts` times or more without being acknowledged, once,
    /// on its own, through the engine, and dead-letters it only if that try fails. Many
    /// deliveries alone prove nothing: entries held for a newer release, or behind such an
    /// event, are delivered again whenever a consumer claims them, and the engine may find the
    /// event applied (a sweeper healed it) or its stream parked. What they can mean is an
    /// entry that stops every consumer trying it (a crash, an abort), whose failures no error
    /// ever counted; so the try is recorded in Redis before it begins
    /// ([`bus::Consumer::begin_try`]) and forgotten when it ends, and an entry
    /// [`UNFINISHED_TRIES_LIMIT`] of whose tries never ended is dead-lettered without another
    /// (or, its event applied already by another instance, acknowledged: [`Self::give_up`]).
    async fn try_delivered_often(&mut self, w: &Work) -> Result<(), Failure> {
        let id = &w.entry.id;
        if self.queued_ids.contains(id) || self.finalized.contains(id) {
            return Ok(());
        }
        // A try that a transient failure interrupted is still the same try.
        if !self.trying.contains(id) {
            let begun = match self.consumer.begin_try(id).await {
                // Redis is full: it refuses to record the try, not to read the tries recorded.
                // The try goes ahead unrecorded rather than stop this consumer until Redis has
                // room; one with too many unfinished tries already is given up on as usual.
                Err(e) if e.is_out_of_memory() => {
                    self.log_uncounted_try(&e);
                    self.consumer
                        .unfinished_tries(id)
                        .await
                        .map(|n| n.saturating_add(1))
                }
                begun => {
                    if begun.is_ok()
                        && let Some(recovered) = self.uncounted_tries.recovered()
                    {
                        tracing::info!(projection = %self.projection,
                            uncounted = recovered.failures, failed_ms = recovered.failed_ms(),
                            "Redis records tries of entries delivered many times again");
                    }
                    begun
                }
            };
            let Some(unfinished) = self.handle_bus(begun).await? else {
                return Ok(());
            };
            if unfinished > UNFINISHED_TRIES_LIMIT {
                // Only an event parks its stream; an entry that does not decode is none.
                let event = decode_entry(&w.entry).ok();
                let error = format!(
                    "delivered {} times without being acknowledged; {} tries of it never \
                     ended (did it stop the consumer trying it?)",
                    w.prior_attempts + 1,
                    unfinished - 1
                );
                // The letter forgets the entry's unfinished tries in the same script that
                // writes it; an entry no longer this consumer's is left to the one holding it,
                // which ends its own try.
                // Not marked as a try under way before the letter is written: were writing it
                // to fail (Redis or PostgreSQL gone for a moment), the step is repeated, and
                // it must decide again to write the letter, not go on to try the entry.
                self.give_up(&w.entry, event.as_ref(), &error, w.prior_attempts + 1)
                    .await?;
                return Ok(());
            }
            self.trying.insert(id.clone());
        }
        self.apply_work(std::slice::from_ref(w)).await?;
        let ended = self.consumer.end_try(id).await;
        self.handle_bus(ended).await?;
        self.trying.remove(id);
        Ok(())
    }

    /// Says that tries go ahead uncounted because Redis is full: at the first, then once a
    /// minute while it lasts ([`platform::outage::OutageLog`]).
    fn log_uncounted_try(&mut self, error: &BusError) {
        if let Some(failing) = self.uncounted_tries.failed() {
            tracing::warn!(projection = %self.projection, error = %error,
                uncounted = failing.failures, failing_ms = failing.failing_ms(),
                "Redis is full: trying entries delivered many times without counting the try");
        }
    }

    /// [`Self::process`] for entries to apply together.
    async fn apply_work(&mut self, work: &[Work]) -> Result<(), Failure> {
        if work.is_empty() {
            return Ok(());
        }
        let mut events = Vec::with_capacity(work.len());
        let mut applied_work: Vec<&Work> = Vec::with_capacity(work.len());
        for w in work {
            if self.queued_ids.contains(&w.entry.id) || self.finalized.contains(&w.entry.id) {
                continue;
            }
            match decode_entry(&w.entry) {
                Ok(event) => {
                    let waits_on_it = self.retry.get(&event.stream_id).is_some_and(|q| {
                        matches!(q.kind, QueueKind::WaitingFor(failed)
                            if event.stream_version <= failed)
                    });
                    if waits_on_it {
                        // The order's queue waits on this very event (a later entry met its
                        // failure while filling the gap), and now this consumer holds its
                        // entry (claimed, or read again): it is tried now, counted as its
                        // own, and the waiting entries go back in hand behind it. Queued
                        // behind them, it would never be tried by this consumer.
                        self.release_waiting(&event.stream_id);
                        events.push(event);
                        applied_work.push(w);
                    } else if self.retry.contains_key(&event.stream_id) {
                        self.hold_behind(&event.stream_id, &w.entry);
                    } else {
                        events.push(event);
                        applied_work.push(w);
                    }
                }
                Err(e) => {
                    // Whatever stream it names, it is none of that order's events: the relay
                    // never writes an entry that does not decode, and the store holds the
                    // order's real events. So it is retried on its own and never holds back,
                    // or parks, the stream it names.
                    self.failed(w, None, &e.to_string()).await?;
                }
            }
        }
        if events.is_empty() {
            return Ok(());
        }
        let (_, poisoned) = {
            let mut conn = self.pool.acquire().await.map_err(|e| classify_sql(&e))?;
            let foreign = self
                .drop_foreign(&mut conn, &mut events, &mut applied_work)
                .await?;
            if !foreign.is_empty() {
                let acked = self.consumer.ack(&foreign).await;
                self.handle_bus(acked).await?;
            }
            if events.is_empty() {
                return Ok(());
            }
            apply_isolating(&mut conn, self.projection, &events).await?
        };
        let poisoned: HashMap<&str, &Poisoned> =
            poisoned.iter().map(|p| (p.stream_id.as_str(), p)).collect();
        let mut ack = Vec::with_capacity(events.len());
        // Each stream's entries in version order, so the entry of the event that failed takes
        // its retry queue before the later ones queue behind it, whatever order they came in.
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.sort_by(|&a, &b| {
            (events[a].stream_id.as_str(), events[a].stream_version)
                .cmp(&(events[b].stream_id.as_str(), events[b].stream_version))
        });
        for i in order {
            let (event, w) = (&events[i], applied_work[i]);
            match poisoned.get(event.stream_id.as_str()) {
                Some(p) if event.stream_version >= p.version && p.newer_release => {
                    self.hold_for_newer_release(w, &event.stream_id, &p.error);
                }
                Some(p) if event.stream_version > p.version => {
                    self.wait_for_earlier_failure(w, &event.stream_id, p);
                }
                Some(p) if event.stream_version == p.version => {
                    self.failed(w, Some(event), &p.error).await?;
                }
                _ => ack.push(w.entry.id.clone()),
            }
        }
        let newer_release = poisoned.values().filter(|p| p.newer_release).count();
        if newer_release > 0 {
            metrics::newer_release_holds(self.projection, newer_release);
        }
        if !ack.is_empty() {
            let acked = self.consumer.ack(&ack).await;
            self.handle_bus(acked).await?;
        }
        Ok(())
    }

    /// Takes out of `events` (and `work`, its parallel) every entry that is not the event the
    /// event store holds at its position, and returns their entry ids, to be acknowledged
    /// unapplied; the entries kept are replaced by the store's copies of their events. Such
    /// entries come from a history the store does not have (the database was restored from a
    /// backup while Redis kept the stream), or were written by hand: applied, each would put an
    /// event into the read model that the store never had, and the version guard would then
    /// skip the store's own event of that version for good. An entry must match the store's
    /// event in every field the projections read, not only in its position and event id: one
    /// that reuses a real event's position and id under another stream or version would
    /// otherwise be applied to that stream. What the store does hold at those positions
    /// reaches the read model through the sweeper.
    async fn drop_foreign(
        &mut self,
        conn: &mut sqlx::PgConnection,
        events: &mut Vec<RecordedEvent>,
        work: &mut Vec<&Work>,
    ) -> Result<Vec<String>, Failure> {
        let positions: Vec<i64> = events.iter().map(|e| e.global_position).collect();
        let held: HashMap<i64, RecordedEvent> = store::events_at(&mut *conn, &positions)
            .await
            .map_err(|e| classify_sql(&e))?
            .into_iter()
            .map(|e| (e.global_position, e))
            .collect();
        let mut foreign = Vec::new();
        let mut kept = 0;
        for i in 0..events.len() {
            match held.get(&events[i].global_position) {
                Some(stored) if same_event(&events[i], stored) => {
                    // The store's copy: what is applied is what the store holds, to the last
                    // field (`recorded_at`, metadata), whatever the entry carried.
                    events[i] = stored.clone();
                    events.swap(kept, i);
                    work.swap(kept, i);
                    kept += 1;
                }
                _ => foreign.push(work[i].entry.id.clone()),
            }
        }
        events.truncate(kept);
        work.truncate(kept);
        let Some(first) = foreign.first() else {
            return Ok(foreign);
        };
        metrics::foreign_entries(self.projection, foreign.len());
        if self
            .foreign_logged_at
            .is_none_or(|at| at.elapsed() >= FOREIGN_LOG_INTERVAL)
        {
            self.foreign_logged_at = Some(Instant::now());
            tracing::error!(projection = %self.projection, skipped = foreign.len(),
                first_entry = %first,
                "entries of the event stream are not the events the event store holds at \
                 their positions (was the database restored from a backup, or were entries \
                 written by hand?): acknowledged without applying them; the store's own \
                 events reach the read model through the sweeper (RUNBOOK: \
                 RelayStreamDiverged)");
        }
        Ok(foreign)
    }

    /// How long an entry held for a newer release waits between two looks.
    fn newer_release_retry(&self) -> Duration {
        newer_release_retry_delay(self.settings.retry_base, self.settings.max_attempts)
    }

    /// Which of the retry queues `keys` (held for a newer release) another instance has
    /// settled meanwhile: the projection has applied or parked their front entry's event.
    async fn settled_elsewhere(&self, keys: &[String]) -> Result<HashSet<String>, Failure> {
        let mut streams = Vec::with_capacity(keys.len());
        let mut versions = Vec::with_capacity(keys.len());
        for key in keys {
            let front = self.retry.get(key).and_then(|q| q.entries.front());
            if let Some(Ok(event)) = front.map(decode_entry) {
                streams.push(event.stream_id);
                versions.push(event.stream_version);
            }
        }
        let settled: Vec<String> = sqlx::query_scalar(
            "SELECT p.stream_id FROM UNNEST($2::text[], $3::int8[]) AS h(stream_id, version) \
             JOIN projection_streams p ON p.projection = $1 AND p.stream_id = h.stream_id \
             WHERE p.version >= h.version OR p.parked_version <= h.version",
        )
        .bind(self.projection.name())
        .bind(&streams)
        .bind(&versions)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| classify_sql(&e))?;
        Ok(settled.into_iter().collect())
    }

    /// Holds `w`, whose event a newer release wrote: queued with its attempts unchanged, the
    /// stream's later entries behind it ([`newer_release_retry_delay`]).
    fn hold_for_newer_release(&mut self, w: &Work, stream: &str, error: &str) {
        if self.retry.contains_key(stream) {
            self.hold_behind(stream, &w.entry);
            return;
        }
        if self
            .newer_release_logged_at
            .is_none_or(|at| at.elapsed() >= NEWER_RELEASE_LOG_INTERVAL)
        {
            self.newer_release_logged_at = Some(Instant::now());
            tracing::warn!(projection = %self.projection, id = %w.entry.id, stream, error,
                "an event was written by a newer release than this projector: holding it \
                 and its order's later events (never dead-lettered) until an instance of \
                 that release applies it; upgrade this instance (RUNBOOK: \
                 ProjectorNeedsNewerRelease)");
        }
        let delay = self.newer_release_retry();
        self.queue_alone(stream, w, w.prior_attempts, delay, QueueKind::NewerRelease);
    }

    /// Queues `w`, whose event did not fail: an earlier event of its stream did, `p`, read
    /// from the event store to fill the gap because its own entry is not in this batch (another
    /// consumer holds it, or no entry does any more). Counted against `w`, the failure would
    /// dead-letter an event that never failed, under the other's error, and leave the one that
    /// failed without a letter. So `w` is tried again at the pace of a last retry, its count
    /// untouched: once the earlier event is applied it applies, and once its holder (or, for
    /// an event no consumer holds, the sweeper) dead-letters and parks it, the park holds `w`
    /// back and it is acknowledged.
    fn wait_for_earlier_failure(&mut self, w: &Work, stream: &str, p: &Poisoned) {
        // The earlier event was given up on (dead-lettered and parked) or found applied in
        // this very step: run the entry again now, to be held back or applied.
        if self.settled_now.contains(stream) {
            self.take_again(w);
            return;
        }
        if self.retry.contains_key(stream) {
            self.hold_behind(stream, &w.entry);
            return;
        }
        tracing::debug!(projection = %self.projection, id = %w.entry.id, stream,
            failed_version = p.version, error = %p.error,
            "an earlier event of the order failed; waiting for it to be applied or parked");
        let delay = poison_retry_delay(self.settings.retry_base, self.settings.max_attempts);
        let kind = QueueKind::WaitingFor(p.version);
        self.queue_alone(stream, w, w.prior_attempts, delay, kind);
    }

    /// Starts the retry queue `key` with `w` alone at its front, due after `delay`.
    fn queue_alone(
        &mut self,
        key: &str,
        w: &Work,
        attempts: u32,
        delay: Duration,
        kind: QueueKind,
    ) {
        self.retry.insert(
            key.to_owned(),
            RetryQueue {
                entries: VecDeque::from([w.entry.clone()]),
                attempts,
                due: Instant::now() + delay,
                kind,
            },
        );
        self.queued_ids.insert(w.entry.id.clone());
    }

    /// Puts `w` back in hand, to be processed again in this round as new work (its order's
    /// earlier event was settled meanwhile).
    fn take_again(&mut self, w: &Work) {
        self.in_hand.push(Work {
            entry: w.entry.clone(),
            prior_attempts: 0,
        });
    }

    /// Takes the waiting queue of `stream` apart: its entries go back in hand, to be processed
    /// after the work under way, the front one keeping its count.
    fn release_waiting(&mut self, stream: &str) {
        let Some(queue) = self.retry.remove(stream) else {
            return;
        };
        for (i, entry) in queue.entries.into_iter().enumerate() {
            self.queued_ids.remove(&entry.id);
            self.in_hand.push(Work {
                prior_attempts: if i == 0 { queue.attempts } else { 0 },
                entry,
            });
        }
    }

    fn hold_behind(&mut self, key: &str, entry: &StreamEntry) {
        if let Some(queue) = self.retry.get_mut(key) {
            queue.entries.push_back(entry.clone());
            self.queued_ids.insert(entry.id.clone());
        }
    }

    /// One more failed attempt of `w`, whose event is `event` (`None` for an entry that is no
    /// event): queue it for a retry, or give up on it.
    async fn failed(
        &mut self,
        w: &Work,
        event: Option<&RecordedEvent>,
        error: &str,
    ) -> Result<(), Failure> {
        let key = queue_key(&w.entry, event.map(|e| e.stream_id.as_str()));
        if self.settled_now.contains(&key) {
            self.take_again(w);
            return Ok(());
        }
        if self.retry.contains_key(&key) {
            self.hold_behind(&key, &w.entry);
            return Ok(());
        }
        let attempts = w.prior_attempts + 1;
        if attempts >= self.settings.max_attempts {
            return self.give_up(&w.entry, event, error, attempts).await;
        }
        metrics::record_retry(self.projection);
        let delay = poison_retry_delay(self.settings.retry_base, attempts);
        tracing::warn!(projection = %self.projection, id = %w.entry.id, attempts, error,
            retry_in_ms = delay.as_millis() as u64, "entry failed; will retry");
        self.queue_alone(&key, w, attempts, delay, QueueKind::Failed);
        Ok(())
    }

    /// Gives up on `entry`, whose event is `event` (`None` for an entry that is no event):
    /// dead-letters it and parks the event's stream at it (an entry that is no event parks
    /// nothing). Unless the projection has applied that event meanwhile (another instance's
    /// sweeper applied it from the store, or a consumer that claimed the entry, while this
    /// consumer's tries failed or were cut short): then nothing failed for good, and the entry
    /// is acknowledged and its unfinished tries forgotten, with no letter and no park. A
    /// letter, or a park, would hold back the order's next event, which never failed. (Applied
    /// in the moment between that look and the letter, the event leaves a letter but no park:
    /// `park_stream` looks again under the stream's lock, and `dlq purge` deletes the letter.)
    async fn give_up(
        &mut self,
        entry: &StreamEntry,
        event: Option<&RecordedEvent>,
        error: &str,
        attempts: u32,
    ) -> Result<(), Failure> {
        if let Some(event) = event {
            let applied = applied_version(&self.pool, self.projection, &event.stream_id).await?;
            if applied >= event.stream_version {
                let acked = self.consumer.ack(std::slice::from_ref(&entry.id)).await;
                self.handle_bus(acked).await?;
                let ended = self.consumer.end_try(&entry.id).await;
                self.handle_bus(ended).await?;
                self.finalized.insert(entry.id.clone());
                self.settled_now.insert(event.stream_id.clone());
                tracing::info!(projection = %self.projection, id = %entry.id,
                    stream = %event.stream_id, version = event.stream_version, applied, attempts,
                    "giving up on an entry whose event is applied already: acknowledged, not \
                     dead-lettered");
                return Ok(());
            }
        }
        // A full Redis still takes the letter: the script acknowledges the entry before it
        // writes it, and Redis lets a script that has written go on writing (projector test
        // `an_entry_given_up_on_while_redis_is_full_is_still_dead_lettered`).
        let dead = self.consumer.dead_letter(entry, error, attempts).await;
        let written = self.handle_bus(dead).await?.flatten();
        self.finalized.insert(entry.id.clone());
        if written.is_none() {
            // No longer ours (claimed by another consumer, or acknowledged): whoever holds it
            // decides; parking here would hold back an order nobody dead-lettered.
            return Ok(());
        }
        metrics::record_dead_letter(self.projection);
        let Some(event) = event else {
            return Ok(());
        };
        // Should another instance apply the event between the look above and the park, the
        // park finds it applied and parks nothing.
        park_with_retries(
            &self.pool,
            self.projection,
            &event.stream_id,
            event.stream_version,
            error,
        )
        .await;
        self.settled_now.insert(event.stream_id.clone());
        // Later entries of the stream queued behind it are now held back by the park (or, not
        // parked, applied): hand them to the engine, which counts and acknowledges them.
        Ok(())
    }
}

/// Parks `stream` at version `failed` ([`park_stream`]), retrying transient failures a few
/// times. If it still fails the stream is not parked: the sweeper later finds its next event
/// unapplied, retries it and dead-letters it again, so nothing is applied out of order either
/// way.
pub async fn park_with_retries(
    pool: &PgPool,
    projection: ProjectionKind,
    stream: &str,
    failed: i64,
    error: &str,
) {
    let mut backoff = Backoff::default();
    for _ in 0..PARK_ATTEMPTS {
        let result = match pool.acquire().await {
            Ok(mut conn) => park_stream(&mut conn, projection, stream, failed, error).await,
            Err(e) => Err(classify_sql(&e)),
        };
        match result {
            Ok(_) => return,
            Err(f) if f.is_transient() => tokio::time::sleep(backoff.next_delay()).await,
            Err(f) => {
                tracing::error!(projection = %projection, stream, error = %f, "cannot park stream");
                return;
            }
        }
    }
    tracing::error!(projection = %projection, stream, "cannot park stream: Postgres unavailable");
}
