//! `ApiError`: every way a read request fails, and its RFC 9457 problem response.
//!
//! Stable codes (also listed in the README and the OpenAPI descriptions):
//!
//! | status | code | when |
//! |---|---|---|
//! | 400 | `invalid_path` | a malformed id in the path (from `platform::extract::Path`) |
//! | 400 | `invalid_query` | a malformed `customer_id`, or `version` together with `at` |
//! | 400 | `invalid_limit` | `limit` not an integer in 1..=max |
//! | 400 | `invalid_cursor` | a cursor this service did not hand out for these filters |
//! | 400 | `invalid_status` | `status` not one of the five |
//! | 400 | `invalid_min_position` | `min_position` / `X-Min-Position` not an integer ≥ 0 |
//! | 400 | `invalid_wait` | `wait_ms` not an integer in 0..=WAIT_MS_MAX |
//! | 400 | `invalid_after_version` | `after_version` not an integer ≥ 0 |
//! | 400 | `invalid_after_position` | `after_position` not an integer ≥ 0 |
//! | 400 | `invalid_event_type` | `event_type` not a comma-separated list of at most 32 event types |
//! | 400 | `invalid_last_event_id` | `Last-Event-ID` not an integer ≥ 0 |
//! | 400 | `invalid_version` | `version` not an integer ≥ 1 |
//! | 400 | `invalid_at` | `at` not an RFC 3339 timestamp |
//! | 401 | `unauthorized` | a token is configured and missing or wrong (platform auth) |
//! | 404 | `order_not_found`, `customer_not_found` | nothing to show |
//! | 409 | `position_beyond_head`, `version_beyond_head` | following the log (or an order) from past its end: a restored database, or a made-up position; `head` says where it ends |
//! | 503 | `consistency_timeout` | the read model did not reach `min_position` within `wait_ms` |
//! | 503 | `order_held_back` | `GET /orders/{id}` of an order held back behind a dead letter, when the summary cannot answer: `min_position` at or past the held-back event, or its creation held back (no Retry-After: it waits for an operator) |
//! | 503 | `customer_held_back` | `GET /customers/{id}` of a customer with orders held back behind a dead letter of `customer_stats`, when the stats cannot answer: `min_position` at or past a held-back event, or the customer's only orders held back at their creation (no Retry-After: it waits for an operator) |
//! | 503 | `store_unavailable` | PostgreSQL cannot be reached, is restarting, or has no connection free (`platform::db::is_unavailable`) |
//! | 503 | `event_from_newer_release` | time travel over an order holding an event a newer release wrote (during a rollout) |
//! | 503 | `overloaded` | more requests at once than `MAX_IN_FLIGHT_REQUESTS` (platform layers), or more event streams than `EVENT_STREAMS_MAX` |
//! | 500 | `internal` | anything else; logged, never detailed |
//!
//! Internal errors and store outages are logged with their cause and answered without it.

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use platform::Problem;
use uuid::Uuid;

/// Response header carrying the checkpoint a read-model answer reflects.
pub const PROJECTION_POSITION_HEADER: HeaderName = HeaderName::from_static("x-projection-position");
/// Response header of `GET /orders/{id}` when the order is held back behind a dead letter: the
/// version whose event failed; the summary shows the order as of the version before it.
pub const HELD_BACK_VERSION_HEADER: HeaderName = HeaderName::from_static("x-held-back-version");
/// Seconds a client is told to wait after a consistency timeout (`Retry-After`).
pub const CONSISTENCY_RETRY_AFTER_SECS: u64 = 1;
/// Seconds a client is told to wait when the database is unavailable (`Retry-After`), as the
/// command service tells it.
pub const STORE_RETRY_AFTER_SECS: u64 = 1;

