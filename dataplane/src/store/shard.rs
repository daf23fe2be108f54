//! One shard of the chunk store: a single-threaded state machine over a block device.
//!
//! A write lands in one of two ways:
//! - **in place**, when every block it covers is a hole in the committed chunk (new
//!   chunks, appends, filling sparse regions): the data goes straight to the chunk's
//!   extent, where nothing committed references those blocks yet;
//! - **copy-on-write**, when it overwrites committed blocks: the committed chunk is read,
//!   verified, merged with the new data in a scratch buffer and written to a fresh
//!   extent.
//!
//! Either way the write becomes visible only through a WAL record, so an update is
//! atomic. Data and WAL batches are written as durable writes (FUA / RWF_DSYNC), so a
//! completion means durable and no flush round-trip is needed. Commit is grouped: one
//! WAL batch carries the records of every write whose data is durable; when the batch
//! completes, its records are applied and the writes acknowledged.
//!
//! Ordering rules (checked at admission, so nothing locks):
//! - writes to overlapping blocks of a chunk, and truncate/delete, run one at a time in
//!   arrival order; disjoint in-place writes to one chunk run concurrently;
//! - copy-on-write, truncate and delete wait for every other write to the chunk;
//! - a write whose blocks a running read covers goes copy-on-write (a block truncated
//!   after the read began must not be rewritten in place under it);
//! - reads never wait: they see the committed state at their start, snapshotting the
//!   present bits and crcs they will verify against; extents they read stay allocated
//!   until they finish.
//!
//! A failed data flush or WAL write leaves the shard's durability unknown: the shard
//! fails its pending writes and refuses new ones (reads go on), and says why.

use std::sync::Arc;

use spool_hugepages::{DmaBuf, DmaPool, PagePolicy};

use super::codec::crc;
use super::format::{Geometry, BLOCK_SIZE, SNAP_HEADER_SIZE};
use super::index::ShardIndex;
use super::wal::{
    decode_body, BatchBuilder, BatchHeader, Crcs, Record, BATCH_HEADER_SIZE, BATCH_MAX,
};
use super::{
    ChunkDigest, ChunkId, ChunkInfo, ChunkOp, ReadCheck, ShardCompletion, ShardRequest, ShardStats,
    DIGEST_SIZE,
};
use crate::device::{run_sync, BlockDevice, IoCompletion, IoKind, IoRequest};
use crate::Error;

/// Size of one snapshot write; snapshots are streamed through buffers of this size.
const SNAP_PIECE: usize = 1 << 20;
const SNAP_PIECES_IN_FLIGHT: usize = 4;
/// Device ops a shard may have outstanding besides its op slots: one WAL write and
/// the snapshot pieces.
pub const SHARD_EXTRA_IOS: usize = 1 + SNAP_PIECES_IN_FLIGHT;

// Device tags: [shard local id: 16][kind: 8][index: 40].
const K_DATA: u64 = 1;
const K_COW_READ: u64 = 2;

const K_WAL: u64 = 4;
const K_SNAP: u64 = 5;

pub fn tag_shard(tag: u64) -> usize {
    (tag >> 48) as usize
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Free,
    /// Waiting for a conflicting op on its chunk (or for a scratch buffer).
    Deferred,
    CowReading,
    DataWriting,
    /// Data durable; waiting for a WAL batch.
    ReadyForWal,
    InWal,
    Reading,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Read,
    Truncate,
    Delete,
}

#[derive(Debug)]
struct Slot {
    stage: Stage,
    kind: Kind,
    seq: u64,
    tag: u64,
    chunk: ChunkId,
    offset: u32,
    len: u32,
    buf: Option<DmaBuf>,
    scratch: Option<DmaBuf>,
    /// Target extent (writes) or the extent being read.
    extent: u32,
    cow: bool,
    /// The extent was reserved for this op's chunk by this op (a new chunk).
    first_block: u32,
    nblocks: u32,
    /// New crcs (writes) or the crcs to verify (reads), indexed from `first_block`.
    crcs: Box<[u32]>,
    /// Present bits of the read range at read start.
    present: Box<[u64]>,
    info: ChunkInfo,
    version: u64,
    /// The version a mutation must commit with (0: the next one).
    want_version: u64,
    new_len: u32,
    read_check: ReadCheck,
    /// Set when a read completes with its verification left to the receiver.
    unverified: bool,
}

