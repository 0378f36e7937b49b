//! Extractors of the write API: the command's JSON body together with its raw bytes (hashed
//! for `Idempotency-Key`), and the command headers (`If-Match`, `Idempotency-Key`) with the
//! request context.

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use platform::Problem;
use platform::extract::{Json, payload_too_large};
use platform::http::RequestContext;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::MAX_IDEMPOTENCY_KEY_LEN;
use super::error::ApiError;
use crate::commands::IfMatch;

/// A JSON body and the bytes it was read from. A body that cannot be read (413) or is not JSON
/// (415) is rejected; one whose content this release refuses (400: malformed, wrong types, an
/// unknown field, not an object) is kept as `Err` in `value`, so the handler can first look
/// for an answer an earlier release gave the same request under its `Idempotency-Key`.
#[derive(Debug)]
pub struct CommandBody<T> {
    pub value: Result<T, Problem>,
    pub bytes: Bytes,
}

impl<T, S> FromRequest<S> for CommandBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let headers = req.headers().clone();
        let bytes = read_bytes(req, state).await?;
        let value = refused_content_kept(parse_json(headers, bytes.clone(), state).await)?;
        Ok(Self { value, bytes })
    }
}

/// A body that may be absent: an empty body means `T::default()`; anything else must be JSON
/// of type `T` (`POST /orders/{id}/place` takes no body, or `{}`). Refusals as for
/// [`CommandBody`].
#[derive(Debug)]
pub struct OptionalBody<T> {
    pub value: Result<T, Problem>,
    pub bytes: Bytes,
}

impl<T, S> FromRequest<S> for OptionalBody<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let headers = req.headers().clone();
        let bytes = read_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self {
                value: Ok(T::default()),
                bytes,
            });
        }
        let value = refused_content_kept(parse_json(headers, bytes.clone(), state).await)?;
        Ok(Self { value, bytes })
    }
}

/// Splits a parse's outcome: a 400 (the content refused) is kept for the handler, any other
/// refusal (415, 413) rejects the request at once.
// The outer error is the extractor's rejection, a `Problem` like every other one.
#[allow(clippy::result_large_err)]
fn refused_content_kept<T>(parsed: Result<T, Problem>) -> Result<Result<T, Problem>, Problem> {
    match parsed {
        Err(problem) if problem.status() != StatusCode::BAD_REQUEST => Err(problem),
        kept => Ok(kept),
    }
}

/// Reads the body within the configured limit (`DefaultBodyLimit`, set by the standard layers).
async fn read_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, Problem> {
    Bytes::from_request(req, state)
        .await
        .map_err(bytes_rejection)
}

fn bytes_rejection(rejection: BytesRejection) -> Problem {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        payload_too_large()
    } else {
        Problem::bad_request("invalid_body", "the request body could not be read")
    }
}

/// Parses with platform's `Json`, so content-type and JSON errors get the shared problem codes.
///
/// A command body is a JSON object. serde also fills a struct from an array, by position
/// (`["SKU-1", 2, 150]`); such a body is refused: its meaning would change with the order of
/// the struct's fields, and no client is told it may send one.
async fn parse_json<T: DeserializeOwned, S: Send + Sync>(
    headers: HeaderMap,
    bytes: Bytes,
    state: &S,
) -> Result<T, Problem> {
    let mut rebuilt = Request::new(Body::from(bytes.clone()));
    *rebuilt.headers_mut() = headers;
    let parsed = Json::<T>::from_request(rebuilt, state).await;
    let object = bytes.trim_ascii_start().first() == Some(&b'{');
    match parsed {
        Ok(Json(value)) if object => Ok(value),
        // Refused before its content was read (415, 413): that answer stands.
        Err(problem) if problem.status() != StatusCode::BAD_REQUEST => Err(problem),
        // Valid JSON of another kind: serde may have taken an array by position, or called
        // it a syntax error (`[1]` for a struct of no fields has "trailing characters").
        _ if !object && serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() => Err(
            Problem::bad_request("invalid_body", "the body must be a JSON object"),
        ),
        Ok(Json(value)) => Ok(value),
        Err(problem) => Err(problem),
    }
}

