//! Command handling: load an order, `decide`, append through the group committer.
//!
//! # Per-order pipelining
//! Each order has a slot ([`cache::OrderSlots`]) holding its cached state behind an async mutex.
//! Under the slot's lock a command loads the state if needed, decides, *submits* its append
//! (which only enqueues it, in order) and advances the cached state optimistically; it then
//! releases the lock and only afterwards awaits the commit. So consecutive commands on a hot
//! order are decided back to back and share one group commit, and none of them loses a race to
//! another writer of this instance. When an append fails the cached state is cleared; a command
//! already chained on the failed one fails its check in the store and is retried: it expects
//! the stream to end with the failed append's last event (`store::ExpectedVersion::Head`), so
//! it cannot land on another state that happens to have the same version.
//!
//! # Staleness
//! A cached state may lag another instance's writes, or run ahead of commits still pending. An
//! answer that depends only on the state (a rule rejection, 404, 409 `order_exists`, 412) is
//! therefore given from a cached state only after checking that the store holds that same
//! state: the same version *and* the same last event, since a cached state running ahead of
//! an append still pending can share its version with another writer's event; otherwise the
//! state is reloaded and the command retried.
//!
//! # Creating without a load
//! A `CreateOrder` for an order this instance has not cached is decided on the empty state
//! without reading the store, and appended expecting the stream not to exist. Almost every
//! create names a new order, so the load would find nothing; when the order does exist, the
//! store refuses the append and the command is decided again on the loaded state (409
//! `order_exists`, 412), without counting as a retry. The empty state is treated like a cached
//! one: an answer decided from it is checked against the store first.
//!
//! # Idempotency keys
//! A command with an `Idempotency-Key` first looks the key up: a stored answer (success or
//! refusal) is replayed, and the key with another request is refused. A success stores its
//! answer in its append's transaction. A refusal decided on the store's state (a rule, an
//! unknown order, `order_exists`, a failed `If-Match`) is recorded under the key as well, with
//! `INSERT … ON CONFLICT DO NOTHING` under the append lock
//! ([`store::idempotency::record_first_answer`]): when the key got an answer meanwhile (a
//! concurrent request with it succeeded, and its success is why this one was refused), that
//! answer is replayed instead. So every request with a key gets the key's first answer, and a
//! repeat of a refused request does not run again on a state that has changed since. Transient
//! failures (conflicts that outlasted the retries, an unavailable store) are not recorded: a
//! repeat runs again.
//!
//! This module never speaks HTTP; [`crate::http`] maps [`CommandError`] to problems, and gives
//! the handler the answer to record for a refusal ([`RejectionAnswer`]).

pub mod cache;

use std::sync::Arc;
use std::time::{Duration, Instant};

use events::{
    DomainError, EventMetadata, OrderCommand, OrderState, Rule, STATE_SCHEMA_VERSION, decide,
    evolve, order_stream_id,
};
use platform::db_gate::DbGate;
use sqlx::PgPool;
use store::idempotency::StoredResponse;
use store::{AppendError, AppendRequest, GroupCommitter, IdempotencyRecord};
use tracing::Instrument as _;
use uuid::Uuid;

use cache::{CachedOrder, OrderSlots};

/// Longest pause between two internal retries; a retry usually only needs the commits queued
/// ahead of it to finish, which takes a few milliseconds.
const MAX_RETRY_BACKOFF: Duration = Duration::from_millis(50);

/// Retries of a command after a concurrent append moved its order (counter).
pub const RETRIES_TOTAL: &str = "command_retries_total";
/// Cached orders dropped because an append of theirs failed after the command answered
/// (counter).
pub const CACHE_DISCARDED_TOTAL: &str = "command_cache_discarded_total";

/// Puts the command path's counters on `/metrics` at 0 from the start: a dashboard or a grep
/// finds them before the first event, and `increase()` sees that first one.
pub fn export_counters_at_zero() {
    for counter in [
        RETRIES_TOTAL,
        CACHE_DISCARDED_TOTAL,
        store::snapshot::SNAPSHOTS_IGNORED_TOTAL,
    ] {
        metrics::counter!(counter).increment(0);
    }
}

