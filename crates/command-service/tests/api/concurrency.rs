//! Many writers on one hot order: serialised in the instance, none lost, versions contiguous.

#![allow(clippy::unwrap_used)]

use serde_json::Value;

use crate::helpers::spawn_app;

#[tokio::test]
async fn many_writers_on_one_hot_order_all_succeed_with_contiguous_versions() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    let writers = (0..8).map(|_| {
        let app = &app;
        async move {
            let mut versions = Vec::new();
            for _ in 0..25 {
                let response = app.add_item(order_id, "HOT", 1, 10).await;
                assert_eq!(response.status(), 200);
                let body: Value = response.json().await.unwrap();
                versions.push(body["version"].as_i64().unwrap());
            }
            versions
        }
    });
    let mut versions: Vec<i64> = futures::future::join_all(writers)
        .await
        .into_iter()
        .flatten()
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (2..=201).collect::<Vec<i64>>());

    let stored: Vec<i64> = app
        .events_of(order_id)
        .await
        .into_iter()
        .map(|(version, _, _)| version)
        .collect();
    assert_eq!(stored, (1..=201).collect::<Vec<i64>>());
}
