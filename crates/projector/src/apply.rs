//! The apply engine: exactly-once, in-order application of events to a projection, whatever
//! their source (Redis entries, the event store during catch-up, sweeping or rebuilding) and
//! however many projector instances run at once.
//!
//! One call of [`apply_batch`] is one transaction:
//! 1. `pg_advisory_xact_lock_shared(<projection key>)`, so a rebuild (which holds the exclusive
//!    lock) pauses every live writer of the projection;
//! 2. the `projection_streams` rows of the batch's streams are created if missing and locked
//!    `FOR UPDATE` in `stream_id` order (one global lock order: instances never deadlock);
//! 3. per stream, events at or below the stored version are duplicates (skipped); a parked
//!    stream holds every newer event back (skipped and counted, applied at replay); a batch
//!    that does not continue exactly at `version + 1` is completed from the event store
//!    (*version guard with catch-up*);
//! 4. the projection folds the events, the stored versions move forward, the low-water mark
//!    moves over what is now finished ([`advance_mark`]), and it commits, without waiting for
//!    the WAL flush (`Commit::WithoutFlushWait` says why that keeps exactly-once). Only when
//!    the mark could not be moved over every event of the batch (an earlier event is still in
//!    another transaction, or another transaction held the checkpoint row) does
//!    `pg_notify('projection_applied', <projection>)` wake the sweeper to finish the job.
//!
//! Every event applied through [`apply_isolating`] (consumer, sweeper, admin) gets an
//! `apply_event` span parented on its recorded `traceparent` when OTel export is on.
//!
//! Only after the commit may a consumer acknowledge the entries. The engine never talks to
//! Redis and never decides retries: it reports a [`Failure`] and the caller decides.

use std::collections::BTreeMap;

use events::RecordedEvent;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};

use crate::failure::{Failure, classify_sql};
use crate::metrics;
use crate::projections::ProjectionKind;

/// NOTIFY channel signalled by an apply transaction that changed a projection but left its
/// low-water mark short of the events it applied (and by parking and replays); the payload is
/// the projection name. A wake-up hint for the sweepers only.
pub const APPLIED_CHANNEL: &str = "projection_applied";

/// How many events of one stream a replay or catch-up reads from the store per round trip.
pub const STREAM_READ_CHUNK: i64 = 1_000;

/// What one apply did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Events applied (including those read from the store to fill gaps).
    pub applied: usize,
    /// Events already applied before (redeliveries, replays).
    pub duplicates: usize,
    /// Events held back because their stream is parked.
    pub held: usize,
    /// Events read from the event store because the batch skipped versions.
    pub caught_up: usize,
}

impl std::ops::AddAssign for ApplyOutcome {
    fn add_assign(&mut self, o: Self) {
        self.applied += o.applied;
        self.duplicates += o.duplicates;
        self.held += o.held;
        self.caught_up += o.caught_up;
    }
}

/// The first event of a stream that could not be applied, found by [`apply_isolating`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poisoned {
    /// The stream.
    pub stream_id: String,
    /// The version that failed; events of the stream at this version and above were not applied.
    pub version: i64,
    /// The error.
    pub error: String,
    /// The event is not poison: it was written by a newer release than this build
    /// ([`Failure::NewerRelease`]), so it is held, never dead-lettered or parked.
    pub newer_release: bool,
}

impl Poisoned {
    /// Version `version` of `stream_id` failed with `failure`.
    fn at(stream_id: &str, version: i64, failure: &Failure) -> Self {
        Self {
            stream_id: stream_id.to_owned(),
            version,
            error: failure.to_string(),
            newer_release: matches!(failure, Failure::NewerRelease(_)),
        }
    }
}

fn sql(e: sqlx::Error) -> Failure {
    classify_sql(&e)
}

