//! What every `BlockDevice` backend must do, written once against `&mut dyn
//! BlockDevice` so each backend's test is one call to `run_conformance`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spool_dataplane::device::{BlockDevice, IoCompletion, IoKind, IoRequest};
use spool_dataplane::Error;
use spool_hugepages::{DmaBuf, DmaPool};

/// Completions that take longer than this mean the device lost a request.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Device bytes the suite needs.
pub const MIN_DEVICE_SIZE: u64 = 4 << 20;

/// Runs the whole suite. Needs an idle device of at least `MIN_DEVICE_SIZE` bytes, a
/// pool with buffers of at least 4 blocks and at least `queue_depth_max + 1` of them
/// free. Overwrites the device's contents.
pub fn run_conformance(dev: &mut dyn BlockDevice, pool: &Arc<DmaPool>) {
    let bs = dev.info().block_size as usize;
    assert!(
        dev.info().size_bytes >= MIN_DEVICE_SIZE,
        "device too small for the suite"
    );
    assert!(
        pool.buf_size() >= 4 * bs,
        "pool buffers too small for the suite"
    );
    assert!(
        pool.available() > dev.queue_depth_max(),
        "pool needs queue_depth_max + 1 free buffers"
    );
    assert_eq!(dev.in_flight(), 0, "device must be idle");

    round_trips(dev, pool);
    many_in_flight(dev, pool);
    flush_completes(dev, pool);
    zeroes_and_deallocate(dev, pool);
    rejects_bad_requests(dev, pool);
    assert_eq!(dev.in_flight(), 0);
}

/// Writes then reads back several sizes at several offsets, including the last block.
pub fn round_trips(dev: &mut dyn BlockDevice, pool: &Arc<DmaPool>) {
    let bs = u64::from(dev.info().block_size);
    let size = dev.info().size_bytes;
    let max_len = (pool.buf_size() as u64).min(16 * bs) / bs * bs;
    let mut seed = 0;
    for len in [bs, 2 * bs, 3 * bs, max_len] {
        for offset in [0, bs, 7 * bs, (1 << 20) + 5 * bs, size - len] {
            seed += 1;
            let mut w = pool.alloc().expect("free buffer");
            fill(seed, &mut w.as_mut_slice()[..len as usize]);
            let c = one(dev, req(seed, IoKind::Write, offset, len as u32, Some(w)));
            c.result
                .unwrap_or_else(|e| panic!("write {len}@{offset}: {e}"));

            let mut r = pool.alloc().expect("free buffer");
            r.as_mut_slice().fill(0xa5);
            let c = one(dev, req(seed, IoKind::Read, offset, len as u32, Some(r)));
            c.result
                .unwrap_or_else(|e| panic!("read {len}@{offset}: {e}"));
            let r = c.buf.expect("read completion carries its buffer");
            let (data, rest) = r.as_slice().split_at(len as usize);
            assert!(
                has_pattern(seed, data),
                "read {len}@{offset} returned other data"
            );
            assert!(
                rest.iter().all(|&b| b == 0xa5),
                "read {len}@{offset} wrote past len"
            );
        }
    }
}

/// Fills the queue with distinct writes, checks the queue-full refusal, then reads
/// everything back with the queue full again. Completions may come in any order.
pub fn many_in_flight(dev: &mut dyn BlockDevice, pool: &Arc<DmaPool>) {
    let qd = dev.queue_depth_max();
    let bs = u64::from(dev.info().block_size);
    let len = 2 * bs;
    let base = 1 << 20;
    let mut addrs = HashMap::new();
    for i in 0..qd as u64 {
        let mut w = pool.alloc().expect("free buffer");
        fill(1000 + i, &mut w.as_mut_slice()[..len as usize]);
        addrs.insert(1000 + i, w.addr());
        dev.submit(req(
            1000 + i,
            IoKind::Write,
            base + i * len,
            len as u32,
            Some(w),
        ))
        .unwrap_or_else(|(e, _)| panic!("submit write {i} of {qd}: {e}"));
    }
    assert_eq!(dev.in_flight(), qd);

    let extra = pool.alloc().expect("free buffer");
    let extra_addr = extra.addr();
    let (e, back) = dev
        .submit(req(9999, IoKind::Read, 0, bs as u32, Some(extra)))
        .expect_err("submit beyond queue_depth_max must be refused");
    assert!(matches!(e, Error::Busy), "queue full gives Busy, got {e}");
    assert_eq!((back.tag, back.kind, back.offset), (9999, IoKind::Read, 0));
    assert_eq!(
        back.buf.map(|b| b.addr()),
        Some(extra_addr),
        "refused request keeps its buffer"
    );
    assert_eq!(dev.in_flight(), qd);

    let mut seen = HashMap::new();
    for c in wait_all(dev, qd) {
        c.result
            .unwrap_or_else(|e| panic!("write tag {}: {e}", c.tag));
        let buf = c.buf.expect("write completion carries its buffer");
        assert_eq!(
            addrs.get(&c.tag),
            Some(&buf.addr()),
            "tag {} came back with another buffer",
            c.tag
        );
        assert!(
            has_pattern(c.tag, &buf.as_slice()[..len as usize]),
            "write buffer changed"
        );
        assert!(
            seen.insert(c.tag, ()).is_none(),
            "tag {} completed twice",
            c.tag
        );
    }
    assert_eq!(dev.in_flight(), 0);

    for i in 0..qd as u64 {
        let r = pool.alloc().expect("free buffer");
        dev.submit(req(
            1000 + i,
            IoKind::Read,
            base + i * len,
            len as u32,
            Some(r),
        ))
        .unwrap_or_else(|(e, _)| panic!("submit read {i}: {e}"));
    }
    let done = wait_all(dev, qd);
    assert_eq!(done.len(), qd);
    for c in done {
        c.result
            .unwrap_or_else(|e| panic!("read tag {}: {e}", c.tag));
        let buf = c.buf.expect("read completion carries its buffer");
        assert!(
            has_pattern(c.tag, &buf.as_slice()[..len as usize]),
            "tag {} read other data",
            c.tag
        );
    }
}

