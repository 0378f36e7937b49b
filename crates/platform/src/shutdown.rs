//! Graceful shutdown: SIGTERM or Ctrl-C as a future, and serving HTTP until it resolves; an API
//! first leaves its load balancers' rotation ([`leave_rotation_first`]), then drains.
//!
//! A binary in a container is PID 1 and receives SIGTERM, not Ctrl-C, so both are handled.
//! Shutdown is a future passed in (as in mini-redis), which lets tests stop a server without
//! signals. Background workers share the same signal through a [`CancellationToken`].
//!
//! # Serving connections
//!
//! [`serve`] and its variants run hyper themselves rather than `axum::serve`, which gives hyper no
//! timer: without one, hyper's header-read timeout never applies, and a client sending a
//! request's headers a byte at a time (or nothing at all) held its connection, a file descriptor
//! and up to about 400 KiB of buffer for as long as it liked, unauthenticated; a few hundred such
//! connections took a pod past its memory limit. The router's limits (timeout, body limit, load
//! shedding, authentication) act only once a request's headers are parsed, so the server bounds
//! what comes before ([`ConnectionLimits`]):
//!
//! - a client has [`HEADER_READ_TIMEOUT`] to send a request's line and headers, counted from when
//!   its connection opens or its previous response was sent, so idle keep-alive connections close
//!   after it too;
//! - a connection buffers at most [`CONNECTION_BUFFER_BYTES`]; a longer request head is answered
//!   431 and the connection closed;
//! - at most `MAX_CONNECTIONS` connections are open at once: at the cap the server accepts
//!   nothing until one closes, so new ones wait in the kernel's listen backlog (they are never
//!   accepted and dropped). [`OPEN_CONNECTIONS_METRIC`] counts them.
//!
//! A failed accept never ends the server: a client gone from the backlog is skipped, and a lack
//! of resources (out of file descriptors) is logged and tried again after a short pause. Every
//! accepted connection sends at once (`TCP_NODELAY`): a response written in more than one piece
//! (a long history page) must not wait for the client's delayed acknowledgement before its last
//! segment leaves. HTTP/1.1 only, as `axum::serve` with axum's default features served, and no
//! protocol upgrades (no route uses one).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
pub use tokio_util::sync::CancellationToken;

use crate::outage::OutageLog;

/// Resolves on the first SIGTERM or Ctrl-C (SIGINT).
pub async fn signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };

    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        () = ctrl_c => tracing::info!("received ctrl-c, shutting down"),
        () = terminate => tracing::info!("received SIGTERM, shutting down"),
    }
}

/// A token cancelled on SIGTERM or Ctrl-C, for workers and `serve` alike
/// (`serve(listener, app, token.clone().cancelled_owned())`). Must be called inside a runtime.
pub fn cancel_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        signal().await;
        child.cancel();
    });
    token
}

/// Runs `start` (a service connecting, migrating, binding) unless `stop` is cancelled first:
/// `None` then, and the caller exits 0 at once, since nothing has started that needs draining.
/// A service waiting for its database at start (`DB_CONNECT_WAIT_SECS`) thus stops on SIGTERM
/// like a running one.
pub async fn unless_stopped<T>(
    stop: &CancellationToken,
    start: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        out = start => Some(out),
        () = stop.cancelled() => {
            tracing::info!("stopped before the service had started");
            None
        }
    }
}

/// Lets a service leave rotation before it stops serving: once `signal` resolves, the returned
/// router answers `/readyz` 503 while it goes on serving everything else, and only `delay`
/// later does the returned future resolve (pass it to [`serve_with_grace`], which then
/// drains). With no delay it resolves with `signal`.
///
/// Kubernetes removes a terminating pod from its Service's endpoints while it sends SIGTERM,
/// and kube-proxy and ingresses learn of it a moment later: a listener closed at the signal
/// refuses the connections they still send it, and every rolling update fails some requests
/// without the 503 and `Retry-After` clients are promised. `delay` (`SHUTDOWN_DELAY_MS`) is
/// how long they may keep sending.
pub fn leave_rotation_first(
    router: Router,
    signal: impl Future<Output = ()> + Send + 'static,
    delay: Duration,
) -> (Router, impl Future<Output = ()> + Send + 'static) {
    let leaving = CancellationToken::new();
    let router = router.layer(axum::middleware::from_fn_with_state(
        leaving.clone(),
        not_ready_while_leaving,
    ));
    let stop = async move {
        signal.await;
        if delay.is_zero() {
            return;
        }
        leaving.cancel();
        tracing::info!(
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "leaving rotation: /readyz answers 503 while requests are still served for \
             SHUTDOWN_DELAY_MS, then in-flight requests drain"
        );
        tokio::time::sleep(delay).await;
    };
    (router, stop)
}