/// Applies `events` (any order, any streams, duplicates allowed) in one transaction on `conn`.
/// When `conn` is already inside a transaction this runs in a savepoint (rebuild does that).
pub async fn apply_batch(
    conn: &mut PgConnection,
    projection: ProjectionKind,
    events: &[RecordedEvent],
) -> Result<ApplyOutcome, Failure> {
    if events.is_empty() {
        return Ok(ApplyOutcome::default());
    }
    let started = std::time::Instant::now();
    // A rebuild (the caller's transaction) sets the mark itself when it is done.
    let rebuilding = conn.is_in_transaction();
    let mut tx = begin_locked(conn, projection, Commit::WithoutFlushWait).await?;
    let (outcome, last_applied) = apply_locked(&mut tx, projection, events).await?;
    if let Some(last_applied) = last_applied
        && !rebuilding
    {
        let mark = advance_mark(&mut tx, projection).await?;
        // The sweeper is needed only for what this transaction could not cover itself; it
        // runs after this commit and waits for whoever holds the checkpoint row, so it sees
        // this batch and the transaction that kept the mark short.
        if mark.is_none_or(|mark| mark < last_applied) {
            notify_applied(&mut tx, projection).await?;
        }
    }
    tx.commit().await.map_err(sql)?;
    metrics::record_apply(projection, &outcome, started.elapsed().as_secs_f64());
    Ok(outcome)
}

/// Moves the projection's low-water mark over what this transaction finished, in the same
/// transaction, so that a write is visible to read-your-writes the moment its apply commits,
/// without waiting for the sweeper. The same computation as the sweep
/// ([`crate::sweeper`]); when another transaction holds the checkpoint row, this one leaves the
/// mark to it (`SKIP LOCKED`: applies of several instances never queue on the row).
/// Returns the new mark, or `None` when this transaction did not move it.
///
/// `target` is `MATERIALIZED`: read twice by the `UPDATE` (its filter and its `SET`), it was
/// inlined with its expression copied into both, so the statement, planned at every execution
/// like every apply statement, was planned with its scan twice, and ran the scan twice whenever
/// the mark moved. When it moved, planning took 0.82 ms and execution 0.65 ms (medians of five
/// sessions); computed once, 0.47 and 0.44 ms (`docs/bench/mark-planning/`).
async fn advance_mark(
    conn: &mut PgConnection,
    projection: ProjectionKind,
) -> Result<Option<i64>, Failure> {
    sqlx::query_scalar(concat!(
        "WITH cp AS (SELECT position FROM projection_checkpoints \
                     WHERE projection = $1 FOR UPDATE SKIP LOCKED), \
              target AS MATERIALIZED (SELECT cp.position AS start, COALESCE((",
        crate::sweeper::first_unfinished_sql!(),
        ") - 1, GREATEST(cp.position, LEAST((SELECT max(global_position) FROM events), \
                                            cp.position + $2))) AS position FROM cp), \
              moved AS (UPDATE projection_checkpoints c \
                        SET position = t.position, updated_at = now() FROM target t \
                        WHERE c.projection = $1 AND t.position > t.start \
                        RETURNING c.position) \
         SELECT position, pg_notify($3, $1 || ':' || position) FROM moved"
    ))
    .bind(projection.name())
    .bind(crate::sweeper::SWEEP_PAGE)
    .bind(crate::sweeper::POSITION_CHANNEL)
    .fetch_optional(&mut *conn)
    .await
    .map_err(sql)
}

/// Whether a transaction's commit waits for its WAL flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// The server's setting (`synchronous_commit`): parking and replays, which operators act on.
    Durable,
    /// `synchronous_commit = off` for this transaction: applies. Everything an apply writes is
    /// derived from the durable event store, and a server crash loses the last applies whole
    /// (read model, bookkeeping and mark alike, one transaction each), so the sweeper finds
    /// those events unapplied and applies them again from the store; exactly once still holds.
    /// Meanwhile no apply pays a disk flush, once per batch and projection.
    WithoutFlushWait,
}

