//! HTTP tests of the write API against a real PostgreSQL: each test starts the application
//! in-process on port 0 with a fresh database (`spawn_app`).

mod commands;
mod concurrency;
mod errors;
mod helpers;
mod idempotency;
mod operations;
