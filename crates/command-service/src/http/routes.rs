//! The write API's handlers: extract, turn the body into an [`OrderCommand`], one call to the
//! [`CommandHandler`], map the outcome. No SQL here.

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use events::{EventMetadata, OrderCommand};
use platform::extract::Path;
use uuid::Uuid;

use super::AppState;
use super::dto::{
    AddItemRequest, CancelOrderRequest, CommandResponse, CreateOrderRequest, PayOrderRequest,
    PlaceOrderRequest, ShipOrderRequest,
};
use super::error::ApiError;
use super::extract::{CommandBody, CommandHeaders, OptionalBody};
use crate::commands::{CommandContext, CommandOutcome, IdempotencyRequest};
use platform::problem::ProblemCode;
use store::idempotency::StoredResponse;

/// Header set on a response replayed for a repeated `Idempotency-Key`.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";

type ApiResult = Result<Response, ApiError>;

/// The problems every command on an existing order can answer, listed once for the OpenAPI
/// document of each such route.
pub struct OrderCommandProblems;

impl utoipa::IntoResponses for OrderCommandProblems {
    fn responses() -> std::collections::BTreeMap<
        String,
        utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
    > {
        use utoipa::openapi::content::ContentBuilder;
        use utoipa::openapi::response::ResponseBuilder;
        [
            ("400", "`malformed_json`; `invalid_body`: wrong types, a missing or unknown field, or a body that is not a JSON object; `invalid_path`; `invalid_if_match`; `invalid_idempotency_key`"),
            ("401", "Token configured and missing or wrong"),
            ("404", "`order_not_found`"),
            ("409", "`concurrency_conflict`: retries ran out"),
            ("412", "`version_mismatch`: If-Match is stale"),
            ("413", "Body too large"),
            ("415", "Not JSON"),
            (
                "422",
                "`rule_violated` (with `rule`) or `idempotency_key_reused`",
            ),
            ("500", "`internal`: a bug or damage (an unreadable stored event); logged, never detailed"),
            ("503", "`store_unavailable`, `timeout`, `overloaded` (with Retry-After: too many requests at once), or `event_from_newer_release` (with Retry-After: the order holds an event written by a newer release than this instance, while a rollout is under way)"),
        ]
        .into_iter()
        .map(|(status, description)| {
            let problem = ContentBuilder::new()
                .schema(Some(utoipa::openapi::Ref::from_schema_name("Problem")))
                .build();
            let response = ResponseBuilder::new()
                .description(description)
                .content(platform::problem::CONTENT_TYPE, problem)
                .build();
            (status.to_owned(), response.into())
        })
        .collect()
    }
}

/// The request headers of every command, listed once for the OpenAPI document of each route:
/// `If-Match`, `Idempotency-Key` and the metadata headers.
pub struct OrderCommandHeaders;

impl utoipa::IntoParams for OrderCommandHeaders {
    fn into_params(
        _: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
    ) -> Vec<utoipa::openapi::path::Parameter> {
        command_header_params()
    }
}