/// The layer of [`leave_rotation_first`]: `/readyz` is 503, in the shape of a failed check,
/// once the service is leaving; every other request goes on as before.
async fn not_ready_while_leaving(
    State(leaving): State<CancellationToken>,
    request: Request,
    next: Next,
) -> Response {
    if leaving.is_cancelled() && request.uri().path() == crate::health::READYZ_PATH {
        let body = serde_json::json!({
            "status": "not_ready",
            "checks": { "shutdown": "error: the instance is shutting down" },
        });
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    next.run(request).await
}

/// Default `MAX_CONNECTIONS`: room for the default [`crate::http::DEFAULT_MAX_IN_FLIGHT`] requests
/// plus the query-service's default 256 event streams, and some 750 more for idle keep-alive
/// connections and probes, so that a flood of requests is answered 503 `overloaded` at once (by
/// the router) before this cap makes new connections wait.
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;

/// How long a client has to send a request's line and headers, counted from when its connection
/// opens or its previous response was sent. It is also how long an idle keep-alive connection
/// stays open, and it must outlast the idle timeout of the proxies in front (ingress-nginx and
/// AWS load balancers keep idle upstream connections 60 s): a proxy that sends a request on a
/// connection the service is closing at that moment answers its client 502. So 75 s, nginx's own
/// keep-alive default; what a client sending nothing, or its headers a byte at a time, can hold
/// meanwhile is bounded by [`CONNECTION_BUFFER_BYTES`] and the connection cap.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(75);

/// Most bytes one connection buffers (hyper's default is about 400 KiB). A request's line and
/// headers must fit in it, else the answer is 431 and the connection is closed: 16 KiB, the
/// limit Node.js servers apply, is far above what clients of these APIs send (a bearer token,
/// a `traceparent`, a few ids). Bodies are not held to it: hyper passes them on in pieces, and
/// the router limits them ([`crate::http::DEFAULT_BODY_LIMIT_BYTES`]).
pub const CONNECTION_BUFFER_BYTES: usize = 16 * 1024;

/// The smallest buffer hyper accepts (it panics below it).
const HYPER_MIN_BUFFER_BYTES: usize = 8 * 1024;

/// Pause after an accept that failed for want of resources (file descriptors, memory): the
/// connection stays in the backlog, so trying again at once would fail again in a busy loop.
const ACCEPT_RETRY_AFTER: Duration = Duration::from_millis(100);

/// Gauge of the connections open now, on every binary (bounded by `MAX_CONNECTIONS`).
pub const OPEN_CONNECTIONS_METRIC: &str = "http_connections_open";

/// Gauge of the cap on open connections (`MAX_CONNECTIONS`), so an alert can tell how near
/// [`OPEN_CONNECTIONS_METRIC`] is to it whatever each deployment set.
pub const MAX_CONNECTIONS_METRIC: &str = "http_connections_max";

/// Bounds on the connections a server accepts: what holds before a request's headers are
/// parsed, where the router's own limits ([`crate::http::HttpLimits`]) cannot act yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections open at once (`MAX_CONNECTIONS`). At the cap no connection is accepted
    /// until one closes: new ones wait in the listen backlog rather than being accepted and
    /// dropped.
    pub max_connections: usize,
    /// How long a client has to send a whole request head; then its connection is closed
    /// ([`HEADER_READ_TIMEOUT`]).
    pub header_read_timeout: Duration,
    /// Most bytes a connection buffers; a request head that does not fit is answered 431
    /// ([`CONNECTION_BUFFER_BYTES`]; at least 8 KiB).
    pub max_buffer_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_buffer_bytes: CONNECTION_BUFFER_BYTES,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then waits for in-flight requests,
/// with the default [`ConnectionLimits`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run(
        listener,
        router,
        shutdown,
        None,
        ConnectionLimits::default(),
    )
    .await;
    Ok(())
}

