//! The outbox relay against real PostgreSQL (a fresh database per test) and real Redis (the
//! shared server under a unique stream key, or a private server for outage tests). Appends go
//! straight through the store; the relay runs in-process, except in the kill -9 test, which runs
//! the real binary.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use bus::testing::{PrivateRedis, set_maxmemory, shared_redis_url, unique_keys, wait_until};
use bus::{ConnectionManager, StreamEntry};
use command_service::relay::{self, RelayArgs, RelayStatus};
use events::{EventMetadata, NewEvent, order_stream_id};
use store::testing::{SilencingProxy, TestDatabase};
use store::{AppendOutcome, AppendRequest, CommitterConfig, ExpectedVersion, GroupCommitter};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long any wait in these tests may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// A W3C traceparent that must travel to the stream untouched.
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Relay settings for tests: quick fail-over and fallback ticks, small batches so the tests
/// cross batch boundaries.
fn test_args() -> RelayArgs {
    RelayArgs {
        relay_batch: 25,
        relay_poll_ms: 200,
        relay_standby_poll_ms: 100,
        relay_trim_interval_ms: 1000,
        ..RelayArgs::default()
    }
}

/// A relay running in-process until its token is cancelled.
struct RunningRelay {
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
    status: RelayStatus,
}

impl RunningRelay {
    fn start(db: &TestDatabase, redis_url: &str, stream_key: &str) -> Self {
        Self::start_with(db, redis_url, stream_key, test_args())
    }

    fn start_with(db: &TestDatabase, redis_url: &str, stream_key: &str, args: RelayArgs) -> Self {
        Self::start_on(db.pool.clone(), redis_url, stream_key, args)
    }

    /// Starts a relay whose database connections come from `pool`'s options.
    fn start_on(pool: sqlx::PgPool, redis_url: &str, stream_key: &str, args: RelayArgs) -> Self {
        let shutdown = CancellationToken::new();
        let (handle, status) = relay::spawn(
            pool,
            bus::client(redis_url).expect("redis url"),
            stream_key.to_owned(),
            args,
            shutdown.clone(),
        );
        Self {
            shutdown,
            handle,
            status,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.handle
            .await
            .expect("relay task does not panic")
            .expect("relay stops cleanly");
    }
}

fn new_events(count: usize) -> Vec<NewEvent> {
    (0..count)
        .map(|n| NewEvent {
            event_id: Uuid::new_v4(),
            event_type: "ItemAdded".into(),
            schema_version: 1,
            data: serde_json::json!({"sku": format!("sku-{n}"), "quantity": 1, "unit_price": 100}),
            metadata: EventMetadata {
                correlation_id: Some(Uuid::new_v4().to_string()),
                traceparent: Some(TRACEPARENT.into()),
                ..EventMetadata::default()
            },
        })
        .collect()
}

fn request(stream_id: &str, count: usize) -> AppendRequest {
    AppendRequest {
        stream_id: stream_id.to_owned(),
        expected: ExpectedVersion::Any,
        events: new_events(count),
        idempotency: None,
    }
}

/// Appends `count` events to a new order stream in one transaction.
async fn append(db: &TestDatabase, count: usize) -> AppendOutcome {
    let stream = order_stream_id(Uuid::new_v4());
    let mut results = store::append_batch(&db.pool, &[request(&stream, count)])
        .await
        .expect("append transaction");
    results.remove(0).expect("append accepted")
}

async fn redis(url: &str) -> ConnectionManager {
    bus::connect(&bus::client(url).expect("redis url"))
        .await
        .expect("redis is up")
}

async fn entries(conn: &ConnectionManager, key: &str) -> Vec<StreamEntry> {
    let mut conn = conn.clone();
    let raw: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    raw.into_iter()
        .map(|(id, fields)| StreamEntry { id, fields })
        .collect()
}

/// Waits until the stream holds at least `count` entries and returns them all.
async fn wait_for_entries(conn: &ConnectionManager, key: &str, count: usize) -> Vec<StreamEntry> {
    wait_until(
        DEADLINE,
        &format!("{count} entries are on {key}"),
        || async {
            let found = entries(conn, key).await;
            (found.len() >= count).then_some(found)
        },
    )
    .await
}

fn ids(entries: &[StreamEntry]) -> Vec<String> {
    entries.iter().map(|entry| entry.id.clone()).collect()
}

fn expected_ids(positions: std::ops::RangeInclusive<i64>) -> Vec<String> {
    positions.map(|position| format!("{position}-0")).collect()
}

async fn delete_key(conn: &ConnectionManager, key: &str) {
    assert!(key.starts_with("test-"), "only ever delete test keys");
    let mut conn = conn.clone();
    let _: i64 = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("DEL test stream");
}

async fn stored_checkpoint(db: &TestDatabase, stream_key: &str) -> Option<i64> {
    sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE stream_key = $1")
        .bind(stream_key)
        .fetch_optional(&db.pool)
        .await
        .expect("read relay_checkpoints")
}

/// Waits until `relay_checkpoints` holds `position` for `stream_key`.
async fn wait_for_stored_checkpoint(db: &TestDatabase, stream_key: &str, position: i64) {
    wait_until(
        DEADLINE,
        &format!("the stored checkpoint reaches {position}"),
        || async { (stored_checkpoint(db, stream_key).await == Some(position)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn every_committed_event_appears_once_in_per_stream_order() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let url = shared_redis_url();
    let conn = redis(&url).await;
    let relay = RunningRelay::start(&db, &url, &keys.stream);
    let committer = GroupCommitter::spawn(db.pool.clone(), CommitterConfig::default());

    // 16 writers, each on its own order stream, 10 appends of 1 to 3 events each.
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let committer = committer.clone();
        writers.spawn(async move {
            let stream = order_stream_id(Uuid::new_v4());
            let mut appended = 0;
            for i in 0..10 {
                let count = 1 + i % 3;
                committer
                    .append(request(&stream, count))
                    .await
                    .expect("append accepted");
                appended += count;
            }
            appended
        });
    }
    let mut total = 0;
    while let Some(appended) = writers.join_next().await {
        total += appended.expect("writer does not panic");
    }

    let found = wait_for_entries(&conn, &keys.stream, total).await;
    assert_eq!(
        ids(&found),
        expected_ids(1..=total as i64),
        "each position once, ascending"
    );

    // Fields per the contract: the decoded entry is exactly the stored event.
    let stored = store::read_all(&db.pool, 0, total as i64 + 1)
        .await
        .expect("read the log");
    assert_eq!(stored.len(), total);
    let mut versions: HashMap<String, i64> = HashMap::new();
    for (entry, event) in found.iter().zip(&stored) {
        let names: Vec<&str> = entry.fields.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            bus::codec::field::ALL,
            "entry {} has the contract's fields",
            entry.id
        );
        let decoded = bus::decode_entry(entry).expect("entry decodes");
        assert_eq!(&decoded, event);
        assert_eq!(decoded.metadata.traceparent.as_deref(), Some(TRACEPARENT));
        let last = versions.entry(decoded.stream_id.clone()).or_insert(0);
        assert_eq!(
            decoded.stream_version,
            *last + 1,
            "stream order of {}",
            decoded.stream_id
        );
        *last = decoded.stream_version;
    }
    wait_until(
        DEADLINE,
        "the relay checkpoint reaches the head",
        || async { (relay.status.checkpoint() == total as i64).then_some(()) },
    )
    .await;

    relay.stop().await;
    delete_key(&conn, &keys.stream).await;
}

#[tokio::test]
async fn events_committed_while_redis_is_down_appear_after_it_restarts() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let mut server = PrivateRedis::start().await.expect("private redis starts");
    let relay = RunningRelay::start(&db, &server.url(), &keys.stream);
    {
        let conn = redis(&server.url()).await;
        append(&db, 5).await;
        let found = wait_for_entries(&conn, &keys.stream, 5).await;
        assert_eq!(ids(&found), expected_ids(1..=5));
    }

    server.stop();
    // Commits keep succeeding: nothing on the write path waits for Redis.
    for _ in 0..4 {
        append(&db, 3).await;
    }
    wait_until(DEADLINE, "the relay notices Redis is down", || async {
        relay.status.redis_unavailable().then_some(())
    })
    .await;
    assert!(
        relay.status.is_leader(),
        "a Redis outage does not cost the leadership"
    );
    assert_eq!(
        relay.status.checkpoint(),
        5,
        "nothing is checkpointed while Redis is down"
    );

    // The restarted server is empty (no persistence): publishing continues from the checkpoint.
    server.start_again().await.expect("private redis restarts");
    let conn = redis(&server.url()).await;
    let found = wait_for_entries(&conn, &keys.stream, 12).await;
    assert_eq!(ids(&found), expected_ids(6..=17));
    wait_until(DEADLINE, "the relay checkpoints the backlog", || async {
        (relay.status.checkpoint() == 17 && !relay.status.redis_unavailable()).then_some(())
    })
    .await;

    relay.stop().await;
}

/// Redis full: its appends are refused. Commits keep succeeding, the relay keeps its
/// leadership and says Redis cannot take events, and once there is room again the backlog is
/// published in order, each event once.
#[tokio::test]
async fn events_committed_while_redis_is_full_appear_once_it_has_room() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let server = PrivateRedis::start().await.expect("private redis starts");
    let conn = redis(&server.url()).await;
    let relay = RunningRelay::start(&db, &server.url(), &keys.stream);
    append(&db, 3).await;
    wait_for_entries(&conn, &keys.stream, 3).await;

