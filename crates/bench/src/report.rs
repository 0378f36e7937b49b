//! The results of a run: one serialisable [`Report`] (written as JSON), its Markdown rendering
//! (printed on stdout, pasted into BENCHMARKS.md) and the comparison against the project's
//! performance targets.

use std::fmt::Write;

use serde::Serialize;

use crate::machine::Machine;
use crate::scenarios::catchup::CatchupResult;
use crate::scenarios::ceiling::{CeilingPoint, CeilingResult};
use crate::scenarios::closed_loop::LoadResult;
use crate::scenarios::commands::{HotResult, SweepResult};
use crate::scenarios::follow::FollowResult;
use crate::scenarios::freshness::FreshnessResult;
use crate::scenarios::long_stream::LongStreamResult;
use crate::scenarios::rebuild::RebuildResult;
use crate::services::MemoryLog;

/// Everything one run measured. Absent scenarios were not run (or failed: see `failures`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_at: String,
    pub finished_at: String,
    /// The command line that produced it.
    pub command: String,
    pub machine: Option<Machine>,
    pub commands: Option<SweepResult>,
    pub hot: Option<HotResult>,
    pub ceiling: Option<CeilingResult>,
    pub freshness: Option<FreshnessResult>,
    pub catchup: Option<CatchupResult>,
    pub rebuild: Option<RebuildResult>,
    pub follow: Option<FollowResult>,
    pub long_stream: Option<LongStreamResult>,
    pub memory: Option<MemoryLog>,
    /// What the projector's sweeper did during each HTTP scenario (with `--spawn` only).
    pub sweeper: Vec<SweeperActivity>,
    pub targets: Vec<TargetCheck>,
    /// Scenarios that failed, with the error.
    pub failures: Vec<String>,
}

/// The projector's counters over one HTTP scenario, its settling included: whether the sweeper
/// applied events the consumers had not (it should not while they keep up) and raced them.
#[derive(Debug, Clone, Serialize)]
pub struct SweeperActivity {
    pub scenario: String,
    /// Increase of `projector_sweeper_healed_events_total`, both projections.
    pub healed_events: f64,
    /// Increase of `projector_duplicates_total`, both projections.
    pub duplicates: f64,
}

/// One performance target and how the run did against it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    /// `None` when the run has no figure for it.
    pub met: Option<bool>,
}

