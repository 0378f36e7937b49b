//! The store-level parts of the tool against a real (per-test) database: generated histories
//! are accepted by the store and have the promised shape, and the ceiling measures something.
//! Nothing here asserts a duration.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bench::generate;
use bench::scenarios::ceiling;
use store::testing::TestDatabase;

#[tokio::test]
async fn generated_lifecycles_fill_the_store_to_at_least_the_target_with_dense_positions() {
    let db = TestDatabase::new().await;
    let generated = generate::fill_lifecycles(&db.pool, 7_000).await.unwrap();
    let head = store::head_position(&db.pool).await.unwrap();
    assert!(head >= 7_000, "head {head}");
    assert_eq!(head as u64, generated.events);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, head);
}

#[tokio::test]
async fn a_seeded_long_order_has_exactly_the_asked_events_and_loads_from_its_snapshot() {
    let db = TestDatabase::new().await;
    let order = generate::seed_long_order(&db.pool, 1_234, 100)
        .await
        .unwrap();
    assert_eq!(order.state.version, 1_234);
    assert_eq!(order.snapshot.as_ref().map(|s| s.version), Some(1_200));
    generate::save_seed_snapshot(&db.pool, &order)
        .await
        .unwrap();
    let loaded = store::load_order(&db.pool, order.order_id).await.unwrap();
    assert_eq!(loaded.state, order.state);
    assert_eq!(loaded.snapshot_version, Some(1_200));
    assert_eq!(loaded.events_replayed, 34);
}

#[tokio::test]
async fn the_ceiling_reports_one_point_per_configuration_including_the_service_sized_one() {
    let db = TestDatabase::new().await;
    let service_batch = ceiling::ServiceBatch::new(2, Some(3.0));
    let configurations = ceiling::plan(&[1, 2], &[1, 4], Some(service_batch));
    let result = ceiling::run(
        &db.pool,
        &configurations,
        Some(service_batch),
        Duration::from_millis(50),
        // Long enough that a loaded machine still commits one transaction of each
        // configuration inside it: the test asserts that each measured something, not how much.
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    assert_eq!(result.points.len(), 5);
    assert!(result.points.iter().all(|p| p.transactions > 0));
    assert!(result.best_at(2).is_some());
    assert_eq!(
        result
            .service_sized()
            .map(|p| (p.clients, p.rows_per_transaction)),
        Some((2, 3))
    );
}
