//! A shard's chunk index in memory: chunk -> extent, length, version, and per extent a
//! bitmap of present blocks and their crc32c. All of it is allocated once, sized for
//! every extent of the shard, so the hot path never allocates (the hash map is created
//! with capacity for every extent and never grows past it).
//!
//! `apply` is the one function that changes committed state: the live commit path and
//! WAL replay both call it with the same records, so what was acknowledged is exactly
//! what recovery rebuilds. It validates every record and answers bad ones with
//! `Error::Corrupt`.

use rustc_hash::FxHashMap;

use super::codec::{crc, Reader, Writer};
use super::format::{BLOCK_SIZE, SNAP_HEADER_SIZE};
use super::wal::Record;
use super::ChunkId;
use crate::Error;

pub const SNAP_MAGIC: &[u8; 8] = b"SPOOLSNP";

/// Committed facts about one chunk, plus what in-flight records have already claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub extent: u32,
    /// Committed length in bytes.
    pub len: u32,
    /// Committed version; 0 means no write has committed yet (the entry exists only to
    /// hold the extent reserved for in-flight writes).
    pub version: u64,
    /// Length and version including records serialized but not yet committed.
    pub issued_len: u32,
    pub issued_version: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExtentState {
    Free,
    /// Allocated to an in-flight write, not yet referenced by committed state.
    Reserved,
    Used,
    /// Released while reads were in flight; becomes free when the last one ends.
    Retired,
}

/// One shard's committed chunk index.
#[derive(Debug)]
pub struct ShardIndex {
    shard: u32,
    /// The store's id (see `BatchHeader::store_id`); snapshots carry and check it.
    store_id: u64,
    extents: u32,
    blocks_per_chunk: u32,
    words_per_extent: usize,
    map: FxHashMap<ChunkId, ChunkMeta>,
    crcs: Vec<u32>,
    present: Vec<u64>,
    state: Vec<ExtentState>,
    readers: Vec<u32>,
    free: Vec<u32>,
}

impl ShardIndex {
    pub fn new(shard: u32, extents: u32, chunk_size: u32) -> Self {
        let bpc = chunk_size / BLOCK_SIZE;
        let words = (bpc as usize).div_ceil(64);
        let mut map = FxHashMap::default();
        map.reserve(extents as usize);
        ShardIndex {
            shard,
            store_id: 0,
            extents,
            blocks_per_chunk: bpc,
            words_per_extent: words,
            map,
            crcs: vec![0; extents as usize * bpc as usize],
            present: vec![0; extents as usize * words],
            state: vec![ExtentState::Free; extents as usize],
            readers: vec![0; extents as usize],
            // Pop from the end: hand out low extents first.
            free: (0..extents).rev().collect(),
        }
    }

    /// Binds this index's snapshots to a store (builder style).
    pub fn with_store_id(mut self, store_id: u64) -> Self {
        self.store_id = store_id;
        self
    }
    pub fn blocks_per_chunk(&self) -> u32 {
        self.blocks_per_chunk
    }
    pub fn get(&self, chunk: &ChunkId) -> Option<&ChunkMeta> {
        self.map.get(chunk)
    }
    pub fn get_mut(&mut self, chunk: &ChunkId) -> Option<&mut ChunkMeta> {
        self.map.get_mut(chunk)
    }
    pub fn free_extents(&self) -> u32 {
        self.free.len() as u32
    }
    pub fn extents(&self) -> u32 {
        self.extents
    }
    /// Chunks with committed data.
    pub fn committed_chunks(&self) -> usize {
        self.map.values().filter(|m| m.version > 0).count()
    }
    pub fn chunks(&self) -> impl Iterator<Item = (&ChunkId, &ChunkMeta)> {
        self.map.iter().filter(|(_, m)| m.version > 0)
    }

    /// crc32c over a chunk's length and its blocks' crcs up to that length, a hole
    /// counting as a block of zeros (see `ChunkDigest::crc`).
    pub fn digest_crc(&self, m: &ChunkMeta) -> u32 {
        let zero = zero_block_crc();
        let mut c = crc32c::crc32c(&m.len.to_le_bytes());
        for b in 0..m.len.div_ceil(BLOCK_SIZE) {
            let bc = if self.is_present(m.extent, b) {
                self.crc_of(m.extent, b)
            } else {
                zero
            };
            c = crc32c::crc32c_append(c, &bc.to_le_bytes());
        }
        c
    }

