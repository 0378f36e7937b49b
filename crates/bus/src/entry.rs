//! One stream entry as read from Redis, entry ids, and the parsing of raw stream replies.
//!
//! Replies are parsed from `redis::Value` by hand (rather than through `StreamReadReply`) so the
//! field order is kept and entries deleted by a trim (returned as `[id, nil]`) are told apart
//! from real ones.
//!
//! Fields are read one entry at a time and never fail the reply around them: Redis stores
//! bytes, and an entry added by hand or by another client may hold a field that is not UTF-8.
//! Such an entry is kept, its invalid bytes written as `\xNN` (the rest of the text as it is),
//! and marked with [`UNREADABLE_FIELD`], which [`crate::decode_entry`] refuses; so it goes the
//! way of any undecodable entry (dead-lettered with its fields as far as they can be read, then
//! acknowledged) while the entries read with it flow. Failing the whole reply instead left a
//! batch of entries delivered and never processed, and a restarted consumer reading its own
//! pending entries failing on the same one for good.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;

use redis::Value;

use crate::error::BusError;

/// An entry of a Redis stream: its id and its fields in the order they were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    /// The entry id, `<global_position>-0` for events published by [`crate::Publisher`].
    pub id: String,
    /// Field/value pairs in stream order.
    pub fields: Vec<(String, String)>,
}

impl StreamEntry {
    /// The global position encoded in the id, when the id has the `<n>-0` form.
    pub fn position(&self) -> Option<i64> {
        let id = EntryId::parse(&self.id)?;
        if id.seq != 0 {
            return None;
        }
        i64::try_from(id.ms).ok()
    }

    /// The value of the first field named `name`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The names of the fields whose name or value was not UTF-8 as Redis held it (see
    /// [`UNREADABLE_FIELD`]); their text here has each invalid byte written as `\xNN`.
    pub fn unreadable_fields(&self) -> Vec<&str> {
        self.field(UNREADABLE_FIELD)
            .map(|names| names.split(',').filter(|n| !n.is_empty()).collect())
            .unwrap_or_default()
    }

    /// The value of the first field named `name`, unless it was not UTF-8 in Redis (then its
    /// text is not what was written, e.g. a stream id that names no stream).
    pub fn readable_field(&self, name: &str) -> Option<&str> {
        if self.unreadable_fields().contains(&name) {
            return None;
        }
        self.field(name)
    }

    /// The fields as a map (a repeated name keeps its first value).
    pub fn field_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::with_capacity(self.fields.len());
        for (k, v) in &self.fields {
            map.entry(k.clone()).or_insert_with(|| v.clone());
        }
        map
    }
}

/// The field added, when an entry is read, to an entry holding fields that are not UTF-8: the
/// names of those fields, comma-separated. Never written by the relay, so an event entry with
/// it cannot be decoded ([`crate::codec::DecodeError::NotUtf8`]), and a dead letter of it
/// shows which fields have their invalid bytes written as `\xNN`.
pub const UNREADABLE_FIELD: &str = "unreadable_fields";

/// The text of `bytes`, each byte that is not part of valid UTF-8 written as `\xNN`, and
/// whether there was any.
fn escaped_text(bytes: &[u8]) -> (String, bool) {
    let mut text = String::with_capacity(bytes.len());
    let mut escaped = false;
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        for byte in chunk.invalid() {
            text.push_str(&format!("\\x{byte:02x}"));
            escaped = true;
        }
    }
    (text, escaped)
}

/// A field name or value of an entry: like [`value_to_string`], but bytes that are not UTF-8
/// are escaped instead of failing the reply; the flag says whether any were.
fn field_text(op: &'static str, v: &Value) -> Result<(String, bool), BusError> {
    match v {
        Value::BulkString(b) => Ok(escaped_text(b)),
        other => value_to_string(op, other).map(|text| (text, false)),
    }
}

/// A parsed stream entry id `<ms>-<seq>`, ordered the way Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct EntryId {
    pub(crate) ms: u64,
    pub(crate) seq: u64,
}

