//! What every end-to-end test uses: the service binaries started as processes on free ports,
//! their readiness and shutdown, the HTTP client, and the projector's admin subcommands.

use serde_json::{Value, json};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

pub(crate) const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub(crate) const DEADLINE: Duration = Duration::from_secs(60);

/// The directory holding the workspace's binaries: the test executable lives in `<dir>/deps/`.
pub(crate) fn bin_dir() -> PathBuf {
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

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A service process, killed if the test ends early.
pub(crate) struct Service {
    pub(crate) name: String,
    pub(crate) child: Option<Child>,
    port: u16,
    log: PathBuf,
}

impl Service {
    pub(crate) fn start(
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

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Everything the service has logged so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub(crate) async fn wait_ready(&mut self, http: &reqwest::Client) {
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

    /// Sends SIGTERM and waits for the exit status. The process stays in the guard until it
    /// has exited, so one that does not stop is killed when the failing test drops it.
    pub(crate) async fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.as_ref().expect("running").id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        let started = Instant::now();
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
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

pub(crate) async fn send(
    http: &reqwest::Client,
    request: reqwest::RequestBuilder,
    expected: u16,
) -> Value {
    let _ = http;
    let response = request.send().await.expect("request is answered");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, expected, "unexpected answer: {body}");
    body
}

/// The tests' HTTP client: a request that hangs fails the test instead of stalling it.
pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client")
}

pub(crate) fn position(body: &Value) -> i64 {
    body["position"].as_i64().expect("position in the answer")
}

/// Creates an order and adds one book to it through the command service; returns the order id
/// and the position of the item's event.
pub(crate) async fn create_order_with_a_book(
    http: &reqwest::Client,
    command: &Service,
) -> (String, i64) {
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

/// Runs a `projector` admin subcommand against the test's database and stream; returns whether
/// it succeeded and what it printed.
pub(crate) async fn projector_admin(
    database_url: &str,
    stream: &str,
    args: &[&str],
) -> (bool, String) {
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

/// The three services on a database no one has created yet (a private server's): the command
/// service first, creating the database and its schema as on a first deployment, then a
/// projector (with `projector_env`) and a query service; returns them ready, in that order.
pub(crate) async fn start_on_a_new_database(
    http: &reqwest::Client,
    database_url: &str,
    stream: &str,
    projector_env: &[(&str, &str)],
) -> (Service, Service, Service) {
    let mut command = Service::start(
        "command-service",
        "command-service",
        database_url,
        stream,
        &[("SKIP_MIGRATIONS", "false")],
    );
    command.wait_ready(http).await;
    let mut projector = Service::start(
        "projector",
        "projector",
        database_url,
        stream,
        projector_env,
    );
    let mut query = Service::start("query-service", "query-service", database_url, stream, &[]);
    projector.wait_ready(http).await;
    query.wait_ready(http).await;
    (command, projector, query)
}

/// Waits until `GET /readyz` of `service` answers `status`.
pub(crate) async fn wait_readiness(http: &reqwest::Client, service: &Service, status: u16) {
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

/// Waits until the sum of the samples of metric `name` on `service`'s `/metrics` satisfies
/// `wanted` (a metric not exposed yet counts as absent, not as 0).
pub(crate) async fn wait_metric(
    http: &reqwest::Client,
    service: &Service,
    name: &str,
    wanted: impl Fn(f64) -> bool,
) {
    let what = format!("{}'s {name} reaches the wanted value", service.name);
    bus::testing::wait_until(DEADLINE, &what, || {
        let request = http.get(service.url("/metrics"));
        let wanted = &wanted;
        async move {
            let text = request.send().await.ok()?.text().await.ok()?;
            let value = metric_sum(&text, name)?;
            wanted(value).then_some(())
        }
    })
    .await;
}

/// The sum of the samples of `name` (any labels) in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let samples: Vec<f64> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                return None;
            }
            line.rsplit(' ').next()?.parse().ok()
        })
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

/// What a follower of an event stream has received: the ids of the frames with an event, and
/// the last id of any frame (where it resumes).
#[derive(Debug, Default)]
pub(crate) struct Followed {
    pub(crate) events: Vec<i64>,
    pub(crate) last_id: i64,
}

/// Follows the event stream at `path` (`/events/stream`, `/orders/{id}/events/stream`) as a
/// browser's `EventSource` does: on any end of the response
/// (the service killed, restarted elsewhere) it reconnects to the current address from `base`
/// with `Last-Event-ID`, until it has seen an id at or past `until` (0: never, run until
/// aborted). Progress is published through `seen`.
pub(crate) async fn follow_like_a_browser(
    base: tokio::sync::watch::Receiver<String>,
    path: String,
    seen: std::sync::Arc<std::sync::Mutex<Followed>>,
    mut until: tokio::sync::watch::Receiver<i64>,
) {
    let http = reqwest::Client::new();
    let reached = |seen: &std::sync::Mutex<Followed>, until: &tokio::sync::watch::Receiver<i64>| {
        let target = *until.borrow();
        target > 0 && seen.lock().expect("lock").last_id >= target
    };
    loop {
        if reached(&seen, &until) {
            return;
        }
        let url = format!("{}{path}", base.borrow().clone());
        let last_id = seen.lock().expect("lock").last_id;
        let response = http
            .get(url)
            .header("last-event-id", last_id.to_string())
            .send()
            .await;
        let mut response = match response {
            Ok(response) if response.status().is_success() => response,
            // Not there, or not serving now: try again shortly, as a page would.
            _ => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut pending = String::new();
        loop {
            let chunk = tokio::select! {
                chunk = response.chunk() => chunk,
                // The target may be set when everything up to it has arrived already.
                _ = until.changed() => {
                    if reached(&seen, &until) {
                        return;
                    }
                    continue;
                }
            };
            let Ok(Some(chunk)) = chunk else { break };
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
            if reached(&seen, &until) {
                return;
            }
        }
    }
}

/// What the writers of [`write_until_stopped`] were told.
#[derive(Debug, Default)]
pub(crate) struct WriteOutcomes {
    /// Every acknowledged command: its order id, the order's version after it and the position
    /// of its (single) event.
    pub(crate) acknowledged: Vec<(String, i64, i64)>,
    /// Every refusal: its status and problem `code`.
    pub(crate) refused: Vec<(u16, String)>,
}

/// How long a writer waits before sending a refused command again, as a client honouring a
/// short `Retry-After` would.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Creates orders for `customer` and adds items to them through the command service, one
/// command at a time, until `stop` turns true; records every answer in `outcomes`. Each command
/// carries its own `Idempotency-Key` and is sent again, unchanged, while it is answered 503:
/// what a client does when it cannot know whether a refused or unanswered command was
/// committed. A writer stops only between commands, so every command it began is acknowledged
/// or refused with another status (which the tests' assertions on `refused` report).
async fn write_until_stopped(
    http: reqwest::Client,
    command_url: String,
    customer: Uuid,
    outcomes: std::sync::Arc<std::sync::Mutex<WriteOutcomes>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    const ITEMS_PER_ORDER: usize = 10;
    let mut order: Option<Uuid> = None;
    let mut items = 0;
    while !*stop.borrow() {
        let (url, body) = match order {
            None => (
                format!("{command_url}/orders"),
                json!({ "customer_id": customer, "currency": "EUR", "order_id": Uuid::new_v4() }),
            ),
            Some(order_id) => (
                format!("{command_url}/orders/{order_id}/items"),
                json!({ "sku": format!("SKU-{items}"), "quantity": 1, "unit_price": 100 }),
            ),
        };
        let key = Uuid::new_v4().to_string();
        loop {
            let response = http
                .post(&url)
                .header("idempotency-key", &key)
                .json(&body)
                .send()
                .await
                .expect("the command service answers, database or not");
            let status = response.status().as_u16();
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            if status == 200 || status == 201 {
                let order_id: Uuid = answer["order_id"]
                    .as_str()
                    .and_then(|id| id.parse().ok())
                    .expect("order id");
                let version = answer["version"].as_i64().expect("version");
                outcomes.lock().expect("lock").acknowledged.push((
                    order_id.to_string(),
                    version,
                    position(&answer),
                ));
                order = Some(order_id);
                items += 1;
                if items > ITEMS_PER_ORDER {
                    (order, items) = (None, 0);
                }
                break;
            }
            let code = answer["code"]
                .as_str()
                .unwrap_or("(no problem body)")
                .to_owned();
            outcomes.lock().expect("lock").refused.push((status, code));
            if status != 503 {
                // Not worth sending again: the test's assertions on `refused` report it.
                break;
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// Writers running [`write_until_stopped`] against one command service, for one customer.
pub(crate) struct Writers {
    outcomes: std::sync::Arc<std::sync::Mutex<WriteOutcomes>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// Starts `count` writers creating orders for `customer` through `command`.
    pub(crate) fn start(
        http: &reqwest::Client,
        command: &Service,
        customer: Uuid,
        count: usize,
    ) -> Self {
        let outcomes = std::sync::Arc::new(std::sync::Mutex::new(WriteOutcomes::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let tasks = (0..count)
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
        Self {
            outcomes,
            stop,
            tasks,
        }
    }

    /// How many commands have been acknowledged so far.
    pub(crate) fn acknowledged(&self) -> usize {
        self.outcomes.lock().expect("lock").acknowledged.len()
    }

    /// The `index`th acknowledged command: order id, version, position.
    pub(crate) fn acknowledgement(&self, index: usize) -> (String, i64, i64) {
        self.outcomes.lock().expect("lock").acknowledged[index].clone()
    }

    /// Whether a refusal so far satisfies `wanted`.
    pub(crate) fn was_refused(&self, wanted: impl Fn(u16, &str) -> bool) -> bool {
        let outcomes = self.outcomes.lock().expect("lock");
        outcomes
            .refused
            .iter()
            .any(|(status, code)| wanted(*status, code))
    }

    /// Waits until `more` commands beyond those acknowledged now are acknowledged.
    pub(crate) async fn wait_for_more(&self, more: usize, when: &str) {
        let target = self.acknowledged() + more;
        let what = format!("{more} more commands are acknowledged {when}");
        bus::testing::wait_until(DEADLINE, &what, || {
            let reached = self.acknowledged() >= target;
            async move { reached.then_some(()) }
        })
        .await;
    }

    /// Stops the writers between commands and returns what they were told.
    pub(crate) async fn stop(self) -> WriteOutcomes {
        self.stop.send(true).expect("the writers listen");
        for task in self.tasks {
            // A writer retries a 503 until it is answered: a service that never answers again
            // would hold it for ever.
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("a writer stops within the deadline (is the service answering?)")
                .expect("a writer does not panic");
        }
        std::mem::take(&mut *self.outcomes.lock().expect("lock"))
    }
}

/// The `position` fields of `stream` on the Redis at `conn`, in stream order.
pub(crate) async fn published_positions(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<i64> {
    stream_events(conn, stream)
        .await
        .into_iter()
        .map(|(position, _)| position)
        .collect()
}

/// The `(position, event_id)` of every entry of `stream`, in stream order.
pub(crate) async fn stream_events(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<(i64, String)> {
    let entries: redis::streams::StreamRangeReply = redis::AsyncCommands::xrange_all(conn, stream)
        .await
        .expect("xrange");
    entries
        .ids
        .iter()
        .map(|entry| {
            let position = entry
                .get::<String>("position")
                .and_then(|p| p.parse().ok())
                .expect("a position field");
            let event_id = entry.get::<String>("event_id").expect("an event_id field");
            (position, event_id)
        })
        .collect()
}

/// Waits until both read models have applied `head` (through `query`'s read-your-writes) and
/// requires them to agree with a fresh fold of the event store: `customer`'s order count is
/// every order stored, and `projector verify` finds no difference in either.
pub(crate) async fn assert_read_models_exact_at(
    http: &reqwest::Client,
    query: &Service,
    database_url: &str,
    stream: &str,
    customer: Uuid,
    head: i64,
) {
    let pool = sqlx::PgPool::connect(database_url)
        .await
        .expect("connect to the database");
    let orders: i64 = sqlx::query_scalar("SELECT count(DISTINCT stream_id) FROM events")
        .fetch_one(&pool)
        .await
        .expect("count the orders");
    pool.close().await;
    let stats = send(
        http,
        http.get(query.url(&format!(
            "/customers/{customer}?min_position={head}&wait_ms=10000"
        ))),
        200,
    )
    .await;
    assert_eq!(stats["order_count"], orders, "{stats}");
    send(
        http,
        http.get(query.url(&format!(
            "/orders?limit=1&min_position={head}&wait_ms=10000"
        ))),
        200,
    )
    .await;
    for projection in ["order_summaries", "customer_stats"] {
        let (exact, report) = projector_admin(database_url, stream, &["verify", projection]).await;
        assert!(exact, "{projection}: {report}");
    }
}