/// Settings of the handler.
#[derive(Debug, Clone, Copy)]
pub struct HandlerConfig {
    /// Write a snapshot each time an order's version crosses a multiple of this; 0: never.
    pub snapshot_every: i64,
    /// Internal retries after a concurrent append when the client sent no `If-Match`.
    pub retries: u32,
    /// Most orders whose state is cached.
    pub cache_capacity: usize,
    /// Most bytes the cached states take, roughly ([`cache::weight`]).
    pub cache_max_bytes: usize,
}

/// The status and body a refusal is answered with, recorded under its `Idempotency-Key` and
/// replayed on a repeat. Given by the HTTP layer, which owns the error format.
pub type RejectionAnswer = fn(&CommandError) -> (i16, serde_json::Value);

/// What `If-Match` requires of the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfMatch {
    /// `"<version>"`: the order is at exactly this version (0: it does not exist).
    Version(i64),
    /// `*`: the order exists, at any version (RFC 9110: "any current representation").
    Any,
}

/// An `Idempotency-Key` and the hash of the request carrying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRequest {
    pub key: String,
    /// SHA-256 of method, path and body: the same key with another request is refused.
    pub request_hash: Vec<u8>,
}

/// Everything about a command that is not the command itself.
#[derive(Debug, Clone, Default)]
pub struct CommandContext {
    /// Metadata stored with every event of the command.
    pub metadata: EventMetadata,
    /// What the client requires of the order (`If-Match`).
    pub if_match: Option<IfMatch>,
    pub idempotency: Option<IdempotencyRequest>,
}

/// A command's result.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandOutcome {
    pub order_id: Uuid,
    /// The order's version after the command.
    pub version: i64,
    /// Global position of the command's last event.
    pub position: i64,
    /// Set when this was a repeat of an `Idempotency-Key`: the first response, to send again
    /// (a success, or a refusal with its problem body; `version` and `position` are then 0).
    pub replayed: Option<StoredResponse>,
}

/// Why a command was not applied.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("order not found")]
    NotFound,
    #[error("an order with this id already exists")]
    AlreadyExists,
    #[error("{message}")]
    Rejected { rule: Rule, message: String },
    /// `If-Match` does not hold: the order is at another version than the one named, or it
    /// does not exist (`actual` 0) and `*` was given.
    #[error("the order is at version {actual}, not the one If-Match requires ({expected:?})")]
    VersionMismatch { expected: IfMatch, actual: i64 },
    #[error("the order kept changing concurrently; gave up after {attempts} attempts")]
    ConcurrencyConflict { attempts: u32 },
    #[error("this idempotency key was used with another request")]
    IdempotencyKeyReused,
    #[error("event store unavailable: {0}")]
    StoreUnavailable(String),
    /// The store answered, and what it said cannot change by retrying: a stored event this
    /// release cannot read (not a newer release's), a refused append, an unexpected SQL error.
    /// A bug or damage, already logged at error level; the client gets 500 and no retry hint.
    #[error("event store failure: {0}")]
    StoreFailed(String),
    /// The order holds an event a newer release wrote; an instance of that release can serve
    /// the command (a rollout is under way, or this instance was left behind).
    #[error("{0}")]
    NewerRelease(String),
}

impl CommandError {
    /// Label of the `outcome` metric.
    fn outcome(&self) -> &'static str {
        match self {
            CommandError::NotFound => "not_found",
            CommandError::AlreadyExists => "exists",
            CommandError::Rejected { .. } => "rejected",
            CommandError::VersionMismatch { .. } => "version_mismatch",
            CommandError::ConcurrencyConflict { .. } => "conflict",
            CommandError::IdempotencyKeyReused => "idempotency_key_reused",
            CommandError::StoreUnavailable(_) => "store_unavailable",
            CommandError::StoreFailed(_) => "store_failed",
            CommandError::NewerRelease(_) => "newer_release",
        }
    }

    /// Whether this is a refusal decided on the order's state, which a repeat of the request
    /// must be answered with again: a rule, an unknown order, an existing one, a failed
    /// `If-Match`. Not a transient failure, which a repeat may get past.
    fn is_decided(&self) -> bool {
        matches!(
            self,
            CommandError::NotFound
                | CommandError::AlreadyExists
                | CommandError::Rejected { .. }
                | CommandError::VersionMismatch { .. }
        )
    }
}

