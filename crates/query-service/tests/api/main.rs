//! The query service over HTTP, on a fresh database per test. Read models are written directly
//! with SQL (the projector is not part of these tests); history and time travel use real events
//! appended with `events::decide` + `store::append_batch`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Parser;
use events::{EventMetadata, OrderCommand, OrderState, decide, evolve, order_stream_id};
use platform::testing::LogBuffer;
use query_service::consistency::WatcherStats;
use query_service::history::{HistoryStats, STATE_PAGE_EVENTS};
use query_service::log_stream::StreamStats;
use query_service::log_tail::TailStats;
use query_service::read_models::ReadStats;
use query_service::{Application, Config};
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::PgPool;
use store::testing::TestDatabase;
use store::{AppendRequest, ExpectedVersion};
use uuid::Uuid;

/// How long a wait-until helper polls before failing the test.
const DEADLINE: Duration = Duration::from_secs(20);

struct TestApp {
    base: String,
    client: reqwest::Client,
    db: TestDatabase,
    watcher: Arc<WatcherStats>,
    reads: Arc<ReadStats>,
    streams: Arc<StreamStats>,
    tail: Arc<TailStats>,
    history: Arc<HistoryStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The service's `run_until_stopped`.
    running: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The proxy the service reaches PostgreSQL through, with `Options::through_proxy`.
    proxy: Option<ReplyHoldingProxy>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[derive(Default)]
struct Options {
    token: Option<&'static str>,
    poll_ms: Option<u64>,
    /// `WAIT_MS_MAX` (and a `WAIT_MS_DEFAULT` within it).
    wait_ms_max: Option<u64>,
    /// `EVENTS_SCAN_SPAN`.
    events_scan_span: Option<i64>,
    /// `EVENT_STREAMS_MAX`.
    event_streams_max: Option<u64>,
    /// `CORS_ALLOWED_ORIGINS`.
    cors_allowed_origins: Option<&'static str>,
    /// `EVENT_STREAM_PROGRESS_MS`.
    event_stream_progress_ms: Option<u64>,
    /// Connects the service through a [`ReplyHoldingProxy`] (`TestApp::proxy`).
    through_proxy: bool,
}

async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

async fn spawn_app_with(options: Options) -> TestApp {
    let db = TestDatabase::new().await;
    let proxy = match options.through_proxy {
        true => Some(ReplyHoldingProxy::start(&db).await),
        false => None,
    };
    let database_url = proxy
        .as_ref()
        .map_or_else(|| db.url.clone(), |p| p.url(&db));
    let poll_ms = options.poll_ms.unwrap_or(250).to_string();
    let mut config = Config::try_parse_from([
        "query-service",
        "--database-url",
        &database_url,
        "--listen-addr",
        "127.0.0.1:0",
        "--db-max-connections",
        "4",
        "--skip-migrations",
        "--shutdown-grace-secs",
        "1",
        "--checkpoint-poll-ms",
        &poll_ms,
    ])
    .unwrap();
    config.auth.api_token = options.token.map(str::to_owned);
    if let Some(max) = options.wait_ms_max {
        config.reads.wait_ms_max = max;
        config.reads.wait_ms_default = config.reads.wait_ms_default.min(max);
    }
    if let Some(span) = options.events_scan_span {
        config.reads.events_scan_span = span;
    }
    if let Some(max) = options.event_streams_max {
        config.reads.event_streams_max = max;
    }
    config.http.cors_allowed_origins = options.cors_allowed_origins.map(str::to_owned);
    if let Some(ms) = options.event_stream_progress_ms {
        config.reads.event_stream_progress_ms = ms;
    }
    let app = Application::build(config).await.unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let watcher = app.watcher_stats();
    let reads = app.read_stats();
    let (streams, tail) = (app.stream_stats(), app.tail_stats());
    let history = app.history_stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let test = TestApp {
        base,
        client: reqwest::Client::new(),
        db,
        watcher,
        reads,
        streams,
        tail,
        history,
        stop: Some(stop),
        running: Some(running),
        proxy,
    };
    // The listener connects in the background; a NOTIFY before its LISTEN would be lost.
    let listens = Arc::clone(&test.watcher);
    wait_until("the listener is listening", || {
        let listens = Arc::clone(&listens);
        async move { listens.listens.load(Ordering::Relaxed) > 0 }
    })
    .await;
    test
}

impl TestApp {
    fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    async fn get_json(&self, path: &str) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let response = self.get(path).await;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, headers, body)
    }

    /// Writes an `order_summaries` row as the projector would.
    async fn put_summary(&self, order: &TestOrder) {
        sqlx::query(
            "INSERT INTO order_summaries (order_id, customer_id, status, currency, items, total, \
             item_count, version, created_at, updated_at, created_position) \
             VALUES ($1, $2, $3, 'EUR', $4, $5, $6, $7, $8, $8, $9)",
        )
        .bind(order.order_id)
        .bind(order.customer_id)
        .bind(order.status)
        .bind(serde_json::json!([{"sku": "SKU-1", "quantity": 2, "unit_price": 1250}]))
        .bind(2500_i64)
        .bind(1_i32)
        .bind(2_i64)
        .bind(order.created_at())
        .bind(order.created_position)
        .execute(self.pool())
        .await
        .unwrap();
    }

    /// Advances a checkpoint, optionally announcing it like the projector's sweeper.
    async fn set_checkpoint(&self, projection: &str, position: i64, notify: bool) {
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, position) VALUES ($1, $2) \
             ON CONFLICT (projection) DO UPDATE SET position = EXCLUDED.position, updated_at = now()",
        )
        .bind(projection)
        .bind(position)
        .execute(self.pool())
        .await
        .unwrap();
        if notify {
            sqlx::query("SELECT pg_notify('projection_position', $1)")
                .bind(format!("{projection}:{position}"))
                .execute(self.pool())
                .await
                .unwrap();
        }
    }

    /// Sends `GET {path}` in the background and returns once the service holds it in a wait;
    /// the task answers the response's body.
    async fn follow(&self, path: &str) -> tokio::task::JoinHandle<Value> {
        let begun = self.watcher.waits_begun.load(Ordering::Relaxed);
        let request = self.client.get(format!("{}{path}", self.base));
        let follower =
            tokio::spawn(
                async move { request.send().await.unwrap().json::<Value>().await.unwrap() },
            );
        let stats = Arc::clone(&self.watcher);
        wait_until("the follower waits", || {
            let stats = Arc::clone(&stats);
            async move {
                stats.waits_begun.load(Ordering::Relaxed) > begun
                    && stats.waiting.load(Ordering::Relaxed) > 0
            }
        })
        .await;
        follower
    }

    /// Appends orders of one event each until the log reaches `position`: a read-your-writes
    /// wait for a position the log does not have is refused 409, not waited for.
    async fn fill_log_to(&self, position: i64) {
        while store::head_position(self.pool()).await.unwrap() < position {
            let order = Uuid::new_v4();
            self.append_order(order, vec![create(order, Uuid::new_v4())])
                .await;
        }
    }

    /// Appends one event batch per command to a new order; returns the versions' positions.
    async fn append_order(&self, order_id: Uuid, commands: Vec<OrderCommand>) -> Vec<i64> {
        let mut state = OrderState::default();
        let mut positions = Vec::new();
        for command in commands {
            positions.push(self.append_command(order_id, &mut state, command).await);
        }
        positions
    }

    /// Appends the events of one command to the order at `state`, which it moves on; returns
    /// the position of the last of them.
    async fn append_command(
        &self,
        order_id: Uuid,
        state: &mut OrderState,
        command: OrderCommand,
    ) -> i64 {
        let produced = decide(state, &command).unwrap();
        let request = AppendRequest {
            stream_id: order_stream_id(order_id),
            expected: ExpectedVersion::Exact(state.version),
            events: produced
                .iter()
                .map(|e| e.to_new_event(EventMetadata::default()))
                .collect(),
            idempotency: None,
        };
        let outcome = store::append_batch(self.pool(), &[request])
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        for event in &produced {
            *state = evolve(std::mem::take(state), event);
        }
        outcome.last_position
    }
}

struct TestOrder {
    order_id: Uuid,
    customer_id: Uuid,
    status: &'static str,
    created_position: i64,
}

impl TestOrder {
    fn new(customer_id: Uuid, status: &'static str, created_position: i64) -> Self {
        Self {
            order_id: Uuid::new_v4(),
            customer_id,
            status,
            created_position,
        }
    }

    /// Creation times follow positions, so "newest first" can be checked on the body.
    fn created_at(&self) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_700_000_000 + self.created_position, 0).unwrap()
    }
}

/// Retries `attempt` until it gives a value, failing after [`DEADLINE`].
async fn wait_until_value<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One Server-Sent Events frame (comment-only frames are skipped by the reader).
#[derive(Debug, Default)]
struct Frame {
    id: Option<String>,
    event: Option<String>,
    data: Option<Value>,
    retry: Option<String>,
}

/// Reads the frames of a `text/event-stream` response as they arrive.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    /// `GET path` with `Last-Event-ID` when given: the reader, or the refusal's status and body.
    async fn open(
        app: &TestApp,
        path: &str,
        last_event_id: Option<i64>,
    ) -> Result<Self, (StatusCode, reqwest::header::HeaderMap, Value)> {
        let mut request = app.client.get(format!("{}{path}", app.base));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.unwrap();
        if response.status() != StatusCode::OK {
            let (status, headers) = (response.status(), response.headers().clone());
            return Err((status, headers, response.json().await.unwrap()));
        }
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Ok(Self {
            response,
            buffer: String::new(),
        })
    }

    /// The next frame; `None` when the service ended the stream cleanly. Panics on a broken
    /// connection or after [`DEADLINE`].
    async fn next_frame(&mut self) -> Option<Frame> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let text: String = self.buffer.drain(..end + 2).collect();
                let mut frame = Frame::default();
                let mut any = false;
                for line in text.lines() {
                    let Some((field, value)) = line.split_once(':') else {
                        continue;
                    };
                    let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
                    any |= !field.is_empty();
                    match field {
                        "id" => frame.id = Some(value),
                        "event" => frame.event = Some(value),
                        "data" => frame.data = Some(serde_json::from_str(&value).unwrap()),
                        "retry" => frame.retry = Some(value),
                        _ => {}
                    }
                }
                if any {
                    return Some(frame);
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(remaining, self.response.chunk())
                .await
                .expect("a frame within the deadline")
                .expect("the stream is not cut off");
            self.buffer
                .push_str(std::str::from_utf8(&chunk?).expect("UTF-8 frames"));
        }
    }

    /// The next frame that carries an event.
    async fn next_event(&mut self) -> Frame {
        loop {
            let frame = self.next_frame().await.expect("the stream goes on");
            if frame.data.is_some() {
                return frame;
            }
        }
    }
}

