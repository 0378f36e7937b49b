//! Audit history and time travel, read straight from the event store (never from a read model):
//! a page of one order's events by version, a page of the whole log by position, and the
//! order's summary folded with the shared `events::fold_summary` as of a version or an instant.
//!
//! Only `store`'s read functions touch the `events` table; this module never writes.

use chrono::{DateTime, Utc};
use events::{EventMetadata, OrderSummary, RecordedEvent, fold_summary, order_stream_id};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::consistency::CheckpointWatcher;
use crate::error::ApiError;
use crate::params::{HistoryPage, LogPage, StateAt};

/// One recorded event as `GET /orders/{id}/events` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct HistoryEvent {
    /// Global position in the event log.
    pub position: i64,
    /// Version within the order's stream (1, 2, 3, …).
    pub version: i64,
    /// `OrderCreated`, `ItemAdded`, `ItemRemoved`, `OrderPlaced`, `OrderPaid`, `OrderShipped`
    /// or `OrderCancelled`.
    pub event_type: String,
    /// The event's payload as stored.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub metadata: EventMetadata,
    pub recorded_at: DateTime<Utc>,
}

impl From<RecordedEvent> for HistoryEvent {
    fn from(e: RecordedEvent) -> Self {
        Self {
            position: e.global_position,
            version: e.stream_version,
            event_type: e.event_type,
            data: e.data,
            metadata: e.metadata,
            recorded_at: e.recorded_at,
        }
    }
}

/// The body of `GET /orders/{id}/events`.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct EventPage {
    /// In version order.
    pub events: Vec<HistoryEvent>,
    /// The last version of this page, to pass as `after_version`, when the page is full;
    /// `null` otherwise.
    pub next_cursor: Option<String>,
}

/// One recorded event as `GET /events` shows it: the fields of an order's history event, plus
/// the stream it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct LogEvent {
    /// The stream: `order-<uuid>`.
    pub stream_id: String,
    #[serde(flatten)]
    pub event: HistoryEvent,
}

impl From<RecordedEvent> for LogEvent {
    fn from(e: RecordedEvent) -> Self {
        Self {
            stream_id: e.stream_id.clone(),
            event: HistoryEvent::from(e),
        }
    }
}

/// The body of `GET /events`.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct LogEventPage {
    /// In position order, with no position missing between them (`position` is dense and in
    /// commit order).
    pub events: Vec<LogEvent>,
    /// The last position of this page, to pass as `after_position`, when the page is full;
    /// `null` otherwise (to follow the log, ask again after the last position seen).
    pub next_cursor: Option<String>,
}

/// The event store, read for history and time travel.
#[derive(Debug, Clone)]
pub struct History {
    pool: PgPool,
    /// Knows the log's head, for `GET /events` waits.
    watcher: CheckpointWatcher,
}

impl History {
    pub fn new(pool: PgPool, watcher: CheckpointWatcher) -> Self {
        Self { pool, watcher }
    }

    /// `GET /orders/{id}/events`: 404 when the order has no events at all.
    pub async fn events(&self, order_id: Uuid, page: HistoryPage) -> Result<EventPage, ApiError> {
        let stream_id = order_stream_id(order_id);
        let events =
            store::read_stream(&self.pool, &stream_id, page.after_version, page.limit).await?;
        // An empty page past the end of an existing stream is a valid answer; only an empty
        // page from the start, or past a stream that does not exist, is a 404.
        if events.is_empty()
            && (page.after_version == 0
                || store::stream_version(&self.pool, &stream_id).await? == 0)
        {
            return Err(ApiError::OrderNotFound {
                order_id,
                position: None,
            });
        }
        let next_cursor = next_cursor(&events, page.limit, |last| last.stream_version);
        Ok(EventPage {
            events: events.into_iter().map(HistoryEvent::from).collect(),
            next_cursor,
        })
    }

    /// `GET /events`: the committed events after a position. Positions are dense and become
    /// visible in order (the store's append lock, ARCHITECTURE.md invariant 1), so a reader that
    /// resumes after the last position it saw never misses an event, however appends interleave.
    ///
    /// With nothing after the position yet and a `wait`, it waits (on the watcher, not the
    /// database) for a commit after it, then reads once more; an empty page after the wait is a
    /// normal answer: the follower asks again.
    pub async fn log(&self, page: LogPage) -> Result<LogEventPage, ApiError> {
        let deadline = std::time::Instant::now() + page.wait;
        let mut events = store::read_all(&self.pool, page.after_position, page.limit).await?;
        if events.is_empty()
            && !page.wait.is_zero()
            && self
                .watcher
                .wait_for_head_above(page.after_position, deadline)
                .await
        {
            events = store::read_all(&self.pool, page.after_position, page.limit).await?;
        }
        let next_cursor = next_cursor(&events, page.limit, |last| last.global_position);
        Ok(LogEventPage {
            events: events.into_iter().map(LogEvent::from).collect(),
            next_cursor,
        })
    }

    /// `GET /orders/{id}/state`: the summary as of `at`; 404 when the order had no events then.
    ///
    /// A version above the stream's last one answers the current state (its `version` says
    /// which). Memory is bounded by one order's stream, which the domain keeps short.
    pub async fn state(&self, order_id: Uuid, at: StateAt) -> Result<OrderSummary, ApiError> {
        let stream_id = order_stream_id(order_id);
        let events = match at {
            StateAt::Now => {
                store::read_stream_until_version(&self.pool, &stream_id, i64::MAX).await?
            }
            StateAt::Version(v) => {
                store::read_stream_until_version(&self.pool, &stream_id, v).await?
            }
            StateAt::Time(t) => store::read_stream_until_time(&self.pool, &stream_id, t).await?,
        };
        let summary = fold_summary(&events).map_err(|e| {
            ApiError::Internal(anyhow::Error::new(e).context(format!("fold {stream_id}")))
        })?;
        summary.ok_or(ApiError::OrderNotFound {
            order_id,
            position: None,
        })
    }
}

/// The cursor of the page after `events`: `key` of the last event when the page is full (there
/// may be more), `None` otherwise.
fn next_cursor(
    events: &[RecordedEvent],
    limit: i64,
    key: impl Fn(&RecordedEvent) -> i64,
) -> Option<String> {
    let full = i64::try_from(events.len()).unwrap_or(i64::MAX) >= limit;
    events
        .last()
        .filter(|_| full)
        .map(|last| key(last).to_string())
}
