//! Opening connections with timeouts that fit how each is used.
//!
//! Two kinds: a shared [`ConnectionManager`] for short commands (publish, ack, claim, admin), and
//! a dedicated one per [`crate::Consumer`] for `XREADGROUP … BLOCK`, whose response timeout must
//! exceed the block time (redis 1.x defaults to 500 ms and would fail every longer block) and
//! which must not be shared (a blocked connection stalls every other command queued on it).

use std::time::Duration;

use redis::Client;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::error::BusError;

/// Reply timeout of the shared connection: long enough for a publish script of a large batch on
/// a busy server, short enough that a dead server is noticed quickly.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Timeout of one TCP connect attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How much longer than the longest block a blocking read's reply may take before it counts as
/// a dead connection (network latency plus a busy server).
pub const BLOCK_GRACE: Duration = Duration::from_secs(5);

/// Reconnect attempts of a manager before a call reports [`BusError::Connection`]; the manager
/// tries again on the next call, so callers simply retry with their own backoff.
const RECONNECT_RETRIES: usize = 2;

/// Longest pause between two reconnect attempts inside the manager.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// Parses a `redis://` URL into a client whose connections send each command at once
/// (`TCP_NODELAY`; redis-rs leaves Nagle's algorithm on by default): over TLS (`rediss://`), a
/// pipeline longer than one TLS record, such as a publish of a large batch, would otherwise
/// wait up to 40 ms for the server's delayed ACK.
pub fn client(url: &str) -> Result<Client, BusError> {
    let invalid = |source| BusError::Redis {
        op: "parse REDIS_URL",
        source,
    };
    let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(invalid)?;
    let nodelay = redis::io::tcp::TcpSettings::default().set_nodelay(true);
    Client::open(info.set_tcp_settings(nodelay)).map_err(invalid)
}

fn config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(RECONNECT_RETRIES)
        .set_max_delay(RECONNECT_MAX_DELAY)
}

/// A reconnecting connection for short commands, with [`COMMAND_TIMEOUT`].
///
/// Fails with [`BusError::Connection`] if Redis cannot be reached now.
pub async fn connect(client: &Client) -> Result<ConnectionManager, BusError> {
    ConnectionManager::new_with_config(client.clone(), config(COMMAND_TIMEOUT))
        .await
        .map_err(|e| BusError::from_redis("connect", e))
}

/// Like [`connect`] but does not touch the network until the first command, so a service can
/// start while Redis is down.
pub fn connect_lazy(client: &Client) -> Result<ConnectionManager, BusError> {
    ConnectionManager::new_lazy_with_config(client.clone(), config(COMMAND_TIMEOUT))
        .map_err(|e| BusError::from_redis("connect", e))
}

/// A dedicated, lazily opened reconnecting connection for blocking reads of up to `max_block`.
pub(crate) fn connect_blocking(
    client: &Client,
    max_block: Duration,
) -> Result<ConnectionManager, BusError> {
    ConnectionManager::new_lazy_with_config(client.clone(), config(max_block + BLOCK_GRACE))
        .map_err(|e| BusError::from_redis("connect for blocking reads", e))
}
