//! The wire format of an event in the stream: one flat field per envelope member, JSON for
//! `data` and `metadata`, so `redis-cli XRANGE es:events - +` is readable by a person.
//!
//! [`encode_fields`] and [`decode_entry`] are the only places that know the field names; decoding
//! never guesses: a missing or malformed field is a [`DecodeError`] naming it.

use chrono::{DateTime, SecondsFormat, Utc};
use events::envelope::{EventMetadata, RecordedEvent};
use uuid::Uuid;

use crate::entry::StreamEntry;

/// The field names of an event entry, in the order they are written.
pub mod field {
    /// Global position (decimal); equal to the entry id's `<n>` in `<n>-0`.
    pub const POSITION: &str = "position";
    /// Event id (UUID).
    pub const EVENT_ID: &str = "event_id";
    /// The stream the event belongs to (`order-<uuid>`).
    pub const STREAM_ID: &str = "stream_id";
    /// Version within its stream (decimal, from 1).
    pub const STREAM_VERSION: &str = "stream_version";
    /// Event type name, e.g. `OrderPlaced`.
    pub const EVENT_TYPE: &str = "event_type";
    /// Schema version of `data` (decimal).
    pub const SCHEMA_VERSION: &str = "schema_version";
    /// Event payload as JSON text.
    pub const DATA: &str = "data";
    /// Metadata as JSON text (correlation, causation, command, actor, `traceparent`).
    pub const METADATA: &str = "metadata";
    /// Commit time, RFC 3339 UTC with microseconds.
    pub const RECORDED_AT: &str = "recorded_at";

    /// Every event field, in write order.
    pub const ALL: [&str; 9] = [
        POSITION,
        EVENT_ID,
        STREAM_ID,
        STREAM_VERSION,
        EVENT_TYPE,
        SCHEMA_VERSION,
        DATA,
        METADATA,
        RECORDED_AT,
    ];
}

/// Why a stream entry is not a valid event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// A required field is absent.
    #[error("entry {id}: missing field `{field}`")]
    MissingField {
        /// The entry id.
        id: String,
        /// The missing field.
        field: &'static str,
    },
    /// A numeric field does not hold a decimal integer of the expected range.
    #[error("entry {id}: field `{field}` is not a valid number: {value:?}")]
    BadNumber {
        /// The entry id.
        id: String,
        /// The field.
        field: &'static str,
        /// Its text.
        value: String,
    },
    /// A JSON field does not hold valid JSON of the expected shape.
    #[error("entry {id}: field `{field}` is not valid JSON: {reason}")]
    BadJson {
        /// The entry id.
        id: String,
        /// The field.
        field: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// A field is not a valid UUID or RFC 3339 timestamp.
    #[error("entry {id}: field `{field}` is malformed: {value:?}")]
    Malformed {
        /// The entry id.
        id: String,
        /// The field.
        field: &'static str,
        /// Its text.
        value: String,
    },
    /// Fields were not UTF-8 in Redis ([`crate::entry::UNREADABLE_FIELD`]): their text has
    /// each invalid byte written as `\xNN`, so it is not what was written.
    #[error("entry {id}: field(s) {fields} are not UTF-8 (their invalid bytes are shown as \\xNN)")]
    NotUtf8 {
        /// The entry id.
        id: String,
        /// The fields, comma-separated.
        fields: String,
    },
    /// The id says `<n>-0` but the `position` field says something else.
    #[error("entry {id}: field `position` is {position} but the entry id says {id_position}")]
    PositionMismatch {
        /// The entry id.
        id: String,
        /// The `position` field.
        position: i64,
        /// The position in the id.
        id_position: i64,
    },
}

/// The fields of the stream entry for `event`, in [`field::ALL`] order.
pub fn encode_fields(event: &RecordedEvent) -> Vec<(&'static str, String)> {
    vec![
        (field::POSITION, event.global_position.to_string()),
        (field::EVENT_ID, event.event_id.to_string()),
        (field::STREAM_ID, event.stream_id.clone()),
        (field::STREAM_VERSION, event.stream_version.to_string()),
        (field::EVENT_TYPE, event.event_type.clone()),
        (field::SCHEMA_VERSION, event.schema_version.to_string()),
        (field::DATA, event.data.to_string()),
        (field::METADATA, metadata_json(&event.metadata)),
        (field::RECORDED_AT, format_timestamp(event.recorded_at)),
    ]
}

/// RFC 3339, UTC, microseconds (`2026-11-02T10:00:00.123456Z`): Postgres `timestamptz`
/// precision, so a decoded event equals the stored one.
pub fn format_timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn metadata_json(metadata: &EventMetadata) -> String {
    // Serialising a struct of optional strings cannot fail; fall back to an empty object rather
    // than panic if that ever changes.
    serde_json::to_string(metadata).unwrap_or_else(|_| "{}".to_owned())
}

