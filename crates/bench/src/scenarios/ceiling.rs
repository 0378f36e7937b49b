//! `ceiling`: what this machine's PostgreSQL can do at best for our events table, measured in
//! the same run as the service: closed-loop clients each committing multi-row INSERT
//! transactions (the store's own `UNNEST` statement, realistic payloads) into a scratch copy of
//! the schema, without the append lock, version checks or HTTP. The service's events/s is
//! reported as a fraction of this.
//!
//! The target's denominator is the best rate at the service's concurrency over the batch
//! sizes measured (`--ceiling-batches`, 1 and 64 rows by default): 64 clients × 64 rows keeps
//! up to 4,096 rows in flight, where the service, one group commit at a time under its append
//! lock, has at most 64. So one more point is measured at that concurrency with transactions
//! the size of the service's own group commit ([`ServiceBatch`]), and the report gives the
//! service's share of both.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use events::{EventMetadata, OrderEvent, order_stream_id};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::stats::{Latencies, LatencySummary, rate};

/// Most connections the ceiling opens: PostgreSQL here allows 100 in all, shared with others.
pub const MAX_CEILING_CONNECTIONS: usize = 64;

/// The statement the store itself uses to insert a batch (crates/store/src/append.rs).
const INSERT: &str = "INSERT INTO events (global_position, event_id, stream_id, stream_version, \
                      event_type, schema_version, data, metadata) \
                      SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], \
                      $5::text[], $6::int[], $7::jsonb[], $8::jsonb[])";

/// Rows per transaction of the service-sized point when the run has no measured group-commit
/// size (the ceiling run alone, or the service's `/metrics` unreadable): command-service's mean
/// group commit carried about 30 requests at 64 clients in the published runs.
pub const SERVICE_BATCH_FALLBACK_ROWS: usize = 32;

/// One (clients, rows per transaction) configuration.
#[derive(Debug, Clone, Serialize)]
pub struct CeilingPoint {
    pub clients: usize,
    pub rows_per_transaction: usize,
    pub transactions: u64,
    pub events_per_sec: f64,
    /// Latency of one transaction (BEGIN … COMMIT).
    pub transaction_latency: LatencySummary,
}

/// All configurations measured.
#[derive(Debug, Clone, Serialize)]
pub struct CeilingResult {
    pub points: Vec<CeilingPoint>,
    /// The extra point sized like the service's group commit, if one was planned.
    pub service_batch: Option<ServiceBatch>,
}

/// The ceiling point sized like the service's own group commit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ServiceBatch {
    /// The service's concurrency (capped at [`MAX_CEILING_CONNECTIONS`]).
    pub clients: usize,
    /// Rows per transaction: the service's mean group commit, rounded.
    pub rows_per_transaction: usize,
    /// The service's mean requests per group commit (`event_store_batch_requests`) over its
    /// saturation level in the same run; `None` when it was not measured and
    /// [`SERVICE_BATCH_FALLBACK_ROWS`] was used.
    pub measured_mean: Option<f64>,
}

impl ServiceBatch {
    /// The service-sized point for a service measured at `clients` whose group commits carried
    /// `measured_mean` requests on average (`None`: not measured).
    pub fn new(clients: usize, measured_mean: Option<f64>) -> Self {
        let measured_mean = measured_mean.filter(|mean| mean.is_finite() && *mean >= 1.0);
        Self {
            clients: clients.clamp(1, MAX_CEILING_CONNECTIONS),
            rows_per_transaction: measured_mean
                .map_or(SERVICE_BATCH_FALLBACK_ROWS, |mean| mean.round() as usize),
            measured_mean,
        }
    }
}

impl CeilingResult {
    /// The best events/s at a client count (over batch sizes): the target's denominator.
    pub fn best_at(&self, clients: usize) -> Option<&CeilingPoint> {
        self.points
            .iter()
            .filter(|p| p.clients == clients)
            .max_by(|a, b| a.events_per_sec.total_cmp(&b.events_per_sec))
    }

    /// The point measured at the service-sized batch, if any.
    pub fn service_sized(&self) -> Option<&CeilingPoint> {
        let batch = self.service_batch?;
        self.points.iter().find(|p| {
            p.clients == batch.clients && p.rows_per_transaction == batch.rows_per_transaction
        })
    }
}

/// The (clients, rows per transaction) configurations to measure, in order: every batch size
/// at every level (client counts capped at [`MAX_CEILING_CONNECTIONS`]), plus the
/// service-sized batch at its level; no configuration twice.
pub fn plan(
    levels: &[usize],
    batches: &[usize],
    service_batch: Option<ServiceBatch>,
) -> Vec<(usize, usize)> {
    let mut levels: Vec<usize> = levels
        .iter()
        .map(|&clients| clients.clamp(1, MAX_CEILING_CONNECTIONS))
        .collect();
    if let Some(batch) = service_batch {
        levels.push(batch.clients);
    }
    levels.sort_unstable();
    levels.dedup();
    let mut configurations = Vec::new();
    for clients in levels {
        let mut rows: Vec<usize> = batches.iter().map(|&rows| rows.max(1)).collect();
        if let Some(batch) = service_batch.filter(|b| b.clients == clients) {
            rows.push(batch.rows_per_transaction);
        }
        rows.sort_unstable();
        rows.dedup();
        configurations.extend(rows.into_iter().map(|rows| (clients, rows)));
    }
    configurations
}

