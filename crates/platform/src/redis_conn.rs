//! Redis connections with explicit timeouts.
//!
//! redis 1.x times out an async request after 500 ms by default, which breaks any blocking read
//! (`XREADGROUP … BLOCK 2000`), and a blocking read stalls every other request multiplexed on
//! the same connection. So: one shared [`ConnectionManager`] (reconnects by itself) for ordinary
//! commands, and a [`dedicated_connection`] per blocking reader, with a response timeout above
//! its BLOCK time. All are opened from the binary's one client
//! ([`crate::config::CommonArgs::redis_client`]: the URL with its TLS files). Failures read
//! `cannot reach Redis at 127.0.0.1:6379 (REDIS_URL): connection refused`; the URL, which may
//! carry a password, is never printed.

use std::time::Duration;

use anyhow::anyhow;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, RedisError};

use crate::config::one_line;

/// Default response timeout for ordinary commands (XADD, XACK, PING): generous next to their
/// sub-millisecond latency, short enough that a hung server fails requests quickly.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one TCP connect (plus handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnect attempts the manager makes per failure, with exponential backoff. Few enough that
/// a connect that fails at once (refused, a certificate not trusted) reports its own kind of
/// failure to `/readyz` within the check's 1.5 s (`platform::health::CHECK_TIMEOUT`), not only
/// "timed out"; the next command tries again.
pub const RECONNECT_RETRIES: usize = 2;
/// First reconnect delay; doubles per attempt.
pub const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest delay between two reconnect attempts.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);

fn manager_config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(RECONNECT_RETRIES)
        .set_min_delay(RECONNECT_MIN_DELAY)
        .set_max_delay(RECONNECT_MAX_DELAY)
}

/// Connects a [`ConnectionManager`] now (fails when Redis is unreachable). After a lost
/// connection the manager fails the in-flight command and reconnects in the background.
pub async fn connect_manager(
    client: &redis::Client,
    response_timeout: Duration,
) -> anyhow::Result<ConnectionManager> {
    let addr = client.get_connection_info().addr().to_string();
    client
        .get_connection_manager_with_config(manager_config(response_timeout))
        .await
        .map_err(|e| describe(&e, &addr))
}

/// A [`ConnectionManager`] that connects on first use, for services that must start (and report
/// not-ready) while Redis is down. Only fails on a malformed URL.
pub fn lazy_manager(
    client: &redis::Client,
    response_timeout: Duration,
) -> anyhow::Result<ConnectionManager> {
    let addr = client.get_connection_info().addr().to_string();
    client
        .get_connection_manager_lazy(manager_config(response_timeout))
        .map_err(|e| describe(&e, &addr))
}

/// A connection of its own for blocking reads (`XREADGROUP … BLOCK n`). `response_timeout` must
/// exceed the BLOCK time; it does not reconnect, so a reader recreates it after an I/O error.
pub async fn dedicated_connection(
    client: &redis::Client,
    response_timeout: Duration,
) -> anyhow::Result<MultiplexedConnection> {
    let addr = client.get_connection_info().addr().to_string();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(response_timeout));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| describe(&e, &addr))
}

/// One line naming the server and the setting.
fn describe(e: &RedisError, addr: &str) -> anyhow::Error {
    let cause = redis_kind_phrase(e).map_or_else(|| one_line(e), str::to_owned);
    anyhow!("cannot reach Redis at {addr} (REDIS_URL): {cause}")
}

/// The kind of a Redis failure in a few words, when redis-rs's own predicates tell it (it keeps
/// its I/O error behind an `Arc`, so the error's type cannot): what start-up messages and
/// `/readyz` say of it.
pub(crate) fn redis_kind_phrase(e: &RedisError) -> Option<&'static str> {
    match e.kind() {
        redis::ErrorKind::AuthenticationFailed => Some("authentication failed"),
        _ if e.is_connection_refusal() => Some("connection refused"),
        _ if e.is_timeout() => Some("timed out"),
        _ if e.is_connection_dropped() => Some("connection lost"),
        _ => None,
    }
}
