//! Releases overlapping: an instance of this release starts (a restart, a scale-out, a
//! rollback) on a database the next release has already migrated.

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
