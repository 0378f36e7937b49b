//! The dead-letter stream of each consumer group, `<stream>:dlq:<group>`.
//!
//! A dead letter is the original entry's fields plus why and when it failed. Moving an entry
//! there and acknowledging it in the group is atomic, so an entry is never both lost and
//! unacknowledged, nor dead-lettered twice by a crash between the two steps. A consumer
//! dead-letters an entry only while it is still pending for that consumer
//! ([`DeadLetterQueue::dead_letter_pending`], one script: XADD only if XACK acknowledged it), so
//! two consumers holding the same entry (its first holder and one that claimed it) never both
//! write a letter, and nobody writes one for an entry another consumer has acknowledged. Dead-letter
//! streams are never trimmed by this crate: an operator lists, replays or purges them with the
//! projector's `dlq` subcommands, which use the helpers here. `data` and `metadata` stay JSON
//! text, so `redis-cli XRANGE es:events:dlq:<group> - +` is readable.

use std::collections::BTreeMap;

use chrono::Utc;
use events::envelope::RecordedEvent;
use redis::Value;
use redis::aio::ConnectionManager;

use crate::codec::{DecodeError, decode_entry, field, format_timestamp};
use crate::entry::{StreamEntry, parse_entry_list};
use crate::error::BusError;
use crate::keys::StreamKeys;

/// Names of the fields a dead letter adds to the original ones.
pub mod dlq_field {
    /// The error message of the last attempt.
    pub const ERROR: &str = "error";
    /// How many times the entry was delivered before it was given up on.
    pub const ATTEMPTS: &str = "attempts";
    /// When it was dead-lettered, RFC 3339 UTC.
    pub const FAILED_AT: &str = "failed_at";
    /// The entry id in the event stream (`<position>-0`).
    pub const ORIGINAL_ID: &str = "original_id";
    /// The consumer that gave up on it.
    pub const CONSUMER: &str = "consumer";

    /// All of them, in write order.
    pub const ALL: [&str; 5] = [ERROR, ATTEMPTS, FAILED_AT, ORIGINAL_ID, CONSUMER];
}

/// One entry of a dead-letter stream.
///
/// Read leniently: a hand-written entry lacking a field still lists (with an empty value or
/// zero attempts) so an operator can see and delete it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The id of the dead letter in the dead-letter stream.
    pub id: String,
    /// The fields of the original event entry (everything but the dead-letter fields).
    pub original: BTreeMap<String, String>,
    /// The error message of the last attempt.
    pub error: String,
    /// Deliveries before it was given up on.
    pub attempts: u32,
    /// When it was dead-lettered (RFC 3339 text as stored).
    pub failed_at: String,
    /// The original entry id in the event stream.
    pub original_id: String,
    /// The consumer that dead-lettered it.
    pub consumer: String,
}

impl DeadLetter {
    fn from_entry(entry: StreamEntry) -> Self {
        let mut dead = DeadLetter {
            id: entry.id,
            original: BTreeMap::new(),
            error: String::new(),
            attempts: 0,
            failed_at: String::new(),
            original_id: String::new(),
            consumer: String::new(),
        };
        for (k, v) in entry.fields {
            match k.as_str() {
                dlq_field::ERROR => dead.error = v,
                dlq_field::ATTEMPTS => dead.attempts = v.parse().unwrap_or(0),
                dlq_field::FAILED_AT => dead.failed_at = v,
                dlq_field::ORIGINAL_ID => dead.original_id = v,
                dlq_field::CONSUMER => dead.consumer = v,
                _ => {
                    dead.original.entry(k).or_insert(v);
                }
            }
        }
        dead
    }

