//! PostgreSQL bootstrap: create the database when missing, connect a pool, run migrations (or,
//! with `SKIP_MIGRATIONS`, wait until another process has applied them); and the options every
//! service connection carries (TLS choice, plan caching, its name, and the server-side limits
//! on a client that went silent or froze). A service that writes never reuses a pooled session
//! the server made read-only ([`Use::Writes`]).
//!
//! Several instances may start at once: a concurrent `CREATE DATABASE` is tolerated, and sqlx's
//! migrator takes an advisory lock. Every failure is one clear line naming the server and the
//! setting (`cannot reach PostgreSQL at 127.0.0.1:5432 (DATABASE_URL): connection refused`); the
//! URL itself, which may carry a password, is never printed.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::anyhow;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

use crate::config::{one_line, validate_database_url};

/// How long a request waits for a pooled connection before failing; short, so an overloaded or
/// unreachable database shows up as an error instead of a hung request.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the first connection at start may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// First pause between two tries to reach a server that is not up yet; it doubles per try.
const REACH_RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest pause between two such tries.
const REACH_RETRY_MAX: Duration = Duration::from_secs(2);
/// Maintenance database used to create the service's database.
pub const MAINTENANCE_DATABASE: &str = "postgres";

/// SQLSTATE `invalid_catalog_name`: the database does not exist.
const INVALID_CATALOG_NAME: &str = "3D000";
/// SQLSTATE `duplicate_database`: a concurrent starter created it first.
const DUPLICATE_DATABASE: &str = "42P04";
/// SQLSTATE `unique_violation`: the other way a concurrent `CREATE DATABASE` can lose the race.
const UNIQUE_VIOLATION: &str = "23505";
/// SQLSTATE `undefined_table`: no migration has ever run on the database.
const UNDEFINED_TABLE: &str = "42P01";

/// What a starting service does about the schema.
#[derive(Debug, Clone, Copy)]
pub enum Migrations {
    /// Nothing: the schema is someone else's business (tests of this crate, examples).
    Ignore,
    /// Runs the migrator: the default of every service, and `<binary> migrate`.
    Run(&'static sqlx::migrate::Migrator),
    /// Runs nothing, but starts only once every migration of the migrator is applied
    /// (`SKIP_MIGRATIONS`: a migrate job applies them, possibly while the service starts). A
    /// newer release's further migrations are fine, as with [`Migrations::Run`].
    AwaitApplied(&'static sqlx::migrate::Migrator),
}

impl Migrations {
    /// The choice of a service whose release's migrations are `migrator`: run them, or, when
    /// `skip` (`SKIP_MIGRATIONS`), wait for them.
    pub fn of(migrator: &'static sqlx::migrate::Migrator, skip: bool) -> Self {
        if skip {
            Self::AwaitApplied(migrator)
        } else {
            Self::Run(migrator)
        }
    }
}

/// What a service does with its pooled connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// It writes (command-service, projector): a pooled session the server made read-only
    /// (a fail-over onto a demoted primary or a standby while the address still leads there,
    /// `default_transaction_read_only`) is closed instead of handed out again, so the pool
    /// reconnects to wherever the address leads now. Otherwise the pool would keep such a
    /// session, which refuses every write (SQLSTATE 25006), until it reached its maximum
    /// lifetime (30 min). The check replaces sqlx's ping of a session on its way out of the
    /// pool, and runs only on one idle for a second or after a write was refused read-only
    /// (see `pool_of`): under load a session handed out costs no round trip.
    Writes,
    /// It only reads (query-service, read-only admin commands): a read-only server serves it.
    ReadsOnly,
}

/// How the server plans a service's prepared statements (sqlx prepares each once per pooled
/// connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planning {
    /// Every execution is planned for its parameters and the tables' current size
    /// ([`with_custom_plans`]): for services with statements whose right plan depends on the
    /// data (the projector's bookkeeping, the command service's reads).
    EveryExecution,
    /// The server's own choice: a statement whose generic plan costs no more than its custom
    /// ones keeps that plan cached ([`with_cached_index_plans`]), with sequential and bitmap
    /// scans ruled out, so a plan cached while the tables were small still walks an index once
    /// they are large. For a service every one of whose statements is meant to be index probes
    /// or ordered index scans (the query service).
    CachedIndexScans,
}

