//! HTTP behaviour of the shared pieces, through a tiny router and `tower::ServiceExt::oneshot`:
//! problem bodies, extractor rejections, bearer auth, the standard layers.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use platform::extract::{Json, Path, Query, with_fallbacks};
use platform::http::{HttpLimits, RequestContext, standard_layers};
use platform::{Problem, auth};
use serde::Deserialize;
use serde_json::Value;
use tower::ServiceExt;

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct AddItem {
    sku: String,
    quantity: i64,
}

async fn add_item(Json(body): Json<AddItem>) -> Json<Value> {
    Json(serde_json::json!({ "sku": body.sku, "quantity": body.quantity }))
}

async fn get_order(Path(id): Path<uuid::Uuid>) -> String {
    id.to_string()
}

#[derive(Debug, Deserialize)]
struct Paging {
    limit: u32,
}

async fn list(Query(p): Query<Paging>) -> String {
    p.limit.to_string()
}

async fn context(ctx: RequestContext) -> Json<Value> {
    Json(serde_json::json!({
        "request_id": ctx.request_id,
        "correlation_id": ctx.correlation_id,
        "traceparent": ctx.traceparent,
        "trace_id": ctx.trace_id,
        "actor": ctx.actor,
    }))
}

async fn slow() -> &'static str {
    tokio::time::sleep(Duration::from_secs(5)).await;
    "late"
}

async fn boom() -> &'static str {
    panic!("secret panic detail")
}

async fn rule() -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "rule_violated")
        .with_detail("an order needs an item before it is placed")
        .with_extension("rule", "order_has_items")
        .with_instance("/orders/1/place")
        .with_header(header::RETRY_AFTER, "3".parse().unwrap())
}

fn app() -> Router {
    let router = with_fallbacks(
        Router::new()
            .route("/items", post(add_item))
            .route("/orders/{id}", get(get_order))
            .route("/orders", get(list))
            .route("/context", get(context))
            .route("/slow", get(slow))
            .route("/boom", get(boom))
            .route("/rule", get(rule)),
    );
    standard_layers(
        router,
        HttpLimits {
            body_limit_bytes: 64,
            request_timeout: Duration::from_millis(200),
            ..HttpLimits::default()
        },
    )
}

async fn send(router: Router, req: Request<Body>) -> (Response, Value) {
    let response = router.oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (Response::from_parts(parts, Body::empty()), json)
}

fn post_json(uri: &str, content_type: Option<&str>, body: &str) -> Request<Body> {
    let mut req = Request::post(uri);
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    req.body(Body::from(body.to_owned())).unwrap()
}

