//! Namespace records and the batch framing they travel in, on the device.
//!
//! Records carry absolute values (a whole inode, a whole entry), so replaying one twice
//! or replaying a checkpoint and then a log that overlaps it gives the same state.
//! A batch is one durable chunk write: a header with checksums, then records. Bad bytes
//! are `Error::Corrupt`, never a panic.

use spool_dataplane::store::codec::{crc, Reader};
use spool_dataplane::store::BLOCK_SIZE;

use crate::error::{Error, Result};

/// Longest name in a directory, in bytes (any byte but '/' and NUL).
pub const NAME_MAX_BYTES: usize = 255;
/// Longest symlink target, in bytes.
pub const SYMLINK_MAX_BYTES: usize = 4095;
/// Longest extended attribute name and value.
pub const XATTR_NAME_MAX_BYTES: usize = 255;
pub const XATTR_VALUE_MAX_BYTES: usize = 16 << 10;

pub const BATCH_MAGIC: &[u8; 8] = b"SPOOLMLG";
pub const ROOT_MAGIC: &[u8; 8] = b"SPOOLNSR";
pub const BATCH_HEADER_BYTES: usize = 48;

/// File kinds, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Kind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    Socket = 5,
    CharDev = 6,
    BlockDev = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDev,
            7 => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// An inode's persistent attributes. Times are nanoseconds since the epoch.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InodeRec {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits (07777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    /// Every byte ever written to the file lies below this: data past it is garbage
    /// from an unacknowledged write and is purged at recovery.
    pub alloc_end: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub btime_ns: i64,
    pub rdev: u32,
    /// A directory's parent (rename-loop checks); 0 for other kinds.
    pub parent: u64,
    /// A symlink's target.
    pub target: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Inode(InodeRec),
    InodeDel {
        ino: u64,
    },
    Dentry {
        dir: u64,
        name: Vec<u8>,
        ino: u64,
    },
    DentryDel {
        dir: u64,
        name: Vec<u8>,
    },
    Xattr {
        ino: u64,
        name: Vec<u8>,
        value: Vec<u8>,
    },
    XattrDel {
        ino: u64,
        name: Vec<u8>,
    },
    /// Inode numbers below this may have been handed out; never reuse them.
    NextIno {
        next: u64,
    },
}

const T_INODE: u8 = 1;
const T_INODE_DEL: u8 = 2;
const T_DENTRY: u8 = 3;
const T_DENTRY_DEL: u8 = 4;
const T_XATTR: u8 = 5;
const T_XATTR_DEL: u8 = 6;
const T_NEXT_INO: u8 = 7;

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}

fn get_bytes(r: &mut Reader<'_>, max: usize, what: &str) -> Result<Vec<u8>> {
    let n = r.u32()? as usize;
    if n > max {
        return Err(Error::corrupt(
            "record",
            format!("{what} of {n} bytes exceeds {max}"),
        ));
    }
    Ok(r.bytes(n)?.to_vec())
}

fn get_name(r: &mut Reader<'_>) -> Result<Vec<u8>> {
    let name = get_bytes(r, NAME_MAX_BYTES, "name")?;
    if name.is_empty() || name.iter().any(|&b| b == b'/' || b == 0) {
        return Err(Error::corrupt("record", format!("invalid name {name:?}")));
    }
    Ok(name)
}

