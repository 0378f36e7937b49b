use std::time::Duration;

use bus::{ConnectionManager, Consumer, DeadLetterQueue, Publisher, StreamKeys};

use crate::{MAX_BLOCK, events, shared, xrange};

#[tokio::test]
async fn dead_lettering_writes_every_field_and_acknowledges_the_original() {
    let (client, mut conn, keys) = shared().await;
    let published = events(1..=2);
    Publisher::new(conn.clone(), keys.clone(), 1000)
        .publish(&published)
        .await
        .expect("publish");
    let consumer = Consumer::new(
        &client,
        conn.clone(),
        keys.clone(),
        "order_summaries",
        "c1",
        MAX_BLOCK,
    )
    .expect("consumer");
    consumer.ensure_group("0").await.expect("group");
    let read = consumer.read_new(10, Duration::ZERO).await.expect("read");

    let dlq_id = consumer
        .dead_letter(&read[0], "projection failed: boom", 5)
        .await
        .expect("dead-letter")
        .expect("the entry was pending for this consumer");

    // Acknowledged in the group: only 2-0 is still pending.
    let own = consumer.read_own_pending(10).await.expect("own");
    assert_eq!(
        own.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["2-0"]
    );

    // What `redis-cli XRANGE <stream>:dlq:order_summaries - +` shows.
    let dlq_key = keys.dlq("order_summaries");
    assert!(dlq_key.ends_with(":es:events:dlq:order_summaries"));
    let raw = xrange(&mut conn, &dlq_key).await;
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0].0, dlq_id);
    let get = |name: &str| {
        raw[0]
            .1
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .expect(name)
    };
    assert_eq!(get("error"), "projection failed: boom");
    assert_eq!(get("attempts"), "5");
    assert_eq!(get("original_id"), "1-0");
    assert_eq!(get("consumer"), "c1");
    assert!(chrono::DateTime::parse_from_rfc3339(&get("failed_at")).is_ok());
    assert_eq!(get("position"), "1");
    let data: serde_json::Value = serde_json::from_str(&get("data")).expect("data is JSON");
    assert_eq!(data, published[0].data);
    let _: serde_json::Value = serde_json::from_str(&get("metadata")).expect("metadata is JSON");

    // The admin helpers.
    let dlq = DeadLetterQueue::new(conn.clone(), keys.clone());
    assert_eq!(dlq.len("order_summaries").await.expect("len"), 1);
    let listed = dlq.list("order_summaries", 10).await.expect("list");
    assert_eq!(listed.len(), 1);
    let dead = &listed[0];
    assert_eq!(
        (
            dead.error.as_str(),
            dead.attempts,
            dead.original_id.as_str(),
            dead.consumer.as_str()
        ),
        ("projection failed: boom", 5, "1-0", "c1")
    );
    assert_eq!(
        dead.original.len(),
        9,
        "exactly the event fields: {:?}",
        dead.original
    );
    assert_eq!(dead.event().expect("decodes"), published[0]);
    assert_eq!(dead.original_entry().id, "1-0");
    assert_eq!(
        dlq.get("order_summaries", &dlq_id)
            .await
            .expect("get")
            .as_ref(),
        Some(dead)
    );
    assert_eq!(dlq.get("order_summaries", "1-1").await.expect("get"), None);

    assert_eq!(
        dlq.delete("order_summaries", &[dlq_id.as_str()])
            .await
            .expect("delete"),
        1
    );
    assert_eq!(dlq.len("order_summaries").await.expect("len"), 0);
    assert!(
        dlq.list("order_summaries", 10)
            .await
            .expect("list")
            .is_empty()
    );
    crate::cleanup(&mut conn, &keys).await;
}

#[tokio::test]
async fn a_consumer_dead_letters_an_entry_only_while_it_is_pending_for_that_consumer() {
    let (client, mut conn, keys) = shared().await;
    Publisher::new(conn.clone(), keys.clone(), 1000)
        .publish(&events(1..=2))
        .await
        .expect("publish");
    let consumer = |name: &str| {
        Consumer::new(&client, conn.clone(), keys.clone(), "g", name, MAX_BLOCK).expect("consumer")
    };
    let (first, claimer) = (consumer("first"), consumer("claimer"));
    first.ensure_group("0").await.expect("group");
    let read = first.read_new(10, Duration::ZERO).await.expect("read");
    assert_eq!(read.len(), 2);
    // The claimer takes 1-0 over while the first holder still has it in memory.
    let claimed = claimer
        .autoclaim(Duration::ZERO, 10, |id| id != "1-0")
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);

    assert_eq!(
        first.dead_letter(&read[0], "boom", 5).await.expect("run"),
        None,
        "the first holder no longer holds it"
    );
    assert!(
        claimer
            .dead_letter(&claimed[0].0, "boom", 6)
            .await
            .expect("run")
            .is_some()
    );
    assert_eq!(
        claimer
            .dead_letter(&claimed[0].0, "boom", 6)
            .await
            .expect("run"),
        None,
        "dead-lettered once"
    );
    // Acknowledged (applied) by its holder: never dead-lettered afterwards.
    assert_eq!(first.ack(&["2-0"]).await.expect("ack"), 1);
    assert_eq!(
        first.dead_letter(&read[1], "boom", 5).await.expect("run"),
        None
    );
    let letters = xrange(&mut conn, &keys.dlq("g")).await;
    assert_eq!(letters.len(), 1);
    crate::cleanup(&mut conn, &keys).await;
}

/// Whether group `g` records unfinished tries of entry `id`.
async fn has_tries(conn: &mut ConnectionManager, keys: &StreamKeys, id: &str) -> bool {
    redis::cmd("HEXISTS")
        .arg(keys.trying("g"))
        .arg(id)
        .query_async(conn)
        .await
        .expect("hexists")
}

/// Unfinished tries of an entry (`<stream>:trying:<group>`) go with its dead letter, whether a
/// consumer holding the entry writes it or the letter comes from the event store (a sweeper, a
/// rebuild): acknowledged, the entry is tried by nobody again, so its field would never go.
#[tokio::test]
async fn every_dead_letter_forgets_the_unfinished_tries_of_its_entry() {
    let (client, mut conn, keys) = shared().await;
    let published = events(1..=2);
    Publisher::new(conn.clone(), keys.clone(), 1000)
        .publish(&published)
        .await
        .expect("publish");
    let consumer =
        Consumer::new(&client, conn.clone(), keys.clone(), "g", "c1", MAX_BLOCK).expect("consumer");
    consumer.ensure_group("0").await.expect("group");
    let read = consumer.read_new(10, Duration::ZERO).await.expect("read");
    for entry in &read {
        assert_eq!(consumer.begin_try(&entry.id).await.expect("begin"), 1);
    }
    consumer
        .dead_letter(&read[0], "boom", 5)
        .await
        .expect("dead-letter")
        .expect("pending for this consumer");
    assert!(
        !has_tries(&mut conn, &keys, "1-0").await,
        "the holder's letter"
    );
    DeadLetterQueue::new(conn.clone(), keys.clone())
        .dead_letter("g", &read[1], "boom", 5, "g/sweeper")
        .await
        .expect("dead-letter");
    assert!(
        !has_tries(&mut conn, &keys, "2-0").await,
        "a letter from the store"
    );
    crate::cleanup(&mut conn, &keys).await;
}
