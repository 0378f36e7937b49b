//! Reading the `order_summaries` and `customer_stats` read models, each row together with its
//! projection's checkpoint in the same statement (one snapshot), so `X-Projection-Position`
//! never claims more than the rows show.
//!
//! Every query is static SQL (prepared and cached per connection by sqlx) and matches an index
//! of `migrations/0003_read_models.sql`; `GET /orders` picks one of four queries by its filters
//! instead of `($1 IS NULL OR …)`, which a generic plan could not serve from an index. A page is
//! one query: no N+1. This module only reads; the projector owns these tables.
//!
//! [`ReadModels::read_consistent`] joins this with `consistency`: wait on the watch (no
//! database), then read once; only if the fresh checkpoint contradicts the watch (a reset
//! checkpoint) does it wait for the next publication and read again.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use events::{LineItem, OrderStatus, OrderSummary};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::consistency::{CUSTOMER_STATS, CheckpointWatcher, ORDER_SUMMARIES, WaitOutcome};
use crate::cursor;
use crate::error::ApiError;
use crate::params::{Consistency, ListOrders};

/// The columns of a summary row, after the checkpoint column `cp_position`.
macro_rules! summary_columns {
    () => {
        "s.order_id, s.customer_id, s.status, s.currency, s.items, s.total, s.item_count, \
         s.version, s.created_at, s.updated_at, s.created_position"
    };
}

/// One row, one checkpoint: `cp` always yields exactly one row, so the checkpoint is read even
/// when the order is absent.
macro_rules! checkpoint_of {
    ($projection:literal) => {
        concat!(
            "(SELECT COALESCE((SELECT position FROM projection_checkpoints \
             WHERE projection = '",
            $projection,
            "'), 0) AS position) cp"
        )
    };
}

/// `p`: the `projection_streams` row of the order whose id is `$order_id` when its stream is
/// parked in `order_summaries` (held back behind a dead letter), else NULLs. One probe of the
/// table's primary key.
macro_rules! held_join {
    ($order_id:literal) => {
        concat!(
            " LEFT JOIN projection_streams p ON p.stream_id = 'order-' || ",
            $order_id,
            "::text AND p.projection = 'order_summaries' AND p.parked_version IS NOT NULL"
        )
    };
}

/// One order, and whether its stream is parked in `order_summaries` (held back behind a dead
/// letter): the version it is parked at and that event's position. Both lookups are probes of
/// a primary key (`projection_streams`) and a unique index (`events`).
const ORDER_SQL: &str = concat!(
    "SELECT cp.position AS cp_position, ",
    summary_columns!(),
    ", p.parked_version AS held_version, e.global_position AS held_position FROM ",
    checkpoint_of!("order_summaries"),
    " LEFT JOIN order_summaries s ON s.order_id = $1",
    held_join!("$1"),
    " LEFT JOIN events e ON e.stream_id = p.stream_id AND e.stream_version = p.parked_version"
);

/// A page: the newest `$n` orders created before a position, read from `$source` (the table,
/// or a subquery over it). The LATERAL subquery is what walks the index; the outer ORDER BY
/// keeps the order it produced.
macro_rules! page_sql {
    ($filter:literal, $limit:literal) => {
        page_sql!(from "order_summaries", $filter, $limit)
    };
    (from $source:literal, $filter:literal, $limit:literal) => {
        concat!(
            "SELECT cp.position AS cp_position, ",
            summary_columns!(),
            ", p.parked_version AS held_version FROM ",
            checkpoint_of!("order_summaries"),
            " LEFT JOIN LATERAL (SELECT * FROM ",
            $source,
            " WHERE ",
            $filter,
            " ORDER BY created_position DESC LIMIT ",
            $limit,
            ") s ON true",
            held_join!("s.order_id"),
            " ORDER BY s.created_position DESC"
        )
    };
}

/// No filter: the unique index on `created_position`.
const PAGE_SQL: &str = page_sql!("created_position < $1", "$2");
/// By customer: `order_summaries_customer (customer_id, created_position DESC)`.
const PAGE_BY_CUSTOMER_SQL: &str = page_sql!("customer_id = $3 AND created_position < $1", "$2");

