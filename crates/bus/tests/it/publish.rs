use bus::{Consumer, PublishOutcome, Publisher, StreamEntry, decode_entry, ensure_group};

use crate::{MAX_BLOCK, events, shared, xrange};

#[tokio::test]
async fn publishing_keeps_order_and_every_field_readable_with_xrange() {
    let (_client, mut conn, keys) = shared().await;
    let publisher = Publisher::new(conn.clone(), keys.clone(), bus::DEFAULT_HARD_CAP);
    let batch = events(1..=3);

    let outcome = publisher.publish(&batch).await.expect("publish");
    assert_eq!(
        outcome,
        PublishOutcome {
            appended: 3,
            already_present: 0,
            refused: 0
        }
    );

    let entries = xrange(&mut conn, keys.stream()).await;
    let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["1-0", "2-0", "3-0"]);
    let names: Vec<&str> = entries[0].1.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "position",
            "event_id",
            "stream_id",
            "stream_version",
            "event_type",
            "schema_version",
            "data",
            "metadata",
            "recorded_at"
        ]
    );
    let fields = &entries[1].1;
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .expect(name)
    };
    assert_eq!(get("position"), "2");
    let data: serde_json::Value = serde_json::from_str(&get("data")).expect("data is JSON text");
    assert_eq!(data, batch[1].data);
    let metadata: serde_json::Value =
        serde_json::from_str(&get("metadata")).expect("metadata is JSON text");
    assert_eq!(
        metadata["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert!(
        get("recorded_at").ends_with(".123456Z"),
        "{}",
        get("recorded_at")
    );

    for ((id, fields), event) in entries.into_iter().zip(&batch) {
        let entry = StreamEntry { id, fields };
        assert_eq!(entry.position(), Some(event.global_position));
        assert_eq!(&decode_entry(&entry).expect("decodes"), event);
    }
    assert_eq!(
        publisher.last_published_position().await.expect("last"),
        Some(3)
    );
    crate::cleanup(&mut conn, &keys).await;
}

#[tokio::test]
async fn publishing_the_same_batch_twice_appends_nothing_the_second_time() {
    let (_client, mut conn, keys) = shared().await;
    let publisher = Publisher::new(conn.clone(), keys.clone(), bus::DEFAULT_HARD_CAP);
    let batch = events(1..=4);
    publisher.publish(&batch).await.expect("first publish");

    let outcome = publisher.publish(&batch).await.expect("second publish");
    assert_eq!(
        outcome,
        PublishOutcome {
            appended: 0,
            already_present: 4,
            refused: 0
        }
    );
    assert_eq!(xrange(&mut conn, keys.stream()).await.len(), 4);
    crate::cleanup(&mut conn, &keys).await;
}

#[tokio::test]
async fn a_batch_overlapping_the_last_published_position_appends_only_the_new_events() {
    let (_client, mut conn, keys) = shared().await;
    let publisher = Publisher::new(conn.clone(), keys.clone(), bus::DEFAULT_HARD_CAP);
    let all = events(1..=6);
    publisher.publish(&all[..4]).await.expect("first publish");

    let outcome = publisher
        .publish(&all[2..])
        .await
        .expect("overlapping publish");
    assert_eq!(
        outcome,
        PublishOutcome {
            appended: 2,
            already_present: 2,
            refused: 0
        }
    );
    let ids: Vec<String> = xrange(&mut conn, keys.stream())
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, ["1-0", "2-0", "3-0", "4-0", "5-0", "6-0"]);
    crate::cleanup(&mut conn, &keys).await;
}

/// An entry added by hand with a time-based id sits above every position: what Redis refuses
/// below it is not on the stream, and must not pass for a republished batch.
#[tokio::test]
async fn entries_below_a_foreign_entry_are_refused_not_already_present() {
    let (_client, mut conn, keys) = shared().await;
    let publisher = Publisher::new(conn.clone(), keys.clone(), bus::DEFAULT_HARD_CAP);
    let all = events(1..=4);
    publisher.publish(&all[..2]).await.expect("first publish");
    let _: String = redis::cmd("XADD")
        .arg(keys.stream())
        .arg("*")
        .arg("probe")
        .arg("1")
        .query_async(&mut conn)
        .await
        .expect("XADD *");

    // The first two are there (a retry of a batch whose reply was lost); the next two are not.
    let outcome = publisher.publish(&all).await.expect("publish");
    assert_eq!(
        outcome,
        PublishOutcome {
            appended: 0,
            already_present: 2,
            refused: 2
        }
    );
    crate::cleanup(&mut conn, &keys).await;
}

#[tokio::test]
async fn an_unsorted_batch_is_rejected_before_reaching_redis() {
    let (_client, mut conn, keys) = shared().await;
    let publisher = Publisher::new(conn.clone(), keys.clone(), bus::DEFAULT_HARD_CAP);
    let batch = events([2, 1]);
    let err = publisher.publish(&batch).await.expect_err("unsorted");
    assert!(
        matches!(err, bus::BusError::InvalidArgument { .. }),
        "{err}"
    );
    assert!(xrange(&mut conn, keys.stream()).await.is_empty());
    assert_eq!(
        publisher.last_published_position().await.expect("last"),
        None
    );
    crate::cleanup(&mut conn, &keys).await;
}

