//! The namespace's durable form: a root block, a checkpoint and a log of record batches,
//! all in chunks of reserved inode numbers (top bit set) on the chunk store.
//!
//! Appends are group-committed: records join a pending batch under the caller's
//! namespace lock, and whoever waits for durability first writes the batch for all
//! (one batch in flight, so the log has no holes and replay stops exactly at its end).
//! A batch is one chunk write into blocks that are still holes, so it goes in place
//! and is atomic. The next log chunk is taken early (a pad batch at half the current
//! one), so the log does not meet ENOSPC first when the device fills with data.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use spool_dataplane::store::{ChunkId, ChunkOp, BLOCK_SIZE};

use super::record::{
    batch_bytes, decode_batch, encode_batch, BatchHeader, Record, Root, BATCH_HEADER_BYTES,
    ROOT_BYTES,
};
use crate::error::{Error, Result};
use crate::io::{ChunkIo, WINDOW_BUFFERS_MAX};

/// Reserved inode numbers: file inodes are below 2^56, so these never collide.
pub const META_BIT: u64 = 1 << 63;
// In a cluster every namespace chunk must map to the one chain whose head owns it.
const _: () = assert!(META_BIT == spool_dataplane::replica::chain::NAMESPACE_INODE_BIT);
const SPACE_ROOT: u64 = 1 << 48;
const SPACE_CHECKPOINT: u64 = 2 << 48;
const SPACE_LOG: u64 = 3 << 48;
const GENERATION_MASK: u64 = (1 << 48) - 1;

pub fn root_chunk() -> ChunkId {
    ChunkId {
        inode: META_BIT | SPACE_ROOT,
        index: 0,
    }
}
pub fn checkpoint_chunk(generation: u64, k: u32) -> ChunkId {
    ChunkId {
        inode: META_BIT | SPACE_CHECKPOINT | (generation & GENERATION_MASK),
        index: k,
    }
}
pub fn log_chunk(generation: u64, k: u32) -> ChunkId {
    ChunkId {
        inode: META_BIT | SPACE_LOG | (generation & GENERATION_MASK),
        index: k,
    }
}

/// Where the log stands.
#[derive(Debug)]
struct Inner {
    root: Root,
    /// Encoded records waiting for the next batch, and the op boundaries in it (an
    /// op's records always travel in one batch: that makes the op atomic).
    pending: Vec<u8>,
    pending_ops: VecDeque<(usize, u32)>,
    /// lsn of the next record enqueued; every record below `durable_lsn` is durable.
    next_lsn: u64,
    durable_lsn: u64,
    first_pending_lsn: u64,
    /// A batch (or a checkpoint) is being written.
    writing: bool,
    failed: Option<String>,
    /// Where the next batch goes: log chunk `chunk_k` at byte `chunk_off`.
    chunk_k: u32,
    chunk_off: u32,
    /// Chunk `chunk_k + 1` already holds a pad batch.
    next_taken: bool,
    /// Log bytes in this generation, and the size of the checkpoint it follows.
    log_bytes: u64,
    checkpoint_bytes: u64,
}

#[derive(Debug)]
pub struct MetaLog {
    io: Arc<ChunkIo>,
    inner: Mutex<Inner>,
    cond: Condvar,
    /// Largest batch: one DMA buffer, and a chunk minus the pad block a batch may have
    /// to follow.
    batch_max: usize,
}

