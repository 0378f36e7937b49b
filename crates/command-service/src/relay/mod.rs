//! The outbox relay (stub: being written). Tails the event store in position order and
//! publishes every committed event to the Redis stream; exactly one instance is active.

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Relay settings (flattened into command-service's config).
#[derive(clap::Args, Debug, Clone)]
pub struct RelayArgs {
    /// Run the outbox relay in this instance (one instance is active at a time; others stand by).
    #[arg(long, env = "RELAY_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub relay_enabled: bool,
}

/// Runs the relay until `shutdown` is cancelled.
pub async fn run(
    pool: PgPool,
    redis_url: String,
    stream_key: String,
    args: RelayArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let _ = (pool, redis_url, stream_key, args);
    shutdown.cancelled().await;
    Ok(())
}
