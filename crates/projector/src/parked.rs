//! Parked streams seen from PostgreSQL, where the park is recorded: `dlq parked` lists them,
//! a page at a time, with the event holding each one back and how many dead letters name it;
//! `dlq replay|purge --stream` resolves one whether or not a dead letter names its event; and
//! `dlq replay` (all) replays every one still parked once the letters are done.
//!
//! A stream can be parked with no letter: a rebuild that stopped between its commit and
//! writing its letters, or that failed on more events than it dead-letters, a sweeper that gave
//! up on an event while Redis refused its letter, a purge whose catch-up failed on a later
//! event (that event parks the stream again, and no consumer ever dead-letters it), or letters
//! deleted by hand. A walk over
//! the dead letters alone never finds those; the `projection_streams` rows always do.
//!
//! Must never skip an event other than the one the stream is parked at, nor delete a letter
//! whose event is not applied (or skipped) once it has run.

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use bus::{DeadLetter, DeadLetterQueue};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use sqlx::PgPool;

use crate::admin::{
    DLQ_PAGE, LetterPages, Resolution, Resolve, Resolved, named_event, resolved_version,
};
use crate::apply::{Skip, resume_stream, skip_parked};
use crate::projections::ProjectionKind;

/// Most parked streams `dlq parked` lists, oldest held-back event first.
pub const PARKED_PAGE: i64 = 1_000;

/// One stream held back: where it stands and the event it waits on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedStream {
    /// The stream, `order-<uuid>`.
    pub stream_id: String,
    /// Its last applied (or skipped) version.
    pub version: i64,
    /// The version holding it back.
    pub parked_version: i64,
    /// Why that version failed, as recorded when the stream was parked.
    pub error: Option<String>,
    /// The event at `parked_version`, if the store holds it: (position, event id, type). A
    /// store restored from before the event was written holds none.
    pub event: Option<(i64, uuid::Uuid, String)>,
    /// Dead letters naming that event (or, when the store does not hold it, naming another
    /// event of the stream: letters from before a restore of the database).
    pub letters: usize,
}

/// The parked streams of `projection` (the first [`PARKED_PAGE`], oldest held-back event
/// first) and the number of parked streams in all.
pub async fn list(
    pool: &PgPool,
    dlq: &DeadLetterQueue,
    projection: ProjectionKind,
) -> anyhow::Result<(Vec<ParkedStream>, i64)> {
    let page = list_page(pool, dlq, projection, None, PARKED_PAGE).await?;
    Ok((page.streams, page.total))
}

/// One page of `dlq parked`.
#[derive(Debug)]
pub struct ParkedPage {
    /// Oldest held-back event first; the streams whose held-back event the store does not
    /// hold (after a restore of the database) last.
    pub streams: Vec<ParkedStream>,
    /// Parked streams in all.
    pub total: i64,
    /// More follow this page.
    pub more: bool,
}

impl ParkedPage {
    /// The position to pass as `--after-position` for the next page: the last stream's
    /// held-back event's, when more follow and the store holds it.
    pub fn next_after(&self) -> Option<i64> {
        self.more
            .then(|| {
                self.streams
                    .last()?
                    .event
                    .as_ref()
                    .map(|(position, _, _)| *position)
            })
            .flatten()
    }
}

