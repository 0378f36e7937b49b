//! Entries the relay never wrote, added to the event stream by hand or by another client: one
//! that cannot be decoded but names a real order, and ones that copy a real event's position
//! and id under another stream or version. None of them is an event of the store, so none may
//! hold back, park or change a real order.

use bus::DeadLetterQueue;
use bus::testing::wait_until;
use events::{OrderState, RecordedEvent, order_stream_id};
use projector::ProjectionKind;
use uuid::Uuid;

use super::{FAST, parked_streams, wait_nothing_pending};
use crate::support::{self, DEADLINE, World, append_orders, commands, run_commands};

/// Adds `fields` to the stream as entry `id`, as `redis-cli XADD` would.
async fn xadd(w: &World, id: &str, fields: &[(&str, String)]) {
    let mut conn = w.redis.clone();
    let mut cmd = redis::cmd("XADD");
    cmd.arg(w.keys.stream()).arg(id);
    for (name, value) in fields {
        cmd.arg(*name).arg(value);
    }
    let _: String = cmd.query_async(&mut conn).await.unwrap();
}

/// `event`'s fields as the relay encodes them.
fn fields_of(event: &RecordedEvent) -> Vec<(&'static str, String)> {
    bus::encode_fields(event)
}

/// The version `projection` has applied of `stream`, and the version it is parked at.
async fn bookkeeping(w: &World, projection: ProjectionKind, stream: &str) -> (i64, Option<i64>) {
    sqlx::query_as(
        "SELECT version, parked_version FROM projection_streams \
         WHERE projection = $1 AND stream_id = $2",
    )
    .bind(projection.name())
    .bind(stream)
    .fetch_optional(w.pool())
    .await
    .unwrap()
    .unwrap_or((0, None))
}

/// `XADD <stream> <id> stream_id order-<real order> position x`, between the order's first
/// events and its later ones: the entry is dead-lettered on its own, with the order it names
/// in the letter, while the order's later entries are applied past it; no order is parked.
#[tokio::test]
async fn an_undecodable_entry_naming_a_real_order_is_dead_lettered_without_holding_that_order_back()
{
    let mut w = World::new().await;
    let order = Uuid::new_v4();
    let cmds = commands(order, Uuid::new_v4(), support::Fate::Shipped);
    let mut state = OrderState::default();
    run_commands(w.pool(), order, &cmds[..2], &mut state).await;
    w.publish().await;
    let stream = order_stream_id(order);
    let head = store::head_position(w.pool()).await.unwrap();
    // `<head>-1` keeps the relay's later `<position>-0` ids valid.
    let bad_id = format!("{head}-1");
    xadd(
        &w,
        &bad_id,
        &[("stream_id", stream.clone()), ("position", "x".to_owned())],
    )
    .await;
    run_commands(w.pool(), order, &cmds[2..], &mut state).await;
    append_orders(w.pool(), 2).await;
    w.publish().await;
    let last = state.version;

    // No healing by the sweeper: the consumers alone must apply the order's later entries.
    let args = [FAST, &["--sweep-grace-ms", "600000"]].concat();
    let (token, task) = w.spawn_projector("solo", &args).await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    for projection in ProjectionKind::ALL {
        let letters = support::first_letters(&dlq, projection, "the entry is dead-lettered").await;
        assert_eq!(letters.len(), 1, "{projection}");
        assert_eq!(letters[0].original_id, bad_id);
        assert_eq!(letters[0].original.get("stream_id"), Some(&stream));
        assert!(
            letters[0].error.contains("position"),
            "{}",
            letters[0].error
        );
        wait_until(
            DEADLINE,
            &format!("{projection} applies the order to its last version"),
            || async {
                let (version, _) = bookkeeping(&w, projection, &stream).await;
                (version == last).then_some(())
            },
        )
        .await;
        wait_nothing_pending(&w, projection.name()).await;
        assert_eq!(parked_streams(&w, projection).await, 0, "{projection}");
    }
    w.wait_caught_up().await;
    w.assert_exact().await;
    token.cancel();
    task.await.unwrap().unwrap();
}

/// Two entries copy real events' positions and event ids: one names another order (a stream
/// the store has never seen), the other names the copied order at the version after its last.
/// Neither is the store's event at its position: both are acknowledged without being applied,
/// like entries of another history, and the read models equal the event store.
#[tokio::test]
async fn entries_reusing_a_real_position_and_event_id_under_another_stream_or_version_are_never_applied()
 {
    let mut w = World::new().await;
    let ids = append_orders(w.pool(), 2).await;
    w.publish().await;
    let head = store::head_position(w.pool()).await.unwrap();
    let created = store::read_stream(w.pool(), &order_stream_id(ids[0]), 0, 100)
        .await
        .unwrap()
        .remove(0);
    let copied_stream = order_stream_id(ids[1]);
    let copied = store::read_stream(w.pool(), &copied_stream, 0, 100)
        .await
        .unwrap();
    let copied_last = copied.last().unwrap().stream_version;

    // The first order's creation, as if it created a stranger.
    let stranger = Uuid::new_v4();
    let mut elsewhere = created.clone();
    elsewhere.stream_id = order_stream_id(stranger);
    elsewhere.data["order_id"] = stranger.to_string().into();
    // The second order's first item added again, one version after its last event.
    let mut later = copied[1].clone();
    later.stream_version = copied_last + 1;
    xadd(&w, &format!("{head}-1"), &fields_of(&elsewhere)).await;
    xadd(&w, &format!("{head}-2"), &fields_of(&later)).await;
    append_orders(w.pool(), 1).await;
    w.publish().await;

    let (token, task) = w.spawn_projector("solo", &[]).await;
    w.wait_caught_up().await;
    for projection in ProjectionKind::ALL {
        wait_nothing_pending(&w, projection.name()).await;
        assert_eq!(
            bookkeeping(&w, projection, &elsewhere.stream_id).await,
            (0, None),
            "{projection} applied the stranger's creation"
        );
        assert_eq!(
            bookkeeping(&w, projection, &copied_stream).await,
            (copied_last, None),
            "{projection} applied a version the store does not hold"
        );
    }
    let stranger_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM order_summaries WHERE order_id = $1")
            .bind(stranger)
            .fetch_one(w.pool())
            .await
            .unwrap();
    assert_eq!(stranger_rows, 0);
    w.assert_exact().await;
    token.cancel();
    task.await.unwrap().unwrap();
}