/// Begins a transaction holding the projection's shared lock, in one round trip; inside a
/// transaction already (a rebuild), a savepoint that takes the lock.
async fn begin_locked(
    conn: &mut PgConnection,
    projection: ProjectionKind,
    commit: Commit,
) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, Failure> {
    if conn.is_in_transaction() {
        let mut tx = conn.begin().await.map_err(sql)?;
        lock_shared(&mut tx, projection).await?;
        return Ok(tx);
    }
    let commit_setting = match commit {
        Commit::Durable => "",
        Commit::WithoutFlushWait => "; SET LOCAL synchronous_commit = off",
    };
    conn.begin_with(AssertSqlSafe(format!(
        "BEGIN; SELECT pg_advisory_xact_lock_shared({}){commit_setting}",
        projection.lock_key()
    )))
    .await
    .map_err(sql)
}

async fn lock_shared(conn: &mut PgConnection, projection: ProjectionKind) -> Result<(), Failure> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(projection.lock_key())
        .execute(&mut *conn)
        .await
        .map_err(sql)?;
    Ok(())
}

/// Creates the missing bookkeeping rows of `streams` (sorted) and locks them in order.
/// Returns `(stream_id, version, parked_version)` per stream.
async fn lock_streams(
    conn: &mut PgConnection,
    projection: ProjectionKind,
    streams: &[String],
) -> Result<Vec<(String, i64, Option<i64>)>, Failure> {
    sqlx::query(
        "INSERT INTO projection_streams (projection, stream_id) \
         SELECT $1, s FROM UNNEST($2::text[]) AS s ORDER BY s ON CONFLICT DO NOTHING",
    )
    .bind(projection.name())
    .bind(streams)
    .execute(&mut *conn)
    .await
    .map_err(sql)?;
    let rows = sqlx::query(
        "SELECT stream_id, version, parked_version FROM projection_streams \
         WHERE projection = $1 AND stream_id = ANY($2) ORDER BY stream_id FOR UPDATE",
    )
    .bind(projection.name())
    .bind(streams)
    .fetch_all(&mut *conn)
    .await
    .map_err(sql)?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("stream_id")?,
                r.try_get("version")?,
                r.try_get("parked_version")?,
            ))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(sql)
}

/// The body of [`apply_batch`], in a transaction that holds the projection's shared lock.
/// Returns what it did and the global position of the last event it applied, if any.
async fn apply_locked(
    conn: &mut PgConnection,
    projection: ProjectionKind,
    events: &[RecordedEvent],
) -> Result<(ApplyOutcome, Option<i64>), Failure> {
    let mut outcome = ApplyOutcome::default();
    let mut by_stream: BTreeMap<&str, BTreeMap<i64, &RecordedEvent>> = BTreeMap::new();
    for event in events {
        let versions = by_stream.entry(event.stream_id.as_str()).or_default();
        if versions.insert(event.stream_version, event).is_some() {
            outcome.duplicates += 1;
        }
    }
    let streams: Vec<String> = by_stream.keys().map(|s| (*s).to_owned()).collect();
    let locked = lock_streams(conn, projection, &streams).await?;

    let mut to_apply: Vec<RecordedEvent> = Vec::with_capacity(events.len());
    let (mut moved_streams, mut moved_versions) = (Vec::new(), Vec::new());
    for (stream, stored, parked) in locked {
        let Some(versions) = by_stream.get(stream.as_str()) else {
            continue;
        };
        let fresh: Vec<&RecordedEvent> = versions.range(stored + 1..).map(|(_, e)| *e).collect();
        outcome.duplicates += versions.len() - fresh.len();
        let Some(last) = fresh.last() else { continue };
        if parked.is_some() {
            outcome.held += fresh.len();
            continue;
        }
        let max = last.stream_version;
        let contiguous = usize::try_from(max - stored).is_ok_and(|n| n == fresh.len());
        let list: Vec<RecordedEvent> = if contiguous {
            fresh.into_iter().cloned().collect()
        } else {
            // A gap: another instance holds the missing entries, or Redis lost them. The event
            // store is the truth, so read the whole range from it and apply it in order now;
            // whoever holds the other entries will find them to be duplicates.
            let from_store = store::read_stream(&mut *conn, &stream, stored, max - stored)
                .await
                .map_err(sql)?;
            outcome.caught_up += from_store.len().saturating_sub(fresh.len());
            from_store
        };
        let Some(new_version) = list.last().map(|e| e.stream_version) else {
            continue;
        };
        outcome.applied += list.len();
        moved_streams.push(stream);
        moved_versions.push(new_version);
        to_apply.extend(list);
    }
    if moved_streams.is_empty() {
        return Ok((outcome, None));
    }
    let last_applied = to_apply.iter().map(|event| event.global_position).max();
    to_apply.retain(|e| projection.handles(&e.event_type));
    projection
        .apply(conn, &to_apply)
        .await
        .map_err(|e| e.failure())?;
    sqlx::query(
        "UPDATE projection_streams p SET version = u.version \
         FROM UNNEST($2::text[], $3::int8[]) AS u(stream_id, version) \
         WHERE p.projection = $1 AND p.stream_id = u.stream_id",
    )
    .bind(projection.name())
    .bind(&moved_streams)
    .bind(&moved_versions)
    .execute(&mut *conn)
    .await
    .map_err(sql)?;
    Ok((outcome, last_applied))
}

