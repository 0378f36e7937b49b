//! Health, readiness, metrics and the OpenAPI document.

#![allow(clippy::unwrap_used)]

use serde_json::Value;

use std::sync::Arc;

use store::testing::TestDatabase;

use crate::helpers::{
    TestApp, assert_problem, spawn_app, spawn_app_on, spawn_app_with, wait_until,
};

#[tokio::test]
async fn healthz_and_readyz_answer_200() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").send().await.unwrap().status(), 200);
    let response = app.get("/readyz").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    app.stop().await;
}

/// The value of the series `name` whose labels include every one of `labels` on a Prometheus
/// text page; 0 when the page has no such series yet.
fn series_value(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    page.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (series_labels, value) = rest.split_once("} ")?;
            labels
                .iter()
                .all(|(label, wanted)| {
                    series_labels
                        .split(',')
                        .any(|pair| pair == format!("{label}=\"{wanted}\""))
                })
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

#[tokio::test]
async fn metrics_count_commands() {
    let app = spawn_app().await;
    let counts = |page: &str| {
        [
            series_value(
                page,
                "commands_total",
                &[("command", "CreateOrder"), ("outcome", "ok")],
            ),
            series_value(
                page,
                "commands_total",
                &[("command", "AddItem"), ("outcome", "ok")],
            ),
            series_value(
                page,
                "commands_total",
                &[("command", "AddItem"), ("outcome", "not_found")],
            ),
            series_value(
                page,
                "command_duration_seconds_count",
                &[("command", "CreateOrder")],
            ),
        ]
    };
    let before = counts(&app.metrics().await);

    let order_id = app.create_order().await;
    app.create_order().await;
    app.create_order().await;
    assert_eq!(app.add_item(order_id, "sku-1", 1, 100).await.status(), 200);
    let missing = app.add_item(uuid::Uuid::new_v4(), "sku-1", 1, 100).await;
    assert_eq!(missing.status(), 404);

    let after = counts(&app.metrics().await);
    let rise: Vec<f64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    assert_eq!(
        rise,
        [3.0, 1.0, 1.0, 3.0],
        "created ok, added ok, added to a missing order, creations timed"
    );
    app.stop().await;
}

/// Every instance says whether its relay leads, also one whose relay is disabled
/// (`RELAY_ENABLED=false`, as `spawn_app` runs it): the alert on no relay leading sums
/// `relay_is_leader` over the instances. The relay's counters, and those the runbook tells
/// an operator to look at, are there at 0 from the start too, so that `increase()` sees their
/// first increment and a grep finds them before anything happened.
#[tokio::test]
async fn an_instance_whose_relay_is_disabled_exports_that_it_does_not_lead() {
    let app = spawn_app().await;
    let page = app.metrics().await;
    for name in [
        "relay_is_leader",
        "relay_refused_entries_total",
        "relay_gaps_total",
        "relay_publish_errors_total",
        "command_retries_total",
        "command_cache_discarded_total",
        "event_store_snapshots_ignored_total",
        "database_unreachable_refusals_total",
    ] {
        let exported = page
            .lines()
            .any(|line| line.starts_with(&format!("{name}{{")));
        assert!(exported, "{name} is not exported:\n{page}");
        assert_eq!(series_value(&page, name, &[]), 0.0, "{name}:\n{page}");
    }
    app.stop().await;
}

/// How many appends shared a group commit is a histogram with buckets, as every histogram of
/// the service is: the exporter renders a histogram it has no buckets for as a summary, whose
/// quantiles cannot be added up across instances.
#[tokio::test]
async fn the_group_commit_size_is_a_histogram_with_buckets_and_no_metric_is_a_summary() {
    let app = spawn_app().await;
    app.create_order().await;
    let page = app.metrics().await;
    assert!(
        page.lines()
            .any(|line| line == "# TYPE event_store_batch_requests histogram"),
        "{page}"
    );
    assert!(
        series_value(&page, "event_store_batch_requests_bucket", &[("le", "1")]) >= 1.0,
        "{page}"
    );
    let summaries: Vec<&str> = page
        .lines()
        .filter(|line| line.starts_with("# TYPE ") && line.ends_with(" summary"))
        .collect();
    assert!(summaries.is_empty(), "{summaries:?}");
    app.stop().await;
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_error_status() {
    let app = spawn_app().await;
    let doc = openapi_document(&app).await;
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("/orders", "post", "201"),
        ("/orders/{id}/items", "post", "200"),
        ("/orders/{id}/items/{sku}", "delete", "200"),
        ("/orders/{id}/place", "post", "200"),
        ("/orders/{id}/pay", "post", "200"),
        ("/orders/{id}/ship", "post", "200"),
        ("/orders/{id}/cancel", "post", "200"),
    ];
    for (path, method, success) in expected {
        let responses = &paths[path][method]["responses"];
        assert!(responses.get(success).is_some(), "{method} {path}");
        for status in ["400", "401", "412", "422", "500", "503"] {
            assert!(responses.get(status).is_some(), "{method} {path} {status}");
        }
        // Every command on an existing order.
        if path != "/orders" {
            for status in ["404", "409"] {
                assert!(responses.get(status).is_some(), "{method} {path} {status}");
            }
        }
    }
    for status in ["404", "409", "412", "413", "415"] {
        assert!(
            paths["/orders/{id}/pay"]["post"]["responses"]
                .get(status)
                .is_some()
        );
    }
    assert_eq!(
        paths["/orders/{id}/pay"]["post"]["responses"]["412"]["content"]["application/problem+json"]
            ["schema"]["$ref"],
        "#/components/schemas/Problem"
    );
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert!(paths.contains_key(path), "{path}");
    }
    assert!(doc["components"]["schemas"].get("Problem").is_some());
    assert!(
        doc["components"]["schemas"]
            .get("CreateOrderRequest")
            .is_some()
    );
}

