//! A minimal SVG writer for the report's plots: horizontal bars, one per runtime, with the
//! value written beside each bar and an optional range (for example p10-p90) drawn as a
//! whisker; and line charts (a latency CDF per offered rate, throughput against offered rate
//! with the ceiling drawn across). Plain SVG 1.1 text, no dependency; every string is
//! XML-escaped.

use std::fmt::Write as _;

/// One bar.
#[derive(Clone, Debug)]
pub struct Bar {
    pub label: String,
    pub value: f64,
    /// Drawn as a thin line across the bar's end.
    pub range: Option<(f64, f64)>,
    /// Written after the bar, e.g. "250 ms (52x)".
    pub text: String,
    pub highlight: bool,
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A horizontal bar chart, linear axis from 0, with gridlines at round values.
pub fn bar_chart(title: &str, unit: &str, bars: &[Bar]) -> String {
    const WIDTH: f64 = 760.0;
    const LEFT: f64 = 150.0;
    const RIGHT: f64 = 170.0;
    const TOP: f64 = 44.0;
    const ROW: f64 = 34.0;
    let plot_w = WIDTH - LEFT - RIGHT;
    let height = TOP + ROW * bars.len() as f64 + 36.0;
    let max = bars
        .iter()
        .map(|b| b.range.map_or(b.value, |(_, hi)| hi.max(b.value)))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let step = nice_step(max);
    let axis_max = if step > 0.0 {
        (max / step).ceil() * step
    } else {
        1.0
    };
    let x = |v: f64| LEFT + plot_w * (v.max(0.0) / axis_max);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="#ffffff"/><text x="{}" y="24" font-size="15" font-weight="bold">{}</text>"##,
        LEFT,
        escape(title)
    );
    let bottom = TOP + ROW * bars.len() as f64;
    let mut tick = 0.0;
    while step > 0.0 && tick <= axis_max + step / 2.0 {
        let tx = x(tick);
        let _ = writeln!(
            out,
            r##"<line x1="{tx:.1}" y1="{TOP}" x2="{tx:.1}" y2="{bottom}" stroke="#dddddd"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#555555">{}</text>"##,
            bottom + 16.0,
            format_tick(tick)
        );
        tick += step;
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555555">{}</text>"##,
        LEFT + plot_w / 2.0,
        bottom + 32.0,
        escape(unit)
    );
    for (i, b) in bars.iter().enumerate() {
        let y = TOP + ROW * i as f64 + 6.0;
        let h = ROW - 12.0;
        let colour = if b.highlight { "#d9541e" } else { "#4a78b5" };
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT - 8.0,
            y + h / 2.0 + 4.0,
            escape(&b.label)
        );
        if b.value.is_finite() {
            let w = (x(b.value) - LEFT).max(1.0);
            let _ = writeln!(
                out,
                r#"<rect x="{LEFT}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{colour}"/>"#
            );
        }
        if let Some((lo, hi)) = b.range.filter(|(lo, hi)| lo.is_finite() && hi.is_finite()) {
            let cy = y + h / 2.0;
            let _ = writeln!(
                out,
                r##"<line x1="{:.1}" y1="{cy:.1}" x2="{:.1}" y2="{cy:.1}" stroke="#222222" stroke-width="1.5"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#222222"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#222222"/>"##,
                x(lo),
                x(hi),
                x(lo),
                y + 4.0,
                x(lo),
                y + h - 4.0,
                x(hi),
                y + 4.0,
                x(hi),
                y + h - 4.0
            );
        }
        let end = b.range.map_or(b.value, |(_, hi)| hi.max(b.value)).max(0.0);
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            x(if end.is_finite() { end } else { 0.0 }) + 6.0,
            y + h / 2.0 + 4.0,
            escape(&b.text)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// One line of a line chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    /// Draw a dot at every point.
    pub markers: bool,
}

/// A horizontal line across a line chart (a ceiling), labelled.
#[derive(Clone, Debug)]
pub struct Level {
    pub label: String,
    pub y: f64,
}

/// How a line chart's x axis runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    Linear,
    /// Base 10; non-positive values are left out.
    Log,
}

