//! The chunk store: chunks keyed by (inode, index) on a formatted device.
//!
//! `format` lays out a device; `CoreStore` is what one dataplane core owns: its block
//! device and the shards assigned to it. Every request is answered by a completion; a
//! write's completion means the data and its index record are durable on the device.

pub mod codec;
pub mod format;
pub mod fuzzing;
pub mod index;
pub mod shard;
pub mod wal;

use std::fmt;

use serde::Serialize;
use spool_hugepages::{DmaBuf, DmaPool, PagePolicy};

use crate::device::{run_sync, BlockDevice, IoCompletion, IoKind, IoRequest};
use crate::Error;
pub use format::{Geometry, Superblock, BLOCK_SIZE, FORMAT_VERSION};
pub use shard::Shard;

/// A chunk: the `index`-th fixed-size piece of file `inode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ChunkId {
    pub inode: u64,
    pub index: u32,
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.inode, self.index)
    }
}

impl ChunkId {
    /// The shard a chunk lives in: a stable hash, so a file's chunks spread over shards
    /// (and so over cores) and the mapping never changes for a formatted device.
    pub fn shard(&self, shard_count: u32) -> u32 {
        let mut h = self.inode.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ u64::from(self.index).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        (h % u64::from(shard_count)) as u32
    }
}

/// What a request does to a chunk. Offsets are multiples of `BLOCK_SIZE`; lengths are
/// any size up to the chunk's end (a partial last block is zero-padded). Buffers hold at
/// least the length rounded up to a block.
#[derive(Debug)]
pub enum ChunkOp {
    /// Durable when acknowledged; the buffer comes back.
    Write {
        chunk: ChunkId,
        offset: u32,
        len: u32,
        buf: DmaBuf,
    },
    /// Fills `len` bytes: data where written, zeros in holes and past the end.
    Read {
        chunk: ChunkId,
        offset: u32,
        len: u32,
        buf: DmaBuf,
    },
    /// Drops blocks from `len` (a multiple of `BLOCK_SIZE`) on.
    Truncate {
        chunk: ChunkId,
        len: u32,
    },
    Delete {
        chunk: ChunkId,
    },
    /// Committed length and version.
    Stat {
        chunk: ChunkId,
    },
    /// Lists one shard's committed chunks in chunk order, after `after`, as
    /// `DIGEST_SIZE`-byte `ChunkDigest` entries filling `buf` (resync diffs these).
    /// The completion's `len` is the number of entries; fewer than fit means the end.
    List {
        shard: u32,
        after: Option<ChunkId>,
        buf: DmaBuf,
    },
}

/// One chunk as `ChunkOp::List` reports it: enough to tell two replicas apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ChunkDigest {
    pub chunk: ChunkId,
    pub len: u32,
    pub version: u64,
    /// crc32c over the length and every block's crc (a hole counts as a zero block),
    /// so a hole and a written zero block compare equal.
    pub crc: u32,
}

/// Encoded size of a `ChunkDigest`: inode, index, len, version, crc.
pub const DIGEST_SIZE: usize = 8 + 4 + 4 + 8 + 4;

impl ChunkDigest {
    pub fn encode(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.chunk.inode.to_le_bytes());
        out[8..12].copy_from_slice(&self.chunk.index.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..24].copy_from_slice(&self.version.to_le_bytes());
        out[24..28].copy_from_slice(&self.crc.to_le_bytes());
    }
    pub fn decode(b: &[u8]) -> Option<ChunkDigest> {
        let b = b.get(..DIGEST_SIZE)?;
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(ChunkDigest {
            chunk: ChunkId {
                inode: u64_at(0),
                index: u32_at(8),
            },
            len: u32_at(12),
            version: u64_at(16),
            crc: u32_at(24),
        })
    }
}

