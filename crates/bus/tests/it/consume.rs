use std::time::Duration;

use bus::testing::{PrivateRedis, unique_keys, wait_until};
use bus::{BusError, ConnectionManager, Consumer, Publisher, ensure_group};

use crate::{MAX_BLOCK, events, shared};

#[tokio::test]
async fn ensure_group_is_idempotent() {
    let (_client, mut conn, keys) = shared().await;
    assert!(
        ensure_group(&mut conn, keys.stream(), "g", "0")
            .await
            .expect("create")
    );
    assert!(
        !ensure_group(&mut conn, keys.stream(), "g", "0")
            .await
            .expect("again")
    );
    let groups: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(keys.stream())
        .query_async(&mut conn)
        .await
        .expect("xinfo");
    assert_eq!(groups.len(), 1);
    crate::cleanup(&mut conn, &keys).await;
}

#[tokio::test]
async fn entries_read_from_the_group_are_gone_from_the_pending_list_once_acked() {
    let (client, mut conn, keys) = shared().await;
    Publisher::new(conn.clone(), keys.clone(), 1000)
        .publish(&events(1..=3))
        .await
        .expect("publish");
    let consumer =
        Consumer::new(&client, conn.clone(), keys.clone(), "g", "c1", MAX_BLOCK).expect("consumer");
    consumer
        .ensure_group(bus::FROM_BEGINNING)
        .await
        .expect("group");

    let read = consumer
        .read_new(10, Duration::from_millis(100))
        .await
        .expect("read");
    let positions: Vec<_> = read.iter().map(|e| e.position()).collect();
    assert_eq!(positions, [Some(1), Some(2), Some(3)]);
    assert_eq!(
        bus::decode_entry(&read[0]).expect("decode").global_position,
        1
    );

    // Not acked yet: a restart with the same name sees them again.
    let own = consumer.read_own_pending(10).await.expect("pending");
    assert_eq!(own.len(), 3);
    assert_eq!(
        consumer
            .ack(&[read[0].id.as_str(), read[1].id.as_str()])
            .await
            .expect("ack"),
        2
    );
    let own = consumer.read_own_pending(10).await.expect("pending");
    assert_eq!(
        own.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["3-0"]
    );
    // Each read of the pending list is a delivery: first read, then the two above, then this.
    let counted = consumer
        .read_own_pending_counted(10, "0")
        .await
        .expect("pending");
    assert_eq!(
        counted
            .iter()
            .map(|(e, n)| (e.id.as_str(), *n))
            .collect::<Vec<_>>(),
        [("3-0", 4)]
    );
    // Paging on from the last id read delivers nothing again.
    assert!(
        consumer
            .read_own_pending_counted(10, "3-0")
            .await
            .expect("pending")
            .is_empty()
    );
    assert_eq!(
        consumer
            .read_own_pending_counted(10, "0")
            .await
            .expect("pending")[0]
            .1,
        5,
        "not delivered by the read after it"
    );

    let pending: (i64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg(keys.stream())
        .arg("g")
        .query_async(&mut conn)
        .await
        .expect("xpending");
    assert_eq!(pending.0, 1);
    assert!(
        consumer
            .read_new(10, Duration::ZERO)
            .await
            .expect("read")
            .is_empty()
    );
    crate::cleanup(&mut conn, &keys).await;
}

/// How long a test waits for Redis or a read to get somewhere before it fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// The number of clients blocked in a command (`INFO clients`) on the server of `conn`: on a
/// private server, whether the test's read is blocked right now.
async fn blocked_clients(conn: &mut ConnectionManager) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(conn)
        .await
        .expect("INFO clients");
    info.lines()
        .find_map(|line| line.strip_prefix("blocked_clients:"))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("no blocked_clients in {info}"))
}

/// Waits until exactly one client (the test's read) is blocked on the server of `conn`.
async fn wait_until_blocked(conn: &mut ConnectionManager) {
    wait_until(DEADLINE, "the read is blocked in Redis", || {
        let mut conn = conn.clone();
        async move { (blocked_clients(&mut conn).await == 1).then_some(()) }
    })
    .await;
}

