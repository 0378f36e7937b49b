//! Test helpers: a fresh database and a private key prefix per test, orders appended the way
//! the command service does (`decide` + `store::append_batch`), published the way the relay
//! does (`bus::Publisher`, in position order), and projector instances started in-process.

use std::time::Duration;

use bus::testing::{shared_redis_url, unique_keys, wait_until};
use bus::{Publisher, StreamKeys};
use clap::Parser as _;
use events::{EventMetadata, OrderCommand, OrderState, decide, evolve, order_stream_id};
use projector::{Application, Cli, ProjectionKind};
use sqlx::PgPool;
use store::testing::TestDatabase;
use store::{AppendRequest, ExpectedVersion};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// `projector <args>` (an admin command) as an operator runs it against the world's database
/// and stream: migrations left alone, output captured by `.output()`.
pub fn projector_command(w: &World, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_projector"));
    command
        .args(args)
        .env("DATABASE_URL", &w.db.url)
        .env("REDIS_URL", &w.redis_url)
        .env("EVENT_STREAM", w.keys.stream())
        .env("SKIP_MIGRATIONS", "true");
    command
}

/// How long a test waits for the projector to converge.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// One test's world.
pub struct World {
    pub db: TestDatabase,
    pub keys: StreamKeys,
    pub redis_url: String,
    pub redis: bus::ConnectionManager,
    pub publisher: Publisher,
    published: i64,
}

impl World {
    pub async fn new() -> Self {
        Self::with_redis(shared_redis_url()).await
    }

