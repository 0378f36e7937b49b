//! The projector against real PostgreSQL and Redis: one fresh database and one private key
//! prefix (or a private Redis) per test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod dlq;
mod gauges;
mod hand_written;
mod outages;
mod redis_full;
mod retry_bound;
mod split_order;
mod status;
mod support;

use std::process::Stdio;
use std::time::Duration;

use bus::testing::{PrivateRedis, wait_until};
use bus::{DeadLetterQueue, Publisher};
use events::{OrderState, order_stream_id};
use projector::ProjectionKind;
use projector::apply::apply_batch;
use projector::sweeper::{Sweeper, SweeperSettings};
use projector::testing::RebuildGate;
use rand::seq::SliceRandom as _;
use support::{DEADLINE, World, append_orders, commands, group_consumer, run_commands};
use uuid::Uuid;

/// Fast retries and reclaims, so failure tests finish quickly.
pub(crate) const FAST: &[&str] = &[
    "--retry-base-ms",
    "20",
    "--max-attempts",
    "3",
    "--reclaim-interval-ms",
    "200",
];

#[tokio::test]
async fn duplicated_and_out_of_order_deliveries_leave_the_read_model_exact() {
    let w = World::new().await;
    append_orders(w.pool(), 25).await;
    let all = store::read_all(w.pool(), 0, 10_000).await.unwrap();
    let mut rng = rand::rng();
    for projection in ProjectionKind::ALL {
        // Deliver everything three times, shuffled, in small random batches: later versions
        // often arrive before earlier ones, and every event arrives again after it was applied.
        let mut deliveries: Vec<_> = all.iter().chain(&all).chain(&all).cloned().collect();
        deliveries.shuffle(&mut rng);
        let mut conn = w.pool().acquire().await.unwrap();
        for batch in deliveries.chunks(7) {
            apply_batch(&mut conn, projection, batch).await.unwrap();
        }
    }
    w.assert_exact().await;
    let duplicates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM projection_streams WHERE version <> \
         (SELECT max(stream_version) FROM events e WHERE e.stream_id = projection_streams.stream_id)",
    )
    .fetch_one(w.pool())
    .await
    .unwrap();
    assert_eq!(duplicates, 0);
}

#[tokio::test]
async fn two_projector_instances_over_one_stream_give_exactly_the_result_of_one() {
    let mut w = World::new().await;
    let (a, a_task) = w
        .spawn_projector("instance-a", &["--batch-size", "7"])
        .await;
    let (b, b_task) = w
        .spawn_projector("instance-b", &["--batch-size", "5"])
        .await;
    for _ in 0..4 {
        append_orders(w.pool(), 10).await;
        w.publish().await;
    }
    w.wait_caught_up().await;
    w.assert_exact().await;
    a.cancel();
    b.cancel();
    a_task.await.unwrap().unwrap();
    b_task.await.unwrap().unwrap();
}

/// How many entries of `group` are pending (delivered, not acknowledged); any error of Redis
/// fails the test, a missing group too.
pub(crate) async fn pending_count(w: &World, group: &str) -> i64 {
    match pending_count_once_grouped(w, group).await {
        Some(pending) => pending,
        None => panic!("XPENDING {group}: the group does not exist"),
    }
}

/// Waits until `group` holds no pending entry: every entry delivered to it is acknowledged.
async fn wait_nothing_pending(w: &World, group: &str) {
    wait_until(
        DEADLINE,
        &format!("{group} acknowledges every entry"),
        || async { (pending_count(w, group).await == 0).then_some(()) },
    )
    .await;
}

/// [`pending_count`], or `None` while `group` does not exist yet (before a projector made it).
async fn pending_count_once_grouped(w: &World, group: &str) -> Option<i64> {
    let mut conn = w.redis.clone();
    let reply: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
        .arg(w.keys.stream())
        .arg(group)
        .query_async(&mut conn)
        .await;
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) if e.code() == Some("NOGROUP") => return None,
        Err(e) => panic!("XPENDING {group}: {e}"),
    };
    match &reply {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => Some(*n),
            _ => panic!("XPENDING {group} answered {reply:?}"),
        },
        _ => panic!("XPENDING {group} answered {reply:?}"),
    }
}