fn get_req(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn assert_problem(response: &Response, body: &Value, status: StatusCode, code: &str) {
    assert_eq!(response.status(), status, "body: {body}");
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    assert_eq!(body["code"], code, "body: {body}");
    assert_eq!(body["status"], status.as_u16());
    assert_eq!(
        body["type"],
        format!("https://errors.orders.example/{code}")
    );
    assert!(body["title"].is_string());
}

#[tokio::test]
async fn a_problem_carries_standard_members_extensions_and_headers() {
    let (response, body) = send(app(), get_req("/rule")).await;
    assert_problem(
        &response,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "rule_violated",
    );
    assert_eq!(body["rule"], "order_has_items");
    assert_eq!(body["instance"], "/orders/1/place");
    assert_eq!(body["detail"], "an order needs an item before it is placed");
    assert_eq!(response.headers()[header::RETRY_AFTER], "3");
}

#[tokio::test]
async fn a_valid_json_body_is_accepted() {
    let (response, body) = send(
        app(),
        post_json(
            "/items",
            Some("application/json"),
            r#"{"sku":"a","quantity":2}"#,
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body["quantity"], 2);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let (response, body) = send(app(), post_json("/items", Some("text/plain"), "{}")).await;
    assert_problem(
        &response,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let (response, body) = send(app(), post_json("/items", None, "{}")).await;
    assert_problem(
        &response,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
}

#[tokio::test]
async fn broken_json_is_400_malformed_json() {
    let (response, body) = send(
        app(),
        post_json("/items", Some("application/json"), r#"{"sku":"#),
    )
    .await;
    assert_problem(&response, &body, StatusCode::BAD_REQUEST, "malformed_json");
}

#[tokio::test]
async fn wrong_types_and_missing_fields_are_400_invalid_body_with_serdes_message() {
    let (response, body) = send(
        app(),
        post_json(
            "/items",
            Some("application/json"),
            r#"{"sku":"a","quantity":"x"}"#,
        ),
    )
    .await;
    assert_problem(&response, &body, StatusCode::BAD_REQUEST, "invalid_body");
    assert!(
        body["detail"].as_str().unwrap().contains("quantity"),
        "{body}"
    );

    let (response, body) = send(
        app(),
        post_json("/items", Some("application/json"), r#"{"sku":"a"}"#),
    )
    .await;
    assert_problem(&response, &body, StatusCode::BAD_REQUEST, "invalid_body");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("missing field `quantity`"),
        "{body}"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_with_or_without_content_length() {
    let big = format!(r#"{{"sku":"{}","quantity":1}}"#, "x".repeat(200));
    // Streamed body, no Content-Length: the extractor's limit trips.
    let (response, body) = send(app(), post_json("/items", Some("application/json"), &big)).await;
    assert_problem(
        &response,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    // Declared Content-Length: rejected before the body is read.
    let req = Request::post("/items")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, big.len())
        .body(Body::from(big))
        .unwrap();
    let (response, body) = send(app(), req).await;
    assert_problem(
        &response,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
}

#[tokio::test]
async fn a_malformed_uuid_in_the_path_is_400_invalid_path() {
    let (response, body) = send(app(), get_req("/orders/not-a-uuid")).await;
    assert_problem(&response, &body, StatusCode::BAD_REQUEST, "invalid_path");
}

#[tokio::test]
async fn a_rejected_value_is_quoted_back_cut_short() {
    // 5,000 × `é`, percent-encoded: the quoted value is cut at a character boundary.
    let long = "%C3%A9".repeat(5_000);
    let (response, body) = send(app(), get_req(&format!("/orders/{long}"))).await;
    assert_problem(&response, &body, StatusCode::BAD_REQUEST, "invalid_path");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.len() <= platform::extract::MAX_REJECTION_DETAIL_LEN + '…'.len_utf8()
            && detail.ends_with('…')
            && detail.contains("éé"),
        "{detail}"
    );
}

#[tokio::test]
async fn a_bad_query_is_400_invalid_query() {
    let (response, body) = send(app(), get_req("/orders?limit=many")).await;
    assert_problem(&response, &body, StatusCode::BAD_REQUEST, "invalid_query");
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let (response, body) = send(app(), get_req("/nowhere")).await;
    assert_problem(&response, &body, StatusCode::NOT_FOUND, "not_found");
    let (response, body) = send(app(), get_req("/items")).await;
    assert_problem(
        &response,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

#[tokio::test]
async fn a_slow_request_is_503_timeout() {
    let (response, body) = send(app(), get_req("/slow")).await;
    assert_problem(&response, &body, StatusCode::SERVICE_UNAVAILABLE, "timeout");
}

#[tokio::test]
async fn a_panicking_handler_is_500_internal_without_the_detail() {
    let (response, body) = send(app(), get_req("/boom")).await;
    assert_problem(
        &response,
        &body,
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
    );
    assert!(!body.to_string().contains("secret"));
}

#[tokio::test]
async fn the_request_context_carries_ids_and_a_trace_context() {
    let req = Request::get("/context")
        .header("x-request-id", "req-1")
        .header("x-correlation-id", "corr-1")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("x-actor", "alice")
        .body(Body::empty())
        .unwrap();
    let (response, body) = send(app(), req).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-request-id"], "req-1");
    assert_eq!(response.headers()["x-correlation-id"], "corr-1");
    assert_eq!(body["request_id"], "req-1");
    assert_eq!(body["correlation_id"], "corr-1");
    assert_eq!(body["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(body["actor"], "alice");
}

/// A request id the service cannot use (too long, or not printable) is not echoed back: the
/// response carries the UUID that stood for it in the service's logs and as the correlation
/// id, so a client's report of the response finds its log lines.
#[tokio::test]
async fn an_unusable_request_id_is_answered_with_the_one_the_service_logged() {
    for sent in ["a".repeat(200), "tab\there".to_owned()] {
        let req = Request::get("/context")
            .header("x-request-id", sent.as_str())
            .body(Body::empty())
            .unwrap();
        let (response, body) = send(app(), req).await;
        let echoed = response.headers()["x-request-id"].to_str().unwrap();
        assert_ne!(echoed, sent);
        assert!(uuid::Uuid::parse_str(echoed).is_ok(), "{echoed}");
        assert_eq!(body["request_id"], echoed);
        assert_eq!(response.headers()["x-correlation-id"], echoed);
    }
}

#[tokio::test]
async fn without_headers_ids_and_traceparent_are_generated() {
    let req = Request::get("/context")
        .header("traceparent", "00-bogus")
        .body(Body::empty())
        .unwrap();
    let (response, body) = send(app(), req).await;
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(body["request_id"], request_id);
    assert_eq!(body["correlation_id"], request_id);
    let tp = body["traceparent"].as_str().unwrap();
    assert!(platform::http::parse_traceparent(tp).is_some(), "{tp}");
    assert!(body["actor"].is_null());
}

#[tokio::test]
async fn http_metrics_are_recorded_per_route() {
    let handle = platform::metrics::install("platform-test");
    let (response, _) = send(app(), get_req("/orders?limit=3")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = handle.render();
    assert!(
        text.lines().any(|l| l.starts_with("http_requests_total")
            && l.contains("route=\"/orders\"")
            && l.contains("status=\"200\"")
            && l.contains("service=\"platform-test\"")),
        "{text}"
    );
    assert!(
        text.contains("http_request_duration_seconds_bucket"),
        "{text}"
    );
}

fn protected(token: Option<&str>) -> Router {
    Router::new()
        .route("/orders", post(|| async { "created" }))
        .route_layer(auth::require_bearer_token(
            token.and_then(auth::BearerTokens::parse),
        ))
        .route("/healthz", get(|| async { "ok" }))
}

fn with_auth(uri: &str, authorization: Option<&str>) -> Request<Body> {
    let mut req = Request::post(uri);
    if let Some(value) = authorization {
        req = req.header(header::AUTHORIZATION, value);
    }
    req.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_401_with_www_authenticate() {
    for authorization in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret-but-longer"),
        Some("Basic s3cret"),
        Some("s3cret"),
    ] {
        let (response, body) = send(
            protected(Some("s3cret")),
            with_auth("/orders", authorization),
        )
        .await;
        assert_problem(&response, &body, StatusCode::UNAUTHORIZED, "unauthorized");
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}

#[tokio::test]
async fn the_right_token_passes() {
    let (response, _) = send(
        protected(Some("s3cret")),
        with_auth("/orders", Some("Bearer s3cret")),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn without_a_configured_token_everything_passes() {
    let (response, _) = send(protected(None), with_auth("/orders", None)).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn routes_outside_the_auth_layer_need_no_token() {
    let req = Request::get("/healthz").body(Body::empty()).unwrap();
    let (response, _) = send(protected(Some("s3cret")), req).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn requests_beyond_the_in_flight_limit_are_shed_at_once_while_probes_still_answer() {
    // `/held` requests stay in the handler until the gate lets them through.
    let entered = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = {
        let (entered, gate) = (Arc::clone(&entered), Arc::clone(&gate));
        move || {
            let (entered, gate) = (Arc::clone(&entered), Arc::clone(&gate));
            async move {
                entered.add_permits(1);
                gate.acquire().await.unwrap().forget();
                "done"
            }
        }
    };
    let router = standard_layers(
        with_fallbacks(
            Router::new()
                .route("/held", get(held))
                .route("/healthz", get(|| async { "ok" })),
        ),
        HttpLimits {
            max_in_flight: 2,
            request_timeout: Duration::from_secs(30),
            ..HttpLimits::default()
        },
    );
    let in_flight: Vec<_> = (0..2)
        .map(|_| tokio::spawn(router.clone().oneshot(get_req("/held"))))
        .collect();
    tokio::time::timeout(Duration::from_secs(10), entered.acquire_many(2))
        .await
        .expect("both requests reach the handler within 10 s")
        .unwrap()
        .forget();

    let (response, body) = send(router.clone(), get_req("/held")).await;
    assert_problem(
        &response,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
    );
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    assert!(
        body["detail"].as_str().unwrap().contains("limit of 2"),
        "{body}"
    );
    let (response, _) = send(router.clone(), get_req("/healthz")).await;
    assert_eq!(response.status(), StatusCode::OK, "probes are never shed");

    gate.add_permits(3);
    for request in in_flight {
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    // The finished requests gave their places back.
    let (response, _) = send(router, get_req("/held")).await;
    assert_eq!(response.status(), StatusCode::OK);
}

fn with_origin(method: &str, uri: &str, origin: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::ORIGIN, origin)
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn an_allowed_origin_may_preflight_without_a_token_and_read_the_answers() {
    use platform::http::cors::{AllowedOrigins, with_cors};
    let origins = AllowedOrigins::parse("https://ops.example.com").unwrap();
    let router = || with_cors(protected(Some("s3cret")), Some(&origins));

    // The preflight a browser sends before a POST with a token and an idempotency key.
    let mut preflight = with_origin("OPTIONS", "/orders", "https://ops.example.com");
    preflight.headers_mut().insert(
        header::ACCESS_CONTROL_REQUEST_METHOD,
        "POST".parse().unwrap(),
    );
    preflight.headers_mut().insert(
        header::ACCESS_CONTROL_REQUEST_HEADERS,
        "authorization,content-type,idempotency-key"
            .parse()
            .unwrap(),
    );
    let response = router().oneshot(preflight).await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let headers = response.headers();
    assert_eq!(
        headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://ops.example.com"
    );
    let allowed = headers[header::ACCESS_CONTROL_ALLOW_HEADERS]
        .to_str()
        .unwrap()
        .to_owned();
    for name in [
        "authorization",
        "idempotency-key",
        "if-match",
        "x-min-position",
        "last-event-id",
    ] {
        assert!(allowed.contains(name), "{name} not in {allowed}");
    }

    // The request itself still needs its token; the 401 is readable by the page.
    let response = router()
        .oneshot(with_origin("POST", "/orders", "https://ops.example.com"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://ops.example.com"
    );
    let mut authorized = with_origin("POST", "/orders", "https://ops.example.com");
    authorized
        .headers_mut()
        .insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
    let response = router().oneshot(authorized).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let exposed = response.headers()[header::ACCESS_CONTROL_EXPOSE_HEADERS]
        .to_str()
        .unwrap()
        .to_owned();
    for name in [
        "etag",
        "location",
        "x-projection-position",
        "x-held-back-version",
        "retry-after",
    ] {
        assert!(exposed.contains(name), "{name} not in {exposed}");
    }

    // Another origin gets no CORS header, so its page cannot read the answer.
    let response = router()
        .oneshot(with_origin("POST", "/orders", "https://evil.example.net"))
        .await
        .unwrap();
    assert!(
        !response
            .headers()
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
    );
}

#[tokio::test]
async fn without_allowed_origins_no_cors_header_is_sent() {
    let router = platform::http::cors::with_cors(app(), None);
    let response = router
        .oneshot(with_origin(
            "GET",
            "/orders?limit=1",
            "https://ops.example.com",
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        !response
            .headers()
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
    );
}
