//! `bench`: see the library docs and `bench --help`.

use std::process::ExitCode;

use clap::Parser;

/// jemalloc, as the services have: the load generator shares the machine's CPUs with the
/// system it measures, and glibc's malloc took about a sixth of its CPU
/// (`docs/bench/bench-allocator-and-mark/`); what the tool spends is taken from the services.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = bench::cli::Cli::parse();
    match bench::run::run(cli).await {
        Ok(report) => {
            println!("{}", report.markdown());
            ExitCode::SUCCESS
        }
        Err(err) => {
            // One line naming what failed (e.g. the setting), never a backtrace.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