fn projection_position(headers: &reqwest::header::HeaderMap) -> i64 {
    headers
        .get("x-projection-position")
        .expect("X-Projection-Position is present")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn create(order_id: Uuid, customer_id: Uuid) -> OrderCommand {
    OrderCommand::CreateOrder {
        order_id,
        customer_id,
        currency: "EUR".into(),
    }
}

fn add(sku: &str, quantity: i64, unit_price: i64) -> OrderCommand {
    OrderCommand::AddItem {
        sku: sku.into(),
        quantity,
        unit_price,
    }
}

#[tokio::test]
async fn an_order_and_a_customer_are_read_from_their_read_models_with_their_position() {
    let app = spawn_app().await;
    let customer = Uuid::new_v4();
    let order = TestOrder::new(customer, "placed", 3);
    app.put_summary(&order).await;
    app.set_checkpoint("order_summaries", 7, true).await;
    sqlx::query(
        "INSERT INTO customer_stats (customer_id, order_count, total_spent, draft_count, \
         placed_count, paid_count, shipped_count, cancelled_count) VALUES ($1, 4, 9900, 1, 1, 1, 1, 0)",
    )
    .bind(customer)
    .execute(app.pool())
    .await
    .unwrap();
    // Per currency; a currency whose sum fell back to 0 is left out of the answer.
    sqlx::query(
        "INSERT INTO customer_stats_spent (customer_id, currency, total_spent) \
         VALUES ($1, 'EUR', 8650), ($1, 'USD', 1250), ($1, 'GBP', 0)",
    )
    .bind(customer)
    .execute(app.pool())
    .await
    .unwrap();
    app.set_checkpoint("customer_stats", 5, true).await;

    let (status, headers, body) = app.get_json(&format!("/orders/{}", order.order_id)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(projection_position(&headers), 7);
    assert_eq!(body["order_id"], order.order_id.to_string());
    assert_eq!(body["customer_id"], customer.to_string());
    assert_eq!(body["status"], "placed");
    assert_eq!(body["currency"], "EUR");
    assert_eq!(
        body["items"],
        serde_json::json!([{"sku": "SKU-1", "quantity": 2, "unit_price": 1250}])
    );
    assert_eq!(body["total"], 2500);
    assert_eq!(body["item_count"], 1);
    assert_eq!(body["version"], 2);
    assert!(body["created_at"].is_string() && body["updated_at"].is_string());

    let (status, headers, body) = app.get_json(&format!("/customers/{customer}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(projection_position(&headers), 5);
    assert_eq!(
        body,
        serde_json::json!({
            "customer_id": customer.to_string(),
            "order_count": 4,
            "total_spent": 9900,
            "by_status": {"draft": 1, "placed": 1, "paid": 1, "shipped": 1, "cancelled": 0},
            "spent_by_currency": {"EUR": 8650, "USD": 1250},
            "held_back_orders": 0
        })
    );

    let (status, headers, body) = app.get_json(&format!("/orders/{}", Uuid::new_v4())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "order_not_found");
    assert_eq!(projection_position(&headers), 7);
    let (status, _, body) = app
        .get_json(&format!("/customers/{}", Uuid::new_v4()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "customer_not_found");
}

/// Parks `order_id`'s stream in `order_summaries` at `version`, as the projector does when that
/// version's event is dead-lettered.
async fn park(app: &TestApp, order_id: Uuid, version: i64) {
    park_in(app, "order_summaries", order_id, version).await;
}

/// Parks `order_id`'s stream in `projection` at `version`.
async fn park_in(app: &TestApp, projection: &str, order_id: Uuid, version: i64) {
    sqlx::query(
        "INSERT INTO projection_streams (projection, stream_id, version, parked_version, \
         parked_error) VALUES ($4, $1, $2, $3, 'boom')",
    )
    .bind(order_stream_id(order_id))
    .bind(version - 1)
    .bind(version)
    .bind(projection)
    .execute(app.pool())
    .await
    .unwrap();
}

#[tokio::test]
async fn an_order_held_back_behind_a_dead_letter_says_so_and_a_read_of_a_write_it_lacks_is_refused()
{
    let app = spawn_app().await;
    let customer = Uuid::new_v4();
    // Created and an item added (version 2, applied); placed (version 3) dead-lettered.
    let order_id = Uuid::new_v4();
    let positions = app
        .append_order(
            order_id,
            vec![
                create(order_id, customer),
                add("SKU-1", 2, 1250),
                OrderCommand::PlaceOrder,
            ],
        )
        .await;
    let mut order = TestOrder::new(customer, "draft", positions[0]);
    order.order_id = order_id;
    app.put_summary(&order).await;
    park(&app, order_id, 3).await;
    // An order whose creation was dead-lettered: no summary at all.
    let unborn = Uuid::new_v4();
    let unborn_at = app
        .append_order(unborn, vec![create(unborn, customer)])
        .await[0];
    park(&app, unborn, 1).await;
    // The mark passes both: a parked event counts as settled.
    app.set_checkpoint("order_summaries", unborn_at, true).await;

    let held = |headers: &reqwest::header::HeaderMap| {
        headers
            .get("x-held-back-version")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let path = format!("/orders/{order_id}");
    let (status, headers, body) = app.get_json(&path).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["version"].as_i64(), body["status"].as_str()),
        (Some(2), Some("draft"))
    );
    assert_eq!(held(&headers).as_deref(), Some("3"));

    // A write before the held-back event is reflected: served, with the header.
    let (status, headers, body) = app
        .get_json(&format!("{path}?min_position={}", positions[1]))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(held(&headers).as_deref(), Some("3"));

    // The held-back write itself (or anything after it) is not: refused, saying why.
    for min_position in [positions[2], unborn_at] {
        let (status, headers, body) = app
            .get_json(&format!("{path}?min_position={min_position}"))
            .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["code"], "order_held_back");
        assert_eq!(body["held_back_version"], 3);
        assert_eq!(body["held_back_position"], positions[2]);
        assert_eq!(held(&headers).as_deref(), Some("3"));
        assert_eq!(projection_position(&headers), unborn_at);
        assert!(
            headers.get("retry-after").is_none(),
            "waiting does not help"
        );
    }

    // No summary, yet the order exists: held back, not "not found".
    let (status, headers, body) = app.get_json(&format!("/orders/{unborn}")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "order_held_back");
    assert_eq!(body["held_back_version"], 1);
    assert_eq!(held(&headers).as_deref(), Some("1"));
    let (status, _, body) = app.get_json(&format!("/orders/{}", Uuid::new_v4())).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("order_not_found"))
    );

    // The list marks the held-back order; an order that is not held back carries no mark, and
    // the order with no summary is not listed.
    let mut clear = TestOrder::new(customer, "draft", unborn_at + 1);
    clear.order_id = Uuid::new_v4();
    app.put_summary(&clear).await;
    for query in [
        format!("customer_id={customer}"),
        "status=draft".to_owned(),
        format!("customer_id={customer}&status=draft"),
        String::new(),
    ] {
        let (status, _, body) = app.get_json(&format!("/orders?{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        let listed: Vec<(String, Option<i64>)> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| {
                assert_eq!(item["status"], "draft", "{query}: a summary, flattened");
                (
                    item["order_id"].as_str().unwrap().to_owned(),
                    item.get("held_back_version").map(|v| v.as_i64().unwrap()),
                )
            })
            .collect();
        assert_eq!(
            listed,
            vec![
                (clear.order_id.to_string(), None),
                (order_id.to_string(), Some(3))
            ],
            "{query}"
        );
    }
}

#[tokio::test]
async fn a_customer_with_an_order_held_back_says_how_many_and_a_read_of_a_write_the_stats_lack_is_refused()
 {
    let app = spawn_app().await;
    let customer = Uuid::new_v4();
    // One order fully applied to customer_stats; a second whose placing (version 3) was
    // dead-lettered there; a third whose creation was.
    let applied = Uuid::new_v4();
    let applied_at = app
        .append_order(applied, vec![create(applied, customer)])
        .await[0];
    let held = Uuid::new_v4();
    let held_at = app
        .append_order(
            held,
            vec![
                create(held, customer),
                add("SKU-1", 2, 1250),
                OrderCommand::PlaceOrder,
            ],
        )
        .await;
    park_in(&app, "customer_stats", held, 3).await;
    sqlx::query(
        "INSERT INTO customer_stats (customer_id, order_count, total_spent, draft_count, \
         placed_count, paid_count, shipped_count, cancelled_count) VALUES ($1, 2, 0, 2, 0, 0, 0, 0)",
    )
    .bind(customer)
    .execute(app.pool())
    .await
    .unwrap();
    // Another customer's held-back order is not this customer's.
    let stranger = Uuid::new_v4();
    let strangers_order = Uuid::new_v4();
    let strangers_at = app
        .append_order(strangers_order, vec![create(strangers_order, stranger)])
        .await[0];
    park_in(&app, "customer_stats", strangers_order, 1).await;
    app.set_checkpoint("customer_stats", strangers_at, true)
        .await;

    let path = format!("/customers/{customer}");
    for min_position in [None, Some(applied_at), Some(held_at[1])] {
        let query = min_position.map_or(String::new(), |p| format!("?min_position={p}"));
        let (status, _, body) = app.get_json(&format!("{path}{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        assert_eq!(body["order_count"], 2);
        assert_eq!(body["held_back_orders"], 1, "{query}");
    }
    // At or past the held-back placing: the stats lack it.
    for min_position in [held_at[2], strangers_at] {
        let (status, headers, body) = app
            .get_json(&format!("{path}?min_position={min_position}"))
            .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["code"], "customer_held_back");
        assert_eq!(body["held_back_orders"], 1);
        assert_eq!(body["held_back_position"], held_at[2]);
        assert_eq!(projection_position(&headers), strangers_at);
        assert!(
            headers.get("retry-after").is_none(),
            "waiting does not help"
        );
    }

    // The stranger has no stats at all, yet has an order: held back, not "not found".
    let (status, _, body) = app.get_json(&format!("/customers/{stranger}")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "customer_held_back");
    assert_eq!(body["held_back_orders"], 1);
    assert_eq!(body["held_back_position"], strangers_at);

    // The same order parked in the other projection does not count here.
    park(&app, applied, 1).await;
    let (status, _, body) = app.get_json(&path).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["held_back_orders"], 1);
}

#[tokio::test]
async fn a_read_with_min_position_waits_until_a_notified_checkpoint_reaches_it() {
    // A poll interval far beyond the test: only the NOTIFY can wake the waiter.
    let app = spawn_app_with(Options {
        poll_ms: Some(600_000),
        ..Options::default()
    })
    .await;
    let order = TestOrder::new(Uuid::new_v4(), "draft", 1);
    app.put_summary(&order).await;
    app.set_checkpoint("order_summaries", 1, true).await;
    app.fill_log_to(5).await;

    let (status, _, body) = app
        .get_json(&format!(
            "/orders/{}?min_position=5&wait_ms=0",
            order.order_id
        ))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    let waiter = {
        let client = app.client.clone();
        let url = format!("{}/orders/{}?wait_ms=10000", app.base, order.order_id);
        tokio::spawn(async move {
            client
                .get(url)
                .header("X-Min-Position", "5")
                .send()
                .await
                .unwrap()
        })
    };
    let stats = Arc::clone(&app.watcher);
    wait_until("the request waits", || {
        let stats = Arc::clone(&stats);
        async move { stats.waiting.load(Ordering::Relaxed) == 1 }
    })
    .await;
    app.set_checkpoint("order_summaries", 6, true).await;

    let response = waiter.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(projection_position(response.headers()) >= 5);
}

#[tokio::test]
async fn every_connection_of_the_service_carries_its_name() {
    let app = spawn_app().await;
    // spawn_app returns once the listener listens: its connection exists by now.
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT application_name FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() ORDER BY 1",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert!(
        names.contains(&query_service::consistency::LISTENER_APPLICATION_NAME.to_owned()),
        "{names:?}"
    );
    assert!(names.contains(&"query-service".to_owned()), "{names:?}");
    // The test's own pool is unnamed; nothing of the service is.
    let ours: Vec<&String> = names.iter().filter(|n| !n.is_empty()).collect();
    assert!(
        ours.iter().all(|n| n.starts_with("query-service")),
        "{names:?}"
    );
}

#[tokio::test]
async fn a_checkpoint_advanced_without_a_notification_is_found_by_the_poll() {
    let app = spawn_app().await;
    sqlx::query("INSERT INTO customer_stats (customer_id, order_count) VALUES ($1, 1)")
        .bind(Uuid::nil())
        .execute(app.pool())
        .await
        .unwrap();
    let waiter = {
        let client = app.client.clone();
        let url = format!("{}/customers/{}?min_position=3", app.base, Uuid::nil());
        tokio::spawn(async move { client.get(url).send().await.unwrap() })
    };
    let stats = Arc::clone(&app.watcher);
    wait_until("the request waits", || {
        let stats = Arc::clone(&stats);
        async move { stats.waiting.load(Ordering::Relaxed) == 1 }
    })
    .await;
    app.set_checkpoint("customer_stats", 3, false).await;
    let response = waiter.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(projection_position(response.headers()), 3);
}

/// A TCP proxy to the test's PostgreSQL that can hold the server's reply carrying given bytes
/// (and only that) while passing everything else: a query is executed on the server, then its
/// answer waits here, as one delayed on the network does.
struct ReplyHoldingProxy {
    options: sqlx::postgres::PgConnectOptions,
    hold: tokio::sync::watch::Sender<Option<&'static [u8]>>,
    held: Arc<std::sync::atomic::AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl ReplyHoldingProxy {
    async fn start(db: &TestDatabase) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let direct = db.pool.connect_options();
        let upstream = (direct.get_host().to_owned(), direct.get_port());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (hold, holding) = tokio::sync::watch::channel(None::<&'static [u8]>);
        let held = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&held);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(upstream.clone())
                    .await
                    .unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    let _ = server_write.shutdown().await;
                });
                let (mut holding, counter) = (holding.clone(), Arc::clone(&counter));
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 16 * 1024];
                    loop {
                        let read = match server_read.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => read,
                        };
                        let marker = *holding.borrow_and_update();
                        if let Some(marker) = marker
                            && (marker.is_empty()
                                || buffer[..read].windows(marker.len()).any(|w| w == marker))
                        {
                            counter.fetch_add(1, Ordering::SeqCst);
                            if holding.wait_for(Option::is_none).await.is_err() {
                                return;
                            }
                        }
                        if client_write.write_all(&buffer[..read]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            options: direct.as_ref().clone().port(port),
            hold,
            held,
            accept,
        }
    }

    /// A pool of one connection through the proxy.
    async fn pool(&self) -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(self.options.clone())
            .await
            .unwrap()
    }

    /// The URL of `db` through the proxy.
    fn url(&self, db: &TestDatabase) -> String {
        let direct = db.pool.connect_options().get_port();
        let url = db.url.replace(
            &format!(":{direct}/"),
            &format!(":{}/", self.options.get_port()),
        );
        assert_ne!(url, db.url);
        url
    }

    /// Holds the next replies that carry `marker` (`Some`; every reply for an empty one: a
    /// server gone silent), or lets them go (`None`).
    fn hold_replies_with(&self, marker: Option<&'static [u8]>) {
        self.hold.send_replace(marker);
    }

    /// Replies held so far.
    fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }
}

