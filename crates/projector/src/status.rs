//! `projector status`: where the system stands, in one command instead of five queries across
//! psql and redis-cli: the event store's head, how far the relay has published, and for each
//! projection its low-water mark, how far behind it is and since when, its parked streams, its
//! dead letters and its consumer group.
//!
//! PostgreSQL and Redis are read independently: with one of them down, the other half still
//! shows and the report names what it could not read (the binary then exits 1). Nothing here
//! writes to either.

use bus::{ConnectionManager, GroupInfo, StreamKeys};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;
use sqlx::PgPool;

use crate::projections::ProjectionKind;

/// Reads a projection's place in the event store: its low-water mark, the first event after
/// it (its age, type and schema version), and its parked streams (the same partial index the
/// sweeper reads).
const PROJECTION_SQL: &str = "\
    SELECT c.position, \
           EXTRACT(EPOCH FROM now() - e.recorded_at)::float8 AS oldest_unapplied_age, \
           e.event_type, e.schema_version, \
           (SELECT count(*) FROM projection_streams s \
             WHERE s.projection = c.projection AND s.parked_version IS NOT NULL) AS parked \
    FROM projection_checkpoints c \
    LEFT JOIN events e ON e.global_position = c.position + 1 \
    WHERE c.projection = $1";

/// Reads how far the relay had published when it last recorded it (`relay_checkpoints`, written
/// every `RELAY_CHECKPOINT_INTERVAL_MS` or so), and how long ago: what there is to go by when
/// Redis cannot be read.
const RELAY_CHECKPOINT_SQL: &str = "\
    SELECT position, EXTRACT(EPOCH FROM now() - updated_at)::float8 \
    FROM relay_checkpoints WHERE stream_key = $1";

/// Events a projection or the relay may be behind before the status calls for attention: the
/// threshold of the `ProjectionLagHigh` and `RelayLagHigh` alerts.
pub const ATTENTION_LAG_EVENTS: i64 = 1_000;
/// Seconds the oldest unapplied event may wait before the status calls for attention: the
/// threshold of the `ProjectionLagSecondsHigh` alert.
pub const ATTENTION_LAG_SECS: f64 = 60.0;

/// Everything `projector status` reports; `None` where its source could not be read.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Position of the newest event in the event store (0 when it is empty).
    pub head: Option<i64>,
    /// The Redis stream the relay publishes to.
    pub stream: String,
    /// Position of the stream's newest entry: how far the relay has published.
    pub published_to: Option<i64>,
    /// Entries the stream holds (the rest were trimmed once every group had them).
    pub stream_length: Option<u64>,
    /// The relay's recorded checkpoint for the stream, from PostgreSQL (behind the live
    /// `published_to` by up to its write interval).
    pub relay_checkpoint: Option<i64>,
    /// Seconds since the relay last recorded its checkpoint.
    pub relay_checkpoint_age_secs: Option<f64>,
    /// The position of the stream's newest relayed entry when the event store holds another
    /// event there, or none: the stream records a history the store does not have, and the
    /// relay publishes nothing to it (RUNBOOK: RelayStreamDiverged).
    pub stream_diverged_at: Option<i64>,
    /// One per projection this binary knows.
    pub projections: Vec<ProjectionStatus>,
    /// What could not be read, one line per store (`postgres: …`, `redis: …`).
    pub unreadable: Vec<String>,
    /// What needs a person, one line each (empty when nothing does): dead letters, parked
    /// orders, an event of a newer release in the way, a lag past the alerts' thresholds, a
    /// projection no consumer reads, what could not be read.
    pub attention: Vec<String>,
}

/// One projection's state.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionStatus {
    pub projection: &'static str,
    /// Low-water mark: every event at or below it is applied (`X-Projection-Position`).
    pub applied_to: Option<i64>,
    /// Events in the store above the mark.
    pub behind: Option<i64>,
    /// Seconds since the first event above the mark was committed; `None` when caught up.
    pub oldest_unapplied_secs: Option<f64>,
    /// That event's type and schema version (`OrderCancelled v2`); `None` when caught up.
    pub oldest_unapplied_event: Option<String>,
    /// Set when that event is one this projection reads but this binary cannot: a newer
    /// release wrote it, and instances of this release hold it (RUNBOOK:
    /// ProjectorNeedsNewerRelease).
    pub oldest_unapplied_needs_newer_release: bool,
    /// Orders held back behind a dead-lettered event (`projector dlq list`).
    pub parked_streams: Option<i64>,
    /// Entries in the projection's dead-letter stream.
    pub dead_letters: Option<u64>,
    /// Its consumer group; `None` when unreadable or not created yet.
    pub group: Option<GroupInfo>,
}

