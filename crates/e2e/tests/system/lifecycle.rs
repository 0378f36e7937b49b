//! Orders driven through the three services, seen exactly in the read models, the history and
//! time travel; a poison entry dead-lettered while the rest flows; a clean SIGTERM of each.

use crate::support::*;
use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};
use store::testing::TestDatabase;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_driven_through_the_three_services_show_up_exactly_in_the_read_models() {
    let db = TestDatabase::new().await;
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();

    let mut command = Service::start("command-service", "command-service", &db.url, &stream, &[]);
    let mut projector_1 = Service::start(
        "projector",
        "projector-1",
        &db.url,
        &stream,
        &[("PROJECTOR_CONSUMER_NAME", "e2e-1")],
    );
    let mut projector_2 = Service::start(
        "projector",
        "projector-2",
        &db.url,
        &stream,
        &[("PROJECTOR_CONSUMER_NAME", "e2e-2")],
    );
    let mut query = Service::start("query-service", "query-service", &db.url, &stream, &[]);
    for service in [&mut command, &mut projector_1, &mut projector_2, &mut query] {
        service.wait_ready(&http).await;
    }

    let customer = Uuid::new_v4();
    let mut expected_spent = 0;
    let mut orders = Vec::new();
    for i in 0..6i64 {
        let created = send(
            &http,
            http.post(command.url("/orders"))
                .json(&json!({ "customer_id": customer, "currency": "EUR" })),
            201,
        )
        .await;
        let order_id = created["order_id"].as_str().expect("order id").to_owned();
        let orders_url = |path: &str| command.url(&format!("/orders/{order_id}{path}"));
        send(
            &http,
            http.post(orders_url("/items"))
                .json(&json!({ "sku": "BOOK", "quantity": 2, "unit_price": 1250 + i })),
            200,
        )
        .await;
        send(
            &http,
            http.post(orders_url("/items"))
                .json(&json!({ "sku": "PEN", "quantity": 1, "unit_price": 300 })),
            200,
        )
        .await;
        send(&http, http.post(orders_url("/place")), 200).await;
        let total = 2 * (1250 + i) + 300;
        let mut last = send(
            &http,
            http.post(orders_url("/pay"))
                .json(&json!({ "amount": total, "payment_reference": format!("pay-{i}") })),
            200,
        )
        .await;
        let status = match i % 3 {
            0 => {
                last = send(
                    &http,
                    http.post(orders_url("/ship"))
                        .json(&json!({ "carrier": "DHL", "tracking_number": format!("T{i}") })),
                    200,
                )
                .await;
                expected_spent += total;
                "shipped"
            }
            1 => {
                last = send(
                    &http,
                    http.post(orders_url("/cancel"))
                        .json(&json!({ "reason": "changed mind" })),
                    200,
                )
                .await;
                "cancelled"
            }
            _ => {
                expected_spent += total;
                "paid"
            }
        };
        orders.push((
            order_id,
            status,
            total,
            last["version"].as_i64().expect("version"),
            position(&last),
        ));
    }

    // Read-your-writes: each read with the command's position sees the command.
    let mut highest = 0;
    for (order_id, status, total, version, position) in &orders {
        highest = highest.max(*position);
        let response = http
            .get(query.url(&format!("/orders/{order_id}?min_position={position}")))
            .send()
            .await
            .expect("read");
        assert_eq!(response.status().as_u16(), 200);
        let mark: i64 = response.headers()["x-projection-position"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("number");
        assert!(
            mark >= *position,
            "the low-water mark {mark} covers the write at {position}"
        );
        let summary: Value = response.json().await.expect("json");
        assert_eq!(summary["status"], *status);
        assert_eq!(summary["total"], *total);
        assert_eq!(summary["version"], *version);
        assert_eq!(summary["item_count"], 2);
        assert_eq!(summary["customer_id"], customer.to_string());
    }

    let stats = send(
        &http,
        http.get(query.url(&format!("/customers/{customer}?min_position={highest}"))),
        200,
    )
    .await;
    assert_eq!(stats["order_count"], 6);
    assert_eq!(stats["total_spent"], expected_spent);
    assert_eq!(stats["spent_by_currency"], json!({ "EUR": expected_spent }));
    assert_eq!(stats["by_status"]["shipped"], 2);
    assert_eq!(stats["by_status"]["cancelled"], 2);
    assert_eq!(stats["by_status"]["paid"], 2);

    let listed = send(
        &http,
        http.get(query.url(&format!(
            "/orders?customer_id={customer}&min_position={highest}"
        ))),
        200,
    )
    .await;
    let listed_ids: Vec<&str> = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|o| o["order_id"].as_str().expect("id"))
        .collect();
    let newest_first: Vec<&str> = orders.iter().rev().map(|(id, ..)| id.as_str()).collect();
    assert_eq!(listed_ids, newest_first);

    let (first_order, ..) = &orders[0];
    let history = send(
        &http,
        http.get(query.url(&format!("/orders/{first_order}/events"))),
        200,
    )
    .await;
    let types: Vec<&str> = history["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["event_type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        types,
        [
            "OrderCreated",
            "ItemAdded",
            "ItemAdded",
            "OrderPlaced",
            "OrderPaid",
            "OrderShipped"
        ]
    );
    let then = send(
        &http,
        http.get(query.url(&format!("/orders/{first_order}/state?version=2"))),
        200,
    )
    .await;
    assert_eq!(
        (then["status"].as_str(), then["item_count"].as_i64()),
        (Some("draft"), Some(1))
    );

    // An entry no projector can decode is dead-lettered while the rest keeps flowing.
    let redis = redis::Client::open(REDIS_URL).expect("redis url");
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    // Its id sits just after the newest entry (`<position>-1`), never `*`: a time-based id would
    // sort above every future `<position>-0` id and block publication.
    let newest: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg(&stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("xrevrange");
    let (newest_id, _) = newest.first().expect("the stream has entries");
    let (millis, seq) = newest_id.split_once('-').expect("entry id");
    let garbage_id = format!("{millis}-{}", seq.parse::<u64>().expect("seq") + 1);
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg(&garbage_id)
        .arg("position")
        .arg("not-a-number")
        .query_async(&mut conn)
        .await
        .expect("xadd");
    let dlq = format!("{stream}:dlq:order_summaries");
    let started = Instant::now();
    loop {
        let len: i64 = redis::cmd("XLEN")
            .arg(&dlq)
            .query_async(&mut conn)
            .await
            .expect("xlen");
        if len == 1 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the undecodable entry never reached {dlq}:\n{}",
            projector_1.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = send(
        &http,
        http.post(command.url("/orders"))
            .json(&json!({ "customer_id": customer, "currency": "EUR" })),
        201,
    )
    .await;
    send(
        &http,
        http.get(query.url(&format!(
            "/orders/{}?min_position={}",
            after["order_id"].as_str().expect("id"),
            position(&after)
        ))),
        200,
    )
    .await;

    // The read model agrees with a fresh fold of the event store.
    let verify = Command::new(bin_dir().join("projector"))
        .args(["verify", "order_summaries"])
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", REDIS_URL)
        .env("EVENT_STREAM", &stream)
        .env("SKIP_MIGRATIONS", "true")
        .output()
        .expect("verify runs");
    assert!(
        verify.status.success(),
        "verify found differences:\n{}\n{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    for service in [&mut query, &mut projector_2, &mut projector_1, &mut command] {
        let status = service.terminate().await;
        assert!(
            status.success(),
            "{} exited with {status} on SIGTERM",
            service.name
        );
    }
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .arg(&dlq)
        .arg(format!("{stream}:dlq:customer_stats"))
        .query_async(&mut conn)
        .await
        .expect("cleanup");
}
