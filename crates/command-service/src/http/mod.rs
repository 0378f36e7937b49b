//! The HTTP write API: routes as CONTRACT.md lists them, behind the optional bearer token, plus
//! `/healthz`, `/readyz`, `/metrics` (platform) and `/openapi.json`, all inside platform's
//! standard layers (request id, context, trace span, metrics, panic catcher, timeout, body limit).
//!
//! - [`dto`]: request and response bodies.
//! - [`extract`]: the body-with-bytes extractors and the command headers.
//! - [`routes`]: the handlers.
//! - [`error`]: `ApiError` → problem, with the table of every code.
//! - [`openapi`]: the OpenAPI document.

pub mod dto;
pub mod error;
pub mod extract;
pub mod openapi;
pub mod routes;

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::middleware;
use axum::routing::{delete, get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use platform::auth::require_bearer_token;
use platform::db_gate::{DbGate, refuse_while_unreachable};
use platform::extract::with_fallbacks;
use platform::health::{Readiness, health_router};
use platform::http::{HttpLimits, standard_layers};

use crate::commands::CommandHandler;

/// Longest accepted `Idempotency-Key` (the column's limit too).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    pub handler: CommandHandler,
}

/// Everything the router needs.
pub struct RouterParts {
    pub state: AppState,
    pub token: Option<platform::auth::BearerTokens>,
    pub readiness: Readiness,
    /// Refuses the write routes at once while PostgreSQL cannot be reached.
    pub db_gate: DbGate,
    pub metrics: PrometheusHandle,
    pub limits: HttpLimits,
    /// Web origins allowed to call the API from a browser (`CORS_ALLOWED_ORIGINS`).
    pub allowed_origins: Option<platform::http::cors::AllowedOrigins>,
}

/// The complete router with every layer.
pub fn router(parts: RouterParts) -> Router {
    let api = Router::new()
        .route("/orders", post(routes::create_order))
        .route("/orders/{id}/items", post(routes::add_item))
        .route("/orders/{id}/items/{sku}", delete(routes::remove_item))
        .route("/orders/{id}/place", post(routes::place_order))
        .route("/orders/{id}/pay", post(routes::pay_order))
        .route("/orders/{id}/ship", post(routes::ship_order))
        .route("/orders/{id}/cancel", post(routes::cancel_order))
        // Added before the token check, so the check runs first: a request without a valid
        // token is 401 whether or not the database is there.
        .route_layer(middleware::from_fn_with_state(
            parts.db_gate,
            refuse_while_unreachable,
        ))
        .route_layer(require_bearer_token(parts.token))
        .with_state(parts.state);
    let document: Arc<str> = Arc::from(openapi::render());
    let docs = Router::new().route(
        "/openapi.json",
        get(move || {
            let document = document.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    document.to_string(),
                )
            }
        }),
    );
    let app = with_fallbacks(
        api.merge(docs)
            .merge(health_router(parts.readiness, parts.metrics)),
    );
    platform::http::cors::with_cors(
        standard_layers(app, parts.limits),
        parts.allowed_origins.as_ref(),
    )
}