/// A blocking read longer than a connection's default response timeout (500 ms) is not cut
/// off by it: it is seen blocked in Redis, then ends empty without an error. On a private
/// server, so that the blocked client is the test's.
#[tokio::test]
async fn a_blocking_read_of_two_seconds_returns_empty_rather_than_timing_out() {
    let redis = PrivateRedis::start().await.expect("a private redis-server");
    let client = bus::client(&redis.url()).expect("url");
    let mut conn = bus::connect(&client).await.expect("connect");
    let keys = unique_keys();
    let consumer =
        Consumer::new(&client, conn.clone(), keys.clone(), "g", "c1", MAX_BLOCK).expect("consumer");
    consumer.ensure_group("$").await.expect("group");

    let reader = tokio::spawn(async move { consumer.read_new(10, Duration::from_secs(2)).await });
    wait_until_blocked(&mut conn).await;
    let read = tokio::time::timeout(DEADLINE, reader)
        .await
        .expect("the read ends once its block time is over")
        .expect("join")
        .expect("no timeout error");
    assert!(read.is_empty(), "{read:?}");
    assert_eq!(blocked_clients(&mut conn).await, 0);
}

/// While a read blocks on its own connection, the consumer's shared connection still answers
/// (an ack completes while the read is seen blocked), and the read returns an entry published
/// meanwhile, long before its block time is over. The group starts at `$`, so the read can only
/// return what is published after it blocked.
#[tokio::test]
async fn a_blocked_read_does_not_hold_up_acks_and_wakes_up_on_publish() {
    let redis = PrivateRedis::start().await.expect("a private redis-server");
    let client = bus::client(&redis.url()).expect("url");
    let mut conn = bus::connect(&client).await.expect("connect");
    let keys = unique_keys();
    // Far longer than the test's deadline: only the publish can end the read in time.
    let block = Duration::from_secs(300);
    let consumer = std::sync::Arc::new(
        Consumer::new(&client, conn.clone(), keys.clone(), "g", "c1", block).expect("consumer"),
    );
    consumer.ensure_group("$").await.expect("group");
    let reader = {
        let consumer = consumer.clone();
        tokio::spawn(async move { consumer.read_new(10, block).await })
    };
    wait_until_blocked(&mut conn).await;

    let acked = tokio::time::timeout(DEADLINE, consumer.ack(&["1-0"]))
        .await
        .expect("an ack is answered while a read blocks")
        .expect("ack");
    assert_eq!(acked, 0);
    assert_eq!(
        blocked_clients(&mut conn).await,
        1,
        "the read was still blocked when the ack was answered"
    );

    Publisher::new(conn.clone(), keys.clone(), 1000)
        .publish(&events([1]))
        .await
        .expect("publish");
    let read = tokio::time::timeout(DEADLINE, reader)
        .await
        .expect("the blocked read wakes up on the publish")
        .expect("join")
        .expect("read");
    let positions: Vec<_> = read.iter().map(|e| e.position()).collect();
    assert_eq!(positions, [Some(1)]);
}

#[tokio::test]
async fn autoclaim_takes_over_entries_of_a_consumer_that_stopped_acking() {
    let (client, mut conn, keys) = shared().await;
    Publisher::new(conn.clone(), keys.clone(), 1000)
        .publish(&events(1..=3))
        .await
        .expect("publish");
    let dead = Consumer::new(&client, conn.clone(), keys.clone(), "g", "dead", MAX_BLOCK)
        .expect("consumer");
    dead.ensure_group("0").await.expect("group");
    assert_eq!(
        dead.read_new(10, Duration::ZERO).await.expect("read").len(),
        3
    );

    let alive = Consumer::new(&client, conn.clone(), keys.clone(), "g", "alive", MAX_BLOCK)
        .expect("consumer");
    let claimed = wait_until(
        Duration::from_secs(5),
        "the entries are idle long enough to claim",
        || async {
            let claimed = alive
                .autoclaim(Duration::from_millis(50), 10, |_| false)
                .await
                .expect("autoclaim");
            (!claimed.is_empty()).then_some(claimed)
        },
    )
    .await;
    let ids: Vec<_> = claimed.iter().map(|(e, n)| (e.id.as_str(), *n)).collect();
    assert_eq!(
        ids,
        [("1-0", 2), ("2-0", 2), ("3-0", 2)],
        "second delivery of each"
    );
    assert_eq!(
        bus::decode_entry(&claimed[2].0)
            .expect("decode")
            .global_position,
        3
    );

    // Now they are the live consumer's own pending entries.
    assert_eq!(alive.read_own_pending(10).await.expect("own").len(), 3);
    assert!(dead.read_own_pending(10).await.expect("own").is_empty());
    crate::cleanup(&mut conn, &keys).await;
}

/// Delivery count of `id` in group `g`.
async fn deliveries(conn: &mut bus::ConnectionManager, keys: &bus::StreamKeys, id: &str) -> i64 {
    let rows: Vec<(String, String, i64, i64)> = redis::cmd("XPENDING")
        .arg(keys.stream())
        .arg("g")
        .arg(id)
        .arg(id)
        .arg(1)
        .query_async(conn)
        .await
        .expect("xpending");
    rows.first().map_or(0, |row| row.3)
}

