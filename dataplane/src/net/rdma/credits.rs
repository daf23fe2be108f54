//! The rdma link's flow control, apart from the verbs so that it can be simulated.
//!
//! Each end has a receive ring of `ring_len` bytes and `depth` posted receives. A data
//! message is an RDMA WRITE with immediate (the length) at the next stream position of
//! the peer's ring; it consumes one of the peer's receives. A credit message is an
//! empty SEND whose immediate gives back receives and ring bytes; it consumes a receive
//! too. All counters are cumulative since the link began (they never wrap: 2^64
//! bytes), so a message never needs more than the increments.

/// An immediate with this bit set is a credit; without, a data write's length.
pub(super) const CREDIT: u32 = 1 << 31;
/// Credit increments in the other 31 bits: receives in the high 8, bytes in the low 23.
pub(super) const CREDIT_BYTES_BITS: u32 = 23;
pub(super) const CREDIT_MSGS_MAX: u32 = (1 << (31 - CREDIT_BYTES_BITS)) - 1;

/// One end's view: what it may still send, and what it owes the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Credits {
    ring_len: u64,
    depth: u32,
    peer_ring_len: u64,
    peer_depth: u32,
    // Sending: stream bytes and messages sent, and how far the peer lets us go.
    sent_bytes: u64,
    bytes_limit: u64,
    sent_msgs: u64,
    msgs_limit: u64,
    // Receiving: stream bytes landed and read, messages polled, and the limits given
    // to the peer so far.
    landed_bytes: u64,
    read_bytes: u64,
    polled_msgs: u64,
    granted_bytes: u64,
    granted_msgs: u64,
}

impl Credits {
    /// Our ring and receive depth; nothing may be sent until `connect`.
    pub(super) fn new(ring_len: u64, depth: u32) -> Self {
        assert!(
            ring_len > 0 && ring_len < 1 << CREDIT_BYTES_BITS,
            "ring_len {ring_len}"
        );
        assert!((4..=CREDIT_MSGS_MAX).contains(&depth), "depth {depth}");
        Credits {
            ring_len,
            depth,
            peer_ring_len: 0,
            peer_depth: 0,
            sent_bytes: 0,
            bytes_limit: 0,
            sent_msgs: 0,
            msgs_limit: 0,
            landed_bytes: 0,
            read_bytes: 0,
            polled_msgs: 0,
            granted_bytes: 0,
            granted_msgs: u64::from(depth),
        }
    }

    /// The peer's ring and receive depth (from its hello, already validated).
    pub(super) fn connect(&mut self, peer_ring_len: u64, peer_depth: u32) {
        self.peer_ring_len = peer_ring_len;
        self.peer_depth = peer_depth;
        self.bytes_limit = peer_ring_len;
        self.msgs_limit = u64::from(peer_depth);
    }

    /// Where and how much of `want` bytes the next data message may write: at most
    /// the peer's unused ring, never across its end, and only while two of the peer's
    /// receives are free (the last one is for a credit).
    pub(super) fn next_write(&self, want: u64) -> Option<(u64, u64)> {
        let room = self.bytes_limit - self.sent_bytes;
        if want == 0 || room == 0 || self.sent_msgs + 1 >= self.msgs_limit {
            return None;
        }
        let pos = self.sent_bytes % self.peer_ring_len;
        Some((pos, want.min(room).min(self.peer_ring_len - pos)))
    }

    /// A data message of `n` bytes (from `next_write`) was posted.
    pub(super) fn wrote(&mut self, n: u64) {
        assert!(n > 0 && self.sent_bytes + n <= self.bytes_limit);
        self.sent_bytes += n;
        self.sent_msgs += 1;
        assert!(self.sent_msgs < self.msgs_limit);
    }

    /// The immediate of a credit message due now: once half of our receives or half of
    /// our ring can be given back. It may take the peer's last receive only if it gives
    /// receives back (so two ends out of receives each have some coming).
    pub(super) fn credit_due(&self) -> Option<u32> {
        let msgs = self.polled_msgs + u64::from(self.depth) - self.granted_msgs;
        let bytes = self.read_bytes - self.granted_bytes;
        let due = msgs >= u64::from(self.depth / 2) || bytes >= self.ring_len / 2;
        let free = self.msgs_limit - self.sent_msgs;
        if !due || free == 0 || (free == 1 && msgs == 0) {
            return None;
        }
        assert!(msgs <= u64::from(CREDIT_MSGS_MAX) && bytes < 1 << CREDIT_BYTES_BITS);
        Some(CREDIT | (msgs as u32) << CREDIT_BYTES_BITS | bytes as u32)
    }

