//! Key names: the event stream, and per consumer group its dead-letter stream and the hash of
//! its unfinished tries.
//!
//! Every Redis key this crate touches is derived here from one setting (`EVENT_STREAM`), so tests
//! can isolate themselves with a prefix (`test-<uuid>:es:events`) and operators can find every key
//! from the stream name alone. Nothing here talks to Redis.

/// The default event stream key, overridden by the `EVENT_STREAM` setting.
pub const DEFAULT_EVENT_STREAM: &str = "es:events";

/// Separator between the event stream key and the group name in a dead-letter key
/// (`es:events` + `:dlq:` + `order_summaries`).
pub const DLQ_INFIX: &str = ":dlq:";

/// Separator between the event stream key and the group name in the key of a group's
/// unfinished tries (`es:events` + `:trying:` + `order_summaries`).
pub const TRYING_INFIX: &str = ":trying:";

/// The keys of one event stream: the stream itself and the dead-letter stream of each group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKeys {
    /// The event stream key, e.g. `es:events` or `test-<uuid>:es:events`.
    pub stream: String,
}

impl StreamKeys {
    /// Keys for the event stream named `stream`.
    pub fn new(stream: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
        }
    }

    /// The event stream key.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The dead-letter stream of consumer group `group`: `<stream>:dlq:<group>`.
    pub fn dlq(&self, group: &str) -> String {
        format!("{}{DLQ_INFIX}{group}", self.stream)
    }

    /// The hash of consumer group `group`'s unfinished tries: `<stream>:trying:<group>`, entry
    /// id → how many tries of that entry began and never ended
    /// ([`crate::Consumer::begin_try`]). Empty but for entries whose tries stopped the
    /// consumer that made them.
    pub fn trying(&self, group: &str) -> String {
        format!("{}{TRYING_INFIX}{group}", self.stream)
    }
}

impl Default for StreamKeys {
    /// The production layout: `es:events`.
    fn default() -> Self {
        Self::new(DEFAULT_EVENT_STREAM)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dead_letter_key_appends_dlq_and_the_group_to_the_stream() {
        assert_eq!(
            StreamKeys::default().dlq("order_summaries"),
            "es:events:dlq:order_summaries"
        );
        assert_eq!(
            StreamKeys::new("test-1:es:events").dlq("g"),
            "test-1:es:events:dlq:g"
        );
    }
}
