//! The `order_summaries` projection: one row per order, exactly [`events::SummaryFold`] of the
//! order's stream, plus `created_position` (the global position of its `OrderCreated`).
//!
//! Batched: the rows of every order in the batch are loaded with one `= ANY($1)` query, turned
//! back into folds with [`SummaryFold::from_summary`], the events are folded in memory, and the
//! rows are written back with one `UNNEST` upsert. Owns the `order_summaries` table only.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use events::{LineItem, OrderStatus, OrderSummary, RecordedEvent, SummaryFold, order_id_of_stream};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{ApplyError, Projection, next_stream_chunk};
use crate::verify::Report;

/// The read model table.
pub const TABLE: &str = "order_summaries";

/// The `order_summaries` projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderSummaries;

/// A stored row: the summary and the position of the order's creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryRow {
    pub summary: OrderSummary,
    pub created_position: i64,
}

const SELECT_ROWS: &str = "SELECT order_id, customer_id, status, currency, items, total, \
     item_count, version, created_at, updated_at, created_position \
     FROM order_summaries WHERE order_id = ANY($1)";

fn row_to_summary(row: &sqlx::postgres::PgRow) -> Result<SummaryRow, ApplyError> {
    let order_id: Uuid = row.try_get("order_id")?;
    let status: String = row.try_get("status")?;
    let status = OrderStatus::parse(&status).ok_or_else(|| {
        ApplyError::Invalid(format!("order {order_id}: unknown status {status:?}"))
    })?;
    let items: serde_json::Value = row.try_get("items")?;
    let items: Vec<LineItem> = serde_json::from_value(items)
        .map_err(|e| ApplyError::Invalid(format!("order {order_id}: stored items: {e}")))?;
    let currency: String = row.try_get("currency")?;
    let item_count: i32 = row.try_get("item_count")?;
    Ok(SummaryRow {
        summary: OrderSummary {
            order_id,
            customer_id: row.try_get("customer_id")?,
            status,
            currency: currency.trim().to_owned(),
            items,
            total: row.try_get("total")?,
            item_count: i64::from(item_count),
            version: row.try_get("version")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        },
        created_position: row.try_get("created_position")?,
    })
}

/// Loads the stored rows of `order_ids`.
pub async fn load(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<HashMap<Uuid, SummaryRow>, ApplyError> {
    let rows = sqlx::query(SELECT_ROWS)
        .bind(order_ids)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|row| row_to_summary(row).map(|r| (r.summary.order_id, r)))
        .collect()
}

fn order_id(event: &RecordedEvent) -> Result<Uuid, ApplyError> {
    order_id_of_stream(&event.stream_id)
        .ok_or_else(|| ApplyError::Invalid(format!("`{}` is not an order stream", event.stream_id)))
}

/// A fold in progress and the position of the order's creation once known.
#[derive(Default)]
struct Folding {
    fold: SummaryFold,
    created_position: Option<i64>,
}

impl Folding {
    fn apply(&mut self, event: &RecordedEvent) -> Result<(), ApplyError> {
        // The engine is the version guard: it hands over exactly the next unapplied versions.
        // A version gap here can only mean an event the operator skipped (`dlq purge`), so the
        // fold follows the engine rather than refusing every later event of the order.
        if self.fold.state.order.is_some() && event.stream_version > self.fold.state.version + 1 {
            self.fold.state.version = event.stream_version - 1;
        }
        let existed = self.fold.state.order.is_some();
        self.fold.apply(event)?;
        if !existed {
            self.created_position = Some(event.global_position);
        }
        Ok(())
    }
}

/// Column arrays of an `UNNEST` upsert.
#[derive(Default)]
struct Columns {
    order_id: Vec<Uuid>,
    customer_id: Vec<Uuid>,
    status: Vec<String>,
    currency: Vec<String>,
    items: Vec<String>,
    total: Vec<i64>,
    item_count: Vec<i32>,
    version: Vec<i64>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    created_position: Vec<i64>,
}

const UPSERT: &str = "INSERT INTO order_summaries (order_id, customer_id, status, currency, items, \
     total, item_count, version, created_at, updated_at, created_position) \
     SELECT u.order_id, u.customer_id, u.status, u.currency, u.items::jsonb, u.total, \
            u.item_count, u.version, u.created_at, u.updated_at, u.created_position \
     FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::int8[], \
                 $7::int4[], $8::int8[], $9::timestamptz[], $10::timestamptz[], $11::int8[]) \
          AS u(order_id, customer_id, status, currency, items, total, item_count, version, \
               created_at, updated_at, created_position) \
     ORDER BY u.order_id \
     ON CONFLICT (order_id) DO UPDATE SET customer_id = EXCLUDED.customer_id, \
         status = EXCLUDED.status, currency = EXCLUDED.currency, items = EXCLUDED.items, \
         total = EXCLUDED.total, item_count = EXCLUDED.item_count, version = EXCLUDED.version, \
         created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, \
         created_position = EXCLUDED.created_position";

