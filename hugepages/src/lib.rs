//! DMA buffer pool for the dataplane.
//!
//! One region is mapped once at start: from 2 MiB hugepages (`MAP_HUGETLB`) when the
//! kernel has them reserved, otherwise from ordinary anonymous pages (said once, with
//! `tracing::warn!`). The region is `mlock`ed (best effort) so it never pages out and its
//! physical addresses stay put for registration (io_uring fixed buffers now, VFIO IOVAs
//! and RDMA memory regions later).
//!
//! The region is cut into `count` buffers of `buf_size` bytes. `DmaPool::alloc` pops a
//! free index from a lock-free bounded queue and `DmaBuf`'s `Drop` pushes it back: no
//! heap allocation and no lock on the hot path.
//!
//! Ownership rule encoded in types: a `DmaBuf` is the only handle to its bytes (not
//! `Clone`), so whoever holds it (a client, a device queue while the I/O is in flight)
//! has exclusive access. A device that hands the address to hardware keeps the `DmaBuf`
//! until the completion, which is what makes the DMA sound.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Bytes covered by one sidecar checksum.
pub const SIDECAR_BLOCK: usize = 4096;
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

/// 2 MiB, the x86_64 default hugepage size.
pub const HUGEPAGE_SIZE: usize = 2 << 20;
/// Every buffer is aligned to at least this (O_DIRECT and NVMe PRP need 4 KiB).
pub const BUF_ALIGN: usize = 4096;

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "dma pool '{name}': buffer size {buf_size} must be a non-zero multiple of {BUF_ALIGN}"
    )]
    BadBufSize { name: String, buf_size: usize },
    #[error("dma pool '{name}': buffer count {count} must be between 1 and {max}")]
    BadCount {
        name: String,
        count: usize,
        max: usize,
    },
    #[error("dma pool '{name}': mmap of {len} bytes failed: {source}")]
    Map {
        name: String,
        len: usize,
        source: std::io::Error,
    },
    #[error("dma pool '{name}': hugepages required but unavailable ({source}); reserve them with `echo N > /proc/sys/vm/nr_hugepages`")]
    HugepagesRequired {
        name: String,
        source: std::io::Error,
    },
}

/// Where the pool's memory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagePolicy {
    /// Hugepages if reserved, else ordinary pages (warned once per process).
    PreferHuge,
    /// Hugepages or fail.
    RequireHuge,
    /// Ordinary pages (large metadata buffers that are not worth hugepages).
    Normal,
}

/// The mapped region of a pool, for registration with a device or NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub addr: usize,
    pub len: usize,
}

static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);
static NEXT_POOL_ID: AtomicU32 = AtomicU32::new(1);

/// The largest number of buffers in one pool (indices are u32 and the free queue is
/// allocated up front).
pub const POOL_COUNT_MAX: usize = 1 << 20;

/// A fixed set of equally sized, aligned, pinned buffers.
#[derive(Debug)]
pub struct DmaPool {
    name: String,
    id: u32,
    base: NonNull<u8>,
    map_len: usize,
    buf_size: usize,
    count: usize,
    huge: bool,
    free: ArrayQueue<u32>,
    /// One checksum per 4 KiB block of every buffer (`buf_size / 4096` per buffer), so
    /// whoever fills a buffer can checksum it on its own thread and hand the result to
    /// the dataplane with the buffer. Only a buffer's owner touches its part.
    sidecar: Box<[AtomicU32]>,
}

// SAFETY: the pool owns its mapping for its whole life; the raw base pointer is only
// turned into slices through `DmaBuf`, which is an exclusive handle to one buffer.
unsafe impl Send for DmaPool {}
// SAFETY: shared access only reads immutable fields or goes through the lock-free queue.
unsafe impl Sync for DmaPool {}

