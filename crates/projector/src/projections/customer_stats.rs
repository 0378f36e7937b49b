//! The `customer_stats` projection: per customer, the number of orders, the number in each
//! status, and `total_spent` (the sum of the totals of paid and shipped orders), also kept per
//! currency in `customer_stats_spent`, since totals in different currencies do not add up.
//!
//! It keeps its own memory of each order in `customer_stats_orders` (customer, status, total,
//! currency), so moving an order from one status count to another never reads another
//! projection's table.
//! The remembered total is the one `OrderPlaced` froze (0 while the order is a draft): items
//! cannot change after placing, and only paid and shipped orders count towards `total_spent`.
//!
//! Batched: one `= ANY($1)` read of the touched orders' memory, the fold in memory, one `UNNEST`
//! upsert of the memory and one statement of two `UNNEST` upserts that *add* the per-customer
//! and per-currency deltas (so two instances touching one customer through different orders
//! never overwrite each other). Owns `customer_stats`, `customer_stats_orders` and
//! `customer_stats_spent`.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use events::{OrderEvent, OrderStatus, RecordedEvent, decode_recorded, order_id_of_stream};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{ApplyError, Projection, next_stream_chunk};
use crate::verify::Report;

/// The `customer_stats` projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct CustomerStats;

/// One order as this projection remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Remembered {
    customer_id: Uuid,
    status: OrderStatus,
    total: i64,
    currency: String,
}

/// The per-customer figures (or a change to them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub order_count: i64,
    pub total_spent: i64,
    /// Counts per status, in [`OrderStatus::ALL`] order.
    pub by_status: [i64; 5],
    /// `total_spent` per currency; a currency whose sum is 0 has no entry.
    pub spent_by_currency: BTreeMap<String, i64>,
}

fn status_index(status: OrderStatus) -> usize {
    OrderStatus::ALL
        .iter()
        .position(|s| *s == status)
        .unwrap_or_default()
}

fn spent(status: OrderStatus, total: i64) -> i64 {
    if status.is_paid_for() { total } else { 0 }
}

/// A customer's spent amounts no longer fit a 64-bit sum (PostgreSQL's `bigint` would refuse
/// them too): about a thousand orders of the largest total. Checked rather than left to wrap
/// (silently, in a release build) into figures nobody spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpentOverflow;

impl Stats {
    fn add_order(&mut self, order: &Remembered) -> Result<(), SpentOverflow> {
        self.order_count += 1;
        self.by_status[status_index(order.status)] += 1;
        self.add_spent(&order.currency, spent(order.status, order.total))
    }

    fn remove_order(&mut self, order: &Remembered) -> Result<(), SpentOverflow> {
        self.order_count -= 1;
        self.by_status[status_index(order.status)] -= 1;
        self.add_spent(&order.currency, -spent(order.status, order.total))
    }

    fn add_spent(&mut self, currency: &str, amount: i64) -> Result<(), SpentOverflow> {
        self.total_spent = self.total_spent.checked_add(amount).ok_or(SpentOverflow)?;
        if amount == 0 {
            return Ok(());
        }
        let sum = self
            .spent_by_currency
            .entry(currency.to_owned())
            .or_default();
        *sum = sum.checked_add(amount).ok_or(SpentOverflow)?;
        if *sum == 0 {
            self.spent_by_currency.remove(currency);
        }
        Ok(())
    }
}

/// The apply's error for a customer whose spent amounts overflow.
fn overflowed(customer: Uuid) -> ApplyError {
    ApplyError::Invalid(format!(
        "customer {customer}: the amounts spent no longer fit a 64-bit sum"
    ))
}

/// Folds the events of one order into its remembered state; `None` before `OrderCreated` or
/// for an order this projection does not know.
fn evolve(
    order_id: Uuid,
    current: Option<Remembered>,
    event: &RecordedEvent,
) -> Result<Option<Remembered>, ApplyError> {
    let decoded = decode_recorded(event)?;
    let require = |current: Option<Remembered>| {
        current.ok_or_else(|| {
            ApplyError::Invalid(format!(
                "{} at version {} of order {order_id}, which was never created",
                event.event_type, event.stream_version
            ))
        })
    };
    Ok(Some(match decoded {
        OrderEvent::OrderCreated(created) => {
            if current.is_some() {
                return Err(ApplyError::Invalid(format!(
                    "order {order_id} created twice"
                )));
            }
            Remembered {
                customer_id: created.customer_id,
                status: OrderStatus::Draft,
                total: 0,
                currency: created.currency.to_string(),
            }
        }
        OrderEvent::OrderPlaced(placed) => Remembered {
            status: OrderStatus::Placed,
            total: placed.total,
            ..require(current)?
        },
        OrderEvent::OrderPaid(_) => Remembered {
            status: OrderStatus::Paid,
            ..require(current)?
        },
        OrderEvent::OrderShipped(_) => Remembered {
            status: OrderStatus::Shipped,
            ..require(current)?
        },
        OrderEvent::OrderCancelled(_) => Remembered {
            status: OrderStatus::Cancelled,
            ..require(current)?
        },
        OrderEvent::ItemAdded(_) | OrderEvent::ItemRemoved(_) => return Ok(current),
    }))
}

