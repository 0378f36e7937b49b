//! # command-service
//!
//! The write side of the order system: an HTTP API that turns requests into order commands,
//! decides them against the order's state and appends the resulting events to the PostgreSQL
//! event store; and the outbox relay that publishes every committed event to Redis.
//!
//! # Layout
//! - [`config`]: the clap `Config` (every setting a flag and an env var) and subcommands.
//! - [`app`]: `Application::build` / `run_until_stopped`: pool, group committer, router,
//!   relay and background tasks, graceful shutdown.
//! - [`commands`]: the command handler: per-order serialisation with pipelined group commits,
//!   optimistic concurrency with retries, `If-Match`, idempotency keys, snapshots.
//! - [`http`]: routes, DTOs, the `ApiError` → problem mapping and the OpenAPI document.
//! - [`relay`]: the outbox relay (event store → Redis stream).
//!
//! # Invariants
//! - An acknowledged command's events are committed in Postgres before the response.
//! - Handlers never touch SQL: they call [`commands::CommandHandler::execute`].
//! - A store failure is logged and answered 503 `store_unavailable`, never with its cause;
//!   while PostgreSQL cannot be reached at all, commands get that answer at once
//!   (`platform::db_gate`).

pub mod app;
pub mod commands;
pub mod config;
pub mod http;
pub mod relay;

pub use app::Application;
pub use config::Config;
