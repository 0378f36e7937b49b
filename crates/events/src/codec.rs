//! How order events are stored: their `event_type` names, schema versions, JSON encoding and
//! the upcasting of older schema versions on read.
//!
//! Rule for evolving an event: never change the meaning of a stored version. Add a new schema
//! version, write new events with it, and teach [`decode`] to upcast the old version's JSON into
//! the current shape. A version this code does not know is an error, never a guess. Every
//! payload shape ever written is kept in `tests/stored/` and read back by the tests, so a
//! change that would leave stored events unreadable fails there first.
//!
//! Releases overlap while one rolls out: an older instance can meet an event a newer one wrote
//! (a type it does not know, or a schema version above the newest it knows). That event is not
//! broken, the reader is too old: [`DecodeError::needs_newer_release`] tells the two apart, so
//! readers hold such an event (or answer 503) instead of dead-lettering it or guessing.

use crate::envelope::{EventMetadata, NewEvent, RecordedEvent};
use crate::order::{
    ItemAdded, ItemRemoved, OrderCancelled, OrderCreated, OrderEvent, OrderPaid, OrderPlaced,
    OrderShipped,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// Why a stored event could not be turned into an [`OrderEvent`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    #[error("event type `{event_type}` has no schema version {schema_version} in this build")]
    UnknownSchemaVersion {
        event_type: String,
        schema_version: i32,
    },
    #[error("`{event_type}` v{schema_version} payload is invalid: {message}")]
    InvalidPayload {
        event_type: String,
        schema_version: i32,
        message: String,
    },
}

impl DecodeError {
    /// Whether the event was written by a newer release than this build: its type is unknown
    /// here, or its schema version is above the newest this build knows of its type. Every
    /// writer of the store is a release of this code, so an unknown name is a newer release's
    /// type. An invalid payload, or a version below the first, is damage, not novelty.
    pub fn needs_newer_release(&self) -> bool {
        match self {
            DecodeError::UnknownType(event_type) => written_by_newer_release(event_type, 1),
            DecodeError::UnknownSchemaVersion {
                event_type,
                schema_version,
            } => written_by_newer_release(event_type, *schema_version),
            DecodeError::InvalidPayload { .. } => false,
        }
    }
}

/// Whether an event of `event_type` at `schema_version` was written by a newer release than
/// this build: a type it does not know, or a version above the newest it knows of that type.
/// What [`DecodeError::needs_newer_release`] says of a decode, without the payload.
pub fn written_by_newer_release(event_type: &str, schema_version: i32) -> bool {
    current_schema_version(event_type).is_none_or(|newest| schema_version > newest)
}

/// The schema version this build writes events of `event_type` with (the newest it reads), or
/// `None` for a type it does not know.
pub fn current_schema_version(event_type: &str) -> Option<i32> {
    match event_type {
        // 2: `refund` recorded (version 1 events read with it absent).
        "OrderCancelled" => Some(2),
        other => EVENT_TYPES.contains(&other).then_some(1),
    }
}

/// Every event type name, for projections declaring what they handle and for filters that
/// must name real types.
pub const EVENT_TYPES: [&str; 7] = [
    "OrderCreated",
    "ItemAdded",
    "ItemRemoved",
    "OrderPlaced",
    "OrderPaid",
    "OrderShipped",
    "OrderCancelled",
];