/// Connects a pool to `database_url`, creating the database if it does not exist, then runs
/// `migrator` when given; a pool for reads ([`Use::ReadsOnly`]). The connections name themselves `service` in `pg_stat_activity`
/// and the server log unless the URL or `PGAPPNAME` names them otherwise.
pub async fn connect(
    database_url: &str,
    service: &str,
    max_connections: u32,
    migrator: Option<&'static sqlx::migrate::Migrator>,
) -> anyhow::Result<PgPool> {
    connect_when_reachable(
        database_url,
        service,
        max_connections,
        migrator.map_or(Migrations::Ignore, Migrations::Run),
        Use::ReadsOnly,
        Planning::EveryExecution,
        Duration::ZERO,
    )
    .await
}

/// Like [`connect`], but first waits up to `wait` for a server that cannot be reached yet
/// (refused, unresolvable, still starting up), trying again with a growing pause and logging
/// each try: how a service started together with its database, or before it after a power cut,
/// comes up as soon as the database does instead of exiting and being restarted with a
/// growing back-off. Anything else (a rejected password, a bad URL) fails at once, and so does
/// a server still unreachable at the end of `wait`, with the same one line as [`connect`].
///
/// With [`Migrations::AwaitApplied`] the same `wait` (from the start, not once more) also
/// bounds the wait for the migrations, so that a service rolled out together with its migrate
/// job never runs on the schema of the release before it; if they are not applied by then, it
/// fails with one line naming `SKIP_MIGRATIONS`.
pub async fn connect_when_reachable(
    database_url: &str,
    service: &str,
    max_connections: u32,
    migrations: Migrations,
    use_: Use,
    planning: Planning,
    wait: Duration,
) -> anyhow::Result<PgPool> {
    let options = service_options(database_url, service)?;
    let deadline = tokio::time::Instant::now() + wait;
    let first = wait_until_reachable(&options, wait).await;
    pool_after(
        &options,
        first,
        max_connections,
        use_,
        planning,
        migrations,
        deadline,
    )
    .await
}

/// The rest of [`connect_when_reachable`] once `first`, the last try to reach the server, has
/// an answer: creates the database when it was missing, connects the pool, migrates (or waits
/// for the migrations until `deadline`).
///
/// The migrations run on a connection of their own that plans every execution, whatever the
/// pool's [`Planning`]: a data migration's `UPDATE … FROM` over a whole table must not be
/// planned as if only index scans existed.
async fn pool_after(
    options: &PgConnectOptions,
    first: Result<PgConnection, sqlx::Error>,
    max_connections: u32,
    use_: Use,
    planning: Planning,
    migrations: Migrations,
    deadline: tokio::time::Instant,
) -> anyhow::Result<PgPool> {
    ensure_database(options, first).await?;
    let pool = pool_of(
        &with_planning(options.clone(), planning),
        max_connections,
        use_,
    )
    .await?;
    match migrations {
        Migrations::Ignore => {}
        Migrations::Run(migrator) => {
            // A pool of one, closed once they ran: `Migrator::run` on a pool keeps the future
            // `Send` for every caller.
            let migrating = PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(with_custom_plans(options.clone()));
            let migrated = migrator.run(&migrating).await;
            migrating.close().await;
            migrated.map_err(|e| {
                anyhow!(
                    "cannot run database migrations on {} at {}: {}",
                    database_name(options),
                    server(options),
                    one_line(&e)
                )
            })?;
            tracing::info!(database = %database_name(options), "database migrations are up to date");
            warn_if_the_schema_is_newer(&pool, migrator, options).await;
        }
        Migrations::AwaitApplied(migrator) => {
            wait_until_migrated(&pool, migrator, options, deadline).await?;
            warn_if_the_schema_is_newer(&pool, migrator, options).await;
        }
    }
    Ok(pool)
}