async fn notify_applied(
    conn: &mut PgConnection,
    projection: ProjectionKind,
) -> Result<(), Failure> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(APPLIED_CHANNEL)
        .bind(projection.name())
        .execute(&mut *conn)
        .await
        .map_err(sql)?;
    Ok(())
}

/// Most `apply_event` spans made for one call of [`apply_isolating`]: a rebuild passes large
/// slices, and the exporter's queue (2048 spans by default) would drop the excess anyway.
pub const MAX_EVENT_SPANS: usize = 1_000;

/// One `apply_event` span per event (up to [`MAX_EVENT_SPANS`]), each continuing the trace of
/// the command that recorded the event (`metadata.traceparent`), so one trace runs from the HTTP
/// request to the projector. The spans are not entered: they are held while the batch applies
/// and end with it, so each one's duration is its batch's. Empty when OTel export is off, which
/// keeps the hot path free of per-event spans.
pub fn event_spans(projection: ProjectionKind, events: &[RecordedEvent]) -> Vec<tracing::Span> {
    if !platform::otel::export_enabled() {
        return Vec::new();
    }
    events
        .iter()
        .take(MAX_EVENT_SPANS)
        .map(|event| {
            // No local parent: the remote one below is the meaningful one.
            let span = tracing::info_span!(
                parent: None,
                "apply_event",
                projection = %projection,
                stream_id = %event.stream_id,
                stream_version = event.stream_version,
                position = event.global_position,
                event_type = %event.event_type,
                batch_size = events.len(),
                outcome = tracing::field::Empty,
            );
            if let Some(traceparent) = &event.metadata.traceparent {
                platform::otel::set_remote_parent(&span, traceparent);
            }
            span
        })
        .collect()
}

/// Applies `events`, isolating poison: the whole batch first; if that fails with poison, each
/// stream on its own; within a failing stream, one event at a time up to the first failure.
/// Transient failures abort the whole call (what was committed stays committed and is
/// recognised as duplicates on the retry).
///
/// With OTel export on, each event gets an `apply_event` span ([`event_spans`]) lasting the call.
pub async fn apply_isolating(
    conn: &mut PgConnection,
    projection: ProjectionKind,
    events: &[RecordedEvent],
) -> Result<(ApplyOutcome, Vec<Poisoned>), Failure> {
    let spans = event_spans(projection, events);
    let result = apply_isolating_inner(conn, projection, events).await;
    if !spans.is_empty() {
        record_outcomes(&spans, events, &result);
    }
    result
}

/// Sets each span's `outcome`: `poisoned`, `needs_newer_release`, `transient_failure`, or `ok`
/// (applied, duplicate or held back behind a parked stream).
fn record_outcomes(
    spans: &[tracing::Span],
    events: &[RecordedEvent],
    result: &Result<(ApplyOutcome, Vec<Poisoned>), Failure>,
) {
    for (span, event) in spans.iter().zip(events) {
        let outcome = match result {
            Err(_) => "transient_failure",
            Ok((_, poisoned)) => {
                let hit = poisoned
                    .iter()
                    .find(|p| p.stream_id == event.stream_id && event.stream_version >= p.version);
                match hit {
                    Some(p) if p.newer_release => "needs_newer_release",
                    Some(_) => "poisoned",
                    None => "ok",
                }
            }
        };
        span.record("outcome", outcome);
    }
}