impl Report {
    /// An empty report started now.
    pub fn new(command: String) -> Self {
        let now = chrono::Utc::now().to_rfc3339();
        Self {
            started_at: now.clone(),
            finished_at: now,
            command,
            machine: None,
            commands: None,
            hot: None,
            ceiling: None,
            freshness: None,
            catchup: None,
            rebuild: None,
            follow: None,
            long_stream: None,
            memory: None,
            sweeper: Vec::new(),
            targets: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// The 64-client (else highest-concurrency) level of the sweep.
    pub fn saturation_level(&self) -> Option<&crate::scenarios::closed_loop::LoadResult> {
        let levels = &self.commands.as_ref()?.levels;
        levels
            .iter()
            .find(|l| l.clients == 64)
            .or_else(|| levels.iter().max_by_key(|l| l.clients))
    }

    /// Fills [`Report::targets`] from the figures present.
    pub fn check_targets(&mut self) {
        let mut checks = Vec::new();
        let saturation = self.saturation_level().cloned();
        checks.push(match (&saturation, &self.ceiling) {
            (Some(level), Some(ceiling)) => {
                ceiling_check(level, ceiling).unwrap_or_else(|| missing(CEILING_TARGET))
            }
            _ => missing(CEILING_TARGET),
        });
        checks.push(match &self.hot {
            Some(hot) => TargetCheck {
                target: "one hot order, 8 writers: ≥ 1,000 commands/s, p99 < 50 ms".into(),
                measured: format!(
                    "{:.0} commands/s, p99 {:.1} ms, {} errors",
                    hot.load.commands_per_sec,
                    hot.load.latency.p99_ms,
                    hot.load.errors.values().sum::<u64>()
                ),
                met: Some(hot.load.commands_per_sec >= 1000.0 && hot.load.latency.p99_ms < 50.0),
            },
            None => missing("one hot order, 8 writers: ≥ 1,000 commands/s, p99 < 50 ms"),
        });
        checks.push(match &self.freshness {
            Some(f) => freshness_check(f),
            None => missing(FRESHNESS_TARGET),
        });
        checks.push(match &self.catchup {
            Some(c) if !c.runs.is_empty() => {
                let best = c
                    .runs
                    .iter()
                    .filter(|r| r.completed)
                    .map(|r| r.events_per_sec)
                    .fold(0.0, f64::max);
                let single = c.runs.iter().find(|r| r.instances == 1);
                TargetCheck {
                    target: "projector catch-up ≥ 10,000 events/s".into(),
                    measured: format!(
                        "{} (best {best:.0} events/s)",
                        c.runs
                            .iter()
                            .map(|r| format!(
                                "{} instance(s): {:.0} events/s",
                                r.instances, r.events_per_sec
                            ))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                    met: Some(single.is_some_and(|r| r.completed && r.events_per_sec >= 10_000.0)),
                }
            }
            _ => missing("projector catch-up ≥ 10,000 events/s"),
        });
        checks.push(match &self.rebuild {
            Some(r) => TargetCheck {
                target: "rebuild ≥ 25,000 events/s".into(),
                measured: format!("{:.0} events/s over {} events", r.events_per_sec, r.events),
                met: Some(r.events_per_sec >= 25_000.0),
            },
            None => missing("rebuild ≥ 25,000 events/s"),
        });
        checks.push(match &self.long_stream {
            Some(l) => long_stream_check(l),
            None => missing(LONG_STREAM_TARGET),
        });
        checks.push(match &self.memory {
            Some(m) if !m.peaks.is_empty() => {
                let worst = m.peaks.values().map(|p| p.peak_rss_mb).fold(0.0, f64::max);
                TargetCheck {
                    target: "each service < 100 MB RSS at full load".into(),
                    measured: m
                        .peaks
                        .iter()
                        .map(|(name, p)| format!("{name} {:.1} MB", p.peak_rss_mb))
                        .collect::<Vec<_>>()
                        .join(", "),
                    met: Some(worst < 100.0),
                }
            }
            _ => missing("each service < 100 MB RSS at full load"),
        });
        self.targets = checks;
    }

    /// The report as Markdown tables.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "Run {} → {}\n", self.started_at, self.finished_at);
        let _ = writeln!(md, "`{}`\n", self.command);
        if let Some(m) = &self.machine {
            let _ = writeln!(md, "| machine | |\n|---|---|");
            let _ = writeln!(md, "| CPU | {} × {} |", m.cpus, m.cpu_model);
            let _ = writeln!(md, "| memory | {:.1} GiB |", m.memory_gib);
            let _ = writeln!(md, "| kernel | {} |", m.kernel);
            let _ = writeln!(
                md,
                "| load average at start (1/5/15 min) | {} |",
                m.load_average_at_start
            );
            let _ = writeln!(
                md,
                "| PostgreSQL | {} (synchronous_commit={}, fsync={}, shared_buffers={}, max_connections={}) |",
                m.postgres_version,
                m.synchronous_commit,
                m.fsync,
                m.shared_buffers,
                m.postgres_max_connections
            );
            let _ = writeln!(
                md,
                "| Redis | {} ({}) |\n",
                m.redis_version, m.redis_persistence
            );
        }
        if let Some(sweep) = &self.commands {
            let _ = writeln!(
                md,
                "### Commands (mixed lifecycle, closed loop, {} s per level)\n",
                sweep.levels.first().map_or(0.0, |l| l.measured_secs)
            );
            let _ = writeln!(
                md,
                "| clients | commands/s (= events/s) | p50 ms | p95 ms | p99 ms | max ms | errors |"
            );
            let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---|");
            for l in &sweep.levels {
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
                    l.clients,
                    l.commands_per_sec,
                    l.latency.p50_ms,
                    l.latency.p95_ms,
                    l.latency.p99_ms,
                    l.latency.max_ms,
                    errors(&l.errors)
                );
            }
            md.push('\n');
            let _ = writeln!(
                md,
                "Service-side breakdown per level (command-service `/metrics`, measured interval only):\n"
            );
            let _ = writeln!(
                md,
                "| clients | commit mean ms | requests per group commit | command handling mean ms | internal retries |\n|---:|---:|---:|---:|---:|"
            );
            for l in &sweep.levels {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    l.clients,
                    figure(&l.breakdown, "event_store_commit mean ms"),
                    figure(&l.breakdown, crate::metrics::BATCH_REQUESTS_MEAN),
                    figure(&l.breakdown, "command_duration mean ms"),
                    figure(&l.breakdown, "command_retries_total")
                );
            }
            md.push('\n');
            let columns: Vec<CpuColumn> = sweep.levels.iter().map(CpuColumn::from).collect();
            cpu_table(&mut md, &columns, self.machine.as_ref().map(|m| m.cpus));
            resident_table(&mut md, &sweep.levels);
        }
        if let Some(hot) = &self.hot {
            let l = &hot.load;
            let _ = writeln!(
                md,
                "### Hot order ({} writers, AddItem, no If-Match)\n",
                l.clients
            );
            let _ = writeln!(
                md,
                "| commands/s | p50 ms | p95 ms | p99 ms | max ms | errors |\n|---:|---:|---:|---:|---:|---|"
            );
            let _ = writeln!(
                md,
                "| {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} |\n",
                l.commands_per_sec,
                l.latency.p50_ms,
                l.latency.p95_ms,
                l.latency.p99_ms,
                l.latency.max_ms,
                errors(&l.errors)
            );
            let _ = writeln!(
                md,
                "Service-side: commit mean {} ms, {} requests per group commit, command handling mean {} ms, {} internal retries.\n",
                figure(&l.breakdown, "event_store_commit mean ms"),
                figure(&l.breakdown, crate::metrics::BATCH_REQUESTS_MEAN),
                figure(&l.breakdown, "command_duration mean ms"),
                figure(&l.breakdown, "command_retries_total")
            );
            cpu_table(
                &mut md,
                &[CpuColumn::from(l)],
                self.machine.as_ref().map(|m| m.cpus),
            );
        }
        if let Some(ceiling) = &self.ceiling {
            ceiling_table(&mut md, ceiling, self.saturation_level());
        }
        if let Some(f) = &self.freshness {
            freshness_section(&mut md, f);
            cpu_table(
                &mut md,
                &[CpuColumn {
                    label: format!("{:.0}/s, 1 read-back in {}", f.achieved_rate, f.read_every),
                    accepted: f.accepted,
                    measured_secs: f.measured_secs,
                    cpu_seconds: &f.cpu_seconds,
                }],
                self.machine.as_ref().map(|m| m.cpus),
            );
        }
        sweeper_table(&mut md, &self.sweeper);
        if let Some(c) = &self.catchup {
            let _ = writeln!(
                md,
                "### Projector catch-up ({} events backlog)\n",
                c.backlog_events
            );
            let _ = writeln!(
                md,
                "| instances | seconds | events/s | completed |\n|---:|---:|---:|---|"
            );
            for r in &c.runs {
                let _ = writeln!(
                    md,
                    "| {} | {:.1} | {:.0} | {} |",
                    r.instances, r.elapsed_secs, r.events_per_sec, r.completed
                );
            }
            md.push('\n');
        }
        if let Some(f) = &self.follow {
            let _ = writeln!(
                md,
                "### Reading the log over HTTP ({} events, one client)\n",
                f.log_events
            );
            let _ = writeln!(
                md,
                "| reader | events received | requests | seconds | positions/s |\n\
                 |---|---:|---:|---:|---:|"
            );
            for r in &f.runs {
                let _ = writeln!(
                    md,
                    "| `{}` | {} | {} | {:.1} | {:.0} |",
                    r.reader, r.events, r.requests, r.elapsed_secs, r.positions_per_sec
                );
            }
            md.push('\n');
        }
        if let Some(r) = &self.rebuild {
            let _ = writeln!(md, "### Rebuild of `{}`\n", r.projection);
            let _ = writeln!(
                md,
                "| events | seconds | events/s | live writers paused for the swap |\n\
                 |---:|---:|---:|---:|"
            );
            let pause = r
                .swap_pause_secs
                .map_or_else(|| "—".to_owned(), |s| format!("{s:.2} s"));
            let _ = writeln!(
                md,
                "| {} | {:.1} | {:.0} | {pause} |\n",
                r.events, r.elapsed_secs, r.events_per_sec
            );
        }
        if let Some(l) = &self.long_stream {
            long_stream_table(&mut md, l);
        }
        if let Some(m) = &self.memory {
            let _ = writeln!(md, "### Peak RSS (VmHWM) of the spawned services\n");
            let _ = writeln!(
                md,
                "| service | peak MB | during | processes measured |\n|---|---:|---|---:|"
            );
            for (name, p) in &m.peaks {
                let _ = writeln!(
                    md,
                    "| {name} | {:.1} | {} | {} |",
                    p.peak_rss_mb, p.scenario, p.processes
                );
            }
            for (name, p) in m.peaks.iter().filter(|(_, p)| p.final_reading_missed > 0) {
                let _ = writeln!(
                    md,
                    "\n{name}: {} process(es) exited before their final reading; their figure is \
                     the last periodic sample (every 250 ms).",
                    p.final_reading_missed
                );
            }
            md.push('\n');
        }
        if !self.targets.is_empty() {
            let _ = writeln!(
                md,
                "### Targets\n\n| target | measured | met |\n|---|---|---|"
            );
            for t in &self.targets {
                let met = match t.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "not measured",
                };
                let _ = writeln!(md, "| {} | {} | {met} |", t.target, t.measured);
            }
            md.push('\n');
        }
        if !self.failures.is_empty() {
            let _ = writeln!(md, "### Failures\n");
            for f in &self.failures {
                let _ = writeln!(md, "- {f}");
            }
        }
        md
    }
}

