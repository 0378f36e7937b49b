//! The admin subcommands' logic: `dlq list|show|replay|purge` over the dead letters, and
//! `rebuild` from [`crate::rebuild`]. (`dlq parked` and `--stream` live in [`crate::parked`],
//! `verify` in [`crate::verify`].) Each returns data and a rendering; `main` only prints and
//! picks the exit code, so tests call the same functions the binary runs.

use std::collections::HashSet;

use anyhow::{Context as _, anyhow, bail};
use bus::{DeadLetter, DeadLetterQueue};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use sqlx::PgPool;

use crate::apply::{Skip, resume_stream, skip_parked};
use crate::projections::ProjectionKind;

pub use crate::rebuild::{RebuildOutcome, rebuild};

/// Most dead letters `dlq list` shows, and the page size of `dlq replay` and `dlq purge --all`,
/// which walk every letter one page at a time so memory stays bounded however many there are.
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

/// One page of `dlq list`: up to [`DLQ_PAGE`] letters, oldest first, and how many the group
/// holds in all.
#[derive(Debug)]
pub struct ListPage {
    /// The letters of the page.
    pub letters: Vec<DeadLetter>,
    /// Every letter of the group.
    pub total: u64,
    /// Whether letters follow the page.
    pub more: bool,
}

/// The page of `group`'s dead letters after the letter `after` (from the oldest when `None`).
pub async fn list_page(
    dlq: &DeadLetterQueue,
    group: &str,
    after: Option<&str>,
) -> anyhow::Result<ListPage> {
    let total = dlq.len(group).await.context("count the dead letters")?;
    let Some(until) = dlq
        .newest_id(group)
        .await
        .context("read the dead letters")?
    else {
        return Ok(ListPage {
            letters: Vec::new(),
            total,
            more: false,
        });
    };
    let mut letters = dlq
        .page(group, after, &until, DLQ_PAGE + 1)
        .await
        .context("read the dead letters")?;
    let more = letters.len() > DLQ_PAGE;
    letters.truncate(DLQ_PAGE);
    Ok(ListPage {
        letters,
        total,
        more,
    })
}

/// `dlq list` without `--id`: the page's table, then where it stands and how to go on.
pub fn render_page(page: &ListPage) -> String {
    let mut out = render_list(&page.letters);
    if page.more
        && let Some(last) = page.letters.last()
    {
        out.push_str(&format!(
            "{} dead letter(s) in all; the next page: --after {}\n",
            page.total, last.id
        ));
    }
    out
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
        table.add_row([
            l.id.clone(),
            field(l, "position").to_owned(),
            field(l, "stream_id").to_owned(),
            field(l, "stream_version").to_owned(),
            field(l, "event_type").to_owned(),
            l.attempts.to_string(),
            shorten_error(&l.error),
            l.failed_at.clone(),
        ]);
    }
    format!("{table}\n{} dead letter(s)\n", letters.len())
}

/// `error` cut to the error column of the tables.
pub(crate) fn shorten_error(error: &str) -> String {
    if error.chars().count() <= ERROR_COLUMN_WIDTH {
        return error.to_owned();
    }
    error
        .chars()
        .take(ERROR_COLUMN_WIDTH - 1)
        .collect::<String>()
        + "…"
}

/// A walk over the dead letters of a group that exist when it starts, oldest first, one page
/// at a time, so memory stays bounded however many there are. Letters written meanwhile are
/// left for the next walk, so it ends even while consumers keep dead-lettering.
pub(crate) struct LetterPages<'a> {
    dlq: &'a DeadLetterQueue,
    group: &'a str,
    /// The newest letter when the walk started; `None` when there was none.
    until: Option<String>,
    after: Option<String>,
}

impl<'a> LetterPages<'a> {
    /// Starts a walk over `group`'s letters.
    pub(crate) async fn new(dlq: &'a DeadLetterQueue, group: &'a str) -> anyhow::Result<Self> {
        let until = dlq
            .newest_id(group)
            .await
            .context("read the dead letters")?;
        Ok(Self {
            dlq,
            group,
            until,
            after: None,
        })
    }