/// Waits until every migration of `migrator` is applied to the database of `pool`, trying
/// again with a growing pause and logging each try, until `deadline`; then fails with one line
/// naming `SKIP_MIGRATIONS`. Versions applied beyond the migrator's (a newer release's) are
/// fine. Without this a service that skips migrations would start on whatever schema it finds,
/// and a new release's writes to columns its migrate job has not added yet would fail as if
/// the events were bad (a projector dead-letters them).
async fn wait_until_migrated(
    pool: &PgPool,
    migrator: &sqlx::migrate::Migrator,
    options: &PgConnectOptions,
    deadline: tokio::time::Instant,
) -> anyhow::Result<()> {
    let mut pause = REACH_RETRY_FIRST;
    loop {
        let missing = missing_migrations(pool, migrator).await.map_err(|e| {
            anyhow!(
                "cannot read the applied migrations of {} at {} (SKIP_MIGRATIONS): {}",
                database_name(options),
                server(options),
                describe_cause(&e)
            )
        })?;
        let Some(&first_missing) = missing.first() else {
            tracing::info!(
                database = %database_name(options),
                "this release's database migrations are applied (SKIP_MIGRATIONS)"
            );
            return Ok(());
        };
        if tokio::time::Instant::now() + pause >= deadline {
            return Err(anyhow!(
                "database {} at {} lacks {} of this release's migrations (first missing: {}); \
                 SKIP_MIGRATIONS is set, so they must be applied by `migrate` first",
                database_name(options),
                server(options),
                missing.len(),
                first_missing
            ));
        }
        tracing::warn!(
            database = %database_name(options),
            missing = missing.len(),
            first_missing,
            retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
            "the database lacks this release's migrations; waiting for `migrate` to apply them \
             (SKIP_MIGRATIONS, DB_CONNECT_WAIT_SECS)"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(REACH_RETRY_MAX);
    }
}

/// The versions of `migrator`'s migrations not (successfully) applied to the database of
/// `pool`, in order; all of them while the migrations table does not exist yet. A server that
/// cannot be used right now counts as "not yet", like a missing table: the wait goes on.
async fn missing_migrations(
    pool: &PgPool,
    migrator: &sqlx::migrate::Migrator,
) -> Result<Vec<i64>, sqlx::Error> {
    let wanted = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| m.version);
    // The table name is the migrator's own constant, never input.
    let sql = format!("SELECT version FROM {} WHERE success", migrator.table_name);
    let applied: Vec<i64> = match sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(pool).await {
        Ok(applied) => applied,
        Err(e) if sqlstate(&e).as_deref() == Some(UNDEFINED_TABLE) || is_unreachable(&e) => {
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    Ok(wanted.filter(|v| !applied.contains(v)).collect())
}

/// Says so when the database holds migrations this release does not have: a newer release
/// migrated it (a rollout is under way) or this one was rolled back to. The service runs on
/// that schema, which keeps the release before it working (`migrations/README.md`).
async fn warn_if_the_schema_is_newer(
    pool: &PgPool,
    migrator: &sqlx::migrate::Migrator,
    options: &PgConnectOptions,
) {
    let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Result<Option<i64>, sqlx::Error> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await;
    if let Ok(Some(applied)) = applied
        && applied > known
    {
        tracing::warn!(
            database = %database_name(options),
            newest_applied = applied,
            newest_of_this_release = known,
            "the database was migrated by a newer release than this one (a rollout or a \
             rollback is under way); running on its schema, which keeps this release working"
        );
    }
}

/// Connects to the server of `options` until it answers (a missing database is an answer:
/// [`ensure_database`] creates it), an error says waiting will not help, or `wait` is over;
/// returns the last try, whose connection the caller goes on with.
async fn wait_until_reachable(
    options: &PgConnectOptions,
    wait: Duration,
) -> Result<PgConnection, sqlx::Error> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = REACH_RETRY_FIRST;
    loop {
        match connect_once(options).await {
            Err(e) if is_unreachable(&e) && tokio::time::Instant::now() + pause < deadline => {
                tracing::warn!(
                    server = %server(options),
                    error = %describe_cause(&e),
                    retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                    "PostgreSQL cannot be reached yet (DATABASE_URL); waiting for it \
                     (DB_CONNECT_WAIT_SECS)"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(REACH_RETRY_MAX);
            }
            answer => return answer,
        }
    }
}

/// Connects a pool to `database_url` as it is: no database is created and no migration runs.
/// For commands that only read (`projector status`), where a mistyped URL must say so instead
/// of leaving an empty database behind.
pub async fn connect_existing(
    database_url: &str,
    service: &str,
    max_connections: u32,
) -> anyhow::Result<PgPool> {
    let options = with_planning(
        service_options(database_url, service)?,
        Planning::EveryExecution,
    );
    pool_of(&options, max_connections, Use::ReadsOnly).await
}

/// The options every service connection carries (see the module documentation), but for the
/// planner's, which are the pool's ([`with_planning`]).
fn service_options(database_url: &str, service: &str) -> anyhow::Result<PgConnectOptions> {
    Ok(with_application_name(
        with_dead_client_limits(without_loopback_tls(
            database_url,
            validate_database_url(database_url)?,
        )),
        service,
    ))
}

/// `options` with the planner settings of `planning`.
fn with_planning(options: PgConnectOptions, planning: Planning) -> PgConnectOptions {
    match planning {
        Planning::EveryExecution => with_custom_plans(options),
        Planning::CachedIndexScans => with_cached_index_plans(options),
    }
}

/// How long a writing pool's session must have sat idle before it is checked for being alive
/// and writable on its way out of the pool (see [`pool_of`]).
const READ_ONLY_CHECK_IDLE: Duration = Duration::from_secs(1);

/// How long after a write refused as read-only (25006), or a session found gone, the writing
/// pools check every session they hand out, busy or not.
const SESSION_RECHECK: Duration = Duration::from_secs(10);

/// When this process last saw a write refused as read-only or a session gone, in milliseconds
/// since [`process_epoch`] plus one (0: never).
static SESSIONS_IN_DOUBT_AT_MS: AtomicU64 = AtomicU64::new(0);

fn process_epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn note_sessions_in_doubt() {
    let now = u64::try_from(process_epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
    SESSIONS_IN_DOUBT_AT_MS.store(now.saturating_add(1), Ordering::Relaxed);
}

fn sessions_in_doubt_recently() -> bool {
    let seen = SESSIONS_IN_DOUBT_AT_MS.load(Ordering::Relaxed);
    seen != 0
        && u128::from(seen - 1) + SESSION_RECHECK.as_millis()
            > process_epoch().elapsed().as_millis()
}

async fn pool_of(
    options: &PgConnectOptions,
    max_connections: u32,
    use_: Use,
) -> anyhow::Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(ACQUIRE_TIMEOUT);
    let pool = match use_ {
        Use::ReadsOnly => pool,
        // The query answers what sqlx's ping would (is the session alive?) and whether the
        // session can write, in the same one round trip. A session handed back less than
        // `READ_ONLY_CHECK_IDLE` ago was writing a moment before and is handed out as it is:
        // under load that is every acquire, and the query would cost the server a statement per
        // group commit (measured: ~5% of the hot order's rate). Once a write was refused as
        // read-only ([`is_unavailable`] saw 25006) or a session was found gone (cut, or ended
        // by a server restart), every session is checked for a while, so a busy one the server
        // made read-only, or ended, is closed at its next acquire instead of failing a request.
        Use::Writes => pool
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for < READ_ONLY_CHECK_IDLE && !sessions_in_doubt_recently() {
                        return Ok(true);
                    }
                    let read_only: String = sqlx::query_scalar(
                        "SELECT pg_catalog.current_setting('transaction_read_only')",
                    )
                    .fetch_one(conn)
                    .await?;
                    if read_only == "on" {
                        tracing::info!(
                            "closing a pooled PostgreSQL session the server made read-only; the \
                             pool reconnects to wherever DATABASE_URL leads now"
                        );
                    }
                    Ok(read_only != "on")
                })
            }),
    };
    pool.connect_with(options.clone())
        .await
        .map_err(|e| describe(&e, options))
}

