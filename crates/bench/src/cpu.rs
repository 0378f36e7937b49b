//! Where the CPU goes during a measured interval: the CPU time of each spawned service, of the
//! PostgreSQL backends serving them (grouped by the `application_name` every service sets), of
//! Redis and of the load generator itself, read from `/proc` at the start and the end of the
//! interval. Divided by the commands of the interval, it says what one command costs each part
//! of the system, which throughput alone cannot: on a shared machine throughput moves with the
//! neighbours, while the split shows where an improvement has to come from.
//!
//! The same snapshots read the resident memory (`VmRSS`) of the named processes, so a run also
//! shows whether a service's memory grows under load ([`resident_mb`]): the peak alone cannot
//! tell a full cache from a leak.
//!
//! Only processes on this machine can be read: a remote PostgreSQL or Redis is left out (and
//! the report says so by their absence). A backend that ends during the interval is lost with
//! its CPU time; the services keep their pooled connections, so that is rare.

use std::collections::{BTreeMap, HashMap};

use sqlx::PgPool;

/// `/proc` reports CPU times in USER_HZ ticks, fixed at 100 per second by the kernel's ABI on
/// the architectures this runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// What to read: named processes, and the backends of one database.
pub struct CpuProbe {
    /// `(name, pid)`: the spawned services, Redis when local, the load generator.
    processes: Vec<(String, u32)>,
    /// A connection pool on the services' database, to list their backends.
    backends_of: Option<PgPool>,
}

impl std::fmt::Debug for CpuProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuProbe")
            .field("processes", &self.processes)
            .field("backends", &self.backends_of.is_some())
            .finish()
    }
}

/// CPU ticks per pid, with the group each pid counts towards; resident KiB per named process.
#[derive(Debug, Default)]
pub struct CpuSnapshot {
    ticks: HashMap<u32, (String, u64)>,
    resident_kb: BTreeMap<String, u64>,
}

impl CpuProbe {
    /// Reads `processes` (and the load generator, always).
    pub fn new(processes: Vec<(String, u32)>) -> Self {
        let mut processes = processes;
        processes.push(("bench (load generator)".into(), std::process::id()));
        Self {
            processes,
            backends_of: None,
        }
    }

    /// Also reads the backends connected to `pool`'s database, grouped by `application_name`.
    pub fn with_backends(mut self, pool: PgPool) -> Self {
        self.backends_of = Some(pool);
        self
    }

    /// Also reads Redis, when the server behind `redis_url` runs on this machine.
    pub async fn with_local_redis(mut self, redis_url: &str) -> Self {
        if let Some(pid) = local_redis_pid(redis_url).await {
            self.processes.push(("redis".into(), pid));
        }
        self
    }

