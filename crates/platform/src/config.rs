//! Settings every binary shares, as clap arguments that also read environment variables.
//!
//! Each binary flattens [`CommonArgs`] (and [`AuthArgs`] when it serves an API) into its own
//! `clap::Parser` with `#[command(flatten)]`. clap rejects bad numbers itself (exit code 2);
//! [`CommonArgs::validate`] checks what clap cannot (URL syntax), and [`exit_on_config_error`]
//! turns a failure into the one line the contract promises. This module never connects to
//! anything.

use std::str::FromStr;
use std::time::Duration;

use anyhow::anyhow;
use sqlx::postgres::PgConnectOptions;

use crate::auth::BearerTokens;
pub use crate::redis_tls::RedisTlsArgs;

/// Default `DATABASE_URL`: the local trust-auth server used in development and tests.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/orders";
/// Default `REDIS_URL`: the local server used in development and tests.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Default `EVENT_STREAM`: the Redis stream every committed event is published to.
pub const DEFAULT_EVENT_STREAM: &str = "es:events";
/// Exit code for a bad setting, the same code clap uses for bad arguments.
pub const CONFIG_ERROR_EXIT_CODE: i32 = 2;
/// Longest time any interval, timeout or grace setting may name, in milliseconds: a day. A
/// longer one is a mistake, and some would fail only much later: an instant a century ahead
/// overflows the clock (a panic at shutdown), and Redis refuses an idle time past its own
/// integers (a reclaim that never works), so they are refused at start, naming the setting.
pub const MAX_INTERVAL_MS: u64 = 86_400_000;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line with span fields (request_id, correlation_id, trace_id).
    Json,
    /// Human-readable, coloured lines for a terminal.
    #[default]
    Pretty,
}

/// Settings shared by every binary; flatten it into the binary's own config.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// PostgreSQL connection URL; the database is created when missing
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,

    /// Redis connection URL (`rediss://` for TLS)
    #[arg(long, env = "REDIS_URL", default_value = DEFAULT_REDIS_URL, hide_env_values = true)]
    pub redis_url: String,

    /// TLS files for a `rediss://` REDIS_URL.
    #[command(flatten)]
    pub redis_tls: RedisTlsArgs,

    /// Log line format
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// Which log lines are written: `tracing` EnvFilter directives, e.g. `debug` or
    /// `info,projector=debug` (a directive that does not parse stops the binary at start)
    #[arg(long, env = "RUST_LOG", default_value = crate::telemetry::DEFAULT_FILTER)]
    pub rust_log: String,

    /// Do not run the embedded database migrations at start (env: true/false, 1/0, yes/no)
    #[arg(
        long,
        env = "SKIP_MIGRATIONS",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub skip_migrations: bool,

    /// Maximum number of pooled PostgreSQL connections (at least 1)
    #[arg(
        long,
        env = "DB_MAX_CONNECTIONS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub db_max_connections: u32,

    /// Redis stream the events are published to and consumed from
    #[arg(long, env = "EVENT_STREAM", default_value = DEFAULT_EVENT_STREAM)]
    pub event_stream: String,

    /// Seconds to let in-flight requests and work finish after SIGTERM before exiting (at most
    /// a day)
    #[arg(
        long,
        env = "SHUTDOWN_GRACE_SECS",
        default_value_t = 20,
        value_parser = clap::value_parser!(u64).range(0..=MAX_INTERVAL_MS / 1_000)
    )]
    pub shutdown_grace_secs: u64,

    /// Most HTTP connections open at once; at the cap no connection is accepted until one closes
    /// (new ones wait in the listen backlog). Keep it above MAX_IN_FLIGHT_REQUESTS plus the
    /// query-service's EVENT_STREAMS_MAX, and within the memory limit (a connection holds up to
    /// about 25 KiB before its request is parsed) and the open-file limit
    #[arg(
        long,
        env = "MAX_CONNECTIONS",
        default_value_t = crate::shutdown::DEFAULT_MAX_CONNECTIONS as u64,
        value_parser = clap::value_parser!(u64).range(1..=1_000_000)
    )]
    pub max_connections: u64,

    /// Seconds a service (or `migrate`) starting while PostgreSQL cannot be reached yet
    /// (refused, not resolvable, still starting) waits for it, trying again, before it exits
    /// (0: exit at once). The other admin commands never wait
    #[arg(
        long,
        env = "DB_CONNECT_WAIT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(0..=3600)
    )]
    pub db_connect_wait_secs: u64,
}

