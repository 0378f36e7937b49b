//! `ceiling`: what this machine's PostgreSQL can do at best for our events table, measured in
//! the same run as the service: closed-loop clients each committing multi-row INSERT
//! transactions (the store's own `UNNEST` statement, realistic payloads) into a scratch copy of
//! the schema, without the append lock, version checks or HTTP. The service's events/s is
//! reported as a fraction of this.

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
}

impl CeilingResult {
    /// The best events/s at a client count (over batch sizes).
    pub fn best_at(&self, clients: usize) -> Option<&CeilingPoint> {
        self.points
            .iter()
            .filter(|p| p.clients == clients)
            .max_by(|a, b| a.events_per_sec.total_cmp(&b.events_per_sec))
    }
}

/// Measures every (clients, batch) pair on `pool` (a migrated scratch database).
pub async fn run(
    pool: &PgPool,
    levels: &[usize],
    batches: &[usize],
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
    for &clients in levels {
        let clients = clients.min(MAX_CEILING_CONNECTIONS);
        for &rows in batches {
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
    }
    Ok(CeilingResult { points })
}