    /// The next page of up to `page` letters, or `None` at the end.
    pub(crate) async fn next(&mut self, page: usize) -> anyhow::Result<Option<Vec<DeadLetter>>> {
        let Some(until) = &self.until else {
            return Ok(None);
        };
        let letters = self
            .dlq
            .page(self.group, self.after.as_deref(), until, page.max(1))
            .await
            .context("read the dead letters")?;
        let Some(last) = letters.last() else {
            self.until = None;
            return Ok(None);
        };
        self.after = Some(last.id.clone());
        Ok(Some(letters))
    }
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
    /// The dead letter's id, or the stream's (`order-<uuid>`) when a stream was resolved.
    pub id: String,
    /// Whether it was resolved (a letter: and deleted from the dead-letter stream).
    pub ok: bool,
    /// What happened, for the operator.
    pub message: String,
}

/// Why a dead letter cannot be resolved to an event of the store.
enum Unresolved {
    /// The letter names no event: its `position` or `event_id` is missing or unreadable (an
    /// entry that could not be decoded).
    NamesNoEvent,
    /// The letter names an event the store does not hold at that position: it comes from
    /// another history (the database was restored from a backup after it was written), or
    /// the store could not be read. The message says which, for the operator.
    Refused(String),
    /// The store could not be read; the message says why.
    Unreadable(String),
}

/// The position and event id `letter` names; `None` for the letter of an entry that could
/// not be decoded (by [`bus::decode_entry`], as the consumer decodes it), which is no event of
/// any order, whatever stream, position or event id it names, and never parked one.
pub(crate) fn named_event(letter: &DeadLetter) -> Option<(i64, uuid::Uuid)> {
    let entry = bus::StreamEntry {
        id: letter.original_id.clone(),
        fields: letter
            .original
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
    };
    let event = bus::decode_entry(&entry).ok()?;
    Some((event.global_position, event.event_id))
}

/// The stream and version of the event `letter` names, found by its position *and* its event
/// id: after a restore the store hands the positions of lost events to other events, and a
/// letter resolved by position alone would act on an unrelated order.
async fn stream_of(pool: &PgPool, letter: &DeadLetter) -> Result<(String, i64), Unresolved> {
    let Some((position, event_id)) = named_event(letter) else {
        return Err(Unresolved::NamesNoEvent);
    };
    let row: Option<(String, i64, uuid::Uuid)> = sqlx::query_as(
        "SELECT stream_id, stream_version, event_id FROM events WHERE global_position = $1",
    )
    .bind(position)
    .fetch_optional(pool)
    .await
    .map_err(|e| Unresolved::Unreadable(format!("cannot read the event store: {e}")))?;
    match row {
        Some((stream, version, held)) if held == event_id => Ok((stream, version)),
        Some((stream, version, held)) => Err(Unresolved::Refused(format!(
            "the event store holds another event at position {position} ({held}, version \
             {version} of {stream}), not this letter's {event_id}: the letter comes from \
             another history (was the database restored?), so it is left in place; delete it \
             by hand (XDEL) once you have checked it"
        ))),
        None => Err(Unresolved::Refused(format!(
            "the event store holds no event at position {position} (this letter's \
             {event_id}): the letter comes from another history (was the database restored?), \
             so it is left in place; delete it by hand (XDEL) once you have checked it"
        ))),
    }
}

/// The stream and version of the event `letter` names, when the store holds that event at the
/// letter's position (see [`stream_of`]); `None` when it does not or the letter names none; an
/// error when the store cannot be read.
pub(crate) async fn resolved_version(
    pool: &PgPool,
    letter: &DeadLetter,
) -> anyhow::Result<Option<(String, i64)>> {
    match stream_of(pool, letter).await {
        Ok(found) => Ok(Some(found)),
        Err(Unresolved::NamesNoEvent | Unresolved::Refused(_)) => Ok(None),
        Err(Unresolved::Unreadable(message)) => Err(anyhow!(message)),
    }
}

