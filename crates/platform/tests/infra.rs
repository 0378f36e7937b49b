//! The pieces that talk to real Postgres and Redis (`TEST_DATABASE_URL` and `REDIS_URL`), and a
//! real server on port 0: database bootstrap, readiness, Redis connections, serve + healthcheck
//! probe.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{TempDatabase, TempRole, admin_url, redis_url, with_param};
use platform::config::RedisTlsArgs;
use platform::health::{Readiness, health_router};
use platform::testing::LogBuffer;
use platform::{db, redis_conn, shutdown};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tower::ServiceExt;

static TEST_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("tests/migrations");

/// A client of `url` as the services build one, without TLS files.
fn plain_client(url: &str) -> redis::Client {
    platform::config::redis_client(url, &RedisTlsArgs::default()).unwrap()
}

/// A port nothing listens on: bind an ephemeral port, then free it.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// What `pool`'s session shows for each setting in `names`, in order; closes the pool.
async fn settings(pool: sqlx::PgPool, names: &[&str]) -> Vec<String> {
    let shown = sqlx::query_scalar(
        "SELECT current_setting(name) FROM unnest($1::text[]) WITH ORDINALITY AS s(name, n) \
         ORDER BY n",
    )
    .bind(names)
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    shown
}

async fn database_exists(name: &str) -> bool {
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut admin)
        .await
        .unwrap()
}

#[tokio::test]
async fn connect_creates_a_missing_database_and_runs_migrations() {
    let database = TempDatabase::named("platform_test");
    let (name, url) = (database.name.as_str(), database.url.as_str());
    assert!(!database_exists(name).await);

    let pool = db::connect(url, "infra-test", 2, Some(&TEST_MIGRATOR))
        .await
        .unwrap();
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM platform_probe")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tables, 0);
    pool.close().await;

    // A second start finds the database and the migrations already there.
    let pool = db::connect(url, "infra-test", 1, Some(&TEST_MIGRATOR))
        .await
        .unwrap();
    pool.close().await;

    assert!(database_exists(name).await);
}

/// Waits until `condition` holds, checking every 50 ms, or fails the test after 30 s.
async fn wait_until<F, Fut>(what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Applies `TEST_MIGRATOR` to database `url` as a migrate job would, from a pool of its own.
async fn migrate_from_elsewhere(url: &str) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap();
    TEST_MIGRATOR.run(&pool).await.unwrap();
    pool.close().await;
}

#[tokio::test]
async fn with_skip_migrations_a_service_does_not_start_on_a_database_without_its_migrations() {
    let database = TempDatabase::named("platform_test");
    let (name, url) = (database.name.as_str(), database.url.as_str());
    let awaited = db::Migrations::AwaitApplied(&TEST_MIGRATOR);

    let err = db::connect_when_reachable(
        url,
        "infra-test",
        1,
        awaited,
        db::Use::ReadsOnly,
        db::Planning::EveryExecution,
        Duration::ZERO,
    )
    .await
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("SKIP_MIGRATIONS"), "{msg}");
    assert!(msg.contains(name), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
}

#[tokio::test]
async fn with_skip_migrations_a_service_waits_for_its_migrations_and_starts_once_they_are_applied()
{
    use tracing::instrument::WithSubscriber as _;

    let database = TempDatabase::named("platform_test");
    let url = database.url.clone();
    let awaited = db::Migrations::AwaitApplied(&TEST_MIGRATOR);
    let logs = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(logs.clone())
        .finish();
    let start = tokio::spawn(
        {
            let url = url.clone();
            async move {
                db::connect_when_reachable(
                    &url,
                    "awaiting-test",
                    1,
                    awaited,
                    db::Use::ReadsOnly,
                    db::Planning::EveryExecution,
                    Duration::from_secs(60),
                )
                .await
            }
        }
        .with_subscriber(subscriber),
    );
    // Connected, it found the migrations missing, waited, looked again and is waiting again:
    // it is held back by the missing migrations, not merely slow to start.
    let missing = "the database lacks this release's migrations";
    wait_until(
        "the starting service waits twice for the migrations",
        || {
            let logs = logs.clone();
            async move { logs.lines_containing(missing) >= 2 }
        },
    )
    .await;
    assert!(!start.is_finished(), "it started without its migrations");

    migrate_from_elsewhere(&url).await;
    let pool = tokio::time::timeout(Duration::from_secs(30), start)
        .await
        .expect("it went on waiting after the migrations were applied")
        .unwrap()
        .unwrap();
    assert_eq!(
        logs.lines_containing("this release's database migrations are applied"),
        1
    );
    pool.close().await;
}

