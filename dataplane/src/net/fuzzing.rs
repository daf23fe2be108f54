//! Entry point of the transport decoder's fuzz target (`net_frame`).
//!
//! The cargo-fuzz target `dataplane/fuzz/fuzz_targets/net_frame.rs` and the corpus
//! replay test (`dataplane/tests/fuzz_corpus.rs`) call [`fuzz_net_frame`], so a crash
//! the fuzzer finds is a failing ordinary test once its input is added to the corpus.
//!
//! An input is one selector byte and then the bytes a peer sent: the selector picks the
//! body limit (`BODY_LIMITS[selector % BODY_LIMITS.len()]`), small ones so that
//! `FrameError::TooLarge` is reached. The bytes are decoded as a connection does
//! (`decode_frame` at the front, consume the whole frame, stop at `Ok(None)` or an
//! error), and every decoded message must re-encode to the same frame body and decode
//! back to itself. Frames carry crcs, so the function also runs a copy with the magic
//! set and the crcs recomputed, which gets mutated inputs into the body decoders; and it
//! feeds the whole input to `Msg::decode` as the body of every kind. Nothing may panic.

use super::frame::{
    decode_frame, kind, FrameError, Header, Msg, MutKind, Status, HEADER_SIZE, MAGIC, NONCE_SIZE,
};
use crate::store::ChunkId;

/// The body limits an input's first byte selects from: none fits, the small handshake
/// and control messages fit, a block fits, the client's limit, no limit.
pub const BODY_LIMITS: [u32; 5] = [0, 48, 4096, 64 << 20, u32::MAX];

// Where the header fields are (`Header::encode`); the tests below check them.
const H_MAGIC: std::ops::Range<usize> = 0..4;
const H_VERSION: usize = 4;
const H_KIND: usize = 5;
const H_BODY_LEN: std::ops::Range<usize> = 16..20;
const H_BODY_CRC: std::ops::Range<usize> = 20..24;
const H_CRC: std::ops::Range<usize> = 24..28;

fn le32(b: &[u8], r: std::ops::Range<usize>) -> u32 {
    u32::from_le_bytes(b[r].try_into().expect("4 bytes"))
}

/// Sets the magic and recomputes the body crc (when the body is in `b`) and the header
/// crc of every frame of the stream `b`, following the body lengths the headers claim.
/// The version and kind are left as they are.
pub fn fix_frame_crcs(b: &mut [u8]) {
    let mut pos = 0usize;
    while b.len() - pos >= HEADER_SIZE {
        let f = &mut b[pos..];
        f[H_MAGIC].copy_from_slice(&MAGIC.to_le_bytes());
        let body_len = le32(f, H_BODY_LEN) as usize;
        let end = HEADER_SIZE.checked_add(body_len);
        if let Some(body) = end.and_then(|end| f.get(HEADER_SIZE..end)) {
            let c = crc32c::crc32c(body);
            f[H_BODY_CRC].copy_from_slice(&c.to_le_bytes());
        }
        let c = crc32c::crc32c(&f[..H_CRC.start]);
        f[H_CRC].copy_from_slice(&c.to_le_bytes());
        match end.and_then(|end| pos.checked_add(end)) {
            Some(next) if next <= b.len() => pos = next,
            _ => break,
        }
    }
}

/// The fuzz target: see the module documentation.
pub fn fuzz_net_frame(data: &[u8]) {
    // Unknown kinds too (0 and the one past the last), for the error path.
    for k in 0..=kind::STAT + 1 {
        check_body(k, data);
    }
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let body_max = BODY_LIMITS[usize::from(selector) % BODY_LIMITS.len()];
    check_stream(stream, body_max);
    check_deferred(stream, body_max);
    if stream.len() >= HEADER_SIZE {
        let mut fixed = stream.to_vec();
        fix_frame_crcs(&mut fixed);
        if fixed != stream {
            check_stream(&fixed, body_max);
        }
    }
}

