//! Test support: a fresh, migrated database per test on the local PostgreSQL, dropped when the
//! test ends, so tests run in parallel without seeing each other's data; and a proxy in front of
//! it that can go silent ([`SilencingProxy`]), for the failures where the server stops answering;
//! one that can be switched off and on ([`PostgresSwitch`]), for a server that is gone for a
//! while; and a server of one test alone that it can crash and start again
//! ([`PrivatePostgres`]).
//! Enabled by the `test-util` feature; never used by the services.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use std::str::FromStr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod private_postgres;

pub use private_postgres::PrivatePostgres;

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

    /// A pool of one connection to this database that names itself `application_name` in
    /// `pg_stat_activity`, so a test can find its session there (what it waits for, say).
    pub async fn named_pool(&self, application_name: &str) -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(
                self.pool
                    .connect_options()
                    .as_ref()
                    .clone()
                    .application_name(application_name),
            )
            .await
            .expect("connect a named pool")
    }
}

impl TestDatabase {
    /// Ends every session of this database, as a restart of the server does to its clients
    /// (`pg_terminate_backend`, from a session of its own on the server's maintenance
    /// database); returns how many it ended.
    pub async fn end_every_session(&self) -> i64 {
        let mut admin = PgConnection::connect(&server_url())
            .await
            .expect("an admin session");
        let ended = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1) AS ended",
        )
        .bind(&self.name)
        .fetch_one(&mut admin)
        .await
        .expect("end the sessions");
        let _ = admin.close().await;
        ended
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

/// A TCP proxy to PostgreSQL that can stop passing bytes while keeping every connection open:
/// what a client sees when the server's host dies or a network path silently drops its packets
/// (nothing answers, nothing closes).
pub struct SilencingProxy {
    options: PgConnectOptions,
    silent: tokio::sync::watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl SilencingProxy {
    /// Starts a proxy in front of the server of `db`.
    pub async fn start(db: &TestDatabase) -> Self {
        let direct = db.pool.connect_options();
        let upstream = (direct.get_host().to_owned(), direct.get_port());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (silent, watch) = tokio::sync::watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream.clone()).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(Self::pump(client_read, server_write, watch.clone()));
                tokio::spawn(Self::pump(server_read, client_write, watch.clone()));
            }
        });
        Self {
            options: direct.as_ref().clone().port(port),
            silent,
            accept,
        }
    }

    /// A pool of at most `size` connections to `db` through the proxy.
    pub async fn pool(&self, size: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(size)
            .connect_with(self.options.clone())
            .await
            .expect("connect through the proxy")
    }

    /// Copies `from` to `to`, holding every byte while the proxy is silent.
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut silent: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let read = from.read(&mut buffer).await;
            // A silent path passes nothing, not even the end of a connection.
            if silent.wait_for(|silent| !silent).await.is_err() {
                return;
            }
            match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(read) => {
                    if to.write_all(&buffer[..read]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Holds (`true`) or passes again (`false`) every byte, in both directions.
    pub fn set_silent(&self, silent: bool) {
        self.silent.send_replace(silent);
    }
}

impl Drop for SilencingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A TCP forwarder to the server of a test database, on a port of its own, that can be switched
/// off and on. Off, it closes every connection it has forwarded and every new one as soon as it
/// is accepted, as a proxy or load balancer in front of a server that is down does: each client
/// finds the server gone at once, instead of retrying a refused connect until its pool's acquire
/// timeout. On again, it forwards again, at the same address.
pub struct PostgresSwitch {
    options: PgConnectOptions,
    on: tokio::sync::watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl PostgresSwitch {
    /// A switch, on, in front of the server of `db`.
    pub async fn on(db: &TestDatabase) -> Self {
        let direct = db.pool.connect_options();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the switch");
        let port = listener.local_addr().expect("switch address").port();
        let upstream = (direct.get_host().to_owned(), direct.get_port());
        let (on, watch) = tokio::sync::watch::channel(true);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !*watch.borrow() {
                    continue;
                }
                let upstream = upstream.clone();
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|on| !on) => {}
                    }
                });
            }
        });
        Self {
            options: direct.as_ref().clone().host("127.0.0.1").port(port),
            on,
            accept,
        }
    }

    /// Connection options to the test database through the switch.
    pub fn options(&self) -> PgConnectOptions {
        self.options.clone()
    }

    /// A pool of at most `size` connections through the switch that connects when first used
    /// and gives up waiting for a connection after half a second.
    pub fn lazy_pool(&self, size: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(std::time::Duration::from_millis(500))
            .connect_lazy_with(self.options())
    }

    /// Cuts every forwarded connection, and closes new ones at once (see the type's docs).
    pub fn turn_off(&self) {
        self.on.send_replace(false);
    }

    /// Forwards new connections again.
    pub fn turn_on(&self) {
        self.on.send_replace(true);
    }
}

impl Drop for PostgresSwitch {
    fn drop(&mut self) {
        self.accept.abort();
        self.on.send_replace(false);
    }
}

/// Appends one event to `order_id`'s stream as another release of the service wrote it: of
/// `event_type` (one this build may not know) at `schema_version` (an older one, or one above
/// the newest this build knows), with `data` as given. Returns its global position. What an
/// instance meets in a store that older releases wrote to, or while a newer one rolls out.
pub async fn append_as_another_release_wrote_it(
    pool: &PgPool,
    order_id: uuid::Uuid,
    event_type: &str,
    schema_version: i32,
    data: serde_json::Value,
) -> i64 {
    let request = crate::AppendRequest {
        stream_id: events::order_stream_id(order_id),
        expected: crate::ExpectedVersion::Any,
        events: vec![events::NewEvent {
            event_id: uuid::Uuid::now_v7(),
            event_type: event_type.to_owned(),
            schema_version,
            data,
            metadata: events::EventMetadata::default(),
        }],
        idempotency: None,
    };
    let mut results = crate::append_batch(pool, &[request])
        .await
        .expect("the append commits");
    results
        .remove(0)
        .expect("the append is accepted")
        .last_position
}

/// Migrates `pool`'s database as the next release would: this release's migrations, then one
/// more of its own (an additive one, as every migration is), so the database is ahead of
/// [`crate::MIGRATOR`]. Returns that migration's version.
pub async fn migrate_as_a_newer_release(pool: &PgPool) -> i64 {
    use sqlx::SqlSafeStr as _;
    let newest = crate::MIGRATOR
        .iter()
        .map(|migration| migration.version)
        .max()
        .unwrap_or(0);
    let version = newest + 1;
    let mut migrations: Vec<sqlx::migrate::Migration> = crate::MIGRATOR.iter().cloned().collect();
    migrations.push(sqlx::migrate::Migration::new(
        version,
        "from a newer release".into(),
        sqlx::migrate::MigrationType::Simple,
        "CREATE TABLE order_notes (order_id uuid PRIMARY KEY, note text NOT NULL)".into_sql_str(),
        false,
    ));
    let migrator = sqlx::migrate::Migrator {
        migrations: migrations.into(),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    migrator.run(pool).await.expect("the newer migrations run");
    version
}