/// A flush completes, alone and with writes in flight.
pub fn flush_completes(dev: &mut dyn BlockDevice, pool: &Arc<DmaPool>) {
    let c = one(dev, req(1, IoKind::Flush, 0, 0, None));
    c.result.expect("flush");
    assert!(c.buf.is_none());

    let bs = u64::from(dev.info().block_size);
    let mut w = pool.alloc().expect("free buffer");
    fill(2, &mut w.as_mut_slice()[..bs as usize]);
    dev.submit(req(2, IoKind::Write, 0, bs as u32, Some(w)))
        .map_err(|(e, _)| e)
        .expect("submit write");
    dev.submit(req(3, IoKind::Flush, 0, 0, None))
        .map_err(|(e, _)| e)
        .expect("submit flush");
    let mut tags: Vec<_> = wait_all(dev, 2)
        .into_iter()
        .map(|c| {
            c.result.unwrap_or_else(|e| panic!("tag {}: {e}", c.tag));
            c.tag
        })
        .collect();
    tags.sort_unstable();
    assert_eq!(tags, [2, 3]);
}

/// Write Zeroes makes exactly its range read as zeros; Deallocate leaves each block
/// reading as zeros or as its old bytes; neither needs a buffer, and one given comes
/// back. Both work across a range bigger than any buffer.
pub fn zeroes_and_deallocate(dev: &mut dyn BlockDevice, pool: &Arc<DmaPool>) {
    let bs = dev.info().block_size;
    let base = 2 << 20;
    let mut w = pool.alloc().expect("free buffer");
    fill(501, &mut w.as_mut_slice()[..4 * bs as usize]);
    one(dev, req(1, IoKind::Write, base, 4 * bs, Some(w)))
        .result
        .expect("write");
    let c = one(
        dev,
        req(2, IoKind::WriteZeroes, base + u64::from(bs), 2 * bs, None),
    );
    c.result.expect("write zeroes");
    assert!(c.buf.is_none());
    let read = |dev: &mut dyn BlockDevice| {
        let c = one(dev, req(3, IoKind::Read, base, 4 * bs, pool.alloc()));
        c.result.expect("read");
        c.buf.expect("buffer").as_slice()[..4 * bs as usize].to_vec()
    };
    let mut want = vec![0u8; 4 * bs as usize];
    fill(501, &mut want);
    want[bs as usize..3 * bs as usize].fill(0);
    assert!(
        read(dev) == want,
        "write zeroes changed exactly its two blocks"
    );

    // A buffer given comes back; a range far bigger than a buffer is one request.
    let c = one(dev, req(4, IoKind::Deallocate, base, 4 * bs, pool.alloc()));
    c.result.expect("deallocate");
    assert!(c.buf.is_some(), "the buffer given comes back");
    let after = read(dev);
    for (i, (got, old)) in after
        .chunks(bs as usize)
        .zip(want.chunks(bs as usize))
        .enumerate()
    {
        assert!(
            got.iter().all(|&b| b == 0) || got == old,
            "deallocated block {i} reads as neither zeros nor its old bytes"
        );
    }
    let big = (dev.info().size_bytes / 2).min(64 << 20) as u32 / bs * bs;
    one(dev, req(5, IoKind::WriteZeroes, 0, big, None))
        .result
        .expect("write zeroes of many MiB");
    one(dev, req(6, IoKind::Deallocate, 0, big, None))
        .result
        .expect("deallocate of many MiB");
    let c = one(
        dev,
        req(
            7,
            IoKind::Read,
            u64::from(big) - u64::from(bs),
            bs,
            pool.alloc(),
        ),
    );
    c.result.expect("read");
    // After zeroing, deallocation may only leave zeros (zeros or the old bytes).
    assert!(c.buf.expect("buffer").as_slice()[..bs as usize]
        .iter()
        .all(|&b| b == 0));
}

