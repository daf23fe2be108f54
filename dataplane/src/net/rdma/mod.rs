//! The `rdma` transport: a link is an ordered byte stream over one reliable-connected
//! queue pair, so the replication service runs on it unchanged.
//!
//! - **Set-up over TCP.** Each end creates its queue pair, posts its receives and sends
//!   a fixed 64-byte hello (queue pair number, PSN, GID, MTU, receive depth, and where
//!   its receive ring is). Each connects its queue pair to the other's (RTR, RTS) and
//!   then sends one ready byte: no RDMA traffic reaches a queue pair that cannot take
//!   it. The TCP connection stays open: its end tells that the peer process is gone.
//! - **Payload by one-sided RDMA WRITE.** A write copies the bytes into a registered
//!   send slot and writes them with an immediate into the peer's receive ring, at the
//!   next position of the stream (a write never crosses the ring's end). The immediate
//!   (the length) completes one of the peer's empty receives, which tells it that
//!   bytes landed; nothing else is sent per write.
//! - **Credits.** A writer may have at most the ring's size unread at the peer and at
//!   most its receive depth of messages unpolled. The reader gives both back (as
//!   increments in the immediate of an empty message) once half of either is due. Data
//!   leaves one receive free for a credit message, and only a credit that gives back
//!   receives may take that last one: so when both ends are out of receives, each has
//!   one coming back, and the two never wait on each other.
//! - **Isolation.** Each link has its own protection domain: the ring (the only memory
//!   a peer may write) and the send slots (local only) are reachable through that
//!   link's queue pair alone, so a peer cannot touch another link's buffers.
//! - **Events.** Both the TCP socket and the queue pair's completion channel are
//!   registered under the link's token. Before saying `WouldBlock` a link arms its
//!   channel, so the next completion (bytes, credits, a finished write) wakes the poll.
//! - **Clients stay on TCP.** The listening end waits for the dialer's first bytes: a
//!   connection that does not start with the hello's magic is a client (a tool, a
//!   benchmark) and is served as plain TCP on the same port. Its queue pair has no
//!   buffers: those are allocated only for a peer.
//! - **Failure.** An error completion (the peer's queue pair is gone, retries ran out)
//!   or a closed TCP connection makes the link fail; the service then drops it and
//!   dials again, as it does for TCP.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use mio::event::Source;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use spool_ffi::verbs::rc::{
    Access, Completion, Domain, MemoryRegion, ProtectionDomain, QueuePair, RemoteRegion, SendOp,
};
use spool_hugepages::{DmaBuf, DmaPool, PagePolicy};

use super::transport::{tune, Link, Listener, Transport};
use crate::Error;
use credits::{Credits, CREDIT_BYTES_BITS, CREDIT_MSGS_MAX};

mod credits;

/// Sizes of one link's buffers. Memory per link: `ring_bytes + slot_bytes * slots`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RdmaOptions {
    /// The receive ring the peer writes into: at most this much sent and unread.
    pub ring_bytes: usize,
    /// One write's largest payload (a registered send slot).
    pub slot_bytes: usize,
    /// Send slots: writes in flight at once.
    pub slots: usize,
    /// Receives posted: messages in flight at once.
    pub recv_depth: u32,
}

impl Default for RdmaOptions {
    fn default() -> Self {
        RdmaOptions {
            ring_bytes: 4 << 20,
            slot_bytes: 256 << 10,
            slots: 8,
            recv_depth: 128,
        }
    }
}

/// The ring's length must fit a credit's bytes increment.
const RING_BYTES_MAX: usize = 4 << 20;
const _: () = assert!(RING_BYTES_MAX < 1 << CREDIT_BYTES_BITS);
/// With fewer receives the credit threshold (half) would be one message, and a credit
/// message would itself make the next one due: the two ends would trade credits for
/// ever.
const RECV_DEPTH_MIN: u32 = 4;

impl RdmaOptions {
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: String| Err(Error::Unsupported(format!("rdma transport: {what}")));
        if !(4096..=RING_BYTES_MAX).contains(&self.ring_bytes) || self.ring_bytes % 4096 != 0 {
            return bad(format!(
                "ring_bytes {} not a multiple of 4096 in 4096..={RING_BYTES_MAX}",
                self.ring_bytes
            ));
        }
        if self.slot_bytes == 0 || self.slot_bytes % 4096 != 0 || self.slot_bytes > self.ring_bytes
        {
            return bad(format!(
                "slot_bytes {} not a multiple of 4096 up to ring_bytes",
                self.slot_bytes
            ));
        }
        if !(1..=1024).contains(&self.slots) {
            return bad(format!("slots {} not in 1..=1024", self.slots));
        }
        if !(RECV_DEPTH_MIN..=CREDIT_MSGS_MAX).contains(&self.recv_depth) {
            return bad(format!(
                "recv_depth {} not in {RECV_DEPTH_MIN}..={CREDIT_MSGS_MAX}",
                self.recv_depth
            ));
        }
        Ok(())
    }
}

