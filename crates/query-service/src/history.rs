//! Audit history and time travel, read straight from the event store (never from a read model):
//! a page of one order's events by version, a page of the whole log by position, and the
//! order's summary folded with the shared `events::SummaryFold`, page by page, as of a version
//! or an instant.
//!
//! Only `store`'s read functions touch the `events` table; this module never writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use events::{EventMetadata, OrderSummary, RecordedEvent, SummaryFold, order_stream_id};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::consistency::CheckpointWatcher;
use crate::error::ApiError;
use crate::log_tail::{LogTail, TAIL_PAGE_EVENTS, TailBatch};
use crate::params::{HistoryPage, LogPage, StateAt, invalid_event_type};

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
    /// In position order. Unfiltered, no position is missing between them (`position` is
    /// dense and in commit order); with `event_type`, the events of those types among them.
    pub events: Vec<LogEvent>,
    /// Every event up to this position has been read: those that match are in this page or an
    /// earlier one. To follow the log, pass it as the next `after_position` (with a filter, it
    /// can be past the last event shown). Never below the request's `after_position`.
    pub read_to: i64,
    /// `read_to` when there is more to read now (a full page, or a filtered page that stopped
    /// at `EVENTS_SCAN_SPAN` positions); `null` when the page reached the head of the log.
    pub next_cursor: Option<String>,
}

/// Most events one read of a time-travel fold (`GET /orders/{id}/state`) holds: the fold goes
/// through the order's stream page by page, so a request holds one page whatever the stream's
/// length (the domain caps an order's lines, not its events: a draft takes any number of
/// `ItemAdded`/`ItemRemoved`). The largest page `GET /orders/{id}/events` serves, too.
pub const STATE_PAGE_EVENTS: i64 = 1000;

/// What the event store reads of [`History`] did, for tests.
#[derive(Debug, Default)]
pub struct HistoryStats {
    /// The most events one read of a time-travel fold returned.
    pub largest_state_page: AtomicU64,
    /// Reads of the event store for `GET /events` pages (each one or two queries).
    pub log_reads: AtomicU64,
}

/// The event store, read for history and time travel.
#[derive(Debug, Clone)]
pub struct History {
    pool: PgPool,
    /// Knows the log's head, for `GET /events` waits.
    watcher: CheckpointWatcher,
    /// The log's tail, read once per commit for everyone at the head: `GET /events` waits
    /// take what follows their position from it instead of reading the store again.
    tail: LogTail,
    /// Positions one filtered page of `GET /events` reads at most (`EVENTS_SCAN_SPAN`).
    scan_span: i64,
    stats: Arc<HistoryStats>,
}

impl History {
    pub fn new(pool: PgPool, watcher: CheckpointWatcher, tail: LogTail, scan_span: i64) -> Self {
        Self {
            pool,
            watcher,
            tail,
            scan_span,
            stats: Arc::new(HistoryStats::default()),
        }
    }

