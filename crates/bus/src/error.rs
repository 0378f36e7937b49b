//! The error type of every Redis operation, classified the way callers branch on it:
//! retry later (`Connection`), recreate the group (`NoGroup`), or give up (everything else).

use redis::{ErrorKind, RedisError, ServerErrorKind};

/// What went wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Redis could not be reached, the connection dropped, or a reply timed out. Retryable:
    /// the `ConnectionManager` reconnects by itself, so the same call may succeed later.
    #[error("redis connection failed during {op}: {source}")]
    Connection {
        /// The operation that failed, e.g. `publish`.
        op: &'static str,
        /// The underlying client error.
        #[source]
        source: RedisError,
    },
    /// The consumer group (or its stream) does not exist, typically because Redis restarted
    /// without persistence. Recreate it with [`crate::ensure_group`] and carry on.
    #[error("consumer group {group:?} does not exist on stream {stream:?} (NOGROUP)")]
    NoGroup {
        /// The stream key.
        stream: String,
        /// The missing group.
        group: String,
    },
    /// The caller passed something this crate refuses, e.g. a batch not sorted by position.
    #[error("invalid argument to {op}: {detail}")]
    InvalidArgument {
        /// The operation that was called.
        op: &'static str,
        /// What is wrong with the argument.
        detail: String,
    },
    /// Redis answered with a shape this crate does not understand (a bug or an unexpected
    /// server version).
    #[error("unexpected reply to {op}: {detail}")]
    UnexpectedReply {
        /// The operation whose reply could not be read.
        op: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// Any other error reported by Redis (not retryable as such).
    #[error("redis error during {op}: {source}")]
    Redis {
        /// The operation that failed.
        op: &'static str,
        /// The underlying client error.
        #[source]
        source: RedisError,
    },
}

impl BusError {
    /// Whether retrying the same call later may succeed (a connection problem).
    pub fn is_retryable(&self) -> bool {
        matches!(self, BusError::Connection { .. })
    }

    /// Whether the consumer group is missing and must be recreated.
    pub fn is_no_group(&self) -> bool {
        matches!(self, BusError::NoGroup { .. })
    }

    /// Whether Redis refused a write for want of memory (`OOM`: `maxmemory` reached with
    /// `noeviction`). Such a server still answers reads, acknowledgements and deletions.
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            BusError::Redis { source, .. } | BusError::Connection { source, .. } => {
                source.code() == Some("OOM")
            }
            _ => false,
        }
    }

    pub(crate) fn unexpected(op: &'static str, detail: impl Into<String>) -> Self {
        BusError::UnexpectedReply {
            op,
            detail: detail.into(),
        }
    }

    /// Classifies a client error: `NOGROUP` becomes [`BusError::NoGroup`], I/O failures,
    /// timeouts and "server not ready" replies become [`BusError::Connection`].
    pub(crate) fn classify(
        op: &'static str,
        stream: &str,
        group: &str,
        source: RedisError,
    ) -> Self {
        if is_no_group(&source) {
            return BusError::NoGroup {
                stream: stream.to_owned(),
                group: group.to_owned(),
            };
        }
        Self::from_redis(op, source)
    }

    /// Classifies a client error of an operation that involves no consumer group.
    pub(crate) fn from_redis(op: &'static str, source: RedisError) -> Self {
        if is_connection_error(&source) {
            BusError::Connection { op, source }
        } else {
            BusError::Redis { op, source }
        }
    }
}

fn is_no_group(err: &RedisError) -> bool {
    // A NOGROUP raised inside a Lua script keeps its code in Redis 7, but older servers fold it
    // into the message, so look at both.
    err.code() == Some("NOGROUP") || err.detail().is_some_and(|d| d.contains("NOGROUP"))
}

fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || matches!(
            err.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
            )
        )
}
