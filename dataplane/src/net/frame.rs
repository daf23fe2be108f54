//! Wire frames: a fixed header (magic, version, kind, request id, body length, body
//! crc32c, header crc32c) and a body whose layout the kind decides.
//!
//! Decoding never trusts the peer: a wrong magic or version, a bad crc, an oversized
//! or truncated body, an unknown kind or a field out of range is a `FrameError`, and
//! the caller drops the connection and counts it. Nothing here panics on input.

use crate::store::ChunkId;

pub const MAGIC: u32 = 0x4e4c_5053; // "SPLN" little-endian
pub const VERSION: u8 = 1;
pub const HEADER_SIZE: usize = 28;
/// Nonces and MACs of the handshake.
pub const NONCE_SIZE: usize = 32;

/// Message kinds.
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const CHALLENGE: u8 = 2;
    pub const PROOF: u8 = 3;
    /// A mutation from a client (or a node proxying one) to the chain head.
    pub const CLIENT_MUTATE: u8 = 4;
    /// A mutation flowing down a chain, numbered by the head.
    pub const CHAIN_MUTATE: u8 = 5;
    pub const READ: u8 = 6;
    /// A page of the receiver's chunk digests for one chain (resync).
    pub const LIST: u8 = 7;
    /// A whole chunk replacing the receiver's copy (resync); length 0 deletes it.
    pub const SYNC_PUT: u8 = 8;
    pub const REPLY: u8 = 9;
    /// A chunk's length and version, routed like a read.
    pub const STAT: u8 = 10;
}

/// Mutation kinds inside CLIENT_MUTATE and CHAIN_MUTATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MutKind {
    Write = 1,
    Truncate = 2,
    Delete = 3,
}

/// Reply statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    /// The request's chain version is not the receiver's; `version` carries the
    /// receiver's. Nothing was done.
    StaleChain = 1,
    /// The receiver does not serve this chain (not a member, or offline). Nothing done.
    NotServing = 2,
    /// Out of buffers or op slots. Nothing done; retry.
    Busy = 3,
    /// The device failed the op; the outcome on other replicas is unknown.
    Io = 4,
    BadRequest = 5,
    /// No serving replica can be reached for the chain. Nothing done.
    Unavailable = 6,
    NoSpace = 7,
    /// A replica returned bytes whose crc did not match.
    Checksum = 8,
    /// A forwarded op's connection was lost: it may or may not have been applied.
    Unknown = 9,
}