    set_maxmemory(&conn, 1).await;
    for _ in 0..4 {
        append(&db, 3).await;
    }
    wait_until(
        DEADLINE,
        "the relay finds Redis refusing its appends",
        || async { relay.status.redis_unavailable().then_some(()) },
    )
    .await;
    assert!(
        relay.status.is_leader(),
        "a full Redis does not cost the leadership"
    );
    assert_eq!(relay.status.checkpoint(), 3);
    assert_eq!(
        ids(&entries(&conn, &keys.stream).await),
        expected_ids(1..=3)
    );

    set_maxmemory(&conn, 0).await;
    let found = wait_for_entries(&conn, &keys.stream, 15).await;
    assert_eq!(ids(&found), expected_ids(1..=15));
    wait_until(DEADLINE, "the relay checkpoints the backlog", || async {
        (relay.status.checkpoint() == 15 && !relay.status.redis_unavailable()).then_some(())
    })
    .await;
    relay.stop().await;
}

/// The real binary, killed with SIGKILL when dropped.
fn start_service(db: &TestDatabase, stream_key: &str) -> tokio::process::Child {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_command-service"))
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", shared_redis_url())
        .env("EVENT_STREAM", stream_key)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("RELAY_ENABLED", "true")
        .env("RELAY_POLL_MS", "200")
        .env("RELAY_STANDBY_POLL_MS", "100")
        .env("DB_MAX_CONNECTIONS", "4")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("command-service starts")
}

#[tokio::test]
async fn events_committed_just_before_a_kill_9_appear_after_restart() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let conn = redis(&shared_redis_url()).await;

    let mut first = start_service(&db, &keys.stream);
    // The first event on the stream shows the process's relay is leading.
    append(&db, 1).await;
    wait_for_entries(&conn, &keys.stream, 1).await;

    // Commit a batch and kill the process at once: some of it may be published, some not.
    for _ in 0..5 {
        append(&db, 4).await;
    }
    first.kill().await.expect("SIGKILL the first process");
    // Commits while no relay runs at all.
    for _ in 0..5 {
        append(&db, 2).await;
    }

    let mut second = start_service(&db, &keys.stream);
    let found = wait_for_entries(&conn, &keys.stream, 31).await;
    assert_eq!(
        ids(&found),
        expected_ids(1..=31),
        "every position exactly once"
    );
    wait_for_stored_checkpoint(&db, &keys.stream, 31).await;

    second.kill().await.expect("stop the second process");
    delete_key(&conn, &keys.stream).await;
}