/// The command target, against the batched-INSERT ceiling.
const CEILING_TARGET: &str =
    "commands at 64 clients ≥ 40% of the batched-INSERT ceiling, p99 < 50 ms";

/// The freshness target, and the rule that the run held its rate.
const FRESHNESS_TARGET: &str = "response → visible in read model p99 < 100 ms at half saturation, \
     with no command error, no missed tick and at most 1% of ticks late";

/// The long-stream target.
const LONG_STREAM_TARGET: &str =
    "an order with ≥ 10,000 events within 2x of a fresh order's latency";

/// The command target: the service's events/s as a share of the best ceiling point at its
/// concurrency (the target's definition), with the rows per transaction and rows in flight of
/// that point beside it, and the share of the point sized like the service's group commit.
fn ceiling_check(level: &LoadResult, ceiling: &CeilingResult) -> Option<TargetCheck> {
    let clients = level
        .clients
        .min(crate::scenarios::ceiling::MAX_CEILING_CONNECTIONS);
    let best = ceiling.best_at(clients)?;
    let share = level.commands_per_sec / best.events_per_sec.max(f64::MIN_POSITIVE);
    let mut measured = format!(
        "{:.0} events/s = {:.1}% of {:.0} events/s ({} clients × {} rows/tx, up to {} rows in flight)",
        level.commands_per_sec,
        share * 100.0,
        best.events_per_sec,
        best.clients,
        best.rows_per_transaction,
        best.clients * best.rows_per_transaction,
    );
    if let (Some(batch), Some(sized)) = (ceiling.service_batch, ceiling.service_sized()) {
        let sized_share = level.commands_per_sec / sized.events_per_sec.max(f64::MIN_POSITIVE);
        let _ = write!(
            measured,
            "; {:.1}% of {:.0} events/s at {} rows/tx ({})",
            sized_share * 100.0,
            sized.events_per_sec,
            sized.rows_per_transaction,
            batch.measured_mean.map_or_else(
                || "a fixed size, the service's group commit not measured".to_owned(),
                |mean| format!("the service's mean group commit, {mean:.1} requests"),
            )
        );
    }
    let _ = write!(measured, "; p99 {:.1} ms", level.latency.p99_ms);
    Some(TargetCheck {
        target: CEILING_TARGET.into(),
        measured,
        met: Some(share >= 0.40 && level.latency.p99_ms < 50.0),
    })
}