impl Drop for ReplyHoldingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The value of `database_unreachable` on the service's `/metrics`, if it is there.
async fn database_unreachable(app: &TestApp) -> Option<f64> {
    let page = app.get("/metrics").await.text().await.unwrap();
    page.lines()
        .find(|line| line.starts_with("database_unreachable{"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// An instance nobody sends requests to (a quiet hour, or out of rotation because its readiness
/// fails) still reports PostgreSQL gone: its readiness probe's failed `postgres` check has the
/// database gate probe the server, so `database_unreachable` is 1 while it cannot be reached (the
/// alert on it can fire) and 0 once it answers again.
#[tokio::test]
async fn a_service_that_only_its_readiness_probe_asks_reports_postgresql_unreachable() {
    let mut app = spawn_app_with(Options {
        through_proxy: true,
        ..Options::default()
    })
    .await;
    assert_eq!(app.get("/readyz").await.status(), StatusCode::OK);
    assert_eq!(database_unreachable(&app).await, Some(0.0));

    // The server goes silent: nothing it sends reaches the service any more.
    let proxy = app.proxy.take().unwrap();
    proxy.hold_replies_with(Some(b""));
    assert_eq!(
        app.get("/readyz").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    wait_until("the service reports PostgreSQL unreachable", || async {
        database_unreachable(&app).await == Some(1.0)
    })
    .await;

    proxy.hold_replies_with(None);
    wait_until("the service reports PostgreSQL reachable again", || async {
        database_unreachable(&app).await == Some(0.0)
    })
    .await;
    assert_eq!(app.get("/readyz").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_poll_overtaken_by_a_notification_never_moves_a_projection_back() {
    use query_service::consistency::{CheckpointWatcher, ORDER_SUMMARIES};
    let db = TestDatabase::new().await;
    let checkpoint = |position: i64| {
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, position) VALUES ('order_summaries', $1) \
             ON CONFLICT (projection) DO UPDATE SET position = EXCLUDED.position",
        )
        .bind(position)
        .execute(&db.pool)
    };
    checkpoint(10).await.unwrap();
    let proxy = ReplyHoldingProxy::start(&db).await;
    let pool = proxy.pool().await;
    let watcher = CheckpointWatcher::new();
    watcher.poll_once(&pool).await.unwrap();
    assert_eq!(watcher.position(ORDER_SUMMARIES), 10);

    // The poll's read of the checkpoints finds 10; its answer (the rows name the projection) is
    // delayed on the way back.
    proxy.hold_replies_with(Some(b"order_summaries"));
    let poll = {
        let (watcher, pool) = (watcher.clone(), pool.clone());
        tokio::spawn(async move { watcher.poll_once(&pool).await })
    };
    wait_until("the poll's read is answered", || async { proxy.held() > 0 }).await;
    // Meanwhile the projector applies 11 and announces it; the listener raises the watch.
    checkpoint(11).await.unwrap();
    watcher.apply_notification("order_summaries:11");
    assert_eq!(watcher.position(ORDER_SUMMARIES), 11);
    proxy.hold_replies_with(None);
    poll.await.unwrap().unwrap();
    assert_eq!(
        watcher.position(ORDER_SUMMARIES),
        11,
        "a read older than the notification must not lower the position"
    );

    // A poll that no notification overtook is the truth, also when it is lower (a rebuild
    // reset the checkpoint).
    checkpoint(3).await.unwrap();
    watcher.poll_once(&pool).await.unwrap();
    assert_eq!(watcher.position(ORDER_SUMMARIES), 3);
}

/// PostgreSQL stops answering (its host died, a fail-over moved its address) while the log's
/// tail reads a commit for a stream at the head and the checkpoint poll reads: told to stop,
/// the service gives those reads up and stops, instead of waiting on them until a grace period
/// runs out (its log says neither that requests nor that tasks outlived one).
#[tokio::test]
async fn a_service_told_to_stop_while_postgresql_is_silent_gives_up_its_reads_instead_of_waiting_out_a_grace_period()
 {
    // Every task of the service runs on this thread (a current-thread runtime): its logs land
    // here.
    let (logs, _logging) = LogBuffer::capture("info");
    let mut app = spawn_app_with(Options {
        poll_ms: Some(20),
        through_proxy: true,
        ..Options::default()
    })
    .await;
    let mut stream = SseReader::open(&app, "/events/stream", None).await.unwrap();
    stream.next_frame().await; // the retry frame: the stream is open and follows the tail
    let proxy = app.proxy.take().unwrap();
    // The tail's read of the next commit is answered, and the answer never arrives.
    let reads = app.tail.reads.load(Ordering::Relaxed);
    proxy.hold_replies_with(Some(b"OrderCreated"));
    app.append_order(Uuid::new_v4(), vec![create(Uuid::new_v4(), Uuid::new_v4())])
        .await;
    wait_until("the tail's read is held", || async { proxy.held() > 0 }).await;
    assert_eq!(app.tail.reads.load(Ordering::Relaxed), reads);
    // Then nothing answers at all: the checkpoint poll waits too. (Counting the polls that
    // begin would race: one begun just before the silence is held, and no other begins.)
    let held = proxy.held();
    proxy.hold_replies_with(Some(b""));
    wait_until("a poll's reply is held", || async { proxy.held() > held }).await;

    let _ = app.stop.take().unwrap().send(());
    tokio::time::timeout(DEADLINE, app.running.take().unwrap())
        .await
        .expect("the service stops although PostgreSQL does not answer")
        .unwrap()
        .unwrap();
    // The held reads were never answered: the service stopped without them.
    assert_eq!(app.tail.reads.load(Ordering::Relaxed), reads);
    let log = logs.text();
    assert!(log.contains("query service stopped"), "{log}");
    for outlived in [
        "in-flight requests still running after the grace period",
        "background tasks still running at shutdown",
    ] {
        assert!(!log.contains(outlived), "{log}");
    }
    drop(stream);
    drop(proxy);
}

/// The watch has not heard of a mark the table already holds (its notification is late and
/// the poll far off): a read-your-writes request whose wait is up reads once before answering,
/// and is served, not refused 503.
#[tokio::test]
async fn a_mark_the_watch_has_not_heard_of_yet_serves_the_read_instead_of_a_503() {
    let app = spawn_app_with(Options {
        poll_ms: Some(60_000),
        ..Options::default()
    })
    .await;
    app.set_checkpoint("order_summaries", 7, false).await;
    app.fill_log_to(8).await;
    let response = app.get("/orders?min_position=7&wait_ms=0").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(projection_position(response.headers()), 7);
    let response = app.get("/orders?min_position=8&wait_ms=0").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(projection_position(response.headers()), 7);
}

/// The table's mark went back (a restore, a crash that lost the last marks) and the watch has
/// not polled since: a read-your-writes request the table cannot serve is a 503 naming the
/// table's position, never the higher one the watch still holds, which would claim events
/// applied that are not.
#[tokio::test]
async fn a_503_names_the_tables_mark_when_the_watch_still_holds_a_higher_one() {
    let app = spawn_app_with(Options {
        poll_ms: Some(60_000),
        ..Options::default()
    })
    .await;
    app.set_checkpoint("order_summaries", 10, true).await;
    let stats = Arc::clone(&app.watcher);
    wait_until("the watch has heard of position 10", || {
        let stats = Arc::clone(&stats);
        async move { stats.notifications.load(Ordering::Relaxed) > 0 }
    })
    .await;
    app.set_checkpoint("order_summaries", 3, false).await;
    app.fill_log_to(5).await;

    let (status, headers, body) = app.get_json("/orders?min_position=5&wait_ms=0").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "consistency_timeout");
    assert_eq!(projection_position(&headers), 3);
    assert_eq!(body["projection_position"], 3);
}

/// A position past the end of the log was never answered to a command by this store (made up,
/// or from before a restore to an earlier backup): once the wait is up the read is refused 409
/// with where the log ends, not 503, which invites retries and counts as an outage.
#[tokio::test]
async fn a_wait_for_a_position_past_the_end_of_the_log_is_refused_with_where_it_ends() {
    let app = spawn_app().await;
    let order = Uuid::new_v4();
    let customer = Uuid::new_v4();
    let positions = app.append_order(order, vec![create(order, customer)]).await;
    let head = positions[0];
    app.set_checkpoint("order_summaries", 0, true).await;
    app.set_checkpoint("customer_stats", 0, true).await;
    for path in [
        format!("/orders/{order}"),
        "/orders".to_owned(),
        format!("/customers/{customer}"),
    ] {
        let (status, headers, body) = app
            .get_json(&format!("{path}?min_position={}&wait_ms=50", head + 1))
            .await;
        assert_eq!(projection_position(&headers), 0, "{path}");
        assert_eq!(status, StatusCode::CONFLICT, "{path}: {body}");
        assert_eq!(body["code"], "position_beyond_head", "{path}");
        assert_eq!(body["head"], head, "{path}");
        assert_eq!(body["min_position"], head + 1, "{path}");
        assert_eq!(body["projection_position"], 0, "{path}");
        let (status, _, body) = app
            .get_json(&format!("{path}?min_position={i}&wait_ms=0", i = i64::MAX))
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{path}: {body}");
        // A position the log has, not applied yet, is still a wait that timed out.
        let (status, _, body) = app
            .get_json(&format!("{path}?min_position={head}&wait_ms=0"))
            .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        assert_eq!(body["code"], "consistency_timeout", "{path}");
    }
}

/// A 503 any client can cause at will (here a read-your-writes wait that runs out) is logged
/// once, by the response line with its status, at INFO: not as a warning or an error, which
/// stay for faults.
#[tokio::test]
async fn a_503_answer_is_logged_once_at_info_not_as_a_warning_or_an_error() {
    // The service's tasks run on this thread (a current-thread runtime): its logs land here.
    let (logs, _logging) = LogBuffer::capture("info");
    let app = spawn_app().await;
    app.fill_log_to(3).await;
    app.set_checkpoint("order_summaries", 1, true).await;
    let (status, _, body) = app.get_json("/orders?min_position=3&wait_ms=0").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let text = logs.text();
    let answered: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("finished processing request") && line.contains("503"))
        .collect();
    assert_eq!(answered.len(), 1, "{text}");
    assert!(answered[0].contains("INFO"), "{text}");
    assert!(!text.contains("response failed"), "{text}");
    assert!(!text.contains("ERROR"), "{text}");
}

#[tokio::test]
async fn a_wait_past_wait_ms_answers_503_with_retry_after() {
    let app = spawn_app().await;
    app.set_checkpoint("order_summaries", 2, true).await;
    app.fill_log_to(100).await;
    let response = app.get("/orders?min_position=100&wait_ms=150").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(projection_position(response.headers()), 2);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "consistency_timeout");
    assert_eq!(body["min_position"], 100);
}

#[tokio::test]
async fn two_hundred_waiting_clients_do_not_multiply_database_load() {
    const CLIENTS: usize = 200;
    // The watcher's poll comes once at start and then not for an hour: any read of the
    // checkpoints during the test is one the waiting clients caused.
    let app = spawn_app_with(Options {
        poll_ms: Some(3_600_000),
        ..Options::default()
    })
    .await;
    let order = TestOrder::new(Uuid::new_v4(), "draft", 1);
    app.put_summary(&order).await;
    app.set_checkpoint("order_summaries", 1, true).await;
    let stats = Arc::clone(&app.watcher);
    wait_until("the watcher's first poll has begun", || {
        let stats = Arc::clone(&stats);
        async move { stats.checkpoint_polls.load(Ordering::Relaxed) > 0 }
    })
    .await;

    let polls_before = app.watcher.checkpoint_polls.load(Ordering::Relaxed);
    let reads_before = app.reads.queries.load(Ordering::Relaxed);
    let mut waiters = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let client = app.client.clone();
        let url = format!(
            "{}/orders/{}?min_position=50&wait_ms=10000",
            app.base, order.order_id
        );
        waiters.push(tokio::spawn(async move {
            client.get(url).send().await.unwrap()
        }));
    }
    let stats = Arc::clone(&app.watcher);
    wait_until("every client waits", || {
        let stats = Arc::clone(&stats);
        async move { stats.waiting.load(Ordering::Relaxed) == CLIENTS as u64 }
    })
    .await;
    // While they all wait, nobody has read the read model.
    assert_eq!(app.reads.queries.load(Ordering::Relaxed), reads_before);

    app.set_checkpoint("order_summaries", 50, true).await;
    for waiter in waiters {
        let response = waiter.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(projection_position(response.headers()) >= 50);
    }

    // Each client read the row exactly once, after the checkpoint advanced.
    assert_eq!(
        app.reads.queries.load(Ordering::Relaxed) - reads_before,
        CLIENTS as u64
    );
    // Waiting cost the checkpoint table nothing: the notification released every client.
    assert_eq!(
        app.watcher.checkpoint_polls.load(Ordering::Relaxed) - polls_before,
        0,
        "checkpoint polls caused by {CLIENTS} waiting clients"
    );
}

#[tokio::test]
async fn paging_visits_every_order_exactly_once_while_new_orders_are_inserted() {
    let app = spawn_app().await;
    let customer = Uuid::new_v4();
    let mut initial = HashSet::new();
    for position in 1..=60 {
        let order = TestOrder::new(customer, "draft", position * 2);
        initial.insert(order.order_id.to_string());
        app.put_summary(&order).await;
    }
    // Orders keep arriving (newer positions) while the client pages.
    let writer = {
        let pool = app.pool().clone();
        tokio::spawn(async move {
            for position in 1000..1040 {
                let order = TestOrder::new(customer, "draft", position);
                sqlx::query(
                    "INSERT INTO order_summaries (order_id, customer_id, status, currency, \
                     total, item_count, version, created_at, updated_at, created_position) \
                     VALUES ($1, $2, 'draft', 'EUR', 0, 0, 1, $3, $3, $4)",
                )
                .bind(order.order_id)
                .bind(order.customer_id)
                .bind(order.created_at())
                .bind(order.created_position)
                .execute(&pool)
                .await
                .unwrap();
                tokio::task::yield_now().await;
            }
        })
    };

    let mut seen = Vec::new();
    let mut created = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/orders?limit=7&cursor={c}"),
            None => "/orders?limit=7".to_owned(),
        };
        let (status, _, body) = app.get_json(&path).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let items = body["items"].as_array().unwrap();
        assert!(items.len() <= 7);
        for item in items {
            seen.push(item["order_id"].as_str().unwrap().to_owned());
            created.push(item["created_at"].as_str().unwrap().to_owned());
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    writer.await.unwrap();

    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "an order was visited twice");
    assert!(initial.is_subset(&unique), "an order was skipped");
    let times: Vec<DateTime<Utc>> = created.iter().map(|t| t.parse().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] > w[1]), "not newest first");
}