/// RDMA through one device (an HCA port, or soft-RoCE's rxe).
#[derive(Debug)]
pub struct Rdma {
    domain: Arc<Domain>,
    gid_index: u8,
    opts: RdmaOptions,
}

impl Rdma {
    /// Opens `device`. Without `gid_index`, uses port 1's first RoCE v2 GID that holds
    /// an IPv4 address.
    pub fn open(device: &str, gid_index: Option<u8>, opts: RdmaOptions) -> Result<Self, Error> {
        opts.validate()?;
        let gid_index = match gid_index {
            Some(i) => i,
            None => {
                let devs = spool_ffi::verbs::devices()?;
                let dev = devs.iter().find(|d| d.name == device).ok_or_else(|| {
                    let names: Vec<&str> = devs.iter().map(|d| d.name.as_str()).collect();
                    Error::Unsupported(format!(
                        "no RDMA device {device} (devices: {names:?}; see `rdma link`)"
                    ))
                })?;
                let gid = dev
                    .ports
                    .first()
                    .and_then(|p| p.gids.iter().find(|g| g.ipv4().is_some()))
                    .ok_or_else(|| {
                        Error::Unsupported(format!(
                            "RDMA device {device} has no IPv4 GID on port 1 (is its netdev up with an address?)"
                        ))
                    })?;
                u8::try_from(gid.index).map_err(|_| {
                    Error::Unsupported(format!("GID index {} out of range", gid.index))
                })?
            }
        };
        Ok(Rdma {
            domain: Domain::open(device)?,
            gid_index,
            opts,
        })
    }

