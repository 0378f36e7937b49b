//! Releases overlapping: an instance of this release starts (a restart, a scale-out, a
//! rollback) on a database the next release has already migrated, and the running services
//! meet an event the next release wrote.

use crate::support::*;
use serde_json::json;
use store::testing::TestDatabase;
use uuid::Uuid;

/// The database holds a migration this release does not have. The command service, migrating
/// at start, still starts, says why the schema is ahead, and serves commands; the `migrate`
/// subcommand of this release exits 0 on it. A migration this release does have but which was
/// changed since it was applied is still refused, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_starts_on_a_database_a_newer_release_has_migrated() {
    let db = TestDatabase::new().await;
    let newer = store::testing::migrate_as_a_newer_release(&db.pool).await;
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();

    let mut command = Service::start(
        "command-service",
        "command-service",
        &db.url,
        &stream,
        &[("SKIP_MIGRATIONS", "false")],
    );
    command.wait_ready(&http).await;
    send(
        &http,
        http.post(command.url("/orders"))
            .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "EUR" })),
        201,
    )
    .await;
    let log = command.log();
    assert!(
        log.contains("migrated by a newer release") && log.contains(&newer.to_string()),
        "{log}"
    );
    assert!(command.terminate().await.success());

    let migrate = |bin: &'static str| {
        std::process::Command::new(bin_dir().join(bin))
            .arg("migrate")
            .env("DATABASE_URL", &db.url)
            .env("LOG_FORMAT", "json")
            .output()
            .expect("run migrate")
    };
    let output = migrate("query-service");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // An applied migration edited afterwards is another matter: refused, with its version.
    sqlx::query("UPDATE _sqlx_migrations SET checksum = '\\x00'::bytea WHERE version = 1")
        .execute(&db.pool)
        .await
        .expect("alter the recorded checksum");
    let output = migrate("projector");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("migration 1"), "{stderr}");
}

/// A newer release rolls out while this one runs, and one of its events lands in an order
/// (`OrderPlaced` at a schema version this release does not know). The running services of
/// this release hold it instead of failing it: the projector neither dead-letters nor parks
/// it however often it tries, other orders flow into the read models (reading one's writes
/// past the held event waits, as the mark stops before it), a command and time travel on that
/// order are answered 503 `event_from_newer_release`, and `projector status` names what is in
/// the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_release_holds_an_event_of_a_newer_one_while_everything_else_flows() {
    let db = TestDatabase::new().await;
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();
    let mut command = Service::start("command-service", "command-service", &db.url, &stream, &[]);
    let mut projector = Service::start(
        "projector",
        "projector",
        &db.url,
        &stream,
        &[
            ("MAX_ATTEMPTS", "2"),
            ("RETRY_BASE_MS", "20"),
            ("SWEEP_GRACE_MS", "300"),
        ],
    );
    let mut query = Service::start("query-service", "query-service", &db.url, &stream, &[]);
    for service in [&mut command, &mut projector, &mut query] {
        service.wait_ready(&http).await;
    }

    let (held, _) = create_order_with_a_book(&http, &command).await;
    let newer = events::current_schema_version("OrderPlaced").expect("a known type") + 1;
    store::testing::append_as_another_release_wrote_it(
        &db.pool,
        held.parse().expect("an order id"),
        "OrderPlaced",
        newer,
        json!({ "total": 1250, "channel": "web" }),
    )
    .await;
    let (other, position) = create_order_with_a_book(&http, &command).await;
    bus::testing::wait_until(DEADLINE, "the other order is in the read model", || {
        let request = http.get(query.url(&format!("/orders/{other}")));
        async move {
            let response = request.send().await.ok()?;
            (response.status().as_u16() == 200).then_some(())
        }
    })
    .await;
    // The low-water mark stops before the held event: reading one's writes past it waits out.
    let lagging = send(
        &http,
        http.get(query.url(&format!(
            "/orders/{other}?min_position={position}&wait_ms=100"
        ))),
        503,
    )
    .await;
    assert_eq!(lagging["code"], "consistency_timeout", "{lagging}");
    wait_metric(
        &http,
        &projector,
        "projector_newer_release_holds_total",
        |v| v >= 10.0,
    )
    .await;

    for request in [
        http.post(command.url(&format!("/orders/{held}/place"))),
        http.get(query.url(&format!("/orders/{held}/state"))),
    ] {
        let refused = send(&http, request, 503).await;
        assert_eq!(refused["code"], "event_from_newer_release", "{refused}");
    }
    let (complete, printed) = projector_admin(&db.url, &stream, &["status", "--json"]).await;
    assert!(complete, "{printed}");
    // The report comes first (stdout), the log lines after it.
    let report = &printed[printed.find('{').expect("the JSON report")..];
    let status: serde_json::Value = serde_json::Deserializer::from_str(report)
        .into_iter()
        .next()
        .expect("a JSON value")
        .expect("the JSON report parses");
    let projections = status["projections"].as_array().expect("projections");
    let mut reported: Vec<&str> = projections
        .iter()
        .map(|p| p["projection"].as_str().expect("a projection's name"))
        .collect();
    reported.sort_unstable();
    assert_eq!(reported, ["customer_stats", "order_summaries"], "{status}");
    for projection in projections {
        assert_eq!(projection["dead_letters"], 0, "{projection}");
        assert_eq!(projection["parked_streams"], 0, "{projection}");
        assert_eq!(
            projection["oldest_unapplied_event"],
            format!("OrderPlaced v{newer}"),
            "{projection}"
        );
    }
    for service in [&mut command, &mut projector, &mut query] {
        assert!(service.terminate().await.success(), "{}", service.name);
    }
}
