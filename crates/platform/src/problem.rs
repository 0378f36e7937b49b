//! `Problem`: the one HTTP error format of every service, RFC 9457 `application/problem+json`.
//!
//! Every error body carries a stable snake_case `code` that clients branch on; `title` and
//! `detail` are for people. 5xx problems never carry internal detail: [`Problem::internal_error`]
//! logs the cause and answers with a fixed text.

use std::fmt;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};

/// Media type of a problem body.
pub const CONTENT_TYPE: &str = "application/problem+json";
/// Prefix of the `type` URI; the code is appended (`https://errors.orders.example/not_found`).
pub const TYPE_BASE: &str = "https://errors.orders.example/";
/// Code of [`Problem::event_from_newer_release`].
pub const EVENT_FROM_NEWER_RELEASE: &str = "event_from_newer_release";
/// `Retry-After` of [`Problem::event_from_newer_release`]: long enough for a rollout's next
/// instance to start, short enough for a client's retry budget.
const NEWER_RELEASE_RETRY_AFTER_SECS: u64 = 2;
/// Members the RFC and we define, in the order a [`Problem`] writes them (its fields' order),
/// before its extensions; extension members may not use these names.
const RESERVED: [&str; 6] = ["type", "title", "status", "detail", "code", "instance"];

/// An RFC 9457 problem response, built with the `with_*` methods and sent via `IntoResponse`.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// URI naming the problem type (`https://errors.orders.example/<code>` or `about:blank`).
    #[serde(rename = "type")]
    type_uri: String,
    /// Short human-readable summary, the same for every occurrence of this type.
    title: String,
    /// HTTP status code, repeated in the body.
    status: u16,
    /// Human-readable explanation of this occurrence.
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    /// Stable snake_case machine-readable code.
    code: String,
    /// URI reference of this occurrence, often the request path.
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<String>,
    /// Extension members (e.g. `rule`, `expected_version`), serialized at the top level.
    #[serde(flatten)]
    extensions: Map<String, Value>,
    /// Extra response headers (e.g. `Retry-After`, `WWW-Authenticate`); not part of the body.
    #[serde(skip)]
    headers: HeaderMap,
}

impl Problem {
    /// A problem with `status` and stable `code`; `type` is derived from the code and `title`
    /// from the status' reason phrase.
    pub fn new(status: StatusCode, code: impl Into<String>) -> Self {
        let code = code.into();
        Self {
            type_uri: format!("{TYPE_BASE}{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: None,
            code,
            instance: None,
            extensions: Map::new(),
            headers: HeaderMap::new(),
        }
    }

    /// 400 with `code` and a detail.
    pub fn bad_request(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code).with_detail(detail)
    }

    /// 404 `not_found` with a detail.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found").with_detail(detail)
    }

    /// 401 `unauthorized` with `WWW-Authenticate: Bearer`.
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized")
            .with_detail("a valid bearer token is required")
            .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
    }

    /// 503 with `code` (e.g. `projection_lagging`) and a `Retry-After` in seconds.
    pub fn unavailable(code: impl Into<String>, retry_after_secs: u64) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code)
            .with_header(header::RETRY_AFTER, HeaderValue::from(retry_after_secs))
    }

    /// 503 `event_from_newer_release`: what the request needs holds an event written by a newer
    /// release than this instance (`cause` says which). A retry is likely to reach an instance
    /// of that release while a rollout is under way.
    pub fn event_from_newer_release(cause: &str) -> Self {
        Self::unavailable(EVENT_FROM_NEWER_RELEASE, NEWER_RELEASE_RETRY_AFTER_SECS).with_detail(
            format!("{cause}; an instance of the newer release can answer: retry later"),
        )
    }

    /// 500 `internal` with a fixed detail; never carries the cause. Prefer
    /// [`Problem::internal_error`], which logs the cause.
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal")
            .with_detail("an internal error occurred; it has been logged")
    }

    /// Logs `err` (with its whole chain) at error level and returns [`Problem::internal`].
    pub fn internal_error(err: &dyn fmt::Display) -> Self {
        tracing::error!(error = %format!("{err:#}"), "internal error");
        Self::internal()
    }

    /// Replaces the title.
    pub fn with_title(mut self, title: impl Into<String>) -> Self {
        self.title = title.into();
        self
    }

    /// Sets the detail (a human explanation of this occurrence).
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Sets the `instance` URI reference.
    pub fn with_instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = Some(instance.into());
        self
    }

    /// Replaces the `type` URI (e.g. `about:blank`).
    pub fn with_type(mut self, type_uri: impl Into<String>) -> Self {
        self.type_uri = type_uri.into();
        self
    }

    /// Adds an extension member. Names the RFC or we reserve (`type`, `status`, `code`, …) are
    /// ignored so an extension can never contradict the standard members.
    pub fn with_extension(mut self, key: impl Into<String>, value: impl Serialize) -> Self {
        let key = key.into();
        if RESERVED.contains(&key.as_str()) {
            tracing::warn!(%key, "ignored a problem extension that shadows a standard member");
            return self;
        }
        match serde_json::to_value(value) {
            Ok(v) => {
                self.extensions.insert(key, v);
            }
            Err(e) => tracing::warn!(%key, error = %e, "cannot serialize a problem extension"),
        }
        self
    }

    /// Adds a response header (e.g. `Retry-After`); an existing header of that name is replaced.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The stable code.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The detail, if any.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// An extension member, if set.
    pub fn extension(&self, key: &str) -> Option<&Value> {
        self.extensions.get(key)
    }

    /// The extra response headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problem {}

