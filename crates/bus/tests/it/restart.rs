use std::time::Duration;

use bus::testing::{PrivateRedis, unique_keys, wait_until};
use bus::{BusError, Consumer, Publisher};

use crate::{MAX_BLOCK, events};

#[tokio::test]
async fn publishing_fails_with_a_connection_error_while_redis_is_down_and_works_after_it_restarts()
{
    let mut redis = PrivateRedis::start().await.expect("start redis-server");
    let client = bus::client(&redis.url()).expect("url");
    let conn = bus::connect(&client).await.expect("connect");
    let keys = unique_keys();
    let publisher = Publisher::new(conn.clone(), keys.clone(), 1000);
    publisher
        .publish(&events(1..=2))
        .await
        .expect("publish while up");

    redis.stop();
    let err = publisher
        .publish(&events(3..=4))
        .await
        .expect_err("redis is down");
    assert!(matches!(err, BusError::Connection { .. }), "{err:?}");
    assert!(err.is_retryable());

    redis.start_again().await.expect("restart redis-server");
    // The same manager reconnects by itself; the restarted server is empty (no persistence),
    // so the relay's republication starts the stream again.
    let outcome = wait_until(
        Duration::from_secs(10),
        "the connection manager reconnects",
        || async { publisher.publish(&events(1..=4)).await.ok() },
    )
    .await;
    assert_eq!(outcome.appended, 4);

    // A fresh manager works as well.
    let fresh = bus::connect(&client).await.expect("connect again");
    let last = Publisher::new(fresh, keys, 1000)
        .last_published_position()
        .await
        .expect("last");
    assert_eq!(last, Some(4));
}

#[tokio::test]
async fn after_a_restart_without_persistence_the_group_is_reported_missing_and_can_be_recreated() {
    let mut redis = PrivateRedis::start().await.expect("start redis-server");
    let client = bus::client(&redis.url()).expect("url");
    let conn = bus::connect(&client).await.expect("connect");
    let keys = unique_keys();
    let consumer =
        Consumer::new(&client, conn.clone(), keys.clone(), "g", "c1", MAX_BLOCK).expect("consumer");
    consumer.ensure_group("0").await.expect("group");
    assert!(
        consumer
            .read_new(1, Duration::from_millis(10))
            .await
            .expect("read")
            .is_empty()
    );

    redis.stop();
    let err = consumer
        .read_new(1, Duration::from_millis(10))
        .await
        .expect_err("down");
    assert!(err.is_retryable(), "{err:?}");
    redis.start_again().await.expect("restart");

    let err = wait_until(
        Duration::from_secs(10),
        "the consumer reconnects",
        || async {
            match consumer.read_new(1, Duration::from_millis(10)).await {
                Err(e) if e.is_no_group() => Some(e),
                _ => None,
            }
        },
    )
    .await;
    assert!(matches!(err, BusError::NoGroup { .. }));
    // The shared connection notices the restart on its next command (a Connection error),
    // then reconnects: callers retry Connection errors.
    let created = wait_until(
        Duration::from_secs(10),
        "the group is recreated",
        || async { consumer.ensure_group("0").await.ok() },
    )
    .await;
    assert!(created);
    Publisher::new(conn, keys, 1000)
        .publish(&events([1]))
        .await
        .expect("publish");
    assert_eq!(
        consumer
            .read_new(10, Duration::from_secs(1))
            .await
            .expect("read")
            .len(),
        1
    );
}

/// A `redis-server` the test started itself, killed when dropped.
struct ForeignServer(std::process::Child);

impl Drop for ForeignServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The port a stopped private server frees may be taken by another process before the server
/// starts again there: the restart then fails, naming the port, rather than leave the test
/// talking to a server that is not its own.
#[tokio::test]
async fn a_restart_on_a_port_another_server_took_fails_instead_of_using_that_server() {
    let mut redis = PrivateRedis::start().await.expect("start redis-server");
    redis.stop();
    let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned());
    let _foreign = ForeignServer(
        std::process::Command::new(bin)
            .args(["--port", &redis.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the other redis-server"),
    );
    let client = bus::client(&redis.url()).expect("url");
    wait_until(
        Duration::from_secs(10),
        "the other server answers on the port",
        || async {
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        },
    )
    .await;

    let err = redis
        .start_again()
        .await
        .expect_err("the port is another server's");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    assert!(err.to_string().contains(&redis.port.to_string()), "{err}");
    assert!(!redis.is_running());
}