/// The freshness target: met only if the p99 is under 100 ms, every read-back was visible, and
/// the run held its rate ([`FreshnessResult::rate_held`]).
fn freshness_check(f: &FreshnessResult) -> TargetCheck {
    TargetCheck {
        target: FRESHNESS_TARGET.into(),
        measured: format!(
            "p99 {:.1} ms at {:.0} commands/s ({} not visible); {} of {} ticks late ({:.2}%, > {:.0} ms), \
             {} missed, {} command errors",
            f.response_to_visible.p99_ms,
            f.achieved_rate,
            f.not_visible,
            f.late_ticks,
            f.ticks,
            f.late_share() * 100.0,
            f.late_after_ms,
            f.missed_ticks,
            f.command_errors
        ),
        met: Some(
            f.response_to_visible.count > 0
                && f.response_to_visible.p99_ms < 100.0
                && f.not_visible == 0
                && f.rate_held(),
        ),
    }
}

/// The long-stream target, on snapshots on with a cache of one order (every command loads its
/// order), else snapshots on with the default cache; the variant is named in the verdict.
fn long_stream_check(l: &LongStreamResult) -> TargetCheck {
    let on = l
        .variants
        .iter()
        .find(|v| v.snapshots && v.cache_capacity == Some(1))
        .or_else(|| l.variants.iter().find(|v| v.snapshots));
    let Some(v) = on else {
        return missing(LONG_STREAM_TARGET);
    };
    let cold = v.cold_long.p50_ms / v.cold_fresh.p50_ms.max(f64::MIN_POSITIVE);
    let warm = v.warm_long.p50_ms / v.warm_fresh.p50_ms.max(f64::MIN_POSITIVE);
    let cache = match v.cache_capacity {
        Some(1) => "ORDER_CACHE_CAPACITY=1, so every command loads its order".to_owned(),
        Some(capacity) => format!("ORDER_CACHE_CAPACITY={capacity}"),
        None => "the default order cache".to_owned(),
    };
    TargetCheck {
        target: LONG_STREAM_TARGET.into(),
        measured: format!(
            "{} events ({} after the last snapshot), snapshots on (SNAPSHOT_EVERY={}), {cache}: \
             first command p50 {:.1} vs {:.1} ms ({cold:.2}x), later p50 {:.1} vs {:.1} ms ({warm:.2}x)",
            l.long_events,
            l.events_after_snapshot,
            v.snapshot_every,
            v.cold_long.p50_ms,
            v.cold_fresh.p50_ms,
            v.warm_long.p50_ms,
            v.warm_fresh.p50_ms
        ),
        met: Some(cold <= 2.0 && warm <= 2.0 && v.errors == 0),
    }
}