/// The request's command headers and context.
#[derive(Debug, Clone)]
pub struct CommandHeaders {
    pub context: RequestContext,
    /// `If-Match`: one version, or `*` (the order must exist).
    pub if_match: Option<IfMatch>,
    pub idempotency_key: Option<String>,
    /// `METHOD path`, hashed with the body for `Idempotency-Key`.
    pub method_and_path: String,
}

/// Name of the header carrying the client's idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

impl<S: Send + Sync> FromRequestParts<S> for CommandHeaders {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Ok(context) = RequestContext::from_request_parts(parts, state).await;
        let if_match = match parts.headers.get(header::IF_MATCH) {
            None => None,
            // "Any current representation" (RFC 9110): the order must exist.
            Some(value) if value.as_bytes().trim_ascii() == b"*" => Some(IfMatch::Any),
            Some(value) => Some(IfMatch::Version(
                value
                    .to_str()
                    .ok()
                    .and_then(parse_if_match)
                    .ok_or(ApiError::InvalidIfMatch)?,
            )),
        };
        let idempotency_key = match parts.headers.get(IDEMPOTENCY_KEY_HEADER) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(parse_idempotency_key)
                    .ok_or(ApiError::InvalidIdempotencyKey)?,
            ),
        };
        Ok(Self {
            context,
            if_match,
            idempotency_key,
            method_and_path: format!("{} {}", parts.method, parts.uri.path()),
        })
    }
}

impl CommandHeaders {
    /// SHA-256 of method, path, body and `If-Match`: what makes two requests "the same" for a
    /// key. `If-Match` is part of it because a refusal it caused (412) is the key's answer:
    /// a retry naming another version is another request (422 `idempotency_key_reused`), not
    /// a repeat to answer with a 412 that contradicts it. Without `If-Match` the hash is the
    /// method, path and body alone, as keys stored by earlier releases were hashed.
    pub fn request_hash(&self, body: &[u8]) -> Vec<u8> {
        let mut hasher = Sha256::new();
        hasher.update(self.method_and_path.as_bytes());
        hasher.update(b"\n");
        hasher.update(body);
        match self.if_match {
            None => {}
            Some(IfMatch::Any) => hasher.update(b"\nIf-Match: *"),
            Some(IfMatch::Version(version)) => {
                hasher.update(format!("\nIf-Match: \"{version}\"").as_bytes());
            }
        }
        hasher.finalize().to_vec()
    }
}

/// `"<non-negative integer>"` → the integer.
pub fn parse_if_match(value: &str) -> Option<i64> {
    let inner = value.trim().strip_prefix('"')?.strip_suffix('"')?;
    if inner.is_empty() || !inner.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    inner.parse().ok()
}

/// A key of 1 to [`MAX_IDEMPOTENCY_KEY_LEN`] printable ASCII characters.
pub fn parse_idempotency_key(value: &str) -> Option<String> {
    let key = value.trim();
    let valid = !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY_LEN
        && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    valid.then(|| key.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_must_be_a_quoted_integer() {
        assert_eq!(parse_if_match("\"3\""), Some(3));
        assert_eq!(parse_if_match(" \"0\" "), Some(0));
        for bad in [
            "3",
            "\"\"",
            "\"-1\"",
            "W/\"3\"",
            "*",
            "\"3a\"",
            "\"99999999999999999999\"",
        ] {
            assert_eq!(parse_if_match(bad), None, "{bad}");
        }
    }

    #[test]
    fn idempotency_keys_are_bounded() {
        assert!(parse_idempotency_key("abc-123").is_some());
        assert!(parse_idempotency_key("").is_none());
        assert!(parse_idempotency_key(&"k".repeat(MAX_IDEMPOTENCY_KEY_LEN)).is_some());
        assert!(parse_idempotency_key(&"k".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1)).is_none());
    }
}
