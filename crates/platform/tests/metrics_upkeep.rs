//! The metrics recorder keeps bounded memory when nothing scrapes `/metrics`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

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

#[test]
fn histogram_samples_do_not_pile_up_in_memory_when_nothing_scrapes() {
    // 8 million samples would hold 64 MB in the recorder's buffers without upkeep.
    const CHUNKS: u64 = 80;
    const PER_CHUNK: u64 = 100_000;
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // Far more often than the services' 5 s, so this short run folds many times, but not so
    // often that the exporter's fold races every push (see the count below).
    platform::metrics::spawn_upkeep(handle.clone(), Duration::from_millis(100));

    let before = rss_kib();
    metrics::with_local_recorder(&recorder, || {
        let histogram = metrics::histogram!("upkeep_test_seconds");
        for chunk in 0..CHUNKS {
            for i in 0..PER_CHUNK {
                histogram.record((chunk * PER_CHUNK + i + 1) as f64 * 1e-9);
            }
            // A sustained load, not a burst: about 4 million samples a second.
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 16,
        "the process grew by {grown_mib} MiB for {} samples",
        CHUNKS * PER_CHUNK
    );
    // Folded into the summary, not dropped. The exporter loses a sample whose push races a fold
    // (metrics-util's bucket swaps its blocks out under concurrent pushes): one in a million or
    // so alone, up to about 1% with folds every 10 ms on a machine busy with other tests. Losing
    // them wholesale is what this guards against.
    let page = handle.render();
    let counted: u64 = page
        .lines()
        .find_map(|line| line.strip_prefix("upkeep_test_seconds_count "))
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count in {page}"));
    let recorded = CHUNKS * PER_CHUNK;
    assert!(
        counted <= recorded && counted >= recorded - recorded / 100,
        "{counted} of {recorded} samples counted"
    );
}
