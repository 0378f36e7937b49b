//! The command line: which scenarios to run, against what, and how big. Every setting is a flag
//! and a `BENCH_*` environment variable; defaults size `bench all` to finish in five to six
//! minutes on a 2-core machine.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Default PostgreSQL server on which scratch databases are created (its `postgres` database is
/// only used to create and drop them).
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Default Redis server.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The project's benchmark tool.
///
/// Drives the real services over HTTP (already running, or spawned from the built binaries on
/// free ports against fresh databases) and the event store directly, and reports JSON, a
/// Markdown table on stdout and an SVG latency/throughput chart.
#[derive(Debug, Parser)]
#[command(name = "bench", version)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,

    #[command(flatten)]
    pub target: Target,

    #[command(flatten)]
    pub output: Output,

    #[command(flatten)]
    pub sizing: Sizing,
}

/// Which scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Scenario {
    /// Command throughput and latency over a concurrency sweep (mixed order lifecycles)
    Commands,
    /// Many writers on one hot order (AddItem, no If-Match)
    Hot,
    /// The raw ceiling: batched multi-row INSERTs into a scratch events table
    Ceiling,
    /// Response-to-read-model freshness at a steady rate, and the time from an event's
    /// `recorded_at` (set at INSERT) to the Redis stream
    Freshness,
    /// Projector catch-up over a backlog, with 1 and 2 instances (needs --spawn)
    Catchup,
    /// `projector rebuild` over a large event store (needs --spawn)
    Rebuild,
    /// Reading the whole log over HTTP: paging GET /events (all, and filtered) and one
    /// GET /events/stream (needs --spawn)
    Follow,
    /// Command latency on a long order (10,099 events by default: ≥ 10,000, ending one short of
    /// a snapshot) vs a fresh one, snapshots on and off (needs --spawn)
    LongStream,
    /// Peak RSS of each service under full command load (needs --spawn)
    Memory,
    /// Everything above, in one run
    All,
}

/// What to benchmark: running services, or services this tool starts itself.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Start the services as child processes from --bin-dir on free ports, each scenario
    /// against a fresh scratch database and a private Redis stream key
    #[arg(long, env = "BENCH_SPAWN", global = true)]
    pub spawn: bool,

    /// Directory holding the built `command-service`, `query-service` and `projector`
    /// (default: $CARGO_TARGET_DIR/release, else target/release)
    #[arg(long, env = "BENCH_BIN_DIR", global = true)]
    pub bin_dir: Option<PathBuf>,

    /// Base URL of a running command service (without --spawn)
    #[arg(
        long,
        env = "BENCH_COMMAND_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub command_url: String,

    /// Base URL of a running query service (without --spawn)
    #[arg(
        long,
        env = "BENCH_QUERY_URL",
        default_value = "http://127.0.0.1:8081",
        global = true
    )]
    pub query_url: String,

    /// Bearer token for the APIs, if the running services require one
    #[arg(long, env = "BENCH_API_TOKEN", global = true, hide_env_values = true)]
    pub api_token: Option<String>,

    /// PostgreSQL server for scratch databases (the ceiling, generated event stores, spawned
    /// services)
    #[arg(long, env = "BENCH_POSTGRES_URL", default_value = DEFAULT_POSTGRES_URL, global = true, hide_env_values = true)]
    pub postgres_url: String,

    /// Redis server the services publish to
    #[arg(long, env = "BENCH_REDIS_URL", default_value = DEFAULT_REDIS_URL, global = true, hide_env_values = true)]
    pub redis_url: String,

    /// Event stream key of the running services (without --spawn; spawned services get a
    /// private `bench-<run>:es:events`)
    #[arg(
        long,
        env = "BENCH_EVENT_STREAM",
        default_value = "es:events",
        global = true
    )]
    pub event_stream: String,

    /// Keep the scratch databases and Redis keys after the run (for inspection)
    #[arg(long, env = "BENCH_KEEP", global = true)]
    pub keep: bool,
}

/// Where results go.
#[derive(Debug, Clone, Args)]
pub struct Output {
    /// Write the full results as JSON to this file
    #[arg(long, env = "BENCH_OUT", global = true)]
    pub out: Option<PathBuf>,

    /// Write the latency/throughput chart of the concurrency sweep (SVG) to this file
    #[arg(
        long,
        env = "BENCH_SVG",
        default_value = "docs/bench/latency-throughput.svg",
        global = true
    )]
    pub svg: PathBuf,

    /// Directory for the spawned services' logs (default: a fresh directory under /tmp)
    #[arg(long, env = "BENCH_LOG_DIR", global = true)]
    pub log_dir: Option<PathBuf>,
}

