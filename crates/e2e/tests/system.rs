//! The whole system as a user runs it: command-service, two projectors and query-service as
//! separate processes over one fresh database and a private Redis stream key.

use bus::testing::{PrivateRedis, TestCertificates};
use serde_json::{Value, json};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use store::testing::{PrivatePostgres, TestDatabase};
use uuid::Uuid;

const REDIS_URL: &str = "redis://127.0.0.1:6379";
const DEADLINE: Duration = Duration::from_secs(60);

/// The directory holding the workspace's binaries: the test executable lives in `<dir>/deps/`.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .to_path_buf();
    for bin in ["command-service", "projector", "query-service"] {
        assert!(
            dir.join(bin).exists(),
            "{bin} is not built in {}: run `cargo build --bins` (nextest --workspace builds it)",
            dir.display()
        );
    }
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A service process, killed if the test ends early.
struct Service {
    name: String,
    child: Option<Child>,
    port: u16,
    log: PathBuf,
}

impl Service {
    fn start(
        bin: &str,
        name: &str,
        database_url: &str,
        stream: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("e2e-{name}-{}.log", Uuid::new_v4().simple()));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(bin_dir().join(bin));
        command
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", REDIS_URL)
            .env("EVENT_STREAM", stream)
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("SKIP_MIGRATIONS", "true")
            .env("DB_MAX_CONNECTIONS", "4")
            .stdout(Stdio::null())
            .stderr(log_file);
        for (key, value) in extra {
            command.env(key, value);
        }
        let child = command.spawn().expect("start service");
        Self {
            name: name.to_owned(),
            child: Some(child),
            port,
            log,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn wait_ready(&mut self, http: &reqwest::Client) {
        let started = Instant::now();
        loop {
            if let Ok(response) = http.get(self.url("/readyz")).send().await
                && response.status().is_success()
            {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited with {status} before it was ready:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{} not ready in time:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{} did not stop on SIGTERM",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

async fn send(http: &reqwest::Client, request: reqwest::RequestBuilder, expected: u16) -> Value {
    let _ = http;
    let response = request.send().await.expect("request is answered");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, expected, "unexpected answer: {body}");
    body
}

/// The tests' HTTP client: a request that hangs fails the test instead of stalling it.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client")
}

fn position(body: &Value) -> i64 {
    body["position"].as_i64().expect("position in the answer")
}

/// Creates an order and adds one book to it through the command service; returns the order id
/// and the position of the item's event.
async fn create_order_with_a_book(http: &reqwest::Client, command: &Service) -> (String, i64) {
    let created = send(
        http,
        http.post(command.url("/orders"))
            .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "EUR" })),
        201,
    )
    .await;
    let order_id = created["order_id"].as_str().expect("order id").to_owned();
    let added = send(
        http,
        http.post(command.url(&format!("/orders/{order_id}/items")))
            .json(&json!({ "sku": "BOOK", "quantity": 1, "unit_price": 1250 })),
        200,
    )
    .await;
    (order_id, position(&added))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_driven_through_the_three_services_show_up_exactly_in_the_read_models() {
    let db = TestDatabase::new().await;
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();

    let mut command = Service::start("command-service", "command-service", &db.url, &stream, &[]);
    let mut projector_1 = Service::start(
        "projector",
        "projector-1",
        &db.url,
        &stream,
        &[("PROJECTOR_CONSUMER_NAME", "e2e-1")],
    );
    let mut projector_2 = Service::start(
        "projector",
        "projector-2",
        &db.url,
        &stream,
        &[("PROJECTOR_CONSUMER_NAME", "e2e-2")],
    );
    let mut query = Service::start("query-service", "query-service", &db.url, &stream, &[]);
    for service in [&mut command, &mut projector_1, &mut projector_2, &mut query] {
        service.wait_ready(&http).await;
    }

    let customer = Uuid::new_v4();
    let mut expected_spent = 0;
    let mut orders = Vec::new();
    for i in 0..6i64 {
        let created = send(
            &http,
            http.post(command.url("/orders"))
                .json(&json!({ "customer_id": customer, "currency": "EUR" })),
            201,
        )
        .await;
        let order_id = created["order_id"].as_str().expect("order id").to_owned();
        let orders_url = |path: &str| command.url(&format!("/orders/{order_id}{path}"));
        send(
            &http,
            http.post(orders_url("/items"))
                .json(&json!({ "sku": "BOOK", "quantity": 2, "unit_price": 1250 + i })),
            200,
        )
        .await;
        send(
            &http,
            http.post(orders_url("/items"))
                .json(&json!({ "sku": "PEN", "quantity": 1, "unit_price": 300 })),
            200,
        )
        .await;
        send(&http, http.post(orders_url("/place")), 200).await;
        let total = 2 * (1250 + i) + 300;
        let mut last = send(
            &http,
            http.post(orders_url("/pay"))
                .json(&json!({ "amount": total, "payment_reference": format!("pay-{i}") })),
            200,
        )
        .await;
        let status = match i % 3 {
            0 => {
                last = send(
                    &http,
                    http.post(orders_url("/ship"))
                        .json(&json!({ "carrier": "DHL", "tracking_number": format!("T{i}") })),
                    200,
                )
                .await;
                expected_spent += total;
                "shipped"
            }
            1 => {
                last = send(
                    &http,
                    http.post(orders_url("/cancel"))
                        .json(&json!({ "reason": "changed mind" })),
                    200,
                )
                .await;
                "cancelled"
            }
            _ => {
                expected_spent += total;
                "paid"
            }
        };
        orders.push((
            order_id,
            status,
            total,
            last["version"].as_i64().expect("version"),
            position(&last),
        ));
    }

    // Read-your-writes: each read with the command's position sees the command.
    let mut highest = 0;
    for (order_id, status, total, version, position) in &orders {
        highest = highest.max(*position);
        let response = http
            .get(query.url(&format!("/orders/{order_id}?min_position={position}")))
            .send()
            .await
            .expect("read");
        assert_eq!(response.status().as_u16(), 200);
        let mark: i64 = response.headers()["x-projection-position"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("number");
        assert!(
            mark >= *position,
            "the low-water mark {mark} covers the write at {position}"
        );
        let summary: Value = response.json().await.expect("json");
        assert_eq!(summary["status"], *status);
        assert_eq!(summary["total"], *total);
        assert_eq!(summary["version"], *version);
        assert_eq!(summary["item_count"], 2);
        assert_eq!(summary["customer_id"], customer.to_string());
    }

    let stats = send(
        &http,
        http.get(query.url(&format!("/customers/{customer}?min_position={highest}"))),
        200,
    )
    .await;
    assert_eq!(stats["order_count"], 6);
    assert_eq!(stats["total_spent"], expected_spent);
    assert_eq!(stats["spent_by_currency"], json!({ "EUR": expected_spent }));
    assert_eq!(stats["by_status"]["shipped"], 2);
    assert_eq!(stats["by_status"]["cancelled"], 2);
    assert_eq!(stats["by_status"]["paid"], 2);

    let listed = send(
        &http,
        http.get(query.url(&format!(
            "/orders?customer_id={customer}&min_position={highest}"
        ))),
        200,
    )
    .await;
    let listed_ids: Vec<&str> = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|o| o["order_id"].as_str().expect("id"))
        .collect();
    let newest_first: Vec<&str> = orders.iter().rev().map(|(id, ..)| id.as_str()).collect();
    assert_eq!(listed_ids, newest_first);

    let (first_order, ..) = &orders[0];
    let history = send(
        &http,
        http.get(query.url(&format!("/orders/{first_order}/events"))),
        200,
    )
    .await;
    let types: Vec<&str> = history["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["event_type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        types,
        [
            "OrderCreated",
            "ItemAdded",
            "ItemAdded",
            "OrderPlaced",
            "OrderPaid",
            "OrderShipped"
        ]
    );
    let then = send(
        &http,
        http.get(query.url(&format!("/orders/{first_order}/state?version=2"))),
        200,
    )
    .await;
    assert_eq!(
        (then["status"].as_str(), then["item_count"].as_i64()),
        (Some("draft"), Some(1))
    );

    // An entry no projector can decode is dead-lettered while the rest keeps flowing.
    let redis = redis::Client::open(REDIS_URL).expect("redis url");
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    // Its id sits just after the newest entry (`<position>-1`), never `*`: a time-based id would
    // sort above every future `<position>-0` id and block publication.
    let newest: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg(&stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("xrevrange");
    let (newest_id, _) = newest.first().expect("the stream has entries");
    let (millis, seq) = newest_id.split_once('-').expect("entry id");
    let garbage_id = format!("{millis}-{}", seq.parse::<u64>().expect("seq") + 1);
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg(&garbage_id)
        .arg("position")
        .arg("not-a-number")
        .query_async(&mut conn)
        .await
        .expect("xadd");
    let dlq = format!("{stream}:dlq:order_summaries");
    let started = Instant::now();
    loop {
        let len: i64 = redis::cmd("XLEN")
            .arg(&dlq)
            .query_async(&mut conn)
            .await
            .expect("xlen");
        if len == 1 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the undecodable entry never reached {dlq}:\n{}",
            projector_1.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = send(
        &http,
        http.post(command.url("/orders"))
            .json(&json!({ "customer_id": customer, "currency": "EUR" })),
        201,
    )
    .await;
    send(
        &http,
        http.get(query.url(&format!(
            "/orders/{}?min_position={}",
            after["order_id"].as_str().expect("id"),
            position(&after)
        ))),
        200,
    )
    .await;

    // The read model agrees with a fresh fold of the event store.
    let verify = Command::new(bin_dir().join("projector"))
        .args(["verify", "order_summaries"])
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", REDIS_URL)
        .env("EVENT_STREAM", &stream)
        .env("SKIP_MIGRATIONS", "true")
        .output()
        .expect("verify runs");
    assert!(
        verify.status.success(),
        "verify found differences:\n{}\n{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    for service in [&mut query, &mut projector_2, &mut projector_1, &mut command] {
        let status = service.terminate().await;
        assert!(
            status.success(),
            "{} exited with {status} on SIGTERM",
            service.name
        );
    }
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .arg(&dlq)
        .arg(format!("{stream}:dlq:customer_stats"))
        .query_async(&mut conn)
        .await
        .expect("cleanup");
}

/// The system against a Redis that speaks only TLS and asks every client for a certificate, as
/// a self-hosted `rediss://` server does by default: each service trusts the test's authority
/// (`REDIS_CA_CERT`) and presents the client certificate (`REDIS_CLIENT_CERT`/`_KEY`); the relay
/// publishes and the projections' groups consume and acknowledge over it. Each binary, not
/// told to trust that authority, checks the server against the bundled roots and is not ready,
/// naming the certificate error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_publish_and_consume_through_a_redis_that_speaks_only_tls() {
    let certificates = TestCertificates::generate().expect("openssl makes the test certificates");
    let redis = PrivateRedis::start_tls(&certificates, true)
        .await
        .expect("a TLS redis-server");
    let db = TestDatabase::new().await;
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();
    let url = redis.url();
    let path = |p: PathBuf| p.to_str().expect("utf-8 temp path").to_owned();
    let (ca, cert, key) = (
        path(certificates.ca_cert()),
        path(certificates.client_cert()),
        path(certificates.client_key()),
    );
    let tls = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_CA_CERT", ca.as_str()),
        ("REDIS_CLIENT_CERT", cert.as_str()),
        ("REDIS_CLIENT_KEY", key.as_str()),
    ];
    let mut command = Service::start("command-service", "command-service", &db.url, &stream, &tls);
    let mut projector = Service::start("projector", "projector", &db.url, &stream, &tls);
    let mut query = Service::start("query-service", "query-service", &db.url, &stream, &tls);
    // Ready means each one's PING went through the TLS handshake.
    for service in [&mut command, &mut projector, &mut query] {
        service.wait_ready(&http).await;
    }

    let (order_id, last) = create_order_with_a_book(&http, &command).await;

    // The read model alone would not show it: the sweeper heals from the event store when
    // Redis fails. The groups' positions on the TLS server do.
    let client = redis::Client::build_with_tls(
        url.as_str(),
        certificates.client_tls().expect("certificate files"),
    )
    .expect("TLS client");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("the test's own TLS connection");
    let acknowledged = format!("{last}-0");
    bus::testing::wait_until(
        DEADLINE,
        "both projections' groups have consumed and acknowledged the events",
        || {
            let mut conn = conn.clone();
            let (stream, acknowledged) = (stream.clone(), acknowledged.clone());
            async move {
                let reply: redis::streams::StreamInfoGroupsReply =
                    redis::AsyncCommands::xinfo_groups(&mut conn, &stream)
                        .await
                        .ok()?;
                let done = |name: &str| {
                    reply.groups.iter().any(|g| {
                        g.name == name && g.last_delivered_id == acknowledged && g.pending == 0
                    })
                };
                (done("order_summaries") && done("customer_stats")).then_some(())
            }
        },
    )
    .await;
    let summary = send(
        &http,
        http.get(query.url(&format!("/orders/{order_id}?min_position={last}"))),
        200,
    )
    .await;
    assert_eq!(summary["total"], 1250, "{summary}");

    // Each binary, told nothing of the test's authority, says why Redis is not usable.
    for bin in ["command-service", "projector", "query-service"] {
        let name = format!("{bin}-without-ca");
        let mut untrusting = Service::start(bin, &name, &db.url, &stream, &tls[..1]);
        let reason = bus::testing::wait_until(DEADLINE, "/readyz reports Redis failing", || {
            let request = http.get(untrusting.url("/readyz"));
            async move {
                let response = request.send().await.ok()?;
                let status = response.status().as_u16();
                let body: Value = response.json().await.ok()?;
                (status == 503).then(|| body["checks"]["redis"].to_string())
            }
        })
        .await;
        assert!(
            reason.contains("certificate") && reason.contains("UnknownIssuer"),
            "{bin}: {reason}"
        );
        assert!(untrusting.terminate().await.success(), "{bin}");
    }
    for service in [&mut command, &mut projector, &mut query] {
        assert!(
            service.terminate().await.success(),
            "{}",
            service.log_tail()
        );
    }
}

/// The metric names the alerting rules' expressions read (`up` aside, which Prometheus makes).
/// A PromQL expression's identifiers are metric names unless they are label lists (`by (…)`
/// and the like), label matchers (`{…}`), ranges (`[…]`), functions (followed by `(`),
/// aggregations or keywords.
fn alert_metric_names(rules: &str) -> std::collections::BTreeSet<String> {
    // Aggregations may be followed by `by (…)` rather than by their operand in parentheses.
    const KEYWORDS: [&str; 24] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "up",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    // Each `expr:` value: the rest of its line, or the lines of a folded block (`>-`).
    let mut expressions = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let mut expression = value.trim().trim_start_matches(">-").to_owned();
        let indent = line.len() - line.trim_start().len();
        while let Some(next) = lines.peek() {
            if next.trim().is_empty() || next.len() - next.trim_start().len() <= indent {
                break;
            }
            expression.push(' ');
            expression.push_str(next.trim());
            lines.next();
        }
        expressions.push(expression);
    }
    let mut names = std::collections::BTreeSet::new();
    for expression in expressions {
        let chars: Vec<char> = expression.chars().collect();
        let mut i = 0;
        let mut skip_parenthesis = false;
        while i < chars.len() {
            let c = chars[i];
            let close = match c {
                '{' => Some('}'),
                '[' => Some(']'),
                '"' => Some('"'),
                '(' if skip_parenthesis => Some(')'),
                _ => None,
            };
            if let Some(close) = close {
                i += chars[i + 1..]
                    .iter()
                    .position(|&d| d == close)
                    .map_or(chars.len(), |n| n + 2);
                skip_parenthesis = false;
                continue;
            }
            if c.is_ascii_alphabetic() || c == '_' {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                let is_function = next == Some(&'(') && !KEYWORDS.contains(&word.as_str());
                skip_parenthesis = ["by", "without", "on", "ignoring"].contains(&word.as_str());
                if !is_function && !KEYWORDS.contains(&word.as_str()) {
                    names.insert(word);
                }
                continue;
            }
            i += 1;
        }
    }
    names
}

