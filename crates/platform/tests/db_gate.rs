//! The database gate against a real PostgreSQL (`TEST_DATABASE_URL`), reached through a TCP
//! switch the test turns off and on: requests refused at once while the server cannot be
//! reached, served again when it is back, and never refused while the server answers; and the
//! readiness probe finding the server gone when no request does.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::TempRole;
use platform::Problem;
use platform::db_gate::{
    DbGate, STORE_UNAVAILABLE, refuse_or_cut_while_unreachable, refuse_while_unreachable,
};
use platform::health::{Readiness, health_router};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt;

/// How long a test waits for the gate to change before it fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// A TCP forwarder to the shared PostgreSQL on a port of its own: switched off, the port refuses
/// connections and every forwarded one is cut, as when the server crashes; switched on again,
/// the same port forwards again. It counts the connections it accepted.
struct Switch {
    port: u16,
    forwarding: Option<JoinHandle<()>>,
    accepted: Arc<AtomicUsize>,
}

impl Switch {
    async fn on() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        Self {
            port,
            forwarding: Some(tokio::spawn(forward(listener, accepted.clone()))),
            accepted,
        }
    }

    /// Connection options to the shared server through this switch.
    fn options(&self) -> PgConnectOptions {
        Self::through(common::admin_options(), self.port)
    }

    /// `options` (of the shared server) with the switch's port in place of the server's.
    fn through(options: PgConnectOptions, port: u16) -> PgConnectOptions {
        options.host("127.0.0.1").port(port)
    }

    /// How many connections the switch has accepted so far.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    async fn turn_off(&mut self) {
        if let Some(task) = self.forwarding.take() {
            // Dropping the task drops the listener and the forwarded connections with it.
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens on the switch's port again. The port was free while the switch was off, so
    /// another process may have taken it: the test cannot go on then (its pools are bound to
    /// the port), and says so rather than failing somewhere further on.
    async fn turn_on(&mut self) {
        let address: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let listener = TcpListener::bind(address).await.unwrap_or_else(|e| {
            panic!(
                "cannot switch the server back on: port {} was taken by another process while \
                 the switch was off ({e}); run the test again",
                self.port
            )
        });
        self.forwarding = Some(tokio::spawn(forward(listener, self.accepted.clone())));
    }
}

async fn forward(listener: TcpListener, accepted: Arc<AtomicUsize>) {
    let server_address = common::postgres_address();
    let mut connections = JoinSet::new();
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            return;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let server_address = server_address.clone();
        connections.spawn(async move {
            if let Ok(mut server) = TcpStream::connect(server_address).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        });
    }
}

/// A pool built as the services build theirs (a refused connect is retried until the acquire
/// timeout), shortened so a failing request does not take the service's five seconds.
fn pool_to(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy_with(options)
}

#[derive(Clone)]
struct Route {
    pool: PgPool,
    calls: Arc<AtomicUsize>,
}

/// A route that needs the database, answering as the services do: 503 `store_unavailable` when
/// the database cannot be used.
async fn query(State(route): State<Route>) -> Response {
    route.calls.fetch_add(1, Ordering::SeqCst);
    match sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&route.pool)
        .await
    {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) if platform::db::is_unavailable(&e) => {
            Problem::unavailable(STORE_UNAVAILABLE, 1).into_response()
        }
        Err(e) => Problem::internal_error(&e).into_response(),
    }
}

fn app(route: Route, gate: DbGate) -> Router {
    Router::new()
        .route("/query", get(query))
        .route_layer(axum::middleware::from_fn_with_state(
            gate,
            refuse_while_unreachable,
        ))
        .with_state(route)
}

/// [`app`] behind the middleware of routes that change nothing.
fn read_only_app(route: Route, gate: DbGate) -> Router {
    Router::new()
        .route("/query", get(query))
        .route_layer(axum::middleware::from_fn_with_state(
            gate,
            refuse_or_cut_while_unreachable,
        ))
        .with_state(route)
}

