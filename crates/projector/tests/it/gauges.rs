//! The gauges read from PostgreSQL with the lag: the parked streams, for as long as an order is
//! held back.

use bus::testing::wait_until;
use events::order_stream_id;
use projector::ProjectionKind;
use projector::apply::{park_stream, resume_stream};
use projector::metrics::PARKED_STREAMS;

use crate::support::{self, DEADLINE, World, append_orders};

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
    let mut leader = w.pool().acquire().await.unwrap();
    for projection in ProjectionKind::ALL {
        let led: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(projection.sweeper_lock_key())
            .fetch_one(&mut *leader)
            .await
            .unwrap();
        assert!(led);
    }
    let (token, task, port) = w.spawn_projector_serving("solo", &[]).await;
    w.wait_caught_up().await;
    wait_parked(port, ProjectionKind::OrderSummaries, 0.0).await;

    let mut conn = w.pool().acquire().await.unwrap();
    park_stream(&mut conn, ProjectionKind::OrderSummaries, &stream, "boom")
        .await
        .unwrap();
    wait_parked(port, ProjectionKind::OrderSummaries, 1.0).await;
    wait_parked(port, ProjectionKind::CustomerStats, 0.0).await;

    // Now the projector leads: the count stays while the order does.
    drop(leader);
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