    pub fn is_present(&self, extent: u32, block: u32) -> bool {
        let w = extent as usize * self.words_per_extent + block as usize / 64;
        self.present[w] >> (block % 64) & 1 == 1
    }
    pub fn crc_of(&self, extent: u32, block: u32) -> u32 {
        self.crcs[extent as usize * self.blocks_per_chunk as usize + block as usize]
    }
    fn set_block(&mut self, extent: u32, block: u32, c: u32) {
        let w = extent as usize * self.words_per_extent + block as usize / 64;
        self.present[w] |= 1 << (block % 64);
        self.crcs[extent as usize * self.blocks_per_chunk as usize + block as usize] = c;
    }
    fn clear_row(&mut self, extent: u32) {
        let w = extent as usize * self.words_per_extent;
        self.present[w..w + self.words_per_extent].fill(0);
    }
    fn copy_row(&mut self, from: u32, to: u32) {
        let (w, bpc) = (self.words_per_extent, self.blocks_per_chunk as usize);
        self.present
            .copy_within(from as usize * w..(from as usize + 1) * w, to as usize * w);
        self.crcs.copy_within(
            from as usize * bpc..(from as usize + 1) * bpc,
            to as usize * bpc,
        );
    }

    /// Takes a free extent for an in-flight write (`None`: the shard is full).
    pub fn reserve_extent(&mut self) -> Option<u32> {
        let e = self.free.pop()?;
        assert_eq!(
            self.state[e as usize],
            ExtentState::Free,
            "free list holds free extents"
        );
        self.state[e as usize] = ExtentState::Reserved;
        self.clear_row(e);
        Some(e)
    }

    /// Gives back an extent no committed state references (failed write, CoW source,
    /// deleted chunk). It stays retired while reads of it are in flight.
    pub fn release_extent(&mut self, e: u32) {
        let s = &mut self.state[e as usize];
        assert!(
            matches!(*s, ExtentState::Reserved | ExtentState::Used),
            "release of a {s:?} extent"
        );
        if self.readers[e as usize] > 0 {
            *s = ExtentState::Retired;
        } else {
            *s = ExtentState::Free;
            self.free.push(e);
        }
    }

    pub fn reader_enter(&mut self, e: u32) {
        self.readers[e as usize] += 1;
    }
    pub fn reader_exit(&mut self, e: u32) {
        let r = &mut self.readers[e as usize];
        assert!(*r > 0, "reader count underflow on extent {e}");
        *r -= 1;
        if *r == 0 && self.state[e as usize] == ExtentState::Retired {
            self.state[e as usize] = ExtentState::Free;
            self.free.push(e);
        }
    }
    pub fn readers(&self, e: u32) -> u32 {
        self.readers[e as usize]
    }

    /// Creates the uncommitted entry that holds a new chunk's reserved extent.
    pub fn insert_pending(&mut self, chunk: ChunkId, extent: u32) {
        assert_eq!(
            self.state[extent as usize],
            ExtentState::Reserved,
            "pending chunk needs a reserved extent"
        );
        let old = self.map.insert(
            chunk,
            ChunkMeta {
                extent,
                len: 0,
                version: 0,
                issued_len: 0,
                issued_version: 0,
            },
        );
        assert!(old.is_none(), "insert_pending over an existing chunk");
    }

    /// Drops an entry no write ever committed to, freeing its extent.
    pub fn remove_pending(&mut self, chunk: &ChunkId) {
        let Some(m) = self.map.get(chunk).copied() else {
            return;
        };
        assert_eq!(m.version, 0, "remove_pending on a committed chunk");
        if m.issued_version == 0 {
            self.map.remove(chunk);
            self.release_extent(m.extent);
        }
    }

    fn corrupt(&self, detail: String) -> Error {
        Error::Corrupt {
            what: "chunk index record",
            detail: format!("shard {}: {detail}", self.shard),
        }
    }

