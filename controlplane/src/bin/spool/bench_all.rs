//! `spool bench all`: every scenario in one run, side by side: the device against fio,
//! the FUSE mount against the local filesystem, one transport link against iperf3,
//! replication against iperf3 and fio, the
//! MLPerf-style checkpoint, the blob tier against the Azure SDK and rclone, and the
//! scale model. Each scenario runs as its own `spool bench ...` (its table printed as
//! it goes, its CSV kept); then one table gathers every row with its ratio to its limit
//! or peer, its CPU seconds per GiB where the scenario measures them, the CPU time the
//! scenario took, and the machine, written as CSV and plotted
//! (SVG, and PNG through `rsvg-convert` when it is installed).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::bench::children_cpu_secs;

/// The scenarios, in the order they run.
const SCENARIOS: [&str; 7] = [
    "device",
    "fuse",
    "transport",
    "cluster",
    "checkpoint",
    "blob",
    "scale",
];

#[derive(Debug, clap::Args)]
pub struct AllBench {
    /// Working directory: each scenario's files, CSV and the combined results.
    #[arg(long, default_value = "/var/tmp/spool-bench-all")]
    dir: PathBuf,
    /// Small sizes (a few minutes in all): checks that everything runs; not figures.
    #[arg(long)]
    quick: bool,
    /// Scenarios to leave out, e.g. `cluster,checkpoint` (of: device, fuse, transport,
    /// cluster, checkpoint, blob, scale).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// The combined table as CSV (default: DIR/bench.csv).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// The plot of every row's ratio to its limit or peer (default: DIR/bench.png; an
    /// SVG is written beside it, and alone when rsvg-convert is missing).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// One row of the combined table.
#[derive(Debug, Clone)]
struct Combined {
    scenario: &'static str,
    what: String,
    value: f64,
    unit: String,
    /// To its limit or peer.
    ratio: Option<f64>,
    /// The ratio compares times (lower is better), not rates.
    ratio_of_times: bool,
    /// CPU seconds per GiB moved, where the scenario measures it per row.
    cpu_per_gib: Option<f64>,
    note: String,
}

/// The arguments of one scenario.
fn args(s: &str, dir: &Path, quick: bool) -> Vec<String> {
    let d = |p: &str| dir.join(p).display().to_string();
    let q = |small: &str, full: &str| if quick { small } else { full }.to_owned();
    let v = |x: &[&str]| x.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let mut a = match s {
        "device" => v(&["device", "--path", &d("device/bench.img")]),
        "fuse" => v(&["fuse", "--path", &d("fuse/store.img")]),
        "transport" => v(&["transport"]),
        "cluster" => v(&["cluster", "--dir", &d("cluster")]),
        "checkpoint" => v(&["checkpoint", "--dir", &d("checkpoint"), "--model", "smoke"]),
        "blob" => v(&["blob", "--dir", &d("blob")]),
        _ => v(&["scale", "--dir", &d("scale")]),
    };
    a.extend(match s {
        "device" => vec![
            "--size".into(),
            q("256MiB", "4GiB"),
            "--repeat".into(),
            q("1", "3"),
        ],
        "fuse" => vec![
            "--size".into(),
            q("512MiB", "4GiB"),
            "--shard-size".into(),
            q("32MiB", "256MiB"),
            "--repeat".into(),
            q("1", "3"),
        ],
        "transport" => vec![
            "--bytes".into(),
            q("64MiB", "1GiB"),
            "--rounds".into(),
            q("1", "3"),
        ],
        "cluster" => vec!["--size".into(), q("64MiB", "1GiB")],
        "checkpoint" => vec!["--size".into(), q("48MiB", "1GiB")],
        "blob" => vec![
            "--files".into(),
            "4".into(),
            "--file-size".into(),
            q("4MiB", "256MiB"),
        ],
        _ => vec!["--files".into(), q("20", "2000")],
    });
    a
}

/// Splits one CSV line as the benches write it (fields quoted with Rust's escapes).
fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut escaped) = (false, false);
    for c in line.chars() {
        match (quoted, escaped, c) {
            (true, true, c) => {
                cur.push(c);
                escaped = false;
            }
            (true, false, '\\') => escaped = true,
            (true, false, '"') => quoted = false,
            (false, _, '"') => quoted = true,
            (false, _, ',') => out.push(std::mem::take(&mut cur)),
            (_, _, c) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// The first `0.84x`-style ratio in a note, and whether it compares times (the notes
/// say so: "0.84x the SDK's time"); otherwise it compares rates.
fn ratio_in(note: &str) -> Option<(f64, bool)> {
    let b = note.as_bytes();
    (0..b.len()).find_map(|i| {
        let start = i == 0 || !(b[i - 1].is_ascii_digit() || b[i - 1] == b'.');
        let len = b[i..]
            .iter()
            .take_while(|c| c.is_ascii_digit() || **c == b'.')
            .count();
        if !(start && len > 0 && b.get(i + len) == Some(&b'x')) {
            return None;
        }
        let v = note[i..i + len].parse().ok()?;
        let rest = &note[i + len + 1..];
        let phrase = rest.split([';', ',', ')']).next().unwrap_or("");
        Some((v, phrase.contains("time")))
    })
}

/// The rows of one scenario's CSV.
fn read_rows(scenario: &'static str, text: &str) -> Vec<Combined> {
    let mut lines = text.lines();
    let header = split_csv(lines.next().unwrap_or(""));
    let col = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| header.iter().position(|h| h == n))
    };
    let (what, value) = (
        col(&["what", "scenario"]),
        col(&["value", "median_gb_per_s", "gb_per_s"]),
    );
    let (unit, note, ratio, cpu) = (
        col(&["unit"]),
        col(&["note"]),
        col(&["ratio_vs_fio", "ratio_vs_direct", "ratio_vs_iperf3"]),
        col(&["cpu_s_per_gib"]),
    );
    lines
        .map(split_csv)
        .filter_map(|f| {
            let get = |i: Option<usize>| i.and_then(|i| f.get(i)).cloned().unwrap_or_default();
            let note = get(note);
            let (ratio, ratio_of_times) = match get(ratio).parse::<f64>() {
                Ok(v) => (Some(v), false),
                Err(_) => ratio_in(&note).map_or((None, false), |(v, t)| (Some(v), t)),
            };
            Some(Combined {
                scenario,
                what: get(what),
                value: get(value).parse().ok()?,
                unit: unit.map_or("GB/s".to_owned(), |_| get(unit)),
                ratio,
                ratio_of_times,
                cpu_per_gib: get(cpu).parse().ok(),
                note,
            })
        })
        .collect()
}

