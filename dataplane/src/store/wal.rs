//! The write-ahead log: a ring of batches, each a checksummed header plus records.
//!
//! ```text
//! batch header (64 bytes): magic "SPOOLWAL", generation u64, lsn u64, wal offset u64,
//!   body length u32, record count u32, body crc32c u32, header crc32c u32, padding
//! body: records, then zero padding to a 4 KiB boundary
//! ```
//! The generation is the snapshot the log continues from; lsn counts batches from 0 in
//! each generation. Replay accepts batches while the header and body checksums, the
//! generation, the lsn sequence and the stored offset all match, and stops at the first
//! that does not: that batch was never acknowledged (its flush had not completed).

use super::codec::{crc, Reader, Writer};
use super::ChunkId;
use crate::Error;

pub const WAL_MAGIC: &[u8; 8] = b"SPOOLWAL";
pub const BATCH_HEADER_SIZE: usize = 64;
/// The largest batch; it bounds the WAL buffer and the records one commit carries.
pub const BATCH_MAX: usize = 256 << 10;

/// The smallest encoded record (a delete).
const MIN_RECORD_LEN: usize = 1 + 12 + 8;
const REC_WRITE: u8 = 1;
const REC_TRUNCATE: u8 = 2;
const REC_DELETE: u8 = 3;

/// One change to a shard's chunk index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// Blocks `first..first+crcs.len()` of `chunk` now hold data with these crcs, the
    /// chunk lives in `extent` (a different extent than before means copy-on-write: the
    /// other blocks were copied there) and is `len` bytes long.
    Write {
        chunk: ChunkId,
        extent: u32,
        version: u64,
        len: u32,
        first: u32,
        crcs: Crcs<'a>,
    },
    /// Blocks from `len / BLOCK_SIZE` on become holes; `len` is block-aligned.
    Truncate {
        chunk: ChunkId,
        version: u64,
        len: u32,
    },
    /// The chunk is gone and its extent free.
    Delete { chunk: ChunkId, version: u64 },
}

/// Block crcs, either decoded from the log or borrowed from an in-flight op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crcs<'a> {
    Le(&'a [u8]),
    Native(&'a [u32]),
}

impl Crcs<'_> {
    pub fn len(&self) -> usize {
        match self {
            Crcs::Le(b) => b.len() / 4,
            Crcs::Native(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, i: usize) -> u32 {
        match self {
            Crcs::Le(b) => u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4 bytes")),
            Crcs::Native(v) => v[i],
        }
    }
}

impl Record<'_> {
    pub fn chunk(&self) -> ChunkId {
        match self {
            Record::Write { chunk, .. }
            | Record::Truncate { chunk, .. }
            | Record::Delete { chunk, .. } => *chunk,
        }
    }
    pub fn encoded_len(&self) -> usize {
        match self {
            Record::Write { crcs, .. } => 1 + 12 + 4 + 8 + 4 + 4 + 4 + 4 * crcs.len(),
            Record::Truncate { .. } => 1 + 12 + 8 + 4,
            Record::Delete { .. } => 1 + 12 + 8,
        }
    }
    pub fn encode(&self, w: &mut Writer<'_>) {
        let chunk = |w: &mut Writer<'_>, c: &ChunkId| {
            w.u64(c.inode);
            w.u32(c.index);
        };
        match self {
            Record::Write {
                chunk: c,
                extent,
                version,
                len,
                first,
                crcs,
            } => {
                w.u8(REC_WRITE);
                chunk(w, c);
                w.u32(*extent);
                w.u64(*version);
                w.u32(*len);
                w.u32(*first);
                w.u32(crcs.len() as u32);
                for i in 0..crcs.len() {
                    w.u32(crcs.get(i));
                }
            }
            Record::Truncate {
                chunk: c,
                version,
                len,
            } => {
                w.u8(REC_TRUNCATE);
                chunk(w, c);
                w.u64(*version);
                w.u32(*len);
            }
            Record::Delete { chunk: c, version } => {
                w.u8(REC_DELETE);
                chunk(w, c);
                w.u64(*version);
            }
        }
    }
}