async fn apply_isolating_inner(
    conn: &mut PgConnection,
    projection: ProjectionKind,
    events: &[RecordedEvent],
) -> Result<(ApplyOutcome, Vec<Poisoned>), Failure> {
    let batch_failure = match apply_batch(conn, projection, events).await {
        Ok(outcome) => return Ok((outcome, Vec::new())),
        Err(f) if f.is_transient() => return Err(f),
        Err(f) => f,
    };
    tracing::debug!(projection = %projection, error = %batch_failure, "batch failed; isolating");
    let mut by_stream: BTreeMap<&str, Vec<RecordedEvent>> = BTreeMap::new();
    for event in events {
        by_stream
            .entry(event.stream_id.as_str())
            .or_default()
            .push(event.clone());
    }
    // A stage that would apply exactly what the last one did is not run again: a batch of one
    // stream failed as that stream, and a stream of one event as that event. A poison entry
    // retried on its own (the usual case) so costs one failed transaction per try, not three.
    let mut known_failure = (by_stream.len() == 1).then_some(batch_failure);
    let mut total = ApplyOutcome::default();
    let mut poisoned = Vec::new();
    for mut list in by_stream.into_values() {
        let stream_failure = match known_failure.take() {
            Some(failure) => failure,
            None => match apply_batch(conn, projection, &list).await {
                Ok(outcome) => {
                    total += outcome;
                    continue;
                }
                Err(f) if f.is_transient() => return Err(f),
                Err(f) => f,
            },
        };
        if let [event] = list.as_slice() {
            let (outcome, found) = locate_failure(conn, projection, event, stream_failure).await?;
            total += outcome;
            poisoned.extend(found);
            continue;
        }
        list.sort_by_key(|e| e.stream_version);
        for event in &list {
            match apply_batch(conn, projection, std::slice::from_ref(event)).await {
                Ok(outcome) => total += outcome,
                Err(Failure::Transient(error)) => return Err(Failure::Transient(error)),
                Err(failure) => {
                    let (outcome, found) = locate_failure(conn, projection, event, failure).await?;
                    total += outcome;
                    match found {
                        Some(found) => {
                            poisoned.push(found);
                            break;
                        }
                        // It applied after all (the gap was settled meanwhile): go on.
                        None => continue,
                    }
                }
            }
        }
    }
    Ok((total, poisoned))
}