#[tokio::test]
async fn a_projector_killed_with_sigkill_mid_batch_loses_nothing_after_another_instance_reclaims() {
    let mut w = World::new().await;
    append_orders(w.pool(), 120).await;
    // No healing by the sweeper: only reclaiming can deliver what the dead instance held.
    let no_heal = ["--sweep-grace-ms", "600000"];
    let mut args = w.args("doomed", &no_heal);
    args.extend(["--batch-size", "20"].map(String::from));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_projector"))
        .args(&args[1..])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Give it something to chew on, and kill it as soon as it holds unacknowledged entries.
    w.publish().await;
    wait_until(
        DEADLINE,
        "the doomed instance holds pending entries",
        || async {
            // The group is the doomed instance's to create.
            let pending = pending_count_once_grouped(&w, "order_summaries").await;
            pending.is_some_and(|pending| pending > 0).then_some(())
        },
    )
    .await;
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();

    let mut extra = vec!["--claim-idle-ms", "300"];
    extra.extend(FAST);
    extra.extend(no_heal);
    let (token, task) = w.spawn_projector("survivor", &extra).await;
    w.wait_caught_up().await;
    w.assert_exact().await;
    // The read model can be complete before the dead instance's entries are reclaimed (the
    // version guard pulls missing versions from the event store); the reclaim still empties
    // the pending list.
    wait_until(
        DEADLINE,
        "the dead instance's entries are reclaimed and acked",
        || async { (pending_count(&w, "order_summaries").await == 0).then_some(()) },
    )
    .await;
    token.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_undecodable_entry_lands_in_the_dead_letter_stream_with_every_contract_field_while_the_rest_flows()
 {
    let mut w = World::new().await;
    append_orders(w.pool(), 5).await;
    w.publish().await;
    // Garbage right after the last published entry (`<n>-1` keeps later `<n+1>-0` ids valid).
    let head = store::head_position(w.pool()).await.unwrap();
    let garbage_id = format!("{head}-1");
    let mut conn = w.redis.clone();
    let _: String = redis::cmd("XADD")
        .arg(w.keys.stream())
        .arg(&garbage_id)
        .arg("hello")
        .arg("world")
        .query_async(&mut conn)
        .await
        .unwrap();
    append_orders(w.pool(), 5).await;
    w.publish().await;

    let (token, task) = w.spawn_projector("solo", FAST).await;
    w.wait_caught_up().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let letters = wait_until(DEADLINE, "the garbage is dead-lettered", || async {
        let letters = dlq.list("order_summaries", 10).await.unwrap();
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.original_id, garbage_id);
    assert_eq!(
        letter.original.get("hello").map(String::as_str),
        Some("world")
    );
    assert!(letter.error.contains("missing field"), "{}", letter.error);
    assert_eq!(letter.attempts, 3);
    assert!(!letter.failed_at.is_empty());
    assert_eq!(letter.consumer, "solo");
    // Raw fields, as an operator's XRANGE shows them.
    let raw: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(w.keys.dlq("order_summaries"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let names: Vec<&str> = raw[0].1.iter().map(|(k, _)| k.as_str()).collect();
    for field in ["error", "attempts", "failed_at", "original_id", "consumer"] {
        assert!(names.contains(&field), "{field} missing from {names:?}");
    }
    w.assert_exact().await;
    token.cancel();
    task.await.unwrap().unwrap();
}

/// An entry holding a field that is not UTF-8 (added by hand or by another client), read with
/// a batch by an instance that stopped before processing it: the instance restarted under the
/// same name dead-letters it, with its fields as far as they can be read, and acknowledges it
/// and the entries read with it, in both groups.
#[tokio::test]
async fn an_entry_that_is_not_utf8_is_dead_lettered_and_its_batch_flows_after_a_restart() {
    let mut w = World::new().await;
    append_orders(w.pool(), 3).await;
    w.publish().await;
    let head = store::head_position(w.pool()).await.unwrap();
    let bad_id = format!("{head}-1");
    let mut conn = w.redis.clone();
    let _: String = redis::cmd("XADD")
        .arg(w.keys.stream())
        .arg(&bad_id)
        .arg("event_type")
        .arg("OrderPlaced")
        .arg("data")
        .arg(&b"{\"oops\":\"\xff\"}"[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    append_orders(w.pool(), 3).await;
    w.publish().await;
    for projection in ProjectionKind::ALL {
        let stopped = group_consumer(&w, projection, "solo");
        stopped.ensure_group(bus::FROM_BEGINNING).await.unwrap();
        let read = stopped.read_new(1_000, Duration::ZERO).await.unwrap();
        assert!(read.iter().any(|e| e.id == bad_id));
    }

    let (token, task) = w.spawn_projector("solo", FAST).await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    for projection in ProjectionKind::ALL {
        let letters = support::first_letters(&dlq, projection, "the entry is dead-lettered").await;
        assert_eq!(letters.len(), 1);
        let letter = &letters[0];
        assert_eq!(letter.original_id, bad_id);
        assert!(letter.error.contains("not UTF-8"), "{}", letter.error);
        assert_eq!(
            letter.original.get("data").map(String::as_str),
            Some(r#"{"oops":"\xff"}"#)
        );
        assert_eq!(
            letter.original.get("event_type").map(String::as_str),
            Some("OrderPlaced")
        );
        wait_nothing_pending(&w, projection.name()).await;
    }
    w.wait_caught_up().await;
    w.assert_exact().await;
    token.cancel();
    task.await.unwrap().unwrap();
}

/// A failing apply is tried again only once its backoff has passed, `RETRY_BASE_MS` after the
/// first failure and twice that after the second, then dead-lettered. The refusing trigger
/// records when each try reached it in sequences, which a rolled-back transaction leaves set.
#[tokio::test]
async fn a_failing_apply_is_retried_only_after_its_backoff_which_doubles_each_time() {
    const RETRY_BASE_MS: i64 = 300;
    let mut w = World::new().await;
    let victim = Uuid::new_v4();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SEQUENCE tries; \
         CREATE SEQUENCE try_1_at; CREATE SEQUENCE try_2_at; CREATE SEQUENCE try_3_at; \
         CREATE FUNCTION refuse_victim() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           PERFORM setval('try_' || nextval('tries') || '_at', \
             (extract(epoch FROM clock_timestamp()) * 1000)::bigint); \
           RAISE EXCEPTION 'refusing order {victim}'; END $$; \
         CREATE TRIGGER refuse_victim BEFORE INSERT OR UPDATE ON order_summaries FOR EACH ROW \
           WHEN (NEW.order_id = '{victim}' AND NEW.version >= 4) EXECUTE FUNCTION refuse_victim();"
    )))
    .execute(w.pool())
    .await
    .unwrap();
    // The sweeper would try the blocked event too, on its own schedule: not within this test.
    let retry_base = RETRY_BASE_MS.to_string();
    let (token, task) = w
        .spawn_projector(
            "solo",
            &[
                "--retry-base-ms",
                &retry_base,
                "--max-attempts",
                "3",
                "--sweep-grace-ms",
                "600000",
            ],
        )
        .await;
    // The placing arrives alone, after the rest is applied: each try is one apply of it.
    let cmds = commands(victim, Uuid::new_v4(), support::Fate::Paid);
    let mut state = OrderState::default();
    run_commands(w.pool(), victim, &cmds[..3], &mut state).await;
    w.publish().await;
    w.wait_caught_up().await;
    run_commands(w.pool(), victim, &cmds[3..4], &mut state).await;
    w.publish().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    wait_until(DEADLINE, "the placing is dead-lettered", || async {
        (dlq.len("order_summaries").await.unwrap() == 1).then_some(())
    })
    .await;
    token.cancel();
    task.await.unwrap().unwrap();

    let (tries, first, second, third): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT last_value FROM tries), (SELECT last_value FROM try_1_at), \
                (SELECT last_value FROM try_2_at), (SELECT last_value FROM try_3_at)",
    )
    .fetch_one(w.pool())
    .await
    .unwrap();
    assert_eq!(tries, 3, "three tries, then the dead letter");
    assert!(
        second - first >= RETRY_BASE_MS,
        "the second try came {} ms after the first",
        second - first
    );
    assert!(
        third - second >= 2 * RETRY_BASE_MS,
        "the third try came {} ms after the second",
        third - second
    );
    assert_eq!(
        dlq.list("order_summaries", 10).await.unwrap()[0].attempts,
        3
    );
}

#[tokio::test]
async fn an_apply_that_keeps_failing_is_dead_lettered_its_order_held_back_others_flow_and_replay_makes_it_exact()
 {
    let mut w = World::new().await;
    let victim = Uuid::new_v4();
    let customer = Uuid::new_v4();
    support::refuse_placing(w.pool(), victim).await;
    let (token, task) = w.spawn_projector("solo", FAST).await;

    // The victim is created and placed (the placing fails), then paid (must be held back).
    let cmds = commands(victim, customer, support::Fate::Paid);
    let mut state = OrderState::default();
    run_commands(w.pool(), victim, &cmds[..4], &mut state).await;
    append_orders(w.pool(), 5).await;
    w.publish().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    wait_until(DEADLINE, "the placing is dead-lettered", || async {
        (dlq.len("order_summaries").await.unwrap() == 1).then_some(())
    })
    .await;
    run_commands(w.pool(), victim, &cmds[4..], &mut state).await;
    append_orders(w.pool(), 5).await;
    w.publish().await;
    w.wait_caught_up().await;

    let stream = order_stream_id(victim);
    let (version, parked): (i64, Option<i64>) = sqlx::query_as(
        "SELECT version, parked_version FROM projection_streams \
         WHERE projection = 'order_summaries' AND stream_id = $1",
    )
    .bind(&stream)
    .fetch_one(w.pool())
    .await
    .unwrap();
    assert_eq!((version, parked), (3, Some(4)), "held back at the placing");
    let status: String =
        sqlx::query_scalar("SELECT status FROM order_summaries WHERE order_id = $1")
            .bind(victim)
            .fetch_one(w.pool())
            .await
            .unwrap();
    assert_eq!(status, "draft");
    let letter = &dlq.list("order_summaries", 10).await.unwrap()[0];
    assert_eq!(
        letter.original.get("event_type").map(String::as_str),
        Some("OrderPlaced")
    );
    assert!(letter.error.contains("refusing order"), "{}", letter.error);
    // Only the victim differs; customer_stats never failed.
    let report = projector::verify::verify(w.pool(), ProjectionKind::OrderSummaries)
        .await
        .unwrap();
    assert!(
        report.shown.iter().all(|d| d.id == victim.to_string()),
        "{}",
        report.render(ProjectionKind::OrderSummaries)
    );
    assert!(!report.is_clean());

    // A replay while the trigger is still there fails and leaves the dead letter.
    let letters = dlq.list("order_summaries", 10).await.unwrap();
    let failed = projector::admin::replay(w.pool(), &dlq, ProjectionKind::OrderSummaries, &letters)
        .await
        .unwrap();
    assert!(!failed[0].ok);
    assert_eq!(dlq.len("order_summaries").await.unwrap(), 1);

    support::stop_refusing(w.pool()).await;
    let output = support::projector_command(&w, &["dlq", "replay", "order_summaries"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("replay") && stdout.contains("ok"),
        "{stdout}"
    );
    assert_eq!(dlq.len("order_summaries").await.unwrap(), 0);
    w.wait_caught_up().await;
    w.assert_exact().await;
    token.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_redis_flush_in_the_middle_of_a_load_ends_with_exact_read_models_and_no_manual_step() {
    let redis = PrivateRedis::start().await.unwrap();
    let mut w = World::with_redis(redis.url()).await;
    let mut extra = vec!["--sweep-grace-ms", "300"];
    extra.extend(FAST);
    let (token, task, port) = w.spawn_projector_serving("solo", &extra).await;
    append_orders(w.pool(), 15).await;
    w.publish().await;
    let published = store::head_position(w.pool()).await.unwrap();
    // Events appended but not yet published are lost with the flush too: the relay resumes
    // after its own checkpoint, not before.
    append_orders(w.pool(), 15).await;
    let never_published = store::head_position(w.pool()).await.unwrap() - published;
    let mut conn = w.redis.clone();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    w.skip_publishing_up_to_head().await;
    w.publisher = Publisher::new(w.redis.clone(), w.keys.clone(), bus::DEFAULT_HARD_CAP);
    append_orders(w.pool(), 15).await;
    w.publish().await;
    w.wait_caught_up().await;
    w.assert_exact().await;
    // No consumer ever had the events appended before the flush and never published: the
    // sweeper applied each of them, and says so.
    for projection in ProjectionKind::ALL {
        let healed = support::metric(port, "projector_sweeper_healed_events_total", projection)
            .await
            .unwrap_or(0.0);
        assert!(
            healed >= never_published as f64,
            "{projection}: {healed} healed, {never_published} never published"
        );
    }
    token.cancel();
    task.await.unwrap().unwrap();
}

/// Applies commit without waiting for their WAL flush, so a server crash can lose the last of
/// them after the consumer acknowledged their entries. A crash loses such a transaction whole:
/// read-model rows, bookkeeping and mark. Simulated here by undoing exactly that for the orders
/// appended last, once nothing is pending on Redis: only the sweeper, applying from the event
/// store, can bring them back.
#[tokio::test]
async fn applies_lost_in_a_server_crash_after_their_entries_were_acknowledged_are_made_again() {
    let mut w = World::new().await;
    // The instance that applied them heals nothing during the test, so the loss is there to see
    // for as long as the test looks; the one after it heals with a short grace.
    let mut extra = vec!["--sweep-grace-ms", "600000"];
    extra.extend(FAST);
    let (token, task) = w.spawn_projector("solo", &extra).await;
    append_orders(w.pool(), 6).await;
    let before_loss = store::head_position(w.pool()).await.unwrap();
    let lost = append_orders(w.pool(), 6).await;
    w.publish().await;
    w.wait_caught_up().await;
    wait_nothing_pending(&w, "order_summaries").await;

    let streams: Vec<String> = lost.iter().map(|id| order_stream_id(*id)).collect();
    let mut tx = w.pool().begin().await.unwrap();
    sqlx::query("DELETE FROM order_summaries WHERE order_id = ANY($1)")
        .bind(&lost)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "DELETE FROM projection_streams WHERE projection = 'order_summaries' \
         AND stream_id = ANY($1)",
    )
    .bind(&streams)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE projection_checkpoints SET position = $1 WHERE projection = 'order_summaries'",
    )
    .bind(before_loss)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(
        !projector::verify::verify(w.pool(), ProjectionKind::OrderSummaries)
            .await
            .unwrap()
            .is_clean(),
        "the loss shows"
    );
    token.cancel();
    task.await.unwrap().unwrap();

    let mut extra = vec!["--sweep-grace-ms", "300"];
    extra.extend(FAST);
    let (token, task) = w.spawn_projector("solo", &extra).await;
    w.wait_caught_up().await;
    w.assert_exact().await;
    assert_eq!(pending_count(&w, "order_summaries").await, 0);
    token.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn rebuild_restores_a_truncated_read_model() {
    let w = World::new().await;
    append_orders(w.pool(), 30).await;
    let all = store::read_all(w.pool(), 0, 10_000).await.unwrap();
    let mut conn = w.pool().acquire().await.unwrap();
    for projection in ProjectionKind::ALL {
        apply_batch(&mut conn, projection, &all).await.unwrap();
    }
    drop(conn);
    // Every summary gone and one customer's stats gone: both read models are broken for sure.
    sqlx::raw_sql(
        "DELETE FROM order_summaries; \
         DELETE FROM customer_stats WHERE customer_id = \
           (SELECT customer_id FROM customer_stats ORDER BY customer_id LIMIT 1)",
    )
    .execute(w.pool())
    .await
    .unwrap();
    for projection in ProjectionKind::ALL {
        let broken = projector::verify::verify(w.pool(), projection)
            .await
            .unwrap();
        assert!(!broken.is_clean());
        let outcome = projector::admin::rebuild(w.pool(), projection, 7, None)
            .await
            .unwrap();
        assert_eq!(outcome.events, all.len() as u64);
        assert_eq!(
            w.checkpoint(projection).await,
            all.last().unwrap().global_position
        );
    }
    w.assert_exact().await;
}

/// While a rebuild folds, the live read model keeps being applied (the fold works on shadow
/// copies and takes the projection's lock only for its swap), and the rebuilt model that is
/// swapped in holds the events applied live meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_applies_carry_on_during_a_rebuild_and_its_result_includes_them() {
    let w = World::new().await;
    let ids = append_orders(w.pool(), 300).await;
    let all = store::read_all(w.pool(), 0, 100_000).await.unwrap();
    let mut conn = w.pool().acquire().await.unwrap();
    apply_batch(&mut conn, ProjectionKind::OrderSummaries, &all)
        .await
        .unwrap();
    sqlx::query("DELETE FROM order_summaries")
        .execute(&mut *conn)
        .await
        .unwrap();

    // The rebuild is held halfway through its fold, for as long as the test holds the gate: a
    // check constraint (copied to the shadow tables with the rest of the table's definition)
    // waits for the gate's lock before a shadow row of the middle order is written.
    let gate = RebuildGate::hold_at(w.pool(), ids[ids.len() / 2]).await;
    let pool = w.pool().clone();
    let rebuild = tokio::spawn(async move {
        projector::admin::rebuild(&pool, ProjectionKind::OrderSummaries, 3, None).await
    });
    wait_until(DEADLINE, "the rebuild is held in mid-fold", || async {
        RebuildGate::is_holding(w.pool()).await.then_some(())
    })
    .await;
    let folded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM projector_rebuild_order_summaries.order_summaries",
    )
    .fetch_one(w.pool())
    .await
    .unwrap();
    assert!(
        folded > 0,
        "the rebuild has folded the orders before the middle one"
    );

    let late = Uuid::new_v4();
    let mut state = OrderState::default();
    run_commands(
        w.pool(),
        late,
        &commands(late, Uuid::new_v4(), support::Fate::Placed),
        &mut state,
    )
    .await;
    let head = store::head_position(w.pool()).await.unwrap();
    let tail = store::read_all(w.pool(), all.len() as i64, 100)
        .await
        .unwrap();
    // The rebuild cannot finish while it is held: an apply that waited for it never ends.
    tokio::time::timeout(
        DEADLINE,
        apply_batch(&mut conn, ProjectionKind::OrderSummaries, &tail),
    )
    .await
    .expect("the live apply does not wait for the rebuild")
    .unwrap();
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM order_summaries")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        live, 1,
        "the live read model took the new order during the rebuild"
    );
    drop(conn);
    gate.open().await;

    let outcome = rebuild.await.unwrap().unwrap();
    assert_eq!(outcome.position, head);
    assert_eq!(w.checkpoint(ProjectionKind::OrderSummaries).await, head);
    assert!(outcome.events_under_lock < outcome.events);
    w.assert_projection_exact(ProjectionKind::OrderSummaries)
        .await;
    let shadow: Option<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'projector_rebuild_%'",
    )
    .fetch_optional(w.pool())
    .await
    .unwrap();
    assert_eq!(shadow, None, "the shadow schema is dropped");
}

/// A rebuild tells the listeners of the live read model nothing until its swap: its folds'
/// marks are the shadow's, and a read-your-writes wait that heard one would answer before the
/// live read model had the event. The swap announces the head once.
#[tokio::test]
async fn a_rebuild_announces_only_the_position_it_swapped_in() {
    let w = World::new().await;
    append_orders(w.pool(), 40).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(w.pool())
        .await
        .unwrap();
    listener
        .listen_all([
            projector::sweeper::POSITION_CHANNEL,
            projector::apply::APPLIED_CHANNEL,
        ])
        .await
        .unwrap();

    let outcome = projector::admin::rebuild(w.pool(), ProjectionKind::CustomerStats, 5, None)
        .await
        .unwrap();
    let last = format!("customer_stats:{}", outcome.position);
    let mut heard = Vec::new();
    while heard.last() != Some(&last) {
        let notification = tokio::time::timeout(DEADLINE, listener.recv())
            .await
            .expect("the swap's announcement arrives")
            .unwrap();
        heard.push(notification.payload().to_owned());
    }
    assert_eq!(heard, [last]);
    w.assert_projection_exact(ProjectionKind::CustomerStats)
        .await;
}