/// Every failure of a read request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A malformed parameter: 400 with `code`.
    #[error("{code}: {detail}")]
    BadRequest { code: &'static str, detail: String },
    /// No such order (as of `position` for a read-model route).
    #[error("order {order_id} not found")]
    OrderNotFound {
        order_id: Uuid,
        position: Option<i64>,
    },
    /// The order had no events yet at `at` (time travel): 404 `order_not_found` too, since it
    /// may never have any, but the detail does not claim it does not exist.
    #[error(
        "order {order_id} had no events at or before {}",
        .at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    )]
    OrderNotFoundAt {
        order_id: Uuid,
        at: chrono::DateTime<chrono::Utc>,
    },
    /// No such customer in `customer_stats` (as of `position`).
    #[error("customer {customer_id} not found")]
    CustomerNotFound { customer_id: Uuid, position: i64 },
    /// The order is held back behind a dead letter at `version` (whose event is at
    /// `event_position`, if the store holds it), and the summary cannot answer the request.
    #[error("order {order_id} is held back at version {version}")]
    OrderHeldBack {
        order_id: Uuid,
        version: i64,
        event_position: Option<i64>,
        position: i64,
    },
    /// `held_orders` of the customer's orders are held back behind dead letters (the earliest
    /// held-back event at `first_event_position`, if the store holds it), and the stats cannot
    /// answer the request.
    #[error("{held_orders} order(s) of customer {customer_id} are held back")]
    CustomerHeldBack {
        customer_id: Uuid,
        held_orders: i64,
        first_event_position: Option<i64>,
        position: i64,
    },
    /// The read model did not reach `min_position` in time.
    #[error("{projection} did not reach position {min_position} within {wait_ms} ms")]
    ConsistencyTimeout {
        projection: &'static str,
        min_position: i64,
        observed: i64,
        wait_ms: u64,
    },
    /// A read-your-writes wait for a position past the end of the log (`position_beyond_head`),
    /// found when the wait ran out: no command of this event store was answered with it.
    #[error("{projection}: min_position {min_position} is past the end of the log ({head})")]
    WaitBeyondHead {
        projection: &'static str,
        min_position: i64,
        head: i64,
        observed: i64,
    },
    /// A resume point past the end of the log (`position_beyond_head`) or of an order's
    /// stream (`version_beyond_head`): nothing was ever committed there in this store.
    #[error("{code}: {after} is past {head}")]
    BeyondHead {
        code: &'static str,
        after: i64,
        head: i64,
    },
    /// `EVENT_STREAMS_MAX` event streams are open already.
    #[error("{limit} event streams are open")]
    StreamsFull { limit: usize },
    /// The database cannot be used right now; retryable, never detailed to the client.
    #[error("store unavailable: {0:#}")]
    StoreUnavailable(anyhow::Error),
    /// The order's history holds an event a newer release wrote; an instance of that release
    /// can fold it.
    #[error("{0}")]
    NewerRelease(String),
    /// Any other database or decoding failure: a bug; never shown to the client.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// A 400 with `code` and a human detail.
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            detail: detail.into(),
        }
    }

    /// The problem this error answers with.
    pub fn to_problem(&self) -> Problem {
        match self {
            ApiError::BadRequest { code, detail } => Problem::bad_request(*code, detail.clone()),
            ApiError::OrderNotFound { order_id, position } => {
                let p = Problem::new(StatusCode::NOT_FOUND, "order_not_found")
                    .with_detail(format!("order {order_id} does not exist"))
                    .with_extension("order_id", order_id);
                with_position(p, *position)
            }
            ApiError::OrderNotFoundAt { order_id, .. } => {
                Problem::new(StatusCode::NOT_FOUND, "order_not_found")
                    .with_detail(self.to_string())
                    .with_extension("order_id", order_id)
            }
            ApiError::CustomerNotFound {
                customer_id,
                position,
            } => {
                let p = Problem::new(StatusCode::NOT_FOUND, "customer_not_found")
                    .with_detail(format!("customer {customer_id} has no orders"))
                    .with_extension("customer_id", customer_id);
                with_position(p, Some(*position))
            }
            ApiError::OrderHeldBack {
                order_id,
                version,
                event_position,
                position,
            } => {
                let mut p = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "order_held_back")
                    .with_detail(format!(
                        "the event at version {version} of order {order_id} failed to apply and \
                         was dead-lettered; the order's summary is held back before it until an \
                         operator replays or purges it (projector dlq parked order_summaries)"
                    ))
                    .with_extension("order_id", order_id)
                    .with_extension("held_back_version", version)
                    .with_header(HELD_BACK_VERSION_HEADER, HeaderValue::from(*version));
                if let Some(at) = event_position {
                    p = p.with_extension("held_back_position", at);
                }
                with_position(p, Some(*position))
            }
            ApiError::CustomerHeldBack {
                customer_id,
                held_orders,
                first_event_position,
                position,
            } => {
                let mut p = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "customer_held_back")
                    .with_detail(format!(
                        "{held_orders} order(s) of customer {customer_id} have an event that \
                         failed to apply and was dead-lettered; the customer's stats are held \
                         back before each until an operator replays or purges it (projector \
                         dlq parked customer_stats)"
                    ))
                    .with_extension("customer_id", customer_id)
                    .with_extension("held_back_orders", held_orders);
                if let Some(at) = first_event_position {
                    p = p.with_extension("held_back_position", at);
                }
                with_position(p, Some(*position))
            }
            ApiError::ConsistencyTimeout {
                projection,
                min_position,
                observed,
                wait_ms,
            } => {
                let p = Problem::unavailable("consistency_timeout", CONSISTENCY_RETRY_AFTER_SECS)
                    .with_detail(format!(
                        "the {projection} read model has applied up to position {observed}, \
                         not yet {min_position}, after waiting {wait_ms} ms; retry later"
                    ))
                    .with_extension("projection", projection)
                    .with_extension("min_position", min_position)
                    .with_extension("projection_position", observed);
                with_position(p, Some(*observed))
            }
            ApiError::WaitBeyondHead {
                projection,
                min_position,
                head,
                observed,
            } => {
                let p = Problem::new(StatusCode::CONFLICT, "position_beyond_head")
                    .with_detail(format!(
                        "min_position {min_position} is past the end of the event log ({head}): \
                         this event store answered no command with it. A made-up position, or \
                         one from before the database was restored from an earlier backup: then \
                         the write it answered is lost; check the order. Once the log passes \
                         {min_position}, reads wait for it and are served, without that write"
                    ))
                    .with_extension("projection", projection)
                    .with_extension("min_position", min_position)
                    .with_extension("head", head)
                    .with_extension("projection_position", observed);
                with_position(p, Some(*observed))
            }
            ApiError::BeyondHead { code, after, head } => Problem::new(StatusCode::CONFLICT, *code)
                .with_detail(format!(
                    "{after} is past the end ({head}): nothing was ever committed there in this \
                     event store. If it was restored from an earlier backup, what you read after \
                     {head} is no longer in it; follow again from a point you trust"
                ))
                .with_extension("head", head),
            ApiError::StreamsFull { limit } => Problem::unavailable(
                "overloaded",
                crate::log_stream::STREAMS_FULL_RETRY_AFTER_SECS,
            )
            .with_detail(format!(
                "this instance is serving its limit of {limit} event streams \
                 (EVENT_STREAMS_MAX); retry shortly or page with GET /events"
            )),
            ApiError::StoreUnavailable(e) => {
                tracing::warn!(error = %platform::config::error_chain(e.as_ref()), "the database is unavailable");
                Problem::unavailable(platform::db_gate::STORE_UNAVAILABLE, STORE_RETRY_AFTER_SECS)
                    .with_detail("the database is unavailable; retry later")
            }
            ApiError::NewerRelease(cause) => {
                tracing::warn!(
                    cause,
                    "cannot fold an order: this instance is older than the release that wrote one of its events"
                );
                Problem::event_from_newer_release(cause)
            }
            ApiError::Internal(e) => Problem::internal_error(e),
        }
    }
}

fn with_position(problem: Problem, position: Option<i64>) -> Problem {
    match position {
        Some(p) => problem.with_header(PROJECTION_POSITION_HEADER, HeaderValue::from(p)),
        None => problem,
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        let unavailable = platform::db::is_unavailable(&e);
        let e = anyhow::Error::new(e).context("database query");
        if unavailable {
            ApiError::StoreUnavailable(e)
        } else {
            ApiError::Internal(e)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.to_problem().into_response()
    }
}
