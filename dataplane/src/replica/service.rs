//! The replication service: one polled thread per node that owns every transport
//! socket (non-blocking, in one epoll; no thread per connection) and talks to the
//! dataplane cores through an engine client, like any other client.
//!
//! Per chunk, this node runs one mutation at a time, end to end (local write and the
//! successor's ack), in arrival order: replicas then apply the same sequence with the
//! same versions, a duplicate (re-forwarded after a chain change) is recognised by its
//! version, and "a write is pending on this chunk here" is exactly "the chunk's queue
//! is not empty", which is what CRAQ reads need to know.
//!
//! Frames from peers and clients are decoded in place from the connection's receive
//! buffer; payloads are copied once into a DMA buffer for the device and once into
//! the successor's send buffer.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use rustc_hash::FxHashMap;
use serde::Serialize;
use spool_hugepages::{DmaBuf, DmaPool, PagePolicy};

use super::chain::{chain_of, ChainTable, TargetState};
use crate::engine::{Client, Engine};
use crate::metrics as m;
use crate::net::auth::{self, ClusterKey, ROLE_DIALER, ROLE_LISTENER};
use crate::net::frame::{
    check_mutate_crc, crc_of_4k_blocks, decode_frame_deferred, decode_mutate_fields, kind,
    mutate_frame_parts, Header, Msg, MutKind, MutateFields, Status, HEADER_SIZE, MUTATE_FIELDS,
    NONCE_SIZE,
};
use crate::net::transport::{Link, Listener, Tcp, Transport};
use crate::store::{
    ChunkDigest, ChunkId, ChunkInfo, ChunkOp, ShardCompletion, BLOCK_SIZE, DIGEST_SIZE,
};
use crate::Error;

#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    pub node: u32,
    pub listen: SocketAddr,
    pub key: ClusterKey,
    /// Requests this node works on at once (bounded op table).
    pub ops_max: usize,
    /// Chunk-sized buffers for resync (one chunk moves per buffer).
    pub sync_buffers: usize,
    /// Unsent bytes one connection may hold before it is dropped as stuck.
    pub send_buffer_max: usize,
    /// Chunk copies a resync keeps in flight.
    pub sync_window: usize,
    /// How nodes reach each other (`Tcp` by default).
    pub transport: Arc<dyn Transport>,
}

impl ReplicaOptions {
    pub fn new(node: u32, listen: SocketAddr, key: ClusterKey) -> Self {
        ReplicaOptions {
            node,
            listen,
            key,
            ops_max: 1024,
            sync_buffers: 4,
            send_buffer_max: 256 << 20,
            sync_window: 4,
            transport: Arc::new(Tcp),
        }
    }
}

/// What `spool status` shows about replication.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicaStatus {
    pub node: u32,
    pub listen: String,
    pub table_version: u64,
    pub peers_connected: Vec<u32>,
    pub ops_in_flight: usize,
    pub syncs: Vec<SyncStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SyncStatus {
    pub chain: u32,
    pub target: u32,
    pub chain_version: u64,
    pub round: u32,
    pub phase: &'static str,
    pub chunks_to_send: usize,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    pub done: bool,
}

#[derive(Debug)]
struct Shared {
    table: Mutex<Arc<ChainTable>>,
    table_version: AtomicU64,
    /// Refuse client requests: this node may have been declared down (see
    /// `Replica::set_fenced`).
    fenced: AtomicBool,
    /// This process's incarnation (see `NodeInfo::incarnation`).
    incarnation: AtomicU64,
    stop: AtomicBool,
    status: Mutex<ReplicaStatus>,
    /// (chain, target, chain version) whose resync this node finished, for the
    /// control plane to report.
    synced: Mutex<Vec<(u32, u32, u64)>>,
}

