//! File data on the chunk store: byte `o` of inode `i` is byte `o % chunk_size` of chunk
//! `(i, o / chunk_size)`.
//!
//! Rules that keep the device and the namespace consistent:
//! - A write is acknowledged only when every piece is durable; the size that makes it
//!   visible is logged later (fsync, close, the flusher), so a logged size never covers
//!   data that is not durable.
//! - `alloc_end` (logged before any write beyond it) bounds every byte ever written, so
//!   recovery can purge data of writes that were never made visible.
//! - Device bytes past the size in the last block are zeros and later blocks are holes
//!   (truncate zeroes and drops them; recovery purges), so growing a file exposes zeros.

use spool_dataplane::store::{ChunkId, ChunkOp, BLOCK_SIZE};

use crate::error::{errno, Error, Result};
use crate::io::{ChunkIo, OpResult, WINDOW_BUFFERS_MAX};
use crate::meta::record::Kind;
use crate::meta::remote::chunk_complete;
use crate::meta::{now_ns, Namespace};

const BLOCK: u64 = BLOCK_SIZE as u64;
/// `alloc_end` grows in steps of at least this, so a sequential writer logs its
/// allocation a few times per file rather than per write.
const ALLOC_STEP_MIN_BYTES: u64 = 64 << 20;
const ALLOC_STEP_MAX_BYTES: u64 = 1 << 30;
/// Between retries of a write that found the cache full and nothing to evict.
const SPACE_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

fn round_down(v: u64, a: u64) -> u64 {
    v / a * a
}
fn round_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// One aligned piece of a file range inside one chunk and one DMA buffer.
#[derive(Clone, Copy, Debug)]
struct Piece {
    /// File offset of the piece (block-aligned) and its length (whole blocks).
    start: u64,
    len: u64,
}

fn chunk_of(chunk_size: u64, ino: u64, off: u64) -> (ChunkId, u32) {
    (
        ChunkId {
            inode: ino,
            index: (off / chunk_size) as u32,
        },
        (off % chunk_size) as u32,
    )
}

/// Block-aligned pieces covering `[off, end)`, split at chunk and buffer bounds.
fn pieces(io: &ChunkIo, off: u64, end: u64) -> Vec<Piece> {
    let (step, chunk_size) = (u64::from(io.io_size_max), u64::from(io.chunk_size));
    let mut out = Vec::new();
    let mut p = round_down(off, BLOCK);
    let stop = round_up(end, BLOCK);
    while p < stop {
        let chunk_end = round_down(p, chunk_size) + chunk_size;
        let len = (stop - p).min(step).min(chunk_end - p);
        out.push(Piece { start: p, len });
        p += len;
    }
    out
}

