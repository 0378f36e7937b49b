//! Parsing query strings and headers into typed requests at the edge, each failure naming its
//! own `code` (see `error`). Raw query structs hold strings so that a bad number is reported as
//! `invalid_limit` rather than serde's generic `invalid_query`.

use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName};
use chrono::{DateTime, Utc};
use events::OrderStatus;
use serde::Deserialize;
use uuid::Uuid;

use crate::config::ReadArgs;
use crate::cursor::{self, CursorScope};
use crate::error::ApiError;

/// Request header asking for read-your-writes (same meaning as `?min_position=`).
pub const MIN_POSITION_HEADER: HeaderName = HeaderName::from_static("x-min-position");
/// Default page size of `GET /orders`.
pub const DEFAULT_ORDERS_LIMIT: i64 = 50;
/// Largest page size of `GET /orders`: bounds the memory and time of one request.
pub const MAX_ORDERS_LIMIT: i64 = 200;
/// Default page size of `GET /orders/{id}/events`.
pub const DEFAULT_EVENTS_LIMIT: i64 = 100;
/// Largest page size of `GET /orders/{id}/events`.
pub const MAX_EVENTS_LIMIT: i64 = 1000;

/// The read-your-writes parameters every read-model route accepts.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawConsistency {
    pub min_position: Option<String>,
    pub wait_ms: Option<String>,
}

/// `GET /orders` query string, unparsed.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawListOrders {
    pub customer_id: Option<String>,
    pub status: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
    #[serde(flatten)]
    pub consistency: RawConsistency,
}

/// `GET /orders/{id}/events` query string, unparsed.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawHistory {
    pub after_version: Option<String>,
    pub limit: Option<String>,
}

/// `GET /events` query string, unparsed.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawLogPage {
    pub after_position: Option<String>,
    pub limit: Option<String>,
    pub wait_ms: Option<String>,
    pub event_type: Option<String>,
}

/// `GET /events/stream` query string, unparsed.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawLogStream {
    pub after_position: Option<String>,
    pub event_type: Option<String>,
}

/// `GET /orders/{id}/events/stream` query string, unparsed.
#[derive(Debug, Default, Deserialize)]
pub struct RawOrderStream {
    pub after_version: Option<String>,
}

/// Request header of an SSE client that resumes: the `id` of the last frame it received.
pub const LAST_EVENT_ID_HEADER: HeaderName = HeaderName::from_static("last-event-id");

/// `GET /orders/{id}/state` query string, unparsed.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawStateAt {
    pub version: Option<String>,
    pub at: Option<String>,
}

/// A read-your-writes requirement: the read model must have applied `min_position` before the
/// answer, waiting until `deadline` at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consistency {
    pub min_position: i64,
    pub wait: Duration,
    pub deadline: Instant,
}

impl Consistency {
    /// `None` when the request asks for no particular position.
    pub fn parse(
        raw: &RawConsistency,
        headers: &HeaderMap,
        args: &ReadArgs,
    ) -> Result<Option<Self>, ApiError> {
        let wait_ms = parse_wait_ms(raw.wait_ms.as_deref(), args.wait_ms_default, args)?;
        let from_query = raw
            .min_position
            .as_deref()
            .map(parse_min_position)
            .transpose()?;
        let from_header = match headers.get(&MIN_POSITION_HEADER) {
            None => None,
            Some(value) => Some(parse_min_position(value.to_str().map_err(|_| {
                ApiError::bad_request(
                    "invalid_min_position",
                    "X-Min-Position must be an integer ≥ 0",
                )
            })?)?),
        };
        // Both given: honour the stricter one.
        let Some(min_position) = from_query.max(from_header) else {
            return Ok(None);
        };
        let wait = Duration::from_millis(wait_ms);
        Ok(Some(Self {
            min_position,
            wait,
            deadline: Instant::now() + wait,
        }))
    }
}

