//! PostgreSQL crashing under load and coming back, with nobody restarting a service.

use crate::support::*;
use serde_json::{Value, json};
use store::testing::PrivatePostgres;
use uuid::Uuid;

/// PostgreSQL crashes (every backend killed at once) under a steady flow of commands and comes
/// back a little later on the same address, as in a fail-over or a restart: nobody restarts a
/// service. While it is down, each service says it is not ready and every request is answered
/// 503 `store_unavailable` (never a 500, never a hang), at once once the API has found the
/// server gone (`database_unreachable`); afterwards the services take up their
/// work by themselves, every command (sent again with its `Idempotency-Key` until acknowledged)
/// is in the event store exactly once, every event reaches
/// Redis in order, the read models are exact, a read-your-writes wait is answered again, and a
/// client following the live log (`GET /events/stream`, reconnecting like a browser) has every
/// event once and in order, as one following an order (`GET /orders/{id}/events/stream`) has
/// every version of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_heals_by_itself_when_postgresql_crashes_under_load() {
    let mut postgres = PrivatePostgres::start()
        .await
        .expect("a private PostgreSQL server");
    let database_url = postgres.url("orders");
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();
    let (mut command, mut projector, mut query) =
        start_on_a_new_database(&http, &database_url, &stream, &[]).await;

    let (_, follower_base) = tokio::sync::watch::channel(query.url(""));
    let (follow_until, until) = tokio::sync::watch::channel(0_i64);
    let followed = std::sync::Arc::new(std::sync::Mutex::new(Followed::default()));
    let follower = tokio::spawn(follow_like_a_browser(
        follower_base,
        "/events/stream".to_owned(),
        std::sync::Arc::clone(&followed),
        until,
    ));

    let customer = Uuid::new_v4();
    let writers = Writers::start(&http, &command, customer, 3);
    writers.wait_for_more(40, "before the crash").await;
    // A page following the order being written as the database goes away.
    let followed_order = writers.acknowledgement(writers.acknowledged() - 1).0;
    let (_, order_base) = tokio::sync::watch::channel(query.url(""));
    let (follow_order_until, order_until) = tokio::sync::watch::channel(0_i64);
    let followed_versions = std::sync::Arc::new(std::sync::Mutex::new(Followed::default()));
    let order_follower = tokio::spawn(follow_like_a_browser(
        order_base,
        format!("/orders/{followed_order}/events/stream"),
        std::sync::Arc::clone(&followed_versions),
        order_until,
    ));

    postgres.crash().await.expect("PostgreSQL crashes");
    for service in [&command, &projector, &query] {
        wait_readiness(&http, service, 503).await;
    }
    bus::testing::wait_until(
        DEADLINE,
        "a writer is told the store is unavailable",
        || {
            let told =
                writers.was_refused(|status, code| status == 503 && code == "store_unavailable");
            async move { told.then_some(()) }
        },
    )
    .await;
    let first_order = writers.acknowledgement(0).0;
    let response = http
        .get(query.url(&format!("/orders/{first_order}")))
        .send()
        .await
        .expect("the query service answers without its database");
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let problem: Value = response.json().await.expect("a problem body");
    assert_eq!(problem["code"], "store_unavailable", "{problem}");
    assert!(!problem.to_string().contains("5432"), "{problem}");
    // Both APIs have found the server gone and refuse at once rather than each request waiting
    // for a connection; the writers, retrying, are among those refused.
    for service in [&command, &query] {
        wait_metric(&http, service, "database_unreachable", |v| v == 1.0).await;
    }
    wait_metric(
        &http,
        &command,
        "database_unreachable_refusals_total",
        |v| v > 0.0,
    )
    .await;

    postgres
        .start_again()
        .await
        .expect("PostgreSQL starts again");
    for service in [&command, &projector, &query] {
        wait_readiness(&http, service, 200).await;
    }
    for service in [&command, &query] {
        wait_metric(&http, service, "database_unreachable", |v| v == 0.0).await;
    }
    writers.wait_for_more(40, "after the restart").await;
    let outcomes = writers.stop().await;

    // Every refusal told the client to retry; none was a 500.
    for (status, code) in &outcomes.refused {
        assert!(
            *status == 503 && (code == "store_unavailable" || code == "timeout"),
            "refused with {status} {code}:\n{}",
            command.log_tail()
        );
    }
    // The positions stay dense across the crash.
    let pool = sqlx::PgPool::connect(&database_url)
        .await
        .expect("connect to the restarted server");
    let stored: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT stream_id, stream_version, global_position FROM events ORDER BY global_position",
    )
    .fetch_all(&pool)
    .await
    .expect("read the events");
    let positions: Vec<i64> = stored.iter().map(|(_, _, position)| *position).collect();
    let head = i64::try_from(stored.len()).expect("a count fits");
    assert_eq!(positions, (1..=head).collect::<Vec<_>>());
    // Retried with their keys, the commands whose answers the crash cut off were appended
    // once: the store holds exactly the acknowledged commands, nothing twice, nothing more.
    let stored: std::collections::BTreeSet<(String, i64, i64)> = stored.into_iter().collect();
    let acknowledged: std::collections::BTreeSet<(String, i64, i64)> = outcomes
        .acknowledged
        .iter()
        .map(|(order_id, version, position)| (format!("order-{order_id}"), *version, *position))
        .collect();
    assert_eq!(
        acknowledged.len(),
        outcomes.acknowledged.len(),
        "an answer came twice"
    );
    let only_stored: Vec<_> = stored.difference(&acknowledged).collect();
    let only_acknowledged: Vec<_> = acknowledged.difference(&stored).collect();
    assert!(
        only_stored.is_empty() && only_acknowledged.is_empty(),
        "stored but never acknowledged: {only_stored:?}; acknowledged but not stored: \
         {only_acknowledged:?}"
    );

    // Every event reaches Redis, in order (guarantee 2), those committed just before the crash
    // included.
    let redis = redis::Client::open(REDIS_URL).expect("redis url");
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    bus::testing::wait_until(DEADLINE, "every event is on the stream", || {
        let (mut conn, stream) = (conn.clone(), stream.clone());
        async move {
            let len: i64 = redis::AsyncCommands::xlen(&mut conn, &stream).await.ok()?;
            (len == head).then_some(())
        }
    })
    .await;
    assert_eq!(
        published_positions(&mut conn, &stream).await,
        (1..=head).collect::<Vec<_>>()
    );

    // Both read models reach the head and agree with the event store (guarantee 4).
    assert_read_models_exact_at(&http, &query, &database_url, &stream, customer, head).await;

    // A reader waiting for a write not made yet is answered when it is made: the query service
    // follows the projections' progress again.
    let waiting = tokio::spawn({
        let request = http.get(query.url(&format!(
            "/orders/{first_order}?min_position={}&wait_ms=10000",
            head + 1
        )));
        async move { request.send().await.expect("the wait is answered") }
    });
    let added = send(
        &http,
        http.post(command.url(&format!("/orders/{first_order}/items")))
            .json(&json!({ "sku": "AFTER-THE-CRASH", "quantity": 1, "unit_price": 100 })),
        200,
    )
    .await;
    let answered = waiting.await.expect("the waiting reader");
    assert_eq!(answered.status().as_u16(), 200);
    let summary: Value = answered.json().await.expect("a summary");
    assert_eq!(summary["version"], added["version"], "{summary}");

    // The log's follower, whose stream ended when the database went away, resumed from its
    // last id and missed nothing.
    follow_until.send(head + 1).expect("the follower listens");
    tokio::time::timeout(DEADLINE, follower)
        .await
        .expect("the follower reaches the head")
        .expect("the follower does not panic");
    let events = std::mem::take(&mut followed.lock().expect("lock").events);
    assert_eq!(events, (1..=head + 1).collect::<Vec<_>>());

    // So did the order's follower: every version of the order, once, in order.
    let last_version: i64 =
        sqlx::query_scalar("SELECT max(stream_version) FROM events WHERE stream_id = $1")
            .bind(format!("order-{followed_order}"))
            .fetch_one(&pool)
            .await
            .expect("the followed order's version");
    follow_order_until
        .send(last_version)
        .expect("the follower listens");
    tokio::time::timeout(DEADLINE, order_follower)
        .await
        .expect("the order's follower reaches its last version")
        .expect("the follower does not panic");
    let versions = std::mem::take(&mut followed_versions.lock().expect("lock").events);
    assert_eq!(versions, (1..=last_version).collect::<Vec<_>>());

    for service in [&mut query, &mut projector, &mut command] {
        assert!(
            service.terminate().await.success(),
            "{}",
            service.log_tail()
        );
    }
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .expect("cleanup");
    drop(postgres);
}