/// Malformed requests are refused at submit with `BadRequest`, the request (and its
/// buffer) handed back, nothing queued, and the device still works afterwards.
pub fn rejects_bad_requests(dev: &mut dyn BlockDevice, pool: &Arc<DmaPool>) {
    let bs = u64::from(dev.info().block_size);
    let size = dev.info().size_bytes;
    let too_long = (pool.buf_size() as u64).div_ceil(bs) * bs + bs;
    let cases: [(&str, IoKind, u64, u64, bool); 13] = [
        ("unaligned offset", IoKind::Read, 512, bs, true),
        ("unaligned len", IoKind::Write, 0, 100, true),
        ("zero len", IoKind::Read, 0, 0, true),
        ("len beyond buffer", IoKind::Read, 0, too_long, true),
        ("straddles the end", IoKind::Write, size - bs, 2 * bs, true),
        ("starts at the end", IoKind::Read, size, bs, true),
        (
            "offset overflows",
            IoKind::Read,
            u64::MAX / bs * bs,
            bs,
            true,
        ),
        (
            "huge len",
            IoKind::Read,
            0,
            u64::from(u32::MAX) / bs * bs,
            true,
        ),
        ("read without buffer", IoKind::Read, 0, bs, false),
        ("write without buffer", IoKind::Write, 0, bs, false),
        ("zeroes of zero len", IoKind::WriteZeroes, 0, 0, false),
        ("unaligned deallocate", IoKind::Deallocate, 512, bs, false),
        (
            "zeroes past the end",
            IoKind::WriteZeroes,
            size - bs,
            2 * bs,
            false,
        ),
    ];
    for (what, kind, offset, len, with_buf) in cases {
        let buf = with_buf.then(|| pool.alloc().expect("free buffer"));
        let addr = buf.as_ref().map(DmaBuf::addr);
        let len = u32::try_from(len).expect("case len fits u32");
        let (e, back) = dev.submit(req(77, kind, offset, len, buf)).expect_err(what);
        assert!(matches!(e, Error::BadRequest(_)), "{what}: got {e}");
        assert_eq!(
            (back.tag, back.kind, back.offset, back.len),
            (77, kind, offset, len),
            "{what}"
        );
        assert_eq!(
            back.buf.as_ref().map(DmaBuf::addr),
            addr,
            "{what}: buffer not handed back"
        );
        assert_eq!(
            dev.in_flight(),
            0,
            "{what}: a refused request is not in flight"
        );
    }
    let c = one(dev, req(78, IoKind::Read, 0, bs as u32, pool.alloc()));
    c.result.expect("device works after refusals");
}

pub fn req(tag: u64, kind: IoKind, offset: u64, len: u32, buf: Option<DmaBuf>) -> IoRequest {
    IoRequest {
        tag,
        kind,
        offset,
        len,
        buf,
    }
}

/// Submits one request on an idle device and waits for its completion.
pub fn one(dev: &mut dyn BlockDevice, r: IoRequest) -> IoCompletion {
    let tag = r.tag;
    dev.submit(r)
        .unwrap_or_else(|(e, _)| panic!("submit tag {tag}: {e}"));
    let mut done = wait_all(dev, 1);
    let c = done.pop().expect("one completion");
    assert_eq!(c.tag, tag, "completion carries its tag");
    c
}

/// Polls until `n` completions arrived (and checks no more than `n` did).
fn wait_all(dev: &mut dyn BlockDevice, n: usize) -> Vec<IoCompletion> {
    let deadline = Instant::now() + TIMEOUT;
    let mut done = Vec::with_capacity(dev.queue_depth_max());
    while done.len() < n {
        let before = done.len();
        let got = dev.poll(&mut done);
        assert_eq!(
            got,
            done.len() - before,
            "poll returns how many it appended"
        );
        assert!(
            Instant::now() < deadline,
            "only {} of {n} completions after {TIMEOUT:?}",
            done.len()
        );
        std::thread::yield_now();
    }
    assert_eq!(done.len(), n, "more completions than requests");
    done
}

/// A pattern that differs per seed and per 8-byte word, so misplaced or stale data
/// never matches.
pub fn fill(seed: u64, buf: &mut [u8]) {
    for (i, word) in buf.chunks_mut(8).enumerate() {
        let v = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64;
        word.copy_from_slice(&v.to_le_bytes()[..word.len()]);
    }
}

pub fn has_pattern(seed: u64, data: &[u8]) -> bool {
    data.chunks(8).enumerate().all(|(i, word)| {
        let v = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64;
        word == &v.to_le_bytes()[..word.len()]
    })
}
