//! `long-stream`: what a long history costs a command. Long orders (at least 10,000 events by
//! default, see [`worst_case_length`]: 10,099 with snapshots every 100) and fresh orders
//! (2 events) are generated in the store; command-service is started fresh
//! (so its in-memory cache is cold) with snapshots on, then again on a fresh copy with
//! snapshots off. For each order the first command pays the full load (snapshot plus tail, or
//! the whole stream) and later ones are served warm; both are reported, long vs fresh. Each is
//! run twice more with `ORDER_CACHE_CAPACITY=1`: commands alternate between orders, so then
//! every command loads its order from the store (the cost the cache hides).
//!
//! The long orders end one event short of a multiple of the snapshot interval, so with
//! snapshots on, the first command replays the longest tail the service ever leaves after a
//! snapshot (interval − 1 events), not an empty one. Each order's first command is one sample,
//! so with about 30 orders a "p99" of those is their max; the report shows p50 and max.

use std::time::{Duration, Instant};

use serde::Serialize;
use uuid::Uuid;

use crate::api::{Api, Command, Outcome};
use crate::generate::{self, SeededOrder, TOGGLED_SKU};
use crate::scratch::{Scratch, TOOL_POOL_SIZE};
use crate::services::{Launcher, Service};
use crate::stats::{Latencies, LatencySummary};

/// Events of a "fresh" order: created and one item added.
const FRESH_EVENTS: i64 = 2;

/// One variant (snapshots on or off).
#[derive(Debug, Clone, Serialize)]
pub struct LongStreamVariant {
    pub snapshots: bool,
    /// SNAPSHOT_EVERY given to command-service.
    pub snapshot_every: i64,
    /// ORDER_CACHE_CAPACITY given to command-service (`None`: its default).
    pub cache_capacity: Option<u64>,
    /// First command on each order after a restart (cold: loaded from the store). One sample
    /// per order: with few orders, read the max rather than the p99.
    pub cold_long: LatencySummary,
    pub cold_fresh: LatencySummary,
    /// Later commands (the service may serve these from its cache).
    pub warm_long: LatencySummary,
    pub warm_fresh: LatencySummary,
    pub errors: u64,
}

/// Both variants.
#[derive(Debug, Clone, Serialize)]
pub struct LongStreamResult {
    /// Events of each long order, as seeded.
    pub long_events: i64,
    /// Events after the long orders' last snapshot: what the first command replays with
    /// snapshots on.
    pub events_after_snapshot: i64,
    pub orders: usize,
    pub variants: Vec<LongStreamVariant>,
}

/// Settings of the scenario.
#[derive(Debug, Clone, Copy)]
pub struct LongStreamSizing {
    /// Fewest events of a long order (rounded up by [`worst_case_length`]).
    pub long_events: i64,
    pub orders: usize,
    pub warm_commands: usize,
    pub snapshot_every: i64,
    pub snapshot_off: i64,
}

/// The length of a long order: the smallest at or above `at_least` that ends one event short
/// of a multiple of `snapshot_every`, so the last snapshot leaves the longest tail the service
/// ever replays (`snapshot_every - 1` events). An interval below 2 leaves no tail to lengthen,
/// and one longer than the order takes no snapshot of it: the whole order is its tail.
pub fn worst_case_length(at_least: i64, snapshot_every: i64) -> i64 {
    if snapshot_every < 2 || snapshot_every > at_least {
        return at_least;
    }
    let short_of_next = snapshot_every - 1 - at_least.rem_euclid(snapshot_every);
    at_least + short_of_next
}

/// An order under test and whether the toggled SKU is in it now.
struct Target {
    order_id: Uuid,
    present: bool,
}

impl Target {
    fn of(seed: &SeededOrder) -> Self {
        let present = seed.state.order.as_ref().is_some_and(|order| {
            order
                .items
                .iter()
                .any(|line| line.sku.as_str() == TOGGLED_SKU)
        });
        Self {
            order_id: seed.order_id,
            present,
        }
    }

    /// Sends the next toggle; returns the latency if accepted.
    async fn toggle(&mut self, api: &Api) -> Option<Duration> {
        let command = if self.present {
            Command::remove_item(self.order_id, TOGGLED_SKU)
        } else {
            Command::add_item(self.order_id, TOGGLED_SKU, 1, 100)
        };
        let sent = Instant::now();
        match api.send(&command).await {
            Outcome::Accepted(_) => {
                self.present = !self.present;
                Some(sent.elapsed())
            }
            other => {
                tracing::warn!(?other, "long-stream command refused");
                None
            }
        }
    }
}