    /// The original entry as it was in the event stream (id `original_id`, event fields in
    /// their usual order), e.g. to replay it through a projection.
    pub fn original_entry(&self) -> StreamEntry {
        let mut fields: Vec<(String, String)> = field::ALL
            .iter()
            .filter_map(|name| {
                self.original
                    .get(*name)
                    .map(|v| ((*name).to_owned(), v.clone()))
            })
            .collect();
        fields.extend(
            self.original
                .iter()
                .filter(|(k, _)| !field::ALL.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        StreamEntry {
            id: self.original_id.clone(),
            fields,
        }
    }

    /// The original event, decoded.
    pub fn event(&self) -> Result<RecordedEvent, DecodeError> {
        decode_entry(&self.original_entry())
    }
}

/// KEYS: stream, dead-letter stream, unfinished tries; ARGV: group, consumer, entry id, then the
/// letter's field/value pairs. Writes the letter and acknowledges the entry only if it is
/// pending for `consumer`; returns the letter's id, or nil when it was not.
const DEAD_LETTER_PENDING_SCRIPT: &str = r"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if pending[1] == nil then return false end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[3]) ~= 1 then return false end
redis.call('HDEL', KEYS[3], ARGV[3])
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
";

/// The field/value pairs of `entry`'s dead letter.
fn letter_fields(entry: &StreamEntry, error: &str, attempts: u32, consumer: &str) -> Vec<String> {
    // A field named like a dead-letter field (an entry dead-lettered before and replayed)
    // would be duplicated; the fresh values win.
    let mut fields: Vec<String> = entry
        .fields
        .iter()
        .filter(|(k, _)| !dlq_field::ALL.contains(&k.as_str()))
        .flat_map(|(k, v)| [k.clone(), v.clone()])
        .collect();
    fields.extend([
        dlq_field::ERROR.to_owned(),
        error.to_owned(),
        dlq_field::ATTEMPTS.to_owned(),
        attempts.to_string(),
        dlq_field::FAILED_AT.to_owned(),
        format_timestamp(Utc::now()),
        dlq_field::ORIGINAL_ID.to_owned(),
        entry.id.clone(),
        dlq_field::CONSUMER.to_owned(),
        consumer.to_owned(),
    ]);
    fields
}

/// Writes and administers the dead-letter streams of one event stream.
#[derive(Clone)]
pub struct DeadLetterQueue {
    conn: ConnectionManager,
    keys: StreamKeys,
}

impl std::fmt::Debug for DeadLetterQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterQueue")
            .field("stream", &self.keys.stream)
            .finish_non_exhaustive()
    }
}

impl DeadLetterQueue {
    /// The dead-letter streams of `keys.stream`.
    pub fn new(conn: ConnectionManager, keys: StreamKeys) -> Self {
        Self { conn, keys }
    }