/// The receive path's `decode_frame_deferred` (a write's body crc checked later from
/// its data crc, through `check_mutate_crc`) accepts exactly what `decode_frame` does.
fn check_deferred(buf: &[u8], body_max: u32) {
    let plain = decode_frame(buf, body_max);
    let deferred = super::frame::decode_frame_deferred(buf, body_max);
    match (plain, deferred) {
        (Ok(None), Ok(None)) => {}
        (Ok(Some((h, m, n))), Ok(Some((h2, m2, n2, late)))) => {
            assert_eq!((h, &m, n), (h2, &m2, n2));
            if late {
                let Msg::Mutate { data, .. } = &m2 else {
                    panic!("deferred crc on {m2:?}")
                };
                super::frame::check_mutate_crc(&h2, &m2, crc32c::crc32c(data))
                    .expect("a frame decode_frame accepts passes the deferred check");
            }
        }
        (Err(_), Ok(Some((h, m, _, true)))) => {
            // Only the body crc may be what decode_frame refused: then the deferred
            // check must refuse it too.
            let Msg::Mutate { data, .. } = &m else {
                panic!("deferred crc on {m:?}")
            };
            assert!(
                super::frame::check_mutate_crc(&h, &m, crc32c::crc32c(data)).is_err(),
                "decode_frame refused a frame the deferred path accepts"
            );
        }
        (Err(_), Err(_)) => {}
        (p, d) => panic!("decode_frame {p:?} but decode_frame_deferred {d:?}"),
    }
}

/// `Msg::decode(k, body)` directly (no header): an error of the right kind, or a
/// message whose encoding is exactly `body` and which decodes back to itself.
fn check_body(k: u8, body: &[u8]) {
    match Msg::decode(k, body) {
        Ok(m) => {
            assert_eq!(m.kind(), k, "a body decoded as kind {k} is a {m:?}");
            let mut out = vec![0xa5; 3]; // encode appends: not at the start of the buffer
            m.encode(7, &mut out);
            assert_eq!(
                &out[3 + HEADER_SIZE..],
                body,
                "the encoding of a decoded {m:?} is not its body"
            );
            match decode_frame(&out[3..], u32::MAX) {
                Ok(Some((h, back, n))) => {
                    assert_eq!((h.kind, h.req_id, n), (k, 7, out.len() - 3));
                    assert_eq!(back, m, "body round trip");
                }
                other => panic!("the encoding of {m:?} does not decode: {other:?}"),
            }
        }
        Err(e) => {
            let _ = e.to_string();
            match e {
                FrameError::Kind(got) => {
                    assert_eq!(got, k);
                    assert!(
                        !(kind::HELLO..=kind::REPLY).contains(&k),
                        "kind {k} refused"
                    );
                }
                FrameError::Body { kind: got, .. } => assert_eq!(got, k),
                e => panic!("Msg::decode failed with a header error: {e:?}"),
            }
        }
    }
}

/// Decodes `buf` as a connection does, checking every frame and the error or
/// incomplete frame that ends it; then re-encodes the messages as one stream and checks
/// it decodes to the same frames.
fn check_stream(buf: &[u8], body_max: u32) {
    let mut frames: Vec<(Header, Msg<'_>)> = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        match decode_frame(rest, body_max) {
            Ok(None) => {
                if rest.len() >= HEADER_SIZE {
                    let need = HEADER_SIZE as u64 + u64::from(le32(rest, H_BODY_LEN));
                    assert!(
                        (rest.len() as u64) < need,
                        "Ok(None) with a whole frame of {need} bytes in {} bytes",
                        rest.len()
                    );
                }
                break;
            }
            Ok(Some((h, m, n))) => {
                check_frame(&rest[..n], &h, &m, body_max);
                frames.push((h, m));
                pos += n;
            }
            Err(e) => {
                let _ = e.to_string();
                assert!(rest.len() >= HEADER_SIZE, "{e:?} before a whole header");
                match e {
                    FrameError::TooLarge { len, max } => {
                        assert_eq!(max, body_max);
                        assert!(len > max, "{e:?}");
                        assert_eq!(len, le32(rest, H_BODY_LEN));
                    }
                    FrameError::Kind(k) => {
                        assert_eq!(k, rest[H_KIND]);
                        assert!(
                            !(kind::HELLO..=kind::REPLY).contains(&k),
                            "kind {k} refused"
                        );
                    }
                    FrameError::Body { kind: k, .. } => assert_eq!(k, rest[H_KIND]),
                    FrameError::Version(v) => assert_eq!(v, rest[H_VERSION]),
                    FrameError::Magic(m) => assert_eq!(m, le32(rest, H_MAGIC)),
                    FrameError::Reserved => assert!(rest[6] != 0 || rest[7] != 0),
                    FrameError::HeaderCrc | FrameError::BodyCrc => {}
                }
                break;
            }
        }
    }

    // The peer sends the same messages again: the same frames, the whole stream.
    let mut again = Vec::new();
    for (h, m) in &frames {
        m.encode(h.req_id, &mut again);
    }
    let mut at = 0;
    for (h, m) in &frames {
        match decode_frame(&again[at..], body_max) {
            Ok(Some((h2, m2, n))) => {
                assert_eq!((&h2, &m2), (h, m), "stream round trip");
                at += n;
            }
            other => panic!("re-encoded {m:?} does not decode in a stream: {other:?}"),
        }
    }
    assert_eq!(at, again.len());
    assert_eq!(decode_frame(&again[at..], body_max), Ok(None));
}

