//! Consumer groups: creating them, reading new and own pending entries, acknowledging,
//! reclaiming entries of consumers that stopped, and removing consumers that are gone.
//!
//! A [`Consumer`] holds two connections: a dedicated one for `XREADGROUP … BLOCK` (its reply
//! timeout is above the longest block, and nothing else queues behind a blocked read) and a
//! shared one for everything else, so one task may ack or claim while another is blocked
//! reading. `NOGROUP` from any call is [`BusError::NoGroup`]: recreate the group with
//! [`ensure_group`] and go on (Postgres can refill what Redis lost).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Client, Script, Value};

use crate::connection::connect_blocking;
use crate::dlq::DeadLetterQueue;
use crate::entry::{
    StreamEntry, parse_entry_list, parse_read_reply, value_to_i64, value_to_string, value_to_vec,
};
use crate::error::BusError;
use crate::keys::StreamKeys;

/// Start id for a new group that should see the whole stream (`XGROUP CREATE … 0`).
pub const FROM_BEGINNING: &str = "0";

/// Start id for a new group that should see only entries added from now on (`$`).
pub const FROM_NOW: &str = "$";

/// Creates consumer group `group` on `stream` starting after entry id `start` (usually
/// [`FROM_BEGINNING`]), creating the stream if needed (MKSTREAM).
///
/// Idempotent: a group that already exists (BUSYGROUP) is left as it is. Returns whether the
/// group was created by this call.
pub async fn ensure_group(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
    start: &str,
) -> Result<bool, BusError> {
    let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg(start)
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Ok(()) => {
            tracing::info!(stream, group, start, "created consumer group");
            Ok(true)
        }
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
        Err(e) => Err(BusError::from_redis("create consumer group", e)),
    }
}