/// Every metric an alert reads is on some service's `/metrics` as soon as the services run,
/// before anything has happened: a renamed metric would leave its alert silent forever, and a
/// counter that first appears at 1 hides its first increment from `increase()` (the alert on
/// dead letters would miss the first one of every projector process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_read_is_exposed_from_the_start() {
    let rules_file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/prometheus/alerts.yaml"
    );
    let rules = std::fs::read_to_string(rules_file).expect("deploy/prometheus/alerts.yaml");
    let wanted = alert_metric_names(&rules);
    assert!(
        wanted.contains("projector_dead_letters_total") && wanted.contains("relay_lag_seconds"),
        "the rules' metrics are not read right: {wanted:?}"
    );

    let db = TestDatabase::new().await;
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();
    let mut services = [
        Service::start("command-service", "command-service", &db.url, &stream, &[]),
        Service::start("projector", "projector", &db.url, &stream, &[]),
        Service::start("query-service", "query-service", &db.url, &stream, &[]),
    ];
    for service in &mut services {
        service.wait_ready(&http).await;
    }
    // The relay's and the sweeper's gauges are set by their first round, right after start.
    let started = Instant::now();
    loop {
        let mut exposed = String::new();
        for service in &services {
            let response = http.get(service.url("/metrics")).send().await;
            exposed.push_str(&response.expect("/metrics").text().await.expect("text"));
        }
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|name| {
                !exposed.lines().any(|line| {
                    line.strip_prefix(name.as_str())
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))
                })
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "not exposed by any service: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for service in &mut services {
        assert!(
            service.terminate().await.success(),
            "{}",
            service.log_tail()
        );
    }
}

