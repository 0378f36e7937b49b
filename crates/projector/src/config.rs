//! The projector's command line: every setting is a flag and an environment variable; the
//! subcommands are the service (`serve`, the default) and the admin commands.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use platform::config::{CommonArgs, MAX_INTERVAL_MS};

use crate::consumer::ConsumerSettings;
use crate::projections::ProjectionKind;
use crate::sweeper::SweeperSettings;

/// Default `LISTEN_ADDR` (health and metrics only).
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:8082";

/// `projector [serve|migrate|healthcheck|dlq|rebuild|verify]`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "projector",
    version,
    about = "Projects the event stream into read models"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The projector's own settings.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address serving /healthz, /readyz and /metrics
    #[arg(long, env = "LISTEN_ADDR", default_value = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: String,

    /// Projections this instance runs (comma-separated)
    #[arg(
        long,
        env = "PROJECTIONS",
        value_enum,
        value_delimiter = ',',
        default_value = "order_summaries,customer_stats"
    )]
    pub projections: Vec<ProjectionKind>,

    /// Consumer name within each group; keep it stable across restarts of one instance
    /// (default: <hostname>-<pid>)
    #[arg(long, env = "PROJECTOR_CONSUMER_NAME")]
    pub consumer_name: Option<String>,

    /// Entries read from Redis per batch
    #[arg(long, env = "BATCH_SIZE", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,

    /// When a read brings fewer entries than a batch and entries arrive fast enough that at
    /// least one more is expected within this time (milliseconds), wait for them and apply all
    /// in one transaction: fewer, larger transactions under load, for at most this much added
    /// latency, and none on a quiet stream. 0 applies every read at once
    #[arg(long, env = "BATCH_LINGER_MS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub batch_linger_ms: u64,

    /// Attempts before a failing entry is dead-lettered
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub max_attempts: u32,

    /// First retry delay of a failing entry in milliseconds (doubles per attempt)
    #[arg(long, env = "RETRY_BASE_MS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(0..=MAX_INTERVAL_MS))]
    pub retry_base_ms: u64,

    /// Idle time in milliseconds after which another consumer's pending entry is claimed
    #[arg(long, env = "CLAIM_IDLE_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_INTERVAL_MS))]
    pub claim_idle_ms: u64,

    /// How often (milliseconds) to claim entries of stopped consumers
    #[arg(long, env = "RECLAIM_INTERVAL_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_INTERVAL_MS))]
    pub reclaim_interval_ms: u64,

    /// How long (milliseconds) the oldest unapplied event may wait before the sweeper applies
    /// it from the event store itself
    #[arg(long, env = "SWEEP_GRACE_MS", default_value_t = 3_000,
          value_parser = clap::value_parser!(u64).range(0..=MAX_INTERVAL_MS))]
    pub sweep_grace_ms: u64,

    /// Events per transaction during `rebuild`
    #[arg(long, env = "REBUILD_BATCH_SIZE", default_value_t = 5_000,
          value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub rebuild_batch_size: i64,
}

/// What to run.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Consume events into the read models and serve health and metrics (the default)
    Serve,
    /// Run the database migrations and exit
    Migrate,
    /// Probe this instance's /healthz (exit 0 when healthy)
    Healthcheck,
    /// Inspect and resolve dead letters of a consumer group
    Dlq {
        /// list, show, parked, replay or purge
        #[arg(value_enum)]
        action: DlqAction,
        /// The consumer group (= projection name), e.g. order_summaries
        group: String,
        /// One dead letter by its id in the dead-letter stream (`<ms>-<seq>`, as `dlq list`
        /// shows it)
        #[arg(long, value_parser = entry_id)]
        id: Option<String>,
        /// Every dead letter of the group (replay's default, which then also replays every
        /// order still parked but those whose catch-up failed for a letter of the run; purge requires --id, --all
        /// or --stream)
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// replay or purge: the parked stream (order-<uuid>) to resolve from PostgreSQL,
        /// whether or not a dead letter names its event; its resolved letters are deleted
        #[arg(long, conflicts_with_all = ["id", "all"])]
        stream: Option<String>,
        /// list: the page after this dead letter id (the last id of the previous page)
        #[arg(long, conflicts_with_all = ["id", "all", "stream"], value_parser = entry_id)]
        after: Option<String>,
        /// parked: the page after this held-back event's position (the end of the previous
        /// page gives it)
        #[arg(long, conflicts_with_all = ["id", "all", "stream", "after"])]
        after_position: Option<i64>,
    },
    /// Rebuild a read model from the event store alone
    Rebuild {
        #[arg(value_enum)]
        projection: ProjectionKind,
    },
    /// Compare a read model with a fresh fold of the event store (exit 1 on a difference)
    Verify {
        #[arg(value_enum)]
        projection: ProjectionKind,
    },
    /// Where each projection stands: head, relay, applied position, lag, parked streams, dead
    /// letters and consumer groups (exit 1 when PostgreSQL or Redis could not be read)
    Status {
        /// Print JSON instead of a table, for scripts
        #[arg(long)]
        json: bool,
    },
}