#[tokio::test]
async fn orders_are_filtered_by_customer_and_status() {
    let app = spawn_app().await;
    let alice = Uuid::new_v4();
    let bob = Uuid::new_v4();
    let orders = [
        TestOrder::new(alice, "draft", 1),
        TestOrder::new(alice, "paid", 2),
        TestOrder::new(bob, "paid", 3),
        TestOrder::new(bob, "shipped", 4),
        TestOrder::new(alice, "paid", 5),
    ];
    for order in &orders {
        app.put_summary(order).await;
    }
    let ids = |body: &Value| -> Vec<String> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["order_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let id = |i: usize| orders[i].order_id.to_string();

    let (_, _, body) = app.get_json(&format!("/orders?customer_id={alice}")).await;
    assert_eq!(ids(&body), vec![id(4), id(1), id(0)]);
    let (_, _, body) = app.get_json("/orders?status=paid").await;
    assert_eq!(ids(&body), vec![id(4), id(2), id(1)]);
    let (_, _, body) = app
        .get_json(&format!("/orders?customer_id={bob}&status=paid"))
        .await;
    assert_eq!(ids(&body), vec![id(2)]);
    assert!(body["next_cursor"].is_null());

    // Paging with a filter, then a cursor reused under another filter.
    let (_, _, body) = app.get_json("/orders?status=paid&limit=2").await;
    assert_eq!(ids(&body), vec![id(4), id(2)]);
    let cursor = body["next_cursor"].as_str().unwrap().to_owned();
    let (_, _, body) = app
        .get_json(&format!("/orders?status=paid&limit=2&cursor={cursor}"))
        .await;
    assert_eq!(ids(&body), vec![id(1)]);
    assert!(body["next_cursor"].is_null());
    let (status, _, body) = app
        .get_json(&format!("/orders?status=draft&limit=2&cursor={cursor}"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "invalid_cursor");
}

#[tokio::test]
async fn time_travel_by_version_and_by_time_shows_the_states_in_between() {
    let app = spawn_app().await;
    let order_id = Uuid::new_v4();
    let customer = Uuid::new_v4();
    app.append_order(
        order_id,
        vec![
            create(order_id, customer),
            add("SKU-1", 2, 500),
            OrderCommand::PlaceOrder,
        ],
    )
    .await;

    let response = app
        .get(&format!("/orders/{order_id}/state?version=2"))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-order-version"], "2");
    let at_two: Value = response.json().await.unwrap();
    assert_eq!(at_two["status"], "draft");
    assert_eq!(at_two["items"].as_array().unwrap().len(), 1);
    assert_eq!(at_two["total"], 1000);
    assert_eq!(at_two["version"], 2);

    let (_, _, history) = app.get_json(&format!("/orders/{order_id}/events")).await;
    let recorded_at = history["events"][1]["recorded_at"].as_str().unwrap();
    // A `+00:00` offset must be escaped in a query string; `Z` needs nothing.
    let at = recorded_at.parse::<DateTime<Utc>>().unwrap().to_rfc3339();
    let (status, headers, by_time) = app
        .get_json(&format!(
            "/orders/{order_id}/state?at={}",
            at.replace('+', "%2B")
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{by_time}");
    assert_eq!(headers["x-order-version"], "2");
    assert_eq!(by_time, at_two);

    let (status, headers, now) = app.get_json(&format!("/orders/{order_id}/state")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-order-version"], "3");
    assert_eq!(now["status"], "placed");
    let (_, _, beyond) = app
        .get_json(&format!("/orders/{order_id}/state?version=99"))
        .await;
    assert_eq!(beyond, now);

    let (status, _, body) = app
        .get_json(&format!("/orders/{order_id}/state?at=2000-01-01T00:00:00Z"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "order_not_found");
    assert_eq!(
        body["detail"],
        format!("order {order_id} had no events at or before 2000-01-01T00:00:00Z"),
        "not that it does not exist"
    );
}

/// The database's clock may step back between two appends, so a later version can carry an
/// earlier `recorded_at`. The state as of an instant is still one the order really had: the
/// fold stops at the first version recorded after it, never skipping to a later one.
#[tokio::test]
async fn the_state_as_of_a_time_is_a_prefix_even_when_the_clock_stepped_back() {
    let app = spawn_app().await;
    let order_id = Uuid::new_v4();
    app.append_order(
        order_id,
        vec![
            create(order_id, Uuid::new_v4()),
            add("SKU-1", 1, 100),
            add("SKU-2", 1, 200),
            add("SKU-3", 1, 400),
        ],
    )
    .await;
    // Versions 1..=4 recorded at +0 s, +2 s, +5 s and, after a step back, +3 s. Stored events
    // are immutable; this test's own database lets its triggers go to rewrite the clock.
    sqlx::raw_sql(
        "ALTER TABLE events DISABLE TRIGGER USER; \
         UPDATE events SET recorded_at = '2026-01-01T00:00:00Z'::timestamptz + make_interval( \
           secs => (ARRAY[0, 2, 5, 3])[stream_version]); \
         ALTER TABLE events ENABLE TRIGGER USER",
    )
    .execute(app.pool())
    .await
    .unwrap();
    let version_at = |secs: u32| {
        let path = format!("/orders/{order_id}/state?at=2026-01-01T00:00:0{secs}Z");
        let app = &app;
        async move {
            let (status, headers, body) = app.get_json(&path).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            headers["x-order-version"].to_str().unwrap().to_owned()
        }
    };
    assert_eq!(version_at(1).await, "1");
    assert_eq!(version_at(4).await, "2", "version 4 waits for version 3");
    assert_eq!(version_at(5).await, "4");
}

/// Appends the events of `commands`, decided one after the other from `state` (which they move
/// on), to the order in one transaction: a long stream without a transaction per command.
async fn append_in_one_transaction(
    app: &TestApp,
    order_id: Uuid,
    state: &mut OrderState,
    commands: impl IntoIterator<Item = OrderCommand>,
) {
    let expected = ExpectedVersion::Exact(state.version);
    let mut new_events = Vec::new();
    for command in commands {
        for event in decide(state, &command).unwrap() {
            new_events.push(event.to_new_event(EventMetadata::default()));
            *state = evolve(std::mem::take(state), &event);
        }
    }
    let request = AppendRequest {
        stream_id: order_stream_id(order_id),
        expected,
        events: new_events,
        idempotency: None,
    };
    store::append_batch(app.pool(), &[request])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
}

/// Nothing in the domain keeps an order's stream short (a draft takes any number of added and
/// removed items), so time travel folds it page by page: no read holds more than one page,
/// and the states now, at a version and at an instant beyond the first page are still exact.
#[tokio::test]
async fn time_travel_over_a_stream_longer_than_a_page_reads_it_one_page_at_a_time() {
    let app = spawn_app().await;
    let order_id = Uuid::new_v4();
    let mut state = OrderState::default();
    // Version 1 creates; then items go in and out, ending with one in: 1,100 events.
    let toggles = (0..1099).map(|n| {
        if n % 2 == 0 {
            add("SKU-1", 1, 250)
        } else {
            OrderCommand::RemoveItem {
                sku: "SKU-1".into(),
            }
        }
    });
    append_in_one_transaction(
        &app,
        order_id,
        &mut state,
        std::iter::once(create(order_id, Uuid::new_v4())).chain(toggles),
    )
    .await;
    assert!(state.version > STATE_PAGE_EVENTS);
    let (_, _, last_draft) = app
        .get_json(&format!("/orders/{order_id}/events?after_version=1099"))
        .await;
    let draft_until = last_draft["events"][0]["recorded_at"]
        .as_str()
        .unwrap()
        .parse::<DateTime<Utc>>()
        .unwrap()
        .to_rfc3339();
    append_in_one_transaction(&app, order_id, &mut state, [OrderCommand::PlaceOrder]).await;

    let (status, headers, now) = app.get_json(&format!("/orders/{order_id}/state")).await;
    assert_eq!(status, StatusCode::OK, "{now}");
    assert_eq!(headers["x-order-version"], "1101");
    assert_eq!(
        (now["status"].as_str(), now["total"].as_i64()),
        (Some("placed"), Some(250))
    );
    let (_, _, at_version) = app
        .get_json(&format!("/orders/{order_id}/state?version=1050"))
        .await;
    assert_eq!(
        (
            at_version["version"].as_i64(),
            at_version["status"].as_str(),
            at_version["total"].as_i64()
        ),
        (Some(1050), Some("draft"), Some(250))
    );
    let (_, _, at_time) = app
        .get_json(&format!(
            "/orders/{order_id}/state?at={}",
            draft_until.replace('+', "%2B")
        ))
        .await;
    assert_eq!(
        (at_time["version"].as_i64(), at_time["status"].as_str()),
        (Some(1100), Some("draft"))
    );
    assert!(
        app.history.largest_state_page.load(Ordering::Relaxed) <= STATE_PAGE_EVENTS as u64,
        "one read held {} events",
        app.history.largest_state_page.load(Ordering::Relaxed)
    );
}

/// A rollout under way: a newer release wrote an event of a schema version this instance does
/// not know into the order. Its audit history still shows every event as stored, and time
/// travel before that event works; a fold that needs it is answered 503
/// `event_from_newer_release` with `Retry-After`, not 500.
#[tokio::test]
async fn time_travel_over_an_event_of_a_newer_release_is_a_503_to_retry_and_its_history_shows_it() {
    let app = spawn_app().await;
    let order_id = Uuid::new_v4();
    app.append_order(
        order_id,
        vec![create(order_id, Uuid::new_v4()), add("SKU-1", 2, 500)],
    )
    .await;
    let newer = events::current_schema_version("OrderPlaced").unwrap() + 1;
    store::testing::append_as_another_release_wrote_it(
        &app.db.pool,
        order_id,
        "OrderPlaced",
        newer,
        serde_json::json!({"total": 1000, "channel": "web"}),
    )
    .await;

    let response = app.get(&format!("/orders/{order_id}/state")).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "2");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "event_from_newer_release", "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("OrderPlaced"),
        "{body}"
    );
    let (status, _, before) = app
        .get_json(&format!("/orders/{order_id}/state?version=2"))
        .await;
    assert_eq!(status, StatusCode::OK, "{before}");
    assert_eq!(before["total"], 1000);
    let (status, _, history) = app.get_json(&format!("/orders/{order_id}/events")).await;
    assert_eq!(status, StatusCode::OK, "{history}");
    let third = &history["events"][2];
    assert_eq!(third["event_type"], "OrderPlaced");
    assert_eq!(third["data"]["channel"], "web");
}

#[tokio::test]
async fn the_history_of_an_order_pages_by_version() {
    let app = spawn_app().await;
    let order_id = Uuid::new_v4();
    let positions = app
        .append_order(
            order_id,
            vec![
                create(order_id, Uuid::new_v4()),
                add("A", 1, 100),
                add("B", 1, 100),
                add("C", 1, 100),
                add("D", 1, 100),
            ],
        )
        .await;

    let (status, _, page) = app
        .get_json(&format!("/orders/{order_id}/events?limit=2"))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["version"], 1);
    assert_eq!(events[0]["event_type"], "OrderCreated");
    assert_eq!(events[0]["position"], positions[0]);
    assert_eq!(events[1]["event_type"], "ItemAdded");
    assert_eq!(events[1]["data"]["sku"], "A");
    assert!(events[1]["metadata"].is_object());
    assert!(events[1]["recorded_at"].is_string());
    assert_eq!(page["next_cursor"], "2");

    let (_, _, page) = app
        .get_json(&format!(
            "/orders/{order_id}/events?limit=2&after_version=2"
        ))
        .await;
    assert_eq!(page["next_cursor"], "4");
    let (_, _, page) = app
        .get_json(&format!(
            "/orders/{order_id}/events?limit=2&after_version=4"
        ))
        .await;
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["version"], 5);
    assert!(page["next_cursor"].is_null());
    let (status, _, page) = app
        .get_json(&format!("/orders/{order_id}/events?after_version=5"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["events"], serde_json::json!([]));

    let (status, _, body) = app
        .get_json(&format!("/orders/{}/events", Uuid::new_v4()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "order_not_found");
}

/// A client polling one order gets 304 and no body while its copy is current, and the new
/// summary once the order has moved on.
#[tokio::test]
async fn an_order_read_with_its_current_etag_is_not_modified() {
    let app = spawn_app().await;
    let order = TestOrder::new(Uuid::new_v4(), "placed", 3);
    app.put_summary(&order).await;
    app.set_checkpoint("order_summaries", 7, true).await;
    let path = format!("{}/orders/{}", app.base, order.order_id);
    let read = |if_none_match: Option<&'static str>| {
        let mut request = app.client.get(&path);
        if let Some(tags) = if_none_match {
            request = request.header("If-None-Match", tags);
        }
        request.send()
    };

    let first = read(None).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["etag"], "\"2\"");
    for tags in ["\"2\"", "W/\"2\"", "\"1\", \"2\"", "*"] {
        let again = read(Some(tags)).await.unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{tags}");
        assert_eq!(again.headers()["etag"], "\"2\"", "{tags}");
        assert_eq!(projection_position(again.headers()), 7, "{tags}");
        assert!(again.bytes().await.unwrap().is_empty(), "{tags}");
    }
    assert_eq!(read(Some("\"1\"")).await.unwrap().status(), StatusCode::OK);

    // The projector applies another event: the held copy is stale now.
    sqlx::query("UPDATE order_summaries SET version = 3, status = 'paid' WHERE order_id = $1")
        .bind(order.order_id)
        .execute(app.pool())
        .await
        .unwrap();
    let moved = read(Some("\"2\"")).await.unwrap();
    assert_eq!(moved.status(), StatusCode::OK);
    assert_eq!(moved.headers()["etag"], "\"3\"");
    let body: Value = moved.json().await.unwrap();
    assert_eq!(body["status"], "paid");
}

#[tokio::test]
async fn the_event_log_pages_every_order_by_position() {
    let app = spawn_app().await;
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    // (position, stream, version) of every event appended.
    let mut expected = Vec::new();
    for (order_id, commands) in [
        (first, vec![create(first, Uuid::new_v4()), add("A", 1, 100)]),
        (
            second,
            vec![
                create(second, Uuid::new_v4()),
                add("B", 2, 50),
                add("C", 1, 10),
            ],
        ),
    ] {
        let positions = app.append_order(order_id, commands).await;
        for (version, position) in (1..).zip(positions) {
            expected.push((position, format!("order-{order_id}"), version));
        }
    }

    // Pages of two, by next_cursor, until a page is not full.
    let mut seen = Vec::new();
    let mut path = "/events?limit=2".to_owned();
    loop {
        let (status, _, page) = app.get_json(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for event in page["events"].as_array().unwrap() {
            assert!(
                event["data"].is_object()
                    && event["metadata"].is_object()
                    && event["recorded_at"].is_string()
                    && event["event_type"].is_string(),
                "{event}"
            );
            seen.push((
                event["position"].as_i64().unwrap(),
                event["stream_id"].as_str().unwrap().to_owned(),
                event["version"].as_i64().unwrap(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/events?limit=2&after_position={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, expected);

    // From a position in the middle, and from the head.
    let (_, _, page) = app
        .get_json(&format!("/events?after_position={}", expected[1].0))
        .await;
    assert_eq!(page["events"].as_array().unwrap().len(), 3);
    assert!(page["next_cursor"].is_null());
    let head = expected[expected.len() - 1].0;
    let (status, _, page) = app
        .get_json(&format!("/events?after_position={head}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["events"], serde_json::json!([]));
}

/// A follower that asks with `wait_ms` at the head is answered by the next commit (the wait is
/// on the watcher, woken by the append's notification), and with an empty page when none
/// comes in time.
#[tokio::test]
async fn a_follower_waiting_at_the_head_of_the_log_is_answered_by_the_next_commit() {
    // Polled once a minute: only the append's notification can wake the follower in time.
    let app = spawn_app_with(Options {
        poll_ms: Some(60_000),
        ..Options::default()
    })
    .await;
    let first = Uuid::new_v4();
    let head = app
        .append_order(first, vec![create(first, Uuid::new_v4())])
        .await[0];
    let (status, _, page) = app
        .get_json(&format!("/events?after_position={head}&wait_ms=50"))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["events"], serde_json::json!([]));

    let follower = app
        .follow(&format!("/events?after_position={head}&wait_ms=10000"))
        .await;
    let second = Uuid::new_v4();
    let appended = app
        .append_order(second, vec![create(second, Uuid::new_v4())])
        .await[0];
    let page = follower.await.unwrap();
    assert_eq!(page["events"][0]["position"], appended, "{page}");
    assert_eq!(page["events"][0]["stream_id"], format!("order-{second}"));
}

/// A filter shows only the types asked for; a page reads at most `EVENTS_SCAN_SPAN` positions,
/// so a stretch of other types answers an empty page whose `read_to` moves on, and following
/// `read_to` reaches every matching event exactly once and ends at the head.
#[tokio::test]
async fn a_filtered_log_shows_only_its_types_and_reads_a_bounded_span_per_page() {
    const SPAN: i64 = 4;
    let app = spawn_app_with(Options {
        events_scan_span: Some(SPAN),
        ..Options::default()
    })
    .await;
    let (busy, paid) = (Uuid::new_v4(), Uuid::new_v4());
    let mut wanted = Vec::new();
    // Nine items in a row: two whole spans with nothing that matches.
    let mut busy_commands = vec![create(busy, Uuid::new_v4())];
    busy_commands.extend((0..9).map(|i| add(&format!("SKU-{i}"), 1, 10)));
    let positions = app.append_order(busy, busy_commands).await;
    wanted.push((positions[0], "OrderCreated"));
    let positions = app
        .append_order(
            paid,
            vec![
                create(paid, Uuid::new_v4()),
                add("A", 2, 50),
                OrderCommand::PlaceOrder,
                OrderCommand::PayOrder {
                    amount: 100,
                    payment_reference: "ref-1".into(),
                },
            ],
        )
        .await;
    wanted.push((positions[0], "OrderCreated"));
    wanted.push((positions[3], "OrderPaid"));
    let head = positions[3];

    let mut seen = Vec::new();
    let mut after = 0;
    let mut empty_pages_with_more = 0;
    loop {
        let (status, _, page) = app
            .get_json(&format!(
                "/events?event_type=OrderPaid,%20OrderCreated&limit=1&after_position={after}"
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let read_to = page["read_to"].as_i64().unwrap();
        assert!(
            (after..=after + SPAN).contains(&read_to),
            "read_to {read_to} after {after}: {page}"
        );
        let events = page["events"].as_array().unwrap();
        for event in events {
            let position = event["position"].as_i64().unwrap();
            assert!(position > after && position <= read_to, "{page}");
            seen.push((position, event["event_type"].as_str().unwrap().to_owned()));
        }
        after = read_to;
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                assert_eq!(cursor, read_to.to_string(), "{page}");
                if events.is_empty() {
                    empty_pages_with_more += 1;
                }
            }
            None => break,
        }
    }
    let wanted: Vec<(i64, String)> = wanted
        .into_iter()
        .map(|(position, kind)| (position, kind.to_owned()))
        .collect();
    assert_eq!(seen, wanted);
    assert_eq!(after, head, "the last page reads to the head");
    assert!(
        empty_pages_with_more >= 2,
        "the nine items make empty pages with more to read"
    );

    // The largest position is past the head: refused before any span is worked out from it.
    let (status, _, page) = app
        .get_json(&format!(
            "/events?event_type=OrderPaid&after_position={}",
            i64::MAX
        ))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    assert_eq!(page["head"], head);
}

/// During a rollout a newer release writes a type this one does not know. Its migration
/// registered the name, so a filter naming it is served here (the events as stored), while a
/// name no release registered is still refused.
#[tokio::test]
async fn a_filter_naming_a_type_only_a_newer_release_writes_is_served_and_a_typo_is_not() {
    let app = spawn_app().await;
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    app.append_command(order, &mut state, create(order, Uuid::new_v4()))
        .await;
    sqlx::query("INSERT INTO event_types (event_type) VALUES ('OrderRefunded')")
        .execute(app.pool())
        .await
        .expect("the newer release's migration registers its type");
    let refunded = store::testing::append_as_another_release_wrote_it(
        app.pool(),
        order,
        "OrderRefunded",
        1,
        serde_json::json!({ "amount": 500 }),
    )
    .await;

    let (status, _, page) = app
        .get_json("/events?event_type=OrderRefunded,OrderPaid")
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let events = page["events"].as_array().expect("events");
    assert_eq!(events.len(), 1, "{page}");
    assert_eq!(events[0]["position"], refunded);
    assert_eq!(events[0]["event_type"], "OrderRefunded");
    assert_eq!(events[0]["data"], serde_json::json!({ "amount": 500 }));

    let mut stream = SseReader::open(&app, "/events/stream?event_type=OrderRefunded", None)
        .await
        .expect("the stream opens");
    let frame = stream.next_event().await;
    assert_eq!(frame.id, Some(refunded.to_string()));
    assert_eq!(frame.event.as_deref(), Some("OrderRefunded"));

    for path in [
        "/events?event_type=OrderRefunded,OrderRefundd",
        "/events/stream?event_type=OrderRefundd",
    ] {
        let (status, _, problem) = app.get_json(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {problem}");
        assert_eq!(problem["code"], "invalid_event_type", "{path}");
        assert!(
            problem["detail"].as_str().unwrap().contains("OrderRefundd"),
            "{problem}"
        );
    }
}

/// A filtered follower at the head is not answered by commits of other types: it reads them,
/// waits again, and is answered by the first commit that matches.
#[tokio::test]
async fn a_filtered_follower_waits_through_commits_of_other_types() {
    // Polled once a minute: the appends' notifications wake the follower.
    let app = spawn_app_with(Options {
        poll_ms: Some(60_000),
        ..Options::default()
    })
    .await;
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let created = app
        .append_command(order, &mut state, create(order, Uuid::new_v4()))
        .await;
    let follower = app
        .follow(&format!(
            "/events?event_type=OrderPlaced&after_position={created}&wait_ms=10000"
        ))
        .await;
    let stats = Arc::clone(&app.watcher);
    let begun = stats.waits_begun.load(Ordering::Relaxed);
    let item = app.append_command(order, &mut state, add("A", 1, 10)).await;
    // Woken by the item, the follower reads it, finds no match and waits a second time, which
    // a follower answered by the item never does (the only request, it would wait no more).
    wait_until(
        "the follower, not answered by the item, waits again",
        || {
            let stats = Arc::clone(&stats);
            async move {
                stats.waits_begun.load(Ordering::Relaxed) > begun
                    && stats.waiting.load(Ordering::Relaxed) == 1
            }
        },
    )
    .await;
    let placed = app
        .append_command(order, &mut state, OrderCommand::PlaceOrder)
        .await;
    assert!(placed > item);
    let page = follower.await.unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["events"][0]["position"], placed, "{page}");
    assert_eq!(page["events"][0]["event_type"], "OrderPlaced");
    assert_eq!(page["read_to"], placed);
}

/// A filtered follower at the head does not read the event store again for each commit of
/// other types while it waits: it reads its page once, then takes the commits from the log's
/// tail that every follower at the head shares, filtering in memory.
#[tokio::test]
async fn a_filtered_follower_reads_the_store_once_however_many_commits_of_other_types_land() {
    let app = spawn_app_with(Options {
        poll_ms: Some(60_000),
        ..Options::default()
    })
    .await;
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let created = app
        .append_command(order, &mut state, create(order, Uuid::new_v4()))
        .await;
    let reads_before = app.history.log_reads.load(Ordering::Relaxed);
    let follower = app
        .follow(&format!(
            "/events?event_type=OrderPlaced&after_position={created}&wait_ms=10000"
        ))
        .await;
    let stats = Arc::clone(&app.watcher);
    let begun = stats.waits_begun.load(Ordering::Relaxed);
    for n in 1..=5 {
        app.append_command(order, &mut state, add(&format!("SKU-{n}"), 1, 10))
            .await;
        // Each commit of another type is dealt with before the next lands: the follower
        // waits once more after it, which a follower answered by it never does.
        wait_until(
            "the follower, not answered by the item, waits again",
            || {
                let stats = Arc::clone(&stats);
                async move {
                    stats.waits_begun.load(Ordering::Relaxed) >= begun + n
                        && stats.waiting.load(Ordering::Relaxed) == 1
                }
            },
        )
        .await;
    }
    let placed = app
        .append_command(order, &mut state, OrderCommand::PlaceOrder)
        .await;
    let page = follower.await.unwrap();
    assert_eq!(page["events"][0]["position"], placed, "{page}");
    assert_eq!(page["read_to"], placed);
    assert_eq!(
        app.history.log_reads.load(Ordering::Relaxed) - reads_before,
        1,
        "the store is read for the page, not for each commit"
    );
}

/// A filtered follower whose wait ends while commits of other types keep landing is answered
/// when `wait_ms` is up, with the empty page and the `read_to` it reached (not left to run
/// into the request timeout, whose 503 would lose that `read_to`).
#[tokio::test]
async fn a_filtered_follower_is_answered_at_wait_ms_while_commits_of_other_types_keep_landing() {
    let app = spawn_app().await;
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let created = app
        .append_command(order, &mut state, create(order, Uuid::new_v4()))
        .await;
    let follower = app
        .follow(&format!(
            "/events?event_type=OrderShipped&after_position={created}&wait_ms=300"
        ))
        .await;
    // Commits of other types, back to back, until the follower is answered.
    let mut last = created;
    let mut toggles = [
        add("A", 1, 10),
        OrderCommand::RemoveItem { sku: "A".into() },
    ]
    .into_iter()
    .cycle();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !follower.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower was never answered"
        );
        let command = toggles.next().unwrap();
        last = app.append_command(order, &mut state, command).await;
    }
    let page = follower.await.unwrap();
    assert_eq!(page["events"], serde_json::json!([]), "{page}");
    let read_to = page["read_to"].as_i64().unwrap();
    assert!(read_to > created && read_to <= last, "{page}");
    assert_eq!(page["next_cursor"], Value::Null, "{page}");
}

/// The log as Server-Sent Events: what is there, then each commit as it lands; a client that
/// reconnects with `Last-Event-ID` continues right after it, whatever `after_position` says.
#[tokio::test]
async fn the_log_streams_as_server_sent_events_and_resumes_after_the_last_event_id() {
    let app = spawn_app().await;
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let mut positions = Vec::new();
    for command in [
        create(order, Uuid::new_v4()),
        add("A", 1, 10),
        add("B", 2, 5),
    ] {
        positions.push(app.append_command(order, &mut state, command).await);
    }
    let mut stream = SseReader::open(&app, "/events/stream", None).await.unwrap();
    let first = stream.next_frame().await.unwrap();
    assert!(first.retry.is_some() && first.data.is_none(), "{first:?}");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let frame = stream.next_event().await;
        let data = frame.data.unwrap();
        assert_eq!(frame.id, Some(data["position"].to_string()));
        assert_eq!(frame.event.as_deref(), data["event_type"].as_str());
        assert_eq!(data["stream_id"], format!("order-{order}"));
        seen.push(data["position"].as_i64().unwrap());
    }
    assert_eq!(seen, positions);
    drop(stream);

    // More than a page of the stream (100 events): every position once, in order.
    for _ in 0..40 {
        let id = Uuid::new_v4();
        app.append_order(
            id,
            vec![create(id, Uuid::new_v4()), add("A", 1, 1), add("B", 1, 1)],
        )
        .await;
    }
    let mut stream = SseReader::open(&app, "/events/stream", None).await.unwrap();
    let mut all = Vec::new();
    for _ in 0..123 {
        let frame = stream.next_event().await;
        all.push(frame.id.unwrap().parse::<i64>().unwrap());
    }
    assert_eq!(all, (1..=123).collect::<Vec<_>>());

    // Live: commits made while the stream is open arrive on it.
    for command in [add("C", 1, 1), OrderCommand::PlaceOrder] {
        positions.push(app.append_command(order, &mut state, command).await);
    }
    assert_eq!(positions[3], 124);
    let live = stream.next_event().await;
    assert_eq!(live.id, Some(positions[3].to_string()));
    assert_eq!(live.event.as_deref(), Some("ItemAdded"));
    drop(stream);

    // Reconnecting: Last-Event-ID wins over the URL's after_position.
    let mut resumed = SseReader::open(&app, "/events/stream?after_position=0", Some(positions[3]))
        .await
        .unwrap();
    let next = resumed.next_event().await;
    assert_eq!(next.id, Some(positions[4].to_string()));
    assert_eq!(next.event.as_deref(), Some("OrderPlaced"));
}

/// Streams at the head do not each read the store per commit: one read of the log's tail per
/// commit serves them all, filtered or not.
#[tokio::test]
async fn streams_at_the_head_share_one_read_of_each_commit() {
    const STREAMS: usize = 20;
    const COMMITS: usize = 5;
    let app = spawn_app().await;
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let first = app
        .append_command(order, &mut state, create(order, Uuid::new_v4()))
        .await;
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        // Every other one filtered to items: they share the tail too.
        let path = if i % 2 == 0 {
            "/events/stream"
        } else {
            "/events/stream?event_type=ItemAdded"
        };
        let mut stream = SseReader::open(&app, path, None).await.unwrap();
        // The catch-up read: the creation (or, filtered, the progress past it).
        loop {
            let frame = stream.next_frame().await.unwrap();
            if frame.id == Some(first.to_string()) {
                break;
            }
        }
        streams.push(stream);
    }
    let catch_up_reads = app.streams.store_reads.load(Ordering::Relaxed);
    assert!(catch_up_reads >= STREAMS as u64, "{catch_up_reads}");

    for n in 0..COMMITS {
        let position = app
            .append_command(order, &mut state, add(&format!("SKU-{n}"), 1, 1))
            .await;
        // Every stream gets it before the next commit, so none misses a batch.
        for stream in &mut streams {
            let frame = stream.next_event().await;
            assert_eq!(frame.id, Some(position.to_string()));
            assert_eq!(frame.event.as_deref(), Some("ItemAdded"));
        }
    }
    assert_eq!(
        app.streams.store_reads.load(Ordering::Relaxed),
        catch_up_reads,
        "a stream at the head read the store"
    );
    // At most one read per commit: the five, and the creation if the tail only learnt of it
    // once the first stream was open.
    let tail_reads = app.tail.reads.load(Ordering::Relaxed);
    assert!(
        (1..=COMMITS as u64 + 1).contains(&tail_reads),
        "{tail_reads} tail reads for {} commits",
        COMMITS + 1
    );
}

/// A filtered stream sends an id-only frame for what it read without a match, so a client that
/// reconnects does not read it again, then the next event of its types.
#[tokio::test]
async fn a_filtered_stream_moves_the_resume_point_past_what_it_skips() {
    let app = spawn_app().await;
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    app.append_command(order, &mut state, create(order, Uuid::new_v4()))
        .await;
    let added = app.append_command(order, &mut state, add("A", 1, 10)).await;
    let mut stream = SseReader::open(&app, "/events/stream?event_type=OrderPlaced", None)
        .await
        .unwrap();
    let mut progress = stream.next_frame().await.unwrap();
    if progress.retry.is_some() {
        progress = stream.next_frame().await.unwrap();
    }
    assert_eq!(progress.id, Some(added.to_string()), "{progress:?}");
    assert!(progress.data.is_none(), "{progress:?}");
    let placed = app
        .append_command(order, &mut state, OrderCommand::PlaceOrder)
        .await;
    let frame = stream.next_event().await;
    assert_eq!(frame.id, Some(placed.to_string()));
    assert_eq!(frame.event.as_deref(), Some("OrderPlaced"));
}

/// Opens a stream filtered to `OrderPlaced` and an unfiltered one on an order that exists, and
/// reads both up to the head.
async fn streams_at_the_head(
    app: &TestApp,
    order: Uuid,
    state: &mut OrderState,
) -> (SseReader, SseReader) {
    let created = app
        .append_command(order, state, create(order, Uuid::new_v4()))
        .await;
    let mut filtered = SseReader::open(app, "/events/stream?event_type=OrderPlaced", None)
        .await
        .unwrap();
    let mut all = SseReader::open(app, "/events/stream", None).await.unwrap();
    for stream in [&mut filtered, &mut all] {
        loop {
            let frame = stream.next_frame().await.unwrap();
            if frame.id == Some(created.to_string()) {
                break;
            }
        }
    }
    (filtered, all)
}

/// Waits until the streams have taken `count` batches of the shared tail in all.
async fn wait_for_tail_batches(app: &TestApp, count: u64) {
    let stats = &app.streams;
    wait_until_value("the streams take the tail's batches", || async move {
        (stats.tail_batches.load(Ordering::Relaxed) >= count).then_some(())
    })
    .await;
}

/// Adds one item per SKU to `order`, each commit only once both streams of
/// [`streams_at_the_head`] have taken the previous one from the tail; returns the last position.
async fn add_items_one_batch_at_a_time(
    app: &TestApp,
    order: Uuid,
    state: &mut OrderState,
    skus: &[&str],
) -> i64 {
    let taken = app.streams.tail_batches.load(Ordering::Relaxed);
    let mut last = 0;
    for (n, sku) in skus.iter().enumerate() {
        last = app.append_command(order, state, add(sku, 1, 1)).await;
        wait_for_tail_batches(app, taken + 2 * (n as u64 + 1)).await;
    }
    last
}

/// At the head, a filtered stream does not send an id-only frame for every commit of other
/// types: it holds its progress back for `EVENT_STREAM_PROGRESS_MS`, and an event of its types
/// arriving first makes it needless (the event's id moves the resume point further).
#[tokio::test]
async fn a_filtered_stream_at_the_head_holds_its_progress_back_until_an_event_supersedes_it() {
    let app = spawn_app_with(Options {
        event_stream_progress_ms: Some(60_000),
        ..Options::default()
    })
    .await;
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let (mut filtered, _all) = streams_at_the_head(&app, order, &mut state).await;
    add_items_one_batch_at_a_time(&app, order, &mut state, &["A", "B", "C"]).await;
    let placed = app
        .append_command(order, &mut state, OrderCommand::PlaceOrder)
        .await;
    let frame = filtered.next_frame().await.unwrap();
    assert_eq!(frame.id, Some(placed.to_string()), "{frame:?}");
    assert_eq!(frame.event.as_deref(), Some("OrderPlaced"));
}

/// Held progress is not lost: once the interval is over, one id-only frame carries the
/// furthest position read, so a client that reconnects skips what did not match.
#[tokio::test]
async fn a_filtered_stream_at_the_head_sends_its_held_progress_when_the_interval_is_over() {
    let app = spawn_app_with(Options {
        event_stream_progress_ms: Some(100),
        ..Options::default()
    })
    .await;
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let (mut filtered, _all) = streams_at_the_head(&app, order, &mut state).await;
    let mut last = 0;
    for sku in ["A", "B", "C"] {
        last = app.append_command(order, &mut state, add(sku, 1, 1)).await;
    }
    let mut previous = 0;
    loop {
        let frame = filtered.next_frame().await.unwrap();
        assert!(frame.data.is_none(), "only progress: {frame:?}");
        let id: i64 = frame.id.as_deref().unwrap().parse().unwrap();
        assert!(
            id > previous && id <= last,
            "{id} after {previous}, last {last}"
        );
        if id == last {
            break;
        }
        previous = id;
    }
}

/// Held progress is not lost at shutdown either: the stream's last frame carries the furthest
/// position read, so the client resumes on another instance past what did not match.
#[tokio::test]
async fn a_filtered_stream_ended_by_shutdown_sends_its_held_progress_first() {
    let mut app = spawn_app_with(Options {
        event_stream_progress_ms: Some(60_000),
        ..Options::default()
    })
    .await;
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let (mut filtered, _all) = streams_at_the_head(&app, order, &mut state).await;
    let last = add_items_one_batch_at_a_time(&app, order, &mut state, &["A", "B"]).await;

    let _ = app.stop.take().unwrap().send(());
    let mut frames = Vec::new();
    while let Some(frame) = filtered.next_frame().await {
        frames.push(frame);
    }
    let ended_with = frames.iter().rev().find_map(|frame| frame.id.clone());
    assert_eq!(ended_with, Some(last.to_string()), "{frames:?}");
    assert!(
        frames.iter().all(|frame| frame.data.is_none()),
        "{frames:?}"
    );
}

/// One order's stream: its history by version, then its new events as they are committed
/// (none of another order's), each once; a client that reconnects with `Last-Event-ID`
/// continues after that version. The history is read from the order's own stream: an order
/// whose events sit far apart in a long log costs one read, not a scan of the log.
#[tokio::test]
async fn an_orders_stream_shows_its_history_then_its_new_events_and_resumes_after_a_version() {
    let app = spawn_app().await;
    let (order, other) = (Uuid::new_v4(), Uuid::new_v4());
    let (mut state, mut other_state) = (OrderState::default(), OrderState::default());
    app.append_command(order, &mut state, create(order, Uuid::new_v4()))
        .await;
    app.append_command(other, &mut other_state, create(other, Uuid::new_v4()))
        .await;
    for sku in ["A", "B"] {
        app.append_command(order, &mut state, add(sku, 1, 10)).await;
        app.append_command(other, &mut other_state, add(sku, 1, 10))
            .await;
    }
    let path = format!("/orders/{order}/events/stream");
    let mut stream = SseReader::open(&app, &path, None).await.unwrap();
    let reads_before = app.streams.store_reads.load(Ordering::Relaxed);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let frame = stream.next_event().await;
        let data = frame.data.clone().unwrap();
        assert_eq!(data["version"].to_string(), *frame.id.as_ref().unwrap());
        seen.push((frame.id.unwrap(), frame.event.unwrap()));
    }
    assert_eq!(
        seen,
        [
            ("1".to_owned(), "OrderCreated".to_owned()),
            ("2".to_owned(), "ItemAdded".to_owned()),
            ("3".to_owned(), "ItemAdded".to_owned()),
        ]
    );

    // Live: the other order's commit shows nothing here; this order's next ones arrive in turn.
    app.append_command(other, &mut other_state, add("C", 1, 10))
        .await;
    let placed = app
        .append_command(order, &mut state, OrderCommand::PlaceOrder)
        .await;
    let frame = stream.next_event().await;
    assert_eq!(frame.id.as_deref(), Some("4"));
    assert_eq!(frame.event.as_deref(), Some("OrderPlaced"));
    assert_eq!(frame.data.unwrap()["position"], placed);
    assert!(
        app.streams.store_reads.load(Ordering::Relaxed) <= reads_before + 1,
        "at the head the stream takes the shared tail"
    );
    drop(stream);

    // Reconnecting: Last-Event-ID (a version) wins over after_version.
    let mut resumed = SseReader::open(&app, &format!("{path}?after_version=0"), Some(3))
        .await
        .unwrap();
    let next = resumed.next_event().await;
    assert_eq!(
        (next.id.as_deref(), next.event.as_deref()),
        (Some("4"), Some("OrderPlaced"))
    );
    let mut later = SseReader::open(&app, &format!("{path}?after_version=2"), None)
        .await
        .unwrap();
    assert_eq!(later.next_event().await.id.as_deref(), Some("3"));
}

/// An order with no events is 404 (a mistyped id is not followed forever); a malformed start is
/// 400 with its code.
#[tokio::test]
async fn an_orders_stream_refuses_an_unknown_order_and_a_malformed_start() {
    let app = spawn_app().await;
    let Err((status, _, body)) = SseReader::open(
        &app,
        &format!("/orders/{}/events/stream", Uuid::new_v4()),
        None,
    )
    .await
    else {
        panic!("an unknown order is refused");
    };
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("order_not_found"))
    );
    let order = Uuid::new_v4();
    app.append_order(order, vec![create(order, Uuid::new_v4())])
        .await;
    let path = format!("/orders/{order}/events/stream");
    for (query, code) in [
        ("?after_version=-1", "invalid_after_version"),
        ("?after_version=x", "invalid_after_version"),
    ] {
        let Err((status, _, body)) = SseReader::open(&app, &format!("{path}{query}"), None).await
        else {
            panic!("{query} is refused");
        };
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code))
        );
    }
    let response = app
        .client
        .get(format!("{}{path}", app.base))
        .header("last-event-id", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "invalid_last_event_id");
    let Err((status, _, body)) =
        SseReader::open(&app, "/orders/not-a-uuid/events/stream", None).await
    else {
        panic!("a malformed id is refused");
    };
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_path"))
    );
}

