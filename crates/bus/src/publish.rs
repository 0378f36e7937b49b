//! Publishing events to the stream exactly once, and trimming it without losing unread entries.
//!
//! Each event becomes the entry `<global_position>-0`. Redis refuses an XADD whose id is not
//! above the stream's top id; the publish script counts that refusal as "already present" when
//! the stream holds that very event at that id, so republishing after a crash or a lost reply
//! (the relay cannot know what reached Redis) appends nothing twice and is no error, and as
//! "refused" otherwise (something else sits above the position). The relay must therefore publish in position order, which [`Publisher::publish`]
//! checks for every batch.

use redis::aio::ConnectionManager;
use redis::{Script, Value};

use crate::codec::{encode_fields, field};
use crate::entry::{EntryId, value_to_string, value_to_vec};
use crate::error::BusError;
use crate::keys::StreamKeys;
use events::envelope::RecordedEvent;

/// Default safety bound on the stream length (`XADD … MAXLEN ~ <cap>`). Normal trimming is
/// [`Publisher::trim`]; the cap only matters when a consumer group is stuck for good, and then
/// it may drop entries that group has not read (Postgres stays the source of truth, and a
/// projection can be rebuilt from it).
pub const DEFAULT_HARD_CAP: usize = 1_000_000;

/// The script recognises "already present" by the message Redis gives when an explicit XADD id
/// is not above the top id: "equal or smaller than the target stream top item". It then looks
/// at the entry with that id: holding the same `event_id`, it is this event, published by an
/// earlier try of the batch whose reply was lost (a timeout, a dropped connection), and the
/// retry is a no-op; anything else (no entry there, another event) means something else sits
/// above the position, such as an entry added by hand with a time-based id (`XADD … *`), and the
/// entry is refused.
///
/// KEYS[1] stream; ARGV[1] hard cap, ARGV[2] fields per entry, then per entry: id and the
/// field/value pairs. Returns `{appended, already_present, refused}`. Any other XADD error aborts
/// the script (entries added before it stay, and count as already present on the retry).
const PUBLISH_SCRIPT: &str = r"
local key = KEYS[1]
local cap = ARGV[1]
local nfields = tonumber(ARGV[2])
local appended, present, refused = 0, 0, 0
local i = 3
while i <= #ARGV do
  local id = ARGV[i]
  local args = {'XADD', key, 'MAXLEN', '~', cap, id}
  local event_id
  for j = 1, nfields * 2 do
    args[#args + 1] = ARGV[i + j]
    if j % 2 == 1 and ARGV[i + j] == 'event_id' then
      event_id = ARGV[i + j + 1]
    end
  end
  i = i + 1 + nfields * 2
  local reply = redis.pcall(unpack(args))
  if type(reply) == 'table' and reply.err then
    if string.find(reply.err, 'equal or smaller than the target stream top item', 1, true) then
      local same = false
      local found = redis.call('XRANGE', key, id, id)
      if #found == 1 then
        local fields = found[1][2]
        for j = 1, #fields, 2 do
          if fields[j] == 'event_id' and fields[j + 1] == event_id then
            same = true
          end
        end
      end
      if same then
        present = present + 1
      else
        refused = refused + 1
      end
    else
      return redis.error_reply(reply.err)
    end
  else
    appended = appended + 1
  end
end
return {appended, present, refused}
";

/// What one [`Publisher::publish`] call did. The entries not appended are a prefix of the batch
/// (ids at or below the stream's top).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Entries newly added to the stream.
    pub appended: usize,
    /// Entries the stream already held, with the same event at the same id: published before
    /// (a retry after a lost reply, a relay that republished after a crash).
    pub already_present: usize,
    /// Entries Redis refused although the stream does not hold them: its top id is above their
    /// positions because something other than this event sits there (an entry added by hand
    /// with a time-based id, another history). They are not on the stream.
    pub refused: usize,
}

/// What one [`Publisher::trim`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrimOutcome {
    /// The position below which entries were allowed to go (`XTRIM MINID`), if the stream
    /// has entries at all.
    pub min_position: Option<i64>,
    /// Entries removed (with approximate trimming only whole internal nodes go, so this can be
    /// zero while `min_position` is above the first entry).
    pub removed: u64,
}

/// Publishes recorded events to the event stream and trims it.
#[derive(Clone)]
pub struct Publisher {
    conn: ConnectionManager,
    keys: StreamKeys,
    hard_cap: usize,
    script: Script,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("stream", &self.keys.stream)
            .field("hard_cap", &self.hard_cap)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher to `keys.stream` whose XADDs carry `MAXLEN ~ hard_cap`.
    pub fn new(conn: ConnectionManager, keys: StreamKeys, hard_cap: usize) -> Self {
        Self {
            conn,
            keys,
            hard_cap,
            script: Script::new(PUBLISH_SCRIPT),
        }
    }

    /// The stream keys this publisher writes to.
    pub fn keys(&self) -> &StreamKeys {
        &self.keys
    }

