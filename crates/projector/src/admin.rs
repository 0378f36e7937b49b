//! The admin subcommands' logic: `dlq list|show|replay|purge` and `rebuild`. (`verify` lives in
//! [`crate::verify`].) Each returns data and a rendering; `main` only prints and picks the exit
//! code, so tests call the same functions the binary runs.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bus::{DeadLetter, DeadLetterQueue};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use sqlx::{Connection, PgPool};

use crate::apply::{Resume, apply_isolating, park_stream, resume_stream};
use crate::metrics;
use crate::projections::ProjectionKind;
use crate::sweeper::{DeadLetters, POSITION_CHANNEL, entry_of, position_payload};

/// Most dead letters one `dlq` command looks at; run it again for more.
pub const DLQ_PAGE: usize = 1_000;
/// Longest error text in the `dlq list` table.
const ERROR_COLUMN_WIDTH: usize = 80;

fn field<'a>(letter: &'a DeadLetter, name: &str) -> &'a str {
    letter.original.get(name).map(String::as_str).unwrap_or("")
}

/// The dead letters a command applies to: one (`--id`) or the first [`DLQ_PAGE`].
pub async fn select(
    dlq: &DeadLetterQueue,
    group: &str,
    id: Option<&str>,
) -> anyhow::Result<Vec<DeadLetter>> {
    match id {
        Some(id) => {
            let letter = dlq.get(group, id).await.context("read the dead letter")?;
            letter
                .map(|l| vec![l])
                .ok_or_else(|| anyhow!("no dead letter {id} in group {group}"))
        }
        None => dlq
            .list(group, DLQ_PAGE)
            .await
            .context("read the dead letters"),
    }
}

/// `dlq list`: a table of id, position, stream, version, type, attempts, error, failed_at.
pub fn render_list(letters: &[DeadLetter]) -> String {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header([
            "id",
            "position",
            "stream",
            "version",
            "type",
            "attempts",
            "error",
            "failed_at",
        ]);
    for l in letters {
        let mut error = l.error.clone();
        if error.chars().count() > ERROR_COLUMN_WIDTH {
            error = error
                .chars()
                .take(ERROR_COLUMN_WIDTH - 1)
                .collect::<String>()
                + "…";
        }
        table.add_row([
            l.id.clone(),
            field(l, "position").to_owned(),
            field(l, "stream_id").to_owned(),
            field(l, "stream_version").to_owned(),
            field(l, "event_type").to_owned(),
            l.attempts.to_string(),
            error,
            l.failed_at.clone(),
        ]);
    }
    format!("{table}\n{} dead letter(s)\n", letters.len())
}

/// `dlq show`: one dead letter as pretty JSON (`data` and `metadata` as JSON, not text).
pub fn render_show(letter: &DeadLetter) -> String {
    let mut original = serde_json::Map::new();
    for (k, v) in &letter.original {
        let value = if k == "data" || k == "metadata" {
            serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.clone()))
        } else {
            serde_json::Value::String(v.clone())
        };
        original.insert(k.clone(), value);
    }
    let json = serde_json::json!({
        "id": letter.id,
        "original_id": letter.original_id,
        "error": letter.error,
        "attempts": letter.attempts,
        "failed_at": letter.failed_at,
        "consumer": letter.consumer,
        "event": original,
    });
    serde_json::to_string_pretty(&json).unwrap_or_default() + "\n"
}

/// What happened to one dead letter in `replay` or `purge`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The dead letter's id.
    pub id: String,
    /// Whether it was resolved (and deleted from the dead-letter stream).
    pub ok: bool,
    /// What happened, for the operator.
    pub message: String,
}

async fn stream_of(pool: &PgPool, letter: &DeadLetter) -> Result<(String, i64), String> {
    let Some(position) = field(letter, "position").parse::<i64>().ok() else {
        return Err("its position cannot be parsed, so it cannot be replayed; purge it".into());
    };
    let row: Option<(String, i64)> =
        sqlx::query_as("SELECT stream_id, stream_version FROM events WHERE global_position = $1")
            .bind(position)
            .fetch_optional(pool)
            .await
            .map_err(|e| format!("cannot read the event store: {e}"))?;
    row.ok_or_else(|| format!("position {position} is not in the event store"))
}

