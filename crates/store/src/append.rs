//! One append transaction for a batch of append requests.
//!
//! Each request targets one stream with an expected version (and, chained on an append still in
//! flight, the id of that append's last event: [`ExpectedVersion::Head`]). The transaction takes
//! the global append lock, then checks, in memory and in request order, every request against
//! the streams' current heads (so several requests for the same stream in one batch chain
//! correctly), and
//! inserts the accepted events with one multi-row `INSERT`. A rejected request does not fail the
//! others. The unique `(stream_id, stream_version)` constraint stays as the database's backstop.

use events::{EventMetadata, NewEvent};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};
use std::collections::HashMap;
use uuid::Uuid;

/// Key of the transaction-scoped advisory lock every append holds while it assigns positions.
/// Serialising appends is what makes positions dense and in commit order (see the crate docs);
/// group commit keeps the cost of that to one short transaction per batch.
pub const APPEND_LOCK_KEY: i64 = 0x0E5E_0001;

/// What the appender believes the stream's version is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the current version is.
    Any,
    /// The stream must be at exactly this version (0: it must not exist yet).
    Exact(i64),
    /// The stream must be at exactly `version`, and its last event must be `last_event_id`.
    ///
    /// A version number counts events; it does not say which. An appender that decided on a
    /// state including an append of its own still in flight, chained on the version that append
    /// will produce, would otherwise land on whatever brings the stream to that number should
    /// its own fail (another writer's event, or an append decided on a fresher load), on a
    /// state it never saw. Naming the last event makes the check identify the state itself.
    Head { version: i64, last_event_id: Uuid },
}

impl ExpectedVersion {
    /// The version the stream must be at, when one is expected.
    pub fn version(self) -> Option<i64> {
        match self {
            ExpectedVersion::Any => None,
            ExpectedVersion::Exact(version) | ExpectedVersion::Head { version, .. } => {
                Some(version)
            }
        }
    }

    /// Whether a stream whose head is `head` meets this expectation.
    fn is_met_by(self, head: StreamHead) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::Exact(version) => version == head.version,
            ExpectedVersion::Head {
                version,
                last_event_id,
            } => version == head.version && head.last_event_id == Some(last_event_id),
        }
    }
}

/// A stream's current version and the id of its last event (none for an empty stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct StreamHead {
    version: i64,
    last_event_id: Option<Uuid>,
}

/// A stored response for an `Idempotency-Key`. With an append it is written atomically with
/// the events, and the store adds the append's `version` and `position` to `response_body` (an
/// object) before storing it, since they are only known inside the append. A refusal is stored
/// as given ([`crate::idempotency::record_first_answer`]).
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyRecord {
    pub key: String,
    pub request_hash: Vec<u8>,
    pub response_status: i16,
    pub response_body: serde_json::Value,
}

/// Events to append to one stream.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub stream_id: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub idempotency: Option<IdempotencyRecord>,
}

/// Where an accepted append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The stream's version after the append (the version of its last event).
    pub stream_version: i64,
    /// Global position of the first and last appended event.
    pub first_position: i64,
    pub last_position: i64,
    /// The events were already stored by an earlier attempt with the same event ids; nothing new
    /// was written and the positions are those of the earlier append.
    pub duplicate: bool,
}

/// Why an append was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("stream `{stream_id}` is at version {actual}, expected {expected}")]
    Conflict {
        stream_id: String,
        expected: i64,
        actual: i64,
    },
    #[error("some event ids of this append are already stored, but not as this same append")]
    EventIdReused,
    #[error("idempotency key `{0}` was stored by another request")]
    IdempotencyKeyTaken(String),
    #[error("an append needs at least one event")]
    Empty,
    #[error("the group committer has stopped")]
    CommitterStopped,
    #[error("event store unavailable: {0}")]
    Database(#[source] std::sync::Arc<sqlx::Error>),
}

impl AppendError {
    /// Whether retrying the same request later may succeed without changing it.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            AppendError::Database(_) | AppendError::CommitterStopped
        )
    }
}

impl From<sqlx::Error> for AppendError {
    fn from(err: sqlx::Error) -> Self {
        AppendError::Database(std::sync::Arc::new(err))
    }
}

/// How an append transaction has its two statements planned: once per connection, where the
/// command service otherwise plans every execution (`platform::db::with_custom_plans`). Planning the
/// read took four times as long as running it, inside the append lock. The read is index
/// probes only and the write inserts what it is given, so one plan is right at any table size,
/// provided it is not made while the store is small enough for a sequential scan of `events`
/// to look cheaper than its `event_id` index (at a few hundred events it does, and that plan
/// would then scan millions): hence `enable_seqscan = off`, for this transaction only. A test
/// checks the read's cached plan made at several store sizes.
pub(crate) const CACHED_PLAN_SETTINGS: &str =
    "SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off";

