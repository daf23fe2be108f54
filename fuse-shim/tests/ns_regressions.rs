//! Regressions found in review of the metadata log: each test is the scenario that
//! failed before its fix.

mod common;

use std::sync::{Arc, Barrier};

use common::*;
use spool_dataplane::device::mem::{CrashMode, MemDevice, MemHandle};
use spool_fuse_shim::meta::state::ROOT_INO;
use spool_fuse_shim::Namespace;

fn files(ns: &Namespace, prefix: &str, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            ns.create(ROOT_INO, format!("{prefix}{i}").as_bytes(), &file(0o644))
                .unwrap()
                .ino
        })
        .collect()
}

/// A batch of almost a whole chunk that has to move into a chunk already holding the
/// pad batch used to be written past the chunk's end, failing the namespace.
#[test]
fn a_chunk_sized_batch_fits_after_the_pad() {
    let engine = engine_on(fresh_device());
    let ns = open_ns(&engine).unwrap();
    // ~690 dirty inodes flushed together make a batch of nearly 64 KiB (one chunk).
    let inos = files(&ns, "f", 690);
    for round in 0..6u64 {
        // A few single ops push the current chunk past half, so the next one is padded.
        for j in 0..10 {
            ns.create(ROOT_INO, format!("r{round}_{j}").as_bytes(), &file(0o644))
                .unwrap();
        }
        for &i in &inos {
            ns.write(i, round, b"x").unwrap();
        }
        ns.flush_dirty()
            .unwrap_or_else(|e| panic!("round {round}: flush_dirty failed: {e}"));
        assert!(!ns.status().failed, "round {round}: namespace failed");
    }
    drop(ns);
    shutdown(engine);
}

fn xattr_state(ns: &Namespace, a: u64, b: u64) {
    let v = |n: usize, s: u8| vec![s; n];
    ns.setxattr(a, b"user.1", &v(16384, 1), 0).unwrap();
    ns.setxattr(a, b"user.2", &v(16384, 2), 0).unwrap();
    ns.setxattr(a, b"user.3", &v(16384, 3), 0).unwrap();
    ns.setxattr(a, b"user.4", &v(15000, 4), 0).unwrap();
    ns.setxattr(b, b"user.1", &v(16384, 5), 0).unwrap();
    ns.setxattr(b, b"user.2", &v(16384, 6), 0).unwrap();
}

/// A crash in the middle of a checkpoint left chunks of the next generation; the next
/// checkpoint to that generation rewrote them copy-on-write, kept their stale tails,
/// and the namespace no longer opened.
#[test]
fn a_crash_mid_checkpoint_leaves_nothing_the_next_checkpoint_trips_on() {
    // How many device writes one checkpoint of this state takes.
    let dev = fresh_device();
    let h: MemHandle = dev.handle();
    let engine = engine_on(dev);
    let ns = open_ns(&engine).unwrap();
    let a = ns.create(ROOT_INO, b"a", &file(0o644)).unwrap().ino;
    let b = ns.create(ROOT_INO, b"b", &file(0o644)).unwrap().ino;
    xattr_state(&ns, a, b);
    let before = h.mutating_ops();
    ns.checkpoint_now().unwrap();
    let checkpoint_ops = h.mutating_ops() - before;
    drop(ns);
    shutdown(engine);
    assert!(checkpoint_ops > 3);

    for n in 1..=checkpoint_ops {
        for mode in [CrashMode::DropUnflushed, CrashMode::KeepUnflushed] {
            let dev = fresh_device();
            let h = dev.handle();
            let engine = engine_on(dev);
            let ns = open_ns(&engine).unwrap();
            let a = ns.create(ROOT_INO, b"a", &file(0o644)).unwrap().ino;
            let b = ns.create(ROOT_INO, b"b", &file(0o644)).unwrap().ino;
            xattr_state(&ns, a, b);
            h.crash_at_op(h.mutating_ops() + n);
            let _ = ns.checkpoint_now();
            drop(ns);
            let img = h.crash_image(mode);
            shutdown(engine);

            // Restart, shrink the state, checkpoint cleanly, restart again.
            let dev = MemDevice::from_image(img, 64);
            let h = dev.handle();
            let engine = engine_on(dev);
            let ns = open_ns(&engine)
                .unwrap_or_else(|e| panic!("crash at checkpoint write {n} ({mode:?}): {e}"));
            ns.removexattr(a, b"user.4").unwrap();
            ns.checkpoint_now().unwrap();
            drop(ns);
            let img = h.current_image();
            shutdown(engine);
            let engine = engine_on(MemDevice::from_image(img, 64));
            let ns = open_ns(&engine).unwrap_or_else(|e| {
                panic!("crash at checkpoint write {n} ({mode:?}), then a clean checkpoint: {e}")
            });
            assert!(ns.getxattr(a, b"user.4").is_err(), "n={n} {mode:?}");
            assert_eq!(ns.getxattr(a, b"user.3").unwrap(), vec![3u8; 16384]);
            assert_eq!(ns.getxattr(b, b"user.2").unwrap(), vec![6u8; 16384]);
            drop(ns);
            shutdown(engine);
        }
    }
}

/// fsync used to return at once when another thread (the flusher) had just queued the
/// inode's record but not yet made it durable: a crash then lost the fsync'd size.
#[test]
fn fsync_waits_for_a_size_another_thread_queued() {
    let dev = fresh_device();
    let h: MemHandle = dev.handle();
    let engine = engine_on(dev);
    let ns = Arc::new(open_ns(&engine).unwrap());
    for i in 0..100u64 {
        let ino = ns
            .create(ROOT_INO, format!("g{i}").as_bytes(), &file(0o644))
            .unwrap()
            .ino;
        ns.write(ino, 0, &[7u8; 8192]).unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let (ns2, b2) = (Arc::clone(&ns), Arc::clone(&barrier));
        let flusher = std::thread::spawn(move || {
            b2.wait();
            ns2.flush_dirty()
        });
        barrier.wait();
        ns.flush_inode(ino).unwrap();
        // fsync returned: what a crash now leaves must hold the size.
        let img = h.crash_image(CrashMode::DropUnflushed);
        flusher.join().unwrap().unwrap();
        let e2 = engine_on(MemDevice::from_image(img, 64));
        let ns2 = open_ns(&e2).unwrap();
        assert_eq!(
            ns2.getattr(ino).map(|r| r.size).ok(),
            Some(8192),
            "try {i}: fsync returned but the size was not durable"
        );
        drop(ns2);
        shutdown(e2);
    }
}