/// The ceiling's points, with the rows each keeps in flight; the best point at the service's
/// concurrency (the target's denominator) and the service-sized one are marked.
fn ceiling_table(md: &mut String, ceiling: &CeilingResult, saturation: Option<&LoadResult>) {
    let _ = writeln!(
        md,
        "### Ceiling: multi-row INSERT transactions into the events table\n"
    );
    let clients = saturation.map(|l| {
        l.clients
            .min(crate::scenarios::ceiling::MAX_CEILING_CONNECTIONS)
    });
    let best = clients.and_then(|c| ceiling.best_at(c));
    let sized = ceiling.service_sized();
    let _ = writeln!(
        md,
        "| clients | rows/tx | rows in flight (clients × rows) | events/s | tx p50 ms | tx p99 ms | |\n\
         |---:|---:|---:|---:|---:|---:|---|"
    );
    for p in &ceiling.points {
        let is = |other: Option<&CeilingPoint>| other.is_some_and(|o| std::ptr::eq(o, p));
        let mark = match (is(best), is(sized)) {
            (true, true) => "target's ceiling; service-sized",
            (true, false) => "target's ceiling",
            (false, true) => "service-sized",
            (false, false) => "",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {mark} |",
            p.clients,
            p.rows_per_transaction,
            p.clients * p.rows_per_transaction,
            p.events_per_sec,
            p.transaction_latency.p50_ms,
            p.transaction_latency.p99_ms
        );
    }
    if let Some(batch) = ceiling.service_batch {
        let _ = writeln!(
            md,
            "\nThe service commits one group at a time under its append lock, so at {} clients it \
             has at most {} rows in flight; the service-sized point uses {} rows/tx ({}).",
            batch.clients,
            batch.clients,
            batch.rows_per_transaction,
            batch.measured_mean.map_or_else(
                || "a fixed size: the service's group commit was not measured in this run"
                    .to_owned(),
                |mean| format!("its mean group commit in this run, {mean:.1} requests"),
            )
        );
    }
    md.push('\n');
}

/// The sweeper's work during each HTTP scenario (its warm-up and the settling after it
/// included): none while the consumers keep up, so a figure here means it covered for them or
/// raced them.
fn sweeper_table(md: &mut String, activity: &[SweeperActivity]) {
    if activity.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "### The projector's sweeper during the HTTP scenarios\n\n\
         | scenario (its warm-up and settling included) | events the sweeper applied itself | \
         events found applied already |\n|---|---:|---:|"
    );
    for a in activity {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} |",
            a.scenario, a.healed_events, a.duplicates
        );
    }
    let _ = writeln!(
        md,
        "\nBoth stay at 0 while the consumers keep up: the sweeper applies an event only once it \
         has waited for them (`SWEEP_GRACE_MS`, or a tick once it is healing). An event found \
         applied already is one the sweeper and a consumer both took (or an entry delivered \
         twice).\n"
    );
}

/// The freshness run: latencies, then what became of the ticks and the rule they must pass.
fn freshness_section(md: &mut String, f: &FreshnessResult) {
    let _ = writeln!(
        md,
        "### Freshness at {:.0} commands/s (target {:.0}/s, {:.0} s after a {:.0} s warm-up)\n",
        f.achieved_rate, f.target_rate, f.measured_secs, f.warmup_secs
    );
    let _ = writeln!(
        md,
        "| measure | p50 ms | p95 ms | p99 ms | max ms | samples |\n|---|---:|---:|---:|---:|---:|"
    );
    let read_back = if f.read_every <= 1 {
        "every command".to_owned()
    } else {
        format!("1 command in {}", f.read_every)
    };
    let probed = format!(
        "sampled: response → row applied and checkpoint ≥ position (one DB poll every {} ms reads both)",
        crate::scenarios::freshness::PROBE_POLL.as_millis()
    );
    for (name, s) in [
        (
            "command service time (sent → response)",
            &f.command_service_time,
        ),
        (
            "command response time (intended send → response)",
            &f.command_response_time,
        ),
        (
            &*format!("response → visible (`?min_position=`, {read_back})"),
            &f.response_to_visible,
        ),
        (
            "recorded_at (set at INSERT) → seen on the Redis stream",
            &f.recorded_at_to_stream,
        ),
        (probed.as_str(), &f.response_to_applied_and_checkpointed),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms, s.count
        );
    }
    let _ = writeln!(
        md,
        "\nticks due in the window: {}; late (sent > {:.0} ms after their intended time): {} ({:.2}%), \
         of which released late by the load generator's ticker: {}; missed (never sent): {}; command errors: {}; not visible within 10 s: {}; probes dropped: {}, \
         failed: {}; query-service consistency wait mean {} ms over {} waits\n",
        f.ticks,
        f.late_after_ms,
        f.late_ticks,
        f.late_share() * 100.0,
        f.late_released_ticks,
        f.missed_ticks,
        f.command_errors,
        f.not_visible,
        f.probes_dropped,
        f.probes_failed,
        figure(&f.query_breakdown, "query_consistency_wait mean ms"),
        figure(&f.query_breakdown, "query_consistency_wait_seconds count")
    );
    let _ = writeln!(
        md,
        "The run counts as holding its rate only with no command error, no missed tick and at most \
         {:.0}% of ticks late; the freshness target is met only then. {}\n",
        f.late_share_allowed * 100.0,
        if f.rate_held() {
            "This run held it."
        } else {
            "**This run did not hold it.**"
        }
    );
}

