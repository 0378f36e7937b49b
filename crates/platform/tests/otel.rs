//! OpenTelemetry export against a tiny in-process OTLP/HTTP collector (axum on 127.0.0.1:0)
//! that records the bodies POSTed to `/v1/traces` and decodes them as OTLP protobuf.
//!
//! Most tests install the layer from `otel::layer_for` with a thread-scoped subscriber, so they
//! run side by side in one process. The `telemetry::init` tests re-run this test binary as a
//! child process with the environment they need (`OTEL_EXPORTER_OTLP_ENDPOINT` set, or no
//! endpoint variable at all), because `init` installs the global subscriber once per process and
//! reads the developer's environment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span as OtlpSpan;
use platform::config::LogFormat;
use platform::http::{HttpLimits, RequestContext, TRACEPARENT_HEADER, standard_layers};
use platform::otel;
use platform::telemetry;
use platform::testing::LogBuffer;
use prost::Message as _;
use tower::ServiceExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

const REMOTE_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const REMOTE_PARENT_ID: &str = "00f067aa0ba902b7";
const REMOTE_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// How long a test waits for the collector to see a span.
const DEADLINE: Duration = Duration::from_secs(20);
/// Set in the child processes this test binary runs of itself (see [`run_child_test`]).
const CHILD_MARKER: &str = "PLATFORM_OTEL_TEST_CHILD";

/// One exported span with the resource it came with.
#[derive(Debug, Clone)]
struct Exported {
    service_name: Option<String>,
    span: OtlpSpan,
}

