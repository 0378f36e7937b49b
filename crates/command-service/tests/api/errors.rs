//! Every error status of the contract, each as a problem with its stable code.

#![allow(clippy::unwrap_used)]

use events::{EventMetadata, OrderEvent, order_stream_id};
use serde_json::json;
use store::{AppendRequest, ExpectedVersion};
use uuid::Uuid;

use std::sync::Arc;

use crate::helpers::{assert_problem, spawn_app, spawn_app_on, spawn_app_with, wait_until};

#[tokio::test]
async fn malformed_json_is_a_400() {
    let app = spawn_app().await;
    let response = app
        .post("/orders")
        .header("content-type", "application/json")
        .body("{\"customer_id\": ")
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "malformed_json").await;
}

#[tokio::test]
async fn wrong_types_are_a_400() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    let response = app
        .post(&format!("/orders/{order_id}/items"))
        .json(&json!({ "sku": "A", "quantity": "two", "unit_price": 10 }))
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "invalid_body").await;
    let response = app
        .post(&format!("/orders/{order_id}/pay"))
        .json(&json!({ "amount": 10.5, "payment_reference": "x" }))
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "invalid_body").await;
}

/// A body is a JSON object of known fields: an array filled in by position, or a misspelt
/// field that would be dropped in silence, is refused and appends nothing.
#[tokio::test]
async fn a_body_that_is_an_array_or_names_an_unknown_field_is_a_400_and_appends_nothing() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    for (path, body) in [
        (format!("/orders/{order_id}/items"), json!(["ARR", 3, 50])),
        (format!("/orders/{order_id}/cancel"), json!(["a reason"])),
        (format!("/orders/{order_id}/place"), json!([])),
        (format!("/orders/{order_id}/place"), json!([1])),
        ("/orders".to_owned(), json!([Uuid::new_v4(), "EUR"])),
        (
            format!("/orders/{order_id}/items"),
            json!({ "sku": "A", "quantity": 1, "unit_price": 1, "unitPrice": 500 }),
        ),
        (format!("/orders/{order_id}/place"), json!({ "now": true })),
    ] {
        let response = app.post(&path).json(&body).send().await.unwrap();
        let problem = assert_problem(response, 400, "invalid_body").await;
        let detail = problem["detail"].as_str().unwrap();
        if body.is_array() {
            assert_eq!(detail, "the body must be a JSON object", "{path} {body}");
        } else {
            assert!(detail.contains("unknown field"), "{path} {body}: {detail}");
        }
    }
    assert_eq!(app.event_count(order_id).await, 1, "only the create");
    // The retry-safe create with its id misspelt: refused, rather than an order under a
    // generated id that a retry would create again.
    let meant = Uuid::new_v4();
    let response = app
        .post("/orders")
        .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "EUR", "orderId": meant }))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(response, 400, "invalid_body").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("`orderId`"),
        "{problem}"
    );
    let orders: i64 = sqlx::query_scalar("SELECT count(DISTINCT stream_id) FROM events")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(orders, 1, "no second order");
}

#[tokio::test]
async fn a_malformed_order_id_in_the_path_is_a_400() {
    let app = spawn_app().await;
    let response = app
        .post("/orders/not-a-uuid/cancel")
        .json(&json!({ "reason": "x" }))
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "invalid_path").await;
}

#[tokio::test]
async fn an_if_match_that_is_not_one_quoted_integer_or_a_star_is_a_400() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    for bad in ["1", "\"one\"", "W/\"1\"", "\"1\", \"2\""] {
        let response = app
            .post(&format!("/orders/{order_id}/items"))
            .header("if-match", bad)
            .json(&json!({ "sku": "A", "quantity": 1, "unit_price": 10 }))
            .send()
            .await
            .unwrap();
        assert_problem(response, 400, "invalid_if_match").await;
    }
}

