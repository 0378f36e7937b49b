//! `ApiError`: every way a write request fails, mapped to one RFC 9457 problem with a stable
//! `code`. Store failures are logged where they happen and answered without their cause.
//!
//! | status | code |
//! |---|---|
//! | 400 | `malformed_json`, `invalid_body`, `invalid_path`, `invalid_if_match`, `invalid_idempotency_key` |
//! | 401 | `unauthorized` |
//! | 404 | `order_not_found`, `not_found` (no such route) |
//! | 409 | `order_exists`, `concurrency_conflict` |
//! | 412 | `version_mismatch` (`If-Match` names another version, or `*` and no order exists) |
//! | 413 | `payload_too_large` |
//! | 415 | `unsupported_media_type` |
//! | 422 | `rule_violated` (with `rule`), `idempotency_key_reused` |
//! | 503 | `store_unavailable`, `event_from_newer_release`, `timeout`, `overloaded` (the last two from the platform layers) |

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use platform::Problem;

use crate::commands::{CommandError, IfMatch};

/// Seconds a client should wait before retrying after a 503 `store_unavailable`.
const STORE_RETRY_AFTER_SECS: u64 = 1;

/// A failed write request.
#[derive(Debug)]
pub enum ApiError {
    /// The command was refused or failed.
    Command(CommandError),
    /// `If-Match` is neither one quoted integer nor `*`.
    InvalidIfMatch,
    /// `Idempotency-Key` is empty, too long or not printable ASCII.
    InvalidIdempotencyKey,
    /// Already a problem (extractor rejections).
    Problem(Box<Problem>),
}

impl From<CommandError> for ApiError {
    fn from(err: CommandError) -> Self {
        ApiError::Command(err)
    }
}

impl From<Problem> for ApiError {
    fn from(problem: Problem) -> Self {
        ApiError::Problem(Box::new(problem))
    }
}

impl ApiError {
    /// The problem this error is answered with.
    pub fn to_problem(&self) -> Problem {
        match self {
            ApiError::Problem(problem) => (**problem).clone(),
            ApiError::InvalidIfMatch => Problem::bad_request(
                "invalid_if_match",
                "If-Match must be one quoted order version, e.g. If-Match: \"3\", or *",
            ),
            ApiError::InvalidIdempotencyKey => Problem::bad_request(
                "invalid_idempotency_key",
                format!(
                    "Idempotency-Key must be 1 to {} printable ASCII characters",
                    super::MAX_IDEMPOTENCY_KEY_LEN
                ),
            ),
            ApiError::Command(err) => command_problem(err),
        }
    }
}

fn command_problem(err: &CommandError) -> Problem {
    match err {
        CommandError::NotFound => Problem::new(StatusCode::NOT_FOUND, "order_not_found")
            .with_detail("no order with this id exists"),
        CommandError::AlreadyExists => Problem::new(StatusCode::CONFLICT, "order_exists")
            .with_detail("an order with this order_id already exists"),
        CommandError::Rejected { rule, message } => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "rule_violated")
                .with_detail(message.clone())
                .with_extension("rule", rule.code())
        }
        CommandError::VersionMismatch {
            expected: IfMatch::Version(expected),
            actual,
        } => Problem::new(StatusCode::PRECONDITION_FAILED, "version_mismatch")
            .with_detail(format!(
                "the order is at version {actual}, not the version {expected} given in If-Match"
            ))
            .with_extension("expected_version", expected)
            .with_extension("actual_version", actual),
        CommandError::VersionMismatch {
            expected: IfMatch::Any,
            actual,
        } => Problem::new(StatusCode::PRECONDITION_FAILED, "version_mismatch")
            .with_detail("no order with this id exists, and If-Match: * requires one")
            .with_extension("actual_version", actual),
        CommandError::ConcurrencyConflict { attempts } => {
            Problem::new(StatusCode::CONFLICT, "concurrency_conflict").with_detail(format!(
                "the order was changed concurrently {attempts} times in a row; retry the request"
            ))
        }
        CommandError::IdempotencyKeyReused => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
                .with_detail("this Idempotency-Key was already used with a different request")
        }
        // Already logged with its cause where it happened; the client gets no internals.
        CommandError::StoreUnavailable(_) => {
            Problem::unavailable(platform::db_gate::STORE_UNAVAILABLE, STORE_RETRY_AFTER_SECS)
                .with_detail("the event store is unavailable; retry later")
        }
        // Logged at error level with its cause where it happened.
        CommandError::StoreFailed(_) => Problem::internal(),
        CommandError::NewerRelease(cause) => Problem::event_from_newer_release(cause),
    }
}

/// What a refusal of a command is answered with, as the command handler records it under the
/// request's `Idempotency-Key` to replay it: the problem's status and body.
pub fn rejection_answer(err: &CommandError) -> (i16, serde_json::Value) {
    let problem = command_problem(err);
    let status = i16::try_from(problem.status().as_u16()).unwrap_or(500);
    let body = serde_json::to_value(&problem).unwrap_or_default();
    (status, body)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.to_problem().into_response()
    }
}
