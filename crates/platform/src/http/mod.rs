//! The standard middleware stack every service puts around its router, plus request identity.
//!
//! [`standard_layers`] adds, from the outside in: the `x-request-id` (made when absent, echoed on
//! the response), the [`RequestContext`] (correlation id, trace context, actor), a trace span
//! carrying `method`, `route`, `request_id`, `correlation_id`, `trace_id` and, on an error
//! answer, its `problem` code, the HTTP metrics,
//! the load shedder (503 `overloaded` beyond [`HttpLimits::max_in_flight`] requests at once), the
//! panic catcher (500 `internal`), the request timeout (503 `timeout`) and the body limit
//! (413 `payload_too_large`). Every error it produces is a [`Problem`].
//!
//! With OpenTelemetry export on ([`crate::otel`]), the request span's OTel parent is the client's
//! valid `traceparent`, and the [`RequestContext`]'s `traceparent` is rewritten to name the request
//! span, so work carried on from the request (event metadata, the projector) joins its trace.

mod context;
pub mod cors;
mod traceparent;

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::{Level, Span};

pub use context::{
    ACTOR_HEADER, CORRELATION_ID_HEADER, MAX_ID_LEN, REQUEST_ID_HEADER, RequestContext,
    TRACEPARENT_HEADER,
};
pub use traceparent::{TraceParent, parse_traceparent};

use crate::extract::payload_too_large;
use crate::problem::{Problem, ProblemCode};

/// Default body limit: commands are small JSON documents; 64 KiB leaves ample room.
pub const DEFAULT_BODY_LIMIT_BYTES: usize = 64 * 1024;
/// Default request timeout: well above a normal command (retries included), below a proxy's.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on requests served at once by one instance. Each holds at most a body
/// ([`DEFAULT_BODY_LIMIT_BYTES`]) and a task, so this bounds the memory a flood can take (about
/// 64 MiB of bodies) while sitting far above what an instance completes in a request's time.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// `Retry-After` seconds of a shed request.
pub const OVERLOADED_RETRY_AFTER_SECS: u64 = 1;
/// Routes never shed, the ones `health::health_router` serves: probes and scrapes must answer
/// while an instance is saturated, or the orchestrator would restart (or the monitoring lose
/// sight of) the instances under load.
pub const UNSHED_PATHS: [&str; 3] = crate::health::PATHS;
/// `route` label and span field for requests that matched no route, so scans of random paths
/// cannot blow up the metric's cardinality.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Limits applied by [`standard_layers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Largest accepted request body; larger ones get 413 `payload_too_large`.
    pub body_limit_bytes: usize,
    /// Longest a request may take; slower ones get 503 `timeout`.
    pub request_timeout: Duration,
    /// Most requests served at once (outside [`UNSHED_PATHS`]); more get 503 `overloaded` with
    /// `Retry-After` at once, rather than queueing until they time out.
    pub max_in_flight: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            body_limit_bytes: DEFAULT_BODY_LIMIT_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// Wraps `router` in the standard layers (see the module docs). Call it on the complete router,
/// after `with_state`, so every route, the fallback and the health routes get them.
///
/// Metrics carry the `service` label set by `metrics::install`.
pub fn standard_layers(router: Router, limits: HttpLimits) -> Router {
    // `Router::layer` wraps what is already there, so the last layer added runs first.
    router
        .layer(DefaultBodyLimit::max(limits.body_limit_bytes))
        .layer(middleware::from_fn_with_state(
            limits.body_limit_bytes,
            reject_large_content_length,
        ))
        .layer(middleware::from_fn_with_state(
            limits.request_timeout,
            enforce_timeout,
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(
            InFlight::new(limits.max_in_flight),
            shed_load,
        ))
        .layer(middleware::from_fn(record_metrics))
        .layer(middleware::from_fn(adopt_otel_context))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(make_span)
                .on_response(DefaultOnResponse::new().level(Level::INFO))
                // A 5xx answer's own line is debug: the response line above (INFO) already
                // gives every status, most 5xx are the service working as meant (503
                // `overloaded`, `consistency_timeout`, `store_unavailable`, which a client can
                // cause at will, and which outage logs and metrics report), and what is a fault
                // (a 500) is logged at ERROR with its cause where it is made.
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        .layer(middleware::from_fn(context::insert_context))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// The request span: every log line of the request carries these fields.
fn make_span(req: &Request) -> Span {
    let route = route_of(req);
    let (request_id, correlation_id, trace_id) = match req.extensions().get::<RequestContext>() {
        Some(ctx) => (
            ctx.request_id.as_str(),
            ctx.correlation_id.as_str(),
            ctx.trace_id.as_str(),
        ),
        None => ("", "", ""),
    };
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        route = %route,
        path = %req.uri().path(),
        request_id = %request_id,
        correlation_id = %correlation_id,
        // Recorded below, once it is known whether OpenTelemetry picks the trace id.
        trace_id = tracing::field::Empty,
        // The problem code of an error answer (`record_metrics`), so the request's closing log
        // line says which failure it was, not only its status.
        problem = tracing::field::Empty,
    );
    // A valid incoming `traceparent` is the OTel parent, so an upstream trace continues here.
    // Only the client's own header counts: a generated context names no real span. Without the
    // OTel layer this is a parse and a failed downcast.
    let incoming = req
        .headers()
        .get(TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    match incoming {
        Some(parent) => {
            crate::otel::set_remote_parent_of(&span, &parent);
            span.record("trace_id", parent.trace_id());
        }
        // A root span: with OTel its trace id is the one exported, so logs show that one
        // (`adopt_otel_context` puts it in the request context too).
        None => {
            match crate::otel::traceparent_of(&span) {
                Some(own) => span.record("trace_id", own.trace_id()),
                None => span.record("trace_id", trace_id),
            };
        }
    }
    span
}

/// With OTel export on, points the [`RequestContext`] at the request span itself: its
/// `traceparent` (recorded in event metadata, continued by the projector) becomes
/// `<trace id>-<request span id>`, and when the client sent no valid `traceparent` the OTel
/// trace id replaces the generated one (as it did in the span's `trace_id` field, see
/// `make_span`), so logs, event metadata and exported traces agree. Without OTel the context is
/// left as it is.
async fn adopt_otel_context(mut req: Request, next: Next) -> Response {
    let span = Span::current();
    if let Some(own) = crate::otel::traceparent_of(&span)
        && let Some(ctx) = req.extensions_mut().get_mut::<RequestContext>()
    {
        ctx.trace_id = own.trace_id().to_owned();
        ctx.traceparent = own.to_string();
    }
    next.run(req).await
}

fn route_of(req: &Request) -> String {
    req.extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned())
}

/// Bounded method label: unknown methods are folded into `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Records `http_requests_total{method,route,status}` and
/// `http_request_duration_seconds{method,route}`, and the problem code of an error answer in
/// the request span.
async fn record_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = route_of(&req);
    let response = next.run(req).await;
    if let Some(code) = response.extensions().get::<ProblemCode>() {
        Span::current().record("problem", code.as_str());
    }
    let status = response.status().as_u16().to_string();
    ::metrics::counter!(
        "http_requests_total",
        "method" => method,
        "route" => route.clone(),
        "status" => status
    )
    .increment(1);
    ::metrics::histogram!(
        "http_request_duration_seconds",
        "method" => method,
        "route" => route
    )
    .record(start.elapsed().as_secs_f64());
    response
}