/// Runs a `projector` admin subcommand against the test's database and stream; returns whether
/// it succeeded and what it printed.
async fn projector_admin(database_url: &str, stream: &str, args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new(bin_dir().join("projector"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("REDIS_URL", REDIS_URL)
        .env("EVENT_STREAM", stream)
        .env("SKIP_MIGRATIONS", "true")
        .env("REBUILD_BATCH_SIZE", "1")
        .env("LOG_FORMAT", "json")
        .output()
        .await
        .expect("run the projector");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), printed)
}

/// `projector rebuild` as an operator runs it, while commands keep flowing and a projector
/// keeps applying them: the commands never wait for it, and afterwards the read model is
/// exactly the event store's fold (`projector verify`), the events committed during the
/// rebuild included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_under_live_traffic_ends_exact_without_stopping_commands() {
    let db = TestDatabase::new().await;
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();
    let mut command = Service::start("command-service", "command-service", &db.url, &stream, &[]);
    let mut projector = Service::start("projector", "projector", &db.url, &stream, &[]);
    let mut query = Service::start("query-service", "query-service", &db.url, &stream, &[]);
    for service in [&mut command, &mut projector, &mut query] {
        service.wait_ready(&http).await;
    }
    let create = |customer: Uuid| {
        http.post(command.url("/orders"))
            .json(&json!({ "customer_id": customer, "currency": "EUR" }))
    };
    let customer = Uuid::new_v4();
    for _ in 0..100 {
        send(&http, create(customer), 201).await;
    }

    // One event per rebuild transaction: the fold overlaps the commands below.
    let rebuild = tokio::spawn({
        let (database_url, stream) = (db.url.clone(), stream.clone());
        async move { projector_admin(&database_url, &stream, &["rebuild", "order_summaries"]).await }
    });
    let mut during = 0;
    let mut last = 0;
    while !rebuild.is_finished() {
        last = position(&send(&http, create(customer), 201).await);
        during += 1;
    }
    let (rebuilt, printed) = rebuild.await.expect("rebuild task");
    assert!(rebuilt, "{printed}");
    assert!(printed.contains("rebuilt order_summaries"), "{printed}");
    assert!(during > 0, "no command ran during the rebuild");
    last = last.max(position(&send(&http, create(customer), 201).await));

    // Once the rebuilt projection has applied the last command, it holds every order.
    send(
        &http,
        http.get(query.url(&format!("/orders?limit=1&min_position={last}"))),
        200,
    )
    .await;
    let summaries: i64 = sqlx::query_scalar("SELECT count(*) FROM order_summaries")
        .fetch_one(&db.pool)
        .await
        .expect("count the summaries");
    assert_eq!(summaries, 101 + during);
    let (exact, report) = projector_admin(&db.url, &stream, &["verify", "order_summaries"]).await;
    assert!(exact, "{report}");
    for service in [&mut command, &mut projector, &mut query] {
        assert!(
            service.terminate().await.success(),
            "{}",
            service.log_tail()
        );
    }
}