/// The running service.
#[derive(Debug)]
pub struct Replica {
    shared: Arc<Shared>,
    waker: Arc<mio::Waker>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const NONE: u32 = u32::MAX;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_DELAY: Duration = Duration::from_millis(50);
const TICK: Duration = Duration::from_millis(50);
const DIAL_INTERVAL: Duration = Duration::from_millis(500);
/// A relayed request unanswered this long is given up (the peer is partitioned away
/// or stuck), so relays cannot fill the op table; a late answer finds no op.
const PROXY_TIMEOUT: Duration = Duration::from_secs(5);

impl Replica {
    /// Binds the listener (an address in use is an error here, not later) and starts
    /// the thread.
    pub fn start(engine: Arc<Engine>, opts: ReplicaOptions) -> Result<Replica, Error> {
        let listener = opts
            .transport
            .listen(opts.listen)
            .map_err(|e| Error::Open {
                path: format!(
                    "{} transport listener {}",
                    opts.transport.name(),
                    opts.listen
                ),
                source: e,
            })?;
        let addr = listener.local_addr().map_err(|e| Error::Open {
            path: "transport listener".into(),
            source: e,
        })?;
        let poll = Poll::new().map_err(|e| Error::Open {
            path: "epoll".into(),
            source: e,
        })?;
        let waker = Arc::new(
            mio::Waker::new(poll.registry(), WAKER).map_err(|e| Error::Open {
                path: "eventfd".into(),
                source: e,
            })?,
        );
        let chunk_size = engine.geometry().chunk_size as usize;
        let sync_pool = DmaPool::new(
            "sync",
            chunk_size,
            opts.sync_buffers.max(2),
            PagePolicy::Normal,
        )?;
        let shared = Arc::new(Shared {
            table: Mutex::new(Arc::new(ChainTable::default())),
            table_version: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            incarnation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            status: Mutex::new(ReplicaStatus {
                node: opts.node,
                listen: addr.to_string(),
                ..ReplicaStatus::default()
            }),
            synced: Mutex::new(Vec::new()),
        });
        let (sh, wk) = (Arc::clone(&shared), Arc::clone(&waker));
        let thread = std::thread::Builder::new()
            .name("spool-net".into())
            .spawn(move || {
                let client = engine.client(opts.ops_max * 2);
                let w = Arc::clone(&wk);
                client.set_waker(Box::new(move || {
                    let _ = w.wake();
                }));
                let mut net = Net::new(engine, client, poll, listener, sync_pool, opts, sh);
                net.run();
            })
            .map_err(|e| Error::Open {
                path: "spool-net thread".into(),
                source: e,
            })?;
        Ok(Replica {
            shared,
            waker,
            thread: Some(thread),
            addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Installs a newer chain table (older or equal versions are ignored).
    pub fn set_table(&self, t: Arc<ChainTable>) {
        let mut cur = self.shared.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.version > cur.version {
            self.shared
                .table_version
                .store(t.version, Ordering::Release);
            *cur = t;
            drop(cur);
            let _ = self.waker.wake();
        }
    }

    /// While fenced, the node answers every client mutation and routed read with
    /// `Unavailable` (chain traffic from peers, which carries chain versions, is
    /// unaffected). The control plane fences a node that cannot confirm its
    /// membership lease: it may already be declared down, and a node declared down
    /// must not serve reads that the new chain has overtaken.
    pub fn set_fenced(&self, fenced: bool) {
        self.shared.fenced.store(fenced, Ordering::Release);
    }

    /// This process's incarnation: client requests are refused until the installed
    /// table carries it (the leader has seen this start and resyncs what it missed).
    pub fn set_incarnation(&self, incarnation: u64) {
        self.shared
            .incarnation
            .store(incarnation, Ordering::Release);
    }

    pub fn table(&self) -> Arc<ChainTable> {
        Arc::clone(&self.shared.table.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn incarnation(&self) -> u64 {
        self.shared.incarnation.load(Ordering::Acquire)
    }

    /// Whether `node` (this node's id) may act on the chains of `table` now: not
    /// fenced, and the table knows this incarnation (see `Net::admitted`).
    pub fn admitted_in(&self, node: u32, table: &ChainTable) -> bool {
        let inc = self.incarnation();
        !self.shared.fenced.load(Ordering::Acquire)
            && table.nodes.get(&node).is_some_and(|n| n.incarnation == inc)
    }

    pub fn status(&self) -> ReplicaStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resyncs this node finished since the last call: (chain, target, chain version).
    pub fn take_synced(&self) -> Vec<(u32, u32, u64)> {
        std::mem::take(&mut *self.shared.synced.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

// ---- connections -------------------------------------------------------------------

#[derive(Debug)]
enum Hs {
    /// We dialed and sent Hello with this nonce.
    Dialing([u8; NONCE_SIZE]),
    AwaitHello,
    AwaitProof([u8; NONCE_SIZE], [u8; NONCE_SIZE]),
    Ready,
}

/// A write frame being received with its data going straight from the socket into
/// the DMA buffer the device will write from (one copy less per hop). Its header is
/// consumed; its fields (which follow the data) are read into the receive buffer.
#[derive(Debug)]
struct Direct {
    h: Header,
    buf: DmaBuf,
    len: usize,
    got: usize,
    /// A peer that stops sending mid-write must not hold the buffer for ever.
    since: Instant,
}

/// Idle chunks whose version this node remembers, at most.
const CHUNK_CACHE_MAX: usize = 1 << 20;

/// How long a write may take to arrive once its data started.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes at least this large are received directly into a DMA buffer.
const DIRECT_MIN: usize = 64 << 10;

#[derive(Debug)]
struct Conn {
    sock: Box<dyn Link>,
    gen: u32,
    /// The node we dialed (replies to our requests come back here).
    peer: Option<u32>,
    hs: Hs,
    rbuf: Vec<u8>,
    rlen: usize,
    /// Start of the bytes not yet handled (`rbuf[rpos..rlen]`).
    rpos: usize,
    /// A large write whose data is being read straight into a DMA buffer.
    direct: Option<Direct>,
    wbuf: Vec<u8>,
    wpos: usize,
    /// The socket may have more bytes (edge-triggered readiness).
    readable: bool,
    /// A frame waits for a resource (buffer, op slot): parse again later.
    stalled: bool,
    dead: bool,
    since: Instant,
}

// ---- ops ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Free,
    /// A mutation this node applies (head or replica).
    Mutate,
    /// A read this node serves from its own copy.
    Read,
    /// A request relayed to another node (`up` gets its reply).
    Proxy,
    /// Resync, target side: replace a chunk.
    SyncApply,
    /// Resync, source side: read a chunk and send it.
    SyncSend,
    /// Resync, source side: one page of the target's digests.
    RemoteList,
    /// Resync, source side: one page of this node's digests.
    LocalList,
    /// A chunk's version, before its first mutation here.
    Stat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Down {
    /// No successor (tail), or already acknowledged.
    Done,
    /// To be sent when the successor's connection is ready (or after `retry_at`).
    Want,
    Sent {
        node: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Local {
    Waiting,
    Running,
    Done,
}

#[derive(Debug)]
struct Op {
    gen: u32,
    kind: Kind,
    /// Reply target: connection index, its generation, request id (`NONE` index: none).
    up: (u32, u32, u64),
    chunk: ChunkId,
    chain: u32,
    mk: MutKind,
    /// Write offset, truncate length, read offset.
    offset: u32,
    /// Data length (writes, reads).
    len: u32,
    version: u64,
    buf: Option<DmaBuf>,
    local: Local,
    down: Down,
    retry_at: Option<Instant>,
    /// Next op in this chunk's queue.
    next: u32,
    in_queue: bool,
    /// Sync job index (sync ops), shard (LocalList).
    job: u32,
    shard: u32,
    /// Result so far.
    status: Status,
    /// A proxied request's target node.
    via: u32,
    /// A mutation this node numbered as the chain's head.
    numbered_here: bool,
    /// Given up: its answer is no longer wanted and it is not passed on; its device
    /// I/O, if any, still finishes before the op is freed.
    orphan: bool,
    /// A relayed read or stat (not a mutation).
    read: bool,
    /// A read op that asks only for the chunk's length and version.
    stat: bool,
    /// The device ring was full: submit again.
    resubmit: bool,
    /// A mutation that has begun (numbered, sent down, submitted); before that it
    /// only waits in its chunk's queue.
    begun: bool,
    /// crc32c of a write's data (forwarding combines it into the frame's crc).
    data_crc: u32,
    /// When the op was created (relayed requests time out).
    started: Instant,
}

impl Op {
    fn empty() -> Op {
        Op {
            gen: 0,
            kind: Kind::Free,
            up: (NONE, 0, 0),
            chunk: ChunkId { inode: 0, index: 0 },
            chain: 0,
            mk: MutKind::Write,
            offset: 0,
            len: 0,
            version: 0,
            buf: None,
            local: Local::Waiting,
            down: Down::Done,
            retry_at: None,
            next: NONE,
            in_queue: false,
            job: NONE,
            shard: 0,
            status: Status::Ok,
            via: NONE,
            numbered_here: false,
            orphan: false,
            read: false,
            stat: false,
            resubmit: false,
            begun: false,
            data_crc: 0,
            started: Instant::now(),
        }
    }
}

/// One chunk's ops here, in arrival order; the first one runs.
#[derive(Clone, Copy, Debug)]
struct ChunkQ {
    first: u32,
    last: u32,
    /// The chunk's committed version here, once known.
    version: Option<u64>,
    /// Versions up to this one may exist elsewhere in the chain (an op failed here
    /// after it went down): the head numbers new ops above it.
    floor: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    ListRemote,
    ListLocal,
    Send,
    Done,
}

#[derive(Debug)]
struct SyncJob {
    chain: u32,
    target: u32,
    chain_ver: u64,
    round: u32,
    phase: Phase,
    shard: u32,
    shards: u32,
    after: Option<ChunkId>,
    busy: bool,
    remote: FxHashMap<ChunkId, ChunkDigest>,
    local: Vec<ChunkDigest>,
    /// (chunk, Some(local digest) to send, None to delete on the target)
    todo: Vec<(ChunkId, Option<ChunkDigest>)>,
    next: usize,
    in_flight: usize,
    chunks_sent: u64,
    bytes_sent: u64,
    cancelled: bool,
    reported: bool,
}

// ---- the thread --------------------------------------------------------------------

struct Net {
    engine: Arc<Engine>,
    client: Client,
    poll: Poll,
    listener: Box<dyn Listener>,
    sync_pool: Arc<DmaPool>,
    opts: ReplicaOptions,
    shared: Arc<Shared>,
    table: Arc<ChainTable>,
    conns: Vec<Option<Conn>>,
    conn_gen: u32,
    /// Node -> index of our dialed connection.
    peers: FxHashMap<u32, u32>,
    ops: Vec<Op>,
    free_ops: Vec<u32>,
    chunks: FxHashMap<ChunkId, ChunkQ>,
    jobs: Vec<SyncJob>,
    done: Vec<ShardCompletion>,
    body_max: u32,
    /// Set when some op waits to be sent down or retried.
    want_down: bool,
    /// Queued ops whose turn came, to start from the loop.
    ready: Vec<u32>,
    last_tick: Instant,
    last_dial: Instant,
}

enum Flow {
    Next,
    /// Keep the frame; try again when resources free up.
    Stall,
    /// Protocol violation: drop the connection.
    Drop(&'static str),
}

impl Net {
    fn new(
        engine: Arc<Engine>,
        client: Client,
        poll: Poll,
        mut listener: Box<dyn Listener>,
        sync_pool: Arc<DmaPool>,
        opts: ReplicaOptions,
        shared: Arc<Shared>,
    ) -> Net {
        let _ = poll
            .registry()
            .register(&mut *listener, LISTENER, Interest::READABLE);
        let body_max =
            (engine.geometry().chunk_size as usize).max(engine.pool().buf_size()) as u32 + 4096;
        let ops = (0..opts.ops_max).map(|_| Op::empty()).collect();
        let free_ops = (0..opts.ops_max as u32).rev().collect();
        Net {
            engine,
            client,
            poll,
            listener,
            sync_pool,
            shared,
            table: Arc::new(ChainTable::default()),
            conns: Vec::new(),
            conn_gen: 0,
            peers: FxHashMap::default(),
            ops,
            free_ops,
            chunks: FxHashMap::default(),
            jobs: Vec::new(),
            done: Vec::with_capacity(opts.ops_max * 2),
            body_max,
            want_down: false,
            ready: Vec::with_capacity(opts.ops_max),
            last_tick: Instant::now(),
            last_dial: Instant::now(),
            opts,
        }
    }

    fn me(&self) -> u32 {
        self.opts.node
    }

    /// Whether this node may take client requests: not fenced, and the table knows
    /// this incarnation (a node restarted before the leader noticed must first be
    /// resynced, and until then its table may say it serves when it does not).
    fn admitted(&self) -> bool {
        let inc = self.shared.incarnation.load(Ordering::Acquire);
        !self.shared.fenced.load(Ordering::Acquire)
            && self
                .table
                .nodes
                .get(&self.me())
                .is_some_and(|n| n.incarnation == inc)
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut idle = 0u32;
        while !self.shared.stop.load(Ordering::Acquire) {
            let mut work = 0;
            work += self.reap_engine();
            work += self.start_ready();
            if self.shared.table_version.load(Ordering::Acquire) != self.table.version {
                self.on_table();
                work += 1;
            }
            let timeout = if work > 0 || idle < 64 {
                Some(Duration::ZERO)
            } else if self.client.sleep_begin() {
                Some(TICK)
            } else {
                Some(Duration::ZERO)
            };
            let r = self.poll.poll(&mut events, timeout);
            self.client.sleep_end();
            if let Err(e) = r {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "transport poll failed");
                    std::thread::sleep(TICK);
                }
            }
            for ev in events.iter() {
                work += 1;
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(i) => {
                        if let Some(Some(c)) = self.conns.get_mut(i) {
                            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                                c.readable = true;
                            }
                        }
                        if ev.is_writable() {
                            self.flush(i);
                        }
                    }
                }
            }
            work += self.read_all();
            work += self.start_ready();
            if self.want_down {
                self.pump_down();
            }
            work += self.pump_syncs();
            self.flush_all();
            if self.last_tick.elapsed() >= TICK {
                self.tick();
            }
            idle = if work > 0 { 0 } else { idle.saturating_add(1) };
        }
    }

    // ---- connections ---------------------------------------------------------------

    fn add_conn(&mut self, mut sock: Box<dyn Link>, peer: Option<u32>, hs: Hs) -> Option<u32> {
        let idx = match self.conns.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        if self
            .poll
            .registry()
            .register(
                &mut *sock,
                Token(idx),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            return None;
        }
        self.conn_gen = self.conn_gen.wrapping_add(1);
        self.conns[idx] = Some(Conn {
            sock,
            gen: self.conn_gen,
            peer,
            hs,
            // Room for two largest frames: the partial frame behind a handled one is
            // moved to the front only when the buffer's end is reached.
            rbuf: vec![0; 2 * (HEADER_SIZE + self.body_max as usize)],
            rlen: 0,
            rpos: 0,
            direct: None,
            wbuf: Vec::with_capacity(1 << 20),
            wpos: 0,
            readable: true,
            stalled: false,
            dead: false,
            since: Instant::now(),
        });
        Some(idx as u32)
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok(sock) => {
                    self.add_conn(sock, None, Hs::AwaitHello);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            }
        }
    }

    /// Our ready connection to `node`, dialing it if there is none.
    fn peer_conn(&mut self, node: u32) -> Option<u32> {
        if let Some(&ci) = self.peers.get(&node) {
            if let Some(c) = self.conns[ci as usize].as_ref() {
                if !c.dead {
                    return matches!(c.hs, Hs::Ready).then_some(ci);
                }
            }
            self.peers.remove(&node);
        }
        let addr: SocketAddr = self.table.nodes.get(&node)?.addr.parse().ok()?;
        let sock = self.opts.transport.dial(addr).ok()?;
        let nc = auth::nonce();
        let ci = self.add_conn(sock, Some(node), Hs::Dialing(nc))?;
        self.send(ci, 0, &Msg::Hello { nonce: nc });
        self.peers.insert(node, ci);
        None
    }

    fn conn_ok(&self, ci: u32, gen: u32) -> bool {
        matches!(self.conns.get(ci as usize), Some(Some(c)) if c.gen == gen && !c.dead)
    }

    /// Queues a frame on a connection (dropping it if its backlog is over the bound).
    fn send(&mut self, ci: u32, req: u64, msg: &Msg<'_>) {
        let max = self.opts.send_buffer_max;
        let Some(Some(c)) = self.conns.get_mut(ci as usize) else {
            return;
        };
        if c.dead {
            return;
        }
        if c.wpos > 0 && c.wpos == c.wbuf.len() {
            c.wbuf.clear();
            c.wpos = 0;
        }
        if c.wbuf.len() - c.wpos > max {
            tracing::warn!(peer = ?c.peer, "connection backlog over {max} bytes: dropping it");
            c.dead = true;
            return;
        }
        msg.encode(req, &mut c.wbuf);
        self.engine.perf().global().inc(m::C_NET_FRAMES_OUT);
    }

    fn reply(&mut self, up: (u32, u32, u64), status: Status, version: u64, data: &[u8]) {
        if up.0 == NONE || !self.conn_ok(up.0, up.1) {
            return;
        }
        self.send(
            up.0,
            up.2,
            &Msg::Reply {
                status,
                version,
                data,
            },
        );
    }

    fn flush(&mut self, i: usize) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        while c.wpos < c.wbuf.len() {
            match c.sock.write(&c.wbuf[c.wpos..]) {
                Ok(0) => {
                    c.dead = true;
                    break;
                }
                Ok(n) => c.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    c.dead = true;
                    break;
                }
            }
        }
        if c.wpos == c.wbuf.len() {
            c.wbuf.clear();
            c.wpos = 0;
        }
    }

    fn flush_all(&mut self) {
        for i in 0..self.conns.len() {
            let pending = matches!(&self.conns[i], Some(c) if c.wpos < c.wbuf.len());
            if pending {
                self.flush(i);
            }
            if matches!(&self.conns[i], Some(c) if c.dead) {
                self.close(i as u32);
            }
        }
    }

    fn close(&mut self, ci: u32) {
        let Some(mut c) = self.conns[ci as usize].take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut *c.sock);
        if !matches!(c.hs, Hs::Ready) {
            self.engine.perf().global().inc(m::C_NET_AUTH_FAILURES);
        } else if c.peer.is_some() {
            self.engine.perf().global().inc(m::C_NET_PEER_LINKS_LOST);
        }
        if let Some(p) = c.peer {
            if self.peers.get(&p) == Some(&ci) {
                self.peers.remove(&p);
            }
        }
        // Ops waiting on this connection.
        for i in 0..self.ops.len() {
            let o = &self.ops[i];
            if o.kind == Kind::Free {
                continue;
            }
            let waits_here = c.peer.is_some() && o.via == c.peer.unwrap_or(NONE)
                || matches!(o.down, Down::Sent { node } if Some(node) == c.peer);
            if !waits_here {
                continue;
            }
            match o.kind {
                Kind::Mutate => {
                    // Send it again when we are connected again (or to a new successor).
                    self.ops[i].down = Down::Want;
                    self.ops[i].retry_at = Some(Instant::now() + RETRY_DELAY);
                    self.want_down = true;
                }
                Kind::Proxy => {
                    // A relayed read can simply be retried; a relayed mutation may
                    // or may not have happened.
                    let st = if self.ops[i].read {
                        Status::Unavailable
                    } else {
                        Status::Unknown
                    };
                    let up = self.ops[i].up;
                    self.reply(up, st, 0, &[]);
                    self.free_op(i as u32);
                }
                Kind::RemoteList => {
                    let j = self.ops[i].job as usize;
                    if let Some(job) = self.jobs.get_mut(j) {
                        job.cancelled = true;
                        job.busy = false;
                    }
                    self.free_op(i as u32);
                }
                // Sent and waiting for the answer (queued ones fail when they start).
                Kind::SyncSend if self.ops[i].local == Local::Done => self.sync_abort(i as u32),
                _ => {}
            }
        }
    }

    /// Reads and handles frames on every connection with bytes waiting.
    fn read_all(&mut self) -> usize {
        let mut work = 0;
        for i in 0..self.conns.len() {
            let go = matches!(&self.conns[i], Some(c) if (c.readable || c.stalled) && !c.dead);
            if go {
                work += self.read_conn(i);
            }
        }
        work
    }

    fn read_conn(&mut self, i: usize) -> usize {
        let mut frames = 0;
        loop {
            // Fill.
            {
                let Some(Some(c)) = self.conns.get_mut(i) else {
                    return frames;
                };
                if c.rlen == c.rbuf.len() && c.rpos > 0 {
                    c.rbuf.copy_within(c.rpos..c.rlen, 0);
                    c.rlen -= c.rpos;
                    c.rpos = 0;
                }
                if let Some(d) = c.direct.as_mut().filter(|d| d.got < d.len) {
                    if c.readable {
                        let into = &mut d.buf.as_mut_slice()[d.got..d.len];
                        d.got += read_some(&mut *c.sock, into, &mut c.readable, &mut c.dead);
                    }
                } else if c.readable && c.rlen < c.rbuf.len() {
                    let into = &mut c.rbuf[c.rlen..];
                    c.rlen += read_some(&mut *c.sock, into, &mut c.readable, &mut c.dead);
                }
            }
            // Parse what is there.
            let (progress, more) = self.parse(i);
            frames += progress;
            let Some(Some(c)) = self.conns.get_mut(i) else {
                return frames;
            };
            if c.dead || c.stalled {
                return frames;
            }
            if !c.readable && !more {
                return frames;
            }
            if !c.readable && progress == 0 {
                return frames;
            }
        }
    }

    /// Handles whole frames at the front of connection `i`'s buffer. Returns frames
    /// handled and whether a partial frame remains that needs more bytes.
    fn parse(&mut self, i: usize) -> (usize, bool) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return (0, false);
        };
        let rbuf = std::mem::take(&mut c.rbuf);
        let (rlen, gen) = (c.rlen, c.gen);
        c.stalled = false;
        let ready = matches!(c.hs, Hs::Ready);
        let mut direct = c.direct.take();
        let mut pos = c.rpos;
        let mut n = 0;
        let mut stalled = false;
        let mut drop_why = None;
        // A direct write whose data has all arrived completes once its fields have.
        if let Some(d) = direct.take() {
            if d.got < d.len || rlen - pos < MUTATE_FIELDS {
                direct = Some(d);
            } else if self.free_ops.is_empty() {
                direct = Some(d);
                stalled = true;
            } else {
                match self.finish_direct(i as u32, gen, d, &rbuf[pos..pos + MUTATE_FIELDS]) {
                    Ok(()) => {
                        pos += MUTATE_FIELDS;
                        n += 1;
                        self.engine.perf().global().inc(m::C_NET_FRAMES_IN);
                    }
                    Err(why) => drop_why = Some(why.to_owned()),
                }
            }
        }
        while pos < rlen && direct.is_none() && !stalled && drop_why.is_none() {
            if ready {
                if let Some(d) = self.start_direct(&rbuf[pos..rlen]) {
                    pos += HEADER_SIZE + d.got;
                    direct = Some(d);
                    break;
                }
            }
            match decode_frame_deferred(&rbuf[pos..rlen], self.body_max) {
                Ok(None) => break,
                Ok(Some((h, msg, len, deferred))) => {
                    match self.on_frame(i as u32, gen, &h, msg, deferred) {
                        Flow::Next => {
                            pos += len;
                            n += 1;
                            self.engine.perf().global().inc(m::C_NET_FRAMES_IN);
                        }
                        Flow::Stall => {
                            stalled = true;
                            break;
                        }
                        Flow::Drop(why) => {
                            drop_why = Some(why.to_owned());
                            break;
                        }
                    }
                }
                Err(e) => {
                    drop_why = Some(e.to_string());
                    break;
                }
            }
        }
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return (n, false);
        };
        c.rbuf = rbuf;
        c.direct = direct;
        if pos == rlen {
            (c.rpos, c.rlen) = (0, 0);
        } else {
            c.rpos = pos;
        }
        c.stalled = stalled;
        if let Some(why) = drop_why {
            self.engine.perf().global().inc(m::C_NET_BAD_FRAMES);
            tracing::warn!(peer = ?c.peer, reason = %why, "dropping connection");
            c.dead = true;
        }
        (n, c.rlen > c.rpos || c.direct.is_some())
    }