    /// The credit message `imm` (from `credit_due`) was posted.
    pub(super) fn credited(&mut self, imm: u32) {
        let (msgs, bytes) = split(imm);
        self.sent_msgs += 1;
        self.granted_msgs += msgs;
        self.granted_bytes += bytes;
        assert!(self.sent_msgs <= self.msgs_limit);
        assert!(self.granted_msgs <= self.polled_msgs + u64::from(self.depth));
        assert!(self.granted_bytes <= self.read_bytes);
    }

    /// A message from the peer (data landed in the ring, or credits): its immediate
    /// and the bytes the completion reports. A peer that breaks the protocol gets an
    /// error (the link fails), never a panic.
    pub(super) fn received(&mut self, imm: u32, byte_len: u32) -> Result<(), String> {
        if self.polled_msgs >= self.granted_msgs {
            return Err("peer sent more messages than it was given receives".into());
        }
        self.polled_msgs += 1;
        if imm & CREDIT == 0 {
            let n = u64::from(imm);
            let pos = self.landed_bytes % self.ring_len;
            if n == 0
                || u64::from(byte_len) != n
                || self.landed_bytes - self.read_bytes + n > self.ring_len
                || pos + n > self.ring_len
            {
                return Err(format!(
                    "peer wrote {n} bytes ({byte_len} reported) at ring position {pos}, \
                     outside its credit"
                ));
            }
            self.landed_bytes += n;
            return Ok(());
        }
        let (msgs, bytes) = split(imm);
        if byte_len != 0
            || self.msgs_limit + msgs > self.sent_msgs + u64::from(self.peer_depth)
            || self.bytes_limit + bytes > self.sent_bytes + self.peer_ring_len
        {
            return Err("peer gave back more credit than was used".into());
        }
        self.msgs_limit += msgs;
        self.bytes_limit += bytes;
        Ok(())
    }

    /// Bytes landed and not read yet, and the ring position of the first.
    pub(super) fn unread(&self) -> (u64, u64) {
        (
            self.read_bytes % self.ring_len,
            self.landed_bytes - self.read_bytes,
        )
    }

    /// `n` landed bytes were read.
    pub(super) fn consumed(&mut self, n: u64) {
        assert!(n <= self.landed_bytes - self.read_bytes);
        self.read_bytes += n;
    }
}

fn split(imm: u32) -> (u64, u64) {
    let msgs = u64::from((imm & !CREDIT) >> CREDIT_BYTES_BITS);
    let bytes = u64::from(imm & ((1 << CREDIT_BYTES_BITS) - 1));
    (msgs, bytes)
}

#[cfg(test)]
mod tests {
    //! A deterministic simulation of two ends exchanging data both ways over two
    //! ordered wires, with every step chosen at random among those enabled (an
    //! application write or read, a credit, a delivery): no overwrite of unread bytes,
    //! no message without a posted receive, and no state where work remains but
    //! nothing can happen (a deadlock).

    use std::collections::VecDeque;

    use rand::{Rng, SeedableRng};

    use super::*;

    struct End {
        c: Credits,
        /// Stream bytes the application still wants to send.
        to_send: u64,
        /// Free send slots: a data message holds one until the peer's NIC acknowledges
        /// it (`unacked`), which may be long before the peer polls it.
        slots: u32,
        unacked: u32,
        slot_bytes: u64,
        /// Sent and not yet polled by the peer: (immediate, bytes).
        wire: VecDeque<(u32, u32)>,
        /// The ring: the stream offset each byte holds (u64::MAX: never written).
        ring: Vec<u64>,
        /// Stream offset of the next byte written, and of the next byte read.
        written: u64,
        read: u64,
    }

