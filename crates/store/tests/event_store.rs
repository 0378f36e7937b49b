//! The event store against a real PostgreSQL, one fresh database per test.

use std::str::FromStr;
use std::time::Duration;

use events::{EventMetadata, NewEvent, OrderState, STATE_SCHEMA_VERSION};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Row};
use store::testing::{
    BATCH_STATE_SQL, CACHED_PLAN_SETTINGS, SilencingProxy, TestDatabase, begin_append_transaction,
};
use store::{
    AppendError, AppendRequest, CommitterConfig, ExpectedVersion, GroupCommitter, IdempotencyRecord,
};
use uuid::Uuid;

fn event(kind: &str) -> NewEvent {
    NewEvent {
        event_id: Uuid::new_v4(),
        event_type: kind.to_owned(),
        schema_version: 1,
        data: serde_json::json!({ "kind": kind }),
        metadata: EventMetadata {
            correlation_id: Some("c-1".into()),
            ..Default::default()
        },
    }
}

fn request(stream: &str, expected: ExpectedVersion, count: usize) -> AppendRequest {
    AppendRequest {
        stream_id: stream.to_owned(),
        expected,
        events: (0..count).map(|i| event(&format!("E{i}"))).collect(),
        idempotency: None,
    }
}

async fn append_one(
    db: &TestDatabase,
    request: AppendRequest,
) -> Result<store::AppendOutcome, AppendError> {
    let mut results = store::append_batch(&db.pool, &[request])
        .await
        .expect("transaction commits");
    results.remove(0)
}

#[tokio::test]
async fn of_many_concurrent_appends_at_one_expected_version_exactly_one_wins() {
    let db = TestDatabase::new().await;
    append_one(&db, request("order-a", ExpectedVersion::Exact(0), 1))
        .await
        .expect("first append");
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                let mut results =
                    store::append_batch(&pool, &[request("order-a", ExpectedVersion::Exact(1), 2)])
                        .await
                        .expect("transaction commits");
                results.remove(0)
            })
        })
        .collect();
    let mut wins = 0;
    let mut conflicts = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(outcome) => {
                wins += 1;
                assert_eq!(outcome.stream_version, 3);
            }
            Err(AppendError::Conflict {
                expected: 1,
                actual: 3,
                ..
            }) => conflicts += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((wins, conflicts), (1, 23));
    assert_eq!(
        store::stream_version(&db.pool, "order-a")
            .await
            .expect("version"),
        3
    );
}

/// An append reads the store's state with a plan cached on its connection, although the
/// connection plans every other statement per execution (as the services' do). A cached plan
/// stays whatever the store grows to, so the one made at any size, empty, a few events or a few
/// hundred (where a sequential scan of `events` looks cheapest), must probe indexes only.
#[tokio::test]
async fn the_append_read_is_planned_once_per_connection_and_only_probes_indexes() {
    let db = TestDatabase::new().await;
    let mut appended = 0;
    for size in [0, 20, 300] {
        while appended < size {
            let stream = format!("order-{appended}");
            append_one(&db, request(&stream, ExpectedVersion::Exact(0), 5))
                .await
                .expect("append accepted");
            appended += 5;
        }
        let plan = cached_read_plan(&db).await;
        assert!(
            plan.iter().all(|line| !line.contains("Seq Scan")),
            "the plan cached at {size} events scans a table: {plan:#?}"
        );
        assert!(
            plan.iter().any(|line| line.contains("events_event_id_key")),
            "expected the event id probe in {plan:#?}"
        );
    }

    let options = PgConnectOptions::from_str(&db.url)
        .expect("url parses")
        .options([("plan_cache_mode", "force_custom_plan")]);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("connect a pool");
    for n in 0..8 {
        let stream = format!("order-new-{n}");
        let mut results =
            store::append_batch(&pool, &[request(&stream, ExpectedVersion::Exact(0), 2)])
                .await
                .expect("transaction commits");
        results.remove(0).expect("append accepted");
    }
    let plans: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements \
         WHERE statement LIKE '%''head'' AS kind%'",
    )
    .fetch_all(&pool)
    .await
    .expect("read pg_prepared_statements");
    let counts: Vec<(i64, i64)> = plans.iter().map(|(_, g, c)| (*g, *c)).collect();
    assert_eq!(counts, vec![(8, 0)], "(generic, custom) plans of the read");
}

