//! The fuzz targets of `dataplane/fuzz/` as ordinary tests: every checked-in corpus
//! input goes through the same function the target calls
//! (`spool_dataplane::store::fuzzing`, `spool_dataplane::net::fuzzing` for `net_frame`),
//! then a few thousand seeded mutations of them.
//! The corpus of each target must exist and not be empty.
//!
//! Inputs that once crashed a target live in `dataplane/fuzz/regressions/<target>/`
//! (not in the corpus, so `cargo fuzz run` does not stop on them at start-up) and are
//! replayed by `fuzz_regressions`.
//!
//! Each test feeds its inputs in a child process (this test binary again, running only
//! that test), so an input that aborts the process (a failed huge allocation, a stack
//! overflow) fails that one test, naming the input, instead of killing every test of
//! the binary. The last input a test started is saved to
//! `$CARGO_TARGET_TMPDIR/fuzz_corpus-<test>.last` to reproduce with.
//!
//! The seed corpus and the regression inputs are written by the ignored test
//! `write_seed_corpus`:
//! `SPOOL_WRITE_SEEDS=1 cargo test -p spool-dataplane --test fuzz_corpus -- --ignored write_seed_corpus`

mod store_harness;

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use spool_dataplane::device::mem::{CrashMode, MemDevice};
use spool_dataplane::net::fuzzing::{fuzz_net_frame, seed_inputs as net_frame_seeds};
use spool_dataplane::store::format::{Geometry, Superblock, FORMAT_VERSION, SUPERBLOCK_SIZE};
use spool_dataplane::store::fuzzing::{
    fix_snapshot_crcs, fix_superblock_crc, fix_wal_crcs, fuzz_snapshot, fuzz_superblock,
    fuzz_wal_batch, FUZZ_SHARD, SNAP_BODY_LEN, SNAP_COUNT, SNAP_SHARD, WAL_BODY_LEN,
    WAL_RECORD_COUNT,
};
use spool_dataplane::store::index::ShardIndex;
use spool_dataplane::store::wal::{
    BatchBuilder, BatchHeader, Crcs, Record, BATCH_HEADER_SIZE, BATCH_MAX,
};
use spool_dataplane::store::{ChunkId, BLOCK_SIZE};
use store_harness::{formatted_image, geometry_opts, Harness, Op};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 4] = [
    ("superblock", fuzz_superblock),
    ("wal_batch", fuzz_wal_batch),
    ("snapshot", fuzz_snapshot),
    ("net_frame", fuzz_net_frame),
];

/// Random inputs per target in the randomized run.
const RANDOM_INPUTS: usize = 3000;

/// Set in the child process that runs a test's inputs.
const CHILD_ENV: &str = "SPOOL_FUZZ_CORPUS_CHILD";

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted by name.
fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            (name, fs::read(&p).expect("read input"))
        })
        .collect();
    files.sort();
    files
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target);
    assert!(
        dir.is_dir(),
        "the corpus of fuzz target {target} is missing: {}",
        dir.display()
    );
    let files = inputs(&dir);
    assert!(
        !files.is_empty(),
        "the corpus of fuzz target {target} is empty: {}",
        dir.display()
    );
    files
}

