//! `spool bench device`: sequential write and read through the dataplane, and fio with
//! the same block size and queue depth on the same file, in one run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use spool_controlplane::config::size::ByteSize;
use spool_dataplane::device::nvme::{pci, NvmeOptions};
use spool_dataplane::device::uring::{UringDevice, UringOptions};
use spool_dataplane::device::BlockDevice;
use spool_dataplane::engine::{Engine, EngineOptions};
use spool_dataplane::metrics::SCHEMA;
use spool_dataplane::store::{self, ChunkId, ChunkOp, FormatOptions};
use spool_hugepages::{DmaPool, PagePolicy};
use spool_perf::Perf;

#[derive(Debug, clap::Args)]
pub struct DeviceBench {
    /// File (created and preallocated if missing) or block device to benchmark. Its
    /// contents are destroyed.
    #[arg(long, required_unless_present = "nvme", conflicts_with = "nvme")]
    pub path: Option<PathBuf>,
    /// PCI address of an NVMe controller (destroys its contents): Spool's rows use
    /// Spool's own NVMe driver (the controller bound to vfio-pci), fio's use the
    /// kernel's nvme driver on the same controller (handed back for them, so the nvme
    /// module must be loaded).
    #[arg(long)]
    pub nvme: Option<String>,
    /// Size of the file to create, and the bound of what is written.
    #[arg(long, default_value = "2GiB")]
    pub size: ByteSize,
    /// Bytes per request.
    #[arg(long, default_value = "1MiB")]
    pub block_size: ByteSize,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    pub queue_depth: usize,
    /// Dataplane cores.
    #[arg(long, default_value_t = 1)]
    pub cores: usize,
    /// Chunk size of the store.
    #[arg(long, default_value = "4MiB")]
    pub chunk_size: ByteSize,
    /// Skip the fio comparison.
    #[arg(long)]
    pub no_fio: bool,
    /// Also run the same requests straight through the block-device backend (one
    /// queue, no store, no engine): "device write/read" rows, which tell the backend's
    /// own cost from the store's and the engine's.
    #[arg(long)]
    pub raw: bool,
    /// Rounds; each runs spool and fio back to back (medians are reported, since a
    /// shared or virtual disk varies from run to run).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Also write the table as CSV here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) what: String,
    pub(crate) bytes: u64,
    pub(crate) secs: f64,
    pub(crate) cpu_secs: Option<f64>,
}

impl Row {
    pub(crate) fn gbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e9
    }
    pub(crate) fn cpu_per_gib(&self) -> Option<f64> {
        self.cpu_secs
            .map(|c| c / (self.bytes as f64 / (1u64 << 30) as f64))
    }
}

/// This machine's name, for the CSV rows.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// CPU seconds from a `/proc/PID/stat` file's fields `fields` (after the command
/// name): 11-12 are the process's user + system, 13-14 its waited-for children's.
fn stat_cpu_secs(pid: &str, fields: std::ops::RangeInclusive<usize>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let mut ticks = 0.0;
    for i in fields {
        ticks += f.get(i)?.parse::<f64>().ok()?;
    }
    Some(ticks / 100.0)
}

/// CPU seconds this process and its waited-for children (dd, fio) have used (user +
/// system).
pub(crate) fn process_and_children_cpu_secs() -> Option<f64> {
    stat_cpu_secs("self", 11..=14)
}

/// CPU seconds this process has used (user + system).
pub(crate) fn process_cpu_secs() -> Option<f64> {
    stat_cpu_secs("self", 11..=12)
}

/// CPU seconds this process's waited-for children have used (user + system).
pub(crate) fn children_cpu_secs() -> Option<f64> {
    stat_cpu_secs("self", 13..=14)
}

/// The CPU time a piece of work costs, wherever it runs: this process (client
/// threads, and the kernel's FUSE and socket work done on their behalf), the children
/// it waits for meanwhile (rank processes, the Azure SDK's Python), and the running
/// processes named at the start (daemons, rclone). Not counted: kernel threads
/// (writeback flushers, softirqs) and the store's server (Azurite stands in for Azure,
/// whose CPU is not the user's).
pub(crate) struct CpuSpan {
    pids: Vec<u32>,
    start_secs: f64,
}

impl CpuSpan {
    pub(crate) fn start(pids: Vec<u32>) -> CpuSpan {
        let start_secs = CpuSpan::total_secs(&pids);
        CpuSpan { pids, start_secs }
    }

