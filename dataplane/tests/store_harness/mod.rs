//! Drives a `CoreStore` on a `MemDevice` one op at a time and keeps an in-memory model
//! of what acknowledged ops must have left behind.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use spool_dataplane::device::mem::{CrashMode, MemDevice, MemHandle};
use spool_dataplane::store::{
    self, ChunkId, ChunkInfo, ChunkOp, CoreStore, FormatOptions, Geometry, ReadCheck, ShardRequest,
    BLOCK_SIZE,
};
use spool_dataplane::Error;
use spool_hugepages::{DmaPool, PagePolicy};

pub const CHUNK: u32 = 64 << 10;

/// An op of a test workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Write {
        chunk: ChunkId,
        offset: u32,
        len: u32,
        fill: u8,
    },
    Truncate {
        chunk: ChunkId,
        len: u32,
    },
    Delete {
        chunk: ChunkId,
    },
}

impl Op {
    pub fn chunk(&self) -> ChunkId {
        match self {
            Op::Write { chunk, .. } | Op::Truncate { chunk, .. } | Op::Delete { chunk } => *chunk,
        }
    }
}

/// Byte pattern of a write: depends on the fill value and the position, so misplaced
/// blocks are caught.
pub fn pattern(fill: u8, offset: u32, i: usize) -> u8 {
    fill.wrapping_mul(31)
        .wrapping_add(((offset as usize + i) / 512) as u8)
        | 1
}

/// What the store must hold: chunk -> bytes (its length is the chunk's length).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model(pub BTreeMap<ChunkId, Vec<u8>>);

impl Model {
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Write {
                chunk,
                offset,
                len,
                fill,
            } => {
                let v = self.0.entry(*chunk).or_default();
                let (off, len) = (*offset as usize, *len as usize);
                // The store zero-pads the last block of a write.
                let padded = (off + len).div_ceil(BLOCK_SIZE as usize) * BLOCK_SIZE as usize;
                if v.len() < off + len {
                    v.resize(off + len, 0);
                }
                for i in 0..len {
                    v[off + i] = pattern(*fill, *offset, i);
                }
                for b in v.iter_mut().take(padded).skip(off + len) {
                    *b = 0;
                }
            }
            Op::Truncate { chunk, len } => {
                // Like ftruncate: shrink, or extend with zeros.
                if let Some(v) = self.0.get_mut(chunk) {
                    v.resize(*len as usize, 0);
                }
            }
            Op::Delete { chunk } => {
                self.0.remove(chunk);
            }
        }
    }
}

pub fn geometry_opts() -> FormatOptions {
    FormatOptions {
        chunk_size: CHUNK,
        shards: 1,
        wal_size: 0,
        force: false,
    }
}

/// A formatted, flushed device image.
pub fn formatted_image(size: u64, opts: &FormatOptions) -> (Vec<u8>, Geometry) {
    let mut dev = MemDevice::new(size, 64);
    let h = dev.handle();
    let sb = store::format(&mut dev, opts).expect("format");
    (h.current_image(), sb.geometry)
}

pub struct Harness {
    pub store: CoreStore,
    pub mem: MemHandle,
    pub pool: Arc<DmaPool>,
    next_tag: u64,
    out: Vec<store::ShardCompletion>,
}

impl Harness {
    pub fn open(dev: MemDevice) -> Result<Self, Error> {
        let mem = dev.handle();
        let mut d = dev;
        let sb = store::read_superblock(&mut d)?;
        let shards: Vec<u32> = (0..sb.geometry.shard_count).collect();
        let store = CoreStore::open(Box::new(d), &sb.geometry, &shards)?;
        let pool = DmaPool::new("test", CHUNK as usize, 16, PagePolicy::Normal).expect("pool");
        Ok(Harness {
            store,
            mem,
            pool,
            next_tag: 1,
            out: Vec::new(),
        })
    }

    /// Power loss and restart: only what was flushed survives.
    pub fn power_cycle(self, mode: CrashMode) -> Result<Self, Error> {
        let image = self.mem.crash_image(mode);
        drop(self);
        Harness::open(MemDevice::from_image(image, 64))
    }