/// One decoded frame (`frame` is exactly its bytes): its header agrees with the
/// message, it re-encodes to the same body, and decodes back to the same message.
fn check_frame(frame: &[u8], h: &Header, m: &Msg<'_>, body_max: u32) {
    assert_eq!(frame.len(), HEADER_SIZE + h.body_len as usize);
    assert!(h.body_len <= body_max);
    assert_eq!(
        m.kind(),
        h.kind,
        "a frame of kind {} decoded as {m:?}",
        h.kind
    );

    let mut out = Vec::new();
    m.encode(h.req_id, &mut out);
    // The body encoding is canonical; the header may differ only in its reserved bytes
    // (6..8, ignored by the decoder) and so in its crc.
    assert_eq!(
        out[HEADER_SIZE..],
        frame[HEADER_SIZE..],
        "the re-encoded body of {m:?} differs"
    );
    assert_eq!(out[..6], frame[..6], "header of {m:?}");
    assert_eq!(
        out[8..H_CRC.start],
        frame[8..H_CRC.start],
        "header of {m:?}"
    );
    match decode_frame(&out, body_max) {
        Ok(Some((h2, m2, n))) => {
            assert_eq!(h2, *h, "header round trip");
            assert_eq!(m2, *m, "message round trip");
            assert_eq!(n, out.len());
        }
        other => panic!("re-encoded {m:?} does not decode: {other:?}"),
    }
    // A connection that has not received the whole frame waits for more.
    for cut in [HEADER_SIZE - 1, HEADER_SIZE, out.len() - 1] {
        if cut < out.len() {
            assert_eq!(
                decode_frame(&out[..cut], body_max),
                Ok(None),
                "cut at {cut}"
            );
        }
    }
}

// ---- seeds --------------------------------------------------------------------------

/// Index in `BODY_LIMITS` of each limit the seeds use.
const LIMIT_0: u8 = 0;
const LIMIT_48: u8 = 1;
const LIMIT_4K: u8 = 2;
const LIMIT_CLIENT: u8 = 3;
const LIMIT_NONE: u8 = 4;

fn nonce(first: u8) -> [u8; NONCE_SIZE] {
    std::array::from_fn(|i| first.wrapping_add(i as u8))
}

/// One message of every kind and shape the peers send (the data they borrow is
/// `data`).
fn samples(data: &[u8]) -> Vec<(&'static str, Msg<'_>)> {
    let c = ChunkId {
        inode: 0x1234,
        index: 7,
    };
    vec![
        ("hello", Msg::Hello { nonce: nonce(1) }),
        (
            "challenge",
            Msg::Challenge {
                nonce: nonce(0x40),
                proof: nonce(0x80),
            },
        ),
        ("proof", Msg::Proof { proof: nonce(0xc0) }),
        (
            "client_mutate_write",
            Msg::Mutate {
                chain_ver: 5,
                chunk: c,
                kind: MutKind::Write,
                offset: 4096,
                version: 0,
                data: &data[..100],
            },
        ),
        (
            "chain_mutate_truncate",
            Msg::Mutate {
                chain_ver: 5,
                chunk: c,
                kind: MutKind::Truncate,
                offset: 8192,
                version: 9,
                data: b"",
            },
        ),
        (
            "client_mutate_delete",
            Msg::Mutate {
                chain_ver: 6,
                chunk: c,
                kind: MutKind::Delete,
                offset: 0,
                version: 0,
                data: b"",
            },
        ),
        (
            "chain_mutate_write",
            Msg::Mutate {
                chain_ver: 6,
                chunk: c,
                kind: MutKind::Write,
                offset: 0,
                version: 10,
                data: &data[..4096],
            },
        ),
        (
            "read_local",
            Msg::Read {
                chunk: c,
                offset: 512,
                len: 4096,
                local: true,
            },
        ),
        (
            "stat",
            Msg::Stat {
                chunk: c,
                local: false,
            },
        ),
        (
            "list_first",
            Msg::List {
                chain: 3,
                shard: 0,
                after: None,
            },
        ),
        (
            "list_after",
            Msg::List {
                chain: 3,
                shard: 1,
                after: Some(c),
            },
        ),
        (
            "sync_put",
            Msg::SyncPut {
                chain_ver: 2,
                chunk: c,
                version: 4,
                data: &data[..300],
            },
        ),
        (
            "sync_put_delete",
            Msg::SyncPut {
                chain_ver: 2,
                chunk: c,
                version: 0,
                data: b"",
            },
        ),
        (
            "reply_ok_data",
            Msg::Reply {
                status: Status::Ok,
                version: 11,
                data: &data[..64],
            },
        ),
        (
            "reply_stale_chain",
            Msg::Reply {
                status: Status::StaleChain,
                version: 8,
                data: b"",
            },
        ),
    ]
}