    fn total_secs(pids: &[u32]) -> f64 {
        let others: f64 = pids
            .iter()
            .filter_map(|p| stat_cpu_secs(&p.to_string(), 11..=12))
            .sum();
        process_and_children_cpu_secs().unwrap_or(0.0) + others
    }

    /// CPU seconds since the start.
    pub(crate) fn secs(&self) -> f64 {
        (CpuSpan::total_secs(&self.pids) - self.start_secs).max(0.0)
    }

    /// CPU seconds since the start per GiB of `bytes` moved.
    pub(crate) fn per_gib(&self, bytes: u64) -> f64 {
        assert!(bytes > 0, "CPU per GiB of nothing");
        self.secs() / (bytes as f64 / (1u64 << 30) as f64)
    }
}

pub(crate) fn prepare_file(path: &Path, size: u64) -> Result<()> {
    let meta = std::fs::metadata(path);
    let is_block = {
        use std::os::unix::fs::FileTypeExt;
        meta.as_ref()
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false)
    };
    if is_block {
        return Ok(());
    }
    if meta.map(|m| m.len()).unwrap_or(0) < size {
        // Preallocate so neither side pays for block allocation during the run.
        let st = Command::new("fallocate")
            .arg("-l")
            .arg(size.to_string())
            .arg(path)
            .status()
            .context("running fallocate (util-linux)")?;
        if !st.success() {
            bail!("fallocate -l {size} {} failed", path.display());
        }
    }
    Ok(())
}

