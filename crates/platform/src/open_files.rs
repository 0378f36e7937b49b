//! The process's limit on open files, raised to what the system allows.
//!
//! Every connection a service holds is a file descriptor: HTTP clients (up to
//! `MAX_CONNECTIONS`, 2048 by default), pooled PostgreSQL sessions, Redis connections. Container
//! runtimes commonly start a process with a soft limit of 1024 and a far higher hard limit,
//! leaving it to the process to raise the soft one; left there, a busy service fails to accept
//! (`EMFILE`) well below its connection cap, and its own `/healthz` stops answering. The soft
//! limit is raised to the hard one at start, as the Go runtime does for every program; it never
//! lowers a limit, and never needs privileges (only the hard limit is guarded).

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors a service needs beside its HTTP connections: pooled database sessions, Redis,
/// listeners, the files of the process itself.
const RESERVED_DESCRIPTORS: u64 = 128;

/// What [`raise_soft_limit`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// The soft limit before (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit now (`None`: unlimited).
    pub now: Option<u64>,
}

/// Raises the soft limit on open files to the hard limit; returns the limit before and after.
/// A failure to raise it (a sandbox refusing `setrlimit`) leaves the limit as it was.
pub fn raise_soft_limit() -> OpenFileLimit {
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if before == limit.maximum || setrlimit(Resource::Nofile, raised).is_err() {
        return OpenFileLimit {
            before,
            now: before,
        };
    }
    OpenFileLimit {
        before,
        now: getrlimit(Resource::Nofile).current,
    }
}

/// Raises the soft limit ([`raise_soft_limit`]) for a server of at most `max_connections`
/// connections, and warns when even the raised limit leaves too few descriptors for them.
pub fn raise_for_connections(max_connections: usize) {
    let limit = raise_soft_limit();
    if limit.now != limit.before {
        tracing::debug!(before = ?limit.before, now = ?limit.now,
            "raised the soft limit on open files to the hard limit");
    }
    let needed = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(RESERVED_DESCRIPTORS);
    if let Some(now) = limit.now
        && now < needed
    {
        tracing::warn!(
            open_files = now,
            max_connections,
            needed,
            "the limit on open files is below MAX_CONNECTIONS plus what the service needs \
             besides: connections will fail to be accepted (EMFILE) before the cap; raise the \
             hard limit (ulimit -n, the container runtime's nofile) or lower MAX_CONNECTIONS"
        );
    }
}