/// A follower resuming past the end of the log (a client that read a history the store no
/// longer has: the database was restored from an earlier backup) is refused 409 with where the
/// log ends, instead of waiting for the head to pass its position and skipping, unseen, what
/// is committed in between; at the head or before it, following goes on as usual. The same for
/// one order's stream past its last version.
#[tokio::test]
async fn following_from_past_the_end_of_the_log_is_refused_with_where_it_ends() {
    let app = spawn_app().await;
    let order = Uuid::new_v4();
    let positions = app
        .append_order(order, vec![create(order, Uuid::new_v4()), add("A", 1, 10)])
        .await;
    let head = *positions.last().unwrap();

    let (status, _, body) = app
        .get_json(&format!("/events?after_position={}&wait_ms=10", head + 3))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "position_beyond_head");
    assert_eq!(body["head"], head);
    let (status, _, body) = app
        .get_json(&format!("/events?after_position={head}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["read_to"], head);

    let Err((status, _, body)) = SseReader::open(&app, "/events/stream", Some(head + 1)).await
    else {
        panic!("a stream resumed past the head is refused");
    };
    assert_eq!(
        (status, body["code"].as_str(), body["head"].as_i64()),
        (
            StatusCode::CONFLICT,
            Some("position_beyond_head"),
            Some(head)
        )
    );
    assert!(
        SseReader::open(&app, "/events/stream", Some(head))
            .await
            .is_ok()
    );

    let path = format!("/orders/{order}/events/stream");
    let Err((status, _, body)) = SseReader::open(&app, &path, Some(3)).await else {
        panic!("an order's stream resumed past its last version is refused");
    };
    assert_eq!(
        (status, body["code"].as_str(), body["head"].as_i64()),
        (StatusCode::CONFLICT, Some("version_beyond_head"), Some(2))
    );
    assert!(SseReader::open(&app, &path, Some(2)).await.is_ok());
}

/// At most `EVENT_STREAMS_MAX` streams are open; one more is 503 `overloaded` with
/// `Retry-After`. A closed stream frees its place, and shutdown ends the open ones cleanly
/// instead of cutting them off after the grace period.
#[tokio::test]
async fn event_streams_are_bounded_and_end_cleanly_at_shutdown() {
    let mut app = spawn_app_with(Options {
        event_streams_max: Some(1),
        ..Options::default()
    })
    .await;
    let mut first = SseReader::open(&app, "/events/stream", None).await.unwrap();
    first.next_frame().await.unwrap();
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("query_event_streams_open") && line.ends_with(" 1")),
        "{metrics}"
    );
    let Err((status, headers, body)) = SseReader::open(&app, "/events/stream", None).await else {
        panic!("a second stream is refused");
    };
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "overloaded", "{body}");
    assert!(headers.contains_key("retry-after"));
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("http_requests_shed_total") && line.ends_with(" 1")),
        "the refusal counts as shed: {metrics}"
    );

    drop(first);
    let app_ref = &app;
    let mut open = wait_until_value("the closed stream's place is free", || async move {
        SseReader::open(app_ref, "/events/stream", None).await.ok()
    })
    .await;
    open.next_frame().await.unwrap();

    let _ = app.stop.take().unwrap().send(());
    while open.next_frame().await.is_some() {}
}

