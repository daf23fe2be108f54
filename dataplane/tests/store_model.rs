//! Property test: random op sequences (with restarts) against an in-memory model.

mod store_harness;

use proptest::prelude::*;
use spool_dataplane::device::mem::{CrashMode, MemDevice};
use spool_dataplane::store::{ChunkId, BLOCK_SIZE};
use store_harness::{formatted_image, geometry_opts, Harness, Model, Op, CHUNK};

#[derive(Clone, Debug)]
enum Step {
    Op(Op),
    Batch(Vec<Op>),
    Restart,
}

fn chunk_strategy() -> impl Strategy<Value = ChunkId> {
    (0u64..3, 0u32..2).prop_map(|(inode, index)| ChunkId { inode, index })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let blocks = CHUNK / BLOCK_SIZE;
    prop_oneof![
        6 => (chunk_strategy(), 0..blocks, 1u32..CHUNK, any::<u8>()).prop_map(move |(chunk, b, len, fill)| {
            let offset = b * BLOCK_SIZE;
            Op::Write { chunk, offset, len: len.min(CHUNK - offset), fill }
        }),
        1 => (chunk_strategy(), 0..=blocks).prop_map(|(chunk, b)| Op::Truncate { chunk, len: b * BLOCK_SIZE }),
        1 => chunk_strategy().prop_map(|chunk| Op::Delete { chunk }),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => op_strategy().prop_map(Step::Op),
        2 => prop::collection::vec(op_strategy(), 2..6).prop_map(Step::Batch),
        1 => Just(Step::Restart),
    ]
}

fn universe() -> Vec<ChunkId> {
    (0u64..3)
        .flat_map(|inode| (0u32..2).map(move |index| ChunkId { inode, index }))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
        fn store_matches_model(steps in prop::collection::vec(step_strategy(), 1..40), reorder in any::<u64>(), delays in any::<bool>()) {// A small device with a small WAL, so long runs roll through snapshots.
        let mut opts = geometry_opts();
        opts.shards = 1;
        let (image, _) = formatted_image(4 << 20, &opts);
                // Completions come back in a random order, and with `delays` requests also stay
        // in flight across polls (reads and copies overlapping commits).
        let dev = MemDevice::from_image(image, 64);
        let dev = if delays { dev.with_delays(reorder) } else { dev.with_reorder(reorder) };
        let mut h = Harness::open(dev).unwrap();
        let mut model = Model::default();
        for step in &steps {
            match step {
                Step::Op(op) => {
                    match h.run(op) {
                        Ok(_) => model.apply(op),
                        Err(e) => {
                            // Only running out of space is allowed, and it changes nothing.
                            prop_assert!(matches!(e, spool_dataplane::Error::NoSpace { .. }), "{op:?}: {e}");
                        }
                    }
                }
                Step::Batch(ops) => {
                    // Concurrent ops on distinct chunks commute; keep one op per chunk so
                    // the model's order is the only possible outcome.
                    let mut seen = std::collections::BTreeSet::new();
                    let ops: Vec<Op> = ops.iter().filter(|o| seen.insert(o.chunk())).cloned().collect();
                    let res = h.run_concurrent(&ops);
                    for (op, r) in ops.iter().zip(res) {
                        match r {
                            Ok(_) => model.apply(op),
                            Err(e) => prop_assert!(matches!(e, spool_dataplane::Error::NoSpace { .. }), "{op:?}: {e}"),
                        }
                    }
                }
                Step::Restart => {
                    // Everything acknowledged was flushed: dropping the rest loses nothing.
                    h = h.power_cycle(CrashMode::DropUnflushed).unwrap();
                }
            }
            if let Err(diff) = h.matches(&model, &universe()) {
                prop_assert!(false, "after {step:?}: {diff}");
            }
        }
    }
}

#[test]
fn overlapping_concurrent_writes_apply_in_arrival_order() {
    let (image, _) = formatted_image(4 << 20, &geometry_opts());
    let mut h = Harness::open(MemDevice::from_image(image, 64).with_reorder(3)).unwrap();
    let c = ChunkId { inode: 1, index: 0 };
    let ops = vec![
        Op::Write {
            chunk: c,
            offset: 0,
            len: 3 * BLOCK_SIZE,
            fill: 1,
        },
        Op::Write {
            chunk: c,
            offset: BLOCK_SIZE,
            len: BLOCK_SIZE,
            fill: 2,
        },
        Op::Write {
            chunk: c,
            offset: 8 * BLOCK_SIZE,
            len: 5,
            fill: 3,
        },
        Op::Write {
            chunk: c,
            offset: 0,
            len: 10,
            fill: 4,
        },
        Op::Truncate {
            chunk: c,
            len: 2 * BLOCK_SIZE,
        },
        Op::Write {
            chunk: c,
            offset: 4 * BLOCK_SIZE,
            len: BLOCK_SIZE,
            fill: 5,
        },
    ];
    let res = h.run_concurrent(&ops);
    let mut model = Model::default();
    for (op, r) in ops.iter().zip(res) {
        r.unwrap();
        model.apply(op);
    }
    h.matches(&model, &[c]).unwrap();
}

#[test]
fn reformat_over_an_old_store_starts_empty_and_clean() {
    // An old store whose WAL holds many batches past the first block.
    let (image, _) = formatted_image(4 << 20, &geometry_opts());
    let mut h = Harness::open(MemDevice::from_image(image, 64)).unwrap();
    for i in 0..20u32 {
        let op = Op::Write {
            chunk: ChunkId { inode: 1, index: 0 },
            offset: (i % 16) * BLOCK_SIZE,
            len: 100,
            fill: i as u8,
        };
        h.run(&op).unwrap();
    }
    let mut dev = MemDevice::from_image(h.mem.current_image(), 64);
    drop(h);
    let mut opts = geometry_opts();
    opts.force = true;
    spool_dataplane::store::format(&mut dev, &opts).unwrap();
    let mut h = Harness::open(dev).expect("a fresh format must not see the old store's log");
    h.matches(&Model::default(), &universe()).unwrap();
    assert_eq!(h.store.stats()[0].replayed_batches, 0);
}