impl Status {
    fn from_u8(v: u8) -> Option<Status> {
        use Status::*;
        Some(match v {
            0 => Ok,
            1 => StaleChain,
            2 => NotServing,
            3 => Busy,
            4 => Io,
            5 => BadRequest,
            6 => Unavailable,
            7 => NoSpace,
            8 => Checksum,
            9 => Unknown,
            _ => return None,
        })
    }
    /// Whether the op certainly did not happen (a client may retry it blindly).
    pub fn not_done(self) -> bool {
        matches!(
            self,
            Status::StaleChain
                | Status::NotServing
                | Status::Busy
                | Status::BadRequest
                | Status::Unavailable
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:#010x}")]
    Magic(u32),
    #[error("unsupported frame version {0}")]
    Version(u8),
    #[error("header checksum mismatch")]
    HeaderCrc,
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("body checksum mismatch")]
    BodyCrc,
    #[error("body of {len} bytes is over the limit of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("malformed {kind} body: {why}")]
    Body { kind: u8, why: &'static str },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub req_id: u64,
    pub body_len: u32,
    pub body_crc: u32,
}

impl Header {
    pub fn encode(&self, out: &mut [u8; HEADER_SIZE]) {
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4] = VERSION;
        out[5] = self.kind;
        out[6..8].copy_from_slice(&[0, 0]);
        out[8..16].copy_from_slice(&self.req_id.to_le_bytes());
        out[16..20].copy_from_slice(&self.body_len.to_le_bytes());
        out[20..24].copy_from_slice(&self.body_crc.to_le_bytes());
        let c = crc32c::crc32c(&out[0..24]);
        out[24..28].copy_from_slice(&c.to_le_bytes());
    }

    /// Checks everything a header alone can tell; the body crc is checked by
    /// `check_body` once the body has arrived.
    pub fn decode(b: &[u8; HEADER_SIZE], body_max: u32) -> Result<Header, FrameError> {
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let stored = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
        if crc32c::crc32c(&b[0..24]) != stored {
            return Err(FrameError::HeaderCrc);
        }
        if b[4] != VERSION {
            return Err(FrameError::Version(b[4]));
        }
        if b[6] != 0 || b[7] != 0 {
            // Reserved: a later version may give them a meaning this one cannot know.
            return Err(FrameError::Reserved);
        }
        let h = Header {
            kind: b[5],
            req_id: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            body_len: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
            body_crc: u32::from_le_bytes(b[20..24].try_into().expect("4 bytes")),
        };
        if h.body_len > body_max {
            return Err(FrameError::TooLarge {
                len: h.body_len,
                max: body_max,
            });
        }
        if !(kind::HELLO..=kind::STAT).contains(&h.kind) {
            return Err(FrameError::Kind(h.kind));
        }
        Ok(h)
    }

    pub fn check_body(&self, body: &[u8]) -> Result<(), FrameError> {
        debug_assert_eq!(body.len(), self.body_len as usize);
        if crc32c::crc32c(body) != self.body_crc {
            return Err(FrameError::BodyCrc);
        }
        Ok(())
    }
}

/// A decoded message; payloads borrow from the receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    Hello {
        nonce: [u8; NONCE_SIZE],
    },
    Challenge {
        nonce: [u8; NONCE_SIZE],
        proof: [u8; NONCE_SIZE],
    },
    Proof {
        proof: [u8; NONCE_SIZE],
    },
    /// CLIENT_MUTATE (`version` 0) or CHAIN_MUTATE (`version` assigned by the head).
    Mutate {
        chain_ver: u64,
        chunk: ChunkId,
        kind: MutKind,
        /// Write: byte offset (block-aligned); truncate: new length; delete: 0.
        offset: u32,
        version: u64,
        data: &'a [u8],
    },
    Read {
        chunk: ChunkId,
        offset: u32,
        len: u32,
        /// Read this node's own copy, whatever its state (checkers compare replicas).
        local: bool,
    },
    /// The chunk's committed length (the reply's data: 4 bytes, little-endian) and
    /// version, from a replica that may serve a read of it.
    Stat {
        chunk: ChunkId,
        /// This node's own copy, whatever its state.
        local: bool,
    },
    /// One page of one of the receiver's shards. The reply's `version` holds the
    /// receiver's shard count in its low 32 bits and 1 in bit 32 when more follow.
    List {
        chain: u32,
        shard: u32,
        after: Option<ChunkId>,
    },
    SyncPut {
        chain_ver: u64,
        chunk: ChunkId,
        version: u64,
        data: &'a [u8],
    },
    Reply {
        status: Status,
        /// Mutations: the chunk's version after it; reads: the version read;
        /// StaleChain: the receiver's chain version.
        version: u64,
        data: &'a [u8],
    },
}

/// Little-endian field reader that fails instead of panicking.
struct Rd<'a> {
    b: &'a [u8],
    kind: u8,
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(FrameError::Body {
                kind: self.kind,
                why: "truncated",
            });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn nonce(&mut self) -> Result<[u8; NONCE_SIZE], FrameError> {
        Ok(self.take(NONCE_SIZE)?.try_into().expect("nonce"))
    }
    fn chunk(&mut self) -> Result<ChunkId, FrameError> {
        Ok(ChunkId {
            inode: self.u64()?,
            index: self.u32()?,
        })
    }
    fn bad(&self, why: &'static str) -> FrameError {
        FrameError::Body {
            kind: self.kind,
            why,
        }
    }
    fn end(self) -> Result<(), FrameError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.bad("trailing bytes"))
        }
    }
}

