//! `GET /events/stream`: the event log as Server-Sent Events, for clients that follow it over
//! one long-lived response (a browser's `EventSource`, `curl -N`) instead of asking page after
//! page.
//!
//! Each event goes out as `id: <position>`, `event: <event_type>`, `data: <the /events event>`.
//! When a filtered follow reads past positions that do not match, a frame with only
//! `id: <read_to>` moves the client's resume point on without an event (the SSE rules set the
//! last event id even for a frame without data). A client that reconnects sends that id back
//! as `Last-Event-ID` (a browser does so by itself) and continues right after it, with nothing
//! missed or repeated: the pages come from [`History::log`], whose `read_to` rule this module
//! only forwards.
//!
//! Bounds: one page (at most [`STREAM_PAGE_EVENTS`] events) is held per stream, read only when
//! the client has taken the previous one; at most `EVENT_STREAMS_MAX` streams are open at once
//! (more get 503 `overloaded`); every stream ends when the service begins to shut down, so the
//! drain does not wait on followers that never hang up. It never writes.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use platform::shutdown::CancellationToken;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::history::History;
use crate::params::{LogPage, StreamStart};

/// Events read per page of a stream. A page is what one stream holds in memory (with its
/// frames, about 1 kB per event), so `EVENT_STREAMS_MAX` streams at 100 hold a few tens of MB at
/// most; a catching-up follower still gets 100 events per query.
pub const STREAM_PAGE_EVENTS: i64 = 100;

/// How long one read at the head waits for a commit before it reads again (the keep-alive
/// below keeps the connection busy meanwhile).
const HEAD_WAIT: Duration = Duration::from_secs(30);

/// Interval of the keep-alive comment, so proxies and load balancers do not close a quiet
/// stream as idle (many do after 60 s).
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// What a client's `EventSource` waits before it reconnects after the stream ends (sent once,
/// as `retry:`).
pub const RECONNECT_AFTER: Duration = Duration::from_secs(2);

/// Gauge of the streams open on this instance (against `EVENT_STREAMS_MAX`).
pub const OPEN_STREAMS_GAUGE: &str = "query_event_streams_open";

/// Seconds a refused stream is told to wait (`Retry-After`).
pub const STREAMS_FULL_RETRY_AFTER_SECS: u64 = 5;

/// The open streams of this instance: their bound and the signal that ends them.
#[derive(Debug, Clone)]
pub struct LogStreams {
    history: History,
    open: Arc<Semaphore>,
    limit: usize,
    stop: CancellationToken,
}

impl LogStreams {
    /// At most `limit` streams at once; all of them end when `stop` is cancelled.
    pub fn new(history: History, limit: usize, stop: CancellationToken) -> Self {
        // Exported from the start, so a dashboard shows 0 rather than nothing.
        metrics::gauge!(OPEN_STREAMS_GAUGE).set(0.0);
        Self {
            history,
            open: Arc::new(Semaphore::new(limit)),
            limit,
            stop,
        }
    }

    /// The bound on open streams (`EVENT_STREAMS_MAX`).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A new stream from `start`, or `None` when `EVENT_STREAMS_MAX` are already open.
    pub fn follow(
        &self,
        start: StreamStart,
    ) -> Option<Sse<impl Stream<Item = Result<Event, Infallible>> + use<>>> {
        let Ok(permit) = Arc::clone(&self.open).try_acquire_owned() else {
            // Counted with the requests shed at the in-flight limit: the same alert, the same
            // remedy (more instances, or a higher bound).
            metrics::counter!(platform::http::SHED_TOTAL).increment(1);
            return None;
        };
        metrics::gauge!(OPEN_STREAMS_GAUGE).increment(1.0);
        let follow = Follow {
            history: self.history.clone(),
            after: start.after_position,
            event_types: start.event_types,
            at_head: false,
            pending: VecDeque::from([Event::default().retry(RECONNECT_AFTER)]),
            stop: self.stop.clone(),
            _permit: permit,
        };
        let events = futures::stream::unfold(follow, |mut follow| async move {
            let event = follow.next_event().await?;
            Some((Ok(event), follow))
        });
        Some(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE_INTERVAL)))
    }
}

/// One stream's state: where it has read to and the frames not yet sent.
struct Follow {
    history: History,
    after: i64,
    event_types: Option<Vec<String>>,
    /// The last page reached the head of the log: the next read waits for a commit. (A read
    /// that has more to give does not wait, so the progress of a filtered stream goes out
    /// before it waits.)
    at_head: bool,
    pending: VecDeque<Event>,
    stop: CancellationToken,
    /// Held for the stream's life: its place under `EVENT_STREAMS_MAX`.
    _permit: OwnedSemaphorePermit,
}

impl Drop for Follow {
    /// The stream is over (the client hung up, a read failed, or shutdown): its place is free.
    fn drop(&mut self) {
        metrics::gauge!(OPEN_STREAMS_GAUGE).decrement(1.0);
    }
}

impl Follow {
    /// The next frame, reading (and waiting at the head) as needed; `None` ends the stream: at
    /// shutdown, or on a failed read (logged; the client reconnects and resumes).
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            let page = LogPage {
                after_position: self.after,
                limit: STREAM_PAGE_EVENTS,
                wait: if self.at_head {
                    HEAD_WAIT
                } else {
                    Duration::ZERO
                },
                event_types: self.event_types.clone(),
            };
            let read = tokio::select! {
                () = self.stop.cancelled() => return None,
                read = self.history.log(page) => read,
            };
            let page = match read {
                Ok(page) => page,
                Err(err) => {
                    tracing::warn!(error = %err, after_position = self.after,
                        "event stream ended on a failed read; the client resumes from its last id");
                    return None;
                }
            };
            let mut last_sent = self.after;
            for event in page.events {
                let position = event.event.position;
                let frame = Event::default()
                    .id(position.to_string())
                    .event(event.event.event_type.as_str())
                    .json_data(&event);
                match frame {
                    Ok(frame) => self.pending.push_back(frame),
                    Err(err) => {
                        tracing::error!(error = %err, position, "event stream ended: an event did not serialise");
                        return None;
                    }
                }
                last_sent = position;
            }
            if page.read_to > last_sent {
                // Positions read without a match: move the client's resume point past them.
                self.pending
                    .push_back(Event::default().id(page.read_to.to_string()));
            }
            self.after = page.read_to;
            self.at_head = page.next_cursor.is_none();
        }
    }
}
