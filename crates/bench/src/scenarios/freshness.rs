//! `freshness`: end-to-end freshness at a steady rate below saturation, and the relay's
//! commit-to-stream time.
//!
//! - An open-loop ticker releases commands at a fixed rate to a pool of lifecycle clients.
//!   Right after every `read_every`-th accepted command of each client, the client asks the
//!   query service for the order with `?min_position=<position>` (which waits server-side, so
//!   no polling) and measures from the command's response to the 200. Reading back only a
//!   sample keeps the run what it claims to be, a command rate: reading back every command
//!   adds a read-your-writes request per command, as much work again on the same machine
//!   (`--freshness-read-every 1` measures that mixed load).
//! - Meanwhile a reader follows the Redis stream with `XREAD BLOCK` and, for every entry it
//!   sees, measures the time since the event's `recorded_at` (the insert time in PostgreSQL):
//!   commit plus relay plus XADD, as seen by a consumer.
//! - With a database pool (spawned services), one command in [`PROBE_EVERY`] is also followed
//!   straight in PostgreSQL, polling every [`PROBE_POLL`]: when its event was applied to
//!   `order_summaries`, and when that projection's checkpoint passed its position. Together
//!   with the stream time this splits the freshness into relay, projector apply, checkpoint
//!   sweep, and query-service wake-up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::{Mutex, mpsc};

use crate::api::{Api, Outcome, Workload};
use crate::stats::{Latencies, LatencySummary, rate};

/// Ticks that may wait for a free client before the run counts them as missed.
const TICK_BACKLOG: usize = 1_024;

/// How long one freshness measurement may retry a 503 (wait timed out) or 404 before it counts
/// as not visible.
const VISIBLE_DEADLINE: Duration = Duration::from_secs(10);

/// One accepted command in this many is followed stage by stage in the database.
pub const PROBE_EVERY: u64 = 50;

/// Poll interval of a stage probe (it adds a little database load; 1 in [`PROBE_EVERY`]).
const PROBE_POLL: Duration = Duration::from_millis(5);

/// The projection whose row and checkpoint the probes follow (the one `GET /orders/{id}` reads).
const PROBED_PROJECTION: &str = "order_summaries";

/// Block time of each `XREAD` on the stream.
const XREAD_BLOCK_MS: u64 = 1_000;

/// How a freshness run is driven.
#[derive(Debug, Clone, Copy)]
pub struct FreshnessPlan {
    /// Commands per second.
    pub rate: f64,
    /// Length of the run.
    pub measure: Duration,
    /// Clients sharing the ticks.
    pub clients: usize,
    /// Each client reads back one accepted command in this many.
    pub read_every: u64,
}

/// The freshness run's results.
#[derive(Debug, Clone, Serialize)]
pub struct FreshnessResult {
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub measured_secs: f64,
    /// Clients sharing the ticks.
    pub clients: usize,
    /// One accepted command in this many was read back through the query service.
    pub read_every: u64,
    /// Ticks that found every client busy and the backlog full.
    pub missed_ticks: u64,
    pub command_latency: LatencySummary,
    /// Command response → `GET …?min_position=` answered 200.
    pub response_to_visible: LatencySummary,
    /// Commands whose effect was not visible within the deadline, or whose read failed.
    pub not_visible: u64,
    pub command_errors: u64,
    /// `recorded_at` → entry seen by `XREAD BLOCK` on the stream.
    pub commit_to_stream: LatencySummary,
    /// Sampled: command response → its event applied to the `order_summaries` row.
    pub response_to_applied: LatencySummary,
    /// Sampled: command response → `order_summaries` checkpoint ≥ its position.
    pub response_to_checkpoint: LatencySummary,
    /// The query service's own breakdown over the run (consistency waits).
    pub query_breakdown: std::collections::BTreeMap<String, f64>,
    /// Commands accepted over the run.
    pub accepted: u64,
    /// CPU seconds by process from the first tick until every client finished (see
    /// [`crate::cpu`]); empty unless the services were spawned by the tool.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub cpu_seconds: std::collections::BTreeMap<String, f64>,
}