impl Combined {
    /// How fast the row is against its limit or peer, higher being better: a ratio of
    /// rates as it is, a ratio of times inverted (0.5x the SDK's time is 2x its speed).
    fn speed(&self) -> Option<f64> {
        let r = self.ratio.filter(|r| *r > 0.0)?;
        Some(if self.ratio_of_times { 1.0 / r } else { r })
    }
}

/// This machine in one line: host, CPUs, memory, kernel.
fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let host = read("/proc/sys/kernel/hostname").trim().to_owned();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / (1 << 20) as f64);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    format!("{host}: {cpus} CPUs, {mem_gib:.0} GiB, Linux {kernel}")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar per row with a ratio: its speed against its limit or peer (one
/// scale for every row: higher is better), lines at 0.9 and 1, and the CPU it cost.
fn svg(rows: &[&Combined], title: &str) -> String {
    let (label_w, bar_w, row_h, top) = (560.0, 420.0, 22.0, 50.0);
    let max = rows
        .iter()
        .filter_map(|r| r.speed())
        .fold(1.2f64, f64::max)
        .min(6.0);
    let x = |v: f64| label_w + bar_w * v.min(max) / max;
    let h = top + row_h * rows.len() as f64 + 30.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14">{t}</text><text x="10" y="38" fill="#555">speed against the row's limit or peer, higher is better (lines at 0.9 and 1.0): blue, a ratio of rates; orange, of times, inverted (peer's time / this row's)</text>"##,
        w = label_w + bar_w + 240.0,
        t = escape(title)
    );
    for (i, r) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let v = r.speed().unwrap_or(0.0);
        let cpu = r
            .cpu_per_gib
            .map_or(String::new(), |c| format!(", {c:.2} CPU s/GiB"));
        let _ = write!(
            s,
            r##"<text x="{lx}" y="{ty}" text-anchor="end">{label}</text><rect x="{x0}" y="{y}" width="{bw:.1}" height="{bh}" fill="{fill}"/><text x="{tx:.1}" y="{ty}">{v:.2}x{cpu}</text>"##,
            lx = label_w - 8.0,
            ty = y + 15.0,
            label = escape(&format!("{}: {}", r.scenario, r.what)),
            x0 = label_w,
            bw = x(v) - label_w,
            bh = row_h - 6.0,
            tx = x(v) + 4.0,
            fill = if r.ratio_of_times {
                "#d98c2b"
            } else {
                "#4a7ab7"
            },
        );
    }
    for (v, dash) in [(0.9, "4,3"), (1.0, "")] {
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{y1}" stroke="#c33" stroke-dasharray="{dash}"/>"##,
            x = x(v),
            y0 = top - 4.0,
            y1 = h - 24.0,
        );
    }
    s.push_str("</svg>\n");
    s
}