/// `wait_ms`: `default` when absent, else 0 to `WAIT_MS_MAX`.
fn parse_wait_ms(raw: Option<&str>, default: u64, args: &ReadArgs) -> Result<u64, ApiError> {
    match raw {
        None => Ok(default),
        Some(s) => match s.trim().parse::<u64>() {
            Ok(ms) if ms <= args.wait_ms_max => Ok(ms),
            _ => Err(ApiError::bad_request(
                "invalid_wait",
                format!(
                    "wait_ms must be an integer from 0 to {} (milliseconds)",
                    args.wait_ms_max
                ),
            )),
        },
    }
}

fn parse_min_position(s: &str) -> Result<i64, ApiError> {
    match s.trim().parse::<i64>() {
        Ok(p) if p >= 0 => Ok(p),
        _ => Err(ApiError::bad_request(
            "invalid_min_position",
            "min_position (or X-Min-Position) must be an integer ≥ 0",
        )),
    }
}

/// A page's starting point (`after_version`, `after_position`): 0 when absent, else an integer
/// ≥ 0, refused with `code` and `detail`.
fn parse_after(raw: Option<&str>, code: &'static str, detail: &str) -> Result<i64, ApiError> {
    match raw.map(|s| s.trim().parse::<i64>()) {
        None => Ok(0),
        Some(Ok(after)) if after >= 0 => Ok(after),
        Some(_) => Err(ApiError::bad_request(code, detail)),
    }
}

fn parse_limit(raw: Option<&str>, default: i64, max: i64) -> Result<i64, ApiError> {
    match raw {
        None => Ok(default),
        Some(s) => match s.trim().parse::<i64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit must be an integer from 1 to {max}"),
            )),
        },
    }
}

/// A parsed `GET /orders` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOrders {
    pub customer_id: Option<Uuid>,
    pub status: Option<OrderStatus>,
    pub limit: i64,
    /// Only orders created before this position (the cursor); `None` for the first page.
    pub before_position: Option<i64>,
}

impl ListOrders {
    /// The scope a cursor of this listing is bound to.
    pub fn scope(&self) -> CursorScope<'static> {
        CursorScope {
            customer_id: self.customer_id,
            status: self.status.map(OrderStatus::as_str),
        }
    }
}

impl TryFrom<&RawListOrders> for ListOrders {
    type Error = ApiError;

    fn try_from(raw: &RawListOrders) -> Result<Self, ApiError> {
        let customer_id = raw
            .customer_id
            .as_deref()
            .map(|s| {
                Uuid::parse_str(s.trim()).map_err(|_| {
                    ApiError::bad_request("invalid_query", "customer_id must be a UUID")
                })
            })
            .transpose()?;
        let status = raw
            .status
            .as_deref()
            .map(|s| {
                OrderStatus::parse(s.trim()).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_status",
                        "status must be one of draft, placed, paid, shipped, cancelled",
                    )
                })
            })
            .transpose()?;
        let limit = parse_limit(raw.limit.as_deref(), DEFAULT_ORDERS_LIMIT, MAX_ORDERS_LIMIT)?;
        let mut parsed = Self {
            customer_id,
            status,
            limit,
            before_position: None,
        };
        if let Some(c) = raw.cursor.as_deref() {
            let position = cursor::decode(c.trim(), parsed.scope()).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_cursor",
                    "cursor is not one this service handed out for these filters; \
                     start again without it",
                )
            })?;
            parsed.before_position = Some(position);
        }
        Ok(parsed)
    }
}

/// A parsed `GET /orders/{id}/events` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPage {
    pub after_version: i64,
    pub limit: i64,
}

impl TryFrom<&RawHistory> for HistoryPage {
    type Error = ApiError;

    fn try_from(raw: &RawHistory) -> Result<Self, ApiError> {
        let after_version = parse_after(
            raw.after_version.as_deref(),
            "invalid_after_version",
            "after_version must be an integer ≥ 0",
        )?;
        let limit = parse_limit(raw.limit.as_deref(), DEFAULT_EVENTS_LIMIT, MAX_EVENTS_LIMIT)?;
        Ok(Self {
            after_version,
            limit,
        })
    }
}