#[tokio::test]
async fn if_match_star_applies_at_any_version_of_an_existing_order_only() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    let add = |order: Uuid, sku: &'static str| {
        app.post(&format!("/orders/{order}/items"))
            .header("if-match", "*")
            .json(&json!({ "sku": sku, "quantity": 1, "unit_price": 10 }))
            .send()
    };
    for (sku, version) in [("A", 2), ("B", 3)] {
        let response = add(order_id, sku).await.unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["version"], version);
    }
    // On a route whose answer without the condition is 404, the condition does not change it.
    let response = add(Uuid::new_v4(), "A").await.unwrap();
    assert_problem(response, 404, "order_not_found").await;

    // A create needs an existing order too: 412 when there is none, which creates nothing,
    // and the create's own 409 when there is one.
    let create = |order: Uuid| {
        app.post("/orders")
            .header("if-match", "*")
            .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "EUR", "order_id": order }))
            .send()
    };
    let new_order = Uuid::new_v4();
    let body = assert_problem(create(new_order).await.unwrap(), 412, "version_mismatch").await;
    assert_eq!(body["actual_version"], 0);
    assert_eq!(app.event_count(new_order).await, 0);
    assert_problem(create(order_id).await.unwrap(), 409, "order_exists").await;
}

#[tokio::test]
async fn an_idempotency_key_over_255_characters_is_a_400() {
    let app = spawn_app().await;
    let response = app
        .post("/orders")
        .header("idempotency-key", "k".repeat(256))
        .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "EUR" }))
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "invalid_idempotency_key").await;
}

/// A token rotation: while `API_TOKEN` lists the new token and the old one, clients with either
/// are served, and nobody else.
#[tokio::test]
async fn while_a_token_is_rotated_both_the_new_and_the_old_one_are_accepted() {
    let app = spawn_app_with(&[("api-token", "new-token,old-token")]).await;
    let create = |token: &str| {
        app.post("/orders")
            .bearer_auth(token)
            .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "EUR" }))
            .send()
    };
    assert_eq!(create("new-token").await.unwrap().status(), 201);
    assert_eq!(create("old-token").await.unwrap().status(), 201);
    for wrong in ["new-token,old-token", "older-token", "new"] {
        assert_problem(create(wrong).await.unwrap(), 401, "unauthorized").await;
    }
}

#[tokio::test]
async fn with_a_token_configured_writes_need_it_but_health_stays_open() {
    let app = spawn_app_with(&[("api-token", "s3cret")]).await;
    let body = json!({ "customer_id": Uuid::new_v4(), "currency": "EUR" });

    let response = app.post("/orders").json(&body).send().await.unwrap();
    let response_headers = response.headers().clone();
    assert_problem(response, 401, "unauthorized").await;
    assert_eq!(response_headers["www-authenticate"], "Bearer");

    let response = app
        .post("/orders")
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_problem(response, 401, "unauthorized").await;

    let response = app
        .post("/orders")
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let response = app.get(path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn a_command_on_an_unknown_order_is_a_404() {
    let app = spawn_app().await;
    let response = app.add_item(Uuid::new_v4(), "A", 1, 10).await;
    assert_problem(response, 404, "order_not_found").await;
}

#[tokio::test]
async fn an_unknown_route_is_a_404_problem() {
    let app = spawn_app().await;
    let response = app.get("/nothing/here").send().await.unwrap();
    assert_problem(response, 404, "not_found").await;
}

#[tokio::test]
async fn creating_an_order_with_an_existing_order_id_is_a_409() {
    let app = spawn_app().await;
    let body =
        json!({ "customer_id": Uuid::new_v4(), "currency": "EUR", "order_id": Uuid::new_v4() });
    let response = app.post("/orders").json(&body).send().await.unwrap();
    assert_eq!(response.status(), 201);
    let response = app.post("/orders").json(&body).send().await.unwrap();
    assert_problem(response, 409, "order_exists").await;
}

#[tokio::test]
async fn creating_an_order_another_instance_created_is_a_409_even_with_no_retries_left() {
    let first = spawn_app().await;
    // The second instance has never seen the order: it decides the create without a load,
    // and the store's refusal must still come out as `order_exists`, not as a conflict.
    let second = spawn_app_on(Arc::clone(&first.db), &[("command-retries", "0")]).await;
    let order_id = Uuid::new_v4();
    let body = json!({ "customer_id": Uuid::new_v4(), "currency": "EUR", "order_id": order_id });
    let response = first.post("/orders").json(&body).send().await.unwrap();
    assert_eq!(response.status(), 201);

    let response = second.post("/orders").json(&body).send().await.unwrap();
    assert_problem(response, 409, "order_exists").await;
    assert_eq!(second.event_count(order_id).await, 1);

    // What the second instance learnt from the store is the order as it is.
    let response = second.add_item(order_id, "A", 1, 10).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["version"], 2);
}

#[tokio::test]
async fn a_create_with_if_match_on_an_order_another_instance_created_is_a_412() {
    let first = spawn_app().await;
    let second = spawn_app_on(Arc::clone(&first.db), &[]).await;
    let order_id = Uuid::new_v4();
    let body = json!({ "customer_id": Uuid::new_v4(), "currency": "EUR", "order_id": order_id });
    let response = first.post("/orders").json(&body).send().await.unwrap();
    assert_eq!(response.status(), 201);

    let response = second
        .post("/orders")
        .header("if-match", "\"0\"")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_problem(response, 412, "version_mismatch").await;
    assert_eq!(second.event_count(order_id).await, 1);
}

#[tokio::test]
async fn a_failed_append_whose_client_gave_up_does_not_leave_its_state_in_the_cache() {
    // No internal retries: a command decided on a stale cached state would be a 409.
    let app = spawn_app_with(&[("command-retries", "0")]).await;
    let order_id = app.create_order().await;
    // The store fails the append of one SKU; the append lock, held here, keeps the append
    // waiting until the client has left.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             RAISE EXCEPTION 'refused by the test'; END $$; \
         CREATE TRIGGER refuse_boom BEFORE INSERT ON events FOR EACH ROW \
             WHEN (NEW.data->>'sku' = 'BOOM') EXECUTE FUNCTION refuse_boom();",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    let mut holder = app.db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(store::append::APPEND_LOCK_KEY)
        .execute(&mut *holder)
        .await
        .unwrap();
    let abandoned = tokio::spawn(
        app.post(&format!("/orders/{order_id}/items"))
            .json(&json!({ "sku": "BOOM", "quantity": 1, "unit_price": 10 }))
            .send(),
    );
    wait_until("the append waits for the append lock", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
            > 0
    })
    .await;
    abandoned.abort();
    assert!(
        abandoned.await.is_err_and(|e| e.is_cancelled()),
        "the client gave up before any answer"
    );
    holder.rollback().await.unwrap();

    wait_until(
        "the failed append's state is dropped from the cache",
        || async {
            let text = app.metrics().await;
            text.lines().any(|line| {
                line.starts_with("command_cache_discarded_total") && !line.ends_with(" 0")
            })
        },
    )
    .await;
    // Decided on the order as stored (version 1), not on the optimistic version 2.
    let response = app.add_item(order_id, "A", 1, 10).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["version"], 2);
    assert_eq!(app.event_count(order_id).await, 2);
}