/// What a follower of `GET /events/stream` has received: the ids of the frames with an event,
/// and the last id of any frame (where it resumes).
#[derive(Debug, Default)]
struct Followed {
    events: Vec<i64>,
    last_id: i64,
}

/// Follows `GET /events/stream` as a browser's `EventSource` does: on any end of the response
/// (the service killed, restarted elsewhere) it reconnects to the current address from `base`
/// with `Last-Event-ID`, until it has seen an id at or past `until` (0: never, run until
/// aborted). Progress is published through `seen`.
async fn follow_like_a_browser(
    base: tokio::sync::watch::Receiver<String>,
    seen: std::sync::Arc<std::sync::Mutex<Followed>>,
    until: tokio::sync::watch::Receiver<i64>,
) {
    let http = reqwest::Client::new();
    loop {
        let last_id = seen.lock().expect("lock").last_id;
        let target = *until.borrow();
        if target > 0 && last_id >= target {
            return;
        }
        let url = format!("{}/events/stream", base.borrow().clone());
        let Ok(mut response) = http
            .get(url)
            .header("last-event-id", last_id.to_string())
            .send()
            .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut pending = String::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            pending.push_str(std::str::from_utf8(&chunk).expect("UTF-8 frames"));
            while let Some(end) = pending.find("\n\n") {
                let frame: String = pending.drain(..end + 2).collect();
                let id = frame
                    .lines()
                    .find_map(|line| line.strip_prefix("id: "))
                    .map(|id| id.parse::<i64>().expect("an id is a position"));
                let has_data = frame.lines().any(|line| line.starts_with("data: "));
                if let Some(id) = id {
                    let mut seen = seen.lock().expect("lock");
                    if has_data {
                        seen.events.push(id);
                    }
                    seen.last_id = id;
                }
            }
            let target = *until.borrow();
            if target > 0 && seen.lock().expect("lock").last_id >= target {
                return;
            }
        }
    }
}