    /// CPU ticks of everything probed, now.
    pub async fn snapshot(&self) -> CpuSnapshot {
        let mut ticks = HashMap::new();
        let mut resident_kb = BTreeMap::new();
        for (name, pid) in &self.processes {
            if let Some(t) = process_ticks(*pid) {
                ticks.insert(*pid, (name.clone(), t));
            }
            if let Some(kb) = crate::services::read_resident_kb(*pid) {
                resident_kb.insert(name.clone(), kb);
            }
        }
        if let Some(pool) = &self.backends_of {
            let backends: Vec<(i32, String)> = sqlx::query_as(
                "SELECT pid, application_name FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default();
            for (pid, application) in backends {
                let Ok(pid) = u32::try_from(pid) else {
                    continue;
                };
                if let Some(t) = process_ticks(pid) {
                    ticks.insert(pid, (backend_group(&application), t));
                }
            }
        }
        CpuSnapshot { ticks, resident_kb }
    }
}

/// The report's name for the backends of one `application_name`: the relay's two connections
/// (`command-service outbox relay`, `… listener`) count as one.
pub fn backend_group(application_name: &str) -> String {
    let service = if application_name.starts_with("command-service outbox relay") {
        "relay"
    } else if application_name.is_empty() {
        "unnamed"
    } else {
        application_name
    };
    format!("PostgreSQL ({service})")
}

/// CPU seconds per group between two snapshots. A pid only in `after` started during the
/// interval and counts whole.
pub fn usage(before: &CpuSnapshot, after: &CpuSnapshot) -> BTreeMap<String, f64> {
    let mut seconds = BTreeMap::new();
    for (pid, (group, end)) in &after.ticks {
        let start = before.ticks.get(pid).map_or(0, |(_, t)| *t);
        *seconds.entry(group.clone()).or_insert(0.0) +=
            end.saturating_sub(start) as f64 / TICKS_PER_SECOND;
    }
    seconds
}

/// Resident memory of each named process at `before` and at `after`, in MB (10^6 bytes).
pub fn resident_mb(before: &CpuSnapshot, after: &CpuSnapshot) -> BTreeMap<String, [f64; 2]> {
    let mb = |kb: u64| kb as f64 * 1024.0 / 1e6;
    after
        .resident_kb
        .iter()
        .filter_map(|(name, end)| {
            let start = before.resident_kb.get(name)?;
            Some((name.clone(), [mb(*start), mb(*end)]))
        })
        .collect()
}

/// User plus system CPU ticks of a process (all its threads), from `/proc/<pid>/stat`.
pub fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ticks(&stat)
}

/// `utime + stime` of a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses
/// and may itself hold spaces or parentheses, so fields are counted after the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // After the name: state (field 3) … utime is field 14, stime field 15.
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The pid of the Redis server behind `url` (`INFO server`), when that process is on this
/// machine: its `/proc/<pid>/comm` names `redis-server`.
async fn local_redis_pid(url: &str) -> Option<u32> {
    let client = crate::redis_client::redis_client(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .ok()?;
    let pid: u32 = info
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))?
        .trim()
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    comm.starts_with("redis-server").then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_read_after_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio (rt) worker) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 9 0 1000 2000000 500 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn a_running_process_is_read_and_a_missing_one_is_not() {
        assert!(process_ticks(std::process::id()).is_some());
        assert_eq!(process_ticks(u32::MAX), None);
    }

    #[test]
    fn usage_counts_the_difference_and_new_processes_whole() {
        let before = CpuSnapshot {
            ticks: HashMap::from([(1, ("a".into(), 100)), (2, ("gone".into(), 50))]),
            ..CpuSnapshot::default()
        };
        let after = CpuSnapshot {
            ticks: HashMap::from([
                (1, ("a".into(), 350)),
                (3, ("PostgreSQL (projector)".into(), 40)),
                (4, ("PostgreSQL (projector)".into(), 10)),
            ]),
            ..CpuSnapshot::default()
        };
        let seconds = usage(&before, &after);
        assert_eq!(seconds.get("a"), Some(&2.5));
        assert_eq!(seconds.get("PostgreSQL (projector)"), Some(&0.5));
        assert_eq!(seconds.get("gone"), None);
    }

    #[test]
    fn resident_memory_is_given_at_both_ends_for_processes_read_at_both() {
        let before = CpuSnapshot {
            resident_kb: BTreeMap::from([("a".into(), 1000), ("gone".into(), 10)]),
            ..CpuSnapshot::default()
        };
        let after = CpuSnapshot {
            resident_kb: BTreeMap::from([("a".into(), 3000), ("new".into(), 10)]),
            ..CpuSnapshot::default()
        };
        let resident = resident_mb(&before, &after);
        assert_eq!(resident.get("a"), Some(&[1.024, 3.072]));
        assert_eq!(resident.len(), 1, "{resident:?}");
    }

    #[test]
    fn the_relay_connections_count_as_one_group() {
        assert_eq!(
            backend_group("command-service outbox relay listener"),
            backend_group("command-service outbox relay")
        );
        assert_eq!(backend_group("projector"), "PostgreSQL (projector)");
    }
}