impl<'a> Msg<'a> {
    /// Decodes a body whose header (and crc) were already checked.
    pub fn decode(kind: u8, body: &'a [u8]) -> Result<Msg<'a>, FrameError> {
        let mut r = Rd { b: body, kind };
        let m = match kind {
            kind::HELLO => Msg::Hello { nonce: r.nonce()? },
            kind::CHALLENGE => Msg::Challenge {
                nonce: r.nonce()?,
                proof: r.nonce()?,
            },
            kind::PROOF => Msg::Proof { proof: r.nonce()? },
            kind::CLIENT_MUTATE | kind::CHAIN_MUTATE => {
                // Data first, fields last: the body's crc is then the data's crc
                // extended over 33 bytes, which a forwarding node computes without
                // reading the data again.
                let Some(split) = body.len().checked_sub(MUTATE_FIELDS) else {
                    return Err(r.bad("truncated"));
                };
                let data = &body[..split];
                let f = decode_mutate_fields(kind, &body[split..], !data.is_empty())?;
                return Ok(Msg::Mutate {
                    chain_ver: f.chain_ver,
                    chunk: f.chunk,
                    kind: f.kind,
                    offset: f.offset,
                    version: f.version,
                    data,
                });
            }
            kind::READ => Msg::Read {
                chunk: r.chunk()?,
                offset: r.u32()?,
                len: r.u32()?,
                local: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(r.bad("flag")),
                },
            },
            kind::STAT => Msg::Stat {
                chunk: r.chunk()?,
                local: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(r.bad("flag")),
                },
            },
            kind::LIST => {
                let chain = r.u32()?;
                let shard = r.u32()?;
                let after = match r.u8()? {
                    0 => None,
                    1 => Some(r.chunk()?),
                    _ => return Err(r.bad("flag")),
                };
                Msg::List {
                    chain,
                    shard,
                    after,
                }
            }
            kind::SYNC_PUT => {
                let chain_ver = r.u64()?;
                let chunk = r.chunk()?;
                let version = r.u64()?;
                if (version == 0) != r.b.is_empty() {
                    return Err(r.bad("a put carries data and a version, a delete neither"));
                }
                return Ok(Msg::SyncPut {
                    chain_ver,
                    chunk,
                    version,
                    data: r.b,
                });
            }
            kind::REPLY => {
                let status = Status::from_u8(r.u8()?).ok_or(r.bad("unknown status"))?;
                let version = r.u64()?;
                return Ok(Msg::Reply {
                    status,
                    version,
                    data: r.b,
                });
            }
            k => return Err(FrameError::Kind(k)),
        };
        r.end()?;
        Ok(m)
    }

    pub fn kind(&self) -> u8 {
        match self {
            Msg::Hello { .. } => kind::HELLO,
            Msg::Challenge { .. } => kind::CHALLENGE,
            Msg::Proof { .. } => kind::PROOF,
            Msg::Mutate { version: 0, .. } => kind::CLIENT_MUTATE,
            Msg::Mutate { .. } => kind::CHAIN_MUTATE,
            Msg::Read { .. } => kind::READ,
            Msg::Stat { .. } => kind::STAT,
            Msg::List { .. } => kind::LIST,
            Msg::SyncPut { .. } => kind::SYNC_PUT,
            Msg::Reply { .. } => kind::REPLY,
        }
    }

    /// Appends the whole frame (header and body) to `out`.
    pub fn encode(&self, req_id: u64, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_SIZE]);
        let chunk = |out: &mut Vec<u8>, c: &ChunkId| {
            out.extend_from_slice(&c.inode.to_le_bytes());
            out.extend_from_slice(&c.index.to_le_bytes());
        };
        match self {
            Msg::Hello { nonce } => out.extend_from_slice(nonce),
            Msg::Challenge { nonce, proof } => {
                out.extend_from_slice(nonce);
                out.extend_from_slice(proof);
            }
            Msg::Proof { proof } => out.extend_from_slice(proof),
            Msg::Mutate {
                chain_ver,
                chunk: c,
                kind,
                offset,
                version,
                data,
            } => {
                out.extend_from_slice(data);
                let f = MutateFields {
                    chain_ver: *chain_ver,
                    chunk: *c,
                    kind: *kind,
                    offset: *offset,
                    version: *version,
                };
                out.extend_from_slice(&f.encode());
            }
            Msg::Read {
                chunk: c,
                offset,
                len,
                local,
            } => {
                chunk(out, c);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                out.push(u8::from(*local));
            }
            Msg::Stat { chunk: c, local } => {
                chunk(out, c);
                out.push(u8::from(*local));
            }
            Msg::List {
                chain,
                shard,
                after,
            } => {
                out.extend_from_slice(&chain.to_le_bytes());
                out.extend_from_slice(&shard.to_le_bytes());
                match after {
                    None => out.push(0),
                    Some(c) => {
                        out.push(1);
                        chunk(out, c);
                    }
                }
            }
            Msg::SyncPut {
                chain_ver,
                chunk: c,
                version,
                data,
            } => {
                out.extend_from_slice(&chain_ver.to_le_bytes());
                chunk(out, c);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(data);
            }
            Msg::Reply {
                status,
                version,
                data,
            } => {
                out.push(*status as u8);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(data);
            }
        }
        let body = &out[start + HEADER_SIZE..];
        let h = Header {
            kind: self.kind(),
            req_id,
            body_len: u32::try_from(body.len()).expect("bodies are bounded by chunk size"),
            body_crc: crc32c::crc32c(body),
        };
        let mut hb = [0u8; HEADER_SIZE];
        h.encode(&mut hb);
        out[start..start + HEADER_SIZE].copy_from_slice(&hb);
    }
}

