//! `projector status` as an operator runs it: the binary, against the test's stores.

use bus::DeadLetterQueue;
use bus::testing::{PrivateRedis, wait_until};
use events::OrderState;
use serde_json::Value;
use uuid::Uuid;

use crate::FAST;
use crate::support::{self, DEADLINE, World, append_orders, commands, run_commands};

/// Runs `projector status --json` (and the table) against `w`; returns whether it exited 0,
/// the JSON report and the table.
pub(crate) async fn status(w: &World) -> (bool, Value, String) {
    let run = |json: bool| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_projector"));
        command
            .arg("status")
            .args(json.then_some("--json"))
            .env("DATABASE_URL", &w.db.url)
            .env("REDIS_URL", &w.redis_url)
            .env("EVENT_STREAM", w.keys.stream());
        async move { command.output().await.expect("projector status runs") }
    };
    let json = run(true).await;
    let report: Value = serde_json::from_slice(&json.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&json.stdout),
            String::from_utf8_lossy(&json.stderr)
        )
    });
    let table = run(false).await;
    assert_eq!(table.status.code(), json.status.code());
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    (json.status.success(), report, table)
}

/// The report of one projection.
pub(crate) fn projection<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["projections"]
        .as_array()
        .expect("projections")
        .iter()
        .find(|p| p["projection"] == name)
        .unwrap_or_else(|| panic!("{name} is reported: {report}"))
}

/// Before any projector runs, the status shows every event unapplied and since when, and no
/// consumer group; once a projector has dead-lettered an order's event, it shows the
/// projection caught up with one parked order and one dead letter, the other projection
/// clean, and both groups with their consumer; after the replay, nothing is left.
#[tokio::test]
async fn status_shows_the_lag_then_the_dead_lettered_order_then_a_clean_system() {
    let mut w = World::new().await;
    append_orders(w.pool(), 3).await;
    w.publish().await;
    let head = store::head_position(w.pool()).await.unwrap();
    let (complete, report, table) = status(&w).await;
    assert!(complete, "{report}");
    assert_eq!(report["head"], head);
    assert_eq!(report["published_to"], head);
    assert_eq!(report["relay_checkpoint"], Value::Null, "no relay ran");
    assert_eq!(report["unreadable"], serde_json::json!([]));
    for name in ["order_summaries", "customer_stats"] {
        let p = projection(&report, name);
        assert_eq!(
            (&p["applied_to"], &p["behind"]),
            (&0.into(), &head.into()),
            "{p}"
        );
        assert!(p["oldest_unapplied_secs"].as_f64().is_some(), "{p}");
        assert_eq!(p["oldest_unapplied_event"], "OrderCreated v1", "{p}");
        assert_eq!(p["group"], Value::Null, "{p}");
    }
    assert!(table.contains("no group"), "{table}");
    assert_eq!(
        report["attention"],
        serde_json::json!([
            "order_summaries: no projector consumes it",
            "customer_stats: no projector consumes it"
        ])
    );

    let victim = Uuid::new_v4();
    support::refuse_placing(w.pool(), victim).await;
    let (token, task) = w.spawn_projector("solo", FAST).await;
    let cmds = commands(victim, Uuid::new_v4(), support::Fate::Paid);
    run_commands(w.pool(), victim, &cmds[..4], &mut OrderState::default()).await;
    append_orders(w.pool(), 2).await;
    w.publish().await;
    let dlq = DeadLetterQueue::new(w.redis.clone(), w.keys.clone());
    wait_until(DEADLINE, "the placing is dead-lettered", || async {
        (dlq.len("order_summaries").await.unwrap() == 1).then_some(())
    })
    .await;
    w.wait_caught_up().await;
    let head = store::head_position(w.pool()).await.unwrap();
    let (complete, report, table) = status(&w).await;
    assert!(complete, "{report}");
    let summaries = projection(&report, "order_summaries");
    assert_eq!(summaries["applied_to"], head, "{summaries}");
    assert_eq!(summaries["behind"], 0, "{summaries}");
    assert_eq!(
        summaries["oldest_unapplied_secs"],
        Value::Null,
        "{summaries}"
    );
    assert_eq!(summaries["parked_streams"], 1, "{summaries}");
    assert_eq!(summaries["dead_letters"], 1, "{summaries}");
    let stats = projection(&report, "customer_stats");
    assert_eq!(
        (&stats["parked_streams"], &stats["dead_letters"]),
        (&0.into(), &0.into())
    );
    for p in [summaries, stats] {
        assert_eq!(p["group"]["consumers"], 1, "{p}");
        assert_eq!(p["group"]["lag"], 0, "{p}");
    }
    assert!(
        table.contains("order_summaries") && !table.contains("could not read"),
        "{table}"
    );
    assert_eq!(
        report["attention"],
        serde_json::json!([
            "order_summaries: 1 dead letter(s) (projector dlq list order_summaries)",
            "order_summaries: 1 order(s) held back behind a dead letter \
             (projector dlq parked order_summaries)"
        ])
    );

    support::stop_refusing(w.pool()).await;
    let letters = dlq.list("order_summaries", 10).await.unwrap();
    projector::admin::replay(
        w.pool(),
        &dlq,
        projector::ProjectionKind::OrderSummaries,
        &letters,
    )
    .await
    .unwrap();
    let (_, report, table) = status(&w).await;
    assert!(table.contains("nothing needs attention"), "{table}");
    let summaries = projection(&report, "order_summaries");
    assert_eq!(
        (&summaries["parked_streams"], &summaries["dead_letters"]),
        (&0.into(), &0.into()),
        "{summaries}"
    );
    token.cancel();
    task.await.unwrap().unwrap();
}

