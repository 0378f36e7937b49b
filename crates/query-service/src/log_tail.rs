//! The log's tail, read once per instance for every event stream and `GET /events` long poll
//! at the head.
//!
//! Without it, each `GET /events/stream` follower (or filtered `GET /events?wait_ms=` long poll)
//! that has caught up would read the event store on every commit that wakes it: open streams
//! times the commit rate. Here one task reads each
//! new stretch of the log once (on a commit announced or polled by the watcher) and publishes it
//! as a [`TailBatch`]; a stream at the head takes what follows its own position from the batch
//! and filters it in memory. The watch keeps only the latest batch: a stream that was too slow
//! to see one finds a gap (`batch.after` past its position) and reads the store instead, as a
//! catching-up stream does. A batch holds every event of `(after, read_to]` (positions are
//! dense and visible in order), so taking it never skips one.
//!
//! When the log's head goes back (a database restored from a backup, a fail-over to a replica
//! behind), positions above the new head will be given to other events. The tail then
//! publishes an empty batch at the new head, and never one it read before the head went back;
//! every batch says how often the head went back before it was read ([`TailBatch::rewinds`]), so
//! a stream past the new end ends (its client reconnects and is refused 409 while past the end)
//! instead of waiting there and skipping, silently, the events committed at the reused
//! positions.
//!
//! While no stream is open the task reads nothing; it only keeps up with the head. It never
//! writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use platform::shutdown::CancellationToken;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::consistency::{CheckpointWatcher, HeadRewinds};
use crate::history::LogEvent;

/// Most events one read of the tail takes; a longer stretch is read in several batches. Every
/// stream at the head holds the frames of a whole batch, so this (not `STREAM_PAGE_EVENTS`) is
/// what bounds such a stream's memory (README, "Following the log as a stream"): large enough
/// that a tail fallen behind catches up in few reads, small enough for about 1 MB per stream.
pub const TAIL_PAGE_EVENTS: i64 = 1000;

/// Pause after a failed read of the tail before the next attempt.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Every event of `(after, read_to]`, in position order.
#[derive(Debug, Default)]
pub struct TailBatch {
    /// The position the batch continues from.
    pub after: i64,
    /// The last position it holds.
    pub read_to: i64,
    /// The events of `(after, read_to]`.
    pub events: Vec<LogEvent>,
    /// Times the log's head went back before this batch was read, and where to the last time
    /// (`CheckpointWatcher::head_rewinds`): a stream that has read past `rewinds.to` in an
    /// earlier count read events the store no longer has, and must end.
    pub rewinds: HeadRewinds,
}

impl TailBatch {
    /// Whether a follower that has read up to `position` while the head had gone back `seen`
    /// times is still on the log this batch comes from. When it is, the follower adopts the
    /// batch's count.
    pub fn continues_from(&self, position: i64, seen: &mut u64) -> bool {
        if self.rewinds.count == *seen {
            return true;
        }
        if position > self.rewinds.to {
            return false;
        }
        *seen = self.rewinds.count;
        true
    }
}

/// Counters of the tail's work, for tests.
#[derive(Debug, Default)]
pub struct TailStats {
    /// Reads of the event store by the tail task.
    pub reads: AtomicU64,
}

/// The published tail: streams subscribe to it.
#[derive(Debug, Clone)]
pub struct LogTail {
    batches: Arc<watch::Sender<Arc<TailBatch>>>,
    stats: Arc<TailStats>,
}

impl LogTail {
    /// Starts the task that reads the tail after each commit while any stream is subscribed;
    /// it stops when `cancel` is cancelled, also in the middle of a read.
    pub fn spawn(
        pool: PgPool,
        watcher: CheckpointWatcher,
        cancel: CancellationToken,
    ) -> (Self, JoinHandle<()>) {
        let tail = Self {
            batches: Arc::new(watch::Sender::new(Arc::new(TailBatch::default()))),
            stats: Arc::default(),
        };
        let task = tokio::spawn(tail.clone().run(pool, watcher, cancel));
        (tail, task)
    }

    /// A receiver of the batches to come (and of the latest one).
    pub fn subscribe(&self) -> watch::Receiver<Arc<TailBatch>> {
        self.batches.subscribe()
    }

    /// The tail's counters.
    pub fn stats(&self) -> Arc<TailStats> {
        Arc::clone(&self.stats)
    }

    async fn run(self, pool: PgPool, watcher: CheckpointWatcher, cancel: CancellationToken) {
        let mut head = watcher.head_receiver();
        let mut last = *head.borrow_and_update();
        let mut rewinds = watcher.head_rewinds();
        loop {
            let now = *head.borrow_and_update();
            let latest = watcher.head_rewinds();
            if latest != rewinds {
                // The log went back: the positions above `latest.to` will be given to other
                // events, which must be read, and the last batch (of the lost history) must
                // never be taken again.
                rewinds = latest;
                last = last.min(latest.to);
                self.batches.send_replace(Arc::new(TailBatch {
                    after: last,
                    read_to: last,
                    events: Vec::new(),
                    rewinds,
                }));
            }
            if now <= last {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    changed = head.changed() => if changed.is_err() { return },
                }
                continue;
            }
            if self.batches.receiver_count() == 0 {
                // Nobody follows: keep up with the head without reading.
                last = *head.borrow();
                continue;
            }
            // Raced with the cancel, so a silent server cannot hold shutdown past its grace.
            let read = tokio::select! {
                () = cancel.cancelled() => return,
                read = store::read_all(&pool, last, TAIL_PAGE_EVENTS) => read,
            };
            match read {
                // Read, maybe, before the log went back: the loop starts again from the new head.
                Ok(_) if watcher.head_rewinds() != rewinds => {}
                Ok(events) if !events.is_empty() => {
                    self.stats.reads.fetch_add(1, Ordering::Relaxed);
                    let read_to = events.last().map_or(last, |e| e.global_position);
                    let batch = TailBatch {
                        after: last,
                        read_to,
                        events: events.into_iter().map(LogEvent::from).collect(),
                        rewinds,
                    };
                    self.batches.send_replace(Arc::new(batch));
                    last = read_to;
                }
                Ok(_) => {
                    // Announced but not visible: cannot happen (the announcement follows the
                    // commit); wait rather than spin if it ever does.
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(RETRY_AFTER_FAILURE) => {}
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, after_position = last,
                        "reading the log's tail failed; event streams at the head wait for the retry");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(RETRY_AFTER_FAILURE) => {}
                    }
                }
            }
        }
    }
}
