//! `Idempotency-Key`: a repeat replays the first response (a success or a refusal decided on the
//! order); another request with the key is 422.

#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{assert_problem, spawn_app, spawn_app_on, spawn_app_with};

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

/// Sends `send()` `n` times at once and returns each answer's status, replay header and body.
async fn all_at_once<F, Fut>(n: usize, send: F) -> Vec<(u16, bool, Value)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>>,
{
    let responses = futures::future::join_all((0..n).map(send)).await;
    let mut answers = Vec::new();
    for response in responses {
        let response = response.unwrap();
        let status = response.status().as_u16();
        let replayed = response.headers().get("idempotent-replayed").is_some();
        answers.push((status, replayed, response.json().await.unwrap()));
    }
    answers
}

/// Every answer is `status` with one body, and exactly one of them is not a replay.
fn one_first_answer(step: &str, answers: &[(u16, bool, Value)], status: u16) -> Value {
    for (got, _, body) in answers {
        assert_eq!(*got, status, "{step}: {body}");
        assert_eq!(body, &answers[0].2, "{step}");
    }
    let first = answers.iter().filter(|(_, replayed, _)| !replayed).count();
    assert_eq!(first, 1, "{step}: one request ran, the others were repeats");
    answers[0].2.clone()
}

/// Repeats racing the first request of a command that a second run would refuse (the order
/// has moved on): each gets the first response, on one instance or two.
#[tokio::test]
async fn concurrent_repeats_of_a_command_a_second_run_would_refuse_all_get_the_first_response() {
    let first = spawn_app().await;
    let second = spawn_app_on(std::sync::Arc::clone(&first.db), &[]).await;
    let apps = [&first, &second];
    let app = |i: usize| apps[i % 2];
    const N: usize = 8;

    let order_id = Uuid::new_v4();
    let create = json!({ "customer_id": Uuid::new_v4(), "currency": "EUR", "order_id": order_id });
    let answers = all_at_once(N, |i| {
        app(i)
            .post("/orders")
            .header("idempotency-key", "race-create")
            .json(&create)
            .send()
    })
    .await;
    one_first_answer("create", &answers, 201);
    assert_eq!(first.event_count(order_id).await, 1);
    assert_eq!(first.add_item(order_id, "A", 2, 10).await.status(), 200);

    let steps = [
        ("place", json!({})),
        ("pay", json!({ "amount": 20, "payment_reference": "psp-1" })),
        (
            "ship",
            json!({ "carrier": "DHL", "tracking_number": "T-1" }),
        ),
    ];
    for (version, (step, body)) in (3..).zip(steps) {
        let path = format!("/orders/{order_id}/{step}");
        let key = format!("race-{step}");
        let answers = all_at_once(N, |i| {
            app(i)
                .post(&path)
                .header("idempotency-key", key.as_str())
                .json(&body)
                .send()
        })
        .await;
        let answer = one_first_answer(step, &answers, 200);
        assert_eq!(answer["version"], version, "{step}");
        assert_eq!(first.event_count(order_id).await, version, "{step}");
    }

    let other = first.create_order().await;
    let answers = all_at_once(N, |i| {
        app(i)
            .post(&format!("/orders/{other}/cancel"))
            .header("idempotency-key", "race-cancel")
            .json(&json!({ "reason": "changed my mind" }))
            .send()
    })
    .await;
    one_first_answer("cancel", &answers, 200);
    assert_eq!(first.event_count(other).await, 2);
}

#[tokio::test]
async fn a_request_refused_by_a_rule_is_refused_again_on_a_repeat_after_the_order_changed() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    let place = |key: &'static str| {
        app.post(&format!("/orders/{order_id}/place"))
            .header("idempotency-key", key)
            .send()
    };
    let response = place("place-1").await.unwrap();
    assert!(response.headers().get("idempotent-replayed").is_none());
    assert_eq!(response.status(), 422);
    let first_body = response.text().await.unwrap();
    let refused: serde_json::Value = serde_json::from_str(&first_body).unwrap();
    assert_eq!(refused["code"], "rule_violated");
    assert_eq!(refused["rule"], "place_needs_items");

    // The order could be placed now, but the repeat gets the first answer, byte for byte, and
    // appends nothing.
    assert_eq!(app.add_item(order_id, "A", 1, 10).await.status(), 200);
    let response = place("place-1").await.unwrap();
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(response.status(), 422);
    assert_eq!(response.text().await.unwrap(), first_body);
    assert_eq!(app.event_count(order_id).await, 2);

    // The same key with another request is still refused as such.
    let response = app
        .post(&format!("/orders/{order_id}/cancel"))
        .header("idempotency-key", "place-1")
        .json(&json!({ "reason": "no" }))
        .send()
        .await
        .unwrap();
    assert_problem(response, 422, "idempotency_key_reused").await;
    // A new request places it.
    assert_eq!(place("place-2").await.unwrap().status(), 200);
}

