//! Exponential backoff with full jitter, for retrying Redis (and Postgres) while they are down.
//! Jitter spreads the retries of many instances so a recovering server is not hit in lockstep.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `min` to `max`; each actual delay is drawn uniformly from
/// `[current / 2, current]`, so it never falls below half the nominal step.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff starting at `min` and capped at `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            current: min,
        }
    }

    /// The next delay to wait, then doubles the nominal step (up to `max`).
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.current;
        self.current = (self.current * 2).min(self.max);
        let low = nominal / 2;
        let spread = nominal.saturating_sub(low).as_millis() as u64;
        let extra = if spread == 0 {
            0
        } else {
            rand::rng().random_range(0..=spread)
        };
        low + Duration::from_millis(extra)
    }

    /// Back to `min` after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_within_it() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut last_nominal = Duration::ZERO;
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay <= Duration::from_secs(5));
            assert!(delay >= Duration::from_millis(50));
            last_nominal = delay;
        }
        assert!(last_nominal >= Duration::from_millis(2500));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
