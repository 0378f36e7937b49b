//! The system against a Redis that speaks only TLS and asks for client certificates.

use crate::support::*;
use bus::testing::{PrivateRedis, TestCertificates};
use serde_json::Value;
use std::path::PathBuf;
use store::testing::TestDatabase;
use uuid::Uuid;

/// The system against a Redis that speaks only TLS and asks every client for a certificate, as
/// a self-hosted `rediss://` server does by default: each service trusts the test's authority
/// (`REDIS_CA_CERT`) and presents the client certificate (`REDIS_CLIENT_CERT`/`_KEY`); the relay
/// publishes and the projections' groups consume and acknowledge over it. Each binary, not
/// told to trust that authority, checks the server against the bundled roots and is not ready:
/// `/readyz` names the kind of failure, and the log the certificate's fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_publish_and_consume_through_a_redis_that_speaks_only_tls() {
    let certificates = TestCertificates::generate().expect("openssl makes the test certificates");
    let redis = PrivateRedis::start_tls(&certificates, true)
        .await
        .expect("a TLS redis-server");
    let db = TestDatabase::new().await;
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();
    let url = redis.url();
    let path = |p: PathBuf| p.to_str().expect("utf-8 temp path").to_owned();
    let (ca, cert, key) = (
        path(certificates.ca_cert()),
        path(certificates.client_cert()),
        path(certificates.client_key()),
    );
    let tls = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_CA_CERT", ca.as_str()),
        ("REDIS_CLIENT_CERT", cert.as_str()),
        ("REDIS_CLIENT_KEY", key.as_str()),
    ];
    let mut command = Service::start("command-service", "command-service", &db.url, &stream, &tls);
    let mut projector = Service::start("projector", "projector", &db.url, &stream, &tls);
    let mut query = Service::start("query-service", "query-service", &db.url, &stream, &tls);
    // Ready means each one's PING went through the TLS handshake.
    for service in [&mut command, &mut projector, &mut query] {
        service.wait_ready(&http).await;
    }

    let (order_id, last) = create_order_with_a_book(&http, &command).await;

    // The read model alone would not show it: the sweeper heals from the event store when
    // Redis fails. The groups' positions on the TLS server do.
    let client = redis::Client::build_with_tls(
        url.as_str(),
        certificates.client_tls().expect("certificate files"),
    )
    .expect("TLS client");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("the test's own TLS connection");
    let acknowledged = format!("{last}-0");
    bus::testing::wait_until(
        DEADLINE,
        "both projections' groups have consumed and acknowledged the events",
        || {
            let mut conn = conn.clone();
            let (stream, acknowledged) = (stream.clone(), acknowledged.clone());
            async move {
                let reply: redis::streams::StreamInfoGroupsReply =
                    redis::AsyncCommands::xinfo_groups(&mut conn, &stream)
                        .await
                        .ok()?;
                let done = |name: &str| {
                    reply.groups.iter().any(|g| {
                        g.name == name && g.last_delivered_id == acknowledged && g.pending == 0
                    })
                };
                (done("order_summaries") && done("customer_stats")).then_some(())
            }
        },
    )
    .await;
    let summary = send(
        &http,
        http.get(query.url(&format!("/orders/{order_id}?min_position={last}"))),
        200,
    )
    .await;
    assert_eq!(summary["total"], 1250, "{summary}");

    // Each binary, told nothing of the test's authority, says why Redis is not usable.
    for bin in ["command-service", "projector", "query-service"] {
        let name = format!("{bin}-without-ca");
        let mut untrusting = Service::start(bin, &name, &db.url, &stream, &tls[..1]);
        let reason = bus::testing::wait_until(DEADLINE, "/readyz reports Redis failing", || {
            let request = http.get(untrusting.url("/readyz"));
            async move {
                let response = request.send().await.ok()?;
                let status = response.status().as_u16();
                let body: Value = response.json().await.ok()?;
                (status == 503).then(|| body["checks"]["redis"].to_string())
            }
        })
        .await;
        // The body names the kind of failure; the log names the certificate's fault.
        assert_eq!(reason, "\"error: TLS handshake failed\"", "{bin}");
        let log = untrusting.log();
        assert!(
            log.lines()
                .any(|line| line.contains("readiness check fails")
                    && line.contains("certificate")
                    && line.contains("UnknownIssuer")),
            "{bin}: {}",
            untrusting.log_tail()
        );
        assert!(untrusting.terminate().await.success(), "{bin}");
    }
    for service in [&mut command, &mut projector, &mut query] {
        assert!(
            service.terminate().await.success(),
            "{}",
            service.log_tail()
        );
    }
}