/// The `migrate` subcommand of every binary: waits up to `wait` for a server that cannot be
/// reached yet (a migration job started with its database), creates the database if missing,
/// runs `migrator` on one connection, and closes it. SIGTERM or Ctrl-C before the migrations
/// run ends it at once, successfully, as it ends a service; once they run, they finish (each
/// migration is a transaction of its own, so a kill would lose at most the one under way).
pub async fn migrate(
    database_url: &str,
    service: &str,
    migrator: &'static sqlx::migrate::Migrator,
    wait: Duration,
) -> anyhow::Result<()> {
    let stop = crate::shutdown::cancel_on_signal();
    let options = service_options(database_url, service)?;
    let Some(first) =
        crate::shutdown::unless_stopped(&stop, wait_until_reachable(&options, wait)).await
    else {
        tracing::info!("stopped before migrating");
        return Ok(());
    };
    let pool = pool_after(
        &options,
        first,
        1,
        Use::ReadsOnly,
        Planning::EveryExecution,
        Migrations::Run(migrator),
        tokio::time::Instant::now(),
    )
    .await?;
    pool.close().await;
    tracing::info!("migrations applied");
    Ok(())
}

/// Turns TLS off for a loopback server unless the URL (or `PGSSLMODE`) asks for a mode.
///
/// TLS on loopback protects nothing and costs CPU on both ends of every message (BENCHMARKS.md,
/// "PostgreSQL over TLS"). Remote servers keep sqlx's default (`prefer`). Over TLS a message
/// longer than one TLS record would also wait ~40 ms for the server's delayed ACK, were
/// `TCP_NODELAY` not set on every connection (sqlx 0.9.0 does not; `vendor/README.md`).
pub fn without_loopback_tls(database_url: &str, options: PgConnectOptions) -> PgConnectOptions {
    let mode_requested =
        database_url.contains("sslmode=") || std::env::var_os("PGSSLMODE").is_some();
    let host = options.get_host().trim_matches(|c| c == '[' || c == ']');
    let loopback = options.get_socket().is_some()
        || host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback && !mode_requested {
        options.ssl_mode(sqlx::postgres::PgSslMode::Disable)
    } else {
        options
    }
}

