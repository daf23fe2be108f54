//! `spool`: the daemon and its command-line tools.
#![forbid(unsafe_code)]

mod bench;
mod bench_all;
mod bench_blob;
mod bench_checkpoint;
mod bench_cluster;
mod bench_fuse;
mod bench_scale;
mod bench_transport;
mod node;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use spool_controlplane::admin;
use spool_controlplane::config::size::ByteSize;
use spool_controlplane::config::DEFAULT_ADMIN_SOCKET;

/// Spool: a kernel-bypass distributed NVMe cache for GPU clusters.
#[derive(Debug, Parser)]
#[command(name = "spool", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the daemon: the dataplane, the admin socket and metrics.
    Serve {
        /// The node's TOML config (see deploy/examples/single-node.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Lay out a Spool store on a file, a block device or an NVMe controller
    /// (destroys its contents).
    Format {
        /// File, block device, or the PCI address of an NVMe controller bound to
        /// vfio-pci (e.g. 0000:00:04.0: formatted through Spool's own NVMe driver).
        path: PathBuf,
        /// Create (or grow) a file of this size first.
        #[arg(long)]
        size: Option<ByteSize>,
        /// Bytes per chunk: a power of two from 64KiB to 64MiB.
        #[arg(long, default_value = "4MiB")]
        chunk_size: ByteSize,
        /// Independent shards (each owned by one dataplane core).
        #[arg(long, default_value_t = 1)]
        shards: u32,
        /// Overwrite a device that holds a Spool or another filesystem.
        #[arg(long)]
        force: bool,
    },
    /// Show the daemon's state: device, shards, cores, capacity; with PATH, the
    /// blob state of a file in the mount (dirty, flushing, or in-blob with its ETag).
    Status {
        /// A file in the mount.
        path: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Exit 0 only if the node is ready to serve (for probes): no failed shard;
        /// in a cluster also not fenced, a chain table installed, and every target of
        /// this node serving (not syncing, waiting or offline).
        #[arg(long)]
        ready: bool,
    },
    /// Performance counters.
    Perf {
        #[command(subcommand)]
        cmd: PerfCmd,
    },
    /// The running configuration.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Change the daemon's log level (error, warn, info, debug, trace or a filter).
    LogLevel {
        level: String,
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
    },
    /// Mount the running daemon's namespace at MOUNTPOINT (FUSE).
    Mount {
        mountpoint: PathBuf,
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
    },
    /// Unmount it: dirty data is flushed and the namespace checkpointed first.
    Umount {
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
    },
    /// Upload dirty files to the blob store now (all, or those under PATH) instead of
    /// after the writeback delay; with --wait, show progress until they are there.
    Flush {
        /// A file or directory in the mount (absolute, or relative to the mount).
        path: Option<String>,
        /// Wait until every file under PATH is in the store.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up (exit 1) after this many seconds; 0 waits forever.
        #[arg(long, default_value_t = 0)]
        timeout_s: u64,
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
    },
    /// Load the blobs under PATH (a model, a dataset; all when absent) into the cache
    /// ahead of a job, showing progress until they are there.
    Warmup {
        /// A file or directory in the mount (absolute, or relative to the mount).
        path: Option<String>,
        /// Start it and return at once (`spool warmup --status` shows progress).
        #[arg(long)]
        no_wait: bool,
        /// Show the progress of the last warmup instead of starting one.
        #[arg(long, conflicts_with_all = ["path", "no_wait"])]
        status: bool,
        /// Give up waiting (exit 1; the warmup goes on) after this many seconds; 0
        /// waits forever.
        #[arg(long, default_value_t = 0)]
        timeout_s: u64,
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
    },
    /// Benchmarks against the machine's limits.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// NVMe controllers for the nvme backend: list them, hand them to vfio-pci, give
    /// them back to the kernel.
    Nvme {
        #[command(subcommand)]
        cmd: NvmeCmd,
    },
}

#[derive(Debug, Subcommand)]
enum NvmeCmd {
    /// Every NVMe controller: PCI address, ids, driver, IOMMU group, block devices.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Unbind the controller from its kernel driver (its block devices disappear) and
    /// bind it to vfio-pci, for `device.backend = "nvme"`.
    Bind {
        /// PCI address, e.g. 0000:00:04.0.
        address: String,
    },
    /// Give the controller back to the kernel's nvme driver.
    Unbind {
        /// PCI address, e.g. 0000:00:04.0.
        address: String,
    },
}