/// What is benchmarked: a file or block device through io_uring, or an NVMe controller
/// through Spool's driver.
enum Target<'a> {
    File(&'a Path),
    Nvme(&'a str),
}

impl Target<'_> {
    /// `n` queues to the device with `pool` registered (an NVMe controller is handed
    /// to vfio-pci first).
    fn queues(
        &self,
        uo: &UringOptions,
        n: usize,
        pool: &Arc<DmaPool>,
    ) -> Result<Vec<Box<dyn BlockDevice>>> {
        let pools = std::slice::from_ref(pool);
        match self {
            Target::File(path) => (0..n)
                .map(|_| Ok(Box::new(UringDevice::open(path, uo, pools)?) as Box<dyn BlockDevice>))
                .collect(),
            Target::Nvme(address) => {
                pci::bind_vfio(address)?;
                let no = NvmeOptions {
                    queue_depth: uo.queue_depth,
                    ..NvmeOptions::default()
                };
                Ok(crate::node::open_nvme(address, n, &no, pools)?
                    .into_iter()
                    .map(|q| Box::new(q) as Box<dyn BlockDevice>)
                    .collect())
            }
        }
    }

    /// One device queue per core, on a freshly formatted store.
    fn open(
        &self,
        uo: &UringOptions,
        fo: &FormatOptions,
        cores: usize,
        pool: &Arc<DmaPool>,
    ) -> Result<(Vec<Box<dyn BlockDevice>>, store::Superblock)> {
        let mut devices = self.queues(uo, cores, pool)?;
        let sb = store::format(devices[0].as_mut(), fo)?;
        Ok((devices, sb))
    }

    /// The path fio runs on: the file, or the controller's block device once it is
    /// back with the kernel's nvme driver.
    fn fio_path(&self) -> Result<PathBuf> {
        match self {
            Target::File(path) => Ok(path.to_path_buf()),
            Target::Nvme(address) => {
                pci::unbind_vfio(address)?;
                let t0 = Instant::now();
                loop {
                    let f = pci::list()?.into_iter().find(|f| f.address == *address);
                    if let Some(dev) = f.as_ref().and_then(|f| f.block_devices.first()) {
                        let p = Path::new("/dev").join(dev);
                        if p.exists() {
                            return Ok(p);
                        }
                    }
                    if t0.elapsed() > Duration::from_secs(10) {
                        bail!(
                            "{address} has no block device with the kernel's driver \
                             (driver: {}): load it (modprobe nvme) or pass --no-fio",
                            f.map_or_else(|| "gone".to_owned(), |f| f.driver)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

pub fn run(b: &DeviceBench) -> Result<()> {
    let (bs, qd) = (b.block_size.0, b.queue_depth);
    let target = match (&b.path, &b.nvme) {
        (Some(p), None) => Target::File(p),
        (None, Some(a)) => Target::Nvme(a),
        _ => bail!("give exactly one of --path and --nvme"),
    };
    if bs == 0 || bs % 4096 != 0 || bs > b.chunk_size.0 {
        bail!("--block-size {bs} must be a multiple of 4096 up to the chunk size");
    }
    if qd == 0 || qd > 1024 {
        bail!("--queue-depth {qd} must be between 1 and 1024");
    }
    if let Target::File(path) = target {
        prepare_file(path, b.size.0)?;
    }
    if b.repeat == 0 || b.repeat > 100 {
        bail!("--repeat {} must be between 1 and 100", b.repeat);
    }
    let uo = UringOptions {
        queue_depth: (qd + 16).max(64) as u32,
        sqpoll: false,
        iopoll: false,
    };
    let fo = FormatOptions {
        chunk_size: u32::try_from(b.chunk_size.0).context("chunk size")?,
        shards: b.cores as u32,
        wal_size: 0,
        force: true,
    };
    let pool = DmaPool::new("bench", bs as usize, qd + 2, PagePolicy::PreferHuge)?;
    let huge = pool.is_hugepage_backed();
    let mut rows: Vec<Row> = Vec::new();

    for round in 0..b.repeat {
        // A fresh store each round: rewriting committed chunks would measure
        // copy-on-write, not sequential writes.
        let (devices, sb) = target.open(&uo, &fo, b.cores, &pool)?;
        let g = sb.geometry.clone();
        let chunk = u64::from(g.chunk_size);
        // Write 3/4 of the store's capacity, in whole chunks, at most 8 GiB.
        let total = (g.capacity_bytes() * 3 / 4).min(8 << 30) / chunk * chunk;
        if total < chunk {
            bail!("--size is too small for a benchmark");
        }
        if round == 0 {
            eprintln!(
                "bench: {} x {} rounds through the dataplane ({} core(s), {bs} B requests, queue depth {qd}, \
                 chunk {} B, DMA buffers in {}), each round followed by fio with the same memory kind",
                human(total),
                b.repeat,
                b.cores,
                g.chunk_size,
                if huge { "hugepages" } else { "ordinary pages (reserve hugepages for best results)" }
            );
        }
        let opts = EngineOptions {
            cores: b.cores,
            cpus: None,
            pin: true,
            idle_spin_us: 50,
            idle_park_max_us: 1000,
            ring_capacity: qd.next_power_of_two().max(64),
        };
        let engine = Arc::new(Engine::start(
            &opts,
            devices,
            sb,
            Arc::clone(&pool),
            Perf::new(&SCHEMA, b.cores),
        )?);
        rows.push(pipeline(
            &engine,
            "spool write",
            total,
            bs,
            qd,
            chunk,
            true,
        )?);
        let w = engine.perf().snapshot().histograms["device_queue_depth"];
        rows.push(pipeline(
            &engine,
            "spool read",
            total,
            bs,
            qd,
            chunk,
            false,
        )?);
        let all = engine.perf().snapshot().histograms["device_queue_depth"];
        eprintln!(
            "bench: round {}: device queue depth while busy: write p50 {} p90 {}; write+read p50 {} p90 {} (asked for {qd})",
            round + 1,
            w.p50,
            w.p90,
            all.p50,
            all.p90
        );
        Arc::try_unwrap(engine)
            .map_err(|_| anyhow::anyhow!("engine still shared"))?
            .shutdown();
        if b.raw {
            // After the dataplane's rows, like fio's, so neither pays first-write costs
            // (a fresh file's unwritten extents) that the dataplane paid.
            let mut dev = target.queues(&uo, 1, &pool)?.remove(0);
            rows.push(raw_device(dev.as_mut(), &pool, total, bs, qd, true)?);
            rows.push(raw_device(dev.as_mut(), &pool, total, bs, qd, false)?);
        }
        if !b.no_fio {
            let path = target.fio_path()?;
            rows.push(fio(&path, "write", total, bs, qd, huge, false)?);
            rows.push(fio(&path, "read", total, bs, qd, huge, false)?);
            rows.push(fio(&path, "write", total, bs, qd, huge, true)?);
        }
        eprintln!("bench: round {} of {} done", round + 1, b.repeat);
    }

    print_table(&rows, b)?;
    Ok(())
}

fn pipeline(
    engine: &Arc<Engine>,
    what: &str,
    total: u64,
    bs: u64,
    qd: usize,
    chunk: u64,
    write: bool,
) -> Result<Row> {
    let mut client = engine.client(qd);
    let mut out = Vec::with_capacity(qd);
    let (mut next, mut done) = (0u64, 0u64);
    let cpu0 = process_cpu_secs();
    let t0 = Instant::now();
    while done < total {
        while next < total && client.in_flight() < qd {
            let Some(mut buf) = client.buffer() else {
                break;
            };
            let id = ChunkId {
                inode: 1,
                index: (next / chunk) as u32,
            };
            let offset = (next % chunk) as u32;
            let len = bs.min(total - next) as u32;
            let op = if write {
                let s = buf.as_mut_slice();
                s[..8].copy_from_slice(&next.to_le_bytes());
                ChunkOp::Write {
                    chunk: id,
                    offset,
                    len,
                    buf,
                }
            } else {
                ChunkOp::Read {
                    chunk: id,
                    offset,
                    len,
                    buf,
                }
            };
            match client.submit(next, op) {
                Ok(()) => next += u64::from(len),
                Err(_) => break,
            }
        }
        client.wait(&mut out, Duration::from_secs(30));
        for c in out.drain(..) {
            let info = c
                .result
                .with_context(|| format!("{what} at byte {}", c.tag))?;
            if !write {
                let buf = c.buf.as_ref().expect("reads return their buffer");
                let stamp = u64::from_le_bytes(buf.as_slice()[..8].try_into().expect("8 bytes"));
                if stamp != c.tag || info.version == 0 {
                    bail!("read back wrong data at byte {} (stamp {stamp})", c.tag);
                }
            }
            done += bs.min(total - c.tag);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu0.zip(process_cpu_secs()).map(|(a, b)| b - a);
    Ok(Row {
        what: what.to_owned(),
        bytes: total,
        secs,
        cpu_secs: cpu,
    })
}

/// Sequential `bs`-byte requests, `qd` in flight, straight through the device (writes
/// then one flush, as fio's end_fsync; reads check a stamp the writes left).
fn raw_device(
    dev: &mut dyn BlockDevice,
    pool: &Arc<DmaPool>,
    total: u64,
    bs: u64,
    qd: usize,
    write: bool,
) -> Result<Row> {
    use spool_dataplane::device::{IoKind, IoRequest};
    let what = if write { "device write" } else { "device read" };
    let mut done_list = Vec::with_capacity(dev.queue_depth_max());
    let (mut next, mut done) = (0u64, 0u64);
    let cpu0 = process_cpu_secs();
    let t0 = Instant::now();
    while done < total {
        while next < total && dev.in_flight() < qd {
            let Some(mut buf) = pool.alloc() else { break };
            let len = bs.min(total - next) as u32;
            if write {
                buf.as_mut_slice()[..8].copy_from_slice(&next.to_le_bytes());
            }
            let kind = if write { IoKind::Write } else { IoKind::Read };
            let req = IoRequest {
                tag: next,
                kind,
                offset: next,
                len,
                buf: Some(buf),
            };
            dev.submit(req)
                .map_err(|(e, _)| anyhow::anyhow!("{what} at byte {next}: {e}"))?;
            next += u64::from(len);
        }
        dev.poll(&mut done_list);
        for c in done_list.drain(..) {
            c.result
                .with_context(|| format!("{what} at byte {}", c.tag))?;
            if !write {
                let buf = c.buf.as_ref().expect("reads return their buffer");
                let stamp = u64::from_le_bytes(buf.as_slice()[..8].try_into().expect("8 bytes"));
                if stamp != c.tag {
                    bail!("{what}: wrong data at byte {} (stamp {stamp})", c.tag);
                }
            }
            done += bs.min(total - c.tag);
        }
    }
    if write {
        spool_dataplane::device::run_sync(dev, IoRequest::flush(u64::MAX))
            .0
            .context("flush")?;
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(Row {
        what: what.to_owned(),
        bytes: total,
        secs,
        cpu_secs: cpu0.zip(process_cpu_secs()).map(|(a, b)| b - a),
    })
}

pub(crate) fn fio(
    path: &Path,
    rw: &str,
    total: u64,
    bs: u64,
    qd: usize,
    huge: bool,
    dsync: bool,
) -> Result<Row> {
    let mut cmd = Command::new("fio");
    if dsync {
        // Every write durable when it completes, as the store's data and WAL writes
        // are (RWF_DSYNC): the like-for-like baseline for durable writes.
        cmd.arg("--sync=dsync");
    }
    let out = cmd
        .args([
            "--name=spool-bench",
            "--ioengine=io_uring",
            "--direct=1",
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={qd}"),
            &format!("--size={total}"),
            "--end_fsync=1",
            // The same kind of buffer memory as the dataplane's pool, so the ratio
            // compares I/O paths, not page sizes.
            if huge {
                "--iomem=shmhuge"
            } else {
                "--iomem=malloc"
            },
            "--output-format=json",
        ])
        .arg(format!("--filename={}", path.display()))
        .output()
        .context("running fio (install it: apt-get install fio, or pass --no-fio)")?;
    if !out.status.success() {
        bail!("fio {rw} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio JSON output")?;
    let job = &v["jobs"][0];
    let side = &job[rw];
    let bytes = side["io_bytes"].as_u64().context("fio io_bytes")?;
    let runtime_ms = job["job_runtime"]
        .as_f64()
        .or_else(|| side["runtime"].as_f64())
        .context("fio runtime")?;
    let cpu = (job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0))
        / 100.0
        * runtime_ms
        / 1000.0;
    Ok(Row {
        what: format!("fio {rw}{}", if dsync { " dsync" } else { "" }),
        bytes,
        secs: runtime_ms / 1000.0,
        cpu_secs: Some(cpu),
    })
}

fn human(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One scenario over all rounds.
struct Summary {
    what: String,
    bytes: u64,
    gbps: f64,
    min: f64,
    max: f64,
    cpu_per_gib: Option<f64>,
}

fn summarize(rows: &[Row]) -> Vec<Summary> {
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.what.as_str()) {
            names.push(&r.what);
        }
    }
    names
        .into_iter()
        .map(|n| {
            let rs: Vec<&Row> = rows.iter().filter(|r| r.what == n).collect();
            let g: Vec<f64> = rs.iter().map(|r| r.gbps()).collect();
            let cpu: Vec<f64> = rs.iter().filter_map(|r| r.cpu_per_gib()).collect();
            Summary {
                what: n.to_owned(),
                bytes: rs[0].bytes,
                gbps: median(g.clone()),
                min: g.iter().copied().fold(f64::INFINITY, f64::min),
                max: g.iter().copied().fold(0.0, f64::max),
                cpu_per_gib: (!cpu.is_empty()).then(|| median(cpu)),
            }
        })
        .collect()
}

fn print_table(rows: &[Row], b: &DeviceBench) -> Result<()> {
    let sums = summarize(rows);
    let gbps_of = |what: &str| sums.iter().find(|r| r.what == what).map(|r| r.gbps);
    println!(
        "{:<16} {:>10} {:>9} {:>15} {:>13} {:>9}",
        "scenario", "bytes", "GB/s", "min-max", "cpu_s_per_GiB", "vs_fio"
    );
    let mut csv = String::from("scenario,bytes,median_gb_per_s,min_gb_per_s,max_gb_per_s,cpu_s_per_gib,ratio_vs_fio,rounds,block_size,queue_depth,cores,host\n");
    let host = host_name();
    for r in &sums {
        let peer = match r.what.as_str() {
            "spool write" | "device write" => gbps_of("fio write"),
            "spool read" | "device read" => gbps_of("fio read"),
            _ => None,
        };
        let ratio = peer.map(|p| r.gbps / p);
        println!(
            "{:<16} {:>10} {:>9.3} {:>15} {:>13} {:>9}",
            r.what,
            human(r.bytes),
            r.gbps,
            format!("{:.2}-{:.2}", r.min, r.max),
            r.cpu_per_gib.map_or("-".into(), |c| format!("{c:.3}")),
            ratio.map_or("-".into(), |x| format!("{x:.2}x"))
        );
        csv.push_str(&format!(
            "{},{},{:.4},{:.4},{:.4},{},{},{},{},{},{},{}\n",
            r.what,
            r.bytes,
            r.gbps,
            r.min,
            r.max,
            r.cpu_per_gib.map_or(String::new(), |c| format!("{c:.4}")),
            ratio.map_or(String::new(), |x| format!("{x:.3}")),
            b.repeat,
            b.block_size.0,
            b.queue_depth,
            b.cores,
            host
        ));
    }
    if let (Some(spool), Some(dsync)) = (gbps_of("spool write"), gbps_of("fio write dsync")) {
        // The target is against plain fio; this says how much of the gap is the
        // durability the store gives every write and plain fio does not.
        println!(
            "spool write vs fio write dsync (both durable per write): {:.2}x",
            spool / dsync
        );
    }
    if let Some(p) = &b.csv {
        std::fs::write(p, csv).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
