use std::time::Duration;

use bus::{Consumer, GroupInfo, Publisher, StreamInfo, inspect};

use crate::{events, shared};

const MAX_BLOCK: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_stream_not_published_to_yet_is_empty_without_groups() {
    let (_client, conn, keys) = shared().await;
    let info = inspect(&conn, &keys).await.expect("inspect");
    assert_eq!(
        info,
        StreamInfo {
            length: 0,
            last_position: None,
            groups: Vec::new(),
        }
    );
}

#[tokio::test]
async fn the_stream_shows_its_newest_position_and_each_group_its_pending_entries_and_lag() {
    let (client, conn, keys) = shared().await;
    let publisher = Publisher::new(conn.clone(), keys.clone(), bus::DEFAULT_HARD_CAP);
    publisher.publish(&events(1..=5)).await.expect("publish");
    let consumer = Consumer::new(
        &client,
        conn.clone(),
        keys.clone(),
        "order_summaries",
        "c1",
        MAX_BLOCK,
    )
    .expect("consumer");
    consumer
        .ensure_group(bus::FROM_BEGINNING)
        .await
        .expect("group");
    let delivered = consumer
        .read_new(2, Duration::ZERO)
        .await
        .expect("read two");
    consumer
        .ack(&[delivered[0].id.as_str()])
        .await
        .expect("ack one");
    let idle = Consumer::new(
        &client,
        conn.clone(),
        keys.clone(),
        "customer_stats",
        "c2",
        MAX_BLOCK,
    )
    .expect("consumer");
    idle.ensure_group(bus::FROM_BEGINNING).await.expect("group");

    let info = inspect(&conn, &keys).await.expect("inspect");
    assert_eq!((info.length, info.last_position), (5, Some(5)));
    assert_eq!(
        info.groups,
        vec![
            GroupInfo {
                name: "customer_stats".into(),
                consumers: 0,
                pending: 0,
                last_delivered_id: "0-0".into(),
                lag: Some(5),
            },
            GroupInfo {
                name: "order_summaries".into(),
                consumers: 1,
                pending: 1,
                last_delivered_id: "2-0".into(),
                lag: Some(3),
            },
        ]
    );
}

/// An entry added by hand above the relay's (`XADD … *`, as an operator's test entry is) has
/// an id of the same form, a millisecond timestamp: the stream's newest position is still the
/// relay's, not that timestamp, which would show the relay far ahead of the event store.
#[tokio::test]
async fn an_entry_added_by_hand_is_not_taken_for_the_relays_newest_position() {
    let (_client, conn, keys) = shared().await;
    let publisher = Publisher::new(conn.clone(), keys.clone(), bus::DEFAULT_HARD_CAP);
    publisher.publish(&events(1..=3)).await.expect("publish");
    let mut raw = conn.clone();
    let _: String = redis::cmd("XADD")
        .arg(keys.stream())
        .arg("*")
        .arg("position")
        .arg("not-a-number")
        .arg("event_id")
        .arg(uuid::Uuid::new_v4().to_string())
        .query_async(&mut raw)
        .await
        .expect("a hand-made entry");

    let info = inspect(&conn, &keys).await.expect("inspect");
    assert_eq!((info.length, info.last_position), (4, Some(3)));
}
