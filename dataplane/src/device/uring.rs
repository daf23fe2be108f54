//! The `uring` block device: io_uring with O_DIRECT on a regular file or a block
//! device, with the DMA pools registered as fixed buffers when the kernel allows.

use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use spool_ffi::blkdev;
use spool_ffi::uring::{FallocMode, Uring, UringConfig};
use spool_hugepages::{DmaBuf, DmaPool};

use super::{validate, BlockDevice, DeviceInfo, IoCompletion, IoKind, IoRequest};
use crate::Error;

/// Offsets and lengths are multiples of this, whatever the device's own sector size.
const BLOCK_SIZE: u32 = 4096;
/// How long the SQPOLL kernel thread keeps spinning after the last submission.
const SQPOLL_IDLE_MS: u32 = 50;

/// How to open a `UringDevice`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UringOptions {
    /// The most requests in flight at once.
    pub queue_depth: u32,
    /// Let a kernel thread poll the submission queue (no syscall per submit).
    pub sqpoll: bool,
    /// Poll the device for completions; needs an NVMe device with poll queues.
    /// The kernel refuses fsync on such a ring, so a flush then fails with EINVAL: a
    /// flush path for IOPOLL (e.g. a second, interrupt-driven ring) is not built yet.
    pub iopoll: bool,
}

/// What the device remembers about one in-flight request (the ring only keeps a tag
/// and a read/write buffer).
#[derive(Debug, Default)]
struct Op {
    tag: u64,
    /// Bytes a successful read or write transfers; 0 for a flush.
    len: u32,
    /// A buffer that came with a flush, returned with its completion.
    flush_buf: Option<DmaBuf>,
}

/// A `BlockDevice` over io_uring.
#[derive(Debug)]
pub struct UringDevice {
    info: DeviceInfo,
    ring: Uring,
    /// Indexed by the tag given to the ring; `free` holds the unused indices.
    ops: Box<[Op]>,
    free: Vec<u32>,
    /// Set once a failed io_uring_enter was logged, so a stuck ring logs only once.
    submit_error_logged: bool,
}