#[tokio::test]
async fn an_append_commits_only_after_its_wal_is_flushed_as_the_server_says() {
    // Guarantee 1 (an acknowledged command is durable) rests on the append's commit waiting for
    // the WAL flush. The append transaction changes planner settings for itself; it must never
    // lower `synchronous_commit` below the server's setting (`off` would acknowledge commits
    // that a server crash then loses).
    let db = TestDatabase::new().await;
    let mut tx = begin_append_transaction(&db.pool)
        .await
        .expect("begin an append transaction");
    let (in_append, server, plan_cache_mode, holds_lock): (String, String, String, bool) =
        sqlx::query_as(
            "SELECT current_setting('synchronous_commit'), \
                    (SELECT reset_val FROM pg_settings WHERE name = 'synchronous_commit'), \
                    current_setting('plan_cache_mode'), \
                    EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() \
                            AND locktype = 'advisory' AND mode = 'ExclusiveLock')",
        )
        .fetch_one(&mut *tx)
        .await
        .expect("read the transaction's settings");
    tx.rollback().await.expect("roll back");
    // The transaction inspected is the appends' own: it holds the lock and the plan setting.
    assert!(holds_lock, "the append transaction holds the append lock");
    assert_eq!(plan_cache_mode, "force_generic_plan");
    assert_eq!(in_append, server, "synchronous_commit inside an append");
    assert_ne!(
        in_append, "off",
        "the server itself must flush commits for guarantee 1"
    );
}

/// The plan an append transaction would cache for its read on a new connection, now.
async fn cached_read_plan(db: &TestDatabase) -> Vec<String> {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let plan = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; {CACHED_PLAN_SETTINGS}; \
         PREPARE batch_state(text[], uuid[], text[]) AS {BATCH_STATE_SQL}; \
         EXPLAIN EXECUTE batch_state('{{order-1}}', \
                                     '{{11111111-1111-1111-1111-111111111111}}', '{{}}'); \
         ROLLBACK"
    )))
    .fetch_all(&mut conn)
    .await
    .expect("explain the read")
    .iter()
    .map(|row| row.get(0))
    .collect();
    conn.close().await.expect("close");
    plan
}

