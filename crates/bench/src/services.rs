//! Running the real service binaries as child processes: each on a free loopback port, against
//! a given database and Redis stream key, logs to files, peak RSS sampled from /proc while it
//! runs. Stopping is SIGTERM (the services drain and exit 0), then SIGKILL after a deadline.
//!
//! Peak RSS is `VmHWM`, a high-water mark, so one reading after the peak is exact; but /proc
//! stops showing it the moment the process exits (a zombie has no memory map). So besides the
//! sampling, a service is read just before it is sent SIGTERM, and a one-shot command (e.g.
//! `projector rebuild`) as each line of its output arrives: it prints its summary when its
//! work is done, just before it exits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

/// How long a spawned service may take to answer `/readyz` (it creates and migrates its
/// database first).
pub const READY_DEADLINE: Duration = Duration::from_secs(60);

/// How long a service may take to drain after SIGTERM before it is killed.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// How often the peak RSS of a child is sampled (VmHWM is a high-water mark, so sampling only
/// has to catch the process before it exits; the final readings are taken apart, see the
/// module docs).
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The three binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Service {
    CommandService,
    QueryService,
    Projector,
}

impl Service {
    /// The binary's file name.
    pub fn binary(self) -> &'static str {
        match self {
            Service::CommandService => "command-service",
            Service::QueryService => "query-service",
            Service::Projector => "projector",
        }
    }
}

/// Where the binaries are, and which servers the spawned services use.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub bin_dir: PathBuf,
    pub redis_url: String,
    pub log_dir: PathBuf,
    /// Peak RSS per service and scenario, filled as children stop.
    pub memory: Arc<Mutex<MemoryLog>>,
}

/// Peak RSS (VmHWM) of every stopped child: the highest per service, and where it was seen.
#[derive(Debug, Default, Clone, Serialize)]
pub struct MemoryLog {
    pub peaks: BTreeMap<String, MemoryPeak>,
}

/// The highest peak RSS seen for one service.
#[derive(Debug, Default, Clone, Serialize)]
pub struct MemoryPeak {
    pub peak_rss_mb: f64,
    /// The scenario during which it was reached.
    pub scenario: String,
    /// How many processes of this service were measured.
    pub processes: usize,
    /// Processes whose final reading came too late (the process had already exited), so their
    /// figure is the last periodic sample, up to [`RSS_SAMPLE_EVERY`] old.
    pub final_reading_missed: usize,
}

/// A running child service.
pub struct Running {
    pub service: Service,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Which scenario started it, for the memory report.
    pub scenario: String,
    child: Child,
    pid: u32,
    peak_kb: Arc<AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
}

