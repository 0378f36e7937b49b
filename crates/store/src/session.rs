//! Sessions found gone, and the work that may be sent again on another one.
//!
//! A server restart (or fail-over, or an operator's `pg_terminate_backend`) ends every session
//! of a pool at once. A pool that hands out a session used a moment before without a round trip
//! to test it (the services' writing pools, for speed) hands out a dead one, and the work sent
//! on it fails at once with an I/O error or the server's 57P01. Nothing of that work can have
//! taken effect unless a `COMMIT` had been sent: reads change nothing, and a transaction the
//! server never committed is rolled back with its session. Such work is sent again on another
//! session (the pool closes a broken one as it comes back), so a restart costs the caller a
//! round trip per dead session instead of a failed request. A failure during `COMMIT` is never
//! retried here: whether it landed is unknown, and only the caller can settle that.

use sqlx::PgPool;

/// Whether `e` says the session it was sent on is gone: cut (an I/O error, a protocol out of
/// step) or ended by the server (an admin shutdown, a crash, a restart: 57P01..57P03, class
/// 08). The work sent on it did not happen unless it was a `COMMIT`. (`platform::db`, which
/// the store does not depend on, tells the same sessions apart to have its pools check theirs.)
pub fn is_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// How many times work that met a lost session is sent again: once per session the pool may
/// hold (each may have been ended by the same restart), and once more for the new one.
pub(crate) fn tries_after_lost_sessions(pool: &PgPool) -> u32 {
    pool.options().get_max_connections().saturating_add(1)
}

/// A failure that may be a session found gone ([`is_lost`]).
pub(crate) trait SessionLost {
    /// Whether the failure is a session found gone.
    fn session_lost(&self) -> bool;
}

impl SessionLost for sqlx::Error {
    fn session_lost(&self) -> bool {
        is_lost(self)
    }
}

/// Runs `read` (work that changes nothing, or commits nothing before it fails) and runs it again
/// while it fails on a session found gone, at most once per session of `pool` and one more.
/// Any other failure, or the last one, is returned as it is.
pub(crate) async fn read_again_on_lost_session<T, E, Read>(
    pool: &PgPool,
    // A function making the read's future rather than an `AsyncFnMut`: the future of a call
    // borrowing the closure would not be provably `Send` for every borrow, which a request
    // handler's future needs.
    mut read: impl FnMut() -> Read,
) -> Result<T, E>
where
    E: SessionLost + std::fmt::Display,
    Read: std::future::Future<Output = Result<T, E>>,
{
    let mut tries_left = tries_after_lost_sessions(pool);
    loop {
        match read().await {
            Err(e) if e.session_lost() && tries_left > 0 => {
                tries_left -= 1;
                tracing::debug!(error = %e, "a pooled session was gone; reading on another");
            }
            done => return done,
        }
    }
}
