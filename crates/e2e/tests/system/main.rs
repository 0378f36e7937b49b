//! The whole system as a user runs it: command-service, two projectors and query-service as
//! separate processes over one fresh database and a private Redis stream key.
//!
//! # Layout
//! - `support`: starting the binaries, readiness, shutdown, the HTTP client, admin subcommands.
//! - `lifecycle`: orders through the three services into exact read models; a poison entry.
//! - `redis_tls`: everything over a Redis that speaks only TLS.
//! - `alerts`: every metric an alert reads is exposed from the start.
//! - `benchmark`: a short `bench freshness` run against services it spawns itself.
//! - `rebuild`: `projector rebuild` under live traffic.
//! - `event_stream`: a browser-style follower of the live log across a killed query service.
//! - `database_crash`: PostgreSQL crashing under load and coming back.
//! - `redis_outage`: Redis dying under load and coming back empty.
//! - `restore`: PostgreSQL restored from a backup while Redis keeps its stream.
//! - `rollout`: a release starting on a database a newer release has migrated, and holding an
//!   event a newer release wrote.

mod alerts;
mod benchmark;
mod configuration;
mod database_crash;
mod event_stream;
mod lifecycle;
mod rebuild;
mod redis_outage;
mod redis_tls;
mod restore;
mod rollout;
mod support;