#[tokio::test]
async fn a_transaction_holding_an_earlier_position_is_still_published_in_order() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let url = shared_redis_url();
    let conn = redis(&url).await;
    let relay = RunningRelay::start(&db, &url, &keys.stream);
    append(&db, 1).await;
    wait_for_entries(&conn, &keys.stream, 1).await;

    // A slow transaction takes position 2 and stays open …
    let slow_stream = order_stream_id(Uuid::new_v4());
    let mut slow = db.pool.begin().await.expect("begin");
    let slow_outcome = store::append::append_within(&mut slow, &[request(&slow_stream, 1)])
        .await
        .expect("append inside the open transaction")
        .remove(0)
        .expect("accepted");
    assert_eq!(slow_outcome.first_position, 2);
    // … while another append waits behind it (seen waiting for the append lock) …
    let later_pool = db.named_pool("later-writer").await;
    let fast_stream = order_stream_id(Uuid::new_v4());
    let waiting = {
        let pool = later_pool.clone();
        let fast_stream = fast_stream.clone();
        tokio::spawn(async move { store::append_batch(&pool, &[request(&fast_stream, 1)]).await })
    };
    wait_until(
        DEADLINE,
        "the second append waits for the append lock",
        || async {
            sqlx::query_scalar::<_, i32>(
                "SELECT 1 FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid \
             WHERE a.datname = current_database() AND a.application_name = 'later-writer' \
               AND l.locktype = 'advisory' AND NOT l.granted",
            )
            .fetch_optional(&db.pool)
            .await
            .expect("look at the later writer's locks")
        },
    )
    .await;
    // … and the relay keeps looking: two of its reads of the log begin after this point, so at
    // least one whole cycle (read, then publish what it found) ran while both appends are open.
    let since: String = sqlx::query_scalar("SELECT clock_timestamp()::text")
        .fetch_one(&db.pool)
        .await
        .expect("the server's time");
    let reads = std::cell::RefCell::new(std::collections::HashSet::new());
    let reads = &reads;
    wait_until(DEADLINE, "the relay reads the log twice more", || {
        let since = since.clone();
        let pool = db.pool.clone();
        async move {
            let started: Option<String> = sqlx::query_scalar(
                "SELECT query_start::text FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                   AND query LIKE '%FROM events WHERE global_position > $1%' \
                   AND query_start > $1::timestamptz",
            )
            .bind(since)
            .fetch_optional(&pool)
            .await
            .expect("look at the relay's queries");
            reads.borrow_mut().extend(started);
            (reads.borrow().len() >= 2).then_some(())
        }
    })
    .await;
    assert_eq!(
        ids(&entries(&conn, &keys.stream).await),
        expected_ids(1..=1)
    );
    assert_eq!(
        relay.status.checkpoint(),
        1,
        "the relay does not move past the open position"
    );

    slow.commit().await.expect("commit the slow transaction");
    let fast_outcome = waiting
        .await
        .expect("append task")
        .expect("append transaction")
        .remove(0)
        .expect("accepted");
    assert_eq!(fast_outcome.first_position, 3);

    let found = wait_for_entries(&conn, &keys.stream, 3).await;
    assert_eq!(ids(&found), expected_ids(1..=3));
    assert_eq!(found[1].field("stream_id"), Some(slow_stream.as_str()));
    assert_eq!(found[2].field("stream_id"), Some(fast_stream.as_str()));

    relay.stop().await;
    later_pool.close().await;
    delete_key(&conn, &keys.stream).await;
}

/// Whether exactly one of the relays leads (it is never two: the assertion is checked on every
/// poll of the waits that use it).
fn single_leader(relays: &[&RunningRelay]) -> Option<usize> {
    let leaders: Vec<usize> = relays
        .iter()
        .enumerate()
        .filter(|(_, relay)| relay.status.is_leader())
        .map(|(index, _)| index)
        .collect();
    assert!(leaders.len() <= 1, "two relays lead at once: {leaders:?}");
    leaders.first().copied()
}

#[tokio::test]
async fn only_one_of_two_relays_publishes_and_the_survivor_takes_over() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let url = shared_redis_url();
    let conn = redis(&url).await;
    let first = RunningRelay::start(&db, &url, &keys.stream);
    let second = RunningRelay::start(&db, &url, &keys.stream);

    let leader = wait_until(DEADLINE, "one relay leads", || async {
        single_leader(&[&first, &second])
    })
    .await;
    for _ in 0..5 {
        append(&db, 2).await;
    }
    wait_until(DEADLINE, "the first ten events are published", || async {
        single_leader(&[&first, &second]);
        (entries(&conn, &keys.stream).await.len() >= 10).then_some(())
    })
    .await;

    let (gone, survivor) = if leader == 0 {
        (first, second)
    } else {
        (second, first)
    };
    assert!(!survivor.status.is_leader());
    gone.stop().await;
    wait_until(DEADLINE, "the survivor takes over", || async {
        survivor.status.is_leader().then_some(())
    })
    .await;
    for _ in 0..5 {
        append(&db, 2).await;
    }
    let found = wait_for_entries(&conn, &keys.stream, 20).await;
    assert_eq!(
        ids(&found),
        expected_ids(1..=20),
        "no position published twice or skipped"
    );
    wait_until(DEADLINE, "the survivor checkpoints the head", || async {
        (survivor.status.checkpoint() == 20).then_some(())
    })
    .await;

    survivor.stop().await;
    delete_key(&conn, &keys.stream).await;
}

#[tokio::test]
async fn a_leader_whose_connection_is_terminated_steps_down_and_publishing_continues() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let url = shared_redis_url();
    let conn = redis(&url).await;
    let first = RunningRelay::start(&db, &url, &keys.stream);
    let second = RunningRelay::start(&db, &url, &keys.stream);
    wait_until(DEADLINE, "one relay leads", || async {
        single_leader(&[&first, &second])
    })
    .await;
    append(&db, 5).await;
    wait_for_entries(&conn, &keys.stream, 5).await;

    // Kill the session that holds the relay lock, as a network failure or an operator would.
    let lock_key = relay::relay_lock_key(&keys.stream);
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(lock_key)
    .fetch_all(&db.pool)
    .await
    .expect("terminate the leader's session");
    assert_eq!(
        terminated,
        vec![true],
        "exactly one session held the relay lock"
    );

    append(&db, 5).await;
    let found = wait_for_entries(&conn, &keys.stream, 10).await;
    assert_eq!(
        ids(&found),
        expected_ids(1..=10),
        "no position published twice or skipped"
    );
    wait_until(
        DEADLINE,
        "a relay leads and has checkpointed the head",
        || async {
            let leader = single_leader(&[&first, &second])?;
            let status = if leader == 0 {
                &first.status
            } else {
                &second.status
            };
            (status.checkpoint() == 10).then_some(())
        },
    )
    .await;

    first.stop().await;
    second.stop().await;
    delete_key(&conn, &keys.stream).await;
}

