//! The query service's settings: every one a clap flag and an environment variable.
//!
//! [`Config::validate`] checks what clap cannot (URLs, relations between settings) and names the
//! setting in its one-line error. This module never connects to anything.

use std::time::Duration;

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use platform::config::{AuthArgs, CommonArgs, HttpArgs};

/// Default `LISTEN_ADDR` of the query service (see CONTRACT.md).
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:8081";

/// How long the request timeout outlasts the longest consistency wait, so a wait that runs out
/// answers 503 `consistency_timeout` rather than the generic 503 `timeout`.
pub const REQUEST_TIMEOUT_MARGIN: Duration = Duration::from_secs(5);

/// The read API: read models over HTTP, read-your-writes, history and time travel.
#[derive(Debug, Clone, Parser)]
#[command(name = "query-service", version, about)]
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
    pub reads: ReadArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What the binary does; `serve` when no subcommand is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Serve the read API (the default)
    Serve,
    /// Create the database if missing, run the migrations and exit
    Migrate,
    /// Probe GET /healthz on the listen port and exit 0 when healthy (Docker HEALTHCHECK)
    Healthcheck,
}

/// The largest `WAIT_MS_MAX` accepted: ten minutes.
pub const WAIT_MS_MAX_LIMIT: u64 = 600_000;

/// Settings of read-your-writes and paging.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadArgs {
    /// Milliseconds a request with `min_position` waits when it gives no `wait_ms`
    #[arg(long, env = "WAIT_MS_DEFAULT", default_value_t = 2000)]
    pub wait_ms_default: u64,

    /// Largest `wait_ms` a request may ask for; larger ones are refused with 400 `invalid_wait`
    /// (1 to 600000: a read-your-writes wait of minutes outlives any proxy's idle timeout, and
    /// the bound keeps every deadline computed from it far from overflow)
    #[arg(long, env = "WAIT_MS_MAX", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=WAIT_MS_MAX_LIMIT))]
    pub wait_ms_max: u64,

    /// Milliseconds between two reads of `projection_checkpoints` by the watcher, the fallback
    /// for notifications lost while its LISTEN connection reconnects (at least 10)
    #[arg(long, env = "CHECKPOINT_POLL_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(..=platform::config::MAX_INTERVAL_MS))]
    pub checkpoint_poll_ms: u64,

    /// Positions one page of `GET /events?event_type=` reads at most: a filter that matches
    /// rarely answers after this much work with `read_to` advanced, instead of reading the
    /// whole log in one request
    #[arg(long, env = "EVENTS_SCAN_SPAN", default_value_t = 10_000)]
    pub events_scan_span: i64,

    /// Most `GET /events/stream` followers one instance serves at once; more get 503
    /// `overloaded` (a stream holds no request slot of `MAX_IN_FLIGHT_REQUESTS`); each holds up
    /// to about 1 MB at the head (one tail batch of frames)
    #[arg(
        long,
        env = "EVENT_STREAMS_MAX",
        default_value_t = 256,
        value_parser = clap::value_parser!(u64).range(1..=100_000)
    )]
    pub event_streams_max: u64,

    /// Milliseconds a filtered `GET /events/stream` at the head may hold back the id-only
    /// frame that moves its client's resume point past events of other types: at most one
    /// such frame per stream per interval instead of one per commit (0: one per commit)
    #[arg(
        long,
        env = "EVENT_STREAM_PROGRESS_MS",
        default_value_t = 1_000,
        value_parser = clap::value_parser!(u64).range(0..=60_000)
    )]
    pub event_stream_progress_ms: u64,
}

impl Default for ReadArgs {
    fn default() -> Self {
        Self {
            wait_ms_default: 2000,
            wait_ms_max: 10_000,
            checkpoint_poll_ms: 250,
            events_scan_span: 10_000,
            event_streams_max: 256,
            event_stream_progress_ms: 1_000,
        }
    }
}

impl Config {
    /// Checks what clap cannot; the error is one line naming the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.common.validate()?;
        self.auth.validate()?;
        self.http.allowed_origins()?;
        platform::config::validate_listen_addr(&self.listen_addr)?;
        if self.reads.wait_ms_default > self.reads.wait_ms_max {
            return Err(anyhow!(
                "invalid WAIT_MS_DEFAULT: {} exceeds WAIT_MS_MAX ({})",
                self.reads.wait_ms_default,
                self.reads.wait_ms_max
            ));
        }
        if self.reads.checkpoint_poll_ms < 10 {
            return Err(anyhow!("invalid CHECKPOINT_POLL_MS: must be at least 10"));
        }
        if self.reads.events_scan_span < 1 {
            return Err(anyhow!("invalid EVENTS_SCAN_SPAN: must be at least 1"));
        }
        Ok(())
    }

    /// What to run: `serve` unless a subcommand says otherwise.
    pub fn command(&self) -> Command {
        self.command.unwrap_or(Command::Serve)
    }
}

impl ReadArgs {
    /// The request timeout: the longest wait plus [`REQUEST_TIMEOUT_MARGIN`].
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.wait_ms_max) + REQUEST_TIMEOUT_MARGIN
    }

    /// The bound on open event streams as a `usize`.
    pub fn event_streams_max(&self) -> usize {
        usize::try_from(self.event_streams_max).unwrap_or(usize::MAX)
    }

    /// Interval of the watcher's fallback poll.
    pub fn checkpoint_poll(&self) -> Duration {
        Duration::from_millis(self.checkpoint_poll_ms)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let config = Config::try_parse_from(["query-service"]).unwrap();
        assert_eq!(config.listen_addr, "0.0.0.0:8081");
        assert_eq!(config.reads.wait_ms_default, 2000);
        assert_eq!(config.reads.wait_ms_max, 10_000);
        assert_eq!(config.reads.events_scan_span, 10_000);
        assert_eq!(config.http.max_in_flight(), 1024);
        assert_eq!(config.command(), Command::Serve);
        config.validate().unwrap();
    }

    #[test]
    fn a_default_wait_above_the_maximum_names_the_setting() {
        let config =
            Config::try_parse_from(["query-service", "--wait-ms-default", "20000"]).unwrap();
        let msg = config.validate().unwrap_err().to_string();
        assert!(msg.starts_with("invalid WAIT_MS_DEFAULT"), "{msg}");
    }

    #[test]
    fn a_scan_span_below_one_names_the_setting() {
        let config = Config::try_parse_from(["query-service", "--events-scan-span", "0"]).unwrap();
        let msg = config.validate().unwrap_err().to_string();
        assert!(msg.starts_with("invalid EVENTS_SCAN_SPAN"), "{msg}");
    }

    #[test]
    fn the_subcommands_parse() {
        let config = Config::try_parse_from(["query-service", "migrate"]).unwrap();
        assert_eq!(config.command(), Command::Migrate);
        let config = Config::try_parse_from(["query-service", "healthcheck"]).unwrap();
        assert_eq!(config.command(), Command::Healthcheck);
    }
}