#[tokio::test]
async fn the_group_committer_appends_concurrent_requests_with_dense_positions() {
    let db = TestDatabase::new().await;
    let committer = GroupCommitter::spawn(db.pool.clone(), CommitterConfig::default());
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let committer = committer.clone();
            tokio::spawn(async move {
                committer
                    .append(request(
                        &format!("order-{}", i % 50),
                        ExpectedVersion::Any,
                        2,
                    ))
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("append succeeds");
    }
    let all = store::read_all(&db.pool, 0, 10_000).await.expect("read");
    assert_eq!(all.len(), 400);
    for (index, event) in all.iter().enumerate() {
        assert_eq!(
            event.global_position,
            index as i64 + 1,
            "positions are dense and ordered"
        );
    }
    for stream in 0..50 {
        let events = store::read_stream(&db.pool, &format!("order-{stream}"), 0, 100)
            .await
            .expect("read");
        let versions: Vec<i64> = events.iter().map(|e| e.stream_version).collect();
        assert_eq!(versions, (1..=8).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn an_append_chained_on_a_failed_one_fails_instead_of_landing_out_of_order() {
    let db = TestDatabase::new().await;
    append_one(&db, request("order-c", ExpectedVersion::Exact(0), 1))
        .await
        .expect("seed");
    let committer = GroupCommitter::spawn(db.pool.clone(), CommitterConfig::default());
    // The first is decided on a stale version and fails; the second was chained on the first.
    let first = committer
        .submit(request("order-c", ExpectedVersion::Exact(0), 1))
        .await;
    let second = committer
        // Chained on the first, which would have taken the stream from 1 to 2.
        .submit(request("order-c", ExpectedVersion::Exact(2), 1))
        .await;
    assert!(matches!(
        first.await.expect("answer"),
        Err(AppendError::Conflict { .. })
    ));
    assert!(matches!(
        second.await.expect("answer"),
        Err(AppendError::Conflict { .. })
    ));
    assert_eq!(
        store::stream_version(&db.pool, "order-c")
            .await
            .expect("version"),
        1
    );
}

/// A version counts events; it does not say which. The first append is decided on version 1
/// and loses to another writer's event, which also takes the stream to 2; the second, chained
/// on the first, names the first's event as the stream's last and is refused, instead of
/// landing on a state it was never decided on.
#[tokio::test]
async fn an_append_chained_on_a_failed_one_is_refused_when_another_brought_the_stream_to_its_version()
 {
    let db = TestDatabase::new().await;
    let seed = request("order-h", ExpectedVersion::Exact(0), 1);
    let seed_id = seed.events[0].event_id;
    append_one(&db, seed).await.expect("seed");
    let head_after_seed = ExpectedVersion::Head {
        version: 1,
        last_event_id: seed_id,
    };
    let other_writer = request("order-h", ExpectedVersion::Exact(1), 1);
    let first = request("order-h", head_after_seed, 1);
    let chained = request(
        "order-h",
        ExpectedVersion::Head {
            version: 2,
            last_event_id: first.events[0].event_id,
        },
        1,
    );
    let results = store::append_batch(&db.pool, &[other_writer.clone(), first, chained])
        .await
        .expect("transaction commits");
    assert!(results[0].is_ok(), "{results:?}");
    for refused in &results[1..] {
        assert!(
            matches!(refused, Err(AppendError::Conflict { .. })),
            "{results:?}"
        );
    }
    // Across batches too, and naming the stream's real last event is accepted.
    let chained_later = request(
        "order-h",
        ExpectedVersion::Head {
            version: 2,
            last_event_id: Uuid::new_v4(),
        },
        1,
    );
    assert!(matches!(
        append_one(&db, chained_later).await,
        Err(AppendError::Conflict {
            expected: 2,
            actual: 2,
            ..
        })
    ));
    let on_the_real_head = request(
        "order-h",
        ExpectedVersion::Head {
            version: 2,
            last_event_id: other_writer.events[0].event_id,
        },
        1,
    );
    let outcome = append_one(&db, on_the_real_head).await.expect("accepted");
    assert_eq!(outcome.stream_version, 3);
}

/// Takes the append lock on a transaction of the test's own, then has `committer` append a
/// first request and waits until that append waits on the lock: the requests submitted next
/// queue behind it and share the next group commit, whatever runtime runs the committer.
/// Returns the holding transaction (roll it back to release the lock) and the first append.
async fn first_append_waiting_on_the_lock(
    db: &TestDatabase,
    committer: &GroupCommitter,
) -> (
    sqlx::Transaction<'static, sqlx::Postgres>,
    store::committer::PendingAppend,
) {
    let mut holder = db.pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(store::append::APPEND_LOCK_KEY)
        .execute(&mut *holder)
        .await
        .expect("take the append lock");
    let first = committer
        .submit(request("order-first", ExpectedVersion::Exact(0), 1))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&db.pool)
    .await
    .expect("read the locks")
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first append never waited on the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (holder, first)
}

/// PostgreSQL's jsonb cannot hold U+0000. A request carrying it fails its group commit; the
/// committer then appends the batch's requests one by one, so only that request fails.
#[tokio::test]
async fn a_request_whose_data_the_server_refuses_fails_alone_not_its_whole_group_commit() {
    let db = TestDatabase::new().await;
    let committer = GroupCommitter::spawn(db.pool.clone(), CommitterConfig::default());
    let (holder, first) = first_append_waiting_on_the_lock(&db, &committer).await;
    let mut refused = request("order-nul", ExpectedVersion::Exact(0), 1);
    refused.events[0].data = serde_json::json!({ "reason": "x\u{0}y" });
    let mut pending = Vec::new();
    for request in [
        request("order-before", ExpectedVersion::Exact(0), 1),
        refused,
        request("order-after", ExpectedVersion::Exact(0), 2),
    ] {
        pending.push(committer.submit(request).await);
    }
    holder.rollback().await.expect("release the append lock");
    assert!(first.await.expect("answered").is_ok());
    let mut outcomes = Vec::new();
    for answer in pending {
        outcomes.push(answer.await.expect("answered"));
    }
    assert!(outcomes[0].is_ok(), "{outcomes:?}");
    assert!(
        matches!(&outcomes[1], Err(AppendError::Database(_))),
        "{outcomes:?}"
    );
    assert!(outcomes[2].is_ok(), "{outcomes:?}");
    for (stream, version) in [("order-before", 1), ("order-nul", 0), ("order-after", 2)] {
        assert_eq!(
            store::stream_version(&db.pool, stream)
                .await
                .expect("version"),
            version,
            "{stream}"
        );
    }
}

/// The batch's appends one by one share one deadline, as the batch did: when the first of
/// them hangs (a server gone silent, a lock never released) past it, the others are answered
/// at once, untried, instead of each waiting its full timeout in turn while every append
/// queued behind the batch waits too.
#[tokio::test]
async fn a_refused_batch_appended_one_by_one_gives_up_on_the_rest_once_its_deadline_passes() {
    let db = TestDatabase::new().await;
    // An append to a `order-slow…` stream counts its try in a sequence (which a rollback does
    // not undo) and then hangs past the committer's deadline.
    sqlx::raw_sql(
        "CREATE SEQUENCE slow_tries; \
         CREATE FUNCTION hang_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           PERFORM nextval('slow_tries'); PERFORM pg_sleep(5); RETURN NEW; END $$; \
         CREATE TRIGGER hang_slow BEFORE INSERT ON events FOR EACH ROW \
           WHEN (NEW.stream_id LIKE 'order-slow%') EXECUTE FUNCTION hang_slow();",
    )
    .execute(&db.pool)
    .await
    .expect("create the hanging trigger");
    let committer = GroupCommitter::spawn(
        db.pool.clone(),
        CommitterConfig {
            transaction_timeout: Duration::from_secs(1),
            ..CommitterConfig::default()
        },
    );
    let (holder, first) = first_append_waiting_on_the_lock(&db, &committer).await;
    // The refused request first: its data fails the group commit before any row is inserted
    // (PostgreSQL refuses the `jsonb[]` parameter while binding it).
    let mut refused = request("order-nul", ExpectedVersion::Exact(0), 1);
    refused.events[0].data = serde_json::json!({ "reason": "x\u{0}y" });
    let mut pending = vec![committer.submit(refused).await];
    for i in 0..3 {
        let slow = request(&format!("order-slow-{i}"), ExpectedVersion::Exact(0), 1);
        pending.push(committer.submit(slow).await);
    }
    holder.rollback().await.expect("release the append lock");
    assert!(first.await.expect("answered").is_ok());
    let mut outcomes = Vec::new();
    for answer in pending {
        outcomes.push(answer.await.expect("answered"));
    }

    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Err(AppendError::Database(_)))),
        "{outcomes:?}"
    );
    let tried = format!("{:?}", outcomes[1]);
    assert!(tried.contains("did not finish"), "{tried}");
    let tries: i64 =
        sqlx::query_scalar("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM slow_tries")
            .fetch_one(&db.pool)
            .await
            .expect("read the tries");
    assert_eq!(
        tries, 1,
        "only the first slow append was tried: {outcomes:?}"
    );
    for untried in &outcomes[2..] {
        let untried = format!("{untried:?}");
        assert!(untried.contains("did not begin"), "{untried}");
    }
}

