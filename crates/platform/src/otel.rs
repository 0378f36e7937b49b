//! OpenTelemetry trace export: OTLP over HTTP/protobuf, switched on by the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
//!
//! Owns the configuration read from the environment ([`otel_config_from_env`]), the
//! `tracing-opentelemetry` layer with its batch span processor ([`layer_for`]), the guard that
//! flushes pending spans ([`OtelGuard`]) and the bridge between our W3C `traceparent` strings and
//! OpenTelemetry parents ([`set_remote_parent`], [`traceparent_of`]).
//!
//! When the variables are absent nothing here runs: no thread, no client, no layer. The export
//! never blocks the application: spans are queued in memory (bounded by the SDK's
//! `OTEL_BSP_MAX_QUEUE_SIZE`, 2048 by default; extra spans are dropped) and sent from the batch
//! processor's own thread. The HTTP client is the workspace's reqwest 0.12 driven by a private
//! single-threaded tokio runtime on its own thread, so export works whatever runtime (or none)
//! the caller has, and shutting down from inside the application's runtime cannot deadlock.
//! (`opentelemetry-http`'s own reqwest feature would pull reqwest 0.13 and, with rustls, aws-lc-rs
//! beside the ring that sqlx uses: see ECOSYSTEM.md.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::{
    SpanContext, TraceContextExt as _, TraceFlags, TraceState, TracerProvider as _,
};
use opentelemetry::{SpanId, TraceId};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt as _};
use tracing_subscriber::registry::LookupSpan;

use crate::http::{TraceParent, parse_traceparent};

/// Standard base endpoint of an OTLP collector (`http://host:4318`); traces go to
/// `<endpoint>/v1/traces`.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// Standard full URL for traces; overrides [`OTLP_ENDPOINT_ENV`] and is used as is.
pub const OTLP_TRACES_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// Standard `service.name` of the exported spans; defaults to the binary's name.
pub const SERVICE_NAME_ENV: &str = "OTEL_SERVICE_NAME";
/// Our own: an `EnvFilter` directive string choosing which spans are exported, independent of
/// `RUST_LOG` (which filters the log lines only).
pub const TRACES_FILTER_ENV: &str = "OTEL_TRACES_FILTER";
/// Spans exported when [`TRACES_FILTER_ENV`] is unset: the request and `apply_event` spans are
/// at info; debug spans would multiply the volume for little insight.
pub const DEFAULT_TRACES_FILTER: &str = "info";
/// Path appended to [`OTLP_ENDPOINT_ENV`], as the OTLP/HTTP specification says.
pub const TRACES_PATH: &str = "/v1/traces";
/// `service.name` when the binary's name cannot be found.
pub const UNKNOWN_SERVICE: &str = "unknown_service";
/// Longest one export request may take; a slow collector then loses a batch rather than
/// growing the queue behind it.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest collector response body read; OTLP responses are tiny (a partial-success message).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Instrumentation scope name of the spans we export.
pub const INSTRUMENTATION_SCOPE: &str = "platform";

/// Set once [`crate::telemetry::init`] installed the OTel layer globally.
static EXPORT_ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported by this process (the global subscriber has the OTel layer).
/// Hot paths use it to skip building spans that only OpenTelemetry would read.
pub fn export_enabled() -> bool {
    EXPORT_ENABLED.load(Ordering::Relaxed)
}

pub(crate) fn mark_export_enabled() {
    EXPORT_ENABLED.store(true, Ordering::Relaxed);
}

/// Trace export settings, read from the standard OpenTelemetry variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtelConfig {
    /// Full URL that receives `POST` OTLP/protobuf trace batches.
    pub traces_endpoint: String,
    /// `service.name` resource attribute.
    pub service_name: String,
    /// `EnvFilter` directives for the exported spans.
    pub filter: String,
}

/// The export settings from the process environment; `None` (export off) unless
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set and non-empty.
pub fn otel_config_from_env() -> Option<OtelConfig> {
    otel_config_from(|name| std::env::var(name).ok())
}