impl OrderEvent {
    /// The stored `event_type`.
    pub fn event_type(&self) -> &'static str {
        match self {
            OrderEvent::OrderCreated(_) => "OrderCreated",
            OrderEvent::ItemAdded(_) => "ItemAdded",
            OrderEvent::ItemRemoved(_) => "ItemRemoved",
            OrderEvent::OrderPlaced(_) => "OrderPlaced",
            OrderEvent::OrderPaid(_) => "OrderPaid",
            OrderEvent::OrderShipped(_) => "OrderShipped",
            OrderEvent::OrderCancelled(_) => "OrderCancelled",
        }
    }

    /// The schema version new events of this type are written with.
    pub fn schema_version(&self) -> i32 {
        current_schema_version(self.event_type()).unwrap_or(1)
    }

    /// The JSON payload.
    pub fn to_json(&self) -> serde_json::Value {
        fn json<T: Serialize>(value: &T) -> serde_json::Value {
            // Serialising these plain structs cannot fail: no maps with non-string keys, no
            // custom serialisers that error.
            serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
        }
        match self {
            OrderEvent::OrderCreated(e) => json(e),
            OrderEvent::ItemAdded(e) => json(e),
            OrderEvent::ItemRemoved(e) => json(e),
            OrderEvent::OrderPlaced(e) => json(e),
            OrderEvent::OrderPaid(e) => json(e),
            OrderEvent::OrderShipped(e) => json(e),
            OrderEvent::OrderCancelled(e) => json(e),
        }
    }

    /// Wraps the event for appending, with a fresh time-ordered id.
    pub fn to_new_event(&self, metadata: EventMetadata) -> NewEvent {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: self.event_type().to_owned(),
            schema_version: self.schema_version(),
            data: self.to_json(),
            metadata,
        }
    }
}

/// Decodes a stored event, upcasting older schema versions.
pub fn decode(
    event_type: &str,
    schema_version: i32,
    data: &serde_json::Value,
) -> Result<OrderEvent, DecodeError> {
    fn parse<T: DeserializeOwned>(
        event_type: &str,
        schema_version: i32,
        data: &serde_json::Value,
    ) -> Result<T, DecodeError> {
        T::deserialize(data).map_err(|err| DecodeError::InvalidPayload {
            event_type: event_type.to_owned(),
            schema_version,
            message: err.to_string(),
        })
    }
    let Some(current) = current_schema_version(event_type) else {
        return Err(DecodeError::UnknownType(event_type.to_owned()));
    };
    let v = schema_version;
    // Upcasters: an older version read into the current shape. Each names the version it
    // reads; every other version but the current one is unknown.
    match (event_type, v) {
        ("OrderCancelled", 1) => {
            // Version 1 recorded no refund; the current shape says so with `None`.
            let v1: OrderCancelledV1 = parse(event_type, v, data)?;
            return Ok(OrderEvent::OrderCancelled(OrderCancelled {
                reason: v1.reason,
                refund: None,
            }));
        }
        _ if v == current => {}
        _ => {
            return Err(DecodeError::UnknownSchemaVersion {
                event_type: event_type.to_owned(),
                schema_version,
            });
        }
    }
    Ok(match event_type {
        "OrderCreated" => OrderEvent::OrderCreated(parse::<OrderCreated>(event_type, v, data)?),
        "ItemAdded" => OrderEvent::ItemAdded(parse::<ItemAdded>(event_type, v, data)?),
        "ItemRemoved" => OrderEvent::ItemRemoved(parse::<ItemRemoved>(event_type, v, data)?),
        "OrderPlaced" => OrderEvent::OrderPlaced(parse::<OrderPlaced>(event_type, v, data)?),
        "OrderPaid" => OrderEvent::OrderPaid(parse::<OrderPaid>(event_type, v, data)?),
        "OrderShipped" => OrderEvent::OrderShipped(parse::<OrderShipped>(event_type, v, data)?),
        "OrderCancelled" => {
            let cancelled: OrderCancelled = parse(event_type, v, data)?;
            if cancelled.refund.is_none() {
                return Err(DecodeError::InvalidPayload {
                    event_type: event_type.to_owned(),
                    schema_version,
                    message: "missing field `refund`".to_owned(),
                });
            }
            OrderEvent::OrderCancelled(cancelled)
        }
        other => return Err(DecodeError::UnknownType(other.to_owned())),
    })
}

/// `OrderCancelled` as schema version 1 wrote it.
#[derive(serde::Deserialize)]
struct OrderCancelledV1 {
    reason: String,
}

/// Decodes a recorded event.
pub fn decode_recorded(event: &RecordedEvent) -> Result<OrderEvent, DecodeError> {
    decode(&event.event_type, event.schema_version, &event.data)
}
