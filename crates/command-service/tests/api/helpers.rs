//! `spawn_app()` and small helpers shared by the API tests.

#![allow(clippy::unwrap_used, dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use command_service::{Application, Config};
use serde_json::{Value, json};
use sqlx::Row;
use store::testing::TestDatabase;
use tokio::sync::oneshot;
use uuid::Uuid;

/// A running application and its database.
pub struct TestApp {
    pub address: String,
    pub db: Arc<TestDatabase>,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Starts the app on a fresh database with the default settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Starts the app on a fresh database with extra `--flag value` settings.
pub async fn spawn_app_with(settings: &[(&str, &str)]) -> TestApp {
    spawn_app_on(Arc::new(TestDatabase::new().await), settings).await
}

/// Starts another app instance on an existing database.
pub async fn spawn_app_on(db: Arc<TestDatabase>, settings: &[(&str, &str)]) -> TestApp {
    let stream = format!("test-{}:es:events", Uuid::new_v4().simple());
    let mut args: Vec<String> = [
        "command-service",
        "--listen-addr",
        "127.0.0.1:0",
        "--database-url",
        &db.url,
        "--event-stream",
        &stream,
        "--relay-enabled",
        "false",
        "--db-max-connections",
        "4",
        "--skip-migrations",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (flag, value) in settings {
        args.push(format!("--{flag}"));
        args.push(value.to_string());
    }
    let config = Config::try_parse_args(args).unwrap();
    let app = Application::build(config).await.unwrap();
    let address = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        db,
        client: reqwest::Client::new(),
        stop: Some(stop),
        server: Some(server),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path))
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path))
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.delete(self.url(path))
    }

    /// Creates an order through the API and returns its id.
    pub async fn create_order(&self) -> Uuid {
        let response = self
            .post("/orders")
            .json(&json!({ "customer_id": Uuid::new_v4(), "currency": "EUR" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        body["order_id"].as_str().unwrap().parse().unwrap()
    }

    /// Adds `quantity` units of `sku` at `unit_price`; returns the response.
    pub async fn add_item(
        &self,
        order_id: Uuid,
        sku: &str,
        quantity: i64,
        unit_price: i64,
    ) -> reqwest::Response {
        self.post(&format!("/orders/{order_id}/items"))
            .json(&json!({ "sku": sku, "quantity": quantity, "unit_price": unit_price }))
            .send()
            .await
            .unwrap()
    }

    /// The `/metrics` page.
    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Number of events stored for an order.
    pub async fn event_count(&self, order_id: Uuid) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1")
            .bind(format!("order-{order_id}"))
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// `(stream_version, metadata)` of every event of an order, in version order.
    pub async fn events_of(&self, order_id: Uuid) -> Vec<(i64, String, Value)> {
        sqlx::query(
            "SELECT stream_version, event_type, metadata FROM events WHERE stream_id = $1 ORDER BY stream_version",
        )
        .bind(format!("order-{order_id}"))
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
        .iter()
        .map(|row| {
            (
                row.get("stream_version"),
                row.get("event_type"),
                row.get("metadata"),
            )
        })
        .collect()
    }

    /// Takes the store's append lock in a transaction of the test's own and returns it: until
    /// it ends, every append (and every refusal recorded under a key) waits for the lock.
    pub async fn hold_append_lock(&self) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut holder = self.db.pool.begin().await.unwrap();
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(store::append::APPEND_LOCK_KEY)
            .execute(&mut *holder)
            .await
            .unwrap();
        holder
    }

    /// How many sessions of the test's database wait for an advisory lock (the append lock).
    pub async fn append_lock_waiters(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }

    /// The version of the order's stored snapshot, if it has one.
    pub async fn snapshot_version(&self, order_id: Uuid) -> Option<i64> {
        sqlx::query_scalar("SELECT stream_version FROM snapshots WHERE stream_id = $1")
            .bind(format!("order-{order_id}"))
            .fetch_optional(&self.db.pool)
            .await
            .unwrap()
    }

    /// Stops the server gracefully and waits up to 15 s for it to return; panics unless it
    /// returned `Ok` (what the binary turns into exit 0) by then.
    pub async fn stop_within_deadline(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(15), server)
                .await
                .expect("the service stops within the deadline")
                .unwrap()
                .expect("the service stops cleanly");
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }
}

/// Asserts a problem response: status, content type and `code`; returns the body.
pub async fn assert_problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status(), status, "unexpected status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    body
}

/// Polls `condition` until it is true or 15 s pass.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