#[tokio::test]
async fn autoclaim_leaves_what_the_caller_skips_untouched_and_claimable_by_others() {
    let (client, mut conn, keys) = shared().await;
    Publisher::new(conn.clone(), keys.clone(), 1000)
        .publish(&events(1..=2))
        .await
        .expect("publish");
    let holder = Consumer::new(
        &client,
        conn.clone(),
        keys.clone(),
        "g",
        "holder",
        MAX_BLOCK,
    )
    .expect("consumer");
    holder.ensure_group("0").await.expect("group");
    assert_eq!(
        holder
            .read_new(10, Duration::ZERO)
            .await
            .expect("read")
            .len(),
        2
    );
    // The holder keeps 1-0 on purpose; 2-0 it lost track of.
    for _ in 0..3 {
        let claimed = holder
            .autoclaim(Duration::ZERO, 10, |id| id == "1-0")
            .await
            .expect("autoclaim");
        let ids: Vec<_> = claimed.iter().map(|(e, _)| e.id.as_str()).collect();
        assert_eq!(ids, ["2-0"]);
    }
    assert_eq!(
        deliveries(&mut conn, &keys, "1-0").await,
        1,
        "never counted again"
    );
    assert_eq!(deliveries(&mut conn, &keys, "2-0").await, 4);

    let other = Consumer::new(&client, conn.clone(), keys.clone(), "g", "other", MAX_BLOCK)
        .expect("consumer");
    let claimed = other
        .autoclaim(Duration::ZERO, 10, |id| id == "2-0")
        .await
        .expect("autoclaim");
    let ids: Vec<_> = claimed.iter().map(|(e, n)| (e.id.as_str(), *n)).collect();
    assert_eq!(ids, [("1-0", 2)]);
    crate::cleanup(&mut conn, &keys).await;
}

#[tokio::test]
async fn autoclaim_acknowledges_entries_trimmed_while_pending() {
    let (client, mut conn, keys) = shared().await;
    Publisher::new(conn.clone(), keys.clone(), 1000)
        .publish(&events(1..=2))
        .await
        .expect("publish");
    let dead = Consumer::new(&client, conn.clone(), keys.clone(), "g", "dead", MAX_BLOCK)
        .expect("consumer");
    dead.ensure_group("0").await.expect("group");
    dead.read_new(10, Duration::ZERO).await.expect("read");
    let _: i64 = redis::cmd("XDEL")
        .arg(keys.stream())
        .arg("1-0")
        .query_async(&mut conn)
        .await
        .expect("xdel");

    let alive = Consumer::new(&client, conn.clone(), keys.clone(), "g", "alive", MAX_BLOCK)
        .expect("consumer");
    let claimed = wait_until(Duration::from_secs(5), "the entry is claimable", || async {
        let claimed = alive
            .autoclaim(Duration::from_millis(50), 10, |_| false)
            .await
            .expect("autoclaim");
        (!claimed.is_empty()).then_some(claimed)
    })
    .await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].0.id, "2-0");
    let pending: (i64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg(keys.stream())
        .arg("g")
        .query_async(&mut conn)
        .await
        .expect("xpending");
    assert_eq!(pending.0, 1, "only 2-0 remains pending");
    crate::cleanup(&mut conn, &keys).await;
}

#[tokio::test]
async fn stale_consumers_without_pending_entries_are_removed_but_never_oneself() {
    let (client, mut conn, keys) = shared().await;
    Publisher::new(conn.clone(), keys.clone(), 1000)
        .publish(&events(1..=2))
        .await
        .expect("publish");
    let consumer = |name: &str| {
        Consumer::new(&client, conn.clone(), keys.clone(), "g", name, MAX_BLOCK).expect("consumer")
    };
    let (me, busy, idle) = (consumer("me"), consumer("busy"), consumer("idle"));
    me.ensure_group("0").await.expect("group");
    // `busy` holds an entry unacknowledged; `idle` acknowledged its entry; `me` has none.
    assert_eq!(
        busy.read_new(1, Duration::ZERO).await.expect("read").len(),
        1
    );
    let read = idle.read_new(1, Duration::ZERO).await.expect("read");
    assert_eq!(idle.ack(&[read[0].id.as_str()]).await.expect("ack"), 1);
    // Redis 7.0 creates a consumer only when XREADGROUP returns something, so create `me`.
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(keys.stream())
        .arg("g")
        .arg("me")
        .query_async(&mut conn)
        .await
        .expect("create consumer");

    let removed = wait_until(
        Duration::from_secs(5),
        "the idle consumer is stale",
        || async {
            let removed = me
                .remove_stale_consumers(Duration::from_millis(50))
                .await
                .expect("remove");
            (!removed.is_empty()).then_some(removed)
        },
    )
    .await;
    assert_eq!(removed, ["idle"]);
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(keys.stream())
        .arg("g")
        .query_async(&mut conn)
        .await
        .expect("xinfo");
    assert_eq!(consumers.len(), 2, "me and busy remain");
    crate::cleanup(&mut conn, &keys).await;
}

