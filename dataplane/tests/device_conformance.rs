//! The block-device conformance suite against each backend that runs on this host.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::conformance::run_conformance;
use spool_dataplane::device::mem::MemDevice;
use spool_dataplane::device::uring::{UringDevice, UringOptions};
use spool_dataplane::device::BlockDevice;
use spool_dataplane::Error;
use spool_hugepages::{DmaPool, PagePolicy};
use tempfile::NamedTempFile;

const SIZE: u64 = 64 << 20;
const QUEUE_DEPTH: u32 = 32;

fn pool() -> Arc<DmaPool> {
    DmaPool::new(
        "conformance",
        64 << 10,
        QUEUE_DEPTH as usize + 8,
        PagePolicy::Normal,
    )
    .unwrap()
}

/// A sparse 64 MiB file in /tmp, where O_DIRECT works on this project's machines.
fn temp_file() -> NamedTempFile {
    let f = tempfile::Builder::new()
        .prefix("spool-conformance-")
        .tempfile_in("/tmp")
        .unwrap();
    f.as_file().set_len(SIZE).unwrap();
    f
}

fn opts(sqpoll: bool, iopoll: bool) -> UringOptions {
    UringOptions {
        queue_depth: QUEUE_DEPTH,
        sqpoll,
        iopoll,
    }
}

/// Opens `path` as a `UringDevice` (with the pool registered or not) and runs the suite.
fn run_uring(path: &Path, sqpoll: bool, register: bool) {
    let pool = pool();
    let pools = if register { vec![pool.clone()] } else { vec![] };
    let mut dev = UringDevice::open(path, &opts(sqpoll, false), &pools).unwrap();
    assert_eq!(dev.info().size_bytes, SIZE);
    assert_eq!(dev.info().backend, "uring");
    assert_eq!(dev.registered_buffers(), register);
    assert_eq!(dev.queue_depth_max(), QUEUE_DEPTH as usize);
    run_conformance(&mut dev, &pool);
}

/// The in-memory test device, executing each poll's batch in a shuffled order.
#[test]
fn mem_device_reordering() {
    let pool = pool();
    let mut dev = MemDevice::new(8 << 20, QUEUE_DEPTH as usize).with_reorder(3);
    assert_eq!(dev.info().backend, "mem");
    assert_eq!(dev.queue_depth_max(), QUEUE_DEPTH as usize);
    run_conformance(&mut dev, &pool);
}

#[test]
fn uring_file() {
    run_uring(temp_file().path(), false, true);
}

#[test]
fn uring_file_sqpoll() {
    run_uring(temp_file().path(), true, true);
}

#[test]
fn uring_file_unregistered_buffers() {
    run_uring(temp_file().path(), false, false);
}

/// A loop device attached with `losetup`, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    /// `None` (with the reason printed) only when losetup is not installed.
    fn attach(file: &Path) -> Option<LoopDevice> {
        let out = match Command::new("losetup")
            .args(["--direct-io=on", "-f", "--show"])
            .arg(file)
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("skipping the loop-device test: losetup is not installed ({e})");
                return None;
            }
            Err(e) => panic!("running losetup: {e}"),
        };
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(LoopDevice(PathBuf::from(
            String::from_utf8(out.stdout).unwrap().trim(),
        )))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn uring_loop_device() {
    let (f, pool) = (temp_file(), pool());
    let Some(lo) = LoopDevice::attach(f.path()) else {
        return;
    };
    run_uring(&lo.0, false, true);
    run_uring(&lo.0, true, true);

    // A loop device has no poll queues (io_poll is 0): refused, with the fix.
    let e = UringDevice::open(&lo.0, &opts(false, true), &[pool]).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Unsupported(_)), "{msg}");
    assert!(
        msg.contains("io_poll") && msg.contains("iopoll = false"),
        "{msg}"
    );
}

#[test]
fn uring_iopoll_on_a_regular_file_is_refused() {
    let (f, pool) = (temp_file(), pool());
    let e = UringDevice::open(f.path(), &opts(false, true), &[pool]).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Unsupported(_)), "{msg}");
    assert!(
        msg.contains("not a regular file") && msg.contains("iopoll = false"),
        "{msg}"
    );
    assert!(msg.contains("poll_queues"), "{msg}");
}

#[test]
fn uring_open_errors() {
    let e = UringDevice::open(
        Path::new("/nonexistent/spool-dev"),
        &opts(false, false),
        &[],
    )
    .unwrap_err();
    assert!(matches!(e, Error::Open { .. }), "{e}");
    let f = temp_file();
    let zero = UringOptions {
        queue_depth: 0,
        ..opts(false, false)
    };
    assert!(matches!(
        UringDevice::open(f.path(), &zero, &[]),
        Err(Error::Unsupported(_))
    ));
}
