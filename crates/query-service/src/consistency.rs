//! Read-your-writes: what each projection has applied, and waiting for it without polling the
//! database per request; likewise the head of the event log, for `GET /events?wait_ms=`.
//!
//! One [`CheckpointWatcher`] per service instance owns two background tasks:
//! - the *listener* holds its own connection and `LISTEN`s on [`POSITION_CHANNEL`], where the
//!   projector's sweeper announces `<projection>:<position>` after advancing a checkpoint, and
//!   on [`store::APPENDED_CHANNEL`], where every append announces the new head;
//! - the *poller* reads every row of [`CHECKPOINTS_TABLE`] and the head every
//!   `CHECKPOINT_POLL_MS`, because notifications are lost while the listener reconnects.
//!
//! Both publish into one `tokio::sync::watch` per known projection; a waiting request only awaits
//! its watch with a deadline, so 200 waiting clients cost the database nothing more than one.
//! A notification only ever raises a position (it is a hint that may arrive late); the poll is the
//! truth and may lower it (e.g. after `projector rebuild` reset a checkpoint), but never below a
//! notification received while it read: that one overtook the poll's read, which is stale.
//!
//! This module never reads a read-model row: callers re-read the checkpoint in the same query as
//! their rows (see `read_models`), which is what `X-Projection-Position` reports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use platform::outage::OutageLog;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// NOTIFY channel the projector's sweeper signals after advancing a checkpoint; payload
/// `<projection>:<position>`.
pub const POSITION_CHANNEL: &str = "projection_position";
/// Table holding each projection's low-water mark.
pub const CHECKPOINTS_TABLE: &str = "projection_checkpoints";
/// The `order_summaries` projection, behind `GET /orders` and `GET /orders/{id}`.
pub const ORDER_SUMMARIES: &str = "order_summaries";
/// The `customer_stats` projection, behind `GET /customers/{id}`.
pub const CUSTOMER_STATS: &str = "customer_stats";
/// The projections this service serves; notifications about others are ignored, which keeps
/// the set of watches (and memory) fixed.
pub const PROJECTIONS: [&str; 2] = [ORDER_SUMMARIES, CUSTOMER_STATS];
/// Delay before the listener reconnects after an error it could not recover from itself.
pub const LISTENER_RETRY_DELAY: Duration = Duration::from_secs(1);
/// `application_name` of the listener's connection.
pub const LISTENER_APPLICATION_NAME: &str = "query-service listener";

/// The poller's query: every checkpoint at once, so its cost does not grow with the projections.
const POLL_SQL: &str = "SELECT projection, position FROM projection_checkpoints";

/// Counters of the database work done for consistency, for tests and `/metrics`.
#[derive(Debug, Default)]
pub struct WatcherStats {
    /// Executions of the checkpoint poll query.
    pub checkpoint_polls: AtomicU64,
    /// Notifications received on [`POSITION_CHANNEL`] for a known projection.
    pub notifications: AtomicU64,
    /// Successful `LISTEN`s (1 after start, more after reconnects).
    pub listens: AtomicU64,
    /// Requests waiting on a watch right now.
    pub waiting: AtomicU64,
    /// Waits begun since start (a request that waits again after a wake counts twice).
    pub waits_begun: AtomicU64,
}

/// Keeps [`WatcherStats::waiting`] right even when a waiting request is dropped mid-wait.
struct WaitingGuard<'a>(&'a AtomicU64);