#[tokio::test]
async fn a_destroyed_group_is_reported_as_no_group() {
    let (client, mut conn, keys) = shared().await;
    Publisher::new(conn.clone(), keys.clone(), 1000)
        .publish(&events(1..=2))
        .await
        .expect("publish");
    let consumer =
        Consumer::new(&client, conn.clone(), keys.clone(), "g", "c1", MAX_BLOCK).expect("consumer");
    consumer.ensure_group("0").await.expect("group");
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(keys.stream())
        .arg("g")
        .query_async(&mut conn)
        .await
        .expect("destroy");

    let err = consumer
        .read_new(10, Duration::from_millis(100))
        .await
        .expect_err("no group");
    assert!(
        matches!(&err, BusError::NoGroup { group, .. } if group == "g"),
        "{err:?}"
    );
    assert!(err.is_no_group() && !err.is_retryable());
    for err in [
        consumer.read_own_pending(10).await.expect_err("no group"),
        consumer
            .autoclaim(Duration::from_millis(1), 10, |_| false)
            .await
            .map(|_| ())
            .expect_err("no group"),
        consumer
            .remove_stale_consumers(Duration::from_millis(1))
            .await
            .map(|_| ())
            .expect_err("no group"),
    ] {
        assert!(err.is_no_group(), "{err:?}");
    }

    // Recreating the group heals it.
    assert!(consumer.ensure_group("0").await.expect("recreate"));
    assert_eq!(
        consumer
            .read_new(10, Duration::ZERO)
            .await
            .expect("read")
            .len(),
        2
    );
    crate::cleanup(&mut conn, &keys).await;
}

#[tokio::test]
async fn an_entry_with_a_field_that_is_not_utf8_is_read_marked_and_the_entries_around_it_flow() {
    let (client, mut conn, keys) = shared().await;
    let publisher = Publisher::new(conn.clone(), keys.clone(), 1000);
    publisher.publish(&events(1..=1)).await.expect("publish");
    // Added by hand or by another client: Redis stores bytes.
    let _: String = redis::cmd("XADD")
        .arg(keys.stream())
        .arg("1-1")
        .arg("stream_id")
        .arg(&b"order-\xff"[..])
        .arg("data")
        .arg(&b"{\"a\":\"\xfe\"}"[..])
        .query_async(&mut conn)
        .await
        .expect("xadd");
    publisher.publish(&events(2..=3)).await.expect("publish");
    let consumer =
        Consumer::new(&client, conn.clone(), keys.clone(), "g", "c1", MAX_BLOCK).expect("consumer");
    consumer.ensure_group("0").await.expect("group");

    let check = |entries: &[bus::StreamEntry]| {
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["1-0", "1-1", "2-0", "3-0"]);
        let bad = &entries[1];
        assert_eq!(bad.field("stream_id"), Some(r"order-\xff"));
        assert_eq!(bad.field("data"), Some(r#"{"a":"\xfe"}"#));
        assert_eq!(bad.unreadable_fields(), ["stream_id", "data"]);
        let error = bus::decode_entry(bad).expect_err("refused").to_string();
        assert!(error.contains("not UTF-8"), "{error}");
        for good in [&entries[0], &entries[2], &entries[3]] {
            bus::decode_entry(good).expect("the others decode");
        }
    };
    check(
        &consumer
            .read_new(10, Duration::ZERO)
            .await
            .expect("read new"),
    );
    // A restart with the same name reads them again from its pending list.
    check(
        &consumer
            .read_own_pending(10)
            .await
            .expect("read own pending"),
    );
    // Another consumer claims them.
    let other =
        Consumer::new(&client, conn.clone(), keys.clone(), "g", "c2", MAX_BLOCK).expect("consumer");
    let claimed = other
        .autoclaim(Duration::ZERO, 10, |_| false)
        .await
        .expect("autoclaim");
    check(&claimed.into_iter().map(|(e, _)| e).collect::<Vec<_>>());
    crate::cleanup(&mut conn, &keys).await;
}
