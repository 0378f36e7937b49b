//! `GET /orders/{id}` and `GET /orders`: the `order_summaries` read model. One order answers
//! with `ETag: "<version>"` and honours `If-None-Match` (304 when the client's copy is current).

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use platform::extract::{Path, Query};
use uuid::Uuid;

use super::{AppState, positioned};
use crate::error::{ApiError, HELD_BACK_VERSION_HEADER, PROJECTION_POSITION_HEADER};
use crate::params::{Consistency, ListOrders, RawConsistency, RawListOrders};
use crate::read_models::Positioned;

/// The summary of one order from the read model.
#[utoipa::path(
    get,
    path = "/orders/{id}",
    tag = "read models",
    params(
        ("id" = Uuid, Path, description = "Order id"),
        ("If-None-Match" = Option<String>, Header, nullable = false, description = "ETags of copies the client holds (`\"<version>\"`, `W/` allowed, or `*`): 304 if the order is still at one of them"),
        crate::openapi::ConsistencyParams,
    ),
    responses(
        (status = 200, description = "The order summary", body = events::OrderSummary,
            headers(
                ("ETag" = String, description = "`\"<version>\"`: the order's stream version"),
                ("X-Projection-Position" = i64, description = "Every event with a position up to this one is settled: applied, or held back behind a dead letter"),
                ("X-Held-Back-Version" = Option<i64>, description = "Only when the order is held back behind a dead letter: the version whose event failed; the summary shows the order as of the version before it until an operator replays or purges it"),
            )),
        (status = 304, description = "Not modified: the order is still at the version If-None-Match named (no body)",
            headers(
                ("ETag" = String, description = "`\"<version>\"`"),
                ("X-Projection-Position" = i64, description = "As for 200"),
            )),
        (status = 400, description = "`invalid_path`, `invalid_min_position`, `invalid_wait`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: API_TOKEN is set and the bearer token is missing or wrong", body = platform::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`order_not_found` (carries X-Projection-Position)", body = platform::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`position_beyond_head` (carries X-Projection-Position): min_position is past the end of the log, which the `head` member gives, so this store answered no command with it (a made-up position, or one from before the database was restored from an earlier backup, whose write is lost; once new commits pass it, such reads are served without that write); answered once wait_ms has passed", body = platform::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: a bug or damage (an unreadable row or stored event); logged, never detailed", body = platform::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`timeout`: the request took longer than WAIT_MS_MAX + 5 s; `consistency_timeout` with Retry-After: the read model did not reach min_position within wait_ms; `order_held_back` (no Retry-After; carries X-Projection-Position and X-Held-Back-Version, and `held_back_version`/`held_back_position` members): the order is held back behind a dead letter and min_position is at or past the held-back event, or its creation is held back; `store_unavailable` with Retry-After: the database cannot be used now; or `overloaded` (with Retry-After: too many requests at once)", body = platform::Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_order(
    State(app): State<AppState>,
    Path(id): Path<Uuid>,
    Query(raw): Query<RawConsistency>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let consistency = Consistency::parse(&raw, &headers, &app.reads)?;
    let read = app.read_models.order(id, consistency).await?;
    let held_back = read.value.held_back_version;
    let read = Positioned {
        value: read.value.summary,
        position: read.position,
    };
    // `"<version>"`, the tag the write API's answers carry. (Quotes and digits: always valid.)
    let etag = HeaderValue::from_str(&format!("\"{}\"", read.value.version)).ok();
    let mut response = match etag {
        Some(etag) if client_has(&headers, &etag) => (
            StatusCode::NOT_MODIFIED,
            [
                (header::ETAG, etag),
                (PROJECTION_POSITION_HEADER, HeaderValue::from(read.position)),
            ],
        )
            .into_response(),
        Some(etag) => {
            let mut response = positioned(read);
            response.headers_mut().insert(header::ETAG, etag);
            response
        }
        None => positioned(read),
    };
    if let Some(version) = held_back {
        response
            .headers_mut()
            .insert(HELD_BACK_VERSION_HEADER, HeaderValue::from(version));
    }
    Ok(response)
}

/// Whether `If-None-Match` names `etag` (weak comparison, RFC 9110 section 13.1.2) or is `*`.
fn client_has(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .any(|tag| {
            tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == etag.as_bytes()
        })
}

/// A page of orders, newest first, optionally filtered by customer and status.
#[utoipa::path(
    get,
    path = "/orders",
    tag = "read models",
    params(
        ("customer_id" = Option<Uuid>, Query, description = "Only this customer's orders"),
        ("status" = Option<events::OrderStatus>, Query, description = "Only orders in this status"),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 200 (default 50)", minimum = 1, maximum = 200),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the previous page (opaque; bound to the same filters)", min_length = 1),
        crate::openapi::ConsistencyParams,
    ),
    responses(
        (status = 200, description = "One page", body = crate::read_models::OrderPage,
            headers(("X-Projection-Position" = i64, description = "Every event with a position up to this one is reflected"))),
        (status = 400, description = "`invalid_query` (malformed customer_id), `invalid_status`, `invalid_limit`, `invalid_cursor`, `invalid_min_position`, `invalid_wait`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`position_beyond_head` (carries X-Projection-Position): min_position is past the end of the log, which the `head` member gives, so this store answered no command with it (a made-up position, or one from before the database was restored from an earlier backup, whose write is lost; once new commits pass it, such reads are served without that write); answered once wait_ms has passed", body = platform::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: a bug or damage (an unreadable row or stored event); logged, never detailed", body = platform::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`timeout`: the request took longer than WAIT_MS_MAX + 5 s; `consistency_timeout` or `store_unavailable` with Retry-After, or `overloaded` (with Retry-After: too many requests at once)", body = platform::Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn list_orders(
    State(app): State<AppState>,
    Query(raw): Query<RawListOrders>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let list = ListOrders::try_from(&raw)?;
    let consistency = Consistency::parse(&raw.consistency, &headers, &app.reads)?;
    let read = app.read_models.orders(&list, consistency).await?;
    Ok(positioned(read))
}