const PALETTE: [&str; 8] = [
    "#4a78b5", "#d9541e", "#3a9b5c", "#8e5bb5", "#c9a227", "#2aa3b5", "#b54a78", "#555555",
];

/// A line chart: every series in its colour, the levels as dotted lines, a legend on the right.
/// The y axis runs from 0 to `y_max` (or the largest value).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    x_axis: Axis,
    y_max: Option<f64>,
    series: &[Series],
    levels: &[Level],
) -> String {
    const WIDTH: f64 = 760.0;
    const HEIGHT: f64 = 420.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 190.0;
    const TOP: f64 = 44.0;
    const BOTTOM: f64 = 56.0;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let usable = |x: f64| x.is_finite() && (x_axis == Axis::Linear || x > 0.0);
    let points = || {
        series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| usable(*x) && y.is_finite())
    };
    let ys = points()
        .map(|p| p.1)
        .chain(levels.iter().map(|l| l.y).filter(|y| y.is_finite()));
    let y_top = y_max.unwrap_or_else(|| ys.fold(0.0_f64, f64::max));
    let y_step = nice_step(y_top);
    let y_top = if y_step > 0.0 {
        (y_top / y_step).ceil() * y_step
    } else {
        1.0
    };
    let (x_lo, x_hi) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (x, _)| {
        (lo.min(x), hi.max(x))
    });
    let (x_lo, x_hi) = if x_lo.is_finite() {
        (x_lo, x_hi)
    } else {
        (1.0, 10.0)
    };
    // Axis ends and ticks.
    let (x_min, x_max, x_ticks): (f64, f64, Vec<f64>) = match x_axis {
        Axis::Linear => {
            let step = nice_step(x_hi);
            let max = if step > 0.0 {
                (x_hi / step).ceil() * step
            } else {
                1.0
            };
            let ticks = (0..)
                .map(|i| i as f64 * step)
                .take_while(|t| step > 0.0 && *t <= max + step / 2.0)
                .collect();
            (0.0, max, ticks)
        }
        Axis::Log => {
            let lo = 10f64.powf(x_lo.log10().floor());
            let hi = 10f64.powf(x_hi.log10().ceil()).max(lo * 10.0);
            let mut ticks = Vec::new();
            let mut decade = lo;
            while decade <= hi * 1.0001 {
                for m in [1.0, 2.0, 5.0] {
                    let t = decade * m;
                    if t <= hi * 1.0001 {
                        ticks.push(t);
                    }
                }
                decade *= 10.0;
            }
            (lo, hi, ticks)
        }
    };
    let x = |v: f64| match x_axis {
        Axis::Linear => LEFT + plot_w * (v - x_min) / (x_max - x_min),
        Axis::Log => LEFT + plot_w * (v.log10() - x_min.log10()) / (x_max.log10() - x_min.log10()),
    };
    let y = |v: f64| TOP + plot_h * (1.0 - v.clamp(0.0, y_top) / y_top);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="#ffffff"/><text x="{LEFT}" y="24" font-size="15" font-weight="bold">{}</text>"##,
        escape(title)
    );
    let bottom = TOP + plot_h;
    for t in &x_ticks {
        let tx = x(*t);
        let _ = writeln!(
            out,
            r##"<line x1="{tx:.1}" y1="{TOP}" x2="{tx:.1}" y2="{bottom}" stroke="#dddddd"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#555555">{}</text>"##,
            bottom + 16.0,
            format_tick(*t)
        );
    }
    let mut t = 0.0;
    while y_step > 0.0 && t <= y_top + y_step / 2.0 {
        let ty = y(t);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#dddddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555555">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            ty + 4.0,
            format_tick((t * 1e6).round() / 1e6)
        );
        t += y_step;
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555555">{}</text><text x="16" y="{:.1}" text-anchor="middle" fill="#555555" transform="rotate(-90 16 {:.1})">{}</text>"##,
        LEFT + plot_w / 2.0,
        bottom + 36.0,
        escape(x_label),
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(y_label)
    );
    let mut legend_y = TOP + 8.0;
    let legend_x = LEFT + plot_w + 16.0;
    for (i, s) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(px, py)| usable(*px) && py.is_finite())
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        if pts.len() > 1 {
            let path = pts
                .iter()
                .map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py)))
                .collect::<Vec<_>>()
                .join(" ");
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{path}"/>"#
            );
        }
        if s.markers || pts.len() == 1 {
            for (px, py) in &pts {
                let _ = writeln!(
                    out,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}"/>"#,
                    x(*px),
                    y(*py)
                );
            }
        }
        let _ = writeln!(
            out,
            r#"<line x1="{legend_x:.1}" y1="{legend_y:.1}" x2="{:.1}" y2="{legend_y:.1}" stroke="{colour}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            legend_x + 22.0,
            legend_x + 28.0,
            legend_y + 4.0,
            escape(&s.label)
        );
        legend_y += 20.0;
    }
    for l in levels.iter().filter(|l| l.y.is_finite()) {
        let ly = y(l.y);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="#222222" stroke-width="1.5" stroke-dasharray="2 3"/><text x="{:.1}" y="{:.1}" fill="#222222">{}</text>"##,
            LEFT + plot_w,
            LEFT + plot_w + 16.0,
            ly + 4.0,
            escape(&l.label)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// A 1, 2 or 5 times a power of ten that cuts `max` into 4 to 10 steps.
fn nice_step(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 0.0;
    }
    let raw = max / 5.0;
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| max / s <= 8.0)
        .unwrap_or(10.0 * power)
}

