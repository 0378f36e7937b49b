//! Latency recording: an HdrHistogram of microseconds per measured series, summarised as
//! count, mean, p50/p95/p99 and max in milliseconds. Histograms have a fixed size (bounded
//! memory, however long a run is).

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded exactly; longer ones are clamped (a minute is already a failure).
const MAX_TRACKED_MICROS: u64 = 60_000_000;

/// Significant figures kept by the histogram: 0.1% relative error.
const SIGNIFICANT_FIGURES: u8 = 3;

/// One series of latencies.
#[derive(Debug, Clone)]
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Latencies {
    /// An empty series. Fails only if the histogram bounds above were invalid.
    pub fn new() -> anyhow::Result<Self> {
        let histogram = Histogram::new_with_bounds(1, MAX_TRACKED_MICROS, SIGNIFICANT_FIGURES)
            .map_err(|e| anyhow::anyhow!("create a latency histogram: {e}"))?;
        Ok(Self { histogram })
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram
            .saturating_record(micros.clamp(1, MAX_TRACKED_MICROS));
    }

    /// Adds another series into this one.
    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so adding cannot fail; a failure would only lose samples.
        let _ = self.histogram.add(&other.histogram);
    }

    /// Number of recorded latencies.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The summary in milliseconds.
    pub fn summary(&self) -> LatencySummary {
        let ms = |micros: u64| micros as f64 / 1000.0;
        if self.histogram.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.histogram.len(),
            mean_ms: self.histogram.mean() / 1000.0,
            p50_ms: ms(self.histogram.value_at_quantile(0.50)),
            p95_ms: ms(self.histogram.value_at_quantile(0.95)),
            p99_ms: ms(self.histogram.value_at_quantile(0.99)),
            max_ms: ms(self.histogram.max()),
        }
    }
}

/// A latency series summarised, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// `count` events over `elapsed`, per second (0 for an empty interval).
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        0.0
    } else {
        count as f64 / secs
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_series_are_reported_in_milliseconds() {
        let mut series = Latencies::new().unwrap();
        for ms in 1..=100 {
            series.record(Duration::from_millis(ms));
        }
        let summary = series.summary();
        assert_eq!(summary.count, 100);
        assert!((summary.p50_ms - 50.0).abs() < 0.1, "{summary:?}");
        assert!((summary.p99_ms - 99.0).abs() < 0.1, "{summary:?}");
        assert!((summary.max_ms - 100.0).abs() < 0.1, "{summary:?}");
    }

    #[test]
    fn merging_two_series_counts_both() {
        let mut a = Latencies::new().unwrap();
        let mut b = Latencies::new().unwrap();
        a.record(Duration::from_millis(1));
        b.record(Duration::from_millis(2));
        a.merge(&b);
        assert_eq!(a.count(), 2);
    }

    #[test]
    fn an_empty_series_summarises_to_zeroes_and_a_zero_interval_to_no_rate() {
        assert_eq!(
            Latencies::new().unwrap().summary(),
            LatencySummary::default()
        );
        assert_eq!(rate(10, Duration::ZERO), 0.0);
    }
}
