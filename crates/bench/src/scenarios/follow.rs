//! `follow`: how fast a client reads the event log over HTTP from the query service, from the
//! first position to the head of a generated store: paging `GET /events` (1,000 a page), the
//! same with an `event_type` filter (only `OrderShipped`), and one `GET /events/stream`
//! (Server-Sent Events) response. Each reader counts what it received and must end exactly at
//! the head, so a figure is never that of a reader that skipped or stopped early.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::Serialize;

use crate::generate;
use crate::scratch::{Scratch, TOOL_POOL_SIZE};
use crate::services::{Launcher, Service};
use crate::stats::rate;

/// Events per page of the paging readers: the largest page `GET /events` gives.
const PAGE: usize = 1000;

/// The filter of the filtered reader: one event in about six of a generated lifecycle.
const FILTER: &str = "OrderShipped";

/// Longest one reader may take before the run gives up on it.
const READ_DEADLINE: Duration = Duration::from_secs(600);

/// One way of reading the log.
#[derive(Debug, Clone, Serialize)]
pub struct FollowRun {
    /// `GET /events`, `GET /events?event_type=OrderShipped` or `GET /events/stream`.
    pub reader: String,
    /// Positions read (the head).
    pub positions: i64,
    /// Events the reader received.
    pub events: u64,
    /// HTTP requests made.
    pub requests: u64,
    pub elapsed_secs: f64,
    /// Positions read per second (for the filtered reader, most of them are skipped server-side).
    pub positions_per_sec: f64,
}

/// The follow results.
#[derive(Debug, Clone, Serialize)]
pub struct FollowResult {
    pub log_events: i64,
    pub runs: Vec<FollowRun>,
}

/// Generates `events` events, starts a query service on them and times each reader.
pub async fn run(
    scratch: &Scratch,
    launcher: &Launcher,
    token: Option<String>,
    events: u64,
) -> anyhow::Result<FollowResult> {
    let purpose = "follow";
    let pool = scratch.migrated_pool(purpose, TOOL_POOL_SIZE).await?;
    generate::fill_lifecycles(&pool, events).await?;
    let head = store::head_position(&pool).await.context("read the head")?;
    let shipped: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = $1")
        .bind(FILTER)
        .fetch_one(&pool)
        .await
        .context("count the filtered events")?;
    pool.close().await;
    let stream = scratch.stream_key(purpose);
    let query = launcher
        .start(
            Service::QueryService,
            purpose,
            &scratch.database_url(purpose),
            &stream,
            &[],
        )
        .await?;
    let client = Reader {
        http: reqwest::Client::new(),
        base: query.url.clone(),
        token,
    };
    let outcome = async {
        let runs = vec![
            client.page(head, None, head).await?,
            client.page(head, Some(FILTER), shipped).await?,
            client.stream(head).await?,
        ];
        for run in &runs {
            eprintln!(
                "follow: {}: {} positions in {:.1} s: {:.0} positions/s",
                run.reader, run.positions, run.elapsed_secs, run.positions_per_sec
            );
        }
        anyhow::Ok(runs)
    }
    .await;
    launcher.stop(query).await?;
    scratch.drop_database(purpose).await?;
    Ok(FollowResult {
        log_events: head,
        runs: outcome?,
    })
}

/// An HTTP reader of one query service.
struct Reader {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Reader {
    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.get(format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Pages `GET /events` (with `event_type` when given) from 0 until `next_cursor` is null;
    /// it must end at `head` having received `expected` events.
    async fn page(
        &self,
        head: i64,
        event_type: Option<&str>,
        expected: i64,
    ) -> anyhow::Result<FollowRun> {
        let filter = event_type.map_or_else(String::new, |t| format!("&event_type={t}"));
        let started = Instant::now();
        let (mut after, mut events, mut requests) = (0_i64, 0_u64, 0_u64);
        loop {
            ensure!(
                started.elapsed() < READ_DEADLINE,
                "paging did not reach the head"
            );
            let page: serde_json::Value = self
                .get(&format!(
                    "/events?limit={PAGE}&after_position={after}{filter}"
                ))
                .send()
                .await
                .context("GET /events")?
                .error_for_status()
                .context("GET /events")?
                .json()
                .await
                .context("read a page")?;
            requests += 1;
            events += page["events"].as_array().map_or(0, |e| e.len() as u64);
            after = page["read_to"].as_i64().context("a page without read_to")?;
            if page["next_cursor"].is_null() {
                break;
            }
        }
        let elapsed = started.elapsed();
        ensure!(
            after == head,
            "paging ended at {after}, not at the head {head}"
        );
        ensure!(
            events == expected as u64,
            "paging received {events} events, not {expected}"
        );
        Ok(FollowRun {
            reader: format!(
                "GET /events{}",
                event_type.map_or_else(String::new, |t| format!("?event_type={t}"))
            ),
            positions: head,
            events,
            requests,
            elapsed_secs: elapsed.as_secs_f64(),
            positions_per_sec: rate(head as u64, elapsed),
        })
    }

    /// Reads one `GET /events/stream` response until the frame whose id is `head`; every
    /// position must arrive once, in order.
    async fn stream(&self, head: i64) -> anyhow::Result<FollowRun> {
        let started = Instant::now();
        let mut response = self
            .get("/events/stream")
            .send()
            .await
            .context("GET /events/stream")?
            .error_for_status()
            .context("GET /events/stream")?;
        let mut pending = Vec::new();
        let (mut last, mut events) = (0_i64, 0_u64);
        while last < head {
            let remaining = READ_DEADLINE.saturating_sub(started.elapsed());
            let Some(chunk) = tokio::time::timeout(remaining, response.chunk())
                .await
                .context("the stream did not reach the head")?
                .context("read the stream")?
            else {
                bail!("the stream ended at {last}, before the head {head}");
            };
            pending.extend_from_slice(&chunk);
            // Whole lines only; the rest waits for the next chunk.
            let Some(end) = pending.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            let lines: Vec<u8> = pending.drain(..=end).collect();
            for line in lines.split(|&b| b == b'\n') {
                if let Some(id) = line.strip_prefix(b"id: ") {
                    let id: i64 = std::str::from_utf8(id)
                        .ok()
                        .and_then(|id| id.parse().ok())
                        .context("a frame id that is not a position")?;
                    ensure!(id == last + 1, "the stream went from {last} to {id}");
                    last = id;
                    events += 1;
                }
            }
        }
        let elapsed = started.elapsed();
        Ok(FollowRun {
            reader: "GET /events/stream".into(),
            positions: head,
            events,
            requests: 1,
            elapsed_secs: elapsed.as_secs_f64(),
            positions_per_sec: rate(head as u64, elapsed),
        })
    }
}
