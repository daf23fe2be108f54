//! Long runs through snapshots, crashes in them, media corruption, a full device and
//! `format`'s refusals, on a MemDevice through the store harness.

mod store_harness;

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use spool_dataplane::device::mem::{CrashMode, MemDevice};
use spool_dataplane::store::format::{
    Superblock, FORMAT_VERSION, SNAP_HEADER_SIZE, SUPERBLOCK_SIZE, WAL_SIZE_MIN,
};
use spool_dataplane::store::fuzzing::{fix_snapshot_crcs, SNAP_BODY_LEN};
use spool_dataplane::store::wal::BatchHeader;
use spool_dataplane::store::{self, ChunkId, FormatOptions, Geometry, ShardStats, BLOCK_SIZE};
use spool_dataplane::Error;
use store_harness::{formatted_image, Harness, Model, Op, CHUNK};

/// A small device: one shard of 30 extents of 64 KiB, a 1 MiB WAL (the minimum), so a
/// snapshot is due every ~129 single-op batches.
const DEVICE: u64 = 4 << 20;
const BLOCKS: u32 = CHUNK / BLOCK_SIZE;

fn opts() -> FormatOptions {
    FormatOptions {
        chunk_size: CHUNK,
        shards: 1,
        wal_size: WAL_SIZE_MIN,
        force: false,
    }
}

/// Twelve chunks over four files.
fn universe() -> Vec<ChunkId> {
    (0..12u32)
        .map(|i| ChunkId {
            inode: 100 + u64::from(i / 3),
            index: i % 3,
        })
        .collect()
}

/// `n` ops over the universe: partial and whole-chunk writes (in place into holes, or
/// copy-on-write over committed blocks), truncates (shrinking and growing) and deletes.
/// At most 12 chunks plus one copy-on-write target exist at once: it never fills the
/// device.
fn long_workload(seed: u64, n: usize) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let u = universe();
    (0..n)
        .map(|i| {
            let chunk = *u.choose(&mut rng).expect("non-empty universe");
            let fill = (i % 251) as u8;
            match rng.gen_range(0..100) {
                0..=59 => {
                    let b = rng.gen_range(0..BLOCKS);
                    let nb = rng.gen_range(1..=4).min(BLOCKS - b);
                    let mut len = nb * BLOCK_SIZE;
                    if rng.gen_bool(0.3) {
                        len -= rng.gen_range(1..BLOCK_SIZE);
                    }
                    Op::Write {
                        chunk,
                        offset: b * BLOCK_SIZE,
                        len,
                        fill,
                    }
                }
                60..=74 => Op::Write {
                    chunk,
                    offset: 0,
                    len: CHUNK,
                    fill,
                },
                75..=89 => Op::Truncate {
                    chunk,
                    len: rng.gen_range(0..=BLOCKS) * BLOCK_SIZE,
                },
                _ => Op::Delete { chunk },
            }
        })
        .collect()
}

fn stats(h: &Harness) -> ShardStats {
    h.store.stats()[0]
}

fn open(image: Vec<u8>) -> Harness {
    Harness::open(MemDevice::from_image(image, 64)).unwrap_or_else(|e| panic!("open: {e}"))
}

fn check(h: &mut Harness, model: &Model, when: &str) {
    check_in(h, model, &universe(), when);
}

fn check_in(h: &mut Harness, model: &Model, chunks: &[ChunkId], when: &str) {
    if let Err(diff) = h.matches(model, chunks) {
        panic!("{when}: {diff}");
    }
}

// ---- (a) a long workload through several snapshots ----------------------------------

