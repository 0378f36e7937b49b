//! Group commit: concurrent appends share one transaction.
//!
//! Requests queue on a channel; one task takes everything waiting (up to a bound), appends it
//! in a single transaction and answers each request on its own oneshot. While one batch commits
//! the next one fills, so under load the cost of a commit (and of the append lock) is shared by
//! many commands, and with no load a request waits for nothing but its own transaction.
//!
//! Requests are appended in the order they were submitted, so a caller may submit a second
//! append to a stream, chained on the head the first one will produce (its version and last
//! event id, [`crate::ExpectedVersion::Head`]), before the first has committed: if the first
//! fails, the second fails its check, even when another writer brought the stream to the same
//! version meanwhile, and nothing lands on a state its caller never saw.

use crate::append::{AppendError, AppendOutcome, AppendRequest, append_batch_unless_unreachable};
use sqlx::PgPool;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Bounds of one group commit.
#[derive(Debug, Clone, Copy)]
pub struct CommitterConfig {
    /// Most requests in one transaction; bounds its duration and memory.
    pub max_batch_requests: usize,
    /// Requests waiting beyond this make submitters wait (back-pressure instead of unbounded
    /// memory).
    pub queue_capacity: usize,
    /// Longest one group commit may take, the append lock's wait included; past it the batch
    /// fails and the committer moves on (`append::append_batch_within` says why).
    pub transaction_timeout: Duration,
}

/// [`CommitterConfig::transaction_timeout`] by default: a commit takes milliseconds, and even
/// a long queue on the append lock clears in well under a second.
pub const DEFAULT_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for CommitterConfig {
    fn default() -> Self {
        Self {
            max_batch_requests: 256,
            queue_capacity: 4096,
            transaction_timeout: DEFAULT_TRANSACTION_TIMEOUT,
        }
    }
}

type Reply = oneshot::Sender<Result<AppendOutcome, AppendError>>;

/// Gauge of the appends submitted and not yet taken into a group commit: the committer's
/// backlog.
const QUEUE_GAUGE: &str = "event_store_append_queue";

/// Handle to the group-commit task; cheap to clone. The task stops when every handle is dropped
/// after answering what is queued.
#[derive(Clone, Debug)]
pub struct GroupCommitter {
    queue: mpsc::Sender<(AppendRequest, Reply)>,
}

/// A submitted append; await it for the outcome.
pub type PendingAppend = oneshot::Receiver<Result<AppendOutcome, AppendError>>;

impl GroupCommitter {
    /// Starts the commit task on the current runtime.
    pub fn spawn(pool: PgPool, config: CommitterConfig) -> Self {
        let (queue, receiver) = mpsc::channel(config.queue_capacity.max(1));
        tokio::spawn(run(pool, receiver, config, None));
        Self { queue }
    }

    /// [`Self::spawn`], told by `unreachable` (`true` while the database is known to be
    /// unreachable: the services' `platform::db_gate`) when waiting for a connection is
    /// pointless: a batch still waiting for one then fails at once, with nothing written,
    /// instead of after the pool's acquire timeout. A batch whose transaction has begun runs
    /// to its own answer.
    pub fn spawn_with_reachability(
        pool: PgPool,
        config: CommitterConfig,
        unreachable: watch::Receiver<bool>,
    ) -> Self {
        let (queue, receiver) = mpsc::channel(config.queue_capacity.max(1));
        tokio::spawn(run(pool, receiver, config, Some(unreachable)));
        Self { queue }
    }

    /// Queues an append; the order of `submit` calls is the order of appending. When this
    /// returns the append is queued (`event_store_append_queue` counts it until a group commit
    /// takes it).
    pub async fn submit(&self, request: AppendRequest) -> PendingAppend {
        let (reply, answer) = oneshot::channel();
        metrics::gauge!(QUEUE_GAUGE).increment(1.0);
        if let Err(mpsc::error::SendError((_, reply))) = self.queue.send((request, reply)).await {
            metrics::gauge!(QUEUE_GAUGE).decrement(1.0);
            let _ = reply.send(Err(AppendError::CommitterStopped));
        }
        answer
    }

    /// Appends and waits for the outcome.
    pub async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError> {
        self.submit(request)
            .await
            .await
            .unwrap_or(Err(AppendError::CommitterStopped))
    }
}

