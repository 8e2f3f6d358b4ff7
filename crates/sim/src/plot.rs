//! Hand-written SVG plots: the day's series per policy as small multiples (one panel per policy on
//! shared axes, the other policies in grey behind it), and a box plot per policy.
//!
//! Axes are tight: a linear axis runs from 0 to the first "nice" tick (1, 2, 2.5 or 5 × 10ᵏ steps) at
//! or above the data's maximum, with every tick label printed with the same number of decimals; the
//! box plot switches to a log axis with one label per decade when its values span a factor of ten or
//! more.

/// One panel's plot area.
const PW: f64 = 200.0;
const PH: f64 = 120.0;
/// Gaps around and between panels.
const LEFT: f64 = 80.0;
const TOP: f64 = 50.0;
const GAP_X: f64 = 60.0;
const GAP_Y: f64 = 60.0;
const BOTTOM: f64 = 50.0;
const RIGHT: f64 = 20.0;
/// Colour-blind-safe palette (Okabe–Ito, then Tol's bright), one per policy.
const COLOURS: [&str; 10] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#882255",
    "#44AA99", "#999933",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A linear axis from 0: its ticks and their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearAxis {
    /// Tick values, from 0 to the axis end.
    pub ticks: Vec<f64>,
    /// Decimals every label is printed with.
    pub decimals: usize,
}

impl LinearAxis {
    /// The tightest axis 0..=end whose end is a multiple of a 1/2/2.5/5 × 10ᵏ step at or above
    /// `max`, with at most `max_ticks` intervals.
    pub fn fit(max: f64, max_ticks: usize) -> Self {
        let max = if max.is_finite() && max > 0.0 {
            max
        } else {
            1.0
        };
        let mut k = (max / max_ticks as f64).log10().floor() as i32;
        loop {
            let p = 10f64.powi(k);
            for m in [1.0, 2.0, 2.5, 5.0] {
                let step = m * p;
                let n = (max / step - 1e-9).ceil().max(1.0) as usize;
                if n <= max_ticks {
                    let decimals = decimals_of(step);
                    let ticks = (0..=n)
                        .map(|i| round_to(i as f64 * step, decimals))
                        .collect();
                    return LinearAxis { ticks, decimals };
                }
            }
            k += 1;
        }
    }

    /// Fixed ticks every `step` from 0 to `end`.
    pub fn fixed(end: f64, step: f64) -> Self {
        let n = (end / step).round() as usize;
        let decimals = decimals_of(step);
        LinearAxis {
            ticks: (0..=n)
                .map(|i| round_to(i as f64 * step, decimals))
                .collect(),
            decimals,
        }
    }

    /// The axis end.
    pub fn end(&self) -> f64 {
        *self.ticks.last().unwrap_or(&1.0)
    }

    /// The label of tick `v`.
    pub fn label(&self, v: f64) -> String {
        format!("{v:.*}", self.decimals)
    }
}

/// Decimals needed to print multiples of `step` exactly (2.5 → 1, 0.25 → 2, 200 → 0).
fn decimals_of(step: f64) -> usize {
    (0..6)
        .find(|&d| {
            let s = step * 10f64.powi(d);
            (s - s.round()).abs() < 1e-9 * s.max(1.0)
        })
        .unwrap_or(6) as usize
}

fn round_to(v: f64, decimals: usize) -> f64 {
    let p = 10f64.powi(decimals as i32);
    (v * p).round() / p
}

fn svg_open(w: f64, h: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text class=\"title\" x=\"{:.1}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        w / 2.0,
        esc(title)
    )
}

fn axis_titles(w: f64, h: f64, xlabel: &str, ylabel: &str) -> String {
    format!(
        "<text class=\"xlabel\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"13\">{}</text>\n<text class=\"ylabel\" transform=\"translate(18,{:.1}) rotate(-90)\" text-anchor=\"middle\" font-size=\"13\">{}</text>\n",
        (LEFT + w - RIGHT) / 2.0,
        h - 12.0,
        esc(xlabel),
        (TOP + h - BOTTOM) / 2.0,
        esc(ylabel)
    )
}

