//! Blocking access to the dataplane for FUSE threads: a pool of engine clients and
//! helpers that run a set of chunk ops in parallel and wait for all of them.
//!
//! A `Client` is single-threaded but may move between threads (it records the waiting
//! thread at each wait), so FUSE threads borrow one from a lock-free pool per request.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use spool_dataplane::engine::{Client, Engine};
use spool_dataplane::net::client::Client as NetClient;
use spool_dataplane::net::{ClusterKey, Msg, MutKind, Status};
use spool_dataplane::replica::chain::NAMESPACE_INODE_BIT;
use spool_dataplane::store::{ChunkId, ChunkInfo, ChunkOp, ShardCompletion};
use spool_dataplane::Error as DpError;
use spool_hugepages::DmaBuf;

/// DMA buffers one request holds at a time: every caller works in windows of this many
/// pieces, so `threads x WINDOW_BUFFERS_MAX` bounds what FUSE threads hold and a thread
/// waiting for a buffer never waits on one held by another waiting thread (the config
/// requires `hugepages.buffers >= 2 x mount.threads + 8`).
pub const WINDOW_BUFFERS_MAX: usize = 2;
/// Requests one borrowed client keeps in flight.
const CLIENT_INFLIGHT_MAX: usize = 16;
/// Clients kept for reuse; more are made on demand and dropped when the pool is full.
const CLIENTS_POOLED_MAX: usize = 64;

#[derive(Debug)]
pub struct ChunkIo {
    engine: Arc<Engine>,
    clients: ArrayQueue<Client>,
    /// Cluster mode: ops go through this node's replication service instead.
    remote: Option<Remote>,
    pub chunk_size: u32,
    /// Bytes one DMA buffer holds (the largest single chunk op).
    pub io_size_max: u32,
}

/// The outcome of one op of a batch: the store's answer and the buffer back.
pub type OpResult = (Result<ChunkInfo, DpError>, Option<DmaBuf>);

impl ChunkIo {
    pub fn new(engine: Arc<Engine>) -> ChunkIo {
        let chunk_size = engine.geometry().chunk_size;
        let io_size_max = engine.pool().buf_size() as u32;
        assert!(io_size_max >= 4096 && io_size_max % 4096 == 0);
        ChunkIo {
            engine,
            clients: ArrayQueue::new(CLIENTS_POOLED_MAX),
            remote: None,
            chunk_size,
            io_size_max: io_size_max.min(chunk_size),
        }
    }

    /// Cluster mode: every op goes to the replication service listening at `addr`
    /// (this node's), which routes it to the chain holding the chunk, so writes are on
    /// every replica before they complete and reads see the committed state wherever
    /// it was written. Buffers still come from the local pool.
    ///
    /// `head_of` names the transport address of a chunk's chain head when known:
    /// mutations go there directly instead of through this node (one hop less for a
    /// chunk another node heads); anything refused or unknown goes through this node.
    pub fn cluster(
        engine: Arc<Engine>,
        addr: SocketAddr,
        key: ClusterKey,
        head_of: HeadOf,
    ) -> ChunkIo {
        let mut io = ChunkIo::new(engine);
        io.remote = Some(Remote {
            addr,
            key,
            conns: Mutex::new(Vec::new()),
            fence: AtomicU64::new(0),
            head_of,
        });
        io
    }