/// Requests refused at the in-flight limit (counter).
pub const SHED_TOTAL: &str = "http_requests_shed_total";

/// Shortest time between two warnings about shed requests: a flood is one log line a second,
/// and `http_requests_shed_total` counts every request.
const SHED_WARNING_INTERVAL: Duration = Duration::from_secs(1);

/// The requests being served, against their bound.
#[derive(Clone)]
struct InFlight {
    permits: Arc<Semaphore>,
    limit: usize,
    /// When the next warning may be logged, in ms since `since`.
    next_warning_ms: Arc<AtomicU64>,
    since: Instant,
}

impl InFlight {
    fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        // At zero from the start, so that `rate()` sees the first shed request too.
        ::metrics::counter!(SHED_TOTAL).increment(0);
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            next_warning_ms: Arc::new(AtomicU64::new(0)),
            since: Instant::now(),
        }
    }

    /// Counts a shed request and warns, at most once per [`SHED_WARNING_INTERVAL`].
    fn record_shed(&self) {
        ::metrics::counter!(SHED_TOTAL).increment(1);
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_warning_ms.load(Ordering::Relaxed);
        let interval = u64::try_from(SHED_WARNING_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if now >= next
            && self
                .next_warning_ms
                .compare_exchange(
                    next,
                    now.saturating_add(interval),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            tracing::warn!(
                limit = self.limit,
                "shedding requests: MAX_IN_FLIGHT_REQUESTS are in flight (http_requests_shed_total counts them)"
            );
        }
    }
}

/// Serves a request while fewer than the limit are being served; otherwise answers 503
/// `overloaded` with `Retry-After` at once (counted in `http_requests_shed_total`), so a burst
/// beyond capacity is refused quickly instead of holding memory until it times out.
async fn shed_load(State(in_flight): State<InFlight>, req: Request, next: Next) -> Response {
    if UNSHED_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let Ok(_permit) = in_flight.permits.clone().try_acquire_owned() else {
        in_flight.record_shed();
        return Problem::unavailable("overloaded", OVERLOADED_RETRY_AFTER_SECS)
            .with_detail(format!(
                "this instance is serving its limit of {} requests at once \
                 (MAX_IN_FLIGHT_REQUESTS); retry shortly",
                in_flight.limit
            ))
            .into_response();
    };
    next.run(req).await
}

/// Answers 503 `timeout` when the inner service takes longer than the limit.
async fn enforce_timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(timeout_ms = limit.as_millis() as u64, "request timed out");
            Problem::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "timeout")
                .with_detail(format!(
                    "the request did not complete within {} ms",
                    limit.as_millis()
                ))
                .into_response()
        }
    }
}

/// Rejects a declared `Content-Length` above the limit before reading the body; bodies without
/// one are capped by `DefaultBodyLimit` when an extractor reads them.
async fn reject_large_content_length(
    State(limit): State<usize>,
    req: Request,
    next: Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit as u64 => payload_too_large().into_response(),
        _ => next.run(req).await,
    }
}

/// 500 `internal` for a panicking handler; the panic message is logged, never sent.
fn panic_response(err: Box<dyn Any + Send + 'static>) -> Response {
    let message = if let Some(s) = err.downcast_ref::<String>() {
        s.as_str()
    } else if let Some(s) = err.downcast_ref::<&str>() {
        s
    } else {
        "unknown panic payload"
    };
    tracing::error!(panic = %message, "handler panicked");
    Problem::internal().into_response()
}
