//! The envelope every stored event travels in: position, stream, version, schema version,
//! JSON payload and metadata. The event store writes it, the relay publishes it, projectors and
//! the query service read it; none of them may change its shape without a schema version bump.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Prefix of every order stream id: `order-<uuid>`.
pub const ORDER_STREAM_PREFIX: &str = "order-";

/// The stream id of an order: `order-<uuid>`.
pub fn order_stream_id(order_id: Uuid) -> String {
    format!("{ORDER_STREAM_PREFIX}{order_id}")
}

/// The order id inside an `order-<uuid>` stream id, if it is one.
pub fn order_id_of_stream(stream_id: &str) -> Option<Uuid> {
    stream_id
        .strip_prefix(ORDER_STREAM_PREFIX)
        .and_then(|rest| Uuid::parse_str(rest).ok())
}

/// Who and what caused an event, carried from the HTTP request to every consumer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventMetadata {
    /// Ties together everything done on behalf of one user request (`X-Correlation-Id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The id of the message that directly caused this one (the command id for commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// The id of the command that produced this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    /// Who issued the command, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// W3C trace context of the request that produced the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// An event about to be appended: the store assigns its position, version and time.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Unique id; appending the same id twice is recognised as a retry, not a new event.
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub data: serde_json::Value,
    pub metadata: EventMetadata,
}

/// An event as committed to the event store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Position in the global log: dense (1, 2, 3, …), in commit order.
    pub global_position: i64,
    pub event_id: Uuid,
    pub stream_id: String,
    /// Version within the stream: 1, 2, 3, …
    pub stream_version: i64,
    pub event_type: String,
    pub schema_version: i32,
    pub data: serde_json::Value,
    pub metadata: EventMetadata,
    pub recorded_at: DateTime<Utc>,
}
