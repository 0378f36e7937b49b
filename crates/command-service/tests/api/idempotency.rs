//! `Idempotency-Key`: a repeat replays the first response; another request with the key is 422.

#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test]
async fn repeating_a_request_with_the_same_key_replays_the_first_response_and_appends_nothing() {
    let app = spawn_app().await;
    // No order_id in the body: a blind retry would create a second order without the key.
    let body = json!({ "customer_id": Uuid::new_v4(), "currency": "EUR" });
    let first = app
        .post("/orders")
        .header("idempotency-key", "create-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    let again = app
        .post("/orders")
        .header("idempotency-key", "create-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["etag"], "\"1\"");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, first);

    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(total, 1);

    // The same on a later command.
    let order_id: Uuid = first["order_id"].as_str().unwrap().parse().unwrap();
    for _ in 0..2 {
        let response = app
            .post(&format!("/orders/{order_id}/items"))
            .header("idempotency-key", "add-1")
            .json(&json!({ "sku": "A", "quantity": 1, "unit_price": 10 }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["version"], 2);
    }
    assert_eq!(app.event_count(order_id).await, 2);
}

#[tokio::test]
async fn reusing_a_key_with_another_body_is_a_422() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    let send = |quantity: i64| {
        app.post(&format!("/orders/{order_id}/items"))
            .header("idempotency-key", "k-1")
            .json(&json!({ "sku": "A", "quantity": quantity, "unit_price": 10 }))
            .send()
    };
    assert_eq!(send(1).await.unwrap().status(), 200);
    assert_problem(send(2).await.unwrap(), 422, "idempotency_key_reused").await;
    assert_eq!(app.event_count(order_id).await, 2);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_append_once() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    let requests = (0..8).map(|_| {
        app.post(&format!("/orders/{order_id}/items"))
            .header("idempotency-key", "together")
            .json(&json!({ "sku": "A", "quantity": 1, "unit_price": 10 }))
            .send()
    });
    let responses = futures::future::join_all(requests).await;
    for response in responses {
        let response = response.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["version"], 2);
    }
    assert_eq!(app.event_count(order_id).await, 2);
}