#[tokio::test]
async fn a_leader_whose_database_stops_answering_steps_down_and_resumes_when_it_answers() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let url = shared_redis_url();
    let conn = redis(&url).await;
    let proxy = SilencingProxy::start(&db).await;
    let pool = proxy.pool(2).await;
    let relay = RunningRelay::start_on(
        pool,
        &url,
        &keys.stream,
        RelayArgs {
            relay_query_timeout_ms: 1_000,
            ..test_args()
        },
    );
    let status = &relay.status;
    wait_until(DEADLINE, "the relay leads", || async {
        status.is_leader().then_some(())
    })
    .await;
    append(&db, 5).await;
    wait_for_entries(&conn, &keys.stream, 5).await;

    // The database goes silent for the relay (appends still reach it directly).
    proxy.set_silent(true);
    append(&db, 5).await;
    wait_until(DEADLINE, "the relay gives up the leadership", || async {
        (!status.is_leader()).then_some(())
    })
    .await;

    proxy.set_silent(false);
    let found = wait_for_entries(&conn, &keys.stream, 10).await;
    assert_eq!(
        ids(&found),
        expected_ids(1..=10),
        "no position published twice or skipped"
    );
    wait_until(DEADLINE, "the relay leads again", || async {
        status.is_leader().then_some(())
    })
    .await;

    relay.stop().await;
    delete_key(&conn, &keys.stream).await;
}

#[tokio::test]
async fn a_restart_resumes_from_the_checkpoint() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let url = shared_redis_url();
    let conn = redis(&url).await;

    let relay = RunningRelay::start(&db, &url, &keys.stream);
    append(&db, 5).await;
    wait_for_entries(&conn, &keys.stream, 5).await;
    wait_until(DEADLINE, "the relay checkpoints position 5", || async {
        (relay.status.checkpoint() == 5).then_some(())
    })
    .await;
    relay.stop().await;
    assert_eq!(stored_checkpoint(&db, &keys.stream).await, Some(5));

    // Redis lost the stream meanwhile: what is republished shows where the relay resumed.
    delete_key(&conn, &keys.stream).await;
    append(&db, 3).await;
    let relay = RunningRelay::start(&db, &url, &keys.stream);
    let found = wait_for_entries(&conn, &keys.stream, 3).await;
    assert_eq!(
        ids(&found),
        expected_ids(6..=8),
        "only the events after the checkpoint"
    );
    wait_for_stored_checkpoint(&db, &keys.stream, 8).await;

    relay.stop().await;
    delete_key(&conn, &keys.stream).await;
}

/// A relay that only a commit or a pending checkpoint can wake (the fallback tick is far
/// beyond the deadline), storing its checkpoint at most every `interval_ms`.
fn checkpoint_interval_args(interval_ms: u64) -> RelayArgs {
    RelayArgs {
        relay_poll_ms: 60_000,
        relay_checkpoint_interval_ms: interval_ms,
        ..test_args()
    }
}

#[tokio::test]
async fn a_pending_checkpoint_is_stored_when_due_without_another_commit() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let url = shared_redis_url();
    let conn = redis(&url).await;
    let relay = RunningRelay::start_with(&db, &url, &keys.stream, checkpoint_interval_args(1000));

    // The first batch of a leadership is stored at once.
    append(&db, 5).await;
    wait_for_entries(&conn, &keys.stream, 5).await;
    wait_for_stored_checkpoint(&db, &keys.stream, 5).await;
    // The next one, within the interval, is published at once and stored when it falls due,
    // although nothing more is committed.
    append(&db, 3).await;
    wait_for_entries(&conn, &keys.stream, 8).await;
    wait_for_stored_checkpoint(&db, &keys.stream, 8).await;

    relay.stop().await;
    delete_key(&conn, &keys.stream).await;
}

#[tokio::test]
async fn a_graceful_stop_stores_the_pending_checkpoint() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let url = shared_redis_url();
    let conn = redis(&url).await;
    // Nothing would be stored for a minute after the first batch but for the stop.
    let relay = RunningRelay::start_with(&db, &url, &keys.stream, checkpoint_interval_args(60_000));
    append(&db, 5).await;
    wait_for_stored_checkpoint(&db, &keys.stream, 5).await;
    append(&db, 3).await;
    wait_for_entries(&conn, &keys.stream, 8).await;
    wait_until(DEADLINE, "the relay has published position 8", || async {
        (relay.status.checkpoint() == 8).then_some(())
    })
    .await;
    assert_eq!(
        stored_checkpoint(&db, &keys.stream).await,
        Some(5),
        "within the interval the stored checkpoint lags"
    );

    relay.stop().await;
    assert_eq!(
        stored_checkpoint(&db, &keys.stream).await,
        Some(8),
        "stopping stores what was published"
    );
    delete_key(&conn, &keys.stream).await;
}

#[tokio::test]
async fn steps_store_the_checkpoint_at_most_once_per_interval() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let conn = redis(&shared_redis_url()).await;
    let mut ctx = step_context(&db, &conn, &keys.stream, 25)
        .await
        .with_checkpoint_interval(Duration::from_secs(60));

    append(&db, 10).await;
    relay::publish_step(&mut ctx).await.expect("step");
    assert_eq!(stored_checkpoint(&db, &keys.stream).await, Some(10));
    for _ in 0..3 {
        append(&db, 10).await;
        relay::publish_step(&mut ctx).await.expect("step");
    }
    assert_eq!(ctx.checkpoint(), 40);
    assert_eq!(
        stored_checkpoint(&db, &keys.stream).await,
        Some(10),
        "not due again for a minute"
    );
    assert!(
        ctx.checkpoint_due_in()
            .is_some_and(|due| due > Duration::ZERO)
    );

    ctx.flush_checkpoint().await.expect("flush");
    assert_eq!(stored_checkpoint(&db, &keys.stream).await, Some(40));
    assert_eq!(ctx.checkpoint_due_in(), None, "nothing pending");

    ctx.close().await;
    delete_key(&conn, &keys.stream).await;
}