/// A rebuild that died (killed mid-fold) leaves its shadow schema behind; the next rebuild of
/// that projection starts by dropping it and ends exact.
#[tokio::test]
async fn a_rebuild_after_one_that_died_clears_its_leftovers_and_ends_exact() {
    let w = World::new().await;
    append_orders(w.pool(), 20).await;
    sqlx::raw_sql(
        "CREATE SCHEMA projector_rebuild_order_summaries; \
         CREATE TABLE projector_rebuild_order_summaries.order_summaries (half_done int); \
         INSERT INTO projector_rebuild_order_summaries.order_summaries VALUES (1)",
    )
    .execute(w.pool())
    .await
    .unwrap();
    let outcome = projector::admin::rebuild(w.pool(), ProjectionKind::OrderSummaries, 50, None)
        .await
        .unwrap();
    assert_eq!(
        outcome.position,
        store::head_position(w.pool()).await.unwrap()
    );
    w.assert_projection_exact(ProjectionKind::OrderSummaries)
        .await;
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'projector_rebuild_%'",
    )
    .fetch_one(w.pool())
    .await
    .unwrap();
    assert_eq!(leftovers, 0);
}

/// Two rebuilds of one projection never run at once; the second is refused at once.
#[tokio::test]
async fn a_second_rebuild_of_the_same_projection_is_refused_while_one_runs() {
    let w = World::new().await;
    let mut holder = w.pool().acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(ProjectionKind::OrderSummaries.rebuild_lock_key())
        .execute(&mut *holder)
        .await
        .unwrap();
    let refused = projector::admin::rebuild(w.pool(), ProjectionKind::OrderSummaries, 100, None)
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("another rebuild of order_summaries is running"),
        "{refused:#}"
    );
    // The other projection is not concerned.
    projector::admin::rebuild(w.pool(), ProjectionKind::CustomerStats, 100, None)
        .await
        .unwrap();
}

