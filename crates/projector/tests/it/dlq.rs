//! `projector dlq replay|purge` against letters that do not name the event holding their order
//! back: letters written behind the event that failed, and letters from another history.

use bus::DeadLetterQueue;
use events::{OrderState, RecordedEvent, order_stream_id};
use projector::ProjectionKind;
use projector::apply::{apply_batch, park_stream};
use projector::sweeper::entry_of;
use uuid::Uuid;

use crate::support::{self, Fate, World, commands, run_commands};

const PROJECTION: ProjectionKind = ProjectionKind::OrderSummaries;

/// A shipped order (six events) whose first `applied` events are applied and whose next one is
/// parked, as a consumer leaves an order after dead-lettering that event; returns its events.
async fn parked_order(w: &World, applied: usize) -> Vec<RecordedEvent> {
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let cmds = commands(order, Uuid::new_v4(), Fate::Shipped);
    run_commands(w.pool(), order, &cmds, &mut state).await;
    let stream = order_stream_id(order);
    let events = store::read_stream(w.pool(), &stream, 0, 100).await.unwrap();
    assert_eq!(events.len(), 6);
    let mut conn = w.pool().acquire().await.unwrap();
    apply_batch(&mut conn, PROJECTION, &events[..applied])
        .await
        .unwrap();
    let parked = park_stream(&mut conn, PROJECTION, &stream, "boom")
        .await
        .unwrap();
    assert_eq!(parked, applied as i64 + 1);
    events
}

/// The stored version and parked version of `stream`.
async fn bookkeeping(w: &World, stream: &str) -> (i64, Option<i64>) {
    sqlx::query_as(
        "SELECT version, parked_version FROM projection_streams \
         WHERE projection = $1 AND stream_id = $2",
    )
    .bind(PROJECTION.name())
    .bind(stream)
    .fetch_one(w.pool())
    .await
    .unwrap()
}

/// Writes a dead letter of `event` and returns its id.
async fn letter(dlq: &DeadLetterQueue, event: &RecordedEvent) -> String {
    dlq.dead_letter(PROJECTION.name(), &entry_of(event), "boom", 5, "test")
        .await
        .unwrap()
}

/// Runs `projector dlq <args>` on the world; returns whether it succeeded and its stdout.
async fn run_dlq(w: &World, args: &[&str]) -> (bool, String) {
    let output = support::projector_command(w, &[&["dlq"], args].concat())
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn purge_skips_only_the_event_its_letter_names_and_only_while_the_order_is_parked_at_it() {
    let w = World::new().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    // Versions 1-3 applied, parked at 4; a letter of version 5 (an entry given up on behind
    // the one that failed) and one of version 4.
    let events = parked_order(&w, 3).await;
    let stream = events[0].stream_id.clone();
    let behind = letter(&dlq, &events[4]).await;
    let failed = letter(&dlq, &events[3]).await;

    let (ok, stdout) = run_dlq(&w, &["purge", "order_summaries", "--id", &behind]).await;
    assert!(!ok, "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("FAILED") && stdout.contains("parked at version 4"),
        "{stdout}"
    );
    assert_eq!(
        bookkeeping(&w, &stream).await,
        (3, Some(4)),
        "nothing skipped"
    );
    assert_eq!(dlq.len(PROJECTION.name()).await.unwrap(), 2);

    let (ok, stdout) = run_dlq(&w, &["purge", "order_summaries", "--id", &failed]).await;
    assert!(ok, "{stdout}");
    assert!(stdout.contains("skipped version 4 of"), "{stdout}");
    assert_eq!(bookkeeping(&w, &stream).await, (6, None));
    // Version 5 was applied, not skipped: the order is shipped and paid.
    let status: String =
        sqlx::query_scalar("SELECT status FROM order_summaries WHERE order_id = $1")
            .bind(events::order_id_of_stream(&stream).unwrap())
            .fetch_one(w.pool())
            .await
            .unwrap();
    assert_eq!(status, "shipped");

    // The letter of version 5 names an event applied meanwhile: deleted, nothing skipped.
    let (ok, stdout) = run_dlq(&w, &["purge", "order_summaries", "--id", &behind]).await;
    assert!(ok && stdout.contains("nothing skipped"), "{stdout}");
    assert_eq!(dlq.len(PROJECTION.name()).await.unwrap(), 0);
    assert_eq!(bookkeeping(&w, &stream).await, (6, None));
}

#[tokio::test]
async fn purge_and_replay_refuse_a_letter_whose_event_the_store_does_not_hold_at_its_position() {
    let w = World::new().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    // An unrelated order parked at its version 4, and two letters of a lost history: one at
    // that event's position with another event id, one past the store's head.
    let events = parked_order(&w, 3).await;
    let stream = events[0].stream_id.clone();
    let mut lost = events[3].clone();
    lost.event_id = Uuid::new_v4();
    lost.stream_id = order_stream_id(Uuid::new_v4());
    let reused = letter(&dlq, &lost).await;
    let mut beyond = events[5].clone();
    beyond.event_id = Uuid::new_v4();
    beyond.global_position += 100;
    let past_head = letter(&dlq, &beyond).await;

    for id in [&reused, &past_head] {
        for action in ["purge", "replay"] {
            let (ok, stdout) = run_dlq(&w, &[action, "order_summaries", "--id", id]).await;
            assert!(!ok, "{stdout}");
            assert_eq!(stdout.lines().count(), 1, "{stdout}");
            assert!(
                stdout.contains("FAILED") && stdout.contains("another history"),
                "{stdout}"
            );
        }
    }
    assert_eq!(bookkeeping(&w, &stream).await, (3, Some(4)), "untouched");
    assert_eq!(dlq.len(PROJECTION.name()).await.unwrap(), 2);
}
