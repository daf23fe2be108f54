//! One conformance suite for the `Transport` trait, run against every backend: `tcp`
//! on the host, and `rdma` over soft-RoCE in the VM lab's guest (this host has no RDMA
//! device). The links are driven the way the replication service drives them: reads
//! until `WouldBlock`, then nothing until an event on the link's token, so a backend
//! that fails to wake its owner stalls the test instead of passing by luck.

#[path = "common/vmlab.rs"]
mod vmlab;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use rand::{Rng, SeedableRng};
use spool_dataplane::net::rdma::{Rdma, RdmaOptions};
use spool_dataplane::net::transport::{Link, Listener, Tcp, Transport};
use vmlab::{add_rxe, in_guest, run_in_guest};

/// A wakeup that does not come within this long is a missed event.
const EVENT_WAIT: Duration = Duration::from_secs(10);

/// The byte at `pos` of end `e`'s stream: a hash, so a misplaced run shows.
fn byte(e: usize, pos: u64) -> u8 {
    ((pos.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8) ^ (e as u8 * 0x5b)
}

struct End {
    link: Box<dyn Link>,
    readable: bool,
    writable: bool,
    sent: u64,
    got: u64,
}

struct Pair {
    poll: Poll,
    events: Events,
    ends: [End; 2],
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A dialed link (end 0) and the link it was accepted as (end 1).
fn connect(t: &dyn Transport) -> Pair {
    let mut poll = Poll::new().unwrap();
    let mut listener = t.listen(loopback()).unwrap();
    poll.registry()
        .register(&mut *listener, Token(9), Interest::READABLE)
        .unwrap();
    let mut a = t.dial(listener.local_addr().unwrap()).unwrap();
    let mut events = Events::with_capacity(64);
    let mut b = accept(&mut poll, &mut events, &mut *listener);
    let flags = Interest::READABLE | Interest::WRITABLE;
    poll.registry().register(&mut *a, Token(0), flags).unwrap();
    poll.registry().register(&mut *b, Token(1), flags).unwrap();
    let end = |link| End {
        link,
        readable: true,
        writable: true,
        sent: 0,
        got: 0,
    };
    Pair {
        poll,
        events,
        ends: [end(a), end(b)],
    }
}

fn accept(poll: &mut Poll, events: &mut Events, listener: &mut dyn Listener) -> Box<dyn Link> {
    let t0 = Instant::now();
    loop {
        match listener.accept() {
            Ok(l) => return l,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(t0.elapsed() < EVENT_WAIT, "no connection to accept");
                poll.poll(events, Some(Duration::from_millis(100))).unwrap();
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

impl Pair {
    /// Waits for events; marks their ends ready for both directions (as the service
    /// does). Panics if none comes within `EVENT_WAIT`.
    fn wait(&mut self, why: &str) {
        self.poll.poll(&mut self.events, Some(EVENT_WAIT)).unwrap();
        if self.events.is_empty() {
            let state: Vec<String> = self.ends.iter().map(|e| format!("{:?}", e.link)).collect();
            panic!("no event within {EVENT_WAIT:?}: {why}; links: {state:#?}");
        }
        for ev in self.events.iter() {
            if let Some(e) = self.ends.get_mut(ev.token().0) {
                e.readable = true;
                e.writable = true;
            }
        }
    }

    /// Writes up to `len` more bytes of end `e`'s stream; returns how many went.
    fn write(&mut self, e: usize, len: usize, scratch: &mut Vec<u8>) -> usize {
        let end = &mut self.ends[e];
        if !end.writable || len == 0 {
            return 0;
        }
        scratch.clear();
        scratch.extend((0..len as u64).map(|i| byte(e, end.sent + i)));
        match end.link.write(scratch) {
            Ok(n) => {
                assert!(n > 0 && n <= len, "write of {len} returned {n}");
                end.sent += n as u64;
                n
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                end.writable = false;
                0
            }
            Err(err) => panic!("end {e} write failed: {err}"),
        }
    }

    /// Reads into `buf` and checks the bytes against the peer's stream.
    fn read(&mut self, e: usize, buf: &mut [u8]) -> usize {
        let end = &mut self.ends[e];
        if !end.readable {
            return 0;
        }
        match end.link.read(buf) {
            Ok(0) => panic!("end {e}: unexpected end of stream after {} bytes", end.got),
            Ok(n) => {
                for (i, &b) in buf[..n].iter().enumerate() {
                    let pos = end.got + i as u64;
                    assert_eq!(b, byte(1 - e, pos), "end {e}: wrong byte at {pos}");
                }
                end.got += n as u64;
                n
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                end.readable = false;
                0
            }
            Err(err) => panic!("end {e} read failed: {err}"),
        }
    }
}

/// Both ends send until `total` bytes of their streams are out, in writes and reads of
/// random sizes, and read until they have the peer's `total`; checks every byte.
fn exchange(p: &mut Pair, total: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut scratch, mut buf) = (Vec::new(), vec![0u8; 300 << 10]);
    while p.ends.iter().any(|e| e.got < total) {
        let mut progress = 0;
        for e in 0..2 {
            let want = (total - p.ends[e].sent).min(rng.gen_range(1..=300 << 10)) as usize;
            progress += p.write(e, want, &mut scratch);
            let n = rng.gen_range(1..=buf.len());
            progress += p.read(e, &mut buf[..n]);
        }
        if progress == 0 {
            p.wait("both directions stalled");
        }
    }
}

/// Every byte arrives, in order, both ways at once.
fn ordered_bytes_both_ways(t: &dyn Transport, total: u64) {
    let mut p = connect(t);
    let t0 = Instant::now();
    exchange(&mut p, total, 7);
    let secs = t0.elapsed().as_secs_f64();
    println!("{}: {} MiB each way in {secs:.2} s", t.name(), total >> 20);
}

/// A reader that stops holds its writer back (a bounded amount is accepted), and
/// once it reads again the writer is woken and nothing is lost.
fn a_stopped_reader_holds_the_writer_back(t: &dyn Transport) {
    let mut p = connect(t);
    exchange(&mut p, 1, 1); // the set-up is done
    let mut scratch = Vec::new();
    // End 0 writes while it is woken; end 1 does not read.
    let held = loop {
        if p.write(0, 1 << 20, &mut scratch) == 0 {
            p.poll
                .poll(&mut p.events, Some(Duration::from_millis(500)))
                .unwrap();
            let mut woke = false;
            for ev in p.events.iter() {
                let e = &mut p.ends[ev.token().0];
                (e.readable, e.writable) = (true, true);
                woke |= ev.token() == Token(0);
            }
            if !woke {
                break p.ends[0].sent;
            }
        }
        assert!(
            p.ends[0].sent < 256 << 20,
            "a reader that never reads let {} bytes through",
            p.ends[0].sent
        );
    };
    // Reading again wakes the writer, which goes on; everything arrives in order.
    let total = held * 3;
    let mut buf = vec![0u8; 1 << 20];
    while p.ends[1].got < total {
        let mut progress = p.read(1, &mut buf);
        let want = (total - p.ends[0].sent).min(1 << 20) as usize;
        progress += p.write(0, want, &mut scratch);
        if progress == 0 {
            p.wait("the writer was not woken when its reader read again");
        }
    }
    println!("{}: held back after {held} bytes unread", t.name());
}

/// An end that goes away is seen by the other: its reads end or fail, or its writes
/// fail, within a bounded time; nothing waits for ever.
fn a_closed_end_is_seen_by_the_other(t: &dyn Transport) {
    for gone in [0, 1] {
        let mut p = connect(t);
        exchange(&mut p, 100_000, 3);
        let Pair {
            mut poll,
            mut events,
            ends,
        } = p;
        let [a, b] = ends;
        let mut survivor = if gone == 0 {
            drop(a);
            b
        } else {
            drop(b);
            a
        };
        let t0 = Instant::now();
        loop {
            let w = survivor.link.write(&[0u8; 1024]);
            let r = survivor.link.read(&mut [0u8; 1024]);
            let ended = |r: &io::Result<usize>, read: bool| match r {
                Ok(0) => read,
                Ok(_) => false,
                Err(e) => e.kind() != io::ErrorKind::WouldBlock,
            };
            if ended(&w, false) || ended(&r, true) {
                break;
            }
            if let Ok(n) = r {
                panic!("read {n} bytes from a closed end");
            }
            assert!(
                t0.elapsed() < EVENT_WAIT,
                "end {} never saw its peer go",
                1 - gone
            );
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .unwrap();
        }
    }
}

/// Dialing an address where nothing listens fails on the link's first use.
fn dialing_nothing_fails(t: &dyn Transport) {
    let port = std::net::TcpListener::bind(loopback())
        .unwrap()
        .local_addr()
        .unwrap();
    let mut poll = Poll::new().unwrap();
    let mut link = t.dial(port).unwrap();
    poll.registry()
        .register(
            &mut *link,
            Token(0),
            Interest::READABLE | Interest::WRITABLE,
        )
        .unwrap();
    let mut events = Events::with_capacity(8);
    let t0 = Instant::now();
    loop {
        let r = link.write(b"hello").and_then(|_| link.read(&mut [0u8; 8]));
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok(0) | Err(_) => break,
            Ok(n) => panic!("read {n} bytes from nowhere"),
        }
        assert!(t0.elapsed() < EVENT_WAIT, "a dial to nothing did not fail");
        poll.poll(&mut events, Some(Duration::from_millis(200)))
            .unwrap();
    }
    // Listening twice on one address fails at once.
    let l = t.listen(loopback()).unwrap();
    let err = t.listen(l.local_addr().unwrap()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
}

/// A plain TCP client that connected to a listener of `t` and sent `first`, and the
/// link it was accepted as (registered under token 1).
fn raw_client(
    t: &dyn Transport,
    first: &[u8],
) -> (Poll, Events, std::net::TcpStream, Box<dyn Link>) {
    let mut poll = Poll::new().unwrap();
    let mut listener = t.listen(loopback()).unwrap();
    poll.registry()
        .register(&mut *listener, Token(9), Interest::READABLE)
        .unwrap();
    let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client.set_read_timeout(Some(EVENT_WAIT)).unwrap();
    client.write_all(first).unwrap();
    let mut events = Events::with_capacity(8);
    let mut link = accept(&mut poll, &mut events, &mut *listener);
    let flags = Interest::READABLE | Interest::WRITABLE;
    poll.registry()
        .register(&mut *link, Token(1), flags)
        .unwrap();
    (poll, events, client, link)
}

/// A client speaking plain TCP to a listener's port is served as a byte stream both
/// ways (the rdma transport keeps clients, tools and benchmarks, on TCP).
fn a_plain_tcp_client_is_served(t: &dyn Transport) {
    let hello = b"SPOOl, but not the rdma hello: a client frame";
    let (mut poll, mut events, mut client, mut link) = raw_client(t, hello);
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < hello.len() {
        let mut buf = [0u8; 7];
        match link.read(&mut buf) {
            Ok(0) => panic!("end of stream after {} bytes", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(t0.elapsed() < EVENT_WAIT, "the client's bytes never came");
                poll.poll(&mut events, Some(Duration::from_millis(200)))
                    .unwrap();
            }
            Err(e) => panic!("read: {e}"),
        }
    }
    assert_eq!(got, hello);
    let reply = b"served on the same port";
    let mut sent = 0;
    while sent < reply.len() {
        match link.write(&reply[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                poll.poll(&mut events, Some(Duration::from_millis(200)))
                    .unwrap();
            }
            Err(e) => panic!("write: {e}"),
        }
        assert!(t0.elapsed() < EVENT_WAIT, "the reply never went");
    }
    let mut back = [0u8; 23];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, reply);
}

fn suite(t: &dyn Transport, total: u64) {
    a_plain_tcp_client_is_served(t);
    ordered_bytes_both_ways(t, total);
    a_stopped_reader_holds_the_writer_back(t);
    a_closed_end_is_seen_by_the_other(t);
    dialing_nothing_fails(t);
}

#[test]
fn tcp_passes_the_transport_conformance_suite() {
    suite(&Tcp, 64 << 20);
}

/// Small rings and few slots and receives: the stream wraps and the credits run out
/// and come back thousands of times.
fn rdma_tight() -> RdmaOptions {
    RdmaOptions {
        ring_bytes: 64 << 10,
        slot_bytes: 16 << 10,
        slots: 2,
        recv_depth: 4,
    }
}

/// A dialer that starts like an rdma peer and then sends a bad hello is refused with
/// an error that says why (never a panic, never a hang).
fn a_bad_rdma_hello_is_refused(t: &dyn Transport) {
    let mut bad = [0xffu8; 64];
    bad[..4].copy_from_slice(b"SPRD");
    let (mut poll, mut events, _client, mut link) = raw_client(t, &bad);
    let t0 = Instant::now();
    let err = loop {
        match link.read(&mut [0u8; 64]) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(t0.elapsed() < EVENT_WAIT, "a bad hello was never refused");
                poll.poll(&mut events, Some(Duration::from_millis(200)))
                    .unwrap();
            }
            Err(e) => break e,
            Ok(n) => panic!("read {n} bytes from a link with a bad hello"),
        }
    };
    assert!(err.to_string().contains("hello version 65535"), "{err}");
}

#[test]
fn rdma_passes_the_transport_conformance_suite() {
    if in_guest().is_none() {
        return run_in_guest("rdma_passes_the_transport_conformance_suite", 16);
    }
    add_rxe();
    let rdma: Arc<dyn Transport> =
        Arc::new(Rdma::open("rxe0", None, RdmaOptions::default()).unwrap());
    suite(&*rdma, 16 << 20);
    let tight = Rdma::open("rxe0", None, rdma_tight()).unwrap();
    suite(&tight, 4 << 20);
    a_bad_rdma_hello_is_refused(&*rdma);
}