/// Runs `projector verify order_summaries`; returns its exit code and stdout.
async fn run_verify(w: &World) -> (Option<i32>, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_projector"))
        .args(["verify", "order_summaries"])
        .env("DATABASE_URL", &w.db.url)
        .env("SKIP_MIGRATIONS", "true")
        .output()
        .await
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn verify_finds_a_deliberately_corrupted_row_and_passes_on_a_clean_one() {
    let w = World::new().await;
    let ids = append_orders(w.pool(), 8).await;
    let all = store::read_all(w.pool(), 0, 10_000).await.unwrap();
    let mut conn = w.pool().acquire().await.unwrap();
    apply_batch(&mut conn, ProjectionKind::OrderSummaries, &all)
        .await
        .unwrap();
    drop(conn);
    let (code, out) = run_verify(&w).await;
    assert_eq!(code, Some(0), "{out}");
    sqlx::query("UPDATE order_summaries SET total = total + 1 WHERE order_id = $1")
        .bind(ids[3])
        .execute(w.pool())
        .await
        .unwrap();
    let (code, out) = run_verify(&w).await;
    assert_eq!(
        code,
        Some(1),
        "the contract's exit code for a difference: {out}"
    );
    assert!(
        out.contains(&ids[3].to_string()) && out.contains("total"),
        "{out}"
    );
}

#[tokio::test]
async fn the_checkpoint_never_exceeds_a_position_that_is_not_applied() {
    let w = World::new().await;
    append_orders(w.pool(), 10).await;
    let all = store::read_all(w.pool(), 0, 10_000).await.unwrap();
    let projection = ProjectionKind::OrderSummaries;
    // Everything applied except one stream's events.
    let skipped = all[all.len() / 2].stream_id.clone();
    let first_unapplied = all
        .iter()
        .find(|e| e.stream_id == skipped)
        .unwrap()
        .global_position;
    let applied: Vec<_> = all
        .iter()
        .filter(|e| e.stream_id != skipped)
        .cloned()
        .collect();
    let mut conn = w.pool().acquire().await.unwrap();
    apply_batch(&mut conn, projection, &applied).await.unwrap();
    drop(conn);
    // The apply moved the mark itself, up to the unapplied stream and no further.
    assert_eq!(w.checkpoint(projection).await, first_unapplied - 1);
    let mut sweeper = test_sweeper(&w, projection, Duration::from_secs(3600));
    for _ in 0..3 {
        let outcome = sweeper.sweep_once().await.unwrap();
        assert_eq!(outcome.position, first_unapplied - 1);
        assert_eq!(outcome.blocker, Some(first_unapplied));
        assert_eq!(w.checkpoint(projection).await, first_unapplied - 1);
    }
    // Once healing is allowed, the sweeper applies the rest from the event store.
    let mut healer = test_sweeper(&w, projection, Duration::ZERO);
    let outcome = healer.sweep_once().await.unwrap();
    assert_eq!(outcome.position, all.last().unwrap().global_position);
    let report = projector::verify::verify(w.pool(), projection)
        .await
        .unwrap();
    assert!(report.is_clean(), "{}", report.render(projection));
}

#[tokio::test]
async fn the_mark_walks_across_pages_and_over_parked_streams_and_stops_at_the_first_unapplied() {
    let w = World::new().await;
    append_orders(w.pool(), 480).await;
    let all = store::read_all(w.pool(), 0, 100_000).await.unwrap();
    let head = all.last().unwrap().global_position;
    assert!(
        head > 2 * projector::sweeper::SWEEP_PAGE,
        "needs more than two pages, has {head} events"
    );
    let projection = ProjectionKind::OrderSummaries;
    // The first order is parked at its first event (its events are held back, not missing);
    // the last order is not applied yet.
    let parked = all.first().unwrap().stream_id.clone();
    let late = all.last().unwrap().stream_id.clone();
    let first_late = all
        .iter()
        .find(|e| e.stream_id == late)
        .unwrap()
        .global_position;
    let (late_events, applied): (Vec<_>, Vec<_>) = all
        .iter()
        .filter(|e| e.stream_id != parked)
        .cloned()
        .partition(|e| e.stream_id == late);
    let mut conn = w.pool().acquire().await.unwrap();
    apply_batch(&mut conn, projection, &applied).await.unwrap();
    sqlx::query(
        "INSERT INTO projection_streams (projection, stream_id, version, parked_version, \
                                         parked_error) VALUES ($1, $2, 0, 1, 'test')",
    )
    .bind(projection.name())
    .bind(&parked)
    .execute(&mut *conn)
    .await
    .unwrap();
    let mut sweeper = test_sweeper(&w, projection, Duration::from_secs(3600));
    let outcome = sweeper.sweep_once().await.unwrap();
    assert_eq!(outcome.position, first_late - 1);
    assert_eq!(outcome.blocker, Some(first_late));
    assert_eq!(w.checkpoint(projection).await, first_late - 1);

    apply_batch(&mut conn, projection, &late_events)
        .await
        .unwrap();
    let outcome = sweeper.sweep_once().await.unwrap();
    assert_eq!(outcome.position, head);
    assert_eq!(outcome.blocker, None);
    assert_eq!(w.checkpoint(projection).await, head);
}

#[tokio::test]
async fn an_apply_moves_the_mark_in_its_own_transaction_without_a_sweeper() {
    let w = World::new().await;
    append_orders(w.pool(), 12).await;
    let all = store::read_all(w.pool(), 0, 10_000).await.unwrap();
    let (first_half, second_half) = all.split_at(all.len() / 2);
    let mut conn = w.pool().acquire().await.unwrap();
    for projection in ProjectionKind::ALL {
        // Out of order: the later half first cannot move the mark (the earlier events are not
        // applied, though the version guard pulls the missing versions of each stream it
        // touches); the earlier half then completes the prefix.
        apply_batch(&mut conn, projection, second_half)
            .await
            .unwrap();
        assert!(
            w.checkpoint(projection).await < all.last().unwrap().global_position,
            "{projection}: the mark passed events that are not applied"
        );
        apply_batch(&mut conn, projection, first_half)
            .await
            .unwrap();
        assert_eq!(
            w.checkpoint(projection).await,
            all.last().unwrap().global_position,
            "{projection}"
        );
    }
}

#[tokio::test]
async fn a_sweep_never_moves_the_mark_below_what_an_apply_committed_meanwhile() {
    use projector::sweeper::{POSITION_CHANNEL, SWEEP_PAGE};
    let w = World::new().await;
    append_orders(w.pool(), 480).await;
    let all = store::read_all(w.pool(), 0, 100_000).await.unwrap();
    let head = all.last().unwrap().global_position;
    assert!(
        head > SWEEP_PAGE,
        "needs more than one page, has {head} events"
    );
    let projection = ProjectionKind::OrderSummaries;
    let mut conn = w.pool().acquire().await.unwrap();
    apply_batch(&mut conn, projection, &all).await.unwrap();
    // The sweeper starts from 0 and will compute one page (SWEEP_PAGE) first ...
    sqlx::query("UPDATE projection_checkpoints SET position = 0 WHERE projection = $1")
        .bind(projection.name())
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    // ... while another transaction, standing in for an apply, moves the mark to the head and
    // holds the row until the sweep waits for it.
    let mut apply = w.pool().begin().await.unwrap();
    sqlx::query("UPDATE projection_checkpoints SET position = $2 WHERE projection = $1")
        .bind(projection.name())
        .bind(head)
        .execute(&mut *apply)
        .await
        .unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(w.pool())
        .await
        .unwrap();
    listener.listen(POSITION_CHANNEL).await.unwrap();
    let sweep = sweep_waiting_for_the_checkpoint_row(&w, projection).await;
    apply.commit().await.unwrap();
    let outcome = sweep.await.unwrap().unwrap();
    assert_eq!(outcome.position, head);
    assert_eq!(w.checkpoint(projection).await, head);

    // Notifications arrive in commit order: everything the sweep announced comes before this.
    sqlx::query("SELECT pg_notify($1, 'end')")
        .bind(POSITION_CHANNEL)
        .execute(w.pool())
        .await
        .unwrap();
    let mut announced = Vec::new();
    loop {
        let notification = tokio::time::timeout(DEADLINE, listener.recv())
            .await
            .expect("the end marker arrives")
            .unwrap();
        if notification.payload() == "end" {
            break;
        }
        announced.push(notification.payload().to_owned());
    }
    let below: Vec<_> = announced
        .iter()
        .filter(|p| p.rsplit(':').next().and_then(|n| n.parse::<i64>().ok()) < Some(head))
        .collect();
    assert!(
        below.is_empty(),
        "the mark went back below {head}: announced {announced:?}"
    );
}

#[tokio::test]
async fn only_an_apply_that_leaves_the_mark_short_of_its_events_wakes_the_sweeper() {
    use projector::apply::APPLIED_CHANNEL;
    let w = World::new().await;
    append_orders(w.pool(), 12).await;
    let all = store::read_all(w.pool(), 0, 10_000).await.unwrap();
    let (first_half, second_half) = all.split_at(all.len() / 2);
    let projection = ProjectionKind::OrderSummaries;
    let mut listener = sqlx::postgres::PgListener::connect_with(w.pool())
        .await
        .unwrap();
    listener.listen(APPLIED_CHANNEL).await.unwrap();
    let mut conn = w.pool().acquire().await.unwrap();
    // Notifications arrive in commit order: what an apply sent comes before the marker sent
    // after it.
    let mut wake_ups = async |marker: &str| {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(APPLIED_CHANNEL)
            .bind(marker)
            .execute(w.pool())
            .await
            .unwrap();
        let mut seen = Vec::new();
        loop {
            let notification = tokio::time::timeout(DEADLINE, listener.recv())
                .await
                .expect("the marker arrives")
                .unwrap();
            if notification.payload() == marker {
                return seen;
            }
            seen.push(notification.payload().to_owned());
        }
    };

    // The later half first: the earlier events are not applied, the mark cannot pass them.
    apply_batch(&mut conn, projection, second_half)
        .await
        .unwrap();
    assert_eq!(wake_ups("after-second-half").await, [projection.name()]);

    // The earlier half completes the prefix and moves the mark over everything itself.
    apply_batch(&mut conn, projection, first_half)
        .await
        .unwrap();
    assert_eq!(
        w.checkpoint(projection).await,
        all.last().unwrap().global_position
    );
    assert_eq!(wake_ups("after-first-half").await, Vec::<String>::new());
}

#[tokio::test]
async fn a_sweep_waits_for_the_apply_holding_the_checkpoint_row_and_counts_its_events() {
    let w = World::new().await;
    append_orders(w.pool(), 12).await;
    let all = store::read_all(w.pool(), 0, 10_000).await.unwrap();
    let head = all.last().unwrap().global_position;
    let projection = ProjectionKind::OrderSummaries;
    // A transaction standing in for an apply that holds the checkpoint row (so it wakes the
    // sweeper instead of moving the mark) and has applied everything, not yet committed.
    let mut apply = w.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM projection_checkpoints WHERE projection = $1 FOR UPDATE")
        .bind(projection.name())
        .execute(&mut *apply)
        .await
        .unwrap();
    apply_batch(&mut apply, projection, &all).await.unwrap();

    let sweep = sweep_waiting_for_the_checkpoint_row(&w, projection).await;
    apply.commit().await.unwrap();
    // Scanned after the wait, the sweep sees what that transaction applied.
    let outcome = sweep.await.unwrap().unwrap();
    assert_eq!(outcome.position, head);
    assert_eq!(w.checkpoint(projection).await, head);
}

#[tokio::test]
async fn customer_stats_keep_what_was_spent_in_each_currency_apart() {
    use support::{Fate, commands};
    let w = World::new().await;
    let customer = Uuid::new_v4();
    // Paid in EUR, shipped in USD, paid in USD and then cancelled, placed in GBP (not spent).
    for (currency, fate, cancel_after_paying) in [
        ("EUR", Fate::Paid, false),
        ("USD", Fate::Shipped, false),
        ("USD", Fate::Paid, true),
        ("GBP", Fate::Placed, false),
    ] {
        let id = Uuid::new_v4();
        let mut cmds = commands(id, customer, fate);
        if let Some(events::OrderCommand::CreateOrder { currency: c, .. }) = cmds.first_mut() {
            *c = currency.into();
        }
        if cancel_after_paying {
            cmds.push(events::OrderCommand::CancelOrder {
                reason: "refunded".into(),
            });
        }
        run_commands(w.pool(), id, &cmds, &mut OrderState::default()).await;
    }
    let all = store::read_all(w.pool(), 0, 10_000).await.unwrap();
    let mut conn = w.pool().acquire().await.unwrap();
    // In two batches, so the second moves an order that the first left paid.
    let (first, second) = all.split_at(all.len() - 1);
    for batch in [first, second] {
        apply_batch(&mut conn, ProjectionKind::CustomerStats, batch)
            .await
            .unwrap();
    }
    let spent: Vec<(String, i64)> = sqlx::query_as(
        "SELECT currency, total_spent FROM customer_stats_spent \
         WHERE customer_id = $1 AND total_spent <> 0 ORDER BY currency",
    )
    .bind(customer)
    .fetch_all(w.pool())
    .await
    .unwrap();
    assert_eq!(spent, [("EUR".to_owned(), 1299), ("USD".to_owned(), 1299)]);
    let total: i64 =
        sqlx::query_scalar("SELECT total_spent FROM customer_stats WHERE customer_id = $1")
            .bind(customer)
            .fetch_one(w.pool())
            .await
            .unwrap();
    assert_eq!(total, 2598);
    w.assert_projection_exact(ProjectionKind::CustomerStats)
        .await;
}

/// The nil UUID is a customer id the command service accepts; `verify` compares its row like
/// any other instead of reporting it missing.
#[tokio::test]
async fn verify_compares_the_stats_of_a_customer_whose_id_is_the_nil_uuid() {
    use support::{Fate, commands};
    let w = World::new().await;
    for customer in [Uuid::nil(), Uuid::new_v4()] {
        let id = Uuid::new_v4();
        run_commands(
            w.pool(),
            id,
            &commands(id, customer, Fate::Paid),
            &mut OrderState::default(),
        )
        .await;
    }
    let all = store::read_all(w.pool(), 0, 10_000).await.unwrap();
    let mut conn = w.pool().acquire().await.unwrap();
    apply_batch(&mut conn, ProjectionKind::CustomerStats, &all)
        .await
        .unwrap();
    let report = projector::verify::verify(w.pool(), ProjectionKind::CustomerStats)
        .await
        .unwrap();
    assert!(
        report.is_clean(),
        "{}",
        report.render(ProjectionKind::CustomerStats)
    );
    // And a difference in that row is found.
    sqlx::query("UPDATE customer_stats SET paid_count = 7 WHERE customer_id = $1")
        .bind(Uuid::nil())
        .execute(&mut *conn)
        .await
        .unwrap();
    let report = projector::verify::verify(w.pool(), ProjectionKind::CustomerStats)
        .await
        .unwrap();
    let rendered = report.render(ProjectionKind::CustomerStats);
    assert!(
        rendered.contains(&format!("{} paid_count", Uuid::nil())),
        "{rendered}"
    );
}

#[tokio::test]
async fn upgrading_to_spend_per_currency_fills_it_from_what_was_projected() {
    // The schema before migration 0007, with an order remembered by customer_stats in each
    // state that matters: paid in EUR and shipped in USD (spent), placed in EUR (not spent),
    // and one paid order that order_summaries has not projected yet (currency unknown).
    let db = store::testing::TestDatabase::migrated_to(6).await;
    let customer = Uuid::new_v4();
    let orders = [
        (Uuid::new_v4(), "paid", 1000, Some("EUR")),
        (Uuid::new_v4(), "shipped", 250, Some("USD")),
        (Uuid::new_v4(), "placed", 400, Some("EUR")),
        (Uuid::new_v4(), "paid", 70, None),
    ];
    for (i, (order_id, status, total, currency)) in orders.iter().enumerate() {
        sqlx::query(
            "INSERT INTO customer_stats_orders (order_id, customer_id, status, total) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(order_id)
        .bind(customer)
        .bind(status)
        .bind(total)
        .execute(&db.pool)
        .await
        .unwrap();
        if let Some(currency) = currency {
            sqlx::query(
                "INSERT INTO order_summaries (order_id, customer_id, status, currency, total, \
                 item_count, version, created_at, updated_at, created_position) \
                 VALUES ($1, $2, $3, $4, $5, 1, 4, now(), now(), $6)",
            )
            .bind(order_id)
            .bind(customer)
            .bind(status)
            .bind(currency)
            .bind(total)
            .bind(i as i64 + 1)
            .execute(&db.pool)
            .await
            .unwrap();
        }
    }

    store::MIGRATOR.run(&db.pool).await.unwrap();

    let spent: Vec<(String, i64)> = sqlx::query_as(
        "SELECT currency, total_spent FROM customer_stats_spent \
         WHERE customer_id = $1 ORDER BY currency",
    )
    .bind(customer)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        spent,
        [
            (String::new(), 70),
            ("EUR".to_owned(), 1000),
            ("USD".to_owned(), 250)
        ]
    );
    let remembered: Vec<String> = sqlx::query_scalar(
        "SELECT currency FROM customer_stats_orders WHERE customer_id = $1 ORDER BY total DESC",
    )
    .bind(customer)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(remembered, ["EUR", "EUR", "USD", ""]);
}

/// Starts one sweep of `projection` and returns once it waits for the checkpoint row, which
/// the caller's transaction holds.
async fn sweep_waiting_for_the_checkpoint_row(
    w: &World,
    projection: ProjectionKind,
) -> tokio::task::JoinHandle<Result<projector::sweeper::SweepOutcome, projector::failure::Failure>>
{
    let mut sweeper = test_sweeper(w, projection, SweeperSettings::default().grace);
    let sweep = tokio::spawn(async move { sweeper.sweep_once().await });
    wait_until(
        DEADLINE,
        "the sweep waits for the checkpoint row",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock' \
                   AND query LIKE '%projection_checkpoints%'",
            )
            .fetch_one(w.pool())
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;
    sweep
}

/// A faulty release fails one event after another: the sweeper fails twice on order X's
/// event before a consumer parks X, then order Y's event becomes the blocker. Y is dead-lettered
/// only once the sweeper has failed on Y itself `max_attempts` times (three), with its own
/// count as `attempts`, instead of after one try because X's count carried over.
#[tokio::test]
async fn the_sweeper_counts_failures_per_event_so_a_new_blocker_never_inherits_the_last_ones() {
    let w = World::new().await;
    let projection = ProjectionKind::OrderSummaries;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let mut sweeper = eager_sweeper_with_dead_letters(&w, projection, &dlq, 3);
    let x = damaged_order(w.pool()).await;
    for _ in 0..2 {
        sweeper.sweep_once().await.unwrap();
    }
    assert_eq!(dlq.len(projection.name()).await.unwrap(), 0);
    let mut conn = w.pool().acquire().await.unwrap();
    // Its fourth event is the damaged one.
    projector::apply::park_stream(&mut conn, projection, &order_stream_id(x), 4, "boom")
        .await
        .unwrap();
    drop(conn);

    let y = damaged_order(w.pool()).await;
    for heal in 1..=2 {
        sweeper.sweep_once().await.unwrap();
        assert_eq!(
            dlq.len(projection.name()).await.unwrap(),
            0,
            "dead-lettered after {heal} failed heal(s) of its own"
        );
    }
    sweeper.sweep_once().await.unwrap();
    let letters = dlq.list(projection.name(), 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].original.get("stream_id"),
        Some(&order_stream_id(y))
    );
    assert_eq!(letters[0].attempts, 3);
}