/// The event that failed when `event`, applied alone, failed with `failure`; `None` when it
/// turns out to apply after all. When the stream's applied version is below the one before
/// `event`'s, that apply filled the gap from the event store first (the entries of those
/// events are another consumer's, or no longer on the stream), and the failure may be one of
/// the gap's: they are applied one at a time, each in its own transaction, up to the first that
/// fails, which is the one reported. If none fails (they applied, or the gap was settled
/// meanwhile: its holder applied or parked it), `event` is applied alone once more, so that
/// only its own failure is charged to it. Naming the event that failed is what lets the
/// consumer holding `event` wait for it instead of dead-lettering `event`, which never failed,
/// under its error. A read here that fails for good falls back to charging `event`, as
/// before; only a transient failure is returned.
async fn locate_failure(
    conn: &mut PgConnection,
    projection: ProjectionKind,
    event: &RecordedEvent,
    failure: Failure,
) -> Result<(ApplyOutcome, Option<Poisoned>), Failure> {
    let stream = event.stream_id.as_str();
    let charged = |failure: &Failure| Some(Poisoned::at(stream, event.stream_version, failure));
    let mut total = ApplyOutcome::default();
    let mut after = match applied_version(&mut *conn, projection, stream).await {
        Ok(version) => version,
        Err(Failure::Transient(error)) => return Err(Failure::Transient(error)),
        Err(_) => return Ok((total, charged(&failure))),
    };
    if after + 1 >= event.stream_version {
        return Ok((total, charged(&failure)));
    }
    while after + 1 < event.stream_version {
        let gap = STREAM_READ_CHUNK.min(event.stream_version - 1 - after);
        let earlier = match store::read_stream(&mut *conn, stream, after, gap).await {
            Ok(earlier) => earlier,
            Err(e) => match sql(e) {
                Failure::Transient(error) => return Err(Failure::Transient(error)),
                _ => return Ok((total, charged(&failure))),
            },
        };
        if earlier.is_empty() {
            break;
        }
        for gap_event in &earlier {
            match apply_batch(conn, projection, std::slice::from_ref(gap_event)).await {
                Ok(outcome) => total += outcome,
                Err(Failure::Transient(error)) => return Err(Failure::Transient(error)),
                Err(failed) => {
                    let at = Poisoned::at(stream, gap_event.stream_version, &failed);
                    return Ok((total, Some(at)));
                }
            }
            after = gap_event.stream_version;
        }
    }
    match apply_batch(conn, projection, std::slice::from_ref(event)).await {
        Ok(outcome) => {
            total += outcome;
            Ok((total, None))
        }
        Err(Failure::Transient(error)) => Err(Failure::Transient(error)),
        Err(own) => Ok((total, charged(&own))),
    }
}

/// The last version of `stream_id` that `projection` has applied (or skipped); 0 when it has
/// applied none. Whoever gives up on an event asks this first: an event applied meanwhile (by
/// another instance's consumer, or its sweeper from the store) failed nothing for good, and is
/// neither dead-lettered nor parked.
pub async fn applied_version(
    executor: impl sqlx::PgExecutor<'_>,
    projection: ProjectionKind,
    stream_id: &str,
) -> Result<i64, Failure> {
    let version: Option<i64> = sqlx::query_scalar(
        "SELECT version FROM projection_streams WHERE projection = $1 AND stream_id = $2",
    )
    .bind(projection.name())
    .bind(stream_id)
    .fetch_optional(executor)
    .await
    .map_err(sql)?;
    Ok(version.unwrap_or(0))
}

/// Parks `stream_id` at version `failed`, whose event failed for good, so that it and every
/// later event of the stream are held back until `dlq replay` or `dlq purge`; returns the
/// version the stream is parked at, or `None` when the projection has applied `failed`
/// already (another instance applied it after it failed here): nothing is parked then, since
/// the order's next event never failed.
///
/// A parked version is always the stream's first unapplied one (`version + 1`): the engine
/// holds back everything after `version`, reads show the order as of the version before the
/// parked one, the mark passes events from the parked version on, and `dlq purge` marks exactly
/// the parked version applied. So when events lie between the applied version and `failed`
/// (their entries are held by another consumer, or lost), they are applied first, from the
/// event store, one at a time; the first of them that fails is parked instead, with its own
/// error. An already parked stream keeps its first parked version and error.
pub async fn park_stream(
    conn: &mut PgConnection,
    projection: ProjectionKind,
    stream_id: &str,
    failed: i64,
    error: &str,
) -> Result<Option<i64>, Failure> {
    let mut tx = begin_locked(conn, projection, Commit::Durable).await?;
    let locked = lock_streams(&mut tx, projection, &[stream_id.to_owned()]).await?;
    let (version, parked) = locked.first().map(|(_, v, p)| (*v, *p)).unwrap_or_default();
    // Returning early drops the transaction, which rolls back the bookkeeping row
    // `lock_streams` may have made.
    if let Some(parked) = parked {
        return Ok(Some(parked));
    }
    if version >= failed {
        tracing::info!(projection = %projection, stream_id, version, failed,
            "not parking a stream whose failed event is applied already");
        return Ok(None);
    }
    let (_, version, earlier) =
        catch_up_until_failure(&mut tx, projection, stream_id, version, failed - 1).await?;
    let error = earlier.as_deref().unwrap_or(error);
    let parked = version + 1;
    sqlx::query(
        "UPDATE projection_streams SET version = $3, parked_version = $3 + 1, parked_error = $4 \
         WHERE projection = $1 AND stream_id = $2",
    )
    .bind(projection.name())
    .bind(stream_id)
    .bind(version)
    .bind(error)
    .execute(&mut *tx)
    .await
    .map_err(sql)?;
    notify_applied(&mut tx, projection).await?;
    tx.commit().await.map_err(sql)?;
    tracing::warn!(projection = %projection, stream_id, parked_version = parked, error, "parked stream");
    Ok(Some(parked))
}

