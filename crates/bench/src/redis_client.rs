//! The tool's own Redis clients, built the way the services build theirs: `--redis-url`
//! (`BENCH_REDIS_URL`) with the TLS files named by `REDIS_CA_CERT`, `REDIS_CLIENT_CERT` and
//! `REDIS_CLIENT_KEY` in the environment, which spawned services inherit. So a run against a
//! `rediss://` server needs those set once, for both.

use std::path::PathBuf;

use anyhow::Context;
use platform::config::RedisTlsArgs;

/// A client of `redis_url` with the environment's TLS files.
pub fn redis_client(redis_url: &str) -> anyhow::Result<redis::Client> {
    let file = |name: &str| std::env::var_os(name).map(PathBuf::from);
    let tls = RedisTlsArgs {
        redis_ca_cert: file("REDIS_CA_CERT"),
        redis_client_cert: file("REDIS_CLIENT_CERT"),
        redis_client_key: file("REDIS_CLIENT_KEY"),
    };
    platform::config::redis_client(redis_url, &tls).context("BENCH_REDIS_URL")
}