    /// Applies one committed change. Replay passes records read from the device; the
    /// live path passes the records it just made durable.
    pub fn apply(&mut self, rec: &Record<'_>) -> Result<(), Error> {
        let chunk_size = self.blocks_per_chunk * BLOCK_SIZE;
        match *rec {
            Record::Write {
                chunk,
                extent,
                version,
                len,
                first,
                crcs,
            } => {
                let n = crcs.len() as u64;
                if version == 0 {
                    // Version 0 means "never committed": a record cannot carry it.
                    return Err(self.corrupt(format!("write {chunk} with version 0")));
                }
                if extent >= self.extents
                    || len > chunk_size
                    || u64::from(first) + n > u64::from(self.blocks_per_chunk)
                    || n == 0
                {
                    return Err(self.corrupt(format!(
                        "write {chunk} extent {extent} len {len} blocks {first}+{n} outside the geometry"
                    )));
                }
                let fresh = |s: ExtentState| matches!(s, ExtentState::Free | ExtentState::Reserved);
                match self.map.get(&chunk).copied() {
                    Some(m) if version <= m.version => {
                        return Err(self.corrupt(format!(
                            "write {chunk} version {version} not after {}",
                            m.version
                        )))
                    }
                    Some(m) if m.extent == extent => {}
                    Some(m) => {
                        // Copy-on-write: the chunk moved to a fresh extent holding a copy
                        // of its other blocks.
                        if !fresh(self.state[extent as usize]) {
                            return Err(self.corrupt(format!(
                                "write {chunk} moves into extent {extent} in use"
                            )));
                        }
                        self.take_extent(extent);
                        self.copy_row(m.extent, extent);
                        self.release_extent(m.extent);
                    }
                    None => {
                        if !fresh(self.state[extent as usize]) {
                            return Err(self
                                .corrupt(format!("new chunk {chunk} in extent {extent} in use")));
                        }
                        self.take_extent(extent);
                        self.clear_row(extent);
                    }
                }
                for i in 0..crcs.len() {
                    self.set_block(extent, first + i as u32, crcs.get(i));
                }
                self.state[extent as usize] = ExtentState::Used;
                let m = self.map.entry(chunk).or_insert(ChunkMeta {
                    extent,
                    len: 0,
                    version: 0,
                    issued_len: 0,
                    issued_version: 0,
                });
                m.extent = extent;
                m.len = len;
                m.version = version;
                m.issued_len = m.issued_len.max(len);
                m.issued_version = m.issued_version.max(version);
            }
            Record::Truncate {
                chunk,
                version,
                len,
            } => {
                let Some(m) = self.map.get(&chunk).copied().filter(|m| m.version > 0) else {
                    return Err(self.corrupt(format!("truncate of unknown chunk {chunk}")));
                };
                if version <= m.version || len > chunk_size || len % BLOCK_SIZE != 0 {
                    return Err(self.corrupt(format!(
                        "truncate {chunk} version {version} len {len} invalid"
                    )));
                }
                let from = (len / BLOCK_SIZE) as usize;
                let base = m.extent as usize * self.words_per_extent;
                for b in from..self.blocks_per_chunk as usize {
                    self.present[base + b / 64] &= !(1 << (b % 64));
                }
                let e = self.map.get_mut(&chunk).expect("checked above");
                e.len = len;
                e.version = version;
                e.issued_len = if e.issued_version <= version {
                    len
                } else {
                    e.issued_len
                };
                e.issued_version = e.issued_version.max(version);
            }
            Record::Delete { chunk, version } => {
                let Some(m) = self.map.get(&chunk).copied().filter(|m| m.version > 0) else {
                    return Err(self.corrupt(format!("delete of unknown chunk {chunk}")));
                };
                if version <= m.version {
                    return Err(self.corrupt(format!(
                        "delete {chunk} version {version} not after {}",
                        m.version
                    )));
                }
                self.map.remove(&chunk);
                self.release_extent(m.extent);
            }
        }
        Ok(())
    }

    /// Moves a Free or Reserved extent out of the free list if it is there (replay
    /// takes extents straight from records; the live path reserved them already).
    fn take_extent(&mut self, e: u32) {
        if self.state[e as usize] == ExtentState::Free {
            let pos = self
                .free
                .iter()
                .rposition(|&x| x == e)
                .expect("free extent is on the free list");
            self.free.swap_remove(pos);
            self.state[e as usize] = ExtentState::Reserved;
        }
    }

