//! `RequestContext`: who and what a request belongs to, for handlers and the request span.
//!
//! Built once per request by the standard layers (after the request id is set) and stored in the
//! request extensions, so the span fields and what a handler records in event metadata agree.
//! Without the layers (e.g. a bare router in a test) the extractor builds it from the headers.

use std::convert::Infallible;

use axum::extract::{FromRequestParts, Request};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;

use super::traceparent::{TraceParent, parse_traceparent};

/// Request id header, set when absent and echoed on the response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Correlation id header; defaults to the request id and is echoed on the response.
pub const CORRELATION_ID_HEADER: &str = "x-correlation-id";
/// W3C Trace Context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Who issued the request (a user or system name), recorded in event metadata.
pub const ACTOR_HEADER: &str = "x-actor";
/// Longest id or actor we keep from a header; longer values are ignored, not truncated.
pub const MAX_ID_LEN: usize = 128;

/// Per-request identifiers: extract it in a handler (`ctx: RequestContext`); never rejects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    /// The `x-request-id` of this request (generated when the client sent none).
    pub request_id: String,
    /// `X-Correlation-Id` when valid, else the request id.
    pub correlation_id: String,
    /// The client's valid `traceparent`, or a freshly generated one.
    pub traceparent: String,
    /// The trace id within `traceparent`.
    pub trace_id: String,
    /// The `X-Actor` header, when present and sane.
    pub actor: Option<String>,
}

impl RequestContext {
    /// Builds the context from request headers, generating what is missing.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let request_id = header_id(headers, REQUEST_ID_HEADER)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let correlation_id =
            header_id(headers, CORRELATION_ID_HEADER).unwrap_or_else(|| request_id.clone());
        let traceparent = headers
            .get(TRACEPARENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent)
            .unwrap_or_else(TraceParent::generate);
        let actor = header_id(headers, ACTOR_HEADER);
        Self {
            request_id,
            correlation_id,
            trace_id: traceparent.trace_id().to_owned(),
            traceparent: traceparent.to_string(),
            actor,
        }
    }
}

/// A trimmed, printable header value of at most [`MAX_ID_LEN`] bytes.
fn header_id(headers: &HeaderMap, name: &str) -> Option<String> {
    let value = headers.get(name)?.to_str().ok()?.trim();
    let sane = !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    sane.then(|| value.to_owned())
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(match parts.extensions.get::<RequestContext>() {
            Some(ctx) => ctx.clone(),
            None => RequestContext::from_headers(&parts.headers),
        })
    }
}

/// Middleware: stores the [`RequestContext`] in the extensions and echoes the request id and
/// the correlation id it uses. The request id echoed is the one logged: a value the client
/// sent that is not a usable id (too long, not printable) is answered with the UUID that stood
/// for it, so a client's report of a response always finds its log lines.
pub(crate) async fn insert_context(mut req: Request, next: Next) -> Response {
    let ctx = RequestContext::from_headers(req.headers());
    let request_id = axum::http::HeaderValue::from_str(&ctx.request_id).ok();
    let correlation_id = axum::http::HeaderValue::from_str(&ctx.correlation_id).ok();
    req.extensions_mut().insert(ctx);
    let mut response = next.run(req).await;
    if let Some(value) = request_id {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    if let Some(value) = correlation_id {
        response.headers_mut().insert(CORRELATION_ID_HEADER, value);
    }
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn missing_headers_are_generated() {
        let ctx = RequestContext::from_headers(&HeaderMap::new());
        assert_eq!(ctx.correlation_id, ctx.request_id);
        assert!(parse_traceparent(&ctx.traceparent).is_some());
        assert!(ctx.traceparent.contains(&ctx.trace_id));
        assert_eq!(ctx.actor, None);
    }

    #[test]
    fn an_invalid_traceparent_is_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT_HEADER, "00-nope".parse().unwrap());
        headers.insert(CORRELATION_ID_HEADER, "corr-1".parse().unwrap());
        headers.insert(ACTOR_HEADER, "alice".parse().unwrap());
        let ctx = RequestContext::from_headers(&headers);
        assert_ne!(ctx.traceparent, "00-nope");
        assert_eq!(ctx.correlation_id, "corr-1");
        assert_eq!(ctx.actor.as_deref(), Some("alice"));
    }
}