    /// The read counters.
    pub fn stats(&self) -> Arc<HistoryStats> {
        Arc::clone(&self.stats)
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

    /// The events of `order_id` after `after_version` (at most `limit`), and the head of the
    /// log read *before* them: every event of the order at or below that position is among
    /// those read or earlier (positions become visible in order, ARCHITECTURE.md invariant 1),
    /// which is what lets a follower of the order go on from the log's tail after it.
    pub async fn order_events_with_head(
        &self,
        order_id: Uuid,
        after_version: i64,
        limit: i64,
    ) -> Result<(i64, Vec<HistoryEvent>), ApiError> {
        let head = store::head_position(&self.pool).await?;
        let events =
            store::read_stream(&self.pool, &order_stream_id(order_id), after_version, limit)
                .await?;
        Ok((head, events.into_iter().map(HistoryEvent::from).collect()))
    }

    /// The version of `order_id`'s last event (0 when it has none).
    pub async fn order_version(&self, order_id: Uuid) -> Result<i64, ApiError> {
        Ok(store::stream_version(&self.pool, &order_stream_id(order_id)).await?)
    }

    /// Refuses to follow the log from past its end. No position above the head was ever handed
    /// out by this store, so a client holding one followed a history the store no longer has
    /// (the database was restored from an earlier backup) or made the position up; waiting for
    /// the head to pass it would skip, silently, the events committed at the positions in
    /// between. Asks the store: the watcher's head is the one that is stale right after a
    /// restore.
    pub async fn refuse_beyond_head(&self, after_position: i64) -> Result<(), ApiError> {
        if after_position == 0 {
            return Ok(());
        }
        let head = store::head_position(&self.pool).await?;
        if after_position > head {
            return Err(ApiError::BeyondHead {
                code: "position_beyond_head",
                after: after_position,
                head,
            });
        }
        Ok(())
    }

    /// Refuses a filter naming a type that no release writes (a misspelling), so a follower
    /// does not follow an empty log forever. A name this release does not know is looked up in
    /// the store's registry of types (`event_types`, filled by each release's migrations): while
    /// a newer release rolls out, its new types are real filters here too, and this instance
    /// serves their events as stored.
    pub async fn refuse_unknown_event_types(
        &self,
        types: Option<&[String]>,
    ) -> Result<(), ApiError> {
        let unknown_here: Vec<String> = types
            .unwrap_or_default()
            .iter()
            .filter(|name| !events::codec::EVENT_TYPES.contains(&name.as_str()))
            .cloned()
            .collect();
        if unknown_here.is_empty() {
            return Ok(());
        }
        let unregistered = store::unregistered_event_types(&self.pool, &unknown_here).await?;
        match unregistered.first() {
            Some(name) => Err(invalid_event_type(&format!(
                "no event type is named {name:?}"
            ))),
            None => Ok(()),
        }
    }

    /// `GET /events`: the committed events after a position. Positions are dense and become
    /// visible in order (the store's append lock, ARCHITECTURE.md invariant 1), so a reader that
    /// resumes after `read_to` never misses an event, however appends interleave.
    ///
    /// With nothing to show at the head and a `wait`, it reads the store no more: it takes
    /// what follows `read_to` from the log's tail, which one task reads once per commit for
    /// every follower at the head ([`LogTail`]), filtering in memory, so commits of other
    /// types only move `read_to` on at no cost to the database; it reads the store again only
    /// when a batch does not continue from its position (it was too slow to see one). Once
    /// `wait` is up it answers the empty page with the `read_to` reached, however many commits
    /// keep landing: the follower asks again from there.
    pub async fn log(&self, page: LogPage) -> Result<LogEventPage, ApiError> {
        self.refuse_unknown_event_types(page.event_types.as_deref())
            .await?;
        let deadline = tokio::time::Instant::now() + page.wait;
        // Subscribed before the read, so the tail reads every commit after it while this waits
        // (and only when it may wait: the tail reads nothing while nobody subscribes).
        let mut tail = (!page.wait.is_zero()).then(|| self.tail.subscribe());
        let mut read = self.read_log(&page, page.after_position).await?;
        // Only a read that found nothing can start past the end; one query then tells.
        if read.events.is_empty() && read.next_cursor.is_none() {
            self.refuse_beyond_head(page.after_position).await?;
        }
        loop {
            let Some(tail) = tail.as_mut().filter(|_| {
                read.events.is_empty()
                    && read.next_cursor.is_none()
                    && tokio::time::Instant::now() < deadline
            }) else {
                return Ok(read);
            };
            let Some(batch) = self.next_tail_batch(tail, read.read_to, deadline).await else {
                return Ok(read);
            };
            read = if batch.after > read.read_to {
                self.read_log(&page, read.read_to).await?
            } else {
                take_from_tail(&batch, read.read_to, &page)
            };
        }
    }

    /// Waits for a tail batch that reaches past `after`, until `deadline`; `None` when the
    /// deadline passes first.
    async fn next_tail_batch(
        &self,
        tail: &mut tokio::sync::watch::Receiver<Arc<TailBatch>>,
        after: i64,
        deadline: tokio::time::Instant,
    ) -> Option<Arc<TailBatch>> {
        let _waiting = self.watcher.count_wait();
        let wait = tail.wait_for(|batch| batch.read_to > after);
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(Ok(batch)) => Some(Arc::clone(&batch)),
            // The tail stops only at shutdown; answer what was read.
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// One page of the log after `after`: up to `limit` events, or with a filter, the matching
    /// events among at most `scan_span` positions.
    async fn read_log(&self, page: &LogPage, after: i64) -> Result<LogEventPage, ApiError> {
        self.stats.log_reads.fetch_add(1, Ordering::Relaxed);
        let Some(event_types) = &page.event_types else {
            let events = store::read_all(&self.pool, after, page.limit).await?;
            let next_cursor = next_cursor(&events, page.limit, |last| last.global_position);
            return Ok(LogEventPage {
                read_to: events.last().map_or(after, |last| last.global_position),
                events: events.into_iter().map(LogEvent::from).collect(),
                next_cursor,
            });
        };
        // The end of the range first, then the range: see `store::last_position_within`.
        let Some(scan_end) = store::last_position_within(&self.pool, after, self.scan_span).await?
        else {
            return Ok(LogEventPage {
                events: Vec::new(),
                read_to: after,
                next_cursor: None,
            });
        };
        let events =
            store::read_all_of_types(&self.pool, after, scan_end, event_types, page.limit).await?;
        let (read_to, more) = match events.last() {
            // A full page ends at its last event; what follows it is still to read.
            Some(last) if is_full(&events, page.limit) => (last.global_position, true),
            // The page read the span to its end; when the whole span was committed, there may
            // be more after it.
            _ => (scan_end, scan_end == after.saturating_add(self.scan_span)),
        };
        Ok(LogEventPage {
            events: events.into_iter().map(LogEvent::from).collect(),
            read_to,
            next_cursor: more.then(|| read_to.to_string()),
        })
    }

    /// `GET /orders/{id}/state`: the summary as of `at`; 404 when the order had no events then.
    ///
    /// A version above the stream's last one answers the current state (its `version` says
    /// which). The stream is folded page by page ([`STATE_PAGE_EVENTS`]), so memory stays at one
    /// page however long the order's stream is; time is still proportional to the events
    /// folded. Each page continues after the versions already folded, and a stream's versions
    /// become visible in order, so the pages together are always a prefix of the stream: the
    /// state folded is one the order really had. As of an instant, the fold stops before the
    /// first version recorded after it, so a database clock that stepped back between two
    /// appends still gives a prefix (test
    /// `the_state_as_of_a_time_is_a_prefix_even_when_the_clock_stepped_back`).
    pub async fn state(&self, order_id: Uuid, at: StateAt) -> Result<OrderSummary, ApiError> {
        let stream_id = order_stream_id(order_id);
        let last_version = match at {
            StateAt::Version(v) => v,
            StateAt::Now | StateAt::Time(_) => i64::MAX,
        };
        let mut fold = SummaryFold::default();
        'pages: loop {
            let after = fold.state.version;
            let limit = STATE_PAGE_EVENTS.min(last_version.saturating_sub(after));
            if limit <= 0 {
                break;
            }
            let page = store::read_stream(&self.pool, &stream_id, after, limit).await?;
            self.stats
                .largest_state_page
                .fetch_max(page.len() as u64, Ordering::Relaxed);
            for event in &page {
                if let StateAt::Time(t) = at
                    && event.recorded_at > t
                {
                    break 'pages;
                }
                fold.apply(event).map_err(|e| {
                    if e.needs_newer_release() {
                        ApiError::NewerRelease(format!("the history of {stream_id} holds {e}"))
                    } else {
                        ApiError::Internal(
                            anyhow::Error::new(e).context(format!("fold {stream_id}")),
                        )
                    }
                })?;
            }
            if !is_full(&page, limit) {
                break;
            }
        }
        fold.summary().ok_or(match at {
            StateAt::Time(at) => ApiError::OrderNotFoundAt { order_id, at },
            StateAt::Now | StateAt::Version(_) => ApiError::OrderNotFound {
                order_id,
                position: None,
            },
        })
    }
}

/// The page of `page`'s types after `after` in a tail `batch` that continues from it
/// (`batch.after <= after`): up to `limit` of them, and `read_to` the last one shown when the
/// page is full, else the batch's end.
fn take_from_tail(batch: &TailBatch, after: i64, page: &LogPage) -> LogEventPage {
    let limit = usize::try_from(page.limit).unwrap_or(usize::MAX);
    let wanted = |event: &&LogEvent| {
        event.event.position > after
            && page
                .event_types
                .as_ref()
                .is_none_or(|types| types.contains(&event.event.event_type))
    };
    let events: Vec<LogEvent> = batch
        .events
        .iter()
        .filter(wanted)
        .take(limit)
        .cloned()
        .collect();
    let (read_to, more) = match events.last() {
        Some(last) if events.len() >= limit => (last.event.position, true),
        // A full tail batch may stop short of the head: there may be more to read now.
        _ => (
            batch.read_to,
            batch.events.len() >= usize::try_from(TAIL_PAGE_EVENTS).unwrap_or(usize::MAX),
        ),
    };
    LogEventPage {
        events,
        read_to,
        next_cursor: more.then(|| read_to.to_string()),
    }
}

/// The cursor of the page after `events`: `key` of the last event when the page is full (there
/// may be more), `None` otherwise.
fn next_cursor(
    events: &[RecordedEvent],
    limit: i64,
    key: impl Fn(&RecordedEvent) -> i64,
) -> Option<String> {
    events
        .last()
        .filter(|_| is_full(events, limit))
        .map(|last| key(last).to_string())
}

/// Whether a page holds `limit` events (so there may be more after it).
fn is_full(events: &[RecordedEvent], limit: i64) -> bool {
    i64::try_from(events.len()).unwrap_or(i64::MAX) >= limit
}