/// Redis is down, so only the sweeper applies, from the event store, and an event fails for
/// good: the sweeper cannot write its dead letter, and parks its order all the same. The mark
/// passes it and every other order is applied, also those more than one heal batch after it
/// (each heal reads from the mark); `dlq parked` finds the order, with no letter.
#[tokio::test]
async fn with_redis_down_an_event_that_keeps_failing_is_parked_without_a_letter_and_the_rest_applied()
 {
    let mut redis = PrivateRedis::start().await.unwrap();
    let w = World::with_redis(redis.url()).await;
    let projection = ProjectionKind::OrderSummaries;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let damaged = damaged_order(w.pool()).await;
    let damaged_at = store::head_position(w.pool()).await.unwrap();
    let mut orders = 0;
    while store::head_position(w.pool()).await.unwrap()
        <= damaged_at + projector::sweeper::HEAL_BATCH
    {
        append_orders(w.pool(), 50).await;
        orders += 50;
    }
    let head = store::head_position(w.pool()).await.unwrap();
    redis.stop();

    let mut sweeper = eager_sweeper_with_dead_letters(&w, projection, &dlq, 2);
    let started = std::time::Instant::now();
    loop {
        let outcome = sweeper.sweep_once().await.expect("a sweep without Redis");
        if outcome.position == head {
            assert_eq!(outcome.blocker, None);
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the mark stays at {} (blocker {:?}), short of the head {head}",
            outcome.position,
            outcome.blocker
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let parked: Option<i64> = sqlx::query_scalar(
        "SELECT parked_version FROM projection_streams WHERE projection = $1 AND stream_id = $2",
    )
    .bind(projection.name())
    .bind(order_stream_id(damaged))
    .fetch_one(w.pool())
    .await
    .unwrap();
    assert_eq!(parked, Some(4));
    let summaries: i64 = sqlx::query_scalar("SELECT count(*) FROM order_summaries")
        .fetch_one(w.pool())
        .await
        .unwrap();
    // Every other order, and the damaged one as it stood before its bad event.
    assert_eq!(summaries, orders + 1);
    redis.start_again().await.unwrap();
    let (listed, total) = projector::parked::list(w.pool(), &dlq, projection)
        .await
        .unwrap();
    assert_eq!(total, 1);
    assert_eq!(listed[0].stream_id, order_stream_id(damaged));
    assert_eq!(listed[0].letters, 0);
}

/// The grace a sweeper gives a blocker before its first heal, in the healing tests: long
/// enough that a test's few sweeps never wait it out, so a heal that comes sooner is one the
/// healing allowed.
const HEALING_TEST_GRACE: Duration = Duration::from_secs(2);
/// Their tick: what a healing sweeper gives each new blocker instead.
const HEALING_TEST_TICK: Duration = Duration::from_millis(20);

/// A sweeper that healed, with nobody else applying (Redis down: no consumer gets entries),
/// heals each new blocker once it is a tick old, not a grace: the read model stays within a
/// tick or two of the head.
#[tokio::test]
async fn while_nobody_else_applies_the_sweeper_heals_each_new_blocker_a_tick_after_it_appears() {
    let w = World::new().await;
    let projection = ProjectionKind::OrderSummaries;
    append_orders(w.pool(), 3).await;
    let mut sweeper = healing_test_sweeper(&w, projection);
    heal_once(&mut sweeper).await;
    // Nothing new yet: a sweep that finds the head applied keeps the healing.
    let idle = sweeper.sweep_once().await.unwrap();
    assert_eq!((idle.healed, idle.blocker), (0, None));

    append_orders(w.pool(), 1).await;
    let head = store::head_position(w.pool()).await.unwrap();
    // Seen now, a tick before it may be healed: the first sweep leaves it to a consumer.
    let seen = sweeper.sweep_once().await.unwrap();
    assert_eq!(seen.healed, 0, "{seen:?}");
    tokio::time::sleep(2 * HEALING_TEST_TICK).await;
    let outcome = sweeper.sweep_once().await.unwrap();
    assert!(outcome.healed > 0, "{outcome:?}");
    assert_eq!((outcome.position, outcome.blocker), (head, None));
}

/// Once someone else moves the mark past where the sweeper's last heal left it, the consumers
/// are applying again: a new blocker is an event in flight to them and gets its grace, instead
/// of being applied by the sweeper ahead of them (which, under steady load, would go on for as
/// long as the load lasts).
#[tokio::test]
async fn once_the_consumers_apply_again_a_new_blocker_gets_its_grace() {
    let w = World::new().await;
    let projection = ProjectionKind::OrderSummaries;
    append_orders(w.pool(), 3).await;
    let mut sweeper = healing_test_sweeper(&w, projection);
    heal_once(&mut sweeper).await;

    let healed_to = store::head_position(w.pool()).await.unwrap();
    append_orders(w.pool(), 1).await;
    let applied_by_a_consumer = store::head_position(w.pool()).await.unwrap();
    append_orders(w.pool(), 1).await;
    let events = store::read_all(w.pool(), healed_to, 1_000).await.unwrap();
    let (first, _) = events.split_at(usize::try_from(applied_by_a_consumer - healed_to).unwrap());
    let mut conn = w.pool().acquire().await.unwrap();
    apply_batch(&mut conn, projection, first).await.unwrap();
    drop(conn);

    for _ in 0..2 {
        let outcome = sweeper.sweep_once().await.unwrap();
        assert_eq!(outcome.healed, 0, "{outcome:?}");
        assert_eq!(outcome.position, applied_by_a_consumer);
        assert_eq!(outcome.blocker, Some(applied_by_a_consumer + 1));
        // Past a tick: only the grace holds the sweeper back now.
        tokio::time::sleep(2 * HEALING_TEST_TICK).await;
    }
}

/// A heal whose batch came back full has a backlog behind it (Redis lost more than a batch),
/// and goes on at once, even while a consumer applies events of the backlog and moves the
/// mark over them.
#[tokio::test]
async fn a_backlog_is_healed_batch_after_batch_whatever_the_consumers_apply_meanwhile() {
    let w = World::new().await;
    let projection = ProjectionKind::OrderSummaries;
    while store::head_position(w.pool()).await.unwrap() <= 2 * projector::sweeper::HEAL_BATCH {
        append_orders(w.pool(), 50).await;
    }
    let mut sweeper = healing_test_sweeper(&w, projection);
    let first = heal_once_returning(&mut sweeper).await;
    assert_eq!(first.position, projector::sweeper::HEAL_BATCH);
    // A consumer applies the events just after the heal.
    let next = store::read_all(w.pool(), first.position, 3).await.unwrap();
    let mut conn = w.pool().acquire().await.unwrap();
    apply_batch(&mut conn, projection, &next).await.unwrap();
    drop(conn);

    let outcome = sweeper.sweep_once().await.unwrap();
    assert!(outcome.healed > 0, "{outcome:?}");
    assert!(outcome.position > first.position + 3, "{outcome:?}");
}

/// An order stored in a currency this release does not list (one a newer release added during
/// a rollout, or one withdrawn from ISO 4217 since) is projected like any other, not failed as
/// damage: the code was checked against the list of the release that wrote it.
#[tokio::test]
async fn an_order_in_a_currency_this_release_does_not_list_is_projected() {
    let w = World::new().await;
    let order = Uuid::new_v4();
    assert!(events::money::Currency::parse("DEM").is_none());
    for (event_type, data) in [
        (
            "OrderCreated",
            serde_json::json!({"order_id": order, "customer_id": Uuid::new_v4(), "currency": "DEM"}),
        ),
        (
            "ItemAdded",
            serde_json::json!({"sku": "SKU-1", "quantity": 2, "unit_price": 1250}),
        ),
    ] {
        store::testing::append_as_another_release_wrote_it(w.pool(), order, event_type, 1, data)
            .await;
    }
    let all = store::read_all(w.pool(), 0, 100).await.unwrap();
    let mut conn = w.pool().acquire().await.unwrap();
    for projection in ProjectionKind::ALL {
        let outcome = apply_batch(&mut conn, projection, &all).await.unwrap();
        assert_eq!(outcome.applied, 2, "{projection}");
    }
    drop(conn);
    let (currency, total): (String, i64) =
        sqlx::query_as("SELECT currency, total FROM order_summaries WHERE order_id = $1")
            .bind(order)
            .fetch_one(w.pool())
            .await
            .unwrap();
    assert_eq!((currency.as_str(), total), ("DEM", 2500));
    w.assert_exact().await;
}

/// A full heal batch the consumers had mostly applied (one order stuck behind a slow or killed
/// consumer) is no backlog: the next blocker, an event in flight to them, is left to them, not
/// healed at once.
#[tokio::test]
async fn a_full_heal_batch_the_consumers_had_mostly_applied_is_no_backlog() {
    let w = World::new().await;
    let projection = ProjectionKind::OrderSummaries;
    while store::head_position(w.pool()).await.unwrap() <= 2 * projector::sweeper::HEAL_BATCH {
        append_orders(w.pool(), 50).await;
    }
    let all = store::read_all(w.pool(), 0, 100_000).await.unwrap();
    // Every order applied but the first (stuck) and one past the first heal's batch (in flight).
    let stuck = all[0].stream_id.clone();
    let in_flight = all
        .iter()
        .find(|e| e.global_position > projector::sweeper::HEAL_BATCH + 10)
        .unwrap()
        .stream_id
        .clone();
    let applied: Vec<_> = all
        .iter()
        .filter(|e| e.stream_id != stuck && e.stream_id != in_flight)
        .cloned()
        .collect();
    let mut conn = w.pool().acquire().await.unwrap();
    apply_batch(&mut conn, projection, &applied).await.unwrap();
    drop(conn);

    let mut sweeper = healing_test_sweeper(&w, projection);
    let first = heal_once_returning(&mut sweeper).await;
    let blocker = first.blocker.expect("the order in flight blocks the mark");
    assert!(blocker > projector::sweeper::HEAL_BATCH, "{first:?}");
    let next = sweeper.sweep_once().await.unwrap();
    assert_eq!(next.healed, 0, "{next:?}");
    assert_eq!(next.blocker, Some(blocker));
}

/// A sweeper that heals at once and retries at once, dead-lettering to `dlq` an event it has
/// seen fail `max_attempts` times.
fn eager_sweeper_with_dead_letters(
    w: &World,
    projection: ProjectionKind,
    dlq: &DeadLetterQueue,
    max_attempts: u32,
) -> Sweeper {
    Sweeper::new(
        projection,
        w.pool().clone(),
        Some(projector::sweeper::DeadLetters {
            queue: dlq.clone(),
            consumer: "sweeper".into(),
        }),
        SweeperSettings {
            grace: Duration::ZERO,
            max_attempts,
            retry_base: Duration::ZERO,
            ..SweeperSettings::default()
        },
    )
}

/// A sweeper for the healing tests, with [`HEALING_TEST_GRACE`] and [`HEALING_TEST_TICK`].
fn healing_test_sweeper(w: &World, projection: ProjectionKind) -> Sweeper {
    Sweeper::new(
        projection,
        w.pool().clone(),
        None,
        SweeperSettings {
            grace: HEALING_TEST_GRACE,
            tick: HEALING_TEST_TICK,
            ..SweeperSettings::default()
        },
    )
}

/// Sweeps until the sweeper heals (once its grace has passed) and returns that sweep.
async fn heal_once_returning(sweeper: &mut Sweeper) -> projector::sweeper::SweepOutcome {
    let started = std::time::Instant::now();
    loop {
        let outcome = sweeper.sweep_once().await.unwrap();
        if outcome.healed > 0 {
            return outcome;
        }
        assert!(started.elapsed() < DEADLINE, "no heal after the grace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sweeps until the sweeper heals (once its grace has passed), and checks the heal reached the
/// head.
async fn heal_once(sweeper: &mut Sweeper) {
    let outcome = heal_once_returning(sweeper).await;
    assert_eq!(outcome.blocker, None, "{outcome:?}");
}

/// A sweeper of `projection` on the test's database, without dead letters, that heals a blocker
/// only after `grace`.
fn test_sweeper(w: &World, projection: ProjectionKind, grace: Duration) -> Sweeper {
    Sweeper::new(
        projection,
        w.pool().clone(),
        None,
        SweeperSettings {
            grace,
            ..SweeperSettings::default()
        },
    )
}

#[test]
fn a_bad_number_setting_exits_2_with_one_line_naming_it() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_projector"))
        .env("DB_MAX_CONNECTIONS", "many")
        .output()
        .expect("run the projector");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("DB_MAX_CONNECTIONS"), "{lines:?}");
}

/// The database was restored from a backup while Redis kept its stream: an entry names an
/// event the store does not have at its position (another order's creation), and the store's
/// own event at that position never reached the stream (Redis refused its id). The projector
/// acknowledges the stranger without applying it and the read models equal the event store.
#[tokio::test]
async fn an_entry_of_another_history_is_never_applied() {
    let mut w = World::new().await;
    append_orders(w.pool(), 2).await;
    w.publish().await;
    let head = store::head_position(w.pool()).await.unwrap();
    let mut lost = store::read_all(w.pool(), 0, 1).await.unwrap().remove(0);
    let stranger = Uuid::new_v4();
    lost.global_position = head + 1;
    lost.event_id = Uuid::new_v4();
    lost.stream_id = order_stream_id(stranger);
    lost.data["order_id"] = stranger.to_string().into();
    w.publisher.publish(&[lost]).await.unwrap();
    append_orders(w.pool(), 1).await;
    w.publish().await;

    let (token, task) = w
        .spawn_projector("solo", &["--sweep-grace-ms", "300"])
        .await;
    w.wait_caught_up().await;
    wait_nothing_pending(&w, "order_summaries").await;
    let stranger_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM order_summaries WHERE order_id = $1")
            .bind(stranger)
            .fetch_one(w.pool())
            .await
            .unwrap();
    assert_eq!(stranger_rows, 0, "the stranger's order was applied");
    w.assert_exact().await;
    token.cancel();
    task.await.unwrap().unwrap();
}

/// How many of the streams other than `except` `projection` has applied up to their last
/// event.
async fn streams_applied_to_the_end(w: &World, projection: ProjectionKind, except: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT stream_id, max(stream_version) AS last FROM events \
                               WHERE stream_id <> $2 GROUP BY stream_id) e \
         JOIN projection_streams p ON p.stream_id = e.stream_id AND p.version = e.last \
         WHERE p.projection = $1",
    )
    .bind(projection.name())
    .bind(except)
    .fetch_one(w.pool())
    .await
    .unwrap()
}

/// A rollout under way: a newer release of the command service wrote an event this projector
/// cannot read (`OrderPlaced` at a schema version above the newest it knows), and an event it
/// can read behind it; an instance that stopped had taken both and had them delivered ten
/// times. However often the projector tries (many times `--max-attempts`, by its consumers and
/// its sweeper) and however often the entries were delivered, it holds both and never
/// dead-letters or parks them; every other order flows; the mark stops before the held event;
/// both entries stay pending in Redis, where an instance of the newer release claims them; and
/// once such an instance has applied them, the old one acknowledges its copies.
#[tokio::test]
async fn an_event_of_a_newer_release_is_held_for_that_release_never_dead_lettered() {
    let mut w = World::new().await;
    let victim = Uuid::new_v4();
    let mut state = OrderState::default();
    let cmds = commands(victim, Uuid::new_v4(), support::Fate::Draft);
    run_commands(w.pool(), victim, &cmds, &mut state).await;
    let newer = events::current_schema_version("OrderPlaced").unwrap() + 1;
    let placed = store::testing::append_as_another_release_wrote_it(
        w.pool(),
        victim,
        "OrderPlaced",
        newer,
        serde_json::json!({"total": 1299, "channel": "web"}),
    )
    .await;
    store::testing::append_as_another_release_wrote_it(
        w.pool(),
        victim,
        "OrderCancelled",
        1,
        serde_json::json!({"reason": "changed my mind"}),
    )
    .await;
    w.publish().await;
    let held = [format!("{placed}-0"), format!("{}-0", placed + 1)];
    for projection in ProjectionKind::ALL {
        let gone = group_consumer(&w, projection, "gone");
        gone.ensure_group(bus::FROM_BEGINNING).await.unwrap();
        assert_eq!(gone.read_new(5, Duration::ZERO).await.unwrap().len(), 5);
        let mut conn = w.redis.clone();
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(w.keys.stream())
            .arg(projection.name())
            .arg("gone")
            .arg(0)
            .arg(&held)
            .arg("RETRYCOUNT")
            .arg(10)
            .arg("JUSTID")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    append_orders(w.pool(), 4).await;
    w.publish().await;
    let args = [FAST, &["--sweep-grace-ms", "100", "--claim-idle-ms", "100"]].concat();
    let (token, task, port) = w.spawn_projector_serving("old", &args).await;

    let stream = order_stream_id(victim);
    for projection in ProjectionKind::ALL {
        wait_until(
            DEADLINE,
            &format!("{projection} applies the other orders"),
            || {
                let stream = &stream;
                let w = &w;
                async move {
                    (streams_applied_to_the_end(w, projection, stream).await == 4).then_some(())
                }
            },
        )
        .await;
        wait_until(
            DEADLINE,
            &format!("{projection} tried often"),
            || async move {
                let holds =
                    support::metric(port, "projector_newer_release_holds_total", projection).await;
                holds.is_some_and(|holds| holds >= 10.0).then_some(())
            },
        )
        .await;
    }

    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    for projection in ProjectionKind::ALL {
        assert_eq!(dlq.len(projection.name()).await.unwrap(), 0, "{projection}");
        let (version, parked): (i64, Option<i64>) = sqlx::query_as(
            "SELECT version, parked_version FROM projection_streams \
             WHERE projection = $1 AND stream_id = $2",
        )
        .bind(projection.name())
        .bind(&stream)
        .fetch_one(w.pool())
        .await
        .unwrap();
        assert_eq!(
            (version, parked),
            (3, None),
            "{projection}: held, not parked"
        );
        assert_eq!(w.checkpoint(projection).await, placed - 1, "{projection}");
    }
    let (status, version): (String, i64) =
        sqlx::query_as("SELECT status, version FROM order_summaries WHERE order_id = $1")
            .bind(victim)
            .fetch_one(w.pool())
            .await
            .unwrap();
    assert_eq!((status.as_str(), version), ("draft", 3));
    // `projector status` of this release names what is in the way.
    let (_, report, table) = status::status(&w).await;
    let summaries = status::projection(&report, "order_summaries");
    assert_eq!(
        summaries["oldest_unapplied_event"],
        format!("OrderPlaced v{newer}")
    );
    assert_eq!(summaries["oldest_unapplied_needs_newer_release"], true);
    assert!(table.contains("written by a newer release"), "{table}");

    // An instance of the newer release applies both events to order_summaries (through its
    // sweeper, say): the old one finds that out and acknowledges its held entries there.
    sqlx::query(
        "UPDATE projection_streams SET version = 5 \
         WHERE projection = 'order_summaries' AND stream_id = $1",
    )
    .bind(&stream)
    .execute(w.pool())
    .await
    .unwrap();
    wait_until(
        DEADLINE,
        "the old instance lets go of what was applied",
        || async { (pending_count(&w, "order_summaries").await == 0).then_some(()) },
    )
    .await;
    assert_eq!(dlq.len("order_summaries").await.unwrap(), 0);
    token.cancel();
    task.await.unwrap().unwrap();
    // What an instance of the newer release finds in customer_stats: exactly the two held
    // entries, to claim.
    let claimed = group_consumer(&w, ProjectionKind::CustomerStats, "new")
        .autoclaim(Duration::ZERO, 100, |_| false)
        .await
        .unwrap();
    let ids: Vec<(String, u32)> = claimed.into_iter().map(|(e, n)| (e.id, n)).collect();
    // Delivered ten times before, once more to `old`, and once to `new`: `old` holding them
    // never counted another delivery.
    assert_eq!(
        ids,
        held.iter().map(|id| (id.clone(), 12)).collect::<Vec<_>>()
    );
}

/// Makes consumer `gone` of every projection's group hold all entries published so far, as an
/// instance that stopped would, with the entries `often` delivered `deliveries` times.
async fn held_by_a_stopped_consumer(w: &World, often: &[String], deliveries: u32) {
    held_by(w, "gone", often, deliveries).await;
}

/// [`held_by_a_stopped_consumer`], the consumer named `consumer`.
async fn held_by(w: &World, consumer: &str, often: &[String], deliveries: u32) {
    for projection in ProjectionKind::ALL {
        let gone = group_consumer(w, projection, consumer);
        gone.ensure_group(bus::FROM_BEGINNING).await.unwrap();
        while !gone.read_new(100, Duration::ZERO).await.unwrap().is_empty() {}
        let mut conn = w.redis.clone();
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(w.keys.stream())
            .arg(projection.name())
            .arg(consumer)
            .arg(0)
            .arg(often)
            .arg("RETRYCOUNT")
            .arg(deliveries)
            .arg("JUSTID")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// The entry ids of `order`'s events.
async fn entry_ids(w: &World, order: Uuid) -> Vec<String> {
    store::read_stream(w.pool(), &order_stream_id(order), 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| format!("{}-0", e.global_position))
        .collect()
}

/// How many streams of `projection` are parked.
async fn parked_streams(w: &World, projection: ProjectionKind) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM projection_streams WHERE projection = $1 \
         AND parked_version IS NOT NULL",
    )
    .bind(projection.name())
    .fetch_one(w.pool())
    .await
    .unwrap()
}

/// The rollout of a newer projector: the instances it replaces held entries for it (or behind
/// such an event) and had them delivered many times over. The new instance claims them; one
/// order's events its sweeper had already applied from the store, the other's nobody had. A
/// high delivery count is only a reason to try each entry once: both orders end exact, nothing
/// is dead-lettered and no order is parked.
#[tokio::test]
async fn entries_delivered_many_times_while_held_are_applied_by_the_instance_that_claims_them() {
    let mut w = World::new().await;
    let ids = append_orders(w.pool(), 2).await;
    let (healed, fresh) = (ids[0], ids[1]);
    w.publish().await;
    let mut often = entry_ids(&w, healed).await;
    often.extend(entry_ids(&w, fresh).await);
    held_by_a_stopped_consumer(&w, &often, 10).await;
    let events = store::read_stream(w.pool(), &order_stream_id(healed), 0, 100)
        .await
        .unwrap();
    let mut conn = w.pool().acquire().await.unwrap();
    for projection in ProjectionKind::ALL {
        apply_batch(&mut conn, projection, &events).await.unwrap();
    }
    drop(conn);

    let args = [
        FAST,
        &["--sweep-grace-ms", "600000", "--claim-idle-ms", "100"],
    ]
    .concat();
    let (token, task) = w.spawn_projector("new", &args).await;
    for projection in ProjectionKind::ALL {
        wait_nothing_pending(&w, projection.name()).await;
    }
    w.wait_caught_up().await;
    w.assert_exact().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    for projection in ProjectionKind::ALL {
        assert_eq!(dlq.len(projection.name()).await.unwrap(), 0, "{projection}");
        assert_eq!(parked_streams(&w, projection).await, 0, "{projection}");
    }
    token.cancel();
    task.await.unwrap().unwrap();
}

/// Entries delivered many times are dead-lettered only for what their tries show: one whose
/// single try fails is dead-lettered after that try, with the try's error; one whose earlier
/// tries never ended (each stopped the consumer making it, which no error counts) is
/// dead-lettered without another try. Both orders are parked; the others flow.
#[tokio::test]
async fn entries_delivered_many_times_are_dead_lettered_only_when_their_tries_fail() {
    let mut w = World::new().await;
    let refused = Uuid::new_v4();
    support::refuse_placing(w.pool(), refused).await;
    let mut state = OrderState::default();
    let cmds = commands(refused, Uuid::new_v4(), support::Fate::Placed);
    run_commands(w.pool(), refused, &cmds, &mut state).await;
    let crashing = append_orders(w.pool(), 3).await[0];
    w.publish().await;
    let refused_ids = entry_ids(&w, refused).await;
    let crashing_first = entry_ids(&w, crashing).await.remove(0);
    let often = [refused_ids.clone(), vec![crashing_first.clone()]].concat();
    held_by_a_stopped_consumer(&w, &often, 10).await;
    // Two tries of it began and never ended, in every group.
    begin_unfinished_tries_in_every_group(&w, &crashing_first, 2).await;

    let args = [
        FAST,
        &["--sweep-grace-ms", "600000", "--claim-idle-ms", "100"],
    ]
    .concat();
    let (token, task) = w.spawn_projector("new", &args).await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let letters = wait_until(DEADLINE, "two dead letters", || async {
        let letters = dlq.list("order_summaries", 10).await.unwrap();
        (letters.len() == 2).then_some(letters)
    })
    .await;
    let placing = &refused_ids[3];
    let of = |id: &str| letters.iter().find(|l| l.original_id == id).unwrap();
    assert!(
        of(placing).error.contains("refusing order"),
        "{}",
        of(placing).error
    );
    assert_eq!(of(placing).attempts, 11);
    assert!(
        of(&crashing_first).error.contains("never ended"),
        "{}",
        of(&crashing_first).error
    );
    wait_until(DEADLINE, "both orders are parked", || async {
        (parked_streams(&w, ProjectionKind::OrderSummaries).await == 2).then_some(())
    })
    .await;
    wait_until(
        DEADLINE,
        "customer_stats dead-letters the crashing one",
        || async { (dlq.len("customer_stats").await.unwrap() == 1).then_some(()) },
    )
    .await;
    let stream = order_stream_id(crashing);
    wait_until(DEADLINE, "the two other orders are applied", || async {
        let applied = streams_applied_to_the_end(&w, ProjectionKind::OrderSummaries, &stream).await;
        (applied == 2).then_some(())
    })
    .await;
    token.cancel();
    task.await.unwrap().unwrap();
}

/// An instance stopped by an entry (a crash, an OOM kill) restarts under the same name, as a
/// container restarted in its pod does, and meets the entry again among its own pending
/// entries, delivered once more at each restart. Once its deliveries reach `MAX_ATTEMPTS` and
/// two of its tries never ended, it is dead-lettered without another try, as a
/// claimed entry is, instead of stopping the instance at every restart for ever.
#[tokio::test]
async fn an_entry_that_stopped_the_instance_is_dead_lettered_when_it_restarts_under_the_same_name_not_tried_for_ever()
 {
    let mut w = World::new().await;
    let crashing = append_orders(w.pool(), 2).await[0];
    w.publish().await;
    let crashing_first = entry_ids(&w, crashing).await.remove(0);
    held_by(&w, "same", std::slice::from_ref(&crashing_first), 10).await;
    // Two tries of it began and never ended, in every group.
    begin_unfinished_tries_in_every_group(&w, &crashing_first, 2).await;

    // No claims: the entry can only come back as the instance's own.
    let args = [
        FAST,
        &["--sweep-grace-ms", "600000", "--claim-idle-ms", "600000"],
    ]
    .concat();
    let (token, task) = w.spawn_projector("same", &args).await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    for projection in ProjectionKind::ALL {
        let letters =
            support::first_letters(&dlq, projection, "the crashing entry is dead-lettered").await;
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].original_id, crashing_first);
        assert!(
            letters[0].error.contains("never ended"),
            "{}",
            letters[0].error
        );
    }
    token.cancel();
    task.await.unwrap().unwrap();
}

