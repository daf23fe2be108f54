//! Races between reads, truncates and in-place rewrites, failed writes with queued
//! deletes, and refused device submissions: each was a bug found in review (a false
//! checksum error, a leaked extent, a leaked reader count).
mod store_harness;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use spool_dataplane::device::mem::MemDevice;
use spool_dataplane::device::{BlockDevice, DeviceInfo, IoCompletion, IoKind, IoRequest};
use spool_dataplane::store::{
    self, ChunkId, ChunkOp, CoreStore, ReadCheck, ShardCompletion, ShardRequest,
};
use spool_dataplane::Error;
use spool_hugepages::{DmaPool, PagePolicy};
use store_harness::{formatted_image, geometry_opts, Harness, Op, CHUNK};

/// MemDevice that can hold reads back (keep them in flight) or refuse them.
#[derive(Debug)]
struct Gate {
    inner: MemDevice,
    hold: Arc<AtomicBool>,
    refuse: Arc<AtomicBool>,
    held: Vec<IoRequest>,
}
impl BlockDevice for Gate {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn queue_depth_max(&self) -> usize {
        self.inner.queue_depth_max()
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }
    fn submit(&mut self, req: IoRequest) -> Result<(), (Error, IoRequest)> {
        if req.kind == IoKind::Read && self.refuse.load(Ordering::SeqCst) {
            return Err((Error::Busy, req));
        }
        if req.kind == IoKind::Read && self.hold.load(Ordering::SeqCst) {
            self.held.push(req);
            return Ok(());
        }
        self.inner.submit(req)
    }
    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        if !self.hold.load(Ordering::SeqCst) {
            for r in self.held.drain(..) {
                self.inner.submit(r).unwrap();
            }
        }
        self.inner.poll(done)
    }
}

fn open_gate() -> (CoreStore, Arc<AtomicBool>, Arc<AtomicBool>) {
    let (img, geo) = formatted_image(8 << 20, &geometry_opts());
    let hold = Arc::new(AtomicBool::new(false));
    let refuse = Arc::new(AtomicBool::new(false));
    let dev = Gate {
        inner: MemDevice::from_image(img, 64),
        hold: hold.clone(),
        refuse: refuse.clone(),
        held: vec![],
    };
    let shards: Vec<u32> = (0..geo.shard_count).collect();
    (
        CoreStore::open(Box::new(dev), &geo, &shards).unwrap(),
        hold,
        refuse,
    )
}

fn write_op(pool: &Arc<DmaPool>, chunk: ChunkId, offset: u32, len: u32, fill: u8) -> ChunkOp {
    let mut buf = pool.alloc().unwrap();
    buf.as_mut_slice()[..len as usize].fill(fill);
    ChunkOp::Write {
        chunk,
        offset,
        len,
        buf,
    }
}
fn read_op(pool: &Arc<DmaPool>, chunk: ChunkId, offset: u32, len: u32) -> ChunkOp {
    ChunkOp::Read {
        chunk,
        offset,
        len,
        buf: pool.alloc().unwrap(),
    }
}

fn req(tag: u64, op: ChunkOp) -> ShardRequest {
    ShardRequest {
        tag,
        op,
        read_check: ReadCheck::OnCore,
        version: 0,
    }
}
fn pump(st: &mut CoreStore, out: &mut Vec<ShardCompletion>) {
    for _ in 0..20 {
        st.poll(out);
    }
}

const C: ChunkId = ChunkId { inode: 7, index: 0 };

