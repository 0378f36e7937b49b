//! The `projector` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use projector::Cli;

/// jemalloc, not glibc's malloc: the services allocate and free short-lived buffers of many
/// sizes (HTTP reads, rows, JSON), and glibc's malloc spent a quarter of the command-service's
/// CPU on them (BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = platform::config::parse_or_exit();
    if let Err(e) = cli.validate() {
        platform::config::exit_on_config_error(e);
    }
    // Held to the end of main: dropping it flushes the spans still queued for export.
    let _telemetry = cli.common.init_telemetry();
    match projector::commands::execute(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", platform::config::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
