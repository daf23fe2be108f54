//! The namespace RPC: a follower's FUSE calls, as [`NsRequest`]s, to the node that owns
//! the cluster's namespace (see `cluster`).
//!
//! TCP on the transport's port + 1. Before anything else both sides prove they hold the
//! cluster key: the dialer sends a nonce, the listener answers with its own nonce and
//! an HMAC over both, the dialer answers with its HMAC (the transport's scheme, with
//! roles of its own). Then each message is `[u32 len][u32 crc32c][u32 json_len][json]
//! [bytes]` (little-endian; `len` counts what follows the crc): the call or its reply
//! as JSON, and a write's data or a read's result as raw bytes beside it. A bad frame
//! drops the connection; it never reaches the namespace.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use spool_dataplane::net::auth::{self, ClusterKey};
use spool_dataplane::net::frame::NONCE_SIZE;

use crate::ops::{NsReply, NsRequest};

/// Largest message: a 1 MiB write or read with its call, or a page of directory
/// entries, with room to spare.
pub const MESSAGE_MAX_BYTES: usize = 4 << 20;
/// Connections one owner serves at once (every follower pools a few).
const CONNECTIONS_MAX: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// HMAC roles of this service (the transport uses others).
const ROLE_NS_LISTENER: u8 = b'N';
const ROLE_NS_DIALER: u8 = b'n';

/// Where a node whose transport listens at `transport` serves the namespace RPC.
pub fn ns_addr(transport: SocketAddr) -> SocketAddr {
    SocketAddr::new(transport.ip(), transport.port().wrapping_add(1))
}

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

fn write_msg<T: Serialize>(w: &mut impl Write, v: &T, bytes: &[u8]) -> io::Result<()> {
    let json = serde_json::to_vec(v).map_err(|e| bad(e.to_string()))?;
    let len = 4 + json.len() + bytes.len();
    if len > MESSAGE_MAX_BYTES {
        return Err(bad(format!(
            "message of {len} bytes exceeds {MESSAGE_MAX_BYTES}"
        )));
    }
    let jl = (json.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&jl), &json), bytes);
    let mut head = Vec::with_capacity(12 + json.len());
    head.extend_from_slice(&(len as u32).to_le_bytes());
    head.extend_from_slice(&crc.to_le_bytes());
    head.extend_from_slice(&jl);
    head.extend_from_slice(&json);
    w.write_all(&head)?;
    w.write_all(bytes)?;
    w.flush()
}

