//! When a consumer should wait for more entries before applying what it has.
//!
//! Every apply transaction costs about a dozen database round trips whatever its size, so under
//! load, applying each read at once spends most of the projector's (and PostgreSQL's) time on
//! transactions of one or two events. [`Linger`] estimates the rate at which entries arrive and
//! lets the consumer wait a little for the next ones only when at least one more is expected
//! within that wait: under load, batches grow and transactions shrink in number; on a quiet
//! stream, nothing waits and no latency is added.

use std::time::{Duration, Instant};

/// The window over which the arrival rate is counted.
const WINDOW: Duration = Duration::from_secs(1);

/// Arrival-rate estimate of one consumer, and the wait it implies.
#[derive(Debug, Clone)]
pub struct Linger {
    wait: Duration,
    window_start: Instant,
    in_window: usize,
    /// Entries per second over the last full window (0 until one has passed).
    rate: f64,
}

impl Linger {
    /// Waits of `wait` (zero: never wait).
    pub fn new(wait: Duration) -> Self {
        Self::starting_at(wait, Instant::now())
    }

    fn starting_at(wait: Duration, now: Instant) -> Self {
        Self {
            wait,
            window_start: now,
            in_window: 0,
            rate: 0.0,
        }
    }

    /// Counts `entries` read at `now`.
    pub fn record(&mut self, entries: usize, now: Instant) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= WINDOW {
            // A window that ended long ago (a quiet stream) is spread over the whole gap.
            self.rate = self.in_window as f64 / elapsed.as_secs_f64();
            self.window_start = now;
            self.in_window = 0;
        }
        self.in_window += entries;
    }

    /// How long to wait for more entries after a read that left room in the batch: the
    /// configured wait when the current rate brings at least one more entry within it.
    pub fn wait(&self) -> Option<Duration> {
        let expected = self.rate * self.wait.as_secs_f64();
        (!self.wait.is_zero() && expected >= 1.0).then_some(self.wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE_MS: Duration = Duration::from_millis(5);

    /// `per_second` entries a second, in reads of `per_read`, for `seconds`.
    fn feed(linger: &mut Linger, start: Instant, per_second: u64, per_read: u64, seconds: u64) {
        let reads = per_second * seconds / per_read;
        for i in 0..=reads {
            let at = start + Duration::from_micros(i * per_read * 1_000_000 / per_second);
            linger.record(per_read as usize, at);
        }
    }

    #[test]
    fn nothing_waits_before_a_rate_is_known_or_when_waiting_is_off() {
        let start = Instant::now();
        let mut linger = Linger::starting_at(FIVE_MS, start);
        linger.record(1, start);
        assert_eq!(linger.wait(), None);

        let mut off = Linger::starting_at(Duration::ZERO, start);
        feed(&mut off, start, 10_000, 10, 2);
        assert_eq!(off.wait(), None);
    }

    #[test]
    fn a_busy_stream_waits_and_a_quiet_one_does_not() {
        let start = Instant::now();
        // 600 entries/s: three expected within 5 ms.
        let mut busy = Linger::starting_at(FIVE_MS, start);
        feed(&mut busy, start, 600, 2, 2);
        assert_eq!(busy.wait(), Some(FIVE_MS));

        // 50 entries/s: a quarter of an entry expected within 5 ms.
        let mut quiet = Linger::starting_at(FIVE_MS, start);
        feed(&mut quiet, start, 50, 1, 2);
        assert_eq!(quiet.wait(), None);
    }

    #[test]
    fn a_stream_that_went_quiet_stops_waiting_at_its_next_read() {
        let start = Instant::now();
        let mut linger = Linger::starting_at(FIVE_MS, start);
        feed(&mut linger, start, 1_000, 5, 2);
        assert_eq!(linger.wait(), Some(FIVE_MS));
        // Ten quiet seconds, then one entry: the rate spreads over the gap.
        linger.record(1, start + Duration::from_secs(12));
        assert_eq!(linger.wait(), None);
    }
}
