//! Test helpers (feature `test-util`): unique keys on the shared Redis, a wait-until loop, and
//! a private `redis-server` that a test may stop and restart without disturbing anyone else,
//! optionally speaking only TLS with certificates made for the test ([`TestCertificates`]).
//!
//! Never flush or stop the shared server at `127.0.0.1:6379`; isolate with [`unique_keys`].

use std::future::Future;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// Sets `maxmemory` of the Redis behind `conn` (bytes; 0 is no limit), with `noeviction`: over
/// it, Redis refuses every write that adds data (`OOM command not allowed …`), as a full server
/// does. Only for a [`PrivateRedis`]: never the shared server.
pub async fn set_maxmemory(conn: &redis::aio::ConnectionManager, bytes: u64) {
    let mut conn = conn.clone();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .arg("maxmemory")
        .arg(bytes)
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET maxmemory");
}

/// How long a freshly spawned server may take to answer.
const STARTUP_DEADLINE: Duration = Duration::from_secs(10);

/// How many free ports a first start tries: the port is found by binding port 0 and releasing
/// it, so another process may take it before the server binds it.
const START_ATTEMPTS: usize = 5;

/// A `redis-server` process of this test alone, on a free port, without persistence; killed
/// when dropped. The binary is `REDIS_SERVER_BIN` or `redis-server` from `PATH`.
///
/// A start returns only once the server answering on the port says it is this very process
/// (`INFO server`'s `process_id`), so a test never talks to another test's server that took
/// the port in between.
#[derive(Debug)]
pub struct PrivateRedis {
    /// The TCP port it listens on (kept across [`PrivateRedis::start_again`]).
    pub port: u16,
    child: Option<Child>,
    tls: Option<ServerTls>,
}

/// How a TLS-only server authenticates itself and its clients.
#[derive(Debug, Clone)]
struct ServerTls {
    /// The directory of a [`TestCertificates`].
    certificates: PathBuf,
    require_client_certificates: bool,
}

impl PrivateRedis {
    /// Starts a server on a free port and waits until it answers.
    pub async fn start() -> io::Result<Self> {
        Self::start_with(None).await
    }

    /// Starts a server that speaks only TLS, with the server certificate of `certificates`
    /// (for `localhost` and `127.0.0.1`), and waits until it answers over TLS. With
    /// `require_client_certificates` it refuses clients without a certificate of that CA
    /// (`tls-auth-clients yes`). Keep `certificates` for as long as the server: it reads their
    /// files, again on [`PrivateRedis::start_again`].
    pub async fn start_tls(
        certificates: &TestCertificates,
        require_client_certificates: bool,
    ) -> io::Result<Self> {
        Self::start_with(Some(ServerTls {
            certificates: certificates.dir.clone(),
            require_client_certificates,
        }))
        .await
    }

