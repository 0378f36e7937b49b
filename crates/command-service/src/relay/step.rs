//! One relay step, split from the loop so it can be tested on its own: read up to `RELAY_BATCH`
//! events after the checkpoint, check they are contiguous, publish them in one round trip, and
//! move the checkpoint: at once in memory, in `relay_checkpoints` when it is due.
//!
//! Every step runs at least one query on the leader connection (the read), so a dead connection,
//! and with it a lost lock, is noticed within one cycle. The step never publishes past a gap and
//! never publishes out of position order.
//!
//! # Why the stored checkpoint may lag
//! Each write of the stored checkpoint is a transaction of its own and, with
//! `synchronous_commit` on, a WAL flush: one per relay cycle, so at low load one more disk flush
//! per command than the append itself. The stored checkpoint only matters when Redis has lost
//! the stream (otherwise a new leader resumes after the stream's newest relayed entry, which is
//! never behind it), and then a lagging one only republishes events that a projector recognises as
//! duplicates. So the leader writes it at most once per checkpoint interval
//! (`RELAY_CHECKPOINT_INTERVAL_MS`; the first batch of a leadership at once), writes a pending
//! one when it falls due even if nothing more is committed ([`RelayContext::checkpoint_due_in`]),
//! and flushes it when it stops leading gracefully ([`RelayContext::flush_checkpoint`]).

use std::time::{Duration, Instant};

use bus::{BusError, Publisher};
use events::RecordedEvent;
use sqlx::{Connection, PgConnection};

use super::checkpoint;
use super::leader::{DEFAULT_QUERY_TIMEOUT, answered_within};
use super::status::RelayStatus;
use super::telemetry;