    /// A buffer (and the promise of an op slot) for an incoming write, by priority,
    /// so that chains cannot deadlock on buffers held across nodes: a tail's write
    /// never waits for anyone and may take the last buffer; a write in the middle of a
    /// chain waits only for tails and leaves a quarter; a client's write (at the head,
    /// or being relayed there) waits for the whole chain and leaves half. Below its
    /// share a write's connection waits (backpressure), and what holds buffers drains.
    fn admit_write(&self, frame_kind: u8, tail: bool) -> Option<DmaBuf> {
        let pool = self.engine.pool();
        let (buffers, ops) = (pool.count(), self.opts.ops_max);
        let keep = if frame_kind == kind::CLIENT_MUTATE {
            2
        } else if tail {
            0
        } else {
            4
        };
        let floor = |total: usize| total.checked_div(keep).unwrap_or(0);
        if pool.available() <= floor(buffers) || self.free_ops.len() <= floor(ops) {
            return None;
        }
        self.client.buffer()
    }

    /// Starts receiving the write frame at the front of `buf` directly into a DMA
    /// buffer, if it is a large write not yet wholly here and resources allow. The
    /// data bytes already received are copied; the rest will be read in place.
    fn start_direct(&mut self, buf: &[u8]) -> Option<Direct> {
        let hb: &[u8; HEADER_SIZE] = buf.get(..HEADER_SIZE)?.try_into().ok()?;
        // A bad header is left to the ordinary path, which reports it.
        let h = Header::decode(hb, self.body_max).ok()?;
        if !matches!(h.kind, kind::CLIENT_MUTATE | kind::CHAIN_MUTATE) {
            return None;
        }
        let total = HEADER_SIZE + h.body_len as usize;
        let len = (h.body_len as usize).checked_sub(MUTATE_FIELDS)?;
        if buf.len() >= total
            || len < DIRECT_MIN
            || len > self.engine.pool().buf_size()
            || self.free_ops.is_empty()
        {
            return None;
        }
        // Not knowing yet whether this node is the tail: the middle's share.
        let mut b = self.admit_write(h.kind, false)?;
        b.set_len(len);
        let got = (buf.len() - HEADER_SIZE).min(len);
        b.as_mut_slice()[..got].copy_from_slice(&buf[HEADER_SIZE..HEADER_SIZE + got]);
        self.engine.perf().global().inc(m::C_NET_DIRECT_WRITES);
        Some(Direct {
            h,
            buf: b,
            len,
            got,
            since: Instant::now(),
        })
    }

    /// A direct write's data and fields are here: check and apply it like any write.
    fn finish_direct(
        &mut self,
        ci: u32,
        gen: u32,
        d: Direct,
        fields: &[u8],
    ) -> Result<(), &'static str> {
        let Direct {
            h, mut buf, len, ..
        } = d;
        let f = decode_mutate_fields(h.kind, fields, true).map_err(|_| "malformed write fields")?;
        let crc = seal_and_crc(&mut buf, len);
        if crc32c::crc32c_append(crc, fields) != h.body_crc {
            return Err("body checksum mismatch");
        }
        match self.on_mutate(
            (ci, gen, h.req_id),
            h.kind == kind::CHAIN_MUTATE,
            f,
            Some((buf, crc, len)),
        ) {
            Flow::Next => Ok(()),
            Flow::Stall => unreachable!("an op slot was checked free"),
            Flow::Drop(why) => Err(why),
        }
    }