    /// Serializes the committed state as snapshot `generation` into `out` (cleared
    /// first; its capacity is reused across snapshots).
    pub fn encode_snapshot(&self, generation: u64, out: &mut Vec<u8>) {
        out.clear();
        out.resize(SNAP_HEADER_SIZE, 0);
        let words = self.words_per_extent;
        let bitmap_bytes = (self.blocks_per_chunk as usize).div_ceil(8);
        let mut count = 0u32;
        let mut entry = vec![0u8; 28 + bitmap_bytes + 4 * self.blocks_per_chunk as usize];
        for (c, m) in self.chunks() {
            let mut w = Writer::new(&mut entry);
            w.u64(c.inode);
            w.u32(c.index);
            w.u32(m.extent);
            w.u32(m.len);
            w.u64(m.version);
            let row = &self.present[m.extent as usize * words..(m.extent as usize + 1) * words];
            for (i, word) in row.iter().enumerate() {
                let bytes = word.to_le_bytes();
                let take = (bitmap_bytes - 8 * i).min(8);
                w.bytes(&bytes[..take]);
            }
            for b in 0..self.blocks_per_chunk {
                if self.is_present(m.extent, b) {
                    w.u32(self.crc_of(m.extent, b));
                }
            }
            let n = w.pos();
            out.extend_from_slice(&entry[..n]);
            count += 1;
        }
        let body_len = (out.len() - SNAP_HEADER_SIZE) as u64;
        let body_crc = crc(&out[SNAP_HEADER_SIZE..]);
        let mut w = Writer::new(&mut out[..SNAP_HEADER_SIZE]);
        w.bytes(SNAP_MAGIC);
        w.u64(self.store_id);
        w.u64(generation);
        w.u32(self.shard);
        w.u32(count);
        w.u64(body_len);
        w.u32(body_crc);
        let hc = crc(&out[..44]);
        out[44..48].copy_from_slice(&hc.to_le_bytes());
    }

    /// Reads a snapshot header: `(generation, body_len)`, or `None` when the slot holds
    /// no valid snapshot of this shard of this store.
    pub fn snapshot_header(&self, buf: &[u8]) -> Option<(u64, u64)> {
        if buf.len() < SNAP_HEADER_SIZE || &buf[..8] != SNAP_MAGIC {
            return None;
        }
        if u32::from_le_bytes(buf[44..48].try_into().ok()?) != crc(&buf[..44]) {
            return None;
        }
        let mut r = Reader::new(&buf[8..44], "snapshot header");
        let store_id = r.u64().ok()?;
        let generation = r.u64().ok()?;
        let shard = r.u32().ok()?;
        let _count = r.u32().ok()?;
        let body_len = r.u64().ok()?;
        (shard == self.shard && store_id == self.store_id).then_some((generation, body_len))
    }

    /// Loads a whole snapshot (header and body) into this empty index.
    pub fn load_snapshot(&mut self, buf: &[u8]) -> Result<u64, Error> {
        assert!(self.map.is_empty(), "load_snapshot into a fresh index");
        let (generation, body_len) = self
            .snapshot_header(buf)
            .ok_or_else(|| self.corrupt("snapshot header invalid".into()))?;
        let mut r = Reader::new(&buf[8..44], "snapshot header");
        r.bytes(20)?;
        let count = r.u32()?;
        r.u64()?;
        let body_crc = r.u32()?;
        let body = usize::try_from(body_len)
            .ok()
            .and_then(|l| l.checked_add(SNAP_HEADER_SIZE))
            .and_then(|end| buf.get(SNAP_HEADER_SIZE..end))
            .ok_or_else(|| {
                self.corrupt(format!("snapshot body of {body_len} bytes beyond its slot"))
            })?;
        if crc(body) != body_crc {
            return Err(self.corrupt("snapshot body checksum mismatch".into()));
        }
        let bitmap_bytes = (self.blocks_per_chunk as usize).div_ceil(8);
        let mut r = Reader::new(body, "snapshot entry");
        let mut crcs = vec![0u32; self.blocks_per_chunk as usize];
        for _ in 0..count {
            let chunk = ChunkId {
                inode: r.u64()?,
                index: r.u32()?,
            };
            let extent = r.u32()?;
            let len = r.u32()?;
            let version = r.u64()?;
            let bitmap = r.bytes(bitmap_bytes)?;
            if extent >= self.extents
                || self.state[extent as usize] != ExtentState::Free
                || version == 0
                || self.map.contains_key(&chunk)
            {
                return Err(self.corrupt(format!(
                    "snapshot entry {chunk} extent {extent} version {version} invalid or duplicate"
                )));
            }
            if len > self.blocks_per_chunk * BLOCK_SIZE {
                return Err(self.corrupt(format!(
                    "snapshot entry {chunk} len {len} beyond chunk size"
                )));
            }
            self.take_extent(extent);
            self.clear_row(extent);
            for b in 0..self.blocks_per_chunk as usize {
                if bitmap[b / 8] >> (b % 8) & 1 == 1 {
                    crcs[b] = r.u32()?;
                    self.set_block(extent, b as u32, crcs[b]);
                }
            }
            self.state[extent as usize] = ExtentState::Used;
            self.map.insert(
                chunk,
                ChunkMeta {
                    extent,
                    len,
                    version,
                    issued_len: len,
                    issued_version: version,
                },
            );
        }
        if r.remaining() != 0 {
            return Err(self.corrupt(format!("{} trailing snapshot bytes", r.remaining())));
        }
        Ok(generation)
    }
}

