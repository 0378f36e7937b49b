//! Every PostgreSQL and Redis connection the services open, and every HTTP connection they
//! accept, sends each message at once (`TCP_NODELAY`), over TLS and without. Without it, a
//! message written in more than one piece (a batched append, a projector batch or a rebuild page
//! longer than one TLS record, a pipeline of XADDs, a long response) waits up to 40 ms for the
//! peer's delayed acknowledgement before its last segment leaves (BENCHMARKS.md, "PostgreSQL
//! over TLS"; `vendor/README.md`). PostgreSQL connections also probe a silent server, so one
//! that vanished without closing them is noticed within about 30 s.
//!
//! The socket options are read from this process's own sockets: each open descriptor is
//! duplicated with `pidfd_getfd`, which needs no `unsafe` and shares the socket it duplicates.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::Duration;

use common::{TempDatabase, admin_url, postgres_port, redis_port, redis_url, with_param};
use platform::config::RedisTlsArgs;
use platform::{db, redis_conn};
use redis::AsyncCommands;
use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `(peer, TCP_NODELAY)` of every TCP socket of this process connected to `port`.
fn sockets_connected_to(port: u16) -> Vec<(SocketAddr, bool)> {
    sockets_where(|_, peer| peer.port() == port, nodelay)
}

fn nodelay(socket: &OwnedFd) -> bool {
    rustix::net::sockopt::tcp_nodelay(socket).unwrap()
}

/// `(peer, read(socket))` of every connected TCP socket of this process whose local address
/// and peer address satisfy `wanted`.
fn sockets_where<T>(
    wanted: impl Fn(SocketAddr, SocketAddr) -> bool,
    read: impl Fn(&OwnedFd) -> T,
) -> Vec<(SocketAddr, T)> {
    let me = pidfd_open(getpid(), PidfdFlags::empty()).unwrap();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let entry = entry.unwrap();
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue; // the directory's own descriptor, closed by now
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Ok(number) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(socket): Result<OwnedFd, _> = pidfd_getfd(&me, number, PidfdGetfdFlags::empty())
        else {
            continue; // closed since the listing
        };
        let Ok(Some(peer)) = rustix::net::getpeername(&socket) else {
            continue; // listening or unconnected
        };
        let Ok(peer) = SocketAddr::try_from(peer) else {
            continue; // not an IP socket
        };
        let Ok(local) = rustix::net::getsockname(&socket).map(SocketAddr::try_from) else {
            continue;
        };
        if let Ok(local) = local
            && wanted(local, peer)
        {
            found.push((peer, read(&socket)));
        }
    }
    found
}

/// Asserts that `sockets` holds at least the `open` connections the test holds, and that every
/// one of them has `TCP_NODELAY` on.
fn assert_all_send_at_once(sockets: &[(SocketAddr, bool)], open: usize, what: &str) {
    assert!(
        sockets.len() >= open,
        "{what}: expected the {open} open connections among this process's sockets, found {sockets:?}"
    );
    let waiting: Vec<_> = sockets.iter().filter(|(_, nodelay)| !nodelay).collect();
    assert!(
        waiting.is_empty(),
        "{what}: connections without TCP_NODELAY: {waiting:?}"
    );
}

async fn server_offers_tls() -> bool {
    let mut conn = PgConnection::connect(&admin_url()).await.unwrap();
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    ssl == "on"
}

#[tokio::test]
async fn every_database_connection_sends_without_waiting_for_acknowledgements() {
    let database = TempDatabase::named("platform_nodelay");
    let mut modes = vec!["disable"];
    if server_offers_tls().await {
        modes.push("require");
    } else {
        eprintln!("the server has ssl = off: only connections without TLS are checked");
    }
    for mode in modes {
        let url = with_param(&database.url, &format!("sslmode={mode}"));
        let pool = db::connect(&url, "nodelay-test", 3, None).await.unwrap();
        // Hold three pooled connections and one dedicated connection (as the relay's leader
        // lock and the listeners use) open at once.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(pool.acquire().await.unwrap());
        }
        let mut dedicated = PgConnection::connect(&url).await.unwrap();
        let encrypted: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&mut dedicated)
                .await
                .unwrap();
        assert_eq!(encrypted, mode == "require", "sslmode={mode}");

        assert_all_send_at_once(
            &sockets_connected_to(postgres_port()),
            4,
            &format!("sslmode={mode}"),
        );

        dedicated.close().await.unwrap();
        drop(held);
        pool.close().await;
    }
}