/// Reads `len` bytes at `off` of file `ino` whose size is `size` (clipped at it)
/// through `io` and hands them to `f`: straight from the DMA buffer when one piece
/// covers the range. A mount whose namespace runs on another node reads file data
/// this way too, with the size it got from the owner (`cluster`).
///
/// `fill` (cache-on-read) is asked for each chunk read short of its complete length
/// (see `meta::remote`) and the piece read again after it; `None` reads holes as zeros.
pub fn read_at<R>(
    io: &ChunkIo,
    ino: u64,
    size: u64,
    off: u64,
    len: u32,
    fill: Option<&dyn Fn(u32) -> Result<()>>,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R> {
    if off >= size || len == 0 {
        return Ok(f(&[]));
    }
    let end = size.min(off + u64::from(len));
    let pieces = pieces(io, off, end);
    let chunk_size = u64::from(io.chunk_size);
    // A piece's outcome, after a fill when its chunk was short.
    let checked = |p: &Piece, r: OpResult, op: &dyn Fn(&Piece) -> ChunkOp| -> Result<OpResult> {
        let Some(fill) = fill else { return Ok(r) };
        let Ok(info) = &r.0 else { return Ok(r) };
        let index = (p.start / chunk_size) as u32;
        if chunk_complete(info.len, size, index, chunk_size) {
            return Ok(r);
        }
        drop(r);
        fill(index)?;
        Ok(io.run_one(op(p)))
    };
    let read_op = |p: &Piece| {
        let (chunk, coff) = chunk_of(u64::from(io.chunk_size), ino, p.start);
        let mut buf = io.buffer();
        buf.set_len(p.len as usize);
        ChunkOp::Read {
            chunk,
            offset: coff,
            len: p.len as u32,
            buf,
        }
    };
    if pieces.len() == 1 {
        // The common case (page-aligned kernel reads inside one chunk): reply
        // straight from the DMA buffer.
        let (r, buf) = checked(&pieces[0], io.run_one(read_op(&pieces[0])), &read_op)?;
        r?;
        let buf = buf.expect("read buffer");
        let skip = (off - pieces[0].start) as usize;
        return Ok(f(&buf.as_slice()[skip..skip + (end - off) as usize]));
    }
    let mut out = Vec::with_capacity((end - off) as usize);
    for window in pieces.chunks(WINDOW_BUFFERS_MAX) {
        let ops = window.iter().map(read_op).collect();
        for (p, r) in window.iter().zip(io.run(ops)) {
            let (r, buf) = checked(p, r, &read_op)?;
            r?;
            let b = buf.expect("read buffer");
            let lo = off.max(p.start);
            let hi = end.min(p.start + p.len);
            out.extend_from_slice(&b.as_slice()[(lo - p.start) as usize..(hi - p.start) as usize]);
        }
    }
    Ok(f(&out))
}

impl Namespace {
    /// Largest file size: chunk indexes are 32-bit.
    pub fn file_size_max(&self) -> u64 {
        self.chunk_size.saturating_mul(1 << 32).min(i64::MAX as u64)
    }

    fn chunk_of(&self, ino: u64, off: u64) -> (ChunkId, u32) {
        chunk_of(self.chunk_size, ino, off)
    }

    fn pieces(&self, off: u64, end: u64) -> Vec<Piece> {
        pieces(&self.io, off, end)
    }

    pub(crate) fn io_lock(&self, ino: u64) -> Result<std::sync::Arc<std::sync::RwLock<()>>> {
        let st = self.lock();
        let n = st.node(ino)?;
        match n.rec.kind {
            Kind::File => Ok(n.io.clone()),
            Kind::Dir => errno(libc::EISDIR),
            _ => errno(libc::EINVAL),
        }
    }

    /// Reads `len` bytes at `off` (clipped at the size) and hands them to `f`: straight
    /// from the DMA buffer when one piece covers the range.
    pub fn read<R>(&self, ino: u64, off: u64, len: u32, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let (size, clean) = {
            let mut st = self.lock();
            let n = st.node_mut(ino)?;
            if n.rec.kind == Kind::Dir {
                return errno(libc::EISDIR);
            }
            let clean = n.blob_clean && self.reader().is_some();
            if clean {
                // For eviction's LRU order (a vDSO clock read, no syscall).
                n.used_ns = now_ns();
            }
            (n.rec.size, clean)
        };
        if !clean {
            return read_at(&self.io, ino, size, off, len, None, f);
        }
        // A read that enters a chunk keeps the prefetch window ahead of it: without
        // this, a sequential reader would find the prefetched chunks, start no more
        // fetches, and wait for a whole fetch at the end of every window.
        if off % self.chunk_size == 0 && off < size {
            self.blob_prefetch(ino, (off / self.chunk_size) as u32, size);
        }
        let fill = |index: u32| self.blob_fill_ahead(ino, index, size);
        read_at(&self.io, ino, size, off, len, Some(&fill), f)
    }

    /// The block at `block_start` as it should be kept by a partial overwrite: device
    /// bytes below `size`, zeros from `size` on.
    fn read_block_for_merge(&self, ino: u64, block_start: u64, size: u64) -> Result<Vec<u8>> {
        let mut out = vec![0u8; BLOCK as usize];
        if block_start >= size {
            return Ok(out);
        }
        let (chunk, coff) = self.chunk_of(ino, block_start);
        let mut buf = self.io.buffer();
        buf.set_len(BLOCK as usize);
        let (r, buf) = self.io.run_one(ChunkOp::Read {
            chunk,
            offset: coff,
            len: BLOCK_SIZE,
            buf,
        });
        r?;
        let keep = (size - block_start).min(BLOCK) as usize;
        out[..keep].copy_from_slice(&buf.expect("read buffer").as_slice()[..keep]);
        Ok(out)
    }

    /// Writes `data` at `off`; durable when it returns. A full cache (ENOSPC) with
    /// cache-on-read evicts clean chunks and retries for up to `space_wait` (uploads
    /// meanwhile turn dirty files clean, so evictable) before the ENOSPC stands.
    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> Result<usize> {
        // The clock is read only once the device is full (not per write).
        let mut full_since: Option<std::time::Instant> = None;
        // Bounded by `space_wait`.
        loop {
            match self.write_once(ino, off, data) {
                Err(e)
                    if e.errno() == libc::ENOSPC
                        && full_since
                            .get_or_insert_with(std::time::Instant::now)
                            .elapsed()
                            < self.space_wait() =>
                {
                    let want = (data.len() as u64).max(self.chunk_size) * 4;
                    if self.blob_evict(want)? == 0 {
                        std::thread::sleep(SPACE_RETRY_DELAY.min(self.space_wait()));
                    }
                }
                r => return r,
            }
        }
    }

    fn write_once(&self, ino: u64, off: u64, data: &[u8]) -> Result<usize> {
        let io = self.io_lock(ino)?;
        let len = data.len() as u64;
        let end = off.saturating_add(len);
        if off % BLOCK == 0 && end % BLOCK == 0 {
            // Whole blocks: no read-modify-write, so such writes run side by side.
            let r = {
                let _g = io.read().unwrap_or_else(|p| p.into_inner());
                self.write_locked(ino, off, len, Some(data), false)
            };
            if r.is_err() {
                // Bytes may have landed past the size; drop them alone, so no
                // concurrent writer's acknowledged data beyond the size goes too.
                let _g = io.write().unwrap_or_else(|p| p.into_inner());
                if let Err(pe) = self.purge_past_size(ino) {
                    tracing::warn!(ino, error = %pe, "purging after a failed write");
                }
            }
            return r.map(|()| data.len());
        }
        let _g = io.write().unwrap_or_else(|p| p.into_inner());
        self.write_locked(ino, off, len, Some(data), true)?;
        Ok(data.len())
    }

    fn write_locked(
        &self,
        ino: u64,
        off: u64,
        len: u64,
        data: Option<&[u8]>,
        purge_on_error: bool,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.blob_touch(ino, u64::MAX)?;
        let end = off.checked_add(len).ok_or(Error::Errno(libc::EFBIG))?;
        if end > self.file_size_max() {
            return errno(libc::EFBIG);
        }
        let (size, alloc_end) = {
            let st = self.lock();
            let n = st.node(ino)?;
            (n.rec.size, n.rec.alloc_end)
        };
        if end > alloc_end {
            // Log the allocation bound before any byte lands beyond it.
            let step = end
                .next_power_of_two()
                .clamp(ALLOC_STEP_MIN_BYTES, ALLOC_STEP_MAX_BYTES);
            let want = round_up(end, BLOCK)
                .saturating_add(step)
                .min(self.file_size_max());
            self.update(ino, |r| {
                r.alloc_end = r.alloc_end.max(want);
                Ok(())
            })?;
        }
        let pieces = self.pieces(off, end);
        let first = pieces[0];
        let last = *pieces.last().expect("at least one piece");
        // Partial first and last blocks keep their other bytes.
        let head = (off % BLOCK != 0
            || (first.start == round_down(end, BLOCK) && end % BLOCK != 0))
            .then(|| self.read_block_for_merge(ino, first.start, size))
            .transpose()?;
        let tail_block = round_down(end - 1, BLOCK);
        let tail = (end % BLOCK != 0 && tail_block != first.start)
            .then(|| self.read_block_for_merge(ino, tail_block, size))
            .transpose()?;
        let mut failed = None;
        for window in pieces.chunks(WINDOW_BUFFERS_MAX) {
            let mut ops = Vec::with_capacity(window.len());
            for p in window {
                let mut buf = self.io.buffer();
                buf.set_len(p.len as usize);
                let dst = buf.as_mut_slice();
                if p.start == first.start {
                    if let Some(h) = &head {
                        dst[..BLOCK as usize].copy_from_slice(h);
                    }
                }
                if p.start == last.start {
                    if let Some(t) = &tail {
                        let at = (tail_block - p.start) as usize;
                        dst[at..at + BLOCK as usize].copy_from_slice(t);
                    }
                }
                let lo = off.max(p.start);
                let hi = end.min(p.start + p.len);
                let d = &mut dst[(lo - p.start) as usize..(hi - p.start) as usize];
                match data {
                    Some(src) => d.copy_from_slice(&src[(lo - off) as usize..(hi - off) as usize]),
                    None => d.fill(0),
                }
                let (chunk, coff) = self.chunk_of(ino, p.start);
                ops.push(ChunkOp::Write {
                    chunk,
                    offset: coff,
                    len: p.len as u32,
                    buf,
                });
            }
            for (r, _) in self.io.run(ops) {
                if let Err(e) = r {
                    failed.get_or_insert(e);
                }
            }
            if failed.is_some() {
                break;
            }
        }
        if let Some(e) = failed {
            if purge_on_error && end > size {
                // Bytes may have landed past the size: drop them so a later growth
                // shows zeros.
                if let Err(pe) = self.purge_past_size(ino) {
                    tracing::warn!(ino, error = %pe, "purging after a failed write");
                }
            }
            return Err(e.into());
        }
        let mut st = self.lock();
        let n = st.node_mut(ino)?;
        n.rec.size = n.rec.size.max(end);
        let t = now_ns();
        n.rec.mtime_ns = t;
        n.rec.ctime_ns = t;
        n.dirty = true;
        Ok(())
    }

    /// Removes everything past the size: zeros the rest of the last block, drops later
    /// blocks of its chunk and later chunks up to `alloc_end`. Caller holds the io lock
    /// or runs before serving.
    pub(crate) fn purge_past_size(&self, ino: u64) -> Result<()> {
        let (size, alloc_end) = {
            let st = self.lock();
            let n = st.node(ino)?;
            (n.rec.size, n.rec.alloc_end)
        };
        let cs = self.chunk_size;
        if size % BLOCK != 0 {
            let b = round_down(size, BLOCK);
            // The whole block as stored: garbage is any non-zero byte past the size.
            let mut merged = self.read_block_for_merge(ino, b, size + BLOCK)?;
            let tail = &mut merged[(size - b) as usize..];
            if tail.iter().any(|&x| x != 0) {
                tail.fill(0);
                let (chunk, coff) = self.chunk_of(ino, b);
                let mut buf = self.io.buffer();
                buf.set_len(BLOCK as usize);
                buf.as_mut_slice().copy_from_slice(&merged);
                self.io
                    .run_one(ChunkOp::Write {
                        chunk,
                        offset: coff,
                        len: BLOCK_SIZE,
                        buf,
                    })
                    .0?;
            }
        }
        let first_chunk = size / cs;
        let keep_in_first = round_up(size % cs, BLOCK) as u32;
        let last_chunk = alloc_end.max(size).div_ceil(cs);
        let mut ops = Vec::new();
        for (chunk, info) in
            self.chunks_present(ino, first_chunk..last_chunk.max(first_chunk + 1))?
        {
            if u64::from(chunk.index) == first_chunk && keep_in_first > 0 {
                if info.len > keep_in_first {
                    ops.push(ChunkOp::Truncate {
                        chunk,
                        len: keep_in_first,
                    });
                }
            } else {
                ops.push(ChunkOp::Delete { chunk });
            }
        }
        for (r, _) in self.io.run(ops) {
            r?;
        }
        Ok(())
    }

    /// The chunks of `ino` with indexes in `range` that exist, with their committed
    /// length and version: all Stats at once (pipelined; this runs for every file at
    /// recovery).
    pub(crate) fn chunks_present(
        &self,
        ino: u64,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<(ChunkId, spool_dataplane::store::ChunkInfo)>> {
        let chunks: Vec<ChunkId> = range
            .map(|c| ChunkId {
                inode: ino,
                index: c as u32,
            })
            .collect();
        let stats = self.io.run(
            chunks
                .iter()
                .map(|&chunk| ChunkOp::Stat { chunk })
                .collect(),
        );
        let mut out = Vec::new();
        for (chunk, (info, _)) in chunks.into_iter().zip(stats) {
            let info = info?;
            if info.version != 0 {
                out.push((chunk, info));
            }
        }
        Ok(out)
    }

    /// Deletes the chunks of `ino` that cover `[0, end)`; returns how many existed.
    pub(crate) fn delete_chunks(&self, ino: u64, end: u64) -> Result<u64> {
        let present = self.chunks_present(ino, 0..end.div_ceil(self.chunk_size))?;
        let n = present.len() as u64;
        let ops = present
            .into_iter()
            .map(|(chunk, _)| ChunkOp::Delete { chunk })
            .collect();
        for (r, _) in self.io.run(ops) {
            r?;
        }
        Ok(n)
    }

    /// truncate / ftruncate.
    pub fn set_size(&self, ino: u64, new_size: u64) -> Result<()> {
        if new_size > self.file_size_max() {
            return errno(libc::EFBIG);
        }
        let io = self.io_lock(ino)?;
        let _g = io.write().unwrap_or_else(|p| p.into_inner());
        self.blob_touch(ino, new_size)?;
        let old = self.getattr(ino)?.size;
        let t = now_ns();
        // The size change is the commit point; data past it is dropped after.
        self.update(ino, |r| {
            r.size = new_size;
            r.mtime_ns = t;
            r.ctime_ns = t;
            Ok(())
        })?;
        if new_size < old {
            self.purge_past_size(ino)?;
        }
        self.blob_synced(ino);
        Ok(())
    }

    /// fallocate: mode 0 and KEEP_SIZE (no reservation: space is taken when written),
    /// PUNCH_HOLE and ZERO_RANGE (the range reads as zeros after).
    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        if len == 0 {
            return errno(libc::EINVAL);
        }
        let end = off.checked_add(len).ok_or(Error::Errno(libc::EFBIG))?;
        if end > self.file_size_max() {
            return errno(libc::EFBIG);
        }
        let zero = match mode {
            0 | KEEP_SIZE => false,
            m if m == PUNCH | KEEP_SIZE || m == ZERO || m == ZERO | KEEP_SIZE => true,
            _ => return errno(libc::EOPNOTSUPP),
        };
        let io = self.io_lock(ino)?;
        let _g = io.write().unwrap_or_else(|p| p.into_inner());
        self.blob_touch(ino, u64::MAX)?;
        let size = self.getattr(ino)?.size;
        if zero && off < size {
            let zend = end.min(size);
            // Whole chunks inside the range become absent; the rest is written zeros.
            let cs = self.chunk_size;
            let mut p = off;
            while p < zend {
                let chunk_start = round_down(p, cs);
                let chunk_end = chunk_start + cs;
                if p == chunk_start && chunk_end <= zend {
                    self.io
                        .run_one(ChunkOp::Delete {
                            chunk: self.chunk_of(ino, p).0,
                        })
                        .0?;
                    p = chunk_end;
                } else {
                    let e = zend.min(chunk_end);
                    self.write_locked(ino, p, e - p, None, true)?;
                    p = e;
                }
            }
        }
        if mode & KEEP_SIZE == 0 && end > size {
            self.update(ino, |r| {
                r.size = r.size.max(end);
                r.ctime_ns = now_ns();
                Ok(())
            })?;
        }
        self.blob_synced(ino);
        Ok(())
    }
}