impl CommonArgs {
    /// Checks what clap cannot: that both URLs parse and the Redis TLS files hold what they
    /// should. The error is one line naming the setting, e.g. `invalid DATABASE_URL: relative
    /// URL without a base`; it never repeats the URL, which may hold a password.
    pub fn validate(&self) -> anyhow::Result<()> {
        validate_database_url(&self.database_url)?;
        self.redis_client()?;
        if self.db_max_connections == 0 {
            return Err(anyhow!("invalid DB_MAX_CONNECTIONS: must be at least 1"));
        }
        if self.event_stream.trim().is_empty() {
            return Err(anyhow!("invalid EVENT_STREAM: must not be empty"));
        }
        crate::telemetry::log_filter(&self.rust_log)?;
        Ok(())
    }

    /// How long a starting service, or `migrate`, waits for PostgreSQL to become reachable.
    pub fn db_connect_wait(&self) -> Duration {
        Duration::from_secs(self.db_connect_wait_secs)
    }

    /// The client every Redis connection of the binary is opened from: `REDIS_URL` with the
    /// certificates of [`RedisTlsArgs`]. Reads their files; errors name the setting.
    pub fn redis_client(&self) -> anyhow::Result<redis::Client> {
        redis_client(&self.redis_url, &self.redis_tls)
    }

    /// The shutdown grace period as a `Duration`.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The limits of the binary's HTTP connections: `MAX_CONNECTIONS`, and the fixed header-read
    /// timeout and buffer size.
    pub fn connection_limits(&self) -> crate::shutdown::ConnectionLimits {
        crate::shutdown::ConnectionLimits {
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            ..crate::shutdown::ConnectionLimits::default()
        }
    }

    /// Installs logging (and span export when configured) with `LOG_FORMAT` and `RUST_LOG`.
    /// Call it after [`CommonArgs::validate`], which refuses a `RUST_LOG` that does not parse;
    /// hold the guard to the end of `main`.
    pub fn init_telemetry(&self) -> crate::telemetry::TelemetryGuard {
        let filter = crate::telemetry::log_filter(&self.rust_log).unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(crate::telemetry::DEFAULT_FILTER)
        });
        crate::telemetry::init_with_filter(self.log_format, filter)
    }
}

/// Checks a `LISTEN_ADDR` before anything connects: `host:port` with a numeric port (`[::]:8080`
/// for IPv6), so a bad address stops the binary at start with one line naming the setting,
/// instead of after it reached PostgreSQL (or failed to, naming another setting).
pub fn validate_listen_addr(addr: &str) -> anyhow::Result<()> {
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let invalid = || {
        anyhow!(
            "invalid LISTEN_ADDR: expected host:port (e.g. 0.0.0.0:8080 or [::]:8080), got {addr:?}"
        )
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(invalid)?;
    // An IPv6 address must be bracketed; a host name holds no colon.
    if host.is_empty() || host.contains(':') || host.contains(char::is_whitespace) {
        return Err(invalid());
    }
    port.parse::<u16>().map_err(|_| invalid())?;
    Ok(())
}

/// Parses a `DATABASE_URL` the way `db::connect` will, naming the setting on failure. The
/// scheme must be `postgres` or `postgresql`: the parser reads any URL's host, user and
/// database, so `mysql://…` or `http://…` (a setting meant for something else) would connect
/// to whatever PostgreSQL listens there.
pub fn validate_database_url(url: &str) -> anyhow::Result<PgConnectOptions> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    if let Some(scheme) = scheme
        && !scheme.eq_ignore_ascii_case("postgres")
        && !scheme.eq_ignore_ascii_case("postgresql")
    {
        return Err(anyhow!(
            "invalid DATABASE_URL: the scheme is `{}`, not postgres:// or postgresql://",
            one_line(&scheme.chars().take(20).collect::<String>())
        ));
    }
    PgConnectOptions::from_str(url).map_err(|e| anyhow!("invalid DATABASE_URL: {}", one_line(&e)))
}

