//! # query-service
//!
//! The read side of the order system: read models over HTTP with read-your-writes, the audit
//! history of an order and time travel over the event store. It only reads: the projector owns
//! the read-model tables and `store` owns the event store.
//!
//! # Layout
//!
//! - [`config`]: settings (clap flags and env vars) and the `serve` / `migrate` / `healthcheck`
//!   subcommands.
//! - [`startup`]: `Application::build` / `run_until_stopped`.
//! - [`routes`]: the router and the thin handlers.
//! - [`params`]: query strings and headers parsed into typed requests, each error with its code.
//! - [`cursor`]: the opaque keyset cursor of `GET /orders`.
//! - [`consistency`]: the checkpoint watcher (one LISTEN connection and one poll per instance,
//!   published through `tokio::sync::watch`) and the bounded wait of read-your-writes.
//! - [`read_models`]: the `order_summaries` / `customer_stats` queries, each reading the
//!   checkpoint in the same statement.
//! - [`history`]: event pages and time travel from the event store, folded page by page with
//!   `events::SummaryFold`.
//! - [`log_stream`]: `GET /events/stream`, the log as Server-Sent Events over `history`'s pages.
//! - [`log_tail`]: the log's newest events, read once per instance for every stream at the head.
//! - [`order_stream`]: `GET /orders/{id}/events/stream`, one order's events as Server-Sent
//!   Events: its own stream while catching up, the shared tail at the head.
//! - [`error`]: `ApiError` and its problem responses (the list of codes).
//! - [`openapi`]: `GET /openapi.json`.
//!
//! # Invariants
//! - `X-Projection-Position: P` means every event with position ≤ P is reflected in the body:
//!   P is read in the same statement (snapshot) as the rows.
//! - A waiting request costs no database work while it waits; the watcher's work is constant
//!   per instance.
//! - A database that cannot be used is a 503 `store_unavailable`, never a 500; while PostgreSQL
//!   cannot be reached at all, every API route answers it at once (`platform::db_gate`).

pub mod config;
pub mod consistency;
pub mod cursor;
pub mod error;
pub mod history;
pub mod log_stream;
pub mod log_tail;
pub mod openapi;
pub mod order_stream;
pub mod params;
pub mod read_models;
pub mod routes;
pub mod startup;

pub use config::{Command, Config};
pub use startup::Application;