/// Appends a batch in one transaction on a pooled connection. Returns one result per request,
/// in order; `Err` only when the transaction itself failed (then nothing was written).
pub async fn append_batch(
    pool: &PgPool,
    requests: &[AppendRequest],
) -> Result<Vec<Result<AppendOutcome, AppendError>>, sqlx::Error> {
    let mut tx = begin_append(pool).await?;
    let results = append_holding_lock(&mut tx, requests).await?;
    tx.commit().await?;
    Ok(results)
}

/// [`append_batch`], given at most `deadline` from asking the pool for a connection to the
/// commit's answer.
///
/// Past it the append fails with a timed-out I/O error: a server that went silent (its host
/// died, a fail-over moved its address) would otherwise hold the append, and everything queued
/// behind it, for as long as TCP retries (about 15 minutes). Its connection is closed, not
/// handed back: its state is unknown, and the pool would test it with a round trip the silent
/// server never answers. As after any connection lost during a commit, the caller cannot tell
/// whether the transaction committed; a retry with the same idempotency key settles it.
pub async fn append_batch_within(
    pool: &PgPool,
    requests: &[AppendRequest],
    deadline: std::time::Duration,
) -> Result<Vec<Result<AppendOutcome, AppendError>>, sqlx::Error> {
    append_batch_unless_unreachable(pool, requests, deadline, std::future::pending()).await
}

/// [`append_batch_within`] that gives up waiting for a connection as soon as `unreachable`
/// completes (the database is known to be unreachable). Nothing is written then: the
/// transaction had not begun, so the failure (a refused-connection I/O error) is certain, not
/// ambiguous. Once the transaction has begun it runs to its own answer.
pub async fn append_batch_unless_unreachable(
    pool: &PgPool,
    requests: &[AppendRequest],
    deadline: std::time::Duration,
    unreachable: impl std::future::Future<Output = ()>,
) -> Result<Vec<Result<AppendOutcome, AppendError>>, sqlx::Error> {
    in_append_transaction(pool, deadline, unreachable, "the append", || {
        async |tx| append_holding_lock(tx, requests).await
    })
    .await
}

/// Runs `work` in a transaction holding the append lock ([`begin_statement`]) and commits it,
/// all within `deadline`, or gives up waiting for a connection as soon as `unreachable`
/// completes (then nothing began: a refused-connection error, certain). A deadline passed
/// once the transaction began closes the connection, so the server rolls back what it has not
/// committed; the caller cannot tell whether a commit under way landed. `what` names the work
/// in the errors.
///
/// A transaction that fails on a session found gone before its `COMMIT` was sent (a server
/// restart ended the pooled session) committed nothing, so it is run again on another session
/// ([`crate::session`]), within the same deadline: `work` makes the work afresh for each try,
/// and each runs in a fresh transaction. A failed `COMMIT` is returned as it is.
pub(crate) async fn in_append_transaction<T, Work>(
    pool: &PgPool,
    deadline: std::time::Duration,
    unreachable: impl std::future::Future<Output = ()>,
    what: &str,
    // Made afresh per try rather than one `AsyncFnMut`: the future of a call that borrows the
    // closure would not be provably `Send` for every borrow, which a spawned committer needs.
    mut work: impl FnMut() -> Work,
) -> Result<T, sqlx::Error>
where
    Work: AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    let timed_out = || {
        sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} did not finish within {deadline:?}"),
        ))
    };
    // Polled again by each try's wait for a connection; once it completes, nothing is tried.
    let mut unreachable = std::pin::pin!(unreachable);
    let mut tries_left = crate::session::tries_after_lost_sessions(pool);
    loop {
        // The pool tests a connection before handing it out, which waits on a silent server
        // too; a refused connect it retries until its own acquire timeout.
        let mut conn = tokio::select! {
            biased;
            acquired = tokio::time::timeout_at(give_up, pool.acquire()) => {
                acquired.map_err(|_| timed_out())??
            }
            () = &mut unreachable => {
                return Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("the database cannot be reached; {what} did not begin"),
                )));
            }
        };
        let run = async {
            let mut tx = sqlx::Connection::begin_with(&mut *conn, AssertSqlSafe(begin_statement()))
                .await
                .map_err(Uncommitted)?;
            let result = work()(&mut tx).await.map_err(Uncommitted)?;
            tx.commit().await.map_err(Committing)?;
            Ok(result)
        };
        match tokio::time::timeout_at(give_up, run).await {
            Ok(Ok(result)) => return Ok(result),
            Ok(Err(TransactionFailure::Uncommitted(e)))
                if crate::session::is_lost(&e) && tries_left > 0 =>
            {
                tries_left -= 1;
                // Gone: closed rather than handed back to be pinged.
                conn.close_on_drop();
                tracing::debug!(error = %e, "a pooled session was gone; {what} runs again on another");
            }
            Ok(Err(TransactionFailure::Uncommitted(e) | TransactionFailure::Committing(e))) => {
                return Err(e);
            }
            Err(_) => {
                conn.close_on_drop();
                return Err(timed_out());
            }
        }
    }
}