/// The client of a `REDIS_URL` with its TLS files, naming the setting on failure.
///
/// Its connections send each command at once (`TCP_NODELAY`; redis-rs leaves Nagle's algorithm
/// on by default): over TLS a pipeline longer than one TLS record, such as the relay's batch of
/// XADDs, would otherwise wait up to 40 ms for the server's delayed ACK.
pub fn redis_client(url: &str, tls: &RedisTlsArgs) -> anyhow::Result<redis::Client> {
    let invalid = |e: redis::RedisError| anyhow!("invalid REDIS_URL: {}", one_line(&e));
    let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(invalid)?;
    let asks_for_tls = match info.addr() {
        // redis-rs would accept it here and fail every connect later.
        redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
            return Err(anyhow!(
                "invalid REDIS_URL: #insecure (TLS without checking the server's certificate) \
                 is not supported; give the server's authority in REDIS_CA_CERT"
            ));
        }
        redis::ConnectionAddr::TcpTls { .. } => true,
        _ => false,
    };
    let certificates = tls.certificates(asks_for_tls)?;
    let info = info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    match certificates {
        None => redis::Client::open(info),
        Some(certificates) => redis::Client::build_with_tls(info, certificates),
    }
    .map_err(invalid)
}

/// Settings of binaries that serve an API.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// Bearer token required on API routes, or a comma-separated list of tokens any of which is
    /// accepted (to rotate one: `new,old`, then `new`); unset or empty means no authentication
    #[arg(long, env = "API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Refuse to start without a token in API_TOKEN, so a missing or blank secret stops the
    /// service instead of opening its API to anyone (env: true/false, 1/0, yes/no)
    #[arg(
        long,
        env = "REQUIRE_API_TOKEN",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub require_api_token: bool,
}

impl AuthArgs {
    /// Refuses a value that holds no token but is not empty: a list of nothing (`","`) or only
    /// whitespace (a secret template that rendered blank). Meant to set tokens, it would
    /// otherwise turn authentication off without a word.
    pub fn validate(&self) -> anyhow::Result<()> {
        match self.api_token.as_deref() {
            Some(list) if !list.is_empty() && BearerTokens::parse(list).is_none() => Err(anyhow!(
                "invalid API_TOKEN: no token in it (only whitespace or commas); leave it empty \
                 or unset to run without authentication"
            )),
            None | Some("") if self.require_api_token => Err(anyhow!(
                "invalid API_TOKEN: unset or empty, and REQUIRE_API_TOKEN is on; set the API's \
                 token (or comma-separated tokens)"
            )),
            _ => Ok(()),
        }
    }

    /// The tokens in the shape `auth::require_bearer_token` takes; `None` (no authentication)
    /// when unset or empty. A service calls it once, at start, so without authentication it
    /// logs a warning once: an API open to anyone who reaches it should be a choice on record.
    pub fn tokens(&self) -> Option<BearerTokens> {
        let tokens = self.api_token.as_deref().and_then(BearerTokens::parse);
        if tokens.is_none() {
            tracing::warn!("API_TOKEN is not set: the API runs without authentication");
        }
        tokens
    }
}

/// HTTP settings of binaries that serve an API.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// Most API requests one instance serves at once; more get 503 `overloaded` with
    /// Retry-After at once (health, readiness and metrics are never refused)
    #[arg(
        long,
        env = "MAX_IN_FLIGHT_REQUESTS",
        default_value_t = crate::http::DEFAULT_MAX_IN_FLIGHT as u64,
        value_parser = clap::value_parser!(u64).range(1..=1_000_000)
    )]
    pub max_in_flight_requests: u64,

    /// Web origins whose pages may call the API from a browser: comma-separated
    /// `https://host[:port]`, or `*` for any; unset, no CORS headers are sent
    #[arg(long, env = "CORS_ALLOWED_ORIGINS")]
    pub cors_allowed_origins: Option<String>,

    /// Milliseconds the service goes on serving after SIGTERM, with /readyz answering 503, before
    /// it drains: the time load balancers take to stop sending it requests (Kubernetes: a few
    /// seconds). 0 drains at once
    #[arg(
        long,
        env = "SHUTDOWN_DELAY_MS",
        default_value_t = 0,
        value_parser = clap::value_parser!(u64).range(0..=60_000)
    )]
    pub shutdown_delay_ms: u64,
}

impl HttpArgs {
    /// `SHUTDOWN_DELAY_MS` as a `Duration`.
    pub fn shutdown_delay(&self) -> Duration {
        Duration::from_millis(self.shutdown_delay_ms)
    }

    /// The bound as a `usize`.
    pub fn max_in_flight(&self) -> usize {
        usize::try_from(self.max_in_flight_requests).unwrap_or(usize::MAX)
    }

