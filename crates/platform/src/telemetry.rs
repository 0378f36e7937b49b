//! The process-wide tracing subscriber, and OpenTelemetry trace export when configured.
//!
//! `RUST_LOG` (a setting of every binary, [`crate::config::CommonArgs::rust_log`]) picks what is
//! logged (default [`DEFAULT_FILTER`]); the filter sits on the fmt layer,
//! not on the registry, because a global `warn` filter would also disable the request spans that
//! carry `request_id`, `correlation_id` and `trace_id` for any other layer. Logs go to stderr so
//! that admin subcommands can keep stdout for their own output.
//!
//! When `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, a second
//! layer exports spans over OTLP/HTTP (see [`crate::otel`]) with its own filter
//! (`OTEL_TRACES_FILTER`, default `info`), and the W3C Trace Context propagator is installed
//! globally. Without it nothing OpenTelemetry is created.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;
use crate::otel::{self, OtelGuard};

/// Filter used when `RUST_LOG` is unset: our own info lines, only sqlx warnings (sqlx logs
/// every statement at info).
pub const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// Parses a `RUST_LOG` value, naming the setting on failure.
pub fn log_filter(directives: &str) -> anyhow::Result<EnvFilter> {
    EnvFilter::builder()
        .parse(directives)
        .map_err(|e| anyhow::anyhow!("invalid RUST_LOG: {e}"))
}

/// Keeps span export alive: hold it for the life of `main` and drop it (or call
/// [`TelemetryGuard::shutdown`]) after the graceful shutdown, so queued spans are sent. Without
/// OTel export it holds nothing.
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops span export; bind it with `let _telemetry = …`"]
pub struct TelemetryGuard {
    otel: Option<OtelGuard>,
}

impl TelemetryGuard {
    /// Whether this process exports spans.
    pub fn exporting(&self) -> bool {
        self.otel.is_some()
    }

    /// Flushes pending spans and stops the exporter (blocks for at most about
    /// [`otel::EXPORT_TIMEOUT`]). Dropping the guard does the same.
    pub fn shutdown(self) {
        if let Some(otel) = self.otel {
            otel.shutdown();
        }
    }
}

/// Installs the global subscriber with the `RUST_LOG` environment variable's filter (the
/// default when it is unset or does not parse). Binaries take `RUST_LOG` as a setting and call
/// [`init_with_filter`] instead.
pub fn init(format: LogFormat) -> TelemetryGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    init_with_filter(format, filter)
}

/// Installs the global subscriber, writing the log lines `filter` selects. Safe to call more
/// than once (tests do): later calls keep the first subscriber and return an empty guard.
///
/// A broken OTel configuration (e.g. a malformed endpoint) does not stop the service: logging
/// starts without export and the problem is logged as an error.
pub fn init_with_filter(format: LogFormat, filter: EnvFilter) -> TelemetryGuard {
    let fmt_layer = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            // The whole span list, not just the current span: a handler's own child span must
            // not hide the request span's ids.
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };

    let mut otel_error = None;
    let (otel_layer, otel_guard) = match otel::otel_config_from_env() {
        None => (None, None),
        Some(config) => match otel::layer_for(&config.traces_endpoint, &config.service_name) {
            Ok((layer, guard)) => {
                // Its own filter: RUST_LOG=warn must not silence the exported spans, and a
                // verbose RUST_LOG must not flood the collector.
                let filter = EnvFilter::try_new(&config.filter)
                    .unwrap_or_else(|_| EnvFilter::new(otel::DEFAULT_TRACES_FILTER));
                (Some(layer.with_filter(filter)), Some((guard, config)))
            }
            Err(e) => {
                otel_error = Some(e);
                (None, None)
            }
        },
    };

    let installed = tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .is_ok();
    if let Some(e) = otel_error {
        tracing::error!(error = %e, "OpenTelemetry export disabled");
    }
    // An error only means a subscriber is already installed, which is what we want in tests;
    // the guard built for it is then dropped here, which stops its unused exporter.
    let Some((guard, config)) = otel_guard.filter(|_| installed) else {
        return TelemetryGuard::default();
    };
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    otel::mark_export_enabled();
    tracing::info!(endpoint = %config.traces_endpoint, service_name = %config.service_name,
        filter = %config.filter, "exporting spans with OTLP/HTTP");
    TelemetryGuard { otel: Some(guard) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn init_can_be_called_twice() {
        let _first = init(LogFormat::Json);
        let second = init(LogFormat::Pretty);
        assert!(!second.exporting());
        tracing::info!("still logging");
    }
}
