//! `freshness`: end-to-end freshness at a steady rate below saturation, and how long an event
//! takes from its `recorded_at` to the Redis stream.
//!
//! - An open-loop ticker schedules commands at a fixed rate: tick `k` is due at
//!   `start + k / rate`, and carries that intended time to whichever client of a pool takes it.
//!   The first `warmup` of ticks is sent but left out of every figure; the measured window is
//!   the ticks due after it. A tick a client takes more than [`LATE_AFTER`] after its intended
//!   time is *late*; one never sent inside the window (the backlog of [`TICK_BACKLOG`] was
//!   full when it was due, or no client was free before the window closed) is *missed*. Each
//!   command has two latencies: the *service time* from the moment a client sent it, and the
//!   *response time* from its intended time, which includes any wait for a free client (so a
//!   stall is not hidden by the clients it kept busy: coordinated omission).
//! - Right after every `read_every`-th accepted command of each client, a read-back task asks
//!   the query service for the order with `?min_position=<position>` (which waits server-side,
//!   so no polling) and measures from the command's response to the 200. The client takes its
//!   next tick meanwhile: the ticks stand for users arriving, and a user's wait for their own
//!   write does not delay the next user's command. (A client that waited itself was busy for
//!   the whole visibility wait, so the pool ran nearly full at half saturation and ticks
//!   waited for a client: the generator, not the services, made them late.) At most
//!   [`READ_BACKS_IN_FLIGHT`] read-backs wait at once; past that a client waits for one to
//!   end, so a read side that stops answering shows as late ticks, not as unbounded tasks.
//!   Reading back only a sample keeps the run what it claims to be, a command rate: reading
//!   back every command adds a read-your-writes request per command, as much work again on
//!   the same machine (`--freshness-read-every 1` measures that mixed load).
//! - Meanwhile a reader follows the Redis stream with `XREAD BLOCK` and, for every entry it
//!   sees, measures the time since the event's `recorded_at`. That column is set by
//!   `clock_timestamp()` when the row is inserted, before the commit, so this is insert plus
//!   commit plus relay plus XADD, as seen by a consumer (not "commit to stream").
//! - With a database pool (spawned services), one command in [`PROBE_EVERY`] is also followed
//!   straight in PostgreSQL, one query every [`PROBE_POLL`] reading both its `order_summaries`
//!   row and that projection's checkpoint, until the row has its version and the checkpoint
//!   has passed its position. That is one figure, not two: the projector's apply transaction
//!   normally writes the row and moves the checkpoint in the same commit, and one query reads
//!   both, so separate "applied" and "checkpointed" times were the same poll. Probes that
//!   could not be queued or that failed are counted, not silently dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::api::{Api, Outcome, Workload};
use crate::stats::{Latencies, LatencySummary, rate};

/// Ticks that may wait for a free client; a tick due while this many wait is missed. Every
/// tick that waits longer than [`LATE_AFTER`] is already counted as late, so the backlog only
/// bounds memory.
const TICK_BACKLOG: usize = 1_024;

/// A command a client sends more than this after its intended time counts as late. The
/// timer's own jitter on a busy two-core machine is about a millisecond, so a 10 ms delay
/// means every client was busy, or the ticker itself was not scheduled in time (counted apart,
/// `late_released_ticks`): the load generator, not the schedule, decided when the command
/// left. It is also a tenth of the 100 ms freshness target, so a late command has visibly
/// eaten into it.
pub const LATE_AFTER: Duration = Duration::from_millis(10);

/// Largest share of a window's ticks that may be late for the run still to count as offering
/// its rate. The target is a p99: if more than 1% of commands left late, the held-back
/// commands are more than the tail the p99 leaves out, and the figure would describe a load
/// the generator throttled.
pub const LATE_SHARE_ALLOWED: f64 = 0.01;