impl From<DomainError> for CommandError {
    fn from(err: DomainError) -> Self {
        match err {
            DomainError::NotFound => CommandError::NotFound,
            DomainError::AlreadyExists => CommandError::AlreadyExists,
            DomainError::Rejected { rule, message } => CommandError::Rejected { rule, message },
        }
    }
}

/// How the attempts at a command ended when it did not succeed.
struct Refusal {
    error: CommandError,
    /// Decided on the store's state (not on a cached one left unchecked when the retries ran
    /// out): final, and recorded under the request's idempotency key when it
    /// [`CommandError::is_decided`].
    settled: bool,
}

impl Refusal {
    fn settled(error: CommandError) -> Self {
        Self {
            error,
            settled: true,
        }
    }
}

/// How one attempt ended when it did not succeed.
enum AttemptError {
    /// The store refused the expected version.
    Conflict { actual: Option<i64> },
    /// An answer decided from a cached state that turned out not to be the store's: reload.
    Stale(CommandError),
    /// A create decided without a load found the order already there: decide again on the
    /// loaded state, at once and without counting a retry.
    NotNew,
    /// The idempotency key was stored by a concurrent request.
    KeyTaken,
    /// Final.
    Failed(CommandError),
}

/// Executes commands; cheap to clone.
#[derive(Clone)]
pub struct CommandHandler {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    /// Cuts the reads before an append short when the database cannot be reached
    /// (`platform::db_gate`); the append itself always runs to its own answer.
    gate: DbGate,
    committer: GroupCommitter,
    slots: OrderSlots,
    config: HandlerConfig,
    rejection_answer: RejectionAnswer,
}

impl std::fmt::Debug for CommandHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandHandler")
            .field("config", &self.inner.config)
            .field("cached_orders", &self.inner.slots.len())
            .finish()
    }
}

