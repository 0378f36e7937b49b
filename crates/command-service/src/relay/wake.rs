//! Wake-ups: a task `LISTEN`s on [`store::APPENDED_CHANNEL`] and turns every notification into a
//! [`Notify`] permit, so the leader publishes right after each commit instead of polling.
//!
//! NOTIFY is a hint only: notifications sent while the listener reconnects are lost, so the
//! leader also wakes on a fallback tick (`RELAY_POLL_MS`), and the listener signals once after
//! every (re)connect in case it missed something. The listener has its own connection (a private
//! pool of one) so it never takes a connection from the service's pool.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

use super::backoff::Backoff;

/// Pause bounds between attempts to (re)connect the listener.
const LISTENER_RETRY_MIN: Duration = Duration::from_millis(100);
const LISTENER_RETRY_MAX: Duration = Duration::from_secs(5);

/// Spawns the listener task; it stops when the returned handle is dropped.
pub fn spawn_listener(options: PgConnectOptions, wake: Arc<Notify>) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(listen(options, wake)))
}

async fn listen(options: PgConnectOptions, wake: Arc<Notify>) {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with(options.application_name("command-service outbox relay listener"));
    let mut backoff = Backoff::new(LISTENER_RETRY_MIN, LISTENER_RETRY_MAX);
    loop {
        match listen_once(&pool, &wake).await {
            Ok(()) => backoff.reset(),
            Err(err) => {
                tracing::debug!(error = %err, "relay commit listener failed; the fallback tick covers it");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Listens until the connection fails for good.
async fn listen_once(pool: &sqlx::PgPool, wake: &Notify) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen(store::APPENDED_CHANNEL).await?;
    // Commits between the last read and this LISTEN sent nothing we could hear.
    wake.notify_one();
    loop {
        // `None`: the connection was lost and has been re-established; we may have missed
        // notifications meanwhile, so wake the leader either way.
        listener.try_recv().await?;
        wake.notify_one();
    }
}