    fn on_frame(
        &mut self,
        ci: u32,
        gen: u32,
        h: &Header,
        msg: Msg<'_>,
        crc_deferred: bool,
    ) -> Flow {
        if crc_deferred
            && !matches!(
                self.conns[ci as usize].as_ref().map(|c| &c.hs),
                Some(Hs::Ready)
            )
        {
            return Flow::Drop("unauthenticated frame");
        }
        if crc_deferred {
            return self.on_mutate_frame(ci, gen, h, msg);
        }
        let key = &self.opts.key;
        let c = self.conns[ci as usize].as_mut().expect("live connection");
        match (&c.hs, &msg) {
            (Hs::Ready, _) => {}
            (Hs::AwaitHello, Msg::Hello { nonce }) => {
                let ns = auth::nonce();
                let proof = key.proof(ROLE_LISTENER, nonce, &ns);
                c.hs = Hs::AwaitProof(*nonce, ns);
                self.send(ci, 0, &Msg::Challenge { nonce: ns, proof });
                return Flow::Next;
            }
            (Hs::AwaitProof(nc, ns), Msg::Proof { proof }) => {
                if !key.verify(ROLE_DIALER, nc, ns, proof) {
                    return Flow::Drop("bad proof: the peer does not hold the cluster key");
                }
                c.hs = Hs::Ready;
                return Flow::Next;
            }
            (Hs::Dialing(nc), Msg::Challenge { nonce, proof }) => {
                if !key.verify(ROLE_LISTENER, nc, nonce, proof) {
                    return Flow::Drop("bad challenge: the peer does not hold the cluster key");
                }
                let p = key.proof(ROLE_DIALER, nc, nonce);
                c.hs = Hs::Ready;
                self.send(ci, 0, &Msg::Proof { proof: p });
                // Whatever waited for this peer can go now.
                self.want_down = true;
                return Flow::Next;
            }
            _ => return Flow::Drop("unauthenticated frame"),
        }
        match msg {
            Msg::Hello { .. } | Msg::Challenge { .. } | Msg::Proof { .. } => {
                Flow::Drop("handshake frame after handshake")
            }
            Msg::Reply {
                status,
                version,
                data,
            } => {
                let from = self.conns[ci as usize].as_ref().and_then(|c| c.peer);
                self.on_reply(from, h.req_id, status, version, data);
                Flow::Next
            }
            Msg::Mutate { data, .. } => {
                debug_assert!(data.is_empty(), "writes take the deferred path");
                let f = MutateFields::of(&msg).expect("a mutation");
                self.on_mutate((ci, gen, h.req_id), h.kind == kind::CHAIN_MUTATE, f, None)
            }
            Msg::Read {
                chunk,
                offset,
                len,
                local,
            } => self.on_read((ci, gen, h.req_id), chunk, Some((offset, len)), local),
            Msg::Stat { chunk, local } => self.on_read((ci, gen, h.req_id), chunk, None, local),
            Msg::List {
                chain,
                shard,
                after,
            } => self.on_list((ci, gen, h.req_id), chain, shard, after),
            Msg::SyncPut {
                chain_ver,
                chunk,
                version,
                data,
            } => self.on_sync_put((ci, gen, h.req_id), chain_ver, chunk, version, data),
        }
    }

    // ---- op table --------------------------------------------------------------------

    fn alloc_op(&mut self, kind: Kind) -> Option<u32> {
        let i = self.free_ops.pop()?;
        let o = &mut self.ops[i as usize];
        debug_assert_eq!(o.kind, Kind::Free);
        let gen = o.gen.wrapping_add(1);
        *o = Op::empty();
        o.gen = gen;
        o.kind = kind;
        Some(i)
    }

    fn free_op(&mut self, i: u32) {
        let o = &mut self.ops[i as usize];
        assert!(o.kind != Kind::Free, "op freed twice");
        assert!(!o.in_queue, "op freed while queued on its chunk");
        o.kind = Kind::Free;
        o.buf = None;
        self.free_ops.push(i);
    }

    fn tag(&self, i: u32) -> u64 {
        (u64::from(self.ops[i as usize].gen) << 32) | u64::from(i)
    }

    fn op_of_tag(&self, tag: u64) -> Option<u32> {
        let i = (tag & 0xffff_ffff) as u32;
        let o = self.ops.get(i as usize)?;
        (o.kind != Kind::Free && u64::from(o.gen) == tag >> 32).then_some(i)
    }

    /// Appends op `i` to its chunk's queue; starts it if it is first.
    fn enqueue(&mut self, i: u32) {
        let chunk = self.ops[i as usize].chunk;
        self.ops[i as usize].in_queue = true;
        self.ops[i as usize].next = NONE;
        match self.chunks.get_mut(&chunk) {
            Some(q) if q.first != NONE => {
                let last = q.last;
                q.last = i;
                self.ops[last as usize].next = i;
            }
            Some(q) => {
                q.first = i;
                q.last = i;
                self.start(i);
            }
            None => {
                self.chunks.insert(
                    chunk,
                    ChunkQ {
                        first: i,
                        last: i,
                        version: None,
                        floor: 0,
                    },
                );
                self.start(i);
            }
        }
    }

    /// Whether a mutation (or resync copy) is under way on `chunk` here.
    fn chunk_busy(&self, chunk: &ChunkId) -> bool {
        self.chunks.get(chunk).is_some_and(|q| q.first != NONE)
    }

    /// Removes op `i` (the running head of its chunk queue), frees it, starts the next.
    fn finish_queued(&mut self, i: u32) {
        let chunk = self.ops[i as usize].chunk;
        let next = self.ops[i as usize].next;
        if self.ops[i as usize].in_queue {
            let q = self
                .chunks
                .get_mut(&chunk)
                .expect("queued op has a chunk queue");
            assert_eq!(q.first, i, "only a chunk's running op finishes");
            q.first = next;
            if next == NONE {
                q.last = NONE;
                // Idle chunks keep their known version (saves a Stat on the next
                // write) up to a bound; a version floor is never forgotten.
                if q.floor == 0 && self.chunks.len() > CHUNK_CACHE_MAX {
                    self.chunks.remove(&chunk);
                }
            }
            self.ops[i as usize].in_queue = false;
        }
        self.free_op(i);
        if next != NONE {
            // Started from the loop, not from here: a queue of ops that finish at once
            // (say, deletes of a missing chunk) would otherwise recurse once per op.
            self.ready.push(next);
        }
    }

    /// Frees a given-up mutation once its device I/O is over. What it did to the
    /// chunk here is not known any more: the next op asks the store again.
    fn finish_orphan(&mut self, i: u32) {
        if let Some(q) = self.chunks.get_mut(&self.ops[i as usize].chunk) {
            q.version = None;
        }
        self.finish_queued(i);
    }

    /// Starts the ops whose turn came (see `finish_queued`).
    fn start_ready(&mut self) -> usize {
        let mut n = 0;
        while let Some(i) = self.ready.pop() {
            self.start(i);
            n += 1;
        }
        n
    }

    // ---- engine ----------------------------------------------------------------------

    fn submit(&mut self, i: u32, op: ChunkOp, version: u64) -> bool {
        let tag = self.tag(i);
        match self.client.submit_versioned(tag, op, version) {
            Ok(()) => {
                self.ops[i as usize].local = Local::Running;
                true
            }
            Err((e, op)) => {
                self.ops[i as usize].buf = op.into_buf();
                self.ops[i as usize].status = status_of(&e);
                false
            }
        }
    }

    fn reap_engine(&mut self) -> usize {
        let mut done = std::mem::take(&mut self.done);
        let n = self.client.poll(&mut done);
        for c in done.drain(..) {
            let Some(i) = self.op_of_tag(c.tag) else {
                continue;
            };
            self.ops[i as usize].local = Local::Done;
            if self.ops[i as usize].orphan {
                self.finish_orphan(i);
                continue;
            }
            self.on_engine(i, c);
        }
        self.done = done;
        n
    }

    fn on_engine(&mut self, i: u32, c: ShardCompletion) {
        let kind = self.ops[i as usize].kind;
        match kind {
            Kind::Stat => {
                let chunk = self.ops[i as usize].chunk;
                let next = self.ops[i as usize].next;
                if let Some(q) = self.chunks.get_mut(&chunk) {
                    if let Ok(info) = c.result {
                        q.version = Some(info.version);
                    }
                }
                // The Stat sat in front of the op that asked for it.
                let _ = next;
                self.finish_queued(i);
            }
            Kind::Mutate => self.mutate_local_done(i, c.result, c.buf),
            Kind::Read => {
                let up = self.ops[i as usize].up;
                let in_queue = self.ops[i as usize].in_queue;
                match (c.result, c.buf) {
                    (Ok(info), _) if self.ops[i as usize].stat => {
                        self.reply(up, Status::Ok, info.version, &info.len.to_le_bytes());
                    }
                    (Ok(info), Some(b)) => {
                        let len = self.ops[i as usize].len as usize;
                        self.reply(up, Status::Ok, info.version, &b.as_slice()[..len]);
                    }
                    (Err(e), _) => self.reply(up, status_of(&e), 0, &[]),
                    (Ok(_), None) => self.reply(up, Status::Io, 0, &[]),
                }
                if in_queue {
                    self.finish_queued(i);
                } else {
                    self.free_op(i);
                }
            }
            Kind::SyncApply => self.sync_apply_step(i, c.result, c.buf),
            Kind::SyncSend => self.sync_send_read(i, c.result, c.buf),
            Kind::LocalList => self.local_list_done(i, c.result, c.buf),
            Kind::Free | Kind::Proxy | Kind::RemoteList => {}
        }
    }

    // ---- mutations -------------------------------------------------------------------

    /// A write frame whose body crc is still to check: the data goes into a DMA
    /// buffer and is sealed (a crc per 4 KiB block, which the device path needs); the
    /// frame's crc is then combined from those, so the bytes are checksummed once.
    fn on_mutate_frame(&mut self, ci: u32, gen: u32, h: &Header, msg: Msg<'_>) -> Flow {
        let (Some(f), Msg::Mutate { data, .. }) = (MutateFields::of(&msg), &msg) else {
            return Flow::Drop("deferred crc on a frame that is not a write");
        };
        let data: &[u8] = data;
        let up = (ci, gen, h.req_id);
        if data.len() > self.engine.pool().buf_size() {
            if check_mutate_crc(h, &msg, crc32c::crc32c(data)).is_err() {
                return Flow::Drop("body checksum mismatch");
            }
            self.reply(up, Status::BadRequest, 0, &[]);
            return Flow::Next;
        }
        let tail = h.kind == kind::CHAIN_MUTATE
            && self
                .table
                .chain(self.table.chain_of(&f.chunk))
                .is_some_and(|c| c.successor(self.me()).is_none());
        let Some(mut b) = self.admit_write(h.kind, tail) else {
            return Flow::Stall;
        };
        b.set_len(data.len());
        b.as_mut_slice().copy_from_slice(data);
        let crc = seal_and_crc(&mut b, data.len());
        if check_mutate_crc(h, &msg, crc).is_err() {
            return Flow::Drop("body checksum mismatch");
        }
        let n = data.len();
        self.on_mutate(up, h.kind == kind::CHAIN_MUTATE, f, Some((b, crc, n)))
    }

