//! Redis dying under load and coming back empty, with nobody restarting a service.

use crate::support::*;
use bus::testing::PrivateRedis;
use serde_json::Value;
use store::testing::TestDatabase;
use uuid::Uuid;

/// Redis is killed (everything in it lost) under a steady flow of commands and comes back
/// empty a little later. Meanwhile every command is acknowledged, none refused (the event store
/// is the outbox); `/readyz` names Redis, while `/readyz?exclude=redis`, what the Kubernetes
/// probes of the command and query services ask, stays 200 so neither API leaves rotation.
/// Afterwards the events committed during the outage are on the new stream in order up to
/// the head, and both read models are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_keep_succeeding_while_redis_is_down_and_the_read_models_catch_up() {
    let mut redis = PrivateRedis::start().await.expect("a private redis-server");
    let redis_url = redis.url();
    let db = TestDatabase::new().await;
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();
    let env = [("REDIS_URL", redis_url.as_str())];
    let mut command = Service::start("command-service", "command-service", &db.url, &stream, &env);
    let mut projector = Service::start("projector", "projector", &db.url, &stream, &env);
    let mut query = Service::start("query-service", "query-service", &db.url, &stream, &env);
    for service in [&mut command, &mut projector, &mut query] {
        service.wait_ready(&http).await;
    }

    let customer = Uuid::new_v4();
    let writers = Writers::start(&http, &command, customer, 3);
    writers.wait_for_more(30, "before Redis dies").await;

    redis.stop();
    // Positions past this head were committed after Redis died, so the relay cannot have
    // published them to the old server. (A command acknowledged after the kill is no such
    // mark: its event may have been committed, and published, just before it.)
    let head_at_kill = store::head_position(&db.pool).await.expect("head");
    for service in [&command, &projector, &query] {
        wait_readiness(&http, service, 503).await;
    }
    for service in [&command, &query] {
        let response = http
            .get(service.url("/readyz?exclude=redis"))
            .send()
            .await
            .expect("readyz answers");
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("a report");
        assert_eq!(status, 200, "{}: {body}", service.name);
        assert_eq!(body["checks"]["redis"], "excluded", "{}", service.name);
    }
    writers.wait_for_more(30, "while Redis is down").await;
    let first_during_outage = head_at_kill + 1;

    redis
        .start_again()
        .await
        .expect("redis starts again, empty");
    for service in [&command, &projector, &query] {
        wait_readiness(&http, service, 200).await;
    }
    writers.wait_for_more(30, "after Redis is back").await;
    let outcomes = writers.stop().await;
    assert!(
        outcomes.refused.is_empty(),
        "commands were refused: {:?}\n{}",
        outcomes.refused,
        command.log_tail()
    );

    // The relay publishes what was committed while Redis was away, in order, up to the head.
    let head = store::head_position(&db.pool).await.expect("head");
    let client = redis::Client::open(redis_url.as_str()).expect("redis url");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let published = bus::testing::wait_until(DEADLINE, "the head is on the new stream", || {
        let (mut conn, stream) = (conn.clone(), stream.clone());
        async move {
            let positions = published_positions(&mut conn, &stream).await;
            (positions.last() == Some(&head)).then_some(positions)
        }
    })
    .await;
    let first = published[0];
    assert!(
        first <= first_during_outage,
        "the stream starts at {first}, after {first_during_outage} committed during the outage"
    );
    assert_eq!(published, (first..=head).collect::<Vec<_>>());

    // Both read models reach the head and agree with the event store: what Redis lost was
    // applied from the event store.
    assert_read_models_exact_at(&http, &query, &db.url, &stream, customer, head).await;

    for service in [&mut query, &mut projector, &mut command] {
        assert!(
            service.terminate().await.success(),
            "{}",
            service.log_tail()
        );
    }
}
