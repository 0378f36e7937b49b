//! [`RelayStatus`]: what this instance's relay is doing, readable without locking, for
//! `/readyz`-style reporting and tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// Shared view of one relay instance; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct RelayStatus {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    is_leader: AtomicBool,
    checkpoint: AtomicI64,
    redis_unavailable: AtomicBool,
    stream_diverged: AtomicBool,
}

impl RelayStatus {
    /// Whether this instance holds the relay lock and publishes.
    pub fn is_leader(&self) -> bool {
        self.inner.is_leader.load(Ordering::Acquire)
    }

    /// The highest position this instance knows to be on the stream (0 before it first led).
    pub fn checkpoint(&self) -> i64 {
        self.inner.checkpoint.load(Ordering::Acquire)
    }

    /// Whether this instance, as leader, currently fails to publish to Redis.
    pub fn redis_unavailable(&self) -> bool {
        self.inner.redis_unavailable.load(Ordering::Acquire)
    }

    /// Whether this instance, as leader, holds publishing because the stream records another
    /// history than the event store (`relay_stream_diverged`).
    pub fn stream_diverged(&self) -> bool {
        self.inner.stream_diverged.load(Ordering::Acquire)
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.inner.is_leader.store(leader, Ordering::Release);
        if !leader {
            self.set_redis_unavailable(false);
            self.set_stream_diverged(false);
        }
    }

    pub(crate) fn set_stream_diverged(&self, diverged: bool) {
        self.inner
            .stream_diverged
            .store(diverged, Ordering::Release);
    }

    pub(crate) fn set_checkpoint(&self, position: i64) {
        self.inner.checkpoint.store(position, Ordering::Release);
    }

    pub(crate) fn set_redis_unavailable(&self, unavailable: bool) {
        self.inner
            .redis_unavailable
            .store(unavailable, Ordering::Release);
    }
}
