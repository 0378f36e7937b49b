//! Integration tests against a real Redis: the shared server at `REDIS_URL`
//! (default `127.0.0.1:6379`) with a unique key prefix per test, and private servers for tests
//! that stop Redis.

mod consume;
mod dlq;
mod inspect;
mod publish;
mod restart;

use std::time::Duration;

use bus::testing::{shared_redis_url, unique_keys};
use bus::{ConnectionManager, StreamKeys};
use chrono::{TimeZone, Utc};
use events::envelope::{EventMetadata, RecordedEvent};
use redis::Client;
use uuid::Uuid;

/// Client, shared connection and fresh keys on the shared Redis.
pub async fn shared() -> (Client, ConnectionManager, StreamKeys) {
    let client = bus::client(&shared_redis_url()).expect("valid url");
    let conn = bus::connect(&client).await.expect("shared redis is up");
    (client, conn, unique_keys())
}

/// Events at the given positions, each in its own order stream.
pub fn events(positions: impl IntoIterator<Item = i64>) -> Vec<RecordedEvent> {
    positions
        .into_iter()
        .map(|position| RecordedEvent {
            global_position: position,
            event_id: Uuid::new_v4(),
            stream_id: format!("order-{}", Uuid::new_v4()),
            stream_version: 1,
            event_type: "OrderCreated".into(),
            schema_version: 1,
            data: serde_json::json!({"customer_id": Uuid::new_v4(), "currency": "EUR", "n": position}),
            metadata: EventMetadata {
                correlation_id: Some(format!("corr-{position}")),
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                ..EventMetadata::default()
            },
            recorded_at: Utc
                .timestamp_opt(1_790_000_000 + position, 123_456_000)
                .single()
                .expect("valid time"),
        })
        .collect()
}

/// A plain `XRANGE key - +`, as `redis-cli` shows it: ids and field/value pairs.
pub async fn xrange(
    conn: &mut ConnectionManager,
    key: &str,
) -> Vec<(String, Vec<(String, String)>)> {
    redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("xrange")
}

/// Max block for consumers in tests.
pub const MAX_BLOCK: Duration = Duration::from_secs(5);

/// Deletes every key under the test's prefix (`test-<uuid>:*`) from the shared Redis, so
/// passing tests leave nothing behind.
pub async fn cleanup(conn: &mut ConnectionManager, keys: &StreamKeys) {
    let prefix = keys
        .stream()
        .strip_suffix(bus::DEFAULT_EVENT_STREAM)
        .expect("test keys end with the default stream name");
    assert!(prefix.starts_with("test-"), "only ever delete test keys");
    let found: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(conn)
        .await
        .expect("list test keys");
    if !found.is_empty() {
        let _: i64 = redis::cmd("DEL")
            .arg(&found)
            .query_async(conn)
            .await
            .expect("delete test keys");
    }
}