/// Makes the server plan every execution of a prepared statement for its actual parameters and
/// the tables' current size (`plan_cache_mode=force_custom_plan`).
///
/// sqlx prepares each statement once per pooled connection, and PostgreSQL switches a prepared
/// statement to one cached generic plan after five executions. Planned while the tables were
/// small, that plan stays: a bitmap scan of every `projection_streams` row of a projection
/// filtered for the batch's streams, a sequential scan of `customer_stats_orders`, a hash join
/// over all bookkeeping rows — each costing more as the tables grow, until an `ANALYZE`
/// invalidates it (measured in BENCHMARKS.md: the projector's statements went from well under a
/// millisecond to 5-26 ms, and the sweep query to over a second, within a minute of load on a
/// server without autovacuum). Planning is not free (the apply's mark statement takes ~0.2 ms
/// to plan and ~0.05 ms to run, BENCHMARKS.md), but a plan that fits the data is worth far more
/// than the planning it saves. The one exception is the append transaction
/// (`store::append_batch`), whose statements have one right plan at any table size and ask
/// for the cached one themselves, with sequential scans ruled out (`SET LOCAL`); and the query
/// service, whose connections use [`with_cached_index_plans`].
pub fn with_custom_plans(options: PgConnectOptions) -> PgConnectOptions {
    options.options([("plan_cache_mode", "force_custom_plan")])
}

/// Lets the server keep a statement's generic plan when it costs no more than planning each
/// execution would give (`plan_cache_mode=auto`, PostgreSQL's default: after five custom
/// plans, as long as the generic one is not estimated dearer), and rules out the plans that
/// only suit small tables: sequential scans and bitmap scans (`enable_seqscan=off`,
/// `enable_bitmapscan=off`, which make the planner take an index wherever one serves the
/// query, and fall back to a scan only where none does). And `jit=off`: a plan that keeps a
/// ruled-out scan (reading a whole table of a few rows, which no index serves) carries its
/// penalty in its estimated cost, far past the threshold at which the server would compile the
/// query to machine code first, milliseconds for a read of microseconds.
///
/// For a service whose statements are all meant to be index probes and ordered index scans,
/// whatever the tables' size: the query service. Its read of one order is four index probes
/// that cost about 0.38 ms planned at every execution and 0.05 ms on the cached plan
/// (BENCHMARKS.md); planned per execution, the planning was more than half of what PostgreSQL
/// spent on the query service. A generic
/// plan cached while the tables were empty, or held a few rows, would otherwise be free to
/// scan them, and would go on scanning once they hold millions of rows until an `ANALYZE`.
pub fn with_cached_index_plans(options: PgConnectOptions) -> PgConnectOptions {
    options.options([
        ("plan_cache_mode", "auto"),
        ("enable_seqscan", "off"),
        ("enable_bitmapscan", "off"),
        ("jit", "off"),
    ])
}

