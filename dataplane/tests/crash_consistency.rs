//! Crash consistency: for every small workload, crash the device at every write and
//! flush it performs, with unflushed writes dropped, kept or torn; recover and check
//! that exactly the acknowledged state is there (the op in flight at the crash is all
//! or nothing) and that every block reads back with a good crc.

mod store_harness;

use spool_dataplane::device::mem::{CrashMode, MemDevice};
use spool_dataplane::store::{ChunkId, BLOCK_SIZE};
use store_harness::{formatted_image, geometry_opts, Harness, Model, Op, CHUNK};

const A: ChunkId = ChunkId { inode: 1, index: 0 };
const B: ChunkId = ChunkId { inode: 2, index: 0 };
const DEVICE: u64 = 3 << 20;

/// The alphabet: new data, an overwrite (copy-on-write once A exists), a partial-block
/// append into a hole (in place), a truncate, a delete, and a whole other chunk.
fn alphabet() -> Vec<Op> {
    vec![
        Op::Write {
            chunk: A,
            offset: 0,
            len: 2 * BLOCK_SIZE,
            fill: 1,
        },
        Op::Write {
            chunk: A,
            offset: BLOCK_SIZE,
            len: BLOCK_SIZE,
            fill: 2,
        },
        Op::Write {
            chunk: A,
            offset: 3 * BLOCK_SIZE,
            len: 100,
            fill: 3,
        },
        Op::Truncate {
            chunk: A,
            len: BLOCK_SIZE,
        },
        Op::Delete { chunk: A },
        Op::Write {
            chunk: B,
            offset: 0,
            len: CHUNK,
            fill: 4,
        },
    ]
}

fn workloads(first: usize, max_len: usize) -> Vec<Vec<Op>> {
    let abc = alphabet();
    let mut all: Vec<Vec<Op>> = vec![vec![abc[first].clone()]];
    let mut frontier = all.clone();
    for _ in 1..max_len {
        let mut next = Vec::new();
        for w in &frontier {
            for op in &abc {
                let mut w2 = w.clone();
                w2.push(op.clone());
                next.push(w2);
            }
        }
        all.extend(next.iter().cloned());
        frontier = next;
    }
    all
}

/// Runs `ops` from a fresh store, crashing at mutating op `crash_at` (None: never).
/// Returns the models before and after the op the crash interrupted, the harness, and
/// how many mutating ops the run made.
fn run(base: &[u8], ops: &[Op], crash_at: Option<u64>) -> (Model, Option<Model>, Harness, u64) {
    let mut h = Harness::open(MemDevice::from_image(base.to_vec(), 64)).expect("open fresh store");
    let start = h.mem.mutating_ops();
    if let Some(k) = crash_at {
        h.mem.crash_at_op(start + k);
    }
    let mut acked = Model::default();
    let mut unknown = None;
    for op in ops {
        match h.run(op) {
            Ok(_) => acked.apply(op),
            Err(e) => {
                assert!(h.mem.is_dead(), "op {op:?} failed without a crash: {e}");
                let mut m = acked.clone();
                m.apply(op);
                unknown = Some(m);
                break;
            }
        }
    }
    let n = h.mem.mutating_ops() - start;
    (acked, unknown, h, n)
}

fn check_workload(base: &[u8], ops: &[Op]) -> usize {
    let universe = [A, B];
    let (_, _, _, total) = run(base, ops, None);
    let mut checked = 0;
    for k in 1..=total {
        for mode in [
            CrashMode::DropUnflushed,
            CrashMode::KeepUnflushed,
            CrashMode::Tear { seed: k },
        ] {
            let (acked, unknown, h, _) = run(base, ops, Some(k));
            let image = h.mem.crash_image(mode);
            drop(h);
            let mut r = Harness::open(MemDevice::from_image(image, 64))
                .unwrap_or_else(|e| panic!("{ops:?} crash at {k} {mode:?}: recovery failed: {e}"));
            let ok = r.matches(&acked, &universe);
            let ok = match (ok, &unknown) {
                (Ok(()), _) => Ok(()),
                (Err(e), Some(m)) => r
                    .matches(m, &universe)
                    .map_err(|e2| format!("{e} / with the in-flight op: {e2}")),
                (Err(e), None) => Err(e),
            };
            if let Err(diff) = ok {
                panic!("{ops:?} crash at write/flush {k} of {total} ({mode:?}): {diff}");
            }
            // The recovered store takes new writes and survives another restart.
            let probe = Op::Write {
                chunk: B,
                offset: 2 * BLOCK_SIZE,
                len: 10,
                fill: 9,
            };
            r.run(&probe).expect("write after recovery");
            let r = r
                .power_cycle(CrashMode::DropUnflushed)
                .expect("second recovery");
            drop(r);
            checked += 1;
        }
    }
    checked
}

fn exhaustive(first: usize) {
    let (base, _) = formatted_image(DEVICE, &geometry_opts());
    let mut points = 0;
    let ws = workloads(first, 4);
    for w in &ws {
        points += check_workload(&base, w);
    }
    println!(
        "{} workloads starting with op {first}, {points} crash recoveries checked",
        ws.len()
    );
}

#[test]
fn crash_every_point_workloads_starting_with_write() {
    exhaustive(0);
}
#[test]
fn crash_every_point_workloads_starting_with_overwrite() {
    exhaustive(1);
}
#[test]
fn crash_every_point_workloads_starting_with_partial_append() {
    exhaustive(2);
}
#[test]
fn crash_every_point_workloads_starting_with_truncate() {
    exhaustive(3);
}
#[test]
fn crash_every_point_workloads_starting_with_delete() {
    exhaustive(4);
}
#[test]
fn crash_every_point_workloads_starting_with_other_chunk() {
    exhaustive(5);
}
