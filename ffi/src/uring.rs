//! A safe io_uring queue over one file or block device: reads and writes into
//! `DmaBuf`s (through registered "fixed" buffers when the pool is registered) and fsyncs.
//!
//! No allocation per I/O: every in-flight operation sits in a slot of a table sized
//! once to the completion queue, and the slot index is the SQE's `user_data`. Because
//! at most that many operations are in flight, the completion queue never overflows.
//!
//! # Safety
//!
//! The kernel reads or writes an I/O buffer at any time between the push of its SQE and
//! the reaping of its CQE. This wrapper is sound because:
//! - `push_read`/`push_write` take the `DmaBuf` by value and park it in the slot named
//!   by the SQE's `user_data` until `reap` sees that CQE. A `DmaBuf` is the only handle
//!   to its bytes, so nothing else in the process touches them meanwhile, and the
//!   `Arc<DmaPool>` inside it keeps the mapping alive.
//! - The length handed to the kernel is at most the buffer's capacity.
//! - Registered buffers are whole pool regions. `Uring` holds an `Arc` of each
//!   registered pool, and its `ring` field is dropped before its `pools` field, so
//!   registered memory outlives the registration.
//! - `Drop` waits until every in-flight operation has completed before the slot table
//!   (and the buffers in it) goes; if it cannot wait, it leaks the buffers rather than
//!   return memory to the pool that the kernel may still write.
//! - The file belongs to `Uring` and is closed after the ring.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use spool_hugepages::{DmaBuf, DmaPool};

use crate::Error;

/// The kernel refuses to register a single buffer over 1 GiB.
const REG_LEN_MAX: usize = 1 << 30;
/// The kernel's limit on registered buffers per ring (IORING_MAX_REG_BUFFERS).
const REG_COUNT_MAX: usize = 1 << 14;

/// How to set the ring up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UringConfig {
    /// Submission queue entries (the kernel rounds up to a power of two).
    pub entries: u32,
    /// A kernel thread polls the submission queue, so submitting needs no syscall
    /// while it is awake.
    pub sqpoll: bool,
    /// How long the SQPOLL thread spins without work before it sleeps.
    pub sqpoll_idle_ms: u32,
    /// Completions are polled from the device instead of interrupts. Needs a block
    /// device with poll queues; I/O fails with EOPNOTSUPP otherwise.
    pub iopoll: bool,
}

/// One in-flight operation.
/// What `push_fallocate` does to its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallocMode {
    /// The range reads as zeros afterwards.
    ZeroRange,
    /// The range is released (reads as zeros on files; discarded on devices).
    PunchHole,
}

struct Slot {
    tag: u64,
    buf: Option<DmaBuf>,
    busy: bool,
}

/// A registered pool: its region is fixed buffers `first_index..` of `chunk` bytes each.
struct Registration {
    pool_id: u32,
    base: usize,
    len: usize,
    chunk: usize,
    first_index: u16,
}

/// An io_uring over one file, owning the file, the ring and every in-flight buffer.
pub struct Uring {
    // Field order is drop order: the ring goes before the registered pools and the file.
    ring: IoUring,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    regs: Vec<Registration>,
    registration_error: Option<io::Error>,
    pools: Vec<Arc<DmaPool>>,
    file: File,
    iopoll: bool,
}

impl Uring {
    /// Sets up the ring and registers each pool's region as fixed buffers. If the
    /// registration fails (e.g. RLIMIT_MEMLOCK) I/O still works, unregistered: see
    /// `registered_buffers`.
    pub fn new(file: File, cfg: &UringConfig, pools: &[Arc<DmaPool>]) -> Result<Uring, Error> {
        let mut builder = IoUring::builder();
        if cfg.sqpoll {
            builder.setup_sqpoll(cfg.sqpoll_idle_ms);
        }
        if cfg.iopoll {
            builder.setup_iopoll();
        }
        let ring = builder.build(cfg.entries).map_err(|source| Error::Os {
            what: "io_uring_setup",
            source,
        })?;
        // One completion per in-flight operation: this many slots can never overflow
        // the completion queue.
        let capacity = ring.params().cq_entries();
        let mut uring = Uring {
            ring,
            slots: (0..capacity)
                .map(|_| Slot {
                    tag: 0,
                    buf: None,
                    busy: false,
                })
                .collect(),
            free: (0..capacity).rev().collect(),
            regs: Vec::new(),
            registration_error: None,
            pools: Vec::new(),
            file,
            iopoll: cfg.iopoll,
        };
        uring.register(pools);
        Ok(uring)
    }