#[tokio::test]
async fn with_skip_migrations_a_newer_release_s_further_migrations_do_not_stop_a_start() {
    let database = TempDatabase::named("platform_test");
    let url = database.url.as_str();
    db::connect(url, "infra-test", 1, None)
        .await
        .unwrap()
        .close()
        .await;
    migrate_from_elsewhere(url).await;
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99999999, 'a newer release', true, '\\x00', 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();

    let awaited = db::Migrations::AwaitApplied(&TEST_MIGRATOR);
    let pool = db::connect_when_reachable(
        url,
        "infra-test",
        1,
        awaited,
        db::Use::ReadsOnly,
        db::Planning::EveryExecution,
        Duration::ZERO,
    )
    .await
    .unwrap();
    pool.close().await;
}

/// Runs `sql` on the maintenance database.
async fn admin(sql: String) {
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_write_refused_by_a_read_only_server_is_unavailability_and_its_session_is_not_reused() {
    let database = TempDatabase::named("platform_test");
    let (name, url) = (database.name.as_str(), database.url.as_str());
    db::connect(url, "infra-test", 1, Some(&TEST_MIGRATOR))
        .await
        .unwrap()
        .close()
        .await;
    // New sessions of the database refuse writes, as those of a demoted primary or a standby
    // that the address leads to after a fail-over do.
    admin(format!(
        "ALTER DATABASE \"{name}\" SET default_transaction_read_only = on"
    ))
    .await;
    let pool = db::connect_when_reachable(
        url,
        "infra-test",
        1,
        db::Migrations::Ignore,
        db::Use::Writes,
        db::Planning::EveryExecution,
        Duration::ZERO,
    )
    .await
    .unwrap();
    let insert = "INSERT INTO platform_probe (id) VALUES (1)";
    let refused = sqlx::query(insert).execute(&pool).await.unwrap_err();
    assert_eq!(
        refused
            .as_database_error()
            .and_then(|e| e.code())
            .as_deref(),
        Some("25006"),
        "{refused}"
    );
    assert!(db::is_unavailable(&refused), "{refused}");

    // The address leads to a writer again: the pool's one session, read-only, is not handed
    // out again, so the write reaches a new session.
    admin(format!(
        "ALTER DATABASE \"{name}\" RESET default_transaction_read_only"
    ))
    .await;
    sqlx::query(insert).execute(&pool).await.unwrap();
    pool.close().await;
}

/// A server restart ends every session of a writing pool at once, and sessions used a moment
/// before are handed out unchecked. Once one request meets an ended session (and the service
/// asks `is_unavailable` about its error), the pool checks the others before handing them
/// out: the restart costs that one request, not one per pooled session.
#[tokio::test]
async fn once_a_session_is_found_ended_the_writing_pool_checks_the_others_before_using_them() {
    let database = TempDatabase::named("platform_test");
    let (name, url) = (database.name.as_str(), database.url.as_str());
    const SESSIONS: usize = 4;
    let pool = db::connect_when_reachable(
        url,
        "infra-test",
        SESSIONS as u32,
        db::Migrations::Ignore,
        db::Use::Writes,
        db::Planning::EveryExecution,
        Duration::ZERO,
    )
    .await
    .unwrap();
    // Every session opened and used, then handed back.
    let mut held = Vec::new();
    for _ in 0..SESSIONS {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("SELECT 1").execute(&mut *conn).await.unwrap();
        held.push(conn);
    }
    drop(held);
    admin(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    ))
    .await;

    let mut failures = Vec::new();
    for _ in 0..SESSIONS {
        if let Err(e) = sqlx::query("SELECT 1").execute(&pool).await {
            assert!(db::is_unavailable(&e), "{e}");
            failures.push(e.to_string());
        }
    }
    assert!(failures.len() <= 1, "{failures:?}");
    pool.close().await;
}