    /// `sealed`: a write's data in a sealed DMA buffer, with its crc32c and length.
    /// Callers check that an op slot is free first, so this never stalls while it
    /// holds a buffer.
    fn on_mutate(
        &mut self,
        up: (u32, u32, u64),
        chained: bool,
        f: MutateFields,
        sealed: Option<(DmaBuf, u32, usize)>,
    ) -> Flow {
        let MutateFields {
            chain_ver,
            chunk,
            kind: mk,
            offset,
            version,
        } = f;
        // A chunk truncated to nothing is deleted: a length-0 chunk with a version is
        // indistinguishable from none to readers and would only confuse resync diffs.
        let mk = if mk == MutKind::Truncate && offset == 0 {
            MutKind::Delete
        } else {
            mk
        };
        let offset = if mk == MutKind::Delete { 0 } else { offset };
        let data: &[u8] = match &sealed {
            Some((b, _, n)) => &b.as_slice()[..*n],
            None => &[],
        };
        let cs = self.engine.geometry().chunk_size;
        let bad = match mk {
            MutKind::Write => {
                offset % BLOCK_SIZE != 0
                    || data.len() > self.engine.pool().buf_size()
                    || u64::from(offset) + data.len() as u64 > u64::from(cs)
            }
            MutKind::Truncate => offset % BLOCK_SIZE != 0 || offset > cs,
            MutKind::Delete => false,
        };
        if bad {
            self.reply(up, Status::BadRequest, 0, &[]);
            return Flow::Next;
        }
        if !chained && !self.admitted() {
            self.reply(up, Status::Unavailable, 0, &[]);
            return Flow::Next;
        }
        let Some(chain) = self.table.chain(self.table.chain_of(&chunk)).cloned() else {
            self.reply(up, Status::Unavailable, 0, &[]);
            return Flow::Next;
        };
        if chain_ver != 0 && chain_ver != chain.version {
            self.reply(up, Status::StaleChain, chain.version, &[]);
            return Flow::Next;
        }
        let me = self.me();
        if !chained && chain.head() != Some(me) {
            // Relay to the head.
            let Some(head) = chain.head() else {
                self.reply(up, Status::Unavailable, 0, &[]);
                return Flow::Next;
            };
            return self.proxy(
                up,
                head,
                &Msg::Mutate {
                    chain_ver: chain.version,
                    chunk,
                    kind: mk,
                    offset,
                    version: 0,
                    data,
                },
            );
        }
        if chained
            && !matches!(
                chain.state_of(me),
                Some(TargetState::Serving | TargetState::Syncing)
            )
        {
            self.reply(up, Status::NotServing, chain.version, &[]);
            return Flow::Next;
        }
        let data_len = data.len();
        let (buf, data_crc) = match sealed {
            Some((b, crc, _)) => (Some(b), crc),
            None if mk == MutKind::Write => {
                self.reply(up, Status::BadRequest, 0, &[]);
                return Flow::Next;
            }
            None => (None, 0),
        };
        let Some(i) = self.alloc_op(Kind::Mutate) else {
            return Flow::Stall;
        };
        let o = &mut self.ops[i as usize];
        o.up = up;
        o.chunk = chunk;
        o.chain = chain.id;
        o.mk = mk;
        o.offset = offset;
        o.len = data_len as u32;
        o.version = version;
        o.buf = buf;
        o.data_crc = data_crc;
        self.engine.perf().global().inc(if chained {
            m::C_REPL_CHAIN_WRITES
        } else {
            m::C_REPL_CLIENT_WRITES
        });
        self.enqueue(i);
        Flow::Next
    }

    /// Starts op `i`, now first in its chunk's queue.
    fn start(&mut self, i: u32) {
        let chunk = self.ops[i as usize].chunk;
        let known = self.chunks.get(&chunk).and_then(|q| q.version);
        if known.is_none() && self.ops[i as usize].kind == Kind::Mutate {
            // Learn the chunk's version first: a Stat op goes in front.
            let Some(s) = self.alloc_op(Kind::Stat) else {
                self.ops[i as usize].status = Status::Busy;
                self.fail_front(i);
                return;
            };
            self.ops[s as usize].chunk = chunk;
            self.ops[s as usize].in_queue = true;
            self.ops[s as usize].next = i;
            self.chunks.get_mut(&chunk).expect("queue").first = s;
            if !self.submit(s, ChunkOp::Stat { chunk }, 0) {
                // Put the op back in front and fail it (no retry loop here).
                self.ops[s as usize].in_queue = false;
                self.chunks.get_mut(&chunk).expect("queue").first = i;
                self.free_op(s);
                self.ops[i as usize].status = Status::Busy;
                self.fail_front(i);
            }
            return;
        }
        match self.ops[i as usize].kind {
            Kind::Mutate => self.start_mutate(i, known.unwrap_or(0)),
            Kind::Read => self.start_read(i),
            Kind::SyncApply => self.sync_apply_step(i, Ok(ChunkInfo { len: 0, version: 0 }), None),
            Kind::SyncSend => self.sync_send_start(i),
            _ => unreachable!("only chunk ops are queued"),
        }
    }

    /// Fails the running op `i` of a chunk queue with its status.
    fn fail_front(&mut self, i: u32) {
        let (up, st) = (self.ops[i as usize].up, self.ops[i as usize].status);
        self.reply(up, st, 0, &[]);
        self.finish_queued(i);
    }

    fn start_mutate(&mut self, i: u32, cur: u64) {
        self.ops[i as usize].begun = true;
        let me = self.me();
        let o = &self.ops[i as usize];
        let (chunk, chain_id) = (o.chunk, o.chain);
        let chain = self.table.chain(chain_id).cloned();
        let Some(chain) = chain else {
            self.ops[i as usize].status = Status::Unavailable;
            return self.fail_front(i);
        };
        if o.version == 0 {
            // Head: number it. Removing what does not exist changes nothing anywhere.
            let floor = self.chunks.get(&chunk).map_or(0, |q| q.floor);
            if o.mk != MutKind::Write && cur == 0 && floor == 0 {
                let up = o.up;
                self.reply(up, Status::Ok, 0, &[]);
                return self.finish_queued(i);
            }
            if chain.head() != Some(me) {
                self.ops[i as usize].status = Status::StaleChain;
                return self.fail_front(i);
            }
            let floor = self.chunks.get(&chunk).map_or(0, |q| q.floor);
            self.ops[i as usize].version = cur.max(floor) + 1;
            self.ops[i as usize].numbered_here = true;
        }
        let o = &mut self.ops[i as usize];
        let version = o.version;
        o.down = if chain.successor(me).is_some() {
            Down::Want
        } else {
            Down::Done
        };
        if o.down == Down::Want {
            self.send_down(i);
        }
        if version <= cur {
            // Already applied here (re-sent after a chain change): only pass it on.
            self.ops[i as usize].local = Local::Done;
            self.engine.perf().global().inc(m::C_REPL_DUPLICATES);
            return self.maybe_finish_mutate(i);
        }
        self.submit_local(i);
    }

    /// Hands mutation `i` to the device. A full ring is retried: the op may already
    /// be down the chain, and a mutation that went down is never abandoned, or the
    /// head would later give its version to different bytes.
    fn submit_local(&mut self, i: u32) {
        let o = &mut self.ops[i as usize];
        o.resubmit = false;
        let (chunk, version) = (o.chunk, o.version);
        let op = match o.mk {
            MutKind::Write => ChunkOp::Write {
                chunk,
                offset: o.offset,
                len: o.len,
                buf: o.buf.take().expect("a write holds its data"),
            },
            MutKind::Truncate => ChunkOp::Truncate {
                chunk,
                len: o.offset,
            },
            MutKind::Delete => ChunkOp::Delete { chunk },
        };
        if !self.submit(i, op, version) {
            if self.ops[i as usize].status == Status::Busy {
                self.ops[i as usize].resubmit = true;
                self.want_down = true;
                return;
            }
            self.mutate_local_done(i, Err(Error::Shutdown), None);
        }
    }

    /// Sends mutation `i` to its chain successor if there is one and it is reachable.
    fn send_down(&mut self, i: u32) {
        let me = self.me();
        let o = &self.ops[i as usize];
        if o.retry_at.is_some_and(|t| Instant::now() < t) {
            self.want_down = true;
            return;
        }
        let Some(chain) = self.table.chain(o.chain) else {
            return;
        };
        let Some(succ) = chain.successor(me) else {
            self.ops[i as usize].down = Down::Done;
            return self.maybe_finish_mutate(i);
        };
        let chain_ver = chain.version;
        let Some(ci) = self.peer_conn(succ) else {
            self.want_down = true;
            return;
        };
        let tag = self.tag(i);
        let o = &self.ops[i as usize];
        let data: &[u8] = match (&o.buf, o.mk) {
            (Some(b), MutKind::Write) => &b.as_slice()[..o.len as usize],
            _ => &[],
        };
        if o.mk == MutKind::Write && data.is_empty() {
            // The data is at the device right now; it comes back with the completion.
            self.want_down = true;
            return;
        }
        // The crc comes from the data's, computed when it arrived. With nothing queued
        // on the connection the frame goes to the socket straight from the DMA buffer
        // (one gathered write); only what the socket does not take is copied.
        let max = self.opts.send_buffer_max;
        let f = MutateFields {
            chain_ver,
            chunk: o.chunk,
            kind: o.mk,
            offset: o.offset,
            version: o.version,
        };
        let (hdr, fields) = mutate_frame_parts(tag, &f, data.len(), o.data_crc);
        if let Some(Some(c)) = self.conns.get_mut(ci as usize) {
            if c.wbuf.len() - c.wpos > max {
                c.dead = true;
                return;
            }
            let mut sent = 0;
            if c.wpos == c.wbuf.len() {
                let parts = [
                    std::io::IoSlice::new(&hdr),
                    std::io::IoSlice::new(data),
                    std::io::IoSlice::new(&fields),
                ];
                match c.sock.write_vectored(&parts) {
                    Ok(n) => sent = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => c.dead = true,
                }
            }
            // Queue the rest, in frame order.
            let mut skip = sent;
            for part in [&hdr[..], data, &fields[..]] {
                let k = skip.min(part.len());
                c.wbuf.extend_from_slice(&part[k..]);
                skip -= k;
            }
        }
        self.ops[i as usize].down = Down::Sent { node: succ };
        self.ops[i as usize].retry_at = None;
        self.engine.perf().global().inc(m::C_NET_FRAMES_OUT);
    }

    fn pump_down(&mut self) {
        self.want_down = false;
        for i in 0..self.ops.len() as u32 {
            let o = &self.ops[i as usize];
            let wants = o.down == Down::Want || o.resubmit;
            if o.kind == Kind::Mutate && o.in_queue && wants && o.begun && !o.orphan {
                let q = self.chunks.get(&o.chunk).map(|q| q.first);
                if q == Some(i) {
                    if self.ops[i as usize].resubmit {
                        self.submit_local(i);
                    }
                    if self.ops[i as usize].down == Down::Want {
                        self.send_down(i);
                    }
                }
            }
        }
    }

