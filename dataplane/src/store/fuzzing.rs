//! Entry points of the on-device decoders' fuzz targets.
//!
//! The cargo-fuzz targets in `dataplane/fuzz/` and the corpus replay test
//! (`dataplane/tests/fuzz_corpus.rs`) call these same functions, so a crash the fuzzer
//! finds is a failing ordinary test once its input is added to the corpus.
//!
//! Every function takes arbitrary bytes, must never panic on them, and asserts the
//! properties the rest of the store relies on (a decoded superblock re-encodes to
//! itself and its layout fits the device; records a fresh index accepts leave it in a
//! state whose snapshot reloads to the same state). Inputs are on-device bytes as they
//! are: each function also runs a copy with the checksums recomputed, so mutated inputs
//! get past the crc checks and into the decoders behind them.

use std::collections::BTreeMap;
use std::ops::Range;

use super::codec::crc;
use super::format::{
    snapshot_slot_size, Superblock, BLOCK_SIZE, DATA_START, SNAP_HEADER_SIZE, SUPERBLOCK_SIZE,
};
use super::index::{ChunkMeta, ShardIndex, SNAP_MAGIC};
use super::wal::{decode_body, BatchBuilder, BatchHeader, BATCH_HEADER_SIZE, BATCH_MAX, WAL_MAGIC};
use super::ChunkId;
use crate::Error;

/// The shard the fuzzed WAL batches and snapshots belong to.
pub const FUZZ_SHARD: u32 = 0;
/// The index shapes records and snapshots are loaded into: (extents, chunk size). One
/// with a one-word block bitmap, one with a multi-word bitmap.
pub const FUZZ_INDEXES: [(u32, u32); 2] = [(8, 64 << 10), (4, 1 << 20)];

// Where the checksummed fields of the on-device headers are (`BatchHeader::encode`,
// `ShardIndex::encode_snapshot`); the tests below check them against the encoders.
/// WAL batch header: store id, body length, body crc, header crc (over the bytes before).
pub const WAL_STORE_ID: Range<usize> = 8..16;
pub const WAL_BODY_LEN: Range<usize> = 40..44;
pub const WAL_RECORD_COUNT: Range<usize> = 44..48;
pub const WAL_BODY_CRC: Range<usize> = 48..52;
pub const WAL_HEADER_CRC: Range<usize> = 52..56;
/// Snapshot header: store id, shard, entry count, body length, body crc, header crc.
pub const SNAP_STORE_ID: Range<usize> = 8..16;
pub const SNAP_SHARD: Range<usize> = 24..28;
pub const SNAP_COUNT: Range<usize> = 28..32;
pub const SNAP_BODY_LEN: Range<usize> = 32..40;
pub const SNAP_BODY_CRC: Range<usize> = 40..44;
pub const SNAP_HEADER_CRC: Range<usize> = 44..48;

fn le32(b: &[u8], r: Range<usize>) -> u32 {
    u32::from_le_bytes(b[r].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], r: Range<usize>) -> u64 {
    u64::from_le_bytes(b[r].try_into().expect("8 bytes"))
}

/// Recomputes a superblock's crc (`b` holds at least `SUPERBLOCK_SIZE` bytes).
pub fn fix_superblock_crc(b: &mut [u8]) {
    let c = crc(&b[..SUPERBLOCK_SIZE - 4]);
    b[SUPERBLOCK_SIZE - 4..SUPERBLOCK_SIZE].copy_from_slice(&c.to_le_bytes());
}

/// Recomputes a WAL batch's body crc (when the body it claims is in `b`) and header crc
/// (`b` holds at least a header).
pub fn fix_wal_crcs(b: &mut [u8]) {
    let body_len = le32(b, WAL_BODY_LEN) as usize;
    if let Some(body) = b.get(BATCH_HEADER_SIZE..BATCH_HEADER_SIZE + body_len) {
        let c = crc(body);
        b[WAL_BODY_CRC].copy_from_slice(&c.to_le_bytes());
    }
    let c = crc(&b[..WAL_HEADER_CRC.start]);
    b[WAL_HEADER_CRC].copy_from_slice(&c.to_le_bytes());
}