/// How long one freshness measurement may retry a 503 (wait timed out) or 404 before it counts
/// as not visible.
const VISIBLE_DEADLINE: Duration = Duration::from_secs(10);

/// One accepted command in this many is followed in the database.
pub const PROBE_EVERY: u64 = 50;

/// Most read-backs waiting on the query service at once. Normally a few dozen wait (the
/// read-back rate times the visibility delay); the bound is for a read side that stops
/// answering, where each would wait out [`VISIBLE_DEADLINE`]. Well under the services' default
/// connection cap, since each holds a connection.
pub const READ_BACKS_IN_FLIGHT: usize = 512;

/// Poll interval of a probe (it adds a little database load; 1 in [`PROBE_EVERY`]).
pub const PROBE_POLL: Duration = Duration::from_millis(5);

/// The projection whose row and checkpoint the probes follow (the one `GET /orders/{id}` reads).
const PROBED_PROJECTION: &str = "order_summaries";

/// Block time of each `XREAD` on the stream.
const XREAD_BLOCK_MS: u64 = 1_000;

/// How long the stream reader gets to issue its first `XREAD` before the first tick, so it
/// sees the first entries.
const STREAM_READER_LEAD: Duration = Duration::from_millis(200);

/// How a freshness run is driven.
#[derive(Debug, Clone, Copy)]
pub struct FreshnessPlan {
    /// Commands per second.
    pub rate: f64,
    /// Ticks sent before the measured window, left out of every figure.
    pub warmup: Duration,
    /// Length of the measured window.
    pub measure: Duration,
    /// Clients sharing the ticks.
    pub clients: usize,
    /// Each client reads back one accepted command in this many.
    pub read_every: u64,
}

/// The freshness run's results. Every figure is of the measured window: ticks due inside it,
/// and for `achieved_rate`, `accepted` and `cpu_seconds`, what was answered (or spent) inside
/// it.
#[derive(Debug, Clone, Serialize)]
pub struct FreshnessResult {
    pub target_rate: f64,
    /// Accepted commands answered inside the window, per second of the window.
    pub achieved_rate: f64,
    /// Unmeasured ticks before the window.
    pub warmup_secs: f64,
    pub measured_secs: f64,
    /// Clients sharing the ticks.
    pub clients: usize,
    /// One accepted command in this many was read back through the query service.
    pub read_every: u64,
    /// Ticks due inside the window.
    pub ticks: u64,
    /// Ticks a client took more than `late_after_ms` after their intended time.
    pub late_ticks: u64,
    /// Of `late_ticks`, those the ticker itself released more than `late_after_ms` late: the
    /// load generator's timer was not scheduled in time (the CPU was busy), rather than every
    /// client being busy with a command.
    pub late_released_ticks: u64,
    /// Ticks never sent inside the window (backlog full when due, or no client free before
    /// the window closed).
    pub missed_ticks: u64,
    /// [`LATE_AFTER`], in ms.
    pub late_after_ms: f64,
    /// [`LATE_SHARE_ALLOWED`]: the verdict allows at most this share of late ticks.
    pub late_share_allowed: f64,
    /// Accepted commands, from the moment a client sent them to the response.
    pub command_service_time: LatencySummary,
    /// Accepted commands, from their intended send time to the response (includes waiting
    /// for a free client).
    pub command_response_time: LatencySummary,
    /// Command response → `GET …?min_position=` answered 200.
    pub response_to_visible: LatencySummary,
    /// Commands whose effect was not visible within the deadline, or whose read failed.
    pub not_visible: u64,
    /// Commands refused or failed.
    pub command_errors: u64,
    /// `recorded_at` (set at INSERT, before the commit) → entry seen by `XREAD BLOCK`.
    pub recorded_at_to_stream: LatencySummary,
    /// Sampled: command response → the first poll that saw both its event applied to the
    /// `order_summaries` row and that projection's checkpoint at or past its position.
    pub response_to_applied_and_checkpointed: LatencySummary,
    /// Probes not started because their queue was full.
    pub probes_dropped: u64,
    /// Probes that failed (a query error, or not applied within the deadline).
    pub probes_failed: u64,
    /// The query service's own breakdown over the window (consistency waits).
    pub query_breakdown: std::collections::BTreeMap<String, f64>,
    /// Commands accepted and answered inside the window.
    pub accepted: u64,
    /// CPU seconds by process over the window (see [`crate::cpu`]); empty unless the services
    /// were spawned by the tool.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub cpu_seconds: std::collections::BTreeMap<String, f64>,
}

