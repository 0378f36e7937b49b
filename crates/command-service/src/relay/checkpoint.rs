//! The stored publish checkpoint: table `relay_checkpoints` (migrations/0002_relay.sql), one
//! row per stream key, holding a position up to which every event is known to be on that stream.
//!
//! Written by the leader on its lock connection, at most once per checkpoint interval (see
//! [`super::step`] for why it may lag what was published). The write never moves the checkpoint
//! backwards: a deposed leader finishing a stale batch cannot undo its successor's progress.
//! A checkpoint beyond the event store's head names events the store never had, so it is not a
//! checkpoint at all: a new leadership forgets it ([`forget_beyond_head`]) instead of resuming
//! after it.

use sqlx::PgConnection;

/// The table holding the checkpoints.
pub const CHECKPOINT_TABLE: &str = "relay_checkpoints";

/// The checkpoint of `stream_key` (0 when the relay never published to it).
pub async fn load(conn: &mut PgConnection, stream_key: &str) -> Result<i64, sqlx::Error> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE stream_key = $1")
            .bind(stream_key)
            .fetch_optional(conn)
            .await?;
    Ok(position.unwrap_or(0))
}

/// Records that every position up to `position` is on `stream_key` (never lowers it).
pub async fn save(
    conn: &mut PgConnection,
    stream_key: &str,
    position: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO relay_checkpoints (stream_key, position, updated_at) VALUES ($1, $2, now()) \
         ON CONFLICT (stream_key) DO UPDATE \
         SET position = GREATEST(relay_checkpoints.position, EXCLUDED.position), updated_at = now()",
    )
    .bind(stream_key)
    .bind(position)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes the checkpoint of `stream_key` if it lies beyond the event store's head, and returns
/// the position forgotten. Such a value was never "every event up to here is on the stream":
/// an older release resumed after the raw top id of the stream, which an entry added by hand
/// with a time-based id (`XADD … *`) makes a millisecond timestamp, and stored it; kept, it
/// would make every leadership resume beyond the log and publish nothing, for good (a save
/// never lowers it). The head is read in the same statement, so a checkpoint a leader stored
/// for events committed meanwhile is never taken for one.
pub async fn forget_beyond_head(
    conn: &mut PgConnection,
    stream_key: &str,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "DELETE FROM relay_checkpoints WHERE stream_key = $1 \
         AND position > (SELECT COALESCE(max(global_position), 0) FROM events) \
         RETURNING position",
    )
    .bind(stream_key)
    .fetch_optional(conn)
    .await
}
