//! Liveness, readiness and the router serving them with `/metrics`.
//!
//! `/healthz` only says the process answers. `/readyz` runs every registered check concurrently,
//! each bounded by [`CHECK_TIMEOUT`], and answers 200 `{"status":"ready","checks":{…}}` or 503
//! `{"status":"not_ready","checks":{"redis":"error: connection refused"}}`. Services add their
//! own checks with [`Readiness::with_check`]. These routes carry no auth and never touch the
//! domain, so a failed check shows only the kind of failure, in a fixed phrase
//! (`failure_kind`); its error, which can name hosts, users and databases, goes to the log.
//!
//! `/readyz?exclude=redis` (the parameter repeated or comma-separated, as Kubernetes' own
//! API server takes it) leaves the named checks out: they are not run, are reported as
//! `excluded`, and do not make the answer 503. A readiness probe uses it to ask "can this
//! instance serve its requests?" where a dependency is not needed for that: the command service
//! accepts commands with Redis down (the event store is the outbox) and the query service never
//! reads Redis, so taking either out of rotation for a Redis outage would turn a delay of the
//! read models into an outage of the API. A name that is not a check is 400, so a mistyped
//! probe fails loudly instead of checking more than it meant to leave out.
//!
//! One run of a check is under way at a time: requests arriving while it runs answer with its
//! outcome, so a burst of probes (these routes are never shed) cannot open a server connection
//! each through the Postgres check; a request asked after a run finished gets a run of its own.
//!
//! A failing check is logged when it starts failing, then at most once a minute while it keeps
//! failing, and once more when it passes again ([`crate::outage`]): the kubelet asks every few
//! seconds, and an outage must not write a line per probe.
//!
//! With [`Readiness::with_db_gate`], a failed `postgres` check also tells the service's database
//! gate ([`DbGate::suspect`]), which probes the server and, while it cannot be reached, sets
//! `database_unreachable` to 1. Without that, only a request answered `store_unavailable` would
//! start the probe, and an instance that is out of rotation (its readiness fails) or simply has no
//! traffic gets none: the gauge, and the alert reading it, would stay silent through an outage.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use redis::aio::ConnectionManager;
use serde::Serialize;
use sqlx::{Connection as _, PgPool};

use crate::config::error_chain;
use crate::db_gate::DbGate;
use crate::outage::OutageLog;

/// Longest a single readiness check may take: the answer must reach the kubelet within its
/// probes' `timeoutSeconds` (2 s in `deploy/k8s`), or the probe fails whatever it says.
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long the Postgres check gives `SELECT 1` on an idle pooled connection before it asks
/// the server with a connection of its own; well within [`CHECK_TIMEOUT`].
pub const POOL_PROBE: Duration = Duration::from_millis(500);
/// SQLSTATE `too_many_connections`: the server is there, at its connection limit.
const TOO_MANY_CONNECTIONS: &str = "53300";
/// Name of the Postgres check in the `/readyz` body.
pub const POSTGRES_CHECK: &str = "postgres";
/// Name of the Redis check in the `/readyz` body.
pub const REDIS_CHECK: &str = "redis";

/// Longest part of an unknown `exclude` name a 400 quotes back.
const MAX_SHOWN_NAME_LEN: usize = 40;

/// How `/readyz?exclude=<name>` reports a check it did not run.
pub const EXCLUDED: &str = "excluded";

/// What a readiness check returns.
pub type CheckFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// One registered check: its name, the function running it, and its latest outcome.
#[derive(Clone)]
struct Check {
    name: String,
    run: CheckFn,
    /// The latest outcome and when it was known. Held while the check runs, so one run of a
    /// check is under way at a time: requests arriving meanwhile wait for it and answer with
    /// its outcome instead of each running the check. `/readyz` carries no auth and is never
    /// shed, and the Postgres check opens a connection of its own when no pooled one is idle:
    /// a burst of probes (or a flood) would otherwise open one server connection each and
    /// could take every connection slot of the server.
    latest: Arc<tokio::sync::Mutex<Option<(Instant, Outcome)>>>,
}

