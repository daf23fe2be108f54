//! `mem`: an in-memory block device for tests, with fault injection.
//!
//! It keeps two images: `current` (what reads see) and `durable` (what survives a
//! crash). A write changes `current` and is remembered as unflushed; a flush makes every
//! write that *executed* before it durable. Within one `poll` the queued requests may
//! execute in a seeded random order, as a real device's would, so a caller that issues a
//! flush before its writes have completed is caught losing them.
//!
//! Faults: the device can die at the N-th write or flush ("crash point"; that op and
//! every later one fails with EIO and changes nothing), single ops can fail with an
//! errno, and `crash_image` turns the state at the crash into the image a restarted
//! machine would see: unflushed writes dropped, kept, or torn at 512-byte sectors.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::{validate, BlockDevice, DeviceInfo, IoCompletion, IoKind, IoRequest};
use crate::Error;

/// The sector size at which writes may tear.
pub const SECTOR: usize = 512;
const EIO: i32 = 5;

/// What happens to unflushed writes at a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// None of them reached the media.
    DropUnflushed,
    /// All of them did.
    KeepUnflushed,
    /// Each sector of each unflushed write independently did or did not (seeded).
    Tear { seed: u64 },
}

#[derive(Debug)]
struct Unflushed {
    offset: usize,
    data: Vec<u8>,
    /// A durable write: already in the durable image, kept in this list only so that
    /// a crash image replays writes in their order (an older unflushed write to the
    /// same range must not resurface over it).
    durable: bool,
}

#[derive(Debug)]
struct MemState {
    current: Vec<u8>,
    durable: Vec<u8>,
    unflushed: Vec<Unflushed>,
    /// Writes and flushes executed so far (the crash points are numbered by these).
    mutating_ops: u64,
    /// The device dies when executing this mutating op (1-based).
    crash_at_op: Option<u64>,
    dead: bool,
    /// Fail the mutating op with this 1-based number with the given errno, once.
    fail_op: Option<(u64, i32)>,
    /// Fail every read with this errno while set.
    fail_reads: Option<i32>,
}

/// The test harness's view of a `MemDevice`: fault control and crash images. Clones
/// share the device's state.
#[derive(Clone, Debug)]
pub struct MemHandle(Arc<Mutex<MemState>>);

impl MemHandle {
    fn lock(&self) -> MutexGuard<'_, MemState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// The device dies when it executes its `n`-th write or flush (1-based).
    pub fn crash_at_op(&self, n: u64) {
        self.lock().crash_at_op = Some(n);
    }
    /// The `n`-th write or flush (1-based) fails once with `errno`.
    pub fn fail_op(&self, n: u64, errno: i32) {
        self.lock().fail_op = Some((n, errno));
    }
    pub fn fail_reads(&self, errno: Option<i32>) {
        self.lock().fail_reads = errno;
    }
    /// Writes and flushes executed so far.
    pub fn mutating_ops(&self) -> u64 {
        self.lock().mutating_ops
    }
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }
    /// The image a machine restarted now would see.
    pub fn crash_image(&self, mode: CrashMode) -> Vec<u8> {
        let st = self.lock();
        let mut img = st.durable.clone();
        let mut rng = match mode {
            CrashMode::Tear { seed } => Some(StdRng::seed_from_u64(seed)),
            _ => None,
        };
        for w in &st.unflushed {
            if w.durable {
                img[w.offset..w.offset + w.data.len()].copy_from_slice(&w.data);
                continue;
            }
            match mode {
                CrashMode::DropUnflushed => {}
                CrashMode::KeepUnflushed => {
                    img[w.offset..w.offset + w.data.len()].copy_from_slice(&w.data)
                }
                CrashMode::Tear { .. } => {
                    let rng = rng.as_mut().expect("tear mode has an rng");
                    for (i, sector) in w.data.chunks(SECTOR).enumerate() {
                        if rng.gen_bool(0.5) {
                            let at = w.offset + i * SECTOR;
                            img[at..at + sector.len()].copy_from_slice(sector);
                        }
                    }
                }
            }
        }
        img
    }
    /// Flips bits in the durable and current images (media corruption).
    pub fn corrupt(&self, offset: usize, len: usize) {
        let mut st = self.lock();
        for i in offset..offset + len {
            st.durable[i] ^= 0x5a;
            st.current[i] ^= 0x5a;
        }
    }
    /// A copy of what reads currently see.
    pub fn current_image(&self) -> Vec<u8> {
        self.lock().current.clone()
    }
}

/// An in-memory device; see the module docs.
#[derive(Debug)]
pub struct MemDevice {
    info: DeviceInfo,
    state: MemHandle,
    queued: VecDeque<IoRequest>,
    in_flight: usize,
    queue_depth_max: usize,
    reorder: Option<StdRng>,
    /// With `with_delays`: each poll executes only a random part of what is queued, so
    /// requests stay in flight across polls (and across other requests' completions).
    delays: bool,
}

impl MemDevice {
    /// A zeroed device of `size_bytes`.
    pub fn new(size_bytes: u64, queue_depth_max: usize) -> Self {
        Self::from_image(vec![0; size_bytes as usize], queue_depth_max)
    }