    pub async fn with_redis(redis_url: String) -> Self {
        let db = TestDatabase::new().await;
        let keys = unique_keys();
        let client = bus::client(&redis_url).expect("redis url");
        let redis = bus::connect(&client).await.expect("redis connects");
        let publisher = Publisher::new(redis.clone(), keys.clone(), bus::DEFAULT_HARD_CAP);
        Self {
            db,
            keys,
            redis_url,
            redis,
            publisher,
            published: 0,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    /// Publishes every event appended since the last call, in position order (like the relay).
    pub async fn publish(&mut self) {
        loop {
            let events = store::read_all(self.pool(), self.published, 500)
                .await
                .expect("read events");
            let Some(last) = events.last() else { break };
            let last = last.global_position;
            self.publisher.publish(&events).await.expect("publish");
            self.published = last;
        }
    }

    /// Forgets what was published (after Redis lost it, the relay resumes from its checkpoint:
    /// nothing earlier is published again).
    pub async fn skip_publishing_up_to_head(&mut self) {
        self.published = store::head_position(self.pool()).await.expect("head");
    }

    /// The args of an in-process projector on this world.
    pub fn args(&self, consumer: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "projector",
            "--database-url",
            &self.db.url,
            "--redis-url",
            &self.redis_url,
            "--event-stream",
            self.keys.stream(),
            "--listen-addr",
            "127.0.0.1:0",
            "--db-max-connections",
            "4",
            "--consumer-name",
            consumer,
            "--skip-migrations",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    /// Starts a projector in-process; stop it by cancelling the token.
    pub async fn spawn_projector(
        &self,
        consumer: &str,
        extra: &[&str],
    ) -> (CancellationToken, JoinHandle<anyhow::Result<()>>) {
        let (token, handle, _) = self.spawn_projector_serving(consumer, extra).await;
        (token, handle)
    }

    /// [`Self::spawn_projector`], also returning the port its HTTP endpoints listen on.
    pub async fn spawn_projector_serving(
        &self,
        consumer: &str,
        extra: &[&str],
    ) -> (CancellationToken, JoinHandle<anyhow::Result<()>>, u16) {
        spawn_projector_with(self.args(consumer, extra)).await
    }

    pub async fn checkpoint(&self, projection: ProjectionKind) -> i64 {
        sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE projection = $1")
            .bind(projection.name())
            .fetch_optional(self.pool())
            .await
            .expect("read checkpoint")
            .unwrap_or(0)
    }

    /// Waits until both projections' low-water marks reach the head.
    pub async fn wait_caught_up(&self) {
        let head = store::head_position(self.pool()).await.expect("head");
        for projection in ProjectionKind::ALL {
            wait_until(
                DEADLINE,
                &format!("{projection} reaches position {head}"),
                || async move { (self.checkpoint(projection).await >= head).then_some(()) },
            )
            .await;
        }
    }

    /// Asserts both read models equal a fresh fold of the event store.
    pub async fn assert_exact(&self) {
        for projection in ProjectionKind::ALL {
            self.assert_projection_exact(projection).await;
        }
    }

    /// Asserts `projection`'s read model equals a fresh fold of the event store.
    pub async fn assert_projection_exact(&self, projection: ProjectionKind) {
        let report = projector::verify::verify(self.pool(), projection)
            .await
            .expect("verify runs");
        assert!(report.is_clean(), "{}", report.render(projection));
    }
}

/// Starts a projector in-process with the command line `args` (see [`World::args`]); returns
/// its stop token, its task and the port its HTTP endpoints listen on.
pub async fn spawn_projector_with(
    args: Vec<String>,
) -> (CancellationToken, JoinHandle<anyhow::Result<()>>, u16) {
    let cli = Cli::try_parse_from(args).expect("args parse");
    let app = Application::build(cli).await.expect("projector builds");
    let port = app.port();
    let token = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(token.clone()));
    (token, handle, port)
}

/// How far an order goes through its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Draft,
    Placed,
    Paid,
    Shipped,
    Cancelled,
}

impl Fate {
    pub fn of(i: usize) -> Self {
        [
            Fate::Draft,
            Fate::Placed,
            Fate::Paid,
            Fate::Shipped,
            Fate::Cancelled,
        ][i % 5]
    }
}

/// The commands that take an order to `fate`.
pub fn commands(order_id: Uuid, customer_id: Uuid, fate: Fate) -> Vec<OrderCommand> {
    let mut cmds = vec![
        OrderCommand::CreateOrder {
            order_id,
            customer_id,
            currency: "EUR".into(),
        },
        OrderCommand::AddItem {
            sku: "SKU-1".into(),
            quantity: 2,
            unit_price: 150,
        },
        OrderCommand::AddItem {
            sku: "SKU-2".into(),
            quantity: 1,
            unit_price: 999,
        },
    ];
    if fate == Fate::Draft {
        return cmds;
    }
    cmds.push(OrderCommand::PlaceOrder);
    match fate {
        Fate::Paid | Fate::Shipped => cmds.push(OrderCommand::PayOrder {
            amount: 1299,
            payment_reference: "pay-1".into(),
        }),
        Fate::Cancelled => cmds.push(OrderCommand::CancelOrder {
            reason: "changed my mind".into(),
        }),
        _ => {}
    }
    if fate == Fate::Shipped {
        cmds.push(OrderCommand::ShipOrder {
            carrier: "DHL".into(),
            tracking_number: "T1".into(),
        });
    }
    cmds
}

/// Runs `commands` against the order one append at a time (like one HTTP request each).
pub async fn run_commands(
    pool: &PgPool,
    order_id: Uuid,
    commands: &[OrderCommand],
    from: &mut OrderState,
) {
    let stream = order_stream_id(order_id);
    for cmd in commands {
        let events = decide(from, cmd).expect("command is valid");
        let request = AppendRequest {
            stream_id: stream.clone(),
            expected: ExpectedVersion::Exact(from.version),
            events: events
                .iter()
                .map(|e| e.to_new_event(EventMetadata::default()))
                .collect(),
            idempotency: None,
        };
        let mut results = store::append_batch(pool, &[request])
            .await
            .expect("append commits");
        results.remove(0).expect("append succeeds");
        for e in &events {
            *from = evolve(std::mem::take(from), e);
        }
    }
}

/// Takes every projection's sweeper lock on a session of the test's own and returns it: while
/// it is held, no projector instance leads a sweeper, and each runs as a follower.
pub async fn lead_every_sweeper(w: &World) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    let mut leader = w.pool().acquire().await.unwrap();
    for projection in ProjectionKind::ALL {
        let led: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(projection.sweeper_lock_key())
            .fetch_one(&mut *leader)
            .await
            .unwrap();
        assert!(led, "{projection}: the test is the sweeper");
    }
    leader
}

/// Appends `count` orders spread over a few customers, each customer's in two currencies;
/// returns their ids.
pub async fn append_orders(pool: &PgPool, count: usize) -> Vec<Uuid> {
    let customers: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let id = Uuid::new_v4();
        let mut state = OrderState::default();
        let mut cmds = commands(id, customers[i % 3], Fate::of(i));
        if let Some(OrderCommand::CreateOrder { currency, .. }) = cmds.first_mut() {
            *currency = ["EUR", "USD"][i % 2].into();
        }
        run_commands(pool, id, &cmds, &mut state).await;
        ids.push(id);
    }
    ids
}