/// By status: one statement per status with the status as a literal, so the planner weighs
/// each status by its own statistics: `order_summaries_status (status, created_position DESC)`
/// for a rare status, the `created_position` index for a common one. A `$n` parameter would get
/// one generic plan for all five after a few executions.
fn page_by_status_sql(status: OrderStatus) -> &'static str {
    match status {
        OrderStatus::Draft => page_sql!("status = 'draft' AND created_position < $1", "$2"),
        OrderStatus::Placed => page_sql!("status = 'placed' AND created_position < $1", "$2"),
        OrderStatus::Paid => page_sql!("status = 'paid' AND created_position < $1", "$2"),
        OrderStatus::Shipped => page_sql!("status = 'shipped' AND created_position < $1", "$2"),
        OrderStatus::Cancelled => {
            page_sql!("status = 'cancelled' AND created_position < $1", "$2")
        }
    }
}

/// By customer and status: the customer's entries of `order_summaries_customer`, newest first
/// (a customer's orders are few), filtered by status. `OFFSET 0` keeps the customer's walk a
/// subquery planned on its own: with the status a condition of the same scan, the plan cached
/// while the table was empty walked `order_summaries_status` and filtered by customer (test
/// `plans`), which on a real table reads every order of a common status to find one customer's.
/// The subquery's order is the outer query's, so the `LIMIT` still stops the walk early.
const PAGE_BY_CUSTOMER_AND_STATUS_SQL: &str = page_sql!(
    from "(SELECT * FROM order_summaries WHERE customer_id = $3 AND created_position < $1 \
          ORDER BY created_position DESC OFFSET 0) c",
    "status = $4",
    "$2"
);

/// One customer, and the customer's orders parked in `customer_stats` (held back behind a dead
/// letter): how many, and the position of the earliest held-back event the store holds. A
/// parked stream's customer is read from its creation event, since a stream parked at its
/// creation has no row in the read model. Parked streams are few, and the partial index
/// `projection_streams_parked` finds them without reading the rest; the cost grows with their
/// number (two index probes each), which only an incident raises (a release failing every
/// event of a kind parks one order per event), and which the alert on parked orders reports.
/// The `OFFSET 0` subqueries keep that shape whatever the statistics say: as plain joins the
/// planner could start from `events` instead, and read every order's creation to find the
/// customer's (it did so on a small store).
const CUSTOMER_SQL: &str = concat!(
    "SELECT cp.position AS cp_position, c.customer_id, c.order_count, c.total_spent, \
     c.draft_count, c.placed_count, c.paid_count, c.shipped_count, c.cancelled_count, \
     (SELECT COALESCE(jsonb_object_agg(sp.currency, sp.total_spent), '{}'::jsonb) \
      FROM customer_stats_spent sp \
      WHERE sp.customer_id = c.customer_id AND sp.total_spent <> 0) AS spent_by_currency, \
     h.held_orders, h.held_position FROM ",
    checkpoint_of!("customer_stats"),
    " LEFT JOIN customer_stats c ON c.customer_id = $1",
    " CROSS JOIN LATERAL (SELECT count(*) AS held_orders, \
       min(held.global_position) AS held_position \
       FROM projection_streams p \
       CROSS JOIN LATERAL (SELECT ce.data->>'customer_id' AS customer_id FROM events ce \
         WHERE ce.stream_id = p.stream_id AND ce.stream_version = 1 OFFSET 0) created \
       LEFT JOIN LATERAL (SELECT he.global_position FROM events he \
         WHERE he.stream_id = p.stream_id AND he.stream_version = p.parked_version \
         OFFSET 0) held ON true \
       WHERE p.projection = 'customer_stats' AND p.parked_version IS NOT NULL \
       AND created.customer_id = $1::text) h"
);

/// Counts of read-model queries, for tests and `/metrics`.
#[derive(Debug, Default)]
pub struct ReadStats {
    /// Statements run against `order_summaries` / `customer_stats`.
    pub queries: AtomicU64,
}

/// A read-model answer and the checkpoint it reflects (`X-Projection-Position`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positioned<T> {
    pub value: T,
    pub position: i64,
}

/// An order's summary as the read model holds it.
#[derive(Debug, Clone)]
pub struct OrderRead {
    /// The summary.
    pub summary: OrderSummary,
    /// Set when the order is held back behind a dead letter: the version whose event failed.
    /// The summary shows the order as of the version before it; later events wait for
    /// `projector dlq replay` or `purge`.
    pub held_back_version: Option<i64>,
}

/// Where an order's stream is parked, if it is: (version, position of that event when the
/// store holds it).
type HeldBack = Option<(i64, Option<i64>)>;

/// Counts of a customer's orders per status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ByStatus {
    pub draft: i64,
    pub placed: i64,
    pub paid: i64,
    pub shipped: i64,
    pub cancelled: i64,
}