    fn register(&mut self, pools: &[Arc<DmaPool>]) {
        let mut iovecs: Vec<libc::iovec> = Vec::new();
        for pool in pools {
            if self.regs.iter().any(|r| r.pool_id == pool.id()) {
                continue;
            }
            let region = pool.region();
            let Some(chunk) = chunk_len(region.len, pool.buf_size()) else {
                continue;
            };
            let count = region.len.div_ceil(chunk);
            if iovecs.len() + count > REG_COUNT_MAX {
                continue; // This pool's buffers just go unregistered.
            }
            self.regs.push(Registration {
                pool_id: pool.id(),
                base: region.addr,
                len: region.len,
                chunk,
                first_index: iovecs.len() as u16, // < REG_COUNT_MAX
            });
            for off in (0..region.len).step_by(chunk) {
                iovecs.push(libc::iovec {
                    iov_base: (region.addr + off) as *mut libc::c_void,
                    iov_len: chunk.min(region.len - off),
                });
            }
            self.pools.push(Arc::clone(pool));
        }
        if iovecs.is_empty() {
            return;
        }
        // SAFETY: each iovec lies inside a live pool mapping, and `self.pools` keeps
        // every registered pool alive until after the ring is dropped (field order).
        let registered = unsafe { self.ring.submitter().register_buffers(&iovecs) };
        if let Err(e) = registered {
            self.regs.clear();
            self.pools.clear();
            self.registration_error = Some(e);
        }
    }

    /// Whether pool buffers go through registered (fixed) buffers.
    pub fn registered_buffers(&self) -> bool {
        !self.regs.is_empty()
    }

    /// Why registration failed, if it did.
    pub fn registration_error(&self) -> Option<&io::Error> {
        self.registration_error.as_ref()
    }

    /// Queues a read of `len` bytes at `offset` into `buf`. The buffer comes back in
    /// `reap`, or right away with the error.
    pub fn push_read(
        &mut self,
        tag: u64,
        offset: u64,
        len: u32,
        buf: DmaBuf,
    ) -> Result<(), (Error, DmaBuf)> {
        self.push_rw(Rw::Read, tag, offset, len, buf)
    }

    /// Queues a write of the first `len` bytes of `buf` at `offset`.
    pub fn push_write(
        &mut self,
        tag: u64,
        offset: u64,
        len: u32,
        buf: DmaBuf,
    ) -> Result<(), (Error, DmaBuf)> {
        self.push_rw(Rw::Write, tag, offset, len, buf)
    }

    /// A write that completes only once durable (`RWF_DSYNC`: FUA on a device with a
    /// volatile cache, plus whatever file metadata is needed to read it back).
    pub fn push_write_dsync(
        &mut self,
        tag: u64,
        offset: u64,
        len: u32,
        buf: DmaBuf,
    ) -> Result<(), (Error, DmaBuf)> {
        self.push_rw(Rw::WriteDsync, tag, offset, len, buf)
    }