/// Writes `count` dead letters to `group`'s dead-letter stream that name no event (entries
/// that could not be decoded), in one round trip.
pub async fn undecodable_letters(w: &World, group: &str, count: usize) {
    let mut conn = w.redis.clone();
    let mut pipe = redis::pipe();
    for i in 0..count {
        pipe.cmd("XADD")
            .arg(w.keys.dlq(group))
            .arg("*")
            .arg("hello")
            .arg(i)
            .arg("error")
            .arg("undecodable")
            .ignore();
    }
    let () = pipe.query_async(&mut conn).await.unwrap();
}

/// The `status` column of `stream`'s order in `order_summaries`.
pub async fn summary_status(w: &World, stream: &str) -> String {
    sqlx::query_scalar("SELECT status FROM order_summaries WHERE order_id = $1")
        .bind(events::order_id_of_stream(stream).unwrap())
        .fetch_one(w.pool())
        .await
        .unwrap()
}

/// Makes `order_summaries` refuse every write of `order` from version 4 (its placing) on, with
/// a trigger: a projection bug or a constraint the event breaks, as the projector meets it.
pub async fn refuse_placing(pool: &PgPool, order: Uuid) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION refuse_victim() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           RAISE EXCEPTION 'refusing order {order}'; END $$; \
         CREATE TRIGGER refuse_victim BEFORE INSERT OR UPDATE ON order_summaries FOR EACH ROW \
           WHEN (NEW.order_id = '{order}' AND NEW.version >= 4) EXECUTE FUNCTION refuse_victim();"
    )))
    .execute(pool)
    .await
    .expect("create the refusing trigger");
}

/// Removes the trigger of [`refuse_placing`]: the fix is deployed.
pub async fn stop_refusing(pool: &PgPool) {
    sqlx::raw_sql("DROP TRIGGER refuse_victim ON order_summaries")
        .execute(pool)
        .await
        .expect("drop the refusing trigger");
}

/// The value of metric `name` for `projection` on the `/metrics` of a projector listening on
/// `port`; `None` when it exports no such sample (not yet, or no longer), which a test must
/// tell apart from a sample of 0.
pub async fn metric(port: u16, name: &str, projection: ProjectionKind) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    let label = format!("projection=\"{projection}\"");
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(&label))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

/// A TCP proxy to the local PostgreSQL that, once told to, accepts new connections and never
/// passes a byte of them (a server whose host vanished: nothing answers, nothing refuses),
/// while the connections made before keep working, or, once cut, are dropped too.
pub struct HoldingProxy {
    port: u16,
    holding: std::sync::Arc<std::sync::atomic::AtomicBool>,
    held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    passing: std::sync::Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl HoldingProxy {
    /// Starts a proxy to PostgreSQL on 127.0.0.1:`upstream`.
    pub async fn start(upstream: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let holding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let passing = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, n, p) = (holding.clone(), held.clone(), passing.clone());
        let accept = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((mut client, _)) = listener.accept().await {
                // Under the lock `cut` takes, so no connection passes after it.
                let mut passing = p.lock().expect("proxy tasks");
                if h.load(Ordering::SeqCst) {
                    n.fetch_add(1, Ordering::SeqCst);
                    kept.push(client);
                    continue;
                }
                passing.push(tokio::spawn(async move {
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        });
        Self {
            port,
            holding,
            held,
            passing,
            accept,
        }
    }

    /// Holds new connections and drops every connection made before: the server is gone.
    pub fn cut(&self) {
        let mut passing = self.passing.lock().expect("proxy tasks");
        self.hold_new_connections();
        for pass in passing.drain(..) {
            pass.abort();
        }
    }

    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on, new connections are accepted and held without an answer.
    pub fn hold_new_connections(&self) {
        self.holding
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many connections are held.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for HoldingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The dead letters of `projection` once it has any (`what` names the wait in a timeout).
pub async fn first_letters(
    dlq: &bus::DeadLetterQueue,
    projection: ProjectionKind,
    what: &str,
) -> Vec<bus::DeadLetter> {
    wait_until(DEADLINE, what, || async {
        let letters = dlq.list(projection.name(), 10).await.unwrap();
        (!letters.is_empty()).then_some(letters)
    })
    .await
}

/// Consumer `name` of `projection`'s group on the world's stream, blocking at most 100 ms a
/// read: what a projector instance reads through, for a test that drives one directly.
pub fn group_consumer(w: &World, projection: ProjectionKind, name: &str) -> bus::Consumer {
    let client = bus::client(&w.redis_url).unwrap();
    bus::Consumer::new(
        &client,
        w.redis.clone(),
        w.keys.clone(),
        projection.name(),
        name,
        Duration::from_millis(100),
    )
    .unwrap()
}