/// Where an append transaction failed: before its `COMMIT` was sent (nothing was written), or
/// in it (whether it landed is unknown).
enum TransactionFailure {
    Uncommitted(sqlx::Error),
    Committing(sqlx::Error),
}
use TransactionFailure::{Committing, Uncommitted};

/// Begins an append transaction: holding the append lock, under [`CACHED_PLAN_SETTINGS`], and
/// with nothing else changed. In particular its commit waits for the WAL flush as the server's
/// `synchronous_commit` says, which is what makes an acknowledged append durable (guarantee 1):
/// unlike the projector's applies, nothing here may be rebuilt from anywhere else.
pub(crate) async fn begin_append(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with(AssertSqlSafe(begin_statement())).await
}

/// What [`begin_append`] sends: BEGIN, the lock and the plan settings travel together, saving
/// round trips on the serialised path.
pub(crate) fn begin_statement() -> String {
    format!("BEGIN; SELECT pg_advisory_xact_lock({APPEND_LOCK_KEY}); {CACHED_PLAN_SETTINGS}")
}

/// Row data of the accepted events, column by column for `UNNEST`.
#[derive(Default)]
struct Columns {
    positions: Vec<i64>,
    event_ids: Vec<Uuid>,
    stream_ids: Vec<String>,
    versions: Vec<i64>,
    types: Vec<String>,
    schema_versions: Vec<i32>,
    data: Vec<serde_json::Value>,
    metadata: Vec<serde_json::Value>,
}

/// Appends a batch inside a transaction the caller owns (and commits). Takes the append lock,
/// which the caller holds until its transaction ends: keep the transaction short.
pub async fn append_within(
    conn: &mut PgConnection,
    requests: &[AppendRequest],
) -> Result<Vec<Result<AppendOutcome, AppendError>>, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK_KEY)
        .execute(&mut *conn)
        .await?;
    append_holding_lock(conn, requests).await
}

/// [`append_within`] for a transaction that already holds the append lock.
async fn append_holding_lock(
    conn: &mut PgConnection,
    requests: &[AppendRequest],
) -> Result<Vec<Result<AppendOutcome, AppendError>>, sqlx::Error> {
    // Everything the checks need, read in one round trip after the lock, so that the snapshot
    // of this statement sees every append committed before ours.
    let mut plan = Plan {
        state: batch_state(conn, requests).await?,
        columns: Columns::default(),
        keys: Vec::new(),
    };
    let results = requests
        .iter()
        .map(|request| plan.accept(request))
        .collect();
    if !plan.columns.positions.is_empty() || !plan.keys.is_empty() {
        write_batch(conn, &plan.columns, &plan.keys, plan.state.head).await?;
    }
    Ok(results)
}

/// The batch being planned: what the store holds, what the requests checked so far add to it.
struct Plan<'a> {
    state: BatchState,
    /// Rows of the accepted events.
    columns: Columns,
    /// Idempotency records of the accepted requests, with where each landed.
    keys: Vec<(&'a IdempotencyRecord, AppendOutcome)>,
}

impl<'a> Plan<'a> {
    /// Checks one request against the store and the requests before it in the batch, and
    /// takes it into the batch when it passes.
    fn accept(&mut self, request: &'a AppendRequest) -> Result<AppendOutcome, AppendError> {
        let outcome = self.check_and_place(request)?;
        if let Some(record) = &request.idempotency
            && !outcome.duplicate
        {
            self.keys.push((record, outcome));
        }
        Ok(outcome)
    }