/// With Redis down, the status still shows the event store's half (the relay's last recorded
/// checkpoint included), names Redis as unreadable and exits 1, so a script cannot take a
/// partial report for a healthy one.
#[tokio::test]
async fn with_redis_down_status_shows_the_event_store_and_exits_1() {
    let mut redis = PrivateRedis::start().await.expect("a private redis");
    let w = World::with_redis(redis.url()).await;
    append_orders(w.pool(), 2).await;
    let head = store::head_position(w.pool()).await.unwrap();
    // The relay had recorded publishing the first event before Redis went away.
    sqlx::query("INSERT INTO relay_checkpoints (stream_key, position) VALUES ($1, 1)")
        .bind(w.keys.stream())
        .execute(w.pool())
        .await
        .unwrap();
    redis.stop();
    let (complete, report, table) = status(&w).await;
    assert!(!complete, "{report}");
    assert_eq!(report["head"], head);
    assert_eq!(report["published_to"], Value::Null);
    assert_eq!(report["relay_checkpoint"], 1, "{report}");
    assert!(table.contains("checkpoint 1, recorded"), "{table}");
    let p = projection(&report, "order_summaries");
    assert_eq!(
        (&p["applied_to"], &p["behind"]),
        (&0.into(), &head.into()),
        "{p}"
    );
    assert_eq!(p["dead_letters"], Value::Null, "{p}");
    let unreadable = report["unreadable"].as_array().expect("unreadable");
    assert_eq!(unreadable.len(), 1, "{report}");
    assert!(
        unreadable[0].as_str().unwrap().starts_with("redis: "),
        "{report}"
    );
    assert!(table.contains("attention: could not read redis"), "{table}");
}

/// A stream whose newest entry is not the event store's event at its position (the database
/// restored from a backup) is named among what needs attention, with its position.
#[tokio::test]
async fn status_names_a_stream_that_records_another_history() {
    let mut w = World::new().await;
    append_orders(w.pool(), 2).await;
    w.publish().await;
    let (_, report, _) = status(&w).await;
    assert_eq!(report["stream_diverged_at"], Value::Null, "{report}");

    // The database lost its newest event to a restore; the stream still has it.
    let head = store::head_position(w.pool()).await.unwrap();
    let lost = head + 1;
    let mut redis = w.redis.clone();
    let _: String = redis::cmd("XADD")
        .arg(w.keys.stream())
        .arg(format!("{lost}-0"))
        .arg("position")
        .arg(lost)
        .arg("event_id")
        .arg(Uuid::new_v4().to_string())
        .query_async(&mut redis)
        .await
        .unwrap();
    let (complete, report, table) = status(&w).await;
    assert!(complete, "{report}");
    assert_eq!(report["stream_diverged_at"], lost, "{report}");
    assert!(
        table.contains(&format!(
            "attention: the stream's entry at position {lost} is not the event store's event"
        )) && table.contains("RelayStreamDiverged"),
        "{table}"
    );
}