/// Reads one message; anything malformed is an `InvalidData` error.
fn read_msg<T: DeserializeOwned>(r: &mut impl Read) -> io::Result<(T, Vec<u8>)> {
    let mut h = [0u8; 8];
    r.read_exact(&mut h)?;
    let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(h[4..].try_into().expect("4 bytes"));
    if !(4..=MESSAGE_MAX_BYTES).contains(&len) {
        return Err(bad(format!("message length {len} out of range")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    if crc32c::crc32c(&body) != crc {
        return Err(bad("message checksum mismatch"));
    }
    let jl = u32::from_le_bytes(body[..4].try_into().expect("4 bytes")) as usize;
    if jl > len - 4 {
        return Err(bad(format!("json length {jl} exceeds the message")));
    }
    let v = serde_json::from_slice(&body[4..4 + jl]).map_err(|e| bad(e.to_string()))?;
    body.drain(..4 + jl);
    Ok((v, body))
}

/// A follower's connection to the owner.
#[derive(Debug)]
pub struct RpcConn {
    sock: TcpStream,
    pub addr: SocketAddr,
}

impl RpcConn {
    /// Connects and authenticates; `timeout` bounds the connect and every reply.
    pub fn connect(addr: SocketAddr, key: &ClusterKey, timeout: Duration) -> io::Result<RpcConn> {
        let mut sock = TcpStream::connect_timeout(&addr, timeout)?;
        spool_dataplane::net::transport::tune(&sock)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        let nc = auth::nonce();
        sock.write_all(&nc)?;
        let mut ans = [0u8; NONCE_SIZE + 32];
        sock.read_exact(&mut ans)?;
        let ns: [u8; NONCE_SIZE] = ans[..NONCE_SIZE].try_into().expect("nonce");
        let proof: [u8; 32] = ans[NONCE_SIZE..].try_into().expect("proof");
        if !key.verify(ROLE_NS_LISTENER, &nc, &ns, &proof) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the namespace owner does not hold the cluster key",
            ));
        }
        sock.write_all(&key.proof(ROLE_NS_DIALER, &nc, &ns))?;
        Ok(RpcConn { sock, addr })
    }

    /// Whether the connection still looks usable: an owner that restarted (or closed
    /// it) has sent a FIN or a reset, which a non-blocking peek sees. Checked before
    /// reusing a pooled connection, so a call is not lost on a link known dead.
    pub fn is_open(&self) -> bool {
        if self.sock.set_nonblocking(true).is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        let open =
            matches!(self.sock.peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        open && self.sock.set_nonblocking(false).is_ok()
    }

    /// One call: `data` is a write's bytes; the reply's bytes come back beside it,
    /// with the epoch of the owner's namespace load that answered.
    pub fn call(&mut self, req: &NsRequest, data: &[u8]) -> io::Result<(u64, NsReply, Vec<u8>)> {
        write_msg(&mut self.sock, req, data)?;
        let ((epoch, rep), bytes): ((u64, NsReply), Vec<u8>) = read_msg(&mut self.sock)?;
        Ok((epoch, rep, bytes))
    }
}

/// What serves a call on the owner: the epoch of its namespace load and the reply,
/// with the reply's bytes in the given vector.
pub type Handler = Arc<dyn Fn(&NsRequest, &[u8], &mut Vec<u8>) -> (u64, NsReply) + Send + Sync>;

/// The owner's side: one accept thread, one thread per follower connection (few: a
/// handful per node), each running calls one at a time.
#[derive(Debug)]
pub struct RpcServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RpcServer {
    pub fn start(listen: SocketAddr, key: ClusterKey, handler: Handler) -> io::Result<RpcServer> {
        let l = TcpListener::bind(listen)?;
        let addr = l.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(AtomicUsize::new(0));
        let st = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("spool-ns-rpc".into())
            .spawn(move || {
                for conn in l.incoming() {
                    if st.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(sock) = conn else { continue };
                    if live.load(Ordering::Acquire) >= CONNECTIONS_MAX {
                        tracing::warn!("namespace RPC: too many connections; refusing one");
                        continue;
                    }
                    live.fetch_add(1, Ordering::AcqRel);
                    let (key, handler, live, st) = (
                        key.clone(),
                        Arc::clone(&handler),
                        Arc::clone(&live),
                        Arc::clone(&st),
                    );
                    let spawned = std::thread::Builder::new()
                        .name("spool-ns-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve_conn(sock, &key, &handler, &st) {
                                if e.kind() != io::ErrorKind::UnexpectedEof {
                                    tracing::info!(error = %e, "namespace RPC connection closed");
                                }
                            }
                            live.fetch_sub(1, Ordering::AcqRel);
                        });
                    if spawned.is_err() {
                        tracing::warn!("namespace RPC: cannot start a connection thread");
                    }
                }
            })?;
        Ok(RpcServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_conn(
    mut sock: TcpStream,
    key: &ClusterKey,
    handler: &Handler,
    stop: &AtomicBool,
) -> io::Result<()> {
    spool_dataplane::net::transport::tune(&sock)?;
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut nc = [0u8; NONCE_SIZE];
    sock.read_exact(&mut nc)?;
    let ns = auth::nonce();
    let mut ans = Vec::with_capacity(NONCE_SIZE + 32);
    ans.extend_from_slice(&ns);
    ans.extend_from_slice(&key.proof(ROLE_NS_LISTENER, &nc, &ns));
    sock.write_all(&ans)?;
    let mut proof = [0u8; 32];
    sock.read_exact(&mut proof)?;
    if !key.verify(ROLE_NS_DIALER, &nc, &ns, &proof) {
        tracing::warn!(peer = ?sock.peer_addr().ok(), "namespace RPC: a peer without the cluster key");
        return Ok(());
    }
    // Idle follower connections stay open; a stopping server notices on the next call.
    sock.set_read_timeout(None)?;
    let mut out = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let (req, data): (NsRequest, Vec<u8>) = read_msg(&mut sock)?;
        out.clear();
        let rep = handler(&req, &data, &mut out);
        write_msg(&mut sock, &rep, &out)?;
    }
    Ok(())
}

/// The fuzz target `ns_rpc` (dataplane/fuzz; its corpus is replayed by
/// fuse-shim/tests/rpc_corpus.rs): a message decodes to a call and a reply, or fails
/// cleanly; what decodes re-encodes to the same thing (what a node would forward).
pub fn fuzz_message(data: &[u8]) {
    fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
        let mut r = data;
        match read_msg::<T>(&mut r) {
            Ok((v, bytes)) => {
                let mut again = Vec::new();
                write_msg(&mut again, &v, &bytes).expect("a decoded message re-encodes");
                let (v2, bytes2): (T, Vec<u8>) =
                    read_msg(&mut again.as_slice()).expect("a re-encoded message decodes");
                assert_eq!((v, bytes), (v2, bytes2), "round trip");
            }
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ),
                "{e}"
            ),
        }
    }
    check::<NsRequest>(data);
    check::<(u64, NsReply)>(data);
    // The same bytes with a correct length and crc, so mutations reach the decoder
    // behind the checksum.
    if data.len() >= 8 {
        let mut fixed = data.to_vec();
        let len = ((data.len() - 8) as u32).to_le_bytes();
        fixed[..4].copy_from_slice(&len);
        let crc = crc32c::crc32c(&fixed[8..]).to_le_bytes();
        fixed[4..8].copy_from_slice(&crc);
        check::<NsRequest>(&fixed);
        check::<(u64, NsReply)>(&fixed);
    }
}