impl Status {
    /// Whether both stores were read.
    pub fn is_complete(&self) -> bool {
        self.unreadable.is_empty()
    }
}

/// Reads the status from whatever is reachable: `pool` is `Err` with the reason when
/// PostgreSQL could not be connected.
pub async fn gather(
    pool: Result<&PgPool, String>,
    redis: &ConnectionManager,
    keys: &StreamKeys,
) -> Status {
    let mut unreadable = Vec::new();
    let mut projections: Vec<ProjectionStatus> = ProjectionKind::ALL
        .iter()
        .map(|projection| ProjectionStatus {
            projection: projection.name(),
            applied_to: None,
            behind: None,
            oldest_unapplied_secs: None,
            oldest_unapplied_event: None,
            oldest_unapplied_needs_newer_release: false,
            parked_streams: None,
            dead_letters: None,
            group: None,
        })
        .collect();

    let (mut head, mut relay_checkpoint, mut relay_checkpoint_age_secs) = (None, None, None);
    let store_pool = pool.as_ref().ok().copied();
    match pool {
        Ok(pool) => match read_store(pool, keys, &mut projections).await {
            Ok((read_head, checkpoint)) => {
                head = Some(read_head);
                if let Some((position, age)) = checkpoint {
                    relay_checkpoint = Some(position);
                    relay_checkpoint_age_secs = Some(age.max(0.0));
                }
            }
            Err(e) => unreadable.push(format!("postgres: {}", platform::config::error_chain(&e))),
        },
        Err(reason) => unreadable.push(format!("postgres: {reason}")),
    }

    let (mut published_to, mut stream_length) = (None, None);
    match read_redis(redis, keys, &mut projections).await {
        Ok(info) => {
            published_to = Some(info.last_position.unwrap_or(0));
            stream_length = Some(info.length);
        }
        Err(e) => unreadable.push(format!("redis: {}", platform::config::error_chain(&e))),
    }
    let mut stream_diverged_at = None;
    if let (Some(pool), Some(_), Some(_)) = (store_pool, head, published_to) {
        match diverged_at(pool, redis, keys).await {
            Ok(position) => stream_diverged_at = position,
            Err(line) => unreadable.push(line),
        }
    }

    let mut status = Status {
        head,
        stream: keys.stream().to_owned(),
        published_to,
        stream_length,
        relay_checkpoint,
        relay_checkpoint_age_secs,
        stream_diverged_at,
        projections,
        unreadable,
        attention: Vec::new(),
    };
    status.attention = attention(&status);
    status
}

/// The position of the stream's newest relayed entry when the store holds another event there
/// (the relay's own check, `command_service::relay`, made from outside it); `Err` is the line
/// for [`Status::unreadable`].
async fn diverged_at(
    pool: &PgPool,
    redis: &ConnectionManager,
    keys: &StreamKeys,
) -> Result<Option<i64>, String> {
    let newest = bus::newest_relayed_entry(redis, keys)
        .await
        .map_err(|e| format!("redis: {}", platform::config::error_chain(&e)))?;
    let Some((position, event_id)) = newest else {
        return Ok(None);
    };
    let stored = store::event_id_at(pool, position)
        .await
        .map_err(|e| format!("postgres: {}", platform::config::error_chain(&e)))?;
    Ok((stored != Some(event_id)).then_some(position))
}