/// The parked streams of `projection` whose held-back event lies after position `after` (from
/// the first when `None`), at most `page` of them, oldest held-back event first. Those whose
/// held-back event the store does not hold come after all others, on the last page.
pub async fn list_page(
    pool: &PgPool,
    dlq: &DeadLetterQueue,
    projection: ProjectionKind,
    after: Option<i64>,
    page: i64,
) -> anyhow::Result<ParkedPage> {
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM projection_streams \
         WHERE projection = $1 AND parked_version IS NOT NULL",
    )
    .bind(projection.name())
    .fetch_one(pool)
    .await
    .context("count the parked streams")?;
    // One row more than the page tells whether another page follows.
    let mut rows: Vec<ParkedRow> = sqlx::query_as(
        "SELECT p.stream_id, p.version, p.parked_version, p.parked_error, \
                e.global_position, e.event_id, e.event_type \
         FROM projection_streams p \
         LEFT JOIN events e \
                ON e.stream_id = p.stream_id AND e.stream_version = p.parked_version \
         WHERE p.projection = $1 AND p.parked_version IS NOT NULL \
           AND COALESCE(e.global_position, 9223372036854775807) > $3 \
         ORDER BY e.global_position NULLS LAST, p.stream_id \
         LIMIT $2 + 1",
    )
    .bind(projection.name())
    .bind(page.max(1))
    .bind(after.unwrap_or(0))
    .fetch_all(pool)
    .await
    .context("read the parked streams")?;
    let more = rows.len() as i64 > page.max(1);
    rows.truncate(usize::try_from(page.max(1)).unwrap_or(usize::MAX));
    let mut parked: Vec<ParkedStream> = rows.into_iter().map(ParkedRow::into_parked).collect();
    if parked.is_empty() {
        return Ok(ParkedPage {
            streams: parked,
            total,
            more,
        });
    }
    // Which listed stream each letter speaks for, so the walk over the letters costs one
    // lookup per letter: by the held-back event's id, or, when the store does not hold that
    // event (a letter from before a restore of the database), by the stream it names. A letter
    // that names no event (an entry that could not be decoded) speaks for no stream: such an
    // entry never parks one.
    let mut by_event: HashMap<String, usize> = HashMap::new();
    let mut by_stream: HashMap<String, usize> = HashMap::new();
    for (i, p) in parked.iter().enumerate() {
        match &p.event {
            Some((_, id, _)) => by_event.insert(id.to_string(), i),
            None => by_stream.insert(p.stream_id.clone(), i),
        };
    }
    let mut pages = LetterPages::new(dlq, projection.name()).await?;
    while let Some(letters) = pages.next(DLQ_PAGE).await? {
        for letter in &letters {
            let field = |name: &str| letter.original.get(name);
            if named_event(letter).is_none() {
                continue;
            }
            let speaks_for = field("event_id")
                .and_then(|id| by_event.get(id))
                .or_else(|| field("stream_id").and_then(|stream| by_stream.get(stream)));
            if let Some(&i) = speaks_for {
                parked[i].letters += 1;
            }
        }
    }
    Ok(ParkedPage {
        streams: parked,
        total,
        more,
    })
}

/// One row of the parked-streams query.
#[derive(sqlx::FromRow)]
struct ParkedRow {
    stream_id: String,
    version: i64,
    parked_version: i64,
    parked_error: Option<String>,
    global_position: Option<i64>,
    event_id: Option<uuid::Uuid>,
    event_type: Option<String>,
}

impl ParkedRow {
    fn into_parked(self) -> ParkedStream {
        let event = match (self.global_position, self.event_id, self.event_type) {
            (Some(position), Some(id), Some(event_type)) => Some((position, id, event_type)),
            _ => None,
        };
        ParkedStream {
            stream_id: self.stream_id,
            version: self.version,
            parked_version: self.parked_version,
            error: self.parked_error,
            event,
            letters: 0,
        }
    }
}

/// `dlq parked`: a table of stream, applied version, parked version, position, type, letters
/// and error, and a line saying how many there are in all and how to ask for the next page.
pub fn render(page: &ParkedPage) -> String {
    let (parked, total) = (&page.streams, page.total);
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header([
            "stream", "applied", "parked", "position", "type", "letters", "error",
        ]);
    for p in parked {
        let (position, event_type) = match &p.event {
            Some((position, _, event_type)) => (position.to_string(), event_type.clone()),
            None => ("-".to_owned(), "(not in the store)".to_owned()),
        };
        table.add_row([
            p.stream_id.clone(),
            p.version.to_string(),
            p.parked_version.to_string(),
            position,
            event_type,
            p.letters.to_string(),
            crate::admin::shorten_error(p.error.as_deref().unwrap_or("")),
        ]);
    }
    let mut out = format!("{table}\n{total} parked stream(s)");
    if (parked.len() as i64) < total {
        out.push_str(&format!(", {} shown", parked.len()));
    }
    match page.next_after() {
        Some(after) => out.push_str(&format!("; the next page: --after-position {after}")),
        // The streams whose held-back event the store does not hold come last, with no
        // position to page by: resolving those shown brings the rest into the listing.
        None if page.more => out.push_str(
            "; more hold back events the store does not hold: resolve these to list the rest",
        ),
        None => {}
    }
    if parked.iter().any(|p| p.letters == 0) {
        out.push_str(
            "; a stream with no letter is replayed by `dlq replay <group>` with the rest, or \
             resolved alone with `dlq replay|purge <group> --stream <stream>`",
        );
    }
    out.push('\n');
    out
}

