//! The stored first answer of an `Idempotency-Key`: looking it up, recording a refusal, and
//! expiring old keys.
//!
//! A success is stored by the append that made it, in the same transaction as its events
//! ([`crate::append`]). A refusal decided on the stored state (a rule, an unknown order, a
//! failed precondition) is stored by [`record_first_answer`], under the same append lock, so
//! that the two never both become a key's first answer.

use std::time::Duration;

use sqlx::{PgExecutor, PgPool, Row};

use crate::append::IdempotencyRecord;

/// The first response given to a request with this key.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub request_hash: Vec<u8>,
    pub status: i16,
    pub body: serde_json::Value,
}

/// The stored response for `key`, if a command with it has committed or been refused. A lookup
/// that met a pooled session a server restart ended is made again on another
/// ([`crate::session`]).
pub async fn find(pool: &PgPool, key: &str) -> Result<Option<StoredResponse>, sqlx::Error> {
    crate::session::read_again_on_lost_session(pool, || find_once(pool, key)).await
}

async fn find_once(pool: &PgPool, key: &str) -> Result<Option<StoredResponse>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT request_hash, response_status, response_body FROM idempotency_keys \
         WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_optional(pool)
    .await?;
    row.map(stored_response).transpose()
}

/// The stored answer in `row` (`request_hash`, `response_status`, `response_body`).
fn stored_response(row: sqlx::postgres::PgRow) -> Result<StoredResponse, sqlx::Error> {
    Ok(StoredResponse {
        request_hash: row.try_get("request_hash")?,
        status: row.try_get("response_status")?,
        body: row.try_get("response_body")?,
    })
}

/// The statement of [`record_first_answer`]: stores the record unless the key has an answer,
/// and returns that answer when it has. The main query does not see the row its own `INSERT`
/// adds, and under the append lock no other writer of keys can commit between its snapshot and
/// its `INSERT`, so a conflict always finds the row it conflicted with.
const RECORD_SQL: &str = "WITH recorded AS ( \
         INSERT INTO idempotency_keys (idempotency_key, request_hash, response_status, \
                                       response_body) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (idempotency_key) DO NOTHING \
         RETURNING idempotency_key \
     ) \
     SELECT request_hash, response_status, response_body FROM idempotency_keys \
     WHERE idempotency_key = $1 AND NOT EXISTS (SELECT FROM recorded)";

/// Records `record` (a refusal: its status and body, stored as given) as the first answer to
/// its key, unless the key already has one: then nothing is written and that answer is
/// returned. `None`: `record` is now the key's first answer.
///
/// Holds the append lock ([`crate::append::APPEND_LOCK_KEY`]) for one statement, and commits
/// without waiting for the WAL flush (a refusal lost to a server crash is answered anew): an append
/// checks its keys under that lock and inserts them at the end of its transaction, so a key
/// recorded here in between would fail the whole group commit on the key's unique index.
/// Under the lock, a concurrent append with the same key either committed first (its answer
/// is returned) or finds the key taken.
///
/// Bounded as [`crate::append_batch_unless_unreachable`], and for the same reasons: at most
/// `deadline` from asking the pool for a connection to the commit's answer (a server gone
/// silent must not hold the caller; past it the call fails with a timed-out I/O error and
/// whether the record was committed is unknown, which a repeat of the request settles), and no
/// waiting for a connection once `unreachable` completes (then nothing was written). Once the
/// transaction has begun it runs to its own answer.
pub async fn record_first_answer(
    pool: &PgPool,
    record: &IdempotencyRecord,
    deadline: Duration,
    unreachable: impl std::future::Future<Output = ()>,
) -> Result<Option<StoredResponse>, sqlx::Error> {
    crate::append::in_append_transaction(
        pool,
        deadline,
        unreachable,
        "recording an idempotency key",
        || {
            async |tx| {
                // Not waiting for the WAL flush under the append lock: a burst of refusals must not
                // queue the appends behind one flush each. A record a server crash loses lets a
                // repeat run again, as before refusals were recorded; any later durable commit
                // flushes it too.
                sqlx::query("SET LOCAL synchronous_commit = off")
                    .execute(&mut *tx)
                    .await?;
                let row = sqlx::query(RECORD_SQL)
                    .bind(&record.key)
                    .bind(&record.request_hash)
                    .bind(record.response_status)
                    .bind(&record.response_body)
                    .fetch_optional(&mut *tx)
                    .await?;
                row.map(stored_response).transpose()
            }
        },
    )
    .await
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
