//! Everything the system does with Redis Streams: publishing committed events, consumer groups,
//! reclaiming stuck entries, trimming, and dead letters.
//!
//! Redis is a delivery channel, not a store: Postgres holds every event forever, the relay
//! republishes what Redis lacks, and a projection can be rebuilt without Redis. This crate
//! therefore never tries to make Redis durable; it makes delivery exactly-once *per position*
//! while Redis keeps its data, and reports clearly when it did not (`NOGROUP`).
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`keys`] | key names derived from the `EVENT_STREAM` setting |
//! | [`codec`] | the entry fields of an event: [`encode_fields`], [`decode_entry`] |
//! | [`entry`] | [`StreamEntry`] and the parsing of stream replies, one entry at a time (a field that is not UTF-8 marks its entry, never fails the reply) |
//! | [`publish`] | [`Publisher`]: exactly-once publication, [`Publisher::trim`] |
//! | [`consume`] | [`ensure_group`], [`Consumer`]: read, ack, autoclaim, stale consumers |
//! | [`dlq`] | [`DeadLetterQueue`]: dead-lettering and the admin helpers |
//! | [`inspect`] | [`inspect()`]: the stream's length, newest position and consumer groups, read-only |
//! | [`connection`] | connections with the right timeouts |
//! | [`testing`] | (feature `test-util`) [`testing::PrivateRedis`], unique keys, `wait_until` |
//!
//! # Keys
//!
//! | key | type | content |
//! |---|---|---|
//! | `es:events` (setting `EVENT_STREAM`) | stream | one entry per committed event, id `<global_position>-0` |
//! | `es:events:dlq:<group>` | stream | dead letters of consumer group `<group>` ([`StreamKeys::dlq`]) |
//! | `es:events:trying:<group>` | hash | entry id → tries of it begun and not ended, for entries delivered `MAX_ATTEMPTS` times ([`StreamKeys::trying`]) |
//!
//! Tests put everything under a unique prefix (`test-<uuid>:es:events`), so parallel tests never
//! see each other's entries. No other key is created.
//!
//! # Entry ids are global positions
//!
//! The relay publishes event `n` as the entry with the explicit id `n-0`. Redis refuses an XADD
//! whose id is not above the stream's top, and the publish script (one round trip per batch,
//! `redis.pcall` per XADD) counts exactly that refusal as *already present*. So a relay that
//! crashed after publishing but before recording it simply publishes the batch again, and
//! nothing is appended twice. Consumers read the position from the id ([`StreamEntry::position`])
//! and from the `position` field, which [`decode_entry`] checks agree. Batches must be sorted by
//! position; [`Publisher::publish`] rejects any other order, since a lower position after a
//! higher one would be dropped as "already present". If Redis loses its data, the stream
//! starts empty and the relay's republication fills it again from wherever it resumes.
//!
//! # Fields
//!
//! `position`, `event_id`, `stream_id`, `stream_version`, `event_type`, `schema_version`,
//! `data` (JSON text), `metadata` (JSON text, carries `traceparent`), `recorded_at`
//! (RFC 3339, UTC, microseconds) — see [`codec::field`]. Everything is text, so
//! `redis-cli XRANGE es:events - +` is readable by an operator.
//!
//! # Groups
//!
//! Each projection is one consumer group named after it (`order_summaries`, `customer_stats`),
//! created with [`ensure_group`] from id `0` with MKSTREAM; BUSYGROUP counts as success, so
//! every instance calls it at start. Each instance is a consumer with a name stable across its
//! restarts; it first finishes its own pending entries, with their delivery counts so an entry
//! that stopped it is told apart ([`Consumer::read_own_pending_counted`]), then
//! reads new ones ([`Consumer::read_new`], `XREADGROUP … >` on a dedicated connection whose
//! reply timeout exceeds the block time). After a Redis restart without persistence every call
//! fails with [`BusError::NoGroup`]: recreate the group and continue (the projections' own
//! position bookkeeping in Postgres makes replays harmless).
//!
//! # Reclaim policy
//!
//! An entry pending longer than `min_idle` belongs to a consumer that died or hangs;
//! [`Consumer::autoclaim`] (`XPENDING … IDLE`, scanning the pending list across calls, then
//! `XCLAIM`) takes it over and returns its delivery count, leaving alone the entries the caller
//! says it holds itself (claiming those would count deliveries nobody tried and keep them from
//! ever looking idle to another consumer). Every claim counts as a delivery, so `min_idle` must
//! exceed the normal processing time. Entries trimmed while pending leave the pending list.
//! A consumer records a try of an entry it suspects in `<stream>:trying:<group>`
//! ([`Consumer::begin_try`], [`Consumer::end_try`]), so a try that stopped the process making
//! it is still counted. Consumers with nothing pending and idle beyond a threshold are deleted by
//! [`Consumer::remove_stale_consumers`] (checked and deleted in one script, never the caller).
//!
//! # Trim policy
//!
//! [`Publisher::trim`]`(retain)` computes, for every group, the oldest id it still needs — its
//! smallest pending id, or the id after its last delivered one when nothing is pending — and
//! trims with `XTRIM MINID ~ min(that floor, last - retain + 1)`. The stream thus keeps at least
//! the `retain` newest entries and never drops what a group has not read or acknowledged.
//! Approximate trimming removes whole internal nodes only, so it can keep more. As a safety
//! bound for a group stuck forever, every XADD carries `MAXLEN ~ <hard cap>`
//! ([`publish::DEFAULT_HARD_CAP`]); that bound can drop unread entries, which is acceptable
//! because such a projection is rebuilt from Postgres.
//!
//! # Dead-letter policy
//!
//! The consumer decides when to give up on an entry (retries with backoff, then a delivery
//! count limit). [`DeadLetterQueue::dead_letter`] then appends the original fields plus
//! `error`, `attempts`, `failed_at` (RFC 3339), `original_id` and `consumer` to
//! `<stream>:dlq:<group>` and acknowledges the original in the group, in one MULTI/EXEC; a
//! consumer uses [`DeadLetterQueue::dead_letter_pending`], a script that writes the letter only
//! when its XACK acknowledged an entry pending for that consumer, so two holders of one entry
//! never both dead-letter it.
//! Dead-letter streams are never trimmed here; operators list, replay and purge them with
//! `projector dlq …`, which uses [`DeadLetterQueue::list`], [`DeadLetterQueue::get`],
//! [`DeadLetterQueue::delete`] and [`DeadLetterQueue::len`].
//!
//! # Errors
//!
//! [`BusError::Connection`] (retry later: the connection manager reconnects by itself),
//! [`BusError::NoGroup`] (recreate the group), anything else is not retryable as such.
//! This crate never panics on data from Redis; malformed entries are [`DecodeError`]s.

pub mod codec;
pub mod connection;
pub mod consume;
pub mod dlq;
pub mod entry;
pub mod error;
pub mod inspect;
pub mod keys;
pub mod publish;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use codec::{DecodeError, decode_entry, encode_fields};
pub use connection::{client, connect, connect_lazy};
pub use consume::{Consumer, FROM_BEGINNING, FROM_NOW, ensure_group};
pub use dlq::{DeadLetter, DeadLetterQueue};
pub use entry::{StreamEntry, UNREADABLE_FIELD};
pub use error::BusError;
pub use inspect::{GroupInfo, StreamInfo, inspect, newest_relayed_entry};
pub use keys::{DEFAULT_EVENT_STREAM, StreamKeys};
pub use publish::{DEFAULT_HARD_CAP, PublishOutcome, Publisher, TrimOutcome};

/// Re-exported so callers need no direct `redis` dependency for the connection type.
pub use redis::aio::ConnectionManager;
