//! The polled engine: N dataplane threads, each pinned to a CPU and owning a block
//! device queue and a set of shards (shared-nothing: a chunk's shard belongs to exactly
//! one core). Clients hand requests to a core through a bounded lock-free ring and get
//! completions back on their own bounded queue.
//!
//! Idle policy: a core spins while it has work or device I/O in flight; with nothing to
//! do it keeps spinning for `idle_spin_us`, then parks with a doubling timeout up to
//! `idle_park_max_us`. A client that pushes to a parked core unparks it. On a machine
//! with few cores this keeps an idle dataplane from starving everything else; set
//! `idle_spin_us` high for pure polling.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use serde::Serialize;
use spool_hugepages::{DmaBuf, DmaPool};
use spool_perf::Perf;

use crate::device::{BlockDevice, DeviceInfo};
use crate::metrics as m;
use crate::store::{
    verify_read, ChunkInfo, ChunkOp, CoreStore, Geometry, ReadCheck, ShardCompletion, ShardRequest,
    ShardStats, Superblock,
};
use crate::Error;

/// How the engine runs its cores.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub cores: usize,
    /// CPUs to pin core i to (`cpus[i]`); `None`: the process's allowed CPUs in order.
    pub cpus: Option<Vec<usize>>,
    pub pin: bool,
    pub idle_spin_us: u64,
    pub idle_park_max_us: u64,
    /// Requests each core's ring holds.
    pub ring_capacity: usize,
}

/// A client's completion queue: bounded, single consumer (the client), pushed by
/// cores.
struct ReplyQueue {
    done: ArrayQueue<ShardCompletion>,
    waiting: AtomicBool,
    thread: Mutex<Option<Thread>>,
    /// Called instead of unparking when the owner sleeps in something else (an epoll).
    waker: std::sync::OnceLock<Waker>,
}

type Waker = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for ReplyQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyQueue")
            .field("done", &self.done.len())
            .finish()
    }
}

impl ReplyQueue {
    fn push(&self, c: ShardCompletion) {
        // The client never has more requests outstanding than the queue holds.
        let pushed = self.done.push(c);
        assert!(
            pushed.is_ok(),
            "reply queue overflow: client exceeded its in-flight bound"
        );
        // Dekker-style handshake with `Client::wait`: each side writes its own flag,
        // fences, then reads the other's, so at least one sees the other and no wake-up
        // is lost (without the fences a store may pass a later load).
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            if let Some(w) = self.waker.get() {
                w();
                return;
            }
            if let Ok(t) = self.thread.lock() {
                if let Some(t) = t.as_ref() {
                    t.unpark();
                }
            }
        }
    }
}

#[derive(Debug)]
struct Submission {
    req: ShardRequest,
    reply: Arc<ReplyQueue>,
}

/// What a core publishes about itself for `status` (refreshed every 100 ms, with a
/// try-lock so the core never waits for a reader).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CoreStatus {
    pub core: usize,
    pub cpu: Option<usize>,
    pub pinned_by: Option<String>,
    pub shards: Vec<u32>,
    pub busy_ops: usize,
    pub shard_stats: Vec<ShardStats>,
    pub failures: Vec<String>,
    pub parks: u64,
}

#[derive(Debug)]
struct CoreShared {
    ring: ArrayQueue<Submission>,
    sleeping: AtomicBool,
    thread: Thread,
    status: Mutex<CoreStatus>,
}