impl EntryId {
    /// Parses `<ms>-<seq>` (or a bare `<ms>`, meaning `<ms>-0`).
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = match s.split_once('-') {
            Some((ms, seq)) => (ms.parse().ok()?, seq.parse().ok()?),
            None => (s.parse().ok()?, 0),
        };
        Some(Self { ms, seq })
    }

    /// The smallest id strictly greater than this one.
    pub(crate) fn next(self) -> Self {
        match self.seq.checked_add(1) {
            Some(seq) => Self { ms: self.ms, seq },
            None => Self {
                ms: self.ms.saturating_add(1),
                seq: 0,
            },
        }
    }
}

impl Ord for EntryId {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.ms, self.seq).cmp(&(other.ms, other.seq))
    }
}

impl PartialOrd for EntryId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Entries of a stream reply, plus the ids whose entries were deleted (trimmed) meanwhile.
#[derive(Debug, Default)]
pub(crate) struct ParsedEntries {
    pub(crate) entries: Vec<StreamEntry>,
    pub(crate) deleted: Vec<String>,
}

/// A string out of a reply value.
pub(crate) fn value_to_string(op: &'static str, v: &Value) -> Result<String, BusError> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone())
            .map_err(|_| BusError::unexpected(op, "a reply string is not UTF-8")),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::VerbatimString { text, .. } => Ok(text.clone()),
        Value::Int(i) => Ok(i.to_string()),
        Value::Okay => Ok("OK".to_owned()),
        other => Err(BusError::unexpected(
            op,
            format!("expected a string, got {other:?}"),
        )),
    }
}

/// An integer out of a reply value (Redis sometimes sends numbers as strings).
pub(crate) fn value_to_i64(op: &'static str, v: &Value) -> Result<i64, BusError> {
    match v {
        Value::Int(i) => Ok(*i),
        other => value_to_string(op, other)?
            .parse()
            .map_err(|_| BusError::unexpected(op, format!("expected an integer, got {other:?}"))),
    }
}

/// The items of an array reply (`Nil` counts as empty).
pub(crate) fn value_to_vec(op: &'static str, v: Value) -> Result<Vec<Value>, BusError> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(BusError::unexpected(
            op,
            format!("expected an array, got {other:?}"),
        )),
    }
}

/// A `name -> value` map out of a flat `[k1, v1, k2, v2, …]` array (RESP2) or a map (RESP3).
pub(crate) fn value_to_map(op: &'static str, v: Value) -> Result<HashMap<String, Value>, BusError> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Map(pairs) => pairs,
        other => {
            let items = value_to_vec(op, other)?;
            if items.len() % 2 != 0 {
                return Err(BusError::unexpected(
                    op,
                    "odd number of items in a map reply",
                ));
            }
            let mut pairs = Vec::with_capacity(items.len() / 2);
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
    };
    let mut map = HashMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        map.insert(value_to_string(op, &k)?, v);
    }
    Ok(map)
}

/// Parses `[[id, [f1, v1, …] | nil], …]`, the entry list of XRANGE, XREADGROUP and XAUTOCLAIM.
pub(crate) fn parse_entry_list(op: &'static str, v: Value) -> Result<ParsedEntries, BusError> {
    let mut parsed = ParsedEntries::default();
    for item in value_to_vec(op, v)? {
        let mut parts = value_to_vec(op, item)?.into_iter();
        let id = match parts.next() {
            Some(id) => value_to_string(op, &id)?,
            None => return Err(BusError::unexpected(op, "an entry without an id")),
        };
        match parts.next() {
            None | Some(Value::Nil) => parsed.deleted.push(id),
            Some(fields) => {
                let flat = match fields {
                    Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                    other => value_to_vec(op, other)?,
                };
                if flat.len() % 2 != 0 {
                    return Err(BusError::unexpected(
                        op,
                        format!("entry {id} has an odd field list"),
                    ));
                }
                let mut fields = Vec::with_capacity(flat.len() / 2 + 1);
                let mut unreadable = Vec::new();
                for pair in flat.chunks(2) {
                    let (name, bad_name) = field_text(op, &pair[0])?;
                    let (value, bad_value) = field_text(op, &pair[1])?;
                    if bad_name || bad_value {
                        unreadable.push(name.clone());
                    }
                    fields.push((name, value));
                }
                if !unreadable.is_empty() {
                    fields.push((UNREADABLE_FIELD.to_owned(), unreadable.join(",")));
                }
                parsed.entries.push(StreamEntry { id, fields });
            }
        }
    }
    Ok(parsed)
}

