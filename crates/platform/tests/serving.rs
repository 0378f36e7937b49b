//! The HTTP server of every binary (`platform::shutdown::serve_with_limits`) over real sockets,
//! with raw HTTP/1.1 written by hand so that a test can behave as no well-mannered client does:
//! stall in the middle of its headers, send nothing at all, hold connections open. The limits
//! are shortened (`ConnectionLimits`) so that nothing waits for the production timeouts.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::{get, post};
use platform::shutdown::{CancellationToken, ConnectionLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// How long a test waits for something that must happen before it fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// A server on a port of its own, stopped by `stop`.
struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(router: Router, limits: ConnectionLimits) -> Self {
        // The process's metrics recorder, installed before any server of any test counts a
        // connection: a connection opened under the no-op recorder and closed under the real
        // one would take one off `http_connections_open` that was never added.
        platform::metrics::install("platform-test");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(platform::shutdown::serve_with_limits(
            listener,
            router,
            stop.clone().cancelled_owned(),
            DEADLINE,
            limits,
        ));
        Self { addr, stop, task }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }

    /// Stops the server and waits until it has returned.
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

fn ok_router() -> Router {
    Router::new().route("/", get(|| async { "ok" })).route(
        "/length",
        post(|body: Bytes| async move { body.len().to_string() }),
    )
}

/// Limits with a header-read timeout short enough for a test to see it pass.
fn short_timeout() -> ConnectionLimits {
    ConnectionLimits {
        header_read_timeout: Duration::from_millis(300),
        ..ConnectionLimits::default()
    }
}

async fn send_get(stream: &mut TcpStream, path: &str) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
}

/// Reads one response (head and `content-length` body): its status code and body.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut received = Vec::new();
    let head_end = loop {
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "the connection closed before a whole response head: {received:?}"
        );
        received.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(received[..head_end].to_vec()).unwrap();
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while received.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed in the middle of a body");
        received.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8(received[head_end..head_end + length].to_vec()).unwrap();
    (status, body)
}

/// Waits until the server closes `stream`, and returns what it sent before closing it.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        loop {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) => return,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
                // A reset closes it as well.
                Err(_) => return,
            }
        }
    })
    .await
    .expect("the server closes the connection");
    received
}

/// Waits until the server closes `stream` and asserts it sent nothing before closing it.
async fn assert_closed_unanswered(stream: &mut TcpStream) {
    let received = read_until_closed(stream).await;
    assert!(
        received.is_empty(),
        "{}",
        String::from_utf8_lossy(&received)
    );
}

