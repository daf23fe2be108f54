//! Shared by the namespace tests: an engine over a fresh or crashed mem device, and
//! small builders.
#![allow(dead_code)]

use std::sync::Arc;

use spool_dataplane::device::mem::MemDevice;
use spool_dataplane::device::BlockDevice;
use spool_dataplane::engine::{Engine, EngineOptions};
use spool_dataplane::metrics::SCHEMA;
use spool_dataplane::store::{self, FormatOptions};
use spool_fuse_shim::io::ChunkIo;
use spool_fuse_shim::meta::record::Kind;
use spool_fuse_shim::meta::state::ROOT_INO;
use spool_fuse_shim::meta::NewNode;
use spool_fuse_shim::{Namespace, Result};
use spool_hugepages::{DmaPool, PagePolicy};
use spool_perf::Perf;

pub const CHUNK: u32 = 64 << 10;
pub const DEVICE_BYTES: u64 = 64 << 20;

pub fn engine_on(dev: MemDevice) -> Arc<Engine> {
    let sb = {
        let mut probe = dev.another_queue();
        store::read_superblock(&mut probe).expect("superblock")
    };
    let pool = DmaPool::new("t", CHUNK as usize, 24, PagePolicy::Normal).unwrap();
    let opts = EngineOptions {
        cores: 1,
        cpus: None,
        pin: false,
        idle_spin_us: 5,
        idle_park_max_us: 200,
        ring_capacity: 64,
    };
    let devs: Vec<Box<dyn BlockDevice>> = vec![Box::new(dev)];
    Arc::new(Engine::start(&opts, devs, sb, pool, Perf::new(&SCHEMA, 1)).expect("engine"))
}

pub fn fresh_device() -> MemDevice {
    let mut dev = MemDevice::new(DEVICE_BYTES, 64);
    store::format(
        &mut dev,
        &FormatOptions {
            chunk_size: CHUNK,
            shards: 1,
            wal_size: 0,
            force: false,
        },
    )
    .unwrap();
    dev
}

pub fn file(perm: u16) -> NewNode<'static> {
    NewNode {
        kind: Kind::File,
        perm,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: &[],
    }
}

pub fn dir() -> NewNode<'static> {
    NewNode {
        kind: Kind::Dir,
        ..file(0o755)
    }
}

pub fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31) ^ (i as u8) ^ (i >> 12) as u8)
        .collect()
}

pub fn lookup_path(ns: &Namespace, path: &[&str]) -> Result<u64> {
    let mut ino = ROOT_INO;
    for p in path {
        ino = ns.lookup(ino, p.as_bytes())?.ino;
    }
    Ok(ino)
}

pub fn open_ns(engine: &Arc<Engine>) -> Result<Namespace> {
    Namespace::open(Arc::new(ChunkIo::new(Arc::clone(engine))))
}

pub fn shutdown(engine: Arc<Engine>) {
    Arc::try_unwrap(engine).expect("engine unshared").shutdown();
}
