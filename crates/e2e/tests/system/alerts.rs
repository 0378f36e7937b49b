//! The alerting rules in `deploy/prometheus/alerts.yaml` read only metrics the services expose.

use crate::support::*;
use std::time::{Duration, Instant};
use store::testing::TestDatabase;
use uuid::Uuid;

/// The metric names the alerting rules' expressions read (`up` aside, which Prometheus makes).
/// A PromQL expression's identifiers are metric names unless they are label lists (`by (…)`
/// and the like), label matchers (`{…}`), ranges (`[…]`), functions (followed by `(`),
/// aggregations or keywords.
fn alert_metric_names(rules: &str) -> std::collections::BTreeSet<String> {
    // Aggregations may be followed by `by (…)` rather than by their operand in parentheses.
    const KEYWORDS: [&str; 24] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "up",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    // Each `expr:` value: the rest of its line, or the lines of a folded block (`>-`).
    let mut expressions = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let mut expression = value.trim().trim_start_matches(">-").to_owned();
        let indent = line.len() - line.trim_start().len();
        while let Some(next) = lines.peek() {
            if next.trim().is_empty() || next.len() - next.trim_start().len() <= indent {
                break;
            }
            expression.push(' ');
            expression.push_str(next.trim());
            lines.next();
        }
        expressions.push(expression);
    }
    let mut names = std::collections::BTreeSet::new();
    for expression in expressions {
        let chars: Vec<char> = expression.chars().collect();
        let mut i = 0;
        let mut skip_parenthesis = false;
        while i < chars.len() {
            let c = chars[i];
            let close = match c {
                '{' => Some('}'),
                '[' => Some(']'),
                '"' => Some('"'),
                '(' if skip_parenthesis => Some(')'),
                _ => None,
            };
            if let Some(close) = close {
                i += chars[i + 1..]
                    .iter()
                    .position(|&d| d == close)
                    .map_or(chars.len(), |n| n + 2);
                skip_parenthesis = false;
                continue;
            }
            if c.is_ascii_alphabetic() || c == '_' {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                let is_function = next == Some(&'(') && !KEYWORDS.contains(&word.as_str());
                skip_parenthesis = ["by", "without", "on", "ignoring"].contains(&word.as_str());
                if !is_function && !KEYWORDS.contains(&word.as_str()) {
                    names.insert(word);
                }
                continue;
            }
            i += 1;
        }
    }
    names
}

/// Every metric an alert reads is on some service's `/metrics` as soon as the services run,
/// before anything has happened: a renamed metric would leave its alert silent forever, and a
/// counter that first appears at 1 hides its first increment from `increase()` (the alert on
/// dead letters would miss the first one of every projector process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_read_is_exposed_from_the_start() {
    let rules_file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/prometheus/alerts.yaml"
    );
    let rules = std::fs::read_to_string(rules_file).expect("deploy/prometheus/alerts.yaml");
    let wanted = alert_metric_names(&rules);
    assert!(
        wanted.contains("projector_dead_letters_total") && wanted.contains("relay_lag_seconds"),
        "the rules' metrics are not read right: {wanted:?}"
    );

    let db = TestDatabase::new().await;
    let stream = format!("e2e-{}:es:events", Uuid::new_v4().simple());
    let http = http_client();
    let mut services = [
        Service::start("command-service", "command-service", &db.url, &stream, &[]),
        Service::start("projector", "projector", &db.url, &stream, &[]),
        Service::start("query-service", "query-service", &db.url, &stream, &[]),
    ];
    for service in &mut services {
        service.wait_ready(&http).await;
    }
    // The relay's and the sweeper's gauges are set by their first round, right after start.
    let started = Instant::now();
    loop {
        let mut exposed = String::new();
        for service in &services {
            let response = http.get(service.url("/metrics")).send().await;
            exposed.push_str(&response.expect("/metrics").text().await.expect("text"));
        }
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|name| {
                !exposed.lines().any(|line| {
                    line.strip_prefix(name.as_str())
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))
                })
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "not exposed by any service: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for service in &mut services {
        assert!(
            service.terminate().await.success(),
            "{}",
            service.log_tail()
        );
    }
}
