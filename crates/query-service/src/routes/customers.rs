//! `GET /customers/{id}`: the `customer_stats` read model.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use platform::extract::{Path, Query};
use uuid::Uuid;

use super::{AppState, positioned};
use crate::error::ApiError;
use crate::params::{Consistency, RawConsistency};

/// A customer's order counts by status and money spent, and how many of the customer's orders
/// are held back behind a dead letter (the figures lack their held-back events).
#[utoipa::path(
    get,
    path = "/customers/{id}",
    tag = "read models",
    params(
        ("id" = Uuid, Path, description = "Customer id"),
        crate::openapi::ConsistencyParams,
    ),
    responses(
        (status = 200, description = "The customer's stats", body = crate::read_models::CustomerStats,
            headers(("X-Projection-Position" = i64, description = "Every event with a position up to this one is reflected"))),
        (status = 400, description = "`invalid_path`, `invalid_min_position`, `invalid_wait`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`customer_not_found` (carries X-Projection-Position)", body = platform::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`position_beyond_head` (carries X-Projection-Position): min_position is past the end of the log, which the `head` member gives, so this store answered no command with it (a made-up position, or one from before the database was restored from an earlier backup, whose write is lost; once new commits pass it, such reads are served without that write); answered once wait_ms has passed", body = platform::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: a bug or damage (an unreadable row or stored event); logged, never detailed", body = platform::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`timeout`: the request took longer than WAIT_MS_MAX + 5 s; `consistency_timeout` or `store_unavailable` with Retry-After; `customer_held_back` (no Retry-After; carries X-Projection-Position, and `held_back_orders`/`held_back_position` members): orders of the customer are held back behind a dead letter and min_position is at or past the earliest held-back event, or the customer's only orders are held back at their creation; or `overloaded` (with Retry-After: too many requests at once)", body = platform::Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_customer(
    State(app): State<AppState>,
    Path(id): Path<Uuid>,
    Query(raw): Query<RawConsistency>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let consistency = Consistency::parse(&raw, &headers, &app.reads)?;
    let read = app.read_models.customer(id, consistency).await?;
    Ok(positioned(read))
}
