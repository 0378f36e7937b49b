//! # projector
//!
//! Folds the event stream into read models (`order_summaries`, `customer_stats`) exactly once
//! and in order, with any number of instances, across crashes, redeliveries, poison events and
//! Redis losing its data; plus the admin commands `dlq`, `rebuild`, `verify` and `status`.
//!
//! # Layout
//! - [`config`]: the command line (every setting a flag and an env var) and subcommands.
//! - [`app`]: `serve`: consumer and sweeper tasks per projection, health and metrics.
//! - [`commands`]: runs a parsed command line (what `main` calls).
//! - [`projections`]: the [`projections::Projection`] trait and one module per read model.
//! - [`apply`]: the apply engine: the version guard with catch-up, parking, replay.
//! - [`consumer`]: the Redis consumer group loop: retries, dead letters, reclaim.
//! - [`sweeper`]: the low-water mark (`projection_checkpoints`) and self-healing.
//! - [`admin`]: `dlq list|show|replay|purge`.
//! - [`parked`]: `dlq parked`, `dlq replay|purge --stream` and the walk of `dlq replay` over
//!   the parked streams: parked streams from PostgreSQL.
//! - [`rebuild`]: `rebuild`: a fresh fold into shadow tables, swapped in under the lock.
//! - [`verify`]: `verify`: the read model against a fresh fold of the event store.
//! - [`status`]: `status`: head, relay, and each projection's mark, lag, parked streams, dead
//!   letters and consumer group, from whichever store is reachable.
//! - [`failure`]: the one place deciding transient vs poison.
//! - [`metrics`]: metric names and recording helpers.
//! - `testing` (feature `test-util`): `RebuildGate`, a rebuild held in mid-fold for tests.
//!
//! # Exactly once and in order: the version guard with catch-up
//!
//! Redis delivers at least once, in any interleaving across instances. Postgres decides. For
//! each projection and stream, `projection_streams.version` is the last applied stream version,
//! and it is updated in the same transaction as the read model. An apply transaction locks the
//! rows of its streams (`FOR UPDATE`, in `stream_id` order, so instances never deadlock), then
//! per stream: versions ≤ the stored one are duplicates and skipped; if the first new version
//! is above `stored + 1` (another instance holds the earlier entry, or Redis lost it) the
//! missing versions are read from the event store and applied first, in order. So every event
//! is applied exactly once, in version order, whoever delivers it and however late; an entry
//! is acknowledged in Redis only after the transaction committed, and a redelivery after a
//! crash between the two is a harmless duplicate.
//!
//! # Failures
//!
//! Transient failures (a dependency down) pause the loop and retry the same entries without
//! counting attempts; poison (the entry itself fails) is retried with backoff per stream, then
//! dead-lettered to `<stream>:dlq:<group>` and the stream *parked* at that event: it and its
//! later events are held back (acknowledged, not applied) until `projector dlq replay`
//! re-applies the stream from the event store, or `dlq purge` skips the event. Other orders
//! never wait. An event the read model has applied by the time the consumer or the sweeper
//! gives up on it (another instance applied it meanwhile) failed nothing for good: its entry is
//! acknowledged, with no letter and no park (applied in the moment between that look and the
//! letter, it leaves a letter but no park, which `dlq purge` deletes); and a park never holds
//! an order back at an event that is applied already. An entry that cannot be decoded is no event of any order: it is
//! retried and dead-lettered on its own, and parks nothing, whatever stream it names.
//!
//! # Low-water mark and healing
//!
//! Each apply transaction, and one sweeper per projection (an advisory-lock leader), advance
//! `projection_checkpoints.position` over the prefix of the log that is applied or parked, and
//! announce it on `projection_position`. An event left unapplied beyond a grace period
//! (Redis flushed, restarted empty, trimmed) is applied by the sweeper from the event store.
//!
//! # Must never
//! - write any table but its read models and their bookkeeping (`projection_streams`,
//!   `projection_checkpoints`, `order_summaries`, `customer_stats`, `customer_stats_orders`,
//!   `customer_stats_spent`);
//! - acknowledge an entry before its transaction committed;
//! - apply an event of a stream before all its earlier versions;
//! - apply an entry that is not the event the event store holds at its position, field for
//!   field (a stream of another history, after the database was restored from a backup; an
//!   entry written by hand reusing a real event's position and id): the consumer checks each
//!   batch against the store, applies the store's copies and acknowledges the others unapplied.

pub mod admin;
pub mod app;
pub mod apply;
pub mod commands;
pub mod config;
pub mod consumer;
pub mod failure;
pub mod linger;
pub mod metrics;
pub mod parked;
pub mod projections;
pub mod rebuild;
pub mod status;
pub mod sweeper;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod verify;

pub use app::Application;
pub use config::Cli;
pub use projections::ProjectionKind;
