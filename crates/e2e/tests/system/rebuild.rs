//! `projector rebuild` under live traffic.

use crate::support::*;
use projector::testing::RebuildGate;
use serde_json::json;
use store::testing::TestDatabase;
use uuid::Uuid;

/// `projector rebuild` as an operator runs it, while commands keep flowing and a projector
/// keeps applying them: commands are answered while the rebuild is in mid-fold, and afterwards
/// the read model is exactly the event store's fold (`projector verify`), the events committed
/// during the rebuild included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_under_live_traffic_ends_exact_without_stopping_commands() {
    let db = TestDatabase::new().await;
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();
    let mut command = Service::start("command-service", "command-service", &db.url, &stream, &[]);
    let mut projector = Service::start("projector", "projector", &db.url, &stream, &[]);
    let mut query = Service::start("query-service", "query-service", &db.url, &stream, &[]);
    for service in [&mut command, &mut projector, &mut query] {
        service.wait_ready(&http).await;
    }
    let create = |customer: Uuid| {
        http.post(command.url("/orders"))
            .json(&json!({ "customer_id": customer, "currency": "EUR" }))
    };
    let customer = Uuid::new_v4();
    let mut orders = Vec::new();
    for _ in 0..100 {
        let created = send(&http, create(customer), 201).await;
        orders.push(created["order_id"].as_str().expect("order id").to_owned());
    }

    // The rebuild is held halfway through its fold, for as long as the gate is closed, so the
    // commands below are answered while it runs, whatever the speed of either.
    let middle = orders[orders.len() / 2].parse().expect("an order id");
    let gate = RebuildGate::hold_at(&db.pool, middle).await;
    let rebuild = tokio::spawn({
        let (database_url, stream) = (db.url.clone(), stream.clone());
        async move { projector_admin(&database_url, &stream, &["rebuild", "order_summaries"]).await }
    });
    let held = || RebuildGate::is_holding(&db.pool);
    bus::testing::wait_until(DEADLINE, "the rebuild is held in mid-fold", || async {
        held().await.then_some(())
    })
    .await;
    let during = 20;
    let mut last = 0;
    for _ in 0..during {
        last = position(&send(&http, create(customer), 201).await);
    }
    assert!(held().await, "the rebuild is still in mid-fold");
    gate.open().await;
    let (rebuilt, printed) = rebuild.await.expect("rebuild task");
    assert!(rebuilt, "{printed}");
    assert!(printed.contains("rebuilt order_summaries"), "{printed}");
    last = last.max(position(&send(&http, create(customer), 201).await));

    // Once the rebuilt projection has applied the last command, it holds every order.
    send(
        &http,
        http.get(query.url(&format!("/orders?limit=1&min_position={last}"))),
        200,
    )
    .await;
    let summaries: i64 = sqlx::query_scalar("SELECT count(*) FROM order_summaries")
        .fetch_one(&db.pool)
        .await
        .expect("count the summaries");
    assert_eq!(summaries, 101 + during);
    let (exact, report) = projector_admin(&db.url, &stream, &["verify", "order_summaries"]).await;
    assert!(exact, "{report}");
    for service in [&mut command, &mut projector, &mut query] {
        assert!(
            service.terminate().await.success(),
            "{}",
            service.log_tail()
        );
    }
}
