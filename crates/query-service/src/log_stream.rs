//! `GET /events/stream`: the event log as Server-Sent Events, for clients that follow it over
//! one long-lived response (a browser's `EventSource`, `curl -N`) instead of asking page after
//! page.
//!
//! Each event goes out as `id: <position>`, `event: <event_type>`, `data: <the /events event>`.
//! When a filtered follow reads past positions that do not match, a frame with only
//! `id: <read_to>` moves the client's resume point on without an event (the SSE rules set the
//! last event id even for a frame without data). A client that reconnects sends that id back
//! as `Last-Event-ID` (a browser does so by itself) and continues right after it, with nothing
//! missed or repeated: a stream that is behind reads pages with [`History::log`], whose
//! `read_to` rule this module only forwards; one at the head takes the batches of the shared
//! [`LogTail`] (read once per instance, whatever the number of streams), and goes back to the
//! store if it was too slow to see one. At the head, a filtered stream holds its id-only frame
//! back for up to `EVENT_STREAM_PROGRESS_MS` (1 s) and sends only the latest, or none when an
//! event of its types comes first (its id says as much): one small frame per second at most,
//! not one per commit of other types to every follower. A client that reconnects meanwhile
//! reads those positions again and finds nothing of its types in them. A stream whose position
//! the log goes back below (a database restored from a backup) ends: its client reconnects and
//! is refused 409 while it is past the end, instead of skipping what is committed in between.
//!
//! Bounds: one page (at most [`STREAM_PAGE_EVENTS`] events, or the frames of one tail batch: up
//! to [`crate::log_tail::TAIL_PAGE_EVENTS`] events when the tail fell behind) is held per stream, read only when the client has taken the previous one; at most `EVENT_STREAMS_MAX` streams are open at once
//! (more get 503 `overloaded`); every stream ends when the service begins to shut down, so the
//! drain does not wait on followers that never hang up. It never writes.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use axum::response::sse::{Event, KeepAlive, KeepAliveStream, Sse};
use futures::Stream;
use platform::shutdown::CancellationToken;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::history::{History, LogEvent};
use crate::log_tail::{LogTail, TailBatch};
use crate::params::{LogPage, StreamStart};

/// Events read per page of a stream while it catches up (a catching-up follower gets 100 events
/// per query). At the head a stream holds the frames of one tail batch instead, usually one
/// commit's events but up to [`crate::log_tail::TAIL_PAGE_EVENTS`] (1,000) when the tail fell
/// behind; at about 1 kB of frames per event, that bounds a stream at about 1 MB and
/// `EVENT_STREAMS_MAX` (256 by default) streams at about 256 MB.
pub const STREAM_PAGE_EVENTS: i64 = 100;

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

/// Counters of the streams' own work, for tests.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Reads of the event store by streams (catching up, or after a gap in the tail).
    pub store_reads: AtomicU64,
    /// Batches of the shared tail taken by streams at the head.
    pub tail_batches: AtomicU64,
}

/// The open streams of this instance: their bound and the signal that ends them.
#[derive(Debug, Clone)]
pub struct LogStreams {
    history: History,
    tail: LogTail,
    stats: Arc<StreamStats>,
    open: Arc<Semaphore>,
    limit: usize,
    progress_interval: Duration,
    stop: CancellationToken,
}

impl LogStreams {
    /// At most `limit` streams at once, taking new events from `tail` at the head and sending
    /// a filtered stream's progress there at most once per `progress_interval` (every batch
    /// when zero); all of them end when `stop` is cancelled.
    pub fn new(
        history: History,
        tail: LogTail,
        limit: usize,
        progress_interval: Duration,
        stop: CancellationToken,
    ) -> Self {
        // Exported from the start, so a dashboard shows 0 rather than nothing.
        metrics::gauge!(OPEN_STREAMS_GAUGE).set(0.0);
        Self {
            history,
            tail,
            stats: Arc::default(),
            open: Arc::new(Semaphore::new(limit)),
            limit,
            progress_interval,
            stop,
        }
    }

    /// The streams' counters.
    pub fn stats(&self) -> Arc<StreamStats> {
        Arc::clone(&self.stats)
    }