/// The status of the whole engine.
#[derive(Clone, Debug, Serialize)]
pub struct EngineStatus {
    pub device: DeviceStatus,
    pub geometry: GeometryStatus,
    pub cores: Vec<CoreStatus>,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub chunks: u64,
    pub dma_buffers: usize,
    pub dma_buffers_free: usize,
    pub dma_hugepages: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeviceStatus {
    pub backend: &'static str,
    pub name: String,
    pub size_bytes: u64,
    pub uuid: String,
    pub format_version: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct GeometryStatus {
    pub chunk_size: u32,
    pub shards: u32,
    pub extents_per_shard: u32,
    pub wal_size: u64,
}

/// A running engine.
#[derive(Debug)]
pub struct Engine {
    cores: Vec<Arc<CoreShared>>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    superblock: Superblock,
    device: DeviceInfo,
    pool: Arc<DmaPool>,
    perf: Arc<Perf>,
}

impl Engine {
    /// Starts the cores. `devices[i]` is core i's queue to the (same) formatted device,
    /// opened with `pool` registered; every core recovers its shards before this
    /// returns, and a recovery error fails the start.
    pub fn start(
        opts: &EngineOptions,
        devices: Vec<Box<dyn BlockDevice>>,
        superblock: Superblock,
        pool: Arc<DmaPool>,
        perf: Arc<Perf>,
    ) -> Result<Engine, Error> {
        assert_eq!(devices.len(), opts.cores, "one device queue per core");
        assert!(opts.ring_capacity > 0, "rings hold at least one request");
        let g = superblock.geometry.clone();
        if opts.cores as u32 > g.shard_count {
            return Err(Error::BadRequest(format!(
                "{} dataplane cores but the device has {} shard(s): a core without a shard would idle; \
                 use at most {} cores or reformat with more shards",
                opts.cores, g.shard_count, g.shard_count
            )));
        }
        let cpus = match &opts.cpus {
            Some(c) => c.clone(),
            None => spool_ffi::affinity::allowed_cpus()?,
        };
        let device = devices[0].info().clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Arc<CoreShared>, Error>>();
        let mut threads = Vec::with_capacity(opts.cores);
        for (i, dev) in devices.into_iter().enumerate() {
            let shard_ids: Vec<u32> = (0..g.shard_count)
                .filter(|s| *s as usize % opts.cores == i)
                .collect();
            let cpu = opts
                .pin
                .then(|| cpus.get(i % cpus.len().max(1)).copied())
                .flatten();
            let core = CoreLoop::config(i, opts);
            let (g, stop, tx, perf) = (
                g.clone(),
                Arc::clone(&stop),
                ready_tx.clone(),
                Arc::clone(&perf),
            );
            let ring_capacity = opts.ring_capacity;
            let t = std::thread::Builder::new()
                .name(format!("spool-core-{i}"))
                .spawn(move || {
                    let pinned_by = cpu.map(|c| match spool_ffi::affinity::pin_current_thread(c) {
                        Ok(m) => format!("{m:?}"),
                        Err(e) => {
                            tracing::warn!(core = i, cpu = c, error = %e, "could not pin dataplane core");
                            "unpinned".to_owned()
                        }
                    });
                    let store = match CoreStore::open(dev, &g, &shard_ids) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let shared = Arc::new(CoreShared {
                        ring: ArrayQueue::new(ring_capacity),
                        sleeping: AtomicBool::new(false),
                        thread: std::thread::current(),
                        status: Mutex::new(CoreStatus { core: i, cpu, pinned_by, shards: shard_ids, ..CoreStatus::default() }),
                    });
                                        if tx.send(Ok(Arc::clone(&shared))).is_err() {
                        return;
                    }
                    // Let `start` see the channel close if another core dies opening.
                    drop(tx);
                    core.run(store, &shared, &stop, &perf);
                })
                .map_err(|e| Error::Open { path: "dataplane thread".into(), source: e })?;
            threads.push(t);
        }
        drop(ready_tx);
        let mut cores = Vec::with_capacity(opts.cores);
        let mut first_err = None;
        for _ in 0..opts.cores {
            match ready_rx.recv() {
                Ok(Ok(c)) => cores.push(c),
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(_) => first_err = first_err.or(Some(Error::Shutdown)),
            }
        }
        cores.sort_by_key(|c| c.status.lock().map(|s| s.core).unwrap_or(0));
        let engine = Engine {
            cores,
            threads,
            stop,
            superblock,
            device,
            pool,
            perf,
        };
        if let Some(e) = first_err {
            drop(engine);
            return Err(e);
        }
        Ok(engine)
    }

    pub fn geometry(&self) -> &Geometry {
        &self.superblock.geometry
    }
    pub fn pool(&self) -> &Arc<DmaPool> {
        &self.pool
    }
    pub fn perf(&self) -> &Arc<Perf> {
        &self.perf
    }

    /// A client with room for `inflight_max` outstanding requests.
    pub fn client(self: &Arc<Self>, inflight_max: usize) -> Client {
        assert!(inflight_max > 0, "a client needs room for one request");
        Client {
            engine: Arc::clone(self),
            reply: Arc::new(ReplyQueue {
                done: ArrayQueue::new(inflight_max),
                waiting: AtomicBool::new(false),
                thread: Mutex::new(Some(std::thread::current())),
                waker: std::sync::OnceLock::new(),
            }),
            in_flight: 0,
        }
    }

    fn core_of(&self, op: &ChunkOp) -> usize {
        op.shard(self.superblock.geometry.shard_count) as usize % self.cores.len()
    }

    pub fn status(&self) -> EngineStatus {
        let cores: Vec<CoreStatus> = self
            .cores
            .iter()
            .map(|c| c.status.lock().map(|s| s.clone()).unwrap_or_default())
            .collect();
        let g = &self.superblock.geometry;
        let (mut chunks, mut free) = (0u64, 0u64);
        for s in cores.iter().flat_map(|c| &c.shard_stats) {
            chunks += s.chunks;
            free += s.free_extents;
        }
        let capacity = g.capacity_bytes();
        EngineStatus {
            device: DeviceStatus {
                backend: self.device.backend,
                name: self.device.name.clone(),
                size_bytes: self.device.size_bytes,
                uuid: uuid::Uuid::from_bytes(self.superblock.uuid).to_string(),
                format_version: self.superblock.version,
            },
            geometry: GeometryStatus {
                chunk_size: g.chunk_size,
                shards: g.shard_count,
                extents_per_shard: g.extents_per_shard,
                wal_size: g.wal_size,
            },
            capacity_bytes: capacity,
            used_bytes: capacity.saturating_sub(free * u64::from(g.chunk_size)),
            chunks,
            cores,
            dma_buffers: self.pool.count(),
            dma_buffers_free: self.pool.available(),
            dma_hugepages: self.pool.is_hugepage_backed(),
        }
    }

    /// Stops the cores after they finish what they accepted.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        for c in &self.cores {
            c.thread.unpark();
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a dataplane core panicked");
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// A handle for submitting requests; completions come back to it alone. Not shared
/// between threads (each thread makes its own).
#[derive(Debug)]
pub struct Client {
    engine: Arc<Engine>,
    reply: Arc<ReplyQueue>,
    in_flight: usize,
}

impl Client {
    /// A buffer from the engine's DMA pool (`None` when all are in use).
    pub fn buffer(&self) -> Option<DmaBuf> {
        self.engine.pool.alloc()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a request. Fails with the op handed back when this client already has
    /// its maximum outstanding or the core's ring is full (`Error::Busy`).
    pub fn submit(&mut self, tag: u64, op: ChunkOp) -> Result<(), (Error, ChunkOp)> {
        self.submit_versioned(tag, op, 0)
    }

    /// `submit` for a mutation that must commit with exactly `version` (see
    /// `ShardRequest::version`; 0 lets the store number it).
    pub fn submit_versioned(
        &mut self,
        tag: u64,
        op: ChunkOp,
        version: u64,
    ) -> Result<(), (Error, ChunkOp)> {
        if self.in_flight >= self.reply.done.capacity() {
            return Err((Error::Busy, op));
        }
        if self.engine.stop.load(Ordering::Acquire) {
            return Err((Error::Shutdown, op));
        }
        let op = seal_write(op);
        let core = &self.engine.cores[self.engine.core_of(&op)];
        let sub = Submission {
            req: ShardRequest {
                tag,
                op,
                read_check: ReadCheck::ByReceiver,
                version,
            },
            reply: Arc::clone(&self.reply),
        };
        if let Err(sub) = core.ring.push(sub) {
            return Err((Error::Busy, sub.req.op));
        }
        self.in_flight += 1;
        // Pairs with the core's fence before it parks (see `ReplyQueue::push`).
        fence(Ordering::SeqCst);
        if core.sleeping.load(Ordering::SeqCst) {
            core.thread.unpark();
        }
        Ok(())
    }

    /// Takes finished requests without waiting. Reads are verified here, on the
    /// client's thread: a block whose crc does not match makes the read an
    /// `Error::BadChecksum`, so no caller ever sees unverified bytes.
    pub fn poll(&mut self, out: &mut Vec<ShardCompletion>) -> usize {
        let mut n = 0;
        while let Some(mut c) = self.reply.done.pop() {
            if verify_read(&mut c) {
                self.engine.perf.global().inc(m::C_READ_ERRORS);
            }
            out.push(c);
            n += 1;
        }
        self.in_flight -= n;
        n
    }

    /// Waits up to `timeout` for at least one completion.
    pub fn wait(&mut self, out: &mut Vec<ShardCompletion>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            let n = self.poll(out);
            if n > 0 || self.in_flight == 0 {
                return n;
            }
            let now = Instant::now();
            if now >= deadline {
                return 0;
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
                continue;
            }
            if let Ok(mut t) = self.reply.thread.lock() {
                *t = Some(std::thread::current());
            }
            self.reply.waiting.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if self.reply.done.is_empty() {
                std::thread::park_timeout((deadline - now).min(Duration::from_millis(10)));
            }
            self.reply.waiting.store(false, Ordering::SeqCst);
        }
    }

    /// Has `wake` called when a completion arrives while this client's owner sleeps
    /// between `sleep_begin` and `sleep_end` (for owners that sleep in an epoll rather
    /// than `wait`). Set once.
    pub fn set_waker(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let _ = self.reply.waker.set(wake);
    }

    /// Announces a sleep; false when completions are already waiting (do not sleep).
    pub fn sleep_begin(&self) -> bool {
        self.reply.waiting.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.reply.done.is_empty() {
            return true;
        }
        self.reply.waiting.store(false, Ordering::SeqCst);
        false
    }

    pub fn sleep_end(&self) {
        self.reply.waiting.store(false, Ordering::SeqCst);
    }

    /// Runs one request to completion (tools and tests; the hot path pipelines).
    pub fn call(&mut self, op: ChunkOp) -> Result<(ChunkInfo, Option<DmaBuf>), Error> {
        assert_eq!(self.in_flight, 0, "call() needs an idle client");
        let mut op = op;
        loop {
            match self.submit(0, op) {
                Ok(()) => break,
                Err((Error::Busy, back)) => {
                    op = back;
                    std::thread::yield_now();
                }
                Err((e, _)) => return Err(e),
            }
        }
        let mut out = Vec::with_capacity(1);
        while self.wait(&mut out, Duration::from_secs(1)) == 0 {}
        let c = out.pop().expect("one completion");
        c.result.map(|i| (i, c.buf))
    }
}

/// Checksums a write's blocks on the submitting thread, so the dataplane core does
/// not have to (it trusts a seal only while the buffer is unmodified; an op that does
/// not fit its buffer is left for the store to refuse).
fn seal_write(op: ChunkOp) -> ChunkOp {
    match op {
        ChunkOp::Write {
            chunk,
            offset,
            len,
            mut buf,
        } => {
            let padded = (len as usize).div_ceil(crate::store::BLOCK_SIZE as usize)
                * crate::store::BLOCK_SIZE as usize;
            if buf.sealed_len() != Some(len as usize) && padded <= buf.capacity() {
                buf.seal(len as usize, crc32c::crc32c);
            }
            ChunkOp::Write {
                chunk,
                offset,
                len,
                buf,
            }
        }
        other => other,
    }
}

/// A core's loop state.
#[derive(Debug)]
struct CoreLoop {
    index: usize,
    idle_spin: Duration,
    park_max: Duration,
    io_wait_max: Duration,
}

/// Where a request came from, by the core's internal tag.
#[derive(Debug)]
struct Origin {
    reply: Arc<ReplyQueue>,
    tag: u64,
    op: u8,
    bytes: u32,
    started: Instant,
}

impl CoreLoop {
    fn config(index: usize, opts: &EngineOptions) -> Self {
        CoreLoop {
            index,
            idle_spin: Duration::from_micros(opts.idle_spin_us),
            park_max: Duration::from_micros(opts.idle_park_max_us.max(1)),
            io_wait_max: Duration::from_micros(opts.idle_park_max_us.clamp(1, 200)),
        }
    }

    fn run(self, mut store: CoreStore, shared: &CoreShared, stop: &AtomicBool, perf: &Perf) {
        let slots: usize = store.shards().len() * store.device().queue_depth_max() + 1;
        let mut origins: Vec<Option<Origin>> = (0..slots).map(|_| None).collect();
        let mut free: Vec<u64> = (0..slots as u64).rev().collect();
        let mut out: Vec<ShardCompletion> = Vec::with_capacity(slots);
        let mut pending: Option<Submission> = None;
        let mut last_work = Instant::now();
        let mut park = Duration::from_micros(10);
        let mut last_status = Instant::now() - Duration::from_secs(1);
        let mut parks = 0u64;
        let counters = perf.core(self.index);
        loop {
            let mut work = 0usize;
            // Take requests while their shard has room.
            while !free.is_empty() {
                let Some(sub) = pending.take().or_else(|| shared.ring.pop()) else {
                    break;
                };
                let internal = free.pop().expect("checked non-empty");
                let (op, bytes) = m::classify(&sub.req.op);
                let origin = Origin {
                    reply: sub.reply,
                    tag: sub.req.tag,
                    op,
                    bytes,
                    started: Instant::now(),
                };
                let req = ShardRequest {
                    tag: internal,
                    op: sub.req.op,
                    read_check: sub.req.read_check,
                    version: sub.req.version,
                };
                match store.submit(req, &mut out) {
                    Ok(()) => {
                        origins[internal as usize] = Some(origin);
                        counters.gauge_add(m::G_IN_FLIGHT, 1);
                        work += 1;
                    }
                    Err(back) => {
                        free.push(internal);
                        pending = Some(Submission {
                            req: ShardRequest {
                                tag: origin.tag,
                                op: back.op,
                                read_check: back.read_check,
                                version: back.version,
                            },
                            reply: origin.reply,
                        });
                        break;
                    }
                }
            }
            work += store.poll(&mut out);
            if work > 0 {
                counters.record(m::H_DEVICE_QUEUE_DEPTH, store.device().in_flight() as u64);
            }
            for c in out.drain(..) {
                let internal = c.tag;
                let o = origins[internal as usize]
                    .take()
                    .expect("a completion has an origin");
                free.push(internal);
                counters.gauge_add(m::G_IN_FLIGHT, -1);
                m::account(
                    counters,
                    o.op,
                    o.bytes,
                    c.result.is_ok(),
                    o.started.elapsed(),
                );
                o.reply.push(ShardCompletion {
                    tag: o.tag,
                    result: c.result,
                    buf: c.buf,
                    unverified: c.unverified,
                });
            }
            let now = Instant::now();
            if now.duration_since(last_status) >= Duration::from_millis(100) {
                last_status = now;
                if let Ok(mut st) = shared.status.try_lock() {
                    st.busy_ops = store.busy();
                    st.shard_stats = store.stats();
                    st.failures = store
                        .shards()
                        .iter()
                        .filter_map(|s| s.failure().map(str::to_owned))
                        .collect();
                    st.parks = parks;
                }
            }
            if work > 0 {
                last_work = now;
                park = Duration::from_micros(10);
                continue;
            }
            if store.busy() > 0 {
                // I/O in flight and nothing else to do: spin for the spin budget, then
                // wait in the kernel for a completion, bounded so that new requests on
                // the ring are picked up within `io_wait_max`.
                if now.duration_since(last_work) < self.idle_spin {
                    std::hint::spin_loop();
                } else {
                    store.wait_io(self.io_wait_max);
                }
                continue;
            }
            if stop.load(Ordering::Acquire) && shared.ring.is_empty() {
                break;
            }
            if now.duration_since(last_work) < self.idle_spin {
                std::hint::spin_loop();
                continue;
            }
            // Park: announce it, then look once more so a push racing with us is seen.
            shared.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if shared.ring.is_empty() && !stop.load(Ordering::Acquire) {
                std::thread::park_timeout(park);
                parks += 1;
                park = (park * 2).min(self.park_max);
            }
            shared.sleeping.store(false, Ordering::SeqCst);
        }
        if let Ok(mut st) = shared.status.try_lock() {
            st.shard_stats = store.stats();
        }
    }
}