impl ChunkOp {
    pub fn chunk(&self) -> ChunkId {
        match self {
            ChunkOp::Write { chunk, .. }
            | ChunkOp::Read { chunk, .. }
            | ChunkOp::Truncate { chunk, .. }
            | ChunkOp::Delete { chunk }
            | ChunkOp::Stat { chunk } => *chunk,
            // A listing addresses a shard, not a chunk: its cursor stands in.
            ChunkOp::List { after, .. } => after.unwrap_or(ChunkId { inode: 0, index: 0 }),
        }
    }
    /// The shard that serves the op.
    pub fn shard(&self, shard_count: u32) -> u32 {
        match self {
            ChunkOp::List { shard, .. } => *shard,
            op => op.chunk().shard(shard_count),
        }
    }
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            ChunkOp::Read { .. } | ChunkOp::Stat { .. } | ChunkOp::List { .. }
        )
    }
    pub fn into_buf(self) -> Option<DmaBuf> {
        match self {
            ChunkOp::Write { buf, .. } | ChunkOp::Read { buf, .. } | ChunkOp::List { buf, .. } => {
                Some(buf)
            }
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct ShardRequest {
    pub tag: u64,
    pub op: ChunkOp,
    /// Where a read's block checksums are verified.
    pub read_check: ReadCheck,
    /// For a mutation: 0 lets the store number it (the chunk's next version); any other
    /// value is the version it must commit with, above the chunk's current one
    /// (replicas apply the chain head's numbering). Such an op runs alone on its chunk.
    pub version: u64,
}

/// Where a read's checksums are verified. Verifying costs about as much CPU as the
/// read's memory bandwidth; on the client's thread it runs in parallel with other
/// clients and keeps the dataplane core free to keep the device busy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadCheck {
    /// The shard verifies before completing (direct users of the store).
    OnCore,
    /// The shard writes the expected crc of every block into the buffer's sidecar and
    /// the completion says so (`ShardCompletion::unverified`); the receiver must call
    /// `verify_read` before using the data. The engine's `Client` does.
    ByReceiver,
}

/// A chunk's committed length and version after the op (version 0: no such chunk).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ChunkInfo {
    pub len: u32,
    pub version: u64,
}

#[derive(Debug)]
pub struct ShardCompletion {
    pub tag: u64,
    pub result: Result<ChunkInfo, Error>,
    pub buf: Option<DmaBuf>,
    /// A read whose checksums are still to be verified: (chunk, first block, blocks).
    pub unverified: Option<(ChunkId, u32, u32)>,
}

impl ShardCompletion {
    /// The completion of a request refused without touching the device; its buffer
    /// goes back to the caller.
    pub fn refused(req: ShardRequest, e: Error) -> Self {
        ShardCompletion {
            tag: req.tag,
            result: Err(e),
            buf: req.op.into_buf(),
            unverified: None,
        }
    }
}

/// Verifies a read completed with `ReadCheck::ByReceiver`: every block of the buffer
/// against the crc the shard put in its sidecar. A mismatch turns the result into
/// `Error::BadChecksum`. Returns whether a mismatch was found.
pub fn verify_read(c: &mut ShardCompletion) -> bool {
    let Some((chunk, first, n)) = c.unverified.take() else {
        return false;
    };
    if c.result.is_err() {
        return false;
    }
    let Some(buf) = c.buf.as_mut() else {
        return false;
    };
    let bs = BLOCK_SIZE as usize;
    let len = buf.len();
    buf.set_len(buf.capacity());
    let mut bad = None;
    for k in 0..n as usize {
        let computed = crc32c::crc32c(&buf.as_slice()[k * bs..(k + 1) * bs]);
        let stored = buf.block_crc(k);
        if computed != stored {
            bad = Some(Error::BadChecksum {
                chunk: chunk.to_string(),
                block: first + k as u32,
                stored,
                computed,
            });
            break;
        }
    }
    buf.set_len(len);
    match bad {
        Some(e) => {
            c.result = Err(e);
            true
        }
        None => false,
    }
}

/// Counters a shard keeps (read by the control plane, never on the hot path).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ShardStats {
    pub chunks: u64,
    pub extents: u64,
    pub free_extents: u64,
    pub generation: u64,
    pub wal_used_bytes: u64,
    pub wal_bytes: u64,
    pub wal_batches: u64,
    pub commits: u64,
    pub flushes: u64,
    pub snapshots: u64,
    pub replayed_batches: u64,
    pub cow_bytes: u64,
    pub crc_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub enospc: u64,
    pub failed: bool,
}

