//! The benchmark tool as BENCHMARKS.md runs it, on a small scale: `bench freshness --spawn`
//! starts the three services itself and must account for every command it measured, and for
//! what the projector's sweeper did meanwhile.

use std::process::Command;

use serde_json::Value;

use crate::support::{REDIS_URL, bin_dir};

/// Every measured command is read back (`--freshness-read-every 1`), so the read-backs the
/// report counts, visible or not, are exactly the measured ticks that were sent and accepted:
/// one lost on the way (a read-back task not waited for at the end of the run, say) would make
/// the published freshness figures describe fewer commands than the run claims.
#[test]
fn a_freshness_run_reads_back_every_command_it_measured_and_sees_each_one() {
    let dir = bin_dir();
    assert!(
        dir.join("bench").exists(),
        "bench is not built in {}: run `cargo build --workspace --bins`",
        dir.display()
    );
    let out = std::env::temp_dir().join(format!("e2e-freshness-{}.json", uuid::Uuid::new_v4()));
    let output = Command::new(dir.join("bench"))
        .arg("freshness")
        .arg("--spawn")
        .arg("--bin-dir")
        .arg(&dir)
        .args(["--postgres-url", &store::testing::server_url()])
        .args(["--redis-url", REDIS_URL])
        .args([
            "--rate",
            "40",
            "--freshness-secs",
            "3",
            "--warmup-secs",
            "1",
        ])
        .args(["--freshness-clients", "4", "--freshness-read-every", "1"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed: {stderr}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&out).expect("read the JSON report")).expect("JSON");
    let _ = std::fs::remove_file(&out);
    let f = &report["freshness"];
    let count = |field: &str| {
        f[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} in {f}"))
    };
    let ticks = count("ticks");
    assert!(ticks >= 100, "3 s at 40/s schedules about 120 ticks: {f}");
    assert_eq!(count("command_errors"), 0, "{f}");
    assert_eq!(count("not_visible"), 0, "{f}");
    let sent = ticks - count("missed_ticks");
    assert_eq!(
        f["response_to_visible"]["count"].as_u64(),
        Some(sent),
        "one read-back per measured command: {f}"
    );
    assert!(
        f["response_to_visible"]["p50_ms"].as_f64().unwrap_or(0.0) > 0.0,
        "{f}"
    );
    // The projector it started was asked what its sweeper did meanwhile (whether it covered for
    // the consumers or raced them), so a run can tell.
    let sweeper = report["sweeper"]
        .as_array()
        .expect("the sweeper's activity");
    assert_eq!(sweeper.len(), 1, "{sweeper:?}");
    assert_eq!(sweeper[0]["scenario"], "freshness");
    for counter in ["healed_events", "duplicates"] {
        // Present, as a number (its value depends on the hour: the test asserts no figure).
        assert!(
            sweeper[0][counter].as_f64().is_some(),
            "{counter}: {sweeper:?}"
        );
    }
}