/// Decodes one record; the caller checks its values against the geometry.
pub fn decode_record<'a>(r: &mut Reader<'a>) -> Result<Record<'a>, Error> {
    let kind = r.u8()?;
    let chunk = ChunkId {
        inode: r.u64()?,
        index: r.u32()?,
    };
    match kind {
        REC_WRITE => {
            let extent = r.u32()?;
            let version = r.u64()?;
            let len = r.u32()?;
            let first = r.u32()?;
            let n = r.u32()? as usize;
            if n > r.remaining() / 4 {
                return Err(r.corrupt(format!(
                    "write record claims {n} crcs, {} bytes left",
                    r.remaining()
                )));
            }
            let crcs = Crcs::Le(r.bytes(4 * n)?);
            Ok(Record::Write {
                chunk,
                extent,
                version,
                len,
                first,
                crcs,
            })
        }
        REC_TRUNCATE => Ok(Record::Truncate {
            chunk,
            version: r.u64()?,
            len: r.u32()?,
        }),
        REC_DELETE => Ok(Record::Delete {
            chunk,
            version: r.u64()?,
        }),
        other => Err(r.corrupt(format!("unknown record type {other}"))),
    }
}

/// The fixed part of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// The store this batch belongs to (from the superblock uuid), so batches left by
    /// an earlier format of the same device are never taken for this store's.
    pub store_id: u64,
    pub generation: u64,
    pub lsn: u64,
    pub wal_offset: u64,
    pub body_len: u32,
    pub record_count: u32,
    pub body_crc: u32,
}

impl BatchHeader {
    /// Bytes the batch occupies in the log, padded to 4 KiB.
    pub fn total_len(&self) -> usize {
        (BATCH_HEADER_SIZE + self.body_len as usize).div_ceil(4096) * 4096
    }

    pub fn encode(&self, out: &mut [u8]) {
        let mut w = Writer::new(&mut out[..BATCH_HEADER_SIZE]);
        w.bytes(WAL_MAGIC);
        w.u64(self.store_id);
        w.u64(self.generation);
        w.u64(self.lsn);
        w.u64(self.wal_offset);
        w.u32(self.body_len);
        w.u32(self.record_count);
        w.u32(self.body_crc);
        let hc = crc(&out[..52]);
        out[52..56].copy_from_slice(&hc.to_le_bytes());
        out[56..BATCH_HEADER_SIZE].fill(0);
    }

    /// Decodes a header; `None` when there is no valid batch here (end of the log).
    pub fn decode(buf: &[u8]) -> Option<Self> {
        if buf.len() < BATCH_HEADER_SIZE || &buf[..8] != WAL_MAGIC {
            return None;
        }
        let stored = u32::from_le_bytes(buf[52..56].try_into().expect("4 bytes"));
        if stored != crc(&buf[..52]) {
            return None;
        }
        let mut r = Reader::new(&buf[8..52], "wal batch header");
        let h = BatchHeader {
            store_id: r.u64().ok()?,
            generation: r.u64().ok()?,
            lsn: r.u64().ok()?,
            wal_offset: r.u64().ok()?,
            body_len: r.u32().ok()?,
            record_count: r.u32().ok()?,
            body_crc: r.u32().ok()?,
        };
        (h.body_len as usize <= BATCH_MAX - BATCH_HEADER_SIZE).then_some(h)
    }
}

/// Builds a batch in a caller-provided buffer of `BATCH_MAX` bytes.
#[derive(Debug)]
pub struct BatchBuilder {
    store_id: u64,
    body_len: usize,
    records: u32,
}

