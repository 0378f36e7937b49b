//! Scratch resources of one run: databases named `bench_<run>_<purpose>` on the configured
//! server and Redis keys under `bench-<run>:`. Everything is created here and, unless `--keep`,
//! dropped here at the end; the shared servers' other databases and keys are never touched.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// Connections of a pool the tool itself uses (generation, ceiling clients add their own).
pub const TOOL_POOL_SIZE: u32 = 8;

/// `application_name` of the tool's own PostgreSQL connections.
pub const BENCH_APPLICATION_NAME: &str = "bench";

/// The scratch namespace of one run.
#[derive(Debug, Clone)]
pub struct Scratch {
    /// Short unique id of the run.
    pub run: String,
    server: PgConnectOptions,
    redis_url: String,
    databases: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Scratch {
    /// A namespace for a new run on the given servers.
    pub fn new(postgres_url: &str, redis_url: &str) -> anyhow::Result<Self> {
        // The services decide TLS the same way (no TLS to a loopback server unless asked), so
        // the ceiling and the services are measured over the same kind of connection.
        let server = platform::db::without_loopback_tls(
            postgres_url,
            PgConnectOptions::from_str(postgres_url).context("invalid BENCH_POSTGRES_URL")?,
        );
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        Ok(Self {
            run,
            server,
            redis_url: redis_url.to_owned(),
            databases: Default::default(),
        })
    }

    /// The Redis stream key of a purpose, private to this run.
    pub fn stream_key(&self, purpose: &str) -> String {
        format!("bench-{}-{purpose}:es:events", self.run)
    }

    /// The name of the scratch database of a purpose.
    pub fn database_name(&self, purpose: &str) -> String {
        format!("bench_{}_{purpose}", self.run)
    }

    /// The URL of a scratch database.
    pub fn database_url(&self, purpose: &str) -> String {
        self.server
            .clone()
            .database(&self.database_name(purpose))
            .to_url_lossy()
            .to_string()
    }

    /// The tool's own connection options: named `bench`, so the CPU tables tell its backends
    /// (the freshness run's database polls) from the services'. The URLs handed to the services
    /// ([`Self::database_url`]) carry no name, so each service names its own.
    fn own_connection(&self) -> PgConnectOptions {
        platform::db::with_application_name(self.server.clone(), BENCH_APPLICATION_NAME)
    }

    async fn admin(&self) -> anyhow::Result<PgConnection> {
        self.own_connection()
            .connect()
            .await
            .context("connect to the PostgreSQL server (BENCH_POSTGRES_URL)")
    }

    /// Creates an empty database for `purpose` (services migrate it themselves at start).
    pub async fn create_database(&self, purpose: &str) -> anyhow::Result<String> {
        self.create(purpose, None).await
    }

    /// Creates a database for `purpose` as a copy of another scratch database (fast: a file
    /// copy). The template must have no open connections.
    pub async fn copy_database(&self, template: &str, purpose: &str) -> anyhow::Result<String> {
        self.create(purpose, Some(&self.database_name(template)))
            .await
    }

    async fn create(&self, purpose: &str, template: Option<&str>) -> anyhow::Result<String> {
        let name = self.database_name(purpose);
        let mut admin = self.admin().await?;
        let sql = match template {
            Some(template) => format!("CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""),
            None => format!("CREATE DATABASE \"{name}\""),
        };
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .with_context(|| format!("create scratch database {name}"))?;
        let _ = admin.close().await;
        if let Ok(mut names) = self.databases.lock() {
            names.push(name);
        }
        Ok(self.database_url(purpose))
    }

    /// Creates and migrates a database for `purpose` and returns a pool on it.
    pub async fn migrated_pool(&self, purpose: &str, size: u32) -> anyhow::Result<PgPool> {
        self.create_database(purpose).await?;
        let pool = self.pool(purpose, size).await?;
        store::MIGRATOR
            .run(&pool)
            .await
            .with_context(|| format!("migrate scratch database {}", self.database_name(purpose)))?;
        Ok(pool)
    }

    /// A pool on an existing scratch database.
    pub async fn pool(&self, purpose: &str, size: u32) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(self.own_connection().database(&self.database_name(purpose)))
            .await
            .with_context(|| {
                format!(
                    "connect to scratch database {}",
                    self.database_name(purpose)
                )
            })
    }

    /// Drops one scratch database (forcing out leftover connections).
    pub async fn drop_database(&self, purpose: &str) -> anyhow::Result<()> {
        let name = self.database_name(purpose);
        let mut admin = self.admin().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await
        .with_context(|| format!("drop scratch database {name}"))?;
        let _ = admin.close().await;
        if let Ok(mut names) = self.databases.lock() {
            names.retain(|n| *n != name);
        }
        Ok(())
    }

    /// Deletes a Redis key of this run (a stream and its dead-letter streams).
    pub async fn delete_stream(&self, key: &str) -> anyhow::Result<()> {
        if !key.starts_with(&format!("bench-{}-", self.run)) {
            anyhow::bail!("refusing to delete {key}: not a key of this run");
        }
        let client = crate::redis_client::redis_client(&self.redis_url)?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .context("connect to Redis")?;
        let pattern = format!("{key}*");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .context("list the run's Redis keys")?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .context("delete the run's Redis keys")?;
        }
        Ok(())
    }

    /// Drops every scratch database this run still has.
    pub async fn drop_all(&self) -> anyhow::Result<()> {
        let names: Vec<String> = self.databases.lock().map(|n| n.clone()).unwrap_or_default();
        let prefix = format!("bench_{}_", self.run);
        for name in names {
            if let Some(purpose) = name.strip_prefix(&prefix) {
                self.drop_database(purpose).await?;
            }
        }
        Ok(())
    }
}