/// The series of a day as small multiples: one panel per series, all on the same axes (x from 0 to
/// `x_axis`'s end, y from 0 to the tightest nice value above every series' maximum), each panel with
/// the other series drawn thin and grey behind its own. Series are (name, points (x, y)).
pub fn small_multiples(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    x_axis: &LinearAxis,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let y_axis = LinearAxis::fit(ymax, 6);
    let n = series.len().max(1);
    let cols = n.min(4);
    let rows = n.div_ceil(cols);
    let w = LEFT + cols as f64 * PW + (cols - 1) as f64 * GAP_X + RIGHT;
    let h = TOP + rows as f64 * PH + (rows - 1) as f64 * GAP_Y + BOTTOM;
    let mut s = svg_open(w, h, title);
    s += &axis_titles(w, h, xlabel, ylabel);
    let (xend, yend) = (x_axis.end(), y_axis.end());
    let polyline = |x0: f64, y0: f64, pts: &[(f64, f64)]| -> String {
        pts.iter()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    x0 + PW * (x / xend).clamp(0.0, 1.0),
                    y0 + PH - PH * (y / yend).clamp(0.0, 1.0)
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    for (i, (name, pts)) in series.iter().enumerate() {
        let (col, row) = (i % cols, i / cols);
        let x0 = LEFT + col as f64 * (PW + GAP_X);
        let y0 = TOP + row as f64 * (PH + GAP_Y);
        let c = COLOURS[i % COLOURS.len()];
        s += &format!("<g class=\"panel\" data-series=\"{}\">\n", esc(name));
        s += &format!(
            "<text class=\"panel-title\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"12\" font-weight=\"bold\" fill=\"{c}\">{}</text>\n",
            x0 + PW / 2.0,
            y0 - 8.0,
            esc(name)
        );
        for &v in &y_axis.ticks {
            let y = y0 + PH - PH * v / yend;
            s += &format!(
                "<line x1=\"{x0:.1}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e4e4e4\"/><text class=\"ytick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                x0 + PW,
                x0 - 5.0,
                y + 4.0,
                y_axis.label(v)
            );
        }
        for &v in &x_axis.ticks {
            let x = x0 + PW * v / xend;
            s += &format!(
                "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#444\"/><text class=\"xtick\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
                y0 + PH,
                y0 + PH + 4.0,
                y0 + PH + 16.0,
                x_axis.label(v)
            );
        }
        for (j, (_, other)) in series.iter().enumerate() {
            if j != i {
                s += &format!(
                    "<polyline class=\"context\" fill=\"none\" stroke=\"#cfcfcf\" stroke-width=\"0.8\" points=\"{}\"/>\n",
                    polyline(x0, y0, other)
                );
            }
        }
        s += &format!(
            "<polyline class=\"series\" fill=\"none\" stroke=\"{c}\" stroke-width=\"1.4\" points=\"{}\"/>\n",
            polyline(x0, y0, pts)
        );
        s += &format!(
            "<rect x=\"{x0:.1}\" y=\"{y0:.1}\" width=\"{PW}\" height=\"{PH}\" fill=\"none\" stroke=\"#444\"/>\n</g>\n"
        );
    }
    s + "</svg>\n"
}

/// A box plot (whiskers at min and max, box at the quartiles, line at the median) per group, on a
/// log axis when the positive values span a factor of ten or more (non-positive values cannot be
/// drawn there and are counted in the group's label), on a linear axis from 0 otherwise.
pub fn boxes(title: &str, xlabel: &str, ylabel: &str, groups: &[(String, Vec<f64>)]) -> String {
    let all: Vec<f64> = groups.iter().flat_map(|g| g.1.iter().copied()).collect();
    let pos_min = all
        .iter()
        .copied()
        .filter(|&v| v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let max = all.iter().copied().fold(0.0, f64::max);
    let log = pos_min.is_finite() && max / pos_min >= 10.0;
    let n = groups.len().max(1);
    let slot = 90.0;
    let pw = (n as f64 * slot).max(300.0);
    let ph = 300.0;
    let w = LEFT + pw + RIGHT;
    let h = TOP + ph + BOTTOM + 20.0;
    let mut s = svg_open(w, h, title);
    s += &axis_titles(w, h, xlabel, ylabel);
    // value → y pixel, and the tick labels
    let (scale, ticks) = if log {
        let lo = pos_min.log10().floor() as i32;
        let hi = max.log10().ceil() as i32;
        let hi = if hi == lo { lo + 1 } else { hi };
        (
            Scale::Log {
                lo: lo as f64,
                span: (hi - lo) as f64,
            },
            (lo..=hi)
                .map(|k| (10f64.powi(k), format!("10{}", superscript(k))))
                .collect::<Vec<_>>(),
        )
    } else {
        let axis = LinearAxis::fit(max, 6);
        (
            Scale::Linear { end: axis.end() },
            axis.ticks.iter().map(|&v| (v, axis.label(v))).collect(),
        )
    };
    let to_y = |v: f64| TOP + ph - ph * scale.fraction(v);
    s += &format!(
        "<g class=\"axis\" data-scale=\"{}\">\n",
        if log { "log" } else { "linear" }
    );
    if log {
        // unlabelled grid lines at 2× and 5× each decade
        for w in ticks.windows(2) {
            for m in [2.0, 5.0] {
                let y = to_y(w[0].0 * m);
                s += &format!(
                    "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#f0f0f0\"/>\n",
                    LEFT + pw
                );
            }
        }
    }
    for (v, label) in &ticks {
        let y = to_y(*v);
        s += &format!(
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e4e4e4\"/><text class=\"ytick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            LEFT + pw,
            LEFT - 5.0,
            y + 4.0,
            label
        );
    }
    s += "</g>\n";
    s += &format!(
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#444\"/>\n"
    );
    for (i, (name, vals)) in groups.iter().enumerate() {
        let mut v: Vec<f64> = vals.iter().copied().filter(|&x| !log || x > 0.0).collect();
        let dropped = vals.len() - v.len();
        v.sort_by(f64::total_cmp);
        let cx = LEFT + pw * (i as f64 + 0.5) / n as f64;
        let c = COLOURS[i % COLOURS.len()];
        let label = if dropped > 0 {
            format!("{name} ({dropped} ≤ 0 not shown)")
        } else {
            name.clone()
        };
        s += &format!(
            "<text class=\"xtick\" x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>\n",
            TOP + ph + 16.0,
            esc(&label)
        );
        if v.is_empty() {
            continue;
        }
        let q = |p: f64| {
            let pos = p * (v.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        };
        let bw = (pw / n as f64 * 0.5).min(50.0);
        s += &format!(
            "<g class=\"box\" data-group=\"{}\">\n<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#444\"/>\n<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{c}\" fill-opacity=\"0.35\" stroke=\"{c}\"/>\n<line class=\"median\" x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\" stroke-width=\"2\"/>\n</g>\n",
            esc(name),
            to_y(v[0]),
            to_y(v[v.len() - 1]),
            cx - bw / 2.0,
            to_y(q(0.75)),
            (to_y(q(0.25)) - to_y(q(0.75))).max(0.5),
            cx - bw / 2.0,
            cx + bw / 2.0,
            to_y(q(0.5)),
            to_y(q(0.5))
        );
    }
    s + "</svg>\n"
}

/// Where a value sits on the box plot's axis.
#[derive(Debug, Clone, Copy)]
enum Scale {
    /// Decades `lo` to `lo + span`.
    Log { lo: f64, span: f64 },
    /// 0 to `end`.
    Linear { end: f64 },
}

impl Scale {
    /// 0 at the bottom of the axis, 1 at the top.
    fn fraction(self, v: f64) -> f64 {
        match self {
            Scale::Log { lo, span } => (v.log10() - lo) / span,
            Scale::Linear { end } => v / end,
        }
    }
}

fn superscript(k: i32) -> String {
    let digits = ['⁰', '¹', '²', '³', '⁴', '⁵', '⁶', '⁷', '⁸', '⁹'];
    let mut out = String::new();
    if k < 0 {
        out.push('⁻');
    }
    for ch in k.unsigned_abs().to_string().chars() {
        out.push(digits[ch as usize - '0' as usize]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of every `<text>` element with class `class`.
    fn texts(doc: &roxmltree::Document<'_>, class: &str) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text") && n.attribute("class") == Some(class))
            .map(|n| n.text().unwrap_or_default().to_string())
            .collect()
    }

    fn day_series(names: &[&str], peak: f64) -> Vec<(String, Vec<(f64, f64)>)> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let pts = (0..288)
                    .map(|k| {
                        let t = (k as f64 * 300.0 + 300.1) / 3600.0;
                        (
                            t,
                            peak * (0.5 + 0.5 * ((k + 10 * i) as f64 / 30.0).sin().abs()),
                        )
                    })
                    .collect();
                (n.to_string(), pts)
            })
            .collect()
    }

    #[test]
    fn linear_axes_are_tight_and_labelled_alike() {
        let show = |a: &LinearAxis| {
            a.ticks
                .iter()
                .map(|&v| a.label(v))
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(show(&LinearAxis::fit(800.0, 6)), "0 200 400 600 800");
        assert_eq!(show(&LinearAxis::fit(104.3, 6)), "0 20 40 60 80 100 120");
        assert_eq!(show(&LinearAxis::fit(97.0, 6)), "0 20 40 60 80 100");
        assert_eq!(show(&LinearAxis::fit(2.2, 6)), "0.0 0.5 1.0 1.5 2.0 2.5");
        assert_eq!(
            show(&LinearAxis::fit(0.0021, 6)),
            "0.0000 0.0005 0.0010 0.0015 0.0020 0.0025"
        );
        assert_eq!(show(&LinearAxis::fixed(24.0, 6.0)), "0 6 12 18 24");
        assert_eq!(show(&LinearAxis::fit(0.0, 6)), "0.0 0.2 0.4 0.6 0.8 1.0");
    }

    #[test]
    fn small_multiples_render_one_labelled_panel_per_policy_on_tight_axes() {
        let names = ["dvfs", "thr-mmt-1.0", "lr-mmt-1.2", "lrr-mmt-1.2", "a<b&c"];
        let svg = small_multiples(
            "Active hosts, 20110303",
            "hour of the day",
            "active hosts",
            &LinearAxis::fixed(24.0, 6.0),
            &day_series(&names, 800.0),
        );
        let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
        assert_eq!(texts(&doc, "title"), ["Active hosts, 20110303"]);
        assert_eq!(texts(&doc, "xlabel"), ["hour of the day"]);
        assert_eq!(texts(&doc, "ylabel"), ["active hosts"]);
        assert_eq!(texts(&doc, "panel-title"), names);
        // every panel: y from 0 to 800 (the data's maximum), x from 0 to 24 h
        let y = texts(&doc, "ytick");
        assert_eq!(y.len(), names.len() * 5);
        assert_eq!(y[..5], ["0", "200", "400", "600", "800"]);
        let x = texts(&doc, "xtick");
        assert_eq!(x[..5], ["0", "6", "12", "18", "24"]);
        // each policy has its own colour; each panel draws all the others as grey context
        let colours: Vec<&str> = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("series"))
            .map(|n| n.attribute("stroke").unwrap())
            .collect();
        assert_eq!(colours.len(), names.len());
        let mut distinct = colours.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), names.len(), "{colours:?}");
        let context = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("context"))
            .count();
        assert_eq!(context, names.len() * (names.len() - 1));
        // no point leaves its panel
        for n in doc.descendants().filter(|n| n.has_tag_name("polyline")) {
            for p in n.attribute("points").unwrap().split(' ') {
                let (px, py) = p.split_once(',').unwrap();
                let (px, py): (f64, f64) = (px.parse().unwrap(), py.parse().unwrap());
                assert!(px >= LEFT && py >= TOP, "{p}");
            }
        }
    }

    #[test]
    fn box_plot_switches_to_a_log_axis_when_values_span_decades() {
        let groups = vec![
            ("thr-mmt-1.0".to_string(), vec![0.05, 0.04, 0.06]),
            ("lr-mmt-1.2".to_string(), vec![0.004, 0.005, 0.006, 0.0]),
        ];
        let svg = boxes("ESV per policy", "policy", "ESV", &groups);
        let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
        assert_eq!(texts(&doc, "xlabel"), ["policy"]);
        assert_eq!(texts(&doc, "ylabel"), ["ESV"]);
        let axis = doc
            .descendants()
            .find(|n| n.attribute("class") == Some("axis"))
            .unwrap();
        assert_eq!(axis.attribute("data-scale"), Some("log"));
        assert_eq!(texts(&doc, "ytick"), ["10⁻³", "10⁻²", "10⁻¹"]);
        assert_eq!(
            texts(&doc, "xtick"),
            ["thr-mmt-1.0", "lr-mmt-1.2 (1 ≤ 0 not shown)"]
        );
        assert_eq!(
            doc.descendants()
                .filter(|n| n.attribute("class") == Some("box"))
                .count(),
            2
        );
        // within one decade: linear from 0
        let svg = boxes(
            "ESV",
            "policy",
            "ESV ×10⁻³",
            &[("p".into(), vec![4.0, 5.0, 7.9]), ("q".into(), vec![])],
        );
        let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
        let axis = doc
            .descendants()
            .find(|n| n.attribute("class") == Some("axis"))
            .unwrap();
        assert_eq!(axis.attribute("data-scale"), Some("linear"));
        assert_eq!(texts(&doc, "ytick"), ["0", "2", "4", "6", "8"]);
    }
}