/// Recomputes a snapshot's body crc (when the body it claims is in `b`) and header crc
/// (`b` holds at least a header).
pub fn fix_snapshot_crcs(b: &mut [u8]) {
    let body_len = le64(b, SNAP_BODY_LEN);
    let end = usize::try_from(body_len)
        .ok()
        .and_then(|l| l.checked_add(SNAP_HEADER_SIZE));
    if let Some(body) = end.and_then(|end| b.get(SNAP_HEADER_SIZE..end)) {
        let c = crc(body);
        b[SNAP_BODY_CRC].copy_from_slice(&c.to_le_bytes());
    }
    let c = crc(&b[..SNAP_HEADER_CRC.start]);
    b[SNAP_HEADER_CRC].copy_from_slice(&c.to_le_bytes());
}

/// `Superblock::decode` on arbitrary bytes (and `probe_signature`).
pub fn fuzz_superblock(data: &[u8]) {
    let _ = super::format::probe_signature(data);
    check_superblock(data);
    if data.len() >= SUPERBLOCK_SIZE {
        let mut fixed = data[..SUPERBLOCK_SIZE].to_vec();
        fix_superblock_crc(&mut fixed);
        check_superblock(&fixed);
    }
}

fn check_superblock(data: &[u8]) {
    let sb = match Superblock::decode(data) {
        Ok(sb) => sb,
        Err(e) => {
            assert!(
                matches!(
                    e,
                    Error::Corrupt { .. } | Error::NotSpool(_) | Error::FutureVersion { .. }
                ),
                "superblock decode failed with an unexpected error kind: {e:?}"
            );
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    // Re-encoding what was decoded gives a superblock that decodes to the same value.
    let mut buf = vec![0u8; SUPERBLOCK_SIZE];
    sb.encode(&mut buf);
    let back = Superblock::decode(&buf)
        .unwrap_or_else(|e| panic!("re-encoded superblock {sb:?} fails to decode: {e}"));
    assert_eq!(back, sb, "superblock round trip");

    // The layout a decoded geometry describes fits the device (computed without
    // overflow, so a geometry that only passed `check` by wrapping around is caught).
    let g = &sb.geometry;
    let (shard_size, snap, wal) = (
        u128::from(g.shard_size),
        u128::from(g.snapshot_slot_size),
        u128::from(g.wal_size),
    );
    let extents = u128::from(g.extents_per_shard) * u128::from(g.chunk_size);
    assert!(
        2 * snap + wal + extents <= shard_size,
        "decoded geometry {g:?}: snapshots, WAL and extents overflow the shard"
    );
    assert!(
        u128::from(DATA_START) + u128::from(g.shard_count) * shard_size
            <= u128::from(g.device_size),
        "decoded geometry {g:?}: shards overflow the device"
    );
    assert!(
        g.snapshot_slot_size >= snapshot_slot_size(u64::from(g.extents_per_shard), g.chunk_size)
    );
    // The accessors the store uses on it stay in range.
    let last_shard = g.shard_count - 1;
    let last_extent_end =
        g.extent_offset(last_shard, g.extents_per_shard - 1) + u64::from(g.chunk_size);
    assert!(last_extent_end <= g.device_size);
    assert!(g.snapshot_slot(last_shard, 1) + g.snapshot_slot_size <= g.wal_base(last_shard));
    assert_eq!(g.blocks_per_chunk() * BLOCK_SIZE, g.chunk_size);
    let _ = g.capacity_bytes();
}

/// `BatchHeader::decode`, then `decode_body`, then `ShardIndex::apply` of every record on
/// small indexes.
pub fn fuzz_wal_batch(data: &[u8]) {
    check_wal_batch(data);
    if data.len() >= BATCH_HEADER_SIZE {
        let mut fixed = data[..data.len().min(BATCH_MAX)].to_vec();
        fixed[..8].copy_from_slice(WAL_MAGIC);
        fix_wal_crcs(&mut fixed);
        check_wal_batch(&fixed);
    }
}

fn check_wal_batch(data: &[u8]) {
    let Some(h) = BatchHeader::decode(data) else {
        return;
    };
    assert!(
        h.total_len() <= BATCH_MAX,
        "decoded batch header {h:?} is larger than a batch"
    );
    let records = match decode_body(&h, data) {
        Ok(r) => r,
        Err(e) => {
            assert!(
                matches!(e, Error::Corrupt { .. }),
                "decode_body failed with an unexpected error kind: {e:?}"
            );
            return;
        }
    };
    assert_eq!(records.len(), h.record_count as usize);

    // The encoding is canonical: building the batch again gives the same bytes.
    let mut buf = vec![0u8; BATCH_MAX];
    let mut b = BatchBuilder::for_store(h.store_id);
    for rec in &records {
        assert!(b.fits(rec), "a decoded batch's records fit a batch");
        b.push(&mut buf, rec);
    }
    let h2 = b.finish(&mut buf, h.generation, h.lsn, h.wal_offset);
    assert_eq!(h2, h, "batch header round trip");
    let body = BATCH_HEADER_SIZE..BATCH_HEADER_SIZE + h.body_len as usize;
    assert_eq!(buf[body.clone()], data[body], "batch body round trip");

    for (extents, chunk_size) in FUZZ_INDEXES {
        let mut ix = ShardIndex::new(FUZZ_SHARD, extents, chunk_size);
        for rec in &records {
            // A refused record must leave the index as it was, so go on with the next.
            match ix.apply(rec) {
                Ok(()) => {}
                Err(e) => assert!(
                    matches!(e, Error::Corrupt { .. }),
                    "apply failed with an unexpected error kind: {e:?}"
                ),
            }
        }
        check_snapshot_round_trip(&ix, 0, extents, chunk_size, h.generation);
    }
}

/// `ShardIndex::load_snapshot` on arbitrary bytes, into small fresh indexes.
pub fn fuzz_snapshot(data: &[u8]) {
    check_snapshot(data);
    if data.len() >= SNAP_HEADER_SIZE {
        let mut fixed = data.to_vec();
        fixed[..8].copy_from_slice(SNAP_MAGIC);
        fix_snapshot_crcs(&mut fixed);
        check_snapshot(&fixed);
    }
}

fn check_snapshot(data: &[u8]) {
    // Load into an index of the store the snapshot names (a real device's snapshot
    // carries its store's id); the header checks that it matches.
    let store_id = data
        .get(SNAP_STORE_ID)
        .map_or(0, |_| le64(data, SNAP_STORE_ID));
    for (extents, chunk_size) in FUZZ_INDEXES {
        let mut ix = ShardIndex::new(FUZZ_SHARD, extents, chunk_size).with_store_id(store_id);
        match ix.load_snapshot(data) {
            Ok(generation) => {
                check_snapshot_round_trip(&ix, store_id, extents, chunk_size, generation)
            }
            Err(e) => assert!(
                matches!(e, Error::Corrupt { .. }),
                "load_snapshot failed with an unexpected error kind: {e:?}"
            ),
        }
    }
}

/// The committed state of `ix` survives a snapshot: encoded, it fits the slot the
/// geometry reserves, and loaded into a fresh index it is the same state.
fn check_snapshot_round_trip(
    ix: &ShardIndex,
    store_id: u64,
    extents: u32,
    chunk_size: u32,
    generation: u64,
) {
    let mut image = Vec::new();
    ix.encode_snapshot(generation, &mut image);
    assert!(
        image.len() as u64 <= snapshot_slot_size(u64::from(extents), chunk_size),
        "snapshot of {} bytes exceeds its slot",
        image.len()
    );
    let mut back = ShardIndex::new(FUZZ_SHARD, extents, chunk_size).with_store_id(store_id);
    let g = back
        .load_snapshot(&image)
        .unwrap_or_else(|e| panic!("a snapshot of a valid index fails to load: {e}"));
    assert_eq!(g, generation);
    assert_eq!(
        committed(&back),
        committed(ix),
        "chunks after a snapshot round trip"
    );
    for (_, m) in ix.chunks() {
        for b in 0..ix.blocks_per_chunk() {
            assert_eq!(
                back.is_present(m.extent, b),
                ix.is_present(m.extent, b),
                "block {b} of extent {}",
                m.extent
            );
            if ix.is_present(m.extent, b) {
                assert_eq!(back.crc_of(m.extent, b), ix.crc_of(m.extent, b));
            }
        }
    }
    assert_eq!(
        back.free_extents(),
        ix.free_extents(),
        "free extents after a snapshot round trip"
    );
}

fn committed(ix: &ShardIndex) -> BTreeMap<ChunkId, (u32, u32, u64)> {
    ix.chunks()
        .map(|(c, m): (&ChunkId, &ChunkMeta)| (*c, (m.extent, m.len, m.version)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::format::Geometry;
    use crate::store::wal::{Crcs, Record};

    fn batch() -> Vec<u8> {
        let mut buf = vec![0u8; BATCH_MAX];
        let mut b = BatchBuilder::for_store(0x1122_3344_5566_7788);
        let chunk = ChunkId { inode: 3, index: 1 };
        let rec = Record::Write {
            chunk,
            extent: 1,
            version: 1,
            len: 4096,
            first: 0,
            crcs: Crcs::Native(&[7]),
        };
        b.push(&mut buf, &rec);
        b.push(&mut buf, &Record::Delete { chunk, version: 2 });
        let h = b.finish(&mut buf, 5, 6, 4096 * 6);
        buf.truncate(h.total_len());
        buf
    }

    fn snapshot() -> Vec<u8> {
        let mut ix = ShardIndex::new(FUZZ_SHARD, 8, 64 << 10).with_store_id(0x99);
        let rec = Record::Write {
            chunk: ChunkId { inode: 1, index: 0 },
            extent: 3,
            version: 4,
            len: 5000,
            first: 0,
            crcs: Crcs::Native(&[1, 2]),
        };
        ix.apply(&rec).unwrap();
        let mut img = Vec::new();
        ix.encode_snapshot(9, &mut img);
        img
    }

    /// The field offsets above match the encoders: fixing a valid encoding changes
    /// nothing, the fields read back, and fixing a damaged one makes it decode again.
    #[test]
    fn header_layouts_match_the_encoders() {
        let b = batch();
        let h = BatchHeader::decode(&b).unwrap();
        let mut fixed = b.clone();
        fix_wal_crcs(&mut fixed);
        assert_eq!(fixed, b);
        assert_eq!(le64(&b, WAL_STORE_ID), h.store_id);
        assert_eq!(le32(&b, WAL_BODY_LEN), h.body_len);
        assert_eq!(le32(&b, WAL_RECORD_COUNT), h.record_count);
        assert_eq!(le32(&b, WAL_BODY_CRC), h.body_crc);
        let mut damaged = b.clone();
        damaged[BATCH_HEADER_SIZE + 3] ^= 1;
        damaged[WAL_RECORD_COUNT].copy_from_slice(&1u32.to_le_bytes());
        assert!(BatchHeader::decode(&damaged).is_none());
        fix_wal_crcs(&mut damaged);
        let h2 = BatchHeader::decode(&damaged).expect("fixed header decodes");
        assert_eq!(h2.record_count, 1);
        assert!(
            !matches!(decode_body(&h2, &damaged), Err(Error::Corrupt { detail, .. }) if detail.contains("checksum"))
        );

        let s = snapshot();
        let mut fixed = s.clone();
        fix_snapshot_crcs(&mut fixed);
        assert_eq!(fixed, s);
        assert_eq!(le64(&s, SNAP_STORE_ID), 0x99);
        assert_eq!(le32(&s, SNAP_SHARD), FUZZ_SHARD);
        assert_eq!(le32(&s, SNAP_COUNT), 1);
        assert_eq!(le64(&s, SNAP_BODY_LEN), (s.len() - SNAP_HEADER_SIZE) as u64);
        let mut damaged = s.clone();
        damaged[SNAP_HEADER_SIZE + 12] ^= 1; // the entry's extent: 3 -> 2
        fix_snapshot_crcs(&mut damaged);
        let mut ix = ShardIndex::new(FUZZ_SHARD, 8, 64 << 10).with_store_id(0x99);
        assert_eq!(ix.load_snapshot(&damaged).unwrap(), 9);
        assert_eq!(ix.get(&ChunkId { inode: 1, index: 0 }).unwrap().extent, 2);

        let sb = Superblock {
            version: crate::store::FORMAT_VERSION,
            uuid: [3; 16],
            created_unix_s: 1,
            geometry: Geometry::compute(64 << 20, 64 << 10, 1, 0).unwrap(),
        };
        let mut buf = vec![0u8; SUPERBLOCK_SIZE];
        sb.encode(&mut buf);
        let mut fixed = buf.clone();
        fix_superblock_crc(&mut fixed);
        assert_eq!(fixed, buf);
    }

    #[test]
    fn targets_accept_valid_and_damaged_encodings() {
        for data in [batch(), snapshot()] {
            fuzz_wal_batch(&data);
            fuzz_snapshot(&data);
            fuzz_superblock(&data);
            for cut in [0, 10, 63, 64, data.len() - 1] {
                fuzz_wal_batch(&data[..cut]);
                fuzz_snapshot(&data[..cut]);
            }
        }
    }
}