/// `projector dlq <action>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DlqAction {
    /// A table of the dead letters
    List,
    /// One dead letter as pretty JSON (needs --id)
    Show,
    /// A table of the streams held back, from PostgreSQL, with the event each waits on and
    /// how many dead letters name it
    Parked,
    /// Un-park the stream and apply the event and the rest of its stream from the event store
    Replay,
    /// Delete the dead letter and skip its event for good, then catch up the rest of the stream
    Purge,
}

/// A stream entry id in full, `<milliseconds>-<sequence>`. Redis would take the milliseconds
/// alone, as the range of every entry of that millisecond, and the sweeper and a rebuild write
/// letters in bursts, many to a millisecond: `show`, `replay` or `purge` would act on whichever
/// letter came first in it, not necessarily the one meant.
fn entry_id(value: &str) -> Result<String, String> {
    let is_full_id = value.split_once('-').is_some_and(|(ms, seq)| {
        ms.parse::<u64>().is_ok()
            && seq.parse::<u64>().is_ok()
            && !ms.starts_with('+')
            && !seq.starts_with('+')
    });
    if is_full_id {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "a dead letter id is <milliseconds>-<sequence> in full, as `dlq list` shows it \
             (e.g. 1764300000000-0), not {}",
            events::money::quoted(value)
        ))
    }
}

impl Cli {
    /// Checks what clap cannot; the error is one line naming the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.common.validate()?;
        platform::config::validate_listen_addr(&self.settings.listen_addr)
    }
}

impl Settings {
    /// The consumer name: the setting, or `<hostname>-<pid>`.
    pub fn consumer_name(&self) -> String {
        if let Some(name) = self
            .consumer_name
            .as_deref()
            .filter(|n| !n.trim().is_empty())
        {
            return name.to_owned();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "projector".to_owned());
        format!("{host}-{}", std::process::id())
    }

    /// Consumer tuning.
    pub fn consumer(&self) -> ConsumerSettings {
        ConsumerSettings {
            batch_size: self.batch_size as usize,
            linger: Duration::from_millis(self.batch_linger_ms),
            max_attempts: self.max_attempts,
            retry_base: Duration::from_millis(self.retry_base_ms),
            claim_idle: Duration::from_millis(self.claim_idle_ms),
            reclaim_interval: Duration::from_millis(self.reclaim_interval_ms),
            ..ConsumerSettings::default()
        }
    }

    /// Sweeper tuning.
    pub fn sweeper(&self) -> SweeperSettings {
        SweeperSettings {
            grace: Duration::from_millis(self.sweep_grace_ms),
            max_attempts: self.max_attempts,
            retry_base: Duration::from_millis(self.retry_base_ms),
            ..SweeperSettings::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn dlq_id(id: &str) -> Result<Option<String>, clap::Error> {
        let id = format!("--id={id}");
        let cli = Cli::try_parse_from(["projector", "dlq", "show", "order_summaries", &id])?;
        match cli.command {
            Some(Command::Dlq { id, .. }) => Ok(id),
            other => panic!("not a dlq command: {other:?}"),
        }
    }

    #[test]
    fn a_dead_letter_id_must_name_one_entry_in_full() {
        assert_eq!(
            dlq_id("1764300000000-3").unwrap().as_deref(),
            Some("1764300000000-3")
        );
        for partial in [
            "1764300000000",
            "1764300000000-",
            "-3",
            "+1-0",
            "1-+0",
            "abc-1",
            "",
            "-",
        ] {
            let error = dlq_id(partial).expect_err(partial).to_string();
            assert!(
                error.contains("<milliseconds>-<sequence>"),
                "{partial}: {error}"
            );
        }
    }
}