#[tokio::test]
async fn connections_planning_every_execution_never_reuse_a_generic_plan_made_for_other_table_sizes()
 {
    let database = TempDatabase::named("platform_test");
    let url = database.url.as_str();
    // One connection, so every execution and the look at its statements share one session.
    let pool = db::connect(url, "infra-test", 1, Some(&TEST_MIGRATOR))
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    for n in 0..12_i64 {
        // Past the five executions after which PostgreSQL would otherwise switch a prepared
        // statement to its cached generic plan.
        sqlx::query("SELECT count(*) FROM platform_probe WHERE $1::int8 >= 0")
            .bind(n)
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let (generic, custom): (i64, i64) = sqlx::query_as(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements \
         WHERE statement LIKE 'SELECT count(*) FROM platform_probe%'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(generic, 0, "a generic plan was reused");
    assert_eq!(custom, 12);
    drop(conn);
    pool.close().await;
}

#[tokio::test]
async fn connections_carry_the_service_name_unless_the_url_names_them() {
    let database = TempDatabase::named("platform_test");
    let url = database.url.as_str();
    let pool = db::connect(url, "order-writer", 1, Some(&TEST_MIGRATOR))
        .await
        .unwrap();
    assert_eq!(
        settings(pool, &["application_name"]).await,
        ["order-writer"]
    );

    let named = with_param(url, "application_name=blue-deploy");
    let pool = db::connect(&named, "order-writer", 1, None).await.unwrap();
    assert_eq!(settings(pool, &["application_name"]).await, ["blue-deploy"]);
}

#[tokio::test]
async fn a_transaction_left_open_by_a_frozen_process_gives_up_its_locks() {
    let database = TempDatabase::named("platform_test");
    let url = database.url.as_str();
    let pool = db::connect(url, "infra-test", 2, None).await.unwrap();
    // The store's append lock is such a transaction-scoped advisory lock.
    let lock_key: i64 = 0x0E5E_7E57;
    let mut frozen = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key)
        .execute(&mut *frozen)
        .await
        .unwrap();

    // `frozen` is never used again until the end, as by a process that stopped mid-append; the
    // other writer gets the lock once the server ends the idle transaction.
    let mut writer = pool.begin().await.unwrap();
    let deadline = db::IDLE_IN_TRANSACTION_TIMEOUT * 6;
    tokio::time::timeout(
        deadline,
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock_key)
            .execute(&mut *writer),
    )
    .await
    .expect("the lock is still held by the idle transaction")
    .unwrap();
    writer.commit().await.unwrap();

    let ended = sqlx::query("SELECT 1").execute(&mut *frozen).await;
    assert!(
        ended.is_err(),
        "the frozen session was not ended: {ended:?}"
    );
    drop(frozen);
    pool.close().await;
}

#[tokio::test]
async fn the_server_ends_silent_clients_within_seconds_unless_the_url_says_otherwise() {
    let database = TempDatabase::named("platform_test");
    let url = database.url.as_str();
    let limits = [
        "idle_in_transaction_session_timeout",
        "tcp_keepalives_idle",
        "tcp_keepalives_interval",
        "tcp_keepalives_count",
        "tcp_user_timeout",
    ];

    let pool = db::connect(url, "infra-test", 1, None).await.unwrap();
    assert_eq!(
        settings(pool, &limits).await,
        ["10s", "10", "5", "3", "30000"]
    );

    let tuned = with_param(
        url,
        "options=-c%20idle_in_transaction_session_timeout%3D2500",
    );
    let pool = db::connect(&tuned, "infra-test", 1, None).await.unwrap();
    assert_eq!(
        settings(pool, &limits).await,
        ["2500ms", "10", "5", "3", "30000"]
    );
}

#[tokio::test]
async fn concurrent_starts_on_a_missing_database_all_succeed() {
    let database = TempDatabase::named("platform_test");
    let url = database.url.as_str();
    let starts = (0..4).map(|_| db::connect(url, "infra-test", 1, Some(&TEST_MIGRATOR)));
    let pools = futures::future::join_all(starts).await;
    for pool in pools {
        pool.unwrap().close().await;
    }
}

#[tokio::test]
async fn an_unreachable_postgres_is_one_clear_line_without_the_password() {
    let port = closed_port();
    let url = format!("postgres://postgres:hunter2@127.0.0.1:{port}/orders");
    let err = db::connect(&url, "infra-test", 1, None).await.unwrap_err();
    let msg = format!("{err:#}");
    assert_eq!(
        msg,
        format!("cannot reach PostgreSQL at 127.0.0.1:{port} (DATABASE_URL): connection refused")
    );
    assert!(!format!("{err:?}").contains("hunter2"));
}