#[tokio::test]
async fn appending_the_same_event_ids_again_is_answered_as_a_duplicate() {
    let db = TestDatabase::new().await;
    let original = request("order-d", ExpectedVersion::Exact(0), 2);
    let first = append_one(&db, original.clone()).await.expect("first");
    // A retry of the same append (say, after a lost response) with a now-stale expected version.
    let again = append_one(&db, original.clone())
        .await
        .expect("retry is recognised");
    assert!(again.duplicate);
    assert_eq!(
        (
            again.first_position,
            again.last_position,
            again.stream_version
        ),
        (first.first_position, first.last_position, 2)
    );
    assert_eq!(
        store::read_all(&db.pool, 0, 100).await.expect("read").len(),
        2
    );

    let mut mixed = request("order-d", ExpectedVersion::Any, 1);
    mixed.events.push(original.events[0].clone());
    assert!(matches!(
        append_one(&db, mixed).await,
        Err(AppendError::EventIdReused)
    ));
}

#[tokio::test]
async fn reads_return_events_in_stream_and_global_order() {
    let db = TestDatabase::new().await;
    for round in 0..3 {
        for stream in ["order-x", "order-y"] {
            append_one(&db, request(stream, ExpectedVersion::Exact(round * 2), 2))
                .await
                .expect("append");
        }
    }
    let all = store::read_all(&db.pool, 0, 100).await.expect("read all");
    assert_eq!(
        all.iter().map(|e| e.global_position).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    let page = store::read_all(&db.pool, 5, 3).await.expect("page");
    assert_eq!(
        page.iter().map(|e| e.global_position).collect::<Vec<_>>(),
        vec![6, 7, 8]
    );
    let y = store::read_stream(&db.pool, "order-y", 2, 100)
        .await
        .expect("stream");
    assert_eq!(
        y.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        vec![3, 4, 5, 6]
    );
    assert!(y.iter().all(|e| e.stream_id == "order-y"));
    assert_eq!(y[0].metadata.correlation_id.as_deref(), Some("c-1"));
    assert!(
        all.windows(2)
            .all(|pair| pair[0].recorded_at <= pair[1].recorded_at)
    );
    assert_eq!(store::head_position(&db.pool).await.expect("head"), 12);
}

/// Polls `check` every 20 ms until it gives `Some`; fails the test naming `what` after 20 s.
async fn wait_for<T, Fut>(what: &str, mut check: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// How a gap could arise: a position taken by one transaction while an earlier one is still
/// uncommitted, committed first, and read by a tailing reader that then resumes past the
/// earlier position and never sees it. In this store no gap can arise: an append takes the
/// head it sees committed plus one, under the append lock, so a later position cannot even be
/// assigned while an earlier one is uncommitted. The lock is what makes a writer arriving then
/// wait for the open append rather than take the same head and collide with it on the position.
///
/// So the test holds position 2 open, waits until the next writer is seen waiting for the
/// append lock (not merely not finished yet), checks that a reader sees nothing after position
/// 1 meanwhile, and that once position 2 commits the writer lands on 3 and the reader gets both,
/// in order. Without the append lock the writer waits on position 2's row instead, and fails
/// once it commits.
#[tokio::test]
async fn a_reader_does_not_skip_an_earlier_transaction_that_commits_late() {
    let db = TestDatabase::new().await;
    append_one(&db, request("order-seed", ExpectedVersion::Any, 1))
        .await
        .expect("seed");

    // A slow transaction takes position 2 and holds it open.
    let mut slow = db.pool.begin().await.expect("begin");
    let slow_result =
        store::append::append_within(&mut slow, &[request("order-slow", ExpectedVersion::Any, 1)])
            .await
            .expect("slow append runs");
    assert_eq!(slow_result[0].as_ref().expect("accepted").first_position, 2);

    // A later writer starts while it is open, on a connection the server can name.
    let later_pool = db.named_pool("later-writer").await;
    let later = tokio::spawn({
        let pool = later_pool.clone();
        async move {
            let mut results =
                store::append_batch(&pool, &[request("order-later", ExpectedVersion::Any, 1)])
                    .await
                    .expect("the later append commits");
            results.remove(0).expect("accepted")
        }
    });
    let awaited_lock: i64 = wait_for("the later writer waits for a lock", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT CASE WHEN l.locktype = 'advisory' \
                         THEN (l.classid::bigint << 32) | l.objid::bigint ELSE -1 END \
             FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted \
             WHERE a.datname = current_database() AND a.application_name = 'later-writer'",
        )
        .fetch_optional(&db.pool)
        .await
        .expect("look at the later writer's locks")
    })
    .await;
    assert_eq!(
        awaited_lock,
        store::append::APPEND_LOCK_KEY,
        "the later writer waits for the append lock (-1: for another kind of lock)"
    );

    // While it waits, nothing past position 1 is visible, by any of the ways readers look.
    let seen = store::read_all(&db.pool, 1, 100).await.expect("read");
    assert!(
        seen.is_empty(),
        "nothing after position 1 is visible while position 2 is in flight: {seen:?}"
    );
    assert_eq!(store::head_position(&db.pool).await.expect("head"), 1);
    assert_eq!(
        store::last_position_within(&db.pool, 1, 100)
            .await
            .expect("last position"),
        None
    );

    slow.commit().await.expect("slow commits");
    let later_outcome = later.await.expect("task");
    assert_eq!(later_outcome.first_position, 3);
    let tail = store::read_all(&db.pool, 1, 100).await.expect("read");
    let placed: Vec<(i64, &str)> = tail
        .iter()
        .map(|e| (e.global_position, e.stream_id.as_str()))
        .collect();
    assert_eq!(placed, vec![(2, "order-slow"), (3, "order-later")]);
    later_pool.close().await;
}

