//! `spool bench fuse`: N writers, each writing its own shard sequentially in 1 MiB
//! writes and then fsync, (a) through a Spool FUSE mount, (b) straight to the dataplane
//! with one request in flight per writer (the semantics of write(2) + fsync), and (c) to
//! files on the local filesystem; then the same data read back cold. One run, side by
//! side, medians over rounds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use spool_controlplane::config::size::ByteSize;
use spool_dataplane::device::uring::{UringDevice, UringOptions};
use spool_dataplane::device::BlockDevice;
use spool_dataplane::engine::{Engine, EngineOptions};
use spool_dataplane::metrics::SCHEMA;
use spool_dataplane::store::{self, ChunkId, ChunkOp, FormatOptions};
use spool_fuse_shim::io::ChunkIo;
use spool_fuse_shim::{MountOptions, Mounted, Namespace};
use spool_hugepages::{DmaPool, PagePolicy};
use spool_perf::Perf;

use crate::bench::{median, prepare_file, process_and_children_cpu_secs};

const IO_BYTES: u64 = 1 << 20;

#[derive(Debug, clap::Args)]
pub struct FuseBench {
    /// File (created if missing) to hold the store; its contents are destroyed.
    #[arg(long)]
    pub path: PathBuf,
    /// Size of the store file.
    #[arg(long, default_value = "6GiB")]
    pub size: ByteSize,
    /// Writer processes (threads for the direct path).
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Bytes each writer writes.
    #[arg(long, default_value = "512MiB")]
    pub shard_size: ByteSize,
    /// Directory on a local filesystem for the comparison (default: beside --path).
    #[arg(long)]
    pub local_dir: Option<PathBuf>,
    /// Every open bypasses the page cache (FUSE direct I/O; true or false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub direct_io: bool,
    /// Kernel writeback cache on the mount (true or false; needs --direct-io false).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub writeback_cache: bool,
    /// FUSE threads.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Rounds (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Also write the table as CSV here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

#[derive(Debug)]
struct Sample {
    what: &'static str,
    gbps: f64,
    /// CPU seconds (this process, which serves the mount, and the dd processes).
    cpu_secs: Option<f64>,
}

/// Runs `f` (giving GB/s) and records it with the CPU seconds it took.
fn sample(what: &'static str, f: impl FnOnce() -> Result<f64>) -> Result<Sample> {
    let cpu0 = process_and_children_cpu_secs();
    let gbps = f()?;
    let cpu_secs = cpu0
        .zip(process_and_children_cpu_secs())
        .map(|(a, b)| b - a);
    Ok(Sample {
        what,
        gbps,
        cpu_secs,
    })
}

fn drop_caches() {
    // Reads must come from the device, not the page cache (root only; best effort).
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn wait_all(children: Vec<Child>, what: &str) -> Result<()> {
    for mut c in children {
        let st = c.wait()?;
        if !st.success() {
            bail!("{what}: a dd process exited with {st}");
        }
    }
    Ok(())
}

/// N `dd` processes writing (with fsync) or reading one file each in `dir`; separate
/// processes, as a job's ranks are (a process writing into its own FUSE mount can
/// deadlock under memory reclaim).
fn dd_files(dir: &Path, n: usize, bytes: u64, write: bool) -> Result<f64> {
    let count = (bytes / IO_BYTES).to_string();
    let t0 = Instant::now();
    let children = (0..n)
        .map(|i| {
            let f = dir.join(format!("w{i}"));
            let mut c = Command::new("dd");
            if write {
                c.arg("if=/dev/zero")
                    .arg(format!("of={}", f.display()))
                    .arg("conv=fsync");
            } else {
                c.arg(format!("if={}", f.display())).arg("of=/dev/null");
            }
            c.args(["bs=1M", &format!("count={count}"), "status=none"])
                .stdin(Stdio::null())
                .spawn()
                .context("running dd")
        })
        .collect::<Result<Vec<_>>>()?;
    wait_all(children, if write { "write" } else { "read" })?;
    Ok((n as u64 * bytes) as f64 / t0.elapsed().as_secs_f64() / 1e9)
}

fn start_engine(b: &FuseBench, pool: &Arc<DmaPool>) -> Result<Arc<Engine>> {
    let uo = UringOptions {
        queue_depth: 128,
        sqpoll: false,
        iopoll: false,
    };
    let fo = FormatOptions {
        chunk_size: 4 << 20,
        shards: 1,
        wal_size: 0,
        force: true,
    };
    let sb = {
        let mut d = UringDevice::open(&b.path, &uo, &[])?;
        store::format(&mut d, &fo)?
    };
    let dev = UringDevice::open(&b.path, &uo, std::slice::from_ref(pool))?;
    let opts = EngineOptions {
        cores: 1,
        cpus: None,
        pin: true,
        idle_spin_us: 50,
        idle_park_max_us: 1000,
        ring_capacity: 256,
    };
    let devices: Vec<Box<dyn BlockDevice>> = vec![Box::new(dev)];
    Ok(Arc::new(Engine::start(
        &opts,
        devices,
        sb,
        Arc::clone(pool),
        Perf::new(&SCHEMA, 1),
    )?))
}

fn stop_engine(engine: Arc<Engine>) -> Result<()> {
    Arc::try_unwrap(engine)
        .map_err(|_| anyhow::anyhow!("engine still shared"))?
        .shutdown();
    Ok(())
}

/// N threads, one client each, sequential 1 MiB chunk writes (or reads), one request
/// in flight per writer.
fn direct(engine: &Arc<Engine>, n: usize, bytes: u64, write: bool) -> Result<f64> {
    let cs = u64::from(engine.geometry().chunk_size);
    let t0 = Instant::now();
    let threads: Vec<_> = (0..n)
        .map(|w| {
            let engine = Arc::clone(engine);
            std::thread::spawn(move || -> Result<()> {
                let mut client = engine.client(2);
                let mut off = 0u64;
                while off < bytes {
                    let mut buf = loop {
                        match client.buffer() {
                            Some(b) => break b,
                            None => std::thread::sleep(Duration::from_micros(50)),
                        }
                    };
                    buf.set_len(IO_BYTES as usize);
                    let chunk = ChunkId {
                        inode: 1000 + w as u64,
                        index: (off / cs) as u32,
                    };
                    let offset = (off % cs) as u32;
                    let op = if write {
                        buf.as_mut_slice().fill(0);
                        ChunkOp::Write {
                            chunk,
                            offset,
                            len: IO_BYTES as u32,
                            buf,
                        }
                    } else {
                        ChunkOp::Read {
                            chunk,
                            offset,
                            len: IO_BYTES as u32,
                            buf,
                        }
                    };
                    client.call(op)?;
                    off += IO_BYTES;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("direct writer panicked"))??;
    }
    Ok((n as u64 * bytes) as f64 / t0.elapsed().as_secs_f64() / 1e9)
}

pub fn run(b: &FuseBench) -> Result<()> {
    if b.writers == 0 || b.writers > 64 {
        bail!("--writers {} must be between 1 and 64", b.writers);
    }
    if b.repeat == 0 || b.repeat > 100 {
        bail!("--repeat {} must be between 1 and 100", b.repeat);
    }
    let shard = b.shard_size.0 / IO_BYTES * IO_BYTES;
    if shard == 0 {
        bail!("--shard-size must be at least 1MiB");
    }
    if (b.writers as u64) * shard > b.size.0 * 3 / 4 {
        bail!(
            "--writers x --shard-size = {} bytes does not fit 3/4 of --size {}",
            b.writers as u64 * shard,
            b.size
        );
    }
    if b.direct_io && b.writeback_cache {
        bail!("--writeback-cache true needs --direct-io false");
    }
    prepare_file(&b.path, b.size.0)?;
    let local = match &b.local_dir {
        Some(d) => d.clone(),
        None => b
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("spool-bench-local"),
    };
    std::fs::create_dir_all(&local).with_context(|| format!("creating {}", local.display()))?;
    let mnt = b.path.with_extension("bench-mnt");
    std::fs::create_dir_all(&mnt)?;
    let buffers = 2 * b.threads + 8 + 2 * b.writers;
    let pool = DmaPool::new("bench", IO_BYTES as usize, buffers, PagePolicy::PreferHuge)?;
    eprintln!(
        "bench: {} writers x {} MiB, 1 MiB writes + fsync, {} round(s); mount with {} FUSE threads, {}; local files in {}",
        b.writers,
        shard >> 20,
        b.repeat,
        b.threads,
        if b.direct_io {
            "direct I/O"
        } else if b.writeback_cache {
            "writeback cache"
        } else {
            "write-through page cache"
        },
        local.display()
    );
    let mut samples = Vec::new();
    for round in 0..b.repeat {
        // Direct.
        let engine = start_engine(b, &pool)?;
        samples.push(sample("direct write", || {
            direct(&engine, b.writers, shard, true)
        })?);
        samples.push(sample("direct read", || {
            direct(&engine, b.writers, shard, false)
        })?);
        stop_engine(engine)?;
        // Through the mount, on a fresh store.
        let engine = start_engine(b, &pool)?;
        let ns = Arc::new(Namespace::open(Arc::new(ChunkIo::new(Arc::clone(
            &engine,
        ))))?);
        let opts = MountOptions {
            mountpoint: mnt.clone(),
            threads: b.threads,
            writeback_cache: b.writeback_cache,
            direct_io: b.direct_io,
            readahead_bytes: 16 << 20,
            attr_ttl: Duration::from_secs(1),
            allow_other: true,
            attr_flush: Duration::from_secs(1),
        };
        let m = Mounted::mount(
            Arc::clone(&ns) as Arc<dyn spool_fuse_shim::ops::NsOps>,
            &opts,
        )?;
        let r = (|| -> Result<(Sample, Sample)> {
            let w = sample("mount write", || dd_files(&mnt, b.writers, shard, true))?;
            drop_caches();
            let r = sample("mount read", || dd_files(&mnt, b.writers, shard, false))?;
            Ok((w, r))
        })();
        m.unmount()?;
        drop(ns);
        stop_engine(engine)?;
        let (w, r) = r?;
        samples.push(w);
        samples.push(r);
        // Local filesystem.
        samples.push(sample("local write", || {
            dd_files(&local, b.writers, shard, true)
        })?);
        drop_caches();
        samples.push(sample("local read", || {
            dd_files(&local, b.writers, shard, false)
        })?);
        for i in 0..b.writers {
            let _ = std::fs::remove_file(local.join(format!("w{i}")));
        }
        eprintln!("bench: round {} of {} done", round + 1, b.repeat);
    }
    let _ = std::fs::remove_dir(&local);
    let _ = std::fs::remove_dir(&mnt);
    print_table(&samples, b, shard)
}

/// CPU seconds per GiB moved (median over the rounds), if measured.
fn cpu_per_gib(samples: &[Sample], what: &str, bytes: u64) -> Option<f64> {
    let v: Vec<f64> = samples
        .iter()
        .filter(|s| s.what == what)
        .filter_map(|s| s.cpu_secs)
        .map(|c| c / (bytes as f64 / (1u64 << 30) as f64))
        .collect();
    (!v.is_empty()).then(|| median(v))
}

fn print_table(samples: &[Sample], b: &FuseBench, shard: u64) -> Result<()> {
    let names = [
        "direct write",
        "direct read",
        "mount write",
        "mount read",
        "local write",
        "local read",
    ];
    let med = |n: &str| -> (f64, f64, f64) {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| s.what == n)
            .map(|s| s.gbps)
            .collect();
        (
            median(v.clone()),
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        )
    };
    println!(
        "{:<13} {:>9} {:>13} {:>14} {:>10}",
        "scenario", "GB/s", "min-max", "cpu_s_per_GiB", "vs_direct"
    );
    let bytes = b.writers as u64 * shard;
    let mut csv = String::from("scenario,median_gb_per_s,min_gb_per_s,max_gb_per_s,cpu_s_per_gib,ratio_vs_direct,writers,shard_bytes,threads,direct_io,writeback_cache,rounds\n");
    for n in names {
        let (m, lo, hi) = med(n);
        let base = if n.ends_with("write") {
            med("direct write").0
        } else {
            med("direct read").0
        };
        let ratio = m / base;
        let cpu = cpu_per_gib(samples, n, bytes).map_or("-".to_owned(), |c| format!("{c:.3}"));
        println!(
            "{:<13} {:>9.3} {:>13} {:>14} {:>9.2}x",
            n,
            m,
            format!("{lo:.2}-{hi:.2}"),
            cpu,
            ratio
        );
        csv.push_str(&format!(
            "{n},{m:.4},{lo:.4},{hi:.4},{cpu},{ratio:.3},{},{shard},{},{},{},{}\n",
            b.writers, b.threads, b.direct_io, b.writeback_cache, b.repeat
        ));
    }
    if let Some(p) = &b.csv {
        std::fs::write(p, csv).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