impl Projection for OrderSummaries {
    const NAME: &'static str = "order_summaries";
    const TABLES: &'static [&'static str] = &[TABLE];

    fn handles(event_type: &str) -> bool {
        // Every order event changes at least the version and `updated_at`; unknown types are
        // handed over too, so the fold reports them instead of silently skipping them.
        let _ = event_type;
        true
    }

    async fn apply(conn: &mut PgConnection, events: &[RecordedEvent]) -> Result<(), ApplyError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<Uuid> = events.iter().map(order_id).collect::<Result<_, _>>()?;
        ids.sort_unstable();
        ids.dedup();
        let stored = load(conn, &ids).await?;
        let mut folds: HashMap<Uuid, Folding> = stored
            .into_iter()
            .map(|(id, row)| {
                (
                    id,
                    Folding {
                        fold: SummaryFold::from_summary(&row.summary),
                        created_position: Some(row.created_position),
                    },
                )
            })
            .collect();
        for event in events {
            folds.entry(order_id(event)?).or_default().apply(event)?;
        }
        let mut cols = Columns::default();
        for (id, folding) in folds {
            let (Some(summary), Some(created_position)) =
                (folding.fold.summary(), folding.created_position)
            else {
                return Err(ApplyError::Invalid(format!("order {id} was never created")));
            };
            cols.order_id.push(summary.order_id);
            cols.customer_id.push(summary.customer_id);
            cols.status.push(summary.status.as_str().to_owned());
            cols.currency.push(summary.currency);
            cols.items.push(
                serde_json::to_string(&summary.items)
                    .map_err(|e| ApplyError::Invalid(format!("order {id}: items: {e}")))?,
            );
            cols.total.push(summary.total);
            cols.item_count
                .push(i32::try_from(summary.item_count).unwrap_or(i32::MAX));
            cols.version.push(summary.version);
            cols.created_at.push(summary.created_at);
            cols.updated_at.push(summary.updated_at);
            cols.created_position.push(created_position);
        }
        sqlx::query(UPSERT)
            .bind(&cols.order_id)
            .bind(&cols.customer_id)
            .bind(&cols.status)
            .bind(&cols.currency)
            .bind(&cols.items)
            .bind(&cols.total)
            .bind(&cols.item_count)
            .bind(&cols.version)
            .bind(&cols.created_at)
            .bind(&cols.updated_at)
            .bind(&cols.created_position)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    async fn verify(conn: &mut PgConnection) -> Result<Report, sqlx::Error> {
        let mut report = Report::default();
        let mut after = String::new();
        loop {
            let chunk = next_stream_chunk(conn, &after).await?;
            let Some((last, _)) = chunk.last() else { break };
            after = last.clone();
            let ids: Vec<Uuid> = chunk
                .iter()
                .filter_map(|(stream, _)| order_id_of_stream(stream))
                .collect();
            let stored = match load(conn, &ids).await {
                Ok(stored) => stored,
                Err(ApplyError::Database(e)) => return Err(e),
                Err(other) => {
                    report.push("order_summaries", "rows", "readable rows", other);
                    continue;
                }
            };
            for (stream, events) in &chunk {
                report.compared += 1;
                let Some(id) = order_id_of_stream(stream) else {
                    continue;
                };
                let mut folding = Folding::default();
                if let Err(e) = events.iter().try_for_each(|e| folding.apply(e)) {
                    report.push(id, "fold", "a foldable stream", e);
                    continue;
                }
                let expected = folding.fold.summary().zip(folding.created_position);
                match (expected, stored.get(&id)) {
                    (None, None) => {}
                    (Some(_), None) => report.push(id, "row", "present", "missing"),
                    (None, Some(_)) => report.push(id, "row", "absent", "present"),
                    (Some((e, pos)), Some(a)) => compare(&mut report, &e, pos, a),
                }
            }
        }
        // Rows for orders that have no events at all.
        let extra: Vec<Uuid> = sqlx::query_scalar(
            "SELECT s.order_id FROM order_summaries s WHERE NOT EXISTS \
             (SELECT 1 FROM events e WHERE e.stream_id = 'order-' || s.order_id::text) \
             ORDER BY s.order_id LIMIT 1000",
        )
        .fetch_all(&mut *conn)
        .await?;
        for id in extra {
            report.push(id, "row", "absent (no events)", "present");
        }
        Ok(report)
    }
}

fn compare(report: &mut Report, e: &OrderSummary, created_position: i64, a: &SummaryRow) {
    let id = e.order_id;
    let s = &a.summary;
    report.compare(id, "customer_id", &e.customer_id, &s.customer_id);
    report.compare(id, "status", &e.status.as_str(), &s.status.as_str());
    report.compare(id, "currency", &e.currency, &s.currency);
    let items = |items: &[LineItem]| serde_json::to_string(items).unwrap_or_default();
    report.compare(id, "items", &items(&e.items), &items(&s.items));
    report.compare(id, "total", &e.total, &s.total);
    report.compare(id, "item_count", &e.item_count, &s.item_count);
    report.compare(id, "version", &e.version, &s.version);
    report.compare(id, "created_at", &e.created_at, &s.created_at);
    report.compare(id, "updated_at", &e.updated_at, &s.updated_at);
    report.compare(
        id,
        "created_position",
        &created_position,
        &a.created_position,
    );
}