#[tokio::test]
async fn a_rolled_back_append_leaves_no_gap_in_positions() {
    let db = TestDatabase::new().await;
    let mut doomed = db.pool.begin().await.expect("begin");
    let appended = store::append::append_within(
        &mut doomed,
        &[request("order-doomed", ExpectedVersion::Any, 3)],
    )
    .await
    .expect("runs")
    .remove(0)
    .expect("appended");
    assert_eq!(
        (appended.first_position, appended.last_position),
        (1, 3),
        "it took positions before it was rolled back"
    );
    doomed.rollback().await.expect("rollback");
    let outcome = append_one(&db, request("order-next", ExpectedVersion::Any, 1))
        .await
        .expect("append");
    assert_eq!(outcome.first_position, 1);
}

#[tokio::test]
async fn idempotency_records_are_stored_with_the_appended_version_and_position() {
    let db = TestDatabase::new().await;
    let record = IdempotencyRecord {
        key: "key-1".into(),
        request_hash: vec![1, 2, 3],
        response_status: 201,
        response_body: serde_json::json!({ "order_id": "o" }),
    };
    let mut with_key = request("order-k", ExpectedVersion::Exact(0), 2);
    with_key.idempotency = Some(record.clone());
    let outcome = append_one(&db, with_key).await.expect("append");
    let stored = store::idempotency::find(&db.pool, "key-1")
        .await
        .expect("query")
        .expect("stored");
    assert_eq!(stored.status, 201);
    assert_eq!(stored.request_hash, vec![1, 2, 3]);
    assert_eq!(
        stored.body,
        serde_json::json!({ "order_id": "o", "version": 2, "position": outcome.last_position })
    );

    let mut reuse = request("order-other", ExpectedVersion::Any, 1);
    reuse.idempotency = Some(record);
    assert!(
        matches!(append_one(&db, reuse).await, Err(AppendError::IdempotencyKeyTaken(key)) if key == "key-1")
    );
    assert_eq!(
        store::stream_version(&db.pool, "order-other")
            .await
            .expect("version"),
        0
    );
}

fn refusal(key: &str, detail: &str) -> IdempotencyRecord {
    IdempotencyRecord {
        key: key.into(),
        request_hash: vec![9],
        response_status: 422,
        response_body: serde_json::json!({ "code": "rule_violated", "detail": detail }),
    }
}

async fn record_first_answer(
    db: &TestDatabase,
    record: &IdempotencyRecord,
) -> Option<store::idempotency::StoredResponse> {
    store::idempotency::record_first_answer(
        &db.pool,
        record,
        store::DEFAULT_TRANSACTION_TIMEOUT,
        std::future::pending(),
    )
    .await
    .expect("recorded or found")
}