/// Column arrays of the per-customer delta upsert: ids, order counts, money, status counts, times.
type DeltaColumns = (
    Vec<Uuid>,
    Vec<i64>,
    Vec<i64>,
    [Vec<i64>; 5],
    Vec<DateTime<Utc>>,
);

const UPSERT_ORDERS: &str = "INSERT INTO customer_stats_orders \
         (order_id, customer_id, status, total, currency) \
     SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int8[], $5::text[]) ORDER BY 1 \
     ON CONFLICT (order_id) DO UPDATE SET customer_id = EXCLUDED.customer_id, \
         status = EXCLUDED.status, total = EXCLUDED.total, currency = EXCLUDED.currency";

/// Both delta upserts in one round trip: per customer and currency (`$10`-`$12`), then per
/// customer. Each in key order, so concurrent applies lock rows in one order.
const ADD_DELTAS: &str = "WITH spent AS ( \
         INSERT INTO customer_stats_spent AS s (customer_id, currency, total_spent) \
         SELECT * FROM UNNEST($10::uuid[], $11::text[], $12::int8[]) ORDER BY 1, 2 \
         ON CONFLICT (customer_id, currency) DO UPDATE SET \
             total_spent = s.total_spent + EXCLUDED.total_spent) \
     INSERT INTO customer_stats AS c (customer_id, order_count, total_spent, \
         draft_count, placed_count, paid_count, shipped_count, cancelled_count, updated_at) \
     SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], \
                          $6::int8[], $7::int8[], $8::int8[], $9::timestamptz[]) ORDER BY 1 \
     ON CONFLICT (customer_id) DO UPDATE SET \
         order_count = c.order_count + EXCLUDED.order_count, \
         total_spent = c.total_spent + EXCLUDED.total_spent, \
         draft_count = c.draft_count + EXCLUDED.draft_count, \
         placed_count = c.placed_count + EXCLUDED.placed_count, \
         paid_count = c.paid_count + EXCLUDED.paid_count, \
         shipped_count = c.shipped_count + EXCLUDED.shipped_count, \
         cancelled_count = c.cancelled_count + EXCLUDED.cancelled_count, \
         updated_at = GREATEST(c.updated_at, EXCLUDED.updated_at)";

