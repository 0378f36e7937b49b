//! The command service's settings: every one a command-line flag and an environment variable.
//!
//! Parsing never connects to anything. A bad value exits at start with one line naming the
//! setting (see [`Config::parse_or_exit`]).

use std::time::Duration;

use clap::{Parser, Subcommand};
use platform::config::{AuthArgs, CommonArgs, HttpArgs};

use crate::relay::RelayArgs;

/// Default `LISTEN_ADDR` of the write API (see CONTRACT.md).
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:8080";

/// The HTTP write API of the order system and its outbox relay.
#[derive(Debug, Clone, Parser)]
#[command(name = "command-service", version, about)]
pub struct Config {
    /// Address the HTTP server listens on
    #[arg(long, env = "LISTEN_ADDR", default_value = DEFAULT_LISTEN_ADDR, global = true)]
    pub listen_addr: String,

    #[command(flatten)]
    pub common: CommonArgs,

    #[command(flatten)]
    pub auth: AuthArgs,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub commands: CommandArgs,

    #[command(flatten)]
    pub relay: RelayArgs,

    /// What to do; `serve` when omitted
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands of the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Serve the write API (and run the relay when enabled); the default
    Serve,
    /// Run the database migrations and exit
    Migrate,
    /// Probe GET /healthz on the listen port and exit 0 when healthy (Docker HEALTHCHECK)
    Healthcheck,
}

/// Settings of command handling and of the HTTP write API.
#[derive(Debug, Clone, clap::Args)]
pub struct CommandArgs {
    /// Write a snapshot of an order every this many events, so loading a long order replays at
    /// most this many events; 0 turns snapshots off (to measure what they save)
    #[arg(long, env = "SNAPSHOT_EVERY", default_value_t = 100)]
    pub snapshot_every: u64,

    /// Internal retries of a command without If-Match after a concurrent append, before 409
    #[arg(long, env = "COMMAND_RETRIES", default_value_t = 5)]
    pub command_retries: u32,

    /// Largest accepted request body in bytes; larger bodies get 413
    #[arg(
        long,
        env = "BODY_LIMIT_BYTES",
        default_value_t = 65_536,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub body_limit_bytes: u64,

    /// Longest a request may take in milliseconds; slower requests get 503 `timeout`
    #[arg(
        long,
        env = "REQUEST_TIMEOUT_MS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..=platform::config::MAX_INTERVAL_MS)
    )]
    pub request_timeout_ms: u64,

    /// Most orders whose state is kept in memory between commands (at least 1)
    #[arg(
        long,
        env = "ORDER_CACHE_CAPACITY",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub order_cache_capacity: u64,

    /// Most bytes the cached order states may take, roughly (at least 64 KiB); the count alone
    /// does not bound the memory, as one order may hold 200 lines of 64-character SKUs (about
    /// 30 kB)
    #[arg(
        long,
        env = "ORDER_CACHE_MAX_BYTES",
        default_value_t = 32 * 1024 * 1024,
        value_parser = clap::value_parser!(u64).range(64 * 1024..)
    )]
    pub order_cache_max_bytes: u64,

    /// Hours an Idempotency-Key and its stored response are kept (1 to 87600, ten years)
    #[arg(
        long,
        env = "IDEMPOTENCY_TTL_HOURS",
        default_value_t = 24,
        value_parser = clap::value_parser!(u64).range(1..=MAX_IDEMPOTENCY_TTL_HOURS)
    )]
    pub idempotency_ttl_hours: u64,
}

impl CommandArgs {
    /// The request timeout as a `Duration`.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The body limit as a `usize` (saturating on 32-bit targets).
    pub fn body_limit(&self) -> usize {
        usize::try_from(self.body_limit_bytes).unwrap_or(usize::MAX)
    }

    /// The idempotency key lifetime in seconds.
    pub fn idempotency_ttl_secs(&self) -> i64 {
        i64::try_from(self.idempotency_ttl_hours.saturating_mul(3600)).unwrap_or(i64::MAX)
    }
}

impl Config {
    /// Parses flags and environment ([`platform::config::parse_or_exit`]: a bad setting prints
    /// one line naming it and exits 2).
    pub fn parse_or_exit() -> Self {
        platform::config::parse_or_exit()
    }

    /// Parses the given arguments (and the environment), for tests.
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::try_parse_from(args)
    }

    /// The subcommand, `serve` when none was given.
    pub fn command(&self) -> Command {
        self.command.unwrap_or(Command::Serve)
    }

    /// Checks what clap cannot (URL syntax), naming the setting on failure.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.common.validate()?;
        self.auth.validate()?;
        self.relay.validate()?;
        self.http.allowed_origins()?;
        platform::config::validate_listen_addr(&self.listen_addr)?;
        Ok(())
    }
}

/// Longest `IDEMPOTENCY_TTL_HOURS` accepted: ten years. The expiry computes `now()` minus the
/// period in PostgreSQL, which fails for a period reaching back before 4713 BC; refused at
/// start, such a value would otherwise leave every key unexpired, with a warning every ten
/// minutes.
pub const MAX_IDEMPOTENCY_TTL_HOURS: u64 = 87_600;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_brief() {
        let config = Config::try_parse_args(["command-service"]).unwrap();
        assert_eq!(config.command(), Command::Serve);
        assert_eq!(config.commands.command_retries, 5);
        assert_eq!(config.commands.body_limit_bytes, 65_536);
        assert_eq!(config.http.max_in_flight(), 1024);
        assert_eq!(config.commands.request_timeout_ms, 10_000);
        assert_eq!(config.commands.order_cache_capacity, 10_000);
        assert_eq!(config.commands.order_cache_max_bytes, 32 * 1024 * 1024);
        assert_eq!(config.commands.idempotency_ttl_hours, 24);
    }

    #[test]
    fn an_order_cache_under_64_kib_is_refused() {
        let parse = |bytes: &str| {
            Config::try_parse_args(["command-service", "--order-cache-max-bytes", bytes])
        };
        assert_eq!(
            parse("65536").unwrap().commands.order_cache_max_bytes,
            65_536
        );
        assert!(parse("65535").is_err());
    }

    #[test]
    fn an_idempotency_period_beyond_ten_years_is_refused() {
        let parse = |hours: &str| {
            Config::try_parse_args(["command-service", "--idempotency-ttl-hours", hours])
        };
        assert_eq!(
            parse("87600").unwrap().commands.idempotency_ttl_hours,
            MAX_IDEMPOTENCY_TTL_HOURS
        );
        assert!(parse("87601").is_err());
        assert!(parse("100000000").is_err());
    }

    #[test]
    fn subcommands_parse() {
        let config = Config::try_parse_args(["command-service", "migrate"]).unwrap();
        assert_eq!(config.command(), Command::Migrate);
        let config = Config::try_parse_args(["command-service", "healthcheck"]).unwrap();
        assert_eq!(config.command(), Command::Healthcheck);
    }

    #[test]
    fn a_zero_snapshot_interval_turns_snapshots_off_and_a_negative_one_is_refused() {
        let config = Config::try_parse_args(["command-service", "--snapshot-every", "0"]).unwrap();
        assert_eq!(config.commands.snapshot_every, 0);
        assert!(Config::try_parse_args(["command-service", "--snapshot-every", "-1"]).is_err());
    }
}