/// Decodes an event entry written by [`encode_fields`].
///
/// Checks every field, and, when the id has the `<n>-0` form, that `n` equals `position`. An
/// entry holding fields that were not UTF-8 is refused ([`DecodeError::NotUtf8`]).
pub fn decode_entry(entry: &StreamEntry) -> Result<RecordedEvent, DecodeError> {
    let id = entry.id.as_str();
    let get = |field: &'static str| {
        entry.field(field).ok_or_else(|| DecodeError::MissingField {
            id: id.to_owned(),
            field,
        })
    };
    let number = |field: &'static str| -> Result<i64, DecodeError> {
        let value = get(field)?;
        value.parse().map_err(|_| DecodeError::BadNumber {
            id: id.to_owned(),
            field,
            value: value.to_owned(),
        })
    };
    let malformed = |field: &'static str, value: &str| DecodeError::Malformed {
        id: id.to_owned(),
        field,
        value: value.to_owned(),
    };
    let bad_json = |field: &'static str, err: serde_json::Error| DecodeError::BadJson {
        id: id.to_owned(),
        field,
        reason: err.to_string(),
    };

    if let Some(fields) = entry.field(crate::entry::UNREADABLE_FIELD) {
        return Err(DecodeError::NotUtf8 {
            id: id.to_owned(),
            fields: fields.to_owned(),
        });
    }
    let global_position = number(field::POSITION)?;
    match entry.position() {
        Some(id_position) if id_position != global_position => {
            return Err(DecodeError::PositionMismatch {
                id: id.to_owned(),
                position: global_position,
                id_position,
            });
        }
        _ => {}
    }
    let event_id_text = get(field::EVENT_ID)?;
    let event_id =
        Uuid::parse_str(event_id_text).map_err(|_| malformed(field::EVENT_ID, event_id_text))?;
    let stream_id = get(field::STREAM_ID)?.to_owned();
    let stream_version = number(field::STREAM_VERSION)?;
    let event_type = get(field::EVENT_TYPE)?.to_owned();
    let schema_text = get(field::SCHEMA_VERSION)?;
    let schema_version = schema_text.parse().map_err(|_| DecodeError::BadNumber {
        id: id.to_owned(),
        field: field::SCHEMA_VERSION,
        value: schema_text.to_owned(),
    })?;
    let data = serde_json::from_str(get(field::DATA)?).map_err(|e| bad_json(field::DATA, e))?;
    let metadata =
        serde_json::from_str(get(field::METADATA)?).map_err(|e| bad_json(field::METADATA, e))?;
    let recorded_text = get(field::RECORDED_AT)?;
    let recorded_at = DateTime::parse_from_rfc3339(recorded_text)
        .map_err(|_| malformed(field::RECORDED_AT, recorded_text))?
        .with_timezone(&Utc);

    Ok(RecordedEvent {
        global_position,
        event_id,
        stream_id,
        stream_version,
        event_type,
        schema_version,
        data,
        metadata,
        recorded_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn sample(position: i64) -> RecordedEvent {
        RecordedEvent {
            global_position: position,
            event_id: Uuid::new_v4(),
            stream_id: format!("order-{}", Uuid::new_v4()),
            stream_version: 3,
            event_type: "OrderPlaced".into(),
            schema_version: 2,
            data: serde_json::json!({"total": 1250, "items": [{"sku": "a"}]}),
            metadata: EventMetadata {
                correlation_id: Some("c-1".into()),
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                ..EventMetadata::default()
            },
            recorded_at: Utc
                .with_ymd_and_hms(2026, 11, 2, 10, 0, 0)
                .single()
                .expect("valid date")
                + chrono::Duration::microseconds(123_456),
        }
    }

    fn entry_of(event: &RecordedEvent) -> StreamEntry {
        StreamEntry {
            id: format!("{}-0", event.global_position),
            fields: encode_fields(event)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        }
    }

    #[test]
    fn an_encoded_event_decodes_to_the_same_event() {
        let event = sample(7);
        let entry = entry_of(&event);
        assert_eq!(
            entry.field("recorded_at"),
            Some("2026-11-02T10:00:00.123456Z")
        );
        assert!(
            entry
                .field("metadata")
                .expect("metadata")
                .contains("traceparent")
        );
        assert_eq!(decode_entry(&entry), Ok(event));
    }

    #[test]
    fn an_entry_missing_stream_version_is_rejected_naming_the_field() {
        let mut entry = entry_of(&sample(7));
        entry.fields.retain(|(k, _)| k != "stream_version");
        let err = decode_entry(&entry).expect_err("must fail");
        assert!(matches!(
            err,
            DecodeError::MissingField {
                field: "stream_version",
                ..
            }
        ));
        assert!(err.to_string().contains("stream_version"), "{err}");
    }

    #[test]
    fn a_bad_number_and_bad_json_are_reported_with_their_field() {
        let mut entry = entry_of(&sample(7));
        for (k, v) in &mut entry.fields {
            if k == "schema_version" {
                *v = "two".into();
            }
        }
        let err = decode_entry(&entry).expect_err("must fail");
        assert!(err.to_string().contains("`schema_version`"), "{err}");

        let mut entry = entry_of(&sample(7));
        for (k, v) in &mut entry.fields {
            if k == "data" {
                *v = "{not json".into();
            }
        }
        let err = decode_entry(&entry).expect_err("must fail");
        assert!(
            matches!(err, DecodeError::BadJson { field: "data", .. }),
            "{err}"
        );
    }

    #[test]
    fn a_position_field_disagreeing_with_the_id_is_rejected() {
        let mut entry = entry_of(&sample(7));
        entry.id = "8-0".into();
        assert!(matches!(
            decode_entry(&entry),
            Err(DecodeError::PositionMismatch {
                position: 7,
                id_position: 8,
                ..
            })
        ));
        // Ids not of the `<n>-0` form (e.g. a dead letter's own id) are not compared.
        entry.id = "1700000000000-3".into();
        assert!(decode_entry(&entry).is_ok());
    }
}
