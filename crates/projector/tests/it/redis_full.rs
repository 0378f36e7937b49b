//! The consumer while Redis is full (`maxmemory` with `noeviction`): it refuses writes that
//! add data, and still answers reads, acknowledgements and deletions.

use std::time::Duration;

use bus::testing::PrivateRedis;
use bus::{Consumer, DeadLetterQueue};
use events::{OrderState, order_stream_id};
use projector::ProjectionKind;
use projector::consumer::{ConsumerSettings, Outcome, ProjectionConsumer};
use uuid::Uuid;

use crate::support::{self, DEADLINE, Fate, World, append_orders, commands, run_commands};

const PROJECTION: ProjectionKind = ProjectionKind::OrderSummaries;

/// Sets `maxmemory` of the world's (private) Redis ([`bus::testing::set_maxmemory`]).
async fn set_maxmemory(w: &World, bytes: u64) {
    bus::testing::set_maxmemory(&w.redis, bytes).await;
}

fn consumer(w: &World, name: &str) -> Consumer {
    support::group_consumer(w, PROJECTION, name)
}

/// The world's one order, published, its entries each delivered ten times to consumer
/// `restarted` (as after ten claims by consumers that stopped), each with `unfinished` tries
/// recorded as begun and never ended; then Redis is full. Returns the world, a projection
/// consumer of that name and the number of entries.
async fn entries_delivered_often_then_redis_full(
    server: &PrivateRedis,
    unfinished: u32,
) -> (World, ProjectionConsumer, usize) {
    let mut w = World::with_redis(server.url()).await;
    append_orders(w.pool(), 1).await;
    w.publish().await;
    let consumer = consumer(&w, "restarted");
    consumer.ensure_group(bus::FROM_BEGINNING).await.unwrap();
    let entries = consumer.read_new(100, Duration::ZERO).await.unwrap();
    assert!(!entries.is_empty());
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
        if unfinished > 0 {
            let _: i64 = redis::cmd("HSET")
                .arg(w.keys.trying(PROJECTION.name()))
                .arg(&entry.id)
                .arg(unfinished)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    set_maxmemory(&w, 1).await;
    let settings = ConsumerSettings {
        block: Duration::from_millis(20),
        ..ConsumerSettings::default()
    };
    let restarted = ProjectionConsumer::new(PROJECTION, w.pool().clone(), consumer, settings);
    (w, restarted, entries.len())
}

/// An entry delivered more than `MAX_ATTEMPTS` times (claimed over and over by consumers that
/// stopped) is tried once more before it is dead-lettered, and that try is recorded in Redis
/// first, to tell an entry that stops every consumer. A full Redis refuses the record: the try
/// goes ahead unrecorded, the event is applied and the entry acknowledged, instead of the
/// consumer stopping on it until Redis has room.
#[tokio::test]
async fn an_entry_delivered_many_times_is_still_applied_while_redis_is_full() {
    let server = PrivateRedis::start().await.expect("private redis starts");
    let (w, mut restarted, entries) = entries_delivered_often_then_redis_full(&server, 0).await;

    let outcome = restarted.process_batch().await;

    assert_eq!(outcome, Outcome::Worked(entries));
    w.assert_projection_exact(PROJECTION).await;
    assert_eq!(
        crate::pending_count(&w, PROJECTION.name()).await,
        0,
        "every entry acknowledged"
    );
    set_maxmemory(&w, 0).await;
}

/// A full Redis still answers how many tries of an entry never ended: one whose tries stopped
/// consumers twice already is dead-lettered without another try, as with room in Redis.
#[tokio::test]
async fn an_entry_whose_tries_stopped_consumers_is_not_tried_again_while_redis_is_full() {
    let server = PrivateRedis::start().await.expect("private redis starts");
    let (w, mut restarted, entries) = entries_delivered_often_then_redis_full(
        &server,
        projector::consumer::UNFINISHED_TRIES_LIMIT,
    )
    .await;

    let outcome = restarted.process_batch().await;

    assert_eq!(outcome, Outcome::Worked(entries));
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    assert_eq!(
        dlq.len(PROJECTION.name()).await.unwrap() as usize,
        entries,
        "each dead-lettered, none tried"
    );
    let summaries: i64 = sqlx::query_scalar("SELECT count(*) FROM order_summaries")
        .fetch_one(w.pool())
        .await
        .unwrap();
    assert_eq!(summaries, 0);
    assert_eq!(crate::pending_count(&w, PROJECTION.name()).await, 0);
    set_maxmemory(&w, 0).await;
}

/// An entry whose tries all failed is dead-lettered and its order parked, also while Redis is
/// full: the dead-letter script acknowledges the entry before it writes the letter, and Redis
/// lets a script that has written go on writing. Were the letter refused, the consumer would
/// stop on the entry until Redis had room.
#[tokio::test]
async fn an_entry_given_up_on_while_redis_is_full_is_still_dead_lettered() {
    let server = PrivateRedis::start().await.expect("private redis starts");
    let mut w = World::with_redis(server.url()).await;
    let order = Uuid::new_v4();
    let cmds = commands(order, Uuid::new_v4(), Fate::Shipped);
    run_commands(w.pool(), order, &cmds, &mut OrderState::default()).await;
    support::refuse_placing(w.pool(), order).await;
    w.publish().await;
    let consumer = consumer(&w, "only");
    consumer.ensure_group(bus::FROM_BEGINNING).await.unwrap();
    set_maxmemory(&w, 1).await;

    let settings = ConsumerSettings {
        block: Duration::from_millis(20),
        retry_base: Duration::from_millis(1),
        max_attempts: 2,
        ..ConsumerSettings::default()
    };
    let mut only = ProjectionConsumer::new(PROJECTION, w.pool().clone(), consumer, settings);
    let stream = order_stream_id(order);
    let started = std::time::Instant::now();
    loop {
        let _ = only.process_batch().await;
        let parked: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT parked_version FROM projection_streams \
             WHERE projection = $1 AND stream_id = $2",
        )
        .bind(PROJECTION.name())
        .bind(&stream)
        .fetch_optional(w.pool())
        .await
        .unwrap();
        if parked.flatten() == Some(4) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the order is still not parked after {DEADLINE:?}"
        );
    }

    set_maxmemory(&w, 0).await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    assert_eq!(dlq.len(PROJECTION.name()).await.unwrap(), 1);
    assert_eq!(support::summary_status(&w, &stream).await, "draft");
}