/// `dlq replay`: for each dead letter, un-park its stream and apply that event and the rest of
/// the stream up to its head from the *event store*; on success delete the dead letter.
pub async fn replay(
    pool: &PgPool,
    dlq: &DeadLetterQueue,
    projection: ProjectionKind,
    letters: &[DeadLetter],
) -> anyhow::Result<Vec<Resolution>> {
    let mut out = Vec::with_capacity(letters.len());
    for letter in letters {
        let id = letter.id.clone();
        let (stream, _) = match stream_of(pool, letter).await {
            Ok(found) => found,
            Err(message) => {
                out.push(Resolution {
                    id,
                    ok: false,
                    message,
                });
                continue;
            }
        };
        let mut conn = pool.acquire().await.context("connect to Postgres")?;
        match resume_stream(&mut conn, projection, &stream, Resume::Replay).await {
            Ok(done) => {
                dlq.delete(projection.name(), &[&id])
                    .await
                    .context("delete the replayed dead letter")?;
                out.push(Resolution {
                    id,
                    ok: true,
                    message: format!(
                        "replayed: applied {} event(s) of {stream}, now at version {}",
                        done.applied, done.version
                    ),
                });
            }
            Err(failure) => out.push(Resolution {
                id,
                ok: false,
                message: format!("replay of {stream} failed, left in place: {failure}"),
            }),
        }
    }
    Ok(out)
}

/// `dlq purge`: delete dead letters and skip their events **for good**: the stream's version is
/// moved past the event without applying it, the stream is un-parked and the rest of it caught
/// up from the event store. The read model then differs from a fold of the event store for that
/// order (`verify` reports it) until a `rebuild`, which applies the event again (and parks the
/// stream again if it still fails).
pub async fn purge(
    pool: &PgPool,
    dlq: &DeadLetterQueue,
    projection: ProjectionKind,
    letters: &[DeadLetter],
) -> anyhow::Result<Vec<Resolution>> {
    let mut out = Vec::with_capacity(letters.len());
    for letter in letters {
        let id = letter.id.clone();
        let message = match stream_of(pool, letter).await {
            Err(_) => match letter.original.get("stream_id") {
                // Undecodable, but it parked its stream: un-park it and catch the stream up
                // from the event store, which holds the real events.
                Some(stream) => {
                    let mut conn = pool.acquire().await.context("connect to Postgres")?;
                    match resume_stream(&mut conn, projection, stream, Resume::Replay).await {
                        Ok(done) => format!(
                            "deleted; un-parked {stream} and applied {} event(s) from the store",
                            done.applied
                        ),
                        Err(failure) => {
                            out.push(Resolution {
                                id,
                                ok: false,
                                message: format!(
                                    "un-parking {stream} failed, left in place: {failure}"
                                ),
                            });
                            continue;
                        }
                    }
                }
                None => "deleted (it named no event of the store)".to_owned(),
            },
            Ok((stream, version)) => {
                let mut conn = pool.acquire().await.context("connect to Postgres")?;
                match resume_stream(&mut conn, projection, &stream, Resume::SkipThrough(version))
                    .await
                {
                    Ok(done) => match done.parked_again {
                        None => format!(
                            "skipped version {version} of {stream}; applied {} later event(s)",
                            done.applied
                        ),
                        Some(error) => format!(
                            "skipped version {version} of {stream}; the next event failed too and \
                             the stream is parked again: {error}"
                        ),
                    },
                    Err(failure) => {
                        out.push(Resolution {
                            id,
                            ok: false,
                            message: format!("purge of {stream} failed, left in place: {failure}"),
                        });
                        continue;
                    }
                }
            }
        };
        dlq.delete(projection.name(), &[&id])
            .await
            .context("delete the dead letter")?;
        out.push(Resolution {
            id,
            ok: true,
            message,
        });
    }
    Ok(out)
}

/// One line per resolution.
pub fn render_resolutions(verb: &str, resolutions: &[Resolution]) -> String {
    let mut out = String::new();
    for r in resolutions {
        let status = if r.ok { "ok" } else { "FAILED" };
        out.push_str(&format!("{verb} {}: {status}: {}\n", r.id, r.message));
    }
    if resolutions.is_empty() {
        out.push_str("no dead letters\n");
    }
    out
}

/// What a rebuild did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildOutcome {
    /// Events folded.
    pub events: u64,
    /// The checkpoint afterwards (the head when the rebuild started).
    pub position: i64,
    /// Streams parked because an event failed.
    pub parked: usize,
    /// Wall time.
    pub elapsed: Duration,
}