/// The optional headers `CommandHeaders` reads, with the bounds it enforces.
fn command_header_params() -> Vec<utoipa::openapi::path::Parameter> {
    use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
    use utoipa::openapi::{ObjectBuilder, Required, Type};

    let header = |name: &str, description: &str, schema: ObjectBuilder| {
        ParameterBuilder::new()
            .name(name)
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(description))
            .schema(Some(schema.schema_type(Type::String).build()))
            .build()
    };
    // What `platform::http::RequestContext` keeps of an id or actor header.
    let printable_id = || {
        ObjectBuilder::new()
            .min_length(Some(1))
            .max_length(Some(platform::http::MAX_ID_LEN))
            .pattern(Some(r"^[\x20-\x7E]*[\x21-\x7E][\x20-\x7E]*$"))
    };
    let if_match = header(
        "If-Match",
        "`\"<version>\"`: apply only at this version, else 412 (`\"0\"` on POST /orders: only if no order has this order_id); `*`: at any version of an existing order (POST /orders: 412 when no order has this order_id, else the create's 409; the other routes: 404 as without it)",
        // At most 18 digits: every such number is a version the service reads (a 64-bit
        // integer); a longer one may not fit, and is refused 400 `invalid_if_match`.
        ObjectBuilder::new().pattern(Some(r#"^("[0-9]{1,18}"|\*)$"#)),
    );
    let rest = [
        header(
            "Idempotency-Key",
            "Makes a retry safe: a repeat with the same key, method, path and body returns the first response (`Idempotent-Replayed: true`) and appends nothing, whether it was a success or a refusal decided on the order (404, 409 `order_exists`, 412, 422 `rule_violated`); a 409 `concurrency_conflict` or a 5xx is not kept, so a repeat runs again; but a command answered 503 (`timeout`, `store_unavailable`) may have committed after all, and then a repeat with its key gets that success. The same key with another request is 422 `idempotency_key_reused`",
            ObjectBuilder::new()
                .min_length(Some(1))
                .max_length(Some(super::MAX_IDEMPOTENCY_KEY_LEN))
                .pattern(Some(r"^[\x20-\x7E]*[\x21-\x7E][\x20-\x7E]*$")),
        ),
        header(
            "X-Correlation-Id",
            "Correlation id recorded in the event metadata (echoed); another value than 1-128 \
             printable ASCII characters is not recorded: the request id is used instead",
            printable_id(),
        ),
        header(
            "X-Actor",
            "Who issues the command, recorded in the event metadata; another value than 1-128 \
             printable ASCII characters is not recorded",
            printable_id(),
        ),
        header(
            "traceparent",
            "W3C trace context recorded in the event metadata",
            ObjectBuilder::new(),
        ),
    ];
    std::iter::once(if_match).chain(rest).collect()
}

/// Create an order
#[utoipa::path(
    post, path = "/orders", tag = "orders",
    request_body = CreateOrderRequest,
    params(OrderCommandHeaders),
    responses(
        (status = 201, description = "Created; `Location: /orders/{id}`, `ETag: \"<version>\"`", body = CommandResponse),
        (status = 400, description = "`malformed_json`; `invalid_body`: wrong types, a missing or unknown field, or a body that is not a JSON object; `invalid_if_match`; `invalid_idempotency_key`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Token configured and missing or wrong", body = platform::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`order_exists`: an order with this order_id exists", body = platform::Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = platform::Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = platform::Problem, content_type = "application/problem+json"),
        (status = 412, description = "`version_mismatch`: If-Match names another version (`\"0\"`: the order exists), or is `*` and no order has this order_id", body = platform::Problem, content_type = "application/problem+json"),
        (status = 422, description = "`rule_violated` (with `rule`) or `idempotency_key_reused`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: a bug or damage; logged, never detailed", body = platform::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`, `timeout`, `overloaded` (with Retry-After: too many requests at once), or `event_from_newer_release` (with Retry-After: the order holds an event written by a newer release than this instance, while a rollout is under way)", body = platform::Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn create_order(
    State(app): State<AppState>,
    headers: CommandHeaders,
    body: CommandBody<CreateOrderRequest>,
) -> ApiResult {
    let parsed = body.value.map(CreateOrderRequest::into_command);
    run_or_replay(&app, headers, &body.bytes, None, parsed).await
}

/// Add an item (or more units of a SKU already in the order)
#[utoipa::path(
    post, path = "/orders/{id}/items", tag = "orders",
    request_body = AddItemRequest,
    params(
        ("id" = Uuid, Path, description = "Order id"),
        OrderCommandHeaders,
    ),
    responses(
        (status = 200, description = "Applied; `ETag: \"<version>\"`", body = CommandResponse),
        OrderCommandProblems,
    ),
    security((), ("bearer" = []))
)]
pub async fn add_item(
    State(app): State<AppState>,
    Path(order_id): Path<Uuid>,
    headers: CommandHeaders,
    body: CommandBody<AddItemRequest>,
) -> ApiResult {
    let parsed = body.value.map(|value| (order_id, value.into()));
    run_or_replay(&app, headers, &body.bytes, Some(order_id), parsed).await
}