/// A route whose pool waits a minute for a connection (a refused connect is retried all that
/// time), so that only the gate can end a request's wait within a test's deadline.
fn patient_route(options: PgConnectOptions, max_connections: u32) -> Route {
    Route {
        pool: PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(60))
            .connect_lazy_with(options),
        calls: Arc::default(),
    }
}

async fn get_query(app: &Router) -> Response {
    app.clone()
        .oneshot(Request::get("/query").body(Body::empty()).unwrap())
        .await
        .unwrap()
}

async fn code_of(response: Response) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    body["code"].as_str().unwrap().to_owned()
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn while_the_server_cannot_be_reached_requests_are_refused_without_running_the_route() {
    let mut switch = Switch::on().await;
    let options = switch.options();
    let route = Route {
        pool: pool_to(options, 2),
        calls: Arc::default(),
    };
    let gate = DbGate::new(&route.pool);
    let app = app(route.clone(), gate.clone());
    assert_eq!(get_query(&app).await.status(), StatusCode::OK);

    switch.turn_off().await;
    // The route finds out first: its pooled connection is cut, or a new one refused.
    let response = get_query(&app).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code_of(response).await, STORE_UNAVAILABLE);
    wait_until("the gate shuts", || gate.is_shut()).await;

    let calls = route.calls.load(Ordering::SeqCst);
    for _ in 0..3 {
        let response = get_query(&app).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(code_of(response).await, STORE_UNAVAILABLE);
    }
    assert_eq!(
        route.calls.load(Ordering::SeqCst),
        calls,
        "a refused request never reaches the route, so it never waits for a connection"
    );

    switch.turn_on().await;
    wait_until("the gate opens once the server is back", || !gate.is_shut()).await;
    assert_eq!(get_query(&app).await.status(), StatusCode::OK);
    assert_eq!(route.calls.load(Ordering::SeqCst), calls + 1);
}

/// A read already waiting for a pooled connection when the server goes away (the pool retries
/// a refused connect until its acquire timeout, a minute here) is answered 503
/// `store_unavailable` as soon as the gate shuts, on a read-only route; on a route that may
/// write, the gate leaves the request under way to its own answer: once the server is back, it
/// gets its connection and succeeds.
#[tokio::test]
async fn a_read_under_way_when_the_gate_shuts_is_answered_at_once() {
    let mut switch = Switch::on().await;
    let route = patient_route(switch.options(), 2);
    let gate = DbGate::new(&route.pool);
    let reads = read_only_app(route.clone(), gate.clone());
    let writes = app(route.clone(), gate.clone());
    switch.turn_off().await;

    let read = tokio::spawn({
        let reads = reads.clone();
        async move { get_query(&reads).await }
    });
    let write = tokio::spawn({
        let writes = writes.clone();
        async move { get_query(&writes).await }
    });
    wait_until("both requests wait for a connection", || {
        route.calls.load(Ordering::SeqCst) == 2
    })
    .await;
    // What another request's `store_unavailable` answer does.
    gate.suspect();
    let response = tokio::time::timeout(DEADLINE, read)
        .await
        .expect("the read is answered once the gate shuts")
        .unwrap();
    assert!(gate.is_shut());
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    assert_eq!(code_of(response).await, STORE_UNAVAILABLE);

    switch.turn_on().await;
    let response = tokio::time::timeout(DEADLINE, write)
        .await
        .expect("the write is answered once the server is back")
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "a request that may write is left to its own answer, not cut when the gate shuts"
    );
}

