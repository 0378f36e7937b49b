//! # bench
//!
//! The project's benchmark tool. It measures the real system the way a user meets it (HTTP
//! commands and reads against the built service binaries) and the machine's own ceiling in the
//! same run, and reports JSON (`--out`), Markdown tables (stdout) and an SVG latency/throughput
//! chart. It asserts nothing about timings: it measures and reports.
//!
//! # Layout
//! - [`cli`]: subcommands (one per scenario, plus `all`) and sizing flags, each also a
//!   `BENCH_*` env var.
//! - [`run`]: the order of scenarios, which services they run against, writing outputs.
//! - [`scenarios`]: one module per scenario (`commands`/`hot`, `ceiling`, `freshness`,
//!   `catchup`, `rebuild`, `long_stream`) and the shared closed-loop load generator.
//! - [`api`]: the HTTP client for the write and read APIs and the order lifecycle workload.
//! - [`generate`]: valid order events decided by the real aggregate, appended straight to the
//!   store in big batches (backlogs, long streams).
//! - [`services`]: spawning the service binaries on free ports, stopping them, peak RSS.
//! - [`scratch`]: the run's scratch databases and Redis keys, and their clean-up.
//! - [`metrics`]: interval breakdowns from the services' `/metrics` (commit time, batch size).
//! - [`cpu`]: CPU time per process (services, their PostgreSQL backends, Redis, the load
//!   generator) over a measured interval, from `/proc`.
//! - [`redis_client`]: the tool's Redis clients, with the services' TLS settings.
//! - [`machine`]: CPU, memory, PostgreSQL and Redis versions and commit settings.
//! - [`stats`]: HdrHistogram latency series and their percentiles.
//! - [`report`]: the result document, its Markdown, and the targets check.
//! - [`chart`]: the hand-written SVG chart.
//!
//! # Invariants
//! - It only creates and drops databases named `bench_<run>_*` and Redis keys under
//!   `bench-<run>-*`; it never touches anything else on the shared servers.
//! - Every load loop is bounded in time; every child process is stopped (SIGTERM, then
//!   SIGKILL) or killed when dropped.

pub mod api;
pub mod chart;
pub mod cli;
pub mod cpu;
pub mod generate;
pub mod machine;
pub mod metrics;
pub mod redis_client;
pub mod report;
pub mod run;
pub mod scenarios;
pub mod scratch;
pub mod services;
pub mod stats;