/// `rebuild`: in ONE transaction holding the projection's exclusive advisory lock (live
/// consumers and the sweeper wait), reset the projection's tables, its `projection_streams`
/// rows and its checkpoint, fold the whole event store up to the head through the batched
/// engine, and set the checkpoint to the head. Readers keep seeing the old read model until the
/// commit; a failed rebuild changes nothing. Events appended meanwhile are applied by the
/// consumers once the lock is released.
pub async fn rebuild(
    pool: &PgPool,
    projection: ProjectionKind,
    batch_size: i64,
    dead_letters: Option<&DeadLetters>,
) -> anyhow::Result<RebuildOutcome> {
    let started = Instant::now();
    let mut conn = pool.acquire().await.context("connect to Postgres")?;
    let mut tx = conn.begin().await.context("begin the rebuild")?;
    // The services' limit on an idle transaction (`platform::db::IDLE_IN_TRANSACTION_TIMEOUT`)
    // is for processes that froze; this one may wait on Redis while it dead-letters, and an
    // operator watches it. A host that dies is still found by the keepalives.
    sqlx::query("SET LOCAL idle_in_transaction_session_timeout = 0")
        .execute(&mut *tx)
        .await
        .context("lift the idle-transaction limit for the rebuild")?;
    tracing::info!(projection = %projection, "waiting for the projection's exclusive lock");
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(projection.lock_key())
        .execute(&mut *tx)
        .await
        .context("take the projection's exclusive lock")?;
    projection
        .reset(&mut tx)
        .await
        .context("reset the read model")?;
    sqlx::query("DELETE FROM projection_streams WHERE projection = $1")
        .bind(projection.name())
        .execute(&mut *tx)
        .await
        .context("reset the stream versions")?;
    let head = store::head_position(&mut *tx)
        .await
        .context("read the head")?;
    let progress = Progress::new(head);
    let mut outcome = RebuildOutcome::default();
    let mut after = 0;
    while after < head {
        let mut events = store::read_all(&mut *tx, after, batch_size)
            .await
            .context("read the event store")?;
        events.retain(|e| e.global_position <= head);
        let Some(last) = events.last().map(|e| e.global_position) else {
            break;
        };
        let (_, poisoned) = apply_isolating(&mut tx, projection, &events)
            .await
            .map_err(|f| anyhow!("apply events after position {after}: {f}"))?;
        for p in &poisoned {
            if let (Some(dl), Some(event)) = (
                dead_letters,
                events
                    .iter()
                    .find(|e| e.stream_id == p.stream_id && e.stream_version == p.version),
            ) {
                dl.queue
                    .dead_letter(
                        projection.name(),
                        &entry_of(event),
                        &p.error,
                        1,
                        &dl.consumer,
                    )
                    .await
                    .context("dead-letter a failing event")?;
                metrics::record_dead_letter(projection);
            }
            park_stream(&mut tx, projection, &p.stream_id, &p.error)
                .await
                .map_err(|f| anyhow!("park {}: {f}", p.stream_id))?;
            outcome.parked += 1;
        }
        outcome.events += events.len() as u64;
        ::metrics::counter!(metrics::REBUILD_EVENTS, "projection" => projection.name())
            .increment(events.len() as u64);
        after = last;
        progress.update(after, outcome.events);
    }
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, position) VALUES ($1, $2) \
         ON CONFLICT (projection) DO UPDATE SET position = $2, updated_at = now()",
    )
    .bind(projection.name())
    .bind(head)
    .execute(&mut *tx)
    .await
    .context("set the checkpoint")?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(POSITION_CHANNEL)
        .bind(position_payload(projection, head))
        .execute(&mut *tx)
        .await
        .context("announce the checkpoint")?;
    tx.commit().await.context("commit the rebuild")?;
    progress.finish();
    outcome.position = head;
    outcome.elapsed = started.elapsed();
    if outcome.parked > 0 {
        tracing::warn!(
            parked = outcome.parked,
            "some streams failed during the rebuild and are parked; see `projector dlq list`"
        );
    }
    Ok(outcome)
}

/// A progress bar on a terminal, periodic log lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    head: i64,
    started: Instant,
    last_log: std::cell::Cell<Instant>,
}

/// How often the non-terminal progress is logged.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    fn new(head: i64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(head.max(0) as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} events {per_sec} ETA {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Self {
            bar,
            head,
            started: Instant::now(),
            last_log: std::cell::Cell::new(Instant::now()),
        }
    }

    fn update(&self, position: i64, events: u64) {
        let fraction = if self.head > 0 {
            position as f64 / self.head as f64
        } else {
            1.0
        };
        ::metrics::gauge!(metrics::REBUILD_PROGRESS).set(fraction);
        if let Some(bar) = &self.bar {
            bar.set_position(position.max(0) as u64);
        } else if self.last_log.get().elapsed() >= PROGRESS_LOG_EVERY {
            self.last_log.set(Instant::now());
            let rate = events as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                position,
                head = self.head,
                events_per_sec = rate as u64,
                percent = (fraction * 100.0) as u64,
                "rebuilding"
            );
        }
    }

    fn finish(&self) {
        ::metrics::gauge!(metrics::REBUILD_PROGRESS).set(1.0);
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Checks that `group` names a projection.
pub fn projection_of_group(group: &str) -> anyhow::Result<ProjectionKind> {
    match ProjectionKind::from_name(group) {
        Some(p) => Ok(p),
        None => bail!(
            "unknown group {group:?}: expected one of {}",
            ProjectionKind::ALL.map(|p| p.name()).join(", ")
        ),
    }
}