/// The lines of [`Status::attention`].
fn attention(status: &Status) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(position) = status.stream_diverged_at {
        lines.push(format!(
            "the stream's entry at position {position} is not the event store's event there: \
             the stream records another history and the relay publishes nothing to it \
             (RUNBOOK: RelayStreamDiverged)"
        ));
    }
    if let (Some(head), Some(published)) = (status.head, status.published_to)
        && head - published > ATTENTION_LAG_EVENTS
    {
        lines.push(format!(
            "the relay is {} events behind the event store (RUNBOOK: RelayLagHigh)",
            head - published
        ));
    }
    for p in &status.projections {
        let name = p.projection;
        if let Some(letters) = p.dead_letters.filter(|&n| n > 0) {
            lines.push(format!(
                "{name}: {letters} dead letter(s) (projector dlq list {name})"
            ));
        }
        if let Some(parked) = p.parked_streams.filter(|&n| n > 0) {
            lines.push(format!(
                "{name}: {parked} order(s) held back behind a dead letter (projector dlq parked {name})"
            ));
        }
        if p.oldest_unapplied_needs_newer_release {
            lines.push(format!(
                "{name}: its oldest unapplied event ({}) was written by a newer release than \
                 this binary; projectors of this release hold it (RUNBOOK: \
                 ProjectorNeedsNewerRelease)",
                p.oldest_unapplied_event.as_deref().unwrap_or("?")
            ));
        }
        let behind = p.behind.unwrap_or(0);
        let waiting = p.oldest_unapplied_secs.unwrap_or(0.0);
        if behind > ATTENTION_LAG_EVENTS || waiting > ATTENTION_LAG_SECS {
            lines.push(format!(
                "{name}: {behind} events behind, the oldest waiting {waiting:.0} s \
                 (RUNBOOK: ProjectionLagHigh)"
            ));
        }
        if status.published_to.is_some() && p.group.as_ref().is_none_or(|g| g.consumers == 0) {
            lines.push(format!("{name}: no projector consumes it"));
        }
    }
    lines.extend(
        status
            .unreadable
            .iter()
            .map(|line| format!("could not read {line}")),
    );
    lines
}

/// Fills in each projection's PostgreSQL half; returns the head and the relay's checkpoint
/// with its age (none before the relay first recorded one).
async fn read_store(
    pool: &PgPool,
    keys: &StreamKeys,
    projections: &mut [ProjectionStatus],
) -> Result<(i64, Option<(i64, f64)>), sqlx::Error> {
    let head = store::head_position(pool).await?;
    let checkpoint: Option<(i64, f64)> = sqlx::query_as(RELAY_CHECKPOINT_SQL)
        .bind(keys.stream())
        .fetch_optional(pool)
        .await?;
    for status in projections.iter_mut() {
        type Row = (i64, Option<f64>, Option<String>, Option<i32>, i64);
        let row: Option<Row> = sqlx::query_as(PROJECTION_SQL)
            .bind(status.projection)
            .fetch_optional(pool)
            .await?;
        // The migrations create every projection's row; a missing one reads as nothing applied.
        let (applied_to, age, event_type, schema_version, parked) =
            row.unwrap_or((0, None, None, None, 0));
        status.applied_to = Some(applied_to);
        status.behind = Some((head - applied_to).max(0));
        status.oldest_unapplied_secs = age.map(|age| age.max(0.0));
        if let (Some(event_type), Some(version)) = (event_type, schema_version) {
            status.oldest_unapplied_needs_newer_release =
                ProjectionKind::from_name(status.projection)
                    .is_some_and(|kind| kind.needs_newer_release(&event_type, version));
            status.oldest_unapplied_event = Some(format!("{event_type} v{version}"));
        }
        status.parked_streams = Some(parked);
    }
    Ok((head, checkpoint))
}

/// Fills in each projection's Redis half; returns the stream's state.
async fn read_redis(
    redis: &ConnectionManager,
    keys: &StreamKeys,
    projections: &mut [ProjectionStatus],
) -> Result<bus::StreamInfo, bus::BusError> {
    let info = bus::inspect(redis, keys).await?;
    let dlq = bus::DeadLetterQueue::new(redis.clone(), keys.clone());
    for status in projections.iter_mut() {
        status.dead_letters = Some(dlq.len(status.projection).await?);
        status.group = info
            .groups
            .iter()
            .find(|group| group.name == status.projection)
            .cloned();
    }
    Ok(info)
}

