//! The latency/throughput chart of the concurrency sweep, as hand-written SVG: x = commands/s,
//! y = latency in ms, one line for p50 and one for p99, each point labelled with its client
//! count; the batched-INSERT ceiling at the highest concurrency is drawn as a vertical line
//! when it fits on the same scale.

use std::fmt::Write;

use crate::scenarios::closed_loop::LoadResult;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
/// The ceiling is drawn only if it is at most this many times the best service throughput;
/// otherwise it would squash the service's points against the axis, and is written as text.
const CEILING_MAX_RATIO: f64 = 4.0;

/// A "nice" axis maximum at or above `value` (1, 2 or 5 times a power of ten).
fn nice_max(value: f64) -> f64 {
    if value <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if step * magnitude >= value {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

/// Renders the chart. `ceiling` is the events/s of the raw INSERT ceiling, if measured.
pub fn render(levels: &[LoadResult], ceiling: Option<(f64, usize)>, subtitle: &str) -> String {
    let best = levels
        .iter()
        .map(|l| l.commands_per_sec)
        .fold(0.0, f64::max);
    let ceiling_fits = ceiling.filter(|(events, _)| *events <= best * CEILING_MAX_RATIO);
    let x_max = nice_max(ceiling_fits.map_or(best, |(events, _)| events.max(best)) * 1.05);
    let y_max = nice_max(levels.iter().map(|l| l.latency.p99_ms).fold(0.0, f64::max) * 1.1);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |v: f64| LEFT + v / x_max * plot_w;
    let y = |v: f64| TOP + plot_h - v / y_max * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">Command latency vs throughput (closed-loop clients)</text>"#,
        WIDTH / 2.0
    );
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="38" text-anchor="middle" fill="#555">{}</text>"##,
        WIDTH / 2.0,
        escape(subtitle)
    );
    // Grid and ticks.
    for i in 0..=5 {
        let fx = x_max * f64::from(i) / 5.0;
        let fy = y_max * f64::from(i) / 5.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#e5e5e5"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle">{4:.0}</text>"##,
            x(fx),
            TOP,
            TOP + plot_h,
            TOP + plot_h + 18.0,
            fx
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="#e5e5e5"/><text x="{3:.1}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            LEFT,
            y(fy),
            LEFT + plot_w,
            LEFT - 6.0,
            y(fy) + 4.0,
            trim_number(fy)
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">throughput (commands/s = events/s)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 15.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{0}" text-anchor="middle" transform="rotate(-90 18 {0})">latency (ms)</text>"#,
        TOP + plot_h / 2.0
    );
    match (ceiling, ceiling_fits) {
        (_, Some((events, rows))) => {
            let _ = writeln!(
                svg,
                r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#888" stroke-dasharray="6 4"/><text x="{3:.1}" y="{4}" text-anchor="end" fill="#555">INSERT ceiling ({rows} rows/tx): {events:.0}/s</text>"##,
                x(events),
                TOP,
                TOP + plot_h,
                x(events) - 4.0,
                TOP + 14.0
            );
        }
        (Some((events, rows)), None) => {
            let _ = writeln!(
                svg,
                r##"<text x="{}" y="{}" text-anchor="end" fill="#555">INSERT ceiling ({rows} rows/tx): {events:.0} events/s (off scale)</text>"##,
                LEFT + plot_w - 6.0,
                TOP + 14.0
            );
        }
        (None, None) => {}
    }
    for (name, colour, pick) in [
        (
            "p50",
            "#1f77b4",
            (|l: &LoadResult| l.latency.p50_ms) as fn(&LoadResult) -> f64,
        ),
        ("p99", "#d62728", |l: &LoadResult| l.latency.p99_ms),
    ] {
        let points: Vec<String> = levels
            .iter()
            .map(|l| format!("{:.1},{:.1}", x(l.commands_per_sec), y(pick(l))))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            points.join(" ")
        );
        for l in levels {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{colour}"><title>{name} {} clients: {:.0}/s, {:.1} ms</title></circle><text x="{:.1}" y="{:.1}" fill="{colour}">{}c</text>"#,
                x(l.commands_per_sec),
                y(pick(l)),
                l.clients,
                l.commands_per_sec,
                pick(l),
                x(l.commands_per_sec) + 6.0,
                y(pick(l)) - 6.0,
                l.clients
            );
        }
    }
    // Legend.
    let _ = writeln!(
        svg,
        r##"<g transform="translate({} {})"><rect width="150" height="44" fill="white" stroke="#ccc"/><line x1="10" y1="15" x2="34" y2="15" stroke="#1f77b4" stroke-width="2"/><text x="40" y="19">p50 latency</text><line x1="10" y1="33" x2="34" y2="33" stroke="#d62728" stroke-width="2"/><text x="40" y="37">p99 latency</text></g>"##,
        LEFT + 10.0,
        TOP + 10.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn trim_number(value: f64) -> String {
    if value >= 10.0 || value == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::LatencySummary;

    fn level(clients: usize, rate: f64, p50: f64, p99: f64) -> LoadResult {
        LoadResult {
            clients,
            measured_secs: 10.0,
            accepted: 0,
            commands_per_sec: rate,
            latency: LatencySummary {
                p50_ms: p50,
                p99_ms: p99,
                ..LatencySummary::default()
            },
            errors: Default::default(),
            breakdown: Default::default(),
            cpu_seconds: Default::default(),
            resident_mb: Default::default(),
        }
    }

    #[test]
    fn the_chart_is_one_svg_document_with_a_point_per_level_and_percentile() {
        let levels = [level(1, 300.0, 3.0, 5.0), level(64, 2500.0, 20.0, 45.0)];
        let svg = render(&levels, Some((6000.0, 64)), "test & run");
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("INSERT ceiling"));
        assert!(svg.contains("test &amp; run"));
    }

    #[test]
    fn a_ceiling_far_off_scale_is_written_not_drawn() {
        let levels = [level(1, 100.0, 3.0, 5.0)];
        let svg = render(&levels, Some((100_000.0, 64)), "");
        assert!(svg.contains("off scale"));
        assert!(!svg.contains("stroke-dasharray"));
    }

    #[test]
    fn axis_maxima_are_round_numbers() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(3.2), 5.0);
        assert_eq!(nice_max(1234.0), 2000.0);
        assert_eq!(nice_max(10.0), 10.0);
    }
}