impl<'a> WaitingGuard<'a> {
    fn enter(stats: &'a WatcherStats) -> Self {
        stats.waits_begun.fetch_add(1, Ordering::Relaxed);
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        Self(&stats.waiting)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a consistency wait ended, for the `outcome` label of `query_consistency_waits_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The projection was already at the position: no wait.
    Immediate,
    /// The projection reached the position within the deadline.
    Satisfied,
    /// The deadline passed first.
    Timeout,
}

impl WaitOutcome {
    fn label(self) -> &'static str {
        match self {
            WaitOutcome::Immediate => "immediate",
            WaitOutcome::Satisfied => "satisfied",
            WaitOutcome::Timeout => "timeout",
        }
    }
}

/// A position fed by notifications, which only raise it, and by polls of the table, the truth,
/// which may lower it. A poll's read can be overtaken by a notification received while the
/// poll ran (the read was answered before the projector's commit, the notification after it);
/// published as read, it would move the position back below what that notification said was
/// applied, and read-your-writes would wait, or time out, on a position the read model has.
/// So a poll publishes the larger of its read and every notification received while it ran:
/// that is also right when the position really went back, since notifications of the lowered
/// mark are low too.
struct Followed {
    tx: watch::Sender<i64>,
    polls: Mutex<OpenPolls>,
}

/// The polls under way on one [`Followed`], each with the highest notification received since it
/// began (`i64::MIN` for none).
#[derive(Default)]
struct OpenPolls {
    next_id: u64,
    open: Vec<(u64, i64)>,
}

impl Followed {
    fn new() -> Self {
        Self {
            tx: watch::Sender::new(0),
            polls: Mutex::new(OpenPolls::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenPolls> {
        // The lists stay consistent whatever panicked while holding the lock.
        self.polls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A notification: raises the position, and is remembered by every poll under way.
    fn notify(&self, position: i64) {
        let mut polls = self.lock();
        for (_, highest) in &mut polls.open {
            *highest = (*highest).max(position);
        }
        // Published under the lock, so a poll ending now either saw this one or runs after it.
        raise_to(&self.tx, position)
    }

    /// Opens a poll's window; notifications from now on count against its read.
    fn begin_poll(&self) -> PollWindow<'_> {
        let mut polls = self.lock();
        let id = polls.next_id;
        polls.next_id += 1;
        polls.open.push((id, i64::MIN));
        PollWindow { followed: self, id }
    }
}

/// A poll under way on one [`Followed`]; dropped without [`PollWindow::publish`] (a failed read)
/// it publishes nothing.
struct PollWindow<'a> {
    followed: &'a Followed,
    id: u64,
}

impl PollWindow<'_> {
    /// Publishes what the poll read, or the highest notification received since it began if that
    /// is higher. Returns the previous position when this lowered it.
    fn publish(self, read: i64) -> Option<i64> {
        self.publish_and(read, |_, _| {})
    }

    /// Like [`Self::publish`], calling `on_lower(from, to)` when it lowers the position, before
    /// the receivers see the lower value.
    fn publish_and(self, read: i64, on_lower: impl FnOnce(i64, i64)) -> Option<i64> {
        let mut polls = self.followed.lock();
        let notified = take_window(&mut polls, self.id);
        let position = read.max(notified);
        let mut lowered_from = None;
        self.followed.tx.send_if_modified(|current| {
            if *current == position {
                return false;
            }
            if position < *current {
                lowered_from = Some(*current);
                on_lower(*current, position);
            }
            *current = position;
            true
        });
        lowered_from
    }
}

impl Drop for PollWindow<'_> {
    fn drop(&mut self) {
        take_window(&mut self.followed.lock(), self.id);
    }
}

/// Closes the window `id` (if still open) and returns the highest notification it received.
fn take_window(polls: &mut OpenPolls, id: u64) -> i64 {
    match polls.open.iter().position(|(open, _)| *open == id) {
        Some(index) => polls.open.swap_remove(index).1,
        None => i64::MIN,
    }
}

/// The positions of every served projection, kept current by two background tasks.
#[derive(Clone)]
pub struct CheckpointWatcher {
    projections: Arc<HashMap<&'static str, Followed>>,
    /// The highest committed position of the event log: raised by append announcements, and
    /// lowered by a poll (to no less than the announcements received while it ran) only when
    /// the log went back, which only a database restored from a backup (or a fail-over to a
    /// replica behind) does.
    head: Arc<Followed>,
    /// Each time the head went back, and where to: read by the log's tail, which must not hand
    /// out what it read before.
    rewinds: Arc<Mutex<HeadRewinds>>,
    stats: Arc<WatcherStats>,
}

/// How often the log's head went back since start, and to which position the last time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeadRewinds {
    /// Times the head went back.
    pub count: u64,
    /// The position it went back to the last time (0 before any).
    pub to: i64,
}

impl std::fmt::Debug for CheckpointWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let positions: HashMap<_, _> = self
            .projections
            .iter()
            .map(|(name, followed)| (*name, *followed.tx.borrow()))
            .collect();
        f.debug_struct("CheckpointWatcher")
            .field("positions", &positions)
            .finish()
    }
}

impl Default for CheckpointWatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl CheckpointWatcher {
    /// A watcher with every known projection at position 0 and no tasks running yet.
    pub fn new() -> Self {
        let projections = PROJECTIONS
            .into_iter()
            .map(|name| (name, Followed::new()))
            .collect();
        Self {
            projections: Arc::new(projections),
            head: Arc::new(Followed::new()),
            rewinds: Arc::default(),
            stats: Arc::new(WatcherStats::default()),
        }
    }

    /// Counts the caller as waiting (in [`WatcherStats`]) until the guard is dropped: for a
    /// request that waits on another watch fed by the head (the log's tail).
    pub(crate) fn count_wait(&self) -> impl Drop + '_ {
        WaitingGuard::enter(&self.stats)
    }

    /// A receiver of the log's head as it rises (for the log's tail reader; a request waiting
    /// on the tail counts itself with [`Self::count_wait`]).
    pub fn head_receiver(&self) -> watch::Receiver<i64> {
        self.head.tx.subscribe()
    }

    /// How often the head went back, and to where the last time. Updated before the head's
    /// receivers see the lower value.
    pub fn head_rewinds(&self) -> HeadRewinds {
        *self.rewinds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one `event_store_appended` payload (the new head); malformed ones are ignored.
    /// An announcement only ever raises the head.
    pub fn apply_appended(&self, payload: &str) {
        if let Ok(head) = payload.trim().parse::<i64>() {
            self.head.notify(head);
        }
    }

    /// Publishes the head a poll read, through its `window` (opened when the poll began). A
    /// lower value is the truth, raised to the announcements received meanwhile: the log went
    /// back. Followed down, a long poll at the restored head waits for the next commit instead
    /// of finding the head above it and reading again at once, and the log's tail reads the
    /// positions the store gives out again. Counting only the announcements, not waiting for a
    /// poll none came during, keeps commits landing under load from holding the head up.
    fn set_head_from_poll(&self, window: PollWindow<'_>, position: i64) {
        let went_back_from = window.publish_and(position, |_, to| {
            let mut rewinds = self.rewinds.lock().unwrap_or_else(PoisonError::into_inner);
            rewinds.count += 1;
            rewinds.to = to;
        });
        if let Some(from) = went_back_from {
            tracing::warn!(
                from,
                to = *self.head.tx.borrow(),
                "the event log's head went back (was the database restored from a backup?); \
                 following it"
            );
        }
    }

    /// The counters of database work done by this watcher.
    pub fn stats(&self) -> Arc<WatcherStats> {
        Arc::clone(&self.stats)
    }

    /// The last published position of `projection` (0 when unknown).
    pub fn position(&self, projection: &str) -> i64 {
        self.projections
            .get(projection)
            .map_or(0, |followed| *followed.tx.borrow())
    }

    /// Raises `projection` to `position` (a notification: never lowers).
    pub fn raise(&self, projection: &str, position: i64) {
        if let Some(followed) = self.projections.get(projection) {
            followed.notify(position);
        }
    }

    /// Sets `projection` to `position` as a read of the table just found it (the truth; may
    /// lower it). A poll does not use this: its read may be older than a notification received
    /// meanwhile (see [`Followed`]).
    pub fn set(&self, projection: &str, position: i64) {
        if let Some(followed) = self.projections.get(projection) {
            followed.begin_poll().publish(position);
        }
    }

    /// Waits until `projection` has published a position of at least `min_position`, or the
    /// deadline passes. Returns the position seen and how the wait ended. Touches no database.
    ///
    /// With `require_change`, the current value is not trusted and the wait lasts at least until
    /// the next publication: a caller whose fresh read of the table contradicted the watch uses
    /// it, so it never spins on a stale value.
    pub async fn wait_for(
        &self,
        projection: &'static str,
        min_position: i64,
        deadline: Instant,
        require_change: bool,
    ) -> (i64, WaitOutcome) {
        let Some(followed) = self.projections.get(projection) else {
            return (0, WaitOutcome::Timeout);
        };
        let tx = &followed.tx;
        let mut rx = tx.subscribe();
        let current = *rx.borrow_and_update();
        if !require_change && current >= min_position {
            return (current, WaitOutcome::Immediate);
        }
        let _waiting = WaitingGuard::enter(&self.stats);
        let started = Instant::now();
        let remaining = deadline.saturating_duration_since(started);
        let wait = async {
            if require_change && rx.changed().await.is_err() {
                return None;
            }
            rx.wait_for(|p| *p >= min_position).await.ok().map(|p| *p)
        };
        let outcome = match tokio::time::timeout(remaining, wait).await {
            Ok(Some(position)) => (position, WaitOutcome::Satisfied),
            // A closed channel cannot happen while `self` holds the sender; treat it as a timeout.
            Ok(None) | Err(_) => (*tx.borrow(), WaitOutcome::Timeout),
        };
        metrics::histogram!("query_consistency_wait_seconds", "projection" => projection)
            .record(started.elapsed().as_secs_f64());
        outcome
    }

    /// Counts one finished consistency wait in `query_consistency_waits_total`.
    pub fn record_outcome(projection: &'static str, outcome: WaitOutcome) {
        metrics::counter!(
            "query_consistency_waits_total",
            "projection" => projection,
            "outcome" => outcome.label()
        )
        .increment(1);
    }

    /// Counts a wait that ran out for a position past the end of the log (answered 409).
    pub fn record_beyond_head(projection: &'static str) {
        metrics::counter!(
            "query_consistency_waits_total",
            "projection" => projection,
            "outcome" => "beyond_head"
        )
        .increment(1);
    }

    /// Reads every checkpoint once and publishes them (one step of the poller).
    pub async fn poll_once(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        // Opened before the reads, so every notification they may not include is counted.
        let windows: Vec<_> = PROJECTIONS
            .into_iter()
            .filter_map(|name| Some((name, self.projections.get(name)?.begin_poll())))
            .collect();
        let head_window = self.head.begin_poll();
        self.stats.checkpoint_polls.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("query_checkpoint_polls_total").increment(1);
        let rows: Vec<(String, i64)> = sqlx::query_as(POLL_SQL).fetch_all(pool).await?;
        for (projection, window) in windows {
            // A projection without a row has applied nothing yet (or was reset by a rebuild).
            let read = rows
                .iter()
                .find(|(name, _)| name == projection)
                .map_or(0, |(_, position)| *position);
            window.publish(read);
        }
        let head = store::head_position(pool).await?;
        self.set_head_from_poll(head_window, head);
        Ok(())
    }

    /// Applies one `<projection>:<position>` notification payload; malformed ones are ignored.
    pub fn apply_notification(&self, payload: &str) {
        let Some((projection, position)) = payload.rsplit_once(':') else {
            tracing::debug!(%payload, "ignored a malformed projection_position notification");
            return;
        };
        let Ok(position) = position.trim().parse::<i64>() else {
            tracing::debug!(%payload, "ignored a malformed projection_position notification");
            return;
        };
        if self.projections.contains_key(projection) {
            self.raise(projection, position);
            // Counted once raised, so a count seen means the watch holds the position.
            self.stats.notifications.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts the listener and the poller; both stop when `cancel` is cancelled, also in the
    /// middle of a database call.
    ///
    /// The listener gets a one-connection pool of its own, with the request pool's connection
    /// settings and named `query-service listener`, so it never takes a connection from the
    /// request pool and an operator can tell it apart.
    pub fn spawn(
        &self,
        pool: PgPool,
        poll_interval: Duration,
        cancel: CancellationToken,
    ) -> Vec<JoinHandle<()>> {
        let listener_options = (*pool.connect_options())
            .clone()
            .application_name(LISTENER_APPLICATION_NAME);
        let poller = {
            let watcher = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move { watcher.run_poller(pool, poll_interval, cancel).await })
        };
        let listener = {
            let watcher = self.clone();
            tokio::spawn(async move { watcher.run_listener(listener_options, cancel).await })
        };
        vec![poller, listener]
    }

    async fn run_poller(self, pool: PgPool, interval: Duration, cancel: CancellationToken) {
        // Fails every CHECKPOINT_POLL_MS while PostgreSQL is down: the first failure, a reminder
        // a minute and the recovery are logged, the rest at debug.
        let mut failing = OutageLog::new();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            // Raced with the cancel: a server that went silent leaves a read waiting for up to
            // the connection's TCP_USER_TIMEOUT (30 s), past the service's shutdown grace period.
            let result = tokio::select! {
                () = cancel.cancelled() => return,
                result = self.poll_once(&pool) => result,
            };
            match result {
                Ok(()) => {
                    if let Some(recovered) = failing.recovered() {
                        tracing::info!(
                            failures = recovered.failures,
                            failed_ms = recovered.failed_ms(),
                            "reading projection checkpoints again"
                        );
                    }
                }
                Err(e) => match failing.failed() {
                    Some(failure) if failure.first => tracing::warn!(error = %e,
                        "cannot read projection checkpoints; retrying (logged again every minute \
                         while it lasts, and when it works again)"),
                    Some(failure) => tracing::warn!(error = %e, failures = failure.failures,
                        failing_ms = failure.failing_ms(), "still cannot read projection checkpoints"),
                    None => tracing::debug!(error = %e, "still cannot read projection checkpoints"),
                },
            }
        }
    }

    async fn run_listener(self, options: PgConnectOptions, cancel: CancellationToken) {
        // Reconnects every LISTENER_RETRY_DELAY while PostgreSQL is down: the first failure, a
        // reminder a minute and the recovery are logged, the rest at debug.
        let mut failing = OutageLog::new();
        loop {
            let result = tokio::select! {
                () = cancel.cancelled() => return,
                result = self.listen(options.clone(), &mut failing) => result,
            };
            if let Err(e) = result {
                let error = platform::config::error_chain(e.as_ref());
                match failing.failed() {
                    Some(failure) if failure.first => tracing::warn!(%error,
                        "projection_position listener failed; reconnecting (logged again every \
                         minute while it cannot, and when it listens again)"),
                    Some(failure) => tracing::warn!(%error, failures = failure.failures,
                        failing_ms = failure.failing_ms(),
                        "projection_position listener still cannot listen; reconnecting"),
                    None => tracing::debug!(%error,
                        "projection_position listener still cannot listen"),
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(LISTENER_RETRY_DELAY) => {}
            }
        }
    }

    /// Listens until an unrecoverable error. `PgListener::recv` reconnects by itself after an
    /// I/O error; notifications sent meanwhile are lost, which the poller makes up for. Ends
    /// `failing`'s outage (and logs so) once it listens.
    async fn listen(
        &self,
        options: PgConnectOptions,
        failing: &mut OutageLog,
    ) -> anyhow::Result<()> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_with(options)
            .await
            .context("connect the projection_position listener")?;
        let mut listener = PgListener::connect_with(&pool)
            .await
            .context("open the projection_position listener")?;
        listener
            .listen_all([POSITION_CHANNEL, store::APPENDED_CHANNEL])
            .await
            .context("LISTEN projection_position, event_store_appended")?;
        self.stats.listens.fetch_add(1, Ordering::Relaxed);
        if let Some(recovered) = failing.recovered() {
            tracing::info!(
                failures = recovered.failures,
                failed_ms = recovered.failed_ms(),
                "projection_position listener listens again"
            );
        }
        tracing::debug!("listening for projection positions");
        loop {
            let notification = listener
                .recv()
                .await
                .context("receive a projection_position notification")?;
            if notification.channel() == store::APPENDED_CHANNEL {
                self.apply_appended(notification.payload());
            } else {
                self.apply_notification(notification.payload());
            }
        }
    }
}

/// Publishes `position` if it is above the current value; waiters wake only then.
fn raise_to(tx: &watch::Sender<i64>, position: i64) {
    tx.send_if_modified(|current| {
        let raise = position > *current;
        if raise {
            *current = position;
        }
        raise
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn notifications_only_raise_and_polls_set() {
        let w = CheckpointWatcher::new();
        w.apply_notification("order_summaries:7");
        w.apply_notification("order_summaries:5");
        assert_eq!(w.position(ORDER_SUMMARIES), 7);
        w.set(ORDER_SUMMARIES, 3);
        assert_eq!(w.position(ORDER_SUMMARIES), 3);
        w.apply_notification("unknown:9");
        w.apply_notification("garbage");
        w.apply_notification("customer_stats:x");
        assert_eq!(w.position(CUSTOMER_STATS), 0);
    }

    #[tokio::test]
    async fn a_wait_returns_as_soon_as_the_position_is_published() {
        let w = CheckpointWatcher::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let waiter = {
            let w = w.clone();
            tokio::spawn(async move { w.wait_for(ORDER_SUMMARIES, 5, deadline, false).await })
        };
        // Publish only once the waiter waits, so it really waits.
        let waiting = async {
            while w.stats.waiting.load(Ordering::Relaxed) == 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiter waits");
        w.raise(ORDER_SUMMARIES, 4);
        w.raise(ORDER_SUMMARIES, 6);
        let (position, outcome) = waiter.await.unwrap();
        assert_eq!(outcome, WaitOutcome::Satisfied);
        assert!(position >= 5);
    }

    #[tokio::test]
    async fn a_wait_past_its_deadline_times_out() {
        let w = CheckpointWatcher::new();
        let deadline = Instant::now() + Duration::from_millis(20);
        let (position, outcome) = w.wait_for(CUSTOMER_STATS, 1, deadline, false).await;
        assert_eq!((position, outcome), (0, WaitOutcome::Timeout));
    }

    /// While PostgreSQL is gone the poller fails at every poll and the listener at every
    /// reconnect: each says so when it starts (and would again a minute later), not at every
    /// try, and says when it works again.
    #[tokio::test]
    async fn the_poller_and_the_listener_log_an_outage_once_not_at_every_try_and_when_it_ends() {
        // The watcher's tasks run on this thread (a current-thread runtime): its logs land here.
        let (logs, _logging) = platform::testing::LogBuffer::capture("info,query_service=debug");
        let db = store::testing::TestDatabase::new().await;
        let switch = store::testing::PostgresSwitch::on(&db).await;
        switch.turn_off();
        let watcher = CheckpointWatcher::new();
        let cancel = CancellationToken::new();
        let tasks = watcher.spawn(
            switch.lazy_pool(2),
            Duration::from_millis(20),
            cancel.clone(),
        );
        let lines = |text: &str| logs.lines_containing(text);
        let deadline = Instant::now() + Duration::from_secs(20);
        while lines("still cannot read projection checkpoints") < 5
            || lines("projection_position listener still cannot listen") < 2
        {
            assert!(Instant::now() < deadline, "{}", logs.text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            lines("cannot read projection checkpoints; retrying"),
            1,
            "{}",
            logs.text()
        );
        assert_eq!(
            lines("projection_position listener failed"),
            1,
            "{}",
            logs.text()
        );

        switch.turn_on();
        while lines("reading projection checkpoints again") == 0
            || lines("projection_position listener listens again") == 0
        {
            assert!(Instant::now() < deadline, "{}", logs.text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(lines("reading projection checkpoints again"), 1);
        assert_eq!(lines("projection_position listener listens again"), 1);

        cancel.cancel();
        for task in tasks {
            task.await.unwrap();
        }
    }
}