#[tokio::test]
async fn a_commit_wakes_the_relay_without_waiting_for_the_fallback_tick() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let url = shared_redis_url();
    let conn = redis(&url).await;
    // A fallback tick far beyond the deadline: only the commit notification can wake the relay.
    let shutdown = CancellationToken::new();
    let (handle, status) = relay::spawn(
        db.pool.clone(),
        bus::client(&url).expect("redis url"),
        keys.stream.clone(),
        RelayArgs {
            relay_poll_ms: 60_000,
            ..test_args()
        },
        shutdown.clone(),
    );
    wait_until(DEADLINE, "the relay leads", || async {
        status.is_leader().then_some(())
    })
    .await;
    for round in 1..=3 {
        append(&db, 2).await;
        let found = wait_for_entries(&conn, &keys.stream, round * 2).await;
        assert_eq!(ids(&found), expected_ids(1..=(round as i64 * 2)));
    }

    shutdown.cancel();
    handle
        .await
        .expect("relay task")
        .expect("relay stops cleanly");
    delete_key(&conn, &keys.stream).await;
}

/// A leader's step context on its own connection (the step does not need the lock to be held).
async fn step_context(
    db: &TestDatabase,
    conn: &ConnectionManager,
    stream_key: &str,
    batch: i64,
) -> relay::RelayContext {
    use sqlx::Connection;
    let pg = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let publisher = bus::Publisher::new(
        conn.clone(),
        bus::StreamKeys::new(stream_key),
        bus::DEFAULT_HARD_CAP,
    );
    relay::RelayContext::resume(
        pg,
        publisher,
        stream_key.to_owned(),
        batch,
        RelayStatus::default(),
    )
    .await
    .expect("resume")
}

#[tokio::test]
async fn one_step_publishes_at_most_one_batch_and_says_when_it_has_caught_up() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let conn = redis(&shared_redis_url()).await;
    for _ in 0..6 {
        append(&db, 10).await;
    }
    let mut ctx = step_context(&db, &conn, &keys.stream, 25).await;

    let mut outcomes = Vec::new();
    for _ in 0..4 {
        outcomes.push(relay::publish_step(&mut ctx).await.expect("step"));
    }
    let summary: Vec<(usize, bool)> = outcomes
        .iter()
        .map(|o| (o.published, o.caught_up))
        .collect();
    assert_eq!(
        summary,
        vec![(25, false), (25, false), (10, true), (0, true)]
    );
    assert!(outcomes.iter().all(|o| o.gap.is_none()));
    assert_eq!(ctx.checkpoint(), 60);
    assert_eq!(stored_checkpoint(&db, &keys.stream).await, Some(60));
    assert_eq!(
        ids(&entries(&conn, &keys.stream).await),
        expected_ids(1..=60)
    );

    ctx.close().await;
    delete_key(&conn, &keys.stream).await;
}

/// Inserts an event row at an explicit position, bypassing the store: the only way to make the
/// gap the store's invariants rule out.
async fn insert_at(db: &TestDatabase, position: i64) {
    sqlx::query(
        "INSERT INTO events (global_position, event_id, stream_id, stream_version, event_type, \
                             schema_version, data) \
         VALUES ($1, $2, $3, 1, 'OrderCreated', 1, '{}')",
    )
    .bind(position)
    .bind(Uuid::new_v4())
    .bind(order_stream_id(Uuid::new_v4()))
    .execute(&db.pool)
    .await
    .expect("insert an event row");
}

#[tokio::test]
async fn the_relay_stops_at_a_gap_and_never_passes_it() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let conn = redis(&shared_redis_url()).await;
    append(&db, 3).await;
    insert_at(&db, 6).await;
    let mut ctx = step_context(&db, &conn, &keys.stream, 25).await;

    let first = relay::publish_step(&mut ctx).await.expect("step");
    assert_eq!(first.published, 3);
    assert!(!first.caught_up);
    assert_eq!(
        first.gap,
        Some(relay::Gap {
            expected: 4,
            found: 6
        })
    );
    let again = relay::publish_step(&mut ctx).await.expect("step");
    assert_eq!(again.published, 0);
    assert_eq!(
        again.gap,
        Some(relay::Gap {
            expected: 4,
            found: 6
        })
    );
    assert_eq!(
        ids(&entries(&conn, &keys.stream).await),
        expected_ids(1..=3)
    );
    assert_eq!(ctx.checkpoint(), 3);

    // Once the missing positions are there, the relay carries on through them.
    insert_at(&db, 4).await;
    insert_at(&db, 5).await;
    let healed = relay::publish_step(&mut ctx).await.expect("step");
    assert_eq!(
        (healed.published, healed.caught_up, healed.gap),
        (3, true, None)
    );
    assert_eq!(
        ids(&entries(&conn, &keys.stream).await),
        expected_ids(1..=6)
    );

    ctx.close().await;
    delete_key(&conn, &keys.stream).await;
}

/// The event ids of the store's events, in position order.
async fn stored_event_ids(db: &TestDatabase) -> Vec<String> {
    sqlx::query_scalar::<_, Uuid>("SELECT event_id FROM events ORDER BY global_position")
        .fetch_all(&db.pool)
        .await
        .expect("read event ids")
        .into_iter()
        .map(|id| id.to_string())
        .collect()
}

fn event_ids(entries: &[StreamEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|entry| entry.field("event_id").unwrap_or_default().to_owned())
        .collect()
}

/// Writes entries `1-0` to `<count>-0` onto `key` as the relay would, each naming a fresh event
/// id that no store has: the stream of another history. Returns those ids.
async fn write_other_history(conn: &ConnectionManager, key: &str, count: usize) -> Vec<String> {
    let mut conn = conn.clone();
    let event_ids: Vec<String> = (0..count).map(|_| Uuid::new_v4().to_string()).collect();
    for (position, event_id) in (1..).zip(&event_ids) {
        let _: String = redis::cmd("XADD")
            .arg(key)
            .arg(format!("{position}-0"))
            .arg("position")
            .arg(position)
            .arg("event_id")
            .arg(event_id)
            .query_async(&mut conn)
            .await
            .expect("XADD");
    }
    event_ids
}

