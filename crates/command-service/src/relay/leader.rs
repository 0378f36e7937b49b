//! Leadership: exactly one relay per stream key publishes, across all instances.
//!
//! The leader holds a *session* advisory lock on a dedicated connection (never a pooled one: a
//! pool would hand the session, and the lock, to someone else). Postgres releases the lock when
//! that connection ends, however it ends (clean close, crash, `kill -9`, `pg_terminate_backend`,
//! or, when the leader's host dies or is cut off, the server's keepalives within about 25 s:
//! `platform::db::with_dead_client_limits`), so a standby polling `pg_try_advisory_lock` takes
//! over. This module never publishes.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

/// How long one query (or connect) of the relay's leader or standby may wait for PostgreSQL
/// when `RELAY_QUERY_TIMEOUT_MS` is not given. A server that stops answering without closing
/// the connection (its host died, a network path dropped it, a fail-over moved the address)
/// would otherwise hold the relay for as long as TCP retransmits, about 15 minutes on Linux:
/// no leader would publish, and no standby would take over, since its own try waits as long.
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// `query`'s result, or a timed-out I/O error when PostgreSQL has not answered within `limit`;
/// the caller then treats the connection as dead, as after any other I/O error.
pub async fn answered_within<T>(
    limit: Duration,
    query: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    tokio::time::timeout(limit, query)
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("PostgreSQL did not answer within {limit:?}"),
            )))
        })
}

/// Upper 32 bits of every relay lock key: a namespace that keeps the relay's locks apart from
/// the store's append lock (`store::append::APPEND_LOCK_KEY`, whose upper bits are zero) and from
/// any other advisory lock of the system.
pub const RELAY_LOCK_NAMESPACE: u32 = 0x0E5E_0002;

/// `application_name` of the leader/standby connection, so operators see it in
/// `pg_stat_activity` (and can `pg_terminate_backend` it to force a fail-over).
pub const LOCK_CONNECTION_NAME: &str = "command-service outbox relay";

/// The advisory lock key of the relay publishing to `stream_key`:
/// `RELAY_LOCK_NAMESPACE << 32 | fnv1a32(stream_key)`.
///
/// One key per stream key, so relays of different streams (tests with their own prefixes) do
/// not block each other. FNV-1a is spelled out rather than taken from `std`'s hasher, whose
/// output may change between Rust releases: instances of different builds must agree.
pub fn relay_lock_key(stream_key: &str) -> i64 {
    let mut hash: u32 = 0x811C_9DC5;
    for byte in stream_key.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (i64::from(RELAY_LOCK_NAMESPACE) << 32) | i64::from(hash)
}

/// A relay that wants the lock: keeps one connection open between attempts (a standby polls
/// every second; reconnecting each time would be wasteful) and hands it over once it holds the
/// lock.
pub struct Candidate {
    options: PgConnectOptions,
    lock_key: i64,
    conn: Option<PgConnection>,
    query_timeout: Duration,
}

impl Candidate {
    /// A candidate for `lock_key` on the database of `options`, whose connect and lock query
    /// each give up after `query_timeout`.
    pub fn new(options: PgConnectOptions, lock_key: i64, query_timeout: Duration) -> Self {
        Self {
            options: options.application_name(LOCK_CONNECTION_NAME),
            lock_key,
            conn: None,
            query_timeout,
        }
    }

    /// Tries the lock once. `Ok(Some(conn))`: this instance now leads, and keeps leading while
    /// `conn` lives; dropping or closing it releases the lock. `Ok(None)`: someone else leads.
    pub async fn try_acquire(&mut self) -> Result<Option<PgConnection>, sqlx::Error> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => answered_within(self.query_timeout, self.options.connect()).await?,
        };
        let acquired: bool = match answered_within(
            self.query_timeout,
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(self.lock_key)
                .fetch_one(&mut conn),
        )
        .await
        {
            Ok(acquired) => acquired,
            Err(err) => {
                // The connection is suspect; a fresh one is opened next time. Dropped, not
                // closed: a server that stopped answering would not take the goodbye either.
                drop(conn);
                return Err(err);
            }
        };
        if acquired {
            Ok(Some(conn))
        } else {
            self.conn = Some(conn);
            Ok(None)
        }
    }

    /// Closes the standby connection, if any.
    pub async fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            answered_within(self.query_timeout, conn.close()).await.ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_differ_per_stream_and_stay_in_the_relay_namespace() {
        let a = relay_lock_key("es:events");
        let b = relay_lock_key("test-1:es:events");
        assert_ne!(a, b);
        assert_eq!(a >> 32, i64::from(RELAY_LOCK_NAMESPACE));
        assert_eq!(b >> 32, i64::from(RELAY_LOCK_NAMESPACE));
        assert_eq!(a, relay_lock_key("es:events"));
    }

    #[test]
    fn the_lock_key_of_the_default_stream_is_stable_across_builds() {
        // FNV-1a 32 of "es:events"; if this changes, old and new instances would both lead.
        assert_eq!(relay_lock_key("es:events") & 0xFFFF_FFFF, 0xC3C8_44D0);
    }
}
