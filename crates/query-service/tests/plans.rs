//! How PostgreSQL plans the query service's statements on the service's own connection
//! settings (`query_service::startup::PLANNING`): a plan the server caches must probe or walk
//! indexes (where only one index is right, that one, with no sort between it and the page's
//! `LIMIT`) even when it was made while the tables were empty, because nothing but an `ANALYZE`
//! replaces it, and the hot read of one order must actually run on a cached plan.
//!
//! Every statement the service sends is prepared here on one connection by the very functions
//! the service calls (the read models, the event store reads behind the history, the log and
//! time travel, and the checkpoint poll), then read back from `pg_prepared_statements`: a
//! statement a change adds to one of these functions is checked as it is; a new function must
//! be added to [`run_every_statement`], and [`STATEMENTS`] counts them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use events::OrderStatus;
use platform::db::{self, Migrations, Use};
use query_service::consistency::CheckpointWatcher;
use query_service::error::ApiError;
use query_service::params::ListOrders;
use query_service::read_models::ReadModels;
use sqlx::{Connection, PgPool, Row};
use store::testing::TestDatabase;
use uuid::Uuid;

/// The statements [`run_every_statement`] sends: the read models' one order and one customer,
/// and eight pages (no filter; by customer; by customer and status; by status, one statement
/// per status with the status as a literal, five); the store's seven reads behind the history,
/// the log and time travel; and the checkpoint poll.
const STATEMENTS: usize = 18;

/// A pool of one connection with the query service's settings, so every statement below is
/// prepared on the same session.
async fn service_session(db: &TestDatabase) -> PgPool {
    db::connect_when_reachable(
        &db.url,
        "query-service",
        1,
        Migrations::Ignore,
        Use::ReadsOnly,
        query_service::startup::PLANNING,
        Duration::ZERO,
    )
    .await
    .expect("connect with the service's settings")
}

/// Runs every statement the query service sends, `times` times each.
async fn run_every_statement(pool: &PgPool, times: usize) {
    let reads = ReadModels::new(pool.clone(), CheckpointWatcher::new());
    let order = Uuid::new_v4();
    let customer = Uuid::new_v4();
    let stream = format!("order-{order}");
    let types = vec!["OrderCreated".to_owned()];
    for _ in 0..times {
        assert!(matches!(
            reads.order(order, None).await,
            Err(ApiError::OrderNotFound { .. })
        ));
        assert!(matches!(
            reads.customer(customer, None).await,
            Err(ApiError::CustomerNotFound { .. })
        ));
        let statuses = std::iter::once(None).chain(OrderStatus::ALL.into_iter().map(Some));
        for status in statuses {
            for customer_id in [None, Some(customer)] {
                let list = ListOrders {
                    customer_id,
                    status,
                    limit: 20,
                    before_position: Some(1_000),
                };
                reads.orders(&list, None).await.expect("list orders");
            }
        }
        store::read_stream(pool, &stream, 0, 100)
            .await
            .expect("read stream");
        store::stream_version(pool, &stream)
            .await
            .expect("stream version");
        store::read_all(pool, 0, 100).await.expect("read the log");
        store::head_position(pool).await.expect("head");
        store::last_position_within(pool, 0, 10_000)
            .await
            .expect("scan end");
        store::read_all_of_types(pool, 0, 10_000, &types, 100)
            .await
            .expect("read the log by type");
        store::unregistered_event_types(pool, &types)
            .await
            .expect("event type registry");
        CheckpointWatcher::new()
            .poll_once(pool)
            .await
            .expect("poll the checkpoints");
    }
}

/// Each statement prepared on the session, with the generic plan the server caches for it
/// (made now if none is cached yet), as EXPLAIN lines.
async fn generic_plans(pool: &PgPool) -> Vec<(String, Vec<String>)> {
    let mut conn = pool.acquire().await.expect("the session");
    let prepared: Vec<(String, String, Vec<String>)> = sqlx::query_as(
        "SELECT name, statement, parameter_types::text[] FROM pg_prepared_statements \
         WHERE statement NOT LIKE '%pg_prepared_statements%'",
    )
    .fetch_all(&mut *conn)
    .await
    .expect("read pg_prepared_statements");
    sqlx::raw_sql("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .expect("ask for generic plans");
    let mut plans = Vec::new();
    for (name, statement, types) in prepared {
        let args: Vec<String> = types.iter().map(|t| example_of(t)).collect();
        let explain = if args.is_empty() {
            format!("EXPLAIN EXECUTE {name}")
        } else {
            format!("EXPLAIN EXECUTE {name}({})", args.join(", "))
        };
        let lines = sqlx::raw_sql(sqlx::AssertSqlSafe(explain.clone()))
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("{explain} ({statement}): {e}"))
            .iter()
            .map(|row| row.get::<String, _>(0))
            .collect();
        plans.push((statement, lines));
    }
    sqlx::raw_sql("RESET plan_cache_mode")
        .execute(&mut *conn)
        .await
        .expect("reset");
    plans
}

/// A value of PostgreSQL type `t` for an EXECUTE argument.
fn example_of(t: &str) -> String {
    match t {
        "uuid" => format!("'{}'::uuid", Uuid::nil()),
        "bigint" | "integer" => "100".into(),
        "text" => "'x'".into(),
        "text[]" => "'{x}'::text[]".into(),
        "uuid[]" => "'{}'::uuid[]".into(),
        "timestamp with time zone" => "now()".into(),
        other => panic!("no example value for parameter type {other}"),
    }
}