#[test]
fn long_workload_rolls_the_wal_through_snapshots() {
    let (image, geo) = formatted_image(DEVICE, &opts());
    assert_eq!(geo.wal_size, WAL_SIZE_MIN);
    let mut h = Harness::open(MemDevice::from_image(image, 64).with_reorder(11)).expect("open");
    let ops = long_workload(1, 720);
    let mut model = Model::default();
    let first_generation = stats(&h).generation;
    let (mut live_snapshots, mut wal_bytes) = (0u64, 0u64);
    let mut segment_start = stats(&h);
    for (i, op) in ops.iter().enumerate() {
        h.run(op).unwrap_or_else(|e| panic!("op {i} {op:?}: {e}"));
        model.apply(op);
        if i % 37 == 0 {
            check(&mut h, &model, &format!("after op {i}"));
        }
        if i % 180 == 179 {
            // 180 ops is more than one snapshot's worth of WAL: this segment wrote one.
            let s = stats(&h);
            let in_segment = s.snapshots - segment_start.snapshots;
            assert!(
                in_segment >= 1,
                "ops {}..={i} wrote no snapshot: {s:?}",
                i - 179
            );
            assert!(s.wal_used_bytes <= geo.wal_size);
            live_snapshots += in_segment;
            wal_bytes += s.wal_bytes;
            h = h.power_cycle(CrashMode::DropUnflushed).expect("restart");
            check(&mut h, &model, &format!("restart after op {i}"));
            segment_start = stats(&h);
        }
    }
    let s = stats(&h);
    assert!(
        live_snapshots >= 4,
        "only {live_snapshots} snapshots in {} ops",
        ops.len()
    );
    assert!(
        wal_bytes > 2 * geo.wal_size,
        "the WAL ring was reused: {wal_bytes} bytes written"
    );
    assert!(
        s.generation >= first_generation + live_snapshots,
        "generation {} after {live_snapshots} snapshots from {first_generation}",
        s.generation
    );
    assert!(!s.failed);
    // Restarts in a row, each after a recovery that may have written its own snapshot.
    for round in 0..3 {
        h = h.power_cycle(CrashMode::DropUnflushed).expect("restart");
        check(&mut h, &model, &format!("restart {round} at the end"));
    }
    assert_eq!(stats(&h).chunks, model.0.len() as u64);
}

// ---- (b) crashes at sampled points of the long workload -----------------------------

/// Runs `ops` from `base`, the device dying at its `crash_at`-th write or flush. Returns
/// the acknowledged model, the model with the op the crash interrupted applied, and
/// the harness.
fn run_to_crash(base: &[u8], ops: &[Op], crash_at: u64) -> (Model, Option<Model>, Harness) {
    let mut h = open(base.to_vec());
    h.mem.crash_at_op(h.mem.mutating_ops() + crash_at);
    let mut acked = Model::default();
    for op in ops {
        match h.run(op) {
            Ok(_) => acked.apply(op),
            Err(e) => {
                assert!(h.mem.is_dead(), "{op:?} failed without a crash: {e}");
                let mut m = acked.clone();
                m.apply(op);
                return (acked, Some(m), h);
            }
        }
    }
    (acked, None, h)
}