/// The body of `GET /customers/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CustomerStats {
    pub customer_id: Uuid,
    /// Number of orders the customer created.
    pub order_count: i64,
    /// Sum of the totals of paid and shipped orders, in minor units, whatever their currency.
    pub total_spent: i64,
    pub by_status: ByStatus,
    /// `total_spent` per currency (ISO 4217 code → minor units); currencies with nothing spent
    /// are left out.
    #[schema(example = json!({"EUR": 9900, "USD": 1250}))]
    pub spent_by_currency: BTreeMap<String, i64>,
    /// How many of the customer's orders are held back behind a dead letter of `customer_stats`:
    /// the figures above lack the held-back event and the later events of each, until an
    /// operator replays or purges it (`projector dlq parked customer_stats`). Usually 0.
    pub held_back_orders: i64,
}

/// One order of a page of `GET /orders`: its summary, marked when it is held back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ListedOrder {
    #[serde(flatten)]
    pub summary: OrderSummary,
    /// Only when the order is held back behind a dead letter: the version whose event failed.
    /// The summary shows the order as of the version before it until an operator replays or
    /// purges it, as `X-Held-Back-Version` of `GET /orders/{id}` says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_back_version: Option<i64>,
}

/// The body of `GET /orders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct OrderPage {
    /// Newest first. An order whose very creation is held back behind a dead letter has no
    /// summary yet and is not listed.
    pub items: Vec<ListedOrder>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// The read models, with the watcher that tells when they are recent enough.
#[derive(Debug, Clone)]
pub struct ReadModels {
    pool: PgPool,
    watcher: CheckpointWatcher,
    stats: Arc<ReadStats>,
}

impl ReadModels {
    pub fn new(pool: PgPool, watcher: CheckpointWatcher) -> Self {
        Self {
            pool,
            watcher,
            stats: Arc::new(ReadStats::default()),
        }
    }

    /// The query counters.
    pub fn stats(&self) -> Arc<ReadStats> {
        Arc::clone(&self.stats)
    }

    /// `GET /orders/{id}`. An order held back behind a dead letter is answered with
    /// [`ApiError::OrderHeldBack`] when the summary cannot show what the request asks for: a
    /// read-your-writes request at or past the held-back event's position (the mark passes
    /// that event, which counts as settled, but the summary lacks it), or an order whose very
    /// creation is held back (there is no summary, yet the order exists).
    pub async fn order(
        &self,
        order_id: Uuid,
        consistency: Option<Consistency>,
    ) -> Result<Positioned<OrderRead>, ApiError> {
        let read = self
            .read_consistent(ORDER_SUMMARIES, consistency, || async move {
                let row = sqlx::query(ORDER_SQL)
                    .bind(order_id)
                    .fetch_one(&self.pool)
                    .await?;
                let position: i64 = row.try_get("cp_position")?;
                let summary = summary_of(&row)?;
                let held: HeldBack = row
                    .try_get::<Option<i64>, _>("held_version")?
                    .map(|version| Ok::<_, sqlx::Error>((version, row.try_get("held_position")?)))
                    .transpose()?;
                Ok(((summary, held), position))
            })
            .await?;
        let (summary, held) = read.value;
        if let Some((version, event_position)) = held {
            let asked_past_it = match (consistency, event_position) {
                (Some(wanted), Some(at)) => at <= wanted.min_position,
                _ => false,
            };
            if summary.is_none() || asked_past_it {
                return Err(ApiError::OrderHeldBack {
                    order_id,
                    version,
                    event_position,
                    position: read.position,
                });
            }
        }
        match summary {
            Some(summary) => Ok(Positioned {
                value: OrderRead {
                    summary,
                    held_back_version: held.map(|(version, _)| version),
                },
                position: read.position,
            }),
            None => Err(ApiError::OrderNotFound {
                order_id,
                position: Some(read.position),
            }),
        }
    }