/// Options for `format`.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    pub chunk_size: u32,
    pub shards: u32,
    /// 0 picks a default.
    pub wal_size: u64,
    /// Overwrite a device that holds a Spool or another filesystem.
    pub force: bool,
}

fn one_block(len: usize) -> Result<DmaBuf, Error> {
    let pool = DmaPool::new("format", len.div_ceil(4096) * 4096, 1, PagePolicy::Normal)?;
    Ok(pool.alloc().expect("a fresh pool has a buffer"))
}

/// Reads the first `len` bytes of the device (a multiple of 4 KiB).
fn read_head(dev: &mut dyn BlockDevice, len: usize) -> Result<DmaBuf, Error> {
    let buf = one_block(len)?;
    let req = IoRequest {
        tag: 0,
        kind: IoKind::Read,
        offset: 0,
        len: len as u32,
        buf: Some(buf),
    };
    let (r, buf) = run_sync(dev, req);
    r?;
    Ok(buf.expect("read returns its buffer"))
}

/// Reads and verifies the superblock.
pub fn read_superblock(dev: &mut dyn BlockDevice) -> Result<Superblock, Error> {
    let sb = Superblock::decode(read_head(dev, format::SUPERBLOCK_SIZE)?.as_slice())?;
    if sb.geometry.device_size > dev.info().size_bytes {
        return Err(Error::Corrupt {
            what: "superblock",
            detail: format!(
                "formatted for {} bytes but the device has {}",
                sb.geometry.device_size,
                dev.info().size_bytes
            ),
        });
    }
    Ok(sb)
}

/// Lays out a fresh store. Refuses a device holding a Spool or a known filesystem
/// unless `force`.
pub fn format(dev: &mut dyn BlockDevice, opts: &FormatOptions) -> Result<Superblock, Error> {
    let size = dev.info().size_bytes;
    let mut geometry = Geometry::compute(size, opts.chunk_size, opts.shards, opts.wal_size)?;
    if !opts.force {
        let probe_len = (128u64 << 10).min(size / 4096 * 4096) as usize;
        if let Some(what) = format::probe_signature(read_head(dev, probe_len)?.as_slice()) {
            return Err(Error::Occupied(what.to_owned()));
        }
    }
    let uuid = *uuid::Uuid::new_v4().as_bytes();
    geometry.store_id = format::store_id_of(&uuid);
    let sb = Superblock {
        version: FORMAT_VERSION,
        uuid,
        created_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        geometry: geometry.clone(),
    };
    let write =
        |dev: &mut dyn BlockDevice, offset: u64, fill: &dyn Fn(&mut [u8])| -> Result<(), Error> {
            let mut buf = one_block(4096)?;
            buf.as_mut_slice().fill(0);
            fill(buf.as_mut_slice());
            run_sync(
                dev,
                IoRequest {
                    tag: 0,
                    kind: IoKind::Write,
                    offset,
                    len: 4096,
                    buf: Some(buf),
                },
            )
            .0
        };
    // Shards first, superblock last: a device is a Spool only once all of it is laid out.
    for shard in 0..geometry.shard_count {
        let empty =
            index::ShardIndex::new(shard, 2, geometry.chunk_size).with_store_id(geometry.store_id);
        let mut image = Vec::new();
        empty.encode_snapshot(1, &mut image);
        // Generation g lives in slot g % 2: the empty generation 1 in slot 1.
        write(dev, geometry.snapshot_slot(shard, 1), &|b| {
            b[..image.len()].copy_from_slice(&image)
        })?;
        write(dev, geometry.snapshot_slot(shard, 0), &|_| {})?;
        write(dev, geometry.wal_base(shard), &|_| {})?;
    }
    run_sync(dev, IoRequest::flush(0)).0?;
    write(dev, 0, &|b| sb.encode(b))?;
    run_sync(dev, IoRequest::flush(0)).0?;
    Ok(sb)
}

/// Everything one dataplane core owns: its device queue and its shards.
#[derive(Debug)]
pub struct CoreStore {
    dev: Box<dyn BlockDevice>,
    geometry: Geometry,
    shards: Vec<Shard>,
    io_done: Vec<IoCompletion>,
}

