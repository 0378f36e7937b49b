//! The real `command-service` binary as a process: graceful exit on SIGTERM, and a one-line
//! non-zero exit on a bad setting.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use store::testing::TestDatabase;
use uuid::Uuid;

const BINARY: &str = env!("CARGO_BIN_EXE_command-service");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary with a clean environment apart from what the test sets.
fn command() -> Command {
    let mut command = Command::new(BINARY);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RELAY_ENABLED", "false")
        .env("LOG_FORMAT", "json")
        .env("DB_MAX_CONNECTIONS", "3")
        .env("REDIS_URL", bus::testing::shared_redis_url())
        .env(
            "EVENT_STREAM",
            format!("test-{}:es:events", Uuid::new_v4().simple()),
        )
        .stdout(Stdio::null());
    command
}

/// A running `command-service` process, killed when dropped (a failing test leaves nothing
/// running), with the lines it has written to stderr so far.
struct Service {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Service {
    /// Spawns `command` with its stderr collected.
    fn spawn(mut command: Command) -> Self {
        let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn({
            let stderr = stderr.clone();
            move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    stderr.lock().unwrap().push(line);
                }
            }
        });
        Self { child, stderr }
    }

    /// Whether a line of stderr so far contains `text`.
    fn logged(&self, text: &str) -> bool {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains(text))
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    async fn wait_healthy(&mut self, client: &reqwest::Client, base: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(response) = client.get(format!("{base}/healthz")).send().await
                && response.status() == 200
            {
                return;
            }
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "the service exited before becoming healthy: {}",
                self.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "the service never became healthy: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the service did not exit: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it gives `Some`; fails naming `what` after 20 s.
async fn wait_for<T, Fut>(what: &str, mut check: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM while a command is under way: the process stops taking requests, lets the command
/// finish with its answer, then exits 0. The command is held in its append by the store's
/// append lock, taken from the test's own connection, until the service is seen shutting down.
#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let db = TestDatabase::new().await;
    let port = free_port();
    let mut command = command();
    command
        .env("DATABASE_URL", &db.url)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"));
    let mut service = Service::spawn(command);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    service.wait_healthy(&client, &base).await;

    let mut holder = PgConnection::connect(&db.url).await.unwrap();
    let mut held = holder.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(store::append::APPEND_LOCK_KEY)
        .execute(&mut *held)
        .await
        .unwrap();
    let create = tokio::spawn({
        let client = client.clone();
        let base = base.clone();
        async move {
            client
                .post(format!("{base}/orders"))
                .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "EUR" }))
                .send()
                .await
        }
    });
    wait_for("the command waits for the append lock", || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT 1 FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid \
             WHERE a.datname = current_database() AND a.application_name = 'command-service' \
               AND l.locktype = 'advisory' AND NOT l.granted",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    })
    .await;

    let killed = Command::new("kill")
        .arg("-TERM")
        .arg(service.child.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    wait_for("the service starts draining", || async {
        service
            .logged("shutting down: draining in-flight requests")
            .then_some(())
    })
    .await;
    // It takes no new request meanwhile: a new connection is refused (a fresh client, with no
    // connection kept from before).
    wait_for("the service refuses new connections", || async {
        reqwest::Client::new()
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_err_and(|e| e.is_connect())
            .then_some(())
    })
    .await;

    held.commit().await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), create)
        .await
        .expect("the command under way is answered")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 201);
    let order: Value = response.json().await.unwrap();
    let order_id: Uuid = order["order_id"].as_str().unwrap().parse().unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1")
        .bind(events::order_stream_id(order_id))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 1, "the answered command is stored");

    let status = service.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{status:?}: {}", service.stderr());
}

/// Runs the binary with one bad setting and returns its exit status and stderr lines.
fn run_with_bad_setting(name: &str, value: &str) -> (std::process::ExitStatus, Vec<String>) {
    run_with_settings(&[(name, value)])
}

/// Runs the binary with `settings` and returns its exit status and stderr lines.
fn run_with_settings(settings: &[(&str, &str)]) -> (std::process::ExitStatus, Vec<String>) {
    let mut command = command();
    for (name, value) in settings {
        command.env(name, value);
    }
    let output = command
        .env("LISTEN_ADDR", format!("127.0.0.1:{}", free_port()))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .collect();
    (output.status, lines)
}

