//! Test support: a fresh, migrated database per test on the local PostgreSQL, dropped when the
//! test ends, so tests run in parallel without seeing each other's data.
//! Enabled by the `test-util` feature; never used by the services.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use std::str::FromStr;

/// The statement an append reads the store's state with, to check its plan.
pub const BATCH_STATE_SQL: &str = crate::append::BATCH_STATE_SQL;
/// The settings an append transaction plans its statements under.
pub const CACHED_PLAN_SETTINGS: &str = crate::append::CACHED_PLAN_SETTINGS;

/// Begins a transaction exactly as an append does (lock and settings), to inspect it.
pub async fn begin_append_transaction(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    crate::append::begin_append(pool).await
}

/// Server the test databases are created on; `TEST_DATABASE_URL` overrides it.
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database that exists for one test.
pub struct TestDatabase {
    pub name: String,
    /// URL of this database, for starting service processes against it.
    pub url: String,
    pub pool: PgPool,
}

impl TestDatabase {
    /// Creates `test_<uuid>`, runs the migrations and connects a small pool.
    pub async fn new() -> Self {
        Self::migrated_to(i64::MAX).await
    }

    /// Like [`Self::new`], with only the migrations up to `version`: the schema an older
    /// release left, to test an upgrade by running [`crate::MIGRATOR`] on it afterwards.
    pub async fn migrated_to(version: i64) -> Self {
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let url = server_url();
        let mut server = PgConnectOptions::from_str(&url).expect("TEST_DATABASE_URL parses");
        // The test server is local: TLS would only cost CPU (see platform::db).
        if !url.contains("sslmode=") {
            server = server.ssl_mode(sqlx::postgres::PgSslMode::Disable);
        }
        let mut admin = server
            .connect()
            .await
            .expect("connect to the test PostgreSQL server");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let _ = admin.close().await;
        let options = server.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options.clone())
            .await
            .expect("connect to test database");
        let migrator = sqlx::migrate::Migrator {
            migrations: crate::MIGRATOR
                .migrations
                .iter()
                .filter(|migration| migration.version <= version)
                .cloned()
                .collect(),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        migrator.run(&pool).await.expect("migrations run");
        let url = options.to_url_lossy().to_string();
        Self { name, url, pool }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let server = server_url();
        // Drop runs outside any runtime guarantee; use a private one on a plain thread.
        let dropper = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect(&server).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                }
            });
        });
        let _ = dropper.join();
    }
}
