//! The tool's own Redis clients, built the way the services build theirs: `--redis-url`
//! (`BENCH_REDIS_URL`) with the TLS files named by `REDIS_CA_CERT`, `REDIS_CLIENT_CERT` and
//! `REDIS_CLIENT_KEY` in the environment, which spawned services inherit. So a run against a
//! `rediss://` server needs those set once, for both.

use anyhow::Context;
use clap::Parser;
use platform::config::RedisTlsArgs;

/// The services' TLS settings, read from the environment alone.
#[derive(Parser)]
struct FromEnvironment {
    #[command(flatten)]
    tls: RedisTlsArgs,
}

/// A client of `redis_url` with the environment's TLS files.
pub fn redis_client(redis_url: &str) -> anyhow::Result<redis::Client> {
    let settings = FromEnvironment::try_parse_from(["bench"]).context("the Redis TLS settings")?;
    platform::config::redis_client(redis_url, &settings.tls).context("BENCH_REDIS_URL")
}
