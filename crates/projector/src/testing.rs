//! (feature `test-util`) What the tests of a rebuild share: [`RebuildGate`], which holds a
//! `projector rebuild` of `order_summaries` in mid-fold for as long as a test needs, so what
//! happens meanwhile is shown rather than raced. Never used by the binary.

#![allow(clippy::expect_used)]

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// The advisory lock the gate holds while it is closed.
const GATE_LOCK: i64 = 0x6761_7465;

/// A closed gate at the first write of one order to a rebuild's shadow `order_summaries`: a
/// check constraint on the live table, which the rebuild's shadow copy takes over with the
/// rest of the table's definition, waits there for an advisory lock the gate holds. Writes to
/// the live table pass. [`RebuildGate::open`] (or dropping the gate's connection) lets the
/// rebuild go on.
pub struct RebuildGate(PgConnection);

impl RebuildGate {
    /// Installs the gate at `order` in `pool`'s database and closes it.
    pub async fn hold_at(pool: &PgPool, order: Uuid) -> Self {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE FUNCTION rebuild_gate(t oid, id uuid) RETURNS boolean LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF id = '{order}' AND (SELECT n.nspname FROM pg_class c \
                                       JOIN pg_namespace n ON n.oid = c.relnamespace \
                                       WHERE c.oid = t) LIKE 'projector_rebuild_%' THEN \
                 PERFORM pg_advisory_xact_lock_shared({GATE_LOCK}); \
               END IF; \
               RETURN true; \
             END $$; \
             ALTER TABLE order_summaries ADD CONSTRAINT rebuild_gate \
               CHECK (rebuild_gate(tableoid, order_id));"
        )))
        .execute(pool)
        .await
        .expect("install the rebuild gate");
        let mut holder = pool.acquire().await.expect("a connection").detach();
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(GATE_LOCK)
            .execute(&mut holder)
            .await
            .expect("close the gate");
        Self(holder)
    }

    /// Whether a session of `pool`'s database is waiting at the gate: the rebuild is held.
    pub async fn is_holding(pool: &PgPool) -> bool {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks \
             WHERE locktype = 'advisory' AND NOT granted AND database = \
                   (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND ((classid::bigint << 32) | objid::bigint) = $1",
        )
        .bind(GATE_LOCK)
        .fetch_one(pool)
        .await
        .expect("read pg_locks");
        waiting > 0
    }

    /// Lets the rebuild go on.
    pub async fn open(self) {
        sqlx::Connection::close(self.0)
            .await
            .expect("open the gate");
    }
}