pub fn run(b: &AllBench) -> Result<()> {
    for s in &b.skip {
        if !SCENARIOS.contains(&s.as_str()) {
            bail!(
                "--skip {s}: not a scenario (one of {})",
                SCENARIOS.join(", ")
            );
        }
    }
    std::fs::create_dir_all(&b.dir).with_context(|| format!("creating {}", b.dir.display()))?;
    let exe = std::env::current_exe()?;
    let host = machine();
    eprintln!(
        "bench all on {host}{}",
        if b.quick {
            " (quick sizes: not figures)"
        } else {
            ""
        }
    );
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    for s in SCENARIOS.iter().filter(|s| !b.skip.iter().any(|k| k == *s)) {
        let csv = b.dir.join(format!("{s}.csv"));
        let _ = std::fs::remove_file(&csv);
        // Each scenario's own directory (device and fuse take a file path in it).
        std::fs::create_dir_all(b.dir.join(s))?;
        let mut a = args(s, &b.dir, b.quick);
        a.push("--csv".into());
        a.push(csv.display().to_string());
        eprintln!("\n=== spool bench {}", a.join(" "));
        let (t0, cpu0) = (Instant::now(), children_cpu_secs().unwrap_or(0.0));
        let st = Command::new(&exe)
            .arg("bench")
            .args(&a)
            .status()
            .with_context(|| format!("running spool bench {s}"))?;
        let cpu = children_cpu_secs().unwrap_or(0.0) - cpu0;
        let secs = t0.elapsed().as_secs_f64();
        if !st.success() {
            bail!("spool bench {s} failed ({st}); its output is above");
        }
        let text = std::fs::read_to_string(&csv)
            .with_context(|| format!("spool bench {s} wrote no {}", csv.display()))?;
        let got = read_rows(s, &text);
        if got.is_empty() {
            bail!("{}: no rows", csv.display());
        }
        summary.push((*s, secs, cpu, got.len()));
        rows.extend(got);
    }

    println!("\n== spool bench all on {host}");
    println!(
        "{:<11} {:<46} {:>10} {:<6} {:>12} {:>9}",
        "scenario", "what", "value", "", "ratio", "CPU s/GiB"
    );
    for r in &rows {
        let ratio = r.ratio.map_or(String::new(), |v| {
            format!("{v:.2}x {}", if r.ratio_of_times { "time" } else { "rate" })
        });
        let cpu = r.cpu_per_gib.map_or("-".to_owned(), |c| format!("{c:.3}"));
        println!(
            "{:<11} {:<46} {:>10.3} {:<6} {:>12} {:>9}",
            r.scenario, r.what, r.value, r.unit, ratio, cpu
        );
    }
    println!("\n{:<11} {:>9} {:>12}  rows", "scenario", "wall s", "CPU s");
    for (s, secs, cpu, n) in &summary {
        println!("{s:<11} {secs:>9.1} {cpu:>12.1}  {n}");
    }
    let csv = b.csv.clone().unwrap_or_else(|| b.dir.join("bench.csv"));
    let mut out = String::from(
        "scenario,what,value,unit,ratio,ratio_of,cpu_s_per_gib,note,scenario_cpu_s,scenario_wall_s,machine\n",
    );
    for r in &rows {
        let (_, secs, cpu, _) = summary
            .iter()
            .find(|x| x.0 == r.scenario)
            .copied()
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:?},{:?},{},{:?},{},{},{},{:?},{cpu:.1},{secs:.1},{host:?}",
            r.scenario,
            r.what,
            r.value,
            r.unit,
            r.ratio.map_or(String::new(), |v| format!("{v:.3}")),
            match (r.ratio, r.ratio_of_times) {
                (None, _) => "",
                (Some(_), true) => "times",
                (Some(_), false) => "rates",
            },
            r.cpu_per_gib.map_or(String::new(), |c| format!("{c:.3}")),
            r.note,
        );
    }
    std::fs::write(&csv, out).with_context(|| format!("writing {}", csv.display()))?;
    let plot = b.plot.clone().unwrap_or_else(|| b.dir.join("bench.png"));
    let svg_path = plot.with_extension("svg");
    let with_ratio: Vec<&Combined> = rows.iter().filter(|r| r.ratio.is_some()).collect();
    std::fs::write(
        &svg_path,
        svg(&with_ratio, &format!("spool bench all, {host}")),
    )
    .with_context(|| format!("writing {}", svg_path.display()))?;
    let png = plot.extension().is_some_and(|e| e == "png")
        && Command::new("rsvg-convert")
            .arg("-o")
            .arg(&plot)
            .arg(&svg_path)
            .status()
            .is_ok_and(|s| s.success());
    eprintln!(
        "\nwrote {} and {}{}",
        csv.display(),
        svg_path.display(),
        if png {
            format!(" and {}", plot.display())
        } else if plot.extension().is_some_and(|e| e == "png") {
            " (no PNG: rsvg-convert, Debian package librsvg2-bin, is not installed)".to_owned()
        } else {
            String::new()
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_lines_split_like_the_benches_write_them() {
        assert_eq!(
            split_csv(r#""a, b",1.5,s,"say \"hi\", 0.84x the SDK's time""#),
            ["a, b", "1.5", "s", "say \"hi\", 0.84x the SDK's time"]
        );
    }

    #[test]
    fn ratios_are_found_in_notes() {
        assert_eq!(
            ratio_in("0.05 GB/s; 1.02x the SDK's time"),
            Some((1.02, true))
        );
        assert_eq!(
            ratio_in("0.97x min(iperf3, fio/R = 90)"),
            Some((0.97, false))
        );
        assert_eq!(
            ratio_in("0.37 GB/s (0.64x local), R=2, a time"),
            Some((0.64, false))
        );
        assert_eq!(ratio_in("6291456 bytes written"), None);
        assert_eq!(ratio_in("x 3x"), Some((3.0, false)));
    }

    #[test]
    fn rows_come_from_either_csv_shape() {
        let generic = "what,value,unit,cpu_s_per_gib,note\n\"spool: warm read\",1.1,s,0.25,\"0.99 GB/s; 0.50x the SDK's time\"\n\"spool: blob requests per GB\",123,,,\"{}\"\n";
        let g = read_rows("blob", generic);
        assert_eq!(g.len(), 2);
        assert_eq!(
            (
                g[0].value,
                g[0].ratio,
                g[0].ratio_of_times,
                g[0].cpu_per_gib
            ),
            (1.1, Some(0.5), true, Some(0.25))
        );
        assert_eq!(
            (g[1].value, g[1].ratio, g[1].cpu_per_gib),
            (123.0, None, None)
        );
        // Half the peer's time is twice its speed: the plot has one direction.
        assert_eq!(g[0].speed(), Some(2.0));
        let plot = svg(&[&g[0]], "t");
        assert!(plot.contains(">2.00x, 0.25 CPU s/GiB<"), "{plot}");
        let device = "scenario,bytes,median_gb_per_s,min_gb_per_s,max_gb_per_s,cpu_s_per_gib,ratio_vs_fio\nspool write,1,2.9,2.5,3.1,0.148,0.72\n";
        let r = read_rows("device", device);
        assert_eq!(
            (r[0].what.as_str(), r[0].value, r[0].ratio, r[0].cpu_per_gib),
            ("spool write", 2.9, Some(0.72), Some(0.148))
        );
        let transport = "scenario,bytes,gb_per_s,cpu_s_per_gib,ratio_vs_iperf3,host\nspool tcp link,1,3.1,0.480,1.590,h\n";
        let t = read_rows("transport", transport);
        assert_eq!(
            (t[0].what.as_str(), t[0].value, t[0].ratio, t[0].cpu_per_gib),
            ("spool tcp link", 3.1, Some(1.59), Some(0.48))
        );
        assert!(svg(&[&r[0]], "t").contains("0.72x"));
    }
}
