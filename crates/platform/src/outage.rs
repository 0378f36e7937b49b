//! Logging a failure that repeats for as long as a dependency is down: a loop that retries
//! every second, or a probe polled every few seconds, must not write a line per try for the
//! whole of a PostgreSQL outage (hundreds of lines a minute per process, burying the few that
//! say something).
//!
//! An [`OutageLog`] tells its owner which failures to log: the first one of an outage, then one
//! reminder at most every [`REMINDER_INTERVAL`] (with how many failures there were and for how
//! long), and the first success after them, to log as the recovery. The failures in between
//! are the owner's to log at debug. Like the database gate's log ([`crate::db_gate`]), an outage
//! costs a line at its start and one at its end, plus a reminder a minute while it lasts.
//!
//! It logs nothing itself (each owner words its own lines, with its own fields) and holds no
//! lock: it belongs to one loop, or sits behind the owner's mutex.

use std::time::{Duration, Instant};

/// Least time between two lines about the same outage: often enough that a look at the last
/// minute of logs shows it is still going on, rarely enough that it never floods them.
pub const REMINDER_INTERVAL: Duration = Duration::from_secs(60);

/// What the owner of an [`OutageLog`] logs about a failure that [`OutageLog::failed`] let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failing {
    /// The first failure of this outage (else a reminder).
    pub first: bool,
    /// Failures since the outage began, this one included.
    pub failures: u64,
    /// Time since the outage's first failure.
    pub failing_for: Duration,
}

impl Failing {
    /// [`Failing::failing_for`] in whole milliseconds, for a log field.
    pub fn failing_ms(&self) -> u64 {
        millis(self.failing_for)
    }
}

/// What the owner of an [`OutageLog`] logs when an outage has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Failures during the outage.
    pub failures: u64,
    /// Time from the outage's first failure to this success.
    pub failed_for: Duration,
}

impl Recovered {
    /// [`Recovered::failed_for`] in whole milliseconds, for a log field.
    pub fn failed_ms(&self) -> u64 {
        millis(self.failed_for)
    }
}

#[derive(Debug, Clone, Copy)]
struct Outage {
    since: Instant,
    logged_at: Instant,
    failures: u64,
}

/// Which failures of one repeating operation to log; see the module documentation.
#[derive(Debug, Clone)]
pub struct OutageLog {
    reminder_every: Duration,
    outage: Option<Outage>,
}

impl Default for OutageLog {
    fn default() -> Self {
        Self::new()
    }
}

impl OutageLog {
    /// No outage yet; reminders every [`REMINDER_INTERVAL`].
    pub fn new() -> Self {
        Self::with_reminders_every(REMINDER_INTERVAL)
    }

    /// No outage yet; reminders at most every `every`.
    pub fn with_reminders_every(every: Duration) -> Self {
        Self {
            reminder_every: every,
            outage: None,
        }
    }

    /// Records a failure. `Some` when it is to be logged at warn level or above (the first of
    /// an outage, or a reminder); `None` when it is to be logged at debug at most.
    pub fn failed(&mut self) -> Option<Failing> {
        self.failed_at(Instant::now())
    }

    /// Records a success. `Some` when it ends an outage: log the recovery.
    pub fn recovered(&mut self) -> Option<Recovered> {
        self.recovered_at(Instant::now())
    }

    /// Whether the last outcome recorded was a failure.
    pub fn is_failing(&self) -> bool {
        self.outage.is_some()
    }

    fn failed_at(&mut self, now: Instant) -> Option<Failing> {
        let Some(outage) = self.outage.as_mut() else {
            self.outage = Some(Outage {
                since: now,
                logged_at: now,
                failures: 1,
            });
            return Some(Failing {
                first: true,
                failures: 1,
                failing_for: Duration::ZERO,
            });
        };
        outage.failures += 1;
        if now.saturating_duration_since(outage.logged_at) < self.reminder_every {
            return None;
        }
        outage.logged_at = now;
        Some(Failing {
            first: false,
            failures: outage.failures,
            failing_for: now.saturating_duration_since(outage.since),
        })
    }

    fn recovered_at(&mut self, now: Instant) -> Option<Recovered> {
        self.outage.take().map(|outage| Recovered {
            failures: outage.failures,
            failed_for: now.saturating_duration_since(outage.since),
        })
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn an_outage_is_logged_at_its_first_failure_then_once_a_reminder_interval_then_at_its_end() {
        let mut log = OutageLog::with_reminders_every(10 * SECOND);
        let start = Instant::now();
        let logged: Vec<bool> = (0..25)
            .map(|s| log.failed_at(start + s * SECOND).is_some())
            .collect();
        // At 0 s (the first), 10 s and 20 s; the other 22 failures are quiet.
        assert_eq!(logged.iter().filter(|l| **l).count(), 3);
        assert!(logged[0] && logged[10] && logged[20]);
        assert!(log.is_failing());

        let reminder = log.failed_at(start + 30 * SECOND).unwrap();
        assert_eq!(
            reminder,
            Failing {
                first: false,
                failures: 26,
                failing_for: 30 * SECOND,
            }
        );
        assert_eq!(
            log.recovered_at(start + 31 * SECOND),
            Some(Recovered {
                failures: 26,
                failed_for: 31 * SECOND,
            })
        );
        assert!(!log.is_failing());
    }

    #[test]
    fn a_success_without_an_outage_logs_nothing_and_the_next_failure_starts_a_new_outage() {
        let mut log = OutageLog::new();
        assert_eq!(log.recovered(), None);
        assert!(log.failed().unwrap().first);
        assert_eq!(log.failed(), None);
        assert!(log.recovered().is_some());
        assert_eq!(log.recovered(), None);
        let again = log.failed().unwrap();
        assert!(again.first);
        assert_eq!(again.failures, 1);
    }
}
