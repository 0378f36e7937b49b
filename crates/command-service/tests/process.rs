//! The real `command-service` binary as a process: graceful exit on SIGTERM, and a one-line
//! non-zero exit on a bad setting.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
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
        .env(
            "EVENT_STREAM",
            format!("test-{}:es:events", Uuid::new_v4().simple()),
        )
        .stdout(Stdio::null());
    command
}

async fn wait_healthy(client: &reqwest::Client, base: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(response) = client.get(format!("{base}/healthz")).send().await
            && response.status() == 200
        {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the service exited before becoming healthy"
        );
        assert!(
            Instant::now() < deadline,
            "the service never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the service did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let db = TestDatabase::new().await;
    let port = free_port();
    let mut child = command()
        .env("DATABASE_URL", &db.url)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_healthy(&client, &base, &mut child).await;

    let response = client
        .post(format!("{base}/orders"))
        .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "EUR" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    let killed = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait_exit(&mut child).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
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
    assert!(
        lines.iter().all(|line| !line.contains("REDIS")),
        "{lines:?}"
    );
}
