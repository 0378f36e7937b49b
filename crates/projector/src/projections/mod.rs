//! The read models. One module per projection, each implementing [`Projection`]; the
//! [`ProjectionKind`] enum dispatches to them statically (no trait objects), and is what
//! configuration (`PROJECTIONS`) and the admin commands name.
//!
//! A projection only folds events into its own tables. It never decides *which* events to
//! apply: the apply engine ([`crate::apply`]) guarantees that `apply` receives, per stream,
//! exactly the next versions in order, never an event applied before, inside the engine's
//! transaction. A projection must therefore never commit, and never touch `projection_streams`
//! or `projection_checkpoints`.

pub mod customer_stats;
pub mod order_summaries;

use std::future::Future;

use events::RecordedEvent;
use sqlx::PgConnection;

use crate::failure::{Failure, classify_sql};
use crate::verify::Report;

pub use customer_stats::CustomerStats;
pub use order_summaries::OrderSummaries;

/// Why a projection could not apply a batch of events.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The database refused or failed (classified transient or poison by [`crate::failure`]).
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The summary fold refused an event (unknown type, bad payload, out of order).
    #[error(transparent)]
    Fold(#[from] events::FoldError),
    /// An event payload could not be decoded.
    #[error(transparent)]
    Decode(#[from] events::DecodeError),
    /// The events or the stored rows contradict each other (e.g. an event for an order the
    /// projection has never seen created).
    #[error("{0}")]
    Invalid(String),
}

impl ApplyError {
    /// Transient, poison or newer release: see [`crate::failure`].
    pub fn failure(&self) -> Failure {
        let newer_release = match self {
            ApplyError::Database(e) => return classify_sql(e),
            ApplyError::Decode(e) => e.needs_newer_release(),
            ApplyError::Fold(e) => e.needs_newer_release(),
            ApplyError::Invalid(_) => false,
        };
        let message = crate::failure::one_line(self);
        if newer_release {
            Failure::NewerRelease(message)
        } else {
            Failure::Poison(message)
        }
    }
}

/// A read model folded from events.
pub trait Projection {
    /// The projection's name: its consumer group, its `projection_streams.projection` key and
    /// the suffix of its dead-letter stream.
    const NAME: &'static str;

    /// Whether events of this type change the read model. Events it does not handle still
    /// advance the stream's version in `projection_streams` (the engine does that).
    fn handles(event_type: &str) -> bool;

    /// Applies `events` inside the caller's transaction. Per stream, the events are exactly the
    /// next versions the projection has not applied, in version order (versions of event types
    /// this projection does not handle are left out). Batched: one read of every touched row,
    /// a fold in memory, one write back.
    fn apply(
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> impl Future<Output = Result<(), ApplyError>> + Send;

    /// The projection's own tables, all of whose rows it owns (a rebuild replaces them).
    const TABLES: &'static [&'static str];

    /// Compares the read model with a fresh fold of the event store and reports differences.
    fn verify(conn: &mut PgConnection) -> impl Future<Output = Result<Report, sqlx::Error>> + Send;
}

/// Every projection this binary knows, as configuration and admin commands name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum ProjectionKind {
    /// `order_summaries`: one row per order (`GET /orders/{id}`, `GET /orders`).
    OrderSummaries,
    /// `customer_stats`: per customer counts by status and money spent (`GET /customers/{id}`).
    CustomerStats,
}

/// Advisory lock key of a projection's apply transactions (shared) and of a rebuild's swap
/// (exclusive): `PROJECTION_LOCK_BASE + index`.
pub const PROJECTION_LOCK_BASE: i64 = 0x0E5E_3000;
/// Advisory lock key of a projection's sweeper leadership: `SWEEPER_LOCK_BASE + index`.
pub const SWEEPER_LOCK_BASE: i64 = 0x0E5E_4000;
/// Advisory lock key held by a running rebuild of a projection: `REBUILD_LOCK_BASE + index`.
pub const REBUILD_LOCK_BASE: i64 = 0x0E5E_5000;

