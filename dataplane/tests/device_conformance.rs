//! The block-device conformance suite against every backend: `mem` and `uring` here,
//! `nvme` (Spool's userspace NVMe driver over VFIO) in the VM lab. This host has no NVMe
//! and no IOMMU, so each nvme test boots the guest (deploy/vmlab) with an emulated NVMe
//! controller behind a virtual IOMMU and runs itself there; they are part of CI.

mod common;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::conformance::{fill, has_pattern, one, req, run_conformance};
use common::vmlab::{in_guest, run_in_guest};
use spool_dataplane::device::mem::MemDevice;
use spool_dataplane::device::nvme::{pci, NvmeController, NvmeOptions};
use spool_dataplane::device::uring::{UringDevice, UringOptions};
use spool_dataplane::device::{BlockDevice, IoKind, IoRequest};
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

// ---- nvme, in the VM lab ----

const DISK_MIB: u32 = 256;

fn bind(address: &str) {
    let listed = pci::list().unwrap();
    let f = listed
        .iter()
        .find(|f| f.address == address)
        .unwrap_or_else(|| panic!("{address} not in {listed:?}"));
    assert_eq!(f.driver, "", "the lab's controller starts unbound");
    assert!(
        f.iommu_group.is_some(),
        "the virtual IOMMU gives it a group"
    );
    let f = pci::bind_vfio(address).unwrap();
    assert_eq!(f.driver, "vfio-pci");
    assert_eq!(
        pci::bind_vfio(address).unwrap(),
        f,
        "binding twice is a no-op"
    );
}

fn nvme_opts(queue_depth: u32) -> NvmeOptions {
    NvmeOptions {
        queue_depth,
        ..NvmeOptions::default()
    }
}

#[test]
fn nvme_passes_the_block_device_conformance_suite_on_every_queue() {
    let Some(address) = in_guest() else {
        return run_in_guest(
            "nvme_passes_the_block_device_conformance_suite_on_every_queue",
            DISK_MIB,
        );
    };
    bind(&address);
    let pool = DmaPool::new("conformance", 64 << 10, 48, PagePolicy::PreferHuge).unwrap();
    let mut queues =
        NvmeController::open(&address, 2, &nvme_opts(32), std::slice::from_ref(&pool)).unwrap();
    assert_eq!(queues.len(), 2);
    let facts = queues[0].controller().facts().clone();
    println!("controller: {facts:?}");
    assert_eq!(facts.serial, "spool-vmlab");
    assert_eq!(queues[0].info().backend, "nvme");
    assert_eq!(queues[0].info().size_bytes, u64::from(DISK_MIB) << 20);
    assert_eq!(queues[0].queue_depth_max(), 32);
    assert_ne!(queues[0].queue_id(), queues[1].queue_id());
    for q in &mut queues {
        run_conformance(q, &pool);
        assert_eq!(q.stray_completions(), 0);
    }

    // The two queues at once, from two threads, as two dataplane cores use them: each
    // writes and reads back its own half.
    let half = u64::from(DISK_MIB) << 19;
    std::thread::scope(|s| {
        for (i, q) in queues.iter_mut().enumerate() {
            let pool = pool.clone();
            s.spawn(move || {
                for n in 0..64u64 {
                    let (seed, offset) =
                        (1000 * (i as u64 + 1) + n, i as u64 * half + n * (64 << 10));
                    let mut w = pool.alloc().unwrap();
                    fill(seed, w.as_mut_slice());
                    one(q, req(seed, IoKind::Write, offset, 64 << 10, Some(w)))
                        .result
                        .unwrap();
                    let c = one(q, req(seed, IoKind::Read, offset, 64 << 10, pool.alloc()));
                    c.result.unwrap();
                    assert!(
                        has_pattern(seed, c.buf.unwrap().as_slice()),
                        "queue {i} read {n}"
                    );
                }
            });
        }
    });

    // A pool not given at open is mapped at its first use, and works from then on.
    let other = DmaPool::new("other", 8192, 2, PagePolicy::Normal).unwrap();
    let mut w = other.alloc().unwrap();
    fill(4242, w.as_mut_slice());
    one(&mut queues[0], req(1, IoKind::Write, 8192, 8192, Some(w)))
        .result
        .unwrap();
    let c = one(
        &mut queues[1],
        req(2, IoKind::Read, 8192, 8192, other.alloc()),
    );
    c.result.unwrap();
    assert!(
        has_pattern(4242, c.buf.unwrap().as_slice()),
        "read through the other queue"
    );
}

