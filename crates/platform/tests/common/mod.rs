//! What the platform tests share: where the shared servers are (`TEST_DATABASE_URL` and
//! `REDIS_URL`, as the other crates' test helpers read them), and databases and roles on the
//! shared PostgreSQL that are removed when the test ends, whether it passed or panicked.

#![allow(dead_code, clippy::unwrap_used)]

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

/// The maintenance database of the shared PostgreSQL server (`TEST_DATABASE_URL`).
pub fn admin_url() -> String {
    store::testing::server_url()
}

/// Connection options of [`admin_url`].
pub fn admin_options() -> PgConnectOptions {
    PgConnectOptions::from_str(&admin_url()).expect("TEST_DATABASE_URL parses")
}

/// `host:port` of the shared PostgreSQL server.
pub fn postgres_address() -> String {
    let options = admin_options();
    format!("{}:{}", options.get_host(), options.get_port())
}

/// The port of the shared PostgreSQL server.
pub fn postgres_port() -> u16 {
    admin_options().get_port()
}

/// The URL of database `name` on the shared server: [`admin_url`] with its database replaced.
pub fn database_url(name: &str) -> String {
    let admin = admin_url();
    let (base, query) = match admin.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin.as_str(), None),
    };
    let authority = base.find("://").map_or(0, |at| at + 3);
    let server = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

/// `url` with one more query parameter (`name=value`).
pub fn with_param(url: &str, param: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{param}")
}

/// The shared Redis (`REDIS_URL`).
pub fn redis_url() -> String {
    bus::testing::shared_redis_url()
}

/// The port of the shared Redis.
pub fn redis_port() -> u16 {
    let url = redis_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    host_port
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(6379)
}

/// Runs `sql` on the maintenance database from a thread of its own with its own runtime, so
/// that it works from `Drop`, inside or outside a runtime, while a test unwinds. Errors are
/// ignored: this is cleanup.
fn run_blocking(sql: String) {
    let url = admin_url();
    let cleanup = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async move {
            if let Ok(mut admin) = PgConnection::connect(&url).await {
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut admin)
                    .await;
                let _ = admin.close().await;
            }
        });
    });
    let _ = cleanup.join();
}

/// A database name of one test (`<prefix>_<uuid>`); the database, if the test created it, is
/// dropped with whoever still uses it when this is dropped.
pub struct TempDatabase {
    pub name: String,
    /// [`database_url`] of it.
    pub url: String,
}

impl TempDatabase {
    /// A fresh name; nothing is created (the code under test creates the database).
    pub fn named(prefix: &str) -> Self {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let url = database_url(&name);
        Self { name, url }
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        run_blocking(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ));
    }
}

/// A login role of one test (`<prefix>_<uuid>`) on the shared server, dropped (its sessions
/// ended first) when this is dropped.
pub struct TempRole {
    pub name: String,
}

impl TempRole {
    /// Creates the role with the given extra attributes (e.g. `CONNECTION LIMIT 1`).
    pub async fn create(prefix: &str, attributes: &str) -> Self {
        let role = Self {
            name: format!("{prefix}_{}", uuid::Uuid::new_v4().simple()),
        };
        let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE \"{}\" LOGIN {attributes}",
            role.name
        )))
        .execute(&mut admin)
        .await
        .unwrap();
        let _ = admin.close().await;
        role
    }

    /// Connection options to the maintenance database as this role.
    pub fn options(&self) -> PgConnectOptions {
        admin_options().username(&self.name)
    }
}

impl Drop for TempRole {
    fn drop(&mut self) {
        run_blocking(format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'; \
             DROP ROLE IF EXISTS \"{name}\"",
            name = self.name
        ));
    }
}