#[test]
fn crash_at_sampled_points_of_the_long_workload() {
    // SPOOL_CRASH_POINTS and SPOOL_CRASH_SEED make a longer soak of the same test.
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (n_points, seed) = (env("SPOOL_CRASH_POINTS", 100), env("SPOOL_CRASH_SEED", 7));
    let (base, _) = formatted_image(DEVICE, &opts());
    let ops = long_workload(seed, 420);
    // A clean run: how many writes and flushes it makes, and which ones belong to the
    // ops during which a snapshot was written (all of those are crash points).
    let mut h = open(base.clone());
    let mut snapshot_points = BTreeSet::new();
    for op in &ops {
        let (before, snaps) = (h.mem.mutating_ops(), stats(&h).snapshots);
        h.run(op).expect("clean run");
        if stats(&h).snapshots > snaps {
            snapshot_points.extend(before + 1..=h.mem.mutating_ops());
        }
    }
    let total = h.mem.mutating_ops();
    assert!(
        stats(&h).snapshots >= 2,
        "the workload rolls the WAL: {:?}",
        stats(&h)
    );
    drop(h);

    let mut rng = StdRng::seed_from_u64(0xc7a5 ^ seed);
    let mut points: BTreeSet<u64> = (0..n_points).map(|_| rng.gen_range(1..=total)).collect();
    points.extend(&snapshot_points);
    let mut checked = 0;
    for &k in &points {
        let (acked, unknown, h) = run_to_crash(&base, &ops, k);
        assert!(h.mem.is_dead(), "crash point {k} of {total} was reached");
        for mode in [
            CrashMode::DropUnflushed,
            CrashMode::KeepUnflushed,
            CrashMode::Tear { seed: k },
        ] {
            let image = h.mem.crash_image(mode);
            let mut r = Harness::open(MemDevice::from_image(image, 64)).unwrap_or_else(|e| {
                panic!("seed {seed}: crash at {k} of {total} ({mode:?}): recovery failed: {e}")
            });
            let ok = match (r.matches(&acked, &universe()), &unknown) {
                (Ok(()), _) => Ok(()),
                (Err(e), Some(m)) => r
                    .matches(m, &universe())
                    .map_err(|e2| format!("{e} / with the in-flight op: {e2}")),
                (Err(e), None) => Err(e),
            };
            if let Err(diff) = ok {
                panic!("seed {seed}: crash at write/flush {k} of {total} ({mode:?}): {diff}");
            }
            // The recovered store takes writes and survives another restart.
            let probe = Op::Write {
                chunk: universe()[0],
                offset: 0,
                len: 10,
                fill: 77,
            };
            r.run(&probe).expect("write after recovery");
            drop(
                r.power_cycle(CrashMode::DropUnflushed)
                    .expect("second recovery"),
            );
            checked += 1;
        }
    }
    println!(
        "{checked} crash recoveries checked at {} points ({} during snapshots) of {total}",
        points.len(),
        snapshot_points.len()
    );
}

// ---- (c) media corruption -----------------------------------------------------------

/// Writes `n` chunks of the universe (some whole, some partial) and restarts.
fn populated(n: usize) -> (Harness, Model, Geometry) {
    let (image, geo) = formatted_image(DEVICE, &opts());
    let mut h = open(image);
    let mut model = Model::default();
    for (i, &chunk) in universe().iter().take(n).enumerate() {
        let len = if i % 2 == 0 {
            CHUNK
        } else {
            5 * BLOCK_SIZE + 123
        };
        let op = Op::Write {
            chunk,
            offset: 0,
            len,
            fill: i as u8 + 1,
        };
        h.run(&op).expect("write");
        model.apply(&op);
    }
    let h = h.power_cycle(CrashMode::DropUnflushed).expect("restart");
    (h, model, geo)
}

fn extent_of(h: &Harness, chunk: ChunkId) -> u32 {
    h.store.shards()[0]
        .index()
        .get(&chunk)
        .expect("chunk is committed")
        .extent
}