/// A request bigger than the controller's largest transfer is split into several
/// commands; what Spool's driver wrote survives a clean close and a reopen, and the
/// kernel's own nvme driver reads the same bytes back.
#[test]
fn nvme_large_requests_survive_reopen_and_read_back_through_the_kernel_driver() {
    let Some(address) = in_guest() else {
        return run_in_guest(
            "nvme_large_requests_survive_reopen_and_read_back_through_the_kernel_driver",
            DISK_MIB,
        );
    };
    bind(&address);
    const BIG: usize = 4 << 20;
    let pool = DmaPool::new("big", BIG, 8, PagePolicy::PreferHuge).unwrap();
    let offsets = [0u64, 12 << 20, (u64::from(DISK_MIB) << 20) - BIG as u64];
    {
        let mut q = NvmeController::open(&address, 1, &nvme_opts(4), std::slice::from_ref(&pool))
            .unwrap()
            .remove(0);
        let facts = q.controller().facts().clone();
        assert!(
            (facts.command_bytes_max as usize) < BIG,
            "the test must split: {facts:?}"
        );
        for (i, &off) in offsets.iter().enumerate() {
            let mut w = pool.alloc().unwrap();
            fill(7 + i as u64, w.as_mut_slice());
            one(
                &mut q,
                req(i as u64, IoKind::WriteDurable, off, BIG as u32, Some(w)),
            )
            .result
            .unwrap();
        }
        one(&mut q, IoRequest::flush(99)).result.unwrap();
    } // controller shut down and released here
    {
        // Reopened with 8-entry queues (7 command ids): the three reads at once need 24
        // commands, so most wait for ids freed by earlier completions.
        let small = NvmeOptions {
            queue_entries: 8,
            ..nvme_opts(4)
        };
        let mut q = NvmeController::open(&address, 1, &small, std::slice::from_ref(&pool))
            .unwrap()
            .remove(0);
        for (i, &off) in offsets.iter().enumerate() {
            let r = req(i as u64, IoKind::Read, off, BIG as u32, pool.alloc());
            q.submit(r)
                .unwrap_or_else(|(e, _)| panic!("submit read {i}: {e}"));
        }
        let mut done = Vec::with_capacity(q.queue_depth_max());
        let t0 = std::time::Instant::now();
        while done.len() < offsets.len() {
            q.poll(&mut done);
            assert!(t0.elapsed().as_secs() < 60, "reads did not complete");
        }
        for c in done {
            let i = c.tag as usize;
            c.result.unwrap();
            assert!(
                has_pattern(7 + i as u64, c.buf.unwrap().as_slice()),
                "reopened read {i}"
            );
        }
        assert_eq!(q.stray_completions(), 0);
    }

    // Back to the kernel: unbind from vfio-pci, load nvme, read the block device.
    let f = pci::unbind_vfio(&address).unwrap();
    assert_eq!(f.driver, "", "no kernel driver is loaded yet");
    let st = Command::new("modprobe")
        .args(["-d", "/tmp/vmlab-root", "nvme"])
        .status()
        .unwrap();
    assert!(st.success(), "modprobe nvme");
    let dev = wait_for_block_device(&address);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_direct())
        .open(&dev)
        .unwrap();
    let aligned = DmaPool::new("kernel-read", BIG, 1, PagePolicy::Normal).unwrap();
    let mut b = aligned.alloc().unwrap();
    for (i, &off) in offsets.iter().enumerate() {
        file.read_exact_at(b.as_mut_slice(), off).unwrap();
        assert!(
            has_pattern(7 + i as u64, b.as_slice()),
            "kernel driver read {i} at {off}"
        );
    }
    println!(
        "the kernel's nvme driver read back {} x 4 MiB written by Spool's driver",
        offsets.len()
    );
}