/// What [`resume_stream`] or [`skip_parked`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumeOutcome {
    /// Events applied from the event store.
    pub applied: usize,
    /// The stream's version afterwards.
    pub version: i64,
    /// Set when a purge's catch-up failed and the stream was parked again: the error.
    pub parked_again: Option<String>,
}

/// `dlq replay`: un-parks `stream_id` and applies its events from the event store, from its
/// stored version up to the head, in one transaction; on failure nothing changes (the stream
/// stays parked).
pub async fn resume_stream(
    conn: &mut PgConnection,
    projection: ProjectionKind,
    stream_id: &str,
) -> Result<ResumeOutcome, Failure> {
    let mut tx = begin_locked(conn, projection, Commit::Durable).await?;
    let locked = lock_streams(&mut tx, projection, &[stream_id.to_owned()]).await?;
    let version = locked.first().map(|(_, v, _)| *v).unwrap_or_default();
    let outcome = unpark_and_catch_up(&mut tx, projection, stream_id, version, false).await?;
    tx.commit().await.map_err(sql)?;
    Ok(outcome)
}

/// What [`skip_parked`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// The version was marked applied without being applied, the stream un-parked and caught
    /// up (or parked again at the next event that failed too).
    Skipped(ResumeOutcome),
    /// The stream is at or past that version already (it was applied, or skipped before):
    /// nothing changed.
    AlreadyPast {
        /// The stream's version.
        version: i64,
    },
    /// The stream is not parked at that version: skipping it would mark as applied an event
    /// that is not the one holding the stream back (or skip one the projection may still
    /// apply), so nothing changed.
    NotParkedAt {
        /// The stream's version.
        version: i64,
        /// The version it is parked at, if it is parked.
        parked: Option<i64>,
    },
}

/// `dlq purge`: skips exactly version `skip` of `stream_id` for good, and only while the stream
/// is parked at it: that version is marked applied without being applied, the stream un-parked
/// and caught up from the event store, in one transaction; if a later event fails too, the
/// skip is kept and the stream is parked again at that event. Events between the stored
/// version and `skip` are never skipped with it: a letter can name a version above the park
/// (an entry given up on behind the one that really failed), and those events never failed.
pub async fn skip_parked(
    conn: &mut PgConnection,
    projection: ProjectionKind,
    stream_id: &str,
    skip: i64,
) -> Result<Skip, Failure> {
    let mut tx = begin_locked(conn, projection, Commit::Durable).await?;
    let locked = lock_streams(&mut tx, projection, &[stream_id.to_owned()]).await?;
    let (version, parked) = locked.first().map(|(_, v, p)| (*v, *p)).unwrap_or_default();
    // Dropping the transaction rolls back the bookkeeping row `lock_streams` may have made.
    if version >= skip {
        return Ok(Skip::AlreadyPast { version });
    }
    if parked != Some(skip) {
        return Ok(Skip::NotParkedAt { version, parked });
    }
    let outcome = unpark_and_catch_up(&mut tx, projection, stream_id, skip, true).await?;
    tx.commit().await.map_err(sql)?;
    Ok(Skip::Skipped(outcome))
}