    /// Makes writes of namespace chunks conditional on their chain's version
    /// (0: unconditional). A refused one fails with `DpError::StaleChain`.
    pub fn set_fence(&self, chain_ver: u64) {
        if let Some(r) = &self.remote {
            r.fence.store(chain_ver, Ordering::Release);
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// A DMA buffer, waiting (with backoff) while all are in use: buffers come back as
    /// other requests finish, so this never fails.
    pub fn buffer(&self) -> DmaBuf {
        let mut wait_us = 10u64;
        loop {
            if let Some(b) = self.engine.pool().alloc() {
                return b;
            }
            std::thread::sleep(Duration::from_micros(wait_us));
            wait_us = (wait_us * 2).min(2_000);
        }
    }

    /// Runs `ops` (pipelined, at most `CLIENT_INFLIGHT_MAX` in flight) and returns
    /// their outcomes in the same order.
    pub fn run(&self, ops: Vec<ChunkOp>) -> Vec<OpResult> {
        if let Some(r) = &self.remote {
            return r.run(ops);
        }
        let mut client = self
            .clients
            .pop()
            .unwrap_or_else(|| self.engine.client(CLIENT_INFLIGHT_MAX));
        let n = ops.len();
        let mut results: Vec<Option<OpResult>> = (0..n).map(|_| None).collect();
        let mut done: Vec<ShardCompletion> = Vec::with_capacity(CLIENT_INFLIGHT_MAX);
        let mut pending = ops.into_iter().enumerate().peekable();
        let mut finished = 0usize;
        let mut stash: Option<(usize, ChunkOp)> = None;
        while finished < n {
            // Submit while there is room.
            loop {
                let next = stash.take().or_else(|| pending.next());
                let Some((i, op)) = next else { break };
                match client.submit(i as u64, op) {
                    Ok(()) => {}
                    Err((DpError::Busy, back)) => {
                        stash = Some((i, back));
                        break;
                    }
                    Err((e, back)) => {
                        results[i] = Some((Err(e), back.into_buf()));
                        finished += 1;
                    }
                }
            }
            if finished == n {
                break;
            }
            if client.in_flight() == 0 {
                // Busy with nothing of ours in flight: the core's ring is full.
                std::thread::yield_now();
                continue;
            }
            client.wait(&mut done, Duration::from_millis(100));
            for c in done.drain(..) {
                let i = c.tag as usize;
                assert!(results[i].is_none(), "one completion per request");
                results[i] = Some((c.result, c.buf));
                finished += 1;
            }
        }
        assert_eq!(client.in_flight(), 0);
        let _ = self.clients.push(client);
        results
            .into_iter()
            .map(|r| r.expect("every op completed"))
            .collect()
    }

    /// Runs one op.
    pub fn run_one(&self, op: ChunkOp) -> OpResult {
        self.run(vec![op]).pop().expect("one result")
    }
}

/// Where a chunk's chain head listens, if known.
pub type HeadOf = Arc<dyn Fn(&ChunkId) -> Option<SocketAddr> + Send + Sync>;

/// Ops sent through the cluster transport: mutations to their chain's head, reads
/// and stats to this node's replication service (which serves them from its copy
/// or relays them). Each call borrows a connection per node it talks to; ops to one
/// node are pipelined on it.
struct Remote {
    addr: SocketAddr,
    key: ClusterKey,
    conns: Mutex<Vec<(SocketAddr, NetClient)>>,
    fence: AtomicU64,
    head_of: HeadOf,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// How long an op that certainly did not happen (no head yet, a chain changing, a
/// full queue) is retried: a failover takes a lease period plus a table round.
const REMOTE_RETRY_FOR: Duration = Duration::from_secs(20);
const REMOTE_RETRY_PAUSE: Duration = Duration::from_millis(50);
const REMOTE_TIMEOUT: Duration = Duration::from_secs(30);

impl Remote {
    fn connect(&self, addr: SocketAddr) -> Result<NetClient, DpError> {
        let pooled = {
            let mut p = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            p.iter()
                .position(|(a, _)| *a == addr)
                .map(|i| p.swap_remove(i).1)
        };
        if let Some(c) = pooled {
            return Ok(c);
        }
        NetClient::connect(addr, &self.key, REMOTE_TIMEOUT)
            .map_err(|e| DpError::Cluster(format!("connecting to {addr}: {e}")))
    }

    fn give_back(&self, addr: SocketAddr, c: NetClient) {
        let mut p = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if p.len() < CLIENTS_POOLED_MAX {
            p.push((addr, c));
        }
    }

    /// Where `op` goes: a mutation to its chain's head, the rest to this node.
    fn target(&self, op: &ChunkOp) -> SocketAddr {
        match op {
            ChunkOp::Write { chunk, .. }
            | ChunkOp::Truncate { chunk, .. }
            | ChunkOp::Delete { chunk } => (self.head_of)(chunk).unwrap_or(self.addr),
            _ => self.addr,
        }
    }

    /// Runs `ops`, each at its target (groups one after the other), in order.
    fn run(&self, ops: Vec<ChunkOp>) -> Vec<OpResult> {
        let targets: Vec<SocketAddr> = ops.iter().map(|o| self.target(o)).collect();
        if targets.windows(2).all(|w| w[0] == w[1]) {
            let addr = targets.first().copied().unwrap_or(self.addr);
            return self.run_at(addr, ops);
        }
        let n = ops.len();
        let mut ops: Vec<Option<ChunkOp>> = ops.into_iter().map(Some).collect();
        let mut results: Vec<Option<OpResult>> = (0..n).map(|_| None).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| targets[i]);
        for group in order.chunk_by(|&a, &b| targets[a] == targets[b]) {
            let batch = group
                .iter()
                .map(|&i| ops[i].take().expect("each op once"))
                .collect();
            for (&i, r) in group.iter().zip(self.run_at(targets[group[0]], batch)) {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every op ran"))
            .collect()
    }

    /// The chain version a mutation is conditional on (0: none): set for namespace
    /// chunks while this node owns the namespace.
    fn fence_of(&self, op: &ChunkOp) -> u64 {
        let chunk = match op {
            ChunkOp::Write { chunk, .. }
            | ChunkOp::Truncate { chunk, .. }
            | ChunkOp::Delete { chunk } => chunk,
            _ => return 0,
        };
        match chunk.inode & NAMESPACE_INODE_BIT {
            0 => 0,
            _ => self.fence.load(Ordering::Acquire),
        }
    }

    fn msg<'a>(&self, op: &'a ChunkOp) -> Msg<'a> {
        let chain_ver = self.fence_of(op);
        let mutate = |chunk, kind, offset, data| Msg::Mutate {
            chain_ver,
            chunk,
            kind,
            offset,
            version: 0,
            data,
        };
        match op {
            ChunkOp::Write {
                chunk,
                offset,
                len,
                buf,
            } => mutate(
                *chunk,
                MutKind::Write,
                *offset,
                &buf.as_slice()[..*len as usize],
            ),
            ChunkOp::Truncate { chunk, len } => mutate(*chunk, MutKind::Truncate, *len, &[]),
            ChunkOp::Delete { chunk } => mutate(*chunk, MutKind::Delete, 0, &[]),
            ChunkOp::Read {
                chunk, offset, len, ..
            } => Msg::Read {
                chunk: *chunk,
                offset: *offset,
                len: *len,
                local: false,
            },
            ChunkOp::Stat { chunk } => Msg::Stat {
                chunk: *chunk,
                local: false,
            },
            other => unreachable!("no cluster form for {other:?}"),
        }
    }

    /// The outcome of `op` given its reply, or `None` to send it again (after a pause).
    fn finish(
        &self,
        op: &mut Option<ChunkOp>,
        rep: spool_dataplane::net::client::Reply,
        retry_until: &mut Option<Instant>,
    ) -> Option<OpResult> {
        let fence = self.fence_of(op.as_ref().expect("op in flight"));
        let err =
            |op: &mut Option<ChunkOp>, e| Some((Err(e), op.take().and_then(ChunkOp::into_buf)));
        match rep.status {
            Status::Ok => {
                let mut op = op.take().expect("op in flight");
                let len = match (&mut op, rep.data.len()) {
                    (ChunkOp::Read { buf, len, .. }, k) if k == *len as usize => {
                        buf.as_mut_slice()[..k].copy_from_slice(&rep.data);
                        *len
                    }
                    (ChunkOp::Read { .. }, k) => {
                        let e = DpError::Cluster(format!("a read returned {k} bytes"));
                        return Some((Err(e), op.into_buf()));
                    }
                    (ChunkOp::Stat { .. }, 4) => {
                        u32::from_le_bytes(rep.data[..4].try_into().expect("4 bytes"))
                    }
                    _ => 0,
                };
                let info = ChunkInfo {
                    len,
                    version: rep.version,
                };
                Some((Ok(info), op.into_buf()))
            }
            Status::StaleChain if fence != 0 => err(
                op,
                DpError::StaleChain {
                    expected: fence,
                    current: rep.version,
                },
            ),
            st if st.not_done() => {
                let until = *retry_until.get_or_insert_with(|| Instant::now() + REMOTE_RETRY_FOR);
                if Instant::now() >= until {
                    return err(
                        op,
                        DpError::Cluster(format!("{st:?} for {REMOTE_RETRY_FOR:?}")),
                    );
                }
                std::thread::sleep(REMOTE_RETRY_PAUSE);
                None
            }
            st => err(op, DpError::Cluster(format!("{st:?}"))),
        }
    }

    /// Runs `ops` pipelined on one connection to `addr`. A node that is not (or no
    /// longer) a mutation's head relays it to the head, so a stale target is only a
    /// detour.
    fn run_at(&self, addr: SocketAddr, ops: Vec<ChunkOp>) -> Vec<OpResult> {
        let n = ops.len();
        let mut ops: Vec<Option<ChunkOp>> = ops.into_iter().map(Some).collect();
        let mut results: Vec<Option<OpResult>> = (0..n).map(|_| None).collect();
        let mut todo: VecDeque<usize> = (0..n).collect();
        let mut inflight: BTreeMap<u64, usize> = BTreeMap::new();
        let mut retry_until: Vec<Option<Instant>> = vec![None; n];
        let mut conn: Option<NetClient> = None;
        let mut link_retry_until: Option<Instant> = None;
        let fail = |ops: &mut Vec<Option<ChunkOp>>,
                    results: &mut Vec<Option<OpResult>>,
                    i: usize,
                    e: DpError| {
            let buf = ops[i].take().and_then(ChunkOp::into_buf);
            results[i] = Some((Err(e), buf));
        };
        while !todo.is_empty() || !inflight.is_empty() {
            if conn.is_none() {
                match self.connect(addr) {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        for i in todo
                            .drain(..)
                            .chain(std::mem::take(&mut inflight).into_values())
                        {
                            fail(&mut ops, &mut results, i, DpError::Cluster(e.to_string()));
                        }
                        break;
                    }
                }
            }
            let c = conn.as_mut().expect("connected");
            let mut broken = false;
            while inflight.len() < CLIENT_INFLIGHT_MAX {
                let Some(i) = todo.pop_front() else { break };
                let msg = self.msg(ops[i].as_ref().expect("op not finished"));
                match c.send(&msg) {
                    Ok(id) => {
                        inflight.insert(id, i);
                    }
                    Err(_) => {
                        todo.push_front(i);
                        broken = true;
                        break;
                    }
                }
            }
            if !broken && !inflight.is_empty() {
                match c.recv() {
                    Ok(rep) => match inflight.remove(&rep.req_id) {
                        Some(i) => {
                            let retry = &mut retry_until[i];
                            match self.finish(&mut ops[i], rep, retry) {
                                Some(r) => results[i] = Some(r),
                                None => todo.push_back(i),
                            }
                        }
                        // A reply to nothing we asked: drop the link.
                        None => broken = true,
                    },
                    Err(_) => broken = true,
                }
            }
            if broken {
                conn = None;
                // What was in flight on the broken link: reads are asked again; a
                // mutation's outcome is unknown.
                for (_, i) in std::mem::take(&mut inflight) {
                    let op = ops[i].as_ref().expect("op in flight");
                    if matches!(op, ChunkOp::Read { .. } | ChunkOp::Stat { .. }) {
                        todo.push_back(i);
                    } else {
                        let e = DpError::Cluster("connection lost; outcome unknown".into());
                        fail(&mut ops, &mut results, i, e);
                    }
                }
                let until =
                    *link_retry_until.get_or_insert_with(|| Instant::now() + REMOTE_RETRY_FOR);
                if Instant::now() >= until {
                    for i in todo.drain(..) {
                        let e = DpError::Cluster(format!("{addr} does not answer"));
                        fail(&mut ops, &mut results, i, e);
                    }
                }
                std::thread::sleep(REMOTE_RETRY_PAUSE);
            }
        }
        if let Some(c) = conn {
            self.give_back(addr, c);
        }
        results
            .into_iter()
            .map(|r| r.expect("every op finished"))
            .collect()
    }
}
