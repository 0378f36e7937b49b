//! Misconfiguration as every binary meets it: a bad setting stops it at start, before it
//! connects to anything, with exit code 2 and one line naming the setting.

use std::process::Command;

use crate::support::{bin_dir, free_port};

/// Runs `bin` with `env` against a PostgreSQL and a Redis that nothing listens on, so a binary
/// that got past its configuration would fail on (or wait for) a connection instead; returns
/// its exit code and the non-empty lines of its stderr.
fn start_with(bin: &str, env: &[(&str, &str)]) -> (Option<i32>, Vec<String>) {
    let nowhere = free_port();
    let output = Command::new(bin_dir().join(bin))
        .env_clear()
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{nowhere}/orders"),
        )
        .env("REDIS_URL", format!("redis://127.0.0.1:{nowhere}"))
        .env("DB_CONNECT_WAIT_SECS", "0")
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"));
    let lines = String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    (output.status.code(), lines)
}

#[test]
fn a_listen_addr_without_a_port_or_a_rust_log_that_does_not_parse_stops_every_binary_at_start() {
    for bin in ["command-service", "query-service", "projector"] {
        for (setting, value) in [("LISTEN_ADDR", "localhost"), ("RUST_LOG", "info,sqlx=loud")] {
            let (code, lines) = start_with(bin, &[(setting, value)]);
            assert_eq!(code, Some(2), "{bin} {setting}={value}: {lines:?}");
            assert_eq!(lines.len(), 1, "{bin} {setting}={value}: {lines:?}");
            assert!(
                lines[0].contains(&format!("invalid {setting}")),
                "{bin} {setting}={value}: {lines:?}"
            );
        }
    }
}

/// An interval, timeout or grace past a day is refused at start rather than failing later: a
/// grace of centuries overflowed the clock at SIGTERM (a panic, exit 101), and an idle time
/// past Redis' integers made every reclaim fail.
#[test]
fn a_duration_setting_longer_than_a_day_stops_the_binary_at_start() {
    let huge = u64::MAX.to_string();
    let mut cases = vec![];
    for bin in ["command-service", "query-service", "projector"] {
        cases.push((bin, "SHUTDOWN_GRACE_SECS", "86401"));
        cases.push((bin, "SHUTDOWN_GRACE_SECS", huge.as_str()));
    }
    for setting in [
        "CLAIM_IDLE_MS",
        "RECLAIM_INTERVAL_MS",
        "SWEEP_GRACE_MS",
        "RETRY_BASE_MS",
    ] {
        cases.push(("projector", setting, huge.as_str()));
    }
    cases.push(("command-service", "REQUEST_TIMEOUT_MS", huge.as_str()));
    cases.push(("command-service", "RELAY_TRIM_INTERVAL_MS", huge.as_str()));
    cases.push(("query-service", "CHECKPOINT_POLL_MS", huge.as_str()));
    for (bin, setting, value) in cases {
        let (code, lines) = start_with(bin, &[(setting, value)]);
        assert_eq!(code, Some(2), "{bin} {setting}={value}: {lines:?}");
        assert_eq!(lines.len(), 1, "{bin} {setting}={value}: {lines:?}");
        assert!(
            lines[0].contains(setting),
            "{bin} {setting}={value}: {lines:?}"
        );
    }
    // A day itself is accepted: the binary gets past its configuration and fails on the
    // database nothing listens on, with another message.
    let (code, lines) = start_with("projector", &[("CLAIM_IDLE_MS", "86400000")]);
    assert_ne!(code, Some(2), "{lines:?}");
    assert!(
        !lines.iter().any(|l| l.contains("CLAIM_IDLE_MS")),
        "{lines:?}"
    );
}

/// A connection cap of 0 would serve nothing, and an API told to require a token must not start
/// open because the token's secret is missing or blank.
#[test]
fn a_zero_connection_cap_or_a_required_token_left_unset_stops_the_binary_at_start() {
    let mut cases = vec![
        (
            "command-service",
            vec![("MAX_CONNECTIONS", "0")],
            "MAX_CONNECTIONS",
        ),
        (
            "query-service",
            vec![("MAX_CONNECTIONS", "0")],
            "MAX_CONNECTIONS",
        ),
        (
            "projector",
            vec![("MAX_CONNECTIONS", "0")],
            "MAX_CONNECTIONS",
        ),
    ];
    for bin in ["command-service", "query-service"] {
        cases.push((bin, vec![("REQUIRE_API_TOKEN", "true")], "API_TOKEN"));
        cases.push((
            bin,
            vec![("REQUIRE_API_TOKEN", "true"), ("API_TOKEN", "")],
            "API_TOKEN",
        ));
    }
    for (bin, env, setting) in cases {
        let (code, lines) = start_with(bin, &env);
        assert_eq!(code, Some(2), "{bin} {env:?}: {lines:?}");
        assert_eq!(lines.len(), 1, "{bin} {env:?}: {lines:?}");
        // The line names the setting: `invalid API_TOKEN: …` from the service's own check,
        // clap's `invalid value '0' for '--max-connections <MAX_CONNECTIONS>'` for a number
        // out of range.
        assert!(lines[0].contains(setting), "{bin} {env:?}: {lines:?}");
    }
}

#[test]
fn every_binary_lists_the_contract_settings_as_flags_with_their_defaults() {
    for (bin, listen) in [
        ("command-service", "0.0.0.0:8080"),
        ("query-service", "0.0.0.0:8081"),
        ("projector", "0.0.0.0:8082"),
    ] {
        let output = Command::new(bin_dir().join(bin))
            .env_clear()
            .arg("--help")
            .output()
            .unwrap_or_else(|e| panic!("run {bin} --help: {e}"));
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{bin}: {help}");
        for (flag, env, default) in [
            ("--listen-addr", "LISTEN_ADDR", Some(listen)),
            (
                "--database-url",
                "DATABASE_URL",
                Some("postgres://postgres@127.0.0.1:5432/orders"),
            ),
            ("--redis-url", "REDIS_URL", Some("redis://127.0.0.1:6379")),
            ("--rust-log", "RUST_LOG", Some("info,sqlx=warn")),
            ("--log-format", "LOG_FORMAT", Some("pretty")),
            ("--event-stream", "EVENT_STREAM", Some("es:events")),
            ("--skip-migrations", "SKIP_MIGRATIONS", None),
        ] {
            // clap prints `--flag <VALUE>` (or the bare flag), then the text, then
            // `[env: NAME=]` and `[default: value]` for the option.
            let start = help
                .find(&format!("{flag} "))
                .or_else(|| help.find(&format!("{flag}\n")))
                .unwrap_or_else(|| panic!("{bin} --help lacks {flag}:\n{help}"));
            let entry = &help[start..];
            let entry = &entry[..entry[2..].find("\n  -").map_or(entry.len(), |end| end + 2)];
            assert!(
                entry.contains(&format!("[env: {env}")),
                "{bin} {flag}: {entry}"
            );
            if let Some(default) = default {
                assert!(
                    entry.contains(&format!("[default: {default}]")),
                    "{bin} {flag}: {entry}"
                );
            }
        }
    }
}
