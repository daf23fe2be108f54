//! Smoke runs of `spool bench checkpoint`, `scale`, `blob` and `all` (small sizes;
//! `all` also runs device, fuse and cluster): each
//! whole workload runs (a cluster in network namespaces with every node mounting; for
//! the checkpoint also the local filesystem, rank processes, the commit and the
//! read-back with every byte verified) and prints its table. No timing is asserted:
//! figures on a shared CI machine mean nothing.

use std::path::Path;
use std::process::Command;

/// Runs `spool bench ARGS --dir DIR/b`; its output, after checking that it succeeded
/// and shows every one of `rows`.
fn bench(dir: &Path, args: &[&str], rows: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .arg("bench")
        .args(args)
        .arg("--dir")
        .arg(dir.join("b"))
        .output()
        .expect("run spool bench");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "spool bench {args:?} failed:\n{text}");
    for row in rows {
        assert!(text.contains(row), "no {row:?} in:\n{text}");
    }
    text
}

/// The CPU seconds per GiB in `csv`'s row for `what` (the column `cpu_s_per_gib` of
/// `what,value,unit,cpu_s_per_gib,note`), checked to be a figure.
fn cpu_of(csv: &str, what: &str) -> f64 {
    let line = csv
        .lines()
        .find(|l| l.starts_with(&format!("{what:?},")))
        .unwrap_or_else(|| panic!("no {what:?} row in:\n{csv}"));
    let f: Vec<&str> = line.split(',').collect();
    let cpu: f64 = f[3]
        .parse()
        .unwrap_or_else(|_| panic!("no CPU s/GiB in {line}"));
    assert!(cpu.is_finite() && cpu >= 0.0, "{line}");
    cpu
}

#[test]
fn checkpoint_bench_runs_end_to_end() {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let csv = dir.path().join("out.csv");
    let args = [
        "checkpoint",
        "--model",
        "smoke",
        "--size",
        "48MiB",
        "--ranks",
        "4",
        "--csv",
        csv.to_str().unwrap(),
    ];
    bench(
        dir.path(),
        &args,
        &[
            "local fs: checkpoint write",
            "cluster: checkpoint write (slowest rank)",
            "cluster: commit visible on another node",
            "cluster: read back on another node",
        ],
    );
    let csv = std::fs::read_to_string(csv).expect("csv written");
    assert_eq!(csv.lines().count(), 1 + 6, "header and six rows:\n{csv}");
    for what in [
        "local fs: checkpoint write (slowest rank)",
        "local fs: read back (slowest rank)",
        "cluster: checkpoint write (slowest rank)",
        "cluster: read back on another node",
    ] {
        cpu_of(&csv, what);
    }
}

#[test]
fn scale_bench_runs_end_to_end() {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    bench(
        dir.path(),
        &["scale", "--files", "20"],
        &[
            "create, follower's mount",
            "namespace calls per checkpoint shard",
            "etcd lease keep-alives",
            "100000",
        ],
    );
}

#[test]
fn blob_bench_runs_end_to_end() {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let csv = dir.path().join("out.csv");
    let args = [
        "blob",
        "--files",
        "2",
        "--file-size",
        "3MiB",
        "--part-size",
        "1MiB",
        "--csv",
        csv.to_str().unwrap(),
    ];
    let text = bench(dir.path(), &args, &["checked against the source files"]);
    // The cold read fetched each 4 MiB chunk of the two 3 MiB files once.
    assert!(
        text.contains("2 GETs"),
        "cold read GETs:
{text}"
    );
    // Every byte written was sent once, in 3 blocks + 1 commit per file.
    assert!(
        text.contains("\"put_block\":6,\"put_block_list\":2"),
        "requests:\n{text}"
    );
    let csv = std::fs::read_to_string(csv).expect("csv written");
    assert_eq!(
        csv.lines().count(),
        1 + 12,
        "header and twelve rows:\n{csv}"
    );
    // Every path that moves the checkpoint has its row, with the CPU it cost.
    for what in [
        "Azure SDK (Python) direct upload",
        "spool: durable in cache (fsync done)",
        "spool: durable in blob",
        "rclone vfs writes: close returned",
        "rclone vfs writes: in blob",
        "Azure SDK (Python) direct download",
        "spool: cold read (cache-on-read from blob)",
        "spool: warm read (from the cache)",
        "rclone vfs full: cold read",
        "rclone vfs full: warm read (its cache)",
    ] {
        cpu_of(&csv, what);
    }
}

#[test]
fn all_bench_runs_every_scenario_into_one_table_and_plot() {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let d = dir.path().join("b");
    // checkpoint has its own smoke run (above).
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["bench", "all", "--quick", "--skip", "checkpoint", "--dir"])
        .arg(&d)
        .output()
        .expect("run spool bench all");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "spool bench all failed:\n{text}");
    let csv = std::fs::read_to_string(d.join("bench.csv")).expect("combined csv");
    for (scenario, row) in [
        ("device", "spool write"),
        ("fuse", "mount write"),
        ("transport", "spool tcp link"),
        ("transport", "iperf3 tcp (loopback)"),
        ("cluster", "replicated write R=3"),
        ("cluster", "restore after a node loss (R = 2)"),
        ("blob", "spool: cold read (cache-on-read from blob)"),
        ("scale", "create, follower's mount"),
    ] {
        assert!(
            csv.lines()
                .any(|l| l.starts_with(&format!("{scenario:?},{row:?},"))),
            "no {scenario}/{row} row in:\n{csv}"
        );
    }
    assert!(
        !csv.contains("\"checkpoint\","),
        "a skipped scenario ran:\n{csv}"
    );
    // Rows whose scenario measures CPU per GiB carry it (the column after ratio_of).
    for row in [
        "\"device\",\"spool write\",",
        "\"fuse\",\"mount write\",",
        "\"transport\",\"spool tcp link\",",
        "\"cluster\",\"iperf3 node1 -> node2 (veth)\",",
        "\"cluster\",\"replicated write R=3\",",
        "\"blob\",\"spool: durable in blob\",",
        "\"blob\",\"spool: cold read (cache-on-read from blob)\",",
    ] {
        let line = csv.lines().find(|l| l.starts_with(row)).unwrap();
        let f: Vec<&str> = line.split(',').collect();
        assert!(f[6].parse::<f64>().is_ok(), "no CPU s/GiB in {line}");
    }
    let svg = std::fs::read_to_string(d.join("bench.svg")).expect("svg plot");
    assert!(svg.contains("device: spool write"), "{svg}");
    // deploy/install-deps.sh installs rsvg-convert (librsvg2-bin) with the bench tools.
    let png = std::fs::read(d.join("bench.png")).expect("png plot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
}
