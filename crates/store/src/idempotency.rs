//! Looking up the stored answer of an `Idempotency-Key`.

use sqlx::{PgExecutor, Row};

/// The first response given to a request with this key.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub request_hash: Vec<u8>,
    pub status: i16,
    pub body: serde_json::Value,
}

/// The stored response for `key`, if a command with it has committed.
pub async fn find(
    executor: impl PgExecutor<'_>,
    key: &str,
) -> Result<Option<StoredResponse>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT request_hash, response_status, response_body FROM idempotency_keys \
         WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_optional(executor)
    .await?;
    row.map(|row| {
        Ok(StoredResponse {
            request_hash: row.try_get("request_hash")?,
            status: row.try_get("response_status")?,
            body: row.try_get("response_body")?,
        })
    })
    .transpose()
}

/// Deletes keys older than `max_age_secs`; returns how many. Keys only need to outlive client
/// retries, and the table must not grow forever.
pub async fn expire(executor: impl PgExecutor<'_>, max_age_secs: i64) -> Result<u64, sqlx::Error> {
    let result = sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(max_age_secs as f64)
    .execute(executor)
    .await?;
    Ok(result.rows_affected())
}