#[tokio::test]
async fn an_unreachable_redis_is_one_clear_line() {
    let port = closed_port();
    let url = format!("redis://127.0.0.1:{port}");
    let err = redis_conn::connect_manager(&plain_client(&url), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        format!("cannot reach Redis at 127.0.0.1:{port} (REDIS_URL): connection refused")
    );
}

#[tokio::test]
async fn a_dedicated_connection_survives_a_block_longer_than_the_default_timeout() {
    let mut conn =
        redis_conn::dedicated_connection(&plain_client(&redis_url()), Duration::from_secs(3))
            .await
            .unwrap();
    let key = format!("platform_test:{}", uuid::Uuid::new_v4().simple());
    // BLPOP on an empty list blocks for its full timeout (1 s), past redis' 500 ms default.
    let popped: Option<(String, String)> = redis::cmd("BLPOP")
        .arg(&key)
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(popped.is_none());
}

async fn readyz(readiness: Readiness) -> (StatusCode, Value) {
    readyz_at(readiness, "/readyz").await
}

async fn readyz_at(readiness: Readiness, path: &str) -> (StatusCode, Value) {
    let handle = platform::metrics::install("platform-test");
    let response = health_router(readiness, handle)
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

/// A pool to a port where nothing listens, built as the services' pools are: a connect
/// refused is retried until the acquire timeout.
fn refused_postgres_pool() -> sqlx::PgPool {
    let options = sqlx::postgres::PgConnectOptions::new()
        .host("127.0.0.1")
        .port(closed_port())
        .username("postgres");
    sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(db::ACQUIRE_TIMEOUT)
        .connect_lazy_with(options)
}

async fn orders_pool() -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin_url())
        .await
        .unwrap()
}

#[tokio::test]
async fn readyz_is_200_when_postgres_and_redis_answer() {
    let redis = redis_conn::connect_manager(&plain_client(&redis_url()), Duration::from_secs(1))
        .await
        .unwrap();
    let (status, body) = readyz(Readiness::new(orders_pool().await, redis)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"status": "ready", "checks": {"postgres": "ok", "redis": "ok"}})
    );
}

#[tokio::test]
async fn readyz_is_503_naming_the_cause_when_postgres_refuses_connections() {
    let pool = refused_postgres_pool();
    let redis = redis_conn::connect_manager(&plain_client(&redis_url()), Duration::from_secs(1))
        .await
        .unwrap();
    let (status, body) = readyz(Readiness::new(pool, redis)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["checks"]["redis"], "ok");
    assert_eq!(body["checks"]["postgres"], "error: connection refused");
}

/// `/readyz` carries no auth: a failed check names the kind of failure in a fixed phrase and
/// never the error's own text (here the server's message, which names the database); that
/// text goes to the log, where whoever runs the service looks.
#[tokio::test]
async fn readyz_names_the_kind_of_failure_and_logs_the_error_it_does_not_show() {
    let (logs, _logging) = LogBuffer::capture("info");
    let missing = format!("no_such_database_{}", std::process::id());
    let options: sqlx::postgres::PgConnectOptions = admin_url().parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(db::ACQUIRE_TIMEOUT)
        .connect_lazy_with(options.database(&missing));
    let (status, body) = readyz(Readiness::default().with_postgres(pool)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        body,
        serde_json::json!({
            "status": "not_ready",
            "checks": {"postgres": "error: database does not exist"},
        })
    );
    let logged = logs.text();
    assert!(
        logged.contains("readiness check fails") && logged.contains(&missing),
        "{logged}"
    );
}