impl FreshnessResult {
    /// Share of the window's ticks that were late (0 without ticks).
    pub fn late_share(&self) -> f64 {
        late_share(self.late_ticks, self.ticks)
    }

    /// Whether the run offered the rate it claims: see [`rate_held`].
    pub fn rate_held(&self) -> bool {
        rate_held(
            self.ticks,
            self.late_ticks,
            self.missed_ticks,
            self.command_errors,
        )
    }
}

/// `late` of `ticks`, as a share (0 without ticks).
pub fn late_share(late: u64, ticks: u64) -> f64 {
    if ticks == 0 {
        0.0
    } else {
        late as f64 / ticks as f64
    }
}

/// The rule a freshness run must pass for its figures to describe the rate it was asked for:
/// some ticks were due, no command was refused or failed, no tick was missed, and at most
/// [`LATE_SHARE_ALLOWED`] of the ticks were late.
pub fn rate_held(ticks: u64, late: u64, missed: u64, errors: u64) -> bool {
    ticks > 0 && errors == 0 && missed == 0 && late_share(late, ticks) <= LATE_SHARE_ALLOWED
}

/// What became of a tick, decided when a client takes it off the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// Sent within [`LATE_AFTER`] of its intended time.
    OnTime,
    /// Sent, but more than [`LATE_AFTER`] behind its intended time.
    Late,
    /// Not sent: the window had closed before a client was free, and the tick was already late.
    Missed,
}

/// Classifies a tick due at `intended` that a client took at `taken`, in a window ending at
/// `window_end`. A tick due just before the window's end and taken within [`LATE_AFTER`] of
/// its time is sent on time even if that is a moment past the end: the ticker's timer rounds
/// every deadline up to the next millisecond, so the last ticks of a window are always released
/// a fraction of a millisecond late, and calling them missed would fail every healthy run.
pub fn dispatch(intended: Instant, taken: Instant, window_end: Instant) -> Dispatch {
    let behind = taken.saturating_duration_since(intended);
    if taken >= window_end && behind > LATE_AFTER {
        Dispatch::Missed
    } else if behind > LATE_AFTER {
        Dispatch::Late
    } else {
        Dispatch::OnTime
    }
}

/// The intended time of tick `k` of a schedule starting at `start` with `period` between ticks.
pub fn intended_time(start: Instant, period: Duration, k: u64) -> Instant {
    start + Duration::from_secs_f64(period.as_secs_f64() * k as f64)
}

/// One scheduled command.
#[derive(Debug, Clone, Copy)]
struct Tick {
    /// When it was due.
    intended: Instant,
    /// When the ticker put it on the queue.
    released: Instant,
}

/// What one client saw of the measured window.
struct Tally {
    service_time: Latencies,
    response_time: Latencies,
    visible: Latencies,
    accepted: u64,
    late: u64,
    late_released: u64,
    missed: u64,
    not_visible: u64,
    errors: u64,
    probes_dropped: u64,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            service_time: Latencies::new()?,
            response_time: Latencies::new()?,
            visible: Latencies::new()?,
            accepted: 0,
            late: 0,
            late_released: 0,
            missed: 0,
            not_visible: 0,
            errors: 0,
            probes_dropped: 0,
        })
    }

    /// Counts a finished read-back.
    fn read_back(&mut self, done: ReadBack) {
        if !done.measured {
            return;
        }
        match done.visible_after {
            Some(after) => self.visible.record(after),
            None => self.not_visible += 1,
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.service_time.merge(&other.service_time);
        self.response_time.merge(&other.response_time);
        self.visible.merge(&other.visible);
        self.accepted += other.accepted;
        self.late += other.late;
        self.late_released += other.late_released;
        self.missed += other.missed;
        self.not_visible += other.not_visible;
        self.errors += other.errors;
        self.probes_dropped += other.probes_dropped;
    }
}