/// A group commit the database fails is logged once for each command it fails, by the command
/// (naming its order, at error level since a retry cannot help), and not once more for the batch
/// by the committer.
#[tokio::test]
async fn a_failed_append_is_logged_once_not_again_for_its_group_commit() {
    // The service's tasks run on this thread (a current-thread runtime): its logs land here.
    let (logs, _logging) = platform::testing::LogBuffer::capture("info");
    let app = spawn_app_with(&[("command-retries", "0")]).await;
    let order_id = app.create_order().await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             RAISE EXCEPTION 'refused by the test'; END $$; \
         CREATE TRIGGER refuse_boom BEFORE INSERT ON events FOR EACH ROW \
             WHEN (NEW.data->>'sku' = 'BOOM') EXECUTE FUNCTION refuse_boom();",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();

    let response = app.add_item(order_id, "BOOM", 1, 10).await;
    assert_problem(response, 500, "internal").await;
    let failures: Vec<String> = logs
        .text()
        .lines()
        .filter(|line| line.contains("refused by the test"))
        .map(str::to_owned)
        .collect();
    assert_eq!(failures.len(), 1, "{failures:#?}");
    assert!(failures[0].contains("append failed"), "{failures:#?}");
    assert!(failures[0].contains(&order_id.to_string()), "{failures:#?}");
    assert!(failures[0].contains("ERROR"), "{failures:#?}");
    app.stop().await;
}

/// Appends an `ItemAdded` to the order behind the application's back, making its cache stale.
async fn append_behind_the_apps_back(app: &crate::helpers::TestApp, order_id: Uuid, at: i64) {
    let event: OrderEvent = serde_json::from_value::<events::order::ItemAdded>(
        json!({ "sku": "SIDE", "quantity": 1, "unit_price": 5 }),
    )
    .map(OrderEvent::ItemAdded)
    .unwrap();
    let results = store::append_batch(
        &app.db.pool,
        &[AppendRequest {
            stream_id: order_stream_id(order_id),
            expected: ExpectedVersion::Exact(at),
            events: vec![event.to_new_event(EventMetadata::default())],
            idempotency: None,
        }],
    )
    .await
    .unwrap();
    results.into_iter().next().unwrap().unwrap();
}