/// What recovery found on the device.
#[derive(Debug)]
pub struct Loaded {
    pub records: Vec<Record>,
    pub fresh: bool,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MetaLog {
    /// Reads the namespace from the device: the checkpoint and the log after it, every
    /// batch verified. A fresh device gives no records and `fresh`.
    pub fn open(io: Arc<ChunkIo>) -> Result<(MetaLog, Loaded)> {
        let batch_max = (io.io_size_max as usize).min((io.chunk_size - BLOCK_SIZE) as usize);
        let (info, _) = io.run_one(ChunkOp::Stat {
            chunk: root_chunk(),
        });
        let info = info?;
        let mut log = MetaLog {
            io,
            inner: Mutex::new(Inner {
                root: Root {
                    ns_id: 0,
                    generation: 0,
                    checkpoint_batches: 0,
                    log_start_lsn: 0,
                },
                pending: Vec::new(),
                pending_ops: VecDeque::new(),
                next_lsn: 0,
                durable_lsn: 0,
                first_pending_lsn: 0,
                writing: false,
                failed: None,
                chunk_k: 0,
                chunk_off: 0,
                next_taken: false,
                log_bytes: 0,
                checkpoint_bytes: 0,
            }),
            cond: Condvar::new(),
            batch_max,
        };
        if info.version == 0 {
            return Ok((
                log,
                Loaded {
                    records: Vec::new(),
                    fresh: true,
                },
            ));
        }
        let root_buf = log.read_chunk(root_chunk(), info.len)?;
        let root = Root::decode(&root_buf)?;
        let mut records = Vec::new();
        // The checkpoint: exactly `checkpoint_batches` batches.
        let mut batches = 0u64;
        let mut ckpt_bytes = 0u64;
        let mut k = 0u32;
        while batches < root.checkpoint_batches {
            let chunk = checkpoint_chunk(root.generation, k);
            let data = log.read_whole(chunk)?.ok_or_else(|| {
                Error::corrupt(
                    "checkpoint",
                    format!(
                        "generation {} has {batches} of {} batches (chunk {k} missing)",
                        root.generation, root.checkpoint_batches
                    ),
                )
            })?;
            let mut off = 0;
            while off < data.len() && batches < root.checkpoint_batches {
                let Some((h, recs, used)) = decode_batch(&data[off..])? else {
                    break;
                };
                log.check_header(&h, &root, root.generation, None)?;
                records.extend(recs);
                off += used;
                batches += 1;
            }
            ckpt_bytes += off as u64;
            k += 1;
        }
        // The log: batches with consecutive lsns, chunk after chunk, until a chunk
        // that does not exist.
        let mut lsn = root.log_start_lsn;
        let mut k = 0u32;
        let mut pos = (0u32, 0u32);
        let mut log_bytes = 0u64;
        let mut next_taken = false;
        while let Some(data) = log.read_whole(log_chunk(root.generation, k))? {
            let mut off = 0usize;
            let mut only_pad = true;
            while off < data.len() {
                let Some((h, recs, used)) = decode_batch(&data[off..])? else {
                    break;
                };
                log.check_header(&h, &root, root.generation, Some(lsn))?;
                lsn += u64::from(h.count);
                only_pad &= h.count == 0;
                records.extend(recs);
                off += used;
            }
            log_bytes += off as u64;
            if k > 0 && only_pad {
                // Only the pad: taken early, not yet in use.
                next_taken = true;
            } else {
                pos = (k, off as u32);
                next_taken = false;
            }
            k += 1;
        }
        {
            let i = log.inner.get_mut().unwrap_or_else(|p| p.into_inner());
            i.root = root;
            i.next_lsn = lsn;
            i.durable_lsn = lsn;
            i.first_pending_lsn = lsn;
            (i.chunk_k, i.chunk_off) = pos;
            i.next_taken = next_taken && k == pos.0 + 2;
            i.log_bytes = log_bytes;
            i.checkpoint_bytes = ckpt_bytes;
        }
        // A crash between a root switch and freeing the old generation leaves it; a
        // crash (or failure) in the middle of a checkpoint leaves part of the next one,
        // whose chunks the next checkpoint would otherwise rewrite copy-on-write and
        // keep their stale tails.
        if root.generation > 1 {
            log.free_generation(root.generation - 1)?;
        }
        log.free_generation(root.generation + 1)?;
        Ok((
            log,
            Loaded {
                records,
                fresh: false,
            },
        ))
    }

    /// Deletes the checkpoint and log chunks of `generation`, last first, so a crash
    /// midway leaves a prefix that the next attempt finds.
    fn free_generation(&self, generation: u64) -> Result<()> {
        for chunk_of in [log_chunk, checkpoint_chunk] {
            let mut n = 0u32;
            loop {
                let (info, _) = self.io.run_one(ChunkOp::Stat {
                    chunk: chunk_of(generation, n),
                });
                if info?.version == 0 {
                    break;
                }
                n += 1;
            }
            for k in (0..n).rev() {
                self.io
                    .run_one(ChunkOp::Delete {
                        chunk: chunk_of(generation, k),
                    })
                    .0?;
            }
        }
        Ok(())
    }

    fn check_header(
        &self,
        h: &BatchHeader,
        root: &Root,
        generation: u64,
        lsn: Option<u64>,
    ) -> Result<()> {
        if h.ns_id != root.ns_id || h.generation != generation {
            return Err(Error::corrupt(
                "log",
                format!(
                    "batch of namespace {:#x} generation {} found in namespace {:#x} generation {generation}",
                    h.ns_id, h.generation, root.ns_id
                ),
            ));
        }
        if let Some(lsn) = lsn {
            if h.count > 0 && h.first_lsn != lsn {
                return Err(Error::corrupt(
                    "log",
                    format!(
                        "batch starts at lsn {} where {lsn} was expected",
                        h.first_lsn
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The committed bytes of a chunk, or `None` when it does not exist.
    fn read_whole(&self, chunk: ChunkId) -> Result<Option<Vec<u8>>> {
        let (info, _) = self.io.run_one(ChunkOp::Stat { chunk });
        let info = info?;
        if info.version == 0 {
            return Ok(None);
        }
        self.read_chunk(chunk, info.len).map(Some)
    }

    fn read_chunk(&self, chunk: ChunkId, len: u32) -> Result<Vec<u8>> {
        let step = self.io.io_size_max;
        let mut out = Vec::with_capacity(len as usize);
        let mut off = 0u32;
        while off < len {
            let mut ops = Vec::with_capacity(WINDOW_BUFFERS_MAX);
            while off < len && ops.len() < WINDOW_BUFFERS_MAX {
                let n = step.min(len - off);
                let mut buf = self.io.buffer();
                buf.set_len(n as usize);
                ops.push(ChunkOp::Read {
                    chunk,
                    offset: off,
                    len: n,
                    buf,
                });
                off += n;
            }
            for (r, buf) in self.io.run(ops) {
                r?;
                out.extend_from_slice(buf.expect("read buffer").as_slice());
            }
        }
        Ok(out)
    }

    fn write_chunk(&self, chunk: ChunkId, offset: u32, data: &[u8]) -> Result<()> {
        assert!(offset % BLOCK_SIZE == 0 && data.len() % BLOCK_SIZE as usize == 0);
        let step = self.io.io_size_max as usize;
        let pieces: Vec<(usize, &[u8])> = data.chunks(step).enumerate().collect();
        for window in pieces.chunks(WINDOW_BUFFERS_MAX) {
            let ops = window
                .iter()
                .map(|&(i, piece)| {
                    let mut buf = self.io.buffer();
                    buf.set_len(piece.len());
                    buf.as_mut_slice().copy_from_slice(piece);
                    ChunkOp::Write {
                        chunk,
                        offset: offset + (i * step) as u32,
                        len: piece.len() as u32,
                        buf,
                    }
                })
                .collect();
            for (r, _) in self.io.run(ops) {
                r?;
            }
        }
        Ok(())
    }

    /// Creates a fresh namespace from `records` (generation 1).
    pub fn create(&self, ns_id: u64, records: &[Record]) -> Result<()> {
        let mut i = lock(&self.inner);
        i.root.ns_id = ns_id;
        drop(i);
        self.write_checkpoint(1, 0, records)
    }

    /// Queues one op's records; returns the lsn the op is durable at (wait for it
    /// with `wait`). Called under the namespace lock, so log order is apply order.
    pub fn append(&self, records: &[Record]) -> Result<u64> {
        let mut i = lock(&self.inner);
        if let Some(f) = &i.failed {
            return Err(Error::Failed(f.clone()));
        }
        let start = i.pending.len();
        for r in records {
            r.encode(&mut i.pending);
        }
        let end = i.pending.len();
        if BATCH_HEADER_BYTES + (end - start) > self.batch_max {
            i.pending.truncate(start);
            return Err(Error::Errno(libc::E2BIG));
        }
        let n = records.len() as u32;
        i.pending_ops.push_back((end, n));
        i.next_lsn += u64::from(n);
        Ok(i.next_lsn)
    }

    /// Stops this copy of the log for good: nothing is appended or written after
    /// this returns (a batch being written finishes first). Another load of the same
    /// namespace (a cluster takeover) may write it from then on; two copies appending
    /// at once would overwrite each other's batches.
    pub fn retire(&self, why: &str) {
        let mut i = lock(&self.inner);
        if i.failed.is_none() {
            i.failed = Some(format!("retired: {why}"));
        }
        // Bounded: each wait ends with the batch or checkpoint in flight.
        while i.writing {
            i = self.cond.wait(i).unwrap_or_else(|p| p.into_inner());
        }
        self.cond.notify_all();
    }

    /// Waits until every record queued so far is durable.
    pub fn wait_all(&self) -> Result<()> {
        let lsn = lock(&self.inner).next_lsn;
        self.wait(lsn)
    }

    /// Waits until every record below `lsn` is durable, writing batches as needed.
    pub fn wait(&self, lsn: u64) -> Result<()> {
        let mut i = lock(&self.inner);
        loop {
            if let Some(f) = &i.failed {
                return Err(Error::Failed(f.clone()));
            }
            if i.durable_lsn >= lsn {
                return Ok(());
            }
            if i.writing {
                i = self.cond.wait(i).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            i = self.lead(i);
        }
    }

    /// Writes one batch of whole ops from the pending queue, without holding the lock
    /// during the I/O.
    fn lead<'a>(&'a self, mut i: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        assert!(!i.writing);
        let room = self.batch_max - BATCH_HEADER_BYTES;
        let (mut take, mut count) = (0usize, 0u32);
        while let Some(&(end, n)) = i.pending_ops.front() {
            if end > room && take > 0 {
                break;
            }
            take = end;
            count += n;
            i.pending_ops.pop_front();
        }
        assert!(take > 0, "lead() only runs with records pending");
        let body: Vec<u8> = i.pending.drain(..take).collect();
        for op in i.pending_ops.iter_mut() {
            op.0 -= take;
        }
        let h = BatchHeader {
            ns_id: i.root.ns_id,
            generation: i.root.generation,
            first_lsn: i.first_pending_lsn,
            count,
            body_len: body.len() as u32,
        };
        i.first_pending_lsn += u64::from(count);
        let bytes = batch_bytes(body.len());
        // Find room: the batch never straddles chunks.
        let cs = self.io.chunk_size as usize;
        let mut move_to_next = false;
        if i.chunk_off as usize + bytes > cs {
            move_to_next = true;
        }
        let (k, off) = if move_to_next {
            (i.chunk_k + 1, if i.next_taken { BLOCK_SIZE } else { 0 })
        } else {
            (i.chunk_k, i.chunk_off)
        };
        let take_next = !move_to_next && !i.next_taken && (off as usize + bytes) * 2 >= cs;
        let generation = i.root.generation;
        let ns_id = i.root.ns_id;
        i.writing = true;
        drop(i);

        let mut frame = Vec::with_capacity(bytes);
        encode_batch(&h, &body, &mut frame);
        let r = self.write_chunk(log_chunk(generation, k), off, &frame);
        // The pad only reserves the next chunk early; if it fails (the device is
        // full), the batch is still durable and the next chunk is taken when needed.
        let take_next = take_next
            && r.is_ok()
            && match self.write_pad(ns_id, generation, k + 1) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "could not take the next metadata log chunk early");
                    false
                }
            };

        let mut i = lock(&self.inner);
        i.writing = false;
        match r {
            Ok(()) => {
                i.chunk_k = k;
                i.chunk_off = off + bytes as u32;
                if move_to_next {
                    i.next_taken = false;
                }
                if take_next {
                    i.next_taken = true;
                }
                i.log_bytes += bytes as u64;
                i.durable_lsn = h.first_lsn + u64::from(count);
            }
            Err(e) => {
                let msg = format!("metadata log write failed: {e}");
                tracing::error!(error = %e, "metadata log write failed; namespace refuses changes until restart");
                i.failed = Some(msg);
            }
        }
        self.cond.notify_all();
        i
    }

    fn write_pad(&self, ns_id: u64, generation: u64, k: u32) -> Result<()> {
        let h = BatchHeader {
            ns_id,
            generation,
            first_lsn: 0,
            count: 0,
            body_len: 0,
        };
        let mut frame = Vec::with_capacity(BLOCK_SIZE as usize);
        encode_batch(&h, &[], &mut frame);
        self.write_chunk(log_chunk(generation, k), 0, &frame)
    }

    /// Whether the log has grown enough that a checkpoint pays.
    pub fn wants_checkpoint(&self) -> bool {
        let i = lock(&self.inner);
        let floor = 8 * u64::from(self.io.chunk_size);
        i.failed.is_none() && !i.writing && i.log_bytes > floor.max(2 * i.checkpoint_bytes)
    }

    /// Replaces checkpoint and log with a checkpoint of `records` (the whole state,
    /// which already includes every pending op). The caller holds the namespace lock,
    /// so no op appends meanwhile.
    pub fn checkpoint(&self, records: &[Record]) -> Result<()> {
        let mut i = lock(&self.inner);
        while i.writing {
            i = self.cond.wait(i).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(f) = &i.failed {
            return Err(Error::Failed(f.clone()));
        }
        let old = i.root;
        let next_lsn = i.next_lsn;
        i.writing = true;
        drop(i);
        let r = self.write_checkpoint(old.generation + 1, next_lsn, records);
        let mut i = lock(&self.inner);
        i.writing = false;
        match &r {
            Ok(()) => {
                // The state written covers every pending op: they are durable now.
                i.pending.clear();
                i.pending_ops.clear();
                i.first_pending_lsn = next_lsn;
                i.durable_lsn = next_lsn;
            }
            Err(e) => i.failed = Some(format!("checkpoint failed: {e}")),
        }
        self.cond.notify_all();
        drop(i);
        r?;
        // The old generation is unreachable now; free its chunks.
        if let Err(e) = self.free_generation(old.generation) {
            tracing::warn!(error = %e, "freeing an old metadata generation (retried at next start)");
        }
        Ok(())
    }

    /// Writes `records` as checkpoint `generation`, then switches the root to it.
    fn write_checkpoint(
        &self,
        generation: u64,
        log_start_lsn: u64,
        records: &[Record],
    ) -> Result<()> {
        let ns_id = lock(&self.inner).root.ns_id;
        // Chunks of an earlier attempt at this generation must be holes again first.
        self.free_generation(generation)?;
        let cs = self.io.chunk_size as usize;
        let room = self.batch_max - BATCH_HEADER_BYTES;
        let mut chunk_data: Vec<u8> = Vec::new();
        let mut k = 0u32;
        let mut batches = 0u64;
        let mut total = 0u64;
        let mut body = Vec::new();
        let mut count = 0u32;
        let mut one = Vec::new();
        let mut flush_batch = |body: &mut Vec<u8>,
                               count: &mut u32,
                               chunk_data: &mut Vec<u8>,
                               k: &mut u32|
         -> Result<()> {
            if *count == 0 {
                return Ok(());
            }
            let h = BatchHeader {
                ns_id,
                generation,
                first_lsn: 0,
                count: *count,
                body_len: body.len() as u32,
            };
            if chunk_data.len() + batch_bytes(body.len()) > cs {
                self.write_chunk(checkpoint_chunk(generation, *k), 0, chunk_data)?;
                total += chunk_data.len() as u64;
                chunk_data.clear();
                *k += 1;
            }
            encode_batch(&h, body, chunk_data);
            batches += 1;
            body.clear();
            *count = 0;
            Ok(())
        };
        for r in records {
            one.clear();
            r.encode(&mut one);
            if body.len() + one.len() > room {
                flush_batch(&mut body, &mut count, &mut chunk_data, &mut k)?;
            }
            body.extend_from_slice(&one);
            count += 1;
        }
        flush_batch(&mut body, &mut count, &mut chunk_data, &mut k)?;
        if !chunk_data.is_empty() {
            self.write_chunk(checkpoint_chunk(generation, k), 0, &chunk_data)?;
            total += chunk_data.len() as u64;
        }
        let root = Root {
            ns_id,
            generation,
            checkpoint_batches: batches,
            log_start_lsn,
        };
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        block[..ROOT_BYTES].copy_from_slice(&root.encode());
        // The root switch is the commit point: one 4 KiB chunk write, atomic.
        self.write_chunk(root_chunk(), 0, &block)?;
        let mut i = lock(&self.inner);
        i.root = root;
        i.chunk_k = 0;
        i.chunk_off = 0;
        i.next_taken = false;
        i.log_bytes = 0;
        i.checkpoint_bytes = total;
        Ok(())
    }

    /// Log and checkpoint figures for `status`.
    pub fn stats(&self) -> (u64, u64, u64, bool) {
        let i = lock(&self.inner);
        (
            i.root.generation,
            i.log_bytes,
            i.checkpoint_bytes,
            i.failed.is_some(),
        )
    }
}