/// How one read-back ended.
struct ReadBack {
    /// Its command was one of the measured window's.
    measured: bool,
    /// From the command's response to the 200; `None` when it was not visible in time.
    visible_after: Option<Duration>,
}

/// A probe request: order, the version and position its command wrote, when it was answered.
type ProbeRequest = (uuid::Uuid, i64, i64, Instant);

/// Runs commands as `plan` says, following `stream` on Redis.
pub async fn run(
    api: &Api,
    redis_url: &str,
    stream: &str,
    plan: FreshnessPlan,
    probe_pool: Option<sqlx::PgPool>,
) -> anyhow::Result<FreshnessResult> {
    let FreshnessPlan {
        rate: target_rate,
        warmup,
        measure,
        clients: clients_count,
        read_every,
    } = plan;
    let read_every = read_every.max(1);
    let clients_count = clients_count.max(1);
    let start = Instant::now() + STREAM_READER_LEAD;
    let measure_from = start + warmup;
    let stop = measure_from + measure;
    let relay = tokio::spawn(follow_stream(
        redis_url.to_owned(),
        stream.to_owned(),
        measure_from,
        stop,
    ));

    let (ticks, receiver) = mpsc::channel::<Tick>(TICK_BACKLOG);
    let receiver = Arc::new(Mutex::new(receiver));
    let (probe_sender, probe_receiver) = mpsc::channel::<ProbeRequest>(TICK_BACKLOG);
    let probing = probe_pool.is_some();
    let read_backs = Arc::new(Semaphore::new(READ_BACKS_IN_FLIGHT));
    let mut clients = Vec::new();
    for _ in 0..clients_count {
        let api = api.clone();
        let receiver = receiver.clone();
        let probe_sender = probe_sender.clone();
        let read_backs = read_backs.clone();
        let mut tally = Tally::new()?;
        clients.push(tokio::spawn(async move {
            let mut workload = Workload::new();
            let mut reading = JoinSet::new();
            // Every accepted command, warm-up included: picks which are read back and probed.
            let mut accepted_all = 0u64;
            loop {
                let tick = receiver.lock().await.recv().await;
                let Some(tick) = tick else {
                    break;
                };
                let taken = Instant::now();
                let measured = tick.intended >= measure_from;
                match dispatch(tick.intended, taken, stop) {
                    Dispatch::Missed => {
                        tally.missed += u64::from(measured);
                        continue;
                    }
                    Dispatch::Late => {
                        tally.late += u64::from(measured);
                        if tick.released.saturating_duration_since(tick.intended) > LATE_AFTER {
                            tally.late_released += u64::from(measured);
                        }
                    }
                    Dispatch::OnTime => {}
                }
                let command = workload.next_command();
                let accepted = match api.send(&command).await {
                    Outcome::Accepted(accepted) => accepted,
                    _ => {
                        tally.errors += u64::from(measured);
                        workload.abandon();
                        continue;
                    }
                };
                let answered = Instant::now();
                accepted_all += 1;
                if answered >= measure_from && answered < stop {
                    tally.accepted += 1;
                }
                if measured {
                    tally.service_time.record(answered - taken);
                    tally.response_time.record(answered - tick.intended);
                    if probing
                        && accepted_all.is_multiple_of(PROBE_EVERY)
                        && probe_sender
                            .try_send((
                                command.order_id,
                                accepted.version,
                                accepted.position,
                                answered,
                            ))
                            .is_err()
                    {
                        tally.probes_dropped += 1;
                    }
                }
                while let Some(done) = reading.try_join_next() {
                    tally.read_back(done?);
                }
                // Warm-up commands are read back too, so the warm-up is the same load.
                if !accepted_all.is_multiple_of(read_every) {
                    continue;
                }
                let permit = read_backs.clone().acquire_owned().await?;
                let api = api.clone();
                reading.spawn(async move {
                    let seen = visible(&api, command.order_id, accepted.position).await;
                    drop(permit);
                    ReadBack {
                        measured,
                        visible_after: seen.then(|| answered.elapsed()),
                    }
                });
            }
            while let Some(done) = reading.join_next().await {
                tally.read_back(done?);
            }
            anyhow::Ok(tally)
        }));
    }
    drop(probe_sender);
    let probes = probe_pool.map(|pool| tokio::spawn(run_probes(pool, probe_receiver)));

    // The query service's breakdown and the CPU over exactly the window.
    let query_scraper = {
        let http = api.http().clone();
        let base = api.query_url().to_owned();
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let before = crate::metrics::scrape(&http, &base).await.ok()?;
            tokio::time::sleep_until(stop.into()).await;
            let after = crate::metrics::scrape(&http, &base).await.ok()?;
            Some(crate::metrics::breakdown(
                &before,
                &after,
                &crate::metrics::QUERY_HISTOGRAMS,
                &[],
            ))
        })
    };
    let cpu_reader = api.cpu_probe().map(|probe| {
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let before = probe.snapshot().await;
            tokio::time::sleep_until(stop.into()).await;
            crate::cpu::usage(&before, &probe.snapshot().await)
        })
    });

    // The ticker: tick k is due at start + k × period, however late the previous one left,
    // so a stall shows as late or missed ticks rather than as a slower schedule.
    let period = Duration::from_secs_f64(1.0 / target_rate.max(0.1));
    let (mut due_in_window, mut backlog_full) = (0u64, 0u64);
    for k in 0u64.. {
        let intended = intended_time(start, period, k);
        if intended >= stop {
            break;
        }
        tokio::time::sleep_until(intended.into()).await;
        let measured = intended >= measure_from;
        due_in_window += u64::from(measured);
        let tick = Tick {
            intended,
            released: Instant::now(),
        };
        if ticks.try_send(tick).is_err() {
            backlog_full += u64::from(measured);
        }
    }
    // Ticks still queued are taken after the window closes and counted as missed.
    drop(ticks);

    let mut tally = Tally::new()?;
    for client in clients {
        tally.merge(&client.await??);
    }
    let recorded_at_to_stream = relay.await??;
    let (probed, probes_failed) = match probes {
        Some(probes) => probes.await??,
        None => (Latencies::new()?, 0),
    };
    let cpu_seconds = match cpu_reader {
        Some(reader) => reader.await.unwrap_or_default(),
        None => Default::default(),
    };
    let result = FreshnessResult {
        target_rate,
        achieved_rate: rate(tally.accepted, measure),
        warmup_secs: warmup.as_secs_f64(),
        measured_secs: measure.as_secs_f64(),
        clients: clients_count,
        read_every,
        ticks: due_in_window,
        late_ticks: tally.late,
        late_released_ticks: tally.late_released,
        missed_ticks: backlog_full + tally.missed,
        late_after_ms: LATE_AFTER.as_secs_f64() * 1000.0,
        late_share_allowed: LATE_SHARE_ALLOWED,
        command_service_time: tally.service_time.summary(),
        command_response_time: tally.response_time.summary(),
        response_to_visible: tally.visible.summary(),
        not_visible: tally.not_visible,
        command_errors: tally.errors,
        recorded_at_to_stream: recorded_at_to_stream.summary(),
        response_to_applied_and_checkpointed: probed.summary(),
        probes_dropped: tally.probes_dropped,
        probes_failed,
        query_breakdown: query_scraper.await.ok().flatten().unwrap_or_default(),
        accepted: tally.accepted,
        cpu_seconds,
    };
    eprintln!(
        "freshness: {:.0}/s: visible p50 {:.1} ms p99 {:.1} ms; response time p99 {:.1} ms; \
         {} late ({} released late), {} missed of {} ticks; recorded_at to stream p50 {:.1} ms p99 {:.1} ms",
        result.achieved_rate,
        result.response_to_visible.p50_ms,
        result.response_to_visible.p99_ms,
        result.command_response_time.p99_ms,
        result.late_ticks,
        result.late_released_ticks,
        result.missed_ticks,
        result.ticks,
        result.recorded_at_to_stream.p50_ms,
        result.recorded_at_to_stream.p99_ms
    );
    Ok(result)
}

