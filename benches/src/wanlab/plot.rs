//! busbw against size, one line per result file, as an SVG chart and a Markdown table.
//!
//! Inputs are the `--json` outputs of `allreduce-perf` and `gloo_allreduce.py`; each file's stem
//! (`longhaul-transatlantic`, `gloo-default-transatlantic`, ...) names its line.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// One line of the chart: (bytes, busbw in Gbit/s) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(u64, f64)>,
}

pub fn load(path: &Path) -> Result<Series> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // The JSON document may follow log lines (a runner's prefix): start at the first '{'.
    let start = text.find('{').with_context(|| format!("{}: no JSON object", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text[start..])
        .with_context(|| format!("parsing {}", path.display()))?;
    let rows = v["results"]
        .as_array()
        .with_context(|| format!("{}: no \"results\" array", path.display()))?;
    let points = rows
        .iter()
        .filter_map(|r| Some((r["bytes"].as_u64()?, r["busbw_gbps"].as_f64()? * 8.0)))
        .collect();
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(Series { name, points })
}

pub fn plot(files: &[PathBuf], out: &Path, table: Option<&Path>) -> Result<()> {
    if files.is_empty() {
        bail!("no result files given");
    }
    let series: Vec<Series> = files.iter().map(|f| load(f)).collect::<Result<_>>()?;
    std::fs::write(out, svg(&series)).with_context(|| format!("writing {}", out.display()))?;
    if let Some(t) = table {
        std::fs::write(t, markdown(&series)).with_context(|| format!("writing {}", t.display()))?;
    }
    println!("wrote {}", out.display());
    Ok(())
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

pub fn markdown(series: &[Series]) -> String {
    let sizes: BTreeSet<u64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
    let mut md = String::from("busbw in Gbit/s\n\n| size |");
    for s in series {
        let _ = write!(md, " {} |", s.name);
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(series.len()));
    md.push('\n');
    for size in sizes {
        let _ = write!(md, "| {} |", human(size));
        for s in series {
            match s.points.iter().find(|p| p.0 == size) {
                Some(p) => {
                    let _ = write!(md, " {:.3} |", p.1);
                }
                None => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    md
}

const COLOURS: [&str; 8] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

pub fn svg(series: &[Series]) -> String {
    let (w, h, left, right, top, bottom) = (820.0, 480.0, 70.0, 250.0, 30.0, 60.0);
    let pts = series.iter().flat_map(|s| s.points.iter());
    let xmin = pts.clone().map(|p| p.0).min().unwrap_or(1).max(1) as f64;
    let xmax = pts.clone().map(|p| p.0).max().unwrap_or(2).max(2) as f64;
    let ymax = pts.map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.1;
    let (lx0, lx1) = (xmin.log2(), xmax.log2().max(xmin.log2() + 1.0));
    let x = |b: f64| left + (b.log2() - lx0) / (lx1 - lx0) * (w - left - right);
    let y = |v: f64| h - bottom - v / ymax * (h - top - bottom);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">all-reduce busbw against size</text>",
        (w - right + left) / 2.0
    );
    // Axes and grid.
    for i in 0..=5 {
        let v = ymax * f64::from(i) / 5.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>",
            w - right
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>",
            left - 6.0,
            yy + 4.0
        );
    }
    let mut b = xmin;
    while b <= xmax * 1.01 {
        let xx = x(b);
        let _ = writeln!(
            s,
            "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>",
            h - bottom
        );
        let _ = writeln!(
            s,
            "<text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            h - bottom + 16.0,
            human(b as u64)
        );
        b *= 2.0;
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">message size</text>",
        (w - right + left) / 2.0,
        h - 18.0
    );
    let _ = writeln!(
        s,
        "<text x=\"16\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {:.1})\">busbw (Gbit/s)</text>",
        h / 2.0,
        h / 2.0
    );
    for (i, ser) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let path: Vec<String> =
            ser.points.iter().map(|(bb, v)| format!("{:.1},{:.1}", x(*bb as f64), y(*v))).collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        for (bb, v) in &ser.points {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>",
                x(*bb as f64),
                y(*v)
            );
        }
        let ly = top + 20.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{c}\" stroke-width=\"3\"/>",
            w - right + 15.0,
            w - right + 40.0
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            w - right + 46.0,
            ly + 4.0,
            xml_escape(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_and_table_hold_every_series() {
        let a = Series { name: "longhaul-x".into(), points: vec![(1 << 20, 0.5), (1 << 22, 0.8)] };
        let b = Series { name: "gloo-x".into(), points: vec![(1 << 20, 0.1)] };
        let svg = svg(&[a.clone(), b.clone()]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("longhaul-x") && svg.contains("gloo-x"));
        let md = markdown(&[a, b]);
        assert!(md.contains("| 1 MiB | 0.500 | 0.100 |"), "{md}");
        assert!(md.contains("| 4 MiB | 0.800 | – |"), "{md}");
    }

    #[test]
    fn loads_json_after_log_lines() {
        let dir = std::env::temp_dir().join(format!("lh-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("gloo-lan.json");
        std::fs::write(&f, "[h0] noise\n{\"results\": [{\"bytes\": 1024, \"busbw_gbps\": 0.25}]}")
            .unwrap();
        let s = load(&f).unwrap();
        assert_eq!(s.name, "gloo-lan");
        assert_eq!(s.points, vec![(1024, 2.0)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