    /// Publishes `events` in one round trip, each as entry `<global_position>-0`.
    ///
    /// `events` must be sorted by strictly increasing position ([`BusError::InvalidArgument`]
    /// otherwise): an event below the stream's top is counted as already present, so an
    /// out-of-order batch would silently drop events.
    pub async fn publish(&self, events: &[RecordedEvent]) -> Result<PublishOutcome, BusError> {
        const OP: &str = "publish";
        if events.is_empty() {
            return Ok(PublishOutcome::default());
        }
        for pair in events.windows(2) {
            if pair[1].global_position <= pair[0].global_position {
                return Err(BusError::InvalidArgument {
                    op: OP,
                    detail: format!(
                        "positions must increase within a batch: {} is followed by {}",
                        pair[0].global_position, pair[1].global_position
                    ),
                });
            }
        }
        if let Some(bad) = events.iter().find(|e| e.global_position < 1) {
            return Err(BusError::InvalidArgument {
                op: OP,
                detail: format!("position {} is not positive", bad.global_position),
            });
        }

        let mut invocation = self.script.key(&self.keys.stream);
        invocation.arg(self.hard_cap).arg(field::ALL.len());
        for event in events {
            invocation.arg(format!("{}-0", event.global_position));
            for (name, value) in encode_fields(event) {
                invocation.arg(name).arg(value);
            }
        }
        let mut conn = self.conn.clone();
        let (appended, already_present, refused): (usize, usize, usize) = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| BusError::from_redis(OP, e))?;
        tracing::debug!(stream = %self.keys.stream, appended, already_present, refused,
            "published events");
        Ok(PublishOutcome {
            appended,
            already_present,
            refused,
        })
    }

    /// The `ms` part of the stream's top id, `None` if the stream is empty or absent. It is a
    /// position only while every entry is the relay's: an entry added with a time-based id
    /// (`XADD … *`) makes it a millisecond timestamp. Resume from
    /// [`Publisher::newest_relayed_entry`] checked against the store, never from this.
    pub async fn last_published_position(&self) -> Result<Option<i64>, BusError> {
        Ok(self.last_id().await?.map(|id| id.ms as i64))
    }

    /// The newest entry the relay wrote (`<position>-0`), as `(position, event_id)`; see
    /// [`crate::inspect::newest_relayed_entry`].
    pub async fn newest_relayed_entry(&self) -> Result<Option<(i64, uuid::Uuid)>, BusError> {
        crate::inspect::newest_relayed_entry(&self.conn, &self.keys).await
    }

    async fn last_id(&self) -> Result<Option<EntryId>, BusError> {
        crate::inspect::last_entry_id(&self.conn, &self.keys.stream).await
    }

    /// Trims the stream approximately (`XTRIM MINID ~`), keeping at least the `retain` newest
    /// entries and every entry a consumer group has not yet read or acknowledged.
    pub async fn trim(&self, retain: usize) -> Result<TrimOutcome, BusError> {
        self.trim_with(retain, true).await
    }

    /// Like [`Publisher::trim`] but exact (`XTRIM MINID`): slower on big streams, for tests and
    /// admin tools.
    pub async fn trim_exact(&self, retain: usize) -> Result<TrimOutcome, BusError> {
        self.trim_with(retain, false).await
    }

    async fn trim_with(&self, retain: usize, approximate: bool) -> Result<TrimOutcome, BusError> {
        const OP: &str = "trim";
        let Some(last) = self.last_id().await? else {
            return Ok(TrimOutcome::default());
        };
        // Entry ids are positions, so the `retain` newest entries start at `last - retain + 1`.
        let cutoff = match retain {
            0 => last.next(),
            n => EntryId {
                ms: last.ms.saturating_sub(n as u64 - 1),
                seq: 0,
            },
        };
        let floor = self.group_floor().await?;
        let min_id = floor.map_or(cutoff, |floor| floor.min(cutoff));

        let mut cmd = redis::cmd("XTRIM");
        cmd.arg(&self.keys.stream).arg("MINID");
        if approximate {
            cmd.arg("~");
        }
        cmd.arg(min_id.to_string());
        let mut conn = self.conn.clone();
        let removed: u64 = cmd
            .query_async(&mut conn)
            .await
            .map_err(|e| BusError::from_redis(OP, e))?;
        tracing::debug!(stream = %self.keys.stream, %min_id, removed, "trimmed stream");
        Ok(TrimOutcome {
            min_position: Some(min_id.ms as i64),
            removed,
        })
    }

    /// The smallest id any consumer group still needs: its oldest pending entry, or the entry
    /// after its last delivered one. `None` when the stream has no groups.
    async fn group_floor(&self) -> Result<Option<EntryId>, BusError> {
        let mut floor: Option<EntryId> = None;
        for group in crate::inspect::groups(&self.conn, &self.keys.stream).await? {
            let oldest_pending = if group.pending > 0 {
                self.oldest_pending(&group.name).await?
            } else {
                None
            };
            let needed = match oldest_pending {
                Some(id) => id,
                None => group.after_last_delivered()?,
            };
            floor = Some(floor.map_or(needed, |f| f.min(needed)));
        }
        Ok(floor)
    }

    async fn oldest_pending(&self, group: &str) -> Result<Option<EntryId>, BusError> {
        const OP: &str = "trim: read pending summary";
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("XPENDING")
            .arg(&self.keys.stream)
            .arg(group)
            .query_async(&mut conn)
            .await
            .map_err(|e| BusError::classify(OP, &self.keys.stream, group, e))?;
        // `[count, smallest id, greatest id, [[consumer, count], …]]`.
        let summary = value_to_vec(OP, reply)?;
        match summary.get(1) {
            // Everything was acknowledged since XINFO ran.
            None | Some(Value::Nil) => Ok(None),
            Some(v) => {
                let id = value_to_string(OP, v)?;
                EntryId::parse(&id)
                    .map(Some)
                    .ok_or_else(|| BusError::unexpected(OP, format!("bad id {id:?}")))
            }
        }
    }
}