impl Launcher {
    /// A launcher for the binaries in `bin_dir`.
    pub fn new(bin_dir: PathBuf, redis_url: String, log_dir: PathBuf) -> anyhow::Result<Self> {
        for service in [
            Service::CommandService,
            Service::QueryService,
            Service::Projector,
        ] {
            let path = bin_dir.join(service.binary());
            if !path.is_file() {
                bail!(
                    "invalid BENCH_BIN_DIR: {} not found (build with `cargo build --release -p {}`)",
                    path.display(),
                    service.binary()
                );
            }
        }
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("create log directory {}", log_dir.display()))?;
        Ok(Self {
            bin_dir,
            redis_url,
            log_dir,
            memory: Default::default(),
        })
    }

    /// Starts `service` serving on a free port against `database_url` and `stream`, with extra
    /// environment, and waits until it is ready.
    pub async fn start(
        &self,
        service: Service,
        scenario: &str,
        database_url: &str,
        stream: &str,
        extra_env: &[(&str, String)],
    ) -> anyhow::Result<Running> {
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let mut command = self.command(service, database_url, stream, extra_env);
        command.env("LISTEN_ADDR", format!("127.0.0.1:{port}"));
        let log_name = format!("{scenario}-{}-{port}.log", service.binary());
        let (stdout, stderr) = log_files(&self.log_dir.join(&log_name))?;
        command.stdout(stdout).stderr(stderr).kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("start {}", service.binary()))?;
        let pid = child.id().context("a just-spawned child has a pid")?;
        let peak_kb = Arc::new(AtomicU64::new(0));
        let sampler = tokio::spawn(sample_peak_rss(pid, peak_kb.clone()));
        let mut running = Running {
            service,
            url,
            scenario: scenario.to_owned(),
            child,
            pid,
            peak_kb,
            sampler,
        };
        if let Err(err) = running.wait_ready().await {
            let _ = self.stop(running).await;
            return Err(err.context(format!(
                "{} did not become ready; see {}",
                service.binary(),
                self.log_dir.join(log_name).display()
            )));
        }
        Ok(running)
    }

    /// Runs a one-shot subcommand of a binary (e.g. `projector rebuild order_summaries`) to
    /// completion, recording its peak RSS (read as each line of its output arrives, so the last
    /// reading is taken when it reports done, before it exits); returns how long it ran and the
    /// file holding what it printed.
    pub async fn run_to_completion(
        &self,
        service: Service,
        scenario: &str,
        args: &[&str],
        database_url: &str,
        stream: &str,
        extra_env: &[(&str, String)],
    ) -> anyhow::Result<(Duration, PathBuf)> {
        let mut command = self.command(service, database_url, stream, extra_env);
        command.args(args);
        let log_name = format!("{scenario}-{}-{}.log", service.binary(), args.join("-"));
        let log_path = self.log_dir.join(&log_name);
        let (stdout_log, stderr_log) = log_files(&log_path)?;
        command
            .stdout(Stdio::piped())
            .stderr(stderr_log)
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("start {} {}", service.binary(), args.join(" ")))?;
        let pid = child.id().context("a just-spawned child has a pid")?;
        let peak_kb = Arc::new(AtomicU64::new(0));
        let sampler = tokio::spawn(sample_peak_rss(pid, peak_kb.clone()));
        let output = child.stdout.take().context("the child's stdout is piped")?;
        let forwarder = tokio::spawn(forward_output(output, stdout_log, pid, peak_kb.clone()));
        let status = child.wait().await.context("wait for the child")?;
        let elapsed = started.elapsed();
        sampler.abort();
        let read_at_exit = forwarder.await.context("forward the child's output")??;
        if !read_at_exit {
            eprintln!(
                "{}: exited before its peak RSS could be read at its last line; reporting the \
                 last {RSS_SAMPLE_EVERY:?} sample",
                service.binary()
            );
        }
        self.note_peak(
            service,
            scenario,
            peak_kb.load(Ordering::Relaxed),
            read_at_exit,
        )
        .await;
        if !status.success() {
            bail!(
                "{} {} exited with {status}; see {}",
                service.binary(),
                args.join(" "),
                log_path.display()
            );
        }
        Ok((elapsed, log_path))
    }

    fn command(
        &self,
        service: Service,
        database_url: &str,
        stream: &str,
        extra_env: &[(&str, String)],
    ) -> Command {
        let mut command = Command::new(self.bin_dir.join(service.binary()));
        command
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", &self.redis_url)
            .env("EVENT_STREAM", stream)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .env_remove("API_TOKEN")
            .stdin(Stdio::null());
        for (key, value) in extra_env {
            command.env(key, value);
        }
        command
    }

    /// Stops a child: SIGTERM, wait for the drain, SIGKILL past [`STOP_DEADLINE`]. Records its
    /// peak RSS.
    pub async fn stop(&self, mut running: Running) -> anyhow::Result<()> {
        // The final reading, while the process still runs: once it exits, /proc has no VmHWM.
        let before_stop = read_peak_kb(running.pid);
        let peak = running.peak_kb.load(Ordering::Relaxed).max(before_stop);
        running.peak_kb.store(peak, Ordering::Relaxed);
        // SIGTERM through kill(1): the tool forbids unsafe code, so no libc call.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(running.pid.to_string())
            .status()
            .await;
        let exited = tokio::time::timeout(STOP_DEADLINE, running.child.wait()).await;
        if exited.is_err() {
            tracing::warn!(
                service = running.service.binary(),
                "did not drain in time; killing"
            );
            let _ = running.child.kill().await;
        }
        running.sampler.abort();
        self.note_peak(running.service, &running.scenario, peak, before_stop > 0)
            .await;
        Ok(())
    }

    async fn note_peak(&self, service: Service, scenario: &str, peak_kb: u64, read_at_exit: bool) {
        let mut memory = self.memory.lock().await;
        let entry = memory.peaks.entry(service.binary().to_owned()).or_default();
        entry.processes += 1;
        entry.final_reading_missed += usize::from(!read_at_exit);
        // Decimal megabytes, the unit of the target (100 MB).
        let mb = peak_kb as f64 * 1024.0 / 1_000_000.0;
        if mb > entry.peak_rss_mb {
            entry.peak_rss_mb = mb;
            entry.scenario = scenario.to_owned();
        }
    }
}

