//! The process-wide Prometheus recorder and the `/metrics` endpoint.
//!
//! A process installs one global recorder; tests start many apps in one process, so
//! [`install`] keeps the first handle in a `OnceLock` and hands out clones. The `service` given
//! to the first call becomes a global label on every metric of the process. This module never
//! opens a listener of its own: `/metrics` is served by `health::health_router`.
//!
//! The recorder keeps every histogram sample in a buffer until upkeep folds it into the
//! buckets. [`install`] starts a thread that does so every [`UPKEEP_INTERVAL`], so memory stays
//! bounded whether or not anything scrapes `/metrics` (a few samples per command, 8 bytes each,
//! would otherwise grow by tens of MB a minute under load).

use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Histogram buckets (seconds) for every metric whose name ends in `_seconds`: 0.1 ms to 10 s,
/// roughly ×2.5 apart, so both a cache hit and a slow projection land in a useful bucket.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Histogram buckets for a count of things per operation (how many appends shared one group
/// commit): powers of two from 1 to 1024, past the committer's largest batch (256 by default).
pub const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// The histograms that measure counts rather than seconds, each given [`COUNT_BUCKETS`]. The
/// exporter renders a histogram it has no buckets for as a summary (quantiles of this process
/// alone, which cannot be added up across instances), so every histogram whose name does not end
/// in `_seconds` must be listed here; a test checks the services' `/metrics` has no summary.
pub const COUNT_HISTOGRAMS: &[&str] = &["event_store_batch_requests"];

/// How often histogram buffers are folded into their buckets (the exporter's own default).
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder on the first call and returns its handle; later calls
/// return the same handle (and ignore their `service`).
///
/// `service` (e.g. `command-service`) is added as the `service` label to every metric.
pub fn install(service: &'static str) -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = match with_buckets(PrometheusBuilder::new()) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot set histogram buckets; using summaries");
                    PrometheusBuilder::new()
                }
            };
            let builder = builder.add_global_label("service", service);
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if let Err(e) = ::metrics::set_global_recorder(recorder) {
                // Another recorder was installed by someone else: keep serving an empty page
                // rather than failing the service.
                tracing::warn!(error = %e, "a metrics recorder is already installed");
            }
            spawn_upkeep(handle.clone(), UPKEEP_INTERVAL);
            handle
        })
        .clone()
}

/// `builder` with the buckets of every histogram of the services: [`LATENCY_BUCKETS_SECONDS`] for
/// names ending in `_seconds`, [`COUNT_BUCKETS`] for the [`COUNT_HISTOGRAMS`]. (A full-name
/// match wins over a suffix match.)
fn with_buckets(
    builder: PrometheusBuilder,
) -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    let mut builder = builder
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS)?;
    for name in COUNT_HISTOGRAMS {
        builder = builder.set_buckets_for_metric(Matcher::Full((*name).into()), COUNT_BUCKETS)?;
    }
    Ok(builder)
}

/// Runs `handle`'s upkeep every `every` on a thread of its own for the rest of the process: a
/// plain thread, so it needs no runtime and outlives any one of them (tests start many).
pub fn spawn_upkeep(handle: PrometheusHandle, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        // Scrapes still run upkeep; only an unscraped process would keep the samples.
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
    }
}

/// Renders the Prometheus text page (`GET /metrics`).
pub async fn metrics_handler(State(handle): State<PrometheusHandle>) -> Response {
    // Fold what arrived since the last upkeep, so the page is current.
    handle.run_upkeep();
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], handle.render()).into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn install_returns_the_same_recorder_twice() {
        let a = install("test");
        let b = install("other");
        ::metrics::counter!("platform_test_total").increment(1);
        assert!(a.render().contains("platform_test_total"));
        assert!(b.render().contains("service=\"test\""));
    }

    #[test]
    fn a_count_histogram_is_rendered_with_buckets_not_as_a_summary() {
        let recorder = with_buckets(PrometheusBuilder::new())
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            ::metrics::histogram!("event_store_batch_requests").record(3.0);
            ::metrics::histogram!("platform_test_seconds").record(0.002);
        });
        handle.run_upkeep();
        let page = handle.render();
        assert!(
            page.contains("event_store_batch_requests_bucket{le=\"4\"} 1"),
            "{page}"
        );
        assert!(
            page.contains("platform_test_seconds_bucket{le=\"0.0025\"} 1"),
            "{page}"
        );
        assert!(!page.contains("quantile="), "{page}");
    }
}