/// KEYS[1] stream; ARGV: group, own name, idle threshold ms. Deletes consumers with nothing
/// pending and idle above the threshold, except the caller, atomically (a consumer that gets an
/// entry between the check and the delete would lose it from the pending list otherwise).
const REMOVE_STALE_SCRIPT: &str = r"
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
local idle_over = tonumber(ARGV[3])
local removed = {}
for _, c in ipairs(consumers) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['name'] ~= ARGV[2] and tonumber(info['pending']) == 0 and tonumber(info['idle']) > idle_over then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed[#removed + 1] = info['name']
  end
end
return removed
";

/// One member of a consumer group.
pub struct Consumer {
    blocking: ConnectionManager,
    conn: ConnectionManager,
    keys: StreamKeys,
    group: String,
    name: String,
    max_block: Duration,
    claim_cursor: Mutex<String>,
    remove_stale_script: Script,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("stream", &self.keys.stream)
            .field("group", &self.group)
            .field("name", &self.name)
            .field("max_block", &self.max_block)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Consumer `name` of `group` on `keys.stream`. Opens (lazily) its own connection for
    /// blocking reads of up to `max_block` from `client`; `conn` is used for everything else.
    ///
    /// Use a name that is stable across restarts of the same instance (e.g. the host name) so
    /// [`Consumer::read_own_pending`] finds what it had not acknowledged.
    pub fn new(
        client: &Client,
        conn: ConnectionManager,
        keys: StreamKeys,
        group: impl Into<String>,
        name: impl Into<String>,
        max_block: Duration,
    ) -> Result<Self, BusError> {
        Ok(Self {
            blocking: connect_blocking(client, max_block)?,
            conn,
            keys,
            group: group.into(),
            name: name.into(),
            max_block,
            claim_cursor: Mutex::new("0-0".to_owned()),
            remove_stale_script: Script::new(REMOVE_STALE_SCRIPT),
        })
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// This consumer's name within the group.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stream keys.
    pub fn keys(&self) -> &StreamKeys {
        &self.keys
    }

    /// [`ensure_group`] for this consumer's stream and group.
    pub async fn ensure_group(&self, start: &str) -> Result<bool, BusError> {
        let mut conn = self.conn.clone();
        ensure_group(&mut conn, &self.keys.stream, &self.group, start).await
    }

    fn classify(&self, op: &'static str, e: redis::RedisError) -> BusError {
        BusError::classify(op, &self.keys.stream, &self.group, e)
    }

    /// Reads up to `count` entries never delivered to any consumer of the group
    /// (`XREADGROUP … STREAMS <stream> >`), waiting up to `block` for the first one.
    ///
    /// An empty result means nothing arrived in time. `block` is capped at the `max_block` given
    /// to [`Consumer::new`]; zero does not block at all (Redis's `BLOCK 0` would wait forever).
    pub async fn read_new(
        &self,
        count: usize,
        block: Duration,
    ) -> Result<Vec<StreamEntry>, BusError> {
        const OP: &str = "read new entries";
        let block = block.min(self.max_block);
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(count.max(1));
        if !block.is_zero() {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(&self.keys.stream).arg(">");
        let mut conn = self.blocking.clone();
        let reply: Value = cmd
            .query_async(&mut conn)
            .await
            .map_err(|e| self.classify(OP, e))?;
        Ok(parse_read_reply(OP, reply)?.entries)
    }

    /// Reads up to `count` entries already delivered to this consumer and not yet acknowledged
    /// (`XREADGROUP … STREAMS <stream> 0`), oldest first: what a restarted instance with the
    /// same name must finish first. Entries trimmed from the stream meanwhile are acknowledged
    /// and left out.
    pub async fn read_own_pending(&self, count: usize) -> Result<Vec<StreamEntry>, BusError> {
        Ok(self
            .read_own_pending_counted(count, "0")
            .await?
            .into_iter()
            .map(|(entry, _)| entry)
            .collect())
    }

    /// [`Self::read_own_pending`], each entry with its delivery count including this read, as
    /// [`Self::autoclaim`] gives it: an instance restarted under the same name (a container
    /// restarted in its pod keeps the pod's name) meets again the entries it held, and one that
    /// stopped the instance trying it comes back this way, never through a claim. Its count
    /// grows by one at each such restart, so the caller can tell it as it tells a claimed one.
    /// The read starts after entry id `after` (`0`: from the first): a caller paging through
    /// its pending list passes the last id it got, so no entry is delivered twice by it.
    pub async fn read_own_pending_counted(
        &self,
        count: usize,
        after: &str,
    ) -> Result<Vec<(StreamEntry, u32)>, BusError> {
        let entries = self.read_own_pending_entries(count, after).await?;
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(Vec::new());
        };
        const OP: &str = "count deliveries of own pending entries";
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("XPENDING")
            .arg(&self.keys.stream)
            .arg(&self.group)
            .arg(&first.id)
            .arg(&last.id)
            .arg(entries.len())
            .arg(&self.name)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.classify(OP, e))?;
        let mut deliveries: HashMap<String, u32> = HashMap::with_capacity(entries.len());
        for row in value_to_vec(OP, reply)? {
            let Value::Array(parts) = row else {
                return Err(BusError::unexpected(OP, "a pending entry is not an array"));
            };
            let (Some(id), Some(count)) = (parts.first(), parts.get(3)) else {
                return Err(BusError::unexpected(OP, "a pending entry has four parts"));
            };
            let count = u32::try_from(value_to_i64(OP, count)?).unwrap_or(u32::MAX);
            deliveries.insert(value_to_string(OP, id)?, count);
        }
        Ok(entries
            .into_iter()
            .map(|entry| {
                // Read a moment ago, so pending; were it acknowledged in between (by an
                // operator), it counts as delivered once.
                let n = deliveries.get(&entry.id).copied().unwrap_or(1);
                (entry, n)
            })
            .collect())
    }

    async fn read_own_pending_entries(
        &self,
        count: usize,
        after: &str,
    ) -> Result<Vec<StreamEntry>, BusError> {
        const OP: &str = "read own pending entries";
        let mut conn = self.conn.clone();
        loop {
            let reply: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.group)
                .arg(&self.name)
                .arg("COUNT")
                .arg(count.max(1))
                .arg("STREAMS")
                .arg(&self.keys.stream)
                .arg(after)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.classify(OP, e))?;
            let parsed = parse_read_reply(OP, reply)?;
            if parsed.deleted.is_empty() {
                return Ok(parsed.entries);
            }
            tracing::warn!(
                group = %self.group,
                ids = ?parsed.deleted,
                "pending entries were trimmed before being processed; acknowledging them"
            );
            self.ack(&parsed.deleted).await?;
            // A page of trimmed entries only is no end of the list: acknowledged, they have
            // left it, and the same read now returns what follows them.
            if !parsed.entries.is_empty() {
                return Ok(parsed.entries);
            }
        }
    }

    /// Acknowledges entries (XACK); returns how many were pending.
    pub async fn ack<S: AsRef<str>>(&self, ids: &[S]) -> Result<u64, BusError> {
        const OP: &str = "ack";
        if ids.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&self.keys.stream).arg(&self.group);
        for id in ids {
            cmd.arg(id.as_ref());
        }
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn)
            .await
            .map_err(|e| self.classify(OP, e))
    }

    /// Takes over entries pending in the group for longer than `min_idle` (their consumer died
    /// or hangs), except those `skip` names, and returns each with its delivery count including
    /// this one, so the caller can tell an entry that keeps coming back.
    ///
    /// One call scans up to `count` idle entries of the pending list (`XPENDING … IDLE`),
    /// continuing where the last call stopped and wrapping around at its end, then claims the
    /// ones not skipped (`XCLAIM`, which claims only what is still idle that long). The caller
    /// skips what it holds itself (entries it keeps pending on purpose, e.g. until an instance
    /// of a newer release takes them): claiming those would add a delivery each time without
    /// anyone trying them, and would reset the idle time that lets another consumer claim
    /// them. Every claim counts as a delivery, so keep `min_idle` above the time processing
    /// takes. Entries trimmed from the stream while pending leave the pending list with the
    /// claim and are not returned.
    pub async fn autoclaim(
        &self,
        min_idle: Duration,
        count: usize,
        skip: impl Fn(&str) -> bool,
    ) -> Result<Vec<(StreamEntry, u32)>, BusError> {
        const OP: &str = "autoclaim";
        let count = count.max(1);
        let cursor = self.cursor();
        let start = if cursor == "0-0" {
            "-".to_owned()
        } else {
            format!("({cursor}")
        };
        let idle_ms = min_idle.as_millis() as u64;
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("XPENDING")
            .arg(&self.keys.stream)
            .arg(&self.group)
            .arg("IDLE")
            .arg(idle_ms)
            .arg(&start)
            .arg("+")
            .arg(count)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.classify(OP, e))?;
        let rows = value_to_vec(OP, reply)?;
        let mut idle: Vec<(String, u32)> = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in &rows {
            let Value::Array(parts) = row else {
                return Err(BusError::unexpected(OP, "a pending entry is not an array"));
            };
            let (Some(id), Some(deliveries)) = (parts.first(), parts.get(3)) else {
                return Err(BusError::unexpected(OP, "a pending entry has four parts"));
            };
            let id = value_to_string(OP, id)?;
            let deliveries = u32::try_from(value_to_i64(OP, deliveries)?).unwrap_or(u32::MAX);
            last = Some(id.clone());
            if !skip(&id) {
                idle.push((id, deliveries));
            }
        }
        let next = match last {
            Some(last) if rows.len() >= count => last,
            _ => "0-0".to_owned(),
        };
        if let Ok(mut guard) = self.claim_cursor.lock() {
            *guard = next;
        }
        if idle.is_empty() {
            return Ok(Vec::new());
        }
        let mut claim = redis::cmd("XCLAIM");
        claim
            .arg(&self.keys.stream)
            .arg(&self.group)
            .arg(&self.name)
            .arg(idle_ms);
        for (id, _) in &idle {
            claim.arg(id);
        }
        let reply: Value = claim
            .query_async(&mut conn)
            .await
            .map_err(|e| self.classify(OP, e))?;
        let parsed = parse_entry_list(OP, reply)?;
        if !parsed.deleted.is_empty() {
            // Redis before 7.0 returns trimmed entries as nil and keeps them pending.
            self.ack(&parsed.deleted).await?;
        }
        let deliveries: HashMap<String, u32> = idle.into_iter().collect();
        Ok(parsed
            .entries
            .into_iter()
            .map(|entry| {
                let n = deliveries.get(&entry.id).map_or(1, |n| n.saturating_add(1));
                (entry, n)
            })
            .collect())
    }

    fn cursor(&self) -> String {
        self.claim_cursor
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|_| "0-0".to_owned())
    }

    /// Deletes consumers of the group (never this one) that have nothing pending and have been
    /// idle for more than `idle_over` — instances that were scaled away. Returns their names.
    ///
    /// Consumers with pending entries are kept: their entries are reclaimed by
    /// [`Consumer::autoclaim`] first, which empties their pending list. (Redis 7.0 registers a
    /// consumer only once an XREADGROUP returns something to it.)
    pub async fn remove_stale_consumers(
        &self,
        idle_over: Duration,
    ) -> Result<Vec<String>, BusError> {
        const OP: &str = "remove stale consumers";
        let mut conn = self.conn.clone();
        let reply: Value = self
            .remove_stale_script
            .key(&self.keys.stream)
            .arg(&self.group)
            .arg(&self.name)
            .arg(idle_over.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.classify(OP, e))?;
        let removed = value_to_vec(OP, reply)?
            .iter()
            .map(|v| value_to_string(OP, v))
            .collect::<Result<Vec<_>, _>>()?;
        if !removed.is_empty() {
            tracing::info!(group = %self.group, ?removed, "removed stale consumers");
        }
        Ok(removed)
    }

    /// Dead-letters `entry` for this group if it is still pending for this consumer (see
    /// [`DeadLetterQueue::dead_letter_pending`]); `None` when it no longer was.
    pub async fn dead_letter(
        &self,
        entry: &StreamEntry,
        error: &str,
        attempts: u32,
    ) -> Result<Option<String>, BusError> {
        DeadLetterQueue::new(self.conn.clone(), self.keys.clone())
            .dead_letter_pending(&self.group, entry, error, attempts, &self.name)
            .await
    }

    /// Records that a try of entry `id` begins (`HINCRBY` in [`StreamKeys::trying`]) and
    /// returns how many tries of it have begun without ending, this one included. A try that
    /// ends, however it ends, is forgotten with [`Self::end_try`]; one that never ends is one
    /// that stopped the process making it (a crash, an abort, a kill), which no error counts,
    /// so this is how a consumer tells an entry that keeps stopping consumers.
    pub async fn begin_try(&self, id: &str) -> Result<u32, BusError> {
        let mut conn = self.conn.clone();
        let n: i64 = redis::cmd("HINCRBY")
            .arg(self.keys.trying(&self.group))
            .arg(id)
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.classify("begin a try", e))?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// How many tries of entry `id` have begun without ending (see [`Self::begin_try`]), read
    /// without recording one: what a full Redis, which refuses the `HINCRBY`, still answers.
    pub async fn unfinished_tries(&self, id: &str) -> Result<u32, BusError> {
        let mut conn = self.conn.clone();
        let n: Option<i64> = redis::cmd("HGET")
            .arg(self.keys.trying(&self.group))
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.classify("read the unfinished tries", e))?;
        Ok(u32::try_from(n.unwrap_or(0)).unwrap_or(u32::MAX))
    }

    /// Forgets the unfinished tries of entry `id` (see [`Self::begin_try`]).
    pub async fn end_try(&self, id: &str) -> Result<(), BusError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("HDEL")
            .arg(self.keys.trying(&self.group))
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.classify("end a try", e))?;
        Ok(())
    }
}