#[test]
fn corrupt_block_fails_its_reads_and_the_store_keeps_serving() {
    let (mut h, mut model, geo) = populated(6);
    let u = universe();
    let victim = u[2];
    let at = geo.extent_offset(0, extent_of(&h, victim)) + u64::from(2 * BLOCK_SIZE) + 100;
    h.mem.corrupt(at as usize, 8);

    match h.read_chunk(victim) {
        Err(Error::BadChecksum {
            block,
            stored,
            computed,
            ..
        }) => {
            assert_eq!(block, 2);
            assert_ne!(stored, computed);
        }
        other => panic!("read of a corrupt block: {:?}", other.map(|(i, _)| i)),
    }
    // Reads that do not cover the bad block succeed.
    let head = h
        .read_range(victim, 0, 2 * BLOCK_SIZE)
        .expect("blocks before the bad one");
    assert_eq!(head[..], model.0[&victim][..2 * BLOCK_SIZE as usize]);
    h.read_range(victim, 3 * BLOCK_SIZE, BLOCK_SIZE)
        .expect("a block after the bad one");
    assert!(stats(&h).crc_errors >= 1);

    // Every other chunk is still served, and takes writes.
    let others: Vec<ChunkId> = u.iter().copied().filter(|&c| c != victim).collect();
    if let Err(diff) = h.matches(&model, &others) {
        panic!("other chunks after a corrupt block: {diff}");
    }
    let op = Op::Write {
        chunk: u[3],
        offset: BLOCK_SIZE,
        len: 300,
        fill: 40,
    };
    h.run(&op).expect("write to another chunk");
    model.apply(&op);

    // Copy-on-write of the victim must not launder the bad block into a fresh crc.
    let partial = Op::Write {
        chunk: victim,
        offset: 0,
        len: BLOCK_SIZE,
        fill: 41,
    };
    match h.run(&partial) {
        Err(Error::BadChecksum { block: 2, .. }) => {}
        other => panic!("overwrite that copies a corrupt block: {other:?}"),
    }
    assert!(matches!(
        h.read_chunk(victim),
        Err(Error::BadChecksum { .. })
    ));
    // A whole-chunk overwrite replaces the bad block and heals the chunk.
    let whole = Op::Write {
        chunk: victim,
        offset: 0,
        len: CHUNK,
        fill: 42,
    };
    h.run(&whole).expect("whole-chunk overwrite");
    model.apply(&whole);
    assert!(!stats(&h).failed);
    check(&mut h, &model, "after healing");
    let mut h = h.power_cycle(CrashMode::DropUnflushed).expect("restart");
    check(&mut h, &model, "after healing and a restart");
}

/// The WAL batches on `image` from the ring's start: (offset in the WAL, header).
fn wal_batches(image: &[u8], geo: &Geometry) -> Vec<(u64, BatchHeader)> {
    let base = geo.wal_base(0) as usize;
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 4096 <= geo.wal_size as usize {
        let Some(h) = BatchHeader::decode(&image[base + pos..]) else {
            break;
        };
        if h.wal_offset != pos as u64
            || out
                .last()
                .is_some_and(|(_, p): &(u64, BatchHeader)| p.generation != h.generation)
        {
            break;
        }
        out.push((pos as u64, h));
        pos += h.total_len();
    }
    out
}

/// Recovery from `image` either fails with `Error::Corrupt` or gives exactly `model`.
fn recovers_or_reports_corrupt(image: Vec<u8>, model: &Model, what: &str) {
    match Harness::open(MemDevice::from_image(image, 64)) {
        Ok(mut h) => {
            if let Err(diff) = h.matches(model, &universe()) {
                panic!(
                    "{what}: recovery succeeded but lost acknowledged writes \
                     (it should report Error::Corrupt instead): {diff}"
                );
            }
        }
        Err(Error::Corrupt { what: w, detail }) => {
            assert!(
                !detail.is_empty(),
                "{what}: a corrupt {w} says what is wrong"
            );
        }
        Err(e) => panic!("{what}: recovery failed with {e} (want Ok or Error::Corrupt)"),
    }
}

#[test]
fn corrupt_wal_batch_in_the_middle_is_not_silently_dropped() {
    let (image, geo) = formatted_image(DEVICE, &opts());
    let mut h = open(image);
    let mut model = Model::default();
    for (i, op) in long_workload(3, 40).iter().enumerate() {
        h.run(op).unwrap_or_else(|e| panic!("op {i}: {e}"));
        model.apply(op);
    }
    assert_eq!(stats(&h).snapshots, 0, "all of it is still in the WAL");
    let image = h.mem.crash_image(CrashMode::DropUnflushed);
    drop(h);
    let batches = wal_batches(&image, &geo);
    assert!(batches.len() >= 20, "{} batches", batches.len());
    let (pos, _) = batches[batches.len() / 2];
    let at = (geo.wal_base(0) + pos) as usize;

    let mut body = image.clone();
    let n = body.len();
    assert!(at + 80 < n);
    body[at + 70] ^= 0x20;
    recovers_or_reports_corrupt(
        body,
        &model,
        "a flipped byte in the body of a middle WAL batch",
    );

    let mut header = image.clone();
    header[at + 20] ^= 0x01;
    recovers_or_reports_corrupt(
        header,
        &model,
        "a flipped byte in the header of a middle WAL batch",
    );
}

