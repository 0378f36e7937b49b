//! The relay's metrics: names (each a constant, documented once here) and their recording.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `relay_lag_events` | gauge | head position − checkpoint (as of the last read) |
//! | `relay_lag_seconds` | gauge | age of the oldest unpublished event, 0 when caught up |
//! | `relay_published_total` | counter | entries newly added to the stream |
//! | `relay_publish_errors_total` | counter | failed publish attempts (Redis down, …) |
//! | `relay_gaps_total` | counter | reads that showed a gap in positions (never expected) |
//! | `relay_refused_entries_total` | counter | entries Redis refused because a foreign entry sits above them (never expected) |
//! | `relay_checkpoint_position` | gauge | the leader's checkpoint |
//! | `relay_is_leader` | gauge | 1 while this instance leads; 0 on standbys and where `RELAY_ENABLED=false` |
//! | `relay_commit_to_stream_seconds` | histogram | publish time − `recorded_at`, per event |
//! | `relay_stream_diverged` | gauge | 1 while the stream's newest entry is not the store's event at its position (publishing held) |
//!
//! The gauges describe the leader's work, so an instance that stops leading sets them back to
//! 0 ([`leadership_ended`]): alerts take the maximum over all instances, and a standby still
//! exporting the lag or the divergence it last saw would keep them firing after the new leader
//! has caught up or the stream was fixed.
//!
//! [`exported_from_start`] puts what the alerts read on `/metrics` before anything happens, on
//! every command-service instance, whether or not it runs the relay: `relay_is_leader` at 0, so
//! that `sum(relay_is_leader) < 1` (RelayNotLeading) sees instances that do not lead, and the
//! never-expected counters at 0, so that `increase()` sees their first increment; and
//! `relay_publish_errors_total` at 0, which the RUNBOOK tells an operator to look at.

use chrono::{DateTime, Utc};

/// Head position − checkpoint.
pub const LAG_EVENTS: &str = "relay_lag_events";
/// Age of the oldest unpublished event in seconds (0 when caught up).
pub const LAG_SECONDS: &str = "relay_lag_seconds";
/// Entries newly added to the stream.
pub const PUBLISHED_TOTAL: &str = "relay_published_total";
/// Failed publish attempts.
pub const PUBLISH_ERRORS_TOTAL: &str = "relay_publish_errors_total";
/// Reads that showed a gap in positions.
pub const GAPS_TOTAL: &str = "relay_gaps_total";
/// Entries Redis refused as already present although the stream did not hold them: a foreign
/// entry sits above their positions.
pub const REFUSED_ENTRIES_TOTAL: &str = "relay_refused_entries_total";
/// The leader's checkpoint.
pub const CHECKPOINT_POSITION: &str = "relay_checkpoint_position";
/// 1 while this instance leads, else 0.
pub const IS_LEADER: &str = "relay_is_leader";
/// Seconds from commit (`recorded_at`) to publication, per event.
pub const COMMIT_TO_STREAM_SECONDS: &str = "relay_commit_to_stream_seconds";

/// 1 while the stream records a history the event store does not have, else 0.
pub const STREAM_DIVERGED: &str = "relay_stream_diverged";

pub(crate) fn stream_diverged(diverged: bool) {
    metrics::gauge!(STREAM_DIVERGED).set(if diverged { 1.0 } else { 0.0 });
}

/// Exports the relay's alerting metrics, and the publish errors the RUNBOOK points at, at their
/// resting values (see the module docs); called
/// once at start by every command-service instance, its relay enabled or not.
pub fn exported_from_start() {
    set_leader(false);
    metrics::counter!(GAPS_TOTAL).increment(0);
    metrics::counter!(REFUSED_ENTRIES_TOTAL).increment(0);
    metrics::counter!(PUBLISH_ERRORS_TOTAL).increment(0);
}

pub(crate) fn set_leader(leader: bool) {
    metrics::gauge!(IS_LEADER).set(if leader { 1.0 } else { 0.0 });
}

/// Sets every leader-only gauge back to 0 once this instance stops leading (see the module
/// docs): only the leader knows the lag, the checkpoint and whether the stream diverged.
pub(crate) fn leadership_ended() {
    set_leader(false);
    stream_diverged(false);
    lag_seconds(None);
    metrics::gauge!(LAG_EVENTS).set(0.0);
    metrics::gauge!(CHECKPOINT_POSITION).set(0.0);
}

pub(crate) fn publish_error() {
    metrics::counter!(PUBLISH_ERRORS_TOTAL).increment(1);
}

pub(crate) fn gap() {
    metrics::counter!(GAPS_TOTAL).increment(1);
}

pub(crate) fn refused_entries(refused: usize) {
    metrics::counter!(REFUSED_ENTRIES_TOTAL).increment(refused as u64);
}

pub(crate) fn published(appended: usize, recorded_at: impl Iterator<Item = DateTime<Utc>>) {
    metrics::counter!(PUBLISHED_TOTAL).increment(appended as u64);
    let now = Utc::now();
    let histogram = metrics::histogram!(COMMIT_TO_STREAM_SECONDS);
    for at in recorded_at {
        histogram.record(seconds_between(at, now));
    }
}

pub(crate) fn checkpoint(position: i64, head: i64) {
    metrics::gauge!(CHECKPOINT_POSITION).set(position as f64);
    metrics::gauge!(LAG_EVENTS).set(head.saturating_sub(position).max(0) as f64);
}

/// `oldest_unpublished`: `recorded_at` of the oldest event not yet on the stream, if any.
pub(crate) fn lag_seconds(oldest_unpublished: Option<DateTime<Utc>>) {
    let lag = oldest_unpublished.map_or(0.0, |at| seconds_between(at, Utc::now()));
    metrics::gauge!(LAG_SECONDS).set(lag);
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    // Clocks of the database and this host may differ slightly; never report negative ages.
    ((to - from).num_microseconds().unwrap_or(0) as f64 / 1e6).max(0.0)
}
