//! The consumer while Redis is full (`maxmemory` with `noeviction`): it refuses writes that
//! add data, and still answers reads, acknowledgements and deletions.

use std::time::Duration;

use bus::Consumer;
use bus::testing::PrivateRedis;
use projector::ProjectionKind;
use projector::consumer::{ConsumerSettings, Outcome, ProjectionConsumer};

use crate::support::{World, append_orders};

const PROJECTION: ProjectionKind = ProjectionKind::OrderSummaries;

/// Sets `maxmemory` of the world's Redis (bytes; 0 is no limit), with `noeviction`.
async fn set_maxmemory(w: &World, bytes: u64) {
    let mut conn = w.redis.clone();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .arg("maxmemory")
        .arg(bytes)
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET maxmemory");
}

/// An entry delivered more than `MAX_ATTEMPTS` times (claimed over and over by consumers that
/// stopped) is tried once more before it is dead-lettered, and that try is recorded in Redis
/// first, to tell an entry that stops every consumer. A full Redis refuses the record: the try
/// goes ahead unrecorded, the event is applied and the entry acknowledged, instead of the
/// consumer stopping on it until Redis has room.
#[tokio::test]
async fn an_entry_delivered_many_times_is_still_applied_while_redis_is_full() {
    let server = PrivateRedis::start().await.expect("private redis starts");
    let mut w = World::with_redis(server.url()).await;
    append_orders(w.pool(), 1).await;
    w.publish().await;
    let client = bus::client(&w.redis_url).unwrap();
    let consumer = Consumer::new(
        &client,
        w.redis.clone(),
        w.keys.clone(),
        PROJECTION.name(),
        "restarted",
        Duration::from_millis(20),
    )
    .unwrap();
    consumer.ensure_group(bus::FROM_BEGINNING).await.unwrap();
    let entries = consumer.read_new(100, Duration::ZERO).await.unwrap();
    assert!(!entries.is_empty());
    // Each entry now shows ten deliveries, as after ten claims by consumers that stopped.
    let mut conn = w.redis.clone();
    for entry in &entries {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(w.keys.stream())
            .arg(PROJECTION.name())
            .arg("restarted")
            .arg(0)
            .arg(&entry.id)
            .arg("RETRYCOUNT")
            .arg(10)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    set_maxmemory(&w, 1).await;

    let settings = ConsumerSettings {
        block: Duration::from_millis(20),
        ..ConsumerSettings::default()
    };
    let mut restarted = ProjectionConsumer::new(PROJECTION, w.pool().clone(), consumer, settings);
    let outcome = restarted.process_batch().await;

    assert_eq!(outcome, Outcome::Worked(entries.len()));
    w.assert_projection_exact(PROJECTION).await;
    let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg(w.keys.stream())
        .arg(PROJECTION.name())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending.0, 0, "every entry acknowledged");
    set_maxmemory(&w, 0).await;
}
