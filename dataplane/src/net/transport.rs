//! The transport seam: how a node listens for and dials its peers. The replication
//! service polls whatever links a backend gives it in one epoll, so a backend is a
//! non-blocking byte stream with a pollable fd: `tcp` here; `rdma` (`super::rdma`: RC
//! queue pairs, polled through their completion channel's fd) plugs in the same way.
//! A link may register more than one fd under its token, and an event on any of them
//! may mean either direction: the service retries reads and writes on every event.

use std::fmt::Debug;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mio::event::Source;

/// A transport backend.
pub trait Transport: Send + Sync + Debug {
    /// The backend's name (`tcp`), for logs and status.
    fn name(&self) -> &'static str;
    /// Listens on `addr`; an address in use fails here, at start.
    fn listen(&self, addr: SocketAddr) -> io::Result<Box<dyn Listener>>;
    /// Starts connecting without blocking: the link turns writable once connected,
    /// and a failed connect shows up as an error on the first read or write.
    fn dial(&self, addr: SocketAddr) -> io::Result<Box<dyn Link>>;
}

/// A listening endpoint, registered in the service's poll.
pub trait Listener: Source + Send + Debug {
    /// The next pending connection (`WouldBlock` when there is none).
    fn accept(&mut self) -> io::Result<Box<dyn Link>>;
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// One connection: a non-blocking, ordered, reliable byte stream.
pub trait Link: Source + Read + Write + Send + Debug {}

/// TCP through the kernel: non-blocking sockets, no Nagle delay, and a bound on how
/// long sent data may stay unacknowledged.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tcp;

/// Data unacknowledged this long kills the connection, and the kernel drops what it
/// still held (`TCP_USER_TIMEOUT`). Without it, frames held back by a partition are
/// delivered whenever it heals, seconds after their sender gave up on them: a relayed
/// write whose client was told "unknown" would land after that client's next write
/// to the same bytes. A link that stays this long without any acknowledgement is of
/// no use anyway: a slow one still gets acknowledgements.
pub const UNACKED_MAX: Duration = Duration::from_millis(1500);

/// A link that received nothing this long is probed (TCP keepalive). `UNACKED_MAX`
/// only watches data *we* sent: a link can die at the other end alone (the peer's
/// kernel gives it up after `UNACKED_MAX` when its replies go unacknowledged through a
/// partition or a stalled host, and the reset that would tell us is lost or never
/// sent), and an end holding nothing unacknowledged then waits on it for ever, say a
/// chain head for the answer to a write it sent down. A probe finds out: the peer's
/// kernel answers a link it no longer has with a reset, and an unanswered probe ends
/// the link after `UNACKED_MAX`. A slow peer still answers probes (its kernel does).
pub const IDLE_PROBE: Duration = Duration::from_secs(1);

/// The socket options every Spool TCP connection gets, dialed, accepted or a client's:
/// no Nagle delay, [`UNACKED_MAX`], [`IDLE_PROBE`], and a close that drops unsent data
/// (a reset) rather than delivering it after its sender has moved on.
pub fn tune(sock: &impl std::os::fd::AsFd) -> io::Result<()> {
    let s = socket2::SockRef::from(sock);
    s.set_tcp_nodelay(true)?;
    s.set_tcp_user_timeout(Some(UNACKED_MAX))?;
    s.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(IDLE_PROBE)
            .with_interval(IDLE_PROBE)
            .with_retries(2),
    )?;
    s.set_linger(Some(Duration::ZERO))
}

/// A non-blocking TCP listener on `addr`; bound through std so that bind errors
/// (address in use) are reported as such.
pub fn bind(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(mio::net::TcpListener::from_std(l))
}

impl Link for mio::net::TcpStream {}

impl Listener for mio::net::TcpListener {
    fn accept(&mut self) -> io::Result<Box<dyn Link>> {
        let (s, _) = mio::net::TcpListener::accept(self)?;
        tune(&s)?;
        Ok(Box::new(s))
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        mio::net::TcpListener::local_addr(self)
    }
}

impl Transport for Tcp {
    fn name(&self) -> &'static str {
        "tcp"
    }
    fn listen(&self, addr: SocketAddr) -> io::Result<Box<dyn Listener>> {
        Ok(Box::new(bind(addr)?))
    }
    fn dial(&self, addr: SocketAddr) -> io::Result<Box<dyn Link>> {
        let s = mio::net::TcpStream::connect(addr)?;
        tune(&s)?;
        Ok(Box::new(s))
    }
}