/// 404, 412 and 409 `order_exists` are first answers too, replayed to a repeat; a conflict that
/// outlasted the retries is not an answer about the request, and a repeat runs again.
#[tokio::test]
async fn precondition_refusals_are_replayed_to_a_repeat_but_a_conflict_is_not() {
    let app = spawn_app_with(&[("command-retries", "0")]).await;
    let order_id = Uuid::new_v4();
    let add = |key: &'static str, if_match: Option<&'static str>| {
        let mut request = app
            .post(&format!("/orders/{order_id}/items"))
            .header("idempotency-key", key);
        if let Some(version) = if_match {
            request = request.header("if-match", version);
        }
        request
            .json(&json!({ "sku": "A", "quantity": 1, "unit_price": 10 }))
            .send()
    };
    let not_found = assert_problem(add("early", None).await.unwrap(), 404, "order_not_found").await;
    let create = json!({ "customer_id": Uuid::new_v4(), "currency": "EUR", "order_id": order_id });
    assert_eq!(
        app.post("/orders")
            .json(&create)
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let response = add("early", None).await.unwrap();
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(
        assert_problem(response, 404, "order_not_found").await,
        not_found
    );

    let response = add("stale", Some("\"2\"")).await.unwrap();
    assert_eq!(response.status(), 412);
    let stale = response.text().await.unwrap();
    assert!(stale.contains("\"code\":\"version_mismatch\""), "{stale}");
    assert_eq!(app.add_item(order_id, "B", 1, 10).await.status(), 200);
    // At version 2 now, which the repeat names: still the first answer, byte for byte (its
    // extensions, `expected_version` and `actual_version`, in their first order too).
    let response = add("stale", Some("\"2\"")).await.unwrap();
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(response.status(), 412);
    assert_eq!(response.text().await.unwrap(), stale);
    // Another If-Match under the key is another request (422), not a repeat to answer with a
    // 412 that contradicts the version it names.
    assert_problem(
        add("stale", Some("\"3\"")).await.unwrap(),
        422,
        "idempotency_key_reused",
    )
    .await;

    let send_create = || {
        app.post("/orders")
            .header("idempotency-key", "create-again")
            .json(&create)
            .send()
    };
    let exists = assert_problem(send_create().await.unwrap(), 409, "order_exists").await;
    let response = send_create().await.unwrap();
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(assert_problem(response, 409, "order_exists").await, exists);
    assert_eq!(app.event_count(order_id).await, 2);

    // Another writer moves the order on behind the instance's back: with no retries the
    // command is a 409 conflict, which is not recorded, so its repeat runs and applies.
    store::append_batch(
        &app.db.pool,
        &[store::AppendRequest {
            stream_id: events::order_stream_id(order_id),
            expected: store::ExpectedVersion::Exact(2),
            events: vec![
                events::OrderEvent::ItemAdded(
                    serde_json::from_value(
                        json!({ "sku": "SIDE", "quantity": 1, "unit_price": 5 }),
                    )
                    .unwrap(),
                )
                .to_new_event(events::EventMetadata::default()),
            ],
            idempotency: None,
        }],
    )
    .await
    .unwrap()
    .remove(0)
    .unwrap();
    let conflict = add("after-conflict", None).await.unwrap();
    assert_problem(conflict, 409, "concurrency_conflict").await;
    let response = add("after-conflict", None).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("idempotent-replayed").is_none());
    assert_eq!(app.event_count(order_id).await, 4);
}

/// A refusal that echoes what the request held is recorded and replayed even when that held a
/// NUL, which PostgreSQL's jsonb cannot store: the echo escapes it.
#[tokio::test]
async fn a_refusal_echoing_a_nul_character_is_recorded_and_replayed() {
    let app = spawn_app().await;
    let body = json!({ "customer_id": Uuid::new_v4(), "currency": "E\u{0}R" });
    let create = || {
        app.post("/orders")
            .header("idempotency-key", "nul-1")
            .json(&body)
            .send()
    };
    let first = assert_problem(create().await.unwrap(), 422, "rule_violated").await;
    assert_eq!(first["rule"], "invalid_currency");
    assert!(
        first["detail"].as_str().unwrap().contains("E\\u{0}R"),
        "{first}"
    );
    let response = create().await.unwrap();
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(assert_problem(response, 422, "rule_violated").await, first);

    let order_id = app.create_order().await;
    let remove = || {
        app.delete(&format!("/orders/{order_id}/items/A%00B"))
            .header("idempotency-key", "nul-2")
            .send()
    };
    let first = assert_problem(remove().await.unwrap(), 422, "rule_violated").await;
    assert_eq!(first["rule"], "invalid_sku");
    let response = remove().await.unwrap();
    assert_eq!(response.headers()["idempotent-replayed"], "true");
}

