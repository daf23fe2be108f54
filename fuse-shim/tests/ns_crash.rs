//! The namespace survives a crash at every device write: a scripted workload (creates,
//! writes with fsync, rename over an existing file, hard links, unlink of an open file,
//! truncate, xattrs, a checkpoint, log-chunk rollover) runs on the mem device, which
//! dies at its N-th write or flush; unflushed writes are then dropped, kept or torn.
//! After recovery the namespace must equal the state after the acknowledged steps, or
//! after those plus the step in flight (all or nothing), never anything else, and
//! recovery must never report corruption.

mod common;

use std::collections::BTreeMap;

use common::*;
use spool_dataplane::device::mem::{CrashMode, MemDevice, MemHandle};
use spool_fuse_shim::meta::record::Kind;
use spool_fuse_shim::meta::state::ROOT_INO;
use spool_fuse_shim::{Namespace, Result};

/// One step: acknowledged when it returns Ok. Writes are followed by an fsync
/// (`flush_inode`) inside the step, so an acknowledged write is durable with its size.
fn step(ns: &Namespace, i: usize) -> Result<()> {
    let root = ROOT_INO;
    let w = |ino: u64, off: u64, d: &[u8]| -> Result<()> {
        ns.write(ino, off, d)?;
        ns.flush_inode(ino)
    };
    match i {
        0 => ns.create(root, b"ckpt", &dir()).map(drop),
        1 => ns.create(root, b"m", &file(0o644)).map(drop),
        2 => w(lookup_path(ns, &["m"])?, 0, b"old metadata"),
        3 => {
            let d = lookup_path(ns, &["ckpt"])?;
            ns.create(d, b"__0_0.distcp", &file(0o644)).map(drop)
        }
        4 => w(
            lookup_path(ns, &["ckpt", "__0_0.distcp"])?,
            0,
            &data(1, 150_000),
        ),
        5 => w(
            lookup_path(ns, &["ckpt", "__0_0.distcp"])?,
            150_000,
            &data(2, 70_001),
        ),
        6 => ns.create(root, b"m.tmp", &file(0o600)).map(drop),
        7 => w(
            lookup_path(ns, &["m.tmp"])?,
            0,
            b"new metadata, longer than the old one",
        ),
        8 => ns.rename(root, b"m.tmp", root, b"m", false),
        9 => ns.link(lookup_path(ns, &["m"])?, root, b"m.link").map(drop),
        10 => ns.setxattr(lookup_path(ns, &["m"])?, b"user.step", b"10", 0),
        11 => ns.checkpoint_now(),
        12 => {
            // An open file is unlinked; its data goes when it is closed.
            let ino = lookup_path(ns, &["ckpt", "__0_0.distcp"])?;
            ns.open_file(ino)?;
            let d = lookup_path(ns, &["ckpt"])?;
            ns.remove(d, b"__0_0.distcp", false)?;
            ns.release(ino)
        }
        13 => ns.set_size(lookup_path(ns, &["m.link"])?, 7),
        14 => {
            let d = lookup_path(ns, &["ckpt"])?;
            ns.create(d, b"sub", &dir()).map(drop)
        }
        15 => ns.rename(
            root,
            b"m.link",
            lookup_path(ns, &["ckpt", "sub"])?,
            b"moved",
            false,
        ),
        16..=40 if i % 2 == 0 => {
            // Enough small ops to roll the log over to its next chunk.
            ns.create(root, format!("f{i}").as_bytes(), &file(0o644))
                .map(drop)
        }
        17..=39 => {
            let ino = lookup_path(ns, &[&format!("f{}", i - 1)])?;
            w(ino, (i as u64) * 1000, &data(i as u8, 5000))
        }
        41 => ns.remove(root, b"f20", false),
        42 => ns.removexattr(lookup_path(ns, &["m"])?, b"user.step"),
        _ => unreachable!("no step {i}"),
    }
}
const STEPS: usize = 43;