    fn mutate_local_done(&mut self, i: u32, r: Result<ChunkInfo, Error>, buf: Option<DmaBuf>) {
        self.ops[i as usize].buf = buf;
        match r {
            Ok(info) => {
                let o = &self.ops[i as usize];
                // The store answers with the version it committed; a delete of a
                // chunk this replica never had commits nothing (version 0). The
                // version stays the chunk's floor here either way, so the head never
                // numbers other bytes with it.
                let ok =
                    info.version == o.version || (o.mk == MutKind::Delete && info.version == 0);
                if !ok {
                    tracing::error!(chunk = %o.chunk, got = info.version, expect = o.version, "replica version mismatch");
                }
                let v = info.version.max(o.version);
                if let Some(q) = self.chunks.get_mut(&self.ops[i as usize].chunk) {
                    q.version = Some(v);
                }
                if self.ops[i as usize].down == Down::Want {
                    // Its data is back from the device: it can go down now.
                    self.send_down(i);
                }
                self.maybe_finish_mutate(i);
            }
            Err(e) => {
                let st = status_of(&e);
                let o = &self.ops[i as usize];
                tracing::warn!(chunk = %o.chunk, version = o.version, kind = ?o.mk, error = %e, "a replicated mutation failed here");
                self.ops[i as usize].status =
                    if matches!(self.ops[i as usize].down, Down::Sent { .. } | Down::Done) {
                        // Other replicas may have it.
                        Status::Unknown
                    } else {
                        st
                    };
                // The device failed (the shard now refuses writes until a restart). The
                // version may be applied down the chain: never number other bytes with
                // it here.
                let v = self.ops[i as usize].version;
                if let Some(q) = self.chunks.get_mut(&self.ops[i as usize].chunk) {
                    q.floor = q.floor.max(v);
                }
                self.abort_mutate(i);
            }
        }
    }

    fn abort_mutate(&mut self, i: u32) {
        let (up, st) = (self.ops[i as usize].up, self.ops[i as usize].status);
        self.reply(up, st, 0, &[]);
        self.engine.perf().global().inc(m::C_REPL_FAILED);
        if matches!(self.ops[i as usize].down, Down::Sent { .. }) {
            // The successor's answer would find no op: forget it.
        }
        self.finish_queued(i);
    }

    fn maybe_finish_mutate(&mut self, i: u32) {
        let o = &self.ops[i as usize];
        if o.local != Local::Done || o.down != Down::Done {
            return;
        }
        let (up, v) = (o.up, o.version);
        let v = if o.mk == MutKind::Delete { 0 } else { v };
        self.reply(up, Status::Ok, v, &[]);
        self.finish_queued(i);
    }

    /// `from`: the node whose connection carried the reply.
    fn on_reply(&mut self, from: Option<u32>, req: u64, status: Status, version: u64, data: &[u8]) {
        let Some(i) = self.op_of_tag(req) else {
            return; // An answer nobody waits for any more (op aborted or retried).
        };
        match self.ops[i as usize].kind {
            Kind::Mutate => {
                // Only the current successor's answer counts: a late one from a former
                // successor speaks for its own, older chain.
                if !matches!(self.ops[i as usize].down, Down::Sent { node } if Some(node) == from) {
                    return;
                }
                match status {
                    Status::Ok => {
                        self.ops[i as usize].down = Down::Done;
                        self.maybe_finish_mutate(i);
                    }
                    st => {
                        // Another table there, a full successor, or a failed device:
                        // send again after a pause. A mutation that went down is never
                        // abandoned (replicas would diverge); a successor that cannot
                        // apply it is taken out of the chain by membership, and then
                        // the chain changes under this op.
                        if !matches!(st, Status::StaleChain | Status::Busy | Status::Unavailable) {
                            tracing::warn!(status = ?st, chunk = %self.ops[i as usize].chunk, "successor refused a chain write; retrying");
                        }
                        self.ops[i as usize].down = Down::Want;
                        self.ops[i as usize].retry_at = Some(Instant::now() + RETRY_DELAY);
                        self.want_down = true;
                    }
                }
            }
            Kind::Proxy => {
                let up = self.ops[i as usize].up;
                self.reply(up, status, version, data);
                self.free_op(i);
            }
            Kind::RemoteList => self.remote_list_done(i, status, version, data),
            Kind::SyncSend => {
                let j = self.ops[i as usize].job as usize;
                let bytes = self.ops[i as usize].len as u64;
                if let Some(job) = self.jobs.get_mut(j) {
                    job.in_flight -= 1;
                    if status == Status::Ok {
                        job.chunks_sent += 1;
                        job.bytes_sent += bytes;
                        self.engine.perf().global().inc(m::C_SYNC_CHUNKS);
                        self.engine.perf().global().add(m::C_SYNC_BYTES, bytes);
                    } else {
                        job.cancelled = true;
                    }
                }
                self.finish_queued(i);
            }
            _ => {}
        }
    }

    // ---- reads -----------------------------------------------------------------------

    /// A read of `range` (offset, length), or a stat when `None`.
    fn on_read(
        &mut self,
        up: (u32, u32, u64),
        chunk: ChunkId,
        range: Option<(u32, u32)>,
        local: bool,
    ) -> Flow {
        let cs = self.engine.geometry().chunk_size;
        let stat = range.is_none();
        let (offset, len) = range.unwrap_or((0, 0));
        if !stat
            && (len == 0
                || offset % BLOCK_SIZE != 0
                || len as usize > self.engine.pool().buf_size()
                || u64::from(offset) + u64::from(len) > u64::from(cs))
        {
            self.reply(up, Status::BadRequest, 0, &[]);
            return Flow::Next;
        }
        let me = self.me();
        let mut queue = false;
        if !local && !self.admitted() {
            self.reply(up, Status::Unavailable, 0, &[]);
            return Flow::Next;
        }
        if !local {
            let chain = self.table.chain(self.table.chain_of(&chunk));
            let Some(chain) = chain else {
                self.reply(up, Status::Unavailable, 0, &[]);
                return Flow::Next;
            };
            let tail = chain.read_tail();
            let serving = chain.state_of(me) == Some(TargetState::Serving);
            let target = if serving && !self.chunk_busy(&chunk) {
                me
            } else if serving && tail == Some(me) {
                queue = true; // CRAQ: the tail waits for the write in flight
                me
            } else if serving {
                tail.unwrap_or(me)
            } else {
                // Not a replica (or not in sync): any serving replica, spread by reader.
                let s: Vec<u32> = chain.serving().collect();
                if s.is_empty() {
                    self.reply(up, Status::Unavailable, 0, &[]);
                    return Flow::Next;
                }
                s[me as usize % s.len()]
            };
            if target != me {
                let msg = match stat {
                    true => Msg::Stat {
                        chunk,
                        local: false,
                    },
                    false => Msg::Read {
                        chunk,
                        offset,
                        len,
                        local: false,
                    },
                };
                return self.proxy(up, target, &msg);
            }
        }
        let b = match stat {
            true => None,
            false => match self.client.buffer() {
                Some(b) => Some(b),
                None => return Flow::Stall,
            },
        };
        let Some(i) = self.alloc_op(Kind::Read) else {
            return Flow::Stall;
        };
        let o = &mut self.ops[i as usize];
        (o.up, o.chunk, o.offset, o.len, o.buf, o.stat) = (up, chunk, offset, len, b, stat);
        if queue {
            self.enqueue(i);
        } else {
            self.start_read(i);
        }
        Flow::Next
    }

    fn start_read(&mut self, i: u32) {
        let o = &mut self.ops[i as usize];
        let op = match o.stat {
            true => ChunkOp::Stat { chunk: o.chunk },
            false => ChunkOp::Read {
                chunk: o.chunk,
                offset: o.offset,
                len: o.len,
                buf: o.buf.take().expect("a read holds a buffer"),
            },
        };
        if !self.submit(i, op, 0) {
            let (up, st) = (self.ops[i as usize].up, self.ops[i as usize].status);
            self.reply(up, st, 0, &[]);
            if self.ops[i as usize].in_queue {
                self.finish_queued(i);
            } else {
                self.free_op(i);
            }
        }
    }

    /// Relays a request to `node`; its reply goes back to `up` unchanged.
    fn proxy(&mut self, up: (u32, u32, u64), node: u32, msg: &Msg<'_>) -> Flow {
        if node == self.me() {
            self.reply(up, Status::Unavailable, 0, &[]);
            return Flow::Next;
        }
        let Some(ci) = self.peer_conn(node) else {
            // Not connected (yet): the client retries; nothing was done.
            self.reply(up, Status::Unavailable, 0, &[]);
            return Flow::Next;
        };
        let Some(i) = self.alloc_op(Kind::Proxy) else {
            return Flow::Stall;
        };
        self.ops[i as usize].up = up;
        self.ops[i as usize].via = node;
        self.ops[i as usize].read = matches!(msg, Msg::Read { .. } | Msg::Stat { .. });
        let tag = self.tag(i);
        self.send(ci, tag, msg);
        self.engine.perf().global().inc(m::C_REPL_PROXIED);
        Flow::Next
    }

    // ---- table changes -----------------------------------------------------------------

    fn on_table(&mut self) {
        let t = Arc::clone(&self.shared.table.lock().unwrap_or_else(|p| p.into_inner()));
        if t.version <= self.table.version {
            return;
        }
        tracing::info!(version = t.version, "chain table installed");
        self.table = t;
        self.dial_all();
        let me = self.me();
        // In-flight mutations: follow the new successor (or finish, if now the tail).
        for i in 0..self.ops.len() as u32 {
            let o = &self.ops[i as usize];
            if o.kind != Kind::Mutate || !o.begun || o.orphan {
                continue;
            }
            let Some(chain) = self.table.chain(o.chain) else {
                continue;
            };
            let member = matches!(
                chain.state_of(me),
                Some(TargetState::Serving | TargetState::Syncing)
            );
            let succ = chain.successor(me);
            if o.numbered_here && chain.head() != Some(me) {
                // Numbered here as head, and this node no longer heads the chain (it
                // was declared down or restarted and will be resynced): the new head
                // never saw this write, so completing it here, say as the new tail,
                // would acknowledge bytes the chain does not hold. Give it up: its
                // outcome is unknown to the client; where it reached other replicas
                // the new chain carries it, and this node's copy is replaced by the
                // resync.
                let up = o.up;
                self.reply(up, Status::Unknown, 0, &[]);
                let o = &mut self.ops[i as usize];
                (o.up, o.orphan, o.down) = ((NONE, 0, 0), true, Down::Done);
                if o.local != Local::Running {
                    self.finish_orphan(i);
                }
                continue;
            }
            match o.down {
                Down::Sent { node } if Some(node) == succ => {
                    // Same successor; if it saw the old version it answers StaleChain
                    // and we send again.
                }
                Down::Sent { .. } | Down::Want => {
                    self.ops[i as usize].down = if succ.is_some() {
                        Down::Want
                    } else {
                        Down::Done
                    };
                    self.ops[i as usize].retry_at = None;
                    self.want_down = true;
                }
                // Finished downstream but not yet here, and now there is a successor
                // (a syncing tail just added): it must get this write too; if it has
                // it already, it recognises the version.
                Down::Done if succ.is_some() => {
                    self.ops[i as usize].down = Down::Want;
                    self.ops[i as usize].retry_at = None;
                    self.want_down = true;
                }
                Down::Done => {}
            }
            if !member {
                // Declared out of this chain: stop; the chain continues without us.
                let up = self.ops[i as usize].up;
                self.reply(up, Status::Unknown, 0, &[]);
                self.ops[i as usize].up = (NONE, 0, 0);
            }
            if self.ops[i as usize].down == Down::Done && self.ops[i as usize].local == Local::Done
            {
                self.maybe_finish_mutate(i);
            }
        }
        self.plan_syncs();
    }