    /// `GET /orders`: one page, newest first.
    pub async fn orders(
        &self,
        list: &ListOrders,
        consistency: Option<Consistency>,
    ) -> Result<Positioned<OrderPage>, ApiError> {
        let read = self
            .read_consistent(ORDER_SUMMARIES, consistency, || async move {
                let before = list.before_position.unwrap_or(i64::MAX);
                // One more than asked: tells whether a next page exists without another query.
                let fetch = list.limit + 1;
                let query = match (list.customer_id, list.status) {
                    (None, None) => sqlx::query(PAGE_SQL).bind(before).bind(fetch),
                    (Some(c), None) => sqlx::query(PAGE_BY_CUSTOMER_SQL)
                        .bind(before)
                        .bind(fetch)
                        .bind(c),
                    (None, Some(s)) => sqlx::query(page_by_status_sql(s)).bind(before).bind(fetch),
                    (Some(c), Some(s)) => sqlx::query(PAGE_BY_CUSTOMER_AND_STATUS_SQL)
                        .bind(before)
                        .bind(fetch)
                        .bind(c)
                        .bind(s.as_str()),
                };
                let rows = query.fetch_all(&self.pool).await?;
                // The checkpoint row is always there (LEFT JOIN), so `rows` is never empty.
                let position: i64 = match rows.first() {
                    Some(row) => row.try_get("cp_position")?,
                    None => 0,
                };
                let mut items = Vec::with_capacity(rows.len());
                for row in &rows {
                    if let Some(summary) = summary_of(row)? {
                        let created: i64 = row.try_get("created_position")?;
                        let listed = ListedOrder {
                            summary,
                            held_back_version: row.try_get("held_version")?,
                        };
                        items.push((listed, created));
                    }
                }
                Ok((items, position))
            })
            .await?;
        let mut rows = read.value;
        let limit = usize::try_from(list.limit).unwrap_or(usize::MAX);
        let next_cursor = if rows.len() > limit {
            rows.truncate(limit);
            rows.last()
                .map(|(_, created)| cursor::encode(*created, list.scope()))
        } else {
            None
        };
        Ok(Positioned {
            value: OrderPage {
                items: rows.into_iter().map(|(listed, _)| listed).collect(),
                next_cursor,
            },
            position: read.position,
        })
    }

    /// `GET /customers/{id}`. A customer with orders held back behind a dead letter is answered
    /// with [`ApiError::CustomerHeldBack`] when the stats cannot show what the request asks
    /// for: a read-your-writes request at or past a held-back event's position, or a customer
    /// whose only orders are held back at their creation (no stats, yet the customer has
    /// orders).
    pub async fn customer(
        &self,
        customer_id: Uuid,
        consistency: Option<Consistency>,
    ) -> Result<Positioned<CustomerStats>, ApiError> {
        let read = self
            .read_consistent(CUSTOMER_STATS, consistency, || async move {
                let row = sqlx::query(CUSTOMER_SQL)
                    .bind(customer_id)
                    .fetch_one(&self.pool)
                    .await?;
                let position: i64 = row.try_get("cp_position")?;
                let held_orders: i64 = row.try_get("held_orders")?;
                let held_position: Option<i64> = row.try_get("held_position")?;
                let stats = customer_of(&row, held_orders)?;
                Ok(((stats, held_orders, held_position), position))
            })
            .await?;
        let (stats, held_orders, held_position) = read.value;
        let asked_past_it = match (consistency, held_position) {
            (Some(wanted), Some(at)) => at <= wanted.min_position,
            _ => false,
        };
        if held_orders > 0 && (stats.is_none() || asked_past_it) {
            return Err(ApiError::CustomerHeldBack {
                customer_id,
                held_orders,
                first_event_position: held_position,
                position: read.position,
            });
        }
        match stats {
            Some(stats) => Ok(Positioned {
                value: stats,
                position: read.position,
            }),
            None => Err(ApiError::CustomerNotFound {
                customer_id,
                position: read.position,
            }),
        }
    }

