//! Test helpers (feature `test-util`): unique keys on the shared Redis, a wait-until loop, and
//! a private `redis-server` that a test may stop and restart without disturbing anyone else.
//!
//! Never flush or stop the shared server at `127.0.0.1:6379`; isolate with [`unique_keys`].

use std::future::Future;
use std::io;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::keys::{DEFAULT_EVENT_STREAM, StreamKeys};

/// The shared Redis for tests: `REDIS_URL`, or `redis://127.0.0.1:6379`.
pub fn shared_redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other test uses: `test-<uuid>:`.
pub fn unique_prefix() -> String {
    format!("test-{}:", uuid::Uuid::new_v4())
}

/// Stream keys under a fresh prefix: `test-<uuid>:es:events`.
pub fn unique_keys() -> StreamKeys {
    StreamKeys::new(format!("{}{DEFAULT_EVENT_STREAM}", unique_prefix()))
}

/// Polls `check` every 20 ms until it returns `Some`, and returns that; panics naming `what`
/// once `deadline` has passed.
pub async fn wait_until<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a freshly spawned server may take to answer PING.
const STARTUP_DEADLINE: Duration = Duration::from_secs(10);

/// A `redis-server` process of this test alone, on a free port, without persistence; killed
/// when dropped. The binary is `REDIS_SERVER_BIN` or `redis-server` from `PATH`.
#[derive(Debug)]
pub struct PrivateRedis {
    /// The TCP port it listens on (kept across [`PrivateRedis::start_again`]).
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts a server on a free port and waits until it answers PING.
    pub async fn start() -> io::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut redis = Self { port, child: None };
        redis.start_again().await?;
        Ok(redis)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Whether the process is running (as far as this handle knows).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL: like a crash, everything in it is lost).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The process may already be gone; either way it is not running afterwards.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty, and waits until it answers PING.
    pub async fn start_again(&mut self) -> io::Result<()> {
        self.stop();
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned());
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < STARTUP_DEADLINE {
            if ping(self.port).await {
                return Ok(());
            }
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                self.child = None;
                return Err(io::Error::other(format!(
                    "redis-server on port {} exited at start: {status}",
                    self.port
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop();
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("redis-server on port {} did not answer PING", self.port),
        ))
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"+PONG\r\n"
    )
}
