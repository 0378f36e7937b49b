//! `rebuild`: events/s of `projector rebuild <projection>` over a large generated store (the
//! read model rebuilt from the event store alone).

use anyhow::Context;
use serde::Serialize;

use crate::generate;
use crate::scratch::{Scratch, TOOL_POOL_SIZE};
use crate::services::{Launcher, Service};
use crate::stats::rate;

/// The rebuild's results.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildResult {
    pub projection: String,
    pub events: i64,
    pub generate_events_per_sec: f64,
    /// Wall time of the `projector rebuild` process, start to exit.
    pub elapsed_secs: f64,
    pub events_per_sec: f64,
    /// How long live writers of the projection were paused for the swap, as the rebuild
    /// reported it (`None` when it did not say).
    pub swap_pause_secs: Option<f64>,
}

/// Generates `events` events and times `projector rebuild <projection>` over them.
pub async fn run(
    scratch: &Scratch,
    launcher: &Launcher,
    events: u64,
    projection: &str,
) -> anyhow::Result<RebuildResult> {
    let purpose = "rebuild";
    let pool = scratch.migrated_pool(purpose, TOOL_POOL_SIZE).await?;
    let generated = generate::fill_lifecycles(&pool, events).await?;
    let head = store::head_position(&pool).await.context("read the head")?;
    pool.close().await;
    eprintln!(
        "rebuild: generated {head} events at {:.0} events/s",
        rate(generated.events, generated.elapsed)
    );
    let stream = scratch.stream_key(purpose);
    let (elapsed, log) = launcher
        .run_to_completion(
            Service::Projector,
            purpose,
            &["rebuild", projection],
            &scratch.database_url(purpose),
            &stream,
            &[],
        )
        .await?;
    let result = RebuildResult {
        projection: projection.to_owned(),
        events: head,
        generate_events_per_sec: rate(generated.events, generated.elapsed),
        elapsed_secs: elapsed.as_secs_f64(),
        events_per_sec: rate(head as u64, elapsed),
        swap_pause_secs: std::fs::read_to_string(&log)
            .ok()
            .and_then(|printed| swap_pause(&printed)),
    };
    eprintln!(
        "rebuild: {head} events in {:.1} s: {:.0} events/s",
        result.elapsed_secs, result.events_per_sec
    );
    scratch.delete_stream(&stream).await?;
    scratch.drop_database(purpose).await?;
    Ok(result)
}

/// The seconds in the rebuild's summary line, `… live writers paused 1.03 s for the swap …`.
fn swap_pause(printed: &str) -> Option<f64> {
    let (_, after) = printed.split_once("live writers paused ")?;
    after.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_swap_pause_is_read_from_the_summary_line() {
        let printed = "rebuilt order_summaries: 1003399 events in 9.3 s, checkpoint 1003399; \
                       live writers paused 1.03 s for the swap (0 events folded then)\n";
        assert_eq!(swap_pause(printed), Some(1.03));
        assert_eq!(
            swap_pause("rebuilt order_summaries: 10 events in 0.1 s"),
            None
        );
    }
}