/// A parsed `GET /events` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPage {
    pub after_position: i64,
    pub limit: i64,
    /// When nothing follows `after_position` yet: how long to wait for a commit (none by
    /// default).
    pub wait: Duration,
    /// Only events of these types (every event when `None`), without repeats; well-formed
    /// names, which `History::refuse_unknown_event_types` checks are real types.
    pub event_types: Option<Vec<String>>,
}

impl LogPage {
    pub fn parse(raw: &RawLogPage, args: &ReadArgs) -> Result<Self, ApiError> {
        let after_position = parse_after_position(raw.after_position.as_deref())?;
        let limit = parse_limit(raw.limit.as_deref(), DEFAULT_EVENTS_LIMIT, MAX_EVENTS_LIMIT)?;
        let wait = Duration::from_millis(parse_wait_ms(raw.wait_ms.as_deref(), 0, args)?);
        let event_types = parse_event_types(raw.event_type.as_deref())?;
        Ok(Self {
            after_position,
            limit,
            wait,
            event_types,
        })
    }
}

/// A parsed `GET /events/stream` request: where the stream starts and what it shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// Events after this position (from `Last-Event-ID`, else `after_position`).
    pub after_position: i64,
    /// Only these types (all when `None`), as in [`LogPage::event_types`].
    pub event_types: Option<Vec<String>>,
}

impl StreamStart {
    /// `Last-Event-ID` (a resuming client) wins over `after_position` (where a new client
    /// starts): a browser reconnects with the same URL and the header.
    /// A malformed `after_position` is refused even beside the header: the URL is wrong.
    pub fn parse(raw: &RawLogStream, headers: &HeaderMap) -> Result<Self, ApiError> {
        let from_query = parse_after_position(raw.after_position.as_deref())?;
        let after_position = match headers.get(&LAST_EVENT_ID_HEADER) {
            Some(value) => parse_after(
                Some(value.to_str().unwrap_or("-")),
                "invalid_last_event_id",
                "Last-Event-ID must be an id this stream sent (an integer ≥ 0)",
            )?,
            None => from_query,
        };
        let event_types = parse_event_types(raw.event_type.as_deref())?;
        Ok(Self {
            after_position,
            event_types,
        })
    }
}

/// Where a `GET /orders/{id}/events/stream` follower starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderStreamStart {
    /// Events of the order after this version (from `Last-Event-ID`, else `after_version`).
    pub after_version: i64,
}

impl OrderStreamStart {
    /// `Last-Event-ID` (a resuming client: the version it received last) wins over
    /// `after_version`, as for the log's stream.
    /// A malformed `after_version` is refused even beside the header, as for the log's stream.
    pub fn parse(raw: &RawOrderStream, headers: &HeaderMap) -> Result<Self, ApiError> {
        let from_query = parse_after(
            raw.after_version.as_deref(),
            "invalid_after_version",
            "after_version must be an integer ≥ 0",
        )?;
        let after_version = match headers.get(&LAST_EVENT_ID_HEADER) {
            Some(value) => parse_after(
                Some(value.to_str().unwrap_or("-")),
                "invalid_last_event_id",
                "Last-Event-ID must be an id this stream sent (an order version, an integer ≥ 0)",
            )?,
            None => from_query,
        };
        Ok(Self { after_version })
    }
}

/// `after_position` of `GET /events` and `GET /events/stream`.
fn parse_after_position(raw: Option<&str>) -> Result<i64, ApiError> {
    parse_after(
        raw,
        "invalid_after_position",
        "after_position must be an integer ≥ 0",
    )
}

/// Most names one `event_type` filter may list: far more than there are types, and a bound on
/// the registry lookup an unknown name costs.
pub const MAX_FILTER_EVENT_TYPES: usize = 32;

/// Longest name an `event_type` filter may list.
const MAX_EVENT_TYPE_NAME_CHARS: usize = 64;