    // ---- resync --------------------------------------------------------------------------

    /// One job per chain where this node serves and its successor syncs.
    fn plan_syncs(&mut self) {
        let me = self.me();
        let mut wanted = Vec::new();
        for c in &self.table.chains {
            if c.state_of(me) != Some(TargetState::Serving) {
                continue;
            }
            if let Some(s) = c.successor(me) {
                if c.state_of(s) == Some(TargetState::Syncing) {
                    wanted.push((c.id, s, c.version));
                }
            }
        }
        for j in &mut self.jobs {
            if !wanted.contains(&(j.chain, j.target, j.chain_ver)) {
                j.cancelled = true;
            }
        }
        for (chain, target, chain_ver) in wanted {
            if self.jobs.iter().any(|j| {
                (j.chain, j.target, j.chain_ver) == (chain, target, chain_ver) && !j.cancelled
            }) {
                continue;
            }
            tracing::info!(chain, target, chain_ver, "resync starts");
            self.jobs.push(SyncJob::new(chain, target, chain_ver));
        }
    }

    fn pump_syncs(&mut self) -> usize {
        let mut work = 0;
        // Drop cancelled jobs with nothing in flight; restart ones cancelled by a
        // transient failure if the table still wants them.
        let mut j = 0;
        while j < self.jobs.len() {
            let job = &self.jobs[j];
            if job.cancelled
                && !job.busy
                && job.in_flight == 0
                && !self
                    .ops
                    .iter()
                    .any(|o| o.kind != Kind::Free && o.job == j as u32 && is_sync_kind(o.kind))
            {
                let job = self.jobs.remove(j);
                // Ops refer to jobs by index: renumber those after it.
                for o in &mut self.ops {
                    if is_sync_kind(o.kind) && o.job != NONE && o.job > j as u32 {
                        o.job -= 1;
                    }
                }
                tracing::info!(chain = job.chain, target = job.target, "resync stopped");
                work += 1;
                self.plan_syncs();
                continue;
            }
            j += 1;
        }
        for j in 0..self.jobs.len() {
            if self.jobs[j].cancelled || self.jobs[j].busy {
                continue;
            }
            work += self.step_sync(j);
        }
        work
    }

    fn step_sync(&mut self, j: usize) -> usize {
        match self.jobs[j].phase {
            Phase::ListRemote => {
                let target = self.jobs[j].target;
                let Some(ci) = self.peer_conn(target) else {
                    return 0;
                };
                let Some(i) = self.alloc_op(Kind::RemoteList) else {
                    return 0;
                };
                self.ops[i as usize].job = j as u32;
                self.ops[i as usize].via = target;
                let tag = self.tag(i);
                let job = &mut self.jobs[j];
                job.busy = true;
                let msg = Msg::List {
                    chain: job.chain,
                    shard: job.shard,
                    after: job.after,
                };
                self.send(ci, tag, &msg);
                1
            }
            Phase::ListLocal => {
                let Some(b) = self.client.buffer() else {
                    return 0;
                };
                let Some(i) = self.alloc_op(Kind::LocalList) else {
                    return 0;
                };
                let job = &mut self.jobs[j];
                job.busy = true;
                let (shard, after) = (job.shard, job.after);
                self.ops[i as usize].job = j as u32;
                self.ops[i as usize].shard = shard;
                if !self.submit(
                    i,
                    ChunkOp::List {
                        shard,
                        after,
                        buf: b,
                    },
                    0,
                ) {
                    self.jobs[j].busy = false;
                    self.free_op(i);
                    return 0;
                }
                1
            }
            Phase::Send => self.sync_send_more(j),
            Phase::Done => 0,
        }
    }

    fn remote_list_done(&mut self, i: u32, status: Status, version: u64, data: &[u8]) {
        let j = self.ops[i as usize].job as usize;
        self.free_op(i);
        let Some(job) = self.jobs.get_mut(j) else {
            return;
        };
        job.busy = false;
        if status != Status::Ok || data.len() % DIGEST_SIZE != 0 {
            job.cancelled = true;
            return;
        }
        let (shards, more) = ((version & 0xffff_ffff) as u32, version >> 32 & 1 == 1);
        let entries = data.len() / DIGEST_SIZE;
        for (k, e) in data.chunks_exact(DIGEST_SIZE).enumerate() {
            let Some(d) = ChunkDigest::decode(e) else {
                continue;
            };
            if more && k + 1 == entries {
                job.after = Some(d.chunk); // the cursor
            } else {
                job.remote.insert(d.chunk, d);
            }
        }
        job.shards = shards;
        if !more {
            job.shard += 1;
            job.after = None;
        }
        if job.shard >= job.shards {
            job.phase = Phase::ListLocal;
            job.shard = 0;
            job.after = None;
        }
    }

    fn local_list_done(&mut self, i: u32, r: Result<ChunkInfo, Error>, buf: Option<DmaBuf>) {
        let j = self.ops[i as usize].job as usize;
        self.free_op(i);
        let shard_count = self.engine.geometry().shard_count;
        let chains = self.table.chains.len() as u32;
        let chunks = &self.chunks;
        let Some(job) = self.jobs.get_mut(j) else {
            return;
        };
        job.busy = false;
        let (Ok(info), Some(b)) = (r, buf) else {
            job.cancelled = true;
            return;
        };
        let n = info.len as usize;
        for e in b.as_slice()[..n * DIGEST_SIZE].chunks_exact(DIGEST_SIZE) {
            if let Some(d) = ChunkDigest::decode(e) {
                job.after = Some(d.chunk);
                if chain_of(&d.chunk, chains) == job.chain {
                    job.local.push(d);
                }
            }
        }
        if n < b.capacity() / DIGEST_SIZE {
            job.shard += 1;
            job.after = None;
        }
        if job.shard >= shard_count {
            // Diff: send what differs or is missing there, delete what only it has. A
            // chunk of length 0 holds nothing and counts as absent on either side.
            // After the first round, chunks with a write under way here are left out:
            // their differences are that write, which is on its way down the chain
            // (an earlier difference was sent in the first round), and a chunk written
            // without pause would otherwise keep every round busy.
            let busy =
                |c: &ChunkId| job.round > 0 && chunks.get(c).is_some_and(|q| q.first != NONE);
            job.todo.clear();
            for d in job.local.iter().filter(|d| d.len > 0) {
                if busy(&d.chunk) {
                    job.remote.remove(&d.chunk);
                    continue;
                }
                match job.remote.remove(&d.chunk) {
                    Some(r) if (r.len, r.version, r.crc) == (d.len, d.version, d.crc) => {}
                    _ => job.todo.push((d.chunk, Some(*d))),
                }
            }
            for (c, r) in job.remote.drain() {
                if r.len > 0 && !busy(&c) {
                    job.todo.push((c, None));
                }
            }
            job.local.clear();
            job.next = 0;
            job.phase = Phase::Send;
        }
    }

    fn sync_send_more(&mut self, j: usize) -> usize {
        let mut work = 0;
        while self.jobs[j].in_flight < self.opts.sync_window
            && self.jobs[j].next < self.jobs[j].todo.len()
        {
            // A chunk with a write under way gets its copy queued behind that write
            // (the chunk queue orders them), so the copy is of the state after it:
            // what the listing said (its length, or that the chunk is absent) may be
            // out of date by then, so every copy reads the chunk whole at its turn,
            // deletes included (see `sync_send_start`).
            let (chunk, _) = self.jobs[j].todo[self.jobs[j].next];
            // One sync buffer is left for copies coming in: two nodes syncing to each
            // other must not hold every buffer in copies going out.
            if self.sync_pool.available() <= 1 {
                break;
            }
            let Some(buf) = self.sync_pool.alloc() else {
                break;
            };
            let Some(i) = self.alloc_op(Kind::SyncSend) else {
                break;
            };
            let o = &mut self.ops[i as usize];
            o.chunk = chunk;
            o.job = j as u32;
            o.buf = Some(buf);
            o.len = 0;
            o.chain = self.jobs[j].chain;
            o.via = self.jobs[j].target;
            self.jobs[j].in_flight += 1;
            self.jobs[j].next += 1;
            self.enqueue(i);
            work += 1;
        }
        let job = &mut self.jobs[j];
        if job.next >= job.todo.len() && job.in_flight == 0 {
            if job.todo.is_empty() {
                job.phase = Phase::Done;
                if !job.reported {
                    job.reported = true;
                    tracing::info!(
                        chain = job.chain,
                        target = job.target,
                        rounds = job.round + 1,
                        chunks = job.chunks_sent,
                        "resync done"
                    );
                    self.shared
                        .synced
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((job.chain, job.target, job.chain_ver));
                }
            } else {
                job.round += 1;
                job.phase = Phase::ListRemote;
                job.shard = 0;
                job.after = None;
                job.remote.clear();
            }
            work += 1;
        }
        work
    }

    /// Source side: the chunk's turn came; read it whole, as it is now (a chunk that
    /// is absent now is deleted there). Not the length the listing gave: writes queued
    /// ahead of the copy (a log appending at its end) may have grown the chunk since,
    /// and a copy cut at the old length but stamped with the new version would leave
    /// a hole on the target that no later round sees while the chunk stays busy.
    fn sync_send_start(&mut self, i: u32) {
        let len = self.engine.geometry().chunk_size;
        let o = &mut self.ops[i as usize];
        let op = ChunkOp::Read {
            chunk: o.chunk,
            offset: 0,
            len,
            buf: o.buf.take().expect("sync buffer"),
        };
        if !self.submit(i, op, 0) {
            self.sync_abort(i);
        }
    }

    fn sync_send_read(&mut self, i: u32, r: Result<ChunkInfo, Error>, buf: Option<DmaBuf>) {
        match (r, buf) {
            (Ok(info), Some(b)) if info.version > 0 && info.len > 0 => {
                let len = (info.len as usize).min(b.len());
                self.ops[i as usize].len = len as u32;
                self.sync_send_put(i, info.version, &b.as_slice()[..len]);
            }
            (Ok(_), _) => {
                self.ops[i as usize].len = 0;
                self.sync_send_put(i, 0, &[])
            }
            (Err(_), _) => self.sync_abort(i),
        }
    }

    fn sync_send_put(&mut self, i: u32, version: u64, data: &[u8]) {
        let j = self.ops[i as usize].job as usize;
        let target = self.ops[i as usize].via;
        let Some(job) = self.jobs.get(j) else {
            return self.sync_abort(i);
        };
        let chain_ver = job.chain_ver;
        let Some(ci) = self.peer_conn(target) else {
            return self.sync_abort(i);
        };
        let tag = self.tag(i);
        let chunk = self.ops[i as usize].chunk;
        let data = if version == 0 { &[][..] } else { data };
        self.send(
            ci,
            tag,
            &Msg::SyncPut {
                chain_ver,
                chunk,
                version,
                data,
            },
        );
        self.ops[i as usize].local = Local::Done;
    }