impl Record {
    /// Appends `type u8 | len u32 | payload`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.push(0);
        put_u32(out, 0);
        let t = match self {
            Record::Inode(i) => {
                put_u64(out, i.ino);
                out.push(i.kind as u8);
                put_u16(out, i.perm);
                put_u32(out, i.uid);
                put_u32(out, i.gid);
                put_u32(out, i.nlink);
                put_u64(out, i.size);
                put_u64(out, i.alloc_end);
                for t in [i.atime_ns, i.mtime_ns, i.ctime_ns, i.btime_ns] {
                    put_u64(out, t as u64);
                }
                put_u32(out, i.rdev);
                put_u64(out, i.parent);
                put_bytes(out, &i.target);
                T_INODE
            }
            Record::InodeDel { ino } => {
                put_u64(out, *ino);
                T_INODE_DEL
            }
            Record::Dentry { dir, name, ino } => {
                put_u64(out, *dir);
                put_bytes(out, name);
                put_u64(out, *ino);
                T_DENTRY
            }
            Record::DentryDel { dir, name } => {
                put_u64(out, *dir);
                put_bytes(out, name);
                T_DENTRY_DEL
            }
            Record::Xattr { ino, name, value } => {
                put_u64(out, *ino);
                put_bytes(out, name);
                put_bytes(out, value);
                T_XATTR
            }
            Record::XattrDel { ino, name } => {
                put_u64(out, *ino);
                put_bytes(out, name);
                T_XATTR_DEL
            }
            Record::NextIno { next } => {
                put_u64(out, *next);
                T_NEXT_INO
            }
        };
        out[start] = t;
        let len = (out.len() - start - 5) as u32;
        out[start + 1..start + 5].copy_from_slice(&len.to_le_bytes());
    }

    /// Decodes one record; the reader must hold exactly the records of a batch body.
    pub fn decode(r: &mut Reader<'_>) -> Result<Record> {
        let t = r.u8()?;
        let len = r.u32()? as usize;
        let body = r.bytes(len)?;
        let mut r = Reader::new(body, "namespace record");
        let rec = match t {
            T_INODE => {
                let ino = r.u64()?;
                let k = r.u8()?;
                let kind = Kind::from_u8(k)
                    .ok_or_else(|| Error::corrupt("record", format!("unknown kind {k}")))?;
                let perm = u16::from_le_bytes(r.bytes(2)?.try_into().expect("2 bytes"));
                let uid = r.u32()?;
                let gid = r.u32()?;
                let nlink = r.u32()?;
                let size = r.u64()?;
                let alloc_end = r.u64()?;
                let atime_ns = r.u64()? as i64;
                let mtime_ns = r.u64()? as i64;
                let ctime_ns = r.u64()? as i64;
                let btime_ns = r.u64()? as i64;
                let rdev = r.u32()?;
                let parent = r.u64()?;
                let target = get_bytes(&mut r, SYMLINK_MAX_BYTES, "symlink target")?;
                Record::Inode(InodeRec {
                    ino,
                    kind,
                    perm: perm & 0o7777,
                    uid,
                    gid,
                    nlink,
                    size,
                    alloc_end,
                    atime_ns,
                    mtime_ns,
                    ctime_ns,
                    btime_ns,
                    rdev,
                    parent,
                    target,
                })
            }
            T_INODE_DEL => Record::InodeDel { ino: r.u64()? },
            T_DENTRY => {
                let dir = r.u64()?;
                let name = get_name(&mut r)?;
                let ino = r.u64()?;
                Record::Dentry { dir, name, ino }
            }
            T_DENTRY_DEL => {
                let dir = r.u64()?;
                let name = get_name(&mut r)?;
                Record::DentryDel { dir, name }
            }
            T_XATTR => {
                let ino = r.u64()?;
                let name = get_bytes(&mut r, XATTR_NAME_MAX_BYTES, "xattr name")?;
                let value = get_bytes(&mut r, XATTR_VALUE_MAX_BYTES, "xattr value")?;
                Record::Xattr { ino, name, value }
            }
            T_XATTR_DEL => {
                let ino = r.u64()?;
                let name = get_bytes(&mut r, XATTR_NAME_MAX_BYTES, "xattr name")?;
                Record::XattrDel { ino, name }
            }
            T_NEXT_INO => Record::NextIno { next: r.u64()? },
            other => {
                return Err(Error::corrupt(
                    "record",
                    format!("unknown record type {other}"),
                ))
            }
        };
        if r.remaining() != 0 {
            return Err(Error::corrupt(
                "record",
                format!("{} trailing bytes in record type {t}", r.remaining()),
            ));
        }
        Ok(rec)
    }
}

/// A batch header: which stream it belongs to and where it sits in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// The namespace's id (binds batches to this namespace, not a stale one).
    pub ns_id: u64,
    /// Generation of the stream (log or checkpoint) the batch belongs to.
    pub generation: u64,
    /// Sequence number of the batch's first record; 0 records = a pad batch, which
    /// holds no records and only marks a chunk as taken.
    pub first_lsn: u64,
    pub count: u32,
    pub body_len: u32,
}