    fn push_rw(
        &mut self,
        rw: Rw,
        tag: u64,
        offset: u64,
        len: u32,
        mut buf: DmaBuf,
    ) -> Result<(), (Error, DmaBuf)> {
        if len as usize > buf.capacity() {
            return Err((
                Error::BufferTooSmall {
                    len,
                    capacity: buf.capacity(),
                },
                buf,
            ));
        }
        let Some(slot) = self.free.pop() else {
            return Err((
                Error::RingFull {
                    in_flight: self.in_flight(),
                },
                buf,
            ));
        };
        let fd = types::Fd(self.file.as_raw_fd());
        let addr = buf.as_mut_slice().as_mut_ptr();
        let dsync = if rw == Rw::WriteDsync {
            libc::RWF_DSYNC
        } else {
            0
        };
        let entry = match (self.fixed_index(&buf, len), rw) {
            (Some(i), Rw::Read) => opcode::ReadFixed::new(fd, addr, len, i)
                .offset(offset)
                .build(),
            (Some(i), _) => opcode::WriteFixed::new(fd, addr, len, i)
                .offset(offset)
                .rw_flags(dsync)
                .build(),
            (None, Rw::Read) => opcode::Read::new(fd, addr, len).offset(offset).build(),
            (None, _) => opcode::Write::new(fd, addr, len)
                .offset(offset)
                .rw_flags(dsync)
                .build(),
        };
        self.slots[slot as usize] = Slot {
            tag,
            buf: Some(buf),
            busy: true,
        };
        // SAFETY: the entry points at `len` <= capacity bytes of the DmaBuf just parked
        // in slot `slot`, its user_data; it stays there until `reap` sees the CQE.
        if let Err(e) = unsafe { self.push_entry(entry.user_data(u64::from(slot))) } {
            let buf = self
                .release(slot)
                .1
                .expect("a read/write slot holds its buffer");
            return Err((e, buf));
        }
        Ok(())
    }

    /// Queues an fallocate of `len` bytes at `offset` that zeroes the range
    /// (`FALLOC_FL_ZERO_RANGE`) or releases it (`FALLOC_FL_PUNCH_HOLE`), keeping the
    /// size. Both work on regular files of the usual filesystems and on block devices
    /// (where they become write-zeroes and discard).
    pub fn push_fallocate(
        &mut self,
        tag: u64,
        offset: u64,
        len: u64,
        mode: FallocMode,
    ) -> Result<(), Error> {
        let mode = libc::FALLOC_FL_KEEP_SIZE
            | match mode {
                FallocMode::ZeroRange => libc::FALLOC_FL_ZERO_RANGE,
                FallocMode::PunchHole => libc::FALLOC_FL_PUNCH_HOLE,
            };
        let entry = opcode::Fallocate::new(types::Fd(self.file.as_raw_fd()), len)
            .offset(offset)
            .mode(mode)
            .build();
        self.push_without_memory(tag, entry)
    }