/// [`otel_config_from_env`] over any variable lookup (tests pass a map; changing the real
/// environment is unsafe in a multi-threaded test binary). Empty values count as unset, as the
/// OpenTelemetry specification asks.
pub fn otel_config_from(lookup: impl Fn(&str) -> Option<String>) -> Option<OtelConfig> {
    let var = |name: &str| {
        lookup(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let traces_endpoint = match var(OTLP_TRACES_ENDPOINT_ENV) {
        Some(url) => url,
        None => format!(
            "{}{TRACES_PATH}",
            var(OTLP_ENDPOINT_ENV)?.trim_end_matches('/')
        ),
    };
    Some(OtelConfig {
        traces_endpoint,
        service_name: var(SERVICE_NAME_ENV).unwrap_or_else(binary_name),
        filter: var(TRACES_FILTER_ENV).unwrap_or_else(|| DEFAULT_TRACES_FILTER.to_owned()),
    })
}

/// The running executable's file name, the default `service.name`.
fn binary_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|path| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| UNKNOWN_SERVICE.to_owned())
}

/// Why the export pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    /// The exporter rejected its configuration (a malformed endpoint, an unknown protocol in
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, …).
    #[error("cannot build the OTLP span exporter: {0}")]
    Exporter(String),
    /// The HTTP client or its thread could not be created.
    #[error("cannot start the OTLP HTTP client: {0}")]
    Client(String),
}

/// Owns the tracer provider: flushes and stops the batch span processor when dropped (or on
/// [`OtelGuard::shutdown`]), so spans still queued at exit are sent.
#[derive(Debug)]
#[must_use = "dropping the guard shuts the span export down"]
pub struct OtelGuard {
    provider: Option<SdkTracerProvider>,
}

impl OtelGuard {
    /// Sends every span queued so far and waits for the export (bounded by
    /// [`EXPORT_TIMEOUT`]). Blocks the calling thread.
    pub fn force_flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.force_flush()
        {
            eprintln!("warning: OpenTelemetry span flush failed: {e}");
        }
    }

    /// Flushes the pending spans and stops the batch processor. Blocks the calling thread for at
    /// most about [`EXPORT_TIMEOUT`].
    pub fn shutdown(mut self) {
        self.shutdown_now();
    }

    fn shutdown_now(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown_with_timeout(EXPORT_TIMEOUT)
        {
            // The subscriber may already be torn down at this point: say it on stderr.
            eprintln!("warning: OpenTelemetry span export shutdown failed: {e}");
        }
    }
}

impl Drop for OtelGuard {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

/// A tracer provider exporting to `traces_endpoint` (full URL, `…/v1/traces`) with a batch span
/// processor, and the `tracing` layer that feeds it. The layer has no filter: the caller adds
/// one (`telemetry::init` uses [`OtelConfig::filter`]). Remaining standard variables
/// (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_*`, `OTEL_RESOURCE_ATTRIBUTES`, …) are honoured by
/// the SDK.
pub fn layer_for<S>(
    traces_endpoint: &str,
    service_name: &str,
) -> Result<(OpenTelemetryLayer<S, SdkTracer>, OtelGuard), OtelError>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(ExportClient::start()?)
        .with_endpoint(traces_endpoint)
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| OtelError::Exporter(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(INSTRUMENTATION_SCOPE));
    Ok((
        layer,
        OtelGuard {
            provider: Some(provider),
        },
    ))
}

/// Makes `traceparent` (a W3C value, e.g. from a request header or event metadata) the
/// OpenTelemetry parent of `span`, so the span continues that trace. Call it right after
/// creating the span, before entering it. Returns whether it took effect: `false` for an invalid
/// value, or when no OTel layer sees the span (export off: then it costs a parse and a
/// downcast, nothing more).
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) -> bool {
    let Some(parent) = parse_traceparent(traceparent) else {
        return false;
    };
    set_remote_parent_of(span, &parent)
}

