//! A smoke run of `spool bench checkpoint` (small sizes): the whole workload runs
//! (local filesystem, a cluster in network namespaces with every node mounting, rank
//! processes, the commit, the read-back with every byte verified) and prints its
//! table. No timing is asserted: figures on a shared CI machine mean nothing.

use std::process::Command;

#[test]
fn checkpoint_bench_runs_end_to_end() {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args([
            "bench",
            "checkpoint",
            "--model",
            "smoke",
            "--size",
            "48MiB",
            "--ranks",
            "4",
        ])
        .arg("--dir")
        .arg(dir.path().join("b"))
        .arg("--csv")
        .arg(dir.path().join("out.csv"))
        .output()
        .expect("run spool bench checkpoint");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "spool bench checkpoint failed:\n{text}"
    );
    for row in [
        "local fs: checkpoint write",
        "cluster: checkpoint write (slowest rank)",
        "cluster: commit visible on another node",
        "cluster: read back on another node",
    ] {
        assert!(text.contains(row), "no row {row:?} in:\n{text}");
    }
    let csv = std::fs::read_to_string(dir.path().join("out.csv")).expect("csv written");
    assert_eq!(csv.lines().count(), 1 + 6, "header and six rows:\n{csv}");
}

#[test]
fn scale_bench_runs_end_to_end() {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["bench", "scale", "--files", "20"])
        .arg("--dir")
        .arg(dir.path().join("b"))
        .output()
        .expect("run spool bench scale");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "spool bench scale failed:\n{text}");
    for row in [
        "create, follower's mount",
        "namespace calls per checkpoint shard",
        "etcd lease keep-alives",
        "100000",
    ] {
        assert!(text.contains(row), "no {row:?} in:\n{text}");
    }
}