    /// The parsed `CORS_ALLOWED_ORIGINS` (`None` when unset); the error names the setting.
    pub fn allowed_origins(&self) -> anyhow::Result<Option<crate::http::cors::AllowedOrigins>> {
        self.cors_allowed_origins
            .as_deref()
            .map(|raw| {
                crate::http::cors::AllowedOrigins::parse(raw)
                    .map_err(|e| anyhow!("invalid CORS_ALLOWED_ORIGINS: {e}"))
            })
            .transpose()
    }
}

/// Parses a binary's flags and environment. A setting whose value does not parse or is out of
/// range prints one line naming it and exits 2 (the contract for misconfiguration; clap's own
/// message spans several lines). Help and version print and exit 0, and usage errors (an
/// unknown flag, a missing argument of an admin command) keep clap's text with its usage line.
pub fn parse_or_exit<T: clap::Parser>() -> T {
    T::try_parse().unwrap_or_else(|err| exit_on_clap_error(err))
}

/// What [`parse_or_exit`] does with a parse error.
fn exit_on_clap_error(err: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation | ErrorKind::InvalidUtf8
    ) {
        err.exit()
    }
    let rendered = err.render().to_string();
    let line = rendered
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("error: invalid arguments");
    eprintln!("{line}");
    std::process::exit(CONFIG_ERROR_EXIT_CODE)
}

/// Prints `error: <err>` (the whole context chain on one line) to stderr and exits with code 2.
///
/// Use it for configuration errors at start: `args.common.validate().unwrap_or_else(|e|
/// platform::config::exit_on_config_error(e))`.
pub fn exit_on_config_error(err: anyhow::Error) -> ! {
    eprintln!("error: {}", error_chain(err.as_ref()));
    std::process::exit(CONFIG_ERROR_EXIT_CODE)
}