impl Slot {
    fn new(bpc: usize) -> Self {
        Slot {
            stage: Stage::Free,
            kind: Kind::Read,
            seq: 0,
            tag: 0,
            chunk: ChunkId { inode: 0, index: 0 },
            offset: 0,
            len: 0,
            buf: None,
            scratch: None,
            extent: 0,
            cow: false,
            first_block: 0,
            nblocks: 0,
            crcs: vec![0; bpc].into_boxed_slice(),
            present: vec![0; bpc.div_ceil(64)].into_boxed_slice(),
            info: ChunkInfo { len: 0, version: 0 },
            version: 0,
            want_version: 0,
            new_len: 0,
            read_check: ReadCheck::OnCore,
            unverified: false,
        }
    }
    fn blocks(&self) -> std::ops::Range<u32> {
        self.first_block..self.first_block + self.nblocks
    }
    fn mutates(&self) -> bool {
        self.kind != Kind::Read
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WalState {
    Idle,
    Writing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SnapState {
    Idle,
    /// Wanted; starts once no WAL batch is in flight.
    Pending,
    Writing,
}

/// One shard; see the module docs.
#[derive(Debug)]
pub struct Shard {
    id: u32,
    local: u16,
    geo: Geometry,
    index: ShardIndex,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    next_seq: u64,
    deferred: usize,
    rescan: bool,
    order: Vec<u32>,

    wal_state: WalState,
    wal_buf: Option<DmaBuf>,
    wal_batch: Vec<u32>,
    wal_pos: u64,
    wal_lsn: u64,
    generation: u64,

    snap_state: SnapState,
    snap_image: Vec<u8>,
    snap_next: usize,
    snap_out: usize,
    snap_pool: Arc<DmaPool>,
    scratch_pool: Arc<DmaPool>,
    failed: Option<String>,
    stats: ShardStats,
    /// crc32c of a 4 KiB block of zeros (what a hole reads as).
    zero_block_crc: u32,
}

impl Shard {
    /// Opens shard `id` of a formatted device: loads the newest valid snapshot, replays
    /// the WAL after it, and (if the WAL had anything) writes a fresh snapshot so the
    /// log restarts empty. `local` is the shard's number on its core (for device tags);
    /// `slots_max` bounds the ops it holds at once.
    pub fn open(
        dev: &mut dyn BlockDevice,
        geo: &Geometry,
        id: u32,
        local: u16,
        slots_max: usize,
    ) -> Result<Shard, Error> {
        assert!(slots_max > 0, "a shard needs op slots");
        let bpc = geo.blocks_per_chunk() as usize;
        let meta_pool = DmaPool::new("shard-meta", BATCH_MAX, 1, PagePolicy::Normal)?;
        let piece = SNAP_PIECE.min(geo.snapshot_slot_size as usize);
        let snap_pool = DmaPool::new(
            "shard-snap",
            piece,
            SNAP_PIECES_IN_FLIGHT,
            PagePolicy::Normal,
        )?;
        let scratch_pool = DmaPool::new(
            "cow-scratch",
            geo.chunk_size as usize,
            2,
            PagePolicy::PreferHuge,
        )?;
        let mut shard = Shard {
            id,
            local,
            geo: geo.clone(),
            index: ShardIndex::new(id, geo.extents_per_shard, geo.chunk_size)
                .with_store_id(geo.store_id),
            slots: (0..slots_max).map(|_| Slot::new(bpc)).collect(),
            free_slots: (0..slots_max as u32).rev().collect(),
            next_seq: 0,
            deferred: 0,
            rescan: false,
            order: Vec::with_capacity(slots_max),

            wal_state: WalState::Idle,
            wal_buf: meta_pool.alloc(),
            wal_batch: Vec::with_capacity(slots_max),
            wal_pos: 0,
            wal_lsn: 0,
            generation: 0,
            snap_state: SnapState::Idle,
            snap_image: Vec::new(),
            snap_next: 0,
            snap_out: 0,
            snap_pool,
            scratch_pool,
            failed: None,
            stats: ShardStats::default(),
            zero_block_crc: crc(&[0u8; BLOCK_SIZE as usize]),
        };
        let replayed = shard.recover(dev)?;
        if replayed > 0 {
            shard.snapshot_sync(dev)?;
        }
        Ok(shard)
    }

    pub fn id(&self) -> u32 {
        self.id
    }
    pub fn stats(&self) -> ShardStats {
        let mut s = self.stats;
        s.chunks = self.index.committed_chunks() as u64;
        s.free_extents = u64::from(self.index.free_extents());
        s.extents = u64::from(self.index.extents());
        s.generation = self.generation;
        s.wal_used_bytes = self.wal_pos;
        s.failed = self.failed.is_some();
        s
    }
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }
    /// Whether another request can be accepted now.
    pub fn has_room(&self) -> bool {
        !self.free_slots.is_empty()
    }
    /// Ops accepted and not yet completed.
    pub fn busy(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }
    pub fn index(&self) -> &ShardIndex {
        &self.index
    }

    fn dev_tag(&self, kind: u64, idx: u64) -> u64 {
        u64::from(self.local) << 48 | kind << 40 | idx
    }

    // ---- recovery -------------------------------------------------------------------

    fn read_region(
        dev: &mut dyn BlockDevice,
        pool: &Arc<DmaPool>,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        out.clear();
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(pool.buf_size());
            let n_io = n.div_ceil(4096) * 4096;
            assert!(n_io <= pool.buf_size(), "pool buffers are whole blocks");
            let buf = pool.alloc().ok_or(Error::Busy)?;
            let (r, buf) = run_sync(
                dev,
                IoRequest {
                    tag: 0,
                    kind: IoKind::Read,
                    offset: offset + done as u64,
                    len: n_io as u32,
                    buf: Some(buf),
                },
            );
            r?;
            out.extend_from_slice(&buf.expect("read returns its buffer").as_slice()[..n]);
            done += n;
        }
        Ok(())
    }

    fn recover(&mut self, dev: &mut dyn BlockDevice) -> Result<u64, Error> {
        let pool = Arc::clone(&self.snap_pool);
        let mut head = Vec::new();
        let mut loaded = None;
        // Try the newest valid header first; a torn body falls back to the other slot.
        let mut candidates: Vec<(u64, u32, u64)> = Vec::new();
        for slot in 0..2 {
            Self::read_region(
                dev,
                &pool,
                self.geo.snapshot_slot(self.id, slot),
                4096,
                &mut head,
            )?;
            if let Some((g, l)) = self.index.snapshot_header(&head) {
                candidates.push((g, slot, l));
            }
        }
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let mut image = std::mem::take(&mut self.snap_image);
        for (generation, slot, body_len) in candidates {
            // The header is checksummed but its length is still only a claim.
            if body_len.saturating_add(SNAP_HEADER_SIZE as u64) > self.geo.snapshot_slot_size {
                continue;
            }
            let total = SNAP_HEADER_SIZE + body_len as usize;
            Self::read_region(
                dev,
                &pool,
                self.geo.snapshot_slot(self.id, slot),
                total,
                &mut image,
            )?;
            let mut ix = ShardIndex::new(self.id, self.geo.extents_per_shard, self.geo.chunk_size)
                .with_store_id(self.geo.store_id);
            match ix.load_snapshot(&image) {
                Ok(g) => {
                    assert_eq!(g, generation);
                    self.index = ix;
                    loaded = Some(generation);
                    break;
                }
                Err(e) => {
                    tracing::warn!(shard = self.id, slot, error = %e, "snapshot slot unusable, trying the other")
                }
            }
        }
        self.snap_image = image;
        let Some(generation) = loaded else {
            return Err(Error::Corrupt {
                what: "shard",
                detail: format!("shard {}: no valid snapshot in either slot", self.id),
            });
        };
        self.generation = generation;

        // Replay the WAL of this generation, batch by batch.
        let wal_base = self.geo.wal_base(self.id);
        let wal_size = self.geo.wal_size as usize;
        let (mut pos, mut lsn) = (0usize, 0u64);
        let mut batch = Vec::new();
        while pos + 4096 <= wal_size {
            Self::read_region(dev, &pool, wal_base + pos as u64, 4096, &mut batch)?;
            let Some(h) = BatchHeader::decode(&batch) else {
                break;
            };
            if h.store_id != self.geo.store_id
                || h.generation != generation
                || h.lsn != lsn
                || h.wal_offset != pos as u64
                || pos + h.total_len() > wal_size
            {
                break;
            }
            if h.total_len() > 4096 {
                Self::read_region(dev, &pool, wal_base + pos as u64, h.total_len(), &mut batch)?;
            }
            let records = match decode_body(&h, &batch) {
                Ok(r) => r,
                // A torn body: this batch was never acknowledged.
                Err(_) => break,
            };
            for rec in &records {
                self.index.apply(rec)?;
            }
            pos += h.total_len();
            lsn += 1;
        }
        self.check_log_end(dev, &pool, generation, pos, lsn)?;
        self.wal_pos = pos as u64;
        self.wal_lsn = lsn;
        self.stats.replayed_batches = lsn;
        Ok(lsn)
    }

    /// Replay stopped at `end`. Batches are written one at a time and a generation's
    /// log only after its snapshot is durable, so the only batch that may legitimately
    /// be damaged is the one in flight at a crash: the last. A valid batch of this
    /// generation with a later lsn further on, or any batch of a newer generation,
    /// means acknowledged records were lost (media damage, or a newest snapshot that no
    /// longer reads): that is reported, never silently truncated.
    fn check_log_end(
        &self,
        dev: &mut dyn BlockDevice,
        pool: &Arc<DmaPool>,
        generation: u64,
        end: usize,
        lsn: u64,
    ) -> Result<(), Error> {
        let wal_size = self.geo.wal_size as usize;
        if end >= wal_size {
            return Ok(());
        }
        let mut rest = Vec::new();
        Self::read_region(
            dev,
            pool,
            self.geo.wal_base(self.id) + end as u64,
            wal_size - end,
            &mut rest,
        )?;
        for off in (0..rest.len()).step_by(4096) {
            let Some(h) =
                BatchHeader::decode(&rest[off..]).filter(|h| h.store_id == self.geo.store_id)
            else {
                continue;
            };
            let at = end + off;
            if h.generation > generation && h.wal_offset == at as u64 {
                return Err(Error::Corrupt {
                    what: "shard",
                    detail: format!(
                        "shard {}: the newest snapshot (generation {}) is unreadable and the log already continues \
                         from it (batch at WAL offset {at}); acknowledged writes cannot be rebuilt from generation {generation}",
                        self.id, h.generation
                    ),
                });
            }
            if h.generation == generation && h.lsn > lsn && h.wal_offset == at as u64 {
                return Err(Error::Corrupt {
                    what: "shard",
                    detail: format!(
                        "shard {}: WAL batch {lsn} at offset {end} is damaged but batch {} at offset {at} was written after it",
                        self.id, h.lsn
                    ),
                });
            }
        }
        Ok(())
    }

    /// Writes a snapshot of the committed state and restarts the WAL (start-up only).
    fn snapshot_sync(&mut self, dev: &mut dyn BlockDevice) -> Result<(), Error> {
        self.snap_state = SnapState::Pending;
        let mut done = Vec::with_capacity(dev.queue_depth_max());
        let mut out = Vec::new();
        while self.snap_state != SnapState::Idle {
            self.pump(dev, &mut out);
            done.clear();
            dev.poll(&mut done);
            for c in done.drain(..) {
                self.on_io(dev, c, &mut out);
            }
            if let Some(f) = &self.failed {
                return Err(Error::Corrupt {
                    what: "shard",
                    detail: f.clone(),
                });
            }
        }
        assert!(out.is_empty(), "no client ops during start-up");
        Ok(())
    }

    // ---- requests -------------------------------------------------------------------

    /// Accepts a request. Invalid requests complete at once with an error in `out`.
    /// Returns the request when the shard has no free slot.
    pub fn submit(
        &mut self,
        req: ShardRequest,
        out: &mut Vec<ShardCompletion>,
    ) -> Result<(), ShardRequest> {
        if let Err(e) = self.check(&req.op) {
            out.push(ShardCompletion::refused(req, e));
            return Ok(());
        }
        if let ChunkOp::Stat { chunk } = req.op {
            let info = self.committed_info(&chunk);
            out.push(ShardCompletion {
                tag: req.tag,
                result: Ok(info),
                buf: None,
                unverified: None,
            });
            return Ok(());
        }
        if let ChunkOp::List { after, mut buf, .. } = req.op {
            let n = self.list(after, &mut buf);
            out.push(ShardCompletion {
                tag: req.tag,
                result: Ok(ChunkInfo { len: n, version: 0 }),
                buf: Some(buf),
                unverified: None,
            });
            return Ok(());
        }
        if req.op.mutates() {
            if let Some(f) = &self.failed {
                let e = Error::Io { errno: 5 };
                tracing::debug!(shard = self.id, failure = %f, "write refused on failed shard");
                out.push(ShardCompletion::refused(req, e));
                return Ok(());
            }
        }
        let Some(idx) = self.free_slots.pop() else {
            return Err(req);
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let s = &mut self.slots[idx as usize];
        assert_eq!(s.stage, Stage::Free);
        s.seq = seq;
        s.tag = req.tag;
        s.read_check = req.read_check;
        s.want_version = if req.op.mutates() { req.version } else { 0 };
        s.unverified = false;
        s.cow = false;
        s.scratch = None;
        match req.op {
            ChunkOp::Write {
                chunk,
                offset,
                len,
                buf,
            } => {
                s.kind = Kind::Write;
                (s.chunk, s.offset, s.len, s.buf) = (chunk, offset, len, Some(buf));
                s.first_block = offset / BLOCK_SIZE;
                s.nblocks = (offset + len).div_ceil(BLOCK_SIZE) - s.first_block;
            }
            ChunkOp::Read {
                chunk,
                offset,
                len,
                buf,
            } => {
                s.kind = Kind::Read;
                (s.chunk, s.offset, s.len, s.buf) = (chunk, offset, len, Some(buf));
                s.first_block = offset / BLOCK_SIZE;
                s.nblocks = (offset + len).div_ceil(BLOCK_SIZE) - s.first_block;
            }
            ChunkOp::Truncate { chunk, len } => {
                s.kind = Kind::Truncate;
                (s.chunk, s.offset, s.len, s.buf) = (chunk, 0, len, None);
                (s.first_block, s.nblocks) = (0, 0);
            }
            ChunkOp::Delete { chunk } => {
                s.kind = Kind::Delete;
                (s.chunk, s.offset, s.len, s.buf) = (chunk, 0, 0, None);
                (s.first_block, s.nblocks) = (0, 0);
            }
            ChunkOp::Stat { .. } | ChunkOp::List { .. } => unreachable!("answered above"),
        }
        s.stage = Stage::Deferred;
        self.deferred += 1;
        self.rescan = true;
        Ok(())
    }

    fn check(&self, op: &ChunkOp) -> Result<(), Error> {
        let cs = self.geo.chunk_size;
        let bad = |m: String| Err(Error::BadRequest(m));
        match op {
            ChunkOp::Write {
                offset, len, buf, ..
            }
            | ChunkOp::Read {
                offset, len, buf, ..
            } => {
                if offset % BLOCK_SIZE != 0 {
                    return bad(format!("offset {offset} is not a multiple of {BLOCK_SIZE}"));
                }
                if *len == 0 || u64::from(*offset) + u64::from(*len) > u64::from(cs) {
                    return bad(format!(
                        "range {offset}+{len} is empty or beyond the chunk size {cs}"
                    ));
                }
                let need = (*len as usize).div_ceil(BLOCK_SIZE as usize) * BLOCK_SIZE as usize;
                if buf.capacity() < need {
                    return bad(format!(
                        "buffer of {} bytes cannot hold {need}",
                        buf.capacity()
                    ));
                }
                Ok(())
            }
            ChunkOp::Truncate { len, .. } if len % BLOCK_SIZE != 0 || *len > cs => bad(format!(
                "truncate length {len} must be a multiple of {BLOCK_SIZE} up to {cs}"
            )),
            _ => Ok(()),
        }
    }

    fn committed_info(&self, chunk: &ChunkId) -> ChunkInfo {
        match self.index.get(chunk) {
            Some(m) if m.version > 0 => ChunkInfo {
                len: m.len,
                version: m.version,
            },
            _ => ChunkInfo { len: 0, version: 0 },
        }
    }

    /// Whether deferred op `i` may start now, given every other op on its chunk.
    fn may_start(&self, i: usize) -> bool {
        let s = &self.slots[i];
        if s.kind == Kind::Read {
            return true;
        }
        let exclusive = s.kind != Kind::Write || s.want_version != 0 || self.needs_cow(s);
        for (j, o) in self.slots.iter().enumerate() {
            if j == i || o.stage == Stage::Free || o.chunk != s.chunk {
                continue;
            }
            if o.kind == Kind::Read {
                // Reads never hold a mutation back: a write that would change blocks
                // a running read covers goes copy-on-write instead (see needs_cow).
                continue;
            }
            // Another mutation of this chunk: earlier arrivals go first; running ones
            // exclude us if either side is exclusive or the blocks overlap.
            if o.stage == Stage::Deferred {
                if o.seq < s.seq {
                    return false;
                }
                continue;
            }
            let o_exclusive = o.kind != Kind::Write || o.cow || o.want_version != 0;
            let overlap = s.first_block < o.first_block + o.nblocks
                && o.first_block < s.first_block + s.nblocks;
            if exclusive || o_exclusive || overlap {
                return false;
            }
        }
        true
    }

    /// Whether write `s` must go copy-on-write: it overwrites committed blocks, or a
    /// read in flight covers some of its blocks in the chunk's current extent. The
    /// second case is a block truncated after the read began: rewriting it in place
    /// would change bytes under the read's recorded crc. Copy-on-write leaves the old
    /// extent untouched (and retired) until the read ends, so reads never wait.
    fn needs_cow(&self, s: &Slot) -> bool {
        let Some(m) = self.index.get(&s.chunk).filter(|m| m.version > 0) else {
            return false;
        };
        s.blocks().any(|b| self.index.is_present(m.extent, b))
            || self.slots.iter().any(|o| {
                o.kind == Kind::Read
                    && o.stage == Stage::Reading
                    && o.chunk == s.chunk
                    && o.extent == m.extent
                    && s.first_block < o.first_block + o.nblocks
                    && o.first_block < s.first_block + s.nblocks
            })
    }

    fn admit_deferred(&mut self, dev: &mut dyn BlockDevice, out: &mut Vec<ShardCompletion>) {
        if !self.rescan || self.deferred == 0 {
            return;
        }
        self.rescan = false;
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        order.extend(
            (0..self.slots.len() as u32)
                .filter(|&i| self.slots[i as usize].stage == Stage::Deferred),
        );
        order.sort_unstable_by_key(|&i| self.slots[i as usize].seq);
        for &i in &order {
            if self.may_start(i as usize) {
                self.start(dev, i as usize, out);
            }
        }
        self.order = order;
    }

    fn start(&mut self, dev: &mut dyn BlockDevice, i: usize, out: &mut Vec<ShardCompletion>) {
        let (want, chunk) = (self.slots[i].want_version, self.slots[i].chunk);
        if want != 0 {
            // Runs alone on its chunk (may_start), so the issued version cannot move
            // until this op's record is in a batch.
            let issued = self.index.get(&chunk).map_or(0, |m| m.issued_version);
            if want <= issued {
                self.leave_deferred(i);
                let e = Error::BadRequest(format!(
                    "chunk {chunk}: version {want} is not after the current {issued}"
                ));
                self.complete(i, Err(e), out);
                return;
            }
        }
        match self.slots[i].kind {
            Kind::Read => self.start_read(dev, i, out),
            Kind::Write => self.start_write(dev, i, out),
            Kind::Truncate | Kind::Delete => {
                self.leave_deferred(i);
                let chunk = self.slots[i].chunk;
                if self.index.get(&chunk).is_none_or(|m| m.version == 0) {
                    // Nothing committed: deleting or truncating it changes nothing.
                    let info = self.committed_info(&chunk);
                    self.complete(i, Ok(info), out);
                } else {
                    self.slots[i].stage = Stage::ReadyForWal;
                }
            }
        }
    }

    fn leave_deferred(&mut self, i: usize) {
        assert_eq!(self.slots[i].stage, Stage::Deferred);
        self.deferred -= 1;
    }

    fn start_read(&mut self, dev: &mut dyn BlockDevice, i: usize, out: &mut Vec<ShardCompletion>) {
        self.leave_deferred(i);
        let chunk = self.slots[i].chunk;
        let meta = self.index.get(&chunk).copied().filter(|m| m.version > 0);
        let s = &mut self.slots[i];
        let Some(m) = meta else {
            let len = s.len as usize;
            s.buf.as_mut().expect("read has a buffer").as_mut_slice()[..len].fill(0);
            self.complete(i, Ok(ChunkInfo { len: 0, version: 0 }), out);
            return;
        };
        s.info = ChunkInfo {
            len: m.len,
            version: m.version,
        };
        s.extent = m.extent;
        s.present.fill(0);
        let mut any = false;
        for (k, b) in s.blocks().enumerate() {
            if self.index.is_present(m.extent, b) {
                s.present[k / 64] |= 1 << (k % 64);
                s.crcs[k] = self.index.crc_of(m.extent, b);
                any = true;
            }
        }
        if !any {
            let len = s.len as usize;
            s.buf.as_mut().expect("read has a buffer").as_mut_slice()[..len].fill(0);
            let info = s.info;
            self.complete(i, Ok(info), out);
            return;
        }
        self.index.reader_enter(m.extent);
        let s = &mut self.slots[i];
        s.stage = Stage::Reading;
        let req = IoRequest {
            tag: u64::from(self.local) << 48 | K_DATA << 40 | i as u64,
            kind: IoKind::Read,
            offset: self.geo.extent_offset(self.id, m.extent)
                + u64::from(s.first_block * BLOCK_SIZE),
            len: s.nblocks * BLOCK_SIZE,
            buf: s.buf.take(),
        };
        self.issue(dev, i, req, out);
    }

    fn start_write(&mut self, dev: &mut dyn BlockDevice, i: usize, out: &mut Vec<ShardCompletion>) {
        let chunk = self.slots[i].chunk;
        let cow = self.needs_cow(&self.slots[i]);
        let scratch = if cow {
            match self.scratch_pool.alloc() {
                Some(b) => Some(b),
                // Stay deferred until a scratch buffer comes back.
                None => return,
            }
        } else {
            None
        };
        let existing = self.index.get(&chunk).copied();
        let extent = match existing {
            Some(m) if !cow => m.extent,
            _ => match self.index.reserve_extent() {
                Some(e) => e,
                None => {
                    self.leave_deferred(i);
                    self.stats.enospc += 1;
                    self.complete(i, Err(Error::NoSpace { shard: self.id }), out);
                    return;
                }
            },
        };
        if existing.is_none() {
            self.index.insert_pending(chunk, extent);
        }
        self.leave_deferred(i);
        let bs = BLOCK_SIZE as usize;
        let base = self.geo.extent_offset(self.id, extent);
        let s = &mut self.slots[i];
        s.extent = extent;
        s.cow = cow;
        // The tail of the last block is zero and each block has its crc: done by the
        // submitter when it sealed the buffer (off this core), else here.
        let len = s.len as usize;
        let padded = len.div_ceil(bs) * bs;
        let buf = s.buf.as_mut().expect("write has a buffer");
        if buf.sealed_len() != Some(len) {
            buf.seal(len, crc);
        }
        buf.set_len(buf.capacity());
        for k in 0..s.nblocks as usize {
            s.crcs[k] = buf.block_crc(k);
        }
        if cow {
            // Read the whole committed chunk; the merge happens when it arrives.
            let m = existing.expect("cow has a committed chunk");
            s.scratch = scratch;
            s.stage = Stage::CowReading;
            s.info = ChunkInfo {
                len: m.len,
                version: m.version,
            };
            let nb = m.len.div_ceil(BLOCK_SIZE).max(1);
            self.index.reader_enter(m.extent);
            let req = IoRequest {
                tag: self.dev_tag(K_COW_READ, i as u64),
                kind: IoKind::Read,
                offset: self.geo.extent_offset(self.id, m.extent),
                len: nb * BLOCK_SIZE,
                buf: self.slots[i].scratch.take(),
            };
            self.issue(dev, i, req, out);
        } else {
            s.stage = Stage::DataWriting;
            let req = IoRequest {
                tag: u64::from(self.local) << 48 | K_DATA << 40 | i as u64,
                kind: IoKind::WriteDurable,
                offset: base + u64::from(s.offset),
                len: padded as u32,
                buf: s.buf.take(),
            };
            self.issue(dev, i, req, out);
        }
    }

    /// Submits a device request for slot `i`; a refusal fails the op.
    fn issue(
        &mut self,
        dev: &mut dyn BlockDevice,
        i: usize,
        req: IoRequest,
        out: &mut Vec<ShardCompletion>,
    ) {
        if let Err((e, req)) = dev.submit(req) {
            // The core sizes the device queue for every slot, so this is a bad request.
            // A read gives back its hold on the extent it was going to read.
            let s = &mut self.slots[i];
            match s.stage {
                Stage::CowReading => {
                    s.scratch = req.buf;
                    let source = self
                        .index
                        .get(&s.chunk)
                        .expect("cow source stays committed")
                        .extent;
                    self.index.reader_exit(source);
                }
                Stage::Reading => {
                    s.buf = req.buf;
                    let extent = s.extent;
                    self.index.reader_exit(extent);
                }
                _ => s.buf = req.buf,
            }
            self.fail_op(i, e, out);
        }
    }

    // ---- completions ----------------------------------------------------------------

    /// Handles one device completion addressed to this shard.
    pub fn on_io(
        &mut self,
        dev: &mut dyn BlockDevice,
        c: IoCompletion,
        out: &mut Vec<ShardCompletion>,
    ) {
        let kind = c.tag >> 40 & 0xff;
        let idx = (c.tag & ((1 << 40) - 1)) as usize;
        match kind {
            K_DATA if self.slots[idx].stage == Stage::Reading => self.read_done(idx, c, out),
            K_DATA => {
                let s = &mut self.slots[idx];
                assert_eq!(
                    s.stage,
                    Stage::DataWriting,
                    "data write completion for a slot in {:?}",
                    s.stage
                );
                if s.cow {
                    // The merged copy is on the device: give the scratch back now, not
                    // at commit, so other copy-on-writes need not wait a WAL round-trip.
                    drop(c.buf);
                } else {
                    s.buf = c.buf;
                }
                match c.result {
                    Ok(()) => s.stage = Stage::ReadyForWal,
                    Err(e) => self.fail_op(idx, e, out),
                }
            }
            K_COW_READ => self.cow_read_done(dev, idx, c, out),

            K_WAL => {
                assert_eq!(self.wal_state, WalState::Writing);
                self.wal_buf = c.buf;
                match c.result {
                    Ok(()) => self.commit_batch(out),
                    Err(e) => {
                        self.wal_state = WalState::Idle;
                        self.fail_shard(format!("WAL write failed: {e}"), out);
                    }
                }
            }
            K_SNAP => {
                self.snap_out -= 1;
                drop(c.buf);
                if let Err(e) = c.result {
                    self.fail_shard(format!("snapshot write failed: {e}"), out);
                }
            }
            other => panic!("device completion with unknown kind {other}"),
        }
        self.rescan = true;
    }

    fn read_done(&mut self, i: usize, c: IoCompletion, out: &mut Vec<ShardCompletion>) {
        let extent = self.slots[i].extent;
        self.index.reader_exit(extent);
        let s = &mut self.slots[i];
        let mut buf = c.buf.expect("read returns its buffer");
        if let Err(e) = c.result {
            s.buf = Some(buf);
            self.stats.read_errors += 1;
            self.complete(i, Err(e), out);
            return;
        }
        let bs = BLOCK_SIZE as usize;
        let mut bad = None;
        let by_receiver = s.read_check == ReadCheck::ByReceiver;
        buf.set_len(buf.capacity());
        for k in 0..s.nblocks as usize {
            let present = s.present[k / 64] >> (k % 64) & 1 == 1;
            if !present {
                buf.as_mut_slice()[k * bs..(k + 1) * bs].fill(0);
            }
            if by_receiver {
                buf.set_block_crc(
                    k,
                    if present {
                        s.crcs[k]
                    } else {
                        self.zero_block_crc
                    },
                );
            } else if present {
                let got = crc(&buf.as_slice()[k * bs..(k + 1) * bs]);
                if got != s.crcs[k] && bad.is_none() {
                    bad = Some((s.first_block + k as u32, s.crcs[k], got));
                }
            }
        }
        s.unverified = by_receiver;
        buf.set_len(s.len as usize);
        s.buf = Some(buf);
        let info = s.info;
        match bad {
            Some((block, stored, computed)) => {
                self.stats.crc_errors += 1;
                let chunk = s.chunk.to_string();
                self.complete(
                    i,
                    Err(Error::BadChecksum {
                        chunk,
                        block,
                        stored,
                        computed,
                    }),
                    out,
                );
            }
            None => self.complete(i, Ok(info), out),
        }
    }

    fn cow_read_done(
        &mut self,
        dev: &mut dyn BlockDevice,
        i: usize,
        c: IoCompletion,
        out: &mut Vec<ShardCompletion>,
    ) {
        let old = self
            .index
            .get(&self.slots[i].chunk)
            .copied()
            .expect("cow source stays committed");
        self.index.reader_exit(old.extent);
        self.slots[i].scratch = c.buf;
        if let Err(e) = c.result {
            self.fail_op(i, e, out);
            return;
        }
        let bs = BLOCK_SIZE as usize;
        let nb_old = old.len.div_ceil(BLOCK_SIZE).max(1) as usize;
        // Verify what we copy: corruption must not be laundered into a fresh crc.
        let mut bad = None;
        {
            let s = &self.slots[i];
            let data = s.scratch.as_ref().expect("scratch back").as_slice();
            for b in 0..nb_old {
                if self.index.is_present(old.extent, b as u32) && !s.blocks().contains(&(b as u32))
                {
                    let got = crc(&data[b * bs..(b + 1) * bs]);
                    let stored = self.index.crc_of(old.extent, b as u32);
                    if got != stored {
                        bad = Some((b as u32, stored, got));
                        break;
                    }
                }
            }
        }
        if let Some((block, stored, computed)) = bad {
            self.stats.crc_errors += 1;
            let chunk = self.slots[i].chunk.to_string();
            self.fail_op(
                i,
                Error::BadChecksum {
                    chunk,
                    block,
                    stored,
                    computed,
                },
                out,
            );
            return;
        }
        let s = &mut self.slots[i];
        let (off, padded) = (s.offset as usize, (s.len as usize).div_ceil(bs) * bs);
        let src = s.buf.as_ref().expect("write keeps its buffer");
        let scratch = s.scratch.as_mut().expect("scratch back");
        scratch.as_mut_slice()[off..off + padded].copy_from_slice(&src.as_slice()[..padded]);
        let end_blocks = (nb_old * bs).max(off + padded);
        s.stage = Stage::DataWriting;
        self.stats.cow_bytes += end_blocks as u64;
        let req = IoRequest {
            tag: u64::from(self.local) << 48 | K_DATA << 40 | i as u64,
            kind: IoKind::WriteDurable,
            offset: self.geo.extent_offset(self.id, s.extent),
            len: end_blocks as u32,
            buf: s.scratch.take(),
        };
        self.issue(dev, i, req, out);
    }

    /// The WAL batch is durable: apply its records and acknowledge its ops.
    fn commit_batch(&mut self, out: &mut Vec<ShardCompletion>) {
        let batch = std::mem::take(&mut self.wal_batch);
        for &i in &batch {
            let i = i as usize;
            let s = &self.slots[i];
            assert_eq!(s.stage, Stage::InWal);
            let rec = Self::record_of(s);
            if let Err(e) = self.index.apply(&rec) {
                // We built this record ourselves: a refusal is a bug, not bad input.
                panic!("shard {}: committed record refused: {e}", self.id);
            }
            let info = match s.kind {
                Kind::Delete => ChunkInfo {
                    len: 0,
                    version: s.version,
                },
                _ => ChunkInfo {
                    len: s.new_len,
                    version: s.version,
                },
            };
            self.stats.commits += 1;
            self.complete(i, Ok(info), out);
        }
        self.wal_batch = batch;
        self.wal_batch.clear();
        self.wal_state = WalState::Idle;
        self.stats.wal_batches += 1;
        if self.wal_pos > self.geo.wal_size / 2 && self.snap_state == SnapState::Idle {
            self.snap_state = SnapState::Pending;
        }
    }

    fn record_of(s: &Slot) -> Record<'_> {
        match s.kind {
            Kind::Write => Record::Write {
                chunk: s.chunk,
                extent: s.extent,
                version: s.version,
                len: s.new_len,
                first: s.first_block,
                crcs: Crcs::Native(&s.crcs[..s.nblocks as usize]),
            },
            Kind::Truncate => Record::Truncate {
                chunk: s.chunk,
                version: s.version,
                len: s.new_len,
            },
            Kind::Delete => Record::Delete {
                chunk: s.chunk,
                version: s.version,
            },
            Kind::Read => unreachable!("reads have no record"),
        }
    }

    // ---- the pump -------------------------------------------------------------------

    /// Moves work forward: admits deferred ops, starts flushes, WAL batches and
    /// snapshots. Call after handling completions in each loop iteration.
    pub fn pump(&mut self, dev: &mut dyn BlockDevice, out: &mut Vec<ShardCompletion>) {
        self.admit_deferred(dev, out);
        if self.failed.is_some() {
            self.drain_failed(out);
        }
        if self.snap_state == SnapState::Pending && self.wal_state == WalState::Idle {
            self.start_snapshot();
        }
        if self.snap_state == SnapState::Writing {
            self.continue_snapshot(dev, out);
        }
        if self.wal_state == WalState::Idle
            && self.snap_state == SnapState::Idle
            && self.failed.is_none()
        {
            self.start_batch(dev, out);
        }
    }

    fn start_batch(&mut self, dev: &mut dyn BlockDevice, out: &mut Vec<ShardCompletion>) {
        if !self.slots.iter().any(|s| s.stage == Stage::ReadyForWal) {
            return;
        }
        let mut buf = self
            .wal_buf
            .take()
            .expect("WAL buffer is home when the WAL is idle");
        buf.set_len(buf.capacity());
        let mut b = BatchBuilder::for_store(self.geo.store_id);
        let room = (self.geo.wal_size - self.wal_pos) as usize;
        let mut ring_full = false;
        for i in 0..self.slots.len() {
            if self.slots[i].stage != Stage::ReadyForWal {
                continue;
            }
            let m = *self
                .index
                .get(&self.slots[i].chunk)
                .expect("a mutated chunk has an entry");
            let s = &mut self.slots[i];
            s.version = if s.want_version != 0 {
                assert!(s.want_version > m.issued_version, "checked at start");
                s.want_version
            } else {
                m.issued_version + 1
            };
            s.new_len = match s.kind {
                Kind::Write => m.issued_len.max(s.offset + s.len),
                Kind::Truncate => s.len,
                Kind::Delete | Kind::Read => 0,
            };
            let rec = Self::record_of(s);
            if !b.fits(&rec) {
                break;
            }
            let padded =
                (BATCH_HEADER_SIZE + b.body_len() + rec.encoded_len()).div_ceil(4096) * 4096;
            if padded > room {
                ring_full = true;
                break;
            }
            b.push(buf.as_mut_slice(), &rec);
            let (version, new_len, kind, chunk) = (s.version, s.new_len, s.kind, s.chunk);
            s.stage = Stage::InWal;
            let m = self.index.get_mut(&chunk).expect("entry");
            m.issued_version = version;
            if kind != Kind::Delete {
                m.issued_len = new_len;
            }
            self.wal_batch.push(i as u32);
        }
        if b.is_empty() {
            self.wal_buf = Some(buf);
            if ring_full {
                // Not even one record fits in what is left of the ring.
                self.snap_state = SnapState::Pending;
            }
            return;
        }
        let h = b.finish(
            buf.as_mut_slice(),
            self.generation,
            self.wal_lsn,
            self.wal_pos,
        );
        let len = h.total_len();
        let req = IoRequest {
            tag: self.dev_tag(K_WAL, 0),
            kind: IoKind::WriteDurable,
            offset: self.geo.wal_base(self.id) + self.wal_pos,
            len: len as u32,
            buf: Some(buf),
        };
        self.wal_pos += len as u64;
        self.wal_lsn += 1;
        self.wal_state = WalState::Writing;
        self.stats.wal_bytes += len as u64;
        if let Err((e, req)) = dev.submit(req) {
            self.wal_buf = req.buf;
            self.wal_state = WalState::Idle;
            self.fail_shard(format!("WAL write refused: {e}"), out);
        }
        if ring_full {
            self.snap_state = SnapState::Pending;
        }
    }

    fn start_snapshot(&mut self) {
        let mut image = std::mem::take(&mut self.snap_image);
        self.index.encode_snapshot(self.generation + 1, &mut image);
        assert!(
            image.len() as u64 <= self.geo.snapshot_slot_size,
            "snapshot fits its slot by construction"
        );
        image.resize(image.len().div_ceil(4096) * 4096, 0);
        self.snap_image = image;
        self.snap_next = 0;
        self.snap_out = 0;
        self.snap_state = SnapState::Writing;
    }

    fn continue_snapshot(&mut self, dev: &mut dyn BlockDevice, out: &mut Vec<ShardCompletion>) {
        let base = self
            .geo
            .snapshot_slot(self.id, ((self.generation + 1) % 2) as u32);
        while self.snap_next < self.snap_image.len() && self.snap_out < SNAP_PIECES_IN_FLIGHT {
            let Some(mut buf) = self.snap_pool.alloc() else {
                break;
            };
            let n = (self.snap_image.len() - self.snap_next).min(SNAP_PIECE);
            buf.as_mut_slice()[..n]
                .copy_from_slice(&self.snap_image[self.snap_next..self.snap_next + n]);
            let req = IoRequest {
                tag: self.dev_tag(K_SNAP, self.snap_next as u64),
                kind: IoKind::WriteDurable,
                offset: base + self.snap_next as u64,
                len: n as u32,
                buf: Some(buf),
            };
            if let Err((e, _)) = dev.submit(req) {
                self.fail_shard(format!("snapshot write refused: {e}"), out);
                return;
            }
            self.snap_next += n;
            self.snap_out += 1;
        }
        if self.snap_next == self.snap_image.len() && self.snap_out == 0 && self.failed.is_none() {
            // Every piece is durable: the new generation starts and the log restarts.
            self.generation += 1;
            self.wal_pos = 0;
            self.wal_lsn = 0;
            self.snap_state = SnapState::Idle;
            self.stats.snapshots += 1;
        }
    }

    // ---- failure and completion -------------------------------------------------------

    fn fail_shard(&mut self, why: String, out: &mut Vec<ShardCompletion>) {
        if self.failed.is_none() {
            tracing::error!(
                shard = self.id,
                "{why}; the shard refuses writes until restarted"
            );
            self.failed = Some(why);
        }
        self.snap_state = SnapState::Idle;
        self.drain_failed(out);
    }

    /// Fails every write waiting for a commit that can no longer happen.
    fn drain_failed(&mut self, out: &mut Vec<ShardCompletion>) {
        for i in 0..self.slots.len() {
            let st = self.slots[i].stage;
            let stuck = matches!(st, Stage::ReadyForWal | Stage::Deferred)
                || (st == Stage::InWal && self.wal_state == WalState::Idle);
            if self.slots[i].mutates() && stuck {
                // fail_op knows a deferred op reserved nothing and leaves `deferred`.
                self.fail_op(i, Error::Io { errno: 5 }, out);
            }
        }
        if self.wal_state == WalState::Idle {
            self.wal_batch.clear();
        }
    }

    fn fail_op(&mut self, i: usize, e: Error, out: &mut Vec<ShardCompletion>) {
        let s = &self.slots[i];
        if s.kind == Kind::Write && s.stage != Stage::Deferred {
            let (chunk, extent, cow) = (s.chunk, s.extent, s.cow);
            if cow {
                self.index.release_extent(extent);
            } else if self.index.get(&chunk).is_some_and(|m| m.version == 0)
                && !self.other_ops_on(i, chunk)
            {
                self.index.remove_pending(&chunk);
            }
        }
        if self.slots[i].stage == Stage::Deferred {
            self.deferred -= 1;
        }
        self.stats.write_errors += u64::from(self.slots[i].mutates());
        self.complete(i, Err(e), out);
    }

    /// Whether another write is running on `chunk` (and so still uses its pending
    /// extent). Deferred ops do not count: a write that starts later reserves afresh,
    /// and a truncate or delete of a never-committed chunk changes nothing.
    fn other_ops_on(&self, i: usize, chunk: ChunkId) -> bool {
        self.slots.iter().enumerate().any(|(j, o)| {
            j != i
                && o.chunk == chunk
                && o.kind == Kind::Write
                && !matches!(o.stage, Stage::Free | Stage::Deferred)
        })
    }

    /// Fills `buf` with digests of committed chunks after `after`, in chunk order;
    /// returns how many. Sorting the whole index per call is fine for resync, which
    /// lists each shard once per pass; it is never on the I/O path.
    fn list(&self, after: Option<ChunkId>, buf: &mut DmaBuf) -> u32 {
        let cap = buf.capacity() / DIGEST_SIZE;
        let mut ids: Vec<ChunkId> = self
            .index
            .chunks()
            .map(|(c, _)| *c)
            .filter(|c| after.is_none_or(|a| *c > a))
            .collect();
        ids.sort_unstable();
        ids.truncate(cap);
        buf.set_len(ids.len() * DIGEST_SIZE);
        let out = buf.as_mut_slice();
        for (k, c) in ids.iter().enumerate() {
            let m = self.index.get(c).expect("listed from the index");
            let d = ChunkDigest {
                chunk: *c,
                len: m.len,
                version: m.version,
                crc: self.index.digest_crc(m),
            };
            d.encode(&mut out[k * DIGEST_SIZE..(k + 1) * DIGEST_SIZE]);
        }
        ids.len() as u32
    }

    fn complete(
        &mut self,
        i: usize,
        result: Result<ChunkInfo, Error>,
        out: &mut Vec<ShardCompletion>,
    ) {
        let s = &mut self.slots[i];
        s.stage = Stage::Free;
        s.scratch = None;
        let mut buf = s.buf.take();
        if let (Some(b), Kind::Read) = (buf.as_mut(), s.kind) {
            b.set_len(s.len as usize);
        }
        let unverified =
            (s.unverified && result.is_ok()).then_some((s.chunk, s.first_block, s.nblocks));
        s.unverified = false;
        out.push(ShardCompletion {
            tag: s.tag,
            result,
            buf,
            unverified,
        });
        self.free_slots.push(i as u32);
        self.rescan = true;
    }
}
