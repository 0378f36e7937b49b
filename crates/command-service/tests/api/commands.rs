//! Every route's success path, metadata and snapshots.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{spawn_app, spawn_app_on, spawn_app_with, wait_until};

#[tokio::test]
async fn creating_an_order_answers_201_with_location_etag_and_positions() {
    let app = spawn_app().await;
    let order_id = Uuid::new_v4();
    let response = app
        .post("/orders")
        .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "EUR", "order_id": order_id }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        response.headers()["location"].to_str().unwrap(),
        format!("/orders/{order_id}")
    );
    assert_eq!(response.headers()["etag"].to_str().unwrap(), "\"1\"");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["order_id"], order_id.to_string());
    assert_eq!(body["version"], 1);
    assert_eq!(body["position"], 1);
    assert_eq!(app.event_count(order_id).await, 1);
}

#[tokio::test]
async fn an_order_goes_through_its_whole_lifecycle() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;

    let response = app.add_item(order_id, "BOOK-1", 2, 1250).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"].to_str().unwrap(), "\"2\"");
    assert_eq!(app.add_item(order_id, "PEN", 1, 100).await.status(), 200);

    let response = app
        .delete(&format!("/orders/{order_id}/items/PEN"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["version"], 4);

    let response = app
        .post(&format!("/orders/{order_id}/place"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let response = app
        .post(&format!("/orders/{order_id}/pay"))
        .json(&json!({ "amount": 2500, "payment_reference": "psp-1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let response = app
        .post(&format!("/orders/{order_id}/ship"))
        .json(&json!({ "carrier": "DHL", "tracking_number": "JJD1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["order_id"], order_id.to_string());
    assert_eq!(body["version"], 7);
    assert_eq!(body["position"], 7);

    let types: Vec<String> = app
        .events_of(order_id)
        .await
        .into_iter()
        .map(|(_, event_type, _)| event_type)
        .collect();
    assert_eq!(
        types,
        [
            "OrderCreated",
            "ItemAdded",
            "ItemAdded",
            "ItemRemoved",
            "OrderPlaced",
            "OrderPaid",
            "OrderShipped"
        ]
    );
}

#[tokio::test]
async fn an_order_can_be_cancelled_before_shipping() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    let response = app
        .post(&format!("/orders/{order_id}/cancel"))
        .json(&json!({ "reason": "changed my mind" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["version"], 2);
}

#[tokio::test]
async fn place_accepts_an_empty_body_or_an_empty_object() {
    let app = spawn_app().await;
    for body in ["", "{}"] {
        let order_id = app.create_order().await;
        assert_eq!(app.add_item(order_id, "A", 1, 10).await.status(), 200);
        let mut request = app.post(&format!("/orders/{order_id}/place"));
        if !body.is_empty() {
            request = request.header("content-type", "application/json");
        }
        let response = request.body(body).send().await.unwrap();
        assert_eq!(response.status(), 200, "body {body:?}");
    }
}

#[tokio::test]
async fn every_event_carries_correlation_causation_command_ids_and_the_traceparent() {
    let app = spawn_app().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let order_id = Uuid::new_v4();
    let response = app
        .post("/orders")
        .header("x-correlation-id", "corr-42")
        .header("x-actor", "alice")
        .header("traceparent", traceparent)
        .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "EUR", "order_id": order_id }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        response.headers()["x-correlation-id"].to_str().unwrap(),
        "corr-42"
    );
    // Without headers: a correlation id and a valid traceparent are still recorded.
    assert_eq!(app.add_item(order_id, "A", 1, 10).await.status(), 200);

    let events = app.events_of(order_id).await;
    assert_eq!(events.len(), 2);
    let (_, _, first) = &events[0];
    assert_eq!(first["correlation_id"], "corr-42");
    assert_eq!(first["actor"], "alice");
    assert_eq!(first["traceparent"], traceparent);
    assert!(
        first["command_id"]
            .as_str()
            .unwrap()
            .parse::<Uuid>()
            .is_ok()
    );
    assert_eq!(first["causation_id"], first["command_id"]);

    let (_, _, second) = &events[1];
    assert!(!second["correlation_id"].as_str().unwrap().is_empty());
    assert_ne!(second["command_id"], first["command_id"]);
    assert_eq!(second["causation_id"], second["command_id"]);
    assert!(platform::http::parse_traceparent(second["traceparent"].as_str().unwrap()).is_some());
    assert!(second.get("actor").is_none());
}

#[tokio::test]
async fn a_snapshot_is_written_every_n_events_and_a_fresh_instance_still_decides_correctly() {
    let app = spawn_app_with(&[("snapshot-every", "5")]).await;
    let order_id = app.create_order().await;
    for i in 0..5 {
        assert_eq!(
            app.add_item(order_id, &format!("SKU-{i}"), 1, 100)
                .await
                .status(),
            200
        );
    }
    wait_until("a snapshot at version 5", || async {
        app.snapshot_version(order_id).await == Some(5)
    })
    .await;

    // A second instance has nothing cached: it loads from the snapshot plus one event.
    let other = spawn_app_on(Arc::clone(&app.db), &[("snapshot-every", "5")]).await;
    let loaded = store::load_order(&app.db.pool, order_id).await.unwrap();
    assert_eq!(loaded.snapshot_version, Some(5));
    assert_eq!(loaded.events_replayed, 1);

    let response = other.add_item(order_id, "SKU-LAST", 2, 50).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["version"], 7);
    let response = other
        .post(&format!("/orders/{order_id}/place"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Paying exactly the total proves the state folded from the snapshot is right.
    let response = other
        .post(&format!("/orders/{order_id}/pay"))
        .json(&json!({ "amount": 600, "payment_reference": "psp-9" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["version"], 9);
}

/// An order written while snapshots were off (or whose snapshot is of another state schema)
/// has none to load from: the first load that replays a whole interval of events saves one at
/// the version it loaded, so later loads start there instead of replaying the same events
/// until the order next crosses a multiple of the interval.
#[tokio::test]
async fn a_load_that_replays_a_whole_interval_saves_a_snapshot_where_it_loaded() {
    let app = spawn_app_with(&[("snapshot-every", "0")]).await;
    let order_id = app.create_order().await;
    for i in 0..6 {
        assert_eq!(
            app.add_item(order_id, &format!("SKU-{i}"), 1, 100)
                .await
                .status(),
            200
        );
    }
    // A fresh instance with snapshots on: its command loads seven events, and takes the order
    // to version 8, no multiple of 5.
    let other = spawn_app_on(Arc::clone(&app.db), &[("snapshot-every", "5")]).await;
    assert_eq!(
        other.add_item(order_id, "SKU-6", 1, 100).await.status(),
        200
    );
    wait_until("a snapshot at the loaded version", || async {
        app.snapshot_version(order_id).await == Some(7)
    })
    .await;
    let loaded = store::load_order(&app.db.pool, order_id).await.unwrap();
    assert_eq!(
        (loaded.snapshot_version, loaded.events_replayed),
        (Some(7), 1)
    );
    assert_eq!(loaded.state.version, 8);
}
