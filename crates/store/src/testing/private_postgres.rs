//! A PostgreSQL server of one test alone: its own cluster in a temporary directory, on a free
//! port, that the test can crash (`pg_ctl stop -m immediate`: every backend killed, nothing
//! flushed beyond what the WAL already holds) and start again on the same port and data, the way
//! a database fails over or restarts under running services, or back up and restore (a cold
//! copy of its data directory). The shared server is never touched.
//!
//! The binaries come from `PG_BIN_DIR`, else the newest `/usr/lib/postgresql/<version>/bin`
//! (Debian's layout), else `PATH`. PostgreSQL refuses to run as root, so a test running as root
//! runs them as the `postgres` user through `runuser`.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// Longest `pg_ctl` waits for the server to start or stop (its `-t`); a fresh cluster starts in
/// well under a second here, a crashed one replays its WAL first.
const PG_CTL_WAIT: Duration = Duration::from_secs(60);

/// A private PostgreSQL cluster; crashed and its directory removed when dropped.
///
/// The crash on drop does not rely on [`PrivatePostgres::is_running`] alone: a `pg_ctl start`
/// that failed or timed out may still have left a postmaster running (it was slow to accept
/// connections, or failed after forking), which would outlive the test and keep its port if the
/// directory were simply removed. Whenever the cluster holds a `postmaster.pid` the server is
/// stopped first.
#[derive(Debug)]
pub struct PrivatePostgres {
    bin_dir: PathBuf,
    /// Holds the cluster (`data/`), its socket and its log; writable by the server's user.
    dir: PathBuf,
    port: u16,
    /// Whether the binaries run as `postgres` through `runuser` (the test runs as root).
    as_postgres_user: bool,
    running: bool,
}

impl PrivatePostgres {
    /// Creates a cluster with trust authentication for `postgres` and starts it on a free port.
    pub async fn start() -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("test-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        // The server's own user (not the test's, when the test is root) writes the cluster, the
        // socket and the log here.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
        let mut server = Self {
            bin_dir: bin_dir()?,
            dir,
            port: free_port()?,
            as_postgres_user: runs_as_root()?,
            running: false,
        };
        let data = server.data_dir();
        server
            .run(
                "initdb",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-U".as_ref(),
                    "postgres".as_ref(),
                    "-A".as_ref(),
                    "trust".as_ref(),
                    "-E".as_ref(),
                    "UTF8".as_ref(),
                    // The cluster lives as long as one test; nothing to gain from syncing it.
                    "--no-sync".as_ref(),
                ],
            )
            .await?;
        server.start_again().await?;
        Ok(server)
    }

    /// The URL of `database` on this server (which the services create at start if missing).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    /// Whether the server is running (as far as this handle knows).
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Crashes the server: every backend is killed at once, open transactions are lost and
    /// committed ones survive in the WAL, as after a power cut of the database alone.
    pub async fn crash(&mut self) -> io::Result<()> {
        let data = self.data_dir();
        self.pg_ctl(&["stop", "-m", "immediate"], &data).await?;
        self.running = false;
        Ok(())
    }

    /// Starts the server on its port and data (recovering from a crash first) and returns once
    /// it accepts connections.
    pub async fn start_again(&mut self) -> io::Result<()> {
        let data = self.data_dir();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        self.pg_ctl(
            &[
                "start",
                "-o",
                &options,
                "-l",
                log.to_str()
                    .ok_or_else(|| io::Error::other("non-UTF-8 path"))?,
            ],
            &data,
        )
        .await?;
        self.running = true;
        Ok(())
    }

    /// Takes a cold backup: stops the server cleanly, copies its data directory, and starts it
    /// again; returns the copy, for [`PrivatePostgres::restore`].
    pub async fn backup(&mut self) -> io::Result<PathBuf> {
        let data = self.data_dir();
        self.pg_ctl(&["stop", "-m", "fast"], &data).await?;
        self.running = false;
        let copy = self
            .dir
            .join(format!("backup-{}", uuid::Uuid::new_v4().simple()));
        copy_tree(&data, &copy).await?;
        self.start_again().await?;
        Ok(copy)
    }

    /// Restores `backup` (from [`PrivatePostgres::backup`]): the server crashes, its data is
    /// replaced by the copy, and it starts again on the same port, with everything committed
    /// after the backup gone, as after a restore from a backup.
    pub async fn restore(&mut self, backup: &Path) -> io::Result<()> {
        if self.running {
            self.crash().await?;
        }
        let data = self.data_dir();
        std::fs::remove_dir_all(&data)?;
        copy_tree(backup, &data).await?;
        self.start_again().await
    }

    /// The server's log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    async fn pg_ctl(&self, args: &[&str], data: &Path) -> io::Result<()> {
        let wait = PG_CTL_WAIT.as_secs().to_string();
        let mut all: Vec<&std::ffi::OsStr> = vec!["-D".as_ref(), data.as_os_str()];
        all.extend([
            "-w".as_ref(),
            "-t".as_ref(),
            wait.as_ref() as &std::ffi::OsStr,
        ]);
        all.extend(args.iter().map(|a| a.as_ref() as &std::ffi::OsStr));
        self.run("pg_ctl", &all).await
    }

    /// Runs one of the server's binaries to completion; its output is the error when it fails.
    async fn run(&self, binary: &str, args: &[&std::ffi::OsStr]) -> io::Result<()> {
        let program = self.bin_dir.join(binary);
        let mut command = if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        let output = command
            .args(args)
            // The server's working directory must be readable by its user.
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .await?;
        succeeded(binary, &output)
    }
}

/// `Ok` when the program exited 0; otherwise its status and output, naming `what` ran.
fn succeeded(what: &str, output: &std::process::Output) -> io::Result<()> {
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

/// `cp -a`: a copy with owners and modes kept, as the server requires of its data directory.
async fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let output = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .await?;
    succeeded(
        &format!("cp -a {} {}", from.display(), to.display()),
        &output,
    )
}

impl PrivatePostgres {
    /// Whether a postmaster may be running on this cluster: this handle started it, or a start
    /// left its lock file behind (a postmaster removes `postmaster.pid` when it exits).
    fn may_be_running(&self) -> bool {
        self.running || self.data_dir().join("postmaster.pid").exists()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.may_be_running() {
            let data = self.data_dir();
            let mut command = if self.as_postgres_user {
                let mut command = std::process::Command::new("runuser");
                command
                    .args(["-u", "postgres", "--"])
                    .arg(self.bin_dir.join("pg_ctl"));
                command
            } else {
                std::process::Command::new(self.bin_dir.join("pg_ctl"))
            };
            let _ = command
                .arg("-D")
                .arg(&data)
                .args(["-w", "stop", "-m", "immediate"])
                .current_dir(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where `initdb` and `pg_ctl` are.
fn bin_dir() -> io::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let newest_debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    if let Some((_, bin)) = newest_debian {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| dir.join("initdb").exists())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no initdb: install PostgreSQL's server binaries or set PG_BIN_DIR",
            )
        })
}

/// Whether this process runs as root (`/proc/self` belongs to the effective user).
fn runs_as_root() -> io::Result<bool> {
    Ok(std::fs::metadata("/proc/self")?.uid() == 0)
}

fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