/// The long-stream variants. The first command of each order gives one sample per order
/// (about 30), so its p99 would be its max: the first-command columns show p50 and max.
fn long_stream_table(md: &mut String, l: &LongStreamResult) {
    let _ = writeln!(
        md,
        "### Long stream ({} events, {} after the last snapshot) vs fresh order, {} orders each\n",
        l.long_events, l.events_after_snapshot, l.orders
    );
    let _ = writeln!(
        md,
        "| snapshots | SNAPSHOT_EVERY | ORDER_CACHE_CAPACITY | first cmd long p50/max ms | first cmd fresh p50/max ms | later long p50/p99 ms | later fresh p50/p99 ms | errors |"
    );
    let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---:|---:|");
    for v in &l.variants {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {} |",
            if v.snapshots { "on" } else { "off" },
            v.snapshot_every,
            v.cache_capacity
                .map_or("default".to_owned(), |c| c.to_string()),
            v.cold_long.p50_ms,
            v.cold_long.max_ms,
            v.cold_fresh.p50_ms,
            v.cold_fresh.max_ms,
            v.warm_long.p50_ms,
            v.warm_long.p99_ms,
            v.warm_fresh.p50_ms,
            v.warm_fresh.p99_ms,
            v.errors
        );
    }
    md.push('\n');
}

/// One column of a CPU table: a measured interval and what it cost.
struct CpuColumn<'a> {
    label: String,
    accepted: u64,
    measured_secs: f64,
    cpu_seconds: &'a std::collections::BTreeMap<String, f64>,
}

impl<'a> From<&'a LoadResult> for CpuColumn<'a> {
    fn from(level: &'a LoadResult) -> Self {
        Self {
            label: format!("{} clients", level.clients),
            accepted: level.accepted,
            measured_secs: level.measured_secs,
            cpu_seconds: &level.cpu_seconds,
        }
    }
}

/// CPU microseconds per accepted command, by process, one column per interval; the busiest
/// process first. Nothing when no interval read any CPU time (services not spawned by the
/// tool).
fn cpu_table(md: &mut String, columns: &[CpuColumn], cpus: Option<usize>) {
    if columns.iter().all(|c| c.cpu_seconds.is_empty()) {
        return;
    }
    let mut totals: std::collections::BTreeMap<&str, f64> = std::collections::BTreeMap::new();
    for column in columns {
        for (group, seconds) in column.cpu_seconds {
            *totals.entry(group.as_str()).or_default() += seconds;
        }
    }
    let mut groups: Vec<(&str, f64)> = totals
        .into_iter()
        .filter(|(_, seconds)| *seconds > 0.0)
        .collect();
    groups.sort_by(|a, b| b.1.total_cmp(&a.1));
    let per_command = |column: &CpuColumn, seconds: f64| {
        if column.accepted == 0 {
            "–".to_owned()
        } else {
            format!("{:.0}", seconds * 1e6 / column.accepted as f64)
        }
    };
    let _ = writeln!(
        md,
        "CPU per command by process (µs of CPU time per accepted command over the measured \
         interval, from `/proc`; PostgreSQL backends by the service that opened them):\n"
    );
    let header: Vec<&str> = columns.iter().map(|c| c.label.as_str()).collect();
    let _ = writeln!(md, "| process | {} |", header.join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(columns.len()));
    for (group, _) in &groups {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| per_command(c, c.cpu_seconds.get(*group).copied().unwrap_or(0.0)))
            .collect();
        let _ = writeln!(md, "| {group} | {} |", cells.join(" | "));
    }
    let totals: Vec<String> = columns
        .iter()
        .map(|c| per_command(c, c.cpu_seconds.values().sum()))
        .collect();
    let _ = writeln!(md, "| **all of the above** | {} |", totals.join(" | "));
    if let Some(cpus) = cpus.filter(|&c| c > 0) {
        let busy: Vec<String> = columns
            .iter()
            .map(|c| {
                let available = c.measured_secs * cpus as f64;
                format!(
                    "{:.0}%",
                    100.0 * c.cpu_seconds.values().sum::<f64>() / available
                )
            })
            .collect();
        let _ = writeln!(md, "| share of the {cpus} CPUs | {} |", busy.join(" | "));
    }
    md.push('\n');
}

/// Resident MB of each process at the start and the end of each level (`start → end`), so that
/// growth under load shows beside the peak. Nothing when no level read any.
fn resident_table(md: &mut String, levels: &[LoadResult]) {
    if levels.iter().all(|l| l.resident_mb.is_empty()) {
        return;
    }
    let names: std::collections::BTreeSet<&str> = levels
        .iter()
        .flat_map(|l| l.resident_mb.keys().map(String::as_str))
        .collect();
    let _ = writeln!(
        md,
        "Resident memory (`VmRSS`, MB) at the start → the end of each measured interval:\n"
    );
    let header: Vec<String> = levels
        .iter()
        .map(|l| format!("{} clients", l.clients))
        .collect();
    let _ = writeln!(md, "| process | {} |", header.join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(levels.len()));
    for name in names {
        let cells: Vec<String> = levels
            .iter()
            .map(|l| {
                l.resident_mb.get(name).map_or_else(
                    || "–".to_owned(),
                    |[start, end]| format!("{start:.1} → {end:.1}"),
                )
            })
            .collect();
        let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
    }
    md.push('\n');
}

fn figure(figures: &std::collections::BTreeMap<String, f64>, key: &str) -> String {
    figures
        .get(key)
        .map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"))
}