/// `dlq replay`: for each dead letter, un-park its stream and apply that event and the rest of
/// the stream up to its head from the *event store*; on success delete the dead letter. A
/// letter whose event the store does not hold at its position is left in place.
pub async fn replay(
    pool: &PgPool,
    dlq: &DeadLetterQueue,
    projection: ProjectionKind,
    letters: &[DeadLetter],
) -> anyhow::Result<Vec<Resolution>> {
    replay_noting_failures(pool, dlq, projection, letters, &mut HashSet::new()).await
}

/// [`replay`], adding to `failed` each stream whose replay was tried and failed.
async fn replay_noting_failures(
    pool: &PgPool,
    dlq: &DeadLetterQueue,
    projection: ProjectionKind,
    letters: &[DeadLetter],
    failed: &mut HashSet<String>,
) -> anyhow::Result<Vec<Resolution>> {
    let mut out = Vec::with_capacity(letters.len());
    for letter in letters {
        let id = letter.id.clone();
        let (stream, _) = match stream_of(pool, letter).await {
            Ok(found) => found,
            Err(unresolved) => {
                let message = match unresolved {
                    Unresolved::NamesNoEvent => {
                        "it names no event of the store (its position or event id is missing \
                         or unreadable), so it cannot be replayed; purge it"
                            .to_owned()
                    }
                    Unresolved::Refused(message) | Unresolved::Unreadable(message) => message,
                };
                out.push(Resolution {
                    id,
                    ok: false,
                    message,
                });
                continue;
            }
        };
        let mut conn = pool.acquire().await.context("connect to Postgres")?;
        match resume_stream(&mut conn, projection, &stream).await {
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
            Err(failure) => {
                out.push(Resolution {
                    id,
                    ok: false,
                    message: format!("replay of {stream} failed, left in place: {failure}"),
                });
                failed.insert(stream);
            }
        }
    }
    Ok(out)
}