impl ProjectionKind {
    /// Every projection, in a fixed order.
    pub const ALL: [ProjectionKind; 2] = [
        ProjectionKind::OrderSummaries,
        ProjectionKind::CustomerStats,
    ];

    /// The projection's name (consumer group, bookkeeping key).
    pub fn name(self) -> &'static str {
        match self {
            ProjectionKind::OrderSummaries => OrderSummaries::NAME,
            ProjectionKind::CustomerStats => CustomerStats::NAME,
        }
    }

    /// The projection named `name` (a consumer group name), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    fn index(self) -> i64 {
        match self {
            ProjectionKind::OrderSummaries => 1,
            ProjectionKind::CustomerStats => 2,
        }
    }

    /// Key of the advisory lock that apply transactions take shared and a rebuild exclusive.
    pub fn lock_key(self) -> i64 {
        PROJECTION_LOCK_BASE + self.index()
    }

    /// Key of the session advisory lock a rebuild of this projection holds while it runs.
    pub fn rebuild_lock_key(self) -> i64 {
        REBUILD_LOCK_BASE + self.index()
    }

    /// Key of the session advisory lock whose holder is this projection's sweeper.
    pub fn sweeper_lock_key(self) -> i64 {
        SWEEPER_LOCK_BASE + self.index()
    }

    /// See [`Projection::handles`].
    pub fn handles(self, event_type: &str) -> bool {
        match self {
            ProjectionKind::OrderSummaries => OrderSummaries::handles(event_type),
            ProjectionKind::CustomerStats => CustomerStats::handles(event_type),
        }
    }

    /// Whether events of `event_type` at `schema_version` are ones this projection reads but
    /// this build cannot: a newer release wrote them ([`events::written_by_newer_release`]).
    pub fn needs_newer_release(self, event_type: &str, schema_version: i32) -> bool {
        self.handles(event_type) && events::written_by_newer_release(event_type, schema_version)
    }

    /// See [`Projection::apply`].
    pub async fn apply(
        self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ApplyError> {
        match self {
            ProjectionKind::OrderSummaries => OrderSummaries::apply(conn, events).await,
            ProjectionKind::CustomerStats => CustomerStats::apply(conn, events).await,
        }
    }

    /// See [`Projection::TABLES`].
    pub fn tables(self) -> &'static [&'static str] {
        match self {
            ProjectionKind::OrderSummaries => OrderSummaries::TABLES,
            ProjectionKind::CustomerStats => CustomerStats::TABLES,
        }
    }

    /// See [`Projection::verify`].
    pub async fn verify(self, conn: &mut PgConnection) -> Result<Report, sqlx::Error> {
        match self {
            ProjectionKind::OrderSummaries => OrderSummaries::verify(conn).await,
            ProjectionKind::CustomerStats => CustomerStats::verify(conn).await,
        }
    }
}

impl std::fmt::Display for ProjectionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How many order streams `verify` folds per round trip (bounds its memory).
pub const VERIFY_STREAMS_PER_CHUNK: i64 = 1_000;

/// Reads the next chunk of order stream ids after `after` (keyset paging) with all their
/// events, grouped per stream in version order.
pub(crate) async fn next_stream_chunk(
    conn: &mut PgConnection,
    after: &str,
) -> Result<Vec<(String, Vec<RecordedEvent>)>, sqlx::Error> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT stream_id FROM events WHERE stream_id > $1 \
         ORDER BY stream_id LIMIT $2",
    )
    .bind(after)
    .bind(VERIFY_STREAMS_PER_CHUNK)
    .fetch_all(&mut *conn)
    .await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT global_position, event_id, stream_id, stream_version, event_type, \
         schema_version, data, metadata, recorded_at FROM events \
         WHERE stream_id = ANY($1) ORDER BY stream_id, stream_version",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut out: Vec<(String, Vec<RecordedEvent>)> = Vec::with_capacity(ids.len());
    for row in &rows {
        let event = store::read::recorded_event(row)?;
        match out.last_mut() {
            Some((id, events)) if *id == event.stream_id => events.push(event),
            _ => out.push((event.stream_id.clone(), vec![event])),
        }
    }
    Ok(out)
}