/// Guarantee 3 over HTTP: a client that follows `/events` from the last position it saw gets
/// every committed event once and in order, while many writers append at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_following_the_log_sees_every_event_once_while_writers_race() {
    const WRITERS: usize = 8;
    const ORDERS_EACH: usize = 5;
    const EVENTS_PER_ORDER: usize = 3;
    // A short span, so the filtered follower reads many spans while the writers race.
    let app = Arc::new(
        spawn_app_with(Options {
            events_scan_span: Some(5),
            ..Options::default()
        })
        .await,
    );
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let app = Arc::clone(&app);
            tokio::spawn(async move {
                for _ in 0..ORDERS_EACH {
                    let id = Uuid::new_v4();
                    let commands = vec![create(id, Uuid::new_v4()), add("A", 1, 1), add("B", 1, 1)];
                    app.append_order(id, commands).await;
                }
            })
        })
        .collect();
    let total = WRITERS * ORDERS_EACH * EVENTS_PER_ORDER;
    let (seen, created) = tokio::join!(
        follow_log(&app, "", total),
        follow_log(&app, "&event_type=OrderCreated", WRITERS * ORDERS_EACH),
    );
    for writer in writers {
        writer.await.unwrap();
    }
    let positions: Vec<i64> = seen.iter().map(|(position, _)| *position).collect();
    assert_eq!(positions, (1..=total as i64).collect::<Vec<_>>());
    // The filtered follower saw exactly the creations, once each and in order.
    let creations: Vec<(i64, String)> = seen
        .into_iter()
        .filter(|(_, event_type)| event_type == "OrderCreated")
        .collect();
    assert_eq!(created, creations);
}