#[test]
fn a_bad_db_max_connections_exits_non_zero_with_one_line_naming_it() {
    let (status, lines) = run_with_bad_setting("DB_MAX_CONNECTIONS", "abc");
    assert!(!status.success());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("DB_MAX_CONNECTIONS"), "{lines:?}");
}

#[test]
fn a_token_list_without_a_token_exits_non_zero_rather_than_running_unprotected() {
    let (status, lines) = run_with_bad_setting("API_TOKEN", " , ");
    assert!(!status.success());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("invalid API_TOKEN"), "{lines:?}");
}

#[test]
fn an_origin_with_a_path_exits_non_zero_with_one_line_naming_the_setting() {
    let (status, lines) =
        run_with_bad_setting("CORS_ALLOWED_ORIGINS", "https://ops.example.com/app");
    assert!(!status.success());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("invalid CORS_ALLOWED_ORIGINS"),
        "{lines:?}"
    );
}

#[test]
fn a_bad_redis_url_exits_non_zero_with_one_line_naming_it() {
    let (status, lines) = run_with_bad_setting("REDIS_URL", "notaurl");
    assert!(!status.success());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("REDIS_URL"), "{lines:?}");
}

#[test]
fn a_wrong_redis_tls_file_exits_non_zero_with_one_line_naming_the_setting() {
    let certificates = bus::testing::TestCertificates::generate().unwrap();
    let [ca, cert, key] = [
        certificates.ca_cert(),
        certificates.client_cert(),
        certificates.client_key(),
    ]
    .map(|path| path.to_str().unwrap().to_owned());
    let tls = "rediss://localhost:6380";
    let cases: [(&[(&str, &str)], String); 7] = [
        (
            &[("REDIS_URL", "rediss://localhost:6380/#insecure")],
            "invalid REDIS_URL: #insecure (TLS without checking".to_owned(),
        ),
        (
            &[("REDIS_URL", tls), ("REDIS_CA_CERT", "/nonexistent/ca.pem")],
            "invalid REDIS_CA_CERT: /nonexistent/ca.pem: No such file".to_owned(),
        ),
        (
            &[("REDIS_URL", tls), ("REDIS_CA_CERT", &key)],
            format!("invalid REDIS_CA_CERT: no PEM certificate in {key}"),
        ),
        (
            &[
                ("REDIS_URL", "redis://localhost:6379"),
                ("REDIS_CA_CERT", &ca),
            ],
            "invalid REDIS_CA_CERT: only used with a rediss:// REDIS_URL".to_owned(),
        ),
        (
            &[("REDIS_URL", tls), ("REDIS_CLIENT_CERT", &cert)],
            "invalid REDIS_CLIENT_CERT: needs REDIS_CLIENT_KEY".to_owned(),
        ),
        (
            &[("REDIS_URL", tls), ("REDIS_CLIENT_KEY", &key)],
            "invalid REDIS_CLIENT_KEY: needs REDIS_CLIENT_CERT".to_owned(),
        ),
        (
            &[
                ("REDIS_URL", tls),
                ("REDIS_CLIENT_CERT", &cert),
                ("REDIS_CLIENT_KEY", &cert),
            ],
            format!("invalid REDIS_CLIENT_KEY: no PEM private key in {cert}"),
        ),
    ];
    for (settings, expected) in cases {
        let (status, lines) = run_with_settings(settings);
        assert!(!status.success(), "{settings:?}");
        assert_eq!(lines.len(), 1, "{settings:?}: {lines:?}");
        assert!(lines[0].contains(&expected), "{settings:?}: {lines:?}");
    }
    // The same files, right, start the service (it then waits for Redis to answer).
    let (status, lines) = run_with_settings(&[
        ("REDIS_URL", tls),
        ("REDIS_CA_CERT", &ca),
        ("REDIS_CLIENT_CERT", &cert),
        ("REDIS_CLIENT_KEY", &key),
        ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none"),
        ("DB_CONNECT_WAIT_SECS", "0"),
    ]);
    assert!(!status.success());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("cannot reach PostgreSQL at 127.0.0.1:1 (DATABASE_URL)"),
        "it got past the Redis settings to connecting: {lines:?}"
    );
}