async fn run(
    pool: PgPool,
    mut receiver: mpsc::Receiver<(AppendRequest, Reply)>,
    config: CommitterConfig,
    mut unreachable: Option<watch::Receiver<bool>>,
) {
    let max_batch = config.max_batch_requests.max(1);
    let mut batch = Vec::with_capacity(max_batch);
    while receiver.recv_many(&mut batch, max_batch).await > 0 {
        metrics::gauge!(QUEUE_GAUGE).decrement(batch.len() as f64);
        let (requests, replies): (Vec<AppendRequest>, Vec<Reply>) = batch.drain(..).unzip();
        let started = Instant::now();
        let result = append_batch_unless_unreachable(
            &pool,
            &requests,
            config.transaction_timeout,
            known_unreachable(&mut unreachable),
        )
        .await;
        metrics::histogram!("event_store_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("event_store_batch_requests").record(requests.len() as f64);
        match result {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    answer(reply, outcome);
                }
            }
            Err(err) if requests.len() > 1 && is_refused_data(&err) => {
                // One request's data was refused (a value PostgreSQL cannot store, a constraint)
                // and took the whole transaction down: append the requests one by one, in
                // order, so only that one fails (a request chained on it fails its check).
                tracing::warn!(error = %err, requests = requests.len(),
                    "append transaction refused a request's data; appending the batch one by one");
                // One more deadline for them all, as for one batch: each append alone takes
                // milliseconds, but a server going silent meanwhile would hold each one its
                // full timeout in turn, and every append queued behind the batch for up to
                // `max_batch_requests` timeouts. Those left when it passes are not tried.
                // (Tokio's clock, as the appends' own deadlines use.)
                let give_up = tokio::time::Instant::now() + config.transaction_timeout;
                for (request, reply) in requests.iter().zip(replies) {
                    let left = give_up.saturating_duration_since(tokio::time::Instant::now());
                    let alone = if left.is_zero() {
                        Err(sqlx::Error::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "the append did not begin: its batch, appended one by one after \
                                 another request's data was refused, ran past {:?}",
                                config.transaction_timeout
                            ),
                        )))
                    } else {
                        append_batch_unless_unreachable(
                            &pool,
                            std::slice::from_ref(request),
                            left,
                            known_unreachable(&mut unreachable),
                        )
                        .await
                    };
                    let outcome = match alone {
                        Ok(mut outcomes) => {
                            outcomes.pop().unwrap_or(Err(AppendError::CommitterStopped))
                        }
                        Err(err) => Err(AppendError::Database(std::sync::Arc::new(err))),
                    };
                    answer(reply, outcome);
                }
            }
            Err(err) => {
                // Debug only: each caller logs its own failed append once, and that line is the
                // one worth reading during an incident. It carries the order and the request
                // (its span), is a warning when the database is unavailable (503, retried) and
                // an error when a retry cannot help (500), which only the service can tell; a
                // line here as well would say every failure twice. How many appends a failure
                // took down is `event_store_appends_total{outcome="error"}`.
                tracing::debug!(error = %err, requests = requests.len(), "append transaction failed");
                metrics::counter!("event_store_appends_total", "outcome" => "error")
                    .increment(requests.len() as u64);
                let shared = std::sync::Arc::new(err);
                for reply in replies {
                    let _ = reply.send(Err(AppendError::Database(shared.clone())));
                }
            }
        }
    }
}

/// Completes once `unreachable` says the database is unreachable; never when there is no one
/// to tell (or no one will again): an append then waits for its connection as usual.
async fn known_unreachable(unreachable: &mut Option<watch::Receiver<bool>>) {
    if let Some(state) = unreachable.as_mut()
        && state.wait_for(|unreachable| *unreachable).await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// Sends one request's outcome, counting it.
fn answer(reply: Reply, outcome: Result<AppendOutcome, AppendError>) {
    let label = match &outcome {
        Ok(_) => "ok",
        Err(AppendError::Conflict { .. }) => "conflict",
        Err(AppendError::Database(_)) => "error",
        Err(_) => "rejected",
    };
    metrics::counter!("event_store_appends_total", "outcome" => label).increment(1);
    let _ = reply.send(outcome);
}

/// Whether the server refused the data of the statement (SQLSTATE classes 22, data exception,
/// and 23, integrity constraint violation), rather than failing to run it: the one failure a
/// single request can cause for everyone in its batch.
fn is_refused_data(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
}