/// Valid messages to start fuzzing from (`SPOOL_WRITE_SEEDS=1 cargo test -p
/// spool-fuse-shim --test rpc_corpus -- --ignored write_seed_corpus`).
pub fn seed_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mut put = |name, req: &dyn Fn(&mut Vec<u8>) -> io::Result<()>| {
        let mut v = Vec::new();
        req(&mut v).expect("seed encodes");
        out.push((name, v));
    };
    put("write", &|v| {
        write_msg(v, &NsRequest::Write { ino: 9, off: 4096 }, b"some data")
    });
    put("lookup", &|v| {
        write_msg(
            v,
            &NsRequest::Lookup {
                parent: 1,
                name: b"a\xffb".to_vec(),
            },
            &[],
        )
    });
    put("setattr", &|v| {
        let attr = crate::ops::SetAttr {
            perm: Some(0o644),
            mtime_ns: Some(-5),
            ..Default::default()
        };
        write_msg(v, &NsRequest::SetAttr { ino: 3, attr }, &[])
    });
    put("fill", &|v| {
        write_msg(v, &NsRequest::Fill { ino: 12, index: 3 }, &[])
    });
    put("reply_errno", &|v| {
        write_msg(v, &(7u64, NsReply::Errno(2)), &[])
    });
    put("reply_bytes", &|v| {
        write_msg(v, &(7u64, NsReply::Bytes), b"xattr value")
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_ones_are_refused() {
        let mut v = Vec::new();
        let req = NsRequest::Write { ino: 7, off: 4096 };
        write_msg(&mut v, &req, b"data").unwrap();
        let (back, bytes): (NsRequest, Vec<u8>) = read_msg(&mut v.as_slice()).unwrap();
        assert_eq!((back, bytes.as_slice()), (req, &b"data"[..]));
        // Any flipped bit is caught by the crc; a length out of range before reading.
        for i in 0..v.len() {
            let mut w = v.clone();
            w[i] ^= 0x10;
            let r: io::Result<(NsRequest, Vec<u8>)> = read_msg(&mut w.as_slice());
            assert!(r.is_err(), "flip at byte {i} accepted");
        }
        let mut huge = v.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_msg::<NsRequest>(&mut huge.as_slice()).is_err());
        // Valid frame, JSON that is no request.
        let mut w = Vec::new();
        write_msg(&mut w, &(1u64, NsReply::Done), &[]).unwrap();
        assert!(read_msg::<NsRequest>(&mut w.as_slice()).is_err());
    }

    #[test]
    fn a_connection_the_owner_closed_is_seen_closed() {
        let key = ClusterKey::from_secret(b"the-right-cluster-key").unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let k = key.clone();
        let owner = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let handler: Handler = Arc::new(|_, _, _| (5, NsReply::Done));
            // Stopping: the handshake, then the connection closes.
            let _ = serve_conn(s, &k, &handler, &AtomicBool::new(true));
        });
        let c = RpcConn::connect(addr, &key, Duration::from_secs(5)).unwrap();
        owner.join().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while c.is_open() {
            assert!(std::time::Instant::now() < deadline, "still looks open");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_peer_without_the_key_is_refused() {
        let key = ClusterKey::from_secret(b"the-right-cluster-key").unwrap();
        let wrong = ClusterKey::from_secret(b"some-other-cluster-key").unwrap();
        let handler: Handler = Arc::new(|_, _, _| (5, NsReply::Done));
        let s = RpcServer::start("127.0.0.1:0".parse().unwrap(), key.clone(), handler).unwrap();
        let t = Duration::from_secs(5);
        let mut ok = RpcConn::connect(s.local_addr(), &key, t).unwrap();
        assert_eq!(ok.call(&NsRequest::Statfs, &[]).unwrap().1, NsReply::Done);
        assert!(ok.is_open(), "a live connection");
        assert_eq!(ok.call(&NsRequest::Statfs, &[]).unwrap().0, 5, "the epoch");
        let e = RpcConn::connect(s.local_addr(), &wrong, t).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    }
}