/// How long the server lets a session sit idle inside a transaction before ending it
/// (`idle_in_transaction_session_timeout`). No service transaction waits on anything but its
/// own next statement, so an idle one belongs to a process that froze (paused, starved,
/// stuck); ending it releases what it holds, above all the store's append lock, which every
/// command-service instance waits on.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle time before the server probes a client (`tcp_keepalives_idle`).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Time between two unanswered probes (`tcp_keepalives_interval`).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes after which the server ends the session (`tcp_keepalives_count`).
pub const KEEPALIVE_COUNT: u32 = 3;
/// How long data the server sent may stay unacknowledged before it ends the session
/// (`tcp_user_timeout`): the case keepalives do not cover, a client that died while the server
/// was answering it.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Makes the server end a session whose client is gone or frozen within seconds rather than
/// hours, unless the URL's `options` set the same parameter (the URL wins).
///
/// A client host that dies or is cut off sends nothing more, and PostgreSQL, left to the
/// operating system's defaults, notices after about two hours of TCP keepalive. Until then its
/// session keeps its locks: an append in flight keeps the store's append lock and stops every
/// command-service instance, and a relay leader keeps the leadership lock, so no standby
/// publishes. With these limits the server ends such a session after
/// `KEEPALIVE_IDLE + KEEPALIVE_COUNT × KEEPALIVE_INTERVAL` (25 s) of silence, after
/// `TCP_USER_TIMEOUT` when its last answer was never acknowledged, and after
/// `IDLE_IN_TRANSACTION_TIMEOUT` when the process is alive but its transaction stopped moving.
/// The TCP settings do nothing over a Unix socket, where a dead client closes the socket.
pub fn with_dead_client_limits(options: PgConnectOptions) -> PgConnectOptions {
    let limits = [
        (
            "idle_in_transaction_session_timeout",
            IDLE_IN_TRANSACTION_TIMEOUT.as_millis().to_string(),
        ),
        ("tcp_keepalives_idle", KEEPALIVE_IDLE.as_secs().to_string()),
        (
            "tcp_keepalives_interval",
            KEEPALIVE_INTERVAL.as_secs().to_string(),
        ),
        ("tcp_keepalives_count", KEEPALIVE_COUNT.to_string()),
        ("tcp_user_timeout", TCP_USER_TIMEOUT.as_millis().to_string()),
    ];
    let from_url = options.get_options().unwrap_or_default().to_owned();
    let missing: Vec<_> = limits
        .into_iter()
        .filter(|(name, _)| !from_url.contains(&format!("{name}=")))
        .collect();
    options.options(missing)
}

/// Names the connections `service` (`application_name`) unless the URL or `PGAPPNAME` already
/// does, so an operator looking at `pg_stat_activity`, a lock wait or a slow-query log line can
/// tell which service holds the connection.
pub fn with_application_name(options: PgConnectOptions, service: &str) -> PgConnectOptions {
    if options.get_application_name().is_some() {
        options
    } else {
        options.application_name(service)
    }
}

/// Creates the database named in `options` when `first`, a try to connect to it, says it does
/// not exist.
async fn ensure_database(
    options: &PgConnectOptions,
    first: Result<PgConnection, sqlx::Error>,
) -> anyhow::Result<()> {
    match first {
        Ok(conn) => {
            // Closing politely is best effort; the connection is dropped either way.
            let _ = conn.close().await;
            Ok(())
        }
        Err(e) if sqlstate(&e).as_deref() == Some(INVALID_CATALOG_NAME) => {
            create_database(options).await
        }
        Err(e) => Err(describe(&e, options)),
    }
}