#[tokio::test]
async fn a_refusal_becomes_a_keys_first_answer_only_when_the_key_has_none() {
    let db = TestDatabase::new().await;
    let first = refusal("key-r", "first");
    assert_eq!(record_first_answer(&db, &first).await, None);
    // A second refusal under the key finds the first, as stored.
    let found = record_first_answer(&db, &refusal("key-r", "second"))
        .await
        .expect("the first answer");
    assert_eq!(
        (found.status, found.request_hash, found.body),
        (422, vec![9], first.response_body.clone())
    );
    // An append with the key finds it taken and writes nothing.
    let mut with_key = request("order-r", ExpectedVersion::Any, 1);
    with_key.idempotency = Some(first);
    assert!(matches!(
        append_one(&db, with_key).await,
        Err(AppendError::IdempotencyKeyTaken(key)) if key == "key-r"
    ));
    assert_eq!(
        store::stream_version(&db.pool, "order-r")
            .await
            .expect("version"),
        0
    );
}

/// An append reads its keys under the append lock and inserts them when it commits: a refusal
/// recorded in between would fail the whole group commit on the key's unique index. Recording
/// takes the same lock, so it waits, then finds the append's answer.
#[tokio::test]
async fn a_refusal_recorded_while_an_append_holds_the_lock_waits_and_finds_the_appends_answer() {
    let db = TestDatabase::new().await;
    let mut append = begin_append_transaction(&db.pool).await.expect("begin");
    let recording = tokio::spawn({
        let pool = db.pool.clone();
        async move {
            store::idempotency::record_first_answer(
                &pool,
                &refusal("key-l", "refused"),
                store::DEFAULT_TRANSACTION_TIMEOUT,
                std::future::pending(),
            )
            .await
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
             WHERE d.datname = current_database() AND l.locktype = 'advisory' AND NOT l.granted",
        )
        .fetch_one(&db.pool)
        .await
        .expect("query");
        if waiting == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the recording never waited for the append lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut with_key = request("order-l", ExpectedVersion::Exact(0), 1);
    with_key.idempotency = Some(IdempotencyRecord {
        response_status: 201,
        response_body: serde_json::json!({ "order_id": "o" }),
        ..refusal("key-l", "")
    });
    let outcome = store::append::append_within(&mut append, &[with_key])
        .await
        .expect("runs")
        .remove(0)
        .expect("appended");
    append.commit().await.expect("commits");

    let found = recording
        .await
        .expect("task")
        .expect("recorded or found")
        .expect("the append's answer");
    assert_eq!(found.status, 201);
    assert_eq!(
        found.body,
        serde_json::json!({ "order_id": "o", "version": 1, "position": outcome.last_position })
    );
}

#[tokio::test]
async fn the_events_table_refuses_updates_and_deletes() {
    let db = TestDatabase::new().await;
    append_one(&db, request("order-i", ExpectedVersion::Any, 1))
        .await
        .expect("append");
    assert!(
        sqlx::query("UPDATE events SET event_type = 'X'")
            .execute(&db.pool)
            .await
            .is_err()
    );
    assert!(
        sqlx::query("DELETE FROM events")
            .execute(&db.pool)
            .await
            .is_err()
    );
    assert!(
        sqlx::query("TRUNCATE events")
            .execute(&db.pool)
            .await
            .is_err()
    );
    assert_eq!(
        store::read_all(&db.pool, 0, 10).await.expect("read")[0].event_type,
        "E0"
    );
}

mod snapshots {
    use super::*;
    use events::{OrderCommand, decide, evolve, order_stream_id};

    pub(super) async fn order_with_items(db: &TestDatabase, items: usize) -> Uuid {
        let order_id = Uuid::new_v4();
        let mut state = OrderState::default();
        let mut commands = vec![OrderCommand::CreateOrder {
            order_id,
            customer_id: Uuid::new_v4(),
            currency: "EUR".into(),
        }];
        commands.extend((0..items).map(|i| OrderCommand::AddItem {
            sku: format!("SKU-{i}"),
            quantity: 1,
            unit_price: 100,
        }));
        for command in commands {
            let decided = decide(&state, &command).expect("valid command");
            let request = AppendRequest {
                stream_id: order_stream_id(order_id),
                expected: ExpectedVersion::Exact(state.version),
                events: decided
                    .iter()
                    .map(|e| e.to_new_event(EventMetadata::default()))
                    .collect(),
                idempotency: None,
            };
            append_one(db, request).await.expect("append");
            state = decided.iter().fold(state, evolve);
        }
        order_id
    }

    #[tokio::test]
    async fn loading_uses_the_latest_snapshot_and_only_the_events_after_it() {
        let db = TestDatabase::new().await;
        let order_id = order_with_items(&db, 30).await;
        let full = store::load_order(&db.pool, order_id).await.expect("load");
        assert_eq!(
            (
                full.snapshot_version,
                full.events_replayed,
                full.state.version
            ),
            (None, 31, 31)
        );

        // Snapshot at version 21 (order plus 20 items).
        let events = store::read_stream(&db.pool, &order_stream_id(order_id), 0, 21)
            .await
            .expect("read");
        let at_21 = events
            .iter()
            .map(|e| events::decode_recorded(e).expect("decodes"))
            .fold(OrderState::default(), |s, e| evolve(s, &e));
        store::save_snapshot(
            &db.pool,
            &order_stream_id(order_id),
            21,
            STATE_SCHEMA_VERSION,
            &at_21,
        )
        .await
        .expect("save");

        let loaded = store::load_order(&db.pool, order_id).await.expect("load");
        assert_eq!(loaded.snapshot_version, Some(21));
        assert_eq!(loaded.events_replayed, 10);
        assert_eq!(
            loaded.state, full.state,
            "snapshot plus tail equals the full fold"
        );
        let all = store::read_stream(&db.pool, &order_stream_id(order_id), 0, 100)
            .await
            .expect("read");
        let id_at = |version: i64| all[usize::try_from(version - 1).expect("a version")].event_id;
        // The load names the state's last event, what an append decided on it expects.
        assert_eq!(full.last_event_id, Some(id_at(31)));
        assert_eq!(loaded.last_event_id, Some(id_at(31)));

        // A snapshot at the head: nothing to replay, and the last event is still named.
        let at_31 = full.state.clone();
        store::save_snapshot(
            &db.pool,
            &order_stream_id(order_id),
            31,
            STATE_SCHEMA_VERSION,
            &at_31,
        )
        .await
        .expect("save");
        let at_head = store::load_order(&db.pool, order_id).await.expect("load");
        assert_eq!(
            (at_head.snapshot_version, at_head.events_replayed),
            (Some(31), 0)
        );
        assert_eq!(at_head.state, full.state);
        assert_eq!(at_head.last_event_id, Some(id_at(31)));
    }

    #[tokio::test]
    async fn a_snapshot_of_another_state_schema_is_ignored_not_misread() {
        let db = TestDatabase::new().await;
        let order_id = order_with_items(&db, 3).await;
        let stream = order_stream_id(order_id);
        // A snapshot written by a build whose state had another shape and schema version.
        sqlx::query("INSERT INTO snapshots (stream_id, stream_version, state_schema_version, state) VALUES ($1, 4, $2, $3)")
            .bind(&stream)
            .bind(STATE_SCHEMA_VERSION + 1)
            .bind(serde_json::json!({ "totally": "different" }))
            .execute(&db.pool)
            .await
            .expect("insert");
        let loaded = store::load_order(&db.pool, order_id).await.expect("load");
        assert_eq!((loaded.snapshot_version, loaded.events_replayed), (None, 4));
        assert_eq!(loaded.state.order.expect("order").items.len(), 3);

        // Same schema number but undecodable content is ignored as well.
        sqlx::query("UPDATE snapshots SET state_schema_version = $1")
            .bind(STATE_SCHEMA_VERSION)
            .execute(&db.pool)
            .await
            .expect("update");
        let loaded = store::load_order(&db.pool, order_id).await.expect("load");
        assert_eq!((loaded.snapshot_version, loaded.events_replayed), (None, 4));
    }
}

/// Requires `committer` to append to the new stream `stream` within `deadline`: it carries on.
async fn appends_again(committer: &GroupCommitter, stream: &str, deadline: std::time::Duration) {
    tokio::time::timeout(
        deadline,
        committer.append(request(stream, ExpectedVersion::Exact(0), 1)),
    )
    .await
    .expect("the committer still waits")
    .expect("an append once the server answers again");
}

#[tokio::test]
async fn a_commit_the_database_never_answers_fails_in_time_and_the_committer_carries_on() {
    let db = TestDatabase::new().await;
    let proxy = SilencingProxy::start(&db).await;
    let committer = GroupCommitter::spawn(
        proxy.pool(1).await,
        CommitterConfig {
            transaction_timeout: std::time::Duration::from_secs(1),
            ..CommitterConfig::default()
        },
    );
    let deadline = std::time::Duration::from_secs(30);
    committer
        .append(request("order-a", ExpectedVersion::Exact(0), 1))
        .await
        .expect("an append through the proxy");

    // The server goes silent, as when its host dies: the commit in flight must give up, not
    // hold the committer (and every command queued behind it) for as long as TCP retries.
    proxy.set_silent(true);
    let stalled = tokio::time::timeout(
        deadline,
        committer.append(request("order-b", ExpectedVersion::Exact(0), 1)),
    )
    .await
    .expect("the commit waited on the silent server past its deadline");
    assert!(
        matches!(stalled, Err(AppendError::Database(_))),
        "expected a database failure, got {stalled:?}"
    );
    proxy.set_silent(false);
    appends_again(&committer, "order-c", deadline).await;
}

/// The database known to be unreachable (the services' gate has shut) while a batch waits for
/// a connection (the server silent, say): the batch fails at once, with nothing written,
/// instead of waiting out its minute; the committer carries on once the server is back.
#[tokio::test]
async fn a_batch_waiting_for_a_connection_fails_at_once_when_the_database_is_known_unreachable() {
    let db = TestDatabase::new().await;
    let proxy = SilencingProxy::start(&db).await;
    let (unreachable, state) = tokio::sync::watch::channel(false);
    let committer = GroupCommitter::spawn_with_reachability(
        proxy.pool(1).await,
        CommitterConfig {
            transaction_timeout: std::time::Duration::from_secs(60),
            ..CommitterConfig::default()
        },
        state,
    );
    let deadline = std::time::Duration::from_secs(20);
    committer
        .append(request("order-a", ExpectedVersion::Exact(0), 1))
        .await
        .expect("an append through the proxy");

    proxy.set_silent(true);
    let waiting = committer
        .submit(request("order-b", ExpectedVersion::Exact(0), 1))
        .await;
    unreachable.send_replace(true);
    let failed = tokio::time::timeout(deadline, waiting)
        .await
        .expect("the batch still waits for a connection")
        .expect("an answer");
    match failed {
        Err(AppendError::Database(e)) => assert!(is_refused_connection(&e), "{e}"),
        other => panic!("expected the database unreachable, got {other:?}"),
    }

    proxy.set_silent(false);
    unreachable.send_replace(false);
    appends_again(&committer, "order-c", deadline).await;
    assert_eq!(
        store::stream_version(&db.pool, "order-b")
            .await
            .expect("read the version"),
        0,
        "nothing of the failed batch was written"
    );
}

/// The error of a batch given up before its transaction began.
fn is_refused_connection(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[tokio::test]
async fn the_migrations_register_every_event_type_this_release_writes_and_nothing_else() {
    let db = TestDatabase::new().await;
    let mut registered: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM event_types ORDER BY event_type")
            .fetch_all(&db.pool)
            .await
            .expect("read the registry");
    registered.sort();
    let mut written: Vec<String> = events::codec::EVENT_TYPES
        .iter()
        .map(|t| (*t).to_owned())
        .collect();
    written.sort();
    // A release that adds an event type must add it to `event_types` in a migration, or the
    // release before it refuses filters naming the new type during the rollout.
    assert_eq!(registered, written);
}

#[tokio::test]
async fn only_names_no_release_registered_are_unregistered_event_types() {
    let db = TestDatabase::new().await;
    sqlx::query("INSERT INTO event_types (event_type) VALUES ('OrderRefunded')")
        .execute(&db.pool)
        .await
        .expect("a newer release's migration registers its type");
    let asked = ["OrderPaid", "OrderRefunded", "OrderPayed", "orderpaid"].map(String::from);
    let unregistered = store::unregistered_event_types(&db.pool, &asked)
        .await
        .expect("look up");
    assert_eq!(unregistered, ["OrderPayed", "orderpaid"]);
}

/// A server restart ends every pooled session at once.
mod ended_sessions {
    use super::*;

    /// A pool of `sessions` that hands out a session used a moment before without testing it,
    /// as the services' writing pools do under load, each session opened, used and handed back.
    async fn unchecked_pool_of_used_sessions(db: &TestDatabase, sessions: u32) -> sqlx::PgPool {
        let pool = PgPoolOptions::new()
            .max_connections(sessions)
            .test_before_acquire(false)
            .connect_with(db.pool.connect_options().as_ref().clone())
            .await
            .expect("connect an unchecked pool");
        let mut held = Vec::new();
        for _ in 0..sessions {
            let mut conn = pool.acquire().await.expect("a session");
            sqlx::query("SELECT 1")
                .execute(&mut *conn)
                .await
                .expect("the session works");
            held.push(conn);
        }
        drop(held);
        pool
    }

    /// Work sent on a session the server ended committed nothing, so it is sent again on another
    /// session: the appends and loads made after a restart succeed, however many of the pooled
    /// sessions it ended, instead of failing one request per dead session.
    #[tokio::test]
    async fn appends_and_loads_on_sessions_a_restart_ended_are_made_again_on_live_ones() {
        const SESSIONS: u32 = 3;
        let db = TestDatabase::new().await;
        let order_id = super::snapshots::order_with_items(&db, 1).await;
        let stream = events::order_stream_id(order_id);

        let pool = unchecked_pool_of_used_sessions(&db, SESSIONS).await;
        assert!(db.end_every_session().await > 0, "no session to end");
        for version in 2..2 + i64::from(SESSIONS) {
            let outcome = store::append_batch_within(
                &pool,
                &[request(&stream, ExpectedVersion::Exact(version), 1)],
                std::time::Duration::from_secs(30),
            )
            .await
            .expect("the append transaction runs on a live session")
            .remove(0)
            .expect("the append is accepted");
            assert_eq!(outcome.stream_version, version + 1);
        }

        let other = super::snapshots::order_with_items(&db, 2).await;
        let pool = unchecked_pool_of_used_sessions(&db, SESSIONS).await;
        assert!(db.end_every_session().await > 0, "no session to end");
        for _ in 0..SESSIONS {
            let loaded = store::load_order(&pool, other)
                .await
                .expect("the load runs on a live session");
            assert_eq!(loaded.state.version, 3);
        }
    }
}