    fn link(&self, tcp: mio::net::TcpStream, accepted: bool) -> io::Result<Box<dyn Link>> {
        RdmaLink::new(self, tcp, accepted)
            .map(|l| Box::new(l) as Box<dyn Link>)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

impl Transport for Rdma {
    fn name(&self) -> &'static str {
        "rdma"
    }
    fn listen(&self, addr: SocketAddr) -> io::Result<Box<dyn Listener>> {
        let tcp = super::transport::bind(addr)?;
        Ok(Box::new(RdmaListener {
            tcp,
            rdma: Rdma {
                domain: Arc::clone(&self.domain),
                gid_index: self.gid_index,
                opts: self.opts,
            },
        }))
    }
    fn dial(&self, addr: SocketAddr) -> io::Result<Box<dyn Link>> {
        let tcp = mio::net::TcpStream::connect(addr)?;
        tune(&tcp)?;
        self.link(tcp, false)
    }
}

/// Accepts TCP connections and makes each a link.
#[derive(Debug)]
struct RdmaListener {
    tcp: mio::net::TcpListener,
    rdma: Rdma,
}

impl Listener for RdmaListener {
    fn accept(&mut self) -> io::Result<Box<dyn Link>> {
        // A connection whose link cannot be made is dropped, and the next one taken:
        // stopping here would leave the backlog unseen until another connection came.
        loop {
            let (tcp, from) = self.tcp.accept()?;
            match tune(&tcp).and_then(|()| self.rdma.link(tcp, true)) {
                Ok(link) => return Ok(link),
                Err(e) => tracing::warn!(%from, error = %e, "rdma: dropping a connection"),
            }
        }
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

impl Source for RdmaListener {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.tcp.register(r, t, i)
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.tcp.reregister(r, t, i)
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        self.tcp.deregister(r)
    }
}

const HELLO_LEN: usize = 64;
const HELLO_MAGIC: &[u8; 4] = b"SPRD";
const HELLO_VERSION: u16 = 1;
const READY: u8 = 0x5a;

/// What each end tells the other at set-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    qpn: u32,
    psn: u32,
    gid: [u8; 16],
    mtu: u32,
    recv_depth: u32,
    ring: RemoteRegion,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(HELLO_MAGIC);
        b[4..6].copy_from_slice(&HELLO_VERSION.to_le_bytes());
        b[8..12].copy_from_slice(&self.qpn.to_le_bytes());
        b[12..16].copy_from_slice(&self.psn.to_le_bytes());
        b[16..32].copy_from_slice(&self.gid);
        b[32..36].copy_from_slice(&self.mtu.to_le_bytes());
        b[36..40].copy_from_slice(&self.recv_depth.to_le_bytes());
        b[40..48].copy_from_slice(&self.ring.addr.to_le_bytes());
        b[48..56].copy_from_slice(&self.ring.len.to_le_bytes());
        b[56..60].copy_from_slice(&self.ring.rkey.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, String> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if &b[0..4] != HELLO_MAGIC {
            return Err("not a Spool rdma hello (is the peer on the tcp transport?)".into());
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != HELLO_VERSION {
            return Err(format!(
                "rdma hello version {version}, this build speaks {HELLO_VERSION}"
            ));
        }
        let h = Hello {
            qpn: u32_at(8),
            psn: u32_at(12),
            gid: b[16..32].try_into().expect("16 bytes"),
            mtu: u32_at(32),
            recv_depth: u32_at(36),
            ring: RemoteRegion {
                addr: u64_at(40),
                len: u64_at(48),
                rkey: u32_at(56),
            },
        };
        if !(1..=5).contains(&h.mtu) {
            return Err(format!("rdma hello: MTU code {} not in 1..=5", h.mtu));
        }
        if !(RECV_DEPTH_MIN..=CREDIT_MSGS_MAX).contains(&h.recv_depth) {
            return Err(format!("rdma hello: receive depth {}", h.recv_depth));
        }
        if !(4096..=RING_BYTES_MAX as u64).contains(&h.ring.len)
            || h.ring.addr.checked_add(h.ring.len).is_none()
        {
            return Err(format!(
                "rdma hello: ring of {} bytes at {:#x}",
                h.ring.len, h.ring.addr
            ));
        }
        if h.qpn >> 24 != 0 || h.psn >> 24 != 0 {
            return Err("rdma hello: queue pair number or PSN over 24 bits".into());
        }
        Ok(h)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Accepted: reading the dialer's first bytes (into `peer_hello`).
    Sniff {
        got: usize,
    },
    /// A client on plain TCP; `peer_hello[pos..len]` are its first bytes, unread.
    Plain {
        pos: usize,
        len: usize,
    },
    /// Exchanging hellos: bytes of ours sent, bytes of theirs received.
    Hello {
        sent: usize,
        got: usize,
    },
    /// Connected our queue pair; our ready byte sent or not, waiting for theirs.
    AwaitReady {
        sent: bool,
    },
    Ready,
}

/// A peer link's receive ring and free send slots.
#[derive(Debug)]
struct Buffers {
    ring: DmaBuf,
    free_slots: Vec<DmaBuf>,
}

/// One link: a queue pair, its receive ring and send slots, and the TCP connection.
#[derive(Debug)]
pub struct RdmaLink {
    // The queue pair first: it is destroyed (and its work flushed) before the ring and
    // the slots it may still be writing or reading go back.
    qp: QueuePair,
    bufs: Option<Buffers>,
    pd: Arc<ProtectionDomain>,
    opts: RdmaOptions,
    tcp: mio::net::TcpStream,
    state: State,
    hello: [u8; HELLO_LEN],
    peer_hello: [u8; HELLO_LEN],
    /// Why the link failed; every later call reports it.
    failed: Option<String>,
    /// The peer closed its end (after everything it wrote was read).
    eof: bool,
    /// The peer's ring (from its hello).
    peer_ring: RemoteRegion,
    credits: Credits,
    done: Vec<Completion>,
}

impl RdmaLink {
    fn new(rdma: &Rdma, tcp: mio::net::TcpStream, accepted: bool) -> Result<Self, Error> {
        let o = rdma.opts;
        // The send queue holds data writes (one per slot) and credit messages (at most
        // one per peer receive); the receive queue our posted receives.
        let depth = o.slots as u32 + o.recv_depth;
        let psn = rand::random::<u32>() & 0xff_ffff;
        let pd = ProtectionDomain::new(&rdma.domain)?;
        let mut qp = QueuePair::new(&pd, Vec::new(), depth, rdma.gid_index, psn)?;
        for _ in 0..o.recv_depth {
            qp.post_recv(None).map_err(|(e, _)| e)?;
        }
        qp.arm()?;
        let mut link = RdmaLink {
            qp,
            bufs: None,
            pd,
            opts: o,
            tcp,
            state: State::Sniff { got: 0 },
            hello: [0; HELLO_LEN],
            peer_hello: [0; HELLO_LEN],
            failed: None,
            eof: false,
            peer_ring: RemoteRegion {
                addr: 0,
                len: 0,
                rkey: 0,
            },
            credits: Credits::new(o.ring_bytes as u64, o.recv_depth),
            done: Vec::with_capacity(64),
        };
        if !accepted {
            link.set_up_buffers()?;
            link.state = State::Hello { sent: 0, got: 0 };
        }
        Ok(link)
    }

    /// Allocates and registers the ring and the send slots, and writes our hello.
    fn set_up_buffers(&mut self) -> Result<(), Error> {
        let o = self.opts;
        let ring_pool = DmaPool::new("rdma ring", o.ring_bytes, 1, PagePolicy::PreferHuge)?;
        let slot_pool = DmaPool::new("rdma send", o.slot_bytes, o.slots, PagePolicy::PreferHuge)?;
        let ring_region = MemoryRegion::register(&self.pd, &ring_pool, Access::RemoteWrite)?;
        let slot_region = MemoryRegion::register(&self.pd, &slot_pool, Access::Local)?;
        let ring = ring_pool.alloc().expect("a fresh one-buffer pool");
        let ring_remote = ring_region.remote_of(&ring)?;
        let free_slots: Vec<DmaBuf> = (0..o.slots)
            .map(|_| slot_pool.alloc().expect("a fresh pool of `slots` buffers"))
            .collect();
        self.qp.add_region(ring_region)?;
        self.qp.add_region(slot_region)?;
        self.bufs = Some(Buffers { ring, free_slots });
        let ep = self.qp.endpoint()?;
        self.hello = Hello {
            qpn: ep.qpn,
            psn: ep.psn,
            gid: ep.gid,
            mtu: ep.mtu,
            recv_depth: o.recv_depth,
            ring: ring_remote,
        }
        .encode();
        Ok(())
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            tracing::warn!(reason = %why, "rdma link failed");
            self.failed = Some(why);
        }
    }

    fn error(&self) -> io::Error {
        let why = self.failed.as_deref().unwrap_or("unknown");
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("rdma link: {why}"),
        )
    }

