//! The gauges read from PostgreSQL with the lag: the parked streams, for as long as an order is
//! held back, and the time of the last successful read, which stops while a projector is cut
//! off from PostgreSQL (when the other gauges keep their last values).

use std::time::{SystemTime, UNIX_EPOCH};

use bus::testing::wait_until;
use events::order_stream_id;
use projector::ProjectionKind;
use projector::apply::{park_stream, resume_stream};
use projector::metrics::{LAG_LAST_SUCCESS, PARKED_STREAMS};

use crate::support::{self, DEADLINE, HoldingProxy, World, append_orders};

/// Waits until the projector on `port` exports `value` as `projection`'s parked streams.
async fn wait_parked(port: u16, projection: ProjectionKind, value: f64) {
    wait_until(
        DEADLINE,
        &format!("{projection} exports {value} parked stream(s)"),
        || async move {
            let parked = support::metric(port, PARKED_STREAMS, projection).await;
            (parked == Some(value)).then_some(())
        },
    )
    .await;
}

/// An order parked in `order_summaries` is exported as one parked stream of that projection
/// (and none of the other) for as long as it stays parked, by an instance that does not lead
/// the sweeper and by one that does, and as none once it is replayed.
#[tokio::test]
async fn a_parked_order_is_exported_as_a_parked_stream_until_it_is_replayed() {
    let mut w = World::new().await;
    let order = append_orders(w.pool(), 2).await[0];
    w.publish().await;
    let stream = order_stream_id(order);
    // The test leads both sweepers first: the projector exports what it reads as a follower.
    let leader = support::lead_every_sweeper(&w).await;
    let (token, task, port) = w.spawn_projector_serving("solo", &[]).await;
    w.wait_caught_up().await;
    wait_parked(port, ProjectionKind::OrderSummaries, 0.0).await;

    // Parked at its next event, as if that had failed.
    let events = store::read_stream(w.pool(), &stream, 0, 100).await.unwrap();
    let next = events.len() as i64 + 1;
    let mut conn = w.pool().acquire().await.unwrap();
    park_stream(
        &mut conn,
        ProjectionKind::OrderSummaries,
        &stream,
        next,
        "boom",
    )
    .await
    .unwrap();
    wait_parked(port, ProjectionKind::OrderSummaries, 1.0).await;
    wait_parked(port, ProjectionKind::CustomerStats, 0.0).await;

    // Now the projector leads: the count stays while the order does. (Closed, not handed back
    // to the pool, where its session would keep both locks.)
    leader.close().await.unwrap();
    let key = ProjectionKind::OrderSummaries.sweeper_lock_key();
    wait_until(DEADLINE, "the projector leads the sweeper", || async {
        let mut conn = w.pool().acquire().await.unwrap();
        let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        if free {
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .execute(&mut *conn)
                .await
                .unwrap();
        }
        (!free).then_some(())
    })
    .await;
    wait_parked(port, ProjectionKind::OrderSummaries, 1.0).await;
    resume_stream(&mut conn, ProjectionKind::OrderSummaries, &stream)
        .await
        .unwrap();
    wait_parked(port, ProjectionKind::OrderSummaries, 0.0).await;
    token.cancel();
    task.await.unwrap().unwrap();
}

/// Seconds since the Unix epoch.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A projector reads its lag every second or two and stamps each successful read; cut off from
/// PostgreSQL (every connection dropped, new ones never answered), it keeps exporting the last
/// lag, but the stamp stops, so an alert on its age fires.
#[tokio::test]
async fn the_lag_read_time_stops_while_the_projector_is_cut_off_from_postgres() {
    let w = World::new().await;
    append_orders(w.pool(), 2).await;
    let direct_port = w.pool().connect_options().get_port();
    let proxy = HoldingProxy::start(direct_port).await;
    let url =
        w.db.url
            .replace(&format!(":{direct_port}/"), &format!(":{}/", proxy.port()));
    assert_ne!(url, w.db.url);
    let mut args = w.args("cut-off", &["--shutdown-grace-secs", "1"]);
    let at = args.iter().position(|a| a == "--database-url").unwrap();
    args[at + 1] = url;
    let (token, task, port) = support::spawn_projector_with(args).await;
    let projection = ProjectionKind::OrderSummaries;
    // The lag is exported from a successful read, which is stamped (the stamp of the start
    // comes before any).
    wait_until(DEADLINE, "a successful lag read is stamped", || async {
        let lag = support::metric(port, projector::metrics::LAG_EVENTS, projection).await;
        let stamp = support::metric(port, LAG_LAST_SUCCESS, projection).await;
        (lag.is_some() && stamp.is_some()).then_some(())
    })
    .await;

    proxy.cut();
    wait_until(DEADLINE, "the stamp falls three seconds behind", || async {
        let stamp = support::metric(port, LAG_LAST_SUCCESS, projection).await;
        stamp.is_some_and(|at| unix_now() - at >= 3.0).then_some(())
    })
    .await;
    // Reads that began before the cut may end just after it; none succeeds later: the stamp
    // stays where it stopped for as long again (a read every 1-2 s would have moved it).
    let stopped_at = support::metric(port, LAG_LAST_SUCCESS, projection)
        .await
        .unwrap();
    wait_until(
        DEADLINE,
        "three more seconds pass without a stamp",
        || async {
            let stamp = support::metric(port, LAG_LAST_SUCCESS, projection).await;
            assert_eq!(
                stamp,
                Some(stopped_at),
                "a lag read succeeded after the cut"
            );
            (unix_now() - stopped_at >= 6.0).then_some(())
        },
    )
    .await;
    assert!(
        support::metric(port, projector::metrics::LAG_EVENTS, projection)
            .await
            .is_some(),
        "the lag is still exported, with its last value"
    );
    token.cancel();
    task.await.unwrap().unwrap();
}
