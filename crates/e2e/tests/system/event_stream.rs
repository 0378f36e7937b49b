//! Following `GET /events/stream` the way a browser does, across a killed query service.

use crate::support::*;
use std::time::{Duration, Instant};
use store::testing::TestDatabase;
use uuid::Uuid;

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
        "/events/stream".to_owned(),
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