/// [`set_remote_parent`] with an already parsed value.
pub fn set_remote_parent_of(span: &tracing::Span, parent: &TraceParent) -> bool {
    let (Ok(trace_id), Ok(span_id)) = (
        TraceId::from_hex(parent.trace_id()),
        SpanId::from_hex(parent.parent_id()),
    ) else {
        return false;
    };
    let remote = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(parent.flags()),
        true,
        TraceState::NONE,
    );
    let cx = opentelemetry::Context::new().with_remote_span_context(remote);
    span.set_parent(cx).is_ok()
}

/// The `traceparent` naming `span` itself in OpenTelemetry (its trace id and its own span id),
/// for handing on to whatever continues the work (event metadata, outgoing requests); `None`
/// when no OTel layer sees the span. Starts the OTel span, so set its parent first.
pub fn traceparent_of(span: &tracing::Span) -> Option<TraceParent> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return None;
    }
    parse_traceparent(&format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    ))
}

/// The OTLP HTTP client: reqwest 0.12 (rustls) driven by a private current-thread runtime.
///
/// The SDK's batch processor runs exports on its own thread with a plain `block_on`, where
/// reqwest's async client would find no tokio reactor; so each request is spawned onto our
/// runtime and its `JoinHandle` awaited instead.
#[derive(Debug)]
struct ExportClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    /// Dropping it (with the exporter) lets the runtime's thread end.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ExportClient {
    fn start() -> Result<Self, OtelError> {
        let client = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| OtelError::Client(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| OtelError::Client(e.to_string()))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("otel-export".to_owned())
            .spawn(move || {
                // Runs the spawned requests until the client is dropped.
                let _ = runtime.block_on(stopped);
            })
            .map_err(|e| OtelError::Client(e.to_string()))?;
        Ok(Self {
            client,
            runtime: handle,
            _stop: stop,
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let request = self
            .client
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .build()?;
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let mut response = client.execute(request).await?;
            let mut builder = Response::builder().status(response.status());
            if let Some(headers) = builder.headers_mut() {
                *headers = std::mem::take(response.headers_mut());
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err::<_, HttpError>("OTLP collector response too large".into());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(builder.body(Bytes::from(body))?)
        });
        task.await?
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Option<OtelConfig> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        otel_config_from(|name| vars.get(name).cloned())
    }

    #[test]
    fn no_endpoint_means_no_export() {
        assert_eq!(config(&[]), None);
        assert_eq!(config(&[(OTLP_ENDPOINT_ENV, "  ")]), None);
        assert_eq!(config(&[(SERVICE_NAME_ENV, "svc")]), None);
    }

    #[test]
    fn the_base_endpoint_gets_the_traces_path() {
        let c = config(&[(OTLP_ENDPOINT_ENV, "http://collector:4318/")]).unwrap();
        assert_eq!(c.traces_endpoint, "http://collector:4318/v1/traces");
        assert_eq!(c.filter, DEFAULT_TRACES_FILTER);
        assert!(!c.service_name.is_empty());
    }

    #[test]
    fn the_traces_endpoint_wins_and_is_used_as_is() {
        let c = config(&[
            (OTLP_ENDPOINT_ENV, "http://collector:4318"),
            (OTLP_TRACES_ENDPOINT_ENV, "http://other:9999/custom"),
            (SERVICE_NAME_ENV, "command-service"),
            (TRACES_FILTER_ENV, "debug"),
        ])
        .unwrap();
        assert_eq!(c.traces_endpoint, "http://other:9999/custom");
        assert_eq!(c.service_name, "command-service");
        assert_eq!(c.filter, "debug");
    }

    #[test]
    fn without_an_otel_layer_nothing_is_parented() {
        let span = tracing::info_span!("x");
        assert!(!set_remote_parent(
            &span,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!set_remote_parent(&span, "garbage"));
        assert_eq!(traceparent_of(&span), None);
    }
}
