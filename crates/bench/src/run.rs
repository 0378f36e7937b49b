//! The orchestration of a run: which scenarios, in what order, against which services, and
//! writing the JSON, Markdown and SVG outputs. A failing scenario is recorded in the report
//! and the run goes on, so one broken service never hides the other figures.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::api::Api;
use crate::chart;
use crate::cli::{Cli, Scenario};
use crate::cpu::CpuProbe;
use crate::machine;
use crate::report::Report;
use crate::scenarios::{catchup, ceiling, commands, follow, freshness, long_stream, rebuild};
use crate::scratch::Scratch;
use crate::services::{Launcher, Running, Service};

/// Freshness rate when no saturation rate was measured in the same run and none was given.
pub const DEFAULT_FRESHNESS_RATE: f64 = 200.0;

/// The three services of the HTTP scenarios, spawned against one scratch database.
struct Stack {
    command: Running,
    query: Running,
    projector: Running,
    stream: String,
}

impl Stack {
    async fn start(launcher: &Launcher, scratch: &Scratch) -> anyhow::Result<Self> {
        let database_url = scratch.create_database("main").await?;
        let stream = scratch.stream_key("main");
        // The command service first: it migrates the fresh database, so the others find it ready.
        let command = launcher
            .start(Service::CommandService, "http", &database_url, &stream, &[])
            .await?;
        let query = launcher
            .start(Service::QueryService, "http", &database_url, &stream, &[])
            .await;
        let query = match query {
            Ok(query) => query,
            Err(err) => {
                launcher.stop(command).await?;
                return Err(err);
            }
        };
        let env = [("PROJECTOR_CONSUMER_NAME", "bench-main".to_owned())];
        let projector = launcher
            .start(Service::Projector, "http", &database_url, &stream, &env)
            .await;
        let projector = match projector {
            Ok(projector) => projector,
            Err(err) => {
                launcher.stop(command).await?;
                launcher.stop(query).await?;
                return Err(err);
            }
        };
        Ok(Self {
            command,
            query,
            projector,
            stream,
        })
    }

    /// Reads the CPU time of the three services, their backends, Redis (when local) and the
    /// load generator; without a pool for the backends, of the processes only.
    async fn cpu_probe(&self, scratch: &Scratch, redis_url: &str) -> CpuProbe {
        let probe = CpuProbe::new(vec![
            ("command-service".into(), self.command.pid()),
            ("projector".into(), self.projector.pid()),
            ("query-service".into(), self.query.pid()),
        ])
        .with_local_redis(redis_url)
        .await;
        match scratch.pool("main", 1).await {
            Ok(pool) => probe.with_backends(pool),
            Err(err) => {
                eprintln!("cpu: cannot list the services' backends: {err:#}");
                probe
            }
        }
    }

    async fn stop(self, launcher: &Launcher, scratch: &Scratch, keep: bool) -> anyhow::Result<()> {
        launcher.stop(self.command).await?;
        launcher.stop(self.query).await?;
        launcher.stop(self.projector).await?;
        if !keep {
            scratch.delete_stream(&self.stream).await?;
            scratch.drop_database("main").await?;
        }
        Ok(())
    }
}

fn wants(selected: Scenario, scenario: Scenario) -> bool {
    selected == scenario || selected == Scenario::All
}

fn default_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
        .join("release")
}