impl DmaPool {
    /// Maps `count` buffers of `buf_size` bytes. This is the only allocation the pool
    /// ever makes.
    pub fn new(
        name: &str,
        buf_size: usize,
        count: usize,
        policy: PagePolicy,
    ) -> Result<Arc<Self>, Error> {
        if buf_size == 0 || buf_size % BUF_ALIGN != 0 {
            return Err(Error::BadBufSize {
                name: name.to_owned(),
                buf_size,
            });
        }
        if count == 0 || count > POOL_COUNT_MAX {
            return Err(Error::BadCount {
                name: name.to_owned(),
                count,
                max: POOL_COUNT_MAX,
            });
        }
        let want = buf_size.checked_mul(count).ok_or_else(|| Error::BadCount {
            name: name.to_owned(),
            count,
            max: POOL_COUNT_MAX,
        })?;
        let (base, map_len, huge) = match policy {
            PagePolicy::Normal => {
                let len = round_up(want, BUF_ALIGN);
                (map(name, len, false)?, len, false)
            }
            PagePolicy::PreferHuge | PagePolicy::RequireHuge => {
                let len = round_up(want, HUGEPAGE_SIZE);
                match map(name, len, true) {
                    Ok(p) => (p, len, true),
                    Err(Error::Map { source, .. }) if policy == PagePolicy::RequireHuge => {
                        return Err(Error::HugepagesRequired {
                            name: name.to_owned(),
                            source,
                        })
                    }
                    Err(Error::Map { source, .. }) => {
                        if !FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                pool = name,
                                error = %source,
                                "no hugepages reserved: DMA buffers use ordinary pages \
                                 (reserve with /proc/sys/vm/nr_hugepages for best performance)"
                            );
                        }
                        let len = round_up(want, BUF_ALIGN);
                        (map(name, len, false)?, len, false)
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        lock_best_effort(base, map_len);
        let free = ArrayQueue::new(count);
        for i in 0..count {
            let pushed = free.push(i as u32);
            assert!(pushed.is_ok(), "free queue sized to count");
        }
        let sidecar = (0..count * (buf_size / SIDECAR_BLOCK))
            .map(|_| AtomicU32::new(0))
            .collect();
        Ok(Arc::new(DmaPool {
            sidecar,
            name: name.to_owned(),
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            base,
            map_len,
            buf_size,
            count,
            huge,
            free,
        }))
    }

    /// Takes a free buffer, or `None` when all are in use. Lock-free, no allocation.
    /// The buffer's contents are whatever its last user left (not zeroed).
    pub fn alloc(self: &Arc<Self>) -> Option<DmaBuf> {
        let index = self.free.pop()?;
        Some(DmaBuf {
            pool: Arc::clone(self),
            index,
            len: self.buf_size,
            sealed_len: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    /// A process-unique id, so a device can find which registration a buffer belongs to.
    pub fn id(&self) -> u32 {
        self.id
    }
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }
    pub fn count(&self) -> usize {
        self.count
    }
    pub fn available(&self) -> usize {
        self.free.len()
    }
    pub fn is_hugepage_backed(&self) -> bool {
        self.huge
    }
    /// The whole mapped region (for io_uring buffer registration, VFIO DMA mapping,
    /// RDMA memory registration). Valid for as long as the pool lives.
    pub fn region(&self) -> Region {
        Region {
            addr: self.base.as_ptr() as usize,
            len: self.map_len,
        }
    }

    fn buf_ptr(&self, index: u32) -> *mut u8 {
        assert!((index as usize) < self.count, "buffer index in range");
        // SAFETY: index < count, so the offset stays inside the mapping of
        // count * buf_size bytes.
        unsafe { self.base.as_ptr().add(index as usize * self.buf_size) }
    }
}

impl Drop for DmaPool {
    fn drop(&mut self) {
        // Every DmaBuf holds an Arc to its pool, so no buffer is alive here.
        // SAFETY: base/map_len are exactly what mmap returned; nothing references them.
        let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
        debug_assert_eq!(rc, 0, "munmap of our own mapping");
    }
}

/// An exclusive handle to one pool buffer. Returned to the pool on drop.
#[derive(Debug)]
pub struct DmaBuf {
    pool: Arc<DmaPool>,
    index: u32,
    /// The usable length: `buf_size` unless narrowed with `set_len`.
    len: usize,
    /// `Some(n)`: the first `n` bytes were sealed (tail block zero-padded, sidecar
    /// checksums computed) and not mutated since.
    sealed_len: Option<usize>,
}

impl DmaBuf {
    /// The buffer's full capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.pool.buf_size
    }
    /// The length the slices expose (defaults to the capacity).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Narrows or widens the visible length, up to the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.pool.buf_size,
            "DmaBuf::set_len {len} beyond capacity"
        );
        self.len = len;
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the pointer is inside the live mapping (the Arc keeps the pool alive),
        // len <= buf_size, and this handle is the only one for this index.
        unsafe { std::slice::from_raw_parts(self.pool.buf_ptr(self.index), self.len) }
    }
    /// Zero-pads the bytes after `len` up to a 4 KiB boundary and stores `crc` of each
    /// 4 KiB block of the first `len` bytes in the sidecar. Until the next mutable
    /// access, `sealed_len()` is `Some(len)` and `block_crc` returns those checksums.
    pub fn seal(&mut self, len: usize, crc: impl Fn(&[u8]) -> u32) {
        let padded = len.div_ceil(SIDECAR_BLOCK) * SIDECAR_BLOCK;
        assert!(
            padded <= self.capacity(),
            "seal({len}) beyond capacity {}",
            self.capacity()
        );
        self.set_len(self.capacity());
        self.as_mut_slice()[len..padded].fill(0);
        let base = self.index as usize * (self.pool.buf_size / SIDECAR_BLOCK);
        for (i, block) in self.as_slice()[..padded].chunks(SIDECAR_BLOCK).enumerate() {
            self.pool.sidecar[base + i].store(crc(block), Ordering::Relaxed);
        }
        self.sealed_len = Some(len);
    }

    /// The length this buffer was sealed for, if it has not been mutated since.
    pub fn sealed_len(&self) -> Option<usize> {
        self.sealed_len
    }

    /// The sealed checksum of block `i` (meaningful only while `sealed_len` is `Some`).
    pub fn block_crc(&self, i: usize) -> u32 {
        let per = self.pool.buf_size / SIDECAR_BLOCK;
        assert!(i < per, "sidecar block {i} out of range");
        self.pool.sidecar[self.index as usize * per + i].load(Ordering::Relaxed)
    }

    /// Records the checksum block `i` is expected to have (a read's producer fills
    /// these for the consumer to verify). Does not seal the buffer.
    pub fn set_block_crc(&mut self, i: usize, crc: u32) {
        let per = self.pool.buf_size / SIDECAR_BLOCK;
        assert!(i < per, "sidecar block {i} out of range");
        self.pool.sidecar[self.index as usize * per + i].store(crc, Ordering::Relaxed);
    }

    /// Mutable access to the bytes; invalidates a seal.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.sealed_len = None; // SAFETY: as in as_slice, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.pool.buf_ptr(self.index), self.len) }
    }
    /// Reads the little-endian u32 at byte `offset` with a volatile load: for memory a
    /// device writes while the CPU polls it (an NVMe completion queue), where a plain
    /// slice read could be merged or hoisted out of the polling loop.
    pub fn read_u32_volatile(&self, offset: usize) -> u32 {
        let p = self.volatile_ptr(offset);
        // SAFETY: volatile_ptr checked that 4 aligned bytes at offset lie inside this
        // buffer, which this handle owns and the pool keeps mapped.
        u32::from_le(unsafe { std::ptr::read_volatile(p) })
    }

