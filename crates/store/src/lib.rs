//! # store
//!
//! The PostgreSQL event store. Only this crate writes the `events`, `snapshots` and
//! `idempotency_keys` tables.
//!
//! # Layout
//! - [`append`]: one append transaction for a batch of requests: optimistic concurrency per
//!   stream, idempotent event ids, idempotency keys, all under the global append lock.
//! - [`committer`]: group commit: many concurrent appends share one transaction.
//! - [`read`]: reading a stream (by version or time) and the whole log in position order, and
//!   which event the log holds at a position (how the relay and the projectors tell the
//!   store's history from a stream of another one).
//! - [`snapshot`]: saving and loading snapshots, ignoring those of another state schema.
//! - [`aggregate`]: loading an order's state from its latest valid snapshot plus later events.
//! - [`session`]: sessions a server restart ended, and the work sent again on another session
//!   because nothing of it can have committed.
//! - [`idempotency`]: the stored first answer of an `Idempotency-Key`: looking it up, recording
//!   a refusal (under the append lock), expiring old keys.
//!
//! # Invariants
//! - Appends hold the transaction-scoped advisory lock [`append::APPEND_LOCK_KEY`] while they
//!   assign positions, so `global_position` is dense (no gaps) and in commit order. A reader that
//!   sees position `N` can already see every position below it: tailing the log by position never
//!   skips an event whose transaction commits late.
//! - `(stream_id, stream_version)` is unique: two writers never both own a version.
//! - Rows of `events` are never updated or deleted (a trigger refuses it).

pub mod aggregate;
pub mod append;
pub mod committer;
pub mod idempotency;
pub mod read;
pub mod session;
pub mod snapshot;

pub use aggregate::{LoadError, LoadedOrder, load_order};
pub use append::{
    AppendError, AppendOutcome, AppendRequest, ExpectedVersion, IdempotencyRecord, append_batch,
    append_batch_unless_unreachable, append_batch_within,
};
pub use committer::{CommitterConfig, DEFAULT_TRANSACTION_TIMEOUT, GroupCommitter};
pub use read::{
    event_id_at, events_at, head_position, last_position_within, read_all, read_all_of_types,
    read_stream, stream_head, stream_version, unregistered_event_types,
};
pub use snapshot::{load_snapshot, save_snapshot};

/// The embedded migrations of the whole system (event store, relay, read models), run by every
/// service at start unless told not to. sqlx takes an advisory lock, so concurrent starts are safe.
///
/// A database may hold migrations of a newer release than this one: while a rollout is under
/// way (an instance of this release restarts, or is scaled out, after a newer one migrated) or
/// after a rollback. This release then starts on that schema instead of refusing to, because
/// every migration keeps the release before it working (`migrations/README.md`: additions
/// only; a rename or drop waits for the release after the one that stops using it). A
/// migration already applied that differs from this release's copy is still refused.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate::Migrator {
    ignore_missing: true,
    ..sqlx::migrate!("../../migrations")
};

/// Name of the `NOTIFY` channel signalled by every append; its payload is the new head
/// position. A wake-up hint only: listeners must still read the log, since notifications are
/// lost while a listener reconnects.
pub const APPENDED_CHANNEL: &str = "event_store_appended";

#[cfg(feature = "test-util")]
pub mod testing;