/// Runs writes until the next batch commit makes a snapshot due, then a truncate, which
/// writes the snapshot before its own WAL batch; the device dies at the truncate's
/// `crash_offset`-th write or flush (1: snapshot write, 2: its flush, 3: the WAL batch).
fn crash_around_a_snapshot(crash_offset: Option<u64>) -> (Harness, Model, Model, Geometry) {
    let (image, geo) = formatted_image(DEVICE, &opts());
    let mut h = open(image);
    let mut model = Model::default();
    let u = universe();
    let mut i = 0u32;
    while stats(&h).wal_used_bytes <= geo.wal_size / 2 {
        let op = Op::Write {
            chunk: u[(i % 12) as usize],
            offset: (i % BLOCKS) * BLOCK_SIZE,
            len: 1000,
            fill: i as u8,
        };
        h.run(&op).expect("write");
        model.apply(&op);
        i += 1;
    }
    assert_eq!(stats(&h).snapshots, 0);
    let generation = stats(&h).generation;
    if let Some(k) = crash_offset {
        h.mem.crash_at_op(h.mem.mutating_ops() + k);
    }
    let op = Op::Truncate {
        chunk: u[0],
        len: BLOCK_SIZE,
    };
    let mut with_op = model.clone();
    with_op.apply(&op);
    match h.run(&op) {
        Ok(_) => model.apply(&op),
        Err(_) => assert!(h.mem.is_dead() && crash_offset.is_some()),
    }
    // The snapshot is one durable write here (op 1); op 2 is the new generation's
    // first WAL batch.
    if crash_offset.is_none_or(|k| k >= 2) {
        assert_eq!(
            stats(&h).snapshots,
            1,
            "the snapshot completed before the truncate's batch"
        );
        assert_eq!(stats(&h).generation, generation + 1);
    }
    (h, model, with_op, geo)
}

#[test]
fn torn_newest_snapshot_falls_back_to_the_older_one() {
    // A crash while the snapshot is written (op 1: torn or missing) or while the first
    // batch of the new generation is (op 2).
    for k in [1u64, 2] {
        for mode in [
            CrashMode::DropUnflushed,
            CrashMode::KeepUnflushed,
            CrashMode::Tear { seed: k },
        ] {
            let (h, acked, with_op, _) = crash_around_a_snapshot(Some(k));
            let mut r = Harness::open(MemDevice::from_image(h.mem.crash_image(mode), 64))
                .unwrap_or_else(|e| panic!("crash at snapshot op {k} ({mode:?}): {e}"));
            if r.matches(&acked, &universe()).is_err() {
                check(
                    &mut r,
                    &with_op,
                    &format!("crash at snapshot op {k} ({mode:?})"),
                );
            }
        }
    }
    // The snapshot is complete but its body rots before any batch of the new generation
    // was written (the crash drops the batch in flight): the older snapshot plus the
    // whole old WAL give the same state.
    let (h, acked, _, geo) = crash_around_a_snapshot(Some(2));
    let mut image = h.mem.crash_image(CrashMode::DropUnflushed);
    let newest = stats(&h).generation;
    let slot = geo.snapshot_slot(0, (newest % 2) as u32) as usize;
    image[slot + SNAP_HEADER_SIZE + 5] ^= 0x40;
    let mut r =
        Harness::open(MemDevice::from_image(image, 64)).expect("fall back to the older snapshot");
    check(
        &mut r,
        &acked,
        "newest snapshot body corrupt, old WAL intact",
    );
    assert!(
        stats(&r).replayed_batches > 0,
        "the old generation's WAL was replayed"
    );
}