/// The crc32c of a block of zeros (what a hole reads as).
pub fn zero_block_crc() -> u32 {
    static ZERO: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| crc32c::crc32c(&[0u8; BLOCK_SIZE as usize]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::wal::Crcs;

    const C: ChunkId = ChunkId { inode: 1, index: 0 };

    #[test]
    fn apply_write_cow_truncate_delete() {
        let mut ix = ShardIndex::new(0, 4, 64 << 10);
        let crcs = [10u32, 11];
        ix.apply(&Record::Write {
            chunk: C,
            extent: 2,
            version: 1,
            len: 8192,
            first: 0,
            crcs: Crcs::Native(&crcs),
        })
        .unwrap();
        assert_eq!(ix.free_extents(), 3);
        assert!(ix.is_present(2, 1) && !ix.is_present(2, 2));
        // CoW into extent 0 of block 1 only: block 0's crc is carried over.
        ix.apply(&Record::Write {
            chunk: C,
            extent: 0,
            version: 2,
            len: 8192,
            first: 1,
            crcs: Crcs::Native(&[99]),
        })
        .unwrap();
        assert_eq!(ix.get(&C).unwrap().extent, 0);
        assert_eq!((ix.crc_of(0, 0), ix.crc_of(0, 1)), (10, 99));
        assert_eq!(ix.free_extents(), 3);
        ix.apply(&Record::Truncate {
            chunk: C,
            version: 3,
            len: 4096,
        })
        .unwrap();
        assert!(ix.is_present(0, 0) && !ix.is_present(0, 1));
        ix.apply(&Record::Delete {
            chunk: C,
            version: 4,
        })
        .unwrap();
        assert_eq!(ix.free_extents(), 4);
        assert!(ix.get(&C).is_none());
    }

    #[test]
    fn apply_rejects_bad_records() {
        let mut ix = ShardIndex::new(0, 4, 64 << 10);
        let w = |extent, version, first: u32| Record::Write {
            chunk: C,
            extent,
            version,
            len: 4096,
            first,
            crcs: Crcs::Native(&[1]),
        };
        assert!(ix.apply(&w(9, 1, 0)).is_err());
        assert!(ix.apply(&w(0, 1, 16)).is_err());
        ix.apply(&w(0, 1, 0)).unwrap();
        assert!(ix.apply(&w(0, 1, 0)).is_err(), "stale version");
        let other = ChunkId { inode: 2, index: 0 };
        assert!(
            ix.apply(&Record::Write {
                chunk: other,
                extent: 0,
                version: 1,
                len: 4096,
                first: 0,
                crcs: Crcs::Native(&[1])
            })
            .is_err(),
            "extent in use"
        );
        assert!(ix
            .apply(&Record::Delete {
                chunk: other,
                version: 1
            })
            .is_err());
        assert!(ix
            .apply(&Record::Truncate {
                chunk: C,
                version: 2,
                len: 100
            })
            .is_err());
    }

    #[test]
    fn snapshot_round_trip() {
        let mut ix = ShardIndex::new(3, 8, 256 << 10);
        for i in 0..5u32 {
            let crcs: Vec<u32> = (0..7).map(|b| b * 100 + i).collect();
            let c = ChunkId { inode: 7, index: i };
            ix.apply(&Record::Write {
                chunk: c,
                extent: i + 1,
                version: 3,
                len: 7 * 4096 - 5,
                first: 40 + i,
                crcs: Crcs::Native(&crcs),
            })
            .unwrap();
        }
        let mut img = Vec::new();
        ix.encode_snapshot(42, &mut img);
        let mut back = ShardIndex::new(3, 8, 256 << 10);
        assert_eq!(back.load_snapshot(&img).unwrap(), 42);
        assert_eq!(back.free_extents(), 3);
        for (c, m) in ix.chunks() {
            assert_eq!(back.get(c), Some(m));
            for b in 0..64 {
                assert_eq!(back.is_present(m.extent, b), ix.is_present(m.extent, b));
                if ix.is_present(m.extent, b) {
                    assert_eq!(back.crc_of(m.extent, b), ix.crc_of(m.extent, b));
                }
            }
        }
        let mut wrong_shard = ShardIndex::new(4, 8, 256 << 10);
        assert!(wrong_shard.load_snapshot(&img).is_err());
        img[SNAP_HEADER_SIZE + 3] ^= 1;
        assert!(ShardIndex::new(3, 8, 256 << 10)
            .load_snapshot(&img)
            .is_err());
    }
}