    fn end(ring_len: u64, depth: u32, slots: u32, slot_bytes: u64, total: u64) -> End {
        End {
            c: Credits::new(ring_len, depth),
            to_send: total,
            slots,
            unacked: 0,
            slot_bytes,
            wire: VecDeque::new(),
            ring: vec![u64::MAX; ring_len as usize],
            written: 0,
            read: 0,
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Step {
        Write(usize),
        Credit(usize),
        Deliver(usize),
        Read(usize),
        Ack(usize),
    }

    fn enabled(e: &[End; 2]) -> Vec<Step> {
        let mut v = Vec::new();
        for i in 0..2 {
            let want = e[i].to_send.min(e[i].slot_bytes);
            if e[i].slots > 0 && e[i].c.next_write(want).is_some() {
                v.push(Step::Write(i));
            }
            if e[i].c.credit_due().is_some() {
                v.push(Step::Credit(i));
            }
            if !e[1 - i].wire.is_empty() {
                v.push(Step::Deliver(i));
            }
            if e[i].c.unread().1 > 0 {
                v.push(Step::Read(i));
            }
            if e[i].unacked > 0 {
                v.push(Step::Ack(i));
            }
        }
        v
    }

    fn simulate(seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let ring_len = 4096 * rng.gen_range(1..=4);
        let depth = rng.gen_range(4..=9);
        let slots = rng.gen_range(1..=4);
        let slot_bytes = rng.gen_range(1..=ring_len);
        let total = rng.gen_range(1..=40 * ring_len);
        // How eagerly messages are delivered: a slow wire lets both ends fill it, which
        // is where the two ends can end up waiting on each other.
        let deliver = rng.gen_range(0.02..=1.0);
        let mut e = [
            end(ring_len, depth, slots, slot_bytes, total),
            end(ring_len, depth, slots, slot_bytes, total),
        ];
        e[0].c.connect(ring_len, depth);
        e[1].c.connect(ring_len, depth);
        let what = format!(
            "seed {seed}: ring {ring_len}, depth {depth}, {slots} slots of {slot_bytes}, \
             {total} bytes each way, delivery {deliver:.2}"
        );
        for step_no in 0.. {
            let steps = enabled(&e);
            let done = e
                .iter()
                .all(|x| x.to_send == 0 && x.wire.is_empty() && x.read == total);
            if done {
                assert!(
                    steps
                        .iter()
                        .all(|s| matches!(s, Step::Credit(_) | Step::Ack(_))),
                    "{what}"
                );
                return;
            }
            assert!(
                !steps.is_empty(),
                "{what}: deadlock after {step_no} steps: {:#?}",
                e.iter().map(|x| &x.c).collect::<Vec<_>>()
            );
            let others: Vec<Step> = steps
                .iter()
                .copied()
                .filter(|s| !matches!(s, Step::Deliver(_)))
                .collect();
            let pool = if others.is_empty() || rng.gen_bool(deliver) {
                &steps
            } else {
                &others
            };
            match pool[rng.gen_range(0..pool.len())] {
                Step::Write(i) => {
                    let want = e[i].to_send.min(e[i].slot_bytes);
                    let (pos, n) = e[i].c.next_write(want).unwrap();
                    e[i].c.wrote(n);
                    e[i].to_send -= n;
                    e[i].slots -= 1;
                    e[i].unacked += 1;
                    e[i].wire.push_back((n as u32, n as u32));
                    // The peer's NIC writes the bytes now; the peer learns of them when
                    // it polls. Nothing unread may be overwritten.
                    let w = e[i].written;
                    let p = &mut e[1 - i];
                    for k in 0..n {
                        let old = p.ring[(pos + k) as usize];
                        assert!(
                            old == u64::MAX || old < p.read,
                            "{what}: overwrote unread byte {old}"
                        );
                        p.ring[(pos + k) as usize] = w + k;
                    }
                    e[i].written += n;
                }
                Step::Credit(i) => {
                    let imm = e[i].c.credit_due().unwrap();
                    e[i].c.credited(imm);
                    e[i].wire.push_back((imm, 0));
                }
                Step::Deliver(i) => {
                    let (imm, len) = e[1 - i].wire.pop_front().unwrap();
                    if let Err(why) = e[i].c.received(imm, len) {
                        panic!("{what}: {why}");
                    }
                }
                Step::Ack(i) => {
                    e[i].unacked -= 1;
                    e[i].slots += 1;
                }
                Step::Read(i) => {
                    let (pos, avail) = e[i].c.unread();
                    let n = rng.gen_range(1..=avail);
                    for k in 0..n {
                        let at = ((pos + k) % ring_len) as usize;
                        assert_eq!(e[i].ring[at], e[i].read + k, "{what}: stream order");
                    }
                    e[i].c.consumed(n);
                    e[i].read += n;
                }
            }
            // Never more messages unpolled than the receiver has receives posted.
            for x in &e {
                assert!(x.wire.len() <= depth as usize, "{what}: no receive posted");
            }
        }
    }

    #[test]
    fn random_schedules_never_overrun_and_never_deadlock() {
        for seed in 0..1000 {
            simulate(seed);
        }
    }

    #[test]
    fn a_peer_over_its_credit_is_refused() {
        let mut c = Credits::new(4096, 4);
        c.connect(4096, 4);
        // More bytes than the ring holds, then a message past the receives given.
        assert!(c.received(4097, 4097).is_err());
        let mut c = Credits::new(4096, 4);
        c.connect(4096, 4);
        for _ in 0..4 {
            c.received(1, 1).unwrap();
        }
        assert!(c.received(1, 1).unwrap_err().contains("receives"));
        // A length that disagrees with the completion, a zero write.
        let mut c = Credits::new(4096, 4);
        c.connect(4096, 4);
        assert!(c.received(10, 11).is_err());
        assert!(c.received(0, 0).is_err());
        // Credit for what was never sent.
        let mut c = Credits::new(4096, 4);
        c.connect(4096, 4);
        assert!(c
            .received(CREDIT | 1, 0)
            .unwrap_err()
            .contains("more credit"));
        assert!(c.received(CREDIT | 1 << CREDIT_BYTES_BITS, 0).is_err());
    }
}