    /// Writes `value` little-endian at byte `offset` with a volatile store: for memory a
    /// device reads concurrently (an NVMe submission queue), so each store happens and
    /// happens once.
    pub fn write_u32_volatile(&mut self, offset: usize, value: u32) {
        self.sealed_len = None;
        let p = self.volatile_ptr(offset);
        // SAFETY: as in read_u32_volatile; &mut self makes the CPU side exclusive.
        unsafe { std::ptr::write_volatile(p, value.to_le()) }
    }

    /// Copies `dst.len()` bytes from byte `offset` into `dst` without forming a
    /// reference to the rest of the buffer: for memory a peer's NIC writes into
    /// (an RDMA receive ring), where only the range being read is known to be still.
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        assert!(
            offset
                .checked_add(dst.len())
                .is_some_and(|end| end <= self.pool.buf_size),
            "copy of {} bytes at {offset} outside the {}-byte buffer",
            dst.len(),
            self.pool.buf_size
        );
        // SAFETY: [offset, offset + len) lies inside this buffer (checked), which the
        // pool keeps mapped; dst is a distinct Rust slice, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.pool.buf_ptr(self.index).add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }

    fn volatile_ptr(&self, offset: usize) -> *mut u32 {
        assert!(
            offset % 4 == 0 && offset + 4 <= self.pool.buf_size,
            "volatile access at {offset} outside the {}-byte buffer or unaligned",
            self.pool.buf_size
        );
        // SAFETY: offset + 4 <= buf_size (checked), so the pointer stays in this buffer;
        // buffers are 4 KiB aligned and offset is a multiple of 4, so it is aligned.
        unsafe { self.pool.buf_ptr(self.index).add(offset).cast::<u32>() }
    }

