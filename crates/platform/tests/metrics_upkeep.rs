//! The metrics recorder keeps bounded memory when nothing scrapes `/metrics`.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusBuilder;

/// Resident memory of this test process (nextest runs each test in its own), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The `/proc` status file of this process's thread named `name`.
fn thread_status(name: &str) -> Option<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .find(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        .map(|task| task.path().join("status"))
}

/// How often the thread whose status file is `status` has blocked so far. The upkeep thread
/// blocks once per round, in its sleep: nothing else it does waits (no contended lock, no I/O).
fn times_blocked(status: &std::path::Path) -> u64 {
    std::fs::read_to_string(status)
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|count| count.trim().parse().ok())
        .unwrap()
}

/// Waits until the upkeep thread has run a whole round that began after this call: it blocks
/// (ending the round under way, if any), wakes and runs upkeep, then blocks again. Two more
/// blocks would do; three leave room for a rare extra one.
fn wait_for_a_whole_upkeep_round(status: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = times_blocked(status);
    while times_blocked(status) < before + 3 {
        assert!(
            Instant::now() < deadline,
            "the upkeep thread did not run within 20 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// 8 million samples, which would hold 64 MB in the recorder's buffers without upkeep, recorded
/// in chunks; after each chunk the test waits until the upkeep thread has run once since (seen
/// from the thread's own count of sleeps, so however busy the machine, never a guess at a
/// duration). What upkeep guarantees is then deterministic: no more than about one chunk
/// (1.6 MB) is ever waiting to be folded, so the process grows by a few MiB at most.
///
/// The samples are folded, not dropped: the count on the page is theirs. Not exactly, though:
/// the exporter loses a sample whose push races a fold (metrics-util's bucket swaps its blocks
/// out under concurrent pushes), and a fold may still fall during a chunk. That is a handful of
/// samples at most; the count is asserted to hold most of them, which fails if upkeep discarded
/// what it took instead of folding it.
#[test]
fn histogram_samples_do_not_pile_up_in_memory_when_nothing_scrapes() {
    const CHUNKS: u64 = 40;
    const PER_CHUNK: u64 = 200_000;
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // Far more often than the services' 5 s, so this run folds after every chunk quickly.
    platform::metrics::spawn_upkeep(handle.clone(), Duration::from_millis(10));
    // The thread names itself once it runs.
    let deadline = Instant::now() + Duration::from_secs(20);
    let upkeep = loop {
        if let Some(status) = thread_status("metrics-upkeep") {
            break status;
        }
        assert!(Instant::now() < deadline, "no thread named metrics-upkeep");
        std::thread::sleep(Duration::from_millis(2));
    };

    let before = rss_kib();
    metrics::with_local_recorder(&recorder, || {
        let histogram = metrics::histogram!("upkeep_test_seconds");
        for chunk in 0..CHUNKS {
            for i in 0..PER_CHUNK {
                histogram.record((chunk * PER_CHUNK + i + 1) as f64 * 1e-9);
            }
            wait_for_a_whole_upkeep_round(&upkeep);
        }
    });
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 16,
        "the process grew by {grown_mib} MiB for {} samples",
        CHUNKS * PER_CHUNK
    );

    let page = handle.render();
    let counted: u64 = page
        .lines()
        .find_map(|line| line.strip_prefix("upkeep_test_seconds_count "))
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count in {page}"));
    let recorded = CHUNKS * PER_CHUNK;
    assert!(
        counted <= recorded && counted > recorded / 2,
        "{counted} of {recorded} samples counted"
    );
}