/// Follows `GET /events` (with `filter` appended to the query) from position 0 by `read_to`
/// until it has received `count` events; returns their positions and types.
async fn follow_log(app: &TestApp, filter: &str, count: usize) -> Vec<(i64, String)> {
    let mut seen = Vec::new();
    let mut after = 0;
    let started = Instant::now();
    while seen.len() < count {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "saw {} of {count} events{filter}",
            seen.len()
        );
        let (status, _, page) = app
            .get_json(&format!("/events?after_position={after}&limit=7{filter}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let events = page["events"].as_array().unwrap();
        if page["next_cursor"].is_null() && events.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for event in events {
            seen.push((
                event["position"].as_i64().unwrap(),
                event["event_type"].as_str().unwrap().to_owned(),
            ));
        }
        after = page["read_to"].as_i64().unwrap();
    }
    seen
}

#[tokio::test]
async fn each_bad_input_gets_its_status_and_a_problem_with_its_code() {
    let app = spawn_app().await;
    let id = Uuid::new_v4();
    let cases: Vec<(String, u16, &str)> = vec![
        ("/orders/not-a-uuid".into(), 400, "invalid_path"),
        ("/customers/42".into(), 400, "invalid_path"),
        ("/orders/nope/events".into(), 400, "invalid_path"),
        ("/orders?customer_id=bob".into(), 400, "invalid_query"),
        ("/orders?status=lost".into(), 400, "invalid_status"),
        ("/orders?limit=0".into(), 400, "invalid_limit"),
        ("/orders?limit=-3".into(), 400, "invalid_limit"),
        ("/orders?limit=201".into(), 400, "invalid_limit"),
        ("/orders?limit=many".into(), 400, "invalid_limit"),
        ("/orders?cursor=garbage".into(), 400, "invalid_cursor"),
        (
            "/orders?cursor=djE6OTk6MDAwMDAwMDA".into(),
            400,
            "invalid_cursor",
        ),
        (
            "/orders?min_position=soon".into(),
            400,
            "invalid_min_position",
        ),
        (
            "/orders?min_position=-1".into(),
            400,
            "invalid_min_position",
        ),
        (
            format!("/orders/{id}?min_position=1&wait_ms=10001"),
            400,
            "invalid_wait",
        ),
        (
            format!("/customers/{id}?wait_ms=later"),
            400,
            "invalid_wait",
        ),
        (
            format!("/orders/{id}/events?limit=1001"),
            400,
            "invalid_limit",
        ),
        (
            format!("/orders/{id}/events?after_version=-1"),
            400,
            "invalid_after_version",
        ),
        (
            "/events?after_position=-1".into(),
            400,
            "invalid_after_position",
        ),
        (
            "/events?after_position=x".into(),
            400,
            "invalid_after_position",
        ),
        ("/events?limit=0".into(), 400, "invalid_limit"),
        ("/events?limit=1001".into(), 400, "invalid_limit"),
        ("/events?wait_ms=soon".into(), 400, "invalid_wait"),
        ("/events?wait_ms=10001".into(), 400, "invalid_wait"),
        (
            "/events/stream?after_position=x".into(),
            400,
            "invalid_after_position",
        ),
        (
            "/events/stream?event_type=Paid".into(),
            400,
            "invalid_event_type",
        ),
        (
            "/events?event_type=OrderPayed".into(),
            400,
            "invalid_event_type",
        ),
        ("/events?event_type=".into(), 400, "invalid_event_type"),
        (
            "/events?event_type=Order%20Paid".into(),
            400,
            "invalid_event_type",
        ),
        (
            format!(
                "/events?event_type={}",
                (0..33)
                    .map(|n| format!("T{n}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            400,
            "invalid_event_type",
        ),
        (
            "/events?event_type=OrderPaid,,OrderShipped".into(),
            400,
            "invalid_event_type",
        ),
        (
            format!("/orders/{id}/state?version=0"),
            400,
            "invalid_version",
        ),
        (
            format!("/orders/{id}/state?version=two"),
            400,
            "invalid_version",
        ),
        (
            format!("/orders/{id}/state?at=yesterday"),
            400,
            "invalid_at",
        ),
        (
            format!("/orders/{id}/state?version=1&at=2026-01-01T00:00:00Z"),
            400,
            "invalid_query",
        ),
        (format!("/orders/{id}"), 404, "order_not_found"),
        (format!("/orders/{id}/state"), 404, "order_not_found"),
        (format!("/customers/{id}"), 404, "customer_not_found"),
        ("/nowhere".into(), 404, "not_found"),
    ];
    for (path, status, code) in cases {
        let response = app.get(&path).await;
        assert_eq!(response.status().as_u16(), status, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], code, "{path}: {body}");
        assert_eq!(body["status"], status, "{path}");
    }
    let response = app
        .client
        .get(format!("{}/orders", app.base))
        .header("X-Min-Position", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "invalid_min_position");
    let Err((status, _, body)) = SseReader::open(&app, "/events/stream", Some(-1)).await else {
        panic!("a negative Last-Event-ID is refused");
    };
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "invalid_last_event_id");
}

#[tokio::test]
async fn a_configured_token_is_required_on_api_routes_only() {
    let app = spawn_app_with(Options {
        token: Some("s3cret"),
        ..Options::default()
    })
    .await;
    for api in ["/orders", "/events"] {
        let response = app.get(api).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{api}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized");
    }
    let response = app
        .client
        .get(format!("{}/orders", app.base))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = app
        .client
        .get(format!("{}/orders", app.base))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    for open in ["/healthz", "/metrics", "/openapi.json"] {
        assert_eq!(app.get(open).await.status(), StatusCode::OK, "{open}");
    }
}

#[tokio::test]
async fn the_documented_wait_ms_maximum_is_the_configured_one_and_enforced() {
    let app = spawn_app_with(Options {
        wait_ms_max: Some(1500),
        ..Options::default()
    })
    .await;
    let (_, _, doc) = app.get_json("/openapi.json").await;
    for route in ["/orders", "/orders/{id}", "/customers/{id}", "/events"] {
        let wait_ms = doc["paths"][route]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|parameter| parameter["name"] == "wait_ms")
            .unwrap_or_else(|| panic!("{route} documents wait_ms"));
        assert_eq!(wait_ms["schema"]["maximum"], 1500, "{route}");
    }
    // Position 0 is always reached, so the wait's length is all that is judged.
    let (status, _, _) = app.get_json("/orders?min_position=0&wait_ms=1500").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = app.get_json("/orders?min_position=0&wait_ms=1501").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "invalid_wait");
}

