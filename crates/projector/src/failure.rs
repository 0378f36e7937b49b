//! The one place that decides whether a failure is *transient* (the world is broken: retry the
//! same work later without counting it against the entry), *poison* (this entry is broken:
//! count an attempt, back off, and eventually dead-letter it) or *newer release* (the entry is
//! fine but this build is too old to read it: hold it, count nothing, never dead-letter it).
//!
//! Everything that can fail while projecting funnels into [`Failure`] through [`classify_sql`],
//! [`classify_bus`] or [`Failure::poison`]; no other module inspects SQLSTATEs or Redis error
//! kinds.

use std::time::Duration;

/// What a failure means for the entries being processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// Postgres or Redis is unreachable, overloaded, restarting, or the transaction lost a
    /// deadlock/serialisation race: pause and retry the very same work.
    #[error("transient: {0}")]
    Transient(String),
    /// The data itself cannot be projected (undecodable, a constraint or trigger refuses it):
    /// retrying the same entry immediately will fail the same way.
    #[error("{0}")]
    Poison(String),
    /// The event was written by a newer release than this build (a type or a schema version it
    /// does not know, `events::DecodeError::needs_newer_release`): nothing is broken, this
    /// build is too old to read it. It is held (its stream's later events behind it), never
    /// counted as an attempt nor dead-lettered, until an instance of the newer release, which
    /// claims it from this one, has applied it.
    #[error("{0}")]
    NewerRelease(String),
}

impl Failure {
    /// A poison failure with `message`.
    pub fn poison(message: impl Into<String>) -> Self {
        Failure::Poison(message.into())
    }

    /// Whether retrying the same work later may succeed without anyone fixing anything.
    pub fn is_transient(&self) -> bool {
        matches!(self, Failure::Transient(_))
    }
}

/// SQLSTATEs of work that lost a race with other work and will likely pass when retried:
/// serialization failure and deadlock (40001, 40P01), a lock timeout (55P03) and a statement
/// cancelled by its timeout (57014).
fn contention_sqlstate(code: &str) -> bool {
    matches!(code, "40001" | "40P01" | "55P03" | "57014")
}

/// Classifies a database error: the database unavailable (`platform::db::is_unavailable`) or
/// contention is transient, anything else poison.
pub fn classify_sql(err: &sqlx::Error) -> Failure {
    let message = describe_sql(err);
    let contention = err
        .as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| contention_sqlstate(&code));
    if platform::db::is_unavailable(err) || contention {
        Failure::Transient(message)
    } else {
        Failure::Poison(message)
    }
}

/// Most characters of a database error's detail [`describe_sql`] keeps.
const DETAIL_CHARS: usize = 300;

/// `text`, cut to its first `max` characters (with `…` when it was longer).
fn capped(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// A database error as the letter, the park and the log carry it: the server's message, its
/// SQLSTATE, and the constraint, table and detail it names, on one line. Not sqlx's rendering,
/// which ends with the line of PostgreSQL's own source that raised it ("at line 3907"), of no
/// use to an operator, and leaves out the rest.
fn describe_sql(err: &sqlx::Error) -> String {
    let Some(db) = err.as_database_error() else {
        return one_line(err);
    };
    let mut about = Vec::new();
    if let Some(code) = db.code() {
        about.push(format!("SQLSTATE {code}"));
    }
    if let Some(constraint) = db.constraint() {
        about.push(format!("constraint {constraint}"));
    }
    if let Some(table) = db.table() {
        about.push(format!("table {table}"));
    }
    if let Some(detail) = db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|pg| pg.detail())
    {
        // A check or not-null violation's detail is the whole row ("Failing row contains
        // (…)"); what identifies it comes first, and the letter, the park and the log line
        // need no more than that.
        about.push(format!("detail: {}", capped(detail, DETAIL_CHARS)));
    }
    let message = if about.is_empty() {
        format!("error returned from database: {}", db.message())
    } else {
        format!(
            "error returned from database: {} ({})",
            db.message(),
            about.join("; ")
        )
    };
    one_line(&message)
}

/// Classifies a Redis error. Only connection problems are transient; `NOGROUP` is handled by
/// the consumer before it gets here (it recreates the group), so it too counts as transient.
pub fn classify_bus(err: &bus::BusError) -> Failure {
    if err.is_retryable() || err.is_no_group() {
        Failure::Transient(one_line(err))
    } else {
        Failure::Poison(one_line(err))
    }
}

/// Exponential backoff for transient failures: 100 ms doubling to 10 s, with ±50 % jitter so
/// many instances do not hammer a recovering server in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    current: Duration,
}

/// First pause after a transient failure.
pub const TRANSIENT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause between two attempts while a dependency is down.
pub const TRANSIENT_BACKOFF_MAX: Duration = Duration::from_secs(10);

impl Default for Backoff {
    fn default() -> Self {
        Self {
            current: TRANSIENT_BACKOFF_MIN,
        }
    }
}

impl Backoff {
    /// The next pause (jittered), doubling the base for the time after.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(TRANSIENT_BACKOFF_MAX);
        let factor = 0.5 + rand::random::<f64>();
        base.mul_f64(factor).min(TRANSIENT_BACKOFF_MAX)
    }

    /// Back to the smallest pause after a success.
    pub fn reset(&mut self) {
        self.current = TRANSIENT_BACKOFF_MIN;
    }
}

/// The delay before poison retry number `attempt` (1-based): `base`, `2·base`, `4·base`, …,
/// capped at one minute.
pub fn poison_retry_delay(base: Duration, attempt: u32) -> Duration {
    let shift = attempt.saturating_sub(1).min(16);
    base.saturating_mul(1u32 << shift)
        .min(Duration::from_secs(60))
}

/// Least time between two log lines about an event held for a newer release: the hold lasts
/// until the rollout reaches this instance, and its counter counts every try.
pub const NEWER_RELEASE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// How long an entry held for a newer release waits between two tries: the pace of a poison
/// entry's last retry before its dead letter. It stays unreadable to this build, so only an
/// instance of the newer release applying it meanwhile ends the hold; trying again only finds
/// that out.
pub fn newer_release_retry_delay(base: Duration, max_attempts: u32) -> Duration {
    poison_retry_delay(base, max_attempts.max(1))
}

/// Collapses an error onto one line (errors end up in Redis fields and log lines).
pub fn one_line(err: &dyn std::fmt::Display) -> String {
    err.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_timeouts_are_transient_and_other_errors_are_poison() {
        assert!(classify_sql(&sqlx::Error::PoolTimedOut).is_transient());
        assert!(!classify_sql(&sqlx::Error::RowNotFound).is_transient());
    }

    #[test]
    fn poison_retry_delays_double_from_the_base() {
        let base = Duration::from_millis(200);
        assert_eq!(poison_retry_delay(base, 1), base);
        assert_eq!(poison_retry_delay(base, 3), Duration::from_millis(800));
    }

    #[test]
    fn transient_backoff_never_exceeds_its_cap() {
        let mut backoff = Backoff::default();
        for _ in 0..50 {
            assert!(backoff.next_delay() <= TRANSIENT_BACKOFF_MAX);
        }
    }
}