/// A 503 answers the request, not the command: one that ran out of `REQUEST_TIMEOUT_MS` while
/// its append waited for the store is still committed once the store takes it. A repeat with
/// the same key then gets that success and appends nothing, where a repeat without a key would
/// add the item a second time.
#[tokio::test]
async fn a_command_answered_503_timeout_may_commit_later_and_a_repeat_with_its_key_gets_that_success()
 {
    let app = spawn_app_with(&[("request-timeout-ms", "300")]).await;
    let order_id = app.create_order().await;
    let add = || {
        app.post(&format!("/orders/{order_id}/items"))
            .header("Idempotency-Key", "add-late")
            .json(&json!({ "sku": "A", "quantity": 1, "unit_price": 10 }))
            .send()
    };

    let holder = app.hold_append_lock().await;
    let timed_out = add().await.unwrap();
    assert_problem(timed_out, 503, "timeout").await;
    holder.rollback().await.unwrap();
    crate::helpers::wait_until("the timed-out command commits", || async {
        app.event_count(order_id).await == 2
    })
    .await;

    let again = add().await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["version"], 2);
    assert_eq!(app.event_count(order_id).await, 2);
}

/// Stores `response` under `key` as the answer to `POST path` with `body`, as a release that
/// accepted the body (one that ignored unknown fields) would have.
async fn store_earlier_answer(
    app: &crate::helpers::TestApp,
    key: &str,
    path: &str,
    body: &str,
    status: i16,
    response: Value,
) {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(format!("POST {path}\n{body}"));
    sqlx::query(
        "INSERT INTO idempotency_keys (idempotency_key, request_hash, response_status, \
                                       response_body) VALUES ($1, $2, $3, $4)",
    )
    .bind(key)
    .bind(hash.to_vec())
    .bind(status)
    .bind(response)
    .execute(&app.db.pool)
    .await
    .unwrap();
}

/// During a rollout, a release that ignored unknown fields may have committed a command whose
/// body this one refuses. Its client's retry under the same key gets that first answer, not a
/// 400 saying the command failed; any other request with the body is still refused.
#[tokio::test]
async fn a_body_refused_now_is_answered_with_what_an_earlier_release_stored_under_its_key() {
    let app = spawn_app().await;
    let order_id = app.create_order().await;
    let path = format!("/orders/{order_id}/items");
    let body = r#"{"sku":"A","quantity":1,"unit_price":5,"note":"gift"}"#;
    let first = json!({ "order_id": order_id, "version": 2, "position": 7 });
    store_earlier_answer(&app, "k-items", &path, body, 200, first.clone()).await;
    let send = |key: Option<&'static str>, body: &'static str| {
        let mut request = app
            .post(&path)
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send()
    };
    let again = send(Some("k-items"), body).await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["etag"], "\"2\"");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    // Without the key, under another key, or with another body under the key: refused.
    for (key, other) in [
        (None, body),
        (Some("k-other"), body),
        (
            Some("k-items"),
            r#"{"sku":"A","quantity":2,"unit_price":5,"note":"gift"}"#,
        ),
    ] {
        let refused = send(key, other).await.unwrap();
        assert_problem(refused, 400, "invalid_body").await;
    }
    assert_eq!(app.event_count(order_id).await, 1, "nothing appended");

    // A create: its order id comes from the stored answer.
    let created = Uuid::new_v4();
    let body = format!(
        r#"{{"customer_id":"{}","currency":"EUR","orderId":"{created}"}}"#,
        Uuid::new_v4()
    );
    let first = json!({ "order_id": created, "version": 1, "position": 9 });
    store_earlier_answer(&app, "k-create", "/orders", &body, 201, first.clone()).await;
    let again = app
        .post("/orders")
        .header("content-type", "application/json")
        .header("idempotency-key", "k-create")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["location"], format!("/orders/{created}"));
    assert_eq!(again.json::<Value>().await.unwrap(), first);
}