impl Running {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The highest RSS sampled so far, in MB (10^6 bytes).
    pub fn peak_rss_mb(&self) -> f64 {
        self.peak_kb
            .load(Ordering::Relaxed)
            .max(read_peak_kb(self.pid)) as f64
            * 1024.0
            / 1_000_000.0
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .context("build an HTTP client")?;
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().context("poll the child")? {
                bail!("exited with {status} before becoming ready");
            }
            if let Ok(response) = client.get(format!("{}/readyz", self.url)).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not ready within {READY_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A port that was free a moment ago (bind to port 0, read it, release it).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(listener.local_addr().context("read the free port")?.port())
}

fn log_files(path: &Path) -> anyhow::Result<(std::fs::File, std::fs::File)> {
    let file = std::fs::File::create(path)
        .with_context(|| format!("create log file {}", path.display()))?;
    let clone = file.try_clone().context("share the log file")?;
    Ok((file, clone))
}

/// `VmHWM` (peak resident set) of a process in KiB, 0 when it cannot be read.
pub fn read_peak_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| parse_vm_hwm(&status))
        .unwrap_or(0)
}

/// `VmRSS` (resident set now) of a process in KiB, `None` when it cannot be read.
pub fn read_resident_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| parse_status_kb(&status, "VmRSS:"))
}

/// The `VmHWM:` line of /proc/<pid>/status, in KiB.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    parse_status_kb(status, "VmHWM:")
}

/// The KiB figure of one line (`VmHWM:`, `VmRSS:`, …) of /proc/<pid>/status.
fn parse_status_kb(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
}

/// Copies a one-shot child's stdout to its log line by line, reading its `VmHWM` as each line
/// arrives, before writing it. Returns whether the reading at the last line found the process
/// still running (a one-shot command prints its summary when done, then exits).
async fn forward_output(
    output: tokio::process::ChildStdout,
    mut log: std::fs::File,
    pid: u32,
    peak_kb: Arc<AtomicU64>,
) -> anyhow::Result<bool> {
    use std::io::Write;
    use tokio::io::AsyncBufReadExt;

    let mut lines = tokio::io::BufReader::new(output).lines();
    let mut read_at_last_line = false;
    while let Some(line) = lines.next_line().await.context("read the child's output")? {
        let kb = read_peak_kb(pid);
        peak_kb.fetch_max(kb, Ordering::Relaxed);
        read_at_last_line = kb > 0;
        writeln!(log, "{line}").context("write the child's output to its log")?;
    }
    Ok(read_at_last_line)
}

async fn sample_peak_rss(pid: u32, peak_kb: Arc<AtomicU64>) {
    loop {
        let kb = read_peak_kb(pid);
        peak_kb.fetch_max(kb, Ordering::Relaxed);
        tokio::time::sleep(RSS_SAMPLE_EVERY).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_resident_set_is_read_from_the_vmhwm_line() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(12345));
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
        assert_eq!(parse_status_kb(status, "VmRSS:"), Some(100));
    }

    #[tokio::test]
    async fn a_one_shot_commands_output_reaches_its_log_and_its_peak_is_read_at_its_last_line() {
        let dir = std::env::temp_dir().join(format!("bench-forward-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log_path = dir.join("out.log");
        let log = std::fs::File::create(&log_path).unwrap();
        // Done, then a moment of shutdown before it exits, as a rebuild does.
        let mut child = Command::new("sh")
            .args(["-c", "echo working; echo done; sleep 0.3"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let peak_kb = Arc::new(AtomicU64::new(0));
        let output = child.stdout.take().unwrap();
        let forwarded = tokio::spawn(forward_output(output, log, pid, peak_kb.clone()));
        let _ = child.wait().await;
        let read_at_exit = forwarded.await.unwrap().unwrap();
        assert!(
            read_at_exit,
            "the reading at the last line found the process running"
        );
        assert!(peak_kb.load(Ordering::Relaxed) > 0);
        assert_eq!(
            std::fs::read_to_string(&log_path).unwrap(),
            "working\ndone\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn this_process_has_a_readable_peak_resident_set() {
        assert!(read_peak_kb(std::process::id()) > 0);
    }
}