#[tokio::test]
async fn openapi_json_lists_every_route_and_error() {
    let app = spawn_app().await;
    let (status, _, doc) = app.get_json("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    for route in [
        "/orders",
        "/orders/{id}",
        "/orders/{id}/events",
        "/orders/{id}/state",
        "/events",
        "/events/stream",
        "/orders/{id}/events/stream",
        "/customers/{id}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(paths.contains_key(route), "{route} missing");
    }
    // Each route's answers, by status, and the problem codes each status's description must
    // name: per route, so a route that loses the documentation of one of its errors fails
    // here even while another route still names the code.
    const READ_MODEL_503: &[&str] = &[
        "timeout",
        "consistency_timeout",
        "store_unavailable",
        "overloaded",
    ];
    const STORE_503: &[&str] = &["timeout", "store_unavailable", "overloaded"];
    /// A status and the codes its description names.
    type Answer = (&'static str, &'static [&'static str]);
    let expected: &[(&str, &[Answer])] = &[
        (
            "/orders/{id}",
            &[
                ("200", &[]),
                ("304", &[]),
                (
                    "400",
                    &["invalid_path", "invalid_min_position", "invalid_wait"],
                ),
                ("401", &["unauthorized"]),
                ("404", &["order_not_found"]),
                ("409", &["position_beyond_head"]),
                ("500", &["internal"]),
                (
                    "503",
                    &[
                        "timeout",
                        "consistency_timeout",
                        "order_held_back",
                        "store_unavailable",
                        "overloaded",
                    ],
                ),
            ],
        ),
        (
            "/orders",
            &[
                ("200", &[]),
                (
                    "400",
                    &[
                        "invalid_query",
                        "invalid_status",
                        "invalid_limit",
                        "invalid_cursor",
                        "invalid_min_position",
                        "invalid_wait",
                    ],
                ),
                ("401", &["unauthorized"]),
                ("409", &["position_beyond_head"]),
                ("500", &["internal"]),
                ("503", READ_MODEL_503),
            ],
        ),
        (
            "/customers/{id}",
            &[
                ("200", &[]),
                (
                    "400",
                    &["invalid_path", "invalid_min_position", "invalid_wait"],
                ),
                ("401", &["unauthorized"]),
                ("404", &["customer_not_found"]),
                ("409", &["position_beyond_head"]),
                ("500", &["internal"]),
                (
                    "503",
                    &[
                        "timeout",
                        "consistency_timeout",
                        "customer_held_back",
                        "store_unavailable",
                        "overloaded",
                    ],
                ),
            ],
        ),
        (
            "/orders/{id}/events",
            &[
                ("200", &[]),
                (
                    "400",
                    &["invalid_path", "invalid_after_version", "invalid_limit"],
                ),
                ("401", &["unauthorized"]),
                ("404", &["order_not_found"]),
                ("500", &["internal"]),
                ("503", STORE_503),
            ],
        ),
        (
            "/orders/{id}/events/stream",
            &[
                ("200", &[]),
                (
                    "400",
                    &[
                        "invalid_path",
                        "invalid_after_version",
                        "invalid_last_event_id",
                    ],
                ),
                ("401", &["unauthorized"]),
                ("404", &["order_not_found"]),
                ("409", &["version_beyond_head"]),
                ("500", &["internal"]),
                ("503", STORE_503),
            ],
        ),
        (
            "/orders/{id}/state",
            &[
                ("200", &[]),
                (
                    "400",
                    &[
                        "invalid_path",
                        "invalid_query",
                        "invalid_version",
                        "invalid_at",
                    ],
                ),
                ("401", &["unauthorized"]),
                ("404", &["order_not_found"]),
                ("500", &["internal"]),
                (
                    "503",
                    &[
                        "timeout",
                        "store_unavailable",
                        "overloaded",
                        "event_from_newer_release",
                    ],
                ),
            ],
        ),
        (
            "/events",
            &[
                ("200", &[]),
                (
                    "400",
                    &[
                        "invalid_after_position",
                        "invalid_limit",
                        "invalid_wait",
                        "invalid_event_type",
                    ],
                ),
                ("401", &["unauthorized"]),
                ("409", &["position_beyond_head"]),
                ("500", &["internal"]),
                ("503", STORE_503),
            ],
        ),
        (
            "/events/stream",
            &[
                ("200", &[]),
                (
                    "400",
                    &[
                        "invalid_after_position",
                        "invalid_event_type",
                        "invalid_last_event_id",
                    ],
                ),
                ("401", &["unauthorized"]),
                ("409", &["position_beyond_head"]),
                ("500", &["internal"]),
                ("503", STORE_503),
            ],
        ),
    ];
    for (route, answers) in expected {
        let responses = doc["paths"][*route]["get"]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("GET {route} is not documented"));
        let documented: Vec<&str> = responses.keys().map(String::as_str).collect();
        let listed: Vec<&str> = answers.iter().map(|(status, _)| *status).collect();
        assert_eq!(
            documented, listed,
            "the statuses documented for GET {route}"
        );
        for (status, codes) in *answers {
            let description = responses[*status]["description"].as_str().unwrap_or("");
            for code in *codes {
                assert!(
                    description.contains(&format!("`{code}`")),
                    "GET {route} {status} does not name `{code}`: {description}"
                );
            }
        }
    }
    let one = &doc["paths"]["/orders/{id}"]["get"];
    assert!(
        one["responses"]["304"].is_object(),
        "304 missing from GET /orders/{{id}}"
    );
    assert!(
        one["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "If-None-Match"),
        "If-None-Match missing from GET /orders/{{id}}"
    );
    let list = &doc["paths"]["/orders"]["get"]["parameters"];
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for name in [
        "customer_id",
        "status",
        "limit",
        "cursor",
        "min_position",
        "X-Min-Position",
        "wait_ms",
    ] {
        assert!(names.contains(&name), "{name} missing from GET /orders");
    }
}

#[tokio::test]
async fn health_and_metrics_answer() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
    assert_eq!(app.get("/readyz").await.status(), StatusCode::OK);
    assert_eq!(
        app.get("/orders?min_position=0").await.status(),
        StatusCode::OK
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("query_consistency_waits_total{")
                && line.contains("outcome=\"immediate\"")
                && line.ends_with(" 1")),
        "{metrics}"
    );
}

/// With `CORS_ALLOWED_ORIGINS`, a page of that origin may follow the event stream from a
/// browser: the preflight for `Last-Event-ID` passes and the stream's answer is readable.
#[tokio::test]
async fn a_page_of_an_allowed_origin_may_follow_the_event_stream() {
    let app = spawn_app_with(Options {
        cors_allowed_origins: Some("https://ops.example.com"),
        ..Options::default()
    })
    .await;
    let preflight = app
        .client
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/events/stream", app.base),
        )
        .header("origin", "https://ops.example.com")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "last-event-id")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://ops.example.com"
    );
    let stream = app
        .client
        .get(format!("{}/events/stream", app.base))
        .header("origin", "https://ops.example.com")
        .header("last-event-id", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(
        stream.headers()["access-control-allow-origin"],
        "https://ops.example.com"
    );
}

#[test]
fn a_bad_cors_origin_exits_non_zero_with_one_line_naming_it() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_query-service"))
        .env("CORS_ALLOWED_ORIGINS", "ops.example.com")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!output.status.success(), "{stderr}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("invalid CORS_ALLOWED_ORIGINS"),
        "{lines:?}"
    );
}

#[test]
fn a_bad_number_setting_exits_2_with_one_line_naming_it() {
    // Not a number, none, and past the bound (whose deadlines could overflow an `Instant`).
    for bad in ["soon", "0", "600001", "18446744073709551615"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_query-service"))
            .env("WAIT_MS_MAX", bad)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(output.status.code(), Some(2), "{bad}: {stderr}");
        assert_eq!(lines.len(), 1, "{bad}: {lines:?}");
        assert!(lines[0].contains("WAIT_MS_MAX"), "{bad}: {lines:?}");
    }
}

/// A database restored from a backup: the log goes back, and the positions above its new head
/// go to other events. The service follows it down, so a long poll at the restored head waits
/// for the next commit (instead of finding the old head above it and reading again and again
/// until its deadline), and a stream at the head gets the events given those positions.
#[tokio::test]
async fn when_the_log_goes_back_long_polls_wait_and_streams_get_the_reused_positions() {
    let app = spawn_app().await;
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let kept = app
        .append_command(order, &mut state, create(order, Uuid::new_v4()))
        .await;
    for sku in ["A", "B", "C"] {
        app.append_command(order, &mut state, add(sku, 1, 1)).await;
    }
    // The "restore": everything after the first event is gone.
    lose_events_after(app.pool(), kept).await;
    wait_for_two_polls(&app).await;

    let mut stream = SseReader::open(&app, &format!("/events/stream?after_position={kept}"), None)
        .await
        .unwrap();
    let long_poll = tokio::spawn(
        app.client
            .get(format!(
                "{}/events?after_position={kept}&wait_ms=10000",
                app.base
            ))
            .send(),
    );
    wait_until("the long poll waits for the next commit", || async {
        app.watcher.waiting.load(Ordering::Relaxed) == 1
    })
    .await;

    let other = Uuid::new_v4();
    let mut other_state = OrderState::default();
    let reused = app
        .append_command(other, &mut other_state, create(other, Uuid::new_v4()))
        .await;
    assert_eq!(reused, kept + 1);
    let page: Value = long_poll.await.unwrap().unwrap().json().await.unwrap();
    assert_eq!(page["events"][0]["position"], reused, "{page}");
    assert_eq!(page["events"][0]["stream_id"], format!("order-{other}"));
    let frame = stream.next_event().await;
    assert_eq!(frame.id, Some(reused.to_string()), "{frame:?}");
}

/// What a restore from an earlier backup does to the log: every event after `kept` is gone,
/// and the positions after it will be given to other events.
async fn lose_events_after(pool: &PgPool, kept: i64) {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM events WHERE global_position > $1")
        .bind(kept)
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("SET session_replication_role = DEFAULT")
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// Waits until the service has polled the log twice, so it has seen what it holds now.
async fn wait_for_two_polls(app: &TestApp) {
    let polls = app.watcher.checkpoint_polls.load(Ordering::Relaxed);
    wait_until("the watcher polls the log", || async {
        app.watcher.checkpoint_polls.load(Ordering::Relaxed) >= polls + 2
    })
    .await;
}

#[tokio::test]
async fn streams_past_the_end_of_a_log_that_went_back_end_and_are_refused_there_on_reconnect() {
    let app = spawn_app().await;
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let kept = app
        .append_command(order, &mut state, create(order, Uuid::new_v4()))
        .await;
    let mut last = kept;
    for sku in ["A", "B", "C"] {
        last = app.append_command(order, &mut state, add(sku, 1, 1)).await;
    }
    let mut log = SseReader::open(&app, &format!("/events/stream?after_position={kept}"), None)
        .await
        .unwrap();
    for _ in 0..3 {
        log.next_event().await;
    }
    let mut one = SseReader::open(&app, &format!("/orders/{order}/events/stream"), None)
        .await
        .unwrap();
    for _ in 0..4 {
        one.next_event().await;
    }

    lose_events_after(app.pool(), kept).await;
    // Waiting at the old end, they would skip, silently, what is committed at the reused
    // positions; they end instead, and their clients reconnect from their last ids.
    assert!(log.next_frame().await.is_none(), "the log's stream ends");
    assert!(one.next_frame().await.is_none(), "the order's stream ends");
    let (status, _, body) = SseReader::open(&app, "/events/stream", Some(last))
        .await
        .err()
        .expect("a reconnect past the end is refused");
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "position_beyond_head", "{body}");
    let (status, _, body) =
        SseReader::open(&app, &format!("/orders/{order}/events/stream"), Some(4))
            .await
            .err()
            .expect("a reconnect past the order's end is refused");
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "version_beyond_head", "{body}");
}

#[tokio::test]
async fn a_stream_opened_after_the_log_went_back_gets_no_event_of_the_lost_history_from_the_tail() {
    let app = spawn_app().await;
    // A stream at the head, so the tail reads each commit.
    let mut watching = SseReader::open(&app, "/events/stream", None).await.unwrap();
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let kept = app
        .append_command(order, &mut state, create(order, Uuid::new_v4()))
        .await;
    assert_eq!(watching.next_event().await.id, Some(kept.to_string()));
    // Three events in one commit: the tail's last batch is (kept, kept + 3].
    append_in_one_transaction(
        &app,
        order,
        &mut state,
        [add("A", 1, 1), add("B", 1, 1), add("C", 1, 1)],
    )
    .await;
    for _ in 0..3 {
        watching.next_event().await;
    }

    lose_events_after(app.pool(), kept).await;
    wait_for_two_polls(&app).await;
    let mut stream = SseReader::open(&app, &format!("/events/stream?after_position={kept}"), None)
        .await
        .unwrap();
    let other = Uuid::new_v4();
    let reused = app
        .append_order(other, vec![create(other, Uuid::new_v4())])
        .await[0];
    assert_eq!(reused, kept + 1);
    let frame = stream.next_event().await;
    assert_eq!(frame.id, Some(reused.to_string()), "{frame:?}");
    assert_eq!(
        frame.data.unwrap()["stream_id"],
        format!("order-{other}"),
        "the event the store holds at that position, not the lost one"
    );
}

/// Under write load a commit lands during nearly every poll; the head must still follow the
/// log down, or the tail goes on reading from the lost end and long polls at the restored head
/// spin.
#[tokio::test]
async fn a_poll_lowers_the_head_of_a_log_that_went_back_although_a_commit_lands_while_it_reads() {
    use query_service::consistency::CheckpointWatcher;
    let db = TestDatabase::new().await;
    let create_order = || async {
        let order = Uuid::new_v4();
        let produced = decide(&OrderState::default(), &create(order, Uuid::new_v4())).unwrap();
        let request = AppendRequest {
            stream_id: order_stream_id(order),
            expected: ExpectedVersion::Exact(0),
            events: produced
                .iter()
                .map(|e| e.to_new_event(EventMetadata::default()))
                .collect(),
            idempotency: None,
        };
        store::append_batch(&db.pool, &[request])
            .await
            .unwrap()
            .remove(0)
            .unwrap()
            .last_position
    };
    let kept = create_order().await;
    for _ in 0..3 {
        create_order().await;
    }
    // The migrations give every projection its checkpoint row: the poll's first read names it.
    let proxy = ReplyHoldingProxy::start(&db).await;
    let pool = proxy.pool().await;
    let watcher = CheckpointWatcher::new();
    let cancel = tokio_util::sync::CancellationToken::new();
    // The real listener; the poller polls once at start and not again during the test.
    let tasks = watcher.spawn(pool.clone(), Duration::from_secs(600), cancel.clone());
    let stats = watcher.stats();
    let head = watcher.head_receiver();
    wait_until(
        "the listener listens and the first poll is done",
        || async { stats.listens.load(Ordering::Relaxed) > 0 && *head.borrow() == kept + 3 },
    )
    .await;

    lose_events_after(&db.pool, kept).await;
    proxy.hold_replies_with(Some(b"order_summaries"));
    let poll = {
        let (watcher, pool) = (watcher.clone(), pool.clone());
        tokio::spawn(async move { watcher.poll_once(&pool).await })
    };
    wait_until("the poll's first read is answered", || async {
        proxy.held() > 0
    })
    .await;
    // A commit lands and is announced while the poll reads; the projection notification sent
    // after it tells when the listener has taken the announcement.
    let reused = create_order().await;
    assert_eq!(reused, kept + 1);
    let notifications = stats.notifications.load(Ordering::Relaxed);
    sqlx::query("SELECT pg_notify('projection_position', 'customer_stats:0')")
        .execute(&db.pool)
        .await
        .unwrap();
    wait_until("the listener took the announcement", || async {
        stats.notifications.load(Ordering::Relaxed) > notifications
    })
    .await;
    proxy.hold_replies_with(None);
    poll.await.unwrap().unwrap();
    assert_eq!(*watcher.head_receiver().borrow(), reused);

    cancel.cancel();
    for task in tasks {
        task.await.unwrap();
    }
}