    /// Atomically appends `entry` to the dead-letter stream of `group` with `error`, `attempts`,
    /// `failed_at` (now), `original_id` and `consumer`, and acknowledges it in `group`, whether
    /// or not it was pending there: for events that come from the event store (the sweeper, a
    /// rebuild), whose entries Redis may have lost. Also forgets the entry's unfinished tries,
    /// as [`Self::dead_letter_pending`] does: acknowledged, it is tried by nobody again, and a
    /// field left in [`StreamKeys::trying`] would stay there for good. A consumer giving up on an
    /// entry it holds uses [`Self::dead_letter_pending`]. Returns the id of the dead letter.
    pub async fn dead_letter(
        &self,
        group: &str,
        entry: &StreamEntry,
        error: &str,
        attempts: u32,
        consumer: &str,
    ) -> Result<String, BusError> {
        const OP: &str = "dead-letter";
        let mut xadd = redis::cmd("XADD");
        xadd.arg(self.keys.dlq(group))
            .arg("*")
            .arg(letter_fields(entry, error, attempts, consumer));
        let mut xack = redis::cmd("XACK");
        xack.arg(&self.keys.stream).arg(group).arg(&entry.id);
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(self.keys.trying(group)).arg(&entry.id);

        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(xadd)
            .add_command(xack)
            .ignore()
            .add_command(hdel)
            .ignore();
        let mut conn = self.conn.clone();
        let (id,): (String,) = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| BusError::classify(OP, &self.keys.stream, group, e))?;
        tracing::warn!(group, original_id = %entry.id, attempts, error, "dead-lettered entry");
        Ok(id)
    }

    /// Like [`Self::dead_letter`], but only if `entry` is still pending in `group` for
    /// `consumer`, in one script: the letter is written only when its XACK acknowledged the
    /// entry. Returns the id of the letter, or `None` when the entry was no longer this
    /// consumer's (another consumer claimed it, or it was acknowledged): whoever holds it now
    /// decides about it. Also forgets the entry's unfinished tries.
    pub async fn dead_letter_pending(
        &self,
        group: &str,
        entry: &StreamEntry,
        error: &str,
        attempts: u32,
        consumer: &str,
    ) -> Result<Option<String>, BusError> {
        const OP: &str = "dead-letter";
        let mut conn = self.conn.clone();
        let id: Option<String> = redis::Script::new(DEAD_LETTER_PENDING_SCRIPT)
            .key(&self.keys.stream)
            .key(self.keys.dlq(group))
            .key(self.keys.trying(group))
            .arg(group)
            .arg(consumer)
            .arg(&entry.id)
            .arg(letter_fields(entry, error, attempts, consumer))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| BusError::classify(OP, &self.keys.stream, group, e))?;
        match &id {
            Some(_) => {
                tracing::warn!(group, original_id = %entry.id, attempts, error, "dead-lettered entry");
            }
            None => tracing::info!(group, original_id = %entry.id, consumer,
                "not dead-lettering an entry no longer pending for this consumer"),
        }
        Ok(id)
    }

    /// The oldest `count` dead letters of `group`.
    pub async fn list(&self, group: &str, count: usize) -> Result<Vec<DeadLetter>, BusError> {
        self.range(group, "-", "+", Some(count)).await
    }

    /// Up to `count` dead letters of `group` after the letter `after` (from the oldest when
    /// `None`) up to and including the letter `until`, oldest first: one page of a walk over
    /// the dead letters that holds one page at a time.
    pub async fn page(
        &self,
        group: &str,
        after: Option<&str>,
        until: &str,
        count: usize,
    ) -> Result<Vec<DeadLetter>, BusError> {
        // Nothing follows the largest id there is, and Redis refuses an exclusive start at it
        // ("invalid start ID") rather than answer an empty page.
        if after
            .and_then(crate::entry::EntryId::parse)
            .is_some_and(|id| id.ms == u64::MAX && id.seq == u64::MAX)
        {
            return Ok(Vec::new());
        }
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        self.range(group, &start, until, Some(count)).await
    }

    /// The id of the newest dead letter of `group`, if there is one.
    pub async fn newest_id(&self, group: &str) -> Result<Option<String>, BusError> {
        const OP: &str = "read dead letters";
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("XREVRANGE")
            .arg(self.keys.dlq(group))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(|e| BusError::from_redis(OP, e))?;
        Ok(parse_entry_list(OP, reply)?
            .entries
            .into_iter()
            .next()
            .map(|entry| entry.id))
    }

    /// The dead letter `id` of `group`, if it exists.
    pub async fn get(&self, group: &str, id: &str) -> Result<Option<DeadLetter>, BusError> {
        Ok(self.range(group, id, id, Some(1)).await?.into_iter().next())
    }

    async fn range(
        &self,
        group: &str,
        start: &str,
        end: &str,
        count: Option<usize>,
    ) -> Result<Vec<DeadLetter>, BusError> {
        const OP: &str = "read dead letters";
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.keys.dlq(group)).arg(start).arg(end);
        if let Some(count) = count {
            cmd.arg("COUNT").arg(count);
        }
        let mut conn = self.conn.clone();
        let reply: Value = cmd
            .query_async(&mut conn)
            .await
            .map_err(|e| BusError::from_redis(OP, e))?;
        Ok(parse_entry_list(OP, reply)?
            .entries
            .into_iter()
            .map(DeadLetter::from_entry)
            .collect())
    }

    /// Deletes dead letters of `group` (after a replay or a purge); returns how many existed.
    pub async fn delete<S: AsRef<str>>(&self, group: &str, ids: &[S]) -> Result<u64, BusError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("XDEL");
        cmd.arg(self.keys.dlq(group));
        for id in ids {
            cmd.arg(id.as_ref());
        }
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn)
            .await
            .map_err(|e| BusError::from_redis("delete dead letters", e))
    }

    /// How many dead letters `group` has.
    pub async fn len(&self, group: &str) -> Result<u64, BusError> {
        let mut conn = self.conn.clone();
        redis::cmd("XLEN")
            .arg(self.keys.dlq(group))
            .query_async(&mut conn)
            .await
            .map_err(|e| BusError::from_redis("count dead letters", e))
    }
}
