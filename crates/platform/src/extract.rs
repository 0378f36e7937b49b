//! Extractors whose rejections are [`Problem`]s, and the 404/405 fallbacks.
//!
//! axum's own extractors answer with plain text; these wrappers keep every error of every
//! service in one format with a stable `code`:
//!
//! | extractor | status | code |
//! |---|---|---|
//! | [`Json`] | 415 | `unsupported_media_type` (content type is not JSON) |
//! | [`Json`] | 400 | `malformed_json` (syntax error) |
//! | [`Json`] | 400 | `invalid_body` (wrong type, missing field; serde's message as detail) |
//! | [`Json`] | 413 | `payload_too_large` (body limit exceeded) |
//! | [`Path`] | 400 | `invalid_path` (e.g. a malformed uuid) |
//! | [`Query`] | 400 | `invalid_query` |

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::one_line;
use crate::problem::Problem;

/// JSON request body (and response body) whose rejection is a [`Problem`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Maps axum's JSON rejection to our problem codes.
pub fn json_rejection(rejection: JsonRejection) -> Problem {
    match &rejection {
        JsonRejection::MissingJsonContentType(_) => {
            Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
                .with_detail("expected a request with content-type: application/json")
        }
        JsonRejection::JsonSyntaxError(e) => Problem::bad_request(
            "malformed_json",
            format!("the body is not valid JSON: {}", source_text(e)),
        ),
        JsonRejection::JsonDataError(e) => Problem::bad_request("invalid_body", source_text(e)),
        _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => payload_too_large(),
        _ => Problem::bad_request("invalid_body", rejection_detail(&rejection.body_text())),
    }
}

/// 413 `payload_too_large`, also used by the body-limit layer.
pub fn payload_too_large() -> Problem {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        .with_detail("the request body exceeds the size limit")
}

/// Longest `detail` made of a rejected request's own text, in bytes. serde and axum quote the
/// bad value back; a megabyte of it should not return in the answer, nor fill the access log.
pub const MAX_REJECTION_DETAIL_LEN: usize = 300;

/// The innermost useful message (serde's), without axum's generic prefix.
fn source_text(e: &dyn std::error::Error) -> String {
    let msg = match e.source() {
        Some(inner) => inner.to_string(),
        None => e.to_string(),
    };
    rejection_detail(&msg)
}

/// `msg` on one line, cut to [`MAX_REJECTION_DETAIL_LEN`] bytes (at a character boundary) with
/// `…` when longer.
fn rejection_detail(msg: &dyn std::fmt::Display) -> String {
    let mut text = one_line(msg);
    if text.len() > MAX_REJECTION_DETAIL_LEN {
        text.truncate(text.floor_char_boundary(MAX_REJECTION_DETAIL_LEN));
        text.push('…');
    }
    text
}

/// Path parameters whose rejection is a 400 `invalid_path` [`Problem`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

/// Maps axum's path rejection to 400 `invalid_path` (or 500 for a routing mistake).
pub fn path_rejection(rejection: PathRejection) -> Problem {
    match rejection {
        PathRejection::FailedToDeserializePathParams(e) => {
            Problem::bad_request("invalid_path", rejection_detail(&e.body_text()))
        }
        other => Problem::internal_error(&format_args!("path extraction: {}", other.body_text())),
    }
}

/// Query string whose rejection is a 400 `invalid_query` [`Problem`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

/// Maps axum's query rejection to 400 `invalid_query`.
pub fn query_rejection(rejection: QueryRejection) -> Problem {
    let detail = match &rejection {
        QueryRejection::FailedToDeserializeQueryString(e) => source_text(e),
        other => other.body_text(),
    };
    Problem::bad_request("invalid_query", rejection_detail(&detail))
}

/// Router fallback: 404 `not_found`. Use with `Router::fallback(extract::not_found)`.
pub async fn not_found() -> Problem {
    Problem::not_found("no route matches this path")
}

/// 405 `method_not_allowed`. Use with `Router::method_not_allowed_fallback(extract::method_not_allowed)`.
pub async fn method_not_allowed() -> Problem {
    Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
        .with_detail("this route does not accept this method")
}

/// Adds the [`not_found`] and [`method_not_allowed`] fallbacks to a router.
pub fn with_fallbacks<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
) -> axum::Router<S> {
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}