/// Frames `body` (encoded records) as a batch, zero-padded to whole blocks.
pub fn encode_batch(h: &BatchHeader, body: &[u8], out: &mut Vec<u8>) {
    assert_eq!(
        h.body_len as usize,
        body.len(),
        "header must describe the body"
    );
    let start = out.len();
    out.extend_from_slice(BATCH_MAGIC);
    put_u64(out, h.ns_id);
    put_u64(out, h.generation);
    put_u64(out, h.first_lsn);
    put_u32(out, h.count);
    put_u32(out, h.body_len);
    put_u32(out, crc(body));
    let hcrc = crc(&out[start..]);
    put_u32(out, hcrc);
    assert_eq!(out.len() - start, BATCH_HEADER_BYTES);
    out.extend_from_slice(body);
    let padded = (out.len() - start).div_ceil(BLOCK_SIZE as usize) * BLOCK_SIZE as usize;
    out.resize(start + padded, 0);
}

/// Bytes a batch with a body of `body_len` takes on the device.
pub fn batch_bytes(body_len: usize) -> usize {
    (BATCH_HEADER_BYTES + body_len).div_ceil(BLOCK_SIZE as usize) * BLOCK_SIZE as usize
}

/// Decodes the batch at the start of `buf`: its header, its records and the bytes it
/// takes. `None` when `buf` starts with a zero block (the end of a stream).
pub fn decode_batch(buf: &[u8]) -> Result<Option<(BatchHeader, Vec<Record>, usize)>> {
    if buf.len() < BATCH_HEADER_BYTES {
        return Err(Error::corrupt(
            "batch",
            format!("{} bytes cannot hold a header", buf.len()),
        ));
    }
    if buf[..BATCH_HEADER_BYTES].iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let mut r = Reader::new(buf, "namespace batch");
    if r.bytes(8)? != BATCH_MAGIC {
        return Err(Error::corrupt("batch", "bad magic"));
    }
    let ns_id = r.u64()?;
    let generation = r.u64()?;
    let first_lsn = r.u64()?;
    let count = r.u32()?;
    let body_len = r.u32()?;
    let body_crc = r.u32()?;
    let stored_hcrc = r.u32()?;
    let hcrc = crc(&buf[..BATCH_HEADER_BYTES - 4]);
    if hcrc != stored_hcrc {
        return Err(Error::corrupt(
            "batch",
            format!("header checksum {stored_hcrc:#010x} != computed {hcrc:#010x}"),
        ));
    }
    let body = r.bytes(body_len as usize)?;
    if crc(body) != body_crc {
        return Err(Error::corrupt("batch", "body checksum mismatch"));
    }
    let mut br = Reader::new(body, "namespace batch body");
    let mut recs = Vec::with_capacity(count as usize);
    while br.remaining() > 0 {
        recs.push(Record::decode(&mut br)?);
    }
    if recs.len() != count as usize {
        return Err(Error::corrupt(
            "batch",
            format!("header says {count} records, body holds {}", recs.len()),
        ));
    }
    let h = BatchHeader {
        ns_id,
        generation,
        first_lsn,
        count,
        body_len,
    };
    Ok(Some((h, recs, batch_bytes(body_len as usize))))
}

/// The namespace root: which checkpoint and log generation are current.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Root {
    pub ns_id: u64,
    pub generation: u64,
    /// Batches in the checkpoint of this generation (a short one is corrupt).
    pub checkpoint_batches: u64,
    /// The lsn the log of this generation starts at.
    pub log_start_lsn: u64,
}

pub const ROOT_BYTES: usize = 52;

