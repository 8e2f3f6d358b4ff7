//! Hand-written SVG plots: line charts over the day and a box plot of ESV per policy.

const W: f64 = 760.0;
const H: f64 = 420.0;
const L: f64 = 70.0;
const R: f64 = 170.0;
const T: f64 = 40.0;
const B: f64 = 50.0;
const COLOURS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * p {
            return m * p;
        }
    }
    10.0 * p
}

fn frame(title: &str, xlabel: &str, ylabel: &str, xmax: f64, ymax: f64) -> String {
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        (L + W - R) / 2.0,
        esc(title)
    );
    let (pw, ph) = (W - L - R, H - T - B);
    s += &format!(
        "<rect x=\"{L}\" y=\"{T}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#444\"/>\n"
    );
    for i in 0..=5 {
        let y = T + ph - ph * i as f64 / 5.0;
        let v = ymax * i as f64 / 5.0;
        s += &format!(
            "<line x1=\"{L}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            L + pw,
            L - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
        if xmax > 0.0 {
            let x = L + pw * i as f64 / 5.0;
            s += &format!(
                "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                T + ph + 16.0,
                fmt_tick(xmax * i as f64 / 5.0)
            );
        }
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n<text transform=\"translate(16,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        L + pw / 2.0,
        H - 12.0,
        esc(xlabel),
        T + ph / 2.0,
        esc(ylabel)
    );
    s
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2e}")
    }
}

/// A line chart: each series is (name, points (x, y)).
pub fn lines(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let xmax = nice_max(
        series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.0))
            .fold(0.0, f64::max),
    );
    let ymax = nice_max(
        series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.1))
            .fold(0.0, f64::max),
    );
    let mut s = frame(title, xlabel, ylabel, xmax, ymax);
    let (pw, ph) = (W - L - R, H - T - B);
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", L + pw * x / xmax, T + ph - ph * y / ymax))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.3\" points=\"{}\"/>\n",
            path.join(" ")
        );
        let ly = T + 14.0 + 18.0 * i as f64;
        s += &format!(
            "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            W - R + 10.0,
            W - R + 30.0,
            W - R + 35.0,
            ly + 4.0,
            esc(name)
        );
    }
    s + "</svg>\n"
}

/// A box plot (min, quartiles, median, max) per group.
pub fn boxes(title: &str, ylabel: &str, groups: &[(String, Vec<f64>)]) -> String {
    let ymax = nice_max(
        groups
            .iter()
            .flat_map(|g| g.1.iter().copied())
            .fold(0.0, f64::max),
    );
    let mut s = frame(title, "", ylabel, 0.0, ymax);
    let (pw, ph) = (W - L - R, H - T - B);
    let n = groups.len().max(1) as f64;
    let y = |v: f64| T + ph - ph * v / ymax;
    for (i, (name, vals)) in groups.iter().enumerate() {
        let mut v = vals.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            continue;
        }
        let q = |p: f64| {
            let pos = p * (v.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        };
        let cx = L + pw * (i as f64 + 0.5) / n;
        let bw = (pw / n * 0.5).min(60.0);
        let c = COLOURS[i % COLOURS.len()];
        s += &format!(
            "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#444\"/>\n<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{c}\" fill-opacity=\"0.4\" stroke=\"{c}\"/>\n<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\" stroke-width=\"2\"/>\n",
            y(v[0]),
            y(v[v.len() - 1]),
            cx - bw / 2.0,
            y(q(0.75)),
            (y(q(0.25)) - y(q(0.75))).max(0.5),
            cx - bw / 2.0,
            cx + bw / 2.0,
            y(q(0.5)),
            y(q(0.5))
        );
        s += &format!(
            "<text x=\"{cx:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\">{}</text>\n",
            T + ph + 16.0,
            esc(name)
        );
    }
    s + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_is_well_formed_enough() {
        let l = lines(
            "t<1>",
            "x",
            "y",
            &[("a&b".into(), vec![(0.0, 1.0), (10.0, 3.0)])],
        );
        assert!(l.starts_with("<svg") && l.trim_end().ends_with("</svg>"));
        assert!(l.contains("t&lt;1&gt;") && l.contains("a&amp;b") && l.contains("<polyline"));
        let b = boxes(
            "esv",
            "ESV",
            &[("p".into(), vec![1.0, 2.0, 3.0, 4.0]), ("q".into(), vec![])],
        );
        assert_eq!(b.matches("<rect x=").count(), 2); // plot frame + one box
        assert_eq!(nice_max(7.3), 10.0);
        assert_eq!(nice_max(0.0021), 0.0025);
    }
}
