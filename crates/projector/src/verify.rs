//! `projector verify`: the read model against a fresh fold of the event store.
//!
//! Each projection computes its differences ([`crate::projections::Projection::verify`]); this
//! module owns the report (bounded: the first [`MAX_SHOWN`] differences are kept, the rest only
//! counted), its printing, and the consistent snapshot the comparison runs in. It never writes.

use anyhow::Context as _;
use sqlx::{Connection, PgPool};

use crate::projections::ProjectionKind;

/// How many differences are kept and printed; the rest are counted.
pub const MAX_SHOWN: usize = 50;

/// One field that differs between the read model and the fold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The row's key (an order id or a customer id).
    pub id: String,
    /// The column, or `row` when the whole row is missing or unexpected.
    pub field: String,
    /// What the fold of the event store says.
    pub expected: String,
    /// What the read model holds.
    pub actual: String,
}

/// The differences found, bounded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The first [`MAX_SHOWN`] differences.
    pub shown: Vec<Difference>,
    /// How many differences there are in all.
    pub total: u64,
    /// How many rows (orders or customers) were compared.
    pub compared: u64,
}

impl Report {
    /// Records a difference.
    pub fn push(
        &mut self,
        id: impl std::fmt::Display,
        field: &str,
        expected: impl std::fmt::Display,
        actual: impl std::fmt::Display,
    ) {
        self.total += 1;
        if self.shown.len() < MAX_SHOWN {
            self.shown.push(Difference {
                id: id.to_string(),
                field: field.to_owned(),
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
    }

    /// Compares two values of a field and records a difference when they are unequal.
    pub fn compare<T: PartialEq + std::fmt::Debug>(
        &mut self,
        id: impl std::fmt::Display,
        field: &str,
        expected: &T,
        actual: &T,
    ) {
        if expected != actual {
            self.push(id, field, format!("{expected:?}"), format!("{actual:?}"));
        }
    }

    /// Whether the read model matches.
    pub fn is_clean(&self) -> bool {
        self.total == 0
    }

    /// The human-readable report.
    pub fn render(&self, projection: ProjectionKind) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        if self.is_clean() {
            let _ = writeln!(
                out,
                "{projection}: OK, {} rows match the event store",
                self.compared
            );
            return out;
        }
        let _ = writeln!(
            out,
            "{projection}: {} difference(s) across {} compared rows",
            self.total, self.compared
        );
        for d in &self.shown {
            let _ = writeln!(
                out,
                "  {} {}: expected {} but found {}",
                d.id, d.field, d.expected, d.actual
            );
        }
        let hidden = self.total.saturating_sub(self.shown.len() as u64);
        if hidden > 0 {
            let _ = writeln!(out, "  … and {hidden} more difference(s)");
        }
        out
    }
}

/// Fails when the store holds events `projection` reads but this build cannot (a newer release
/// wrote them): the fold would call every order holding one a difference, and the difference
/// is this build's age, not the read model's. One pass over the events, as the fold makes.
async fn refuse_events_of_a_newer_release(
    conn: &mut sqlx::PgConnection,
    projection: ProjectionKind,
) -> anyhow::Result<()> {
    let kinds: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT event_type, schema_version, min(global_position) FROM events \
         GROUP BY event_type, schema_version",
    )
    .fetch_all(&mut *conn)
    .await
    .context("read the event types in the store")?;
    let unreadable = kinds
        .iter()
        .find(|(event_type, version, _)| projection.needs_newer_release(event_type, *version));
    if let Some((event_type, version, position)) = unreadable {
        anyhow::bail!(
            "the event store holds events a newer release than this projector wrote \
             ({event_type} v{version}, the first at position {position}); nothing was compared: \
             verify {projection} with that release"
        );
    }
    Ok(())
}

/// Runs the comparison of `projection` in one read-only REPEATABLE READ transaction, so the
/// events and the read model are read at the same instant. Differences that appear only because
/// the projector lags behind the event store are real differences at that instant: verify a live
/// system once `projector_lag_events` is 0, or with writes stopped.
pub async fn verify(pool: &PgPool, projection: ProjectionKind) -> anyhow::Result<Report> {
    let mut conn = pool.acquire().await.context("connect to Postgres")?;
    let mut tx = conn.begin().await.context("begin the verify transaction")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .context("set the snapshot isolation of verify")?;
    // Folding a large store between two reads can outlast the services' limit on an idle
    // transaction (`platform::db::IDLE_IN_TRANSACTION_TIMEOUT`); this read-only one holds no
    // lock anyone waits on.
    sqlx::query("SET LOCAL idle_in_transaction_session_timeout = 0")
        .execute(&mut *tx)
        .await
        .context("lift the idle-transaction limit for verify")?;
    refuse_events_of_a_newer_release(&mut tx, projection).await?;
    let report = projection
        .verify(&mut tx)
        .await
        .with_context(|| format!("compare {projection} with the event store"))?;
    tx.rollback().await.ok();
    Ok(report)
}