impl BatchBuilder {
    pub fn new() -> Self {
        BatchBuilder {
            store_id: 0,
            body_len: 0,
            records: 0,
        }
    }
    /// A builder for batches of store `store_id`.
    pub fn for_store(store_id: u64) -> Self {
        BatchBuilder {
            store_id,
            ..Self::new()
        }
    }
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }
    pub fn body_len(&self) -> usize {
        self.body_len
    }
    pub fn records(&self) -> u32 {
        self.records
    }
    /// Whether `rec` still fits.
    pub fn fits(&self, rec: &Record<'_>) -> bool {
        BATCH_HEADER_SIZE + self.body_len + rec.encoded_len() <= BATCH_MAX
    }
    pub fn push(&mut self, buf: &mut [u8], rec: &Record<'_>) {
        assert!(self.fits(rec), "caller checks fits()");
        let start = BATCH_HEADER_SIZE + self.body_len;
        let mut w = Writer::new(&mut buf[start..start + rec.encoded_len()]);
        rec.encode(&mut w);
        self.body_len += rec.encoded_len();
        self.records += 1;
    }
    /// Writes the header and padding; returns the header and the batch's length.
    pub fn finish(
        &self,
        buf: &mut [u8],
        generation: u64,
        lsn: u64,
        wal_offset: u64,
    ) -> BatchHeader {
        let body = &buf[BATCH_HEADER_SIZE..BATCH_HEADER_SIZE + self.body_len];
        let h = BatchHeader {
            store_id: self.store_id,
            generation,
            lsn,
            wal_offset,
            body_len: self.body_len as u32,
            record_count: self.records,
            body_crc: crc(body),
        };
        h.encode(buf);
        let end = h.total_len();
        buf[BATCH_HEADER_SIZE + self.body_len..end].fill(0);
        h
    }
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Decodes the records of a batch whose header is valid; checks the body crc.
pub fn decode_body<'a>(h: &BatchHeader, batch: &'a [u8]) -> Result<Vec<Record<'a>>, Error> {
    let body = batch
        .get(BATCH_HEADER_SIZE..BATCH_HEADER_SIZE + h.body_len as usize)
        .ok_or(Error::Corrupt {
            what: "wal batch",
            detail: "body beyond buffer".into(),
        })?;
    if crc(body) != h.body_crc {
        return Err(Error::Corrupt {
            what: "wal batch",
            detail: format!("lsn {} body checksum mismatch", h.lsn),
        });
    }
    let mut r = Reader::new(body, "wal record");
    // The count is untrusted: size the vector by what the body can hold.
    let mut out = Vec::with_capacity((h.record_count as usize).min(body.len() / MIN_RECORD_LEN));
    for _ in 0..h.record_count {
        out.push(decode_record(&mut r)?);
    }
    if r.remaining() != 0 {
        return Err(r.corrupt(format!(
            "{} trailing bytes after {} records",
            r.remaining(),
            h.record_count
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trip() {
        let mut buf = vec![0u8; BATCH_MAX];
        let mut b = BatchBuilder::new();
        let crcs = [1u32, 2, 3];
        let c = ChunkId { inode: 9, index: 2 };
        let recs = [
            Record::Write {
                chunk: c,
                extent: 4,
                version: 1,
                len: 12288,
                first: 0,
                crcs: Crcs::Native(&crcs),
            },
            Record::Truncate {
                chunk: c,
                version: 2,
                len: 4096,
            },
            Record::Delete {
                chunk: c,
                version: 3,
            },
        ];
        for r in &recs {
            b.push(&mut buf, r);
        }
        let h = b.finish(&mut buf, 5, 0, 0);
        let h2 = BatchHeader::decode(&buf).unwrap();
        assert_eq!(h, h2);
        let got = decode_body(&h2, &buf).unwrap();
        assert_eq!(got.len(), 3);
        match &got[0] {
            Record::Write { crcs, .. } => assert_eq!(
                (0..3).map(|i| crcs.get(i)).collect::<Vec<_>>(),
                vec![1, 2, 3]
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(got[1], recs[1]);
        buf[BATCH_HEADER_SIZE + 3] ^= 1;
        assert!(decode_body(&h2, &buf).is_err());
        buf[3] ^= 1;
        assert!(BatchHeader::decode(&buf).is_none());
    }
}
