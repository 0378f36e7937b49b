//! A read-only look at the event stream, for operators (`projector status`), for trimming and
//! for the relay's history check: its length, the position of its newest entry, the newest
//! entry the relay wrote (with its event id), and each consumer group's consumers, pending
//! entries and lag. Nothing here writes to Redis.

use redis::Value;
use redis::aio::ConnectionManager;
use serde::Serialize;
use uuid::Uuid;

use crate::entry::{
    EntryId, StreamEntry, parse_entry_list, value_to_i64, value_to_map, value_to_string,
    value_to_vec,
};
use crate::error::BusError;
use crate::keys::StreamKeys;

/// The event stream as Redis holds it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamInfo {
    /// Entries in the stream (after trimming).
    pub length: u64,
    /// Position of the newest entry the relay wrote ([`newest_relayed_entry`]): how far it has
    /// published, live. Entries added by hand above it (`XADD … *`, whose id is a timestamp)
    /// are passed over. `None` when the stream is empty or missing, or holds no relayed entry
    /// near its top.
    pub last_position: Option<i64>,
    /// The consumer groups, one per projection that has ever consumed.
    pub groups: Vec<GroupInfo>,
}

/// One consumer group, as `XINFO GROUPS` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupInfo {
    /// The group's name: the projection's.
    pub name: String,
    /// Consumers the group knows (projector instances, and ones not yet cleaned up).
    pub consumers: u64,
    /// Entries delivered to a consumer and not yet acknowledged.
    pub pending: u64,
    /// Id of the last entry delivered to any consumer (`0-0` before the first).
    pub last_delivered_id: String,
    /// Entries not yet delivered to the group; `None` when Redis cannot tell (an entry was
    /// deleted from the range, or a server older than 7.0).
    pub lag: Option<u64>,
}

/// Reads the stream's length, newest entry and consumer groups. A missing stream (nothing
/// published yet, or Redis restarted empty) is an empty one without groups.
pub async fn inspect(conn: &ConnectionManager, keys: &StreamKeys) -> Result<StreamInfo, BusError> {
    const OP: &str = "inspect the stream";
    let mut conn = conn.clone();
    let (exists, length): (bool, u64) = redis::pipe()
        .cmd("EXISTS")
        .arg(keys.stream())
        .cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut conn)
        .await
        .map_err(|e| BusError::from_redis(OP, e))?;
    let last_position = newest_relayed_entry(&conn, keys)
        .await?
        .map(|(position, _)| position);
    // XINFO GROUPS fails on a missing key (an empty stream that exists may have groups).
    let groups = if exists {
        groups(&conn, keys.stream()).await?
    } else {
        Vec::new()
    };
    Ok(StreamInfo {
        length,
        last_position,
        groups,
    })
}

impl GroupInfo {
    /// The id after the last delivered one: where the group's undelivered entries begin.
    pub(crate) fn after_last_delivered(&self) -> Result<EntryId, BusError> {
        EntryId::parse(&self.last_delivered_id)
            .map(EntryId::next)
            .ok_or_else(|| {
                BusError::unexpected(
                    "read consumer groups",
                    format!("bad id {:?}", self.last_delivered_id),
                )
            })
    }
}

/// The newest `count` entries of `stream`, newest first; none when it is empty or missing.
async fn newest_entries(
    conn: &ConnectionManager,
    stream: &str,
    count: usize,
    op: &'static str,
) -> Result<Vec<StreamEntry>, BusError> {
    let mut conn = conn.clone();
    let reply: Value = redis::cmd("XREVRANGE")
        .arg(stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(count)
        .query_async(&mut conn)
        .await
        .map_err(|e| BusError::from_redis(op, e))?;
    Ok(parse_entry_list(op, reply)?.entries)
}

/// The id of the newest entry of `stream`; `None` when it is empty or missing.
pub(crate) async fn last_entry_id(
    conn: &ConnectionManager,
    stream: &str,
) -> Result<Option<EntryId>, BusError> {
    const OP: &str = "read last entry";
    let Some(entry) = newest_entries(conn, stream, 1, OP)
        .await?
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    EntryId::parse(&entry.id)
        .map(Some)
        .ok_or_else(|| BusError::unexpected(OP, format!("bad entry id {:?}", entry.id)))
}

/// How many of the newest entries [`newest_relayed_entry`] looks through for one the relay
/// wrote: entries added by hand (a test entry, the demo's poison message) sit above it.
const RELAYED_ENTRY_LOOKBACK: usize = 16;

/// The newest entry among the last [`RELAYED_ENTRY_LOOKBACK`] that the relay wrote: its id is
/// `<position>-0`, its `position` field says the same position, and it has an `event_id`.
/// `None` when the stream is empty, missing, or holds none of those near its top. (An entry
/// added with `XADD … *` has an id of the same form, a millisecond timestamp, but not the
/// `position` field to match.)
pub async fn newest_relayed_entry(
    conn: &ConnectionManager,
    keys: &StreamKeys,
) -> Result<Option<(i64, Uuid)>, BusError> {
    const OP: &str = "read the newest entries";
    let entries = newest_entries(conn, &keys.stream, RELAYED_ENTRY_LOOKBACK, OP).await?;
    Ok(entries.iter().find_map(|entry| {
        let position = entry.position()?;
        let stated = entry
            .field(crate::codec::field::POSITION)?
            .parse::<i64>()
            .ok()?;
        let event_id = entry.field(crate::codec::field::EVENT_ID)?;
        (stated == position).then_some((position, Uuid::parse_str(event_id).ok()?))
    }))
}

/// The consumer groups of `stream` (`XINFO GROUPS`); the stream must exist.
pub(crate) async fn groups(
    conn: &ConnectionManager,
    stream: &str,
) -> Result<Vec<GroupInfo>, BusError> {
    const OP: &str = "read consumer groups";
    let mut conn = conn.clone();
    let reply: Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(&mut conn)
        .await
        .map_err(|e| BusError::from_redis(OP, e))?;
    value_to_vec(OP, reply)?
        .into_iter()
        .map(|group| {
            let info = value_to_map(OP, group)?;
            let field = |name: &str| {
                info.get(name)
                    .ok_or_else(|| BusError::unexpected(OP, format!("XINFO GROUPS lacks {name}")))
            };
            let count = |name: &str| -> Result<u64, BusError> {
                u64::try_from(value_to_i64(OP, field(name)?)?)
                    .map_err(|_| BusError::unexpected(OP, format!("negative {name}")))
            };
            let lag = match info.get("lag") {
                None | Some(Value::Nil) => None,
                Some(lag) => u64::try_from(value_to_i64(OP, lag)?).ok(),
            };
            Ok(GroupInfo {
                name: value_to_string(OP, field("name")?)?,
                consumers: count("consumers")?,
                pending: count("pending")?,
                last_delivered_id: value_to_string(OP, field("last-delivered-id")?)?,
                lag,
            })
        })
        .collect()
}