#[test]
fn corrupt_newest_snapshot_after_new_batches_is_not_silently_dropped() {
    let (mut h, mut model, _, geo) = crash_around_a_snapshot(None);
    // Batches of the new generation overwrite the start of the old generation's WAL.
    for i in 0..5u32 {
        let op = Op::Write {
            chunk: universe()[5],
            offset: i * BLOCK_SIZE,
            len: 10,
            fill: 200 + i as u8,
        };
        h.run(&op).expect("write");
        model.apply(&op);
    }
    let newest = stats(&h).generation;
    let image = h.mem.crash_image(CrashMode::DropUnflushed);
    drop(h);
    let slot = geo.snapshot_slot(0, (newest % 2) as u32) as usize;

    let mut body = image.clone();
    body[slot + SNAP_HEADER_SIZE + 5] ^= 0x40;
    recovers_or_reports_corrupt(
        body,
        &model,
        "newest snapshot body corrupt after new WAL batches",
    );

    // Both snapshots unreadable: a clear error, no panic.
    let mut both = image.clone();
    let other = geo.snapshot_slot(0, ((newest + 1) % 2) as u32) as usize;
    both[slot + 3] ^= 1;
    both[other + 3] ^= 1;
    match Harness::open(MemDevice::from_image(both, 64)) {
        Err(Error::Corrupt { detail, .. }) => assert!(detail.contains("snapshot"), "{detail}"),
        Err(e) => panic!("both snapshots corrupt: {e} (want Error::Corrupt)"),
        Ok(_) => panic!("both snapshots corrupt: opened anyway"),
    }
}

/// A snapshot header that passes its crc but claims an absurd body length (bit rot
/// that happens to keep the crc, or a hostile image) must not crash recovery.
#[test]
fn snapshot_header_with_huge_body_len_is_an_error_not_a_crash() {
    let (h, model, geo) = populated(4);
    // The restart in `populated` replayed the WAL and wrote a snapshot; no batch since.
    let newest = stats(&h).generation;
    let mut image = h.mem.crash_image(CrashMode::DropUnflushed);
    drop(h);
    let slot = geo.snapshot_slot(0, (newest % 2) as u32) as usize;
    for body_len in [u64::MAX, u64::MAX - 10, geo.snapshot_slot_size] {
        let header = &mut image[slot..slot + SNAP_HEADER_SIZE];
        header[SNAP_BODY_LEN].copy_from_slice(&body_len.to_le_bytes());
        fix_snapshot_crcs(header);
        recovers_or_reports_corrupt(
            image.clone(),
            &model,
            &format!("newest snapshot header claims a body of {body_len} bytes"),
        );
    }
}

// ---- (d) a full device --------------------------------------------------------------

#[test]
fn full_device_gives_enospc_keeps_data_and_deletes_free_space() {
    let (image, _) = formatted_image(DEVICE, &opts());
    let mut h = open(image);
    let extents = stats(&h).extents;
    let mut model = Model::default();
    let mut written = Vec::new();
    let full = loop {
        let chunk = ChunkId {
            inode: 1000 + written.len() as u64,
            index: 0,
        };
        let op = Op::Write {
            chunk,
            offset: 0,
            len: 8 * BLOCK_SIZE,
            fill: written.len() as u8,
        };
        match h.run(&op) {
            Ok(_) => {
                model.apply(&op);
                written.push(chunk);
            }
            Err(e) => break e,
        }
        assert!(written.len() as u64 <= extents, "more chunks than extents");
    };
    assert!(matches!(full, Error::NoSpace { shard: 0 }), "{full}");
    assert_eq!(full.errno(), 28);
    assert_eq!(written.len() as u64, extents, "every extent holds a chunk");
    let s = stats(&h);
    assert_eq!(s.free_extents, 0);
    assert!(s.enospc >= 1);
    assert!(!s.failed);
    check_in(&mut h, &model, &written, "device full");

    // An overwrite needs a fresh extent (copy-on-write): refused, and changes nothing.
    let cow = Op::Write {
        chunk: written[0],
        offset: 0,
        len: 100,
        fill: 99,
    };
    assert!(matches!(h.run(&cow), Err(Error::NoSpace { .. })));
    // Writing into a hole of an existing chunk needs no extent: accepted.
    let hole = Op::Write {
        chunk: written[1],
        offset: 12 * BLOCK_SIZE,
        len: 5000,
        fill: 98,
    };
    h.run(&hole).expect("in-place write on a full device");
    model.apply(&hole);
    check_in(
        &mut h,
        &model,
        &written,
        "after refused and accepted writes",
    );

    // Deletes free extents; writes go on.
    for &c in &written[..3] {
        let op = Op::Delete { chunk: c };
        h.run(&op).expect("delete");
        model.apply(&op);
    }
    assert_eq!(stats(&h).free_extents, 3);
    // An overwrite (copy-on-write) of a surviving chunk.
    let cow = Op::Write {
        chunk: written[3],
        offset: 0,
        len: 100,
        fill: 99,
    };
    h.run(&cow).expect("overwrite");
    model.apply(&cow);
    let new = Op::Write {
        chunk: ChunkId {
            inode: 5000,
            index: 0,
        },
        offset: 0,
        len: CHUNK,
        fill: 3,
    };
    h.run(&new).expect("new chunk after deletes");
    model.apply(&new);
    written.push(ChunkId {
        inode: 5000,
        index: 0,
    });
    let mut h = h.power_cycle(CrashMode::DropUnflushed).expect("restart");
    check_in(&mut h, &model, &written, "after a restart");
}