/// A read admitted after a truncate was admitted (but before it committed) is not
/// waited for; the block it reads is rewritten in place after the truncate commits.
#[test]
fn truncate_then_inplace_rewrite_races_with_read() {
    let (mut st, hold, _) = open_gate();
    let pool = DmaPool::new("t", CHUNK as usize, 8, PagePolicy::Normal).unwrap();
    let mut out = Vec::new();
    st.submit(req(1, write_op(&pool, C, 0, 8192, 0x11)), &mut out)
        .unwrap();
    pump(&mut st, &mut out);
    assert!(out.pop().unwrap().result.is_ok());

    // Truncate to one block, then a read of block 1 arrives before the truncate commits.
    st.submit(
        req(
            2,
            ChunkOp::Truncate {
                chunk: C,
                len: 4096,
            },
        ),
        &mut out,
    )
    .unwrap();
    hold.store(true, Ordering::SeqCst);
    st.submit(req(3, read_op(&pool, C, 4096, 4096)), &mut out)
        .unwrap();
    pump(&mut st, &mut out); // truncate commits; the read is still in flight
    let t = out.iter().position(|c| c.tag == 2).expect("truncate done");
    assert!(out.remove(t).result.is_ok());

    // Block 1 is now a hole, but the read in flight still covers it: the rewrite must
    // not land in the extent being read. It goes copy-on-write (whose own read of the
    // old extent is held by the gate too, so nothing completes until it opens).
    st.submit(req(4, write_op(&pool, C, 4096, 4096, 0x22)), &mut out)
        .unwrap();
    pump(&mut st, &mut out);
    hold.store(false, Ordering::SeqCst);
    pump(&mut st, &mut out);
    let w = out.iter().position(|c| c.tag == 4).expect("write done");
    assert!(out.remove(w).result.is_ok());
    let r = out.iter().position(|c| c.tag == 3).expect("read done");
    let r = out.remove(r);
    // The read started when block 1 held 0x11: it returns exactly those bytes, never
    // a checksum error.
    match r.result {
        Ok(_) => {
            let data = r.buf.expect("read returns its buffer");
            assert!(
                data.as_slice()[..4096].iter().all(|&b| b == 0x11),
                "the read sees the bytes of its start"
            );
        }
        Err(e) => panic!("read admitted before the truncate committed failed: {e}"),
    }
    // A read after the rewrite sees the new bytes.
    st.submit(req(5, read_op(&pool, C, 4096, 4096)), &mut out)
        .unwrap();
    pump(&mut st, &mut out);
    let r = out.pop().expect("second read done");
    assert_eq!(r.tag, 5);
    r.result.expect("second read");
    assert!(r.buf.expect("buffer").as_slice()[..4096]
        .iter()
        .all(|&b| b == 0x22));
}

/// A failed in-place write to a new chunk leaves its pending entry (and reserved
/// extent) behind when the only other op on the chunk is a delete/truncate.
#[test]
fn failed_new_chunk_write_with_queued_delete_leaks_extent() {
    let (img, _) = formatted_image(8 << 20, &geometry_opts());
    let mut h = Harness::open(MemDevice::from_image(img, 64)).unwrap();
    let extents = h.store.shards()[0].stats().extents;
    assert_eq!(h.store.shards()[0].stats().free_extents, extents);
    h.mem.fail_op(h.mem.mutating_ops() + 1, 5); // the data write of the new chunk
    let r = h.run_concurrent(&[
        Op::Write {
            chunk: C,
            offset: 0,
            len: 4096,
            fill: 1,
        },
        Op::Delete { chunk: C },
    ]);
    assert!(r[0].is_err() && r[1].is_ok(), "{r:?}");
    let s = h.store.shards()[0].stats();
    assert_eq!(
        s.free_extents,
        extents,
        "extent leaked; index entry left: {:?}",
        h.store.shards()[0].index().get(&C)
    );
}

/// A read whose device submit is refused leaves its reader count raised: the extent
/// can never return to the free list once the chunk is deleted.
#[test]
fn refused_read_submit_leaks_reader_count() {
    let (mut st, _, refuse) = open_gate();
    let pool = DmaPool::new("t", CHUNK as usize, 8, PagePolicy::Normal).unwrap();
    let mut out = Vec::new();
    st.submit(req(1, write_op(&pool, C, 0, 4096, 0x11)), &mut out)
        .unwrap();
    pump(&mut st, &mut out);
    out.clear();
    let e = st.shards()[0].index().get(&C).unwrap().extent;
    refuse.store(true, Ordering::SeqCst);
    st.submit(req(2, read_op(&pool, C, 0, 4096)), &mut out)
        .unwrap();
    pump(&mut st, &mut out);
    assert!(out.pop().unwrap().result.is_err());
    refuse.store(false, Ordering::SeqCst);
    assert_eq!(st.shards()[0].index().readers(e), 0, "reader count leaked");
}

#[allow(dead_code)]
fn _unused() -> Option<store::Geometry> {
    None
}