impl Projection for CustomerStats {
    const NAME: &'static str = "customer_stats";
    const TABLES: &'static [&'static str] = &[
        "customer_stats",
        "customer_stats_orders",
        "customer_stats_spent",
    ];

    fn handles(event_type: &str) -> bool {
        // Item changes do not move an order between counts: the total that matters is the one
        // `OrderPlaced` freezes.
        !matches!(event_type, "ItemAdded" | "ItemRemoved")
    }

    async fn apply(conn: &mut PgConnection, events: &[RecordedEvent]) -> Result<(), ApplyError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(events.len());
        for event in events {
            ids.push(order_id_of_stream(&event.stream_id).ok_or_else(|| {
                ApplyError::Invalid(format!("`{}` is not an order stream", event.stream_id))
            })?);
        }
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        let rows = sqlx::query(
            "SELECT order_id, customer_id, status, total, currency FROM customer_stats_orders \
             WHERE order_id = ANY($1)",
        )
        .bind(&unique)
        .fetch_all(&mut *conn)
        .await?;
        let mut before: HashMap<Uuid, Remembered> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let id: Uuid = row.try_get("order_id")?;
            let status: String = row.try_get("status")?;
            let status = OrderStatus::parse(&status).ok_or_else(|| {
                ApplyError::Invalid(format!("order {id}: unknown remembered status {status:?}"))
            })?;
            before.insert(
                id,
                Remembered {
                    customer_id: row.try_get("customer_id")?,
                    status,
                    total: row.try_get("total")?,
                    currency: row.try_get("currency")?,
                },
            );
        }
        let mut after: HashMap<Uuid, Option<Remembered>> = HashMap::with_capacity(unique.len());
        let mut touched_at: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
        for (event, id) in events.iter().zip(&ids) {
            let current = match after.get(id) {
                Some(state) => state.clone(),
                None => before.get(id).cloned(),
            };
            let next = evolve(*id, current, event)?;
            if let Some(order) = &next {
                let at = touched_at
                    .entry(order.customer_id)
                    .or_insert(event.recorded_at);
                *at = (*at).max(event.recorded_at);
            }
            after.insert(*id, next);
        }
        // Per customer: remove each touched order as it was, add it as it is now.
        let mut deltas: BTreeMap<Uuid, Stats> = BTreeMap::new();
        let (mut o_id, mut o_customer, mut o_status, mut o_total, mut o_currency) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (id, now) in &after {
            let Some(now) = now else { continue };
            if let Some(was) = before.get(id) {
                if was == now {
                    continue;
                }
                deltas
                    .entry(was.customer_id)
                    .or_default()
                    .remove_order(was)
                    .map_err(|SpentOverflow| overflowed(was.customer_id))?;
            }
            deltas
                .entry(now.customer_id)
                .or_default()
                .add_order(now)
                .map_err(|SpentOverflow| overflowed(now.customer_id))?;
            o_id.push(*id);
            o_customer.push(now.customer_id);
            o_status.push(now.status.as_str().to_owned());
            o_total.push(now.total);
            o_currency.push(now.currency.as_str());
        }
        if o_id.is_empty() {
            return Ok(());
        }
        sqlx::query(UPSERT_ORDERS)
            .bind(&o_id)
            .bind(&o_customer)
            .bind(&o_status)
            .bind(&o_total)
            .bind(&o_currency)
            .execute(&mut *conn)
            .await?;
        let mut cols = DeltaColumns::default();
        let (mut s_customer, mut s_currency, mut s_amount) = (Vec::new(), Vec::new(), Vec::new());
        for (customer, d) in &deltas {
            cols.0.push(*customer);
            cols.1.push(d.order_count);
            cols.2.push(d.total_spent);
            for (i, count) in d.by_status.iter().enumerate() {
                cols.3[i].push(*count);
            }
            cols.4
                .push(touched_at.get(customer).copied().unwrap_or_else(Utc::now));
            for (currency, amount) in &d.spent_by_currency {
                s_customer.push(*customer);
                s_currency.push(currency.as_str());
                s_amount.push(*amount);
            }
        }
        let [draft, placed, paid, shipped, cancelled] = &cols.3;
        sqlx::query(ADD_DELTAS)
            .bind(&cols.0)
            .bind(&cols.1)
            .bind(&cols.2)
            .bind(draft)
            .bind(placed)
            .bind(paid)
            .bind(shipped)
            .bind(cancelled)
            .bind(&cols.4)
            .bind(&s_customer)
            .bind(&s_currency)
            .bind(&s_amount)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    async fn verify(conn: &mut PgConnection) -> Result<Report, sqlx::Error> {
        let mut report = Report::default();
        // Expected figures per customer. Memory grows with the number of customers (a few
        // dozen bytes each); the events themselves are read one chunk of streams at a time.
        let mut expected: BTreeMap<Uuid, Stats> = BTreeMap::new();
        // Customers whose sums overflow, each reported once however many orders pass the bound.
        let mut overflowed = std::collections::BTreeSet::new();
        let mut after = String::new();
        loop {
            let chunk = next_stream_chunk(conn, &after).await?;
            let Some((last, _)) = chunk.last() else { break };
            after = last.clone();
            for (stream, events) in &chunk {
                let Some(id) = order_id_of_stream(stream) else {
                    continue;
                };
                let folded = events
                    .iter()
                    .filter(|e| Self::handles(&e.event_type))
                    .try_fold(None, |state, e| evolve(id, state, e));
                match folded {
                    Ok(Some(order)) => {
                        let added = expected
                            .entry(order.customer_id)
                            .or_default()
                            .add_order(&order);
                        if added.is_err() && overflowed.insert(order.customer_id) {
                            // The event store's orders add up past what the read model
                            // can hold: the expected figure itself cannot be stored.
                            report.push(
                                order.customer_id,
                                "total_spent",
                                "the event store's sum, which overflows 64 bits",
                                "what the read model can hold (the events past it are \
                                 dead-lettered, or were purged)",
                            );
                        }
                    }
                    Ok(None) => {}
                    Err(e) => report.push(id, "fold", "a foldable stream", e),
                }
            }
        }
        let mut actual: BTreeMap<Uuid, Stats> = BTreeMap::new();
        // Keyset paging whose first page has no bound, rather than starting from the nil UUID:
        // the command service accepts the nil UUID as a customer id like any other, and
        // `> nil` would skip it. (Two statements, not `$1 IS NULL OR …`, which a generic plan
        // could not turn into an index bound.)
        macro_rules! stats {
            ($rest:literal) => {
                concat!(
                    "SELECT customer_id, order_count, total_spent, draft_count, placed_count, \
                     paid_count, shipped_count, cancelled_count FROM customer_stats ",
                    $rest
                )
            };
        }
        let mut last: Option<Uuid> = None;
        loop {
            let rows = match last {
                None => sqlx::query(stats!("ORDER BY customer_id LIMIT 10000")),
                Some(after) => sqlx::query(stats!(
                    "WHERE customer_id > $1 ORDER BY customer_id LIMIT 10000"
                ))
                .bind(after),
            }
            .fetch_all(&mut *conn)
            .await?;
            let Some(row) = rows.last() else { break };
            last = Some(row.try_get("customer_id")?);
            for row in &rows {
                actual.insert(
                    row.try_get("customer_id")?,
                    Stats {
                        order_count: row.try_get("order_count")?,
                        total_spent: row.try_get("total_spent")?,
                        by_status: [
                            row.try_get("draft_count")?,
                            row.try_get("placed_count")?,
                            row.try_get("paid_count")?,
                            row.try_get("shipped_count")?,
                            row.try_get("cancelled_count")?,
                        ],
                        spent_by_currency: BTreeMap::new(),
                    },
                );
            }
        }
        macro_rules! spent {
            ($bound:literal) => {
                concat!(
                    "SELECT customer_id, currency, total_spent FROM customer_stats_spent \
                     WHERE total_spent <> 0 ",
                    $bound,
                    " ORDER BY customer_id, currency LIMIT 10000"
                )
            };
        }
        let mut last: Option<(Uuid, String)> = None;
        loop {
            let rows = match &last {
                None => sqlx::query(spent!("")),
                Some((customer, currency)) => {
                    sqlx::query(spent!("AND (customer_id, currency) > ($1, $2)"))
                        .bind(*customer)
                        .bind(currency.as_str())
                }
            }
            .fetch_all(&mut *conn)
            .await?;
            let Some(row) = rows.last() else { break };
            last = Some((row.try_get("customer_id")?, row.try_get("currency")?));
            for row in &rows {
                let customer: Uuid = row.try_get("customer_id")?;
                actual
                    .entry(customer)
                    .or_default()
                    .spent_by_currency
                    .insert(row.try_get("currency")?, row.try_get("total_spent")?);
            }
        }
        for (customer, e) in &expected {
            report.compared += 1;
            let Some(a) = actual.remove(customer) else {
                report.push(customer, "row", "present", "missing");
                continue;
            };
            report.compare(customer, "order_count", &e.order_count, &a.order_count);
            report.compare(customer, "total_spent", &e.total_spent, &a.total_spent);
            report.compare(
                customer,
                "spent_by_currency",
                &e.spent_by_currency,
                &a.spent_by_currency,
            );
            for (i, status) in OrderStatus::ALL.iter().enumerate() {
                let field = format!("{}_count", status.as_str());
                report.compare(customer, &field, &e.by_status[i], &a.by_status[i]);
            }
        }
        for (customer, a) in actual {
            if a != Stats::default() {
                report.push(customer, "row", "absent", "present");
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn paid(customer_id: Uuid, total: i64) -> Remembered {
        Remembered {
            customer_id,
            status: OrderStatus::Paid,
            total,
            currency: "EUR".to_owned(),
        }
    }

    /// Spent amounts past a 64-bit sum are an error, never a wrapped figure; below it, adding
    /// and removing an order leave the figures as they were.
    #[test]
    fn spent_amounts_past_a_64_bit_sum_are_refused_not_wrapped() {
        let customer = Uuid::new_v4();
        let big = paid(customer, events::money::MAX_AMOUNT);
        let mut stats = Stats::default();
        let mut added = 0;
        while stats.add_order(&big).is_ok() {
            added += 1;
            assert!(added <= 1_100, "never refused");
        }
        assert_eq!(added, i64::MAX / events::money::MAX_AMOUNT);
        assert!(stats.total_spent > 0, "not wrapped: {}", stats.total_spent);

        let mut stats = Stats::default();
        stats.add_order(&big).unwrap();
        stats.remove_order(&big).unwrap();
        assert_eq!(stats.total_spent, 0);
        assert!(stats.spent_by_currency.is_empty());
    }
}
