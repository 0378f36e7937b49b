//! `commands` and `hot`: command throughput and latency over HTTP.
//!
//! - The sweep: at each concurrency level, closed-loop clients walk many orders through their
//!   lifecycle (create, add items, place, pay, ship or cancel).
//! - Hot: several writers on one order, each adding its own SKU without `If-Match`, so every
//!   command races the others for the next version and the service's internal retry decides.

use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use super::closed_loop::{self, Driver, LoadResult};
use crate::api::{Api, Command, Outcome, Workload};

/// Units added per hot writer before it moves to a new SKU: stays below the aggregate's
/// 10,000-units-per-line limit.
const HOT_UNITS_PER_SKU: u64 = 5_000;

impl Driver for Workload {
    fn next_command(&mut self) -> Command {
        Workload::next_command(self)
    }

    fn outcome(&mut self, accepted: bool) {
        if !accepted {
            self.abandon();
        }
    }
}

/// Results of the concurrency sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepResult {
    pub levels: Vec<LoadResult>,
}

/// Runs the sweep over `levels` client counts.
pub async fn sweep(
    api: &Api,
    levels: &[usize],
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<SweepResult> {
    let mut results = Vec::new();
    for &clients in levels {
        let drivers: Vec<Workload> = (0..clients).map(|_| Workload::new()).collect();
        let result = closed_loop::run(api, drivers, warmup, measure).await?;
        eprintln!(
            "commands: {clients} clients: {:.0} commands/s, p99 {:.1} ms, {} errors",
            result.commands_per_sec,
            result.latency.p99_ms,
            result.errors.values().sum::<u64>()
        );
        results.push(result);
    }
    Ok(SweepResult { levels: results })
}

/// One writer of the hot order.
struct HotWriter {
    order_id: Uuid,
    writer: usize,
    added: u64,
}

impl Driver for HotWriter {
    fn next_command(&mut self) -> Command {
        let sku = format!("HOT-{}-{}", self.writer, self.added / HOT_UNITS_PER_SKU);
        Command::add_item(self.order_id, &sku, 1, 100)
    }

    fn outcome(&mut self, accepted: bool) {
        if accepted {
            self.added += 1;
        }
    }
}

/// Results of the hot-order run.
#[derive(Debug, Clone, Serialize)]
pub struct HotResult {
    pub order_id: Uuid,
    pub load: LoadResult,
}

/// Creates one order and runs `writers` concurrent writers on it.
pub async fn hot(
    api: &Api,
    writers: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<HotResult> {
    let order_id = Uuid::now_v7();
    match api.send(&Command::create(order_id, Uuid::new_v4())).await {
        Outcome::Accepted(_) => {}
        other => anyhow::bail!("create the hot order: {other:?}"),
    }
    let drivers: Vec<HotWriter> = (0..writers)
        .map(|writer| HotWriter {
            order_id,
            writer,
            added: 0,
        })
        .collect();
    let load = closed_loop::run(api, drivers, warmup, measure).await?;
    eprintln!(
        "hot: {writers} writers: {:.0} commands/s, p99 {:.1} ms, errors {:?}",
        load.commands_per_sec, load.latency.p99_ms, load.errors
    );
    Ok(HotResult { order_id, load })
}
