//! Blocking access to the dataplane for FUSE threads: a pool of engine clients and
//! helpers that run a set of chunk ops in parallel and wait for all of them.
//!
//! A `Client` is single-threaded but may move between threads (it records the waiting
//! thread at each wait), so FUSE threads borrow one from a lock-free pool per request.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use spool_dataplane::engine::{Client, Engine};
use spool_dataplane::store::{ChunkInfo, ChunkOp, ShardCompletion};
use spool_dataplane::Error as DpError;
use spool_hugepages::DmaBuf;

/// DMA buffers one request holds at a time: every caller works in windows of this many
/// pieces, so `threads x WINDOW_BUFFERS_MAX` bounds what FUSE threads hold and a thread
/// waiting for a buffer never waits on one held by another waiting thread (the config
/// requires `hugepages.buffers >= 2 x mount.threads + 8`).
pub const WINDOW_BUFFERS_MAX: usize = 2;
/// Requests one borrowed client keeps in flight.
const CLIENT_INFLIGHT_MAX: usize = 16;
/// Clients kept for reuse; more are made on demand and dropped when the pool is full.
const CLIENTS_POOLED_MAX: usize = 64;

#[derive(Debug)]
pub struct ChunkIo {
    engine: Arc<Engine>,
    clients: ArrayQueue<Client>,
    pub chunk_size: u32,
    /// Bytes one DMA buffer holds (the largest single chunk op).
    pub io_size_max: u32,
}

/// The outcome of one op of a batch: the store's answer and the buffer back.
pub type OpResult = (Result<ChunkInfo, DpError>, Option<DmaBuf>);

impl ChunkIo {
    pub fn new(engine: Arc<Engine>) -> ChunkIo {
        let chunk_size = engine.geometry().chunk_size;
        let io_size_max = engine.pool().buf_size() as u32;
        assert!(io_size_max >= 4096 && io_size_max % 4096 == 0);
        ChunkIo {
            engine,
            clients: ArrayQueue::new(CLIENTS_POOLED_MAX),
            chunk_size,
            io_size_max: io_size_max.min(chunk_size),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// A DMA buffer, waiting (with backoff) while all are in use: buffers come back as
    /// other requests finish, so this never fails.
    pub fn buffer(&self) -> DmaBuf {
        let mut wait_us = 10u64;
        loop {
            if let Some(b) = self.engine.pool().alloc() {
                return b;
            }
            std::thread::sleep(Duration::from_micros(wait_us));
            wait_us = (wait_us * 2).min(2_000);
        }
    }

    /// Runs `ops` (pipelined, at most `CLIENT_INFLIGHT_MAX` in flight) and returns
    /// their outcomes in the same order.
    pub fn run(&self, ops: Vec<ChunkOp>) -> Vec<OpResult> {
        let mut client = self
            .clients
            .pop()
            .unwrap_or_else(|| self.engine.client(CLIENT_INFLIGHT_MAX));
        let n = ops.len();
        let mut results: Vec<Option<OpResult>> = (0..n).map(|_| None).collect();
        let mut done: Vec<ShardCompletion> = Vec::with_capacity(CLIENT_INFLIGHT_MAX);
        let mut pending = ops.into_iter().enumerate().peekable();
        let mut finished = 0usize;
        let mut stash: Option<(usize, ChunkOp)> = None;
        while finished < n {
            // Submit while there is room.
            loop {
                let next = stash.take().or_else(|| pending.next());
                let Some((i, op)) = next else { break };
                match client.submit(i as u64, op) {
                    Ok(()) => {}
                    Err((DpError::Busy, back)) => {
                        stash = Some((i, back));
                        break;
                    }
                    Err((e, back)) => {
                        results[i] = Some((Err(e), back.into_buf()));
                        finished += 1;
                    }
                }
            }
            if finished == n {
                break;
            }
            if client.in_flight() == 0 {
                // Busy with nothing of ours in flight: the core's ring is full.
                std::thread::yield_now();
                continue;
            }
            client.wait(&mut done, Duration::from_millis(100));
            for c in done.drain(..) {
                let i = c.tag as usize;
                assert!(results[i].is_none(), "one completion per request");
                results[i] = Some((c.result, c.buf));
                finished += 1;
            }
        }
        assert_eq!(client.in_flight(), 0);
        let _ = self.clients.push(client);
        results
            .into_iter()
            .map(|r| r.expect("every op completed"))
            .collect()
    }

    /// Runs one op.
    pub fn run_one(&self, op: ChunkOp) -> OpResult {
        self.run(vec![op]).pop().expect("one result")
    }
}