// ---- (e) format's refusals and a future version -------------------------------------

fn format_on(image: Vec<u8>, force: bool) -> (Result<Superblock, Error>, Vec<u8>) {
    let mut dev = MemDevice::from_image(image, 64);
    let mem = dev.handle();
    let r = store::format(&mut dev, &FormatOptions { force, ..opts() });
    (r, mem.current_image())
}

#[test]
fn format_refuses_ext4_and_spool_unless_forced() {
    let mut ext4 = vec![0u8; 8 << 20];
    ext4[1080..1082].copy_from_slice(&[0x53, 0xef]);
    let (r, image) = format_on(ext4.clone(), false);
    match r {
        Err(e @ Error::Occupied(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("ext2/3/4") && msg.contains("--force"), "{msg}");
        }
        other => panic!("format over ext4: {other:?}"),
    }
    assert_eq!(image, ext4, "a refused format writes nothing");

    let (r, image) = format_on(ext4, true);
    let first = r.expect("forced format over ext4");
    let sb = Superblock::decode(&image[..SUPERBLOCK_SIZE]).expect("a Spool superblock");
    assert_eq!(sb, first);

    let (r, again) = format_on(image.clone(), false);
    match r {
        Err(Error::Occupied(what)) => assert!(what.contains("Spool"), "{what}"),
        other => panic!("format over a Spool: {other:?}"),
    }
    assert_eq!(again, image, "a refused format writes nothing");
    let (r, image) = format_on(image, true);
    let second = r.expect("forced format over a Spool");
    assert_ne!(second.uuid, first.uuid, "a new store");
    let mut h = open(image);
    assert_eq!(stats(&h).chunks, 0);
    check(
        &mut h,
        &Model::default(),
        "a freshly forced format is empty",
    );
}

#[test]
fn future_format_version_is_refused_on_open() {
    let (mut image, _) = formatted_image(DEVICE, &opts());
    let mut sb = Superblock::decode(&image[..SUPERBLOCK_SIZE]).expect("superblock");
    sb.version = FORMAT_VERSION + 1;
    sb.encode(&mut image[..SUPERBLOCK_SIZE]);
    match Harness::open(MemDevice::from_image(image.clone(), 64)) {
        Err(e @ Error::FutureVersion { .. }) => {
            assert!(
                matches!(e, Error::FutureVersion { found, supported } if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION)
            );
            assert!(e.to_string().contains("upgrade"), "{e}");
        }
        Err(e) => panic!("future version: {e}"),
        Ok(_) => panic!("future version: opened"),
    }
    // And `format` does not overwrite it by accident.
    let (r, _) = format_on(image, false);
    assert!(matches!(r, Err(Error::Occupied(_))), "{r:?}");
}