async fn connect_once(options: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(io::Error::from(io::ErrorKind::TimedOut))),
    }
}

async fn create_database(options: &PgConnectOptions) -> anyhow::Result<()> {
    let name = database_name(options);
    let admin = options.clone().database(MAINTENANCE_DATABASE);
    let mut conn = connect_once(&admin)
        .await
        .map_err(|e| describe(&e, &admin))?;
    // Identifiers cannot be bound as parameters; quoting with doubled quotes makes any name safe.
    let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    let result = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await;
    let _ = conn.close().await;
    match result {
        Ok(_) => {
            tracing::info!(database = %name, "created the database");
            Ok(())
        }
        Err(e)
            if matches!(
                sqlstate(&e).as_deref(),
                Some(DUPLICATE_DATABASE | UNIQUE_VIOLATION)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(anyhow!(
            "cannot create database {name} on PostgreSQL at {}: {}",
            server(options),
            describe_cause(&e)
        )),
    }
}

/// Whether `e` says the database cannot be used right now (unreachable, restarting, shutting
/// down, out of connections or resources, refusing writes for now, or the connection broke),
/// rather than that the statement or its data are wrong: the first is worth a retry (a 503, a
/// paused projection), the second is a bug or a poison event (a 500, a dead letter).
///
/// A service that has been running also waits out a server that answers but turns this client
/// away for now: its database is gone (`invalid_catalog_name`, 3D000: dropped, or being
/// restored) or its login is refused (28000, 28P01: credentials rotated or revoked). Nothing is
/// wrong with the work, and an operator puts it right. At start the same answers are a
/// configuration mistake to report at once ([`is_unreachable`]).
///
/// Seeing a write refused as read-only (25006), or a session gone, also makes this process's
/// writing pools check every session they hand out for a while (`SESSION_RECHECK`), so the
/// one refused is closed instead of handed out again, and the others a restarted server ended
/// are found before a request meets them.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    let code = sqlstate(e);
    if code.as_deref() == Some("25006") || is_session_lost(e, code.as_deref()) {
        // The writing pools then check the sessions they hand out (see `pool_of`): the other
        // sessions of the pool are likely refused, or cut, the same way.
        note_sessions_in_doubt();
    }
    is_unreachable(e) || matches!(code.as_deref(), Some("3D000" | "28000" | "28P01"))
}

/// Whether `e` says the session it was sent on is gone: cut (an I/O error, a protocol out of
/// step) or ended by the server (an admin shutdown, a crash, a restart: 57P01..57P03, class
/// 08). After a server restart every pooled session is gone alike, and one that was busy a
/// moment before is handed out unchecked; seeing one gone makes the writing pools check them
/// all for a while, so each failed session costs one request, not one per session.
fn is_session_lost(e: &sqlx::Error, code: Option<&str>) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(_) => code.is_some_and(|code| {
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// [`is_unavailable`] without the answers that turn this client away (a missing database, a
/// refused login): what a starting service waits for, since a server still coming up (or out of connections) will
/// serve it soon, while a missing database is created and a refused login is a mistake.
pub fn is_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        // A connection cut mid-message leaves the protocol out of step.
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(_) => sqlstate(e).is_some_and(|code| unavailable_sqlstate(&code)),
        _ => false,
    }
}

/// SQLSTATEs of a server that cannot serve now: connection exceptions (class 08), insufficient
/// resources such as too many connections or a full disk (53), operator intervention such as
/// an admin shutdown, a crash of another backend or a server still starting (57P01..57P05),
/// system errors such as an I/O error (58), a server that refuses writes for now
/// (`read_only_sql_transaction`, 25006: a fail-over left the address on a standby or a demoted
/// primary, or writes were frozen) and a session the server ended for sitting idle in a
/// transaction (`idle_in_transaction_session_timeout`, 25P03, which this module turns on: the
/// process froze, and the work is worth doing again).
fn unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("58")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "57P04" | "57P05" | "25006" | "25P03"
        )
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|db| db.code())
        .map(|c| c.into_owned())
}

