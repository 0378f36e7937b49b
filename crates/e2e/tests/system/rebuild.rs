//! `projector rebuild` under live traffic.

use crate::support::*;
use serde_json::json;
use sqlx::Connection as _;
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
    let gate = hold_a_rebuild_at(&db.pool, &orders[orders.len() / 2]).await;
    let rebuild = tokio::spawn({
        let (database_url, stream) = (db.url.clone(), stream.clone());
        async move { projector_admin(&database_url, &stream, &["rebuild", "order_summaries"]).await }
    });
    let held = || async {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
               AND wait_event = 'advisory' AND query LIKE '%order_summaries%'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("read pg_stat_activity");
        held > 0
    };
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
    gate.close().await.expect("open the gate");
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

/// Holds a rebuild of `order_summaries` at its first write of `order` to its shadow table until
/// the returned connection closes: a check constraint on the live table, which the rebuild's
/// shadow copy takes over, waits there for an advisory lock the connection holds. Writes to the
/// live table pass.
async fn hold_a_rebuild_at(pool: &sqlx::PgPool, order: &str) -> sqlx::PgConnection {
    const GATE: i64 = 0x6761_7465;
    let order: Uuid = order.parse().expect("an order id");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION rebuild_gate(t oid, id uuid) RETURNS boolean LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF id = '{order}' AND (SELECT n.nspname FROM pg_class c \
                                   JOIN pg_namespace n ON n.oid = c.relnamespace \
                                   WHERE c.oid = t) LIKE 'projector_rebuild_%' THEN \
             PERFORM pg_advisory_xact_lock_shared({GATE}); \
           END IF; \
           RETURN true; \
         END $$; \
         ALTER TABLE order_summaries ADD CONSTRAINT rebuild_gate \
           CHECK (rebuild_gate(tableoid, order_id));"
    )))
    .execute(pool)
    .await
    .expect("install the rebuild gate");
    let mut holder = pool.acquire().await.expect("a connection").detach();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(GATE)
        .execute(&mut holder)
        .await
        .expect("close the gate");
    holder
}