/// `event_type=OrderPaid,OrderShipped` (all types when absent): a comma-separated list of
/// event type names, without repeats. Only the shape is checked here; whether each name is a
/// real type is [`crate::history::History::refuse_unknown_event_types`]'s question, because a
/// type this release does not know may be one a newer release writes (during a rollout).
fn parse_event_types(raw: Option<&str>) -> Result<Option<Vec<String>>, ApiError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let mut types: Vec<String> = Vec::new();
    for name in raw.split(',').map(str::trim) {
        let well_formed = !name.is_empty()
            && name.len() <= MAX_EVENT_TYPE_NAME_CHARS
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if name.len() > MAX_EVENT_TYPE_NAME_CHARS {
            // Not echoed: the detail stays short whatever the request holds.
            return Err(invalid_event_type(&format!(
                "a name is longer than {MAX_EVENT_TYPE_NAME_CHARS} characters"
            )));
        }
        if !well_formed {
            return Err(invalid_event_type(&format!(
                "{name:?} is not an event type name"
            )));
        }
        if !types.iter().any(|t| t == name) {
            // Refused as soon as the list is too long, so the repeat check above stays
            // bounded by the limit, however many names the request holds.
            if types.len() == MAX_FILTER_EVENT_TYPES {
                return Err(invalid_event_type(&format!(
                    "at most {MAX_FILTER_EVENT_TYPES} names"
                )));
            }
            types.push(name.to_owned());
        }
    }
    Ok(Some(types))
}

/// 400 `invalid_event_type`: `problem` says what is wrong with the filter, and the detail
/// lists the types there are.
pub fn invalid_event_type(problem: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_event_type",
        format!(
            "event_type must be a comma-separated list of event types ({}): {problem}",
            events::codec::EVENT_TYPES.join(", ")
        ),
    )
}

/// When to fold an order's state as of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateAt {
    /// Everything recorded so far.
    Now,
    /// Up to and including this stream version.
    Version(i64),
    /// Everything recorded at or before this instant.
    Time(DateTime<Utc>),
}

impl TryFrom<&RawStateAt> for StateAt {
    type Error = ApiError;

    fn try_from(raw: &RawStateAt) -> Result<Self, ApiError> {
        match (raw.version.as_deref(), raw.at.as_deref()) {
            (Some(_), Some(_)) => Err(ApiError::bad_request(
                "invalid_query",
                "give either version or at, not both",
            )),
            (None, None) => Ok(StateAt::Now),
            (Some(v), None) => match v.trim().parse::<i64>() {
                Ok(v) if v >= 1 => Ok(StateAt::Version(v)),
                _ => Err(ApiError::bad_request(
                    "invalid_version",
                    "version must be an integer ≥ 1",
                )),
            },
            (None, Some(at)) => parse_at(at).map(StateAt::Time).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_at",
                    "at must be an RFC 3339 timestamp, e.g. 2026-11-02T10:15:00Z \
                     (write a + offset as %2B)",
                )
            }),
        }
    }
}