/// `dlq replay --stream` or `dlq purge --stream`: resolves the park of `stream_id` from the
/// store alone, then deletes the dead letters of that stream whose events are now applied or
/// skipped. Replay un-parks the stream and applies its events from the parked one to the head;
/// purge skips exactly the parked event and catches up the rest. The resolution says what
/// happened; `ok` is false, and nothing changed, when the stream is not parked or the store
/// cannot resolve it.
pub async fn resolve_stream(
    pool: &PgPool,
    dlq: &DeadLetterQueue,
    projection: ProjectionKind,
    action: Resolve,
    stream_id: &str,
) -> anyhow::Result<Resolution> {
    let refuse = |message: String| Resolution {
        id: stream_id.to_owned(),
        ok: false,
        message,
    };
    let row: Option<(i64, Option<i64>)> = sqlx::query_as(
        "SELECT version, parked_version FROM projection_streams \
         WHERE projection = $1 AND stream_id = $2",
    )
    .bind(projection.name())
    .bind(stream_id)
    .fetch_optional(pool)
    .await
    .context("read the stream's bookkeeping")?;
    let parked_version = match row {
        Some((_, Some(parked))) => parked,
        Some((version, None)) => {
            return Ok(refuse(format!(
                "{stream_id} is not parked (it is at version {version}); nothing done"
            )));
        }
        None => {
            return Ok(refuse(format!(
                "{projection} has never seen {stream_id}; nothing done"
            )));
        }
    };
    let mut conn = pool.acquire().await.context("connect to Postgres")?;
    let (message, now_at) = match action {
        Resolve::Replay => match resume_stream(&mut conn, projection, stream_id).await {
            Ok(done) => (
                format!(
                    "replayed: applied {} event(s) of {stream_id}, now at version {}",
                    done.applied, done.version
                ),
                done.version,
            ),
            Err(failure) => {
                return Ok(refuse(format!(
                    "replay of {stream_id} failed, it stays parked at version \
                     {parked_version}: {failure}"
                )));
            }
        },
        Resolve::Purge => {
            let held: Option<i64> = sqlx::query_scalar(
                "SELECT stream_version FROM events WHERE stream_id = $1 AND stream_version = $2",
            )
            .bind(stream_id)
            .bind(parked_version)
            .fetch_optional(&mut *conn)
            .await
            .context("read the parked event")?;
            if held.is_none() {
                // Skipping a version the store does not hold would mark as applied the event
                // a later command writes at that version.
                return Ok(refuse(format!(
                    "the event store holds no version {parked_version} of {stream_id} (was the \
                     database restored?), so there is nothing to skip; `dlq replay \
                     --stream` un-parks it"
                )));
            }
            match skip_parked(&mut conn, projection, stream_id, parked_version).await {
                Ok(Skip::Skipped(done)) => (
                    match done.parked_again {
                        None => format!(
                            "skipped version {parked_version} of {stream_id}; applied {} \
                             later event(s)",
                            done.applied
                        ),
                        Some(error) => format!(
                            "skipped version {parked_version} of {stream_id}; a later event \
                             failed too: the events before it are applied and the stream is \
                             parked again at version {}: {error}",
                            done.version + 1
                        ),
                    },
                    done.version,
                ),
                // Another run resolved it between the read above and the lock.
                Ok(Skip::AlreadyPast { version } | Skip::NotParkedAt { version, .. }) => {
                    return Ok(refuse(format!(
                        "{stream_id} changed meanwhile (now at version {version}); nothing \
                         skipped, run it again"
                    )));
                }
                Err(failure) => {
                    return Ok(refuse(format!(
                        "purge of {stream_id} failed, it stays parked at version \
                         {parked_version}: {failure}"
                    )));
                }
            }
        }
    };
    // The resolution has committed: a failure to tidy its letters is reported with it, not
    // instead of it (a rerun would find the stream no longer parked).
    let letters = match delete_resolved_letters(pool, dlq, projection, stream_id, now_at).await {
        Ok(deleted) => format!("{deleted} dead letter(s) of it deleted"),
        Err(e) => format!(
            "its dead letters could not be deleted ({}): `dlq list` shows them, and `dlq purge \
             --id` deletes each without skipping anything now",
            platform::config::error_chain(e.as_ref())
        ),
    };
    Ok(Resolution {
        id: stream_id.to_owned(),
        ok: true,
        message: format!("{message}; {letters}"),
    })
}