/// Runs one probe per request (concurrently) until the senders are gone; returns the times
/// and how many probes failed.
async fn run_probes(
    pool: sqlx::PgPool,
    mut requests: mpsc::Receiver<ProbeRequest>,
) -> anyhow::Result<(Latencies, u64)> {
    let mut series = Latencies::new()?;
    let mut running = tokio::task::JoinSet::new();
    while let Some((order_id, version, position, answered)) = requests.recv().await {
        let pool = pool.clone();
        running.spawn(async move { probe(&pool, order_id, version, position, answered).await });
    }
    let mut failed = 0;
    while let Some(joined) = running.join_next().await {
        match joined {
            Ok(Ok(latency)) => series.record(latency),
            _ => failed += 1,
        }
    }
    Ok((series, failed))
}

/// Reads the order at `position` until it answers 200 (a 503 means the bounded wait ran out,
/// a 404 that the order is not there yet: both are retried until [`VISIBLE_DEADLINE`]).
async fn visible(api: &Api, order_id: uuid::Uuid, position: i64) -> bool {
    let deadline = Instant::now() + VISIBLE_DEADLINE;
    while Instant::now() < deadline {
        match api.read_at_least(order_id, position).await {
            Ok(200) => return true,
            Ok(503 | 404) => tokio::time::sleep(Duration::from_millis(2)).await,
            Ok(_) | Err(_) => return false,
        }
    }
    false
}