#[tokio::test]
async fn a_conflict_that_outlasts_the_retries_is_a_409() {
    let app = spawn_app_with(&[("command-retries", "0")]).await;
    let order_id = app.create_order().await;
    append_behind_the_apps_back(&app, order_id, 1).await;
    let response = app.add_item(order_id, "A", 1, 10).await;
    assert_problem(response, 409, "concurrency_conflict").await;
    assert_eq!(app.event_count(order_id).await, 2);
}

#[tokio::test]
async fn a_concurrent_append_is_retried_transparently() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    append_behind_the_apps_back(&app, order_id, 1).await;
    let response = app.add_item(order_id, "A", 1, 10).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["version"], 3);
}

#[tokio::test]
async fn a_stale_if_match_is_a_412_and_a_current_one_applies() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    let send = |version: &str| {
        app.post(&format!("/orders/{order_id}/items"))
            .header("if-match", format!("\"{version}\""))
            .json(&json!({ "sku": "A", "quantity": 1, "unit_price": 10 }))
            .send()
    };
    let body = assert_problem(send("0").await.unwrap(), 412, "version_mismatch").await;
    assert_eq!(body["actual_version"], 1);
    let response = send("1").await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"].to_str().unwrap(), "\"2\"");
    assert_problem(send("1").await.unwrap(), 412, "version_mismatch").await;
    assert_eq!(app.event_count(order_id).await, 2);
}

#[tokio::test]
async fn an_if_match_made_stale_by_another_writer_is_a_412() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    append_behind_the_apps_back(&app, order_id, 1).await;
    let response = app
        .post(&format!("/orders/{order_id}/items"))
        .header("if-match", "\"1\"")
        .json(&json!({ "sku": "A", "quantity": 1, "unit_price": 10 }))
        .send()
        .await
        .unwrap();
    assert_problem(response, 412, "version_mismatch").await;
    // The version another writer produced is accepted once the cache caught up.
    let response = app
        .post(&format!("/orders/{order_id}/items"))
        .header("if-match", "\"2\"")
        .json(&json!({ "sku": "A", "quantity": 1, "unit_price": 10 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413() {
    let app = spawn_app_with(&[("body-limit-bytes", "1024")]).await;
    let order_id = app.create_order().await;
    let response = app
        .post(&format!("/orders/{order_id}/cancel"))
        .json(&json!({ "reason": "x".repeat(4096) }))
        .send()
        .await
        .unwrap();
    assert_problem(response, 413, "payload_too_large").await;
}

#[tokio::test]
async fn a_text_plain_body_is_a_415() {
    let app = spawn_app().await;
    let response = app
        .post("/orders")
        .header("content-type", "text/plain")
        .body(json!({ "customer_id": Uuid::new_v4(), "currency": "EUR" }).to_string())
        .send()
        .await
        .unwrap();
    assert_problem(response, 415, "unsupported_media_type").await;
}

#[tokio::test]
async fn a_broken_rule_is_a_422_naming_the_rule() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    let response = app
        .post(&format!("/orders/{order_id}/place"))
        .send()
        .await
        .unwrap();
    let body = assert_problem(response, 422, "rule_violated").await;
    assert_eq!(body["rule"], "place_needs_items");
    assert!(body["detail"].as_str().unwrap().contains("item"));

    let response = app
        .post("/orders")
        .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "XYZ" }))
        .send()
        .await
        .unwrap();
    let body = assert_problem(response, 422, "rule_violated").await;
    assert_eq!(body["rule"], "invalid_currency");
}

#[tokio::test]
async fn a_store_failure_is_a_503_that_leaks_nothing() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    // Take the database away under the running service.
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(&store::testing::server_url())
            .await
            .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE \"{}\" WITH (FORCE)",
        app.db.name
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    let response = app.add_item(order_id, "A", 1, 10).await;
    let body = assert_problem(response, 503, "store_unavailable").await;
    let text = body.to_string();
    assert!(!text.contains("database"), "{text}");
    assert!(!text.contains(&app.db.name), "{text}");
}