fn format_tick(v: f64) -> String {
    if v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_drawing_bars_should_scale_them_to_the_largest_and_escape_text() {
        let svg = bar_chart(
            "Init <ms>",
            "ms",
            &[
                Bar {
                    label: "rust".into(),
                    value: 5.0,
                    range: Some((4.0, 6.0)),
                    text: "5 ms".into(),
                    highlight: true,
                },
                Bar {
                    label: "node & co".into(),
                    value: 250.0,
                    range: None,
                    text: "250 ms (50x)".into(),
                    highlight: false,
                },
            ],
        );
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("Init &lt;ms&gt;") && svg.contains("node &amp; co"));
        // The axis runs to 250 in steps of 50: the 250 ms bar spans the plot (440 px), the
        // 5 ms one a fiftieth of it.
        assert!(svg.contains(r#"width="440.0""#), "{svg}");
        assert!(svg.contains(r#"width="8.8""#), "{svg}");
        assert_eq!(svg.matches("<rect x=").count(), 2);
    }

    #[test]
    fn when_drawing_lines_should_place_points_on_the_axes_and_draw_the_levels() {
        let svg = line_chart(
            "Throughput <orders/s>",
            "offered",
            "achieved",
            Axis::Linear,
            None,
            &[Series {
                label: "achieved".into(),
                points: vec![(0.0, 0.0), (100.0, 50.0)],
                dashed: false,
                markers: true,
            }],
            &[Level {
                label: "ceiling 80".into(),
                y: 80.0,
            }],
        );
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("Throughput &lt;orders/s&gt;"));
        // x runs 0..100 over 500 px from 70; y runs 0..80 over 320 px from 44.
        assert!(svg.contains(r#"points="70.0,364.0 570.0,164.0""#), "{svg}");
        assert!(svg.contains(">ceiling 80</text>"), "{svg}");
        assert_eq!(svg.matches("<circle").count(), 2);
        let log = line_chart(
            "CDF",
            "ms",
            "share",
            Axis::Log,
            Some(1.0),
            &[Series {
                label: "25/s".into(),
                points: vec![(0.0, 0.0), (10.0, 0.5), (1000.0, 1.0)],
                dashed: true,
                markers: false,
            }],
            &[],
        );
        // A zero latency has no place on a log axis; 10 and 1000 span it.
        assert!(log.contains(r#"points="70.0,204.0 570.0,44.0""#), "{log}");
    }

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(250.0), 50.0);
        assert_eq!(nice_step(9.0), 2.0);
        assert_eq!(nice_step(0.0), 0.0);
        assert_eq!(nice_step(120_000.0), 20_000.0);
    }
}
