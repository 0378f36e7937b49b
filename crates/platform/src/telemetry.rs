//! The process-wide tracing subscriber.
//!
//! `RUST_LOG` picks what is logged (default [`DEFAULT_FILTER`]); the filter sits on the fmt layer,
//! not on the registry, because a global `warn` filter would also disable the request spans that
//! carry `request_id`, `correlation_id` and `trace_id` for any other layer. Logs go to stderr so
//! that admin subcommands can keep stdout for their own output.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Filter used when `RUST_LOG` is unset or invalid: our own info lines, only sqlx warnings
/// (sqlx logs every statement at info).
pub const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// Installs the global subscriber. Safe to call more than once (tests do): later calls keep the
/// first subscriber.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
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
    // An error only means a subscriber is already installed, which is what we want in tests.
    let _ = tracing_subscriber::registry().with(fmt_layer).try_init();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn init_can_be_called_twice() {
        init(LogFormat::Json);
        init(LogFormat::Pretty);
        tracing::info!("still logging");
    }
}