    /// A device whose durable and current contents are `image` (after a crash).
    pub fn from_image(image: Vec<u8>, queue_depth_max: usize) -> Self {
        assert!(queue_depth_max > 0, "queue depth must be positive");
        let info = DeviceInfo {
            size_bytes: image.len() as u64,
            block_size: 4096,
            backend: "mem",
            name: "mem".to_owned(),
        };
        let state = MemHandle(Arc::new(Mutex::new(MemState {
            current: image.clone(),
            durable: image,
            unflushed: Vec::new(),
            mutating_ops: 0,
            crash_at_op: None,
            dead: false,
            fail_op: None,
            fail_reads: None,
        })));
        MemDevice {
            info,
            state,
            queued: VecDeque::with_capacity(queue_depth_max),
            in_flight: 0,
            queue_depth_max,
            reorder: None,
            delays: false,
        }
    }

    /// Execute and complete each poll's batch in a random order drawn from `seed`.
    pub fn with_reorder(mut self, seed: u64) -> Self {
        self.reorder = Some(StdRng::seed_from_u64(seed));
        self
    }

    /// Like `with_reorder`, and each poll also leaves a random part of the queued
    /// requests in flight for later polls (at least one executes, so work progresses).
    pub fn with_delays(mut self, seed: u64) -> Self {
        self.reorder = Some(StdRng::seed_from_u64(seed));
        self.delays = true;
        self
    }

    /// Another queue to the same device, for a second dataplane core.
    pub fn another_queue(&self) -> MemDevice {
        MemDevice {
            info: self.info.clone(),
            state: self.state.clone(),
            queued: VecDeque::with_capacity(self.queue_depth_max),
            in_flight: 0,
            queue_depth_max: self.queue_depth_max,
            reorder: None,
            delays: false,
        }
    }

    pub fn handle(&self) -> MemHandle {
        self.state.clone()
    }