/// Runs the test named `test` alone in a child process (this binary again) with `envs`
/// set: `Ok` when it passed, else the end of its output.
fn run_child(test: &str, envs: &[(&str, &str)]) -> Result<(), String> {
    let out = Command::new(std::env::current_exe().expect("the test binary"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("RUST_BACKTRACE", "0")
        .envs(envs.iter().copied())
        .output()
        .expect("run the test in a child process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let mut start = all.len().saturating_sub(6000);
        while !all.is_char_boundary(start) {
            start += 1;
        }
        return Err(format!("({}) ...{}", out.status, &all[start..]));
    }
    if !stdout.contains("1 passed") {
        return Err(format!("the child process did not run {test}:\n{all}"));
    }
    Ok(())
}

/// Runs `body` (the test named `test`) in a child process: this binary, running only
/// that test. An abort in the child fails the test with the end of the child's output,
/// which names the input it was running.
fn isolated(test: &str, body: impl FnOnce()) {
    if std::env::var_os(CHILD_ENV).is_some() {
        body();
        return;
    }
    if let Err(output) = run_child(test, &[]) {
        panic!(
            "{test} failed in its child process; its last input is saved in {}\n{output}",
            last_input_path(test).display()
        );
    }
}

/// The lines of a failed child's output that say why: the panic or the abort.
fn failure_summary(output: &str) -> String {
    let lines: Vec<&str> = output.lines().collect();
    if let Some(i) = lines.iter().position(|l| l.contains("panicked at")) {
        return lines[i..lines.len().min(i + 2)].join(" ");
    }
    if let Some(l) = lines.iter().find(|l| l.contains("memory allocation of")) {
        return format!("aborted: {l}");
    }
    lines[lines.len().saturating_sub(3)..].join(" ")
}

fn last_input_path(test: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz_corpus-{test}.last"))
}

/// Notes which input `test` is about to run (in the child's output and in a file), so
/// an abort can be traced to it.
fn starting(test: &str, what: &str, data: &[u8]) {
    eprintln!("{test}: running {what} ({} bytes)", data.len());
    fs::write(last_input_path(test), data).expect("save the input");
}

/// Runs every input through `f`; fails naming every input that panicked.
fn replay(test: &str, target: &str, f: Target, files: &[(String, Vec<u8>)]) {
    let mut failed = Vec::new();
    for (name, data) in files {
        starting(test, &format!("{target}/{name}"), data);
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(data))) {
            failed.push(format!("{target}/{name}: {}", panic_message(&p)));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs panicked:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn target(name: &str) -> Target {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("known target")
        .1
}

#[test]
fn superblock_corpus() {
    isolated("superblock_corpus", || {
        replay(
            "superblock_corpus",
            "superblock",
            fuzz_superblock,
            &corpus("superblock"),
        )
    });
}

#[test]
fn wal_batch_corpus() {
    isolated("wal_batch_corpus", || {
        replay(
            "wal_batch_corpus",
            "wal_batch",
            fuzz_wal_batch,
            &corpus("wal_batch"),
        )
    });
}

#[test]
fn snapshot_corpus() {
    isolated("snapshot_corpus", || {
        replay(
            "snapshot_corpus",
            "snapshot",
            fuzz_snapshot,
            &corpus("snapshot"),
        )
    });
}

#[test]
fn net_frame_corpus() {
    isolated("net_frame_corpus", || {
        replay(
            "net_frame_corpus",
            "net_frame",
            fuzz_net_frame,
            &corpus("net_frame"),
        )
    });
}

/// Inputs that crashed a target once. Each subdirectory is named after its target;
/// each input runs in its own child process, so every one that still fails is named.
#[test]
fn fuzz_regressions() {
    const ONE: &str = "SPOOL_FUZZ_REGRESSION";
    let dir = fuzz_dir().join("regressions");
    if let Some(rel) = std::env::var_os(ONE) {
        // The child: one input.
        let path = dir.join(&rel);
        let target_name = path.parent().and_then(Path::file_name).expect("target dir");
        let data = fs::read(&path).expect("read the regression input");
        starting("fuzz_regressions", &rel.to_string_lossy(), &data);
        target(&target_name.to_string_lossy())(&data);
        return;
    }
    if !dir.is_dir() {
        return;
    }
    let mut dirs: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("regressions dir")
        .map(|e| e.expect("entry").path())
        .collect();
    dirs.retain(|d| d.is_dir());
    dirs.sort();
    let (mut failed, mut n) = (Vec::new(), 0);
    for path in dirs {
        let t = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        target(&t);
        for (name, _) in inputs(&path) {
            n += 1;
            let rel = format!("{t}/{name}");
            if let Err(output) = run_child("fuzz_regressions", &[(ONE, &rel)]) {
                failed.push(format!("{rel}: {}", failure_summary(&output)));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {n} regression inputs still fail:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

// ---- the randomized run -------------------------------------------------------------

const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    4095,
    4096,
    65536,
    BATCH_MAX as u64,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// A few random edits of `data`, of the kinds a fuzzer makes.
fn mutate(rng: &mut StdRng, data: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..=4) {
        if data.is_empty() {
            data.extend((0..rng.gen_range(1..64)).map(|_| rng.gen::<u8>()));
            continue;
        }
        let at = rng.gen_range(0..data.len());
        match rng.gen_range(0..9) {
            0 => data[at] ^= 1 << rng.gen_range(0..8),
            1 => data[at] = rng.gen(),
            2 => {
                // An interesting integer over a field-sized span.
                let v = *INTERESTING.choose(rng).expect("non-empty");
                let width = *[1usize, 2, 4, 8].choose(rng).expect("non-empty");
                let n = width.min(data.len() - at);
                data[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
            }
            3 => {
                // Add or subtract a little from a 32-bit field.
                if at + 4 <= data.len() {
                    let v = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"));
                    let v = v.wrapping_add(rng.gen_range(0..33u32).wrapping_sub(16));
                    data[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            4 => data.truncate(at),
            5 => data.extend((0..rng.gen_range(1..512)).map(|_| {
                if rng.gen_bool(0.5) {
                    0
                } else {
                    rng.gen()
                }
            })),
            6 => {
                let end = rng.gen_range(at..=data.len().min(at + 64));
                data.drain(at..end);
            }
            7 => {
                // Duplicate a span somewhere else (repeats records and entries).
                let end = rng.gen_range(at..=data.len().min(at + 128));
                let span = data[at..end].to_vec();
                let to = rng.gen_range(0..=data.len());
                data.splice(to..to, span);
            }
            _ => {
                let end = rng.gen_range(at..=data.len().min(at + 16));
                data[at..end].fill(0);
            }
        }
    }
}

fn random_run(test: &str, name: &str, seed: u64) {
    let f = target(name);
    let seeds = corpus(name);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut failed = Vec::new();
    for i in 0..RANDOM_INPUTS {
        let (from, mut data) = if i % 4 == 3 {
            (
                "random".to_string(),
                (0..rng.gen_range(0..5000))
                    .map(|_| rng.gen::<u8>())
                    .collect(),
            )
        } else {
            let (n, d) = seeds.choose(&mut rng).expect("non-empty corpus");
            (n.clone(), d.clone())
        };
        mutate(&mut rng, &mut data);
        starting(test, &format!("input {i} mutated from {from}"), &data);
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(&data))) {
            failed.push(format!(
                "input {i} (mutated from {from}, {} bytes): {}",
                data.len(),
                panic_message(&p)
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{name} (seed {seed}): {} of {RANDOM_INPUTS} inputs panicked:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn superblock_random() {
    isolated("superblock_random", || {
        random_run("superblock_random", "superblock", 0x5b01)
    });
}

#[test]
fn wal_batch_random() {
    isolated("wal_batch_random", || {
        random_run("wal_batch_random", "wal_batch", 0x3a17)
    });
}

#[test]
fn snapshot_random() {
    isolated("snapshot_random", || {
        random_run("snapshot_random", "snapshot", 0x5a95)
    });
}

#[test]
fn net_frame_random() {
    isolated("net_frame_random", || {
        random_run("net_frame_random", "net_frame", 0x4e7f)
    });
}

// ---- the seed corpus ----------------------------------------------------------------

/// Writes the seed corpus: valid encodings (some taken from a real store's device) and
/// damaged variants of them (the transport frames' come from
/// `spool_dataplane::net::fuzzing::seed_inputs`). Only with SPOOL_WRITE_SEEDS=1, so a
/// plain `--ignored` run does not rewrite checked-in files.
#[test]
#[ignore]
fn write_seed_corpus() {
    if std::env::var_os("SPOOL_WRITE_SEEDS").is_none() {
        eprintln!("set SPOOL_WRITE_SEEDS=1 to rewrite dataplane/fuzz/corpus");
        return;
    }
    let real = RealDevice::run();
    write_target("superblock", superblock_seeds(&real));
    write_target("wal_batch", wal_seeds(&real));
    write_target("snapshot", snapshot_seeds(&real));
    write_target("net_frame", net_frame_seeds());
    write_regressions(&real);
}

/// Hand-made minimal reproductions of what the fuzzers found (see
/// `dataplane/fuzz/regressions/README.md`). They are written without running them:
/// until the bugs are fixed they panic or abort.
fn write_regressions(real: &RealDevice) {
    let sb = real.superblock();
    let set = |b: &[u8], at: usize, v: &[u8]| {
        let mut b = b.to_vec();
        b[at..at + v.len()].copy_from_slice(v);
        b
    };
    let wal = wal_seeds(real);
    let all_kinds = &wal
        .iter()
        .find(|(n, _)| *n == "all_record_kinds")
        .expect("seed")
        .1;
    let snap = &snapshot_seeds(real)
        .into_iter()
        .find(|(n, _)| *n == "valid_five_chunks")
        .expect("seed")
        .1;
    let c = ChunkId { inode: 7, index: 1 };
    let regressions: [(&str, &str, Vec<u8>); 4] = [
        (
            "superblock",
            "geometry_check_overflow_snapshot_slot_2pow63",
            with_superblock_crc(set(&sb, 64, &(1u64 << 63).to_le_bytes())),
        ),
        (
            "wal_batch",
            "decode_body_record_count_u32_max",
            with_batch_crcs(set(
                all_kinds,
                WAL_RECORD_COUNT.start,
                &u32::MAX.to_le_bytes(),
            )),
        ),
        (
            "wal_batch",
            "apply_accepts_write_version_0",
            batch(
                &[Record::Write {
                    chunk: c,
                    extent: 2,
                    version: 0,
                    len: 4096,
                    first: 0,
                    crcs: Crcs::Native(&[1]),
                }],
                1,
                0,
            ),
        ),
        (
            "snapshot",
            "load_snapshot_body_len_u64_max",
            with_snapshot_crcs(set(snap, SNAP_BODY_LEN.start, &u64::MAX.to_le_bytes())),
        ),
    ];
    for (target, name, data) in regressions {
        let dir = fuzz_dir().join("regressions").join(target);
        fs::create_dir_all(&dir).expect("create regressions dir");
        fs::write(dir.join(name), data).expect("write regression");
    }
}

fn write_target(target: &str, seeds: Vec<(&'static str, Vec<u8>)>) {
    assert!(seeds.len() <= 30, "keep seed corpora small");
    let dir = fuzz_dir().join("corpus").join(target);
    fs::create_dir_all(&dir).expect("create corpus dir");
    for (name, data) in seeds {
        assert!(data.len() <= 8 << 10, "seed {name} is {} bytes", data.len());
        // Every seed must pass its target before it is checked in.
        target_fn(target)(&data);
        fs::write(dir.join(name), data).expect("write seed");
    }
}

fn target_fn(name: &str) -> Target {
    target(name)
}

/// A store on a MemDevice after a small workload of every op kind, with one restart
/// (so a snapshot was written by recovery) and WAL batches after it.
struct RealDevice {
    image: Vec<u8>,
    geometry: Geometry,
    generation: u64,
}

impl RealDevice {
    fn run() -> Self {
        let (image, geometry) = formatted_image(4 << 20, &geometry_opts());
        let mut h = Harness::open(MemDevice::from_image(image, 64)).expect("open");
        let a = ChunkId { inode: 1, index: 0 };
        let b = ChunkId { inode: 2, index: 3 };
        let c = ChunkId { inode: 3, index: 1 };
        let before_restart = [
            Op::Write {
                chunk: a,
                offset: 0,
                len: 3 * BLOCK_SIZE,
                fill: 1,
            },
            Op::Write {
                chunk: b,
                offset: 2 * BLOCK_SIZE,
                len: 100,
                fill: 2,
            },
            Op::Write {
                chunk: c,
                offset: 0,
                len: 16 * BLOCK_SIZE,
                fill: 3,
            },
            Op::Truncate {
                chunk: c,
                len: 5 * BLOCK_SIZE,
            },
        ];
        for op in &before_restart {
            h.run(op).expect("op");
        }
        let mut h = h.power_cycle(CrashMode::DropUnflushed).expect("restart");
        let after_restart = [
            // In place (a hole), copy-on-write (overwrites block 1), truncate, delete.
            Op::Write {
                chunk: a,
                offset: 5 * BLOCK_SIZE,
                len: 10,
                fill: 4,
            },
            Op::Write {
                chunk: a,
                offset: BLOCK_SIZE,
                len: BLOCK_SIZE,
                fill: 5,
            },
            Op::Truncate {
                chunk: a,
                len: 2 * BLOCK_SIZE,
            },
            Op::Delete { chunk: b },
            Op::Write {
                chunk: ChunkId { inode: 4, index: 0 },
                offset: 0,
                len: 16 * BLOCK_SIZE,
                fill: 6,
            },
        ];
        for op in &after_restart {
            h.run(op).expect("op");
        }
        let generation = h.store.stats()[0].generation;
        RealDevice {
            image: h.mem.current_image(),
            geometry,
            generation,
        }
    }

    fn superblock(&self) -> Vec<u8> {
        // Fixed uuid and time, so regenerating the corpus gives the same bytes.
        let mut sb = Superblock::decode(&self.image[..SUPERBLOCK_SIZE]).expect("real superblock");
        sb.uuid = [0x5b; 16];
        sb.created_unix_s = 1_700_000_000;
        let mut buf = vec![0u8; SUPERBLOCK_SIZE];
        sb.encode(&mut buf);
        buf
    }

    /// The WAL batches of the current generation, each with its padding.
    fn wal_batches(&self) -> Vec<Vec<u8>> {
        let base = self.geometry.wal_base(0) as usize;
        let mut out = Vec::new();
        let mut pos = 0usize;
        while let Some(h) = BatchHeader::decode(&self.image[base + pos..]) {
            if h.generation != self.generation || h.wal_offset != pos as u64 {
                break;
            }
            out.push(self.image[base + pos..base + pos + h.total_len()].to_vec());
            pos += h.total_len();
        }
        assert!(out.len() >= 5, "the workload wrote a batch per op");
        out
    }

    /// The snapshot the restart wrote (header and body, no slot padding).
    fn snapshot(&self) -> Vec<u8> {
        let at = self
            .geometry
            .snapshot_slot(FUZZ_SHARD, (self.generation % 2) as u32) as usize;
        let body_len = u64::from_le_bytes(
            self.image[at + SNAP_BODY_LEN.start..at + SNAP_BODY_LEN.end]
                .try_into()
                .expect("8 bytes"),
        ) as usize;
        self.image[at..at + 64 + body_len].to_vec()
    }
}

fn with_superblock_crc(mut b: Vec<u8>) -> Vec<u8> {
    fix_superblock_crc(&mut b);
    b
}

fn superblock_seeds(real: &RealDevice) -> Vec<(&'static str, Vec<u8>)> {
    let good = real.superblock();
    let encode = |g: Geometry| {
        let mut b = vec![0u8; SUPERBLOCK_SIZE];
        Superblock {
            version: FORMAT_VERSION,
            uuid: [0x42; 16],
            created_unix_s: 1,
            geometry: g,
        }
        .encode(&mut b);
        b
    };
    let set = |b: &[u8], at: usize, v: &[u8]| {
        let mut b = b.to_vec();
        b[at..at + v.len()].copy_from_slice(v);
        b
    };
    let mut flipped = good.clone();
    flipped[60] ^= 0x10;
    let mut bad_crc = good.clone();
    bad_crc[SUPERBLOCK_SIZE - 1] ^= 1;
    let mut ext4 = vec![0u8; SUPERBLOCK_SIZE];
    ext4[1080..1082].copy_from_slice(&[0x53, 0xef]);
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0xab; 100]);
    // Field offsets: magic 0, version 8, uuid 12, created 28, device size 36, block size
    // 44, chunk size 48, shards 52, shard size 56, snapshot slot 64, WAL 72, extents 80.
    vec![
        ("valid_real_4mib_64k", good.clone()),
        (
            "valid_1gib_4m_4shards",
            encode(Geometry::compute(1 << 30, 4 << 20, 4, 0).expect("geometry")),
        ),
        (
            "valid_8gib_64m_chunks",
            encode(Geometry::compute(8 << 30, 64 << 20, 2, 0).expect("geometry")),
        ),
        (
            "valid_big_wal",
            encode(Geometry::compute(256 << 20, 1 << 20, 3, 32 << 20).expect("geometry")),
        ),
        ("empty", Vec::new()),
        ("truncated_100", good[..100].to_vec()),
        ("truncated_4095", good[..4095].to_vec()),
        ("flipped_byte", flipped),
        ("bad_crc", bad_crc),
        ("wrong_magic", set(&good, 0, b"SPOOLDEX")),
        (
            "future_version",
            with_superblock_crc(set(&good, 8, &2u32.to_le_bytes())),
        ),
        (
            "version_0",
            with_superblock_crc(set(&good, 8, &0u32.to_le_bytes())),
        ),
        (
            "block_size_512",
            with_superblock_crc(set(&good, 44, &512u32.to_le_bytes())),
        ),
        (
            "chunk_size_not_pow2",
            with_superblock_crc(set(&good, 48, &(3u32 << 16).to_le_bytes())),
        ),
        (
            "shards_0",
            with_superblock_crc(set(&good, 52, &0u32.to_le_bytes())),
        ),
        (
            "huge_device_size",
            with_superblock_crc(set(&good, 36, &u64::MAX.to_le_bytes())),
        ),
        (
            "huge_extents",
            with_superblock_crc(set(&good, 80, &u32::MAX.to_le_bytes())),
        ),
        (
            "huge_shard_size",
            with_superblock_crc(set(&good, 56, &(1u64 << 62).to_le_bytes())),
        ),
        ("ext4_signature", ext4),
        ("trailing_bytes", trailing),
    ]
}

/// A batch of `records` as the store writes it.
fn batch(records: &[Record<'_>], generation: u64, lsn: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BATCH_MAX];
    let mut b = BatchBuilder::new();
    for r in records {
        b.push(&mut buf, r);
    }
    let h = b.finish(&mut buf, generation, lsn, lsn * 4096);
    buf.truncate(h.total_len());
    buf
}

/// Recomputes a batch's body and header crcs after an edit.
fn with_batch_crcs(mut b: Vec<u8>) -> Vec<u8> {
    fix_wal_crcs(&mut b);
    b
}

fn wal_seeds(real: &RealDevice) -> Vec<(&'static str, Vec<u8>)> {
    const NAMES: [&str; 6] = [
        "real_0_write_in_place",
        "real_1_write_cow",
        "real_2_truncate",
        "real_3_delete",
        "real_4_write_full",
        "real_5",
    ];
    let mut seeds: Vec<(&'static str, Vec<u8>)> = Vec::new();
    for (i, b) in real.wal_batches().into_iter().enumerate().take(NAMES.len()) {
        seeds.push((NAMES[i], b));
    }
    let c = ChunkId { inode: 7, index: 1 };
    let d = ChunkId { inode: 8, index: 0 };
    let crcs16: Vec<u32> = (0..16).map(|i| 0x1000 + i).collect();
    let crcs256: Vec<u32> = (0..256).map(|i| 0x2000 + i).collect();
    let w = |chunk, extent, version, len, first, crcs: &[u32]| -> Vec<u8> {
        let r = Record::Write {
            chunk,
            extent,
            version,
            len,
            first,
            crcs: Crcs::Native(crcs),
        };
        let mut out = vec![0u8; r.encoded_len()];
        r.encode(&mut spool_dataplane::store::codec::Writer::new(&mut out));
        out
    };
    let all_kinds = batch(
        &[
            Record::Write {
                chunk: c,
                extent: 2,
                version: 1,
                len: 3 * BLOCK_SIZE,
                first: 0,
                crcs: Crcs::Native(&crcs16[..3]),
            },
            Record::Write {
                chunk: d,
                extent: 3,
                version: 1,
                len: 64 << 10,
                first: 0,
                crcs: Crcs::Native(&crcs16),
            },
            Record::Write {
                chunk: c,
                extent: 5,
                version: 2,
                len: 3 * BLOCK_SIZE,
                first: 1,
                crcs: Crcs::Native(&crcs16[..1]),
            },
            Record::Truncate {
                chunk: c,
                version: 3,
                len: BLOCK_SIZE,
            },
            Record::Delete {
                chunk: d,
                version: 2,
            },
        ],
        9,
        3,
    );
    let big_chunk = batch(
        &[
            Record::Write {
                chunk: c,
                extent: 1,
                version: 1,
                len: 1 << 20,
                first: 0,
                crcs: Crcs::Native(&crcs256),
            },
            Record::Write {
                chunk: d,
                extent: 3,
                version: 4,
                len: 200 << 10,
                first: 40,
                crcs: Crcs::Native(&crcs256[..10]),
            },
            Record::Truncate {
                chunk: c,
                version: 2,
                len: 128 << 10,
            },
        ],
        2,
        0,
    );
    // Hand-made bodies: one record each, crcs fixed, so only the record is wrong.
    let one = |rec: Vec<u8>| -> Vec<u8> {
        let mut b = batch(
            &[Record::Delete {
                chunk: c,
                version: 1,
            }],
            1,
            0,
        );
        b.truncate(BATCH_HEADER_SIZE);
        b[WAL_BODY_LEN].copy_from_slice(&(rec.len() as u32).to_le_bytes());
        b.extend_from_slice(&rec);
        b.resize(b.len().div_ceil(4096) * 4096, 0);
        with_batch_crcs(b)
    };
    let mut huge_crc_count = w(c, 0, 1, 4096, 0, &[1]);
    huge_crc_count[33..37].copy_from_slice(&0x4000_0000u32.to_le_bytes());
    let mut unknown_kind = w(c, 0, 1, 4096, 0, &[1]);
    unknown_kind[0] = 9;
    let mut truncate_unaligned = vec![2u8];
    truncate_unaligned.extend_from_slice(&7u64.to_le_bytes());
    truncate_unaligned.extend_from_slice(&1u32.to_le_bytes());
    truncate_unaligned.extend_from_slice(&2u64.to_le_bytes());
    truncate_unaligned.extend_from_slice(&100u32.to_le_bytes());
    let mut body_flipped = all_kinds.clone();
    body_flipped[BATCH_HEADER_SIZE + 20] ^= 4;
    let mut header_flipped = all_kinds.clone();
    header_flipped[17] ^= 1;
    let mut more_records_claimed = all_kinds.clone();
    more_records_claimed[WAL_RECORD_COUNT].copy_from_slice(&6u32.to_le_bytes());
    let mut huge_body_len = all_kinds.clone();
    huge_body_len[WAL_BODY_LEN].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut trailing = all_kinds.clone();
    let body_len = u32::from_le_bytes(trailing[WAL_BODY_LEN].try_into().expect("4 bytes"));
    trailing[WAL_BODY_LEN].copy_from_slice(&(body_len + 3).to_le_bytes());
    seeds.extend([
        ("all_record_kinds", all_kinds.clone()),
        ("one_mib_chunks", big_chunk),
        ("truncated_header", all_kinds[..40].to_vec()),
        (
            "truncated_body",
            all_kinds[..BATCH_HEADER_SIZE + 30].to_vec(),
        ),
        ("body_flipped", body_flipped),
        ("header_flipped", header_flipped),
        ("wrong_magic", {
            let mut b = all_kinds.clone();
            b[..8].copy_from_slice(b"SPOOLWAX");
            b
        }),
        (
            "more_records_claimed",
            with_batch_crcs(more_records_claimed),
        ),
        ("huge_body_len", with_batch_crcs(huge_body_len)),
        ("trailing_body_bytes", with_batch_crcs(trailing)),
        ("huge_crc_count", one(huge_crc_count)),
        ("unknown_record_kind", one(unknown_kind)),
        ("write_extent_out_of_range", one(w(c, 99, 1, 4096, 0, &[1]))),
        (
            "write_blocks_past_chunk",
            one(w(c, 0, 1, 4096, 15, &crcs16[..2])),
        ),
        (
            "write_len_past_chunk",
            one(w(c, 0, 1, (64 << 10) + 1, 0, &[1])),
        ),
        ("write_no_blocks", one(w(c, 0, 1, 4096, 0, &[]))),
        ("truncate_unaligned", one(truncate_unaligned)),
        (
            "delete_unknown_chunk",
            batch(
                &[Record::Delete {
                    chunk: d,
                    version: 5,
                }],
                1,
                0,
            ),
        ),
        (
            "stale_version",
            batch(
                &[
                    Record::Write {
                        chunk: c,
                        extent: 0,
                        version: 5,
                        len: 4096,
                        first: 0,
                        crcs: Crcs::Native(&[1]),
                    },
                    Record::Write {
                        chunk: c,
                        extent: 1,
                        version: 5,
                        len: 4096,
                        first: 0,
                        crcs: Crcs::Native(&[2]),
                    },
                    Record::Truncate {
                        chunk: c,
                        version: 4,
                        len: 0,
                    },
                ],
                1,
                0,
            ),
        ),
        (
            "extent_in_use",
            batch(
                &[
                    Record::Write {
                        chunk: c,
                        extent: 0,
                        version: 1,
                        len: 4096,
                        first: 0,
                        crcs: Crcs::Native(&[1]),
                    },
                    Record::Write {
                        chunk: d,
                        extent: 0,
                        version: 1,
                        len: 4096,
                        first: 0,
                        crcs: Crcs::Native(&[2]),
                    },
                    Record::Write {
                        chunk: d,
                        extent: 1,
                        version: 1,
                        len: 4096,
                        first: 0,
                        crcs: Crcs::Native(&[2]),
                    },
                    Record::Write {
                        chunk: d,
                        extent: 0,
                        version: 2,
                        len: 4096,
                        first: 0,
                        crcs: Crcs::Native(&[3]),
                    },
                ],
                1,
                0,
            ),
        ),
    ]);
    seeds
}

/// Recomputes a snapshot's body and header crcs after an edit.
fn with_snapshot_crcs(mut b: Vec<u8>) -> Vec<u8> {
    fix_snapshot_crcs(&mut b);
    b
}

fn snapshot_seeds(real: &RealDevice) -> Vec<(&'static str, Vec<u8>)> {
    let mut small = ShardIndex::new(FUZZ_SHARD, 8, 64 << 10);
    for i in 0..5u32 {
        let crcs: Vec<u32> = (0..=i).map(|b| 0x100 * i + b).collect();
        let chunk = ChunkId {
            inode: 10 + u64::from(i),
            index: i,
        };
        let rec = Record::Write {
            chunk,
            extent: 7 - i,
            version: u64::from(i) + 1,
            len: (i + 1) * BLOCK_SIZE - i,
            first: 2 * i,
            crcs: Crcs::Native(&crcs),
        };
        small.apply(&rec).expect("seed record");
    }
    let mut img = Vec::new();
    small.encode_snapshot(7, &mut img);
    let mut large = ShardIndex::new(FUZZ_SHARD, 4, 1 << 20);
    for i in 0..3u32 {
        let crcs: Vec<u32> = (0..70).map(|b| b * 3 + i).collect();
        let chunk = ChunkId { inode: 1, index: i };
        let rec = Record::Write {
            chunk,
            extent: i,
            version: 3,
            len: 1 << 20,
            first: 60 * i,
            crcs: Crcs::Native(&crcs),
        };
        large.apply(&rec).expect("seed record");
    }
    let mut img_large = Vec::new();
    large.encode_snapshot(2, &mut img_large);
    let mut empty = Vec::new();
    ShardIndex::new(FUZZ_SHARD, 8, 64 << 10).encode_snapshot(1, &mut empty);

    let set = |b: &[u8], at: usize, v: &[u8]| {
        let mut b = b.to_vec();
        b[at..at + v.len()].copy_from_slice(v);
        b
    };
    let first = 64; // the first entry: chunk 0..12, extent 12, len 16, version 20, bitmap 28
    let mut body_flipped = img.clone();
    body_flipped[first + 30] ^= 1;
    let mut header_flipped = img.clone();
    header_flipped[10] ^= 1;
    let mut duplicate = img.clone();
    let present = u16::from_le_bytes(
        duplicate[first + 28..first + 30]
            .try_into()
            .expect("2 bytes"),
    )
    .count_ones() as usize;
    let entry_len = 28 + 2 + 4 * present;
    let dup: Vec<u8> = duplicate[first..first + entry_len].to_vec();
    duplicate.extend_from_slice(&dup);
    let count = u32::from_le_bytes(duplicate[SNAP_COUNT].try_into().expect("4 bytes")) + 1;
    duplicate[SNAP_COUNT].copy_from_slice(&count.to_le_bytes());
    let body_len = (duplicate.len() - 64) as u64;
    duplicate[SNAP_BODY_LEN].copy_from_slice(&body_len.to_le_bytes());
    let mut trailing = img.clone();
    trailing.extend_from_slice(&[0; 5]);
    let tl = (trailing.len() - 64) as u64;
    trailing[SNAP_BODY_LEN].copy_from_slice(&tl.to_le_bytes());
    vec![
        ("real_after_restart", real.snapshot()),
        ("valid_five_chunks", img.clone()),
        ("valid_one_mib_chunks", img_large),
        ("valid_empty_gen1", empty),
        ("truncated_header", img[..50].to_vec()),
        ("truncated_body", img[..img.len() - 7].to_vec()),
        ("body_flipped", body_flipped),
        ("header_flipped", header_flipped),
        ("wrong_magic", set(&img, 0, b"SPOOLSNX")),
        (
            "wrong_shard",
            with_snapshot_crcs(set(&img, SNAP_SHARD.start, &1u32.to_le_bytes())),
        ),
        (
            "count_too_big",
            with_snapshot_crcs(set(&img, SNAP_COUNT.start, &1000u32.to_le_bytes())),
        ),
        (
            "count_u32_max",
            with_snapshot_crcs(set(&img, SNAP_COUNT.start, &u32::MAX.to_le_bytes())),
        ),
        (
            "body_len_past_buffer",
            with_snapshot_crcs(set(&img, SNAP_BODY_LEN.start, &(1u64 << 40).to_le_bytes())),
        ),
        ("duplicate_entry", with_snapshot_crcs(duplicate)),
        ("trailing_bytes", with_snapshot_crcs(trailing)),
        (
            "extent_out_of_range",
            with_snapshot_crcs(set(&img, first + 12, &8u32.to_le_bytes())),
        ),
        (
            "len_past_chunk",
            with_snapshot_crcs(set(&img, first + 16, &((64u32 << 10) + 1).to_le_bytes())),
        ),
        (
            "version_0",
            with_snapshot_crcs(set(&img, first + 20, &0u64.to_le_bytes())),
        ),
    ]
}