/// Like [`serve`], but gives in-flight requests at most `grace` after `shutdown` resolves
/// (`SHUTDOWN_GRACE_SECS`); requests still running then are dropped.
pub async fn serve_with_grace(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> anyhow::Result<()> {
    serve_with_limits(
        listener,
        router,
        shutdown,
        grace,
        ConnectionLimits::default(),
    )
    .await
}

/// Like [`serve_with_grace`], with the given connection limits (the services pass
/// `CommonArgs::connection_limits`).
///
/// Once `shutdown` resolves, the listener is closed (nothing more is accepted), idle connections
/// are closed, and each connection with a request under way is closed once its response has
/// been sent; streamed responses end when their own shutdown signal ends their bodies.
pub async fn serve_with_limits(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    limits: ConnectionLimits,
) -> anyhow::Result<()> {
    run(listener, router, shutdown, Some(grace), limits).await;
    Ok(())
}

/// The accept loop of [`serve`] and its variants, then the drain (bounded by `grace` if given).
async fn run(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Option<Duration>,
    limits: ConnectionLimits,
) {
    crate::open_files::raise_for_connections(limits.max_connections);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_buffer_bytes.max(HYPER_MIN_BUFFER_BYTES));
    let max_connections = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max_connections));
    let draining = GracefulShutdown::new();
    // Cancelled when the grace period is over: the connections still open then are dropped.
    let abandon = CancellationToken::new();
    let mut at_cap = OutageLog::new();
    let mut accept_failures = OutageLog::new();
    // Exposed at zero from the start.
    metrics::gauge!(OPEN_CONNECTIONS_METRIC).increment(0.0);
    metrics::gauge!(MAX_CONNECTIONS_METRIC).set(max_connections as f64);

    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = take_slot(&slots, max_connections, &mut at_cap) => slot,
        };
        // The semaphore is never closed, so there is always a slot in the end.
        let Some(slot) = slot else { break };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if let Some(recovered) = accept_failures.recovered() {
                        tracing::info!(
                            failures = recovered.failures,
                            failed_ms = recovered.failed_ms(),
                            "accepting connections again"
                        );
                    }
                    stream
                }
                // The client gave up while it waited in the backlog: nothing to do.
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!(error = %e, "an accepted connection was gone already");
                    continue;
                }
                Err(e) => {
                    match accept_failures.failed() {
                        Some(failing) => tracing::error!(
                            error = %e,
                            failures = failing.failures,
                            failing_ms = failing.failing_ms(),
                            retry_ms = u64::try_from(ACCEPT_RETRY_AFTER.as_millis()).unwrap_or(u64::MAX),
                            "cannot accept connections (out of file descriptors or memory?); \
                             trying again shortly"
                        ),
                        None => tracing::debug!(error = %e, "cannot accept a connection"),
                    }
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(ACCEPT_RETRY_AFTER) => continue,
                    }
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let connection = draining.watch(connection);
        let abandon = abandon.clone();
        tokio::spawn(async move {
            let _open = OpenConnection::new(slot);
            tokio::select! {
                served = connection => {
                    if let Err(e) = served {
                        // A client that went away, sent no complete head in time, or sent a
                        // malformed one: its own business, not the service's.
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                () = abandon.cancelled() => {}
            }
        });
    }
    // Nothing more is accepted: new connections are refused from here on.
    drop(listener);
    let drained = draining.shutdown();
    match grace {
        None => drained.await,
        Some(grace) => {
            if tokio::time::timeout(grace, drained).await.is_err() {
                tracing::warn!(
                    grace_secs = grace.as_secs(),
                    "in-flight requests still running after the grace period; exiting anyway"
                );
                abandon.cancel();
            }
        }
    }
}

/// A connection slot: at once when one is free; otherwise after logging (the first time, then
/// once a minute while the cap keeps being reached) that connections wait, once one is free.
/// `None` only if the semaphore were closed, which it never is.
async fn take_slot(
    slots: &Arc<Semaphore>,
    max_connections: usize,
    at_cap: &mut OutageLog,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(slot) = Arc::clone(slots).try_acquire_owned() {
        // Back to normal only with an eighth of the slots free, so a server hovering at the cap
        // does not log at every connection.
        if slots.available_permits().saturating_mul(8) >= max_connections
            && let Some(recovered) = at_cap.recovered()
        {
            tracing::info!(
                waits = recovered.failures,
                for_ms = recovered.failed_ms(),
                "connections below MAX_CONNECTIONS again"
            );
        }
        return Some(slot);
    }
    if let Some(failing) = at_cap.failed() {
        tracing::warn!(
            max_connections,
            waits = failing.failures,
            for_ms = failing.failing_ms(),
            "MAX_CONNECTIONS connections are open: new ones wait in the listen backlog until \
             one closes"
        );
    }
    Arc::clone(slots).acquire_owned().await.ok()
}

/// An accepted connection: counted in [`OPEN_CONNECTIONS_METRIC`], holding its slot until it is
/// dropped, when the connection has ended.
struct OpenConnection {
    _slot: OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(slot: OwnedSemaphorePermit) -> Self {
        metrics::gauge!(OPEN_CONNECTIONS_METRIC).increment(1.0);
        Self { _slot: slot }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_CONNECTIONS_METRIC).decrement(1.0);
    }
}

/// An accept error about one connection (gone before it was accepted), not about the server.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