    /// Moves the set-up along as far as the TCP connection allows.
    fn handshake(&mut self) {
        loop {
            let step = match self.state {
                State::Sniff { got } if got < HELLO_MAGIC.len() => {
                    match self.tcp.read(&mut self.peer_hello[got..HELLO_MAGIC.len()]) {
                        Ok(0) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                        Ok(n) => Ok(State::Sniff { got: got + n }),
                        Err(e) => Err(e),
                    }
                }
                State::Sniff { got } if &self.peer_hello[..got] != HELLO_MAGIC => {
                    Ok(State::Plain { pos: 0, len: got })
                }
                State::Sniff { got } => match self.set_up_buffers() {
                    Ok(()) => Ok(State::Hello { sent: 0, got }),
                    Err(e) => return self.fail(format!("set-up: {e}")),
                },
                State::Plain { .. } | State::Ready => return,
                State::Hello { sent, got } if sent < HELLO_LEN => {
                    match self.tcp.write(&self.hello[sent..]) {
                        Ok(n) => Ok(State::Hello {
                            sent: sent + n,
                            got,
                        }),
                        Err(e) => Err(e),
                    }
                }
                State::Hello { sent, got } if got < HELLO_LEN => {
                    match self.tcp.read(&mut self.peer_hello[got..]) {
                        Ok(0) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                        Ok(n) => Ok(State::Hello { sent, got: got + n }),
                        Err(e) => Err(e),
                    }
                }
                State::Hello { .. } => match self.connect() {
                    Ok(()) => Ok(State::AwaitReady { sent: false }),
                    Err(why) => return self.fail(why),
                },
                State::AwaitReady { sent: false } => match self.tcp.write(&[READY]) {
                    Ok(1) => Ok(State::AwaitReady { sent: true }),
                    Ok(_) => Err(io::Error::from(io::ErrorKind::WriteZero)),
                    Err(e) => Err(e),
                },
                State::AwaitReady { sent: true } => {
                    let mut b = [0u8; 1];
                    match self.tcp.read(&mut b) {
                        Ok(1) if b[0] == READY => Ok(State::Ready),
                        Ok(0) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                        Ok(_) => return self.fail(format!("set-up: bad ready byte {:#x}", b[0])),
                        Err(e) => Err(e),
                    }
                }
            };
            match step {
                Ok(s) => self.state = s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(format!("set-up over TCP: {e}")),
            }
        }
    }

