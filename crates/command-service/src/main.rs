//! The `command-service` binary: parse the config, then serve, migrate or probe.

use std::process::ExitCode;

use command_service::Application;
use command_service::config::{Command, Config};
use platform::config::exit_on_config_error;

/// jemalloc, not glibc's malloc: the services allocate and free short-lived buffers of many
/// sizes (HTTP reads, rows, JSON), and glibc's malloc spent a quarter of the command-service's
/// CPU on them (BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse_or_exit();
    if config.command() == Command::Healthcheck {
        return platform::healthcheck::probe(&config.listen_addr, "/healthz").await;
    }
    config
        .validate()
        .unwrap_or_else(|e| exit_on_config_error(e));
    // Held to the end of main: dropping it flushes the spans still queued for export.
    let _telemetry = config.common.init_telemetry();
    let result = match config.command() {
        Command::Migrate => command_service::app::migrate(&config).await,
        _ => {
            let stop = platform::shutdown::cancel_on_signal();
            match platform::shutdown::unless_stopped(&stop, Application::build(config)).await {
                Some(Ok(app)) => app.run_until_stopped(stop.cancelled_owned()).await,
                Some(Err(e)) => Err(e),
                None => Ok(()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, as the contract promises for a failed start.
            eprintln!("error: {}", platform::config::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