impl UringDevice {
    /// Opens `path` (a regular file or a block device) for O_DIRECT I/O and registers
    /// `pools` with the ring.
    pub fn open(path: &Path, opts: &UringOptions, pools: &[Arc<DmaPool>]) -> Result<Self, Error> {
        let name = path.display().to_string();
        let open_err = |source| Error::Open {
            path: name.clone(),
            source,
        };
        if opts.queue_depth == 0 {
            return Err(Error::Unsupported(format!(
                "{name}: uring queue_depth must be at least 1"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(blkdev::O_DIRECT)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let size = device_size(&name, &file, &meta)?;
        if opts.iopoll {
            check_iopoll(&name, &meta)?;
        }
        let cfg = UringConfig {
            entries: opts.queue_depth,
            sqpoll: opts.sqpoll,
            sqpoll_idle_ms: SQPOLL_IDLE_MS,
            iopoll: opts.iopoll,
        };
        let ring = Uring::new(file, &cfg, pools)?;
        if let Some(e) = ring.registration_error() {
            tracing::warn!(device = %name, error = %e, "io_uring buffer registration failed: using unregistered I/O");
        }
        let depth = opts.queue_depth.min(ring.capacity() as u32);
        Ok(UringDevice {
            info: DeviceInfo {
                size_bytes: size - size % u64::from(BLOCK_SIZE),
                block_size: BLOCK_SIZE,
                backend: "uring",
                name,
            },
            ring,
            ops: (0..depth).map(|_| Op::default()).collect(),
            free: (0..depth).rev().collect(),
            submit_error_logged: false,
        })
    }

    /// Whether pool buffers go through io_uring registered buffers.
    pub fn registered_buffers(&self) -> bool {
        self.ring.registered_buffers()
    }
}

impl BlockDevice for UringDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn queue_depth_max(&self) -> usize {
        self.ops.len()
    }

    fn in_flight(&self) -> usize {
        self.ops.len() - self.free.len()
    }

    fn submit(&mut self, mut req: IoRequest) -> Result<(), (Error, IoRequest)> {
        if let Err(e) = validate(&self.info, &req) {
            return Err((e, req));
        }
        let Some(index) = self.free.pop() else {
            return Err((Error::Busy, req));
        };
        let tag = u64::from(index);
        let pushed = match (req.kind, req.buf.take()) {
            // A flush needs no buffer, but one given comes back with the completion.
            (IoKind::Flush, buf) => {
                self.ops[index as usize] = Op {
                    tag: req.tag,
                    len: 0,
                    flush_buf: buf,
                };
                self.ring.push_fsync(tag, true).map_err(|e| {
                    req.buf = self.ops[index as usize].flush_buf.take();
                    Error::from(e)
                })
            }
            // Zeroing and deallocating are fallocate calls; a buffer given comes back.
            (kind @ (IoKind::WriteZeroes | IoKind::Deallocate), buf) => {
                self.ops[index as usize] = Op {
                    tag: req.tag,
                    len: 0,
                    flush_buf: buf,
                };
                let mode = if kind == IoKind::WriteZeroes {
                    FallocMode::ZeroRange
                } else {
                    FallocMode::PunchHole
                };
                self.ring
                    .push_fallocate(tag, req.offset, u64::from(req.len), mode)
                    .map_err(|e| {
                        req.buf = self.ops[index as usize].flush_buf.take();
                        Error::from(e)
                    })
            }
            (kind, Some(buf)) => {
                self.ops[index as usize] = Op {
                    tag: req.tag,
                    len: req.len,
                    flush_buf: None,
                };
                let pushed = match kind {
                    IoKind::Read => self.ring.push_read(tag, req.offset, req.len, buf),
                    IoKind::WriteDurable => {
                        self.ring.push_write_dsync(tag, req.offset, req.len, buf)
                    }
                    _ => self.ring.push_write(tag, req.offset, req.len, buf),
                };
                pushed.map_err(|(e, buf)| {
                    req.buf = Some(buf);
                    Error::from(e)
                })
            }
            // validate() already refused this.
            (_, None) => Err(Error::BadRequest("read/write without a buffer".into())),
        };
        if let Err(e) = pushed {
            self.free.push(index);
            return Err((e, req));
        }
        Ok(())
    }

    fn wait(&mut self, timeout: std::time::Duration) {
        if let Err(e) = self.ring.wait(timeout) {
            if !self.submit_error_logged {
                self.submit_error_logged = true;
                tracing::error!(device = %self.info.name, error = %e, "io_uring wait failed");
            }
        }
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        if let Err(e) = self.ring.submit() {
            // Queued requests stay queued and are retried at the next poll.
            if !self.submit_error_logged {
                self.submit_error_logged = true;
                tracing::error!(device = %self.info.name, error = %e, "io_uring submit failed");
            }
        }
        let (ops, free) = (&mut self.ops, &mut self.free);
        self.ring.reap(|index, res, buf| {
            let op = &mut ops[index as usize];
            free.push(index as u32);
            let result = match u32::try_from(res) {
                Err(_) => Err(Error::Io { errno: -res }),
                Ok(n) if n != op.len => Err(Error::ShortIo {
                    expected: op.len,
                    done: n,
                }),
                Ok(_) => Ok(()),
            };
            done.push(IoCompletion {
                tag: op.tag,
                result,
                buf: buf.or_else(|| op.flush_buf.take()),
            });
        })
    }
}

/// Usable bytes of a regular file or block device, checking that 4 KiB I/O suits it.
fn device_size(name: &str, file: &File, meta: &Metadata) -> Result<u64, Error> {
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(meta.len());
    }
    if !ft.is_block_device() {
        return Err(Error::Unsupported(format!(
            "{name}: not a regular file or a block device"
        )));
    }
    let lbs = blkdev::logical_block_size(file)?;
    if lbs == 0 || BLOCK_SIZE % lbs != 0 {
        return Err(Error::Unsupported(format!(
            "{name}: logical block size {lbs} does not divide Spool's {BLOCK_SIZE}-byte blocks"
        )));
    }
    Ok(blkdev::block_device_size(file)?)
}

/// IOPOLL only works on a block device whose driver has poll queues; anything else
/// fails every I/O with EOPNOTSUPP, so refuse it up front.
fn check_iopoll(name: &str, meta: &Metadata) -> Result<(), Error> {
    const FIX: &str = "set iopoll = false, or use an NVMe device with poll queues \
                       (load the nvme driver with poll_queues=N, e.g. nvme.poll_queues=2 \
                       on the kernel command line)";
    if !meta.file_type().is_block_device() {
        return Err(Error::Unsupported(format!(
            "{name}: iopoll needs a block device with poll queues, not a regular file; {FIX}"
        )));
    }
    let io_poll = io_poll_path(meta.rdev());
    let value = io_poll
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned());
    if value.as_deref() != Some("1") {
        let shown =
            io_poll.map_or_else(|| "its sysfs queue".to_owned(), |p| p.display().to_string());
        return Err(Error::Unsupported(format!(
            "{name}: iopoll requested but {shown} is {} (the device has no poll queues); {FIX}",
            value.as_deref().unwrap_or("unreadable")
        )));
    }
    Ok(())
}

/// `/sys/block/<disk>/queue/io_poll` for a block device number; a partition maps to
/// its whole disk, which is where the queue lives.
fn io_poll_path(rdev: u64) -> Option<PathBuf> {
    let (major, minor) = blkdev::dev_major_minor(rdev);
    let dev = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    let disk = if dev.join("partition").exists() {
        dev.parent()?
    } else {
        &dev
    };
    Some(
        Path::new("/sys/block")
            .join(disk.file_name()?)
            .join("queue/io_poll"),
    )
}
