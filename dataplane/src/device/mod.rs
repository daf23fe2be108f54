//! Block devices: one non-blocking trait, several backends.
//!
//! A device takes requests with `submit` (queued, not yet issued) and issues and reaps
//! them in `poll`, which is called from the owning core's loop. Buffers travel with the
//! request and come back with the completion, so a buffer is never touched by anyone
//! else while the device may be doing DMA into it.

pub mod mem;
pub mod nvme;
pub mod uring;

use spool_hugepages::DmaBuf;

use crate::Error;

/// What the I/O does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    /// A write that completes only once it is durable (FUA on NVMe, RWF_DSYNC on a
    /// file): no flush needed after it.
    WriteDurable,
    /// Make every write completed before this flush was submitted durable.
    Flush,
    /// Make the range read as zeros (NVMe Write Zeroes; fallocate ZERO_RANGE). Takes
    /// no buffer (one given comes back). Durable like a plain write: after a flush.
    WriteZeroes,
    /// The range's contents are no longer needed (NVMe deallocate, i.e. TRIM; fallocate
    /// PUNCH_HOLE): afterwards each block reads back as zeros or as its old bytes. Takes
    /// no buffer (one given comes back).
    Deallocate,
}

impl IoKind {
    /// Whether the request carries data in its buffer.
    pub fn has_data(self) -> bool {
        matches!(self, IoKind::Read | IoKind::Write | IoKind::WriteDurable)
    }
}

/// One device request. `offset` and `len` are multiples of the device's block size;
/// `buf` is present for reads and writes and its capacity is at least `len`.
#[derive(Debug)]
pub struct IoRequest {
    /// Opaque to the device; returned in the completion.
    pub tag: u64,
    pub kind: IoKind,
    pub offset: u64,
    pub len: u32,
    pub buf: Option<DmaBuf>,
}

impl IoRequest {
    /// A flush: makes every write completed before it durable.
    pub fn flush(tag: u64) -> Self {
        IoRequest {
            tag,
            kind: IoKind::Flush,
            offset: 0,
            len: 0,
            buf: None,
        }
    }
}

/// The outcome of one request, with its buffer handed back.
#[derive(Debug)]
pub struct IoCompletion {
    pub tag: u64,
    pub result: Result<(), Error>,
    pub buf: Option<DmaBuf>,
}

/// Static facts about an open device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Usable bytes.
    pub size_bytes: u64,
    /// Offsets and lengths must be multiples of this.
    pub block_size: u32,
    /// Backend name: "uring", "mem", "nvme".
    pub backend: &'static str,
    /// Path, PCI address or a test label.
    pub name: String,
}

/// A non-blocking block device owned by one dataplane core.
pub trait BlockDevice: Send + std::fmt::Debug {
    fn info(&self) -> &DeviceInfo;

    /// How many requests may be outstanding (submitted and not yet completed).
    fn queue_depth_max(&self) -> usize;

    /// Requests currently outstanding.
    fn in_flight(&self) -> usize;

    /// Queues a request. It is issued at the next `poll`. Fails with the request handed
    /// back when `queue_depth_max` requests are already outstanding, or with an error
    /// completion-free rejection when the request is malformed (see `validate`).
    fn submit(&mut self, req: IoRequest) -> Result<(), (Error, IoRequest)>;

    /// Issues queued requests and appends finished ones to `done` (which the caller
    /// keeps with capacity for `queue_depth_max` entries, so this never allocates).
    /// Returns how many completions were appended. Never blocks.
    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize;

    /// Waits up to `timeout` for a completion when requests are in flight, so a core
    /// with nothing else to do need not spin (interrupt-completion mode). Devices
    /// whose completions must be polled return at once.
    fn wait(&mut self, timeout: std::time::Duration) {
        let _ = timeout;
    }
}

/// Checks the rules every backend enforces, so a bad request is an error and never
/// reaches the hardware.
pub fn validate(info: &DeviceInfo, req: &IoRequest) -> Result<(), Error> {
    let bs = u64::from(info.block_size);
    if req.kind == IoKind::Flush {
        return Ok(());
    }
    if req.kind.has_data() {
        let Some(buf) = req.buf.as_ref() else {
            return Err(Error::BadRequest("read/write without a buffer".into()));
        };
        if req.len as usize > buf.capacity() {
            return Err(Error::BadRequest(format!(
                "len {} exceeds buffer capacity {}",
                req.len,
                buf.capacity()
            )));
        }
    }
    if req.len == 0 || u64::from(req.len) % bs != 0 || req.offset % bs != 0 {
        return Err(Error::BadRequest(format!(
            "offset {} len {} not multiples of block size {}",
            req.offset, req.len, bs
        )));
    }
    let end = req.offset.checked_add(u64::from(req.len));
    if end.is_none_or(|e| e > info.size_bytes) {
        return Err(Error::BadRequest(format!(
            "range {}+{} beyond device size {}",
            req.offset, req.len, info.size_bytes
        )));
    }
    Ok(())
}

/// Runs one request to completion on a device, spinning on `poll`. For start-up,
/// format and tools only, never for the hot path.
pub fn run_sync(dev: &mut dyn BlockDevice, req: IoRequest) -> (Result<(), Error>, Option<DmaBuf>) {
    let tag = req.tag;
    if let Err((e, req)) = dev.submit(req) {
        return (Err(e), req.buf);
    }
    let mut done = Vec::with_capacity(dev.queue_depth_max());
    loop {
        dev.poll(&mut done);
        if let Some(pos) = done.iter().position(|c| c.tag == tag) {
            let c = done.swap_remove(pos);
            assert!(done.is_empty(), "run_sync needs an otherwise idle device");
            return (c.result, c.buf);
        }
        std::thread::yield_now();
    }
}