/// Runs the selected scenarios and writes the outputs; returns the report.
pub async fn run(cli: Cli) -> anyhow::Result<Report> {
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let mut report = Report::new(command_line);
    let scratch = Scratch::new(&cli.target.postgres_url, &cli.target.redis_url)?;
    let sizing = &cli.sizing;
    let selected = cli.scenario;
    let warmup = Duration::from_secs(sizing.warmup_secs);
    let token = cli.target.api_token.clone();

    report.machine = match machine::describe(&cli.target.postgres_url, &cli.target.redis_url).await
    {
        Ok(machine) => Some(machine),
        Err(err) => {
            report.failures.push(format!("machine: {err:#}"));
            None
        }
    };

    let launcher = if cli.target.spawn {
        let bin_dir = cli.target.bin_dir.clone().unwrap_or_else(default_bin_dir);
        let log_dir = cli
            .output
            .log_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("bench-{}", scratch.run)));
        eprintln!(
            "bench: run {} (binaries {}, logs {})",
            scratch.run,
            bin_dir.display(),
            log_dir.display()
        );
        Some(Launcher::new(
            bin_dir,
            cli.target.redis_url.clone(),
            log_dir,
        )?)
    } else {
        None
    };

    // 1. The HTTP scenarios, on one stack.
    let http = [
        Scenario::Commands,
        Scenario::Hot,
        Scenario::Freshness,
        Scenario::Memory,
    ]
    .into_iter()
    .any(|s| wants(selected, s));
    if http {
        let stack = match &launcher {
            Some(launcher) => match Stack::start(launcher, &scratch).await {
                Ok(stack) => Some(stack),
                Err(err) => {
                    report
                        .failures
                        .push(format!("starting the services: {err:#}"));
                    None
                }
            },
            None => None,
        };
        let api = match &stack {
            Some(stack) => Some(
                Api::new(&stack.command.url, &stack.query.url, token.clone())?
                    .observe_cpu(stack.cpu_probe(&scratch, &cli.target.redis_url).await),
            ),
            None if launcher.is_none() => Some(Api::new(
                &cli.target.command_url,
                &cli.target.query_url,
                token.clone(),
            )?),
            None => None,
        };
        let mut watch = match (&stack, &api) {
            (Some(stack), Some(api)) => {
                let (client, base) = (api.http().clone(), stack.projector.url.clone());
                SweeperWatch::start(client, base, &mut report.failures).await
            }
            _ => None,
        };
        if let Some(api) = &api {
            let measure = Duration::from_secs(sizing.level_secs);
            if wants(selected, Scenario::Commands) || selected == Scenario::Memory {
                let levels = if selected == Scenario::Memory {
                    vec![sizing.concurrency.iter().copied().max().unwrap_or(64)]
                } else {
                    sizing.concurrency.clone()
                };
                match commands::sweep(api, &levels, warmup, measure).await {
                    Ok(sweep) => report.commands = Some(sweep),
                    Err(err) => report.failures.push(format!("commands: {err:#}")),
                }
            }
            if stack.is_some() {
                settle(&scratch).await;
                if (wants(selected, Scenario::Commands) || selected == Scenario::Memory)
                    && let Some(w) = watch.as_mut()
                    && !w.record(&mut report, "commands").await
                {
                    watch = None;
                }
            }
            if wants(selected, Scenario::Hot) || selected == Scenario::Memory {
                match commands::hot(
                    api,
                    sizing.hot_writers,
                    warmup,
                    Duration::from_secs(sizing.hot_secs),
                )
                .await
                {
                    Ok(hot) => report.hot = Some(hot),
                    Err(err) => report.failures.push(format!("hot: {err:#}")),
                }
            }
            if stack.is_some() {
                settle(&scratch).await;
                if (wants(selected, Scenario::Hot) || selected == Scenario::Memory)
                    && let Some(w) = watch.as_mut()
                    && !w.record(&mut report, "hot order").await
                {
                    watch = None;
                }
            }
            if wants(selected, Scenario::Freshness) {
                let rate = sizing.rate.unwrap_or_else(|| {
                    report
                        .saturation_level()
                        .map_or(DEFAULT_FRESHNESS_RATE, |level| level.commands_per_sec / 2.0)
                });
                let stream = stack
                    .as_ref()
                    .map_or(cli.target.event_stream.clone(), |s| s.stream.clone());
                let probe_pool = match &stack {
                    Some(_) => scratch.pool("main", 3).await.ok(),
                    None => None,
                };
                match freshness::run(
                    api,
                    &cli.target.redis_url,
                    &stream,
                    freshness::FreshnessPlan {
                        rate,
                        warmup,
                        measure: Duration::from_secs(sizing.freshness_secs),
                        clients: sizing
                            .freshness_clients
                            .unwrap_or_else(|| default_freshness_clients(rate)),
                        read_every: sizing.freshness_read_every,
                    },
                    probe_pool.clone(),
                )
                .await
                {
                    Ok(result) => report.freshness = Some(result),
                    Err(err) => report.failures.push(format!("freshness: {err:#}")),
                }
                if let Some(pool) = probe_pool {
                    pool.close().await;
                }
                if let Some(w) = watch.as_mut() {
                    settle(&scratch).await;
                    w.record(&mut report, "freshness").await;
                }
            }
        }
        if let (Some(stack), Some(launcher)) = (stack, &launcher) {
            stack.stop(launcher, &scratch, cli.target.keep).await?;
        }
    }

    // 2. The ceiling, with the services stopped so they neither compete nor hold connections.
    // Besides the configured batch sizes, one point at the service's concurrency with
    // transactions the size of the service's own group commit, measured by the sweep above.
    if wants(selected, Scenario::Ceiling) {
        let service_batch = service_batch(&report, &sizing.concurrency);
        let configurations = ceiling::plan(
            &sizing.concurrency,
            &sizing.ceiling_batches,
            Some(service_batch),
        );
        let result = async {
            let pool = scratch
                .migrated_pool("ceiling", ceiling::MAX_CEILING_CONNECTIONS as u32)
                .await?;
            let result = ceiling::run(
                &pool,
                &configurations,
                Some(service_batch),
                warmup,
                Duration::from_secs(sizing.ceiling_secs),
            )
            .await;
            pool.close().await;
            if !cli.target.keep {
                scratch.drop_database("ceiling").await?;
            }
            result
        }
        .await;
        match result {
            Ok(result) => report.ceiling = Some(result),
            Err(err) => report.failures.push(format!("ceiling: {err:#}")),
        }
    }

    // 3. The scenarios that start and restart services themselves.
    let spawned_only = [
        Scenario::LongStream,
        Scenario::Catchup,
        Scenario::Rebuild,
        Scenario::Follow,
    ];
    for scenario in spawned_only {
        if !wants(selected, scenario) {
            continue;
        }
        let Some(launcher) = &launcher else {
            report.failures.push(format!(
                "{scenario:?}: needs --spawn (it restarts services)"
            ));
            continue;
        };
        let outcome = match scenario {
            Scenario::LongStream => long_stream::run(
                &scratch,
                launcher,
                token.clone(),
                long_stream::LongStreamSizing {
                    long_events: sizing.long_events,
                    orders: sizing.long_orders,
                    warm_commands: sizing.long_commands,
                    snapshot_every: sizing.snapshot_every,
                    snapshot_off: sizing.snapshot_off,
                },
            )
            .await
            .map(|r| report.long_stream = Some(r)),
            Scenario::Catchup => catchup::run(
                &scratch,
                launcher,
                &cli.target.redis_url,
                sizing.catchup_events,
                &sizing.catchup_instances,
                &sizing.projections,
            )
            .await
            .map(|r| report.catchup = Some(r)),
            Scenario::Follow => {
                follow::run(&scratch, launcher, token.clone(), sizing.follow_events)
                    .await
                    .map(|r| report.follow = Some(r))
            }
            _ => rebuild::run(
                &scratch,
                launcher,
                sizing.rebuild_events,
                &sizing.rebuild_projection,
            )
            .await
            .map(|r| report.rebuild = Some(r)),
        };
        if let Err(err) = outcome {
            report.failures.push(format!("{scenario:?}: {err:#}"));
        }
    }

    if let Some(launcher) = &launcher {
        report.memory = Some(launcher.memory.lock().await.clone());
    }
    if !cli.target.keep
        && let Err(err) = scratch.drop_all().await
    {
        report.failures.push(format!("cleanup: {err:#}"));
    }
    report.finished_at = chrono::Utc::now().to_rfc3339();
    report.check_targets();
    write_outputs(&cli, &report)?;
    Ok(report)
}

