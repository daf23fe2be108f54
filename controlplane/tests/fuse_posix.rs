//! POSIX semantics of the `spool serve` FUSE mount, checked against the local kernel
//! filesystem (`common/posix.rs` holds the cases), plus stress on big directories,
//! statfs, rename atomicity for readers, and behaviour when the device fills up.
//!
//! `posix_suite_local_vs_local` needs no mount: it validates the suite itself.

#[path = "common/mount.rs"]
mod mount;
#[path = "common/posix.rs"]
mod posix;

use mount::{Cache, MountOpts, MountedNode};
use posix::Errno;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Local roots live in /tmp because it is ext4 here (user xattrs, O_DIRECT); a tmpfs
/// TMPDIR would make the local side the odd one out.
fn local_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/tmp").expect("local tempdir")
}

/// The last `n` bytes of the daemon log, for failure messages.
fn log_tail(node: &MountedNode, n: usize) -> String {
    let log = node.log_text();
    let mut start = log.len().saturating_sub(n);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    log[start..].to_string()
}

#[test]
fn posix_suite_local_vs_local() {
    let (a, b, c) = (local_dir(), local_dir(), local_dir());
    let mism = posix::run_all(a.path(), b.path());
    assert!(
        mism.is_empty(),
        "the suite is not deterministic on one filesystem ({} mismatches):\n{}",
        mism.len(),
        mism.join("\n")
    );
    for a in posix::ALLOWED {
        assert!(
            posix::CASES.iter().any(|c| c.name == a.case),
            "allow-list names unknown case {}",
            a.case
        );
    }
    let bad = posix::local_expectations(c.path());
    assert!(
        bad.is_empty(),
        "cases no longer probe what they claim on the local fs:\n{}",
        bad.join("\n")
    );
}

/// The stress helpers themselves must pass on a real kernel filesystem.
#[test]
fn posix_helpers_pass_on_local_fs() {
    let d = local_dir();
    posix::many_entries(d.path(), 3000, 4).expect("many_entries on local fs");
    posix::statfs_sane(d.path()).expect("statfs_sane on local fs");
    posix::rename_readers_never_see_enoent(d.path(), 1).expect("rename readers on local fs");
}

fn suite_against_mount(cache: Cache) {
    let mut node = MountedNode::start(&MountOpts {
        cache,
        ..MountOpts::default()
    });
    let root = node.mountpoint.join("posix");
    std::fs::create_dir(&root).expect("mkdir on the mount");
    let local = local_dir();
    let mism = posix::run_all(&root, local.path());
    assert!(
        mism.is_empty(),
        "{} POSIX mismatches (cache {cache:?}):\n{}\n--- daemon log tail:\n{}",
        mism.len(),
        mism.join("\n"),
        log_tail(&node, 8000)
    );
    node.stop();
}

#[test]
fn posix_suite_matches_local_fs() {
    suite_against_mount(Cache::Writeback);
}

#[test]
fn posix_suite_matches_local_fs_direct_io() {
    suite_against_mount(Cache::Direct);
}

#[test]
fn posix_suite_matches_local_fs_writethrough() {
    suite_against_mount(Cache::WriteThrough);
}

#[test]
fn hundred_thousand_entries_in_one_directory() {
    let n: usize = std::env::var("SPOOL_DIR_ENTRIES")
        .ok()
        .map(|v| v.parse().expect("SPOOL_DIR_ENTRIES is a number"))
        .unwrap_or(100_000);
    let mut node = MountedNode::start(&MountOpts::default());
    if let Err(e) = posix::many_entries(&node.mountpoint, n, 8) {
        panic!(
            "{n} entries: {e}\n--- daemon log tail:\n{}",
            log_tail(&node, 8000)
        );
    }
    node.stop();
}

const MIB: u64 = 1 << 20;