fn missing(target: &str) -> TargetCheck {
    TargetCheck {
        target: target.to_owned(),
        measured: "not measured in this run".into(),
        met: None,
    }
}

fn errors(errors: &std::collections::BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "0".into();
    }
    errors
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::scenarios::long_stream::LongStreamResult;

    fn level_with_cpu(clients: usize, accepted: u64, cpu: &[(&str, f64)]) -> LoadResult {
        LoadResult {
            clients,
            measured_secs: 10.0,
            accepted,
            commands_per_sec: accepted as f64 / 10.0,
            latency: Default::default(),
            errors: Default::default(),
            breakdown: Default::default(),
            cpu_seconds: cpu.iter().map(|(g, s)| ((*g).to_owned(), *s)).collect(),
            resident_mb: Default::default(),
        }
    }

    #[test]
    fn the_cpu_table_gives_microseconds_per_command_busiest_process_first() {
        let levels = [
            level_with_cpu(1, 1_000, &[("projector", 0.5), ("command-service", 1.0)]),
            level_with_cpu(64, 40_000, &[("projector", 4.0), ("command-service", 8.0)]),
        ];
        let mut md = String::new();
        let columns: Vec<CpuColumn> = levels.iter().map(CpuColumn::from).collect();
        cpu_table(&mut md, &columns, Some(2));
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(
            rows,
            [
                "| process | 1 clients | 64 clients |",
                "| command-service | 1000 | 200 |",
                "| projector | 500 | 100 |",
                "| **all of the above** | 1500 | 300 |",
                "| share of the 2 CPUs | 8% | 60% |",
            ]
        );
        let mut none = String::new();
        let idle = level_with_cpu(1, 10, &[]);
        cpu_table(&mut none, &[CpuColumn::from(&idle)], Some(2));
        assert!(none.is_empty(), "no table without CPU figures");
    }

    #[test]
    fn the_resident_table_shows_each_process_at_both_ends_of_each_level() {
        let mut one = level_with_cpu(1, 10, &[]);
        one.resident_mb = [("command-service".to_owned(), [27.25, 27.5])].into();
        let mut many = level_with_cpu(64, 10, &[]);
        many.resident_mb = [
            ("command-service".to_owned(), [28.0, 34.0]),
            ("projector".to_owned(), [17.0, 17.25]),
        ]
        .into();
        let mut md = String::new();
        resident_table(&mut md, &[one, many]);
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(
            rows,
            [
                "| process | 1 clients | 64 clients |",
                "| command-service | 27.2 → 27.5 | 28.0 → 34.0 |",
                "| projector | – | 17.0 → 17.2 |",
            ]
        );
        let mut none = String::new();
        resident_table(&mut none, &[level_with_cpu(1, 10, &[])]);
        assert!(none.is_empty(), "no table without memory figures");
    }

    fn summary(p99_ms: f64, count: u64) -> crate::stats::LatencySummary {
        crate::stats::LatencySummary {
            count,
            p50_ms: p99_ms / 2.0,
            p95_ms: p99_ms,
            p99_ms,
            max_ms: p99_ms,
            ..Default::default()
        }
    }

    /// A freshness run like results-1041: p99 76.9 ms, nothing invisible, no errors.
    fn freshness(ticks: u64, late: u64, missed: u64, errors: u64) -> FreshnessResult {
        FreshnessResult {
            target_rate: 2_877.75,
            achieved_rate: 2_817.0,
            warmup_secs: 2.0,
            measured_secs: 20.0,
            clients: 72,
            read_every: 4,
            ticks,
            late_ticks: late,
            late_released_ticks: 0,
            missed_ticks: missed,
            late_after_ms: 10.0,
            late_share_allowed: 0.01,
            command_service_time: summary(30.0, ticks),
            command_response_time: summary(40.0, ticks),
            response_to_visible: summary(76.9, ticks / 4),
            not_visible: 0,
            command_errors: errors,
            recorded_at_to_stream: summary(20.0, ticks),
            response_to_applied_and_checkpointed: summary(70.0, ticks / 50),
            probes_dropped: 0,
            probes_failed: 0,
            query_breakdown: Default::default(),
            accepted: ticks,
            cpu_seconds: Default::default(),
        }
    }

    #[test]
    fn a_fast_freshness_run_that_missed_ticks_does_not_meet_the_target() {
        assert_eq!(freshness_check(&freshness(57_000, 0, 0, 0)).met, Some(true));
        let missed = freshness_check(&freshness(57_000, 0, 1_200, 0));
        assert_eq!(missed.met, Some(false), "{missed:?}");
        assert!(missed.measured.contains("1200 missed"), "{missed:?}");
        assert_eq!(
            freshness_check(&freshness(57_000, 0, 0, 1)).met,
            Some(false)
        );
    }

    #[test]
    fn a_freshness_run_with_more_than_one_percent_late_ticks_does_not_meet_the_target() {
        assert_eq!(
            freshness_check(&freshness(10_000, 100, 0, 0)).met,
            Some(true)
        );
        let late = freshness_check(&freshness(10_000, 101, 0, 0));
        assert_eq!(late.met, Some(false));
        assert!(
            late.measured.contains("101 of 10000 ticks late (1.01%"),
            "{late:?}"
        );
    }

    #[test]
    fn a_freshness_run_without_read_backs_does_not_meet_the_target() {
        let mut empty = freshness(10_000, 0, 0, 0);
        empty.response_to_visible = Default::default();
        assert_eq!(freshness_check(&empty).met, Some(false));
    }

    #[test]
    fn the_freshness_section_states_the_rule_and_names_both_command_latencies() {
        let mut md = String::new();
        freshness_section(&mut md, &freshness(10_000, 500, 3, 0));
        assert!(
            md.contains("command service time (sent → response)"),
            "{md}"
        );
        assert!(
            md.contains("command response time (intended send → response)"),
            "{md}"
        );
        assert!(
            md.contains("recorded_at (set at INSERT) → seen on the Redis stream"),
            "{md}"
        );
        assert!(
            md.contains("late (sent > 10 ms after their intended time): 500 (5.00%)"),
            "{md}"
        );
        assert!(md.contains("at most 1% of ticks late"), "{md}");
        assert!(md.contains("**This run did not hold it.**"), "{md}");
        assert!(md.contains("after a 2 s warm-up"), "{md}");
    }

    fn ceiling_point(clients: usize, rows: usize, events_per_sec: f64) -> CeilingPoint {
        CeilingPoint {
            clients,
            rows_per_transaction: rows,
            transactions: 1,
            events_per_sec,
            transaction_latency: Default::default(),
        }
    }

    #[test]
    fn the_ceiling_verdict_keeps_the_best_point_and_shows_rows_and_the_service_sized_share() {
        let mut level = level_with_cpu(64, 95_370, &[]);
        level.latency = summary(12.2, 95_370);
        let ceiling = CeilingResult {
            points: vec![
                ceiling_point(64, 1, 6_833.0),
                ceiling_point(64, 30, 38_148.0),
                ceiling_point(64, 64, 83_472.0),
            ],
            service_batch: Some(crate::scenarios::ceiling::ServiceBatch::new(64, Some(30.0))),
        };
        let check = ceiling_check(&level, &ceiling).unwrap();
        assert_eq!(check.met, Some(false));
        assert!(
            check.measured.contains(
                "= 11.4% of 83472 events/s (64 clients × 64 rows/tx, up to 4096 rows in flight)"
            ),
            "{check:?}"
        );
        assert!(
            check.measured.contains(
                "25.0% of 38148 events/s at 30 rows/tx (the service's mean group commit, 30.0 requests)"
            ),
            "{check:?}"
        );
        let mut md = String::new();
        ceiling_table(&mut md, &ceiling, Some(&level));
        assert!(
            md.contains("| 64 | 64 | 4096 | 83472 | 0.0 | 0.0 | target's ceiling |"),
            "{md}"
        );
        assert!(
            md.contains("| 64 | 30 | 1920 | 38148 | 0.0 | 0.0 | service-sized |"),
            "{md}"
        );
    }

    #[test]
    fn the_long_stream_verdict_names_its_variant_and_the_tail_it_replayed() {
        use crate::scenarios::long_stream::LongStreamVariant;
        let variant = |cache_capacity| LongStreamVariant {
            snapshots: true,
            snapshot_every: 100,
            cache_capacity,
            cold_long: summary(2.0, 30),
            cold_fresh: summary(2.0, 30),
            warm_long: summary(2.0, 1_200),
            warm_fresh: summary(2.0, 1_200),
            errors: 0,
        };
        let result = LongStreamResult {
            long_events: 10_099,
            events_after_snapshot: 99,
            orders: 30,
            variants: vec![variant(None), variant(Some(1))],
        };
        let check = long_stream_check(&result);
        assert_eq!(check.met, Some(true));
        assert!(
            check.measured.starts_with(
                "10099 events (99 after the last snapshot), snapshots on (SNAPSHOT_EVERY=100), \
                 ORDER_CACHE_CAPACITY=1, so every command loads its order"
            ),
            "{check:?}"
        );
        let mut md = String::new();
        long_stream_table(&mut md, &result);
        assert!(md.contains("first cmd long p50/max ms"), "{md}");
    }

    #[test]
    fn the_sweeper_table_shows_each_http_scenario_and_nothing_without_one() {
        let mut md = String::new();
        sweeper_table(&mut md, &[]);
        assert!(md.is_empty());
        sweeper_table(
            &mut md,
            &[SweeperActivity {
                scenario: "commands".into(),
                healed_events: 1200.0,
                duplicates: 35.0,
            }],
        );
        assert!(md.contains("| commands | 1200 | 35 |"), "{md}");
    }

    #[test]
    fn an_empty_report_lists_every_target_as_not_measured() {
        let mut report = Report::new("bench all".into());
        report.check_targets();
        assert_eq!(report.targets.len(), 7);
        assert!(report.targets.iter().all(|t| t.met.is_none()));
        let md = report.markdown();
        assert!(md.contains("not measured"), "{md}");
    }
}
