//! How a service binary puts the platform pieces together (the shape command-service,
//! query-service and projector follow). Run it against the local Postgres and Redis:
//!
//! ```text
//! cargo run -p platform --example service -- --listen-addr 127.0.0.1:8090 --log-format json
//! cargo run -p platform --example service -- healthcheck --listen-addr 127.0.0.1:8090
//! ```

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::routing::post;
use clap::{Parser, Subcommand};
use platform::config::{AuthArgs, CommonArgs, exit_on_config_error};
use platform::extract::{Json, with_fallbacks};
use platform::health::{Readiness, health_router};
use platform::http::{HttpLimits, RequestContext, standard_layers};
use platform::{auth, db, redis_conn, shutdown, telemetry};
use serde::Deserialize;

/// Example service built from the platform crate.
#[derive(Debug, Parser)]
struct Config {
    /// Address the HTTP server listens on
    #[arg(
        long,
        env = "LISTEN_ADDR",
        default_value = "0.0.0.0:8090",
        global = true
    )]
    listen_addr: String,

    #[command(flatten)]
    common: CommonArgs,

    #[command(flatten)]
    auth: AuthArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Probe GET /healthz on the listen port and exit 0 when healthy (Docker HEALTHCHECK)
    Healthcheck,
}

#[derive(Debug, Deserialize)]
struct Echo {
    message: String,
}

async fn echo(ctx: RequestContext, Json(body): Json<Echo>) -> Json<serde_json::Value> {
    tracing::info!(actor = ?ctx.actor, "echo");
    Json(serde_json::json!({ "message": body.message, "traceparent": ctx.traceparent }))
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Some(Command::Healthcheck) = config.command {
        return platform::healthcheck::probe(&config.listen_addr, "/healthz").await;
    }
    config
        .common
        .validate()
        .unwrap_or_else(|e| exit_on_config_error(e));
    let _telemetry = telemetry::init(config.common.log_format);
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, as the contract promises for a failed start.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let metrics = platform::metrics::install("example-service");
    let pool = db::connect(
        &config.common.database_url,
        "example-service",
        config.common.db_max_connections,
        None,
    )
    .await?;
    let redis =
        redis_conn::connect_manager(&config.common.redis_client()?, Duration::from_secs(2)).await?;

    let api = Router::new()
        .route("/echo", post(echo))
        .route_layer(auth::require_bearer_token(config.auth.tokens()));
    let app = with_fallbacks(api.merge(health_router(Readiness::new(pool, redis), metrics)));
    let app = standard_layers(app, HttpLimits::default());

    let listener = tokio::net::TcpListener::bind(&config.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {} (LISTEN_ADDR)", config.listen_addr))?;
    tracing::info!(addr = %config.listen_addr, "listening");
    let token = shutdown::cancel_on_signal();
    shutdown::serve_with_limits(
        listener,
        app,
        token.cancelled_owned(),
        config.common.shutdown_grace(),
        config.common.connection_limits(),
    )
    .await
}