/// Polls the database, one query every [`PROBE_POLL`] reading both, until the order's row
/// reached `version` and the projection's checkpoint reached `position`; returns the time
/// since `answered` of the first poll that saw both.
async fn probe(
    pool: &sqlx::PgPool,
    order_id: uuid::Uuid,
    version: i64,
    position: i64,
    answered: Instant,
) -> anyhow::Result<Duration> {
    let deadline = answered + VISIBLE_DEADLINE;
    while Instant::now() < deadline {
        let (row_version, checkpoint_position): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT version FROM order_summaries WHERE order_id = $1), \
                    (SELECT position FROM projection_checkpoints WHERE projection = $2)",
        )
        .bind(order_id)
        .bind(PROBED_PROJECTION)
        .fetch_one(pool)
        .await
        .context("probe the read model")?;
        if row_version.is_some_and(|v| v >= version)
            && checkpoint_position.is_some_and(|p| p >= position)
        {
            return Ok(answered.elapsed());
        }
        tokio::time::sleep(PROBE_POLL).await;
    }
    anyhow::bail!("not applied within the deadline")
}

/// Follows `stream` until `stop`, measuring `now - recorded_at` of every new entry seen from
/// `measure_from` on.
async fn follow_stream(
    redis_url: String,
    stream: String,
    measure_from: Instant,
    stop: Instant,
) -> anyhow::Result<Latencies> {
    let client = crate::redis_client::redis_client(&redis_url)?;
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(
        Duration::from_millis(XREAD_BLOCK_MS) + Duration::from_secs(5),
    ));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("connect to Redis for XREAD")?;
    let mut latencies = Latencies::new()?;
    let mut last_id = "$".to_owned();
    while Instant::now() < stop {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(XREAD_BLOCK_MS)
            .arg("COUNT")
            .arg(1_000)
            .arg("STREAMS")
            .arg(&stream)
            .arg(&last_id)
            .query_async(&mut conn)
            .await
            .context("XREAD the event stream")?;
        let seen = chrono::Utc::now();
        let measured = Instant::now() >= measure_from;
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                if measured
                    && let Some(recorded_at) = entry
                        .get::<String>("recorded_at")
                        .and_then(|at| chrono::DateTime::parse_from_rfc3339(&at).ok())
                {
                    let lag = seen.signed_duration_since(recorded_at.with_timezone(&chrono::Utc));
                    latencies.record(lag.to_std().unwrap_or(Duration::ZERO));
                }
                last_id = entry.id;
            }
        }
    }
    Ok(latencies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_taken_within_the_allowance_is_on_time_and_one_taken_after_it_is_late() {
        let due = Instant::now();
        let end = due + Duration::from_secs(10);
        assert_eq!(dispatch(due, due, end), Dispatch::OnTime);
        assert_eq!(dispatch(due, due + LATE_AFTER, end), Dispatch::OnTime);
        assert_eq!(
            dispatch(due, due + LATE_AFTER + Duration::from_micros(1), end),
            Dispatch::Late
        );
        assert_eq!(
            dispatch(due, due + Duration::from_millis(215), end),
            Dispatch::Late,
            "a stall the old 1,024-tick backlog absorbed at 4,768/s is late"
        );
    }

    #[test]
    fn a_tick_taken_after_the_window_closed_is_missed_only_once_it_is_late() {
        let due = Instant::now();
        let end = due + Duration::from_millis(1);
        // Released a moment past the end by the timer's rounding: sent, on time.
        assert_eq!(dispatch(due, end, end), Dispatch::OnTime);
        assert_eq!(dispatch(due, due + LATE_AFTER, end), Dispatch::OnTime);
        assert_eq!(
            dispatch(due, due + LATE_AFTER + Duration::from_micros(1), end),
            Dispatch::Missed
        );
        assert_eq!(
            dispatch(due, end + Duration::from_secs(1), end),
            Dispatch::Missed
        );
    }

    #[test]
    fn a_taken_time_before_the_intended_time_is_on_time() {
        let due = Instant::now() + Duration::from_millis(5);
        let end = due + Duration::from_secs(1);
        assert_eq!(
            dispatch(due, due - Duration::from_millis(1), end),
            Dispatch::OnTime
        );
    }

    #[test]
    fn ticks_are_due_at_fixed_offsets_from_the_start_not_from_each_other() {
        let start = Instant::now();
        let period = Duration::from_micros(250);
        assert_eq!(intended_time(start, period, 0), start);
        assert_eq!(
            intended_time(start, period, 4_000),
            start + Duration::from_secs(1)
        );
    }

    #[test]
    fn the_rate_is_held_only_without_errors_or_missed_ticks_and_with_at_most_one_percent_late() {
        assert!(rate_held(10_000, 0, 0, 0));
        assert!(rate_held(10_000, 100, 0, 0), "exactly 1% late is allowed");
        assert!(!rate_held(10_000, 101, 0, 0), "more than 1% late is not");
        assert!(!rate_held(10_000, 0, 1, 0), "one missed tick fails");
        assert!(!rate_held(10_000, 0, 0, 1), "one command error fails");
        assert!(!rate_held(0, 0, 0, 0), "a run without ticks held nothing");
    }

    #[test]
    fn the_late_share_of_no_ticks_is_zero() {
        assert_eq!(late_share(0, 0), 0.0);
        assert_eq!(late_share(25, 100), 0.25);
    }
}