/// Free bytes as statvfs reports them (f_blocks etc. count f_frsize units).
fn free_bytes(p: &Path) -> u64 {
    let v = posix::statvfs(p).expect("statvfs");
    let unit = if v.f_frsize > 0 {
        v.f_frsize
    } else {
        v.f_bsize
    };
    v.f_bfree * unit
}

#[test]
fn statfs_reports_real_capacity() {
    let mut node = MountedNode::start(&MountOpts::default());
    let mnt = node.mountpoint.clone();
    posix::statfs_sane(&mnt).unwrap_or_else(|e| panic!("statfs: {e}"));
    let v = posix::statvfs(&mnt).expect("statvfs");
    let unit = if v.f_frsize > 0 {
        v.f_frsize
    } else {
        v.f_bsize
    };
    let total = v.f_blocks * unit;
    // The default node has a 1 GiB device: capacity is that, minus whatever metadata the
    // layout reserves, never more.
    assert!(
        (512 * MIB..=1024 * MIB).contains(&total),
        "statfs says {total} bytes total for a 1 GiB device"
    );

    // Writing 64 MiB of data must show up in the free count once it is durable.
    let free0 = free_bytes(&mnt);
    let f = mnt.join("cap.bin");
    write_file_synced(&f, &posix::pseudo_random(1, 64 << 20))
        .unwrap_or_else(|(step, e)| panic!("64 MiB write: {step}: {e}"));
    let t0 = Instant::now();
    loop {
        let used = free0.saturating_sub(free_bytes(&mnt));
        if used >= 32 * MIB {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "after writing 64 MiB free space dropped by only {used} bytes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And deleting it gives the space back (perhaps after a short delay).
    std::fs::remove_file(&f).expect("unlink");
    let t0 = Instant::now();
    loop {
        let free = free_bytes(&mnt);
        if free + 8 * MIB >= free0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "space not returned after unlink: free {free}, was {free0}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    node.stop();
}

#[test]
fn rename_over_open_metadata_is_atomic_for_readers() {
    let mut node = MountedNode::start(&MountOpts::default());
    let dir = node.mountpoint.join("meta");
    std::fs::create_dir(&dir).expect("mkdir");
    if let Err(e) = posix::rename_readers_never_see_enoent(&dir, 3) {
        panic!("{e}\n--- daemon log tail:\n{}", log_tail(&node, 8000));
    }
    node.stop();
}

/// Writes `data` to a new `p` in 1 MiB writes, then fsync and close; the error names the
/// failing step. A write-back cache may defer ENOSPC to fsync or close, so all three count.
fn write_file_synced(p: &Path, data: &[u8]) -> Result<(), (&'static str, Errno)> {
    let fd: OwnedFd = posix::open(p, libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC, 0o644)
        .map_err(|e| ("open", e))?;
    for chunk in data.chunks(MIB as usize) {
        if let Err(e) = posix::write_all(&fd, chunk) {
            let _ = posix::close(fd);
            return Err(("write", e));
        }
    }
    if let Err(e) = posix::fsync(&fd) {
        let _ = posix::close(fd);
        return Err(("fsync", e));
    }
    posix::close(fd).map_err(|e| ("close", e))
}

/// Reads `p` back and compares length and hash.
fn verify(p: &Path, len: usize, hash: u64) -> Result<(), String> {
    let v = std::fs::read(p).map_err(|e| format!("{}: read: {e}", p.display()))?;
    if v.len() != len || posix::hash64(&v) != hash {
        return Err(format!(
            "{}: {} bytes hash {:016x}, wrote {len} bytes hash {hash:016x}",
            p.display(),
            v.len(),
            posix::hash64(&v)
        ));
    }
    Ok(())
}

#[test]
fn enospc_keeps_serving_and_loses_nothing() {
    const FILE: usize = 8 << 20;
    let mut node = MountedNode::start(&MountOpts {
        device_size: "256MiB",
        chunk_size: "1MiB",
        ..MountOpts::default()
    });
    let root = node.mountpoint.join("fill");
    std::fs::create_dir(&root).expect("mkdir");
    let enospc = Errno(libc::ENOSPC);

    // Fill the device. 64 files is twice its size: a node that never says ENOSPC fails.
    let mut kept: Vec<(PathBuf, u64)> = Vec::new();
    let mut full = None;
    for i in 0..64u64 {
        let p = root.join(format!("f{i:03}"));
        let data = posix::pseudo_random(i, FILE);
        match write_file_synced(&p, &data) {
            Ok(()) => kept.push((p, posix::hash64(&data))),
            Err((step, e)) if e == enospc => {
                full = Some((p, step));
                break;
            }
            Err((step, e)) => panic!(
                "f{i:03}: {step} failed with {e}, expected success or ENOSPC\n{}",
                log_tail(&node, 8000)
            ),
        }
    }
    let (partial, step) = full.expect("512 MiB written to a 256 MiB device without ENOSPC");
    eprintln!(
        "ENOSPC at {} ({step}) after {} full files",
        partial.display(),
        kept.len()
    );
    assert!(
        kept.len() >= 8,
        "only {} x 8 MiB fit on a 256 MiB device",
        kept.len()
    );

    // The daemon still answers its admin socket.
    let st = node.cli(&["status"]);
    assert!(
        st.status.success(),
        "spool status failed when full: {}\n{}",
        String::from_utf8_lossy(&st.stderr),
        log_tail(&node, 8000)
    );

    // Nothing that was acknowledged got lost.
    for (p, h) in &kept {
        verify(p, FILE, *h).unwrap_or_else(|e| panic!("when full: {e}"));
    }

    // Metadata operations still work on a full device.
    let a = root.join("small.a");
    let b = root.join("small.b");
    std::fs::File::create(&a).expect("create small file when full");
    std::fs::rename(&a, &b).expect("rename small file when full");
    std::fs::metadata(&b).expect("stat renamed small file");
    std::fs::remove_file(&b).expect("unlink small file when full");
    std::fs::create_dir(root.join("small.d")).expect("mkdir when full");
    std::fs::remove_dir(root.join("small.d")).expect("rmdir when full");
    // A few data bytes may legitimately not fit; any other error is a bug.
    if let Err((step, e)) = write_file_synced(&root.join("tiny"), b"tiny") {
        assert_eq!(e, enospc, "tiny write when full: {step}: {e}");
    }
    let _ = std::fs::remove_file(root.join("tiny"));

    // Deleting files frees space for new data within a few seconds.
    for (p, _) in kept.drain(..2) {
        std::fs::remove_file(&p).expect("unlink to free space");
    }
    let fresh = root.join("after-free");
    let data = posix::pseudo_random(1000, FILE);
    let t0 = Instant::now();
    loop {
        match write_file_synced(&fresh, &data) {
            Ok(()) => break,
            Err((step, e)) if e == enospc && t0.elapsed() < Duration::from_secs(10) => {
                eprintln!("still ENOSPC at {step} after freeing 16 MiB, retrying");
                let _ = std::fs::remove_file(&fresh);
                std::thread::sleep(Duration::from_millis(250));
            }
            Err((step, e)) => panic!(
                "8 MiB write after freeing 16 MiB: {step}: {e} ({:?} after the unlinks)\n{}",
                t0.elapsed(),
                log_tail(&node, 8000)
            ),
        }
    }
    kept.push((fresh, posix::hash64(&data)));
    for (p, h) in &kept {
        verify(p, FILE, *h).unwrap_or_else(|e| panic!("after freeing: {e}"));
    }

    // Everything survives a clean restart.
    node.stop();
    node.restart();
    for (p, h) in &kept {
        verify(p, FILE, *h).unwrap_or_else(|e| panic!("after restart: {e}"));
    }
    for i in 0..2u64 {
        let gone = root.join(format!("f{i:03}"));
        assert!(!gone.exists(), "{} came back after restart", gone.display());
    }
    node.stop();
}
