//! `query-service [serve|migrate|healthcheck]`: see the crate docs.

use std::process::ExitCode;

use platform::config::exit_on_config_error;
use query_service::{Application, Command, Config};

/// jemalloc, not glibc's malloc: the services allocate and free short-lived buffers of many
/// sizes (HTTP reads, rows, JSON), and glibc's malloc spent a quarter of the command-service's
/// CPU on them (BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config: Config = platform::config::parse_or_exit();
    if config.command() == Command::Healthcheck {
        return platform::healthcheck::probe(&config.listen_addr, "/healthz").await;
    }
    config
        .validate()
        .unwrap_or_else(|e| exit_on_config_error(e));
    // Held to the end of main: dropping it flushes the spans still queued for export.
    let _telemetry = config.common.init_telemetry();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", platform::config::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    if config.command() == Command::Migrate {
        return platform::db::migrate(
            &config.common.database_url,
            query_service::startup::SERVICE_NAME,
            &store::MIGRATOR,
            config.common.db_connect_wait(),
        )
        .await;
    }
    let stop = platform::shutdown::cancel_on_signal();
    match platform::shutdown::unless_stopped(&stop, Application::build(config)).await {
        Some(app) => app?.run_until_stopped(stop.cancelled_owned()).await,
        None => Ok(()),
    }
}