    fn check_and_place(&mut self, request: &AppendRequest) -> Result<AppendOutcome, AppendError> {
        if request.events.is_empty() {
            return Err(AppendError::Empty);
        }
        // Idempotent event ids: the same events appended again are answered with where they
        // landed.
        let found: Vec<&(String, i64, i64)> = request
            .events
            .iter()
            .filter_map(|event| self.state.stored_ids.get(&event.event_id))
            .collect();
        if !found.is_empty() {
            let same_append = found.len() == request.events.len()
                && found
                    .iter()
                    .all(|(stream, _, _)| *stream == request.stream_id);
            if !same_append {
                return Err(AppendError::EventIdReused);
            }
            return Ok(AppendOutcome {
                stream_version: found
                    .iter()
                    .map(|(_, version, _)| *version)
                    .max()
                    .unwrap_or(0),
                first_position: found.iter().map(|(_, _, pos)| *pos).min().unwrap_or(0),
                last_position: found.iter().map(|(_, _, pos)| *pos).max().unwrap_or(0),
                duplicate: true,
            });
        }
        if let Some(record) = &request.idempotency {
            let taken = self.state.taken_keys.contains(&record.key)
                || self.keys.iter().any(|(other, _)| other.key == record.key);
            if taken {
                return Err(AppendError::IdempotencyKeyTaken(record.key.clone()));
            }
        }
        let current = self
            .state
            .heads
            .get(&request.stream_id)
            .copied()
            .unwrap_or_default();
        if !request.expected.is_met_by(current) {
            return Err(AppendError::Conflict {
                stream_id: request.stream_id.clone(),
                expected: request.expected.version().unwrap_or(current.version),
                actual: current.version,
            });
        }
        let first_position = self.state.head + 1;
        let mut version = current.version;
        for event in &request.events {
            version += 1;
            self.state.head += 1;
            push_row(
                &mut self.columns,
                self.state.head,
                &request.stream_id,
                version,
                event,
            );
        }
        self.state.heads.insert(
            request.stream_id.clone(),
            StreamHead {
                version,
                last_event_id: request
                    .events
                    .last()
                    .map(|event| event.event_id)
                    .or(current.last_event_id),
            },
        );
        Ok(AppendOutcome {
            stream_version: version,
            first_position,
            last_position: self.state.head,
            duplicate: false,
        })
    }
}

fn push_row(columns: &mut Columns, position: i64, stream_id: &str, version: i64, event: &NewEvent) {
    columns.positions.push(position);
    columns.event_ids.push(event.event_id);
    columns.stream_ids.push(stream_id.to_owned());
    columns.versions.push(version);
    columns.types.push(event.event_type.clone());
    columns.schema_versions.push(event.schema_version);
    columns.data.push(event.data.clone());
    columns.metadata.push(metadata_json(&event.metadata));
}

fn metadata_json(metadata: &EventMetadata) -> serde_json::Value {
    serde_json::to_value(metadata).unwrap_or_else(|_| serde_json::json!({}))
}

/// What the store holds for a batch's streams, event ids and idempotency keys.
struct BatchState {
    /// Event ids of the batch that are already stored: `(stream, version, position)`.
    stored_ids: HashMap<Uuid, (String, i64, i64)>,
    /// Idempotency keys of the batch that are already taken.
    taken_keys: Vec<String>,
    /// Current head of each target stream (absent: empty).
    heads: HashMap<String, StreamHead>,
    /// The highest position in the log (advanced as the plan accepts events).
    head: i64,
}

/// The statement of [`batch_state`]. Each part is an index probe: the primary key for the head,
/// (stream_id, stream_version) backwards per stream, the unique event_id index, the idempotency
/// key; so its plan is the same whatever the tables' size, and [`append_batch`] lets it be
/// planned once per connection.
pub(crate) const BATCH_STATE_SQL: &str = "SELECT 'head' AS kind, NULL::text AS name, \
        (SELECT COALESCE(max(global_position), 0) FROM events) AS number, \
        NULL::bigint AS version, NULL::uuid AS event_id \
 UNION ALL \
 SELECT 'stream', s.stream_id, COALESCE(last.stream_version, 0), NULL, last.event_id \
 FROM unnest($1::text[]) AS s(stream_id) \
 LEFT JOIN LATERAL (SELECT e.stream_version, e.event_id FROM events e \
                    WHERE e.stream_id = s.stream_id \
                    ORDER BY e.stream_version DESC LIMIT 1) AS last ON true \
 UNION ALL \
 SELECT 'event', e.stream_id, e.global_position, e.stream_version, e.event_id \
 FROM events e WHERE e.event_id = ANY($2) \
 UNION ALL \
 SELECT 'key', k.idempotency_key, NULL, NULL, NULL \
 FROM idempotency_keys k WHERE k.idempotency_key = ANY($3)";

