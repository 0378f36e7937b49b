//! `GET /events`, `GET /events/stream`, `GET /orders/{id}/events`,
//! `GET /orders/{id}/events/stream` and `GET /orders/{id}/state`: straight from the event store.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use platform::extract::{Json, Path, Query};
use uuid::Uuid;

use super::AppState;
use crate::error::ApiError;
use crate::history::{EventPage, LogEventPage};
use crate::params::{
    HistoryPage, LogPage, OrderStreamStart, RawHistory, RawLogPage, RawLogStream, RawOrderStream,
    RawStateAt, StateAt, StreamStart,
};

/// Response header of `GET /orders/{id}/state`: the stream version the state was folded to.
pub const ORDER_VERSION_HEADER: &str = "x-order-version";

/// The whole event log, in position order: every committed event of every order (or of the
/// types asked for), with no position ever skipped, for consumers that follow the log over
/// HTTP (or catch up from it when the Redis stream has been trimmed).
#[utoipa::path(
    get,
    path = "/events",
    tag = "history",
    params(
        ("after_position" = Option<i64>, Query, description = "Only events after this global position (default 0); pass the previous page's read_to", minimum = 0),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 1000 (default 100)", minimum = 1, maximum = 1000),
        ("wait_ms" = Option<u64>, Query, description = "When nothing (of the filter's types) follows after_position yet, wait up to this long for a commit (default 0; at most WAIT_MS_MAX)", minimum = 0),
        ("event_type" = Option<String>, Query, description = "Only events of these types, comma-separated, at most 32 (OrderCreated, ItemAdded, ItemRemoved, OrderPlaced, OrderPaid, OrderShipped, OrderCancelled, or a type a newer release registered); one page reads at most EVENTS_SCAN_SPAN positions", example = "OrderPaid,OrderShipped"),
    ),
    responses(
        (status = 200, description = "A page of events; empty past the head (after wait_ms, if given)", body = LogEventPage),
        (status = 400, description = "`invalid_after_position`, `invalid_limit`, `invalid_wait`, `invalid_event_type` (a name no release writes)", body = platform::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`position_beyond_head`: after_position (or Last-Event-ID) is past the end of the log, which the `head` member gives: nothing was committed there (a database restored from an earlier backup, or a made-up position)", body = platform::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: a bug or damage (an unreadable row or stored event); logged, never detailed", body = platform::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`timeout`: the request took longer than WAIT_MS_MAX + 5 s; `store_unavailable` with Retry-After: the database cannot be used now; or `overloaded` (with Retry-After: too many requests at once)", body = platform::Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_events(
    State(app): State<AppState>,
    Query(raw): Query<RawLogPage>,
) -> Result<Json<LogEventPage>, ApiError> {
    let page = LogPage::parse(&raw, &app.reads)?;
    Ok(Json(app.history.log(page).await?))
}

/// The event log as Server-Sent Events: every committed event after a position (or of the
/// types asked for), then each new commit as it lands, on one response that stays open. Each
/// frame is `id: <position>`, `event: <event_type>`, `data: <an event of GET /events>`; a frame
/// with only an `id` moves the resume point past events a filter skipped. A client that
/// reconnects with `Last-Event-ID` (a browser's `EventSource` does) continues right after it.
#[utoipa::path(
    get,
    path = "/events/stream",
    tag = "history",
    params(
        ("after_position" = Option<i64>, Query, description = "Start after this global position (default 0: the whole log); Last-Event-ID wins when present", minimum = 0),
        ("event_type" = Option<String>, Query, description = "Only events of these types, comma-separated, as for GET /events", example = "OrderPaid,OrderShipped"),
        ("Last-Event-ID" = Option<i64>, Header, nullable = false, description = "Resume after this id (the last `id` received)", minimum = 0),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: frames until the client hangs up or the service shuts down; a comment every 15 s keeps it open", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_after_position`, `invalid_event_type`, `invalid_last_event_id`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`position_beyond_head`: after_position (or Last-Event-ID) is past the end of the log, which the `head` member gives: nothing was committed there (a database restored from an earlier backup, or a made-up position)", body = platform::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: a bug or damage (an unreadable row or stored event); logged, never detailed", body = platform::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`timeout`: the request took longer than WAIT_MS_MAX + 5 s; `store_unavailable` with Retry-After: the database cannot be used now; or `overloaded` (with Retry-After: EVENT_STREAMS_MAX streams are open, or too many requests at once)", body = platform::Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_event_stream(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(raw): Query<RawLogStream>,
) -> Result<Response, ApiError> {
    let start = StreamStart::parse(&raw, &headers)?;
    app.history
        .refuse_unknown_event_types(start.event_types.as_deref())
        .await?;
    app.history.refuse_beyond_head(start.after_position).await?;
    let stream = app.streams.follow(start).ok_or(ApiError::StreamsFull {
        limit: app.streams.limit(),
    })?;
    Ok(stream.into_response())
}

/// The audit history of one order, in version order.
#[utoipa::path(
    get,
    path = "/orders/{id}/events",
    tag = "history",
    params(
        ("id" = Uuid, Path, description = "Order id"),
        ("after_version" = Option<i64>, Query, description = "Only events after this stream version (default 0); pass the previous page's next_cursor", minimum = 0),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 1000 (default 100)", minimum = 1, maximum = 1000),
    ),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
        (status = 400, description = "`invalid_path`, `invalid_after_version`, `invalid_limit`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`order_not_found`: the order has no events", body = platform::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: a bug or damage (an unreadable row or stored event); logged, never detailed", body = platform::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`timeout`: the request took longer than WAIT_MS_MAX + 5 s; `store_unavailable` with Retry-After: the database cannot be used now; or `overloaded` (with Retry-After: too many requests at once)", body = platform::Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_order_events(
    State(app): State<AppState>,
    Path(id): Path<Uuid>,
    Query(raw): Query<RawHistory>,
) -> Result<Json<EventPage>, ApiError> {
    let page = HistoryPage::try_from(&raw)?;
    Ok(Json(app.history.events(id, page).await?))
}

/// One order's events as Server-Sent Events: its history, then each new event as it is
/// committed, on one response that stays open. Each frame is `id: <version>`,
/// `event: <event_type>`, `data: <an event of GET /orders/{id}/events>`. A client that
/// reconnects with `Last-Event-ID` (a browser's `EventSource` does) continues after that
/// version. Counted with the log's streams under EVENT_STREAMS_MAX.
#[utoipa::path(
    get,
    path = "/orders/{id}/events/stream",
    tag = "history",
    params(
        ("id" = Uuid, Path, description = "Order id"),
        ("after_version" = Option<i64>, Query, description = "Start after this version of the order (default 0: its whole history); Last-Event-ID wins when present", minimum = 0),
        ("Last-Event-ID" = Option<i64>, Header, nullable = false, description = "Resume after this id (the last version received)", minimum = 0),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: frames until the client hangs up or the service shuts down; a comment every 15 s keeps it open", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_path`, `invalid_after_version`, `invalid_last_event_id`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`version_beyond_head`: after_version (or Last-Event-ID) is past the order's last version, which the `head` member gives (a database restored from an earlier backup, or a made-up version)", body = platform::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`order_not_found`: the order has no events", body = platform::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: a bug or damage (an unreadable row or stored event); logged, never detailed", body = platform::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`timeout`: the request took longer than WAIT_MS_MAX + 5 s; `store_unavailable` with Retry-After: the database cannot be used now; or `overloaded` (with Retry-After: EVENT_STREAMS_MAX streams are open, or too many requests at once)", body = platform::Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_order_event_stream(
    State(app): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    Query(raw): Query<RawOrderStream>,
) -> Result<Response, ApiError> {
    let start = OrderStreamStart::parse(&raw, &headers)?;
    // A mistyped id would otherwise be followed, silently, forever.
    let version = app.history.order_version(id).await?;
    if version == 0 {
        return Err(ApiError::OrderNotFound {
            order_id: id,
            position: None,
        });
    }
    // Past the order's last version: see `History::refuse_beyond_head`.
    if start.after_version > version {
        return Err(ApiError::BeyondHead {
            code: "version_beyond_head",
            after: start.after_version,
            head: version,
        });
    }
    let stream = app
        .streams
        .follow_order(id, start)
        .ok_or(ApiError::StreamsFull {
            limit: app.streams.limit(),
        })?;
    Ok(stream.into_response())
}

/// The order's summary folded from the event store as of a version or an instant (now by default).
#[utoipa::path(
    get,
    path = "/orders/{id}/state",
    tag = "history",
    params(
        ("id" = Uuid, Path, description = "Order id"),
        ("version" = Option<i64>, Query, description = "Fold up to and including this stream version", minimum = 1),
        ("at" = Option<String>, Query, description = "Fold the events recorded at or before this RFC 3339 instant (write a `+` offset as `%2B`)", format = DateTime),
    ),
    responses(
        (status = 200, description = "The summary as of then", body = events::OrderSummary,
            headers(("X-Order-Version" = i64, description = "Stream version the state was folded to"))),
        (status = 400, description = "`invalid_path`, `invalid_query` (both version and at), `invalid_version`, `invalid_at`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`order_not_found`: the order had no events at that point", body = platform::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: a bug or damage (an unreadable row or stored event); logged, never detailed", body = platform::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`timeout`: the request took longer than WAIT_MS_MAX + 5 s; `store_unavailable` with Retry-After: the database cannot be used now; `overloaded` (with Retry-After: too many requests at once); or `event_from_newer_release` (with Retry-After: the order holds an event written by a newer release than this instance, while a rollout is under way)", body = platform::Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_order_state(
    State(app): State<AppState>,
    Path(id): Path<Uuid>,
    Query(raw): Query<RawStateAt>,
) -> Result<Response, ApiError> {
    let at = StateAt::try_from(&raw)?;
    let summary = app.history.state(id, at).await?;
    let version = summary.version;
    let mut response = axum::Json(summary).into_response();
    response
        .headers_mut()
        .insert(ORDER_VERSION_HEADER, HeaderValue::from(version));
    Ok(response)
}
