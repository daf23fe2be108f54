//! A blocking client of a node's transport, for the CLI, benchmarks and tests: it
//! authenticates, then sends requests and matches replies by request id, so several
//! may be in flight on one connection.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::auth::{self, ClusterKey, ROLE_DIALER, ROLE_LISTENER};
use super::frame::{decode_frame, Msg, MutKind, Status, HEADER_SIZE};
use crate::store::ChunkId;

/// What a request came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub req_id: u64,
    pub status: Status,
    pub version: u64,
    pub data: Vec<u8>,
}

#[derive(Debug)]
pub struct Client {
    sock: TcpStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    next_id: u64,
    body_max: u32,
}

/// Connection-level failures: after one, the outcome of requests in flight is unknown.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{addr}: {source}")]
    Io { addr: SocketAddr, source: io::Error },
    #[error("{addr}: {why}")]
    Protocol { addr: SocketAddr, why: String },
}

impl Client {
    /// Connects and authenticates; `timeout` bounds the connect and every later read.
    pub fn connect(
        addr: SocketAddr,
        key: &ClusterKey,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let io = |source| ClientError::Io { addr, source };
        let sock = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
        // A client that gives up on a request drops the connection, and with it the
        // request if it is still unsent: it must not reach a node later.
        super::transport::tune(&sock).map_err(io)?;
        sock.set_read_timeout(Some(timeout)).map_err(io)?;
        sock.set_write_timeout(Some(timeout)).map_err(io)?;
        let mut c = Client {
            sock,
            rbuf: Vec::with_capacity(1 << 20),
            wbuf: Vec::with_capacity(1 << 20),
            next_id: 1,
            body_max: 64 << 20,
        };
        let nc = auth::nonce();
        c.send_msg(0, &Msg::Hello { nonce: nc })?;
        let (ns, proof) = match c.recv_frame(|m| match m {
            Msg::Challenge { nonce, proof } => Some((*nonce, *proof)),
            _ => None,
        })? {
            Some(v) => v,
            None => return Err(c.protocol("expected a challenge")),
        };
        if !key.verify(ROLE_LISTENER, &nc, &ns, &proof) {
            return Err(c.protocol("the node does not hold the cluster key"));
        }
        let p = key.proof(ROLE_DIALER, &nc, &ns);
        c.send_msg(0, &Msg::Proof { proof: p })?;
        Ok(c)
    }

    fn addr(&self) -> SocketAddr {
        self.sock
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
    fn protocol(&self, why: &str) -> ClientError {
        ClientError::Protocol {
            addr: self.addr(),
            why: why.to_owned(),
        }
    }

    fn send_msg(&mut self, id: u64, m: &Msg<'_>) -> Result<(), ClientError> {
        self.wbuf.clear();
        m.encode(id, &mut self.wbuf);
        let addr = self.addr();
        self.sock
            .write_all(&self.wbuf)
            .map_err(|source| ClientError::Io { addr, source })
    }

    /// Reads one frame and maps it through `f`.
    fn recv_frame<T>(
        &mut self,
        f: impl FnOnce(&Msg<'_>) -> Option<T>,
    ) -> Result<Option<T>, ClientError> {
        loop {
            match decode_frame(&self.rbuf, self.body_max) {
                Ok(Some((_, m, n))) => {
                    let v = f(&m);
                    self.rbuf.drain(..n);
                    return Ok(v);
                }
                Ok(None) => {}
                Err(e) => return Err(self.protocol(&e.to_string())),
            }
            let mut tmp = [0u8; 64 << 10];
            let addr = self.addr();
            let n = self
                .sock
                .read(&mut tmp)
                .map_err(|source| ClientError::Io { addr, source })?;
            if n == 0 {
                return Err(self.protocol("connection closed"));
            }
            self.rbuf.extend_from_slice(&tmp[..n]);
        }
    }

    /// Sends a request without waiting; returns its id.
    pub fn send(&mut self, m: &Msg<'_>) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send_msg(id, m)?;
        Ok(id)
    }

    /// The next reply (in whatever order the node answers).
    pub fn recv(&mut self) -> Result<Reply, ClientError> {
        loop {
            match decode_frame(&self.rbuf, self.body_max) {
                Ok(Some((h, m, n))) => {
                    let r = match m {
                        Msg::Reply {
                            status,
                            version,
                            data,
                        } => Some(Reply {
                            req_id: h.req_id,
                            status,
                            version,
                            data: data.to_vec(),
                        }),
                        _ => None,
                    };
                    self.rbuf.drain(..n);
                    return r.ok_or_else(|| self.protocol("expected a reply"));
                }
                Ok(None) => {}
                Err(e) => return Err(self.protocol(&e.to_string())),
            }
            let have = self.rbuf.len();
            self.rbuf.resize(have + (256 << 10), 0);
            let addr = self.addr();
            let r = self.sock.read(&mut self.rbuf[have..]);
            match r {
                Ok(0) => {
                    self.rbuf.truncate(have);
                    return Err(self.protocol("connection closed"));
                }
                Ok(n) => self.rbuf.truncate(have + n),
                Err(source) => {
                    self.rbuf.truncate(have);
                    return Err(ClientError::Io { addr, source });
                }
            }
        }
    }

    /// One request, one reply.
    pub fn call(&mut self, m: &Msg<'_>) -> Result<Reply, ClientError> {
        let id = self.send(m)?;
        let r = self.recv()?;
        if r.req_id != id {
            return Err(self.protocol("reply to another request"));
        }
        Ok(r)
    }

    pub fn write(
        &mut self,
        chunk: ChunkId,
        offset: u32,
        data: &[u8],
    ) -> Result<Reply, ClientError> {
        self.mutate(0, chunk, MutKind::Write, offset, data)
    }

    /// A write, truncate (`offset` = new length) or delete. `chain_ver` other than 0
    /// makes it conditional: the head refuses it (`StaleChain`) unless the chunk's
    /// chain still has that version.
    pub fn mutate(
        &mut self,
        chain_ver: u64,
        chunk: ChunkId,
        kind: MutKind,
        offset: u32,
        data: &[u8],
    ) -> Result<Reply, ClientError> {
        self.call(&Msg::Mutate {
            chain_ver,
            chunk,
            kind,
            offset,
            version: 0,
            data,
        })
    }

    /// The chunk's length (the reply's data, 4 bytes little-endian) and version.
    pub fn stat(&mut self, chunk: ChunkId) -> Result<Reply, ClientError> {
        self.call(&Msg::Stat {
            chunk,
            local: false,
        })
    }

    pub fn read(
        &mut self,
        chunk: ChunkId,
        offset: u32,
        len: u32,
        local: bool,
    ) -> Result<Reply, ClientError> {
        self.call(&Msg::Read {
            chunk,
            offset,
            len,
            local,
        })
    }

    /// Raw bytes, for tests of what a node does with garbage.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        let addr = self.addr();
        self.sock
            .write_all(bytes)
            .map_err(|source| ClientError::Io { addr, source })
    }
}

/// Frames shorter than a header cannot be decoded; used by tests.
pub const MIN_FRAME: usize = HEADER_SIZE;