/// A service started while PostgreSQL is down (every pod after a power cut, say) waits for it,
/// saying so in its log, and is ready as soon as the database is up, instead of exiting and
/// being restarted with a growing back-off; one told to stop meanwhile stops waiting and
/// exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_started_before_postgresql_waits_for_it_and_becomes_ready() {
    let mut postgres = PrivatePostgres::start()
        .await
        .expect("a private PostgreSQL server");
    postgres.crash().await.expect("PostgreSQL stops");
    let database_url = postgres.url("orders");
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();
    let mut command = Service::start(
        "command-service",
        "command-service",
        &database_url,
        &stream,
        &[("SKIP_MIGRATIONS", "false")],
    );
    bus::testing::wait_until(DEADLINE, "the service says it waits for PostgreSQL", || {
        let exited = command
            .child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten());
        assert!(
            exited.is_none(),
            "exited: {exited:?}\n{}",
            command.log_tail()
        );
        let log = command.log_tail();
        async move {
            log.contains("PostgreSQL cannot be reached yet")
                .then_some(())
        }
    })
    .await;

    // A service waiting for its database stops on SIGTERM like a running one, exit 0: it gives
    // up the wait (an hour long here, so only the signal ends it), saying so.
    let mut waiting_query = Service::start(
        "query-service",
        "query-service",
        &database_url,
        &stream,
        &[("DB_CONNECT_WAIT_SECS", "3600")],
    );
    bus::testing::wait_until(DEADLINE, "the query service waits for PostgreSQL", || {
        let log = waiting_query.log_tail();
        async move {
            log.contains("PostgreSQL cannot be reached yet")
                .then_some(())
        }
    })
    .await;
    let status = waiting_query.terminate().await;
    assert!(status.success(), "{status}\n{}", waiting_query.log_tail());
    assert!(
        waiting_query
            .log()
            .contains("stopped before the service had started"),
        "{}",
        waiting_query.log_tail()
    );

    postgres.start_again().await.expect("PostgreSQL starts");
    command.wait_ready(&http).await;
    send(
        &http,
        http.post(command.url("/orders"))
            .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "EUR" })),
        201,
    )
    .await;
    assert!(
        command.terminate().await.success(),
        "{}",
        command.log_tail()
    );
}