/// Like `decode_frame`, except that a mutation carrying data is returned with its body
/// crc still to check (`true`): the receiver checks it from the 4 KiB block crcs it
/// computes anyway while sealing the data for the device (`check_mutate_crc`), so
/// the bytes are checksummed once per hop instead of twice.
pub fn decode_frame_deferred(
    buf: &[u8],
    body_max: u32,
) -> Result<Option<(Header, Msg<'_>, usize, bool)>, FrameError> {
    let Some(hb) = buf.get(..HEADER_SIZE) else {
        return Ok(None);
    };
    let h = Header::decode(hb.try_into().expect("header size"), body_max)?;
    let total = HEADER_SIZE + h.body_len as usize;
    let Some(body) = buf.get(HEADER_SIZE..total) else {
        return Ok(None);
    };
    let m = Msg::decode(h.kind, body)?;
    let deferred = matches!(&m, Msg::Mutate { data, .. } if !data.is_empty());
    if !deferred {
        h.check_body(body)?;
    }
    Ok(Some((h, m, total, deferred)))
}

/// The crc32c of consecutive 4 KiB blocks, from each block's crc32c: what
/// `crc32c_combine` computes, with the "append 4096 zero bytes" operator built once
/// (a 32x32 GF(2) matrix), because the general combine costs ~40x more per block and
/// profiling showed it dominating the transport thread.
pub fn crc_of_4k_blocks(block_crcs: impl Iterator<Item = u32>) -> u32 {
    static SHIFT_4K: std::sync::OnceLock<[u32; 32]> = std::sync::OnceLock::new();
    let op = SHIFT_4K.get_or_init(|| {
        // The operator for one zero bit (reflected crc32c polynomial), squared 15
        // times: 2^15 bits = 4096 bytes.
        let mut m = [0u32; 32];
        m[0] = 0x82f6_3b78;
        for (n, row) in m.iter_mut().enumerate().skip(1) {
            *row = 1 << (n - 1);
        }
        for _ in 0..15 {
            let mut sq = [0u32; 32];
            for (n, row) in sq.iter_mut().enumerate() {
                *row = gf2_times(&m, m[n]);
            }
            m = sq;
        }
        m
    });
    block_crcs.fold(0, |acc, c| gf2_times(op, acc) ^ c)
}

fn gf2_times(mat: &[u32; 32], mut vec: u32) -> u32 {
    let mut sum = 0;
    let mut i = 0;
    while vec != 0 {
        if vec & 1 != 0 {
            sum ^= mat[i];
        }
        vec >>= 1;
        i += 1;
    }
    sum
}

/// A mutation's fields (the data, if any, precedes them in the body).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MutateFields {
    pub chain_ver: u64,
    pub chunk: ChunkId,
    pub kind: MutKind,
    pub offset: u32,
    pub version: u64,
}

/// Decodes and checks a mutation's trailing fields (`MUTATE_FIELDS` bytes) for a
/// frame of `frame_kind` that carries data or not.
pub fn decode_mutate_fields(
    frame_kind: u8,
    fields: &[u8],
    has_data: bool,
) -> Result<MutateFields, FrameError> {
    let mut r = Rd {
        b: fields,
        kind: frame_kind,
    };
    let chain_ver = r.u64()?;
    let chunk = r.chunk()?;
    let kind = match r.u8()? {
        1 => MutKind::Write,
        2 => MutKind::Truncate,
        3 => MutKind::Delete,
        _ => return Err(r.bad("unknown mutation")),
    };
    let offset = r.u32()?;
    let version = r.u64()?;
    if (frame_kind == kind::CHAIN_MUTATE) != (version != 0) {
        return Err(r.bad("only chain mutations carry a version"));
    }
    if (kind == MutKind::Write) != has_data {
        return Err(r.bad("writes and only writes carry data"));
    }
    r.end()?;
    Ok(MutateFields {
        chain_ver,
        chunk,
        kind,
        offset,
        version,
    })
}

/// Byte length of a mutation body's fields, which follow its data.
pub const MUTATE_FIELDS: usize = 8 + 12 + 1 + 4 + 8;