/// A PostgreSQL restart ends every pooled session of the service at once, and the sessions used
/// a moment before are handed out untested. Whatever a command sent on one committed nothing,
/// so it is sent again on a live session: the first commands after the restart succeed
/// instead of each costing a client a 503, whether they look up an idempotency key, load an
/// order no instance has cached, or only append.
#[tokio::test]
async fn commands_after_the_server_ended_every_session_succeed_without_a_503() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    // A second instance, whose cache is empty: its first command loads the order.
    let other = spawn_app_on(Arc::clone(&app.db), &[]).await;
    let loaded_by_other = app.create_order().await;
    assert_eq!(other.add_item(order_id, "WARM", 1, 10).await.status(), 200);

    let ended = app.db.end_every_session().await;
    assert!(ended >= 2, "the services' sessions were ended: {ended}");

    let appended = app.add_item(order_id, "A", 1, 10).await;
    assert_eq!(appended.status(), 200, "{}", appended.text().await.unwrap());
    let keyed = app
        .post(&format!("/orders/{order_id}/items"))
        .header("Idempotency-Key", "after-the-restart")
        .json(&json!({ "sku": "B", "quantity": 1, "unit_price": 10 }))
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status(), 200, "{}", keyed.text().await.unwrap());
    let loaded = other.add_item(loaded_by_other, "C", 1, 10).await;
    assert_eq!(loaded.status(), 200, "{}", loaded.text().await.unwrap());
    assert_eq!(
        app.post("/orders")
            .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "EUR" }))
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
}

/// An order holding a stored event this release should read but cannot (damage, or a bug in an
/// upcaster) is a 500 that leaks nothing, not a 503 telling the client to retry what can never
/// succeed; other orders are served as before.
#[tokio::test]
async fn a_command_on_an_order_with_an_unreadable_event_is_a_500_not_a_retry() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    let other = app.create_order().await;
    store::testing::append_as_another_release_wrote_it(
        &app.db.pool,
        order_id,
        "ItemAdded",
        1,
        json!({ "not": "an item" }),
    )
    .await;
    // Another instance, so the order is loaded from the store.
    let fresh = spawn_app_on(Arc::clone(&app.db), &[]).await;
    let response = fresh.add_item(order_id, "A", 1, 10).await;
    assert!(response.headers().get("retry-after").is_none());
    let body = assert_problem(response, 500, "internal").await;
    assert!(!body.to_string().contains("an item"), "{body}");
    assert_eq!(fresh.add_item(other, "A", 1, 10).await.status(), 200);
}

/// An order stored in a currency this release does not list (one a newer release added during
/// a rollout, or one later withdrawn from ISO 4217) loads and takes commands as any other: the
/// code was checked against the list of the release that wrote it.
#[tokio::test]
async fn an_order_in_a_currency_this_release_does_not_list_takes_commands() {
    let app = spawn_app().await;
    let order_id = Uuid::now_v7();
    assert!(events::money::Currency::parse("DEM").is_none());
    store::testing::append_as_another_release_wrote_it(
        &app.db.pool,
        order_id,
        "OrderCreated",
        1,
        json!({ "order_id": order_id, "customer_id": Uuid::new_v4(), "currency": "DEM" }),
    )
    .await;

    assert_eq!(app.add_item(order_id, "A", 2, 150).await.status(), 200);
    let response = app
        .post(&format!("/orders/{order_id}/place"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(app.event_count(order_id).await, 3);
}

/// A rollout under way: a newer release wrote an event of a type this instance does not know
/// into the order. A command on it is answered 503 `event_from_newer_release` with
/// `Retry-After` (an instance of that release can serve it), not 500 or a rule violation, and
/// nothing is appended; other orders are served as before.
#[tokio::test]
async fn a_command_on_an_order_holding_an_event_of_a_newer_release_is_a_503_to_retry() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    let other = app.create_order().await;
    store::testing::append_as_another_release_wrote_it(
        &app.db.pool,
        order_id,
        "OrderDiscounted",
        1,
        json!({ "percent": 10 }),
    )
    .await;

    let response = app.add_item(order_id, "A", 1, 10).await;
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2")
    );
    let body = assert_problem(response, 503, "event_from_newer_release").await;
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("OrderDiscounted") && detail.contains("version 2"),
        "{detail}"
    );
    assert_eq!(app.event_count(order_id).await, 2);
    assert_eq!(app.add_item(other, "A", 1, 10).await.status(), 200);
}