fn input(limit: u8, stream: &[u8]) -> Vec<u8> {
    let mut b = vec![limit];
    b.extend_from_slice(stream);
    b
}

/// `stream` with its crcs recomputed after an edit (see `fix_frame_crcs`).
fn fixed(mut stream: Vec<u8>) -> Vec<u8> {
    fix_frame_crcs(&mut stream);
    stream
}

/// The seed corpus of `net_frame`: valid frames of every kind, streams of several,
/// truncated streams, flipped bits, oversized bodies, and bodies that are wrong behind
/// valid crcs. Written to `dataplane/fuzz/corpus/net_frame/` by the ignored test
/// `write_seed_corpus` of `dataplane/tests/fuzz_corpus.rs`.
pub fn seed_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + i / 256) as u8).collect();
    let samples = samples(&data);
    let frame = |name: &str| -> Vec<u8> {
        let (_, m) = samples.iter().find(|(n, _)| *n == name).expect("sample");
        let mut out = Vec::new();
        m.encode(0x0102_0304_0506_0708, &mut out);
        out
    };
    let stream = |names: &[&str]| -> Vec<u8> {
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let (_, m) = samples.iter().find(|(n, _)| n == name).expect("sample");
            m.encode(100 + i as u64, &mut out);
        }
        out
    };
    let edit = |mut b: Vec<u8>, at: usize, v: &[u8]| {
        b[at..at + v.len()].copy_from_slice(v);
        b
    };

    let mut seeds: Vec<(&'static str, Vec<u8>)> = Vec::new();
    for name in [
        "hello",
        "challenge",
        "client_mutate_write",
        "chain_mutate_truncate",
        "client_mutate_delete",
        "read_local",
        "list_after",
        "sync_put",
        "reply_ok_data",
    ] {
        seeds.push((name, input(LIMIT_CLIENT, &frame(name))));
    }
    // Every sample but the 4 KiB write, one after another.
    let all: Vec<&str> = samples
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| *n != "chain_mutate_write")
        .collect();
    let all_kinds = stream(&all);
    let hello_len = frame("hello").len();
    let write = frame("client_mutate_write");
    let read = frame("read_local");
    let reply = frame("reply_ok_data");
    let garbage: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37)).collect();
    seeds.extend([
        ("all_kinds_stream", input(LIMIT_NONE, &all_kinds)),
        (
            "handshake_stream",
            input(LIMIT_48, &stream(&["hello", "challenge", "proof"])),
        ),
        // Hello fits, the challenge's 64 bytes do not.
        ("all_kinds_limit_48", input(LIMIT_48, &all_kinds)),
        ("hello_limit_0", input(LIMIT_0, &frame("hello"))),
        (
            "write_4k_over_limit_4k",
            input(LIMIT_4K, &frame("chain_mutate_write")),
        ),
        (
            "write_4k_client_limit",
            input(LIMIT_CLIENT, &frame("chain_mutate_write")),
        ),
        (
            "truncated_header",
            input(LIMIT_NONE, &all_kinds[..hello_len + 10]),
        ),
        (
            "truncated_body",
            input(LIMIT_NONE, &all_kinds[..hello_len + HEADER_SIZE + 40]),
        ),
        ("header_bit_flipped", {
            let mut b = write.clone();
            b[9] ^= 0x08; // in the request id
            input(LIMIT_CLIENT, &b)
        }),
        ("body_bit_flipped", {
            let mut b = write.clone();
            b[HEADER_SIZE + 30] ^= 0x01;
            input(LIMIT_CLIENT, &b)
        }),
        (
            "wrong_magic",
            input(LIMIT_CLIENT, &edit(read.clone(), 0, b"SPLX")),
        ),
        (
            "version_2",
            input(LIMIT_CLIENT, &fixed(edit(read.clone(), H_VERSION, &[2]))),
        ),
        (
            "unknown_kind_11",
            input(
                LIMIT_CLIENT,
                &fixed(edit(read.clone(), H_KIND, &[kind::STAT + 1])),
            ),
        ),
        (
            "client_mutate_with_version",
            input(
                LIMIT_CLIENT,
                &fixed(edit(
                    frame("chain_mutate_truncate"),
                    H_KIND,
                    &[kind::CLIENT_MUTATE],
                )),
            ),
        ),
        (
            "unknown_mutation_kind",
            input(LIMIT_CLIENT, &fixed(edit(write, HEADER_SIZE + 20, &[7]))),
        ),
        ("read_bad_flag", {
            let last = read.len() - 1;
            input(LIMIT_CLIENT, &fixed(edit(read, last, &[2])))
        }),
        ("hello_trailing_byte", {
            let mut b = frame("hello");
            b.push(0);
            let len = b.len() - HEADER_SIZE;
            input(
                LIMIT_CLIENT,
                &fixed(edit(b, H_BODY_LEN.start, &(len as u32).to_le_bytes())),
            )
        }),
        (
            "reply_unknown_status",
            input(LIMIT_CLIENT, &fixed(edit(reply, HEADER_SIZE, &[77]))),
        ),
        ("hello_then_garbage", {
            let mut b = frame("hello");
            b.extend_from_slice(&garbage);
            input(LIMIT_NONE, &b)
        }),
        ("empty", Vec::new()),
    ]);
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_matches_the_encoder() {
        let h = Header {
            kind: kind::READ,
            req_id: 3,
            body_len: 0x0102_0304,
            body_crc: 0x0a0b_0c0d,
        };
        let mut b = [0u8; HEADER_SIZE];
        h.encode(&mut b);
        assert_eq!(le32(&b, H_MAGIC), MAGIC);
        assert_eq!(b[H_KIND], kind::READ);
        assert_eq!(b[H_VERSION], super::super::frame::VERSION);
        assert_eq!(le32(&b, H_BODY_LEN), h.body_len);
        assert_eq!(le32(&b, H_BODY_CRC), h.body_crc);
        let mut fixed = b;
        fix_frame_crcs(&mut fixed);
        assert_eq!(fixed[..20], b[..20], "only the crcs change");
        assert_eq!(
            fixed, b,
            "no body in the buffer: only the header crc is fixed"
        );
    }

    #[test]
    fn fixing_crcs_keeps_valid_streams_and_repairs_damaged_ones() {
        let data = vec![9u8; 4096];
        let mut stream = Vec::new();
        for (i, (_, m)) in samples(&data).iter().enumerate() {
            m.encode(i as u64, &mut stream);
        }
        let mut same = stream.clone();
        fix_frame_crcs(&mut same);
        assert_eq!(same, stream);
        let mut damaged = stream.clone();
        damaged[0] ^= 1; // magic
        damaged[HEADER_SIZE + 1] ^= 1; // hello nonce
        assert!(decode_frame(&damaged, u32::MAX).is_err());
        fix_frame_crcs(&mut damaged);
        let (_, m, _) = decode_frame(&damaged, u32::MAX).unwrap().unwrap();
        assert!(matches!(m, Msg::Hello { nonce } if nonce[1] == 3));
    }

    #[test]
    fn seeds_pass_and_reach_every_outcome() {
        let seeds = seed_inputs();
        let mut errors = Vec::new();
        let mut kinds = Vec::new();
        for (name, data) in &seeds {
            fuzz_net_frame(data);
            for cut in [0, 1, 20, data.len() / 2, data.len().saturating_sub(1)] {
                fuzz_net_frame(&data[..cut.min(data.len())]);
            }
            let Some((&sel, mut s)) = data.split_first() else {
                continue;
            };
            let max = BODY_LIMITS[usize::from(sel) % BODY_LIMITS.len()];
            loop {
                match decode_frame(s, max) {
                    Ok(Some((h, _, n))) => {
                        kinds.push(h.kind);
                        s = &s[n..];
                    }
                    Ok(None) => break,
                    Err(e) => {
                        errors.push(std::mem::discriminant(&e));
                        eprintln!("{name}: {e}");
                        break;
                    }
                }
            }
        }
        for k in kind::HELLO..=kind::STAT {
            assert!(kinds.contains(&k), "no seed has a valid frame of kind {k}");
        }
        for e in [
            FrameError::Magic(0),
            FrameError::Version(0),
            FrameError::HeaderCrc,
            FrameError::BodyCrc,
            FrameError::TooLarge { len: 0, max: 0 },
            FrameError::Kind(0),
            FrameError::Body { kind: 0, why: "" },
        ] {
            assert!(
                errors.contains(&std::mem::discriminant(&e)),
                "no seed fails with {e:?}"
            );
        }
    }
}