    fn execute(st: &mut MemState, req: &mut IoRequest) -> Result<(), Error> {
        /// The bytes a mutating request leaves in its range.
        fn written(req: &IoRequest) -> Vec<u8> {
            let len = req.len as usize;
            match req.kind {
                IoKind::Write | IoKind::WriteDurable => req
                    .buf
                    .as_ref()
                    .expect("validated: write has a buffer")
                    .as_slice()[..len]
                    .to_vec(),
                _ => vec![0; len],
            }
        }
        if req.kind == IoKind::Read {
            if let Some(errno) = st.fail_reads {
                return Err(Error::Io { errno });
            }
            if st.dead {
                return Err(Error::Io { errno: EIO });
            }
            let (off, len) = (req.offset as usize, req.len as usize);
            let buf = req.buf.as_mut().expect("validated: read has a buffer");
            buf.as_mut_slice()[..len].copy_from_slice(&st.current[off..off + len]);
            return Ok(());
        }
        if st.dead {
            return Err(Error::Io { errno: EIO });
        }
        st.mutating_ops += 1;
        if st.crash_at_op == Some(st.mutating_ops) {
            st.dead = true;
            // A write in progress at the crash may reach the media whole, in part or
            // not at all: it joins the unflushed writes the crash image decides on.
            if req.kind != IoKind::Flush {
                let data = written(req);
                st.unflushed.push(Unflushed {
                    offset: req.offset as usize,
                    data,
                    durable: false,
                });
            }
            return Err(Error::Io { errno: EIO });
        }
        if let Some((n, errno)) = st.fail_op {
            if n == st.mutating_ops {
                st.fail_op = None;
                return Err(Error::Io { errno });
            }
        }
        match req.kind {
            // Deallocated blocks read back as zeros here (one of the allowed outcomes).
            IoKind::Write | IoKind::WriteDurable | IoKind::WriteZeroes | IoKind::Deallocate => {
                let (off, len) = (req.offset as usize, req.len as usize);
                let durable = req.kind == IoKind::WriteDurable;
                let data = written(req);
                st.current[off..off + len].copy_from_slice(&data);
                if durable {
                    st.durable[off..off + len].copy_from_slice(&data);
                }
                st.unflushed.push(Unflushed {
                    offset: off,
                    data,
                    durable,
                });
            }
            IoKind::Flush => {
                for w in std::mem::take(&mut st.unflushed) {
                    st.durable[w.offset..w.offset + w.data.len()].copy_from_slice(&w.data);
                }
            }
            IoKind::Read => unreachable!("handled above"),
        }
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn queue_depth_max(&self) -> usize {
        self.queue_depth_max
    }
    fn in_flight(&self) -> usize {
        self.in_flight
    }
    fn submit(&mut self, req: IoRequest) -> Result<(), (Error, IoRequest)> {
        if let Err(e) = validate(&self.info, &req) {
            return Err((e, req));
        }
        if self.in_flight >= self.queue_depth_max {
            return Err((Error::Busy, req));
        }
        self.in_flight += 1;
        self.queued.push_back(req);
        Ok(())
    }
    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        if self.queued.is_empty() {
            return 0;
        }
        let mut batch: Vec<IoRequest> = self.queued.drain(..).collect();
        if let Some(rng) = self.reorder.as_mut() {
            batch.shuffle(rng);
            if self.delays {
                let run = rng.gen_range(1..=batch.len());
                self.queued.extend(batch.drain(run..));
            }
        }
        let n = batch.len();
        let mut st = self.state.lock();
        for mut req in batch {
            let result = Self::execute(&mut st, &mut req);
            done.push(IoCompletion {
                tag: req.tag,
                result,
                buf: req.buf,
            });
        }
        self.in_flight -= n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::run_sync;
    use spool_hugepages::{DmaPool, PagePolicy};

    fn write(dev: &mut MemDevice, pool: &Arc<spool_hugepages::DmaPool>, off: u64, byte: u8) {
        let mut b = pool.alloc().unwrap();
        b.as_mut_slice().fill(byte);
        let (r, _) = run_sync(
            dev,
            IoRequest {
                tag: 1,
                kind: IoKind::Write,
                offset: off,
                len: 4096,
                buf: Some(b),
            },
        );
        r.unwrap();
    }

    #[test]
    fn flush_makes_durable_and_crash_drops_the_rest() {
        let pool = DmaPool::new("t", 4096, 4, PagePolicy::Normal).unwrap();
        let mut dev = MemDevice::new(16384, 8);
        let h = dev.handle();
        write(&mut dev, &pool, 0, 1);
        run_sync(
            &mut dev,
            IoRequest {
                tag: 2,
                kind: IoKind::Flush,
                offset: 0,
                len: 0,
                buf: None,
            },
        )
        .0
        .unwrap();
        write(&mut dev, &pool, 4096, 2);
        let img = h.crash_image(CrashMode::DropUnflushed);
        assert!(img[..4096].iter().all(|&b| b == 1));
        assert!(img[4096..8192].iter().all(|&b| b == 0));
        let img = h.crash_image(CrashMode::KeepUnflushed);
        assert!(img[4096..8192].iter().all(|&b| b == 2));
        let img = h.crash_image(CrashMode::Tear { seed: 7 });
        let kept = img[4096..8192].chunks(SECTOR).filter(|s| s[0] == 2).count();
        assert!(
            kept > 0 && kept < 8,
            "a torn write keeps some sectors ({kept})"
        );
    }

    #[test]
    fn crash_point_stops_everything_after() {
        let pool = DmaPool::new("t", 4096, 4, PagePolicy::Normal).unwrap();
        let mut dev = MemDevice::new(16384, 8);
        let h = dev.handle();
        h.crash_at_op(2);
        write(&mut dev, &pool, 0, 1);
        let mut b = pool.alloc().unwrap();
        b.as_mut_slice().fill(3);
        let (r, _) = run_sync(
            &mut dev,
            IoRequest {
                tag: 1,
                kind: IoKind::Write,
                offset: 0,
                len: 4096,
                buf: Some(b),
            },
        );
        assert!(matches!(r, Err(Error::Io { errno: 5 })));
        assert!(h.is_dead());
        assert!(h.current_image()[..4096].iter().all(|&b| b == 1));
    }

    #[test]
    fn delays_keep_requests_in_flight_across_polls() {
        let pool = DmaPool::new("t", 4096, 16, PagePolicy::Normal).unwrap();
        let mut dev = MemDevice::new(16 * 4096, 16).with_delays(11);
        for i in 0..16u64 {
            let mut b = pool.alloc().unwrap();
            b.as_mut_slice().fill(i as u8);
            dev.submit(IoRequest {
                tag: i,
                kind: IoKind::Write,
                offset: i * 4096,
                len: 4096,
                buf: Some(b),
            })
            .unwrap();
        }
        let mut done = Vec::new();
        let first = dev.poll(&mut done);
        assert!(
            first >= 1 && dev.in_flight() == 16 - first,
            "some stay in flight"
        );
        let mut polls = 1;
        while dev.in_flight() > 0 {
            dev.poll(&mut done);
            polls += 1;
            assert!(polls <= 16, "every poll executes at least one request");
        }
        let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..16).collect::<Vec<_>>());
        assert!(polls > 1, "seed 11 spreads the batch over several polls");
    }

    #[test]
    fn rejects_bad_requests_without_panicking() {
        let pool = DmaPool::new("t", 4096, 4, PagePolicy::Normal).unwrap();
        let mut dev = MemDevice::new(16384, 1);
        let req = |off, len, buf| IoRequest {
            tag: 0,
            kind: IoKind::Write,
            offset: off,
            len,
            buf,
        };
        assert!(dev.submit(req(1, 4096, pool.alloc())).is_err());
        assert!(dev.submit(req(0, 8192, pool.alloc())).is_err());
        assert!(dev.submit(req(16384, 4096, pool.alloc())).is_err());
        assert!(dev.submit(req(0, 4096, None)).is_err());
        dev.submit(req(0, 4096, pool.alloc())).unwrap();
        let (e, back) = dev.submit(req(0, 4096, pool.alloc())).unwrap_err();
        assert!(matches!(e, Error::Busy) && back.buf.is_some());
    }
}