/// Parses an XREADGROUP reply: `nil` on timeout, else `[[key, entries]]` (or a RESP3 map).
pub(crate) fn parse_read_reply(op: &'static str, v: Value) -> Result<ParsedEntries, BusError> {
    let streams: Vec<Value> = match v {
        Value::Nil => return Ok(ParsedEntries::default()),
        Value::Map(pairs) => pairs.into_iter().map(|(_, entries)| entries).collect(),
        other => value_to_vec(op, other)?
            .into_iter()
            .map(|s| {
                let mut parts = value_to_vec(op, s)?.into_iter();
                parts
                    .nth(1)
                    .ok_or_else(|| BusError::unexpected(op, "a stream reply without entries"))
            })
            .collect::<Result<_, _>>()?,
    };
    let mut all = ParsedEntries::default();
    for entries in streams {
        let parsed = parse_entry_list(op, entries)?;
        all.entries.extend(parsed.entries);
        all.deleted.extend(parsed.deleted);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn the_position_is_read_from_ids_of_the_form_n_dash_zero_only() {
        let entry = |id: &str| StreamEntry {
            id: id.to_owned(),
            fields: vec![],
        };
        assert_eq!(entry("42-0").position(), Some(42));
        assert_eq!(entry("42-1").position(), None);
        assert_eq!(entry("x").position(), None);
    }

    #[test]
    fn a_field_that_is_not_utf8_marks_its_entry_without_failing_the_others() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![
                    bulk("data"),
                    Value::BulkString(b"{\"a\":\"\xff\xfe\"}".to_vec()),
                    bulk("stream_id"),
                    bulk("order-1"),
                ]),
            ]),
            Value::Array(vec![bulk("2-0"), Value::Array(vec![bulk("a"), bulk("é")])]),
        ]);
        let parsed = parse_entry_list("test", reply).expect("parse");
        assert_eq!(parsed.entries.len(), 2);
        let bad = &parsed.entries[0];
        assert_eq!(bad.field("data"), Some(r#"{"a":"\xff\xfe"}"#));
        assert_eq!(bad.unreadable_fields(), ["data"]);
        assert_eq!(bad.readable_field("data"), None);
        assert_eq!(bad.readable_field("stream_id"), Some("order-1"));
        let good = &parsed.entries[1];
        assert_eq!(good.fields, vec![("a".into(), "é".into())]);
        assert!(good.unreadable_fields().is_empty());
    }

    #[test]
    fn entry_ids_order_by_milliseconds_then_sequence() {
        let a = EntryId::parse("9-5").expect("id");
        let b = EntryId::parse("10-0").expect("id");
        assert!(a < b);
        assert_eq!(a.next().to_string(), "9-6");
        assert_eq!(EntryId { ms: 0, seq: 0 }.next().to_string(), "0-1");
    }

    #[test]
    fn a_read_reply_keeps_field_order_and_separates_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("key"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("b"), bulk("2"), bulk("a"), bulk("1")]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let parsed = parse_read_reply("test", reply).expect("parse");
        assert_eq!(parsed.entries.len(), 1);
        assert_eq!(
            parsed.entries[0].fields,
            vec![("b".into(), "2".into()), ("a".into(), "1".into())]
        );
        assert_eq!(parsed.deleted, vec!["2-0".to_owned()]);
        assert!(
            parse_read_reply("test", Value::Nil)
                .expect("nil")
                .entries
                .is_empty()
        );
    }
}