/// An instance killed twice mid-try for reasons of its own (an OOM kill, two kills in a
/// deploy) restarts under the same name and meets one of its pending entries delivered ten
/// times with two tries that never ended; meanwhile another instance's sweeper applied that
/// entry's order from the store, and the order has a new event since. The entry is no failure:
/// its event is applied, so it is acknowledged and its tries forgotten; nothing is
/// dead-lettered, the order is not parked, and its new event is applied.
#[tokio::test]
async fn an_entry_given_up_on_whose_event_is_applied_already_is_acknowledged_not_dead_lettered() {
    let mut w = World::new().await;
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let cmds = commands(order, Uuid::new_v4(), support::Fate::Draft);
    run_commands(w.pool(), order, &cmds, &mut state).await;
    append_orders(w.pool(), 1).await;
    w.publish().await;
    let first = entry_ids(&w, order).await.remove(0);
    held_by(&w, "same", std::slice::from_ref(&first), 10).await;
    // Two tries of it began and never ended, in every group.
    begin_unfinished_tries_in_every_group(&w, &first, 2).await;
    // Another instance's sweeper applied the order from the store meanwhile.
    let stream = order_stream_id(order);
    let applied = store::read_stream(w.pool(), &stream, 0, 100).await.unwrap();
    let mut conn = w.pool().acquire().await.unwrap();
    for projection in ProjectionKind::ALL {
        apply_batch(&mut conn, projection, &applied).await.unwrap();
    }
    drop(conn);
    run_commands(
        w.pool(),
        order,
        &[events::OrderCommand::PlaceOrder],
        &mut state,
    )
    .await;
    w.publish().await;

    // No claims and no healing: the entry comes back only as the instance's own.
    let args = [
        FAST,
        &["--sweep-grace-ms", "600000", "--claim-idle-ms", "600000"],
    ]
    .concat();
    let (token, task) = w.spawn_projector("same", &args).await;
    w.wait_caught_up().await;
    for projection in ProjectionKind::ALL {
        wait_nothing_pending(&w, projection.name()).await;
    }
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    for projection in ProjectionKind::ALL {
        assert_eq!(
            parked_streams(&w, projection).await,
            0,
            "{projection} parked"
        );
        assert_eq!(
            dlq.len(projection.name()).await.unwrap(),
            0,
            "{projection} letters"
        );
        assert_eq!(
            unfinished_tries(&w, projection, &first).await,
            0,
            "{projection}"
        );
    }
    assert_eq!(support::summary_status(&w, &stream).await, "placed");
    w.assert_exact().await;
    token.cancel();
    task.await.unwrap().unwrap();
}