#[tokio::test]
async fn every_redis_connection_sends_without_waiting_for_acknowledgements() {
    let timeout = std::time::Duration::from_secs(5);
    // The services' connections (readiness, relay, projector consumers), all opened from the
    // client `CommonArgs::redis_client` builds, and those of the event bus's own `bus::client`.
    let services_client =
        platform::config::redis_client(&redis_url(), &RedisTlsArgs::default()).unwrap();
    let mut manager = redis_conn::connect_manager(&services_client, timeout)
        .await
        .unwrap();
    let mut dedicated = redis_conn::dedicated_connection(&services_client, timeout)
        .await
        .unwrap();
    let bus_client = bus::client(&redis_url()).unwrap();
    let mut bus_conn = bus::connect(&bus_client).await.unwrap();
    for conn in [&mut manager, &mut bus_conn] {
        let _: String = redis::cmd("PING").query_async(conn).await.unwrap();
    }
    let _: Option<String> = dedicated.get("nodelay-test-missing-key").await.unwrap();

    assert_all_send_at_once(&sockets_connected_to(redis_port()), 3, "redis");
}

/// Over TLS it matters most: each TLS record is its own write, so a pipeline longer than one
/// record would otherwise wait for the server's delayed ACK.
#[tokio::test]
async fn a_redis_connection_over_tls_sends_without_waiting_for_acknowledgements() {
    let certificates = bus::testing::TestCertificates::generate().unwrap();
    let server = bus::testing::PrivateRedis::start_tls(&certificates, true)
        .await
        .unwrap();
    let tls = RedisTlsArgs {
        redis_ca_cert: Some(certificates.ca_cert()),
        redis_client_cert: Some(certificates.client_cert()),
        redis_client_key: Some(certificates.client_key()),
    };
    let client = platform::config::redis_client(&server.url(), &tls).unwrap();
    let mut manager = redis_conn::connect_manager(&client, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let _: String = redis::cmd("PING").query_async(&mut manager).await.unwrap();

    assert_all_send_at_once(&sockets_connected_to(server.port), 1, "redis over TLS");
}

#[tokio::test]
async fn every_accepted_http_connection_sends_without_waiting_for_acknowledgements() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    let stop = platform::shutdown::CancellationToken::new();
    let server = tokio::spawn(platform::shutdown::serve(
        listener,
        router,
        stop.clone().cancelled_owned(),
    ));
    // A client connection kept open, so the server's side of it can be inspected.
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let mut response = [0u8; 12];
    client.read_exact(&mut response).await.unwrap();
    assert_eq!(&response, b"HTTP/1.1 200");

    // The server's end of the connection: local port `port`, peer the client.
    assert_all_send_at_once(
        &sockets_where(|local, _| local.port() == port, nodelay),
        1,
        "http",
    );

    drop(client);
    stop.cancel();
    server.await.unwrap().unwrap();
}

/// How a socket notices a dead peer: keepalive on, its idle time, probe interval and count, and
/// `TCP_USER_TIMEOUT` in milliseconds.
fn dead_peer_detection(socket: &OwnedFd) -> (bool, Duration, Duration, u32, u32) {
    use rustix::net::sockopt;
    (
        sockopt::socket_keepalive(socket).unwrap(),
        sockopt::tcp_keepidle(socket).unwrap(),
        sockopt::tcp_keepintvl(socket).unwrap(),
        sockopt::tcp_keepcnt(socket).unwrap(),
        sockopt::tcp_user_timeout(socket).unwrap(),
    )
}

#[tokio::test]
async fn every_database_connection_notices_a_vanished_server_within_half_a_minute() {
    let database = TempDatabase::named("platform_nodelay");
    let url = &database.url;
    let pool = db::connect(url, "nodelay-test", 2, None).await.unwrap();
    let held = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
    let dedicated = PgConnection::connect(url).await.unwrap();

    let sockets = sockets_where(
        |_, peer| peer.port() == postgres_port(),
        dead_peer_detection,
    );
    assert!(
        sockets.len() >= 3,
        "expected the 3 open connections, found {sockets:?}"
    );
    for (peer, detection) in &sockets {
        assert_eq!(
            *detection,
            (
                true,
                Duration::from_secs(10),
                Duration::from_secs(5),
                3,
                30_000
            ),
            "connection to {peer}: (keepalive, idle, interval, probes, TCP_USER_TIMEOUT ms)"
        );
    }

    dedicated.close().await.unwrap();
    drop(held);
    pool.close().await;
}