#[tokio::test]
async fn readyz_is_200_while_every_pooled_connection_is_busy_and_postgres_answers() {
    let pool = orders_pool().await;
    let busy = pool.acquire().await.unwrap();
    let (status, body) = readyz(Readiness::default().with_postgres(pool.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checks"]["postgres"], "ok");
    drop(busy);
    pool.close().await;
}

#[tokio::test]
async fn readyz_is_200_while_the_pool_is_busy_and_the_server_is_at_its_connection_limit() {
    // A role limited to one connection, which the pool holds: the check's own connection is
    // turned away by a server that is there.
    let role = TempRole::create("readyz", "CONNECTION LIMIT 1").await;
    let options = role.options();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap();
    let busy = pool.acquire().await.unwrap();
    let (status, body) = readyz(Readiness::default().with_postgres(pool.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(busy);
    pool.close().await;
}

#[tokio::test]
async fn readyz_is_503_naming_redis_when_redis_is_down() {
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let redis = redis_conn::lazy_manager(&plain_client(&url), Duration::from_secs(1)).unwrap();
    let (status, body) = readyz(Readiness::new(orders_pool().await, redis)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["postgres"], "ok");
    // The kind of failure, not only that the check gave up.
    assert_eq!(body["checks"]["redis"], "error: connection refused");
}

/// A probe that leaves Redis out (`/readyz?exclude=redis`, how the command and query services'
/// readiness probes ask) is 200 while Redis is down and PostgreSQL answers, and still 503 when
/// PostgreSQL is the one down; a name that is no check is 400.
#[tokio::test]
async fn readyz_can_leave_out_a_check_by_name_and_refuses_an_unknown_one() {
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let down = redis_conn::lazy_manager(&plain_client(&url), Duration::from_secs(1)).unwrap();
    let readiness = Readiness::new(orders_pool().await, down.clone());
    for path in [
        "/readyz?exclude=redis",
        "/readyz?exclude=redis&exclude=redis",
        "/readyz?exclude=redis%2Credis",
    ] {
        let (status, body) = readyz_at(readiness.clone(), path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(
            body,
            serde_json::json!({"status": "ready", "checks": {"postgres": "ok", "redis": "excluded"}}),
            "{path}"
        );
    }
    let (status, _) = readyz(readiness.clone()).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "without exclude Redis counts"
    );

    let pool = refused_postgres_pool();
    let (status, body) = readyz_at(Readiness::new(pool, down), "/readyz?exclude=redis").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["checks"]["redis"], "excluded");

    let (status, body) = readyz_at(readiness, "/readyz?exclude=reddis").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "invalid_exclude");
    assert!(
        body["detail"].as_str().unwrap().contains("postgres, redis"),
        "{body}"
    );
}

#[tokio::test]
async fn a_custom_check_can_fail_readiness() {
    let readiness = Readiness::default().with_check("projection_lag", || async {
        anyhow::bail!("lag is 5000 events")
    });
    let (status, body) = readyz(readiness).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // A failure of no known kind is shown as such; its text is for the log only.
    assert_eq!(
        body["checks"]["projection_lag"],
        "error: check failed (the service's log says why)"
    );
}

/// `/readyz` carries no auth and is never shed, and the Postgres check may open a server
/// connection of its own: requests arriving while a check runs share its outcome instead of
/// each running it, so a burst of probes never runs a check twice at once. A probe asked
/// after a run finished gets a run of its own, never an old outcome.
#[tokio::test]
async fn concurrent_probes_share_one_run_of_a_check_and_a_later_probe_runs_it_again() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let running = Arc::new(AtomicUsize::new(0));
    let most_at_once = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let (release, released) = tokio::sync::watch::channel(false);
    let readiness = Readiness::default().with_check("slow", {
        let (running, most_at_once, runs) = (running.clone(), most_at_once.clone(), runs.clone());
        move || {
            let (running, most_at_once, runs) =
                (running.clone(), most_at_once.clone(), runs.clone());
            let mut released = released.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most_at_once.fetch_max(now, Ordering::SeqCst);
                // Held until the test has sent every probe.
                let _ = released.wait_for(|released| *released).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        }
    });

    const PROBES: usize = 40;
    let probes: Vec<_> = (0..PROBES)
        .map(|_| tokio::spawn(readyz(readiness.clone())))
        .collect();
    wait_until("the first run is under way", || {
        let running = running.clone();
        async move { running.load(Ordering::SeqCst) == 1 }
    })
    .await;
    release.send_replace(true);
    for probe in probes {
        let (status, body) = probe.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Every probe was asked before the run ended (the runtime ran them all while the test
    // waited for the run), so that one run answered them all.
    assert_eq!(most_at_once.load(Ordering::SeqCst), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let (status, _) = readyz(readiness.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "a later probe runs the check"
    );
}

/// The kubelet asks every few seconds: a check that keeps failing is logged when it starts
/// failing, not at every probe, and once more when it passes again; a probe that leaves the
/// check out says nothing about it, and a new outage is logged again.
#[tokio::test]
async fn a_failing_check_is_logged_when_it_starts_failing_and_when_it_passes_again_not_at_every_probe()
 {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let (logs, _logging) = LogBuffer::capture("info");
    let failing = Arc::new(AtomicBool::new(true));
    let readiness = Readiness::default().with_check("projection_lag", {
        let failing = failing.clone();
        move || {
            let failing = failing.load(Ordering::SeqCst);
            async move {
                if failing {
                    anyhow::bail!("lag is 5000 events");
                }
                Ok(())
            }
        }
    });

    for _ in 0..5 {
        let (status, _) = readyz(readiness.clone()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let (status, _) = readyz_at(readiness.clone(), "/readyz?exclude=projection_lag").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        logs.lines_containing("readiness check fails"),
        1,
        "{}",
        logs.text()
    );
    assert_eq!(logs.lines_containing("lag is 5000 events"), 1);

    failing.store(false, Ordering::SeqCst);
    for _ in 0..3 {
        let (status, _) = readyz(readiness.clone()).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        logs.lines_containing("readiness check passes again"),
        1,
        "{}",
        logs.text()
    );

    failing.store(true, Ordering::SeqCst);
    let (status, _) = readyz(readiness).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        logs.lines_containing("readiness check fails"),
        2,
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn a_served_app_answers_the_probe_and_stops_on_shutdown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = platform::metrics::install("platform-test");
    let app: Router = health_router(Readiness::default(), handle);
    let token = shutdown::CancellationToken::new();
    let server = tokio::spawn(shutdown::serve_with_grace(
        listener,
        app,
        token.clone().cancelled_owned(),
        Duration::from_secs(5),
    ));

    assert_eq!(
        platform::healthcheck::probe(&addr, "/healthz").await,
        ExitCode::SUCCESS
    );
    assert_eq!(
        platform::healthcheck::probe(&addr, "/nowhere").await,
        ExitCode::FAILURE
    );
    let metrics = platform::healthcheck::probe_status(&addr, "/metrics")
        .await
        .unwrap();
    assert_eq!(metrics, 200);

    token.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        platform::healthcheck::probe(&addr, "/healthz").await,
        ExitCode::FAILURE
    );
}

/// A server of a `/work` route and the health routes, leaving rotation for `delay` after
/// `token` is cancelled; its address and its task.
async fn leaving_server(
    token: &shutdown::CancellationToken,
    delay: Duration,
) -> (String, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = platform::metrics::install("platform-test");
    let app = Router::new()
        .route("/work", axum::routing::get(|| async { "done" }))
        .merge(health_router(Readiness::default(), handle));
    let (app, stop) = shutdown::leave_rotation_first(app, token.clone().cancelled_owned(), delay);
    let server = tokio::spawn(shutdown::serve_with_grace(
        listener,
        app,
        stop,
        Duration::from_secs(5),
    ));
    (addr, server)
}

#[tokio::test]
async fn during_the_shutdown_delay_requests_are_still_served_and_readyz_is_503() {
    let token = shutdown::CancellationToken::new();
    // Far longer than the test, so nothing below races its end.
    let (addr, server) = leaving_server(&token, Duration::from_secs(600)).await;
    let status = |path: &'static str| {
        let addr = addr.clone();
        async move { platform::healthcheck::probe_status(&addr, path).await.ok() }
    };
    assert_eq!(status("/readyz").await, Some(200));

    token.cancel();
    wait_until("/readyz answers 503", || async {
        status("/readyz").await == Some(503)
    })
    .await;
    assert_eq!(status("/work").await, Some(200), "a request was refused");
    assert_eq!(status("/healthz").await, Some(200));
    assert!(!server.is_finished());
    server.abort();
}

#[tokio::test]
async fn after_the_shutdown_delay_the_server_drains_and_stops() {
    let token = shutdown::CancellationToken::new();
    let (addr, server) = leaving_server(&token, Duration::from_millis(100)).await;
    assert_eq!(
        platform::healthcheck::probe(&addr, "/work").await,
        ExitCode::SUCCESS
    );
    token.cancel();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the server did not stop after the delay")
        .unwrap()
        .unwrap();
    assert_eq!(
        platform::healthcheck::probe(&addr, "/work").await,
        ExitCode::FAILURE
    );
}

#[tokio::test]
async fn metrics_are_served_as_prometheus_text() {
    let handle = platform::metrics::install("platform-test");
    let response = health_router(Readiness::default(), handle)
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4"
    );
}