fn libc_o_direct() -> i32 {
    spool_ffi::blkdev::O_DIRECT
}

fn wait_for_block_device(address: &str) -> std::path::PathBuf {
    for _ in 0..200 {
        let f = pci::list()
            .unwrap()
            .into_iter()
            .find(|f| f.address == address)
            .unwrap();
        if let Some(b) = f.block_devices.first() {
            let p = std::path::Path::new("/dev").join(b);
            if p.exists() {
                return p;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the kernel's nvme driver did not create a block device for {address}");
}

/// A controller that fails (here: a queue closed with requests in flight, which must
/// stop the device before those buffers go back to their pool) fails every request in
/// flight on every queue with the reason, hands every buffer back, refuses new
/// requests, and a reopen brings the device back.
#[test]
fn nvme_a_failed_controller_fails_every_request_and_refuses_more() {
    let Some(address) = in_guest() else {
        return run_in_guest(
            "nvme_a_failed_controller_fails_every_request_and_refuses_more",
            DISK_MIB,
        );
    };
    bind(&address);
    let pool = DmaPool::new("fail", 64 << 10, 16, PagePolicy::PreferHuge).unwrap();
    let mut queues =
        NvmeController::open(&address, 2, &nvme_opts(8), std::slice::from_ref(&pool)).unwrap();
    let mut q1 = queues.pop().unwrap();
    let mut q0 = queues.pop().unwrap();
    for i in 0..4u64 {
        q0.submit(req(
            i,
            IoKind::Write,
            i * (64 << 10),
            64 << 10,
            pool.alloc(),
        ))
        .unwrap_or_else(|(e, _)| panic!("{e}"));
        q1.submit(req(
            10 + i,
            IoKind::Read,
            i * (64 << 10),
            64 << 10,
            pool.alloc(),
        ))
        .unwrap_or_else(|(e, _)| panic!("{e}"));
    }
    // q1's requests are queued, not yet completed: closing it must stop the device
    // before their buffers go back to the pool, which fails the controller.
    assert_eq!(q1.in_flight(), 4);
    drop(q1);
    let reason = q0.controller().failure().expect("the controller failed");
    assert!(
        reason.contains("closed with 4 request(s) in flight"),
        "{reason}"
    );
    let mut done = Vec::with_capacity(8);
    let t0 = std::time::Instant::now();
    while done.len() < 4 {
        q0.poll(&mut done);
        assert!(
            t0.elapsed().as_secs() < 10,
            "failed requests never completed"
        );
    }
    assert_eq!(done.len(), 4);
    for c in done.drain(..) {
        let e = c.result.expect_err("a failed controller fails the request");
        assert!(e.to_string().contains("closed with"), "{e}");
        assert!(c.buf.is_some(), "the buffer comes back");
    }
    assert_eq!(q0.in_flight(), 0);
    let (e, back) = q0
        .submit(req(99, IoKind::Read, 0, 4096, pool.alloc()))
        .expect_err("a failed controller takes no requests");
    assert!(e.to_string().contains("controller failed"), "{e}");
    drop(back);
    drop(q0);
    assert_eq!(
        pool.available(),
        pool.count(),
        "every buffer is back in the pool"
    );

    let mut q = NvmeController::open(&address, 1, &nvme_opts(8), std::slice::from_ref(&pool))
        .unwrap()
        .remove(0);
    one(&mut q, req(1, IoKind::Read, 0, 64 << 10, pool.alloc()))
        .result
        .unwrap();
}