fn write_outputs(cli: &Cli, report: &Report) -> anyhow::Result<()> {
    if let Some(out) = &cli.output.out {
        let json = serde_json::to_string_pretty(report).context("encode the results")?;
        std::fs::write(out, json).with_context(|| format!("write {}", out.display()))?;
    }
    if let Some(sweep) = &report.commands
        && sweep.levels.len() > 1
    {
        let top = sweep.levels.iter().map(|l| l.clients).max().unwrap_or(0);
        let ceiling = report
            .ceiling
            .as_ref()
            .and_then(|c| c.best_at(top.min(ceiling::MAX_CEILING_CONNECTIONS)))
            .map(|p| (p.events_per_sec, p.rows_per_transaction));
        let subtitle = match &report.machine {
            Some(m) => format!(
                "{} × {}, PostgreSQL {} (synchronous_commit={}), {}",
                m.cpus,
                m.cpu_model,
                m.postgres_version.split_whitespace().next().unwrap_or(""),
                m.synchronous_commit,
                report.started_at.get(..10).unwrap_or(&report.started_at)
            ),
            None => report.started_at.clone(),
        };
        let svg = chart::render(&sweep.levels, ceiling, &subtitle);
        if let Some(parent) = cli.output.svg.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        std::fs::write(&cli.output.svg, svg)
            .with_context(|| format!("write {}", cli.output.svg.display()))?;
    }
    Ok(())
}

/// Longest wait for the read side to catch up between scenarios.
const SETTLE_LIMIT: Duration = Duration::from_secs(180);

/// Longest wait for the projector's `/metrics`: a projector that does not answer must not hold
/// up the run.
const PROJECTOR_SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// The projector's counters ([`crate::metrics::PROJECTOR_COUNTERS`]) read around each HTTP
/// scenario, when the tool started the projector: what its sweeper did meanwhile.
struct SweeperWatch {
    client: reqwest::Client,
    base: String,
    before: crate::metrics::Scrape,
}