/// Reads the [`BatchState`] with one statement: one row per fact, tagged by `kind`.
async fn batch_state(
    conn: &mut PgConnection,
    requests: &[AppendRequest],
) -> Result<BatchState, sqlx::Error> {
    let mut streams: Vec<&str> = requests.iter().map(|r| r.stream_id.as_str()).collect();
    streams.sort_unstable();
    streams.dedup();
    let event_ids: Vec<Uuid> = requests
        .iter()
        .flat_map(|request| request.events.iter().map(|event| event.event_id))
        .collect();
    let keys: Vec<&str> = requests
        .iter()
        .filter_map(|request| {
            request
                .idempotency
                .as_ref()
                .map(|record| record.key.as_str())
        })
        .collect();
    let rows = sqlx::query(BATCH_STATE_SQL)
        .bind(&streams)
        .bind(&event_ids)
        .bind(&keys)
        .fetch_all(&mut *conn)
        .await?;
    let mut state = BatchState {
        stored_ids: HashMap::new(),
        taken_keys: Vec::new(),
        heads: HashMap::new(),
        head: 0,
    };
    for row in &rows {
        let kind: &str = row.try_get("kind")?;
        let name: Option<String> = row.try_get("name")?;
        let number: Option<i64> = row.try_get("number")?;
        match (kind, name) {
            ("head", _) => state.head = number.unwrap_or(0),
            ("stream", Some(stream)) => {
                let head = StreamHead {
                    version: number.unwrap_or(0),
                    last_event_id: row.try_get("event_id")?,
                };
                state.heads.insert(stream, head);
            }
            ("event", Some(stream)) => {
                let event_id: Uuid = row.try_get("event_id")?;
                let version: Option<i64> = row.try_get("version")?;
                state.stored_ids.insert(
                    event_id,
                    (stream, version.unwrap_or(0), number.unwrap_or(0)),
                );
            }
            ("key", Some(key)) => state.taken_keys.push(key),
            _ => {}
        }
    }
    Ok(state)
}

/// Writes the accepted events and idempotency records and signals the new head, in one
/// statement (data-modifying CTEs run whether or not the outer query reads them).
async fn write_batch(
    conn: &mut PgConnection,
    columns: &Columns,
    records: &[(&IdempotencyRecord, AppendOutcome)],
    head: i64,
) -> Result<(), sqlx::Error> {
    let keys: Vec<&str> = records.iter().map(|(r, _)| r.key.as_str()).collect();
    let hashes: Vec<&[u8]> = records
        .iter()
        .map(|(r, _)| r.request_hash.as_slice())
        .collect();
    let statuses: Vec<i16> = records.iter().map(|(r, _)| r.response_status).collect();
    let bodies: Vec<serde_json::Value> = records
        .iter()
        .map(|(record, outcome)| response_with_outcome(&record.response_body, outcome))
        .collect();
    sqlx::query(
        "WITH appended AS ( \
             INSERT INTO events (global_position, event_id, stream_id, stream_version, \
                                 event_type, schema_version, data, metadata) \
             SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], \
                                  $5::text[], $6::int[], $7::jsonb[], $8::jsonb[]) \
         ), remembered AS ( \
             INSERT INTO idempotency_keys (idempotency_key, request_hash, response_status, \
                                           response_body) \
             SELECT * FROM unnest($9::text[], $10::bytea[], $11::smallint[], $12::jsonb[]) \
         ) \
         SELECT pg_notify($13, $14) WHERE cardinality($1::bigint[]) > 0",
    )
    .bind(&columns.positions)
    .bind(&columns.event_ids)
    .bind(&columns.stream_ids)
    .bind(&columns.versions)
    .bind(&columns.types)
    .bind(&columns.schema_versions)
    .bind(&columns.data)
    .bind(&columns.metadata)
    .bind(&keys)
    .bind(&hashes)
    .bind(&statuses)
    .bind(&bodies)
    .bind(crate::APPENDED_CHANNEL)
    .bind(head.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The response body to store: the caller's object plus where the append landed.
pub fn response_with_outcome(
    body: &serde_json::Value,
    outcome: &AppendOutcome,
) -> serde_json::Value {
    let mut body = body.clone();
    if let Some(object) = body.as_object_mut() {
        object.insert("version".into(), outcome.stream_version.into());
        object.insert("position".into(), outcome.last_position.into());
    }
    body
}
