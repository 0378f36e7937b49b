//! `GET /orders/{id}/events/stream`: one order's events as Server-Sent Events, its history and
//! then each new event as it is committed, on one response: what a page showing an order's
//! progress follows instead of polling.
//!
//! Each event goes out as `id: <version>`, `event: <event_type>`, `data: <the event as
//! GET /orders/{id}/events shows it>`. A client that reconnects with `Last-Event-ID` (a
//! browser does so by itself) continues after that version, with nothing missed or repeated.
//!
//! Catching up reads the order's own stream ([`History::order_events_with_head`], a page of
//! [`STREAM_PAGE_EVENTS`] at a time), never the whole log. With the history read, the stream
//! knows the log's head as of before that read, so every event of the order at or below it has
//! been seen; from there it takes the shared [`crate::log_tail::LogTail`]'s batches (read once
//! per instance, whatever the number of streams) and keeps the order's events, by version. A
//! batch that does not continue from where it is (a stream too slow to see one) sends it back
//! to reading the order's stream. When the log goes back below what it has read (a restore),
//! it ends, as the log's stream does. Bounds, shutdown and keep-alive are those of the log's
//! stream ([`crate::log_stream`]). It never writes.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::response::sse::Event;
use events::order_stream_id;
use futures::Stream;
use platform::shutdown::CancellationToken;
use tokio::sync::watch;
use uuid::Uuid;

use crate::history::{History, HistoryEvent};
use crate::log_stream::{RECONNECT_AFTER, STREAM_PAGE_EVENTS, StreamSlot, StreamStats};
use crate::log_tail::TailBatch;

/// One order's stream: how far it has sent and seen, and the frames not yet sent.
pub(crate) struct OrderFollow {
    history: History,
    order_id: Uuid,
    stream_id: String,
    /// The last version sent (or skipped by the client's `Last-Event-ID`).
    after_version: i64,
    /// Every event of the log up to this position has been looked at; `None` while catching
    /// up from the order's stream.
    seen_to: Option<i64>,
    /// Times the log's head had gone back when this stream last checked it was still on the log
    /// ([`TailBatch::continues_from`]).
    rewinds: u64,
    tail: watch::Receiver<Arc<TailBatch>>,
    stats: Arc<StreamStats>,
    pending: VecDeque<Event>,
    stop: CancellationToken,
    _slot: StreamSlot,
}

impl OrderFollow {
    pub(crate) fn new(
        history: History,
        order_id: Uuid,
        after_version: i64,
        tail: watch::Receiver<Arc<TailBatch>>,
        stats: Arc<StreamStats>,
        stop: CancellationToken,
        slot: StreamSlot,
    ) -> Self {
        let rewinds = tail.borrow().rewinds.count;
        Self {
            history,
            order_id,
            stream_id: order_stream_id(order_id),
            after_version,
            seen_to: None,
            rewinds,
            tail,
            stats,
            pending: VecDeque::from([Event::default().retry(RECONNECT_AFTER)]),
            stop,
            _slot: slot,
        }
    }

    /// The frames, until shutdown, a failed read or an event that does not serialise.
    pub(crate) fn into_frames(self) -> impl Stream<Item = Result<Event, Infallible>> + use<> {
        futures::stream::unfold(self, |mut follow| async move {
            let event = follow.next_event().await?;
            Some((Ok(event), follow))
        })
    }

    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            let latest = Arc::clone(&self.tail.borrow());
            if !self.still_on_the_log(&latest) {
                return None;
            }
            match self.seen_to {
                None => self.catch_up().await?,
                Some(seen_to) => self.take_from_tail(seen_to).await?,
            }
        }
    }

    /// Reads the next page of the order's stream; once a page is not full, the order is
    /// caught up to the head read before it.
    async fn catch_up(&mut self) -> Option<()> {
        let read = tokio::select! {
            () = self.stop.cancelled() => return None,
            read = self.history.order_events_with_head(
                self.order_id, self.after_version, STREAM_PAGE_EVENTS) => read,
        };
        let (head, events) = match read {
            Ok(read) => read,
            Err(err) => {
                tracing::warn!(error = %err, order_id = %self.order_id,
                    after_version = self.after_version,
                    "order event stream ended on a failed read; the client resumes from its last id");
                return None;
            }
        };
        self.stats.store_reads.fetch_add(1, Ordering::Relaxed);
        let full = i64::try_from(events.len()).unwrap_or(i64::MAX) >= STREAM_PAGE_EVENTS;
        let last_position = events.last().map_or(0, |e| e.position);
        for event in events {
            self.queue(event)?;
        }
        if !full {
            self.seen_to = Some(head.max(last_position));
        }
        Some(())
    }

    /// Waits for a tail batch that continues from `seen_to` and queues the order's events in
    /// it; at a gap it goes back to reading the order's stream.
    async fn take_from_tail(&mut self, seen_to: i64) -> Option<()> {
        loop {
            let batch = Arc::clone(&self.tail.borrow_and_update());
            if !self.still_on_the_log(&batch) {
                return None;
            }
            if batch.read_to > seen_to {
                if batch.after > seen_to {
                    self.seen_to = None;
                    return Some(());
                }
                for event in &batch.events {
                    if event.stream_id == self.stream_id && event.event.version > self.after_version
                    {
                        self.queue(event.event.clone())?;
                    }
                }
                self.seen_to = Some(batch.read_to);
                self.stats.tail_batches.fetch_add(1, Ordering::Relaxed);
                return Some(());
            }
            tokio::select! {
                () = self.stop.cancelled() => return None,
                changed = self.tail.changed() => changed.ok()?,
            }
        }
    }

    /// Whether the log has not gone back below what this stream read since it last looked. A
    /// stream that read past the new end (or, catching up, cannot tell which log positions its
    /// versions had) ends: its client reconnects from its last version and is refused 409
    /// `version_beyond_head` while that is past the order's end, instead of never getting the
    /// events committed at the reused versions.
    fn still_on_the_log(&mut self, batch: &TailBatch) -> bool {
        let read_to = match self.seen_to {
            Some(seen_to) => seen_to,
            None if self.after_version == 0 => 0,
            None => i64::MAX,
        };
        if batch.continues_from(read_to, &mut self.rewinds) {
            return true;
        }
        tracing::info!(order_id = %self.order_id, after_version = self.after_version,
            log_end = batch.rewinds.to,
            "order event stream ended: the event log went back below its position");
        false
    }

    /// Queues the frame of `event` and moves `after_version` to it.
    fn queue(&mut self, event: HistoryEvent) -> Option<()> {
        let version = event.version;
        let frame = Event::default()
            .id(version.to_string())
            .event(event.event_type.as_str())
            .json_data(&event);
        match frame {
            Ok(frame) => self.pending.push_back(frame),
            Err(err) => {
                tracing::error!(error = %err, order_id = %self.order_id, version,
                    "order event stream ended: an event did not serialise");
                return None;
            }
        }
        self.after_version = version;
        Some(())
    }
}