/// Records `tries` tries of entry `id` in `projection`'s group that began and never ended, as
/// instances stopped by the entry leave them.
async fn begin_unfinished_tries(w: &World, projection: ProjectionKind, id: &str, tries: i64) {
    let mut conn = w.redis.clone();
    let _: i64 = redis::cmd("HSET")
        .arg(w.keys.trying(projection.name()))
        .arg(id)
        .arg(tries)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// [`begin_unfinished_tries`] in the group of every projection.
async fn begin_unfinished_tries_in_every_group(w: &World, id: &str, tries: i64) {
    for projection in ProjectionKind::ALL {
        begin_unfinished_tries(w, projection, id, tries).await;
    }
}

/// How many unfinished tries `projection`'s group records for entry `id` (0 when none).
async fn unfinished_tries(w: &World, projection: ProjectionKind, id: &str) -> i64 {
    let mut conn = w.redis.clone();
    let tries: Option<i64> = redis::cmd("HGET")
        .arg(w.keys.trying(projection.name()))
        .arg(id)
        .query_async(&mut conn)
        .await
        .unwrap();
    tries.unwrap_or(0)
}

/// An entry dead-lettered because more than two tries of it never ended is forgotten in
/// `<stream>:trying:<group>` with its letter: the hash keeps no field of an entry that is no
/// longer pending.
#[tokio::test]
async fn an_entry_dead_lettered_because_its_tries_never_ended_leaves_no_unfinished_try_behind() {
    let mut w = World::new().await;
    let crashing = append_orders(w.pool(), 2).await[0];
    w.publish().await;
    let first = entry_ids(&w, crashing).await.remove(0);
    held_by_a_stopped_consumer(&w, std::slice::from_ref(&first), 10).await;
    // Two tries of it began and never ended, in every group.
    begin_unfinished_tries_in_every_group(&w, &first, 2).await;

    let args = [
        FAST,
        &["--sweep-grace-ms", "600000", "--claim-idle-ms", "100"],
    ]
    .concat();
    let (token, task) = w.spawn_projector("new", &args).await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    for projection in ProjectionKind::ALL {
        let letters = support::first_letters(&dlq, projection, "the entry is dead-lettered").await;
        assert_eq!(letters[0].original_id, first);
        assert!(
            letters[0].error.contains("never ended"),
            "{}",
            letters[0].error
        );
        wait_until(DEADLINE, "its unfinished tries are forgotten", || async {
            (unfinished_tries(&w, projection, &first).await == 0).then_some(())
        })
        .await;
    }
    token.cancel();
    task.await.unwrap().unwrap();
}

/// A consumer stopped twice trying an order's placing (two unfinished tries recorded, the
/// entry pending for it) and nobody has claimed the entry yet; the sweeper applies the order
/// from the store, the placing fails there too, and the sweeper dead-letters it: the letter
/// acknowledges the entry and forgets its unfinished tries, so none is left behind for good.
#[tokio::test]
async fn an_event_the_sweeper_dead_letters_leaves_no_unfinished_try_of_its_entry_behind() {
    let mut w = World::new().await;
    let victim = Uuid::new_v4();
    support::refuse_placing(w.pool(), victim).await;
    let cmds = commands(victim, Uuid::new_v4(), support::Fate::Placed);
    run_commands(w.pool(), victim, &cmds, &mut OrderState::default()).await;
    w.publish().await;
    let placing = entry_ids(&w, victim).await.remove(3);
    held_by_a_stopped_consumer(&w, std::slice::from_ref(&placing), 1).await;
    let projection = ProjectionKind::OrderSummaries;
    begin_unfinished_tries(&w, projection, &placing, 2).await;

    // Nothing is claimed: the sweeper alone meets the placing.
    let args = [
        FAST,
        &["--sweep-grace-ms", "100", "--claim-idle-ms", "600000"],
    ]
    .concat();
    let (token, task) = w.spawn_projector("new", &args).await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let letters = wait_until(DEADLINE, "the sweeper dead-letters the placing", || async {
        let letters = dlq.list(projection.name(), 10).await.unwrap();
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(letters[0].original_id, placing);
    assert_eq!(letters[0].consumer, "new/sweeper");
    assert_eq!(unfinished_tries(&w, projection, &placing).await, 0);
    token.cancel();
    task.await.unwrap().unwrap();
}

/// A rebuild by a release older than one of the events fails, naming the event, instead of
/// parking that order in the new read model; the live read model is left as it was. A verify
/// fails too, naming it, instead of reporting the order as a difference.
#[tokio::test]
async fn a_rebuild_meeting_an_event_of_a_newer_release_fails_and_changes_nothing() {
    let w = World::new().await;
    append_orders(w.pool(), 3).await;
    projector::rebuild::rebuild(w.pool(), ProjectionKind::OrderSummaries, 2, None)
        .await
        .expect("a rebuild of what this release reads");
    let live = || async {
        let rows: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT order_id, version FROM order_summaries ORDER BY order_id")
                .fetch_all(w.pool())
                .await
                .unwrap();
        rows
    };
    let before = live().await;
    assert_eq!(before.len(), 3);

    let victim = Uuid::new_v4();
    let mut state = OrderState::default();
    let cmds = commands(victim, Uuid::new_v4(), support::Fate::Draft);
    run_commands(w.pool(), victim, &cmds, &mut state).await;
    store::testing::append_as_another_release_wrote_it(
        w.pool(),
        victim,
        "OrderDiscounted",
        1,
        serde_json::json!({"percent": 10}),
    )
    .await;
    append_orders(w.pool(), 2).await;
    let err = projector::verify::verify(w.pool(), ProjectionKind::OrderSummaries)
        .await
        .expect_err("verify refuses to call the order a difference");
    assert!(format!("{err:#}").contains("OrderDiscounted v1"), "{err:#}");
    let err = projector::rebuild::rebuild(w.pool(), ProjectionKind::OrderSummaries, 2, None)
        .await
        .expect_err("the rebuild fails");
    let message = format!("{err:#}");
    assert!(
        message.contains("newer release") && message.contains(&order_stream_id(victim)),
        "{message}"
    );
    assert_eq!(live().await, before);
    let parked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM projection_streams WHERE parked_version IS NOT NULL",
    )
    .fetch_one(w.pool())
    .await
    .unwrap();
    assert_eq!(parked, 0);
}

/// A draft order (three events) whose fourth event is damaged: an `ItemAdded` of the current
/// schema version whose payload does not fit it, so every apply of it fails (live or in a
/// rebuild's shadow tables alike). Returns the order id.
async fn damaged_order(pool: &sqlx::PgPool) -> Uuid {
    let order = Uuid::new_v4();
    let mut state = OrderState::default();
    let cmds = commands(order, Uuid::new_v4(), support::Fate::Draft);
    run_commands(pool, order, &cmds, &mut state).await;
    store::testing::append_as_another_release_wrote_it(
        pool,
        order,
        "ItemAdded",
        1,
        serde_json::json!({"nope": 1}),
    )
    .await;
    order
}

/// A rebuild meets a poison event and, pages later, an event of a newer release, so it fails:
/// it leaves Redis as it was (no dead letter, no live entry acknowledged). A rebuild that
/// succeeds dead-letters what failed, after its swap.
#[tokio::test]
async fn a_failed_rebuild_writes_no_dead_letter_and_acknowledges_no_live_entry() {
    let mut w = World::new().await;
    damaged_order(w.pool()).await;
    append_orders(w.pool(), 2).await;
    let newer = Uuid::new_v4();
    let mut state = OrderState::default();
    let cmds = commands(newer, Uuid::new_v4(), support::Fate::Draft);
    run_commands(w.pool(), newer, &cmds, &mut state).await;
    store::testing::append_as_another_release_wrote_it(
        w.pool(),
        newer,
        "OrderDiscounted",
        1,
        serde_json::json!({"percent": 10}),
    )
    .await;
    w.publish().await;
    let live = group_consumer(&w, ProjectionKind::OrderSummaries, "live");
    live.ensure_group(bus::FROM_BEGINNING).await.unwrap();
    live.read_new(1_000, Duration::ZERO).await.unwrap();
    let pending = pending_count(&w, "order_summaries").await;
    assert!(pending > 0);

    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let dead_letters = projector::sweeper::DeadLetters {
        queue: dlq.clone(),
        consumer: "rebuild".into(),
    };
    let err = projector::rebuild::rebuild(
        w.pool(),
        ProjectionKind::OrderSummaries,
        2,
        Some(&dead_letters),
    )
    .await
    .expect_err("the rebuild fails at the newer release's event");
    assert!(format!("{err:#}").contains("newer release"), "{err:#}");
    assert_eq!(dlq.len("order_summaries").await.unwrap(), 0);
    assert_eq!(pending_count(&w, "order_summaries").await, pending);

    // Without the newer release's event, the same rebuild succeeds and writes the letter.
    let w = World::new().await;
    let victim = damaged_order(w.pool()).await;
    append_orders(w.pool(), 2).await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let dead_letters = projector::sweeper::DeadLetters {
        queue: dlq.clone(),
        consumer: "rebuild".into(),
    };
    let outcome = projector::rebuild::rebuild(
        w.pool(),
        ProjectionKind::OrderSummaries,
        2,
        Some(&dead_letters),
    )
    .await
    .unwrap();
    assert_eq!(outcome.parked, 1);
    let letters = dlq.list("order_summaries", 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].original.get("stream_id"),
        Some(&order_stream_id(victim))
    );
    assert_eq!(
        letters[0]
            .original
            .get("stream_version")
            .map(String::as_str),
        Some("4")
    );
}

/// A rebuild keeps a bounded number of failed events for their dead letters (a systematic
/// fault would otherwise keep one event per order in memory): past the bound, orders are
/// parked without a letter, and `dlq parked` lists every parked order, letter or not.
#[tokio::test]
async fn a_rebuild_dead_letters_a_bounded_number_of_failures_and_parks_every_one() {
    let w = World::new().await;
    let mut damaged = Vec::new();
    for _ in 0..3 {
        damaged.push(order_stream_id(damaged_order(w.pool()).await));
    }
    append_orders(w.pool(), 2).await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    let dead_letters = projector::sweeper::DeadLetters {
        queue: dlq.clone(),
        consumer: "rebuild".into(),
    };
    let outcome = projector::rebuild::rebuild_keeping_letters(
        w.pool(),
        ProjectionKind::OrderSummaries,
        100,
        Some(&dead_letters),
        1,
    )
    .await
    .unwrap();

    assert_eq!(outcome.parked, 3);
    let letters = dlq.list("order_summaries", 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    let (parked, total) = projector::parked::list(w.pool(), &dlq, ProjectionKind::OrderSummaries)
        .await
        .unwrap();
    assert_eq!(total, 3);
    let mut listed: Vec<&str> = parked.iter().map(|p| p.stream_id.as_str()).collect();
    listed.sort_unstable();
    damaged.sort_unstable();
    assert_eq!(listed, damaged);
    assert_eq!(parked.iter().map(|p| p.letters).sum::<usize>(), 1);
}

/// A paid order cancelled by the previous release (`OrderCancelled` at schema version 1, which
/// recorded no refund) is projected like any other: both read models take the upcast event,
/// the order is cancelled and its money no longer counts as spent.
#[tokio::test]
async fn a_cancel_stored_by_the_previous_release_is_projected_through_its_upcast() {
    let mut w = World::new().await;
    let order = Uuid::new_v4();
    let customer = Uuid::new_v4();
    let mut state = OrderState::default();
    let cmds = commands(order, customer, support::Fate::Paid);
    run_commands(w.pool(), order, &cmds, &mut state).await;
    store::testing::append_as_another_release_wrote_it(
        w.pool(),
        order,
        "OrderCancelled",
        1,
        serde_json::json!({"reason": "changed my mind"}),
    )
    .await;
    append_orders(w.pool(), 3).await;
    w.publish().await;
    let (token, task) = w.spawn_projector("solo", &[]).await;
    w.wait_caught_up().await;
    w.assert_exact().await;
    let status: String =
        sqlx::query_scalar("SELECT status FROM order_summaries WHERE order_id = $1")
            .bind(order)
            .fetch_one(w.pool())
            .await
            .unwrap();
    assert_eq!(status, "cancelled");
    let spent: i64 =
        sqlx::query_scalar("SELECT total_spent FROM customer_stats WHERE customer_id = $1")
            .bind(customer)
            .fetch_one(w.pool())
            .await
            .unwrap();
    assert_eq!(spent, 0);
    token.cancel();
    task.await.unwrap().unwrap();
}

/// The sweeper, healing from the event store (Redis lost the entries, say), applies every
/// order it can and holds at an event a newer release wrote; while that event stays the
/// blocker it does not try it again (each try would fail a transaction per order of the batch
/// after it); once an instance of that release has applied it, the mark moves on.
#[tokio::test]
async fn the_sweeper_holds_at_an_event_of_a_newer_release_without_trying_it_again() {
    let w = World::new().await;
    let victim = Uuid::new_v4();
    let mut state = OrderState::default();
    let cmds = commands(victim, Uuid::new_v4(), support::Fate::Draft);
    run_commands(w.pool(), victim, &cmds, &mut state).await;
    let held = store::testing::append_as_another_release_wrote_it(
        w.pool(),
        victim,
        "OrderDiscounted",
        1,
        serde_json::json!({"percent": 10}),
    )
    .await;
    append_orders(w.pool(), 3).await;
    let head = store::head_position(w.pool()).await.unwrap();
    let stream = order_stream_id(victim);
    let projection = ProjectionKind::OrderSummaries;
    let mut sweeper = test_sweeper(&w, projection, Duration::ZERO);

    let first = sweeper.sweep_once().await.unwrap();
    assert!(first.healed > 0);
    assert_eq!(
        (first.position, first.blocker, first.held_for_newer_release),
        (held - 1, Some(held), false)
    );
    assert_eq!(streams_applied_to_the_end(&w, projection, &stream).await, 3);
    for _ in 0..3 {
        let again = sweeper.sweep_once().await.unwrap();
        assert_eq!(
            (again.blocker, again.healed, again.held_for_newer_release),
            (Some(held), 0, true)
        );
    }

    // An instance of the newer release applies it.
    sqlx::query(
        "UPDATE projection_streams SET version = 4 WHERE projection = $1 AND stream_id = $2",
    )
    .bind(projection.name())
    .bind(&stream)
    .execute(w.pool())
    .await
    .unwrap();
    let after = sweeper.sweep_once().await.unwrap();
    assert_eq!(
        (after.position, after.blocker, after.held_for_newer_release),
        (head, None, false)
    );
}

/// Another instance is the sweeper (the test holds its lock), so this one never leads: it
/// still exports the projection's lag, as it grows and as it falls back to zero, instead of
/// nothing or whatever it saw when it last led.
#[tokio::test]
async fn an_instance_that_is_not_the_sweeper_exports_the_current_lag() {
    let mut w = World::new().await;
    let _leader = support::lead_every_sweeper(&w).await;
    let (token, task, port) = w.spawn_projector_serving("follower", &[]).await;
    append_orders(w.pool(), 3).await;
    let head = store::head_position(w.pool()).await.unwrap();
    for projection in ProjectionKind::ALL {
        wait_until(
            DEADLINE,
            &format!("{projection} exports a lag of {head}"),
            || async move {
                let lag = support::metric(port, "projector_lag_events", projection).await;
                (lag == Some(head as f64)).then_some(())
            },
        )
        .await;
    }
    w.publish().await;
    for projection in ProjectionKind::ALL {
        wait_until(
            DEADLINE,
            &format!("{projection} exports no lag"),
            || async move {
                // Exported as zero: a gauge that is missing is not a lag of zero.
                let lag = support::metric(port, "projector_lag_events", projection).await;
                let seconds = support::metric(port, "projector_lag_seconds", projection).await;
                (lag == Some(0.0) && seconds == Some(0.0)).then_some(())
            },
        )
        .await;
    }
    token.cancel();
    task.await.unwrap().unwrap();
}

/// `dlq purge --all` resolves every letter, past the first page of a thousand, and exits 0
/// only then; `dlq replay` walks the letters page by page the same way.
#[tokio::test]
async fn dlq_purge_all_and_replay_resolve_every_letter_beyond_the_first_page() {
    let w = World::new().await;
    support::undecodable_letters(&w, "customer_stats", projector::admin::DLQ_PAGE + 1).await;
    let output = support::projector_command(&w, &["dlq", "purge", "customer_stats", "--all"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.contains(": ok: ")).count(),
        1001
    );
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    assert_eq!(dlq.len("customer_stats").await.unwrap(), 0);

    // Replay, two letters a page: five letters of events never applied.
    let ids = append_orders(w.pool(), 5).await;
    for id in &ids {
        let first = store::read_stream(w.pool(), &order_stream_id(*id), 0, 1)
            .await
            .unwrap();
        dlq.dead_letter(
            "order_summaries",
            &projector::sweeper::entry_of(&first[0]),
            "boom",
            5,
            "test",
        )
        .await
        .unwrap();
    }
    let mut pages = 0;
    let done = projector::admin::resolve_all(
        w.pool(),
        &dlq,
        ProjectionKind::OrderSummaries,
        projector::admin::Resolve::Replay,
        2,
        |_| pages += 1,
    )
    .await
    .unwrap();
    assert_eq!((done.ok, done.failed, pages), (5, 0, 3));
    assert_eq!(dlq.len("order_summaries").await.unwrap(), 0);
    w.assert_projection_exact(ProjectionKind::OrderSummaries)
        .await;
}

/// PostgreSQL stops answering new connections without refusing them (its host died, a
/// fail-over moved its address) while another instance is the sweeper, so this one keeps
/// opening a connection to try to lead: on SIGTERM it waits for those tasks only until its
/// grace period runs out, then stops them and exits 0, saying so.
#[tokio::test]
async fn a_projector_told_to_stop_while_postgresql_is_silent_stops_its_tasks_when_the_grace_runs_out()
 {
    let w = World::new().await;
    let _leader = support::lead_every_sweeper(&w).await;
    let proxy = support::HoldingProxy::start(w.pool().connect_options().get_port()).await;
    let direct_port = w.pool().connect_options().get_port();
    let url =
        w.db.url
            .replace(&format!(":{direct_port}/"), &format!(":{}/", proxy.port()));
    assert_ne!(url, w.db.url);
    // A grace shorter than the sweepers' own wait for a connection to lead when told to stop
    // (`sweeper::STOP_WAIT`, 2 s): only the grace running out ends them.
    let mut args = w.args("silenced", &["--shutdown-grace-secs", "1"]);
    let at = args.iter().position(|a| a == "--database-url").unwrap();
    args[at + 1] = url;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_projector"))
        .args(&args[1..])
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        use tokio::io::AsyncBufReadExt as _;
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let log = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        })
    };
    let logged = |what: &'static str| {
        let log = log.clone();
        async move { log.lock().unwrap().contains(what).then_some(()) }
    };
    wait_until(DEADLINE, "the projector runs", || {
        logged("projector running")
    })
    .await;

    proxy.hold_new_connections();
    wait_until(
        DEADLINE,
        "both sweepers wait for a connection to lead",
        || async { (proxy.held() >= 2).then_some(()) },
    )
    .await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("the projector stops although PostgreSQL does not answer")
        .unwrap();
    reader.await.unwrap();
    let log = log.lock().unwrap().clone();
    assert!(status.success(), "{status}\n{log}");
    assert!(
        log.contains("projections still busy after the grace period"),
        "it did not stop for its grace running out:\n{log}"
    );
}