    /// Reads once the projection has reached the requested position: waits on the watch (no
    /// database), then runs `read`, whose second value is the checkpoint read in the same
    /// statement. That fresh checkpoint is the answer's position; if it is below the request
    /// (the watch ran ahead of a reset checkpoint), waits for the next publication and reads
    /// again, so the number of reads is bounded by publications, not by time.
    async fn read_consistent<T, F, Fut>(
        &self,
        projection: &'static str,
        consistency: Option<Consistency>,
        read: F,
    ) -> Result<Positioned<T>, ApiError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(T, i64), ApiError>>,
    {
        let Some(wanted) = consistency else {
            let (value, position) = self.counted(&read).await?;
            return Ok(Positioned { value, position });
        };
        let mut require_change = false;
        let mut waited = false;
        loop {
            let (seen, outcome) = self
                .watcher
                .wait_for(
                    projection,
                    wanted.min_position,
                    wanted.deadline,
                    require_change,
                )
                .await;
            match outcome {
                WaitOutcome::Timeout => {
                    // The watch hears of marks by notification and by a poll every
                    // CHECKPOINT_POLL_MS; the table may hold one it has not heard of yet (a
                    // notification still on its way, `wait_ms=0`). One read, the one the
                    // request makes anyway when it need not wait, tells before a 503.
                    let (value, position) = self.counted(&read).await?;
                    if position >= wanted.min_position {
                        CheckpointWatcher::record_outcome(projection, WaitOutcome::Satisfied);
                        return Ok(Positioned { value, position });
                    }
                    // A position past the end of the log was never handed out by this store
                    // (made up, or from before a restore to an earlier backup): a 503 would
                    // invite retries that cannot help until other commits reach it, and count
                    // as an outage. Asked only now, so a wait that is met costs no query.
                    self.stats.queries.fetch_add(1, Ordering::Relaxed);
                    let head = store::head_position(&self.pool).await?;
                    if wanted.min_position > head {
                        CheckpointWatcher::record_beyond_head(projection);
                        return Err(ApiError::WaitBeyondHead {
                            projection,
                            min_position: wanted.min_position,
                            head,
                            observed: position,
                        });
                    }
                    CheckpointWatcher::record_outcome(projection, WaitOutcome::Timeout);
                    return Err(ApiError::ConsistencyTimeout {
                        projection,
                        min_position: wanted.min_position,
                        // The table's value, read just now, not the watch's: the watch
                        // may still hold a mark the table has since lost (a restore, a
                        // crash that lost the last marks), and the header must never claim
                        // more than the table holds.
                        observed: position,
                        wait_ms: u64::try_from(wanted.wait.as_millis()).unwrap_or(u64::MAX),
                    });
                }
                WaitOutcome::Satisfied => waited = true,
                WaitOutcome::Immediate => {}
            }
            let (value, position) = self.counted(&read).await?;
            if position >= wanted.min_position {
                let outcome = if waited {
                    WaitOutcome::Satisfied
                } else {
                    WaitOutcome::Immediate
                };
                CheckpointWatcher::record_outcome(projection, outcome);
                return Ok(Positioned { value, position });
            }
            tracing::debug!(
                projection,
                seen,
                position,
                "the checkpoint is behind its published position; waiting for the next one"
            );
            require_change = true;
        }
    }

    async fn counted<T, F, Fut>(&self, read: &F) -> Result<(T, i64), ApiError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(T, i64), ApiError>>,
    {
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        read().await
    }
}

/// The summary in a row, or `None` when the LEFT JOIN found no order.
fn summary_of(row: &PgRow) -> Result<Option<OrderSummary>, ApiError> {
    let Some(order_id) = row.try_get::<Option<Uuid>, _>("order_id")? else {
        return Ok(None);
    };
    let status: String = row.try_get("status")?;
    let status = OrderStatus::parse(&status)
        .ok_or_else(|| anyhow::anyhow!("order {order_id} has an unknown status {status:?}"))?;
    let items: serde_json::Value = row.try_get("items")?;
    let items: Vec<LineItem> = serde_json::from_value(items)
        .map_err(|e| anyhow::anyhow!("order {order_id} has unreadable items: {e}"))?;
    let currency: String = row.try_get("currency")?;
    let item_count: i32 = row.try_get("item_count")?;
    let created_at: DateTime<Utc> = row.try_get("created_at")?;
    let updated_at: DateTime<Utc> = row.try_get("updated_at")?;
    Ok(Some(OrderSummary {
        order_id,
        customer_id: row.try_get("customer_id")?,
        status,
        currency: currency.trim_end().to_owned(),
        items,
        total: row.try_get("total")?,
        item_count: i64::from(item_count),
        version: row.try_get("version")?,
        created_at,
        updated_at,
    }))
}

/// The stats in a row, or `None` when the LEFT JOIN found no customer.
fn customer_of(row: &PgRow, held_back_orders: i64) -> Result<Option<CustomerStats>, ApiError> {
    let Some(customer_id) = row.try_get::<Option<Uuid>, _>("customer_id")? else {
        return Ok(None);
    };
    Ok(Some(CustomerStats {
        customer_id,
        order_count: row.try_get("order_count")?,
        total_spent: row.try_get("total_spent")?,
        by_status: ByStatus {
            draft: row.try_get("draft_count")?,
            placed: row.try_get("placed_count")?,
            paid: row.try_get("paid_count")?,
            shipped: row.try_get("shipped_count")?,
            cancelled: row.try_get("cancelled_count")?,
        },
        spent_by_currency: row
            .try_get::<sqlx::types::Json<BTreeMap<String, i64>>, _>("spent_by_currency")?
            .0,
        held_back_orders,
    }))
}