    /// Connects our queue pair to the peer's from its hello.
    fn connect(&mut self) -> Result<(), String> {
        let h = Hello::decode(&self.peer_hello)?;
        let ep = spool_ffi::verbs::rc::Endpoint {
            qpn: h.qpn,
            psn: h.psn,
            gid: h.gid,
            mtu: h.mtu,
        };
        self.qp.connect(&ep).map_err(|e| e.to_string())?;
        self.peer_ring = h.ring;
        self.credits.connect(h.ring.len, h.recv_depth);
        Ok(())
    }

    /// Handles finished work until none is left; gives credits back when due.
    fn reap(&mut self) {
        let mut done = std::mem::take(&mut self.done);
        while self.failed.is_none() && self.qp.poll(&mut done) > 0 {
            for c in done.drain(..) {
                if let Err(why) = self.on_completion(c) {
                    self.fail(why);
                }
            }
        }
        done.clear();
        self.done = done;
        self.give_credits();
    }

    fn on_completion(&mut self, c: Completion) -> Result<(), String> {
        if let Some(e) = c.error {
            return Err(format!("work request failed: {e}"));
        }
        if !c.recv {
            // A finished write gives its slot back; a credit message has none.
            if let (Some(b), Some(bufs)) = (c.buf, self.bufs.as_mut()) {
                bufs.free_slots.push(b);
            }
            return Ok(());
        }
        // Repost first: the peer may use the receive as soon as credit says so.
        self.qp.post_recv(None).map_err(|(e, _)| e.to_string())?;
        let imm = c.imm.ok_or("a message without an immediate")?;
        self.credits.received(imm, c.byte_len)
    }

    /// Gives back receives and ring bytes once half of either is due.
    fn give_credits(&mut self) {
        if self.failed.is_some() || self.state != State::Ready {
            return;
        }
        let Some(imm) = self.credits.credit_due() else {
            return;
        };
        match self.qp.post_send(None, 0, SendOp::Send, Some(imm)) {
            Ok(_) => self.credits.credited(imm),
            // Sends are full: the next completion frees one and reaps again.
            Err((spool_ffi::Error::QueuePairFull { .. }, _)) => {}
            Err((e, _)) => self.fail(format!("credit message: {e}")),
        }
    }

    /// Everything due before reading or writing: set-up, completions, credits.
    fn pump(&mut self) -> io::Result<()> {
        if self.state != State::Ready {
            self.handshake();
        }
        if let State::Plain { .. } = self.state {
            return Ok(());
        }
        self.reap();
        match self.failed {
            Some(_) => Err(self.error()),
            None => Ok(()),
        }
    }

    /// Asks for an event at the next completion, then catches what came before. Only
    /// a read consumes the events already raised (`drain`): a write that did would
    /// swallow the wakeup of bytes it reaped, whose reader waits for an event.
    fn arm(&mut self, drain: bool) -> io::Result<()> {
        let r = if drain {
            self.qp.arm()
        } else {
            self.qp.notify()
        };
        if let Err(e) = r {
            self.fail(format!("arming the completion channel: {e}"));
        }
        self.pump()
    }