impl SweeperWatch {
    /// Starts watching the projector at `base`; `None` when its counters cannot be read (the
    /// reason recorded in `failures`).
    async fn start(
        client: reqwest::Client,
        base: String,
        failures: &mut Vec<String>,
    ) -> Option<Self> {
        let before = read_counters(&client, &base, failures).await?;
        Some(Self {
            client,
            base,
            before,
        })
    }

    /// Records what the sweeper did since the last reading as `scenario`'s. `false` when the
    /// counters could not be read (the reason recorded): the watch is over, so a projector
    /// that stopped answering is reported once, not at every scenario.
    async fn record(&mut self, report: &mut Report, scenario: &str) -> bool {
        let Some(after) = read_counters(&self.client, &self.base, &mut report.failures).await
        else {
            return false;
        };
        let counters = crate::metrics::PROJECTOR_COUNTERS;
        let increase = crate::metrics::breakdown(&self.before, &after, &[], &counters);
        let [healed, duplicates] = counters.map(|name| increase[name].max(0.0));
        report.sweeper.push(crate::report::SweeperActivity {
            scenario: scenario.to_owned(),
            healed_events: healed,
            duplicates,
        });
        self.before = after;
        true
    }
}

/// The projector's counters now. A projector that does not answer, or exports neither of
/// [`crate::metrics::PROJECTOR_COUNTERS`] (a release from before them), is a failure of the run
/// (recorded in `failures`), not a row of zeros.
async fn read_counters(
    client: &reqwest::Client,
    base: &str,
    failures: &mut Vec<String>,
) -> Option<crate::metrics::Scrape> {
    let scraped = tokio::time::timeout(
        PROJECTOR_SCRAPE_TIMEOUT,
        crate::metrics::scrape(client, base),
    )
    .await
    .unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "no answer within {PROJECTOR_SCRAPE_TIMEOUT:?}"
        ))
    });
    let failure = match scraped {
        Ok(scrape) => match crate::metrics::PROJECTOR_COUNTERS
            .into_iter()
            .find(|name| !scrape.contains_key(*name))
        {
            None => return Some(scrape),
            Some(name) => format!("the projector exports no {name}"),
        },
        Err(err) => format!("the projector's /metrics: {err:#}"),
    };
    failures.push(format!("the sweeper's activity: {failure}"));
    None
}

/// Waits until both projections' checkpoints reach the head of the log, so a scenario does not
/// measure the previous scenario's backlog being worked off on the same two cores.
async fn settle(scratch: &Scratch) {
    let Ok(pool) = scratch.pool("main", 1).await else {
        return;
    };
    let started = std::time::Instant::now();
    loop {
        let behind: Result<i64, sqlx::Error> = sqlx::query_scalar(
            "SELECT (SELECT COALESCE(max(global_position), 0) FROM events) \
                  - COALESCE((SELECT min(position) FROM projection_checkpoints), 0)",
        )
        .fetch_one(&pool)
        .await;
        match behind {
            Ok(behind) if behind <= 0 => break,
            Ok(_) if started.elapsed() < SETTLE_LIMIT => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(behind) => {
                eprintln!("settle: still {behind} events behind after {SETTLE_LIMIT:?}; going on");
                break;
            }
            Err(err) => {
                eprintln!("settle: cannot read the checkpoints: {err}");
                break;
            }
        }
    }
    eprintln!(
        "settle: read side caught up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    pool.close().await;
}

/// The service-sized ceiling point: the concurrency of the sweep's saturation level and its
/// mean requests per group commit when the sweep ran, else the highest concurrency asked for
/// and [`ceiling::SERVICE_BATCH_FALLBACK_ROWS`].
fn service_batch(report: &Report, concurrency: &[usize]) -> ceiling::ServiceBatch {
    match report.saturation_level() {
        Some(level) => ceiling::ServiceBatch::new(
            level.clients,
            level
                .breakdown
                .get(crate::metrics::BATCH_REQUESTS_MEAN)
                .copied(),
        ),
        None => ceiling::ServiceBatch::new(concurrency.iter().copied().max().unwrap_or(64), None),
    }
}

/// Freshness clients for `rate`: a client is busy only while its command is in flight (its
/// read-backs run on their own, see [`freshness`]), so one client per 40 commands a second lets
/// a command take up to 25 ms, about the mean at saturation, without ticks waiting for a client
/// (which the run counts as late past [`freshness::LATE_AFTER`]). No more than that: idle
/// clients turn every stall into a burst of concurrent commands.
fn default_freshness_clients(rate: f64) -> usize {
    ((rate / 40.0).ceil() as usize).max(64)
}
