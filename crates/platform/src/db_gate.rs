//! The database gate: while PostgreSQL is known to be unreachable, API requests are answered
//! 503 `store_unavailable` at once, instead of each waiting [`crate::db::ACQUIRE_TIMEOUT`] for a
//! pooled connection that cannot be made; a probe lets them through again as soon as a
//! connection succeeds.
//!
//! How it learns: every `store_unavailable` answer of the routes behind
//! [`refuse_while_unreachable`], and work under [`DbGate::unless_shut`] still waiting after
//! [`SLOW_WORK_SUSPECTS_AFTER`], starts one probe (one at a time): a connection made directly,
//! not through the pool, whose connections may merely all be busy. When the server cannot be
//! reached (refused, reset, timed out, shutting down or starting up), the gate shuts, and the
//! probe tries again every [`PROBE_INTERVAL`] until a connection succeeds, when it opens again.
//! A request is therefore refused only while the server was unreachable at the last probe, at
//! most [`PROBE_INTERVAL`] (plus a connect) ago.
//!
//! Requests already under way when the gate shuts would otherwise wait for a pooled connection
//! until the pool's acquire timeout (the pool retries a refused connect until then). Work that
//! changes nothing is cut short instead: [`DbGate::unless_shut`] ends it the moment the gate
//! shuts, and [`refuse_or_cut_while_unreachable`] does so for whole read-only requests (the
//! query service's). Work that may be committing is left to finish or fail by itself, so its
//! answer stays the truth: the command service cuts its reads before the append, and its group
//! commit stops waiting for a connection ([`DbGate::shut_state`]) but never cuts a transaction
//! that has begun.
//!
//! What it never does: refuse requests while the server answers connections (a saturated pool,
//! a server at its connection limit or a rejected statement leave it open), hold a request
//! back, or touch the pool. The gauge `database_unreachable` (1 while shut) and the counter
//! `database_unreachable_refusals_total` tell monitoring what it does.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::watch;

use crate::problem::{Problem, ProblemCode};

/// Requests refused at once because the database is known to be unreachable (counter).
pub const REFUSALS_TOTAL: &str = "database_unreachable_refusals_total";

/// The problem code of a store that cannot be used now, shared by every service.
pub const STORE_UNAVAILABLE: &str = "store_unavailable";
/// Pause between two probes while the server is unreachable: how late, at most, requests are
/// let through again after the server is back.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Longest a probe's connection may take before the server counts as unreachable: a server
/// whose packets are dropped does not refuse, it never answers.
pub const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long work under [`DbGate::unless_shut`] runs before it starts a probe: well above what
/// a read takes, well below the pool's acquire timeout.
pub const SLOW_WORK_SUSPECTS_AFTER: Duration = Duration::from_secs(1);
/// Least time between two probes started by slow work (long polls and read-your-writes waits
/// are slow by design; they must not keep a probe running).
pub const SLOW_WORK_PROBE_SPACING: Duration = Duration::from_secs(5);
/// `Retry-After` seconds of a refused request.
pub const REFUSED_RETRY_AFTER_SECS: u64 = 1;

/// Whether the database can be reached, shared by every request of a service (cheap to clone).
#[derive(Clone)]
pub struct DbGate {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DbGate {
    /// The state only: the connect options hold the database password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbGate")
            .field("shut", &self.is_shut())
            .field("probing", &self.is_probing())
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// How the probe connects: the pool's own options (server, TLS, credentials).
    options: Arc<PgConnectOptions>,
    /// `true` while the last probe could not reach the server; watched by work that
    /// [`DbGate::unless_shut`] cuts short.
    shut: watch::Sender<bool>,
    /// Set while a probe runs, so a burst of failures starts one.
    probing: AtomicBool,
    /// When slow work last started a probe ([`SLOW_WORK_PROBE_SPACING`]).
    slow_work_probed_at: std::sync::Mutex<Option<Instant>>,
}

impl DbGate {
    /// A gate for the server `pool` connects to; open until a probe finds the server unreachable.
    pub fn new(pool: &PgPool) -> Self {
        metrics::gauge!("database_unreachable").set(0.0);
        // At 0 from the start, so a dashboard or a grep finds it before the first refusal, and
        // `increase()` sees that first one.
        metrics::counter!(REFUSALS_TOTAL).increment(0);
        Self {
            inner: Arc::new(Inner {
                options: pool.connect_options(),
                shut: watch::Sender::new(false),
                probing: AtomicBool::new(false),
                slow_work_probed_at: std::sync::Mutex::new(None),
            }),
        }
    }

    /// Whether requests are being refused because the server could not be reached.
    pub fn is_shut(&self) -> bool {
        *self.inner.shut.borrow()
    }

    /// The gate's state as it changes: `true` while it is shut (for work outside a request
    /// that should stop waiting for the database meanwhile, like the command service's group
    /// commit waiting for a connection).
    pub fn shut_state(&self) -> watch::Receiver<bool> {
        self.inner.shut.subscribe()
    }

    /// Runs `work` unless the gate shuts first, which drops it and gives `None`. For work that
    /// changes nothing (reads): one waiting for a pooled connection when the server went away
    /// ends when the probe finds it gone, instead of after the pool's acquire timeout.
    ///
    /// Work still unfinished after [`SLOW_WORK_SUSPECTS_AFTER`] starts a probe (at most one
    /// per [`SLOW_WORK_PROBE_SPACING`]): on a quiet service no other request may be there to
    /// find the server gone, and the pool would keep this one waiting for its whole acquire
    /// timeout. Against a server that answers, that costs one connection now and then.
    pub async fn unless_shut<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        let mut shut = self.inner.shut.subscribe();
        let mut work = std::pin::pin!(work);
        let slow = tokio::time::sleep(SLOW_WORK_SUSPECTS_AFTER);
        let mut slow = std::pin::pin!(slow);
        let mut suspected = false;
        loop {
            tokio::select! {
                biased;
                done = &mut work => return Some(done),
                _ = shut.wait_for(|shut| *shut) => return None,
                () = &mut slow, if !suspected => {
                    suspected = true;
                    self.suspect_slow_work();
                }
            }
        }
    }