    /// Virtual address of the first byte, for handing to a device.
    pub fn addr(&self) -> usize {
        self.pool.buf_ptr(self.index) as usize
    }
    pub fn pool_id(&self) -> u32 {
        self.pool.id
    }
    pub fn pool(&self) -> &Arc<DmaPool> {
        &self.pool
    }
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        let ok = self.pool.free.push(self.index).is_ok();
        debug_assert!(ok, "a buffer index is returned once");
    }
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

fn map(name: &str, len: usize, huge: bool) -> Result<NonNull<u8>, Error> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
    if huge {
        flags |= libc::MAP_HUGETLB;
    }
    // SAFETY: an anonymous private mapping with no fixed address has no preconditions;
    // the result is checked against MAP_FAILED before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::Map {
            name: name.to_owned(),
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(NonNull::new(p.cast()).expect("mmap never returns null on success"))
}

fn lock_best_effort(base: NonNull<u8>, len: usize) {
    // SAFETY: the range is our own live mapping.
    let rc = unsafe { libc::mlock(base.as_ptr().cast(), len) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "mlock of DMA pool failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_until_empty_then_reuse() {
        let pool = DmaPool::new("t", 8192, 3, PagePolicy::PreferHuge).unwrap();
        let a = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        let c = pool.alloc().unwrap();
        assert!(pool.alloc().is_none());
        assert_eq!(pool.available(), 0);
        let addrs = [a.addr(), b.addr(), c.addr()];
        for w in addrs {
            assert_eq!(w % BUF_ALIGN, 0);
        }
        assert_ne!(addrs[0], addrs[1]);
        drop(b);
        assert_eq!(pool.available(), 1);
        let d = pool.alloc().unwrap();
        assert_eq!(d.addr(), addrs[1]);
    }

    #[test]
    fn buffers_are_disjoint_and_writable() {
        let pool = DmaPool::new("t", 4096, 4, PagePolicy::Normal).unwrap();
        let mut bufs: Vec<_> = (0..4).map(|_| pool.alloc().unwrap()).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            b.as_mut_slice().fill(i as u8);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.as_slice().iter().all(|&x| x == i as u8));
            let r = pool.region();
            assert!(b.addr() >= r.addr && b.addr() + b.capacity() <= r.addr + r.len);
        }
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(matches!(
            DmaPool::new("t", 100, 1, PagePolicy::Normal),
            Err(Error::BadBufSize { .. })
        ));
        assert!(matches!(
            DmaPool::new("t", 4096, 0, PagePolicy::Normal),
            Err(Error::BadCount { .. })
        ));
    }

    #[test]
    fn seal_pads_checksums_and_is_invalidated_by_mutation() {
        let pool = DmaPool::new("t", 3 * SIDECAR_BLOCK, 2, PagePolicy::Normal).unwrap();
        let mut b = pool.alloc().unwrap();
        b.as_mut_slice().fill(0xff);
        let sum = |d: &[u8]| d.iter().map(|&x| u32::from(x)).sum::<u32>();
        b.seal(5000, sum);
        assert_eq!(b.sealed_len(), Some(5000));
        assert!(
            b.as_slice()[5000..8192].iter().all(|&x| x == 0),
            "tail block zero-padded"
        );
        assert_eq!(b.block_crc(0), 255 * 4096);
        assert_eq!(b.block_crc(1), 255 * (5000 - 4096));
        let other = pool.alloc().unwrap();
        assert_ne!(other.index(), b.index());
        b.as_mut_slice()[0] = 1;
        assert_eq!(b.sealed_len(), None, "mutation invalidates the seal");
    }

    #[test]
    fn volatile_accessors_are_little_endian_and_bounded() {
        let pool = DmaPool::new("t", 4096, 1, PagePolicy::Normal).unwrap();
        let mut b = pool.alloc().unwrap();
        b.write_u32_volatile(8, 0x0403_0201);
        assert_eq!(&b.as_slice()[8..12], &[1, 2, 3, 4]);
        assert_eq!(b.read_u32_volatile(8), 0x0403_0201);
        for bad in [4096, 4094, 2] {
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.read_u32_volatile(bad)));
            assert!(r.is_err(), "offset {bad} refused");
        }
    }

    #[test]
    fn set_len_bounds() {
        let pool = DmaPool::new("t", 4096, 1, PagePolicy::Normal).unwrap();
        let mut b = pool.alloc().unwrap();
        b.set_len(100);
        assert_eq!(b.as_slice().len(), 100);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.set_len(8192)));
        assert!(r.is_err());
    }
}