/// The database is restored from a backup taken before the stream's newest events: the stream
/// holds entries for positions the store then gives to other events. Publishing on would leave
/// those events off the stream for good (Redis refuses their ids as already present) and the
/// stream contradicting the store, so the relay holds, also once the store has passed the
/// stream's newest position, and leaves the stream as it is; renamed away (kept for the
/// operator), the stream is rebuilt from the store.
#[tokio::test]
async fn a_stream_from_another_history_gets_nothing_until_it_is_renamed_away() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let conn = redis(&shared_redis_url()).await;
    append(&db, 3).await;
    // The history the backup lost: five events the store does not have.
    let mut redis_conn = conn.clone();
    let lost = write_other_history(&conn, &keys.stream, 5).await;
    let mut ctx = step_context(&db, &conn, &keys.stream, 25).await;

    let held = relay::publish_step(&mut ctx).await.expect("step");
    assert_eq!((held.published, held.diverged), (0, Some(5)));
    append(&db, 3).await;
    let still = relay::publish_step(&mut ctx).await.expect("step");
    assert_eq!(
        (still.published, still.diverged),
        (0, Some(5)),
        "the store passing the stream's newest position does not make it the same history"
    );
    assert_eq!(event_ids(&entries(&conn, &keys.stream).await), lost);

    let kept = format!("{}:before-restore", keys.stream);
    let _: () = redis::cmd("RENAME")
        .arg(&keys.stream)
        .arg(&kept)
        .query_async(&mut redis_conn)
        .await
        .expect("RENAME");
    let resumed = relay::publish_step(&mut ctx).await.expect("step");
    assert_eq!((resumed.published, resumed.diverged), (6, None));
    let published = entries(&conn, &keys.stream).await;
    assert_eq!(ids(&published), expected_ids(1..=6));
    assert_eq!(event_ids(&published), stored_event_ids(&db).await);
    assert_eq!(event_ids(&entries(&conn, &kept).await), lost);

    ctx.close().await;
    delete_key(&conn, &keys.stream).await;
    delete_key(&conn, &kept).await;
}

/// A stream whose newest entry is the store's event at that position is the same history, and
/// the relay carries on after it (a restart, a new leader); an entry added by hand above it
/// (`<position>-1`) does not count as the relay's.
#[tokio::test]
async fn a_stream_of_the_same_history_is_published_on_after_a_restart() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let conn = redis(&shared_redis_url()).await;
    append(&db, 3).await;
    let mut ctx = step_context(&db, &conn, &keys.stream, 25).await;
    assert_eq!(
        relay::publish_step(&mut ctx).await.expect("step").published,
        3
    );
    ctx.close().await;
    let mut redis_conn = conn.clone();
    let _: String = redis::cmd("XADD")
        .arg(&keys.stream)
        .arg("3-1")
        .arg("position")
        .arg("not-a-number")
        .arg("event_id")
        .arg("hand-made")
        .query_async(&mut redis_conn)
        .await
        .expect("XADD");

    append(&db, 2).await;
    let mut ctx = step_context(&db, &conn, &keys.stream, 25).await;
    let step = relay::publish_step(&mut ctx).await.expect("step");
    assert_eq!((step.published, step.diverged), (2, None));
    let on_stream = entries(&conn, &keys.stream).await;
    assert_eq!(
        ids(&on_stream),
        ["1-0", "2-0", "3-0", "3-1", "4-0", "5-0"].map(str::to_owned)
    );

    ctx.close().await;
    delete_key(&conn, &keys.stream).await;
}

/// The stream is replaced under a running leader by one of another history (a Redis restored
/// or failed over from elsewhere). The relay finds out at its next periodic look, publishes
/// nothing onto it, and once the stream is renamed away publishes the store's history, from
/// its stored checkpoint, into a new one.
#[tokio::test]
async fn a_stream_replaced_under_a_running_relay_gets_nothing_of_this_history() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let url = shared_redis_url();
    let conn = redis(&url).await;
    let args = RelayArgs {
        relay_trim_interval_ms: 100,
        relay_checkpoint_interval_ms: 0,
        ..test_args()
    };
    let relay = RunningRelay::start_with(&db, &url, &keys.stream, args);
    append(&db, 3).await;
    wait_for_entries(&conn, &keys.stream, 3).await;
    wait_for_stored_checkpoint(&db, &keys.stream, 3).await;

    // Another history takes the key: positions 1..=6, none of them this store's events.
    delete_key(&conn, &keys.stream).await;
    let mut redis_conn = conn.clone();
    let other = write_other_history(&conn, &keys.stream, 6).await;
    wait_until(DEADLINE, "the relay finds the stream replaced", || async {
        relay.status.stream_diverged().then_some(())
    })
    .await;
    append(&db, 2).await;
    let stored = stored_event_ids(&db).await;
    let kept = format!("{}:other", keys.stream);
    let _: () = redis::cmd("RENAME")
        .arg(&keys.stream)
        .arg(&kept)
        .query_async(&mut redis_conn)
        .await
        .expect("RENAME");
    assert_eq!(event_ids(&entries(&conn, &kept).await), other);

    let published = wait_for_entries(&conn, &keys.stream, 2).await;
    assert_eq!(ids(&published), expected_ids(4..=5));
    assert_eq!(event_ids(&published), stored[3..].to_vec());
    relay.stop().await;
    delete_key(&conn, &keys.stream).await;
    delete_key(&conn, &kept).await;
}

/// Adds an entry the way an operator testing the stream would (`XADD <key> * probe 1`): its id
/// is the current time in milliseconds, far above any position. Returns the id.
async fn add_time_based_entry(conn: &ConnectionManager, key: &str) -> String {
    let mut conn = conn.clone();
    redis::cmd("XADD")
        .arg(key)
        .arg("*")
        .arg("probe")
        .arg("1")
        .query_async(&mut conn)
        .await
        .expect("XADD *")
}

