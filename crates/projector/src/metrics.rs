//! The projector's Prometheus metrics: names (constants, so dashboards and alerts can grep
//! for them) and the small helpers that record them. Every metric carries a `projection` label
//! except the rebuild ones, which carry it too when it is known.

use crate::apply::ApplyOutcome;
use crate::projections::ProjectionKind;

/// Events applied to a read model (counter).
pub const EVENTS_APPLIED: &str = "projector_events_applied_total";
/// Events recognised as already applied (counter).
pub const DUPLICATES: &str = "projector_duplicates_total";
/// Events held back behind a parked stream (counter).
pub const HELD_EVENTS: &str = "projector_held_events_total";
/// Poison retries scheduled (counter).
pub const RETRIES: &str = "projector_retries_total";
/// Entries moved to the dead-letter stream (counter).
pub const DEAD_LETTERS: &str = "projector_dead_letters_total";
/// Entries acknowledged unapplied because the event store holds another event, or none, at
/// their positions: a stream of another history (counter).
pub const FOREIGN_ENTRIES: &str = "projector_foreign_entries_total";
/// Attempts to apply an event this build is too old to read, written by a newer release and
/// held until an instance of that release applies it (counter; it grows while the hold lasts).
pub const NEWER_RELEASE_HOLDS: &str = "projector_newer_release_holds_total";
/// Events the sweeper applied itself, from the event store, because no consumer had: Redis
/// lost or trimmed their entries, is down, or the consumers fell a grace behind (counter). It
/// stays at 0 while the consumers keep up; its rate is how much of the work the sweeper is
/// doing instead of them.
pub const HEALED_EVENTS: &str = "projector_sweeper_healed_events_total";
/// Entries this instance's consumer holds in its retry queues: failing entries, entries held
/// for a newer release, and the later entries of their orders behind them (gauge). At
/// `max_queued` the consumer takes no more work until a retry frees room.
pub const RETRY_QUEUED: &str = "projector_retry_queued_entries";
/// Head position minus the projection's low-water mark (gauge).
pub const LAG_EVENTS: &str = "projector_lag_events";
/// Age of the oldest event not yet covered by the low-water mark, in seconds (gauge).
pub const LAG_SECONDS: &str = "projector_lag_seconds";
/// Streams of the projection parked behind a dead letter: orders whose later events are held
/// back now (gauge). Read with the lag, so an alert fires for as long as any order waits, not
/// only when a dead letter is written.
pub const PARKED_STREAMS: &str = "projector_parked_streams";
/// When this instance last read the lag and the parked streams from PostgreSQL, in Unix
/// seconds (gauge; the process start until the first read). Those gauges keep their last value
/// while the read fails, so their alerts cannot fire then; this one shows it.
pub const LAG_LAST_SUCCESS: &str = "projector_lag_last_success_timestamp_seconds";

/// Duration of one apply transaction, commit included (histogram).
pub const APPLY_SECONDS: &str = "projector_apply_seconds";
/// Duration of one sweep of the low-water mark, commit included (histogram).
pub const SWEEP_SECONDS: &str = "projector_sweep_seconds";

/// Creates the projection's counters at zero. `rate()` and `increase()` only see an increment
/// between two samples, so a counter that first appears at 1 looks unchanged to them: without
/// this, the alert on dead letters would miss the first one of every projector process.
pub fn register(projection: ProjectionKind) {
    for counter in [
        EVENTS_APPLIED,
        DUPLICATES,
        HELD_EVENTS,
        RETRIES,
        DEAD_LETTERS,
        FOREIGN_ENTRIES,
        NEWER_RELEASE_HOLDS,
        HEALED_EVENTS,
    ] {
        metrics::counter!(counter, "projection" => projection.name()).increment(0);
    }
    // Counted from the start: a process that never reads the lag is as blind as one that
    // stopped reading it.
    metrics::gauge!(LAG_LAST_SUCCESS, "projection" => projection.name()).set(unix_now());
}

/// Now, in Unix seconds.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Records how long one sweep took.
pub fn record_sweep(projection: ProjectionKind, seconds: f64) {
    metrics::histogram!(SWEEP_SECONDS, "projection" => projection.name()).record(seconds);
}

/// Records what one apply transaction did and how long it took.
pub fn record_apply(projection: ProjectionKind, outcome: &ApplyOutcome, seconds: f64) {
    let label = ("projection", projection.name());
    metrics::histogram!(APPLY_SECONDS, &[label]).record(seconds);
    if outcome.applied > 0 {
        metrics::counter!(EVENTS_APPLIED, &[label]).increment(outcome.applied as u64);
    }
    if outcome.duplicates > 0 {
        metrics::counter!(DUPLICATES, &[label]).increment(outcome.duplicates as u64);
    }
    if outcome.held > 0 {
        metrics::counter!(HELD_EVENTS, &[label]).increment(outcome.held as u64);
    }
}

/// Counts one scheduled poison retry.
pub fn record_retry(projection: ProjectionKind) {
    metrics::counter!(RETRIES, "projection" => projection.name()).increment(1);
}

/// Counts events the sweeper applied itself.
pub fn record_healed(projection: ProjectionKind, events: usize) {
    metrics::counter!(HEALED_EVENTS, "projection" => projection.name()).increment(events as u64);
}

/// Counts one dead letter.
pub fn record_dead_letter(projection: ProjectionKind) {
    metrics::counter!(DEAD_LETTERS, "projection" => projection.name()).increment(1);
}

/// Counts entries of another history, acknowledged unapplied.
pub fn foreign_entries(projection: ProjectionKind, count: usize) {
    metrics::counter!(FOREIGN_ENTRIES, "projection" => projection.name()).increment(count as u64);
}

/// Counts attempts that met events of a newer release (one per held stream).
pub fn newer_release_holds(projection: ProjectionKind, streams: usize) {
    metrics::counter!(NEWER_RELEASE_HOLDS, "projection" => projection.name())
        .increment(streams as u64);
}

/// Sets how many entries the consumer holds in its retry queues.
pub fn record_retry_queued(projection: ProjectionKind, entries: usize) {
    metrics::gauge!(RETRY_QUEUED, "projection" => projection.name()).set(entries as f64);
}

/// Sets the lag gauges and the parked streams from one successful read, and when it was.
pub fn record_lag(projection: ProjectionKind, events: i64, seconds: f64, parked: i64) {
    metrics::gauge!(LAG_EVENTS, "projection" => projection.name()).set(events as f64);
    metrics::gauge!(LAG_SECONDS, "projection" => projection.name()).set(seconds);
    metrics::gauge!(PARKED_STREAMS, "projection" => projection.name()).set(parked as f64);
    metrics::gauge!(LAG_LAST_SUCCESS, "projection" => projection.name()).set(unix_now());
}