/// The checkpoint poll reads every row of `projection_checkpoints`, one per projection: no
/// index serves that, and the table never grows with the data.
const POLL: &str = "SELECT projection, position FROM projection_checkpoints";

/// The index a statement's read of `order_summaries` must walk, where only one is right
/// whatever the data: a customer's page walks that customer's entries (walking every order
/// newest first to find them would read the whole table for a customer with few orders), the
/// page without a filter walks `created_position`, and one order is a primary-key probe. A page
/// by status may walk either the status index or `created_position`, by the status's own
/// statistics (`read_models::page_by_status_sql`), so it is not named here.
fn expected_index(statement: &str) -> Option<&'static str> {
    if statement.contains("customer_id = $3") {
        Some("order_summaries_customer")
    } else if statement.contains("FROM order_summaries WHERE created_position < $1") {
        Some("order_summaries_created_position_key")
    } else if statement.contains("LEFT JOIN order_summaries s ON s.order_id = $1") {
        Some("order_summaries_pkey")
    } else {
        None
    }
}

/// Whether a `Limit` node's input, the next node of the plan, is a sort.
fn sorts_under_a_limit(plan: &[String]) -> bool {
    plan.iter().enumerate().any(|(at, line)| {
        line.contains("Limit  (")
            && plan[at + 1..]
                .iter()
                .find(|next| next.contains("->"))
                .is_some_and(|next| next.contains("Sort  ("))
    })
}

fn assert_index_plans_only(plans: &[(String, Vec<String>)], when: &str) {
    assert_eq!(plans.len(), STATEMENTS, "statements prepared: {plans:#?}");
    let named = plans
        .iter()
        .filter(|(statement, _)| expected_index(statement).is_some())
        .count();
    // One order, the page without a filter, and the customer's pages with and without a status.
    assert_eq!(named, 4, "statements with an expected index: {plans:#?}");
    for (statement, plan) in plans {
        if let Some(index) = expected_index(statement) {
            let walks = format!("using {index} on order_summaries");
            assert!(
                plan.iter().any(|line| line.contains(&walks)),
                "{when}, the cached plan of\n{statement}\ndoes not walk {index}: {plan:#?}"
            );
            // The walk gives the rows in the page's order, so the LIMIT stops it early; a sort
            // under the LIMIT would read every entry the walk finds before the first row comes
            // out. (A sort above it, of the page's few rows, costs nothing.)
            assert!(
                !sorts_under_a_limit(plan),
                "{when}, the cached plan of\n{statement}\nsorts what it walks: {plan:#?}"
            );
        }
        let scans: Vec<&String> = plan
            .iter()
            .filter(|line| line.contains("Seq Scan") || line.contains("Bitmap"))
            .filter(|_| statement != POLL)
            .collect();
        assert!(
            scans.is_empty(),
            "{when}, the cached plan of\n{statement}\nscans a table: {plan:#?}"
        );
        assert!(
            !plan.iter().any(|line| line.starts_with("JIT")),
            "{when}, the plan of\n{statement}\nis compiled first: {plan:#?}"
        );
    }
}

#[tokio::test]
async fn plans_cached_while_the_tables_were_empty_walk_indexes_only() {
    let db = TestDatabase::new().await;

    // A new database, never vacuumed: the planner guesses the tables' size.
    let pool = service_session(&db).await;
    run_every_statement(&pool, 1).await;
    assert_index_plans_only(&generic_plans(&pool).await, "on a new database");
    pool.close().await;

    // Vacuumed while empty: the planner knows them to be empty, where a scan looks cheapest
    // of all. A plan made now would be kept until the next ANALYZE.
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    sqlx::raw_sql("VACUUM ANALYZE")
        .execute(&mut conn)
        .await
        .expect("vacuum");
    conn.close().await.expect("close");
    let pool = service_session(&db).await;
    run_every_statement(&pool, 1).await;
    assert_index_plans_only(&generic_plans(&pool).await, "once vacuumed empty");
}

#[tokio::test]
async fn the_read_of_one_order_runs_on_a_plan_cached_on_its_connection() {
    let db = TestDatabase::new().await;
    let pool = service_session(&db).await;
    let reads = ReadModels::new(pool.clone(), CheckpointWatcher::new());
    for _ in 0..10 {
        let _ = reads.order(Uuid::new_v4(), None).await;
    }
    let (generic, custom): (i64, i64) = sqlx::query_as(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements \
         WHERE statement LIKE '%held_position%' AND statement LIKE '%order_summaries s ON%'",
    )
    .fetch_one(&pool)
    .await
    .expect("the order read is prepared");
    // PostgreSQL plans the first five executions for their parameters, then keeps the generic
    // plan when it costs no more: the other five ran on it, unplanned.
    assert_eq!((generic, custom), (5, 5), "(generic, custom) plans");
}

#[test]
fn a_sort_between_the_limit_and_the_walk_is_seen_and_one_above_the_limit_is_not() {
    let plan = |lines: &[&str]| lines.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
    assert!(sorts_under_a_limit(&plan(&[
        "Limit  (cost=1..2 rows=20 width=8)",
        "  ->  Sort  (cost=1..2 rows=900 width=8)",
        "        Sort Key: created_position DESC",
        "        ->  Index Scan using order_summaries_customer on order_summaries  (cost=0..1)",
    ])));
    assert!(!sorts_under_a_limit(&plan(&[
        "Sort  (cost=1..2 rows=20 width=8)",
        "  Sort Key: created_position DESC",
        "  ->  Limit  (cost=1..2 rows=20 width=8)",
        "        ->  Index Scan using order_summaries_customer on order_summaries  (cost=0..1)",
    ])));
}