/// A quiet service: the server went away and nothing else asks the database, so no other
/// answer starts a probe. A read that has waited `SLOW_WORK_SUSPECTS_AFTER` for its
/// connection starts one itself, and is answered 503 once it finds the server gone, not after
/// the pool's acquire timeout (a minute here).
#[tokio::test]
async fn on_a_quiet_service_a_read_left_waiting_finds_the_server_gone_by_itself() {
    let mut switch = Switch::on().await;
    let route = patient_route(switch.options(), 1);
    let gate = DbGate::new(&route.pool);
    let reads = read_only_app(route.clone(), gate.clone());
    assert_eq!(get_query(&reads).await.status(), StatusCode::OK);
    switch.turn_off().await;

    let response = tokio::time::timeout(DEADLINE, get_query(&reads))
        .await
        .expect("the read finds the server gone before the pool gives up");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code_of(response).await, STORE_UNAVAILABLE);
    assert!(gate.is_shut());
}

#[tokio::test]
async fn a_server_that_answers_never_shuts_the_gate_even_when_no_connection_can_be_had() {
    // A role limited to one connection: the pool's one connection is held, so a request times
    // out waiting for it, and the gate's probe is turned away by the server's limit — both
    // failures of a server that is there, which requests must keep reaching. The server is
    // reached through a switch (left on) that counts connections, so the probe's is seen.
    let role = TempRole::create("gate", "CONNECTION LIMIT 1").await;
    let switch = Switch::on().await;
    let route = Route {
        pool: pool_to(Switch::through(role.options(), switch.port), 1),
        calls: Arc::default(),
    };
    let gate = DbGate::new(&route.pool);
    let shut = gate.shut_state();
    let app = app(route.clone(), gate.clone());

    let held = route.pool.acquire().await.unwrap();
    let before = switch.accepted();
    let response = get_query(&app).await;
    assert_eq!(code_of(response).await, STORE_UNAVAILABLE);
    // The request's pool is at its size and opens nothing: a new connection is the probe's.
    wait_until("a store_unavailable answer starts a probe", || {
        switch.accepted() > before
    })
    .await;
    wait_until("the probe ends", || !gate.is_probing()).await;
    assert!(
        !shut.has_changed().unwrap(),
        "the server answered the probe, so the gate never shut"
    );

    drop(held);
    assert_eq!(get_query(&app).await.status(), StatusCode::OK);
    route.pool.close().await;
}

/// The value of `name`'s one series on a Prometheus text page, if it is there.
fn gauge(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

async fn get_path(app: &Router, path: &str) -> Response {
    app.clone()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap()
}

async fn page(app: &Router, path: &str) -> String {
    let bytes = axum::body::to_bytes(get_path(app, path).await.into_body(), 1 << 20)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// An instance nobody sends requests to (a quiet hour, or out of rotation because its readiness
/// fails) still finds the server gone: the readiness probe's failed `postgres` check starts the
/// gate's probe, so `database_unreachable` is 1 for as long as the server cannot be reached and
/// the alert on it can fire, and 0 again once it can.
#[tokio::test]
async fn a_failed_readiness_check_finds_the_server_gone_without_any_request() {
    let metrics = platform::metrics::install("platform-test");
    let mut switch = Switch::on().await;
    let pool = pool_to(switch.options(), 2);
    let gate = DbGate::new(&pool);
    let readiness = Readiness::default()
        .with_postgres(pool.clone())
        .with_db_gate(gate.clone());
    let probes: Router = health_router(readiness, metrics);
    assert_eq!(get_path(&probes, "/readyz").await.status(), StatusCode::OK);
    assert_eq!(
        gauge(&page(&probes, "/metrics").await, "database_unreachable"),
        Some(0.0)
    );

    switch.turn_off().await;
    // Only the readiness probe asks; no request is made.
    assert_eq!(
        get_path(&probes, "/readyz").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    wait_until("the gate shuts", || gate.is_shut()).await;
    assert_eq!(
        gauge(&page(&probes, "/metrics").await, "database_unreachable"),
        Some(1.0)
    );

    switch.turn_on().await;
    wait_until("the gate opens once the server is back", || !gate.is_shut()).await;
    assert_eq!(
        gauge(&page(&probes, "/metrics").await, "database_unreachable"),
        Some(0.0)
    );
    assert_eq!(get_path(&probes, "/readyz").await.status(), StatusCode::OK);
}
