//! The HTTP surface: the router, its shared state and the thin handlers.
//!
//! Handlers extract, parse into typed requests (`params`), make one call into `read_models` or
//! `history`, and map the outcome; they hold no SQL. API routes sit behind the optional bearer
//! token; `/healthz`, `/readyz`, `/metrics` and `/openapi.json` do not.

mod customers;
mod history;
mod orders;

use axum::Router;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use platform::db_gate::DbGate;
use platform::health::{Readiness, health_router};
use serde::Serialize;

use crate::config::ReadArgs;
use crate::error::PROJECTION_POSITION_HEADER;
use crate::history::History;
use crate::log_stream::LogStreams;
use crate::read_models::{Positioned, ReadModels};

pub use customers::__path_get_customer;
pub use history::{
    __path_get_event_stream, __path_get_events, __path_get_order_event_stream,
    __path_get_order_events, __path_get_order_state,
};
pub use orders::{__path_get_order, __path_list_orders};

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub read_models: ReadModels,
    pub history: History,
    /// The open `GET /events/stream` followers.
    pub streams: LogStreams,
    pub reads: ReadArgs,
}

/// The complete router (API, health, metrics, OpenAPI), without the standard layers. The API
/// routes are refused at once while `db_gate` finds PostgreSQL unreachable.
pub fn router(
    state: AppState,
    token: Option<platform::auth::BearerTokens>,
    readiness: Readiness,
    db_gate: DbGate,
    metrics: PrometheusHandle,
) -> Router {
    let wait_ms_max = state.reads.wait_ms_max;
    let api = Router::new()
        .route("/orders", get(orders::list_orders))
        .route("/orders/{id}", get(orders::get_order))
        .route("/orders/{id}/events", get(history::get_order_events))
        .route(
            "/orders/{id}/events/stream",
            get(history::get_order_event_stream),
        )
        .route("/orders/{id}/state", get(history::get_order_state))
        .route("/events", get(history::get_events))
        .route("/events/stream", get(history::get_event_stream))
        .route("/customers/{id}", get(customers::get_customer))
        // Added before the token check, so the check runs first: a request without a valid
        // token is 401 whether or not the database is there.
        .route_layer(axum::middleware::from_fn_with_state(
            db_gate,
            platform::db_gate::refuse_or_cut_while_unreachable,
        ))
        .route_layer(platform::auth::require_bearer_token(token))
        .with_state(state);
    let docs = Router::new().route(
        "/openapi.json",
        get(move || crate::openapi::openapi_json(wait_ms_max)),
    );
    platform::extract::with_fallbacks(api.merge(docs).merge(health_router(readiness, metrics)))
}

/// A JSON answer carrying `X-Projection-Position`.
fn positioned<T: Serialize>(read: Positioned<T>) -> Response {
    let mut response = axum::Json(read.value).into_response();
    response
        .headers_mut()
        .insert(PROJECTION_POSITION_HEADER, HeaderValue::from(read.position));
    response
}