    /// Starts on a free port, on another one when something took the port first.
    async fn start_with(tls: Option<ServerTls>) -> io::Result<Self> {
        let mut taken = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let mut redis = Self {
                port,
                child: None,
                tls: tls.clone(),
            };
            match redis.start_again().await {
                Ok(()) => return Ok(redis),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => taken.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("no free port for redis-server after {START_ATTEMPTS} tries: {taken:?}"),
        ))
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://localhost:<port>` for a TLS server.
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(_) => format!("rediss://localhost:{}", self.port),
        }
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

    /// Starts the server again on the same port, empty, and waits until it answers.
    ///
    /// Fails with [`io::ErrorKind::AddrInUse`] when another process holds the port (it was
    /// free when this server last released it, but anyone may take a free port): a test
    /// that restarts Redis cannot go on then, and must not go on against someone else's server.
    pub async fn start_again(&mut self) -> io::Result<()> {
        self.stop();
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned());
        let mut command = Command::new(bin);
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some(tls) => {
                let file = |name: &str| tls.certificates.join(name);
                command
                    .args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(file(SERVER_CERT))
                    .arg("--tls-key-file")
                    .arg(file(SERVER_KEY))
                    .arg("--tls-ca-cert-file")
                    .arg(file(CA_CERT))
                    .args([
                        "--tls-auth-clients",
                        if tls.require_client_certificates {
                            "yes"
                        } else {
                            "no"
                        },
                    ])
            }
        };
        let child = command
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
        let pid = child.id();
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < STARTUP_DEADLINE {
            // Whether the child is still there first: a server answering on the port after the
            // child exited is somebody else's.
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                self.child = None;
                if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "redis-server could not listen on port {}: another process holds it",
                            self.port
                        ),
                    ));
                }
                return Err(io::Error::other(format!(
                    "redis-server on port {} exited at start: {status}",
                    self.port
                )));
            }
            match self.answering_process().await {
                Some(answering) if answering == pid => return Ok(()),
                Some(foreign) => {
                    self.stop();
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "port {} is answered by another redis-server (process {foreign}), \
                             not the one this test started (process {pid})",
                            self.port
                        ),
                    ));
                }
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop();
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("redis-server on port {} did not answer", self.port),
        ))
    }

    /// The `process_id` of the Redis server answering on the port, if one answers.
    async fn answering_process(&self) -> Option<u32> {
        let client = match &self.tls {
            None => redis::Client::open(self.url()).ok()?,
            Some(tls) => {
                let certificates = client_tls_in(&tls.certificates).ok()?;
                redis::Client::build_with_tls(self.url(), certificates).ok()?
            }
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .ok()?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .ok()?;
        info.lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok())
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The files [`TestCertificates::generate`] writes.
const CA_CERT: &str = "ca.crt";
const SERVER_CERT: &str = "server.crt";
const SERVER_KEY: &str = "server.key";
const CLIENT_CERT: &str = "client.crt";
const CLIENT_KEY: &str = "client.key";

/// A certificate authority made for one test, with a server certificate for `localhost` and
/// `127.0.0.1` and a client certificate it signed, as PEM files in a directory of their own
/// (removed on drop). Made with the `openssl` command (`OPENSSL_BIN`), P-256 keys, valid 2 days.
#[derive(Debug)]
pub struct TestCertificates {
    dir: PathBuf,
}

impl TestCertificates {
    /// Makes the authority and both certificates.
    pub fn generate() -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("test-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let certificates = Self { dir };
        const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        certificates.openssl(&format!(
            "req -x509 {NEW_KEY} -days 2 -subj /CN=test-CA -keyout ca.key -out {CA_CERT}"
        ))?;
        // The extensions make them X.509 v3 certificates, the only version rustls accepts.
        for (name, extensions) in [
            (
                "server",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(certificates.dir.join(format!("{name}.ext")), extensions)?;
            certificates.openssl(&format!(
                "req {NEW_KEY} -subj /CN=test-{name} -keyout {name}.key -out {name}.csr"
            ))?;
            certificates.openssl(&format!(
                "x509 -req -in {name}.csr -CA {CA_CERT} -CAkey ca.key -CAcreateserial -days 2 \
                 -extfile {name}.ext -out {name}.crt"
            ))?;
        }
        Ok(certificates)
    }

    /// Runs `openssl` with `args` (split at whitespace) in the certificates' directory.
    fn openssl(&self, args: &str) -> io::Result<()> {
        let bin = std::env::var("OPENSSL_BIN").unwrap_or_else(|_| "openssl".to_owned());
        let output = Command::new(bin)
            .args(args.split_whitespace())
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()?;
        if output.status.success() {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "openssl {args} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )))
    }

    /// The CA certificate (PEM): what a client trusts.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    /// The client certificate (PEM), signed by the CA.
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join(CLIENT_CERT)
    }

    /// The client certificate's private key (PEM).
    pub fn client_key(&self) -> PathBuf {
        self.dir.join(CLIENT_KEY)
    }

    /// The server certificate (PEM), signed by the CA: a certificate that is not an authority.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join(SERVER_CERT)
    }

    /// What a redis-rs client needs to trust the CA and present the client certificate.
    pub fn client_tls(&self) -> io::Result<redis::TlsCertificates> {
        client_tls_in(&self.dir)
    }
}

/// What a redis-rs client needs to trust the CA of the certificates in `dir` and present their
/// client certificate.
fn client_tls_in(dir: &Path) -> io::Result<redis::TlsCertificates> {
    Ok(redis::TlsCertificates {
        client_tls: Some(redis::ClientTlsConfig {
            client_cert: std::fs::read(dir.join(CLIENT_CERT))?,
            client_key: std::fs::read(dir.join(CLIENT_KEY))?,
        }),
        root_cert: Some(std::fs::read(dir.join(CA_CERT))?),
    })
}

impl Drop for TestCertificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