impl MutateFields {
    /// The fields as they trail a mutation's data in its body.
    pub fn encode(&self) -> [u8; MUTATE_FIELDS] {
        let mut p = [0u8; MUTATE_FIELDS];
        p[0..8].copy_from_slice(&self.chain_ver.to_le_bytes());
        p[8..16].copy_from_slice(&self.chunk.inode.to_le_bytes());
        p[16..20].copy_from_slice(&self.chunk.index.to_le_bytes());
        p[20] = self.kind as u8;
        p[21..25].copy_from_slice(&self.offset.to_le_bytes());
        p[25..33].copy_from_slice(&self.version.to_le_bytes());
        p
    }

    /// The fields of a mutation message (`None` for other messages).
    pub fn of(m: &Msg<'_>) -> Option<MutateFields> {
        match *m {
            Msg::Mutate {
                chain_ver,
                chunk,
                kind,
                offset,
                version,
                ..
            } => Some(MutateFields {
                chain_ver,
                chunk,
                kind,
                offset,
                version,
            }),
            _ => None,
        }
    }
}

/// Checks a deferred mutation's body crc given the crc32c of its data: the data
/// comes first in the body, so the body's crc is the data's extended over the fields.
pub fn check_mutate_crc(h: &Header, m: &Msg<'_>, data_crc: u32) -> Result<(), FrameError> {
    let f = MutateFields::of(m).ok_or(FrameError::BodyCrc)?;
    if crc32c::crc32c_append(data_crc, &f.encode()) != h.body_crc {
        return Err(FrameError::BodyCrc);
    }
    Ok(())
}

/// A mutation frame's header and trailing fields, for data whose crc32c is already
/// known (forwarding down a chain): the body crc extends it over the fields, without
/// reading the data again. The frame is header, data, fields.
pub fn mutate_frame_parts(
    req_id: u64,
    f: &MutateFields,
    data_len: usize,
    data_crc: u32,
) -> ([u8; HEADER_SIZE], [u8; MUTATE_FIELDS]) {
    let p = f.encode();
    let h = Header {
        kind: if f.version == 0 {
            kind::CLIENT_MUTATE
        } else {
            kind::CHAIN_MUTATE
        },
        req_id,
        body_len: u32::try_from(MUTATE_FIELDS + data_len)
            .expect("bodies are bounded by chunk size"),
        body_crc: crc32c::crc32c_append(data_crc, &p),
    };
    let mut hb = [0u8; HEADER_SIZE];
    h.encode(&mut hb);
    (hb, p)
}