    /// Submits ops together and runs until all complete; results in submission order.
    pub fn run_concurrent(&mut self, ops: &[Op]) -> Vec<Result<ChunkInfo, Error>> {
        let first = self.next_tag;
        for op in ops {
            let tag = self.next_tag;
            self.next_tag += 1;
            let cop = match op {
                Op::Write {
                    chunk,
                    offset,
                    len,
                    fill,
                } => {
                    let mut buf = self.pool.alloc().expect("test pool has room");
                    for (i, b) in buf.as_mut_slice()[..*len as usize].iter_mut().enumerate() {
                        *b = pattern(*fill, *offset, i);
                    }
                    // Garbage after the data: the store must pad with zeros itself.
                    let cap = buf.capacity();
                    buf.as_mut_slice()[*len as usize..cap].fill(0xee);
                    ChunkOp::Write {
                        chunk: *chunk,
                        offset: *offset,
                        len: *len,
                        buf,
                    }
                }
                Op::Truncate { chunk, len } => ChunkOp::Truncate {
                    chunk: *chunk,
                    len: *len,
                },
                Op::Delete { chunk } => ChunkOp::Delete { chunk: *chunk },
            };
            let mut req = ShardRequest {
                tag,
                op: cop,
                read_check: ReadCheck::OnCore,
                version: 0,
            };
            loop {
                match self.store.submit(req, &mut self.out) {
                    Ok(()) => break,
                    Err(back) => {
                        req = back;
                        self.store.poll(&mut self.out);
                    }
                }
            }
        }
        self.store.drain(&mut self.out);
        let mut res: Vec<Option<Result<ChunkInfo, Error>>> = (0..ops.len()).map(|_| None).collect();
        for c in self.out.drain(..) {
            res[(c.tag - first) as usize] = Some(c.result);
        }
        res.into_iter()
            .map(|r| r.expect("every op completes"))
            .collect()
    }

    pub fn run(&mut self, op: &Op) -> Result<ChunkInfo, Error> {
        self.run_concurrent(std::slice::from_ref(op))
            .pop()
            .expect("one result")
    }

    /// Reads a whole chunk: (committed length, bytes up to the chunk size).
    /// Reads a whole chunk: (committed length and version, bytes up to the chunk size).
    pub fn read_chunk(&mut self, chunk: ChunkId) -> Result<(ChunkInfo, Vec<u8>), Error> {
        self.read_at(chunk, 0, CHUNK)
    }

    pub fn read_range(&mut self, chunk: ChunkId, offset: u32, len: u32) -> Result<Vec<u8>, Error> {
        self.read_at(chunk, offset, len).map(|(_, data)| data)
    }

    fn read_at(
        &mut self,
        chunk: ChunkId,
        offset: u32,
        len: u32,
    ) -> Result<(ChunkInfo, Vec<u8>), Error> {
        let tag = self.next_tag;
        self.next_tag += 1;
        let buf = self.pool.alloc().expect("test pool has room");
        let op = ChunkOp::Read {
            chunk,
            offset,
            len,
            buf,
        };
        let req = ShardRequest {
            tag,
            op,
            read_check: ReadCheck::OnCore,
            version: 0,
        };
        if self.store.submit(req, &mut self.out).is_err() {
            panic!("read refused");
        }
        self.store.drain(&mut self.out);
        let c = self.out.pop().expect("read completes");
        assert!(self.out.is_empty());
        let info = c.result?;
        Ok((
            info,
            c.buf.expect("read returns its buffer").as_slice()[..len as usize].to_vec(),
        ))
    }

    /// Compares the whole store with `model` over `universe`: `Ok` or what differs.
    pub fn matches(&mut self, model: &Model, universe: &[ChunkId]) -> Result<(), String> {
        for &c in universe {
            let (info, data) = self.read_chunk(c).map_err(|e| format!("read {c}: {e}"))?;
            let want = model.0.get(&c);
            let want_len = want.map_or(0, |v| v.len());
            if info.len as usize != want_len {
                return Err(format!("chunk {c}: length {} want {want_len}", info.len));
            }
            if want.is_none() && info.version != 0 {
                return Err(format!(
                    "chunk {c}: exists (version {}) but should not",
                    info.version
                ));
            }
            let mut expect = want.cloned().unwrap_or_default();
            expect.resize(CHUNK as usize, 0);
            if data != expect {
                let at = data
                    .iter()
                    .zip(&expect)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "chunk {c}: byte {at} is {} want {}",
                    data[at], expect[at]
                ));
            }
        }
        Ok(())
    }
}