/// How big each scenario is.
#[derive(Debug, Clone, Args)]
pub struct Sizing {
    /// Closed-loop client counts of the command sweep (and the ceiling)
    #[arg(
        long,
        env = "BENCH_CONCURRENCY",
        value_delimiter = ',',
        default_value = "1,8,32,64",
        global = true
    )]
    pub concurrency: Vec<usize>,

    /// Seconds measured at each concurrency level
    #[arg(long, env = "BENCH_LEVEL_SECS", default_value_t = 10, global = true)]
    pub level_secs: u64,

    /// Seconds of unmeasured warm-up before each measured interval (each commands level, the
    /// hot order, each ceiling configuration, and the freshness run)
    #[arg(long, env = "BENCH_WARMUP_SECS", default_value_t = 2, global = true)]
    pub warmup_secs: u64,

    /// Concurrent writers on the hot order
    #[arg(long, env = "BENCH_HOT_WRITERS", default_value_t = 8, global = true)]
    pub hot_writers: usize,

    /// Seconds measured on the hot order
    #[arg(long, env = "BENCH_HOT_SECS", default_value_t = 10, global = true)]
    pub hot_secs: u64,

    /// Rows per INSERT transaction in the ceiling (each size is measured at every concurrency;
    /// one more point, at the service's concurrency, uses the service's own mean group-commit
    /// size from the commands sweep of the same run, else 32)
    #[arg(
        long,
        env = "BENCH_CEILING_BATCHES",
        value_delimiter = ',',
        default_value = "1,64",
        global = true
    )]
    pub ceiling_batches: Vec<usize>,

    /// Seconds measured per ceiling configuration (after --warmup-secs)
    #[arg(long, env = "BENCH_CEILING_SECS", default_value_t = 4, global = true)]
    pub ceiling_secs: u64,

    /// Commands per second of the freshness run (default: half the 64-client saturation rate
    /// measured by `commands` in the same run, else 200)
    #[arg(long, env = "BENCH_RATE", global = true)]
    pub rate: Option<f64>,

    /// Clients sharing the freshness run's ticks (each sends one command at a time; read-backs
    /// run beside them; default: one per 40 commands a second, at least 64, so a command may
    /// take up to 25 ms); raise it when the run reports late ticks with the CPU not saturated
    #[arg(long, env = "BENCH_FRESHNESS_CLIENTS", global = true)]
    pub freshness_clients: Option<usize>,

    /// Each freshness client reads back one accepted command in this many through the query
    /// service (`?min_position=`); 1 reads back every command, which adds a read per command
    #[arg(
        long,
        env = "BENCH_FRESHNESS_READ_EVERY",
        default_value_t = 4,
        value_parser = clap::value_parser!(u64).range(1..),
        global = true
    )]
    pub freshness_read_every: u64,

    /// Seconds measured in the freshness run (after --warmup-secs)
    #[arg(
        long,
        env = "BENCH_FRESHNESS_SECS",
        default_value_t = 20,
        global = true
    )]
    pub freshness_secs: u64,

    /// Events in the log the `follow` readers read
    #[arg(
        long,
        env = "BENCH_FOLLOW_EVENTS",
        default_value_t = 200_000,
        global = true
    )]
    pub follow_events: u64,

    /// Events in the catch-up backlog
    #[arg(
        long,
        env = "BENCH_CATCHUP_EVENTS",
        default_value_t = 200_000,
        global = true
    )]
    pub catchup_events: u64,

    /// Projector instance counts to measure catch-up with (each on a fresh copy of the backlog)
    #[arg(
        long,
        env = "BENCH_CATCHUP_INSTANCES",
        value_delimiter = ',',
        default_value = "1,2",
        global = true
    )]
    pub catchup_instances: Vec<usize>,

    /// Projections (consumer groups) whose checkpoints must reach the head for catch-up to end
    #[arg(
        long,
        env = "BENCH_PROJECTIONS",
        value_delimiter = ',',
        default_value = "order_summaries,customer_stats",
        global = true
    )]
    pub projections: Vec<String>,

    /// Events in the store rebuilt by `projector rebuild`
    #[arg(
        long,
        env = "BENCH_REBUILD_EVENTS",
        default_value_t = 1_000_000,
        global = true
    )]
    pub rebuild_events: u64,

    /// Projection rebuilt
    #[arg(
        long,
        env = "BENCH_REBUILD_PROJECTION",
        default_value = "order_summaries",
        global = true
    )]
    pub rebuild_projection: String,

    /// Fewest events of each long order; rounded up to one short of the next multiple of
    /// --snapshot-every (10,099 by default), so the first command replays the longest tail a
    /// snapshot leaves
    #[arg(
        long,
        env = "BENCH_LONG_EVENTS",
        default_value_t = 10_000,
        global = true
    )]
    pub long_events: i64,

    /// Long orders (and as many fresh ones); each gives one cold first-command latency (with
    /// 10, the median of the cold latencies moved by 2x from run to run)
    #[arg(long, env = "BENCH_LONG_ORDERS", default_value_t = 30, global = true)]
    pub long_orders: usize,

    /// Warm commands per order after the first
    #[arg(long, env = "BENCH_LONG_COMMANDS", default_value_t = 40, global = true)]
    pub long_commands: usize,

    /// Snapshot interval of command-service in the "snapshots on" run (its SNAPSHOT_EVERY);
    /// the long orders get the snapshot the service would have taken at this interval
    #[arg(
        long,
        env = "BENCH_SNAPSHOT_EVERY",
        default_value_t = 100,
        global = true
    )]
    pub snapshot_every: i64,

    /// SNAPSHOT_EVERY value that turns snapshots off in command-service (it accepts only
    /// values ≥ 1, so "off" is an interval no order reaches)
    #[arg(
        long,
        env = "BENCH_SNAPSHOT_OFF",
        default_value_t = 1_000_000_000,
        global = true
    )]
    pub snapshot_off: i64,
}
