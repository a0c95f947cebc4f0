//! Line charts as SVG, for the scaling curves: x is the load (flows, connections, policies,
//! threads), y what it costs; one line per series, every measured point drawn as a dot.
//! Written here rather than by a plotting tool so a run needs nothing but the harness.

use std::fmt::Write as _;

/// One line of a chart.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    /// `(x, y)`, x ascending; points with a non-finite or (on a log axis) non-positive
    /// coordinate are left out.
    pub points: Vec<(f64, f64)>,
}

/// A chart: title, axis labels, and whether each axis is logarithmic.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series<'a>>,
}

const W: f64 = 460.0;
const H: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

impl Chart<'_> {
    /// The chart as an SVG `<g>` placed at `(x, y)`, [`Chart::WIDTH`] × [`Chart::HEIGHT`].
    pub fn group(&self, at_x: f64, at_y: f64) -> String {
        let mut s = String::new();
        let _ = writeln!(s, r#"<g transform="translate({at_x},{at_y})">"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="20" font-size="13" text-anchor="middle">{}</text>"#,
            W / 2.0,
            escape(self.title)
        );
        let tx = |v: f64, log: bool| if log { v.log10() } else { v };
        let ok = |v: f64, log: bool| v.is_finite() && (!log || v > 0.0);
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|&(x, y)| ok(x, self.log_x) && ok(y, self.log_y))
            .map(|(x, y)| (tx(x, self.log_x), tx(y, self.log_y)))
            .collect();
        let (x0, x1, y0, y1) = if pts.is_empty() {
            (0.0, 1.0, 0.0, 1.0)
        } else {
            let fold = |f: fn(f64, f64) -> f64, init: f64, pick: fn(&(f64, f64)) -> f64| {
                pts.iter().map(pick).fold(init, f)
            };
            let (mut x0, mut x1) = (
                fold(f64::min, f64::INFINITY, |p| p.0),
                fold(f64::max, f64::NEG_INFINITY, |p| p.0),
            );
            let (mut y0, mut y1) = (
                fold(f64::min, f64::INFINITY, |p| p.1),
                fold(f64::max, f64::NEG_INFINITY, |p| p.1),
            );
            if !self.log_y {
                y0 = y0.min(0.0);
            }
            if x1 - x0 < 1e-9 {
                x0 -= 0.5;
                x1 += 0.5;
            }
            if y1 - y0 < 1e-9 {
                y0 -= 0.5;
                y1 += 0.5;
            }
            let pad = (y1 - y0) * 0.08;
            (x0, x1, if self.log_y { y0 - pad } else { y0 }, y1 + pad)
        };
        let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
        let py = |y: f64| H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM);
        // Axes, ticks at the measured x values, five y ticks.
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#999"/>"##,
            W - LEFT - RIGHT,
            H - TOP - BOTTOM
        );
        let mut xs: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .filter(|&x| ok(x, self.log_x))
            .collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        for x in xs {
            let p = px(tx(x, self.log_x));
            let _ = writeln!(
                s,
                r##"<line x1="{p:.1}" y1="{}" x2="{p:.1}" y2="{}" stroke="#999"/><text x="{p:.1}" y="{}" text-anchor="middle" font-size="10">{}</text>"##,
                H - BOTTOM,
                H - BOTTOM + 4.0,
                H - BOTTOM + 16.0,
                short_num(x)
            );
        }
        for i in 0..=4 {
            let v = y0 + (y1 - y0) * f64::from(i) / 4.0;
            let p = py(v);
            let label = if self.log_y { 10f64.powf(v) } else { v };
            let _ = writeln!(
                s,
                r##"<line x1="{}" y1="{p:.1}" x2="{}" y2="{p:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end" font-size="10">{}</text>"##,
                LEFT,
                W - RIGHT,
                LEFT - 4.0,
                p + 3.0,
                short_num(label)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="11">{}{}</text>"#,
            (LEFT + W - RIGHT) / 2.0,
            H - 12.0,
            escape(self.x_label),
            if self.log_x { " (log)" } else { "" }
        );
        let _ = writeln!(
            s,
            r#"<text x="14" y="{}" text-anchor="middle" font-size="11" transform="rotate(-90 14 {})">{}{}</text>"#,
            (TOP + H - BOTTOM) / 2.0,
            (TOP + H - BOTTOM) / 2.0,
            escape(self.y_label),
            if self.log_y { " (log)" } else { "" }
        );
        for (i, series) in self.series.iter().enumerate() {
            let pts: Vec<(f64, f64)> = series
                .points
                .iter()
                .copied()
                .filter(|&(x, y)| ok(x, self.log_x) && ok(y, self.log_y))
                .map(|(x, y)| (px(tx(x, self.log_x)), py(tx(y, self.log_y))))
                .collect();
            if pts.len() > 1 {
                let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                let _ = writeln!(
                    s,
                    r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                    path.join(" "),
                    series.color
                );
            }
            for (x, y) in &pts {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{}"/>"#,
                    series.color
                );
            }
            let ly = TOP + 12.0 + 14.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}" font-size="10">{}</text>"#,
                LEFT + 8.0,
                ly - 9.0,
                series.color,
                LEFT + 22.0,
                ly,
                escape(series.name)
            );
        }
        s.push_str("</g>\n");
        s
    }

    pub const WIDTH: f64 = W;
    pub const HEIGHT: f64 = H;
}

/// Charts on a grid, `columns` wide, as one SVG document.
pub fn page(title: &str, charts: &[Chart<'_>], columns: usize) -> String {
    let columns = columns.max(1);
    let rows = charts.len().div_ceil(columns).max(1);
    let width = Chart::WIDTH * columns as f64;
    let height = 30.0 + Chart::HEIGHT * rows as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="15">{}</text>"#,
        escape(title)
    );
    for (i, c) in charts.iter().enumerate() {
        let x = Chart::WIDTH * (i % columns) as f64;
        let y = 30.0 + Chart::HEIGHT * (i / columns) as f64;
        s.push_str(&c.group(x, y));
    }
    s.push_str("</svg>\n");
    s
}

fn short_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.3}M", v / 1e6)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .replace(".M", "M")
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_finite_point_and_skips_the_rest() {
        let chart = Chart {
            title: "a < b",
            x_label: "flows",
            y_label: "MB/s",
            log_x: true,
            log_y: false,
            series: vec![
                Series {
                    name: "relay",
                    color: "#000",
                    points: vec![(1.0, 10.0), (16.0, 20.0), (256.0, f64::NAN), (0.0, 5.0)],
                },
                Series {
                    name: "plaintext",
                    color: "#111",
                    points: vec![(1.0, 30.0)],
                },
            ],
        };
        let svg = page("scaling", &[chart], 2);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<circle").count(), 3, "{svg}");
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("a &lt; b"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