    fn sync_abort(&mut self, i: u32) {
        let j = self.ops[i as usize].job as usize;
        if let Some(job) = self.jobs.get_mut(j) {
            job.in_flight = job.in_flight.saturating_sub(1);
            job.cancelled = true;
        }
        self.finish_queued(i);
    }

    /// Target side: a whole chunk (or its removal) from the syncing predecessor.
    fn on_sync_put(
        &mut self,
        up: (u32, u32, u64),
        chain_ver: u64,
        chunk: ChunkId,
        version: u64,
        data: &[u8],
    ) -> Flow {
        let me = self.me();
        let chain = self.table.chain(self.table.chain_of(&chunk));
        let Some(chain) = chain else {
            self.reply(up, Status::Unavailable, 0, &[]);
            return Flow::Next;
        };
        if chain.version != chain_ver {
            self.reply(up, Status::StaleChain, chain.version, &[]);
            return Flow::Next;
        }
        if chain.state_of(me) != Some(TargetState::Syncing) {
            self.reply(up, Status::NotServing, chain.version, &[]);
            return Flow::Next;
        }
        if data.len() > self.engine.geometry().chunk_size as usize {
            self.reply(up, Status::BadRequest, 0, &[]);
            return Flow::Next;
        }
        let buf = if data.is_empty() {
            None
        } else {
            let Some(mut b) = self.sync_pool.alloc() else {
                return Flow::Stall;
            };
            b.set_len(data.len());
            b.as_mut_slice().copy_from_slice(data);
            Some(b)
        };
        let Some(i) = self.alloc_op(Kind::SyncApply) else {
            return Flow::Stall;
        };
        let o = &mut self.ops[i as usize];
        (o.up, o.chunk, o.version, o.len, o.buf) = (up, chunk, version, data.len() as u32, buf);
        o.shard = 0; // step: 0 = delete next, 1 = write next, 2 = done
        self.enqueue(i);
        Flow::Next
    }

    fn sync_apply_step(&mut self, i: u32, r: Result<ChunkInfo, Error>, buf: Option<DmaBuf>) {
        if let Err(e) = r {
            let up = self.ops[i as usize].up;
            self.reply(up, status_of(&e), 0, &[]);
            if let Some(q) = self.chunks.get_mut(&self.ops[i as usize].chunk) {
                q.version = None;
            }
            return self.finish_queued(i);
        }
        if buf.is_some() {
            self.ops[i as usize].buf = buf;
        }
        let o = &mut self.ops[i as usize];
        let chunk = o.chunk;
        let step = o.shard;
        o.shard += 1;
        match step {
            0 => {
                if !self.submit(i, ChunkOp::Delete { chunk }, 0) {
                    let up = self.ops[i as usize].up;
                    self.reply(up, Status::Busy, 0, &[]);
                    self.finish_queued(i);
                }
            }
            1 if self.ops[i as usize].version > 0 => {
                let o = &mut self.ops[i as usize];
                let (version, len) = (o.version, o.len);
                let op = ChunkOp::Write {
                    chunk,
                    offset: 0,
                    len,
                    buf: o.buf.take().expect("sync data"),
                };
                if !self.submit(i, op, version) {
                    let up = self.ops[i as usize].up;
                    self.reply(up, Status::Busy, 0, &[]);
                    if let Some(q) = self.chunks.get_mut(&chunk) {
                        q.version = Some(0);
                    }
                    self.finish_queued(i);
                }
            }
            _ => {
                let v = self.ops[i as usize].version;
                if let Some(q) = self.chunks.get_mut(&chunk) {
                    q.version = Some(v);
                }
                let up = self.ops[i as usize].up;
                self.reply(up, Status::Ok, v, &[]);
                self.engine.perf().global().inc(m::C_SYNC_APPLIED);
                self.finish_queued(i);
            }
        }
    }

    /// Target side: one page of this node's digests of `chain` in `shard`. When the
    /// shard has more, the reply ends with a cursor entry (version 0) to continue after.
    fn on_list(
        &mut self,
        up: (u32, u32, u64),
        chain: u32,
        shard: u32,
        after: Option<ChunkId>,
    ) -> Flow {
        let shard_count = self.engine.geometry().shard_count;
        if shard >= shard_count {
            self.reply(up, Status::BadRequest, u64::from(shard_count), &[]);
            return Flow::Next;
        }
        // A blocking engine call: listing is rare (a page per shard per resync round)
        // and reads only the in-memory index, and it keeps this path simple.
        let Some(b) = self.client.buffer() else {
            return Flow::Stall;
        };
        let cap = b.capacity() / DIGEST_SIZE;
        let Ok((info, b)) = self.list_blocking(ChunkOp::List {
            shard,
            after,
            buf: b,
        }) else {
            self.reply(up, Status::Io, 0, &[]);
            return Flow::Next;
        };
        let chains = self.table.chains.len() as u32;
        let n = info.len as usize;
        let more = n >= cap;
        let mut out = Vec::with_capacity((n + 1) * DIGEST_SIZE);
        let mut last = None;
        for e in b.as_slice()[..n * DIGEST_SIZE].chunks_exact(DIGEST_SIZE) {
            if let Some(d) = ChunkDigest::decode(e) {
                last = Some(d.chunk);
                if chain_of(&d.chunk, chains) == chain {
                    out.extend_from_slice(e);
                }
            }
        }
        if let (true, Some(chunk)) = (more, last) {
            let cursor = ChunkDigest {
                chunk,
                len: 0,
                version: 0,
                crc: 0,
            };
            let at = out.len();
            out.resize(at + DIGEST_SIZE, 0);
            cursor.encode(&mut out[at..]);
        }
        let v = u64::from(shard_count) | (u64::from(more) << 32);
        self.reply(up, Status::Ok, v, &out);
        Flow::Next
    }

    /// A listing through a second, private engine client, so the main client's
    /// completions are not mixed in.
    fn list_blocking(&self, op: ChunkOp) -> Result<(ChunkInfo, DmaBuf), Error> {
        let mut c = self.engine.client(1);
        let (info, b) = c.call(op)?;
        Ok((info, b.ok_or(Error::Shutdown)?))
    }

    // ---- housekeeping ------------------------------------------------------------------

    /// Keeps a connection to every peer in the table, so the first request to a peer
    /// (or the first after it restarts) does not wait for a handshake.
    fn dial_all(&mut self) {
        self.last_dial = Instant::now();
        let me = self.me();
        let peers: Vec<u32> = self
            .table
            .nodes
            .keys()
            .copied()
            .filter(|&n| n != me)
            .collect();
        for n in peers {
            let _ = self.peer_conn(n);
        }
    }

    fn tick(&mut self) {
        self.last_tick = Instant::now();

        // Handshakes that never finish.
        for i in 0..self.conns.len() {
            if let Some(c) = &mut self.conns[i] {
                if !matches!(c.hs, Hs::Ready) && c.since.elapsed() > HANDSHAKE_TIMEOUT {
                    c.dead = true;
                }
                if c.direct
                    .as_ref()
                    .is_some_and(|d| d.since.elapsed() > DIRECT_TIMEOUT)
                {
                    tracing::warn!(peer = ?c.peer, "a write stopped arriving half way: dropping the connection");
                    c.dead = true;
                }
            }
        }
        self.want_down = true;
        for i in 0..self.ops.len() {
            let o = &self.ops[i];
            if o.kind == Kind::Proxy && o.started.elapsed() > PROXY_TIMEOUT {
                let st = if o.read {
                    Status::Unavailable
                } else {
                    Status::Unknown
                };
                let up = o.up;
                self.reply(up, st, 0, &[]);
                self.free_op(i as u32);
            }
        }
        if self.last_dial.elapsed() >= DIAL_INTERVAL {
            self.dial_all();
        }
        let st = ReplicaStatus {
            node: self.me(),
            listen: self.opts.listen.to_string(),
            table_version: self.table.version,
            peers_connected: self
                .peers
                .iter()
                .filter(|(_, &ci)| matches!(&self.conns[ci as usize], Some(c) if matches!(c.hs, Hs::Ready)))
                .map(|(&n, _)| n)
                .collect(),
            ops_in_flight: self.opts.ops_max - self.free_ops.len(),
            syncs: self
                .jobs
                .iter()
                .map(|j| SyncStatus {
                    chain: j.chain,
                    target: j.target,
                    chain_version: j.chain_ver,
                    round: j.round,
                    phase: match j.phase {
                        Phase::ListRemote => "list-remote",
                        Phase::ListLocal => "list-local",
                        Phase::Send => "send",
                        Phase::Done => "done",
                    },
                    chunks_to_send: j.todo.len().saturating_sub(j.next),
                    chunks_sent: j.chunks_sent,
                    bytes_sent: j.bytes_sent,
                    done: j.phase == Phase::Done,
                })
                .collect(),
        };
        if let Ok(mut s) = self.shared.status.try_lock() {
            *s = st;
        }
    }
}

impl SyncJob {
    fn new(chain: u32, target: u32, chain_ver: u64) -> SyncJob {
        SyncJob {
            chain,
            target,
            chain_ver,
            round: 0,
            phase: Phase::ListRemote,
            shard: 0,
            shards: 1,
            after: None,
            busy: false,
            remote: FxHashMap::default(),
            local: Vec::new(),
            todo: Vec::new(),
            next: 0,
            in_flight: 0,
            chunks_sent: 0,
            bytes_sent: 0,
            cancelled: false,
            reported: false,
        }
    }
}

/// One non-blocking read into `into`: the bytes read; at end of stream or an error
/// the connection is dead, at `WouldBlock` it is drained until the next readiness.
fn read_some(sock: &mut dyn Link, into: &mut [u8], readable: &mut bool, dead: &mut bool) -> usize {
    match sock.read(into) {
        Ok(0) => {
            *dead = true;
            *readable = false;
            0
        }
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            *readable = false;
            0
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
        Err(_) => {
            *dead = true;
            *readable = false;
            0
        }
    }
}

/// Seals the first `len` bytes of `b` (a crc32c per 4 KiB block, which the device
/// path needs) and returns the crc32c of those bytes, derived from the block crcs.
fn seal_and_crc(b: &mut DmaBuf, len: usize) -> u32 {
    b.seal(len, crc32c::crc32c);
    let block = BLOCK_SIZE as usize;
    let full = len / block;
    let mut crc = crc_of_4k_blocks((0..full).map(|k| b.block_crc(k)));
    if len % block != 0 {
        let tail = &b.as_slice()[full * block..len];
        crc = crc32c::crc32c_combine(crc, crc32c::crc32c(tail), tail.len());
    }
    crc
}

fn is_sync_kind(k: Kind) -> bool {
    matches!(k, Kind::SyncSend | Kind::RemoteList | Kind::LocalList)
}

fn status_of(e: &Error) -> Status {
    match e {
        Error::Busy => Status::Busy,
        Error::NoSpace { .. } => Status::NoSpace,
        Error::BadRequest(_) => Status::BadRequest,
        Error::BadChecksum { .. } => Status::Checksum,
        _ => Status::Io,
    }
}
