//! PostgreSQL restored from a backup while Redis keeps its stream: two histories never mix.

use crate::support::*;
use store::testing::PrivatePostgres;
use uuid::Uuid;

/// The `(position, event_id)` of the store's events from `after` on, in position order.
async fn store_events(database_url: &str, after: i64) -> Vec<(i64, String)> {
    let pool = sqlx::PgPool::connect(database_url)
        .await
        .expect("connect to the database");
    let rows: Vec<(i64, Uuid)> = sqlx::query_as(
        "SELECT global_position, event_id FROM events WHERE global_position > $1 \
         ORDER BY global_position",
    )
    .bind(after)
    .fetch_all(&pool)
    .await
    .expect("read the events");
    pool.close().await;
    rows.into_iter()
        .map(|(position, id)| (position, id.to_string()))
        .collect()
}

/// Waits until both read models have applied `head` and requires them to equal a fresh fold
/// of the event store.
async fn assert_read_models_follow_the_store(
    http: &reqwest::Client,
    query: &Service,
    database_url: &str,
    stream: &str,
    head: i64,
) {
    // One read per read model with read-your-writes at `head` (a customer without orders is a
    // 404, answered once `customer_stats` has applied `head`).
    let reads = [
        format!("/orders?limit=1&min_position={head}&wait_ms=10000"),
        format!(
            "/customers/{}?min_position={head}&wait_ms=10000",
            Uuid::new_v4()
        ),
    ];
    for path in reads {
        let response = http
            .get(query.url(&path))
            .send()
            .await
            .expect("the query service answers");
        assert!(
            [200, 404].contains(&response.status().as_u16()),
            "{path}: {}",
            response.status()
        );
    }
    for projection in ["order_summaries", "customer_stats"] {
        let (exact, report) = projector_admin(database_url, stream, &["verify", projection]).await;
        assert!(exact, "{projection}: {report}");
    }
}

/// A backup is taken; orders are written and published while no projector runs; the backup is
/// restored (those orders are gone from the event store, not from Redis, nor from the command
/// service's cache, which must not be trusted: a command on one is a 404; a client following
/// the log from the lost head is told the log now ends before it) and new orders take their
/// positions. The relay publishes nothing onto the stream that contradicts the store and
/// says so (`relay_stream_diverged`); the projector, started again, acknowledges the lost
/// orders' entries without applying them, and the read models follow the store alone. Once the
/// operator renames the stream away, the relay publishes the store's history into a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_from_backup_never_mixes_the_lost_history_into_redis_or_the_read_models() {
    let mut postgres = PrivatePostgres::start()
        .await
        .expect("a private PostgreSQL server");
    let database_url = postgres.url("orders");
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();
    let projector_env = [("SWEEP_GRACE_MS", "300")];
    let (command, mut projector, query) =
        start_on_a_new_database(&http, &database_url, &stream, &projector_env).await;
    let client = redis::Client::open(REDIS_URL).expect("redis url");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");

    let mut head = 0;
    for _ in 0..3 {
        head = create_order_with_a_book(&http, &command).await.1;
    }
    assert_read_models_follow_the_store(&http, &query, &database_url, &stream, head).await;
    let backup = postgres.backup().await.expect("a backup");
    for service in [&command, &projector, &query] {
        wait_readiness(&http, service, 200).await;
    }

    // Orders the restore will lose, published but not consumed.
    assert!(projector.terminate().await.success());
    let mut lost_orders = Vec::new();
    let mut lost_head = head;
    for _ in 0..3 {
        let (order_id, position) = create_order_with_a_book(&http, &command).await;
        lost_orders.push(order_id);
        lost_head = position;
    }
    bus::testing::wait_until(DEADLINE, "the lost orders are published", || {
        let mut redis = redis.clone();
        let stream = stream.clone();
        async move {
            let positions = published_positions(&mut redis, &stream).await;
            (positions.last() == Some(&lost_head)).then_some(())
        }
    })
    .await;
    let before_restore = stream_events(&mut redis, &stream).await;

    postgres
        .restore(&backup)
        .await
        .expect("the backup restored");
    for service in [&command, &query] {
        wait_readiness(&http, service, 200).await;
    }
    // The command service still has the lost orders in its cache; it must not trust them. (A
    // pooled connection the restart cut is found on its first use, a 503 to retry.)
    let status =
        bus::testing::wait_until(DEADLINE, "a command on a lost order is answered", || {
            let request = http
                .post(command.url(&format!("/orders/{}/items", lost_orders[0])))
                .json(&serde_json::json!({ "sku": "PEN", "quantity": 1, "unit_price": 150 }));
            async move {
                let status = request.send().await.ok()?.status().as_u16();
                (status != 503).then_some(status)
            }
        })
        .await;
    assert_eq!(status, 404, "a lost order is unknown");
    // A client that followed the log up to the lost head is told the log ends before it.
    let follower = send(
        &http,
        http.get(query.url(&format!("/events?after_position={lost_head}"))),
        409,
    )
    .await;
    assert_eq!(follower["code"], "position_beyond_head", "{follower}");
    assert_eq!(follower["head"], head, "{follower}");
    let mut new_head = head;
    for _ in 0..2 {
        new_head = create_order_with_a_book(&http, &command).await.1;
    }
    assert!(
        new_head < lost_head,
        "the new orders reuse the lost positions"
    );
    wait_metric(&http, &command, "relay_stream_diverged", |v| v == 1.0).await;
    assert_eq!(
        stream_events(&mut redis, &stream).await,
        before_restore,
        "nothing is published onto the other history"
    );

    let projector = Service::start(
        "projector",
        "projector",
        &database_url,
        &stream,
        &projector_env,
    );
    wait_metric(&http, &projector, "projector_foreign_entries_total", |v| {
        v >= 6.0
    })
    .await;
    assert_read_models_follow_the_store(&http, &query, &database_url, &stream, new_head).await;
    for order_id in &lost_orders {
        let response = http
            .get(query.url(&format!("/orders/{order_id}")))
            .send()
            .await
            .expect("the query service answers");
        assert_eq!(response.status().as_u16(), 404, "lost order {order_id}");
    }

    // The operator keeps the lost history under another name; the relay starts a new stream.
    let kept = format!("{stream}:before-restore");
    let _: () = redis::cmd("RENAME")
        .arg(&stream)
        .arg(&kept)
        .query_async(&mut redis)
        .await
        .expect("RENAME");
    wait_metric(&http, &command, "relay_stream_diverged", |v| v == 0.0).await;
    let republished = bus::testing::wait_until(DEADLINE, "the new stream reaches the head", || {
        let mut redis = redis.clone();
        let stream = stream.clone();
        async move {
            let events = stream_events(&mut redis, &stream).await;
            (events.last().map(|(position, _)| *position) == Some(new_head)).then_some(events)
        }
    })
    .await;
    let first = republished.first().expect("entries").0;
    assert_eq!(republished, store_events(&database_url, first - 1).await);
    assert_eq!(stream_events(&mut redis, &kept).await, before_restore);
    let latest = create_order_with_a_book(&http, &command).await.1;
    assert_read_models_follow_the_store(&http, &query, &database_url, &stream, latest).await;

    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .arg(&kept)
        .query_async(&mut redis)
        .await
        .expect("cleanup");
    drop(postgres);
}