/// `migrate` started while PostgreSQL is down (a migration job deployed with its database)
/// waits for it like a service, then creates the database, migrates it and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_started_before_postgresql_waits_for_it_and_migrates() {
    let mut postgres = PrivatePostgres::start()
        .await
        .expect("a private PostgreSQL server");
    postgres.crash().await.expect("PostgreSQL stops");
    let database_url = postgres.url("orders");
    let log = std::env::temp_dir().join(format!("e2e-migrate-{}.log", Uuid::new_v4().simple()));
    let mut migrate = tokio::process::Command::new(bin_dir().join("command-service"))
        .arg("migrate")
        .env("DATABASE_URL", &database_url)
        .env("LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start migrate");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    bus::testing::wait_until(DEADLINE, "migrate says it waits for PostgreSQL", || {
        let text = log_text();
        async move {
            text.contains("PostgreSQL cannot be reached yet")
                .then_some(())
        }
    })
    .await;
    assert!(
        migrate.try_wait().expect("wait").is_none(),
        "migrate gave up at once:\n{}",
        log_text()
    );

    postgres.start_again().await.expect("PostgreSQL starts");
    let status = tokio::time::timeout(DEADLINE, migrate.wait())
        .await
        .expect("migrate ends")
        .expect("wait");
    assert!(status.success(), "{status}\n{}", log_text());
    let pool = sqlx::PgPool::connect(&database_url)
        .await
        .expect("the database exists");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .expect("the events table exists");
    assert_eq!(events, 0);
    pool.close().await;
    let _ = std::fs::remove_file(&log);
}
