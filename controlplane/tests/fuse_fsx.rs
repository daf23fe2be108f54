//! fsx on the Spool FUSE mount: seeded random writes, reads, mmap, truncates, fallocate
//! modes, syncs and (O_DIRECT) reopens on one file, every read checked against a model.
//! The same exerciser first runs on the local fs, which checks the model itself: if it
//! fails there, the bug is in the exerciser, not in Spool.
//!
//! Replay or widen a run with the environment:
//!   SPOOL_FSX_SEED=0x1234[,0x5678...]   seeds instead of each test's defaults
//!   SPOOL_FSX_OPS=20000                 ops per seed

// Modules by path, not `mod common;`: other test binaries share tests/common/ and may
// give it a mod.rs of their own.
#[path = "common/fsx.rs"]
mod fsx;
#[path = "common/mount.rs"]
mod mount;

use fsx::*;
use mount::*;

const FILE_SIZE_MAX: u64 = 24 << 20;

fn env_ops(default: usize) -> usize {
    match std::env::var("SPOOL_FSX_OPS") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("SPOOL_FSX_OPS={s:?}: {e}")),
        Err(_) => default,
    }
}

/// Seeds from SPOOL_FSX_SEED (comma-separated, decimal or 0x hex), else `default`.
fn env_seeds(default: &[u64]) -> Vec<u64> {
    let Ok(s) = std::env::var("SPOOL_FSX_SEED") else {
        return default.to_vec();
    };
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => t.parse(),
            };
            r.unwrap_or_else(|e| panic!("SPOOL_FSX_SEED={s:?}: {t:?}: {e}"))
        })
        .collect()
}

fn config(seed: u64, ops: usize) -> FsxConfig {
    FsxConfig {
        seed,
        ops,
        file_size_max: FILE_SIZE_MAX,
        mmap: true,
        direct_io: true,
        punch: true,
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn fsx_model_agrees_with_local_fs() {
    let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
    let ops = env_ops(2000);
    for seed in env_seeds(&[0x5eed_0001, 0x5eed_0002]) {
        let report = run_fsx(dir.path(), &config(seed, ops)).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{report}");
        // A kind that never runs here never runs on the mount either, and the mount
        // tests would pass vacuously.
        assert_coverage(&report, ops);
    }
}

/// Every op kind ran, or the fs refused it in a way the report names. Only for runs
/// long enough that every kind is all but certain to come up.
fn assert_coverage(report: &FsxReport, ops: usize) {
    if ops < 1000 {
        return;
    }
    for kind in KINDS {
        assert!(
            report.count(kind) > 0 || report.unsupported.contains_key(kind),
            "op kind {kind} never ran in {ops} ops: {report}"
        );
    }
}

fn fsx_on_mount(opts: MountOpts, default_seeds: &[u64], default_ops: usize) {
    let node = MountedNode::start(&opts);
    fsx_on_node(node, &format!("{opts:?}"), default_seeds, default_ops);
}

fn fsx_on_node(mut node: MountedNode, what: &str, default_seeds: &[u64], default_ops: usize) {
    let ops = env_ops(default_ops);
    for seed in env_seeds(default_seeds) {
        match run_fsx(&node.mountpoint, &config(seed, ops)) {
            Ok(report) => {
                eprintln!("{what}\n{report}");
                // mmap must work at least on buffered fds, and so on: a kind the mount
                // refuses must be named in the report, not silently never run.
                assert_coverage(&report, ops);
            }
            // Drop kills the daemon and detaches the mount; stop() here could panic
            // first and hide the data error.
            Err(e) => panic!(
                "fsx failed on the mount ({what}):\n{e}\n--- daemon log (last 100 lines) \
                 ---\n{}",
                tail(&node.log_text(), 100)
            ),
        }
    }
    node.stop();
}

#[test]
fn fsx_on_mount_writeback() {
    fsx_on_mount(
        MountOpts {
            chunk_size: "1MiB",
            cache: Cache::Writeback,
            ..MountOpts::default()
        },
        &[0xb0_0001, 0xb0_0002, 0xb0_0003],
        3000,
    );
}

#[test]
fn fsx_on_mount_writethrough() {
    fsx_on_mount(
        MountOpts {
            chunk_size: "1MiB",
            cache: Cache::WriteThrough,
            ..MountOpts::default()
        },
        &[0x70_0001, 0x70_0002, 0x70_0003],
        3000,
    );
}

#[test]
fn fsx_on_mount_direct_io() {
    fsx_on_mount(
        MountOpts {
            chunk_size: "1MiB",
            cache: Cache::Direct,
            ..MountOpts::default()
        },
        &[0xd0_0001, 0xd0_0002, 0xd0_0003],
        3000,
    );
}

#[test]
fn fsx_on_mount_small_chunks() {
    fsx_on_mount(
        MountOpts {
            chunk_size: "64KiB",
            io_size_max: "64KiB",
            ..MountOpts::default()
        },
        &[0x64_0001],
        3000,
    );
}