/// `dlq replay` (all), after the letters: un-parks every stream of `projection` still parked,
/// except those in `tried` (a letter's replay failed on them in this run), and applies its
/// events from the parked one to the head ([`resume_stream`]), `page` streams at a time in
/// stream order, handing each page's resolutions (by stream) to `report`. The walk's cursor
/// only moves forward, so each stream is tried at most once and the walk ends even while
/// consumers keep parking.
///
/// Unlike `--stream`, it looks for no letter to delete: a letter of such a stream was written
/// after the letters' walk began (the walk replayed or tried every earlier one), and the next
/// `dlq replay` finds its event applied and deletes it. Looking would cost a walk over every
/// letter per stream.
pub async fn replay_parked(
    pool: &PgPool,
    projection: ProjectionKind,
    tried: &HashSet<String>,
    page: i64,
    mut report: impl FnMut(&[Resolution]),
) -> anyhow::Result<Resolved> {
    let mut done = Resolved::default();
    let mut after = String::new();
    loop {
        let streams: Vec<(String, i64)> = sqlx::query_as(
            "SELECT stream_id, parked_version FROM projection_streams \
             WHERE projection = $1 AND parked_version IS NOT NULL AND stream_id > $2 \
             ORDER BY stream_id LIMIT $3",
        )
        .bind(projection.name())
        .bind(&after)
        .bind(page.max(1))
        .fetch_all(pool)
        .await
        .context("read the parked streams")?;
        let Some((last, _)) = streams.last() else {
            return Ok(done);
        };
        after = last.clone();
        let mut resolutions = Vec::with_capacity(streams.len());
        for (stream_id, parked_version) in streams {
            if !tried.contains(&stream_id) {
                resolutions
                    .push(replay_one_parked(pool, projection, stream_id, parked_version).await?);
            }
        }
        done.add(&resolutions);
        if !resolutions.is_empty() {
            report(&resolutions);
        }
    }
}

/// [`replay_parked`] of one stream, parked at `parked_version` when the walk read it.
async fn replay_one_parked(
    pool: &PgPool,
    projection: ProjectionKind,
    stream_id: String,
    parked_version: i64,
) -> anyhow::Result<Resolution> {
    let mut conn = pool.acquire().await.context("connect to Postgres")?;
    Ok(
        match resume_stream(&mut conn, projection, &stream_id).await {
            Ok(resumed) => Resolution {
                message: format!(
                    "replayed (parked at version {parked_version} when the walk read it): applied {} \
                 event(s), now at version {}",
                    resumed.applied, resumed.version
                ),
                id: stream_id,
                ok: true,
            },
            Err(failure) => Resolution {
                message: format!(
                    "replay failed, it stays parked at version {parked_version}: {failure}"
                ),
                id: stream_id,
                ok: false,
            },
        },
    )
}

/// Deletes the dead letters of `stream_id` whose events the store holds at their positions at
/// version ≤ `version` (applied or skipped now); returns how many.
async fn delete_resolved_letters(
    pool: &PgPool,
    dlq: &DeadLetterQueue,
    projection: ProjectionKind,
    stream_id: &str,
    version: i64,
) -> anyhow::Result<usize> {
    let mut resolved: Vec<String> = Vec::new();
    let mut pages = LetterPages::new(dlq, projection.name()).await?;
    while let Some(letters) = pages.next(DLQ_PAGE).await? {
        for letter in letters.iter().filter(|l| names_stream(l, stream_id)) {
            if resolved_version(pool, letter)
                .await?
                .is_some_and(|(stream, v)| stream == stream_id && v <= version)
            {
                resolved.push(letter.id.clone());
            }
        }
    }
    dlq.delete(projection.name(), &resolved)
        .await
        .context("delete the resolved dead letters")?;
    Ok(resolved.len())
}

fn names_stream(letter: &DeadLetter, stream_id: &str) -> bool {
    letter
        .original
        .get("stream_id")
        .is_some_and(|s| s == stream_id)
}