/// Measures every (clients, rows per transaction) configuration of `configurations` on `pool`
/// (a migrated scratch database), each after `warmup`.
pub async fn run(
    pool: &PgPool,
    configurations: &[(usize, usize)],
    service_batch: Option<ServiceBatch>,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<CeilingResult> {
    let next_position = Arc::new(AtomicI64::new(
        store::head_position(pool)
            .await
            .context("read the ceiling head")?
            + 1,
    ));
    let payload = OrderEvent::ItemAdded(events::order::ItemAdded {
        sku: events::money::Sku::parse("SKU-1").context("a valid SKU")?,
        quantity: 2,
        unit_price: 250,
    });
    let template = payload.to_new_event(EventMetadata {
        correlation_id: Some(Uuid::new_v4().to_string()),
        causation_id: Some(Uuid::new_v4().to_string()),
        command_id: Some(Uuid::new_v4().to_string()),
        actor: Some("bench".into()),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    });
    let data = template.data.clone();
    let metadata = serde_json::to_value(&template.metadata).context("encode metadata")?;
    let mut points = Vec::new();
    for &(clients, rows) in configurations {
        let clients = clients.clamp(1, MAX_CEILING_CONNECTIONS);
        let start = Instant::now();
        let measure_from = start + warmup;
        let measure_until = measure_from + measure;
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let pool = pool.clone();
            let next_position = next_position.clone();
            let data = data.clone();
            let metadata = metadata.clone();
            let mut latencies = Latencies::new()?;
            tasks.push(tokio::spawn(async move {
                let mut transactions = 0u64;
                while Instant::now() < measure_until {
                    let first = next_position.fetch_add(rows as i64, Ordering::Relaxed);
                    let stream = order_stream_id(Uuid::now_v7());
                    let positions: Vec<i64> = (first..first + rows as i64).collect();
                    let ids: Vec<Uuid> = (0..rows).map(|_| Uuid::now_v7()).collect();
                    let streams = vec![stream; rows];
                    let versions: Vec<i64> = (1..=rows as i64).collect();
                    let types = vec!["ItemAdded".to_owned(); rows];
                    let schema_versions = vec![1i32; rows];
                    let datas = vec![data.clone(); rows];
                    let metas = vec![metadata.clone(); rows];
                    let sent = Instant::now();
                    let mut tx = pool.begin().await?;
                    sqlx::query(INSERT)
                        .bind(&positions)
                        .bind(&ids)
                        .bind(&streams)
                        .bind(&versions)
                        .bind(&types)
                        .bind(&schema_versions)
                        .bind(&datas)
                        .bind(&metas)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    let done = Instant::now();
                    if done >= measure_from && done < measure_until {
                        transactions += 1;
                        latencies.record(done - sent);
                    }
                }
                anyhow::Ok((transactions, latencies))
            }));
        }
        let mut transactions = 0;
        let mut latencies = Latencies::new()?;
        for task in tasks {
            let (count, series) = task.await??;
            transactions += count;
            latencies.merge(&series);
        }
        let point = CeilingPoint {
            clients,
            rows_per_transaction: rows,
            transactions,
            events_per_sec: rate(transactions * rows as u64, measure),
            transaction_latency: latencies.summary(),
        };
        eprintln!(
            "ceiling: {clients} clients x {rows} rows: {:.0} events/s",
            point.events_per_sec
        );
        points.push(point);
    }
    Ok(CeilingResult {
        points,
        service_batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_sized_batch_is_the_measured_mean_rounded_else_the_fallback() {
        assert_eq!(
            ServiceBatch::new(64, Some(30.4)),
            ServiceBatch {
                clients: 64,
                rows_per_transaction: 30,
                measured_mean: Some(30.4)
            }
        );
        let unmeasured = ServiceBatch::new(128, None);
        assert_eq!(unmeasured.clients, MAX_CEILING_CONNECTIONS);
        assert_eq!(unmeasured.rows_per_transaction, SERVICE_BATCH_FALLBACK_ROWS);
        assert_eq!(
            ServiceBatch::new(64, Some(0.0)).rows_per_transaction,
            SERVICE_BATCH_FALLBACK_ROWS,
            "a level without group commits has no batch size"
        );
    }

    #[test]
    fn the_plan_adds_the_service_sized_batch_only_at_the_service_concurrency() {
        let batch = ServiceBatch::new(64, Some(30.0));
        assert_eq!(
            plan(&[1, 64], &[1, 64], Some(batch)),
            [(1, 1), (1, 64), (64, 1), (64, 30), (64, 64)]
        );
        assert_eq!(
            plan(&[1, 64], &[1, 64], None),
            [(1, 1), (1, 64), (64, 1), (64, 64)]
        );
    }

    #[test]
    fn the_plan_measures_no_configuration_twice() {
        let batch = ServiceBatch::new(100, Some(64.2));
        assert_eq!(plan(&[64, 100], &[64], Some(batch)), [(64, 64)]);
    }

    fn point(clients: usize, rows: usize, events_per_sec: f64) -> CeilingPoint {
        CeilingPoint {
            clients,
            rows_per_transaction: rows,
            transactions: 1,
            events_per_sec,
            transaction_latency: LatencySummary::default(),
        }
    }

    #[test]
    fn the_best_point_stays_the_denominator_and_the_service_sized_one_is_found_beside_it() {
        let result = CeilingResult {
            points: vec![
                point(64, 1, 6_000.0),
                point(64, 30, 40_000.0),
                point(64, 64, 80_000.0),
            ],
            service_batch: Some(ServiceBatch::new(64, Some(29.6))),
        };
        assert_eq!(result.best_at(64).map(|p| p.rows_per_transaction), Some(64));
        assert_eq!(
            result.service_sized().map(|p| p.events_per_sec),
            Some(40_000.0)
        );
    }
}