/// One run's outcome: what `/readyz` shows, and for a failure, the error for the log.
#[derive(Debug, Clone)]
struct Outcome {
    shown: String,
    error: Option<String>,
}

impl Check {
    /// The check's outcome as of a moment after `asked`: the outcome of a run that finished
    /// after it (one under way when it was asked), or of a run made now.
    async fn outcome_after(&self, asked: Instant) -> Outcome {
        let mut latest = self.latest.lock().await;
        if let Some((known_at, outcome)) = latest.as_ref()
            && *known_at >= asked
        {
            return outcome.clone();
        }
        let outcome = match tokio::time::timeout(CHECK_TIMEOUT, (self.run)()).await {
            Ok(Ok(())) => Outcome {
                shown: "ok".to_owned(),
                error: None,
            },
            Ok(Err(e)) => Outcome {
                shown: format!("error: {}", failure_kind(&e)),
                error: Some(error_chain(e.as_ref())),
            },
            Err(_) => {
                let timed_out = format!("timed out after {} ms", CHECK_TIMEOUT.as_millis());
                Outcome {
                    shown: format!("error: {timed_out}"),
                    error: Some(timed_out),
                }
            }
        };
        *latest = Some((Instant::now(), outcome.clone()));
        outcome
    }
}

/// The set of dependency checks behind `/readyz`.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<Check>,
    /// Told when the `postgres` check fails ([`Readiness::with_db_gate`]).
    db_gate: Option<DbGate>,
    /// Per check, which of its failures `/readyz` logs (shared by the clones of this value that
    /// serve concurrent requests).
    outages: Arc<Mutex<HashMap<String, OutageLog>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.checks.iter().map(|c| c.name.as_str()).collect();
        f.debug_struct("Readiness").field("checks", &names).finish()
    }
}

impl Readiness {
    /// The standard checks: Postgres (`SELECT 1`) and Redis (`PING`).
    pub fn new(pg: PgPool, redis: ConnectionManager) -> Self {
        Self::default().with_postgres(pg).with_redis(redis)
    }

    /// Adds the `postgres` check: is the server reachable, which is what readiness promises.
    /// A pool whose connections are all busy is not a failure: the instance is serving with
    /// them, and taking every busy replica out of rotation at once would turn a slowdown into
    /// an outage.
    pub fn with_postgres(self, pg: PgPool) -> Self {
        self.with_check(POSTGRES_CHECK, move || {
            let pg = pg.clone();
            async move { postgres_reachable(&pg).await }
        })
    }

    /// Tells `gate` whenever the `postgres` check fails (an error or no answer in time), so that
    /// the gate probes the server and `database_unreachable` says whether it can be reached,
    /// whether or not requests come in (see the module documentation).
    pub fn with_db_gate(mut self, gate: DbGate) -> Self {
        self.db_gate = Some(gate);
        self
    }

    /// Adds the `redis` check: `PING` on the connection.
    pub fn with_redis(self, redis: ConnectionManager) -> Self {
        self.with_check(REDIS_CHECK, move || {
            let mut redis = redis.clone();
            async move {
                let _: String = redis::cmd("PING").query_async(&mut redis).await?;
                Ok(())
            }
        })
    }

    /// Adds a named check; an `Err` makes `/readyz` answer 503 naming the kind of failure
    /// (`failure_kind`), and is logged in full.
    pub fn with_check<F, Fut>(mut self, name: impl Into<String>, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let run: CheckFn = Arc::new(move || Box::pin(check()) as CheckFuture);
        self.checks.push(Check {
            name: name.into(),
            run,
            latest: Arc::default(),
        });
        self
    }

    /// Runs every check concurrently, each bounded by [`CHECK_TIMEOUT`].
    pub async fn check(&self) -> ReadinessReport {
        self.check_all_but(&[]).await
    }

    /// The names of the checks, in the order they were added.
    pub fn check_names(&self) -> Vec<&str> {
        self.checks.iter().map(|c| c.name.as_str()).collect()
    }

