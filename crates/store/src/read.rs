//! Reading the event store: one stream by version, the whole log by position, and the
//! events at given positions.
//!
//! Because positions are dense and assigned in commit order (see the crate docs), `read_all`
//! from the last position seen never skips an event that commits late.

use events::{EventMetadata, RecordedEvent};
use sqlx::postgres::PgRow;
use sqlx::{PgExecutor, Row};
use uuid::Uuid;

const COLUMNS: &str = "global_position, event_id, stream_id, stream_version, event_type, \
                       schema_version, data, metadata, recorded_at";

/// Decodes one `events` row.
pub fn recorded_event(row: &PgRow) -> Result<RecordedEvent, sqlx::Error> {
    let metadata: serde_json::Value = row.try_get("metadata")?;
    Ok(RecordedEvent {
        global_position: row.try_get("global_position")?,
        event_id: row.try_get("event_id")?,
        stream_id: row.try_get("stream_id")?,
        stream_version: row.try_get("stream_version")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get("schema_version")?,
        data: row.try_get("data")?,
        // Metadata is ours and always an object; an unreadable one is kept empty rather than
        // making the event itself unreadable.
        metadata: serde_json::from_value::<EventMetadata>(metadata).unwrap_or_default(),
        recorded_at: row.try_get("recorded_at")?,
    })
}

fn decode_rows(rows: Vec<PgRow>) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    rows.iter().map(recorded_event).collect()
}

/// Events of a stream with version above `after_version`, in version order, at most `limit`.
pub async fn read_stream(
    executor: impl PgExecutor<'_>,
    stream_id: &str,
    after_version: i64,
    limit: i64,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM events WHERE stream_id = $1 AND stream_version > $2 \
         ORDER BY stream_version LIMIT $3"
    )))
    .bind(stream_id)
    .bind(after_version)
    .bind(limit)
    .fetch_all(executor)
    .await?;
    decode_rows(rows)
}

/// Events of the whole log with position above `after_position`, in position order, at most
/// `limit`. Never skips: see the module docs.
pub async fn read_all(
    executor: impl PgExecutor<'_>,
    after_position: i64,
    limit: i64,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM events WHERE global_position > $1 \
         ORDER BY global_position LIMIT $2"
    )))
    .bind(after_position)
    .bind(limit)
    .fetch_all(executor)
    .await?;
    decode_rows(rows)
}

/// The highest committed position in `(after_position, after_position + span]`, `None` when
/// nothing is committed after `after_position` yet.
///
/// A filtered reader asks this *before* it reads the range: positions become visible in order
/// and rows are never deleted, so every event up to the answer is then visible to the read,
/// and the reader may resume after the answer without missing an event that matched. (Asked
/// after the read, it could count an event the read did not see.)
pub async fn last_position_within(
    executor: impl PgExecutor<'_>,
    after_position: i64,
    span: i64,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT max(global_position) FROM events \
         WHERE global_position > $1 AND global_position <= $2",
    )
    .bind(after_position)
    // Summed here, saturating: in SQL, a position near i64::MAX would overflow into an error.
    .bind(after_position.saturating_add(span))
    .fetch_one(executor)
    .await
}

/// Events of the given types with position in `(after_position, up_to]`, in position order, at
/// most `limit`. `up_to` must come from [`last_position_within`] (or another read of committed
/// positions) for the range to be complete.
pub async fn read_all_of_types(
    executor: impl PgExecutor<'_>,
    after_position: i64,
    up_to: i64,
    event_types: &[String],
    limit: i64,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM events \
         WHERE global_position > $1 AND global_position <= $2 AND event_type = ANY($3) \
         ORDER BY global_position LIMIT $4"
    )))
    .bind(after_position)
    .bind(up_to)
    .bind(event_types)
    .bind(limit)
    .fetch_all(executor)
    .await?;
    decode_rows(rows)
}

/// Of `names`, those that no release has registered as an event type it writes (the
/// `event_types` table, filled by the migrations that ship each type): names this release does
/// not know but a newer one does are not among them (in the order asked), so a filter naming them is a real filter
/// during a rollout rather than a misspelling. One primary-key probe per name.
pub async fn unregistered_event_types(
    executor: impl PgExecutor<'_>,
    names: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT name FROM unnest($1::text[]) WITH ORDINALITY AS asked(name, n) \
         WHERE NOT EXISTS (SELECT 1 FROM event_types WHERE event_type = asked.name) \
         ORDER BY n",
    )
    .bind(names)
    .fetch_all(executor)
    .await
}

/// The highest committed position (0 for an empty store).
pub async fn head_position(executor: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COALESCE(max(global_position), 0) FROM events")
        .fetch_one(executor)
        .await
}

/// The id of the event at `position`; `None` when no event has it (yet).
pub async fn event_id_at(
    executor: impl PgExecutor<'_>,
    position: i64,
) -> Result<Option<uuid::Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT event_id FROM events WHERE global_position = $1")
        .bind(position)
        .fetch_optional(executor)
        .await
}

/// The events the store holds at `positions` (in no particular order; a position it does not
/// hold is left out). How a reader of the event stream tells the store's events from entries of
/// another history, or forged ones: an entry is the store's event only if it equals the
/// event at its position in every field that is applied, so the caller compares them and
/// applies the store's copy (see the relay's history check for the same idea).
pub async fn events_at(
    executor: impl PgExecutor<'_>,
    positions: &[i64],
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM events WHERE global_position = ANY($1)"
    )))
    .bind(positions)
    .fetch_all(executor)
    .await?;
    decode_rows(rows)
}

/// The id of a stream's last event, and its version: `(0, None)` for a stream with no events.
///
/// A version counts events; it does not say which. Two writers can each bring a stream to the
/// same version with different events, so only the pair names a state (the append's
/// [`crate::ExpectedVersion::Head`] checks the same pair).
pub async fn stream_head(
    executor: impl PgExecutor<'_>,
    stream_id: &str,
) -> Result<(i64, Option<Uuid>), sqlx::Error> {
    let head: Option<(i64, Uuid)> = sqlx::query_as(
        "SELECT stream_version, event_id FROM events WHERE stream_id = $1 \
         ORDER BY stream_version DESC LIMIT 1",
    )
    .bind(stream_id)
    .fetch_optional(executor)
    .await?;
    Ok(head.map_or((0, None), |(version, event_id)| (version, Some(event_id))))
}

/// The current version of a stream (0 if it has no events).
pub async fn stream_version(
    executor: impl PgExecutor<'_>,
    stream_id: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COALESCE(max(stream_version), 0) FROM events WHERE stream_id = $1")
        .bind(stream_id)
        .fetch_one(executor)
        .await
}
