//! What the numbers were measured on: CPU, memory, kernel, PostgreSQL and Redis versions and
//! the settings that decide commit cost (`synchronous_commit`, `fsync`). Read at run time, so
//! every result file says where it came from.

use anyhow::Context;
use serde::Serialize;
use sqlx::{Connection, PgConnection};

/// The machine and servers of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub postgres_version: String,
    pub synchronous_commit: String,
    pub fsync: String,
    pub shared_buffers: String,
    pub postgres_max_connections: String,
    pub redis_version: String,
    pub redis_persistence: String,
    /// `/proc/loadavg` when the run started: the machine is shared, so other work competes.
    pub load_average_at_start: String,
}

/// Reads the machine description.
pub async fn describe(postgres_url: &str, redis_url: &str) -> anyhow::Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kb: f64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();

    let mut pg = PgConnection::connect(postgres_url)
        .await
        .context("connect to PostgreSQL (BENCH_POSTGRES_URL)")?;
    let mut setting = async |name: &'static str| -> anyhow::Result<String> {
        sqlx::query_scalar::<_, String>("SELECT current_setting($1)")
            .bind(name)
            .fetch_one(&mut pg)
            .await
            .with_context(|| format!("read the PostgreSQL setting {name}"))
    };
    let postgres_version = setting("server_version").await?;
    let synchronous_commit = setting("synchronous_commit").await?;
    let fsync = setting("fsync").await?;
    let shared_buffers = setting("shared_buffers").await?;
    let postgres_max_connections = setting("max_connections").await?;
    let _ = pg.close().await;

    let client = crate::redis_client::redis_client(redis_url)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .context("connect to Redis")?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .context("read Redis INFO")?;
    let redis_version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let persistence: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    let redis_persistence = format!(
        "appendonly={}",
        persistence.get(1).map_or("?", String::as_str)
    );

    let load_average_at_start = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    Ok(Machine {
        cpu_model,
        cpus,
        memory_gib: memory_kb / 1024.0 / 1024.0,
        kernel,
        postgres_version,
        synchronous_commit,
        fsync,
        shared_buffers,
        postgres_max_connections,
        redis_version,
        redis_persistence,
        load_average_at_start,
    })
}