    /// Runs every check but those named in `excluded` concurrently, each bounded by
    /// [`CHECK_TIMEOUT`]; the excluded ones are reported as `excluded`. A check already running
    /// for another request is not run again: its outcome is this request's too.
    pub async fn check_all_but(&self, excluded: &[String]) -> ReadinessReport {
        let asked = Instant::now();
        let runs = self.checks.iter().map(|check| {
            let skip = excluded.contains(&check.name);
            async move {
                if skip {
                    let excluded = Outcome {
                        shown: EXCLUDED.to_owned(),
                        error: None,
                    };
                    return (check.name.clone(), excluded);
                }
                (check.name.clone(), check.outcome_after(asked).await)
            }
        });
        let mut checks = BTreeMap::new();
        let mut errors = BTreeMap::new();
        for (name, outcome) in futures::future::join_all(runs).await {
            if let Some(error) = outcome.error {
                errors.insert(name.clone(), error);
            }
            checks.insert(name, outcome.shown);
        }
        if let Some(gate) = &self.db_gate
            && checks
                .get(POSTGRES_CHECK)
                .is_some_and(|outcome| outcome.starts_with("error"))
        {
            gate.suspect();
        }
        let ready = checks.values().all(|v| v == "ok" || v == EXCLUDED);
        ReadinessReport {
            status: if ready { "ready" } else { "not_ready" },
            checks,
            errors,
        }
    }
}

/// What `/readyz` shows of a failed check: the kind of failure, in one of a few fixed phrases.
/// The error's own text can name hosts, users, databases and server messages, and these routes
/// are served to anyone (STYLE: a 5xx body never carries internal detail), so it goes to the
/// log instead, when the check starts failing (`Readiness::log_outcomes`). Kubernetes' own
/// `/readyz` withholds reasons the same way.
fn failure_kind(err: &anyhow::Error) -> &'static str {
    if let Some(kind) = err.chain().find_map(kind_of_cause) {
        return kind;
    }
    let text = error_chain(err.as_ref()).to_lowercase();
    KINDS_BY_TEXT
        .iter()
        .find(|(needles, _)| needles.iter().any(|needle| text.contains(needle)))
        .map_or(CHECK_FAILED, |(_, kind)| kind)
}

/// The shown phrase of a failure no kind matched.
const CHECK_FAILED: &str = "check failed (the service's log says why)";

/// Kinds recognised by the error's text, for causes that reach the check only as text (a TLS
/// error inside an I/O error, a name lookup that failed).
const KINDS_BY_TEXT: &[(&[&str], &str)] = &[
    // rustls names a refusal by the other side "received fatal alert: …".
    (
        &["certificate", "tls", "handshake", "alert"],
        "TLS handshake failed",
    ),
    (&["connection refused"], "connection refused"),
    (
        &["connection reset", "broken pipe", "unexpected end of file"],
        "connection lost",
    ),
    (
        &[
            "failed to lookup address",
            "name or service not known",
            "no such host",
        ],
        "host not found",
    ),
    (&["authentication", "password"], "authentication failed"),
    (&["timed out"], "timed out"),
];

/// The kind of one cause in an error's chain, when its type says it.
fn kind_of_cause(cause: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    if let Some(io) = cause.downcast_ref::<std::io::Error>() {
        return kind_of_io(io);
    }
    if let Some(redis) = cause.downcast_ref::<redis::RedisError>() {
        return crate::redis_conn::redis_kind_phrase(redis);
    }
    match cause.downcast_ref::<sqlx::Error>()? {
        sqlx::Error::Io(io) => kind_of_io(io),
        sqlx::Error::Tls(_) => Some("TLS handshake failed"),
        sqlx::Error::PoolTimedOut => Some("timed out"),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // invalid_password, invalid_authorization_specification
            Some("28P01" | "28000") => Some("authentication failed"),
            // invalid_catalog_name
            Some("3D000") => Some("database does not exist"),
            // cannot_connect_now
            Some("57P03") => Some("server starting up or shutting down"),
            Some(TOO_MANY_CONNECTIONS) => Some("too many connections"),
            _ => None,
        },
        _ => None,
    }
}

/// The kind of an I/O failure that says something of the server or the network
/// ([`crate::db::io_kind_phrase`]), a connection ended in any way being "connection lost": how
/// it ended tells a reader of `/readyz` nothing more.
fn kind_of_io(io: &std::io::Error) -> Option<&'static str> {
    use std::io::ErrorKind;
    match io.kind() {
        ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe
        | ErrorKind::UnexpectedEof => Some("connection lost"),
        _ => crate::db::io_kind_phrase(io),
    }
}