/// The database name the options point at; Postgres defaults it to the user name.
fn database_name(options: &PgConnectOptions) -> String {
    options
        .get_database()
        .unwrap_or_else(|| options.get_username())
        .to_owned()
}

/// `host:port` or the socket path, for messages.
pub(crate) fn server(options: &PgConnectOptions) -> String {
    match options.get_socket() {
        Some(path) => path.display().to_string(),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    }
}

/// One line describing a connection failure, naming the server and the setting.
fn describe(e: &sqlx::Error, options: &PgConnectOptions) -> anyhow::Error {
    let at = server(options);
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => {
            anyhow!(
                "cannot reach PostgreSQL at {at} (DATABASE_URL): {}",
                describe_cause(e)
            )
        }
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("28P01" | "28000")) => {
            anyhow!(
                "PostgreSQL at {at} rejected user {} (DATABASE_URL): {}",
                options.get_username(),
                one_line(&db.message())
            )
        }
        _ => anyhow!(
            "cannot connect to PostgreSQL at {at} (DATABASE_URL): {}",
            describe_cause(e)
        ),
    }
}

/// A short lower-case cause: `connection refused`, `timed out`, or the server's message.
pub(crate) fn describe_cause(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Io(io) => describe_io(io),
        sqlx::Error::PoolTimedOut => "timed out".to_owned(),
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", one_line(&db.message())),
            None => one_line(&db.message()),
        },
        other => one_line(other),
    }
}

/// The fixed phrase of an I/O failure of a kind that says something of the server or the
/// network, `None` for the others: shared by start-up messages ([`describe_io`]) and the
/// readiness checks, which show nothing else.
pub(crate) fn io_kind_phrase(e: &io::Error) -> Option<&'static str> {
    use io::ErrorKind as K;
    Some(match e.kind() {
        K::ConnectionRefused => "connection refused",
        K::TimedOut => "timed out",
        K::ConnectionReset => "connection reset",
        K::ConnectionAborted => "connection aborted",
        K::HostUnreachable => "host unreachable",
        K::NetworkUnreachable => "network unreachable",
        K::AddrNotAvailable => "address not available",
        _ => return None,
    })
}

/// `connection refused` rather than `Connection refused (os error 111)`.
pub(crate) fn describe_io(e: &io::Error) -> String {
    match io_kind_phrase(e) {
        Some(phrase) => phrase.to_owned(),
        None => {
            let text = one_line(e);
            let text = match text.find(" (os error") {
                Some(i) => text[..i].to_owned(),
                None => text,
            };
            let mut chars = text.chars();
            match chars.next() {
                Some(first) => first.to_lowercase().chain(chars).collect(),
                None => "unknown i/o error".to_owned(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::postgres::PgSslMode;
    use std::str::FromStr;

    fn mode(url: &str) -> PgSslMode {
        let options = PgConnectOptions::from_str(url).expect("url parses");
        without_loopback_tls(url, options).get_ssl_mode()
    }

    #[test]
    fn a_broken_connection_is_unavailability_and_a_wrong_statement_is_not() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(is_unavailable(&sqlx::Error::Io(refused)));
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(is_unavailable(&sqlx::Error::Protocol(
            "unexpected EOF".into()
        )));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        assert!(!is_unavailable(&sqlx::Error::ColumnNotFound(
            "total".into()
        )));
        for code in [
            "08006", "53300", "57P01", "57P03", "58030", "25006", "25P03",
        ] {
            assert!(unavailable_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "22P02", "40001", "57014", "25001"] {
            assert!(!unavailable_sqlstate(code), "{code}");
        }
    }

    #[test]
    fn loopback_servers_skip_tls_unless_a_mode_is_asked_for() {
        if std::env::var_os("PGSSLMODE").is_some() {
            return; // The environment decides; nothing to check here.
        }
        assert!(matches!(
            mode("postgres://postgres@127.0.0.1:5432/orders"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://postgres@localhost/orders"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://postgres@[::1]:5432/orders"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://postgres@127.0.0.1/orders?sslmode=require"),
            PgSslMode::Require
        ));
        assert!(matches!(
            mode("postgres://postgres@db.internal/orders"),
            PgSslMode::Prefer
        ));
    }
}