impl Root {
    /// magic 8 | version u32 | 0 u32 | ns_id | generation | checkpoint_batches |
    /// log_start_lsn | crc32c of all before.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(ROOT_BYTES);
        v.extend_from_slice(ROOT_MAGIC);
        put_u32(&mut v, 1);
        put_u32(&mut v, 0);
        put_u64(&mut v, self.ns_id);
        put_u64(&mut v, self.generation);
        put_u64(&mut v, self.checkpoint_batches);
        put_u64(&mut v, self.log_start_lsn);
        let c = crc(&v);
        put_u32(&mut v, c);
        assert_eq!(v.len(), ROOT_BYTES);
        v
    }

    pub fn decode(buf: &[u8]) -> Result<Root> {
        if buf.len() < ROOT_BYTES {
            return Err(Error::corrupt("root", format!("{} bytes", buf.len())));
        }
        if &buf[..8] != ROOT_MAGIC {
            return Err(Error::corrupt("root", "bad magic"));
        }
        let stored = u32::from_le_bytes(buf[48..52].try_into().expect("4 bytes"));
        let computed = crc(&buf[..48]);
        if computed != stored {
            return Err(Error::corrupt(
                "root",
                format!("checksum {stored:#010x} != computed {computed:#010x}"),
            ));
        }
        let mut r = Reader::new(&buf[8..48], "namespace root");
        let version = r.u32()?;
        if version != 1 {
            return Err(Error::corrupt(
                "root",
                format!("namespace format version {version} is not supported (this build reads 1)"),
            ));
        }
        r.u32()?;
        Ok(Root {
            ns_id: r.u64()?,
            generation: r.u64()?,
            checkpoint_batches: r.u64()?,
            log_start_lsn: r.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn inode(ino: u64) -> InodeRec {
        InodeRec {
            ino,
            kind: Kind::File,
            perm: 0o644,
            uid: 1,
            gid: 2,
            nlink: 1,
            size: 12345,
            alloc_end: 1 << 26,
            atime_ns: -5,
            mtime_ns: 1_700_000_000_000_000_000,
            ctime_ns: 3,
            btime_ns: 4,
            rdev: 0,
            parent: 0,
            target: b"x/y".to_vec(),
        }
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        let name = proptest::collection::vec(1u8..=255, 1..=255)
            .prop_filter("no slash", |n| !n.contains(&b'/'));
        prop_oneof![
            any::<u64>().prop_map(|i| Record::Inode(inode(i))),
            any::<u64>().prop_map(|ino| Record::InodeDel { ino }),
            (any::<u64>(), name.clone(), any::<u64>())
                .prop_map(|(dir, name, ino)| Record::Dentry { dir, name, ino }),
            (any::<u64>(), name.clone()).prop_map(|(dir, name)| Record::DentryDel { dir, name }),
            (
                any::<u64>(),
                name,
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(ino, name, value)| Record::Xattr { ino, name, value }),
            any::<u64>().prop_map(|next| Record::NextIno { next }),
        ]
    }

    fn batch(recs: &[Record]) -> Vec<u8> {
        let mut body = Vec::new();
        for r in recs {
            r.encode(&mut body);
        }
        let h = BatchHeader {
            ns_id: 7,
            generation: 3,
            first_lsn: 100,
            count: recs.len() as u32,
            body_len: body.len() as u32,
        };
        let mut out = Vec::new();
        encode_batch(&h, &body, &mut out);
        out
    }

    proptest! {
        #[test]
        fn batches_round_trip(recs in proptest::collection::vec(arb_record(), 0..20)) {
            let buf = batch(&recs);
            prop_assert_eq!(buf.len() % 4096, 0);
            let (h, got, used) = decode_batch(&buf).unwrap().unwrap();
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(h.first_lsn, 100);
            prop_assert_eq!(got, recs);
        }

        #[test]
        fn damaged_batches_are_errors_not_panics(
            recs in proptest::collection::vec(arb_record(), 1..8),
            at in any::<usize>(),
            bit in 0u8..8,
        ) {
            let mut buf = batch(&recs);
            let body_end = BATCH_HEADER_BYTES + {
                let mut b = Vec::new();
                for r in &recs { r.encode(&mut b); }
                b.len()
            };
            let i = at % body_end;
            buf[i] ^= 1 << bit;
            prop_assert!(decode_batch(&buf).is_err() || buf[..BATCH_HEADER_BYTES].iter().all(|&b| b == 0));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_batch(&bytes);
            let _ = Root::decode(&bytes);
        }
    }

    #[test]
    fn zero_block_ends_a_stream_and_root_round_trips() {
        assert!(decode_batch(&[0u8; 4096]).unwrap().is_none());
        let r = Root {
            ns_id: 9,
            generation: 4,
            checkpoint_batches: 2,
            log_start_lsn: 77,
        };
        assert_eq!(Root::decode(&r.encode()).unwrap(), r);
        let mut bad = r.encode();
        bad[20] ^= 1;
        assert!(Root::decode(&bad).is_err());
    }
}