#[derive(Debug, Subcommand)]
enum PerfCmd {
    /// All counters and latency histograms as JSON.
    Dump {
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// The daemon's effective configuration as JSON.
    Show {
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Sequential write and read through the dataplane vs fio on the same file, or on
    /// the same NVMe controller (--nvme: Spool's NVMe driver vs the kernel's); also
    /// fio with every write durable (--sync=dsync), as the store's are.
    Device(bench::DeviceBench),
    /// N writers with 1 MiB writes + fsync through the FUSE mount vs straight to the
    /// dataplane vs the local filesystem, then reads.
    Fuse(bench_fuse::FuseBench),
    /// Replicated writes with R = 1, 2, 3 between nodes in network namespaces vs
    /// iperf3 and fio in the same run; failover time, resync throughput, and FUSE
    /// through the cluster namespace.
    Cluster(bench_cluster::ClusterBench),
    /// An MLPerf Storage-style checkpoint: N rank processes write shards through
    /// the mounts of a cluster and fsync, rank 0 commits, another node reads it back;
    /// the same ranks on the local filesystem for comparison.
    Checkpoint(bench_checkpoint::CheckpointBench),
    /// Metadata calls per second through the owner's and a follower's mount, namespace
    /// calls per checkpoint shard, chain-table size and etcd keep-alives per second,
    /// and a model of them at 1k, 10k and 100k nodes naming the first bottleneck.
    Scale(bench_scale::ScaleBench),
    /// A checkpoint through a mount with a [blob] store vs a direct upload with the
    /// Azure SDK and vs `rclone mount --vfs-cache-mode writes`, on one Azurite: time
    /// until durable in the cache and in blob, requests and bytes sent per byte
    /// written; then read back cold (cache-on-read) and warm vs an SDK download and
    /// `rclone mount --vfs-cache-mode full`; CPU seconds per GiB on every path.
    Blob(bench_blob::BlobBench),
    /// One link streaming one way through Spool's tcp transport and through rdma on a
    /// named device (--rdma-device), vs iperf3 on the same address; GB/s and CPU
    /// seconds per GiB.
    Transport(bench_transport::TransportBench),
    /// Every scenario above in one run, then one table of every row with its ratio to
    /// its limit or peer, CPU seconds per GiB on every row that moves data, the CPU
    /// time and the machine, as CSV and a plot (PNG; every ratio as a speed).
    All(bench_all::AllBench),
    /// One rank of `spool bench checkpoint` (run by it).
    #[command(hide = true)]
    CheckpointRank(bench_checkpoint::RankArgs),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("spool: {e:#}");
        std::process::exit(1);
    }
}

fn ask(socket: &std::path::Path, req: Value) -> Result<Value> {
    Ok(admin::request_blocking(socket, &req)?)
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Serve { config } => {
            spool_controlplane::shutdown::abort_on_panic();
            node::serve(&config)
        }
        Cmd::Format {
            path,
            size,
            chunk_size,
            shards,
            force,
        } => {
            let sb = node::format_path(&path, size.map(|s| s.0), chunk_size.0, shards, force)?;
            let g = &sb.geometry;
            println!(
                "formatted {}: {} shard(s) x {} chunks of {} bytes ({:.2} GiB of chunk space), uuid {}",
                path.display(),
                g.shard_count,
                g.extents_per_shard,
                g.chunk_size,
                g.capacity_bytes() as f64 / (1u64 << 30) as f64,
                uuid::Uuid::from_bytes(sb.uuid)
            );
            Ok(())
        }
        Cmd::Status {
            path: Some(path), ..
        } => {
            println!("{}: {}", path.display(), file_blob_state(&path)?);
            Ok(())
        }
        Cmd::Flush {
            path,
            wait,
            timeout_s,
            socket,
        } => flush(&socket, path.as_deref(), wait, timeout_s),
        Cmd::Warmup {
            path,
            no_wait,
            status,
            timeout_s,
            socket,
        } => warmup(
            &socket,
            path.as_deref(),
            !no_wait && !status,
            status,
            timeout_s,
        ),
        Cmd::Status {
            path: None,
            socket,
            json,
            ready,
        } => {
            let v = ask(&socket, json!({"cmd": "status"}))?;
            if ready {
                return match not_ready(&v) {
                    None => {
                        println!("ready");
                        Ok(())
                    }
                    Some(why) => anyhow::bail!("not ready: {why}"),
                };
            }
            if json {
                print_json(&v);
            } else {
                print_status(&v);
            }
            Ok(())
        }
        Cmd::Nvme { cmd } => nvme_cmd(cmd),
        Cmd::Perf {
            cmd: PerfCmd::Dump { socket },
        } => {
            print_json(&ask(&socket, json!({"cmd": "perf dump"}))?);
            Ok(())
        }
        Cmd::Config {
            cmd: ConfigCmd::Show { socket },
        } => {
            print_json(&ask(&socket, json!({"cmd": "config show"}))?);
            Ok(())
        }
        Cmd::LogLevel { level, socket } => {
            ask(&socket, json!({"cmd": "log level", "level": level}))?;
            println!("log level set to {level}");
            Ok(())
        }
        Cmd::Mount { mountpoint, socket } => {
            let path = std::path::absolute(&mountpoint)?;
            let v = ask(&socket, json!({"cmd": "mount", "path": path}))?;
            println!("mounted at {}", v["mountpoint"].as_str().unwrap_or("?"));
            Ok(())
        }
        Cmd::Umount { socket } => {
            let v = ask(&socket, json!({"cmd": "umount"}))?;
            println!("unmounted {}", v["mountpoint"].as_str().unwrap_or("?"));
            Ok(())
        }
        Cmd::Bench {
            cmd: BenchCmd::Device(b),
        } => bench::run(&b),
        Cmd::Bench {
            cmd: BenchCmd::Fuse(b),
        } => bench_fuse::run(&b),
        Cmd::Bench {
            cmd: BenchCmd::Cluster(b),
        } => bench_cluster::run(&b),
        Cmd::Bench {
            cmd: BenchCmd::Checkpoint(b),
        } => bench_checkpoint::run(&b),
        Cmd::Bench {
            cmd: BenchCmd::Scale(b),
        } => bench_scale::run(&b),
        Cmd::Bench {
            cmd: BenchCmd::Blob(b),
        } => bench_blob::run(&b),
        Cmd::Bench {
            cmd: BenchCmd::Transport(b),
        } => bench_transport::run(&b),
        Cmd::Bench {
            cmd: BenchCmd::All(b),
        } => bench_all::run(&b),
        Cmd::Bench {
            cmd: BenchCmd::CheckpointRank(a),
        } => bench_checkpoint::rank(&a),
    }
}