    /// The bound on open streams (`EVENT_STREAMS_MAX`).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A place under `EVENT_STREAMS_MAX` for a new stream, or `None` when all are taken.
    pub(crate) fn open_slot(&self) -> Option<StreamSlot> {
        let Ok(permit) = Arc::clone(&self.open).try_acquire_owned() else {
            // Counted with the requests shed at the in-flight limit: the same alert, the same
            // remedy (more instances, or a higher bound).
            metrics::counter!(platform::http::SHED_TOTAL).increment(1);
            return None;
        };
        metrics::gauge!(OPEN_STREAMS_GAUGE).increment(1.0);
        Some(StreamSlot { _permit: permit })
    }

    /// The events of one order as a stream (`GET /orders/{id}/events/stream`), or `None` when
    /// `EVENT_STREAMS_MAX` streams are already open.
    pub fn follow_order(
        &self,
        order_id: uuid::Uuid,
        start: crate::params::OrderStreamStart,
    ) -> Option<Sse<impl Stream<Item = Result<Event, Infallible>> + use<>>> {
        let slot = self.open_slot()?;
        let follow = crate::order_stream::OrderFollow::new(
            self.history.clone(),
            order_id,
            start.after_version,
            self.tail.subscribe(),
            Arc::clone(&self.stats),
            self.stop.clone(),
            slot,
        );
        Some(sse(follow.into_frames()))
    }

    /// A new stream from `start`, or `None` when `EVENT_STREAMS_MAX` are already open.
    pub fn follow(
        &self,
        start: StreamStart,
    ) -> Option<Sse<impl Stream<Item = Result<Event, Infallible>> + use<>>> {
        let slot = self.open_slot()?;
        let tail = self.tail.subscribe();
        // Where the log is as the stream opens: its start was checked against that head.
        let rewinds = tail.borrow().rewinds.count;
        let follow = Follow {
            history: self.history.clone(),
            after: start.after_position,
            event_types: start.event_types,
            at_head: false,
            tail,
            rewinds,
            stats: Arc::clone(&self.stats),
            pending: VecDeque::from([Event::default().retry(RECONNECT_AFTER)]),
            progress_interval: self.progress_interval,
            held_progress: None,
            stop: self.stop.clone(),
            _slot: slot,
        };
        let events = futures::stream::unfold(follow, |mut follow| async move {
            let event = follow.next_event().await?;
            Some((Ok(event), follow))
        });
        Some(sse(events))
    }
}

/// `frames` as a Server-Sent Events response with the keep-alive comment every stream sends.
fn sse<S>(frames: S) -> Sse<KeepAliveStream<S>>
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(frames).keep_alive(KeepAlive::new().interval(KEEP_ALIVE_INTERVAL))
}

/// One stream's state: where it has read to and the frames not yet sent.
struct Follow {
    history: History,
    after: i64,
    event_types: Option<Vec<String>>,
    /// The last read reached the head of the log: what follows comes from the shared tail.
    at_head: bool,
    /// The shared tail's batches (subscribed for the stream's life, so the tail reads while
    /// this stream is open).
    tail: watch::Receiver<Arc<TailBatch>>,
    /// Times the log's head had gone back when this stream last checked it was still on the log
    /// ([`TailBatch::continues_from`]).
    rewinds: u64,
    stats: Arc<StreamStats>,
    pending: VecDeque<Event>,
    /// Longest an id-only frame is held back at the head (zero: never).
    progress_interval: Duration,
    /// The position an id-only frame held back at the head would carry, and when it is due.
    held_progress: Option<(i64, Instant)>,
    stop: CancellationToken,
    /// Held for the stream's life: its place under `EVENT_STREAMS_MAX`.
    _slot: StreamSlot,
}

/// A stream's place under `EVENT_STREAMS_MAX`, held for the stream's life.
pub(crate) struct StreamSlot {
    _permit: OwnedSemaphorePermit,
}

impl Drop for StreamSlot {
    /// The stream is over (the client hung up, a read failed, or shutdown): its place is free.
    fn drop(&mut self) {
        metrics::gauge!(OPEN_STREAMS_GAUGE).decrement(1.0);
    }
}