/// Remove a line
#[utoipa::path(
    delete, path = "/orders/{id}/items/{sku}", tag = "orders",
    params(
        ("id" = Uuid, Path, description = "Order id"),
        ("sku" = String, Path, description = "SKU of the line to remove (1-64 of A-Z a-z 0-9 - _ .; anything else is 422 `invalid_sku`)",
            pattern = "^[A-Za-z0-9._-]+$", min_length = 1, max_length = 64),
        OrderCommandHeaders,
    ),
    responses(
        (status = 200, description = "Applied; `ETag: \"<version>\"`", body = CommandResponse),
        (status = 400, description = "Bad path or header", body = platform::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Token configured and missing or wrong", body = platform::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`order_not_found`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`concurrency_conflict`: retries ran out", body = platform::Problem, content_type = "application/problem+json"),
        (status = 412, description = "`version_mismatch`: If-Match is stale", body = platform::Problem, content_type = "application/problem+json"),
        (status = 422, description = "`rule_violated` (with `rule`) or `idempotency_key_reused`", body = platform::Problem, content_type = "application/problem+json"),
        (status = 500, description = "`internal`: a bug or damage (an unreadable stored event); logged, never detailed", body = platform::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`, `timeout`, `overloaded` (with Retry-After: too many requests at once), or `event_from_newer_release` (with Retry-After: the order holds an event written by a newer release than this instance, while a rollout is under way)", body = platform::Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
pub async fn remove_item(
    State(app): State<AppState>,
    Path((order_id, sku)): Path<(Uuid, String)>,
    headers: CommandHeaders,
) -> ApiResult {
    run(
        &app,
        headers,
        &[],
        order_id,
        OrderCommand::RemoveItem { sku },
    )
    .await
}

/// Place a draft order (no body, or `{}`)
#[utoipa::path(
    post, path = "/orders/{id}/place", tag = "orders",
    request_body(content = Option<PlaceOrderRequest>, description = "Optional; empty or `{}`"),
    params(
        ("id" = Uuid, Path, description = "Order id"),
        OrderCommandHeaders,
    ),
    responses(
        (status = 200, description = "Applied; `ETag: \"<version>\"`", body = CommandResponse),
        OrderCommandProblems,
    ),
    security((), ("bearer" = []))
)]
pub async fn place_order(
    State(app): State<AppState>,
    Path(order_id): Path<Uuid>,
    headers: CommandHeaders,
    body: OptionalBody<PlaceOrderRequest>,
) -> ApiResult {
    let parsed = body
        .value
        .map(|PlaceOrderRequest {}| (order_id, OrderCommand::PlaceOrder));
    run_or_replay(&app, headers, &body.bytes, Some(order_id), parsed).await
}

/// Pay a placed order (the amount must equal the total)
#[utoipa::path(
    post, path = "/orders/{id}/pay", tag = "orders",
    request_body = PayOrderRequest,
    params(
        ("id" = Uuid, Path, description = "Order id"),
        OrderCommandHeaders,
    ),
    responses(
        (status = 200, description = "Applied; `ETag: \"<version>\"`", body = CommandResponse),
        OrderCommandProblems,
    ),
    security((), ("bearer" = []))
)]
pub async fn pay_order(
    State(app): State<AppState>,
    Path(order_id): Path<Uuid>,
    headers: CommandHeaders,
    body: CommandBody<PayOrderRequest>,
) -> ApiResult {
    let parsed = body.value.map(|value| (order_id, value.into()));
    run_or_replay(&app, headers, &body.bytes, Some(order_id), parsed).await
}

/// Ship a paid order
#[utoipa::path(
    post, path = "/orders/{id}/ship", tag = "orders",
    request_body = ShipOrderRequest,
    params(
        ("id" = Uuid, Path, description = "Order id"),
        OrderCommandHeaders,
    ),
    responses(
        (status = 200, description = "Applied; `ETag: \"<version>\"`", body = CommandResponse),
        OrderCommandProblems,
    ),
    security((), ("bearer" = []))
)]
pub async fn ship_order(
    State(app): State<AppState>,
    Path(order_id): Path<Uuid>,
    headers: CommandHeaders,
    body: CommandBody<ShipOrderRequest>,
) -> ApiResult {
    let parsed = body.value.map(|value| (order_id, value.into()));
    run_or_replay(&app, headers, &body.bytes, Some(order_id), parsed).await
}

/// Cancel an order that has not shipped
#[utoipa::path(
    post, path = "/orders/{id}/cancel", tag = "orders",
    request_body = CancelOrderRequest,
    params(
        ("id" = Uuid, Path, description = "Order id"),
        OrderCommandHeaders,
    ),
    responses(
        (status = 200, description = "Applied; `ETag: \"<version>\"`", body = CommandResponse),
        OrderCommandProblems,
    ),
    security((), ("bearer" = []))
)]
pub async fn cancel_order(
    State(app): State<AppState>,
    Path(order_id): Path<Uuid>,
    headers: CommandHeaders,
    body: CommandBody<CancelOrderRequest>,
) -> ApiResult {
    let parsed = body.value.map(|value| (order_id, value.into()));
    run_or_replay(&app, headers, &body.bytes, Some(order_id), parsed).await
}