/// An entry added by hand with a time-based id sits above the relay's entries. A new
/// leadership resumes after the newest entry the relay wrote (the store's event at its
/// position), not after the raw top id, which would be a timestamp beyond the log: so neither
/// its checkpoint nor the stored one passes the head, and once the entry is removed (RUNBOOK:
/// RelayLagHigh) the events committed since are published.
#[tokio::test]
async fn a_time_based_entry_on_the_stream_never_moves_a_new_leadership_beyond_the_log() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let conn = redis(&shared_redis_url()).await;
    append(&db, 3).await;
    let mut ctx = step_context(&db, &conn, &keys.stream, 25).await;
    assert_eq!(
        relay::publish_step(&mut ctx).await.expect("step").published,
        3
    );
    ctx.close().await;
    let foreign = add_time_based_entry(&conn, &keys.stream).await;

    let mut ctx = step_context(&db, &conn, &keys.stream, 25).await;
    let step = relay::publish_step(&mut ctx).await.expect("step");
    assert_eq!((step.published, step.diverged), (0, None));
    assert_eq!(
        ctx.checkpoint(),
        3,
        "resumed after the newest relayed entry"
    );
    assert_eq!(stored_checkpoint(&db, &keys.stream).await, Some(3));

    // Removed as the RUNBOOK says: XDEL, then the stream's last id back to the newest relayed
    // entry, since Redis keeps refusing ids up to the deleted one.
    let mut redis_conn = conn.clone();
    let removed: i64 = redis::cmd("XDEL")
        .arg(&keys.stream)
        .arg(&foreign)
        .query_async(&mut redis_conn)
        .await
        .expect("XDEL");
    assert_eq!(removed, 1);
    let _: () = redis::cmd("XSETID")
        .arg(&keys.stream)
        .arg("3-0")
        .query_async(&mut redis_conn)
        .await
        .expect("XSETID");
    append(&db, 2).await;
    let step = relay::publish_step(&mut ctx).await.expect("step");
    assert_eq!((step.published, step.caught_up), (2, true));
    assert_eq!(
        ids(&entries(&conn, &keys.stream).await),
        expected_ids(1..=5)
    );
    assert_eq!(ctx.checkpoint(), 5);
    assert_eq!(stored_checkpoint(&db, &keys.stream).await, Some(5));

    ctx.close().await;
    delete_key(&conn, &keys.stream).await;
}

/// An older release stored a checkpoint beyond the event store's head (it resumed after a
/// time-based entry) and published nothing since. A new leadership forgets that checkpoint,
/// resumes after the stream's newest relayed entry, publishes what was committed meanwhile,
/// and stores a checkpoint within the log again.
#[tokio::test]
async fn a_stored_checkpoint_beyond_the_head_is_forgotten_and_nothing_committed_is_left_off() {
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let conn = redis(&shared_redis_url()).await;
    append(&db, 3).await;
    let mut ctx = step_context(&db, &conn, &keys.stream, 25).await;
    assert_eq!(
        relay::publish_step(&mut ctx).await.expect("step").published,
        3
    );
    ctx.close().await;
    sqlx::query("UPDATE relay_checkpoints SET position = 1712345678901 WHERE stream_key = $1")
        .bind(&keys.stream)
        .execute(&db.pool)
        .await
        .expect("store a checkpoint beyond the head");
    // Committed while that checkpoint held every leadership beyond the log.
    append(&db, 2).await;

    let mut ctx = step_context(&db, &conn, &keys.stream, 25).await;
    let step = relay::publish_step(&mut ctx).await.expect("step");
    assert_eq!((step.published, step.caught_up), (2, true));
    assert_eq!(
        ids(&entries(&conn, &keys.stream).await),
        expected_ids(1..=5)
    );
    assert_eq!(ctx.checkpoint(), 5);
    assert_eq!(stored_checkpoint(&db, &keys.stream).await, Some(5));

    ctx.close().await;
    delete_key(&conn, &keys.stream).await;
}

/// The value of the gauge `name` on a Prometheus text page (its one series), if exported.
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

/// The leader's gauges as this process exports them: lag in events, lag in seconds, leader.
fn relay_gauges(metrics: &metrics_exporter_prometheus::PrometheusHandle) -> [Option<f64>; 3] {
    let page = metrics.render();
    ["relay_lag_events", "relay_lag_seconds", "relay_is_leader"].map(|name| gauge(&page, name))
}

/// A leader behind (Redis is down) loses its lock to another session and stands by. The lag it
/// last saw is no longer its to report: alerts take the maximum over all instances, so a
/// standby still exporting it would keep RelayLagHigh firing after the new leader caught up.
#[tokio::test]
async fn an_instance_that_stops_leading_exports_no_lag_of_its_last_leadership() {
    let metrics = platform::metrics::install("command-service");
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let mut server = PrivateRedis::start().await.expect("private redis starts");
    let relay = RunningRelay::start(&db, &server.url(), &keys.stream);
    append(&db, 2).await;
    wait_for_entries(&redis(&server.url()).await, &keys.stream, 2).await;
    server.stop();
    append(&db, 3).await;
    wait_until(
        DEADLINE,
        "the leader reports the backlog it cannot publish",
        || async {
            match relay_gauges(&metrics) {
                [Some(events), Some(seconds), Some(leader)] => {
                    (events == 3.0 && seconds > 0.0 && leader == 1.0).then_some(())
                }
                _ => None,
            }
        },
    )
    .await;

    // Another session queues for the relay lock, then the leader's session is cut: the queued
    // session gets the lock, and the relay stands by behind it.
    let lock_key = relay::relay_lock_key(&keys.stream);
    let mut holder = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&db.url).await.expect("connect")
    };
    let queued = tokio::spawn(async move {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(lock_key)
            .execute(&mut holder)
            .await
            .expect("take the relay lock");
        holder
    });
    wait_until(
        DEADLINE,
        "another session waits for the relay lock",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
               AND ((classid::bigint << 32) | objid::bigint) = $1",
            )
            .bind(lock_key)
            .fetch_one(&db.pool)
            .await
            .expect("read pg_locks");
            (waiting == 1).then_some(())
        },
    )
    .await;
    let _: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
           AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(lock_key)
    .fetch_all(&db.pool)
    .await
    .expect("terminate the leader's session");
    let holder = queued.await.expect("the queued session gets the lock");

    wait_until(DEADLINE, "the former leader exports no lag", || async {
        (!relay.status.is_leader() && relay_gauges(&metrics) == [Some(0.0), Some(0.0), Some(0.0)])
            .then_some(())
    })
    .await;

    relay.stop().await;
    {
        use sqlx::Connection;
        holder.close().await.expect("release the relay lock");
    }
}