    /// Starts a probe for work that is taking long, unless slow work started one within
    /// [`SLOW_WORK_PROBE_SPACING`].
    fn suspect_slow_work(&self) {
        {
            let Ok(mut last) = self.inner.slow_work_probed_at.lock() else {
                return;
            };
            if last.is_some_and(|at| at.elapsed() < SLOW_WORK_PROBE_SPACING) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.suspect();
    }

    /// Whether a probe is under way: started by a `store_unavailable` answer, not yet ended.
    pub fn is_probing(&self) -> bool {
        self.inner.probing.load(Ordering::Acquire)
    }

    /// Reports that a request found the store unavailable: starts a probe unless one runs.
    pub fn suspect(&self) {
        if self.inner.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            probe_until_reachable(&inner).await;
            inner.probing.store(false, Ordering::Release);
        });
    }
}

/// Connects until a connection succeeds or fails for a reason other than an unreachable
/// server, shutting the gate in between and opening it at the end.
async fn probe_until_reachable(inner: &Inner) {
    let mut shut_since: Option<Instant> = None;
    loop {
        match connect(&inner.options).await {
            Err(e) if is_unreachable(&e) => {
                if shut_since.is_none() {
                    shut_since = Some(Instant::now());
                    inner.shut.send_replace(true);
                    metrics::gauge!("database_unreachable").set(1.0);
                    tracing::warn!(
                        server = %crate::db::server(&inner.options),
                        error = %crate::db::describe_cause(&e),
                        "PostgreSQL cannot be reached: API requests are answered 503 \
                         store_unavailable at once until a connection succeeds"
                    );
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
            // Reachable: a connection, or an answer that says the server is there (a rejected
            // password, a missing database, too many connections) and is the requests' to report.
            other => {
                if let Ok(conn) = other {
                    let _ = conn.close().await;
                }
                if let Some(since) = shut_since {
                    inner.shut.send_replace(false);
                    metrics::gauge!("database_unreachable").set(0.0);
                    tracing::info!(
                        server = %crate::db::server(&inner.options),
                        unreachable_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "PostgreSQL is reachable again: serving API requests"
                    );
                } else {
                    // The failure that started this probe was not the server's absence; wait a
                    // little before the next probe so a burst of such failures makes one connection
                    // per interval, not one per request.
                    tokio::time::sleep(PROBE_INTERVAL).await;
                }
                return;
            }
        }
    }
}

async fn connect(options: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    match tokio::time::timeout(PROBE_CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        ))),
    }
}

/// Whether a failed connection says the server cannot be reached at all (as opposed to a
/// server that answered and refused: credentials, a missing database, its connection limit).
fn is_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // Connection exceptions, and a server shutting down, crashed or still starting.
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// Middleware for the routes that need the database: answers 503 `store_unavailable` at once
/// while the gate is shut, and reports every `store_unavailable` answer to it.
pub async fn refuse_while_unreachable(
    State(gate): State<DbGate>,
    request: Request,
    next: Next,
) -> Response {
    if gate.is_shut() {
        return refused();
    }
    reported(&gate, next.run(request).await)
}

/// [`refuse_while_unreachable`] for routes whose requests change nothing: a request under way
/// when the gate shuts is also answered 503 `store_unavailable` at once (see the module
/// documentation).
pub async fn refuse_or_cut_while_unreachable(
    State(gate): State<DbGate>,
    request: Request,
    next: Next,
) -> Response {
    if gate.is_shut() {
        return refused();
    }
    match gate.unless_shut(next.run(request)).await {
        Some(response) => reported(&gate, response),
        None => refused(),
    }
}

/// The answer to a request refused (or cut short) because the server cannot be reached.
fn refused() -> Response {
    metrics::counter!(REFUSALS_TOTAL).increment(1);
    Problem::unavailable(STORE_UNAVAILABLE, REFUSED_RETRY_AFTER_SECS)
        .with_detail("the store cannot be reached; retry later")
        .into_response()
}

/// Passes `response` on, starting a probe when it says the store was unavailable.
fn reported(gate: &DbGate, response: Response) -> Response {
    if response
        .extensions()
        .get::<ProblemCode>()
        .is_some_and(|code| code.as_str() == STORE_UNAVAILABLE)
    {
        gate.suspect();
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_absent_server_is_unreachable() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(is_unreachable(&sqlx::Error::Io(refused)));
        assert!(is_unreachable(&sqlx::Error::Protocol(
            "unexpected EOF".into()
        )));
        assert!(!is_unreachable(&sqlx::Error::PoolTimedOut));
        assert!(!is_unreachable(&sqlx::Error::RowNotFound));
    }

    #[tokio::test]
    async fn the_debug_form_never_shows_the_password() {
        let options = PgConnectOptions::new()
            .host("127.0.0.1")
            .username("orders")
            .password("s3cret-pw");
        let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy_with(options);
        let shown = format!("{:?}", DbGate::new(&pool));
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert!(shown.contains("shut: false"), "{shown}");
    }
}
