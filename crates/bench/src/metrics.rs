//! Timing breakdowns from the services' own Prometheus `/metrics`: scraped before and after a
//! measured interval, the difference of `<name>_sum` and `<name>_count` gives the mean of a
//! histogram or summary over exactly that interval (e.g. how long a group commit took and how
//! many commands shared it), and the difference of a counter how often something happened.

use std::collections::BTreeMap;

use anyhow::Context;

/// Histograms (or summaries) of the command service whose interval means explain a command's
/// latency: time in the commit, requests per group commit, whole command handling.
pub const COMMAND_HISTOGRAMS: [&str; 3] = [
    "event_store_commit_seconds",
    "event_store_batch_requests",
    "command_duration_seconds",
];

/// The breakdown key of the mean requests per group commit (from
/// `event_store_batch_requests`), which also sizes the ceiling's service-sized point.
pub const BATCH_REQUESTS_MEAN: &str = "event_store_batch_requests mean";

/// Counters of the command service worth reporting per interval.
pub const COMMAND_COUNTERS: [&str; 1] = ["command_retries_total"];

/// Histograms of the query service: how long read-your-writes requests waited.
pub const QUERY_HISTOGRAMS: [&str; 1] = ["query_consistency_wait_seconds"];

/// Counters of the projector that tell whether its sweeper did the consumers' work during a
/// scenario: events it applied itself from the event store, and events found applied already
/// (by a consumer, each one the sweeper took first; or by the sweeper's heals, each one a
/// consumer had applied): both mean the two overlapped.
pub const PROJECTOR_COUNTERS: [&str; 2] = [
    "projector_sweeper_healed_events_total",
    "projector_duplicates_total",
];

/// One scrape: every sample summed over its labels, by metric name.
pub type Scrape = BTreeMap<String, f64>;

/// Fetches and parses `<base>/metrics`.
pub async fn scrape(client: &reqwest::Client, base: &str) -> anyhow::Result<Scrape> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .context("GET /metrics")?
        .error_for_status()
        .context("GET /metrics")?
        .text()
        .await
        .context("read /metrics")?;
    Ok(parse(&text))
}

/// Parses Prometheus text format, summing each name over its label sets.
pub fn parse(text: &str) -> Scrape {
    let mut samples = Scrape::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(parts) => parts,
            None => continue,
        };
        let name = series.split('{').next().unwrap_or(series).trim();
        // Quantile lines of a summary are not additive across label sets; keep only the rest.
        if series.contains("quantile=") {
            continue;
        }
        if let Ok(value) = value.trim().parse::<f64>() {
            *samples.entry(name.to_owned()).or_default() += value;
        }
    }
    samples
}

/// Interval figures between two scrapes: `<histogram> mean` (seconds shown in ms) and
/// `<histogram> count` per histogram, and the increase of each counter.
pub fn breakdown(
    before: &Scrape,
    after: &Scrape,
    histograms: &[&str],
    counters: &[&str],
) -> BTreeMap<String, f64> {
    let delta = |key: &str| {
        after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
    };
    let mut out = BTreeMap::new();
    for name in histograms {
        let count = delta(&format!("{name}_count"));
        if count <= 0.0 {
            continue;
        }
        let mean = delta(&format!("{name}_sum")) / count;
        if let Some(base) = name.strip_suffix("_seconds") {
            out.insert(format!("{base} mean ms"), mean * 1000.0);
        } else {
            out.insert(format!("{name} mean"), mean);
        }
        out.insert(format!("{name} count"), count);
    }
    for name in counters {
        out.insert((*name).to_owned(), delta(name));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_means_come_from_sum_and_count_differences_across_labels() {
        let before = parse(
            "# TYPE event_store_commit_seconds summary\n\
             event_store_commit_seconds{quantile=\"0.5\"} 0.002\n\
             event_store_commit_seconds_sum 1.0\n\
             event_store_commit_seconds_count 100\n\
             command_retries_total{command=\"AddItem\"} 3\n",
        );
        let after = parse(
            "event_store_commit_seconds_sum 3.0\n\
             event_store_commit_seconds_count 300\n\
             command_retries_total{command=\"AddItem\"} 5\n\
             command_retries_total{command=\"PlaceOrder\"} 1\n",
        );
        let figures = breakdown(
            &before,
            &after,
            &["event_store_commit_seconds"],
            &["command_retries_total"],
        );
        assert_eq!(figures.get("event_store_commit mean ms"), Some(&10.0));
        assert_eq!(
            figures.get("event_store_commit_seconds count"),
            Some(&200.0)
        );
        assert_eq!(figures.get("command_retries_total"), Some(&3.0));
    }
}