/// A canonical dump: every path with its kind, size, content, link count and xattrs.
fn dump(ns: &Namespace) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(ROOT_INO, String::new())];
    while let Some((d, prefix)) = stack.pop() {
        for e in ns.readdir(d, 0, usize::MAX).expect("readdir") {
            let path = format!("{prefix}/{}", String::from_utf8_lossy(&e.name));
            let a = ns.getattr(e.ino).expect("getattr");
            let mut desc = format!(
                "{:?} perm {:o} nlink {} size {}",
                a.kind, a.perm, a.nlink, a.size
            );
            match a.kind {
                Kind::Dir => stack.push((e.ino, path.clone())),
                Kind::File => {
                    let content = ns
                        .read(e.ino, 0, a.size as u32, |b| b.to_vec())
                        .expect("read");
                    desc += &format!(" crc {:08x}", crc32c::crc32c(&content));
                }
                _ => {}
            }
            let xl = ns.listxattr(e.ino).expect("listxattr");
            for name in xl.split(|&b| b == 0).filter(|n| !n.is_empty()) {
                let v = ns.getxattr(e.ino, name).expect("getxattr");
                desc += &format!(
                    " {}={}",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(&v)
                );
            }
            out.insert(path, desc);
        }
    }
    out
}

#[test]
fn namespace_recovers_to_acknowledged_state_after_a_crash_at_every_write() {
    // A clean run: the state after each step and the device writes it takes.
    let dev = fresh_device();
    let h: MemHandle = dev.handle();
    let engine = engine_on(dev);
    let ns = open_ns(&engine).expect("fresh namespace");
    let ops_before = h.mutating_ops();
    let mut states = vec![dump(&ns)];
    for i in 0..STEPS {
        step(&ns, i).unwrap_or_else(|e| panic!("step {i} failed on a healthy device: {e}"));
        states.push(dump(&ns));
    }
    let total_ops = h.mutating_ops();
    drop(ns);
    // The clean state also survives a restart.
    let img = h.crash_image(CrashMode::DropUnflushed);
    shutdown(engine);
    let engine = engine_on(MemDevice::from_image(img, 64));
    assert_eq!(dump(&open_ns(&engine).expect("reopen")), states[STEPS]);
    shutdown(engine);

    let modes = [
        CrashMode::DropUnflushed,
        CrashMode::KeepUnflushed,
        CrashMode::Tear { seed: 7 },
    ];
    let mut checked = 0;
    for n in ops_before + 1..=total_ops {
        // Torn images at every fourth point keep the run short; the other modes at all.
        for mode in modes
            .into_iter()
            .filter(|m| !matches!(m, CrashMode::Tear { .. }) || n % 4 == 0)
        {
            let dev = fresh_device();
            let h = dev.handle();
            let engine = engine_on(dev);
            let ns = open_ns(&engine).expect("fresh namespace");
            h.crash_at_op(n - ops_before + h.mutating_ops());
            let mut acked = 0;
            for i in 0..STEPS {
                if step(&ns, i).is_err() {
                    break;
                }
                acked = i + 1;
            }
            drop(ns);
            let img = h.crash_image(mode);
            shutdown(engine);
            let engine = engine_on(MemDevice::from_image(img, 64));
            let got = match open_ns(&engine) {
                Ok(ns) => dump(&ns),
                Err(e) => panic!(
                    "crash at write {n} ({mode:?}), {acked} steps acked: recovery failed: {e}"
                ),
            };
            let ok = got == states[acked] || (acked < STEPS && got == states[acked + 1]);
            assert!(
                ok,
                "crash at write {n} ({mode:?}) after {acked} acknowledged steps:\n recovered {got:#?}\n acked state {:#?}",
                states[acked]
            );
            shutdown(engine);
            checked += 1;
        }
    }
    assert!(checked >= 2 * 50, "too few crash points: {checked}");
    eprintln!(
        "{checked} crash images recovered to an acknowledged state ({} device writes)",
        total_ops - ops_before
    );
}
