//! The stored publish checkpoint: table `relay_checkpoints` (migrations/0002_relay.sql), one
//! row per stream key, holding a position up to which every event is known to be on that stream.
//!
//! Written by the leader on its lock connection, at most once per checkpoint interval (see
//! [`super::step`] for why it may lag what was published). The write never moves the checkpoint
//! backwards: a deposed leader finishing a stale batch cannot undo its successor's progress.

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
