//! The consumer's memory bound: its retry queues stop growing at `max_queued`, whichever way
//! the failing entries come to it.

use std::time::Duration;

use bus::Consumer;
use projector::ProjectionKind;
use projector::consumer::{ConsumerSettings, ProjectionConsumer};

use crate::support::{self, World, append_orders};

const PROJECTION: ProjectionKind = ProjectionKind::OrderSummaries;
const BATCH: usize = 4;
const MAX_QUEUED: usize = 3;

/// Makes `order_summaries` refuse every write: every entry fails, and stays queued for a retry
/// that is not due within the test.
async fn refuse_every_summary(w: &World) {
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_all() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           RAISE EXCEPTION 'refusing every summary'; END $$; \
         CREATE TRIGGER refuse_all BEFORE INSERT OR UPDATE ON order_summaries FOR EACH ROW \
           EXECUTE FUNCTION refuse_all();",
    )
    .execute(w.pool())
    .await
    .expect("create the refusing trigger");
}

fn consumer(w: &World, name: &str) -> Consumer {
    support::group_consumer(w, PROJECTION, name)
}

/// A consumer whose retries are an hour away, reading `BATCH` entries at a time and claiming
/// idle entries of others at every step.
fn projection_consumer(w: &World, name: &str) -> ProjectionConsumer {
    let settings = ConsumerSettings {
        batch_size: BATCH,
        linger: Duration::ZERO,
        retry_base: Duration::from_secs(3600),
        claim_idle: Duration::ZERO,
        reclaim_interval: Duration::ZERO,
        block: Duration::from_millis(20),
        max_queued: MAX_QUEUED,
        ..ConsumerSettings::default()
    };
    ProjectionConsumer::new(PROJECTION, w.pool().clone(), consumer(w, name), settings)
}

/// Entries pending for consumer `name` of the projection's group.
async fn pending_for(w: &World, name: &str) -> usize {
    let mut conn = w.redis.clone();
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(w.keys.stream())
        .arg(PROJECTION.name())
        .arg("-")
        .arg("+")
        .arg(10_000)
        .arg(name)
        .query_async(&mut conn)
        .await
        .unwrap();
    pending.len()
}

/// A world of 30 published orders, every one failing, all read by consumer `holder` and left
/// pending.
async fn failing_entries_pending_for(holder: &str) -> (World, usize) {
    let mut w = World::new().await;
    append_orders(w.pool(), 30).await;
    w.publish().await;
    refuse_every_summary(&w).await;
    let reader = consumer(&w, holder);
    reader.ensure_group(bus::FROM_BEGINNING).await.unwrap();
    let read = reader.read_new(10_000, Duration::ZERO).await.unwrap();
    assert!(read.len() > 30, "{} entries", read.len());
    (w, read.len())
}

/// Steps `consumer` ten times, checking the bound after each: full queues take no more work.
async fn step_within_the_bound(consumer: &mut ProjectionConsumer) {
    for step in 0..10 {
        let _ = consumer.process_batch().await;
        assert!(
            consumer.queued() < MAX_QUEUED + BATCH,
            "step {step}: {} entries queued",
            consumer.queued()
        );
    }
    assert!(consumer.queued() >= MAX_QUEUED, "it took work at all");
}

#[tokio::test]
async fn full_retry_queues_claim_no_more_entries_of_a_stopped_consumer() {
    let (w, stream_len) = failing_entries_pending_for("stopped").await;
    let mut live = projection_consumer(&w, "live");

    step_within_the_bound(&mut live).await;

    // What it did not take stays pending for the stopped consumer, for another instance.
    assert_eq!(
        pending_for(&w, "stopped").await + pending_for(&w, "live").await,
        stream_len
    );
    assert!(pending_for(&w, "stopped").await >= stream_len - MAX_QUEUED - BATCH);
}

#[tokio::test]
async fn full_retry_queues_read_no_more_of_the_consumers_own_pending_entries_after_a_restart() {
    let (w, stream_len) = failing_entries_pending_for("restarted").await;
    let mut restarted = projection_consumer(&w, "restarted");

    step_within_the_bound(&mut restarted).await;

    assert_eq!(pending_for(&w, "restarted").await, stream_len);
}