impl CommandHandler {
    /// A handler appending through `committer` and reading from `pool`; a refusal of a
    /// command with an `Idempotency-Key` is recorded as `rejection_answer` says it is answered.
    pub fn new(
        pool: PgPool,
        gate: DbGate,
        committer: GroupCommitter,
        config: HandlerConfig,
        rejection_answer: RejectionAnswer,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                gate,
                committer,
                slots: OrderSlots::new(config.cache_capacity, config.cache_max_bytes),
                config,
                rejection_answer,
            }),
        }
    }

    /// Executes `command` on order `order_id`; see the module docs.
    pub async fn execute(
        &self,
        order_id: Uuid,
        command: OrderCommand,
        context: CommandContext,
    ) -> Result<CommandOutcome, CommandError> {
        let name = command.name();
        let started = Instant::now();
        let result = self.execute_inner(order_id, &command, &context).await;
        let outcome = match &result {
            Ok(outcome) if outcome.replayed.is_some() => "replayed",
            Ok(_) => "ok",
            Err(err) => err.outcome(),
        };
        metrics::counter!("commands_total", "command" => name, "outcome" => outcome).increment(1);
        metrics::histogram!("command_duration_seconds", "command" => name)
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn execute_inner(
        &self,
        order_id: Uuid,
        command: &OrderCommand,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError> {
        if let Some(idempotency) = &context.idempotency
            && let Some(replay) = self.stored_response(order_id, idempotency).await?
        {
            return Ok(replay);
        }
        match self.attempts(order_id, command, context).await {
            Ok(outcome) => Ok(outcome),
            Err(Refusal { error, settled }) => match &context.idempotency {
                Some(idempotency) if settled && error.is_decided() => {
                    self.record_refusal(order_id, idempotency, error).await
                }
                _ => Err(error),
            },
        }
    }

    /// The attempts at a command: the first, and the retries a conflict or a stale cached
    /// state calls for.
    async fn attempts(
        &self,
        order_id: Uuid,
        command: &OrderCommand,
        context: &CommandContext,
    ) -> Result<CommandOutcome, Refusal> {
        let mut retries = 0u32;
        let mut reload = false;
        loop {
            let error = match self.attempt(order_id, command, context, reload).await {
                Ok(outcome) => return Ok(outcome),
                Err(AttemptError::Failed(err)) => return Err(Refusal::settled(err)),
                Err(AttemptError::KeyTaken) => {
                    // A concurrent request with the same key was answered first (it committed,
                    // or its refusal was recorded): answer as a repeat.
                    let conflict = || CommandError::ConcurrencyConflict {
                        attempts: retries + 1,
                    };
                    let idempotency = context.idempotency.as_ref();
                    return match idempotency {
                        Some(idempotency) => {
                            match self
                                .stored_response(order_id, idempotency)
                                .await
                                .map_err(Refusal::settled)?
                            {
                                Some(replay) => Ok(replay),
                                // Stored, then expired in between: vanishingly rare; let the
                                // client retry.
                                None => Err(Refusal::settled(conflict())),
                            }
                        }
                        None => Err(Refusal::settled(conflict())),
                    };
                }
                Err(AttemptError::Conflict { actual }) => match context.if_match {
                    // At the client's version but not on the state this instance decided on
                    // (its chained append failed): decided again on the stored state.
                    Some(IfMatch::Version(expected)) if actual != Some(expected) => {
                        return Err(Refusal::settled(CommandError::VersionMismatch {
                            expected: IfMatch::Version(expected),
                            actual: actual.unwrap_or(expected),
                        }));
                    }
                    _ => CommandError::ConcurrencyConflict {
                        attempts: retries + 1,
                    },
                },
                Err(AttemptError::Stale(err)) => err,
                Err(AttemptError::NotNew) => {
                    reload = true;
                    continue;
                }
            };
            if retries >= self.inner.config.retries {
                // A conflict, or an answer from a cached state the store did not confirm.
                return Err(Refusal {
                    error,
                    settled: false,
                });
            }
            retries += 1;
            reload = true;
            metrics::counter!(RETRIES_TOTAL).increment(1);
            tokio::time::sleep(backoff(retries)).await;
        }
    }

    /// One load-decide-append pass; see the module docs.
    async fn attempt(
        &self,
        order_id: Uuid,
        command: &OrderCommand,
        context: &CommandContext,
        reload: bool,
    ) -> Result<CommandOutcome, AttemptError> {
        let stream_id = order_stream_id(order_id);
        let slot = self.inner.slots.slot(order_id);
        let (pending, before, after, assumed_new) = {
            let mut cached = slot.lock().await;
            if reload {
                *cached = None;
            }
            // Set only on a first attempt: after a reload the store's word is final.
            let assumed_new =
                cached.is_none() && !reload && matches!(command, OrderCommand::CreateOrder { .. });
            let from_cache = cached.is_some() || assumed_new;
            let order = match cached.take() {
                Some(order) => order,
                None if assumed_new => CachedOrder {
                    state: OrderState::default(),
                    last_event_id: None,
                },
                None => self.load(order_id).await.map_err(AttemptError::Failed)?,
            };
            // Put the state back at once: every early return below leaves the cache as it was.
            let order = &*cached.insert(order);
            if !from_cache {
                self.inner.slots.record(order_id, &slot, order);
            }
            let state = &order.state;

            let decided = match context.if_match {
                Some(IfMatch::Version(expected)) if expected != state.version => {
                    Err(CommandError::VersionMismatch {
                        expected: IfMatch::Version(expected),
                        actual: state.version,
                    })
                }
                // `*` and no order: RFC 9110's "no current representation", 412. Only a create
                // can get there: any other command on an unknown order is a 404 without the
                // condition, and a server ignores preconditions when its answer would not be a
                // success anyway (RFC 9110, 13.2.1).
                Some(IfMatch::Any)
                    if state.version == 0
                        && matches!(command, OrderCommand::CreateOrder { .. }) =>
                {
                    Err(CommandError::VersionMismatch {
                        expected: IfMatch::Any,
                        actual: 0,
                    })
                }
                _ => decide(state, command).map_err(CommandError::from),
            };
            let events = match decided {
                Ok(events) => events,
                Err(err) => {
                    if from_cache && !self.store_holds(&stream_id, order).await {
                        *cached = None;
                        // A create assumed new: decide again on the loaded order at once, as
                        // when the store refuses its append.
                        return Err(if assumed_new {
                            AttemptError::NotNew
                        } else {
                            AttemptError::Stale(err)
                        });
                    }
                    if assumed_new {
                        // Rejected before anything was known of the order: cache nothing.
                        *cached = None;
                    }
                    return Err(AttemptError::Failed(err));
                }
            };

            let before = state.version;
            let after = events.iter().fold(state.clone(), evolve);
            let new_events: Vec<_> = events
                .iter()
                .map(|event| event.to_new_event(context.metadata.clone()))
                .collect();
            let after_last_event_id = new_events
                .last()
                .map(|event| event.event_id)
                .or(order.last_event_id);
            let request = AppendRequest {
                stream_id: stream_id.clone(),
                expected: order.expected(),
                events: new_events,
                idempotency: context
                    .idempotency
                    .as_ref()
                    .map(|idempotency| IdempotencyRecord {
                        key: idempotency.key.clone(),
                        request_hash: idempotency.request_hash.clone(),
                        response_status: success_status(command),
                        response_body: serde_json::json!({ "order_id": order_id }),
                    }),
            };
            let pending = self.inner.committer.submit(request).await;
            let advanced = cached.insert(CachedOrder {
                state: after.clone(),
                last_event_id: after_last_event_id,
            });
            self.inner.slots.record(order_id, &slot, advanced);
            (pending, before, after, assumed_new)
        };

        // The wait and the cache repair run in a task of their own: if the client goes away and
        // this future is dropped, a failed append must still clear the cached state, which
        // includes it. Commands already chained on it fail their own version check and retry
        // from a fresh load. The failure is logged there too, in the request's span: the one
        // line logged for it (the group committer logs its batch's only at debug), which must
        // reach the log when the request is gone before the commit fails (it timed out, or
        // its client hung up). It names the order, and says warn for a 503, error for a 500.
        let settle = tokio::spawn(
            async move {
                let result = pending.await.unwrap_or(Err(AppendError::CommitterStopped));
                if let Err(err) = &result {
                    *slot.lock().await = None;
                    metrics::counter!(CACHE_DISCARDED_TOTAL).increment(1);
                    if let Some(unavailable) = append_failure_unavailable(err) {
                        log_store_failure(unavailable, err, order_id, "append failed");
                    }
                }
                result
            }
            .instrument(tracing::Span::current()),
        );
        let result = settle.await.unwrap_or(Err(AppendError::CommitterStopped));
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(err) => {
                return Err(match err {
                    AppendError::Conflict { .. } if assumed_new => AttemptError::NotNew,
                    AppendError::Conflict { actual, .. } => AttemptError::Conflict {
                        actual: Some(actual),
                    },
                    AppendError::IdempotencyKeyTaken(_) => AttemptError::KeyTaken,
                    other => {
                        // Logged by the task above.
                        let unavailable = append_failure_unavailable(&other).unwrap_or(false);
                        AttemptError::Failed(store_failure(unavailable, &other))
                    }
                });
            }
        };
        if outcome.stream_version == after.version {
            self.maybe_snapshot(stream_id, before, after);
        }
        Ok(CommandOutcome {
            order_id,
            version: outcome.stream_version,
            position: outcome.last_position,
            replayed: None,
        })
    }

    async fn load(&self, order_id: Uuid) -> Result<CachedOrder, CommandError> {
        let loaded = self
            .inner
            .gate
            .unless_shut(store::load_order(&self.inner.pool, order_id))
            .await
            .ok_or_else(cut_short)?;
        match loaded {
            Ok(loaded) => {
                let every = self.inner.config.snapshot_every;
                if every > 0 && i64::try_from(loaded.events_replayed).unwrap_or(i64::MAX) >= every {
                    // The order has no usable snapshot near its head: none was written yet
                    // (snapshots turned on over existing orders), the one stored is of another
                    // state schema (a release changed the state), or it no longer deserialises.
                    // Without one, every instance's next load replays the same events again
                    // until the order crosses its next multiple of the interval.
                    self.save_snapshot_in_background(
                        order_stream_id(order_id),
                        loaded.state.clone(),
                    );
                }
                Ok(CachedOrder {
                    state: loaded.state,
                    last_event_id: loaded.last_event_id,
                })
            }
            Err(err @ store::LoadError::NewerRelease { .. }) => {
                tracing::warn!(error = %err, %order_id,
                    "cannot load order: this instance is older than the release that wrote it");
                Err(CommandError::NewerRelease(err.to_string()))
            }
            Err(err) => {
                let unavailable = match &err {
                    store::LoadError::Database(e) => platform::db::is_unavailable(e),
                    store::LoadError::Corrupt { .. } | store::LoadError::NewerRelease { .. } => {
                        false
                    }
                };
                log_store_failure(unavailable, &err, order_id, "cannot load order");
                Err(store_failure(unavailable, &err))
            }
        }
    }

    /// Records `error`, a refusal decided on the store's state, as the first answer to the
    /// request's idempotency key, and answers it; or, when the key has an answer already (a
    /// concurrent request with it got there first), answers that one as a repeat.
    async fn record_refusal(
        &self,
        order_id: Uuid,
        idempotency: &IdempotencyRequest,
        error: CommandError,
    ) -> Result<CommandOutcome, CommandError> {
        let (status, body) = (self.inner.rejection_answer)(&error);
        let record = IdempotencyRecord {
            key: idempotency.key.clone(),
            request_hash: idempotency.request_hash.clone(),
            response_status: status,
            response_body: body,
        };
        // A write: like an append, it stops waiting for a connection when the database is known
        // to be unreachable, but is never cut once it has begun.
        let mut shut = self.inner.gate.shut_state();
        let unreachable = async move {
            if shut.wait_for(|shut| *shut).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let recorded = store::idempotency::record_first_answer(
            &self.inner.pool,
            &record,
            store::DEFAULT_TRANSACTION_TIMEOUT,
            unreachable,
        )
        .await
        .map_err(|err| {
            // Answering the refusal unrecorded would let a repeat run again on a changed
            // order; a retry of this request settles it instead.
            let unavailable = platform::db::is_unavailable(&err);
            log_store_failure(
                unavailable,
                &err,
                order_id,
                "cannot record the refusal under its idempotency key",
            );
            store_failure(unavailable, &err)
        })?;
        match recorded {
            None => Err(error),
            Some(stored) => replay(order_id, idempotency, stored),
        }
    }

    /// Whether the store holds the cached `order` as its stream's current state: the same
    /// version *and* the same last event. The version alone would confirm a state the store
    /// never had, such as one including this instance's own append still in flight, when
    /// another writer's event brought the stream to that version; a refusal decided on it would
    /// be answered, and recorded under an idempotency key, as final. `false` when the store
    /// cannot tell.
    async fn store_holds(&self, stream_id: &str, order: &CachedOrder) -> bool {
        match store::stream_head(&self.inner.pool, stream_id).await {
            Ok(head) => head == (order.state.version, order.last_event_id),
            Err(err) => {
                tracing::warn!(error = %err, stream_id, "cannot read the stream's head");
                false
            }
        }
    }

    /// The replay of a stored `Idempotency-Key` answer, or `None` when the key is new.
    async fn stored_response(
        &self,
        order_id: Uuid,
        idempotency: &IdempotencyRequest,
    ) -> Result<Option<CommandOutcome>, CommandError> {
        match self.find_stored(order_id, &idempotency.key).await? {
            Some(stored) => replay(order_id, idempotency, stored).map(Some),
            None => Ok(None),
        }
    }

    /// The answer stored under `idempotency`'s key if it answered this very request (the same
    /// hash), for a request whose body this release refuses: only an earlier release, whose
    /// rules accepted the body, can have given one. `None` when the key has no answer, or one
    /// to another request (the refusal of the body stands then). `order_id` is the path's,
    /// or, for a create, taken from the stored answer.
    pub async fn earlier_answer(
        &self,
        order_id: Option<Uuid>,
        idempotency: &IdempotencyRequest,
    ) -> Result<Option<CommandOutcome>, CommandError> {
        let Some(stored) = self
            .find_stored(order_id.unwrap_or_default(), &idempotency.key)
            .await?
        else {
            return Ok(None);
        };
        if stored.request_hash != idempotency.request_hash {
            return Ok(None);
        }
        let order_id = order_id
            .or_else(|| stored.body.get("order_id")?.as_str()?.parse().ok())
            .unwrap_or_default();
        metrics::counter!("commands_total", "command" => "unparsed", "outcome" => "replayed")
            .increment(1);
        replay(order_id, idempotency, stored).map(Some)
    }

    /// The answer stored under `key`, if any; `order_id` names the order in a failure's log.
    async fn find_stored(
        &self,
        order_id: Uuid,
        key: &str,
    ) -> Result<Option<StoredResponse>, CommandError> {
        self.inner
            .gate
            .unless_shut(store::idempotency::find(&self.inner.pool, key))
            .await
            .ok_or_else(cut_short)?
            .map_err(|err| {
                let unavailable = platform::db::is_unavailable(&err);
                log_store_failure(
                    unavailable,
                    &err,
                    order_id,
                    "cannot look up an idempotency key",
                );
                store_failure(unavailable, &err)
            })
    }

    /// Saves a snapshot in the background when the append took the order across a multiple of
    /// the snapshot interval.
    fn maybe_snapshot(&self, stream_id: String, before: i64, after: OrderState) {
        let every = self.inner.config.snapshot_every;
        if every <= 0 || before / every == after.version / every {
            return;
        }
        self.save_snapshot_in_background(stream_id, after);
    }

    /// Saves `state` as its stream's snapshot, unless a newer one is stored, without holding up
    /// the command. A lost snapshot only costs a longer load later.
    fn save_snapshot_in_background(&self, stream_id: String, state: OrderState) {
        let pool = self.inner.pool.clone();
        tokio::spawn(async move {
            let version = state.version;
            match store::save_snapshot(&pool, &stream_id, version, STATE_SCHEMA_VERSION, &state)
                .await
            {
                Ok(()) => metrics::counter!("snapshots_written_total").increment(1),
                Err(err) => {
                    tracing::warn!(error = %err, stream_id, version, "cannot save a snapshot")
                }
            }
        });
    }
}

/// The answer to a request whose key has `stored` as its first answer: that answer again (a
/// success or a refusal), or 422 when the key was used with another request.
fn replay(
    order_id: Uuid,
    idempotency: &IdempotencyRequest,
    stored: StoredResponse,
) -> Result<CommandOutcome, CommandError> {
    if stored.request_hash != idempotency.request_hash {
        return Err(CommandError::IdempotencyKeyReused);
    }
    let number = |name: &str| stored.body.get(name).and_then(|v| v.as_i64()).unwrap_or(0);
    Ok(CommandOutcome {
        order_id,
        version: number("version"),
        position: number("position"),
        replayed: Some(stored),
    })
}

/// The HTTP status of a command's success: 201 for a created order, 200 otherwise.
pub fn success_status(command: &OrderCommand) -> i16 {
    match command {
        OrderCommand::CreateOrder { .. } => 201,
        _ => 200,
    }
}

/// Pause before retry `n` (1-based): short, growing, with jitter so retries of competing
/// instances do not stay in lockstep.
fn backoff(retry: u32) -> Duration {
    let base_ms = 2u64.saturating_pow(retry.min(6));
    let jitter_ms = rand::random_range(0..=base_ms);
    Duration::from_millis(base_ms + jitter_ms).min(MAX_RETRY_BACKOFF)
}

/// A read before the append was cut short: the gate found the database unreachable meanwhile.
fn cut_short() -> CommandError {
    CommandError::StoreUnavailable("the database cannot be reached".to_owned())
}

/// Logs a store failure of a command on `order_id`: a warning when the
/// database is unavailable (an outage, which `/readyz` and the alerts already show, so a flood
/// of errors would only bury what else happens), an error otherwise (a corrupt event, a failing
/// statement: something a person must look at).
/// 503 `store_unavailable` (retry) for a database that cannot be used now, 500 for anything
/// the store answered that a retry cannot change.
fn store_failure(unavailable: bool, error: &dyn std::fmt::Display) -> CommandError {
    if unavailable {
        CommandError::StoreUnavailable(error.to_string())
    } else {
        CommandError::StoreFailed(error.to_string())
    }
}

/// For an append that failed for the store's sake, whether the database was unavailable (a
/// 503 to retry) rather than refusing it (a 500); `None` for the outcomes that are answers
/// about the request (a version conflict, an idempotency key answered already), not failures.
fn append_failure_unavailable(err: &AppendError) -> Option<bool> {
    match err {
        AppendError::Conflict { .. } | AppendError::IdempotencyKeyTaken(_) => None,
        AppendError::Database(e) => Some(platform::db::is_unavailable(e)),
        AppendError::CommitterStopped => Some(true),
        _ => Some(false),
    }
}

fn log_store_failure(
    unavailable: bool,
    error: &dyn std::fmt::Display,
    order_id: Uuid,
    what: &'static str,
) {
    if unavailable {
        tracing::warn!(error = %error, %order_id, "{what}: the database is unavailable");
    } else {
        tracing::error!(error = %error, %order_id, "{what}");
    }
}