/// `SELECT 1` on an idle pooled connection when there is one (within [`POOL_PROBE`]); when
/// there is none (all busy, or none opened yet) or it failed, a connection of its own, never
/// waiting for the pool. That connection succeeding is the answer, and so is the server turning
/// it away at its connection limit while the pool holds connections (they still serve); its
/// error otherwise (`Connection refused`), rather than only that the check ran out of time.
async fn postgres_reachable(pg: &PgPool) -> anyhow::Result<()> {
    if let Some(mut conn) = pg.try_acquire() {
        let pinged = tokio::time::timeout(POOL_PROBE, sqlx::query("SELECT 1").execute(&mut *conn));
        match pinged.await {
            Ok(Ok(_)) => return Ok(()),
            // A broken or stuck session says nothing yet of the server; it is not kept.
            _ => conn.close_on_drop(),
        }
    }
    let options = (*pg.connect_options()).clone();
    match sqlx::PgConnection::connect_with(&options).await {
        Ok(conn) => {
            // Closing politely is best effort; the server answered, which is what counts.
            let _ = conn.close().await;
            Ok(())
        }
        Err(e)
            if pg.size() > 0
                && e.as_database_error().and_then(|db| db.code()).as_deref()
                    == Some(TOO_MANY_CONNECTIONS) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The `/readyz` body.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReadinessReport {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// Each check's name and `ok`, `excluded`, or `error: <kind of failure>`.
    pub checks: BTreeMap<String, String>,
    /// Each failed check's name and its error in full: for the log, never served.
    #[serde(skip)]
    pub(crate) errors: BTreeMap<String, String>,
}

impl ReadinessReport {
    /// Whether every check passed.
    pub fn is_ready(&self) -> bool {
        self.status == "ready"
    }
}

/// `GET /healthz`: 200 `{"status":"ok"}` while the process answers.
pub async fn healthz() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// `GET /readyz[?exclude=<check>[,<check>…]]`: 200 when every check not excluded passes, else
/// 503 naming the failing ones; 400 when `exclude` names no check of this service.
pub async fn readyz(State(readiness): State<Readiness>, RawQuery(query): RawQuery) -> Response {
    let excluded = excluded_checks(query.as_deref());
    let names = readiness.check_names();
    if let Some(unknown) = excluded.iter().find(|e| !names.contains(&e.as_str())) {
        return crate::Problem::bad_request(
            "invalid_exclude",
            format!(
                "exclude={} is not a readiness check of this service (checks: {})",
                &unknown[..unknown.floor_char_boundary(MAX_SHOWN_NAME_LEN)],
                names.join(", ")
            ),
        )
        .into_response();
    }
    let report = readiness.check_all_but(&excluded).await;
    readiness.log_outcomes(&report);
    let status = if report.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

impl Readiness {
    /// Logs what changed in `report`'s checks: a check that starts failing (and a reminder a
    /// minute while it keeps failing), and one that passes again. An excluded check says nothing
    /// either way. Every other failure goes to debug.
    fn log_outcomes(&self, report: &ReadinessReport) {
        let mut outages = self.outages.lock().unwrap_or_else(PoisonError::into_inner);
        for (check, outcome) in &report.checks {
            if outcome == EXCLUDED {
                continue;
            }
            let outage = outages.entry(check.clone()).or_default();
            if outcome == "ok" {
                if let Some(recovered) = outage.recovered() {
                    tracing::info!(check = %check, failures = recovered.failures,
                        failed_ms = recovered.failed_ms(), "readiness check passes again");
                }
                continue;
            }
            let error = report.errors.get(check).unwrap_or(outcome);
            match outage.failed() {
                Some(failing) if failing.first => {
                    tracing::warn!(check = %check, error, "not ready: readiness check fails");
                }
                Some(failing) => {
                    tracing::warn!(check = %check, error, failures = failing.failures,
                        failing_ms = failing.failing_ms(), "not ready: readiness check still fails");
                }
                None => tracing::debug!(check = %check, error, "not ready: readiness check fails"),
            }
        }
    }
}

/// The check names of every `exclude` parameter of `query`, comma-separated (`,` or `%2C`) or
/// repeated.
fn excluded_checks(query: Option<&str>) -> Vec<String> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.strip_prefix("exclude="))
        .flat_map(|names| {
            names
                .replace("%2C", ",")
                .replace("%2c", ",")
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Liveness: the process answers.
pub const HEALTHZ_PATH: &str = "/healthz";
/// Readiness: PostgreSQL and Redis answer.
pub const READYZ_PATH: &str = "/readyz";
/// The Prometheus page.
pub const METRICS_PATH: &str = "/metrics";
/// Every route [`health_router`] serves.
pub const PATHS: [&str; 3] = [HEALTHZ_PATH, READYZ_PATH, METRICS_PATH];

/// `/healthz`, `/readyz` and `/metrics`, to merge into a service's router outside its auth
/// layer. Generic over the router state so it merges before or after the service's `with_state`.
pub fn health_router<S>(readiness: Readiness, metrics_handle: PrometheusHandle) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let probes = Router::new()
        .route(HEALTHZ_PATH, get(healthz))
        .route(READYZ_PATH, get(readyz))
        .with_state(readiness);
    let metrics = Router::new()
        .route(METRICS_PATH, get(crate::metrics::metrics_handler))
        .with_state(metrics_handle);
    probes.merge(metrics)
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    fn io_error(kind: io::ErrorKind) -> io::Error {
        io::Error::new(kind, "from the operating system")
    }

    /// Errors as the checks meet them, built the way their crates build them, and what
    /// `/readyz` shows of each.
    #[test]
    fn each_kind_of_failure_is_named_by_a_fixed_phrase() {
        let cases: Vec<(anyhow::Error, &str)> = vec![
            (
                io_error(io::ErrorKind::ConnectionRefused).into(),
                "connection refused",
            ),
            (io_error(io::ErrorKind::TimedOut).into(), "timed out"),
            (
                io_error(io::ErrorKind::HostUnreachable).into(),
                "host unreachable",
            ),
            (
                io_error(io::ErrorKind::ConnectionReset).into(),
                "connection lost",
            ),
            (
                sqlx::Error::Io(io_error(io::ErrorKind::ConnectionRefused)).into(),
                "connection refused",
            ),
            (sqlx::Error::PoolTimedOut.into(), "timed out"),
            (
                sqlx::Error::Tls("bad certificate".into()).into(),
                "TLS handshake failed",
            ),
            (
                redis::RedisError::from(io_error(io::ErrorKind::ConnectionRefused)).into(),
                "connection refused",
            ),
            (
                redis::RedisError::from(io_error(io::ErrorKind::BrokenPipe)).into(),
                "connection lost",
            ),
            (
                redis::RedisError::from(io_error(io::ErrorKind::TimedOut)).into(),
                "timed out",
            ),
            (
                redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "refused")).into(),
                "authentication failed",
            ),
            (
                anyhow::anyhow!("invalid peer certificate: UnknownIssuer"),
                "TLS handshake failed",
            ),
            (
                anyhow::anyhow!("received fatal alert: UnknownCA"),
                "TLS handshake failed",
            ),
            (
                anyhow::anyhow!("failed to lookup address information: Name or service not known"),
                "host not found",
            ),
            (anyhow::anyhow!("lag is 5000 events"), CHECK_FAILED),
        ];
        for (error, kind) in cases {
            assert_eq!(failure_kind(&error), kind, "{error:#}");
        }
    }

    /// Context naming a host wraps the cause: the kind is still found, and the phrase shown
    /// carries nothing of the context.
    #[test]
    fn the_kind_is_found_under_context_and_shows_none_of_it() {
        let error = anyhow::Error::new(io_error(io::ErrorKind::ConnectionRefused))
            .context("connect to PostgreSQL at db.internal.example:5432 as orders_admin");
        let shown = failure_kind(&error);
        assert_eq!(shown, "connection refused");
        assert!(!shown.contains("db.internal") && !shown.contains("orders_admin"));
    }
}
