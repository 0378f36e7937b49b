//! What the projector says while PostgreSQL is down: enough to know, not a line per retry.

use bus::testing::wait_until;
use projector::ProjectionKind;
use projector::sweeper::{Sweeper, SweeperSettings};
use store::testing::PostgresSwitch;
use tokio_util::sync::CancellationToken;

use crate::support::{DEADLINE, World};

/// A sweeper whose PostgreSQL is gone tries to lead again every `LEADER_RETRY`: it
/// says it lost its connection when that starts (and would again a minute later), not at every
/// try, and says when the server answers again.
#[tokio::test]
async fn a_sweeper_without_postgresql_says_so_once_not_at_every_retry_and_when_it_is_back() {
    let (logs, _logging) = platform::testing::LogBuffer::capture("info,projector=debug");
    let w = World::new().await;
    let switch = PostgresSwitch::on(&w.db).await;
    switch.turn_off();
    let sweeper = Sweeper::new(
        ProjectionKind::ALL[0],
        switch.lazy_pool(2),
        None,
        SweeperSettings::default(),
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(sweeper.run(stop.clone()));

    wait_until(DEADLINE, "three tries to lead have failed", || async {
        (logs.lines_containing("sweeper still has no connection") >= 2).then_some(())
    })
    .await;
    assert_eq!(
        logs.lines_containing("sweeper lost its connection"),
        1,
        "{}",
        logs.text()
    );

    switch.turn_on();
    wait_until(DEADLINE, "the sweeper leads", || async {
        (logs.lines_containing("this instance is the sweeper") == 1).then_some(())
    })
    .await;
    assert_eq!(
        logs.lines_containing("sweeper reaches PostgreSQL again"),
        1,
        "{}",
        logs.text()
    );

    stop.cancel();
    running.await.unwrap();
}