/// Decodes one frame from the front of `buf`: `Ok(None)` when more bytes are needed,
/// else the header, the message and the frame's total length. The fuzz target.
pub fn decode_frame(
    buf: &[u8],
    body_max: u32,
) -> Result<Option<(Header, Msg<'_>, usize)>, FrameError> {
    let Some((h, m, n, deferred)) = decode_frame_deferred(buf, body_max)? else {
        return Ok(None);
    };
    if deferred {
        h.check_body(&buf[HEADER_SIZE..n])?;
    }
    Ok(Some((h, m, n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Msg<'static>> {
        let c = ChunkId { inode: 7, index: 3 };
        vec![
            Msg::Hello { nonce: [1; 32] },
            Msg::Challenge {
                nonce: [2; 32],
                proof: [3; 32],
            },
            Msg::Proof { proof: [4; 32] },
            Msg::Mutate {
                chain_ver: 5,
                chunk: c,
                kind: MutKind::Write,
                offset: 4096,
                version: 0,
                data: b"abc",
            },
            Msg::Mutate {
                chain_ver: 5,
                chunk: c,
                kind: MutKind::Truncate,
                offset: 8192,
                version: 9,
                data: b"",
            },
            Msg::Read {
                chunk: c,
                offset: 0,
                len: 10,
                local: true,
            },
            Msg::Stat {
                chunk: c,
                local: false,
            },
            Msg::List {
                chain: 4,
                shard: 1,
                after: Some(c),
            },
            Msg::List {
                chain: 4,
                shard: 0,
                after: None,
            },
            Msg::SyncPut {
                chain_ver: 1,
                chunk: c,
                version: 3,
                data: b"xyz",
            },
            Msg::Reply {
                status: Status::StaleChain,
                version: 8,
                data: b"",
            },
        ]
    }

    #[test]
    fn round_trip_every_kind() {
        for m in samples() {
            let mut out = Vec::new();
            m.encode(42, &mut out);
            let (h, back, n) = decode_frame(&out, 1 << 20).unwrap().unwrap();
            assert_eq!((h.req_id, n), (42, out.len()));
            assert_eq!(back, m);
            // Every strict prefix asks for more bytes.
            for k in 0..out.len() {
                assert_eq!(decode_frame(&out[..k], 1 << 20), Ok(None));
            }
        }
    }

    #[test]
    fn damage_is_an_error_never_a_panic() {
        for m in samples() {
            let mut out = Vec::new();
            m.encode(1, &mut out);
            for i in 0..out.len() {
                let mut bad = out.clone();
                bad[i] ^= 0x40;
                assert!(decode_frame(&bad, 1 << 20).is_err(), "flip at {i} of {m:?}");
            }
        }
    }

    #[test]
    fn deferred_mutation_crc_and_combined_encoding_agree_with_the_plain_path() {
        let c = ChunkId { inode: 9, index: 2 };
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let m = Msg::Mutate {
            chain_ver: 3,
            chunk: c,
            kind: MutKind::Write,
            offset: 8192,
            version: 5,
            data: &data,
        };
        let mut plain = Vec::new();
        m.encode(77, &mut plain);
        let f = MutateFields {
            chain_ver: 3,
            chunk: c,
            kind: MutKind::Write,
            offset: 8192,
            version: 5,
        };
        let (h, p) = mutate_frame_parts(77, &f, data.len(), crc32c::crc32c(&data));
        let combined = [&h[..], &data, &p].concat();
        assert_eq!(plain, combined);
        let (h, back, n, deferred) = decode_frame_deferred(&plain, 1 << 20).unwrap().unwrap();
        assert!(deferred);
        assert_eq!((back, n), (m, plain.len()));
        let (_, back, _, _) = decode_frame_deferred(&plain, 1 << 20).unwrap().unwrap();
        check_mutate_crc(&h, &back, crc32c::crc32c(&data)).unwrap();
        assert_eq!(
            check_mutate_crc(&h, &back, crc32c::crc32c(b"other")),
            Err(FrameError::BodyCrc)
        );
        // A flipped data byte is caught by the deferred check.
        let mut bad = plain.clone();
        let at = bad.len() - 3;
        bad[at] ^= 1;
        let (h, back, _, _) = decode_frame_deferred(&bad, 1 << 20).unwrap().unwrap();
        let Msg::Mutate { data: d, .. } = &back else {
            unreachable!()
        };
        assert!(check_mutate_crc(&h, &back, crc32c::crc32c(d)).is_err());
    }

    #[test]
    fn crc_of_blocks_equals_crc_of_the_bytes() {
        let data: Vec<u8> = (0..5 * 4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        for n in 0..=5 {
            let bytes = &data[..n * 4096];
            let blocks = bytes.chunks(4096).map(crc32c::crc32c);
            assert_eq!(
                crc_of_4k_blocks(blocks),
                crc32c::crc32c(bytes),
                "{n} blocks"
            );
        }
    }

    #[test]
    fn oversized_bodies_are_refused_from_the_header() {
        let mut out = Vec::new();
        Msg::SyncPut {
            chain_ver: 1,
            chunk: ChunkId { inode: 1, index: 0 },
            version: 1,
            data: &[0; 100],
        }
        .encode(1, &mut out);
        assert!(matches!(
            decode_frame(&out[..HEADER_SIZE], 64),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn malformed_bodies_with_valid_crcs_are_errors() {
        // A client mutation carrying a version, a write without data, a bad flag.
        let c = ChunkId { inode: 1, index: 0 };
        for (kind, body) in [
            (kind::CLIENT_MUTATE, {
                let mut v = Vec::new();
                Msg::Mutate {
                    chain_ver: 1,
                    chunk: c,
                    kind: MutKind::Write,
                    offset: 0,
                    version: 3,
                    data: b"a",
                }
                .encode(0, &mut v);
                v[HEADER_SIZE..].to_vec()
            }),
            (kind::READ, vec![0; 22]),
            (kind::STAT, vec![0; 14]),
            (kind::STAT, vec![0; 12]),
            (kind::STAT, [&[0u8; 12][..], &[2]].concat()),
            (kind::REPLY, vec![77; 9]),
            (kind::HELLO, vec![0; 31]),
        ] {
            assert!(Msg::decode(kind, &body).is_err(), "kind {kind}");
        }
    }
}
