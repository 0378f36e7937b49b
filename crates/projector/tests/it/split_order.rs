//! An order whose entries are split between consumers: the entry of the event that fails is
//! one consumer's, a later entry of the same order another's.

use std::time::Duration;

use bus::DeadLetterQueue;
use events::{OrderState, order_stream_id};
use projector::ProjectionKind;
use projector::consumer::{ConsumerSettings, ProjectionConsumer};
use tokio::time::Instant;
use uuid::Uuid;

use crate::support::{self, DEADLINE, Fate, World, commands, refuse_placing, run_commands};

const PROJECTION: ProjectionKind = ProjectionKind::OrderSummaries;

/// A projection consumer named `name` that takes at most `batch_size` entries a step and
/// gives up on an entry after two quick tries.
fn projection_consumer(w: &World, name: &str, batch_size: usize) -> ProjectionConsumer {
    let settings = ConsumerSettings {
        batch_size,
        linger: Duration::ZERO,
        max_attempts: 2,
        retry_base: Duration::from_millis(10),
        block: Duration::from_millis(20),
        ..ConsumerSettings::default()
    };
    let consumer = support::group_consumer(w, PROJECTION, name);
    ProjectionConsumer::new(PROJECTION, w.pool().clone(), consumer, settings)
}

/// A world with one order at versions 1 to 5 (created, two items, placed, paid), published,
/// whose placing `order_summaries` refuses; returns the world and the order.
async fn an_order_whose_placing_is_refused() -> (World, Uuid) {
    let mut w = World::new().await;
    let order = Uuid::new_v4();
    refuse_placing(w.pool(), order).await;
    let cmds = commands(order, Uuid::new_v4(), Fate::Paid);
    run_commands(w.pool(), order, &cmds, &mut OrderState::default()).await;
    w.publish().await;
    (w, order)
}

/// The placing of an order fails; its entry is consumer `a`'s, the payment's entry consumer
/// `b`'s. `b` finds the placing missing, reads it from the event store, and it fails there
/// too: that failure is not the payment's. The one letter is the placing's, written by the
/// consumer that holds it, the order is parked at the placing, and the payment is held back
/// behind it, not dead-lettered in its stead under the placing's error.
#[tokio::test]
async fn a_failure_met_while_filling_a_gap_is_not_charged_to_the_later_entry_that_met_it() {
    let (w, order) = an_order_whose_placing_is_refused().await;
    let mut a = projection_consumer(&w, "a", 4);
    let mut b = projection_consumer(&w, "b", 100);
    // `a` takes versions 1 to 4 (the placing fails), `b` the payment.
    a.process_batch().await;
    b.process_batch().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    // `b` alone, for many times what two tries take: the payment waits, and is never `b`'s
    // to give up on.
    let alone = Instant::now() + Duration::from_millis(300);
    while Instant::now() < alone {
        b.process_batch().await;
        assert_eq!(
            dlq.len(PROJECTION.name()).await.unwrap(),
            0,
            "b dead-lettered an event that never failed"
        );
        assert_eq!(b.queued(), 1, "the payment waits");
    }
    let deadline = Instant::now() + DEADLINE;
    loop {
        a.process_batch().await;
        b.process_batch().await;
        if a.queued() == 0 && b.queued() == 0 && dlq.len(PROJECTION.name()).await.unwrap() > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still queued: a {}, b {}",
            a.queued(),
            b.queued()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let letters = dlq.list(PROJECTION.name(), 10).await.unwrap();
    let versions: Vec<(&str, &str, &str)> = letters
        .iter()
        .map(|l| {
            (
                l.original["stream_version"].as_str(),
                l.original["event_type"].as_str(),
                l.consumer.as_str(),
            )
        })
        .collect();
    assert_eq!(versions, [("4", "OrderPlaced", "a")], "{letters:#?}");
    let (version, parked): (i64, Option<i64>) = sqlx::query_as(
        "SELECT version, parked_version FROM projection_streams \
         WHERE projection = $1 AND stream_id = $2",
    )
    .bind(PROJECTION.name())
    .bind(order_stream_id(order))
    .fetch_one(w.pool())
    .await
    .unwrap();
    assert_eq!((version, parked), (3, Some(4)));
    // The payment's entry is acknowledged, held back by the park: nothing is left pending.
    assert_eq!(crate::pending_count(&w, PROJECTION.name()).await, 0);
}

/// One consumer holds both: when it gives up on the placing (a letter and a park), the payment
/// queued behind it is held back and acknowledged in the same step, not left waiting.
#[tokio::test]
async fn a_dead_letter_settles_the_later_entries_of_its_order_in_the_same_step() {
    let (w, _) = an_order_whose_placing_is_refused().await;
    let mut solo = projection_consumer(&w, "solo", 100);
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let deadline = Instant::now() + DEADLINE;
    while dlq.len(PROJECTION.name()).await.unwrap() == 0 {
        assert!(
            Instant::now() < deadline,
            "the placing is never dead-lettered"
        );
        solo.process_batch().await;
    }
    assert_eq!(
        solo.queued(),
        0,
        "the payment is settled with its placing's letter"
    );
    let letters = dlq.list(PROJECTION.name(), 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].original["stream_version"], "4");
}

/// The payment's entry, delivered many times, waits in consumer `b` on the placing, whose
/// entry a stopped consumer `a` holds. Once `b` claims the placing's entry, it tries it as its
/// own, counts its failures and dead-letters it: queued behind the waiting payment, it was
/// never tried, and nobody wrote its letter.
#[tokio::test]
async fn an_earlier_entry_claimed_by_the_consumer_waiting_on_it_is_tried_and_dead_lettered() {
    let (w, _) = an_order_whose_placing_is_refused().await;
    // `a` reads versions 1 to 4 and stops; `b` reads the payment, delivered ten times already.
    let a = support::group_consumer(&w, PROJECTION, "a");
    a.ensure_group(bus::FROM_BEGINNING).await.unwrap();
    assert_eq!(a.read_new(4, Duration::ZERO).await.unwrap().len(), 4);
    let b_group = support::group_consumer(&w, PROJECTION, "b");
    let payment = b_group.read_new(10, Duration::ZERO).await.unwrap();
    assert_eq!(payment.len(), 1);
    let mut conn = w.redis.clone();
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(w.keys.stream())
        .arg(PROJECTION.name())
        .arg("b")
        .arg(0)
        .arg(&payment[0].id)
        .arg("RETRYCOUNT")
        .arg(10)
        .query_async(&mut conn)
        .await
        .unwrap();
    let settings = ConsumerSettings {
        linger: Duration::ZERO,
        max_attempts: 2,
        retry_base: Duration::from_millis(10),
        block: Duration::from_millis(20),
        claim_idle: Duration::from_millis(300),
        reclaim_interval: Duration::from_millis(50),
        ..ConsumerSettings::default()
    };
    let mut b = ProjectionConsumer::new(PROJECTION, w.pool().clone(), b_group, settings);
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let deadline = Instant::now() + DEADLINE;
    loop {
        b.process_batch().await;
        if b.queued() == 0 && dlq.len(PROJECTION.name()).await.unwrap() > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the placing is never dead-lettered ({} queued)",
            b.queued()
        );
    }
    let letters = dlq.list(PROJECTION.name(), 10).await.unwrap();
    let named: Vec<(&str, &str)> = letters
        .iter()
        .map(|l| (l.original["stream_version"].as_str(), l.consumer.as_str()))
        .collect();
    assert_eq!(named, [("4", "b")], "{letters:#?}");
}
