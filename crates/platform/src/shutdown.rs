//! Graceful shutdown: SIGTERM or Ctrl-C as a future, and serving HTTP until it resolves.
//!
//! A binary in a container is PID 1 and receives SIGTERM, not Ctrl-C, so both are handled.
//! Shutdown is a future passed in (as in mini-redis), which lets tests stop a server without
//! signals. Background workers share the same signal through a [`CancellationToken`].

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
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