#[tokio::test]
async fn a_client_that_stalls_in_the_middle_of_its_headers_is_disconnected() {
    let server = Server::start(ok_router(), short_timeout()).await;
    let mut client = server.connect().await;
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nx-slow: aaa")
        .await
        .unwrap();

    assert_closed_unanswered(&mut client).await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_connects_and_sends_nothing_is_disconnected() {
    let server = Server::start(ok_router(), short_timeout()).await;
    let mut client = server.connect().await;

    assert_closed_unanswered(&mut client).await;
    server.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_read_timeout() {
    let server = Server::start(ok_router(), short_timeout()).await;
    let mut client = server.connect().await;
    send_get(&mut client, "/").await;
    assert_eq!(read_response(&mut client).await, (200, "ok".to_owned()));

    assert_closed_unanswered(&mut client).await;
    server.stop().await;
}

#[tokio::test]
async fn a_request_head_longer_than_the_connection_buffer_is_refused_and_one_within_it_served() {
    let limits = ConnectionLimits::default();
    let server = Server::start(ok_router(), limits).await;

    // A head of about 12 KiB, within the 16 KiB buffer: headers that are large but legitimate
    // (a long token, a big `tracestate`) are served.
    let mut client = server.connect().await;
    let header = "t".repeat(limits.max_buffer_bytes * 3 / 4);
    let request = format!("GET / HTTP/1.1\r\nhost: test\r\nx-large: {header}\r\n\r\n");
    client.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut client).await, (200, "ok".to_owned()));

    // A body far larger than the buffer still reaches the route whole: only heads must fit.
    let body = vec![b'b'; 4 * limits.max_buffer_bytes];
    let head = format!(
        "POST /length HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(&body).await.unwrap();
    assert_eq!(
        read_response(&mut client).await,
        (200, body.len().to_string())
    );

    // A head that does not fit is answered 431, and the connection closed. Exactly a buffer's
    // worth is sent, no more: bytes the server never read would make its close a reset, which
    // may discard the answer before the client reads it.
    let mut client = server.connect().await;
    let mut request = b"GET / HTTP/1.1\r\nhost: test\r\nx-large: ".to_vec();
    request.resize(limits.max_buffer_bytes, b't');
    client.write_all(&request).await.unwrap();
    let received = read_until_closed(&mut client).await;
    assert!(
        received.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&received)
    );
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_not_served_until_one_closes() {
    let metrics = platform::metrics::install("platform-test");
    let limits = ConnectionLimits {
        max_connections: 2,
        ..ConnectionLimits::default()
    };
    let server = Server::start(ok_router(), limits).await;
    // Two connections served once each, then left open and idle.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = server.connect().await;
        send_get(&mut client, "/").await;
        assert_eq!(read_response(&mut client).await, (200, "ok".to_owned()));
        held.push(client);
    }
    let page = metrics.render();
    let open = open_connections(&page);
    assert!(open >= 2.0, "http_connections_open is {open}");
    assert!(
        page.lines()
            .any(|line| line.starts_with("http_connections_max")),
        "the cap is exported: {page}"
    );

    // The kernel completes the third connection (it waits in the listen backlog), but the
    // server does not accept it: its request is not answered.
    let mut third = server.connect().await;
    send_get(&mut third, "/").await;
    let mut first_byte = [0u8; 1];
    // How long an answer would take to show, were the cap not kept; a slow machine can only
    // make this check weaker, never make it fail.
    let answered = tokio::time::timeout(Duration::from_millis(500), third.read(&mut first_byte));
    assert!(
        answered.await.is_err(),
        "a connection beyond the cap was answered (or closed)"
    );

    // One held connection closes: the third is accepted, on the same connection it opened.
    drop(held.pop());
    let response = tokio::time::timeout(DEADLINE, read_response(&mut third))
        .await
        .expect("the waiting connection is served once another one closed");
    assert_eq!(response, (200, "ok".to_owned()));

    // The connection still held is served as before.
    let mut still_held = held.pop().unwrap();
    send_get(&mut still_held, "/").await;
    assert_eq!(read_response(&mut still_held).await, (200, "ok".to_owned()));
    server.stop().await;
}

/// The value of `http_connections_open` on a Prometheus page.
fn open_connections(page: &str) -> f64 {
    page.lines()
        .find(|line| line.starts_with("http_connections_open"))
        .and_then(|line| line.rsplit(' ').next())
        .unwrap_or_else(|| panic!("no http_connections_open in {page}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn at_shutdown_an_in_flight_request_finishes_while_idle_connections_close_and_new_ones_are_refused()
 {
    // `/held` answers only once the test lets it, and says when it has begun.
    let entered = Arc::new(Semaphore::new(0));
    let release = Arc::new(Semaphore::new(0));
    let held = {
        let (entered, release) = (Arc::clone(&entered), Arc::clone(&release));
        move || {
            let (entered, release) = (Arc::clone(&entered), Arc::clone(&release));
            async move {
                entered.add_permits(1);
                release.acquire().await.unwrap().forget();
                "done"
            }
        }
    };
    let router = ok_router().route("/held", get(held));
    let server = Server::start(router, ConnectionLimits::default()).await;

    let mut idle = server.connect().await;
    send_get(&mut idle, "/").await;
    assert_eq!(read_response(&mut idle).await, (200, "ok".to_owned()));
    let mut in_flight = server.connect().await;
    send_get(&mut in_flight, "/held").await;
    tokio::time::timeout(DEADLINE, entered.acquire())
        .await
        .expect("the request reaches its handler")
        .unwrap()
        .forget();

    server.stop.cancel();
    // The idle connection is closed, and the listener with it.
    assert!(read_until_closed(&mut idle).await.is_empty());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while TcpStream::connect(server.addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new connections are still accepted after the shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !server.task.is_finished(),
        "the server left a request behind"
    );

    // The request under way is answered, and its connection then closed.
    release.add_permits(1);
    assert_eq!(
        read_response(&mut in_flight).await,
        (200, "done".to_owned())
    );
    assert!(read_until_closed(&mut in_flight).await.is_empty());
    tokio::time::timeout(DEADLINE, server.task)
        .await
        .expect("the server stops once the request is answered")
        .unwrap()
        .unwrap();
}
