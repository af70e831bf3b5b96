//! A minimal SVG writer for the report's plots: horizontal bars, one per runtime, with the
//! value written beside each bar and an optional range (for example p10-p90) drawn as a
//! whisker. Plain SVG 1.1 text, no dependency; every string is XML-escaped.

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
    fn steps_are_round() {
        assert_eq!(nice_step(250.0), 50.0);
        assert_eq!(nice_step(9.0), 2.0);
        assert_eq!(nice_step(0.0), 0.0);
        assert_eq!(nice_step(120_000.0), 20_000.0);
    }
}
