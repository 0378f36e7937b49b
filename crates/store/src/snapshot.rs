//! Snapshots: a cache of a stream's folded state at some version, so loading a long stream
//! replays only the events after it. A snapshot written by code with another state schema
//! version, or one that no longer deserialises, is ignored, never mis-read.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::{PgExecutor, Row};

/// Snapshots found unreadable (they no longer deserialise) and ignored (counter).
pub const SNAPSHOTS_IGNORED_TOTAL: &str = "event_store_snapshots_ignored_total";

/// The latest snapshot of `stream_id` if it was written with `state_schema_version` and still
/// deserialises: `(version, state)`.
pub async fn load_snapshot<T: DeserializeOwned>(
    executor: impl PgExecutor<'_>,
    stream_id: &str,
    state_schema_version: i32,
) -> Result<Option<(i64, T)>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT stream_version, state FROM snapshots \
         WHERE stream_id = $1 AND state_schema_version = $2",
    )
    .bind(stream_id)
    .bind(state_schema_version)
    .fetch_optional(executor)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let version: i64 = row.try_get("stream_version")?;
    let state: serde_json::Value = row.try_get("state")?;
    match serde_json::from_value::<T>(state) {
        Ok(state) => Ok(Some((version, state))),
        Err(err) => {
            tracing::warn!(stream_id, error = %err, "ignoring a snapshot that no longer deserialises");
            metrics::counter!(SNAPSHOTS_IGNORED_TOTAL).increment(1);
            Ok(None)
        }
    }
}

/// Stores a snapshot unless a newer one (same schema) is already there. One at the same version
/// is replaced: the state is the same, unless the stored one no longer deserialises, which a
/// load that replayed the order in its stead repairs this way.
pub async fn save_snapshot<T: Serialize>(
    executor: impl PgExecutor<'_>,
    stream_id: &str,
    version: i64,
    state_schema_version: i32,
    state: &T,
) -> Result<(), sqlx::Error> {
    let state = serde_json::to_value(state).map_err(|err| sqlx::Error::Encode(Box::new(err)))?;
    sqlx::query(
        "INSERT INTO snapshots (stream_id, stream_version, state_schema_version, state) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (stream_id) DO UPDATE \
           SET stream_version = EXCLUDED.stream_version, \
               state_schema_version = EXCLUDED.state_schema_version, \
               state = EXCLUDED.state, taken_at = now() \
         WHERE snapshots.stream_version <= EXCLUDED.stream_version \
            OR snapshots.state_schema_version <> EXCLUDED.state_schema_version",
    )
    .bind(stream_id)
    .bind(version)
    .bind(state_schema_version)
    .bind(state)
    .execute(executor)
    .await?;
    Ok(())
}
