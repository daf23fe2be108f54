//! The dataplane's perf schema: per-core counters, gauges and latency histograms,
//! indexed by the constants below (positions in the static arrays).

use std::time::Duration;

use spool_perf::{CoreSlot, MetricDef, Schema};

use crate::store::ChunkOp;

pub const OP_READ: u8 = 0;
pub const OP_WRITE: u8 = 1;
pub const OP_TRUNCATE: u8 = 2;
pub const OP_DELETE: u8 = 3;
pub const OP_STAT: u8 = 4;

pub const C_READ_OPS: usize = 0;
pub const C_READ_BYTES: usize = 1;
pub const C_READ_ERRORS: usize = 2;
pub const C_WRITE_OPS: usize = 3;
pub const C_WRITE_BYTES: usize = 4;
pub const C_WRITE_ERRORS: usize = 5;
pub const C_META_OPS: usize = 6;
pub const C_META_ERRORS: usize = 7;
pub const C_NET_FRAMES_IN: usize = 8;
pub const C_NET_FRAMES_OUT: usize = 9;
pub const C_NET_BAD_FRAMES: usize = 10;
pub const C_NET_AUTH_FAILURES: usize = 11;
pub const C_REPL_CLIENT_WRITES: usize = 12;
pub const C_REPL_CHAIN_WRITES: usize = 13;
pub const C_REPL_DUPLICATES: usize = 14;
pub const C_REPL_FAILED: usize = 15;
pub const C_REPL_PROXIED: usize = 16;
pub const C_SYNC_CHUNKS: usize = 17;
pub const C_SYNC_BYTES: usize = 18;
pub const C_SYNC_APPLIED: usize = 19;
pub const C_NET_DIRECT_WRITES: usize = 20;
pub const C_NET_PEER_LINKS_LOST: usize = 21;

pub const G_IN_FLIGHT: usize = 0;

pub const H_READ_LATENCY: usize = 0;
pub const H_WRITE_LATENCY: usize = 1;
pub const H_META_LATENCY: usize = 2;
pub const H_DEVICE_QUEUE_DEPTH: usize = 3;

pub static SCHEMA: Schema = Schema {
    counters: &[
        MetricDef::new("chunk_read_ops", "Chunk reads completed"),
        MetricDef::new("chunk_read_bytes", "Bytes returned by chunk reads"),
        MetricDef::new(
            "chunk_read_errors",
            "Chunk reads that failed (I/O or checksum)",
        ),
        MetricDef::new("chunk_write_ops", "Chunk writes acknowledged or failed"),
        MetricDef::new(
            "chunk_write_bytes",
            "Bytes written by acknowledged chunk writes",
        ),
        MetricDef::new("chunk_write_errors", "Chunk writes that failed"),
        MetricDef::new("chunk_meta_ops", "Truncate, delete and stat requests"),
        MetricDef::new(
            "chunk_meta_errors",
            "Truncate, delete and stat requests that failed",
        ),
        MetricDef::new("net_frames_in", "Transport frames received and handled"),
        MetricDef::new("net_frames_out", "Transport frames queued for sending"),
        MetricDef::new(
            "net_bad_frames",
            "Connections dropped for a malformed, oversized, unauthenticated or corrupt frame",
        ),
        MetricDef::new(
            "net_auth_failures",
            "Peers that failed or never finished the cluster-key handshake",
        ),
        MetricDef::new("repl_client_writes", "Mutations received from clients (at any node)"),
        MetricDef::new("repl_chain_writes", "Mutations received from a chain predecessor"),
        MetricDef::new(
            "repl_duplicates",
            "Chain mutations already applied here (re-sent after a chain change)",
        ),
        MetricDef::new("repl_failed", "Mutations that failed here"),
        MetricDef::new("repl_proxied", "Requests relayed to the chain head or a replica"),
        MetricDef::new("sync_chunks_sent", "Whole chunks sent to a syncing replica"),
        MetricDef::new("sync_bytes_sent", "Bytes sent to syncing replicas"),
        MetricDef::new("sync_chunks_applied", "Whole chunks received and applied while syncing"),
        MetricDef::new(
            "net_direct_writes",
            "Large writes received straight from the socket into a DMA buffer",
        ),
        MetricDef::new(
            "net_peer_links_lost",
            "Links to peers that failed or closed after their handshake (dialed again when needed)",
        ),
    ],
    gauges: &[MetricDef::new(
        "chunk_ops_in_flight",
        "Requests accepted by dataplane cores and not yet completed",
    )],
    histograms: &[
        MetricDef::new(
            "chunk_read_latency_ns",
            "Chunk read latency, ring to completion",
        ),
        MetricDef::new(
            "chunk_write_latency_ns",
            "Chunk write latency until durable, ring to completion",
        ),
                MetricDef::new("chunk_meta_latency_ns", "Truncate/delete/stat latency"),
        MetricDef::new(
            "device_queue_depth",
            "Device requests in flight, sampled each time a core accepts work (is the device kept busy?)",
        ),
    ],
};

/// The op's kind and payload bytes, taken before it is handed to the store.
pub fn classify(op: &ChunkOp) -> (u8, u32) {
    match op {
        ChunkOp::Read { len, .. } => (OP_READ, *len),
        ChunkOp::Write { len, .. } => (OP_WRITE, *len),
        ChunkOp::Truncate { .. } => (OP_TRUNCATE, 0),
        ChunkOp::Delete { .. } => (OP_DELETE, 0),
        ChunkOp::Stat { .. } | ChunkOp::List { .. } => (OP_STAT, 0),
    }
}

/// Counts one completed op. Single writer per core slot, no allocation, no lock.
pub fn account(c: &CoreSlot, op: u8, bytes: u32, ok: bool, latency: Duration) {
    let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    match op {
        OP_READ => {
            c.inc(C_READ_OPS);
            if ok {
                c.add(C_READ_BYTES, u64::from(bytes));
            } else {
                c.inc(C_READ_ERRORS);
            }
            c.record(H_READ_LATENCY, ns);
        }
        OP_WRITE => {
            c.inc(C_WRITE_OPS);
            if ok {
                c.add(C_WRITE_BYTES, u64::from(bytes));
            } else {
                c.inc(C_WRITE_ERRORS);
            }
            c.record(H_WRITE_LATENCY, ns);
        }
        _ => {
            c.inc(C_META_OPS);
            if !ok {
                c.inc(C_META_ERRORS);
            }
            c.record(H_META_LATENCY, ns);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn schema_is_valid() {
        super::SCHEMA.validate().unwrap();
        assert_eq!(
            super::SCHEMA.counter_index("chunk_write_bytes"),
            Some(super::C_WRITE_BYTES)
        );
        assert_eq!(
            super::SCHEMA.histogram_index("chunk_meta_latency_ns"),
            Some(super::H_META_LATENCY)
        );
    }
}