    /// Queues an fsync of the whole file (`datasync`: data and the metadata needed to
    /// read it back, like fdatasync).
    pub fn push_fsync(&mut self, tag: u64, datasync: bool) -> Result<(), Error> {
        let flags = if datasync {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let entry = opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
            .flags(flags)
            .build();
        self.push_without_memory(tag, entry)
    }

    /// Queues `entry`, an operation that reads or writes no memory of ours (fsync,
    /// fallocate), under a free slot.
    fn push_without_memory(&mut self, tag: u64, entry: squeue::Entry) -> Result<(), Error> {
        let Some(slot) = self.free.pop() else {
            return Err(Error::RingFull {
                in_flight: self.in_flight(),
            });
        };
        self.slots[slot as usize] = Slot {
            tag,
            buf: None,
            busy: true,
        };
        // SAFETY: the entry touches no memory of ours (the callers build only fsync and
        // fallocate entries), so nothing must outlive it.
        if let Err(e) = unsafe { self.push_entry(entry.user_data(u64::from(slot))) } {
            self.release(slot);
            return Err(e);
        }
        Ok(())
    }

    /// Puts `entry` on the submission queue, first handing queued entries to the
    /// kernel if the queue is full.
    ///
    /// # Safety
    ///
    /// Every buffer `entry` points to must stay valid and unused by anyone else until
    /// its completion is reaped: it must be parked in the slot named by its user_data.
    unsafe fn push_entry(&mut self, entry: squeue::Entry) -> Result<(), Error> {
        // SAFETY: the caller's contract covers the entry's buffers.
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            return Ok(());
        }
        self.submit()?;
        // SAFETY: as above.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        pushed.map_err(|_| Error::RingFull {
            in_flight: self.in_flight(),
        })
    }

    /// Hands queued operations to the kernel. Enters the kernel only when there is
    /// something new, or with SQPOLL only when its thread sleeps (the io-uring crate
    /// checks the wakeup flag). With IOPOLL it also polls for completions.
    pub fn submit(&mut self) -> Result<usize, Error> {
        let queued = self.ring.submission().len();
        if queued == 0 && !(self.iopoll && self.in_flight() > 0) {
            return Ok(0);
        }
        match self.ring.submitter().submit() {
            Ok(n) => Ok(n),
            Err(e) if transient(&e) => Ok(0),
            Err(source) => Err(Error::Os {
                what: "io_uring_enter",
                source,
            }),
        }
    }

    /// Blocks in the kernel until at least one operation completes or `timeout` passes,
    /// submitting anything queued on the way. Returns at once when nothing is in flight
    /// or a completion is already waiting. This is the interrupt-completion mode for
    /// devices without polled queues: a core waits here instead of spinning on the
    /// completion ring (on a VM, a spinning vCPU slows the emulated device it waits
    /// for). Kernels without `IORING_FEAT_EXT_ARG` (before 5.11) sleep for `timeout`.
    pub fn wait(&mut self, timeout: std::time::Duration) -> Result<(), Error> {
        // Polled queues complete only when reaped: never block on them.
        if self.iopoll || self.in_flight() == 0 || !self.ring.completion().is_empty() {
            return Ok(());
        }
        if !self.ring.params().is_feature_ext_arg() {
            self.submit()?;
            std::thread::sleep(timeout);
            return Ok(());
        }
        let ts = io_uring::types::Timespec::from(timeout);
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) if transient(&e) || e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            Err(source) => Err(Error::Os {
                what: "io_uring_enter (wait)",
                source,
            }),
        }
    }

    /// Calls `f(tag, result, buffer)` for every completed operation (`result` is the
    /// byte count, or -errno) and returns how many there were. Never blocks.
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32, Option<DmaBuf>)) -> usize {
        let mut n = 0;
        for cqe in self.ring.completion() {
            let Ok(slot) = u32::try_from(cqe.user_data()) else {
                continue;
            };
            let Some(s) = self.slots.get_mut(slot as usize).filter(|s| s.busy) else {
                debug_assert!(false, "completion for slot {slot} that is not in flight");
                continue;
            };
            s.busy = false;
            let (tag, buf) = (s.tag, s.buf.take());
            self.free.push(slot);
            n += 1;
            f(tag, cqe.result(), buf);
        }
        n
    }

    /// Operations pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The most operations that can be in flight at once.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn release(&mut self, slot: u32) -> (u64, Option<DmaBuf>) {
        let s = &mut self.slots[slot as usize];
        s.busy = false;
        self.free.push(slot);
        (s.tag, s.buf.take())
    }

    /// The fixed-buffer index covering `len` bytes of `buf`, if its pool is registered.
    fn fixed_index(&self, buf: &DmaBuf, len: u32) -> Option<u16> {
        let r = self.regs.iter().find(|r| r.pool_id == buf.pool_id())?;
        let off = buf.addr().checked_sub(r.base)?;
        let i = off / r.chunk;
        let end = off + len as usize;
        // Chunks are whole buffers, so this holds; a miss would only mean unregistered I/O.
        (end <= (i + 1) * r.chunk && end <= r.len).then(|| r.first_index + i as u16)
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // The kernel may still read or write buffers in the slot table: wait for every
        // operation (queued ones get submitted by the same call).
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submitter().submit_and_wait(1) {
                if !transient(&e) {
                    // We cannot know when the kernel is done: leak the buffers so they
                    // are never reused while it may still write into them.
                    for s in self.slots.iter_mut() {
                        std::mem::forget(s.buf.take());
                    }
                    return;
                }
            }
            self.reap(|_, _, _| {});
        }
    }
}