/// The tail of a handler with a body: runs the command parsed from it; a body this release
/// refuses (400) is answered with that refusal, unless its `Idempotency-Key` holds the answer to
/// this very request (the same hash of method, path, body and `If-Match`). Only an earlier
/// release can have given one, with a rule that accepted the body (one that ignored unknown
/// fields): a client retrying a command that release committed gets its first answer, not a
/// 400 that says the command failed. `path_order` is the order of the path (none for a create).
async fn run_or_replay(
    app: &AppState,
    headers: CommandHeaders,
    body: &[u8],
    path_order: Option<Uuid>,
    parsed: Result<(Uuid, OrderCommand), platform::Problem>,
) -> ApiResult {
    let refused = match parsed {
        Ok((order_id, command)) => return run(app, headers, body, order_id, command).await,
        Err(refused) => refused,
    };
    let Some(key) = headers.idempotency_key.clone() else {
        return Err(refused.into());
    };
    let idempotency = IdempotencyRequest {
        key,
        request_hash: headers.request_hash(body),
    };
    match app.handler.earlier_answer(path_order, &idempotency).await? {
        Some(outcome) => Ok(respond(path_order.is_none(), outcome)),
        None => Err(refused.into()),
    }
}

/// The shared tail of every handler: build the context, execute, answer.
async fn run(
    app: &AppState,
    headers: CommandHeaders,
    body: &[u8],
    order_id: Uuid,
    command: OrderCommand,
) -> ApiResult {
    let created = matches!(command, OrderCommand::CreateOrder { .. });
    let idempotency = headers
        .idempotency_key
        .clone()
        .map(|key| IdempotencyRequest {
            key,
            request_hash: headers.request_hash(body),
        });
    let context = CommandContext {
        metadata: command_metadata(&headers.context),
        if_match: headers.if_match,
        idempotency,
    };
    let outcome = app.handler.execute(order_id, command, context).await?;
    Ok(respond(created, outcome))
}

/// Event metadata of a new command: a fresh command id, which is also the events' causation.
fn command_metadata(context: &platform::http::RequestContext) -> EventMetadata {
    let command_id = Uuid::now_v7().to_string();
    EventMetadata {
        correlation_id: Some(context.correlation_id.clone()),
        causation_id: Some(command_id.clone()),
        command_id: Some(command_id),
        actor: context.actor.clone(),
        traceparent: Some(context.traceparent.clone()),
    }
}

fn respond(created: bool, outcome: CommandOutcome) -> Response {
    let (status, body, replayed) = match outcome.replayed {
        // A refusal recorded as the key's first answer: its problem, again.
        Some(stored) if stored.status >= 400 => return replayed_problem(stored),
        Some(stored) => (
            StatusCode::from_u16(stored.status as u16).unwrap_or(StatusCode::OK),
            stored.body,
            true,
        ),
        None => (
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            serde_json::to_value(CommandResponse {
                order_id: outcome.order_id,
                version: outcome.version,
                position: outcome.position,
            })
            .unwrap_or_default(),
            false,
        ),
    };
    let mut response = (status, axum::Json(&body)).into_response();
    let headers = response.headers_mut();
    if let Some(version) = body.get("version").and_then(|v| v.as_i64())
        && let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\""))
    {
        headers.insert(header::ETAG, etag);
    }
    if status == StatusCode::CREATED
        && let Some(order_id) = body.get("order_id").and_then(|v| v.as_str())
        && let Ok(location) = HeaderValue::from_str(&format!("/orders/{order_id}"))
    {
        headers.insert(header::LOCATION, location);
    }
    if replayed {
        headers.insert(
            HeaderName::from_static(IDEMPOTENT_REPLAYED_HEADER),
            HeaderValue::from_static("true"),
        );
    }
    response
}

/// A refusal stored under an `Idempotency-Key`, answered again: its status and problem body,
/// with `Idempotent-Replayed: true`.
fn replayed_problem(stored: StoredResponse) -> Response {
    let status =
        StatusCode::from_u16(stored.status as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = stored
        .body
        .get("code")
        .and_then(|code| code.as_str())
        .map(ProblemCode::new);
    let mut response = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(platform::problem::CONTENT_TYPE),
        )],
        platform::problem::stored_body_text(&stored.body),
    )
        .into_response();
    response.headers_mut().insert(
        HeaderName::from_static(IDEMPOTENT_REPLAYED_HEADER),
        HeaderValue::from_static("true"),
    );
    if let Some(code) = code {
        response.extensions_mut().insert(code);
    }
    response
}