/// The `user.spool.state` xattr of a file in a mount.
fn file_blob_state(path: &std::path::Path) -> Result<String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut buf = vec![0u8; 8192];
    match spool_ffi::posix::getxattr(&c, c"user.spool.state", &mut buf) {
        Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(
            "no blob state (not a regular file in a Spool mount with a [blob] writeback store)"
                .to_owned(),
        ),
        Err(e) => anyhow::bail!("{}: {e}", path.display()),
    }
}

/// A path given on the command line as the daemon takes it: absolute when it names
/// something here (the daemon maps it into the mount), else as given (mount-relative).
fn daemon_path(path: Option<&str>) -> Option<String> {
    path.map(|p| match std::path::absolute(p) {
        Ok(a) if p.starts_with('/') || std::path::Path::new(p).exists() => a.display().to_string(),
        _ => p.to_owned(),
    })
}

/// `spool warmup`: starts it (unless `status`), then (with `wait`) polls its progress.
fn warmup(
    socket: &std::path::Path,
    path: Option<&str>,
    wait: bool,
    status: bool,
    timeout_s: u64,
) -> Result<()> {
    let mut v = if status {
        ask(socket, json!({"cmd": "warmup status"}))?
    } else {
        ask(socket, json!({"cmd": "warmup", "path": daemon_path(path)}))?
    };
    let t0 = std::time::Instant::now();
    loop {
        let mib = |k: &str| v[k].as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64;
        let finished = v["finished"].as_bool().unwrap_or(false);
        let line = if v["listing"].as_bool().unwrap_or(false) {
            "listing the container ...".to_owned()
        } else {
            format!(
                "{} file(s), {:.1} of {:.1} MiB in the cache ({:.1} s)",
                v["files"],
                mib("bytes_done"),
                mib("bytes_total"),
                v["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
            )
        };
        if let Some(e) = v["error"].as_str() {
            anyhow::bail!("warmup of {:?} failed: {e} ({line})", v["path"]);
        }
        if finished {
            println!("warmed up: {line}");
            return Ok(());
        }
        println!("{line}");
        if !wait {
            return Ok(());
        }
        if timeout_s > 0 && t0.elapsed().as_secs() >= timeout_s {
            anyhow::bail!("not warm after {timeout_s} s (it goes on in the daemon)");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        v = ask(socket, json!({"cmd": "warmup status"}))?;
    }
}

/// `spool flush`: asks for the upload, then (with `wait`) polls the backlog.
fn flush(socket: &std::path::Path, path: Option<&str>, wait: bool, timeout_s: u64) -> Result<()> {
    let abs = daemon_path(path);
    let mut v = ask(socket, json!({"cmd": "flush", "path": abs}))?;
    let t0 = std::time::Instant::now();
    loop {
        let b = &v["backlog"];
        let files = b["dirty_files"].as_u64().unwrap_or(0);
        let bytes = b["dirty_bytes"].as_u64().unwrap_or(0);
        let unkeyable = b["unkeyable_files"].as_u64().unwrap_or(0);
        let tombstones = b["tombstones"].as_u64().unwrap_or(0);
        let done = files == unkeyable && (path.is_some() || tombstones == 0);
        let mut line = format!(
            "{files} file(s), {:.1} MiB left ({} flushing, {} still open for writing)",
            bytes as f64 / (1u64 << 20) as f64,
            b["flushing_files"],
            b["writing_files"],
        );
        // The last store error matters while something is left to send.
        if let Some(e) = v["last_error"].as_str().filter(|_| !done) {
            line.push_str(&format!("; last error: {e}"));
        }
        if !wait || done {
            if unkeyable > 0 {
                line.push_str(&format!("; {unkeyable} file(s) have names that cannot be blob keys and stay in the cache only"));
            }
            println!(
                "{}",
                if done {
                    format!("flushed: {line}")
                } else {
                    line
                }
            );
            return Ok(());
        }
        println!("{line}");
        if timeout_s > 0 && t0.elapsed().as_secs() >= timeout_s {
            anyhow::bail!("not flushed after {timeout_s} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        v = ask(socket, json!({"cmd": "blob status", "path": abs}))?;
    }
}

/// Why a node is not ready to serve, if it is not.
fn not_ready(v: &Value) -> Option<String> {
    let failed: usize = v["engine"]["cores"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["failures"].as_array().map_or(0, Vec::len))
        .sum();
    if failed > 0 {
        return Some(format!("{failed} failed shard(s); restart the daemon"));
    }
    let cl = &v["cluster"];
    if !cl.is_object() {
        return None;
    }
    if cl["agent"]["fenced"].as_bool() != Some(false) {
        return Some("fenced: membership lease not confirmed".into());
    }
    if cl["table"]["chains"].as_u64().unwrap_or(0) == 0 {
        return Some("no chain table yet".into());
    }
    let me = cl["agent"]["node_id"].as_u64();
    let pending: Vec<String> = cl["table"]["my_chains"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["state"].as_str() != Some("serving"))
        .map(|c| {
            format!(
                "chain {} {}",
                c["chain"],
                c["state"].as_str().unwrap_or("?")
            )
        })
        .collect();
    if !pending.is_empty() {
        return Some(format!(
            "node {me:?} targets not serving: {}",
            pending.join(", ")
        ));
    }
    None
}

fn print_status(v: &Value) {
    let gib = |b: &Value| b.as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
    let e = &v["engine"];
    println!("node      {}", v["node"].as_str().unwrap_or("?"));
    println!("uptime    {} s", v["uptime_s"]);
    println!(
        "device    {} {} ({:.2} GiB, format v{}, uuid {})",
        e["device"]["backend"].as_str().unwrap_or("?"),
        e["device"]["name"].as_str().unwrap_or("?"),
        gib(&e["device"]["size_bytes"]),
        e["device"]["format_version"],
        e["device"]["uuid"].as_str().unwrap_or("?")
    );
    println!(
        "store     {} shard(s), chunk {} B, {} chunks, {:.2} of {:.2} GiB used",
        e["geometry"]["shards"],
        e["geometry"]["chunk_size"],
        e["chunks"],
        gib(&e["used_bytes"]),
        gib(&e["capacity_bytes"])
    );
    println!(
        "buffers   {} free of {} ({})",
        e["dma_buffers_free"],
        e["dma_buffers"],
        if e["dma_hugepages"].as_bool() == Some(true) {
            "hugepages"
        } else {
            "ordinary pages"
        }
    );
    let m = &v["mount"];
    if m.is_object() {
        println!(
            "mount     {} ({} inodes, {} dirty, {} orphans; log {} B, checkpoint {} B, generation {}){}",
            m["mountpoint"].as_str().unwrap_or("not mounted"),
            m["inodes"],
            m["dirty_inodes"],
            m["orphans"],
            m["log_bytes"],
            m["checkpoint_bytes"],
            m["generation"],
            if m["failed"].as_bool() == Some(true) {
                "  FAILED: metadata log unwritable, restart the daemon"
            } else {
                ""
            }
        );
    }
    let cl = &v["cluster"];
    if cl.is_object() {
        let a = &cl["agent"];
        let t = &cl["table"];
        println!(
            "cluster   node {}, leader {}{}, table v{} ({} chains, R={}), targets {}, peers {}{}",
            a["node_id"],
            a["leader"],
            if a["is_leader"].as_bool() == Some(true) {
                " (this node)"
            } else {
                ""
            },
            t["version"],
            t["chains"],
            t["replication"],
            t["target_states"],
            cl["replica"]["peers_connected"],
            if a["fenced"].as_bool() == Some(true) {
                "  FENCED: membership lease not confirmed, refusing client requests"
            } else {
                ""
            }
        );
        for j in cl["replica"]["syncs"].as_array().into_iter().flatten() {
            println!(
                "resync    chain {} -> node {}: round {}, {}, {} chunk(s) left, {} sent ({:.1} MiB){}",
                j["chain"],
                j["target"],
                j["round"],
                j["phase"].as_str().unwrap_or("?"),
                j["chunks_to_send"],
                j["chunks_sent"],
                j["bytes_sent"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
                if j["done"].as_bool() == Some(true) { ", done" } else { "" }
            );
        }
    }
    for c in e["cores"].as_array().into_iter().flatten() {
        let failures = c["failures"].as_array().map(|f| f.len()).unwrap_or(0);
        println!(
            "core {}    cpu {} ({}), shards {}, {} ops in flight{}",
            c["core"],
            c["cpu"],
            c["pinned_by"].as_str().unwrap_or("unpinned"),
            c["shards"],
            c["busy_ops"],
            if failures > 0 {
                format!(", {failures} FAILED shard(s): {}", c["failures"])
            } else {
                String::new()
            }
        );
    }
}

fn nvme_cmd(cmd: NvmeCmd) -> Result<()> {
    use spool_dataplane::device::nvme::pci;
    let show = |f: &pci::PciFunction| {
        println!(
            "{:<14} {:>6}:{:<6} {:<10} {:>5}  {}",
            f.address,
            f.vendor.trim_start_matches("0x"),
            f.device.trim_start_matches("0x"),
            if f.driver.is_empty() { "-" } else { &f.driver },
            f.iommu_group
                .map_or_else(|| "-".to_owned(), |g| g.to_string()),
            f.block_devices.join(" ")
        )
    };
    match cmd {
        NvmeCmd::List { json } => {
            let all = pci::list()?;
            if json {
                print_json(&serde_json::to_value(&all)?);
            } else if all.is_empty() {
                println!("no NVMe controllers");
            } else {
                println!(
                    "{:<14} {:>13} {:<10} {:>5}  BLOCK DEVICES",
                    "ADDRESS", "VENDOR:DEVICE", "DRIVER", "GROUP"
                );
                all.iter().for_each(show);
            }
        }
        NvmeCmd::Bind { address } => {
            let f = pci::bind_vfio(&address)?;
            println!("{address} is bound to vfio-pci (IOMMU group {}): set device.backend = \"nvme\" and device.pci_address = \"{address}\"", f.iommu_group.unwrap_or_default());
        }
        NvmeCmd::Unbind { address } => {
            let f = pci::unbind_vfio(&address)?;
            let driver = if f.driver.is_empty() {
                "no driver (load nvme: modprobe nvme)".to_owned()
            } else {
                f.driver.clone()
            };
            println!("{address} is back with the kernel: {driver}");
        }
    }
    Ok(())
}