impl fmt::Debug for Uring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Uring")
            .field("file", &self.file)
            .field("capacity", &self.capacity())
            .field("in_flight", &self.in_flight())
            .field("registered_buffers", &self.registered_buffers())
            .field("iopoll", &self.iopoll)
            .finish_non_exhaustive()
    }
}

/// Errors io_uring_enter returns when it just could not make progress right now.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

/// The iovec length to cut a region into: at most 1 GiB, and a multiple of the buffer
/// size so that no buffer (buffers start at multiples of it) straddles two iovecs.
/// `None` when one buffer alone is over the limit.
fn chunk_len(region_len: usize, buf_size: usize) -> Option<usize> {
    if region_len <= REG_LEN_MAX {
        return Some(region_len);
    }
    let chunk = REG_LEN_MAX / buf_size * buf_size;
    (chunk > 0).then_some(chunk)
}

/// What `push_rw` queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rw {
    Read,
    Write,
    WriteDsync,
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use spool_hugepages::PagePolicy;

    use super::*;

    const BUF: usize = 64 << 10;

    /// A file in /tmp (where O_DIRECT works), removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(len: u64) -> (TempFile, File) {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path = PathBuf::from(format!("/tmp/spool-ffi-uring-{}-{n}", std::process::id()));
            File::create(&path).unwrap().set_len(len).unwrap();
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .unwrap();
            (TempFile(path), file)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn cfg(entries: u32, sqpoll: bool) -> UringConfig {
        UringConfig {
            entries,
            sqpoll,
            sqpoll_idle_ms: 10,
            iopoll: false,
        }
    }

    /// Submits and reaps until `n` completions arrived; returns them.
    fn wait(u: &mut Uring, n: usize) -> Vec<(u64, i32, Option<DmaBuf>)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n {
            u.submit().unwrap();
            u.reap(|tag, res, buf| out.push((tag, res, buf)));
            assert!(
                Instant::now() < deadline,
                "timed out with {} of {n} completions",
                out.len()
            );
            std::thread::yield_now();
        }
        out
    }

    fn round_trip(u: &mut Uring, pool: &Arc<DmaPool>) {
        for i in 0..4u64 {
            let mut b = pool.alloc().unwrap();
            b.as_mut_slice().fill(i as u8 + 1);
            u.push_write(i, i * BUF as u64, BUF as u32, b)
                .map_err(|(e, _)| e)
                .unwrap();
        }
        u.push_fsync(99, true).unwrap();
        // The fsync is not ordered after the writes; wait for all five.
        let mut done = wait(u, 5);
        done.sort_by_key(|c| c.0);
        for (i, (tag, res, buf)) in done.iter().enumerate().take(4) {
            assert_eq!((*tag, *res), (i as u64, BUF as i32));
            assert!(buf.is_some());
        }
        assert_eq!((done[4].0, done[4].1), (99, 0));
        assert!(done[4].2.is_none());
        drop(done);
        for i in 0..4u64 {
            let mut b = pool.alloc().unwrap();
            b.as_mut_slice().fill(0xee);
            u.push_read(10 + i, i * BUF as u64, BUF as u32, b)
                .map_err(|(e, _)| e)
                .unwrap();
        }
        for (tag, res, buf) in wait(u, 4) {
            assert_eq!(res, BUF as i32);
            let want = (tag - 10) as u8 + 1;
            assert!(
                buf.unwrap().as_slice().iter().all(|&x| x == want),
                "tag {tag}"
            );
        }
        assert_eq!(u.in_flight(), 0);
    }

    #[test]
    fn registered_round_trip() {
        let pool = DmaPool::new("t", BUF, 8, PagePolicy::Normal).unwrap();
        let (_t, file) = TempFile::new(1 << 20);
        let mut u = Uring::new(file, &cfg(8, false), &[pool.clone(), pool.clone()]).unwrap();
        assert!(u.registered_buffers(), "{:?}", u.registration_error());
        assert_eq!(u.capacity(), 16);
        let b = pool.alloc().unwrap();
        assert!(u.fixed_index(&b, BUF as u32).is_some());
        drop(b);
        round_trip(&mut u, &pool);
    }

    #[test]
    fn sqpoll_round_trip() {
        let pool = DmaPool::new("t", BUF, 8, PagePolicy::Normal).unwrap();
        let (_t, file) = TempFile::new(1 << 20);
        let mut u = Uring::new(file, &cfg(8, true), std::slice::from_ref(&pool)).unwrap();
        round_trip(&mut u, &pool);
    }

    #[test]
    fn unregistered_round_trip() {
        let pool = DmaPool::new("t", BUF, 8, PagePolicy::Normal).unwrap();
        let other = DmaPool::new("other", BUF, 1, PagePolicy::Normal).unwrap();
        let (_t, file) = TempFile::new(1 << 20);
        // Registered pool `other`, I/O from `pool`: plain reads and writes.
        let mut u = Uring::new(file, &cfg(8, false), &[other]).unwrap();
        assert!(u.registered_buffers());
        round_trip(&mut u, &pool);
        let (_t, file) = TempFile::new(1 << 20);
        let mut u = Uring::new(file, &cfg(8, false), &[]).unwrap();
        assert!(!u.registered_buffers());
        round_trip(&mut u, &pool);
    }

    #[test]
    fn refusals_hand_the_buffer_back() {
        let pool = DmaPool::new("t", 4096, 4, PagePolicy::Normal).unwrap();
        let (_t, file) = TempFile::new(1 << 20);
        let mut u = Uring::new(file, &cfg(1, false), std::slice::from_ref(&pool)).unwrap();
        let b = pool.alloc().unwrap();
        let addr = b.addr();
        let (e, b) = u.push_read(1, 0, 8192, b).unwrap_err();
        assert!(matches!(
            e,
            Error::BufferTooSmall {
                len: 8192,
                capacity: 4096
            }
        ));
        assert_eq!(b.addr(), addr);
        assert_eq!(u.in_flight(), 0);
        // One SQ entry, two slots: the second push submits the first to make room.
        u.push_read(1, 0, 4096, b).map_err(|(e, _)| e).unwrap();
        u.push_read(2, 4096, 4096, pool.alloc().unwrap())
            .map_err(|(e, _)| e)
            .unwrap();
        let (e, _b) = u.push_read(3, 0, 4096, pool.alloc().unwrap()).unwrap_err();
        assert!(matches!(e, Error::RingFull { in_flight: 2 }));
        assert!(matches!(
            u.push_fsync(4, false),
            Err(Error::RingFull { .. })
        ));
        assert_eq!(wait(&mut u, 2).len(), 2);
    }

    #[test]
    fn drop_with_io_in_flight_returns_buffers() {
        let pool = DmaPool::new("t", BUF, 32, PagePolicy::Normal).unwrap();
        let (_t, file) = TempFile::new(4 << 20);
        let mut u = Uring::new(file, &cfg(16, false), std::slice::from_ref(&pool)).unwrap();
        for i in 0..32u64 {
            u.push_read(i, i * BUF as u64, BUF as u32, pool.alloc().unwrap())
                .map_err(|(e, _)| e)
                .unwrap();
        }
        assert_eq!(u.in_flight(), 32);
        drop(u);
        assert_eq!(pool.available(), 32);
    }

    #[test]
    fn chunks_never_split_a_buffer() {
        assert_eq!(chunk_len(4 << 20, 4096), Some(4 << 20));
        assert_eq!(chunk_len(3 << 30, 1 << 20), Some(1 << 30));
        let odd = 3 * 4096;
        let c = chunk_len(2 << 30, odd).unwrap();
        assert!(c <= 1 << 30 && c % odd == 0 && c + odd > 1 << 30);
        assert_eq!(chunk_len(4 << 30, 2 << 30), None);
    }
}