/// A problem body stored as JSON and read back, written again as [`Problem`] wrote it: the
/// RFC's members in its field order, then the extensions in the map's order. Stored as
/// `jsonb`, a body comes back with its keys reordered, so a refusal answered again would
/// differ, byte for byte, from the first answer. Anything but an object is written as it is.
///
/// Byte for byte as long as `serde_json` keeps its maps sorted (its `preserve_order` feature
/// off, as in this workspace: both the first answer and this one then sort the extensions),
/// and for strings and integers: `jsonb` rewrites a float's notation (no refusal carries one).
pub fn stored_body_text(body: &Value) -> String {
    let Some(members) = body.as_object() else {
        return body.to_string();
    };
    let rfc = RESERVED
        .iter()
        .filter_map(|name| members.get_key_value(*name));
    let extensions = members
        .iter()
        .filter(|(name, _)| !RESERVED.contains(&name.as_str()));
    let written: Vec<String> = rfc
        .chain(extensions)
        .map(|(name, value)| format!("{}:{value}", Value::String(name.clone())))
        .collect();
    format!("{{{}}}", written.join(","))
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match serde_json::to_vec(&self) {
            Ok(body) => body,
            // Cannot happen with a Map of Values, but never panic in an error path.
            Err(_) => br#"{"type":"about:blank","title":"Internal Server Error","status":500,"code":"internal"}"#.to_vec(),
        };
        let mut response = (
            status,
            [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
            body,
        )
            .into_response();
        response.headers_mut().extend(self.headers);
        response.extensions_mut().insert(ProblemCode(self.code));
        response
    }
}

/// The `code` of a problem response, kept in the response's extensions so that middleware can
/// tell what a route answered without parsing its body (`db_gate` reacts to `store_unavailable`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProblemCode(String);

impl ProblemCode {
    /// The code of a problem body sent without a [`Problem`] at hand (one stored earlier and
    /// answered again).
    pub fn new(code: impl Into<String>) -> Self {
        Self(code.into())
    }

    /// The stable code (`store_unavailable`, `not_found`, …).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl utoipa::PartialSchema for Problem {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
        let string = |desc: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some(desc))
        };
        ObjectBuilder::new()
            .description(Some(
                "RFC 9457 problem details (application/problem+json). Extension members such as \
                 `rule` or `expected_version` may appear beside the standard ones.",
            ))
            .property(
                "type",
                string("URI of the problem type, https://errors.orders.example/<code>"),
            )
            .required("type")
            .property("title", string("short summary of the problem type"))
            .required("title")
            .property(
                "status",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .description(Some("HTTP status code")),
            )
            .required("status")
            .property("detail", string("explanation of this occurrence"))
            .property(
                "code",
                string("stable snake_case code to branch on").examples(["not_found"]),
            )
            .required("code")
            .property("instance", string("URI reference of this occurrence"))
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .into()
    }
}

impl utoipa::ToSchema for Problem {}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// What `jsonb` gives back (keys reordered) is written again as the problem first was.
    #[test]
    fn a_stored_problem_body_is_written_again_byte_for_byte() {
        let problem = Problem::new(StatusCode::PRECONDITION_FAILED, "version_mismatch")
            .with_detail("expected version 2, the order is at 3")
            .with_instance("/orders/x")
            .with_extension("expected_version", 2)
            .with_extension("actual_version", 3)
            .with_extension("zone", serde_json::json!({ "b": 1, "a": [true, null] }));
        let first = serde_json::to_string(&problem).unwrap();
        let stored: Value = serde_json::from_str(&first).unwrap();
        assert_ne!(stored.to_string(), first, "the test needs reordered keys");

        assert_eq!(stored_body_text(&stored), first);
        assert_eq!(stored_body_text(&Value::Null), "null");
    }

    #[test]
    fn the_body_has_the_standard_members_and_extensions() {
        let p = Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "rule_violated")
            .with_detail("cannot place an empty order")
            .with_extension("rule", "order_has_items")
            .with_extension("code", "sneaky");
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["type"], "https://errors.orders.example/rule_violated");
        assert_eq!(v["title"], "Unprocessable Entity");
        assert_eq!(v["status"], 422);
        assert_eq!(v["code"], "rule_violated");
        assert_eq!(v["rule"], "order_has_items");
        assert!(v.get("instance").is_none());
    }
}