#[derive(Default)]
struct Tally {
    commands: Option<Latencies>,
    visible: Option<Latencies>,
    accepted: u64,
    not_visible: u64,
    errors: u64,
}

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
        measure,
        clients: clients_count,
        read_every,
    } = plan;
    let read_every = read_every.max(1);
    let probes = Arc::new(std::sync::Mutex::new((
        Latencies::new()?,
        Latencies::new()?,
    )));
    let mut probe_tasks = tokio::task::JoinSet::new();
    let stop = Instant::now() + measure;
    let relay = tokio::spawn(follow_stream(redis_url.to_owned(), stream.to_owned(), stop));
    // Give the stream reader time to issue its first XREAD, so it sees the first entries.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (ticks, receiver) = mpsc::channel::<()>(TICK_BACKLOG);
    let receiver = Arc::new(Mutex::new(receiver));
    let mut clients = Vec::new();
    let (probe_sender, mut probe_receiver) =
        mpsc::channel::<(uuid::Uuid, i64, i64, Instant)>(TICK_BACKLOG);
    for _ in 0..clients_count.max(1) {
        let api = api.clone();
        let receiver = receiver.clone();
        let probe_sender = probe_sender.clone();
        let probing = probe_pool.is_some();
        clients.push(tokio::spawn(async move {
            let mut tally = Tally {
                commands: Some(Latencies::new()?),
                visible: Some(Latencies::new()?),
                ..Tally::default()
            };
            let mut workload = Workload::new();
            loop {
                let tick = receiver.lock().await.recv().await;
                if tick.is_none() {
                    break;
                }
                let command = workload.next_command();
                let sent = Instant::now();
                let accepted = match api.send(&command).await {
                    Outcome::Accepted(accepted) => accepted,
                    _ => {
                        tally.errors += 1;
                        workload.abandon();
                        continue;
                    }
                };
                let answered = Instant::now();
                tally.accepted += 1;
                if probing && tally.accepted.is_multiple_of(PROBE_EVERY) {
                    let _ = probe_sender.try_send((
                        command.order_id,
                        accepted.version,
                        accepted.position,
                        answered,
                    ));
                }
                if let Some(series) = tally.commands.as_mut() {
                    series.record(answered - sent);
                }
                if !tally.accepted.is_multiple_of(read_every) {
                    continue;
                }
                if visible(&api, command.order_id, accepted.position).await {
                    if let Some(series) = tally.visible.as_mut() {
                        series.record(answered.elapsed());
                    }
                } else {
                    tally.not_visible += 1;
                }
            }
            anyhow::Ok(tally)
        }));
    }

    let query_before = crate::metrics::scrape(api.http(), api.query_url())
        .await
        .ok();
    drop(probe_sender);
    if let Some(pool) = probe_pool.clone() {
        let probes = probes.clone();
        probe_tasks.spawn(async move {
            let mut running = tokio::task::JoinSet::new();
            while let Some((order_id, version, position, answered)) = probe_receiver.recv().await {
                let pool = pool.clone();
                let probes = probes.clone();
                running.spawn(async move {
                    if let Ok((applied, checkpoint)) =
                        probe(&pool, order_id, version, position, answered).await
                        && let Ok(mut series) = probes.lock()
                    {
                        series.0.record(applied);
                        series.1.record(checkpoint);
                    }
                });
            }
            while running.join_next().await.is_some() {}
        });
    }
    let cpu_probe = api.cpu_probe();
    let cpu_before = match &cpu_probe {
        Some(probe) => Some(probe.snapshot().await),
        None => None,
    };
    let started = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / target_rate.max(0.1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut missed = 0;
    while Instant::now() < stop {
        interval.tick().await;
        if ticks.try_send(()).is_err() {
            missed += 1;
        }
    }
    drop(ticks);
    let elapsed = started.elapsed();

    let mut commands = Latencies::new()?;
    let mut visible_series = Latencies::new()?;
    let (mut accepted, mut not_visible, mut errors) = (0, 0, 0);
    for client in clients {
        let tally = client.await??;
        if let Some(series) = &tally.commands {
            commands.merge(series);
        }
        if let Some(series) = &tally.visible {
            visible_series.merge(series);
        }
        accepted += tally.accepted;
        not_visible += tally.not_visible;
        errors += tally.errors;
    }
    let commit_to_stream = relay.await??;
    while probe_tasks.join_next().await.is_some() {}
    let cpu_seconds = match (&cpu_probe, cpu_before) {
        (Some(probe), Some(before)) => crate::cpu::usage(&before, &probe.snapshot().await),
        _ => Default::default(),
    };
    let (response_to_applied, response_to_checkpoint) = probes
        .lock()
        .map(|series| (series.0.summary(), series.1.summary()))
        .unwrap_or_default();
    let query_after = crate::metrics::scrape(api.http(), api.query_url())
        .await
        .ok();
    let query_breakdown = match (query_before, query_after) {
        (Some(before), Some(after)) => {
            crate::metrics::breakdown(&before, &after, &crate::metrics::QUERY_HISTOGRAMS, &[])
        }
        _ => Default::default(),
    };
    let result = FreshnessResult {
        target_rate,
        clients: clients_count.max(1),
        read_every,
        achieved_rate: rate(accepted, elapsed),
        measured_secs: elapsed.as_secs_f64(),
        missed_ticks: missed,
        command_latency: commands.summary(),
        response_to_visible: visible_series.summary(),
        not_visible,
        command_errors: errors,
        commit_to_stream: commit_to_stream.summary(),
        response_to_applied,
        response_to_checkpoint,
        query_breakdown,
        accepted,
        cpu_seconds,
    };
    eprintln!(
        "freshness: {:.0}/s: visible p50 {:.1} ms p99 {:.1} ms; commit-to-stream p50 {:.1} ms p99 {:.1} ms",
        result.achieved_rate,
        result.response_to_visible.p50_ms,
        result.response_to_visible.p99_ms,
        result.commit_to_stream.p50_ms,
        result.commit_to_stream.p99_ms
    );
    Ok(result)
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

/// Polls the database until the order's row reached `version` and the projection's checkpoint
/// reached `position`; returns both times since `answered`.
async fn probe(
    pool: &sqlx::PgPool,
    order_id: uuid::Uuid,
    version: i64,
    position: i64,
    answered: Instant,
) -> anyhow::Result<(Duration, Duration)> {
    let deadline = answered + VISIBLE_DEADLINE;
    let (mut applied, mut checkpoint) = (None, None);
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
        if applied.is_none() && row_version.is_some_and(|v| v >= version) {
            applied = Some(answered.elapsed());
        }
        if checkpoint.is_none() && checkpoint_position.is_some_and(|p| p >= position) {
            checkpoint = Some(answered.elapsed());
        }
        if let (Some(applied), Some(checkpoint)) = (applied, checkpoint) {
            return Ok((applied, checkpoint));
        }
        tokio::time::sleep(PROBE_POLL).await;
    }
    anyhow::bail!("not applied within the deadline")
}

/// Follows `stream` until `stop`, measuring `now - recorded_at` of every new entry.
async fn follow_stream(
    redis_url: String,
    stream: String,
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
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                if let Some(recorded_at) = entry
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
