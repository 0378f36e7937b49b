//! Many writers on one hot order: serialised in the instance, none lost, versions contiguous.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_app, spawn_app_on, wait_until};

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

/// This instance's cached draft is stale: another instance removed its only item. It places the
/// order on that cache, and while the placement waits for the append lock its cache holds the
/// placed order, at the very version the removal brought the store to. A keyed add-item
/// decided on that cache would be refused ("items only in draft") for a placement the store
/// never held; the store's version matches, but its last event is the removal, so the refusal
/// is not taken as final: the add is decided again on the stored draft and lands, and the key
/// keeps the add's success.
#[tokio::test]
async fn a_refusal_decided_on_a_cached_state_the_store_never_held_is_decided_again() {
    let app = spawn_app().await;
    let other = spawn_app_on(Arc::clone(&app.db), &[]).await;
    let order_id = app.create_order().await;
    assert_eq!(app.add_item(order_id, "A", 1, 10).await.status(), 200);
    let removed = other
        .delete(&format!("/orders/{order_id}/items/A"))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);

    // Held, the append lock keeps this instance's placement waiting in its group commit.
    let holder = app.hold_append_lock().await;
    let place = tokio::spawn(app.post(&format!("/orders/{order_id}/place")).send());
    wait_until("the placement waits for the append lock", || async {
        app.append_lock_waiters().await == 1
    })
    .await;
    let add = || {
        app.post(&format!("/orders/{order_id}/items"))
            .header("Idempotency-Key", "add-c")
            .json(&json!({ "sku": "C", "quantity": 1, "unit_price": 10 }))
            .send()
    };
    let added = tokio::spawn(add());
    // The add reaches the store: queued behind the placement as an append, or (taking the
    // refusal as final) waiting for the lock to record it under its key.
    wait_until("the add reaches the store", || async {
        app.append_lock_waiters().await == 2
            || app
                .metrics()
                .await
                .lines()
                .any(|line| line.starts_with("event_store_append_queue{") && line.ends_with("} 1"))
    })
    .await;
    holder.rollback().await.unwrap();

    let added = added.await.unwrap().unwrap();
    assert_eq!(added.status(), 200, "{}", added.text().await.unwrap());
    let mut expected = vec!["OrderCreated", "ItemAdded", "ItemRemoved", "ItemAdded"];
    // The placement, decided again on the stored order, is refused for want of items, or
    // lands after the add when the add committed first.
    let place = place.await.unwrap().unwrap();
    if place.status() == 200 {
        expected.push("OrderPlaced");
    } else {
        let problem = assert_problem(place, 422, "rule_violated").await;
        assert_eq!(problem["rule"], "place_needs_items", "{problem}");
    }
    let types: Vec<Value> = app
        .events_of(order_id)
        .await
        .into_iter()
        .map(|(_, event_type, _)| Value::from(event_type))
        .collect();
    assert_eq!(types, expected);
    assert_eq!(
        add().await.unwrap().status(),
        200,
        "the key keeps the success"
    );
}

/// This instance decides two commands back to back on its cached draft, the second chained on
/// the first, while another instance has placed the order. The first loses to the placement,
/// which also took the order to the version the second expects; the second must not land on
/// the placed order: it names the first's event as the order's last, is refused, and is
/// decided again on the stored state. Both are answered 422, and no item enters a placed order.
#[tokio::test]
async fn a_command_chained_on_one_another_instance_beat_never_lands_on_the_other_state() {
    let app = spawn_app().await;
    let other = spawn_app_on(Arc::clone(&app.db), &[]).await;
    let order_id = app.create_order().await;
    assert_eq!(app.add_item(order_id, "A", 1, 10).await.status(), 200);
    let placed = other
        .post(&format!("/orders/{order_id}/place"))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 200);

    // Held, the append lock keeps this instance's first append waiting in its group commit.
    let holder = app.hold_append_lock().await;
    let first = tokio::spawn(
        app.post(&format!("/orders/{order_id}/items"))
            .json(&json!({ "sku": "B", "quantity": 1, "unit_price": 10 }))
            .send(),
    );
    wait_until("the first append waits for the append lock", || async {
        app.append_lock_waiters().await > 0
    })
    .await;
    let second = tokio::spawn(
        app.post(&format!("/orders/{order_id}/items"))
            .json(&json!({ "sku": "C", "quantity": 1, "unit_price": 10 }))
            .send(),
    );
    wait_until("the chained append is queued", || async {
        app.metrics()
            .await
            .lines()
            .any(|line| line.starts_with("event_store_append_queue{") && line.ends_with("} 1"))
    })
    .await;
    holder.rollback().await.unwrap();

    for response in [
        first.await.unwrap().unwrap(),
        second.await.unwrap().unwrap(),
    ] {
        let problem = assert_problem(response, 422, "rule_violated").await;
        assert_eq!(problem["rule"], "items_only_in_draft", "{problem}");
    }
    let types: Vec<Value> = app
        .events_of(order_id)
        .await
        .into_iter()
        .map(|(_, event_type, _)| Value::from(event_type))
        .collect();
    assert_eq!(types, ["OrderCreated", "ItemAdded", "OrderPlaced"]);
}