/// A publish whose reply is lost (Redis stalled past the command timeout, the connection
/// dropped) reached Redis all the same; the relay, never told, publishes the batch again. Those
/// entries are its own, so no foreign writer is reported, while an entry added by hand above
/// the positions still is.
#[tokio::test]
async fn a_batch_published_again_after_a_lost_reply_is_not_reported_as_refused() {
    let metrics = platform::metrics::install("command-service");
    let refused = || gauge(&metrics.render(), "relay_refused_entries_total").unwrap_or(0.0);
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let conn = redis(&shared_redis_url()).await;
    append(&db, 3).await;
    let mut ctx = step_context(&db, &conn, &keys.stream, 25).await;
    assert_eq!(
        relay::publish_step(&mut ctx).await.expect("step").published,
        3
    );

    // The first try of the next batch: in Redis, but its reply never reached the relay.
    append(&db, 3).await;
    let batch = store::read_all(&db.pool, 3, 25).await.expect("read");
    let publisher = bus::Publisher::new(
        conn.clone(),
        bus::StreamKeys::new(&keys.stream),
        bus::DEFAULT_HARD_CAP,
    );
    assert_eq!(
        publisher.publish(&batch).await.expect("publish").appended,
        3
    );
    let before = refused();
    let retried = relay::publish_step(&mut ctx).await.expect("step");
    assert_eq!((retried.published, retried.caught_up), (3, true));
    assert_eq!(
        refused(),
        before,
        "the relay's own entries are no foreign writer"
    );
    assert_eq!(ctx.checkpoint(), 6);

    // An entry added by hand still is one.
    let mut redis_conn = conn.clone();
    let _: String = redis::cmd("XADD")
        .arg(&keys.stream)
        .arg("*")
        .arg("probe")
        .arg("1")
        .query_async(&mut redis_conn)
        .await
        .expect("XADD *");
    append(&db, 2).await;
    relay::publish_step(&mut ctx).await.expect("step");
    assert_eq!(refused(), before + 2.0);
    assert_eq!(
        ids(&entries(&conn, &keys.stream).await).len(),
        7,
        "six published entries and the probe"
    );

    ctx.close().await;
    delete_key(&conn, &keys.stream).await;
}

/// Logs of this thread (a current-thread test runtime: the relay's tasks too), the relay's own
/// at debug level and above.
fn capture_logs() -> (
    platform::testing::LogBuffer,
    tracing::subscriber::DefaultGuard,
) {
    platform::testing::LogBuffer::capture("info,command_service=debug")
}

/// While a foreign entry sits above the positions, Redis refuses every later batch: the counter
/// counts every refused entry, and the error is logged once per `REFUSED_LOG_INTERVAL` rather
/// than at every step (many a second under load).
#[tokio::test]
async fn entries_refused_step_after_step_are_all_counted_but_logged_once_an_interval() {
    let (logs, _logging) = capture_logs();
    let metrics = platform::metrics::install("command-service");
    let refused = || gauge(&metrics.render(), "relay_refused_entries_total").unwrap_or(0.0);
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let conn = redis(&shared_redis_url()).await;
    append(&db, 2).await;
    let mut ctx = step_context(&db, &conn, &keys.stream, 25).await;
    assert_eq!(
        relay::publish_step(&mut ctx).await.expect("step").published,
        2
    );
    let mut redis_conn = conn.clone();
    let _: String = redis::cmd("XADD")
        .arg(&keys.stream)
        .arg("*")
        .arg("probe")
        .arg("1")
        .query_async(&mut redis_conn)
        .await
        .expect("XADD *");

    let before = refused();
    for _ in 0..4 {
        append(&db, 2).await;
        relay::publish_step(&mut ctx).await.expect("step");
    }
    assert_eq!(refused(), before + 8.0, "every refused entry is counted");
    assert_eq!(
        logs.lines_containing("Redis refused entries as already present"),
        1,
        "{}",
        logs.text()
    );

    ctx.close().await;
    delete_key(&conn, &keys.stream).await;
}

/// A standby relay whose PostgreSQL does not answer fails at every poll, on every instance: it
/// says so when it starts (and would again a minute later), not at every poll, and says when the
/// server answers again.
#[tokio::test]
async fn a_standby_that_cannot_reach_postgresql_logs_it_once_not_at_every_poll() {
    let (logs, _logging) = capture_logs();
    let db = TestDatabase::new().await;
    let keys = unique_keys();
    let url = shared_redis_url();
    let conn = redis(&url).await;
    let proxy = SilencingProxy::start(&db).await;
    let pool = proxy.pool(1).await;
    proxy.set_silent(true);
    let relay = RunningRelay::start_on(
        pool,
        &url,
        &keys.stream,
        RelayArgs {
            relay_query_timeout_ms: 100,
            relay_standby_poll_ms: 20,
            ..test_args()
        },
    );
    wait_until(DEADLINE, "five polls have failed", || async {
        (logs.lines_containing("relay standby still cannot reach PostgreSQL") >= 4).then_some(())
    })
    .await;
    assert_eq!(
        logs.lines_containing("relay standby cannot reach PostgreSQL"),
        1,
        "{}",
        logs.text()
    );

    proxy.set_silent(false);
    let status = &relay.status;
    wait_until(DEADLINE, "the relay leads", || async {
        status.is_leader().then_some(())
    })
    .await;
    assert_eq!(
        logs.lines_containing("relay standby reaches PostgreSQL again"),
        1,
        "{}",
        logs.text()
    );

    relay.stop().await;
    delete_key(&conn, &keys.stream).await;
}