/// Runs both variants.
pub async fn run(
    scratch: &Scratch,
    launcher: &Launcher,
    token: Option<String>,
    sizing: LongStreamSizing,
) -> anyhow::Result<LongStreamResult> {
    let pool = scratch.migrated_pool("long", TOOL_POOL_SIZE).await?;
    let long_events = worst_case_length(sizing.long_events, sizing.snapshot_every);
    let mut long = Vec::new();
    let mut fresh = Vec::new();
    for _ in 0..sizing.orders {
        long.push(generate::seed_long_order(&pool, long_events, sizing.snapshot_every).await?);
        fresh.push(generate::seed_long_order(&pool, FRESH_EVENTS, sizing.snapshot_every).await?);
    }
    pool.close().await;
    eprintln!(
        "long-stream: seeded {} orders of {long_events} events",
        sizing.orders
    );

    let mut variants = Vec::new();
    for (snapshots, cache_capacity) in [
        (true, None),
        (true, Some(1)),
        (false, None),
        (false, Some(1)),
    ] {
        let purpose = format!(
            "long_{}_{}",
            if snapshots { "on" } else { "off" },
            cache_capacity.map_or("cache".to_owned(), |c| format!("cache{c}"))
        );
        let purpose = purpose.as_str();
        let database_url = scratch.copy_database("long", purpose).await?;
        let every = if snapshots {
            sizing.snapshot_every
        } else {
            sizing.snapshot_off
        };
        if snapshots {
            let pool = scratch.pool(purpose, 2).await?;
            for order in long.iter().chain(fresh.iter()) {
                generate::save_seed_snapshot(&pool, order).await?;
            }
            pool.close().await;
        }
        let stream = scratch.stream_key(purpose);
        let mut env = vec![("SNAPSHOT_EVERY", every.to_string())];
        if let Some(capacity) = cache_capacity {
            env.push(("ORDER_CACHE_CAPACITY", capacity.to_string()));
        }
        let service = launcher
            .start(
                Service::CommandService,
                purpose,
                &database_url,
                &stream,
                &env,
            )
            .await?;
        let api = Api::new(&service.url, &service.url, token.clone())?;
        let measured = measure(&api, &long, &fresh, sizing.warm_commands).await;
        launcher.stop(service).await?;
        let mut variant = measured?;
        variant.snapshots = snapshots;
        variant.snapshot_every = every;
        variant.cache_capacity = cache_capacity;
        eprintln!(
            "long-stream: snapshots {snapshots}, cache {cache_capacity:?}: cold long p50 {:.1} ms vs fresh {:.1} ms; warm long p50 {:.1} ms vs fresh {:.1} ms",
            variant.cold_long.p50_ms,
            variant.cold_fresh.p50_ms,
            variant.warm_long.p50_ms,
            variant.warm_fresh.p50_ms
        );
        variants.push(variant);
        scratch.delete_stream(&stream).await?;
        scratch.drop_database(purpose).await?;
    }
    scratch.drop_database("long").await?;
    let events_after_snapshot = match sizing.snapshot_every {
        every if every > 0 => long_events % every,
        _ => long_events,
    };
    Ok(LongStreamResult {
        long_events,
        events_after_snapshot,
        orders: sizing.orders,
        variants,
    })
}

async fn measure(
    api: &Api,
    long: &[SeededOrder],
    fresh: &[SeededOrder],
    warm_commands: usize,
) -> anyhow::Result<LongStreamVariant> {
    // Warm the service's connections on an unrelated order first, so the first measured
    // command does not also pay for opening database connections.
    for _ in 0..5 {
        let _ = api
            .send(&Command::create(Uuid::now_v7(), Uuid::new_v4()))
            .await;
    }
    let mut long: Vec<Target> = long.iter().map(Target::of).collect();
    let mut fresh: Vec<Target> = fresh.iter().map(Target::of).collect();
    let (mut cold_long, mut cold_fresh) = (Latencies::new()?, Latencies::new()?);
    let (mut warm_long, mut warm_fresh) = (Latencies::new()?, Latencies::new()?);
    let mut errors = 0;
    // Pairs alternate which order goes first, so neither kind always follows the other.
    for (i, (l, f)) in long.iter_mut().zip(fresh.iter_mut()).enumerate() {
        let mut pair = [(l, &mut cold_long), (f, &mut cold_fresh)];
        if i % 2 == 1 {
            pair.reverse();
        }
        for (target, series) in pair {
            match target.toggle(api).await {
                Some(latency) => series.record(latency),
                None => errors += 1,
            }
        }
    }
    for round in 0..warm_commands {
        for (i, (l, f)) in long.iter_mut().zip(fresh.iter_mut()).enumerate() {
            let mut pair = [(&mut *l, &mut warm_long), (&mut *f, &mut warm_fresh)];
            if (i + round) % 2 == 1 {
                pair.reverse();
            }
            for (target, series) in pair {
                match target.toggle(api).await {
                    Some(latency) => series.record(latency),
                    None => errors += 1,
                }
            }
        }
    }
    Ok(LongStreamVariant {
        snapshots: false,
        snapshot_every: 0,
        cache_capacity: None,
        cold_long: cold_long.summary(),
        cold_fresh: cold_fresh.summary(),
        warm_long: warm_long.summary(),
        warm_fresh: warm_fresh.summary(),
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_order_ends_one_event_short_of_the_next_snapshot() {
        assert_eq!(worst_case_length(10_000, 100), 10_099);
        assert_eq!(worst_case_length(10_099, 100), 10_099);
        assert_eq!(worst_case_length(10_050, 100), 10_099);
        assert_eq!(worst_case_length(10_100, 100), 10_199);
        assert_eq!(worst_case_length(10_000, 7), 10_002);
    }

    #[test]
    fn the_long_order_is_never_shorter_than_asked_and_its_tail_is_the_interval_less_one() {
        for at_least in [100, 9_999, 10_000, 12_345] {
            for every in [2, 3, 100] {
                let length = worst_case_length(at_least, every);
                assert!(length >= at_least && length < at_least + every);
                assert_eq!(length % every, every - 1);
            }
        }
    }

    #[test]
    fn without_a_snapshot_before_the_head_the_length_is_as_asked() {
        assert_eq!(worst_case_length(10_000, 1), 10_000);
        assert_eq!(worst_case_length(10_000, 0), 10_000);
        assert_eq!(worst_case_length(10_000, 1_000_000_000), 10_000);
        assert_eq!(worst_case_length(2, 100), 2);
    }
}