#[tokio::test]
async fn trimming_keeps_unacked_entries_of_a_lagging_group_and_removes_acked_ones_beyond_retain() {
    let (client, mut conn, keys) = shared().await;
    let publisher = Publisher::new(conn.clone(), keys.clone(), bus::DEFAULT_HARD_CAP);
    publisher.publish(&events(1..=20)).await.expect("publish");
    ensure_group(&mut conn, keys.stream(), "fast", "0")
        .await
        .expect("group");
    ensure_group(&mut conn, keys.stream(), "lagging", "0")
        .await
        .expect("group");

    let fast = Consumer::new(&client, conn.clone(), keys.clone(), "fast", "f1", MAX_BLOCK)
        .expect("consumer");
    let read = fast
        .read_new(100, std::time::Duration::ZERO)
        .await
        .expect("read");
    fast.ack(&read.iter().map(|e| e.id.clone()).collect::<Vec<_>>())
        .await
        .expect("ack");
    // The lagging group has read up to 12 but acknowledged only up to 7.
    let lagging = Consumer::new(
        &client,
        conn.clone(),
        keys.clone(),
        "lagging",
        "l1",
        MAX_BLOCK,
    )
    .expect("consumer");
    let read = lagging
        .read_new(12, std::time::Duration::ZERO)
        .await
        .expect("read");
    lagging
        .ack(&read[..7].iter().map(|e| e.id.clone()).collect::<Vec<_>>())
        .await
        .expect("ack");

    let outcome = publisher.trim_exact(5).await.expect("trim");
    assert_eq!(outcome.min_position, Some(8));
    let first = xrange(&mut conn, keys.stream())
        .await
        .first()
        .map(|(id, _)| id.clone());
    assert_eq!(
        first.as_deref(),
        Some("8-0"),
        "entries 8..12 are pending in the lagging group"
    );

    // Once the lagging group catches up, only `retain` entries stay.
    let rest = lagging
        .read_new(100, std::time::Duration::ZERO)
        .await
        .expect("read");
    let mut ids: Vec<String> = read[7..].iter().map(|e| e.id.clone()).collect();
    ids.extend(rest.iter().map(|e| e.id.clone()));
    lagging.ack(&ids).await.expect("ack");
    let outcome = publisher.trim_exact(5).await.expect("trim");
    assert_eq!(outcome.min_position, Some(16));
    let ids: Vec<String> = xrange(&mut conn, keys.stream())
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, ["16-0", "17-0", "18-0", "19-0", "20-0"]);
    crate::cleanup(&mut conn, &keys).await;
}

#[tokio::test]
async fn approximate_trimming_never_removes_what_a_group_has_not_read() {
    let (_client, mut conn, keys) = shared().await;
    let publisher = Publisher::new(conn.clone(), keys.clone(), bus::DEFAULT_HARD_CAP);
    for chunk in (1..=600).collect::<Vec<i64>>().chunks(200) {
        publisher
            .publish(&events(chunk.iter().copied()))
            .await
            .expect("publish");
    }
    // A group that has read nothing, created after everything was published: it needs it all.
    ensure_group(&mut conn, keys.stream(), "late", "250")
        .await
        .expect("group");

    let outcome = publisher.trim(10).await.expect("trim");
    assert_eq!(outcome.min_position, Some(250));
    let first: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(keys.stream())
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("xrange");
    let first = bus::StreamEntry {
        id: first[0].0.clone(),
        fields: vec![],
    }
    .position()
    .expect("position");
    assert!(
        first <= 251,
        "the entry after the group's last delivered id is kept (first = {first})"
    );
    assert!(
        outcome.removed > 0 && first > 1,
        "whole nodes below 250 are removed"
    );
    crate::cleanup(&mut conn, &keys).await;
}

#[tokio::test]
async fn trimming_a_stream_without_groups_keeps_the_retained_entries() {
    let (_client, mut conn, keys) = shared().await;
    let publisher = Publisher::new(conn.clone(), keys.clone(), bus::DEFAULT_HARD_CAP);
    publisher.publish(&events(1..=10)).await.expect("publish");
    let outcome = publisher.trim_exact(3).await.expect("trim");
    assert_eq!(outcome.removed, 7);
    assert_eq!(xrange(&mut conn, keys.stream()).await.len(), 3);
    // Trimming nothing at all is fine too.
    let empty = bus::testing::unique_keys();
    let outcome = Publisher::new(conn.clone(), empty, 10)
        .trim(3)
        .await
        .expect("trim");
    assert_eq!(outcome, bus::TrimOutcome::default());
    crate::cleanup(&mut conn, &keys).await;
}