/// Parses RFC 3339; a `+` offset that form decoding turned into a space is put back. Only the
/// last space can be one: RFC 3339 lets a space stand between date and time too.
fn parse_at(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    DateTime::parse_from_rfc3339(s)
        .ok()
        .or_else(|| {
            let (before, offset) = s.rsplit_once(' ')?;
            DateTime::parse_from_rfc3339(&format!("{before}+{offset}")).ok()
        })
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn code(e: ApiError) -> &'static str {
        match e {
            ApiError::BadRequest { code, .. } => code,
            other => panic!("not a bad request: {other}"),
        }
    }

    #[test]
    fn limits_outside_the_range_are_refused() {
        for bad in ["0", "-1", "201", "ten", "1.5", ""] {
            let raw = RawListOrders {
                limit: Some(bad.into()),
                ..Default::default()
            };
            assert_eq!(
                code(ListOrders::try_from(&raw).unwrap_err()),
                "invalid_limit"
            );
        }
        let raw = RawListOrders {
            limit: Some("200".into()),
            ..Default::default()
        };
        assert_eq!(ListOrders::try_from(&raw).unwrap().limit, 200);
    }

    #[test]
    fn the_state_parameters_are_exclusive_and_checked() {
        let both = RawStateAt {
            version: Some("1".into()),
            at: Some("2026-01-01T00:00:00Z".into()),
        };
        assert_eq!(code(StateAt::try_from(&both).unwrap_err()), "invalid_query");
        let zero = RawStateAt {
            version: Some("0".into()),
            at: None,
        };
        assert_eq!(
            code(StateAt::try_from(&zero).unwrap_err()),
            "invalid_version"
        );
        let spaced = RawStateAt {
            version: None,
            at: Some("2026-01-01T00:00:00 01:00".into()),
        };
        assert!(matches!(
            StateAt::try_from(&spaced).unwrap(),
            StateAt::Time(_)
        ));
        // A space between date and time as well (RFC 3339 allows it): the offset is the last.
        let two_spaces = RawStateAt {
            version: None,
            at: Some("2026-01-01 00:00:00 01:00".into()),
        };
        assert_eq!(
            StateAt::try_from(&two_spaces).unwrap(),
            StateAt::Time("2025-12-31T23:00:00Z".parse().unwrap())
        );
        let bad = RawStateAt {
            version: None,
            at: Some("yesterday".into()),
        };
        assert_eq!(code(StateAt::try_from(&bad).unwrap_err()), "invalid_at");
    }

    #[test]
    fn the_stricter_of_query_and_header_positions_wins() {
        let mut headers = HeaderMap::new();
        headers.insert(MIN_POSITION_HEADER, "9".parse().unwrap());
        let raw = RawConsistency {
            min_position: Some("4".into()),
            wait_ms: Some("0".into()),
        };
        let c = Consistency::parse(&raw, &headers, &ReadArgs::default())
            .unwrap()
            .unwrap();
        assert_eq!(c.min_position, 9);
        let too_long = RawConsistency {
            min_position: Some("4".into()),
            wait_ms: Some("10001".into()),
        };
        let e = Consistency::parse(&too_long, &HeaderMap::new(), &ReadArgs::default());
        assert_eq!(code(e.unwrap_err()), "invalid_wait");
    }

    #[test]
    fn an_event_type_filter_is_refused_past_its_limit_of_distinct_names_and_echoes_no_long_name() {
        let names: Vec<String> = (0..=MAX_FILTER_EVENT_TYPES)
            .map(|i| format!("T{i}"))
            .collect();
        let at_limit = names[..MAX_FILTER_EVENT_TYPES].join(",");
        assert_eq!(
            parse_event_types(Some(&at_limit)).unwrap().map(|t| t.len()),
            Some(MAX_FILTER_EVENT_TYPES)
        );
        // Repeats count once.
        let repeated = vec!["OrderPaid"; 1000].join(",");
        assert_eq!(
            parse_event_types(Some(&repeated)).unwrap(),
            Some(vec!["OrderPaid".to_owned()])
        );
        assert_eq!(
            code(parse_event_types(Some(&names.join(","))).unwrap_err()),
            "invalid_event_type"
        );
        let long = "A".repeat(10_000);
        let ApiError::BadRequest { code, detail } = parse_event_types(Some(&long)).unwrap_err()
        else {
            panic!("not a bad request");
        };
        assert_eq!(code, "invalid_event_type");
        assert!(!detail.contains(&long[..100]), "{detail}");
    }

    #[test]
    fn a_malformed_start_in_the_url_is_refused_even_when_last_event_id_is_given() {
        let mut headers = HeaderMap::new();
        headers.insert(
            &LAST_EVENT_ID_HEADER,
            axum::http::HeaderValue::from_static("3"),
        );
        let raw = RawOrderStream {
            after_version: Some("9223372036854775808".into()),
        };
        assert_eq!(
            code(OrderStreamStart::parse(&raw, &headers).unwrap_err()),
            "invalid_after_version"
        );
        let raw = RawLogStream {
            after_position: Some("-1".into()),
            ..Default::default()
        };
        assert_eq!(
            code(StreamStart::parse(&raw, &headers).unwrap_err()),
            "invalid_after_position"
        );
        let raw = RawOrderStream {
            after_version: Some("1".into()),
        };
        assert_eq!(
            OrderStreamStart::parse(&raw, &headers)
                .unwrap()
                .after_version,
            3,
            "the header wins over a well-formed after_version"
        );
    }
}