impl Follow {
    /// The next frame, reading the store while behind and taking the shared tail at the head;
    /// `None` ends the stream: at shutdown, or on a failed read (logged; the client reconnects
    /// and resumes).
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.at_head {
                self.take_from_tail().await?;
                continue;
            }
            self.still_on_the_log()?;
            let page = LogPage {
                after_position: self.after,
                limit: STREAM_PAGE_EVENTS,
                wait: Duration::ZERO,
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
            self.stats.store_reads.fetch_add(1, Ordering::Relaxed);
            self.queue(page.events.iter(), page.read_to, false)?;
            self.at_head = page.next_cursor.is_none();
        }
    }

    /// Waits for a tail batch that continues from `after` and queues its frames; at a gap (a
    /// batch this stream was too slow to see) it goes back to reading the store. `None` at
    /// shutdown (once a held progress frame is queued) or when an event does not serialise.
    async fn take_from_tail(&mut self) -> Option<()> {
        loop {
            let batch = Arc::clone(&self.tail.borrow_and_update());
            if !batch.continues_from(self.after, &mut self.rewinds) {
                return self.end_past_the_log(batch.rewinds.to);
            }
            if batch.read_to > self.after {
                if batch.after > self.after {
                    self.at_head = false;
                    return Some(());
                }
                let after = self.after;
                let newer = batch.events.iter().filter(|e| e.event.position > after);
                let queued = self.queue(newer, batch.read_to, true);
                self.stats.tail_batches.fetch_add(1, Ordering::Relaxed);
                return queued;
            }
            let due = self.held_progress.map(|(_, due)| due);
            tokio::select! {
                () = self.stop.cancelled() => {
                    // Ending at shutdown: hand on the progress held back first, so the client
                    // resumes (elsewhere) past what it has read, as it would have at its due time.
                    let (position, _) = self.held_progress.take()?;
                    self.pending.push_back(Event::default().id(position.to_string()));
                    return Some(());
                }
                changed = self.tail.changed() => changed.ok()?,
                () = sleep_until_some(due) => {
                    if let Some((position, _)) = self.held_progress.take() {
                        self.pending.push_back(Event::default().id(position.to_string()));
                    }
                    return Some(());
                }
            }
        }
    }

    /// `None` when the log went back below this stream's position since it last looked: what
    /// it sent past the new end is not in the store any more, and the events committed at those
    /// positions would never reach it.
    fn still_on_the_log(&mut self) -> Option<()> {
        let batch = Arc::clone(&self.tail.borrow());
        if batch.continues_from(self.after, &mut self.rewinds) {
            return Some(());
        }
        self.end_past_the_log(batch.rewinds.to)
    }

    /// Ends the stream (`None`): its client reconnects from its last id and is refused 409
    /// `position_beyond_head` while that is past the end, as any follower from there is.
    fn end_past_the_log(&self, log_end: i64) -> Option<()> {
        tracing::info!(
            after_position = self.after,
            log_end,
            "event stream ended: the event log went back below its position"
        );
        None
    }

    /// Queues a frame per event of the stream's types, then an id-only frame when `read_to` is
    /// past the last of them (held back at the head, `hold_progress`, for up to the progress
    /// interval), and moves `after` to `read_to`.
    fn queue<'a>(
        &mut self,
        events: impl Iterator<Item = &'a LogEvent>,
        read_to: i64,
        hold_progress: bool,
    ) -> Option<()> {
        let mut last_sent = self.after;
        for event in events {
            if let Some(types) = &self.event_types
                && !types.contains(&event.event.event_type)
            {
                continue;
            }
            let position = event.event.position;
            let frame = Event::default()
                .id(position.to_string())
                .event(event.event.event_type.as_str())
                .json_data(event);
            match frame {
                Ok(frame) => self.pending.push_back(frame),
                Err(err) => {
                    tracing::error!(error = %err, position, "event stream ended: an event did not serialise");
                    return None;
                }
            }
            last_sent = position;
        }
        if read_to > last_sent {
            // Positions read without a match: move the client's resume point past them, now or,
            // at the head, once the interval is over (unless an event's id does it first).
            if hold_progress && !self.progress_interval.is_zero() {
                let due = match self.held_progress {
                    Some((_, due)) if last_sent == self.after => due,
                    _ => Instant::now() + self.progress_interval,
                };
                self.held_progress = Some((read_to, due));
            } else {
                self.held_progress = None;
                self.pending
                    .push_back(Event::default().id(read_to.to_string()));
            }
        } else {
            // The last frame's id is `read_to`: nothing is held back any more.
            self.held_progress = None;
        }
        self.after = read_to;
        Some(())
    }
}

/// Sleeps until `due`, or forever when there is nothing due.
async fn sleep_until_some(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}