/// A client following the event stream the way a browser does gets every committed event once
/// and in order while commands flow, though the query service it reads is killed with SIGKILL
/// and comes back on another address: it resumes from `Last-Event-ID`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_follower_misses_nothing_when_its_query_service_is_killed() {
    let db = TestDatabase::new().await;
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();
    let mut command = Service::start("command-service", "command-service", &db.url, &stream, &[]);
    let mut query = Service::start("query-service", "query-service", &db.url, &stream, &[]);
    command.wait_ready(&http).await;
    query.wait_ready(&http).await;

    let (base_tx, base_rx) = tokio::sync::watch::channel(query.url(""));
    let (until_tx, until_rx) = tokio::sync::watch::channel(0_i64);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Followed::default()));
    let follower = tokio::spawn(follow_like_a_browser(
        base_rx,
        std::sync::Arc::clone(&seen),
        until_rx,
    ));

    let mut head = 0;
    for round in 0..30 {
        head = create_order_with_a_book(&http, &command).await.1;
        if round == 10 {
            // Once the follower is well under way, the query service dies without a word and
            // a new one starts elsewhere while the commands go on.
            let started = Instant::now();
            while seen.lock().expect("lock").events.len() < 10 {
                assert!(
                    started.elapsed() < DEADLINE,
                    "the follower received nothing"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut child = query.child.take().expect("running");
            child.kill().expect("SIGKILL");
            child.wait().expect("reaped");
            query = Service::start("query-service", "query-service-2", &db.url, &stream, &[]);
            query.wait_ready(&http).await;
            base_tx.send(query.url("")).expect("the follower listens");
        }
    }
    until_tx.send(head).expect("the follower listens");
    tokio::time::timeout(DEADLINE, follower)
        .await
        .expect("the follower reaches the head")
        .expect("the follower does not panic");
    let events = std::mem::take(&mut seen.lock().expect("lock").events);
    assert_eq!(events, (1..=head).collect::<Vec<_>>());
    assert!(
        command.terminate().await.success(),
        "{}",
        command.log_tail()
    );
    assert!(query.terminate().await.success(), "{}", query.log_tail());
}

/// What the writers of [`write_until_stopped`] were told.
#[derive(Debug, Default)]
struct WriteOutcomes {
    /// Every acknowledged command: its order id, the order's version after it and the position
    /// of its (single) event.
    acknowledged: Vec<(String, i64, i64)>,
    /// Every refusal: its status and problem `code`.
    refused: Vec<(u16, String)>,
}

/// Creates orders for `customer` and adds items to them through the command service, one
/// command at a time, until `stop` turns true; records every answer in `outcomes`. A refused
/// creation is tried again with a new order; a refused item is followed by the next item.
async fn write_until_stopped(
    http: reqwest::Client,
    command_url: String,
    customer: Uuid,
    outcomes: std::sync::Arc<std::sync::Mutex<WriteOutcomes>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    const ITEMS_PER_ORDER: usize = 10;
    let mut order: Option<String> = None;
    let mut items = 0;
    while !*stop.borrow() {
        let request = match &order {
            None => http
                .post(format!("{command_url}/orders"))
                .json(&json!({ "customer_id": customer, "currency": "EUR" })),
            Some(order_id) => http
                .post(format!("{command_url}/orders/{order_id}/items"))
                .json(&json!({ "sku": format!("SKU-{items}"), "quantity": 1, "unit_price": 100 })),
        };
        let response = request
            .send()
            .await
            .expect("the command service answers, database or not");
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let mut outcomes = outcomes.lock().expect("lock");
        if status == 200 || status == 201 {
            let order_id = body["order_id"].as_str().expect("order id").to_owned();
            let version = body["version"].as_i64().expect("version");
            outcomes
                .acknowledged
                .push((order_id.clone(), version, position(&body)));
            order = Some(order_id);
            items += 1;
            if items > ITEMS_PER_ORDER {
                (order, items) = (None, 0);
            }
        } else {
            let code = body["code"]
                .as_str()
                .unwrap_or("(no problem body)")
                .to_owned();
            outcomes.refused.push((status, code));
            if order.is_some() {
                items += 1;
            }
        }
    }
}

/// Waits until `GET /readyz` of `service` answers `status`.
async fn wait_readiness(http: &reqwest::Client, service: &Service, status: u16) {
    let what = format!("{} answers /readyz with {status}", service.name);
    bus::testing::wait_until(DEADLINE, &what, || {
        let request = http.get(service.url("/readyz"));
        async move {
            let response = request.send().await.ok()?;
            (response.status().as_u16() == status).then_some(())
        }
    })
    .await;
}

/// PostgreSQL crashes (every backend killed at once) under a steady flow of commands and comes
/// back a little later on the same address, as in a fail-over or a restart: nobody restarts a
/// service. While it is down, each service says it is not ready and every request is answered
/// 503 `store_unavailable` (never a 500, never a hang); afterwards the services take up their
/// work by themselves, every acknowledged command is in the event store, every event reaches
/// Redis in order, the read models are exact, and a read-your-writes wait is answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_heals_by_itself_when_postgresql_crashes_under_load() {
    let mut postgres = PrivatePostgres::start()
        .await
        .expect("a private PostgreSQL server");
    let database_url = postgres.url("orders");
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();
    // The command service creates the database and its schema, as on a first deployment.
    let mut command = Service::start(
        "command-service",
        "command-service",
        &database_url,
        &stream,
        &[("SKIP_MIGRATIONS", "false")],
    );
    command.wait_ready(&http).await;
    let mut projector = Service::start("projector", "projector", &database_url, &stream, &[]);
    let mut query = Service::start(
        "query-service",
        "query-service",
        &database_url,
        &stream,
        &[],
    );
    projector.wait_ready(&http).await;
    query.wait_ready(&http).await;

    let customer = Uuid::new_v4();
    let outcomes = std::sync::Arc::new(std::sync::Mutex::new(WriteOutcomes::default()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writers: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(write_until_stopped(
                http.clone(),
                command.url(""),
                customer,
                std::sync::Arc::clone(&outcomes),
                stopped.clone(),
            ))
        })
        .collect();
    let acknowledged_at_least = |count: usize| {
        let outcomes = std::sync::Arc::clone(&outcomes);
        async move { (outcomes.lock().expect("lock").acknowledged.len() >= count).then_some(()) }
    };
    bus::testing::wait_until(DEADLINE, "40 commands are acknowledged", || {
        acknowledged_at_least(40)
    })
    .await;

    postgres.crash().await.expect("PostgreSQL crashes");
    for service in [&command, &projector, &query] {
        wait_readiness(&http, service, 503).await;
    }
    bus::testing::wait_until(
        DEADLINE,
        "a writer is told the store is unavailable",
        || {
            let outcomes = std::sync::Arc::clone(&outcomes);
            async move {
                let outcomes = outcomes.lock().expect("lock");
                outcomes
                    .refused
                    .iter()
                    .any(|(status, code)| *status == 503 && code == "store_unavailable")
                    .then_some(())
            }
        },
    )
    .await;
    let first_order = outcomes.lock().expect("lock").acknowledged[0].0.clone();
    let response = http
        .get(query.url(&format!("/orders/{first_order}")))
        .send()
        .await
        .expect("the query service answers without its database");
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let problem: Value = response.json().await.expect("a problem body");
    assert_eq!(problem["code"], "store_unavailable", "{problem}");
    assert!(!problem.to_string().contains("5432"), "{problem}");

    postgres
        .start_again()
        .await
        .expect("PostgreSQL starts again");
    for service in [&command, &projector, &query] {
        wait_readiness(&http, service, 200).await;
    }
    let before_restart_done = outcomes.lock().expect("lock").acknowledged.len();
    bus::testing::wait_until(
        DEADLINE,
        "40 more commands are acknowledged after the restart",
        || acknowledged_at_least(before_restart_done + 40),
    )
    .await;
    stop.send(true).expect("the writers listen");
    for writer in writers {
        writer.await.expect("a writer does not panic");
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("lock"));

    // Every refusal told the client to retry; none was a 500.
    for (status, code) in &outcomes.refused {
        assert!(
            *status == 503 && (code == "store_unavailable" || code == "timeout"),
            "refused with {status} {code}:\n{}",
            command.log_tail()
        );
    }
    // Every acknowledged command is in the event store as acknowledged (guarantee 1), and the
    // positions stay dense across the crash.
    let pool = sqlx::PgPool::connect(&database_url)
        .await
        .expect("connect to the restarted server");
    let stored: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT stream_id, stream_version, global_position FROM events ORDER BY global_position",
    )
    .fetch_all(&pool)
    .await
    .expect("read the events");
    let positions: Vec<i64> = stored.iter().map(|(_, _, position)| *position).collect();
    let head = i64::try_from(stored.len()).expect("a count fits");
    assert_eq!(positions, (1..=head).collect::<Vec<_>>());
    let stored: std::collections::HashSet<(String, i64, i64)> = stored.into_iter().collect();
    for (order_id, version, position) in &outcomes.acknowledged {
        assert!(
            stored.contains(&(format!("order-{order_id}"), *version, *position)),
            "acknowledged but not stored: order {order_id} version {version} at {position}"
        );
    }

    // Every event reaches Redis, in order (guarantee 2), those committed just before the crash
    // included.
    let redis = redis::Client::open(REDIS_URL).expect("redis url");
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    bus::testing::wait_until(DEADLINE, "every event is on the stream", || {
        let (mut conn, stream) = (conn.clone(), stream.clone());
        async move {
            let len: i64 = redis::AsyncCommands::xlen(&mut conn, &stream).await.ok()?;
            (len == head).then_some(())
        }
    })
    .await;
    let published: redis::streams::StreamRangeReply =
        redis::AsyncCommands::xrange_all(&mut conn, &stream)
            .await
            .expect("xrange");
    let published: Vec<i64> = published
        .ids
        .iter()
        .map(|entry| {
            entry
                .get::<String>("position")
                .and_then(|p| p.parse().ok())
                .expect("a position field")
        })
        .collect();
    assert_eq!(published, (1..=head).collect::<Vec<_>>());

    // Both read models reach the head and agree with the event store (guarantee 4).
    let orders: i64 = sqlx::query_scalar("SELECT count(DISTINCT stream_id) FROM events")
        .fetch_one(&pool)
        .await
        .expect("count the orders");
    let stats = send(
        &http,
        http.get(query.url(&format!(
            "/customers/{customer}?min_position={head}&wait_ms=10000"
        ))),
        200,
    )
    .await;
    assert_eq!(stats["order_count"], orders, "{stats}");
    send(
        &http,
        http.get(query.url(&format!(
            "/orders?limit=1&min_position={head}&wait_ms=10000"
        ))),
        200,
    )
    .await;
    for projection in ["order_summaries", "customer_stats"] {
        let (exact, report) =
            projector_admin(&database_url, &stream, &["verify", projection]).await;
        assert!(exact, "{projection}: {report}");
    }

    // A reader waiting for a write not made yet is answered when it is made: the query service
    // follows the projections' progress again.
    let waiting = tokio::spawn({
        let request = http.get(query.url(&format!(
            "/orders/{first_order}?min_position={}&wait_ms=10000",
            head + 1
        )));
        async move { request.send().await.expect("the wait is answered") }
    });
    let added = send(
        &http,
        http.post(command.url(&format!("/orders/{first_order}/items")))
            .json(&json!({ "sku": "AFTER-THE-CRASH", "quantity": 1, "unit_price": 100 })),
        200,
    )
    .await;
    let answered = waiting.await.expect("the waiting reader");
    assert_eq!(answered.status().as_u16(), 200);
    let summary: Value = answered.json().await.expect("a summary");
    assert_eq!(summary["version"], added["version"], "{summary}");

    for service in [&mut query, &mut projector, &mut command] {
        assert!(
            service.terminate().await.success(),
            "{}",
            service.log_tail()
        );
    }
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .expect("cleanup");
    drop(postgres);
}