/// Collapses a message onto a single line, so an error never spans several log lines.
pub(crate) fn one_line(msg: &dyn std::fmt::Display) -> String {
    msg.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `err` and every cause under it on one line, `outer: inner: root`, for logs and for the one
/// line a failed start prints. A cause whose text the line already ends with is left out:
/// sqlx's I/O error, for one, prints its cause in its own message and hands it out again as its
/// source, which `{:#}` would show twice (`Connection refused (os error 111): Connection
/// refused (os error 111)`).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = one_line(err);
    let mut cause = err.source();
    while let Some(inner) = cause {
        let text = one_line(inner);
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = inner.source();
    }
    line
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_names_each_cause_once() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = anyhow::Error::new(sqlx::Error::Io(refused)).context("receive a notification");
        assert_eq!(
            error_chain(err.as_ref()),
            "receive a notification: error communicating with database: connection refused"
        );
        let nested = anyhow::anyhow!("root cause")
            .context("middle\nstep")
            .context("outer");
        assert_eq!(
            error_chain(nested.as_ref()),
            "outer: middle step: root cause"
        );
    }
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        auth: AuthArgs,
    }

    #[test]
    fn defaults_match_the_contract() {
        let cli = Cli::try_parse_from(["bin"]).unwrap();
        assert_eq!(cli.common.db_max_connections, 10);
        assert_eq!(cli.common.event_stream, "es:events");
        assert_eq!(cli.common.shutdown_grace_secs, 20);
        assert_eq!(cli.common.max_connections, 2048);
        assert!(!cli.common.skip_migrations);
        cli.common.validate().unwrap();
    }

    #[test]
    fn zero_max_connections_is_rejected_by_clap() {
        let err = Cli::try_parse_from(["bin", "--db-max-connections", "0"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn a_bad_redis_url_names_the_setting() {
        let mut cli = Cli::try_parse_from(["bin"]).unwrap();
        cli.common.redis_url = "http://nope".into();
        let msg = cli.common.validate().unwrap_err().to_string();
        assert!(msg.starts_with("invalid REDIS_URL: "), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn only_a_rediss_url_takes_tls_files() {
        let tls = RedisTlsArgs {
            redis_ca_cert: Some("/nonexistent/ca.pem".into()),
            ..RedisTlsArgs::default()
        };
        let error = |url: &str| redis_client(url, &tls).unwrap_err().to_string();
        // A TLS URL goes on to read the file.
        for url in ["rediss://cache.example:6380", "REDISS://cache.example"] {
            assert!(
                error(url).contains("/nonexistent/ca.pem"),
                "{url}: {}",
                error(url)
            );
        }
        for url in ["redis://cache.example", "unix:///run/redis.sock"] {
            assert!(
                error(url).contains("only used with a rediss://"),
                "{url}: {}",
                error(url)
            );
        }
        assert!(error("redis").starts_with("invalid REDIS_URL: "));
    }

    #[test]
    fn a_bad_database_url_names_the_setting() {
        let mut cli = Cli::try_parse_from(["bin"]).unwrap();
        cli.common.database_url = "not a url".into();
        let msg = cli.common.validate().unwrap_err().to_string();
        assert!(msg.starts_with("invalid DATABASE_URL: "), "{msg}");
        for other in [
            "mysql://postgres@127.0.0.1:5432/orders",
            "http://127.0.0.1:5432/orders",
        ] {
            cli.common.database_url = other.into();
            let msg = cli.common.validate().unwrap_err().to_string();
            assert!(msg.starts_with("invalid DATABASE_URL: the scheme"), "{msg}");
        }
        for fine in [
            "postgres://postgres@127.0.0.1:5432/orders",
            "postgresql://postgres@127.0.0.1/orders",
        ] {
            cli.common.database_url = fine.into();
            cli.common.validate().unwrap();
        }
    }

    #[test]
    fn rust_log_is_a_flag_too_and_a_filter_that_does_not_parse_names_the_setting() {
        let cli = Cli::try_parse_from(["bin", "--rust-log", "debug,sqlx=warn"]).unwrap();
        assert_eq!(cli.common.rust_log, "debug,sqlx=warn");
        cli.common.validate().unwrap();
        let cli = Cli::try_parse_from(["bin", "--rust-log", "info,sqlx=loud"]).unwrap();
        let msg = cli.common.validate().unwrap_err().to_string();
        assert!(msg.starts_with("invalid RUST_LOG: "), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn a_listen_addr_needs_a_host_and_a_numeric_port() {
        for good in ["0.0.0.0:8080", "[::]:8081", "localhost:8082", "127.0.0.1:0"] {
            validate_listen_addr(good).unwrap();
        }
        for bad in [
            "localhost",
            "0.0.0.0",
            ":8080",
            "host:http",
            "host:70000",
            "::1:8080",
            "",
        ] {
            let msg = validate_listen_addr(bad).unwrap_err().to_string();
            assert!(msg.starts_with("invalid LISTEN_ADDR: "), "{bad:?}: {msg}");
        }
    }

    #[test]
    fn skip_migrations_is_a_plain_flag() {
        let cli = Cli::try_parse_from(["bin", "--skip-migrations"]).unwrap();
        assert!(cli.common.skip_migrations);
    }

    #[test]
    fn an_empty_token_means_no_auth_and_an_empty_list_is_refused() {
        let auth = |value: &str| AuthArgs {
            api_token: Some(value.to_owned()),
            require_api_token: false,
        };
        assert!(auth("").tokens().is_none());
        assert!(auth("").validate().is_ok());
        let err = auth(" , ").validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid API_TOKEN: "), "{err}");
        assert!(auth("a,b").validate().is_ok());
    }

    #[test]
    fn a_service_told_to_require_a_token_refuses_to_start_without_one() {
        for env in [None, Some("")] {
            let mut cli = Cli::try_parse_from(["bin", "--require-api-token"]).unwrap();
            cli.auth.api_token = env.map(str::to_owned);
            let err = cli.auth.validate().unwrap_err().to_string();
            assert!(err.starts_with("invalid API_TOKEN: "), "{env:?}: {err}");
            assert!(err.contains("REQUIRE_API_TOKEN"), "{err}");
        }
        let cli =
            Cli::try_parse_from(["bin", "--require-api-token", "--api-token", "t-1"]).unwrap();
        assert!(cli.auth.validate().is_ok());
        let cli = Cli::try_parse_from(["bin"]).unwrap();
        assert!(!cli.auth.require_api_token);
        assert!(cli.auth.validate().is_ok());
    }

    #[test]
    fn a_token_of_only_whitespace_is_refused_rather_than_turning_authentication_off() {
        for blank in [" ", "\n", " \t\r\n"] {
            let auth = AuthArgs {
                api_token: Some(blank.to_owned()),
                require_api_token: false,
            };
            let err = auth.validate().unwrap_err().to_string();
            assert!(err.starts_with("invalid API_TOKEN: "), "{blank:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
