//! Graceful shutdown: SIGTERM or Ctrl-C as a future, and serving HTTP until it resolves; an API
//! first leaves its load balancers' rotation ([`leave_rotation_first`]), then drains.
//!
//! A binary in a container is PID 1 and receives SIGTERM, not Ctrl-C, so both are handled.
//! Shutdown is a future passed in (as in mini-redis), which lets tests stop a server without
//! signals. Background workers share the same signal through a [`CancellationToken`].

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;
pub use tokio_util::sync::CancellationToken;

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

/// Serves `router` on `listener` until `shutdown` resolves, then waits for in-flight requests.
///
/// Every accepted connection sends at once (`TCP_NODELAY`, which axum leaves off): a response
/// written in more than one piece (a long history page) must not wait for the client's delayed
/// acknowledgement before its last segment leaves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = listener.tap_io(|connection| {
        if let Err(e) = connection.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .context("http server failed")
}

/// Like [`serve`], but gives in-flight requests at most `grace` after `shutdown` resolves
/// (`SHUTDOWN_GRACE_SECS`); requests still running then are dropped.
pub async fn serve_with_grace(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> anyhow::Result<()> {
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = started_tx.send(());
    };
    let server = serve(listener, router, signal);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        // An Err means the sender was dropped, which only happens once the server is done.
        _ = started_rx => {}
    }
    match tokio::time::timeout(grace, server).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "in-flight requests still running after the grace period; exiting anyway"
            );
            Ok(())
        }
    }
}
