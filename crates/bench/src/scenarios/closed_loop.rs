//! The closed-loop load generator shared by the command scenarios: N clients, each sending its
//! next command as soon as the previous one answered, for a warm-up and then a measured
//! interval. Only commands that complete inside the measured interval count.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::api::{Api, Command, Outcome};
use crate::metrics;
use crate::stats::{Latencies, LatencySummary, rate};

/// What a client sends next, told how the previous command went.
pub trait Driver: Send + 'static {
    /// The next command.
    fn next_command(&mut self) -> Command;
    /// The previous command's outcome (`true`: accepted).
    fn outcome(&mut self, accepted: bool);
}

/// The measured interval of one closed-loop run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub clients: usize,
    pub measured_secs: f64,
    /// Accepted commands (each appends exactly one event).
    pub accepted: u64,
    /// Accepted commands per second (= events per second).
    pub commands_per_sec: f64,
    /// Latency of accepted commands.
    pub latency: LatencySummary,
    /// Refusals and failures by `status code` or `error`.
    pub errors: BTreeMap<String, u64>,
    /// The service's own timing breakdown over the interval (see [`crate::metrics`]); empty
    /// when its `/metrics` could not be read.
    pub breakdown: BTreeMap<String, f64>,
    /// CPU seconds over the interval by process (see [`crate::cpu`]); empty unless the
    /// services were spawned by the tool.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cpu_seconds: BTreeMap<String, f64>,
    /// Resident MB of each spawned service (and Redis, and the tool) at the start and the end of
    /// the interval (see [`crate::cpu::resident_mb`]); empty like `cpu_seconds`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub resident_mb: BTreeMap<String, [f64; 2]>,
}

struct ClientTally {
    latencies: Latencies,
    accepted: u64,
    errors: BTreeMap<String, u64>,
}

/// Runs `drivers.len()` clients for `warmup` then `measure`.
pub async fn run<D: Driver>(
    api: &Api,
    drivers: Vec<D>,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<LoadResult> {
    let clients = drivers.len();
    let start = Instant::now();
    let measure_from = start + warmup;
    let measure_until = measure_from + measure;
    // The command service's own breakdown over exactly the measured interval.
    let scraper = {
        let http = api.http().clone();
        let base = api.command_url().to_owned();
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let before = metrics::scrape(&http, &base).await.ok()?;
            tokio::time::sleep_until(measure_until.into()).await;
            let after = metrics::scrape(&http, &base).await.ok()?;
            Some(metrics::breakdown(
                &before,
                &after,
                &metrics::COMMAND_HISTOGRAMS,
                &metrics::COMMAND_COUNTERS,
            ))
        })
    };
    // Where the CPU went over the same interval.
    let cpu_reader = api.cpu_probe().map(|probe| {
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let before = probe.snapshot().await;
            tokio::time::sleep_until(measure_until.into()).await;
            let after = probe.snapshot().await;
            (
                crate::cpu::usage(&before, &after),
                crate::cpu::resident_mb(&before, &after),
            )
        })
    });
    let mut tasks = Vec::with_capacity(clients);
    for mut driver in drivers {
        let api = api.clone();
        let mut tally = ClientTally {
            latencies: Latencies::new()?,
            accepted: 0,
            errors: BTreeMap::new(),
        };
        tasks.push(tokio::spawn(async move {
            loop {
                let sent = Instant::now();
                if sent >= measure_until {
                    break;
                }
                let command = driver.next_command();
                let outcome = api.send(&command).await;
                let done = Instant::now();
                let counted = done >= measure_from && done < measure_until;
                match outcome {
                    Outcome::Accepted(_) => {
                        driver.outcome(true);
                        if counted {
                            tally.accepted += 1;
                            tally.latencies.record(done - sent);
                        }
                    }
                    Outcome::Refused { status, code } => {
                        driver.outcome(false);
                        if counted {
                            *tally.errors.entry(format!("{status} {code}")).or_default() += 1;
                        }
                    }
                    Outcome::Failed(error) => {
                        driver.outcome(false);
                        if counted {
                            *tally.errors.entry(short(&error)).or_default() += 1;
                        }
                        // A transport error usually means the service is gone; do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            tally
        }));
    }
    let mut latencies = Latencies::new()?;
    let mut accepted = 0;
    let mut errors = BTreeMap::new();
    for task in tasks {
        let tally = task.await?;
        latencies.merge(&tally.latencies);
        accepted += tally.accepted;
        for (key, count) in tally.errors {
            *errors.entry(key).or_default() += count;
        }
    }
    let (cpu_seconds, resident_mb) = match cpu_reader {
        Some(reader) => reader.await.unwrap_or_default(),
        None => Default::default(),
    };
    Ok(LoadResult {
        clients,
        measured_secs: measure.as_secs_f64(),
        accepted,
        commands_per_sec: rate(accepted, measure),
        latency: latencies.summary(),
        errors,
        breakdown: scraper.await.ok().flatten().unwrap_or_default(),
        cpu_seconds,
        resident_mb,
    })
}

/// The first line of an error, cut to a readable length, as a tally key.
fn short(error: &str) -> String {
    error
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(80)
        .collect()
}