/// The status as people read it: the log's head and the relay, a table of the projections,
/// and what could not be read.
pub fn render(status: &Status) -> String {
    let known = |value: Option<i64>| value.map_or("?".to_owned(), |v| v.to_string());
    let mut out = format!("event store  head {}\n", known(status.head));
    let relay_behind = match (status.head, status.published_to) {
        (Some(head), Some(published)) => format!(", {} behind", (head - published).max(0)),
        _ => String::new(),
    };
    let checkpoint = match (status.relay_checkpoint, status.relay_checkpoint_age_secs) {
        (Some(position), Some(age)) => format!("; checkpoint {position}, recorded {age:.0} s ago"),
        _ => String::new(),
    };
    out.push_str(&format!(
        "relay        published to {} on {} ({} entries held){relay_behind}{checkpoint}\n",
        known(status.published_to),
        status.stream,
        status
            .stream_length
            .map_or("?".to_owned(), |l| l.to_string()),
    ));
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header([
            "projection",
            "applied to",
            "behind",
            "oldest unapplied",
            "parked",
            "dead letters",
            "consumers",
            "pending",
            "undelivered",
        ]);
    for p in &status.projections {
        let group = |value: fn(&GroupInfo) -> Option<u64>| match &p.group {
            Some(group) => value(group).map_or("?".to_owned(), |v| v.to_string()),
            None if status.published_to.is_some() => "no group".to_owned(),
            None => "?".to_owned(),
        };
        let oldest = match (p.behind, p.oldest_unapplied_secs) {
            (Some(0), _) => "-".to_owned(),
            (_, Some(secs)) => match &p.oldest_unapplied_event {
                Some(event) => format!("{secs:.1} s ago ({event})"),
                None => format!("{secs:.1} s ago"),
            },
            _ => "?".to_owned(),
        };
        table.add_row([
            p.projection.to_owned(),
            known(p.applied_to),
            known(p.behind),
            oldest,
            known(p.parked_streams),
            p.dead_letters.map_or("?".to_owned(), |d| d.to_string()),
            group(|g| Some(g.consumers)),
            group(|g| Some(g.pending)),
            group(|g| g.lag),
        ]);
    }
    out.push_str(&format!("{table}\n"));
    if status.attention.is_empty() {
        out.push_str("nothing needs attention\n");
    }
    for line in &status.attention {
        out.push_str(&format!("attention: {line}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn projection(name: &'static str, behind: i64, oldest_secs: Option<f64>) -> ProjectionStatus {
        ProjectionStatus {
            projection: name,
            applied_to: Some(0),
            behind: Some(behind),
            oldest_unapplied_secs: oldest_secs,
            oldest_unapplied_event: oldest_secs.map(|_| "OrderPaid v1".to_owned()),
            oldest_unapplied_needs_newer_release: false,
            parked_streams: Some(0),
            dead_letters: Some(0),
            group: Some(GroupInfo {
                name: name.to_owned(),
                consumers: 2,
                pending: 0,
                last_delivered_id: "0-0".to_owned(),
                lag: Some(0),
            }),
        }
    }

    fn status(published_to: i64, projections: Vec<ProjectionStatus>) -> Status {
        Status {
            head: Some(5_000),
            stream: "es:events".to_owned(),
            published_to: Some(published_to),
            stream_length: Some(100),
            relay_checkpoint: None,
            relay_checkpoint_age_secs: None,
            stream_diverged_at: None,
            projections,
            unreadable: Vec::new(),
            attention: Vec::new(),
        }
    }

    #[test]
    fn an_oldest_unapplied_event_of_a_newer_release_needs_attention() {
        let mut held = projection("order_summaries", 2, Some(5.0));
        held.oldest_unapplied_event = Some("OrderCancelled v9".to_owned());
        held.oldest_unapplied_needs_newer_release = true;
        assert_eq!(
            attention(&status(5_000, vec![held])),
            [
                "order_summaries: its oldest unapplied event (OrderCancelled v9) was written by \
                 a newer release than this binary; projectors of this release hold it \
                 (RUNBOOK: ProjectorNeedsNewerRelease)"
            ]
        );
    }

    #[test]
    fn a_lag_past_the_alerts_thresholds_needs_attention_and_one_below_does_not() {
        let calm = status(
            5_000 - ATTENTION_LAG_EVENTS,
            vec![projection(
                "order_summaries",
                ATTENTION_LAG_EVENTS,
                Some(59.0),
            )],
        );
        assert_eq!(attention(&calm), Vec::<String>::new());

        let behind = status(
            5_000 - ATTENTION_LAG_EVENTS - 1,
            vec![
                projection("order_summaries", ATTENTION_LAG_EVENTS + 1, Some(1.0)),
                projection("customer_stats", 3, Some(61.0)),
            ],
        );
        assert_eq!(
            attention(&behind),
            [
                "the relay is 1001 events behind the event store (RUNBOOK: RelayLagHigh)",
                "order_summaries: 1001 events behind, the oldest waiting 1 s (RUNBOOK: ProjectionLagHigh)",
                "customer_stats: 3 events behind, the oldest waiting 61 s (RUNBOOK: ProjectionLagHigh)",
            ]
        );
    }
}