/// The service's `/openapi.json`.
async fn openapi_document(app: &TestApp) -> Value {
    app.get("/openapi.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The schema of one request body's property in the document.
fn property<'a>(doc: &'a Value, body: &str, name: &str) -> &'a Value {
    &doc["components"]["schemas"][body]["properties"][name]
}

#[tokio::test]
async fn every_bound_the_openapi_document_declares_is_the_one_the_service_enforces() {
    use command_service::http::MAX_IDEMPOTENCY_KEY_LEN;
    use events::money::{Currency, MAX_AMOUNT, MAX_QUANTITY, MAX_SKU_LEN, MAX_TEXT_LEN};

    let app = spawn_app().await;
    let doc = openapi_document(&app).await;

    // The bounds are the domain's constants.
    let quantity = property(&doc, "AddItemRequest", "quantity");
    assert_eq!(quantity["minimum"], 1);
    assert_eq!(quantity["maximum"], MAX_QUANTITY);
    assert_eq!(property(&doc, "AddItemRequest", "unit_price")["minimum"], 0);
    assert_eq!(
        property(&doc, "AddItemRequest", "unit_price")["maximum"],
        MAX_AMOUNT
    );
    assert_eq!(
        property(&doc, "PayOrderRequest", "amount")["maximum"],
        MAX_AMOUNT
    );
    assert_eq!(
        property(&doc, "AddItemRequest", "sku")["maxLength"],
        MAX_SKU_LEN
    );
    for (body, field) in [
        ("PayOrderRequest", "payment_reference"),
        ("ShipOrderRequest", "carrier"),
        ("ShipOrderRequest", "tracking_number"),
        ("CancelOrderRequest", "reason"),
    ] {
        assert_eq!(
            property(&doc, body, field)["maxLength"],
            MAX_TEXT_LEN,
            "{body}.{field}"
        );
        assert_eq!(
            property(&doc, body, field)["pattern"],
            command_service::http::dto::FREE_TEXT_PATTERN,
            "{body}.{field}"
        );
    }
    let codes: Vec<&str> = property(&doc, "CreateOrderRequest", "currency")["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|code| code.as_str().unwrap())
        .collect();
    assert_eq!(codes, Currency::codes().collect::<Vec<_>>());
    // Every command lists the headers it reads.
    for (path, method) in [
        ("/orders", "post"),
        ("/orders/{id}/items", "post"),
        ("/orders/{id}/items/{sku}", "delete"),
        ("/orders/{id}/place", "post"),
        ("/orders/{id}/pay", "post"),
        ("/orders/{id}/ship", "post"),
        ("/orders/{id}/cancel", "post"),
    ] {
        let parameters = doc["paths"][path][method]["parameters"].as_array().unwrap();
        let header = |name: &str| {
            parameters
                .iter()
                .find(|p| p["name"] == name && p["in"] == "header")
        };
        let key = header("Idempotency-Key").unwrap_or_else(|| panic!("{path}: Idempotency-Key"));
        assert_eq!(
            key["schema"]["maxLength"], MAX_IDEMPOTENCY_KEY_LEN,
            "{path}"
        );
        for name in ["X-Correlation-Id", "X-Actor", "traceparent"] {
            assert!(header(name).is_some(), "{path}: {name}");
        }
        for name in ["X-Correlation-Id", "X-Actor"] {
            let schema = &header(name).unwrap()["schema"];
            assert_eq!(
                schema["maxLength"],
                platform::http::MAX_ID_LEN,
                "{path}: {name}"
            );
        }
        // On POST /orders, `"0"` creates only a new order (412 otherwise).
        let if_match = header("If-Match").unwrap_or_else(|| panic!("{path}: If-Match"));
        // Every value the pattern admits is one the service reads as a version or `*`.
        let pattern = regex::Regex::new(if_match["schema"]["pattern"].as_str().unwrap()).unwrap();
        for (value, admitted) in [
            ("\"0\"", true),
            ("\"999999999999999999\"", true),
            ("*", true),
            ("\"99999999999999999999\"", false),
            ("W/\"1\"", false),
        ] {
            assert_eq!(pattern.is_match(value), admitted, "{path}: {value}");
            if admitted && value != "*" {
                let digits = value.trim_matches('"');
                assert_eq!(
                    command_service::http::extract::parse_if_match(value),
                    digits.parse().ok(),
                    "{value}"
                );
            }
        }
    }

    // And the service accepts each bound and refuses one step past it.
    let create = |currency: &str| {
        app.post("/orders")
            .json(&serde_json::json!({ "customer_id": uuid::Uuid::new_v4(), "currency": currency }))
            .send()
    };
    for code in [codes[0], codes[codes.len() - 1]] {
        assert_eq!(create(code).await.unwrap().status(), 201, "{code}");
    }
    assert_problem(create("XYZ").await.unwrap(), 422, "rule_violated").await;
    let order = app.create_order().await;
    let longest_sku = "S".repeat(MAX_SKU_LEN);
    let max = MAX_QUANTITY;
    assert_eq!(
        app.add_item(order, &longest_sku, max, 0).await.status(),
        200
    );
    assert_eq!(
        app.add_item(order, "B-1", 1, MAX_AMOUNT).await.status(),
        200
    );
    for (sku, quantity, unit_price) in [
        ("C-1".to_owned(), 1, 1),
        (format!("{longest_sku}S"), 1, 1),
        ("A-1".to_owned(), max + 1, 1),
        ("A-1".to_owned(), 0, 1),
        ("A-1".to_owned(), 1, -1),
    ] {
        let response = app.add_item(order, &sku, quantity, unit_price).await;
        assert_problem(response, 422, "rule_violated").await;
    }
    let cancel = |reason: String| {
        app.post(&format!("/orders/{order}/cancel"))
            .json(&serde_json::json!({ "reason": reason }))
            .send()
    };
    let too_long = cancel("r".repeat(MAX_TEXT_LEN + 1)).await.unwrap();
    assert_problem(too_long, 422, "rule_violated").await;
    // `maxLength` counts characters, and so does the service: "é" is one, of two bytes.
    let too_long = cancel("é".repeat(MAX_TEXT_LEN + 1)).await.unwrap();
    let too_long = assert_problem(too_long, 422, "rule_violated").await;
    assert_eq!(too_long["rule"], "text_too_long");
    // NUL cannot be stored at all; the pattern refuses every control character but line
    // breaks and tabs, and so does the service.
    let with_nul =
        assert_problem(cancel("r\u{0}".into()).await.unwrap(), 422, "rule_violated").await;
    assert_eq!(with_nul["rule"], "text_control_character");
    assert_eq!(
        cancel("é".repeat(MAX_TEXT_LEN)).await.unwrap().status(),
        200
    );
    app.stop().await;
}

/// The SKU pattern the document publishes (with its length bounds) accepts exactly the SKUs the
/// service adds; a SKU it refuses is 422 `invalid_sku`. The pattern compiles without
/// lookaround, so RE2-style validators (Go, Rust's `regex`) take it too.
#[tokio::test]
async fn the_published_sku_pattern_accepts_exactly_the_skus_the_service_adds() {
    let app = spawn_app().await;
    let doc = openapi_document(&app).await;
    let sku = property(&doc, "AddItemRequest", "sku");
    let pattern = regex::Regex::new(sku["pattern"].as_str().unwrap()).unwrap();
    let (min, max) = (
        sku["minLength"].as_u64().unwrap(),
        sku["maxLength"].as_u64().unwrap(),
    );
    let order = app.create_order().await;
    let longest = "S".repeat(events::money::MAX_SKU_LEN);
    let too_long = format!("{longest}S");
    for candidate in [
        "A",
        "BOOK-42_v1.0",
        "-",
        "_",
        ".",
        "..",
        "...",
        ".a",
        "a..",
        "a/b",
        "a b",
        "é",
        "",
        longest.as_str(),
        too_long.as_str(),
    ] {
        let length = candidate.chars().count() as u64;
        let published = pattern.is_match(candidate) && (min..=max).contains(&length);
        let response = app.add_item(order, candidate, 1, 1).await;
        let status = response.status().as_u16();
        if published {
            assert_eq!(status, 200, "{candidate:?} matches the schema");
        } else {
            let problem = assert_problem(response, 422, "rule_violated").await;
            assert_eq!(problem["rule"], "invalid_sku", "{candidate:?}");
        }
    }
    app.stop().await;
}

/// Database work that never ends (here the key expiry's `DELETE`, waiting on a row another
/// session holds: to the service, the same as PostgreSQL not answering) does not hold the
/// shutdown: told to stop, the service abandons it at the end of its grace period and still
/// stops cleanly (exit 0).
#[tokio::test]
async fn database_work_still_running_at_the_end_of_the_grace_period_does_not_hold_the_shutdown() {
    let db = Arc::new(TestDatabase::new().await);
    sqlx::query(
        "INSERT INTO idempotency_keys (idempotency_key, request_hash, response_status, \
         response_body, created_at) VALUES ('old', '\\x00', 200, '{}', now() - interval '30 days')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM idempotency_keys WHERE idempotency_key = 'old' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();

    let app = spawn_app_on(Arc::clone(&db), &[("shutdown-grace-secs", "1")]).await;
    wait_until("the key expiry waits for the held row", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE 'DELETE FROM idempotency_keys%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        waiting == 1
    })
    .await;

    app.stop_within_deadline().await;
    holder.rollback().await.unwrap();
}

/// `ORDER_CACHE_MAX_BYTES` bounds what the cached states take, not only how many there are:
/// orders of many long lines fill it long before the count, the cache drops the ones nobody is
/// commanding (`command_order_cache_bytes` stays within the bound), and a dropped order reloads
/// and takes its next command at the right version.
#[tokio::test]
async fn the_cached_states_stay_within_their_bytes_and_a_dropped_order_reloads() {
    const MAX_BYTES: usize = 64 * 1024;
    const LINES: usize = 40;
    let app = spawn_app_with(&[("order-cache-max-bytes", &MAX_BYTES.to_string())]).await;
    let mut orders = Vec::new();
    // About 4.4 kB each, some 140 kB in all: more than twice the bound.
    for _ in 0..32 {
        let order_id = app.create_order().await;
        for line in 0..LINES {
            let sku = format!("{line:0>64}");
            assert_eq!(app.add_item(order_id, &sku, 1, 10).await.status(), 200);
        }
        orders.push(order_id);
    }
    let page = app.metrics().await;
    let bytes: f64 = page
        .lines()
        .find(|line| line.starts_with("command_order_cache_bytes{"))
        .and_then(|line| line.rsplit(' ').next())
        .expect("the cache's bytes are exported")
        .parse()
        .unwrap();
    assert!(
        bytes > 0.0 && bytes <= MAX_BYTES as f64,
        "{bytes} bytes cached"
    );

    let first = app.add_item(orders[0], "LAST", 1, 10).await;
    assert_eq!(first.status(), 200);
    let body: Value = first.json().await.unwrap();
    assert_eq!(body["version"], 2 + LINES);
}
