//! `catchup`: how fast projectors work off a backlog. A backlog of complete order lifecycles
//! is generated once straight into a scratch store; for each instance count, a fresh copy of
//! that database gets its own Redis stream holding the whole backlog (published with
//! `bus::Publisher`, exactly what the relay does), then N projector processes start and the
//! run ends when every projection's checkpoint (`projection_checkpoints.position`, the
//! low-water mark) reaches the head.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sqlx::PgPool;

use crate::generate;
use crate::scratch::{Scratch, TOOL_POOL_SIZE};
use crate::services::{Launcher, Service};
use crate::stats::rate;

/// Events read from the store and published to Redis per round trip.
const PUBLISH_PAGE: i64 = 5_000;

/// Longest a catch-up may take before the run gives up on it.
pub const CATCHUP_DEADLINE: Duration = Duration::from_secs(900);

/// How often checkpoints are polled.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// One instance count's catch-up.
#[derive(Debug, Clone, Serialize)]
pub struct CatchupRun {
    pub instances: usize,
    pub events: i64,
    /// From starting the projector processes until every checkpoint reached the head.
    pub elapsed_secs: f64,
    pub events_per_sec: f64,
    /// Rate of publishing the backlog to Redis (not part of the catch-up time).
    pub publish_events_per_sec: f64,
    /// Whether every checkpoint reached the head within the deadline.
    pub completed: bool,
}

/// The catch-up results.
#[derive(Debug, Clone, Serialize)]
pub struct CatchupResult {
    pub backlog_events: i64,
    pub generate_events_per_sec: f64,
    pub runs: Vec<CatchupRun>,
}

/// Runs the catch-up for each instance count.
pub async fn run(
    scratch: &Scratch,
    launcher: &Launcher,
    redis_url: &str,
    events: u64,
    instances: &[usize],
    projections: &[String],
) -> anyhow::Result<CatchupResult> {
    let pool = scratch.migrated_pool("backlog", TOOL_POOL_SIZE).await?;
    let generated = generate::fill_lifecycles(&pool, events).await?;
    let head = store::head_position(&pool)
        .await
        .context("read the backlog head")?;
    pool.close().await;
    eprintln!(
        "catchup: generated {head} events at {:.0} events/s",
        rate(generated.events, generated.elapsed)
    );
    let mut runs = Vec::new();
    for &count in instances {
        let purpose = format!("catchup{count}");
        let database_url = scratch.copy_database("backlog", &purpose).await?;
        let stream = scratch.stream_key(&purpose);
        let pool = scratch.pool(&purpose, 4).await?;
        let published = Instant::now();
        publish_all(&pool, redis_url, &stream, head).await?;
        let publish_rate = rate(head as u64, published.elapsed());

        let started = Instant::now();
        let mut projectors = Vec::new();
        for i in 0..count {
            let env = [("PROJECTOR_CONSUMER_NAME", format!("bench-{i}"))];
            match launcher
                .start(Service::Projector, &purpose, &database_url, &stream, &env)
                .await
            {
                Ok(running) => projectors.push(running),
                Err(err) => {
                    for running in projectors {
                        launcher.stop(running).await?;
                    }
                    return Err(err);
                }
            }
        }
        let completed = wait_for_head(&pool, projections, head, started + CATCHUP_DEADLINE).await?;
        let elapsed = started.elapsed();
        for running in projectors {
            launcher.stop(running).await?;
        }
        pool.close().await;
        let run = CatchupRun {
            instances: count,
            events: head,
            elapsed_secs: elapsed.as_secs_f64(),
            events_per_sec: rate(head as u64, elapsed),
            publish_events_per_sec: publish_rate,
            completed,
        };
        eprintln!(
            "catchup: {count} projector(s): {:.0} events/s ({:.1} s, completed: {completed})",
            run.events_per_sec, run.elapsed_secs
        );
        runs.push(run);
        scratch.delete_stream(&stream).await?;
        scratch.drop_database(&purpose).await?;
    }
    scratch.drop_database("backlog").await?;
    Ok(CatchupResult {
        backlog_events: head,
        generate_events_per_sec: rate(generated.events, generated.elapsed),
        runs,
    })
}

/// Publishes positions 1..=head to `stream`, in order, as the relay would.
pub async fn publish_all(
    pool: &PgPool,
    redis_url: &str,
    stream: &str,
    head: i64,
) -> anyhow::Result<()> {
    let client = crate::redis_client::redis_client(redis_url)?;
    let conn = bus::connection::connect(&client)
        .await
        .context("connect to Redis")?;
    let cap = bus::publish::DEFAULT_HARD_CAP.max(head as usize * 2);
    let publisher = bus::Publisher::new(conn, bus::StreamKeys::new(stream), cap);
    let mut after = 0;
    while after < head {
        let page = store::read_all(pool, after, PUBLISH_PAGE)
            .await
            .context("read the backlog")?;
        let Some(last) = page.last() else { break };
        after = last.global_position;
        publisher
            .publish(&page)
            .await
            .context("publish the backlog")?;
    }
    Ok(())
}

/// Polls the checkpoints of `projections` until all are at `head` (true) or `deadline` passes.
pub async fn wait_for_head(
    pool: &PgPool,
    projections: &[String],
    head: i64,
    deadline: Instant,
) -> anyhow::Result<bool> {
    loop {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT projection, position FROM projection_checkpoints")
                .fetch_all(pool)
                .await
                .context("read projection checkpoints")?;
        let done = projections.iter().all(|name| {
            rows.iter()
                .any(|(projection, position)| projection == name && *position >= head)
        });
        if done {
            return Ok(true);
        }
        if Instant::now() > deadline {
            eprintln!("catchup: deadline passed with checkpoints {rows:?} (head {head})");
            return Ok(false);
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