/// Least time between two log lines about entries Redis refused: while a foreign entry sits above
/// the positions, every step with new events is refused, many a second under load, and
/// `relay_refused_entries_total` (with its alert, RelayEntriesRefused) counts every one.
pub const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What one [`publish_step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepOutcome {
    /// Events published in this step (including any Redis already had).
    pub published: usize,
    /// Nothing more to publish as of this step's read: wait for the next commit.
    pub caught_up: bool,
    /// The read showed a gap (never expected, see the store's invariants): the step published
    /// only the events before it, and the caller should log and retry later.
    pub gap: Option<Gap>,
    /// The position of the stream's newest entry when the event store holds another event
    /// there, or none at all: the stream records a history this store does not have (the
    /// database was restored from a backup, or another deployment writes the same key). The
    /// step published nothing; the caller retries later, and publishing resumes once the stream
    /// no longer contradicts the store (the operator renamed or deleted it).
    pub diverged: Option<i64>,
}

/// A missing position in the log: `expected` was next, but the read returned `found` instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The position the relay needs next.
    pub expected: i64,
    /// The position the read returned in its place.
    pub found: i64,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The leader connection failed (read, checkpoint write or ping): the lock may be gone, so
    /// the caller must give up the leadership.
    #[error("relay leader connection failed: {0}")]
    Leadership(#[source] sqlx::Error),
    /// Publishing to Redis failed; retry later with backoff (nothing was checkpointed).
    #[error("publishing to redis failed: {0}")]
    Publish(#[source] BusError),
}

/// The leader's state: its lock connection, where it is in the log, and where it publishes.
pub struct RelayContext {
    conn: PgConnection,
    publisher: Publisher,
    stream_key: String,
    batch: i64,
    /// The highest position known to be on the stream.
    checkpoint: i64,
    /// What `relay_checkpoints` holds for this stream, as far as this leader knows.
    stored: i64,
    /// Least time between two writes of the stored checkpoint; zero writes after every batch.
    checkpoint_interval: Duration,
    /// When this leader last wrote the stored checkpoint; `None` before its first write.
    last_stored_at: Option<Instant>,
    head: i64,
    status: RelayStatus,
    /// How long each query on the leader connection may wait for an answer before the
    /// connection, and with it the leadership, counts as lost.
    query_timeout: Duration,
    /// Whether this leadership has compared the stream's newest entry with the store yet.
    history_checked: bool,
    /// The stream's newest position, while it contradicts the store (see [`StepOutcome`]).
    diverged: Option<i64>,
    /// When refused entries were last logged ([`REFUSED_LOG_INTERVAL`]).
    refused_logged_at: Option<Instant>,
    /// Entries refused since that line, to be told by the next.
    refused_unlogged: usize,
}

impl std::fmt::Debug for RelayContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayContext")
            .field("stream_key", &self.stream_key)
            .field("batch", &self.batch)
            .field("checkpoint", &self.checkpoint)
            .field("stored", &self.stored)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

impl RelayContext {
    /// Starts leading on `conn` (which holds the relay lock): resumes after the stored
    /// checkpoint, which the first step's history check raises to the stream's newest relayed
    /// entry when the store holds that very event ([`publish_step`]). Nothing here reads Redis:
    /// the stream's raw top id is no position to resume from (an entry added with a time-based
    /// id, `XADD … *`, makes it a timestamp far beyond the log), and Redis being down is fine
    /// (the step retries until it can compare the stream with the store).
    pub async fn resume(
        mut conn: PgConnection,
        publisher: Publisher,
        stream_key: String,
        batch: i64,
        status: RelayStatus,
    ) -> Result<Self, sqlx::Error> {
        if let Some(forgotten) = checkpoint::forget_beyond_head(&mut conn, &stream_key).await? {
            tracing::warn!(stream = %stream_key, forgotten,
                "the stored relay checkpoint was beyond the event store's head (stored by an \
                 older release that resumed after a time-based entry on the stream); forgotten: \
                 the relay resumes after the stream's newest relayed entry");
        }
        let stored = checkpoint::load(&mut conn, &stream_key).await?;
        let head = store::head_position(&mut conn).await?;
        // The checkpoint never passes the head: no event beyond it exists to have been published.
        let resume_at = stored.min(head);
        tracing::info!(stream = %stream_key, checkpoint = stored, head,
            backlog = head.saturating_sub(resume_at).max(0), "relay resuming");
        status.set_checkpoint(resume_at);
        telemetry::checkpoint(resume_at, head);
        Ok(Self {
            conn,
            publisher,
            stream_key,
            batch: batch.max(1),
            checkpoint: resume_at,
            stored,
            checkpoint_interval: Duration::ZERO,
            last_stored_at: None,
            head,
            status,
            query_timeout: DEFAULT_QUERY_TIMEOUT,
            history_checked: false,
            diverged: None,
            refused_logged_at: None,
            refused_unlogged: 0,
        })
    }

    /// Gives each query on the leader connection at most `limit` to answer (the context starts
    /// with [`DEFAULT_QUERY_TIMEOUT`]); past it the step fails with
    /// [`StepError::Leadership`], as on any other connection failure.
    pub fn with_query_timeout(mut self, limit: Duration) -> Self {
        self.query_timeout = limit;
        self
    }

    /// Writes the stored checkpoint at most once per `interval` (see the module docs); a
    /// context starts with zero, writing it after every batch.
    pub fn with_checkpoint_interval(mut self, interval: Duration) -> Self {
        self.checkpoint_interval = interval;
        self
    }

    /// How long until the pending stored checkpoint falls due (zero: it is due now), or `None`
    /// when nothing is pending. The loop wakes by then, so the write happens without a commit.
    pub fn checkpoint_due_in(&self) -> Option<Duration> {
        if self.stored >= self.checkpoint {
            return None;
        }
        Some(match self.last_stored_at {
            None => Duration::ZERO,
            Some(at) => self.checkpoint_interval.saturating_sub(at.elapsed()),
        })
    }

    /// Writes the pending checkpoint now, whether due or not: when the leadership ends
    /// gracefully, so a successor never republishes what this leader published.
    pub async fn flush_checkpoint(&mut self) -> Result<(), sqlx::Error> {
        if self.stored < self.checkpoint {
            self.store_checkpoint().await?;
        }
        Ok(())
    }

    /// Writes the pending checkpoint if it is due.
    async fn store_checkpoint_if_due(&mut self) -> Result<(), sqlx::Error> {
        if self.checkpoint_due_in() == Some(Duration::ZERO) {
            self.store_checkpoint().await?;
        }
        Ok(())
    }

    async fn store_checkpoint(&mut self) -> Result<(), sqlx::Error> {
        answered_within(
            self.query_timeout,
            checkpoint::save(&mut self.conn, &self.stream_key, self.checkpoint),
        )
        .await?;
        self.stored = self.checkpoint;
        self.last_stored_at = Some(Instant::now());
        Ok(())
    }

    /// Makes the next step compare the stream's newest entry with the store again.
    pub fn recheck_history(&mut self) {
        self.history_checked = false;
    }

    /// The highest position known to be on the stream.
    pub fn checkpoint(&self) -> i64 {
        self.checkpoint
    }

    /// Events committed but not yet published, as of the last read.
    pub fn backlog_estimate(&self) -> i64 {
        self.head.saturating_sub(self.checkpoint).max(0)
    }

    /// Checks the leader connection (and so the lock) is still alive.
    pub async fn ping(&mut self) -> Result<(), sqlx::Error> {
        answered_within(self.query_timeout, self.conn.ping()).await
    }

    /// Closes the leader connection, releasing the lock.
    pub async fn close(self) {
        if answered_within(self.query_timeout, self.conn.close())
            .await
            .is_err()
        {
            tracing::debug!("relay leader connection was already gone at close");
        }
    }
}

/// Reads, publishes and checkpoints one batch. See the module docs.
pub async fn publish_step(ctx: &mut RelayContext) -> Result<StepOutcome, StepError> {
    if (!ctx.history_checked || ctx.diverged.is_some())
        && let Some(position) = check_history(ctx).await?
    {
        return Ok(StepOutcome {
            diverged: Some(position),
            ..StepOutcome::default()
        });
    }
    let events = answered_within(
        ctx.query_timeout,
        store::read_all(&mut ctx.conn, ctx.checkpoint, ctx.batch),
    )
    .await
    .map_err(StepError::Leadership)?;
    let full = events.len() as i64 >= ctx.batch;
    if full {
        ctx.head = answered_within(ctx.query_timeout, store::head_position(&mut ctx.conn))
            .await
            .map_err(StepError::Leadership)?;
    } else if let Some(last) = events.last() {
        ctx.head = ctx.head.max(last.global_position);
    }

    let contiguous = contiguous_prefix(ctx.checkpoint, &events);
    let gap = events.get(contiguous).map(|next| Gap {
        expected: ctx.checkpoint + contiguous as i64 + 1,
        found: next.global_position,
    });
    if gap.is_some() {
        telemetry::gap();
    }
    let batch = &events[..contiguous];
    let Some(last) = batch.last() else {
        ctx.store_checkpoint_if_due()
            .await
            .map_err(StepError::Leadership)?;
        telemetry::lag_seconds(None);
        telemetry::checkpoint(ctx.checkpoint, ctx.head);
        return Ok(StepOutcome {
            published: 0,
            caught_up: gap.is_none(),
            gap,
            diverged: None,
        });
    };
    let last_position = last.global_position;
    telemetry::lag_seconds(batch.first().map(|event| event.recorded_at));

    let outcome = match ctx.publisher.publish(batch).await {
        Ok(outcome) => {
            ctx.status.set_redis_unavailable(false);
            outcome
        }
        Err(err) => {
            ctx.status.set_redis_unavailable(true);
            telemetry::checkpoint(ctx.checkpoint, ctx.head);
            return Err(StepError::Publish(err));
        }
    };
    // In a sorted batch the entries not appended are a prefix (ids at or below the top).
    let skipped = outcome.already_present + outcome.refused;
    telemetry::published(
        outcome.appended,
        batch[skipped.min(batch.len())..]
            .iter()
            .map(|event| event.recorded_at),
    );
    if outcome.already_present > 0 {
        // The same events at the same ids: an earlier try of this batch reached Redis and its
        // reply was lost (a timeout, a dropped connection). Nothing is wrong.
        tracing::debug!(stream = %ctx.stream_key, already_present = outcome.already_present,
            "entries were already on the stream (an earlier try's reply was lost)");
    }
    if outcome.refused > 0 {
        // A leadership resumes after the stream's newest relayed entry, so Redis refusing part
        // of a later batch it does not hold means its newest id is above these positions:
        // something wrote to the stream with a time-based id (`XADD … *`). Projections still
        // converge (their sweeper applies from PostgreSQL), but say it loudly: at once, then
        // every REFUSED_LOG_INTERVAL while it goes on (the counter counts every entry).
        telemetry::refused_entries(outcome.refused);
        ctx.refused_unlogged += outcome.refused;
        if ctx
            .refused_logged_at
            .is_none_or(|at| at.elapsed() >= REFUSED_LOG_INTERVAL)
        {
            ctx.refused_logged_at = Some(Instant::now());
            tracing::error!(stream = %ctx.stream_key,
                refused = std::mem::take(&mut ctx.refused_unlogged),
                first_position = batch.get(outcome.already_present).map(|e| e.global_position),
                "Redis refused entries as already present: the stream's newest id is above their \
                 positions; entries on this stream must only be written by the relay (ids \
                 `<position>-0`); remove the foreign entry with XDEL, then XSETID the stream back \
                 to its newest `<position>-0` entry (RUNBOOK: RelayEntriesRefused; logged at \
                 most every 10 s, relay_refused_entries_total counts every entry)");
        }
    }

    ctx.checkpoint = last_position;
    ctx.store_checkpoint_if_due()
        .await
        .map_err(StepError::Leadership)?;
    ctx.status.set_checkpoint(last_position);
    telemetry::checkpoint(last_position, ctx.head);
    let caught_up = !full && gap.is_none();
    if caught_up {
        telemetry::lag_seconds(None);
    }
    Ok(StepOutcome {
        published: batch.len(),
        caught_up,
        gap,
        diverged: None,
    })
}

/// Compares the stream's newest relayed entry with the store's event at its position (when a
/// leadership starts, when asked again by [`RelayContext::recheck_history`], and at every step
/// while they differ) and returns that position while they
/// differ. Publishing on would leave the stream contradicting the store: positions the store
/// has given to other events would be refused by Redis as already present, so those events
/// would never reach it, and consumers would read events the store does not have. Held
/// instead, nothing is lost: the events wait in the store, and the projector's sweeper keeps
/// the read models current from it.
async fn check_history(ctx: &mut RelayContext) -> Result<Option<i64>, StepError> {
    let newest = match ctx.publisher.newest_relayed_entry().await {
        Ok(newest) => newest,
        Err(err) => {
            ctx.status.set_redis_unavailable(true);
            return Err(StepError::Publish(err));
        }
    };
    let diverged = match newest {
        None => None,
        Some((position, event_id)) => {
            let stored = answered_within(
                ctx.query_timeout,
                store::event_id_at(&mut ctx.conn, position),
            )
            .await
            .map_err(StepError::Leadership)?;
            (stored != Some(event_id)).then_some(position)
        }
    };
    // The state changes only once the step below has succeeded: a failed read of the stream
    // leaves the divergence in place, to be checked again at the next step.
    match (ctx.diverged, diverged) {
        (None, Some(on_stream)) => {
            // Back to what this store says was published, for when the stream is cleared.
            ctx.checkpoint = ctx.stored;
            ctx.status.set_checkpoint(ctx.stored);
            tracing::error!(stream = %ctx.stream_key, on_stream, stored_checkpoint = ctx.stored,
                "the event stream records events this event store does not have at their \
                 positions (was the database restored from a backup, or does another \
                 deployment write this stream?): nothing is published to it until it is \
                 renamed or deleted (RUNBOOK: RelayStreamDiverged); commands are still \
                 accepted and the read models kept current from the event store");
        }
        (was_diverged, None) => {
            // The newest relayed entry is the store's event at its position, so every position
            // up to it is on the stream: carry on after it. This, and never the stream's raw top
            // id, is where a leadership resumes (a time-based id, `XADD … *`, would be taken
            // for a position beyond the log), and it is never beyond the store's head.
            let relayed = newest.map_or(0, |(position, _)| position);
            let from = if was_diverged.is_some() {
                ctx.stored
            } else {
                ctx.checkpoint
            };
            ctx.checkpoint = from.max(relayed);
            ctx.head = ctx.head.max(relayed);
            ctx.status.set_checkpoint(ctx.checkpoint);
            if was_diverged.is_some() {
                tracing::info!(stream = %ctx.stream_key, resume_after = ctx.checkpoint,
                    "the event stream no longer contradicts the event store; publishing resumes");
            } else if ctx.checkpoint > from {
                tracing::info!(stream = %ctx.stream_key, resume_after = ctx.checkpoint,
                    "resuming after the stream's newest relayed entry");
            }
        }
        (Some(_), Some(_)) => {}
    }
    ctx.history_checked = true;
    ctx.diverged = diverged;
    ctx.status.set_stream_diverged(diverged.is_some());
    telemetry::stream_diverged(diverged.is_some());
    Ok(diverged)
}

/// How many leading events continue densely from `after` (`after + 1`, `after + 2`, …).
pub fn contiguous_prefix(after: i64, events: &[RecordedEvent]) -> usize {
    events
        .iter()
        .zip(1i64..)
        .take_while(|(event, offset)| event.global_position == after + offset)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(positions: &[i64]) -> Vec<RecordedEvent> {
        positions
            .iter()
            .map(|&global_position| RecordedEvent {
                global_position,
                event_id: uuid::Uuid::new_v4(),
                stream_id: "order-x".into(),
                stream_version: 1,
                event_type: "OrderCreated".into(),
                schema_version: 1,
                data: serde_json::json!({}),
                metadata: events::EventMetadata::default(),
                recorded_at: chrono::Utc::now(),
            })
            .collect()
    }

    #[test]
    fn a_dense_batch_is_contiguous_in_full() {
        assert_eq!(contiguous_prefix(4, &at(&[5, 6, 7])), 3);
        assert_eq!(contiguous_prefix(0, &at(&[])), 0);
    }

    #[test]
    fn the_relay_stops_before_a_missing_position() {
        assert_eq!(contiguous_prefix(4, &at(&[5, 6, 8, 9])), 2);
        assert_eq!(contiguous_prefix(4, &at(&[6, 7])), 0);
    }
}