    /// Whether the peer closed its TCP end; at most one syscall.
    fn peer_closed(&mut self) -> io::Result<bool> {
        let mut b = [0u8; 1];
        match self.tcp.read(&mut b) {
            Ok(0) => Ok(true),
            Ok(_) => {
                self.fail("unexpected bytes on the TCP connection".into());
                Err(self.error())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            Err(e) => {
                self.fail(format!("TCP connection: {e}"));
                Err(self.error())
            }
        }
    }
}

impl Read for RdmaLink {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.pump()?;
        if let State::Plain { pos, len } = self.state {
            if pos < len {
                let n = out.len().min(len - pos);
                out[..n].copy_from_slice(&self.peer_hello[pos..pos + n]);
                self.state = State::Plain { pos: pos + n, len };
                return Ok(n);
            }
            return self.tcp.read(out);
        }
        if self.credits.unread().1 == 0 {
            self.arm(true)?;
        }
        if self.credits.unread().1 == 0
            && !self.eof
            && self.state == State::Ready
            && self.peer_closed()?
        {
            // Bytes the peer wrote before it closed may have landed since the reap.
            self.eof = true;
            self.reap();
        }
        let (pos, avail) = self.credits.unread();
        if avail == 0 {
            if self.eof {
                return Ok(0);
            }
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = (out.len() as u64).min(avail) as usize;
        let pos = pos as usize;
        let first = n.min(self.opts.ring_bytes - pos);
        let ring = &self
            .bufs
            .as_ref()
            .expect("a ready link has its buffers")
            .ring;
        ring.copy_out(pos, &mut out[..first]);
        ring.copy_out(0, &mut out[first..n]);
        self.credits.consumed(n as u64);
        self.give_credits();
        Ok(n)
    }
}

impl Write for RdmaLink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.pump()?;
        if let State::Plain { .. } = self.state {
            return self.tcp.write(data);
        }
        let mut done = 0;
        while self.state == State::Ready && done < data.len() {
            let want = ((data.len() - done) as u64).min(self.opts.slot_bytes as u64);
            let Some((pos, n)) = self.credits.next_write(want) else {
                break;
            };
            let n = n as usize;
            let bufs = self.bufs.as_mut().expect("a ready link has its buffers");
            let Some(mut slot) = bufs.free_slots.pop() else {
                break;
            };
            slot.as_mut_slice()[..n].copy_from_slice(&data[done..done + n]);
            let op = SendOp::Write(self.peer_ring, pos);
            match self.qp.post_send(Some(slot), n as u32, op, Some(n as u32)) {
                Ok(_) => {
                    self.credits.wrote(n as u64);
                    done += n;
                }
                Err((e, slot)) => {
                    bufs.free_slots.extend(slot);
                    if matches!(e, spool_ffi::Error::QueuePairFull { .. }) {
                        break;
                    }
                    self.fail(format!("RDMA write: {e}"));
                    return Err(self.error());
                }
            }
        }
        if done > 0 {
            return Ok(done);
        }
        if data.is_empty() {
            return Ok(0);
        }
        self.arm(false)?;
        if self.state == State::Ready && self.peer_closed()? {
            self.fail("the peer closed the connection".into());
            return Err(self.error());
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for RdmaLink {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.tcp.register(r, t, i)?;
        SourceFd(&self.qp.fd()).register(r, t, Interest::READABLE)
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.tcp.reregister(r, t, i)?;
        SourceFd(&self.qp.fd()).reregister(r, t, Interest::READABLE)
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        self.tcp.deregister(r)?;
        SourceFd(&self.qp.fd()).deregister(r)
    }
}

impl Link for RdmaLink {}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            qpn: 0x12,
            psn: 0xabcdef,
            gid: [7; 16],
            mtu: 3,
            recv_depth: 128,
            ring: RemoteRegion {
                addr: 0x7f00_0000_0000,
                len: 4 << 20,
                rkey: 0x55,
            },
        }
    }

    #[test]
    fn hellos_round_trip_and_bad_ones_are_refused() {
        let h = hello();
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        let mut b = h.encode();
        b[0] = b'X';
        assert!(Hello::decode(&b).unwrap_err().contains("tcp transport"));
        let mut b = h.encode();
        b[4] = 9;
        assert!(Hello::decode(&b).unwrap_err().contains("version 9"));
        for bad in [
            Hello { mtu: 0, ..h },
            Hello { mtu: 6, ..h },
            Hello { recv_depth: 3, ..h },
            Hello {
                recv_depth: 256,
                ..h
            },
            Hello { qpn: 1 << 24, ..h },
            Hello {
                ring: RemoteRegion { len: 1, ..h.ring },
                ..h
            },
            Hello {
                ring: RemoteRegion {
                    len: 8 << 20,
                    ..h.ring
                },
                ..h
            },
            Hello {
                ring: RemoteRegion {
                    addr: u64::MAX - 4096,
                    ..h.ring
                },
                ..h
            },
        ] {
            assert!(Hello::decode(&bad.encode()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn options_are_validated_and_the_default_fits_the_credit_encoding() {
        RdmaOptions::default().validate().unwrap();
        let d = RdmaOptions::default();
        assert!(d.ring_bytes < 1 << CREDIT_BYTES_BITS);
        for bad in [
            RdmaOptions {
                ring_bytes: 8 << 20,
                ..d
            },
            RdmaOptions {
                ring_bytes: 5000,
                ..d
            },
            RdmaOptions {
                slot_bytes: 8 << 20,
                ..d
            },
            RdmaOptions { slots: 0, ..d },
            RdmaOptions { recv_depth: 3, ..d },
            RdmaOptions {
                recv_depth: 256,
                ..d
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