/// Applies the stream's events after `version` from the store in a savepoint and stores the
/// new version, un-parked. When the catch-up fails with poison and `park_again` is set, the
/// stream keeps `version` and is parked at the next one; otherwise the failure is returned.
async fn unpark_and_catch_up(
    tx: &mut PgConnection,
    projection: ProjectionKind,
    stream_id: &str,
    mut version: i64,
    park_again: bool,
) -> Result<ResumeOutcome, Failure> {
    let mut outcome = ResumeOutcome::default();
    let caught_up = {
        let mut savepoint = tx.begin().await.map_err(sql)?;
        let result = catch_up(&mut savepoint, projection, stream_id, version).await;
        match result {
            Ok((applied, v)) => {
                savepoint.commit().await.map_err(sql)?;
                Ok((applied, v))
            }
            Err(e) => {
                savepoint.rollback().await.map_err(sql)?;
                Err(e)
            }
        }
    };
    let parked = match caught_up {
        Ok((applied, v)) => {
            outcome.applied = applied;
            version = v.max(version);
            None
        }
        Err(Failure::Poison(_)) if park_again => {
            // Some event after `version` failed, and the chunked catch-up cannot say which:
            // apply them one at a time, keeping each that applies, to park at the one that
            // fails (parking at `version + 1` instead would let the next purge skip an event
            // that never failed).
            let (applied, v, error) =
                catch_up_until_failure(&mut *tx, projection, stream_id, version, i64::MAX).await?;
            outcome.applied = applied;
            version = v.max(version);
            error
        }
        Err(other) => return Err(other),
    };
    sqlx::query(
        "UPDATE projection_streams SET version = $3, \
             parked_version = CASE WHEN $4::text IS NULL THEN NULL ELSE $3 + 1 END, \
             parked_error = $4 \
         WHERE projection = $1 AND stream_id = $2",
    )
    .bind(projection.name())
    .bind(stream_id)
    .bind(version)
    .bind(parked.as_deref())
    .execute(&mut *tx)
    .await
    .map_err(sql)?;
    notify_applied(&mut *tx, projection).await?;
    outcome.version = version;
    outcome.parked_again = parked;
    Ok(outcome)
}

/// Applies the stream's events after `version`, up to version `until`, from the store one at a
/// time, each in a savepoint, until one fails with poison; returns (applied, the version
/// reached, that failure's error if one failed). Slower than [`catch_up`]; only for finding the
/// event that failed.
async fn catch_up_until_failure(
    conn: &mut PgConnection,
    projection: ProjectionKind,
    stream_id: &str,
    mut version: i64,
    until: i64,
) -> Result<(usize, i64, Option<String>), Failure> {
    let mut applied = 0;
    while version < until {
        let chunk = STREAM_READ_CHUNK.min(until - version);
        let events = store::read_stream(&mut *conn, stream_id, version, chunk)
            .await
            .map_err(sql)?;
        if events.is_empty() {
            break;
        }
        for event in events {
            if projection.handles(&event.event_type) {
                let mut savepoint = conn.begin().await.map_err(sql)?;
                match projection
                    .apply(&mut savepoint, std::slice::from_ref(&event))
                    .await
                    .map_err(|e| e.failure())
                {
                    Ok(()) => savepoint.commit().await.map_err(sql)?,
                    Err(Failure::Poison(error)) => {
                        savepoint.rollback().await.map_err(sql)?;
                        return Ok((applied, version, Some(error)));
                    }
                    Err(other) => return Err(other),
                }
            }
            applied += 1;
            version = event.stream_version;
        }
    }
    Ok((applied, version, None))
}

/// Applies the stream's events after `version` from the store; returns (applied, new version).
async fn catch_up(
    conn: &mut PgConnection,
    projection: ProjectionKind,
    stream_id: &str,
    mut version: i64,
) -> Result<(usize, i64), Failure> {
    let mut applied = 0;
    loop {
        let mut events = store::read_stream(&mut *conn, stream_id, version, STREAM_READ_CHUNK)
            .await
            .map_err(sql)?;
        let Some(last) = events.last().map(|e| e.stream_version) else {
            break;
        };
        applied += events.len();
        events.retain(|e| projection.handles(&e.event_type));
        projection
            .apply(conn, &events)
            .await
            .map_err(|e| e.failure())?;
        version = last;
    }
    Ok((applied, version))
}