/// `dlq purge`: delete dead letters and skip their events **for good**: exactly the event a
/// letter names, and only while its stream is parked at it, is marked applied without being
/// applied; the stream is un-parked and the rest of it caught up from the event store. The
/// read model then differs from a fold of the event store for that order (`verify` reports
/// it) until a `rebuild`, which applies the event again (and parks the stream again if it
/// still fails). A letter whose event the store does not hold at its position, or whose
/// stream is parked at another event, is left in place and reported as failed.
pub async fn purge(
    pool: &PgPool,
    dlq: &DeadLetterQueue,
    projection: ProjectionKind,
    letters: &[DeadLetter],
) -> anyhow::Result<Vec<Resolution>> {
    let mut out = Vec::with_capacity(letters.len());
    for letter in letters {
        let id = letter.id.clone();
        let refuse = |message: String| Resolution {
            id: id.clone(),
            ok: false,
            message,
        };
        let message = match stream_of(pool, letter).await {
            Err(Unresolved::Refused(message) | Unresolved::Unreadable(message)) => {
                out.push(refuse(message));
                continue;
            }
            // An entry that could not be decoded held nothing back: it is deleted alone. The
            // stream it may name is left as it is, since un-parking it would lift a park some
            // real event of that order caused.
            Err(Unresolved::NamesNoEvent) => no_event_deleted(pool, projection, letter).await?,
            Ok((stream, version)) => {
                let mut conn = pool.acquire().await.context("connect to Postgres")?;
                match skip_parked(&mut conn, projection, &stream, version).await {
                    Ok(Skip::Skipped(done)) => match done.parked_again {
                        None => format!(
                            "skipped version {version} of {stream}; applied {} later event(s)",
                            done.applied
                        ),
                        Some(error) => format!(
                            "skipped version {version} of {stream}; the next event failed too and \
                             the stream is parked again: {error}"
                        ),
                    },
                    Ok(Skip::AlreadyPast { version: at }) => format!(
                        "deleted; nothing skipped: {stream} is at version {at}, past version \
                         {version} already"
                    ),
                    Ok(Skip::NotParkedAt {
                        version: at,
                        parked,
                    }) => {
                        let why = match parked {
                            Some(parked) => format!(
                                "{stream} is parked at version {parked}, not at this letter's \
                                 version {version}: skipping would skip events that never failed"
                            ),
                            None => format!(
                                "{stream} is not parked (it is at version {at}): version \
                                 {version} may still be applied"
                            ),
                        };
                        out.push(refuse(format!("{why}; nothing skipped, left in place")));
                        continue;
                    }
                    Err(failure) => {
                        out.push(refuse(format!(
                            "purge of {stream} failed, left in place: {failure}"
                        )));
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

/// What `purge` says of a letter that names no event, which it deletes alone. A stream it
/// names that is parked (by an older release, which parked the stream an entry that could not
/// be decoded named) is pointed out, with how to lift that park.
async fn no_event_deleted(
    pool: &PgPool,
    projection: ProjectionKind,
    letter: &DeadLetter,
) -> anyhow::Result<String> {
    let deleted = "deleted (it named no event of the store; nothing skipped or un-parked)";
    let Some(stream) = letter.original.get("stream_id") else {
        return Ok(deleted.to_owned());
    };
    let parked: Option<i64> = sqlx::query_scalar(
        "SELECT parked_version FROM projection_streams \
         WHERE projection = $1 AND stream_id = $2 AND parked_version IS NOT NULL",
    )
    .bind(projection.name())
    .bind(stream)
    .fetch_optional(pool)
    .await
    .context("read the stream's bookkeeping")?;
    Ok(match parked {
        Some(version) => format!(
            "{deleted}; {stream}, which it names, stays parked at version {version}: `dlq \
             parked` shows why, `dlq replay --stream {stream}` lifts it"
        ),
        None => deleted.to_owned(),
    })
}

/// Which of `replay` and `purge` [`resolve_all`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// [`replay`].
    Replay,
    /// [`purge`].
    Purge,
}

/// How many letters (and, for a replay, parked streams) [`resolve_all`] resolved and how many
/// it left in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Resolved (a letter: deleted).
    pub ok: usize,
    /// Left in place (their resolutions say why).
    pub failed: usize,
}

impl Resolved {
    /// Counts `other`'s in.
    pub fn merge(&mut self, other: Resolved) {
        self.ok += other.ok;
        self.failed += other.failed;
    }

    /// Counts `resolutions` in.
    pub fn add(&mut self, resolutions: &[Resolution]) {
        let ok = resolutions.iter().filter(|r| r.ok).count();
        self.ok += ok;
        self.failed += resolutions.len() - ok;
    }
}

/// `dlq replay` (all) or `dlq purge --all`: every dead letter of `projection`'s group that
/// exists when it starts, oldest first, `page` at a time, handing each page's resolutions to
/// `report` as it goes. Letters written meanwhile are left for the next run, so it ends even
/// while consumers keep dead-lettering.
///
/// A replay then goes on to every stream still parked but those whose catch-up failed for a
/// letter ([`crate::parked::replay_parked`]): those parked with no letter (while Redis refused it,
/// past a rebuild's bound, letters deleted by hand) would otherwise stay held back until an
/// operator found each one in `dlq parked`. A purge never skips an event no letter names.
pub async fn resolve_all(
    pool: &PgPool,
    dlq: &DeadLetterQueue,
    projection: ProjectionKind,
    action: Resolve,
    page: usize,
    mut report: impl FnMut(&[Resolution]),
) -> anyhow::Result<Resolved> {
    let mut done = Resolved::default();
    // Streams a letter's replay tried and failed on: still parked, and tried once already.
    let mut failed_streams: HashSet<String> = HashSet::new();
    let mut pages = LetterPages::new(dlq, projection.name()).await?;
    while let Some(letters) = pages.next(page).await? {
        let resolutions = match action {
            Resolve::Replay => {
                replay_noting_failures(pool, dlq, projection, &letters, &mut failed_streams).await?
            }
            Resolve::Purge => purge(pool, dlq, projection, &letters).await?,
        };
        done.add(&resolutions);
        report(&resolutions);
    }
    if action == Resolve::Replay {
        let streams = crate::parked::replay_parked(
            pool,
            projection,
            &failed_streams,
            i64::try_from(page).unwrap_or(i64::MAX),
            &mut report,
        )
        .await?;
        done.merge(streams);
    }
    Ok(done)
}

/// One line per resolution (a letter's id, or a parked stream's).
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
