//! The OpenAPI document served at `GET /openapi.json`: every route, body, response and error
//! status of the service, errors as the shared `Problem` schema.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::dto::{
    AddItemRequest, CancelOrderRequest, CommandResponse, CreateOrderRequest, PayOrderRequest,
    PlaceOrderRequest, ShipOrderRequest,
};
use super::routes;

/// The write API's OpenAPI description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "command-service",
        description = "Write API of the event-sourced order system. Errors are RFC 9457 \
                       `application/problem+json` with a stable `code`."
    ),
    paths(
        routes::create_order,
        routes::add_item,
        routes::remove_item,
        routes::place_order,
        routes::pay_order,
        routes::ship_order,
        routes::cancel_order,
        healthz,
        readyz,
        metrics,
        openapi_json,
    ),
    components(schemas(
        CreateOrderRequest,
        AddItemRequest,
        PayOrderRequest,
        ShipOrderRequest,
        CancelOrderRequest,
        PlaceOrderRequest,
        CommandResponse,
        platform::Problem,
    )),
    modifiers(&BearerAuth),
    tags((name = "orders", description = "Commands on orders"), (name = "operations", description = "Health, metrics and this document"))
)]
pub struct ApiDoc;

/// Declares the optional bearer token (`API_TOKEN`).
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as JSON text, rendered once at start.
pub fn render() -> String {
    ApiDoc::openapi()
        .to_json()
        .unwrap_or_else(|_| "{}".to_owned())
}

// The operations routes are served by `platform::health`; these items only describe them.

/// Liveness: 200 while the process answers
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "`{\"status\":\"ok\"}`")))]
#[allow(dead_code)]
fn healthz() {}

/// Readiness: Postgres and Redis reachable
#[utoipa::path(get, path = "/readyz", tag = "operations",
    params(("exclude" = Option<String>, Query, nullable = false,
        pattern = "^(postgres|redis)(,(postgres|redis))*$",
        description = "Checks to leave out, comma-separated or repeated (`redis`: what the Kubernetes readiness probe asks, since commands succeed with Redis down); reported as `excluded`")),
    responses(
        (status = 200, description = "`{\"status\":\"ready\",\"checks\":{…}}`"),
        (status = 400, description = "`invalid_exclude`: `exclude` names no check of this service", body = platform::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`{\"status\":\"not_ready\",\"checks\":{…}}`")))]
#[allow(dead_code)]
fn readyz() {}

/// Prometheus metrics
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
#[allow(dead_code)]
fn metrics() {}

/// This document
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
#[allow(dead_code)]
fn openapi_json() {}
