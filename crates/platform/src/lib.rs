//! What every service binary (command-service, query-service, projector) shares, so none of
//! them writes it twice: configuration pieces, logging, metrics, the HTTP error format and
//! extractors, bearer auth, the standard middleware stack, health endpoints, database and Redis
//! bootstrap, graceful shutdown and the container health probe.
//!
//! This crate knows nothing about orders or events: it must never depend on `events`, `store` or
//! `bus`, and it never decides anything about the domain.
//!
//! # Layout
//!
//! - [`config`]: `CommonArgs` and `AuthArgs`, the flags and env vars every binary flattens into its
//!   own clap config, their validation, and the one-line exit on a bad setting.
//! - [`telemetry`]: the tracing subscriber (`RUST_LOG`, JSON or pretty), safe to call twice, plus
//!   OTel export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; returns the guard that flushes spans.
//! - [`otel`]: OpenTelemetry trace export (OTLP over HTTP/protobuf, batch processor) and the
//!   bridge from W3C `traceparent` values to OTel span parents.
//! - [`metrics`]: the process-wide Prometheus recorder and the `/metrics` handler.
//! - [`open_files`]: the soft limit on open files raised to the hard one when a server starts,
//!   so connections run out at `MAX_CONNECTIONS`, not at a container's default of 1024.
//! - [`problem`]: `Problem`, the RFC 9457 `application/problem+json` error response.
//! - [`extract`]: `Json`, `Path` and `Query` extractors whose rejections are `Problem`s, plus the
//!   404/405 fallbacks.
//! - [`auth`]: the optional bearer-token layer with a constant-time compare.
//! - [`http`]: `standard_layers` (request id, trace span, load shedding, timeout, body limit,
//!   panic catcher, HTTP metrics), W3C `traceparent` parsing, the `RequestContext` extractor,
//!   and `http::cors` (which browser origins may call an API, off unless configured).
//! - [`health`]: `/healthz`, `/readyz` (per-dependency checks) and the router serving them with
//!   `/metrics`.
//! - [`db`]: connect to Postgres, creating the database when missing, and run migrations.
//! - [`db_gate`]: while Postgres cannot be reached, API requests are refused at once (503) rather
//!   than each waiting for a connection; a probe lets them through when it is back.
//! - [`outage`]: `OutageLog`, which failures of a retried operation to log during an outage (the
//!   first, a reminder a minute, the recovery), so a loop retrying every second does not flood
//!   the log.
//! - [`redis_conn`]: a `ConnectionManager` with explicit timeouts, and dedicated connections for
//!   blocking reads.
//! - [`redis_tls`]: the TLS files of a `rediss://` `REDIS_URL` (trusted authorities, client
//!   certificate), read and checked at start.
//! - [`shutdown`]: SIGTERM/Ctrl-C as a future and a cancellation token, and `serve`: hyper's
//!   HTTP/1.1 server with a header-read timeout, a bounded buffer and a cap on open connections
//!   (`ConnectionLimits`), and graceful shutdown.
//! - [`healthcheck`]: a tiny HTTP probe for Docker `HEALTHCHECK` (containers have no curl).
//! - `testing` (feature `test-util`): `LogBuffer`, service logs kept in memory for tests.

pub mod auth;
pub mod config;
pub mod db;
pub mod db_gate;
pub mod extract;
pub mod health;
pub mod healthcheck;
pub mod http;
pub mod metrics;
pub mod open_files;
pub mod otel;
pub mod outage;
pub mod problem;
pub mod redis_conn;
pub mod redis_tls;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "test-util")]
pub mod testing;

pub use problem::Problem;