#[derive(Clone, Default)]
struct Collector {
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

impl Collector {
    async fn start() -> (Self, SocketAddr) {
        let collector = Collector::default();
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(collector.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (collector, addr)
    }

    fn spans(&self) -> Vec<Exported> {
        let bodies = self.bodies.lock().unwrap().clone();
        let mut out = Vec::new();
        for body in bodies {
            let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
            for resource_spans in request.resource_spans {
                let service_name = resource_spans.resource.as_ref().and_then(|r| {
                    r.attributes
                        .iter()
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                            Value::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                });
                for scope in resource_spans.scope_spans {
                    for span in scope.spans {
                        out.push(Exported {
                            service_name: service_name.clone(),
                            span,
                        });
                    }
                }
            }
        }
        out
    }

    /// Polls until a span named `name` arrived, up to [`DEADLINE`].
    async fn wait_for_span(&self, name: &str) -> Exported {
        let start = Instant::now();
        loop {
            if let Some(found) = self.spans().into_iter().find(|e| e.span.name == name) {
                return found;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no span {name:?} exported; got {:?}",
                self.spans()
                    .iter()
                    .map(|e| e.span.name.clone())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn receive(State(collector): State<Collector>, body: Bytes) -> &'static str {
    collector.bodies.lock().unwrap().push(body);
    ""
}

fn traces_url(addr: SocketAddr) -> String {
    format!("http://{addr}/v1/traces")
}

fn attribute(span: &OtlpSpan, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        })
}

/// Flushes on a blocking thread: the flush waits for the collector, which runs on this runtime.
async fn flush(guard: otel::OtelGuard) {
    tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_span_with_a_remote_traceparent_is_exported_in_that_trace() {
    let (collector, addr) = Collector::start().await;
    let (layer, guard) = otel::layer_for(&traces_url(addr), "otel-test").unwrap();
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("continued_work", answer = 42);
        assert!(otel::set_remote_parent(&span, REMOTE_TRACEPARENT));
        let own = otel::traceparent_of(&span).expect("an OTel context");
        assert_eq!(own.trace_id(), REMOTE_TRACE_ID);
        assert_ne!(own.parent_id(), REMOTE_PARENT_ID);
        span.in_scope(|| tracing::info!("inside"));
    });
    flush(guard).await;

    let exported = collector.wait_for_span("continued_work").await;
    assert_eq!(
        exported.span.trace_id,
        hex::decode(REMOTE_TRACE_ID).unwrap()
    );
    assert_eq!(
        exported.span.parent_span_id,
        hex::decode(REMOTE_PARENT_ID).unwrap()
    );
    assert_eq!(exported.service_name.as_deref(), Some("otel-test"));
    assert_eq!(attribute(&exported.span, "answer").as_deref(), Some("42"));
}

async fn echo_traceparent(ctx: RequestContext) -> String {
    format!("{} {}", ctx.traceparent, ctx.trace_id)
}

fn app() -> Router {
    standard_layers(
        Router::new()
            .route("/echo", get(echo_traceparent))
            .route("/refuse", get(refuse)),
        HttpLimits::default(),
    )
}

async fn refuse() -> platform::Problem {
    platform::Problem::unavailable("store_unavailable", 1)
}

async fn call(app: Router, traceparent: Option<&str>) -> (String, String) {
    let mut request = axum::http::Request::builder().uri("/echo");
    if let Some(tp) = traceparent {
        request = request.header(TRACEPARENT_HEADER, tp);
    }
    let response = app
        .oneshot(request.body(axum::body::Body::empty()).unwrap())
        .await
        .unwrap();
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let (tp, id) = text.split_once(' ').unwrap();
    (tp.to_owned(), id.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_span_continues_the_incoming_traceparent_and_hands_on_its_own_id() {
    let (collector, addr) = Collector::start().await;
    let (layer, guard) = otel::layer_for(&traces_url(addr), "otel-http-test").unwrap();
    let subscriber = tracing_subscriber::registry().with(layer);
    let scope = tracing::subscriber::set_default(subscriber);
    let (handed_on, trace_id) = call(app(), Some(REMOTE_TRACEPARENT)).await;
    drop(scope);
    flush(guard).await;

    let request = collector.wait_for_span("request").await;
    assert_eq!(request.span.trace_id, hex::decode(REMOTE_TRACE_ID).unwrap());
    assert_eq!(
        request.span.parent_span_id,
        hex::decode(REMOTE_PARENT_ID).unwrap()
    );
    assert_eq!(attribute(&request.span, "route").as_deref(), Some("/echo"));
    // What the handler records in event metadata names the request span itself.
    let expected = format!(
        "00-{REMOTE_TRACE_ID}-{}-01",
        hex::encode(&request.span.span_id)
    );
    assert_eq!(handed_on, expected);
    assert_eq!(trace_id, REMOTE_TRACE_ID);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_traceparent_the_context_carries_the_exported_trace_id() {
    let (collector, addr) = Collector::start().await;
    let (layer, guard) = otel::layer_for(&traces_url(addr), "otel-http-test").unwrap();
    let subscriber = tracing_subscriber::registry().with(layer);
    let scope = tracing::subscriber::set_default(subscriber);
    let (handed_on, trace_id) = call(app(), Some("00-garbage")).await;
    drop(scope);
    flush(guard).await;

    let request = collector.wait_for_span("request").await;
    assert!(request.span.parent_span_id.is_empty(), "a root span");
    let exported_trace = hex::encode(&request.span.trace_id);
    assert_eq!(trace_id, exported_trace);
    assert_eq!(
        attribute(&request.span, "trace_id").as_deref(),
        Some(exported_trace.as_str())
    );
    assert_eq!(
        handed_on,
        format!(
            "00-{exported_trace}-{}-01",
            hex::encode(&request.span.span_id)
        )
    );
}

#[tokio::test]
async fn without_an_otel_layer_the_request_context_is_unchanged() {
    let (handed_on, trace_id) = call(app(), Some(REMOTE_TRACEPARENT)).await;
    assert_eq!(handed_on, REMOTE_TRACEPARENT);
    assert_eq!(trace_id, REMOTE_TRACE_ID);
}

/// Runs the test `name` of this binary again in a child process, with [`CHILD_MARKER`] set and
/// `configure` applied to its environment, and fails unless that very test ran and passed
/// there. Each such test is one function: in the child (the marker set) it does the work that
/// needs a process of its own; in the parent it starts the child and checks what it saw.
async fn run_child_test(name: &str, configure: impl FnOnce(&mut tokio::process::Command)) {
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command
        .args([name, "--exact", "--nocapture"])
        .env(CHILD_MARKER, "1")
        .kill_on_drop(true);
    configure(&mut command);
    let output = command.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "the child test {name} did not pass ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether this process is the child [`run_child_test`] started.
fn in_the_child() -> bool {
    std::env::var_os(CHILD_MARKER).is_some()
}

/// A runtime for a parent's side of a child-process test (its child side is synchronous: the
/// exporter's flush on drop must not run inside a runtime).
fn parent_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `init` in a process without either endpoint variable (removed from the child's environment,
/// whatever the developer's shell exports).
#[test]
fn without_the_endpoint_variables_init_installs_no_otel_layer() {
    if in_the_child() {
        assert_eq!(otel::otel_config_from_env(), None);
        let guard = telemetry::init(LogFormat::Json);
        assert!(!guard.exporting());
        assert!(!otel::export_enabled());
        return;
    }
    parent_runtime().block_on(run_child_test(
        "without_the_endpoint_variables_init_installs_no_otel_layer",
        |child| {
            child
                .env_remove(otel::OTLP_ENDPOINT_ENV)
                .env_remove(otel::OTLP_TRACES_ENDPOINT_ENV);
        },
    ));
}

/// The real `init` with the endpoint variable, in a child process: one span with a remote
/// parent, then the guard is dropped, which must flush it to the collector the parent runs.
#[test]
fn init_with_the_endpoint_variable_exports_spans_and_flushes_on_drop() {
    if in_the_child() {
        let guard = telemetry::init(LogFormat::Json);
        assert!(guard.exporting());
        assert!(otel::export_enabled());
        let span = tracing::info_span!("child_span");
        assert!(otel::set_remote_parent(&span, REMOTE_TRACEPARENT));
        span.in_scope(|| tracing::info!("in the child"));
        drop(span);
        // A debug span is below the default OTEL_TRACES_FILTER (`info`): not exported.
        drop(tracing::debug_span!("filtered_span").entered());
        drop(guard);
        return;
    }
    parent_runtime().block_on(async {
        let (collector, addr) = Collector::start().await;
        run_child_test(
            "init_with_the_endpoint_variable_exports_spans_and_flushes_on_drop",
            |child| {
                child
                    .env(otel::OTLP_ENDPOINT_ENV, format!("http://{addr}"))
                    .env_remove(otel::OTLP_TRACES_ENDPOINT_ENV)
                    .env(otel::SERVICE_NAME_ENV, "child-service")
                    .env_remove(otel::TRACES_FILTER_ENV)
                    // A long schedule delay: only the flush on drop can deliver the span in time.
                    .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
                    .env("RUST_LOG", "warn");
            },
        )
        .await;

        let exported = collector.wait_for_span("child_span").await;
        assert_eq!(
            exported.span.trace_id,
            hex::decode(REMOTE_TRACE_ID).unwrap()
        );
        assert_eq!(exported.service_name.as_deref(), Some("child-service"));
        assert!(
            collector
                .spans()
                .iter()
                .all(|e| e.span.name != "filtered_span")
        );
    });
}

/// Runs `work` with JSON logs collected in memory; returns its output and, for every line
/// logged inside a request span, that span's fields and the line's message.
async fn with_request_logs<T>(
    work: impl std::future::Future<Output = T>,
) -> (T, Vec<(serde_json::Value, String)>) {
    let logs = LogBuffer::default();
    let fmt = tracing_subscriber::fmt::layer()
        .json()
        .with_span_list(true)
        .with_writer(logs.clone());
    let subscriber = tracing_subscriber::registry().with(fmt);
    let scope = tracing::subscriber::set_default(subscriber);
    let output = work.await;
    drop(scope);
    let text = logs.text();
    let logged = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|v| {
            let span = v["spans"]
                .as_array()?
                .iter()
                .find(|s| s["name"] == "request")?
                .clone();
            let message = v["fields"]["message"].as_str().unwrap_or("").to_owned();
            Some((span, message))
        })
        .collect();
    (output, logged)
}

async fn logged_trace_ids(traceparent: Option<&str>) -> (String, Vec<String>) {
    let ((_, trace_id), logged) = with_request_logs(call(app(), traceparent)).await;
    let logged = logged
        .iter()
        .filter_map(|(span, _)| span["trace_id"].as_str().map(str::to_owned))
        .collect();
    (trace_id, logged)
}

#[tokio::test]
async fn the_closing_log_line_of_a_failed_request_names_its_problem_code() {
    let (status, logged) = with_request_logs(async {
        let request = axum::http::Request::builder()
            .uri("/refuse")
            .body(axum::body::Body::empty())
            .unwrap();
        app().oneshot(request).await.unwrap().status()
    })
    .await;
    assert_eq!(status.as_u16(), 503);
    let closing = logged
        .iter()
        .find(|(_, message)| message == "finished processing request")
        .unwrap_or_else(|| panic!("no closing line: {logged:?}"));
    assert_eq!(closing.0["problem"], "store_unavailable", "{logged:?}");

    let (_, logged) = with_request_logs(call(app(), None)).await;
    assert!(!logged.is_empty());
    assert!(
        logged.iter().all(|(span, _)| span.get("problem").is_none()),
        "an answered request names no problem: {logged:?}"
    );
}

#[tokio::test]
async fn without_otel_the_request_span_logs_the_incoming_or_generated_trace_id() {
    let (trace_id, logged) = logged_trace_ids(Some(REMOTE_TRACEPARENT)).await;
    assert_eq!(trace_id, REMOTE_TRACE_ID);
    assert!(!logged.is_empty(), "no log line inside the request span");
    assert!(logged.iter().all(|t| t == REMOTE_TRACE_ID), "{logged:?}");

    let (generated, logged) = logged_trace_ids(None).await;
    assert_ne!(generated, REMOTE_TRACE_ID);
    assert!(!logged.is_empty(), "no log line inside the request span");
    assert!(logged.iter().all(|t| *t == generated), "{logged:?}");
}