impl CoreStore {
    /// Opens (recovers) `shard_ids` on `dev`. The device's queue depth is split among
    /// the shards so a shard's device submissions never find the queue full.
    pub fn open(
        mut dev: Box<dyn BlockDevice>,
        geometry: &Geometry,
        shard_ids: &[u32],
    ) -> Result<Self, Error> {
        assert!(!shard_ids.is_empty(), "a core owns at least one shard");
        let per_shard = dev.queue_depth_max() / shard_ids.len();
        if per_shard <= shard::SHARD_EXTRA_IOS {
            return Err(Error::BadRequest(format!(
                "queue depth {} is too small for {} shard(s) on one core (need more than {} each)",
                dev.queue_depth_max(),
                shard_ids.len(),
                shard::SHARD_EXTRA_IOS
            )));
        }
        let slots = per_shard - shard::SHARD_EXTRA_IOS;
        let mut shards = Vec::with_capacity(shard_ids.len());
        for (local, &id) in shard_ids.iter().enumerate() {
            assert!(id < geometry.shard_count, "shard {id} out of range");
            shards.push(Shard::open(
                dev.as_mut(),
                geometry,
                id,
                local as u16,
                slots,
            )?);
        }
        let io_done = Vec::with_capacity(dev.queue_depth_max());
        Ok(CoreStore {
            dev,
            geometry: geometry.clone(),
            shards,
            io_done,
        })
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }
    pub fn device(&self) -> &dyn BlockDevice {
        self.dev.as_ref()
    }

    /// Which of this core's shards (by position) holds `chunk`, if any.
    pub fn local_shard(&self, chunk: &ChunkId) -> Option<usize> {
        let id = chunk.shard(self.geometry.shard_count);
        self.shards.iter().position(|s| s.id() == id)
    }

    /// Hands a request to its shard. Returns it when that shard has no free slot.
    /// A chunk of a shard this core does not own is answered with an error.
    pub fn submit(
        &mut self,
        req: ShardRequest,
        out: &mut Vec<ShardCompletion>,
    ) -> Result<(), ShardRequest> {
        let id = req.op.shard(self.geometry.shard_count);
        let Some(local) = self.shards.iter().position(|s| s.id() == id) else {
            let e = Error::BadRequest(format!("shard {id} is not on this core"));
            out.push(ShardCompletion::refused(req, e));
            return Ok(());
        };
        self.shards[local].submit(req, out)
    }

    /// One turn of the loop: issue and reap device I/O, advance every shard. Returns
    /// how much happened (0 means idle).
    pub fn poll(&mut self, out: &mut Vec<ShardCompletion>) -> usize {
        let before = out.len();
        for s in &mut self.shards {
            s.pump(self.dev.as_mut(), out);
        }
        let n = self.dev.poll(&mut self.io_done);
        for c in self.io_done.drain(..) {
            let local = shard::tag_shard(c.tag);
            self.shards[local].on_io(self.dev.as_mut(), c, out);
        }
        if n > 0 {
            for s in &mut self.shards {
                s.pump(self.dev.as_mut(), out);
            }
        }
        n + (out.len() - before)
    }

    /// Lets the device block for up to `timeout` waiting for a completion (see
    /// `BlockDevice::wait`).
    pub fn wait_io(&mut self, timeout: std::time::Duration) {
        self.dev.wait(timeout);
    }

    /// Ops accepted and not yet completed, across shards.
    pub fn busy(&self) -> usize {
        self.shards.iter().map(Shard::busy).sum()
    }

    pub fn stats(&self) -> Vec<ShardStats> {
        self.shards.iter().map(Shard::stats).collect()
    }

    /// Runs until every accepted op has completed (tools and tests).
    pub fn drain(&mut self, out: &mut Vec<ShardCompletion>) {
        let mut spins = 0u64;
        while self.busy() > 0 {
            if self.poll(out) == 0 {
                spins += 1;
                std::thread::yield_now();
            }
            assert!(spins < 100_000_000, "store made no progress");
        }
    }
}
