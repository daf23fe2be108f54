//! `spool bench blob`: a checkpoint written through a Spool mount with a `[blob]` store,
//! side by side in one run on the same Azurite with what users would pick instead: a
//! direct upload with the Azure SDK for Python, and `rclone mount --vfs-cache-mode
//! writes`. Reports the time until the checkpoint is durable in the cache (the job can
//! go on) and until it is in the blob store, and the store requests it cost; then the
//! checkpoint read back through a fresh node's cache-on-read, cold (from the store)
//! and warm (from the cache), against a direct download with the SDK and against
//! `rclone mount --vfs-cache-mode full` (cold, then from its cache). The page cache is
//! dropped before every read. Each path's row gives its CPU seconds per GiB: the
//! client, the SDK's Python or the process serving the mount (Azurite's not counted).

#[path = "../../../tests/common/azurite.rs"]
mod azurite;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use spool_controlplane::admin;
use spool_controlplane::config::size::ByteSize;

use crate::bench::CpuSpan;
use crate::bench_cluster::{print_rows, Row};

/// Bytes per write(2) of the checkpoint writers and per read(2) of its readers.
const WRITE_BYTES: usize = 8 << 20;

#[derive(Debug, clap::Args)]
pub struct BlobBench {
    /// Working directory (device file, source files, mounts); wiped first.
    #[arg(long, default_value = "/tmp/spool-bench-blob")]
    dir: PathBuf,
    /// Checkpoint files, one writer each.
    #[arg(long, default_value_t = 4)]
    files: usize,
    /// Bytes per file.
    #[arg(long, default_value = "64MiB")]
    file_size: ByteSize,
    /// Spool's upload block size (blob.part_size).
    #[arg(long, default_value = "8MiB")]
    part_size: ByteSize,
    /// Skip the rclone rows.
    #[arg(long)]
    no_rclone: bool,
    #[arg(long)]
    csv: Option<PathBuf>,
}

/// Writes `n` files of pseudo-random bytes (incompressible, like weights).
fn make_sources(dir: &Path, n: usize, bytes: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; WRITE_BYTES];
    for i in 0..n {
        let mut f = std::fs::File::create(dir.join(format!("shard-{i}.bin")))?;
        let mut left = bytes;
        while left > 0 {
            for w in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            let k = left.min(buf.len() as u64) as usize;
            f.write_all(&buf[..k])?;
            left -= k as u64;
        }
    }
    Ok(())
}

/// Copies every source file into `dst` with one writer thread each, 8 MiB writes,
/// then fsync and close; returns the seconds until the last writer is done.
fn write_checkpoint(src: &Path, dst: &Path) -> Result<f64> {
    let names: Vec<PathBuf> = std::fs::read_dir(src)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    let t0 = Instant::now();
    let handles: Vec<_> = names
        .into_iter()
        .map(|from| {
            let to = dst.join(from.file_name().unwrap_or_default());
            std::thread::spawn(move || -> Result<()> {
                let mut r = std::fs::File::open(&from)?;
                let mut w = std::fs::File::create(&to)
                    .with_context(|| format!("creating {}", to.display()))?;
                let mut buf = vec![0u8; WRITE_BYTES];
                loop {
                    let n = r.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    w.write_all(&buf[..n])?;
                }
                w.sync_all()?;
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Checks that `container` holds every source file, byte for byte, under `prefix`.
fn verify(az: &azurite::Azurite, container: &str, prefix: &str, src: &Path) -> Result<()> {
    use sha2::{Digest, Sha256};
    let blobs = az.list(container);
    for e in std::fs::read_dir(src)? {
        let p = e?.path();
        let data = std::fs::read(&p)?;
        let want: String = Sha256::digest(&data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let name = format!(
            "{prefix}{}",
            p.file_name().unwrap_or_default().to_string_lossy()
        );
        match blobs.iter().find(|b| b.0 == name) {
            Some(b) if b.2 == want => {}
            Some(b) => bail!(
                "{container}/{name}: {} bytes, sha256 {} instead of {want}",
                b.1,
                b.2
            ),
            None => bail!("{container}/{name} is missing"),
        }
    }
    Ok(())
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> Result<bool>) -> Result<()> {
    let t0 = Instant::now();
    while !ok()? {
        if t0.elapsed() > limit {
            bail!("{what}: not within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn is_mounted(p: &Path) -> bool {
    let want = p.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// A child killed (and its mount detached) when dropped.
struct Proc(Child, PathBuf);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let t0 = Instant::now();
        while self.0.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        if is_mounted(&self.1) {
            let _ = Command::new("umount").arg("-l").arg(&self.1).status();
        }
    }
}

/// A running `spool serve` over `container` with its mount, in `b.dir/<name>`.
struct SpoolNode {
    mnt: PathBuf,
    socket: PathBuf,
    proc: Proc,
}

impl SpoolNode {
    fn start(
        b: &BlobBench,
        az: &azurite::Azurite,
        name: &str,
        container: &str,
        blob: &str,
    ) -> Result<SpoolNode> {
        let dir = b.dir.join(name);
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt)?;
        let total = b.files as u64 * b.file_size.0;
        let socket = dir.join("admin.sock");
        let cfg = format!(
            "[device]\npath = \"{d}/dev.img\"\nsize = \"{size}\"\n\
             [dataplane]\ncores = 1\npin = false\n[hugepages]\npolicy = \"prefer\"\nbuffers = 64\n\
             [admin]\nsocket = \"{sock}\"\n[mount]\nmountpoint = \"{mnt}\"\n\
             {blob}",
            d = dir.display(),
            size = ByteSize((2 * total).max(1 << 30)),
            sock = socket.display(),
            mnt = mnt.display(),
            blob = az.blob_config(container, blob),
        );
        std::fs::write(dir.join("spool.toml"), cfg)?;
        let log = std::fs::File::create(dir.join("spool.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .args(["serve", "--config"])
            .arg(dir.join("spool.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting spool serve")?;
        let proc = Proc(child, mnt.clone());
        wait_for("spool mount", Duration::from_secs(60), || {
            Ok(socket.exists() && is_mounted(&mnt))
        })?;
        Ok(SpoolNode { mnt, socket, proc })
    }

    fn ask(&self, req: Value) -> Result<Value> {
        Ok(admin::request_blocking(&self.socket, &req)?)
    }
}

/// Seconds and CPU seconds per GiB of one path through the checkpoint.
#[derive(Clone, Copy)]
struct Timed {
    secs: f64,
    cpu_s_per_gib: f64,
}

impl Timed {
    fn since(t0: Instant, cpu: &CpuSpan, bytes: u64) -> Timed {
        Timed {
            secs: t0.elapsed().as_secs_f64(),
            cpu_s_per_gib: cpu.per_gib(bytes),
        }
    }
}

/// Empties the kernel's page cache, so that a read measures the mount's own cache (or
/// the store), not pages the kernel kept from an earlier read.
fn drop_page_cache() {
    let _ = Command::new("sh")
        .args(["-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
        .status();
}

/// The spool rows: durable in cache, durable in blob, and counters.
fn run_spool(
    b: &BlobBench,
    az: &azurite::Azurite,
    src: &Path,
    bytes: u64,
) -> Result<(Timed, Timed, Value)> {
    let blob = format!(
        "prefix = \"ckpt/\"\nwriteback_delay_ms = 0\nscan_interval_ms = 100\npart_size = \"{}\"\n",
        b.part_size
    );
    let node = SpoolNode::start(b, az, "spool", "spool", &blob)?;
    let (t0, cpu) = (Instant::now(), CpuSpan::start(vec![node.proc.pid()]));
    write_checkpoint(src, &node.mnt)?;
    let cache = Timed::since(t0, &cpu, bytes);
    node.ask(json!({"cmd": "flush"}))?;
    let mut last = Value::Null;
    wait_for("spool upload", Duration::from_secs(3600), || {
        last = node.ask(json!({"cmd": "blob status"}))?;
        // The counters move just after the namespace records the upload: wait for
        // both, so the bytes-per-byte row counts every file.
        Ok(last["backlog"]["dirty_files"].as_u64() == Some(0)
            && last["files_uploaded"].as_u64() >= Some(b.files as u64))
    })?;
    Ok((cache, Timed::since(t0, &cpu, bytes), last))
}

/// Reads a whole file `WRITE_BYTES` at a time, as a loader reads tensors (one read(2)
/// of the whole file is split by FUSE differently from how applications read).
fn read_file(p: &Path) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let len = usize::try_from(f.metadata()?.len())?;
    let mut data = vec![0u8; len];
    for piece in data.chunks_mut(WRITE_BYTES) {
        f.read_exact(piece)
            .with_context(|| format!("reading {}", p.display()))?;
    }
    Ok(data)
}

/// Reads every file of `src`'s names under `dir`, one reader thread each, and checks
/// them against `src`; returns the seconds the reads took.
fn read_checkpoint(src: &Path, dir: &Path) -> Result<f64> {
    let names: Vec<std::ffi::OsString> = std::fs::read_dir(src)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    let t0 = Instant::now();
    let handles: Vec<_> = names
        .iter()
        .map(|n| {
            let p = dir.join(n);
            std::thread::spawn(move || read_file(&p))
        })
        .collect();
    let mut got = Vec::new();
    for h in handles {
        got.push(h.join().map_err(|_| anyhow::anyhow!("reader panicked"))??);
    }
    let secs = t0.elapsed().as_secs_f64();
    for (n, data) in names.iter().zip(got) {
        if std::fs::read(src.join(n))? != data {
            bail!(
                "{}: read back differs from the source",
                dir.join(n).display()
            );
        }
    }
    Ok(secs)
}

/// Reads the checkpoint under `dir` twice, cold then warm, with the page cache dropped
/// before each; `pid` is the process serving the mount.
fn read_twice(src: &Path, dir: &Path, pid: u32, bytes: u64) -> Result<(Timed, Timed)> {
    let read = || -> Result<Timed> {
        drop_page_cache();
        let (t0, cpu) = (Instant::now(), CpuSpan::start(vec![pid]));
        read_checkpoint(src, dir)?;
        Ok(Timed::since(t0, &cpu, bytes))
    };
    Ok((read()?, read()?))
}

/// Cache-on-read rows: a fresh node over the SDK's container (cache-only) reads the
/// checkpoint cold (fetched from the store), then warm (from the cache). Returns the
/// two reads and the GETs they cost together.
fn run_spool_read(
    b: &BlobBench,
    az: &azurite::Azurite,
    src: &Path,
    bytes: u64,
) -> Result<(Timed, Timed, u64)> {
    let node = SpoolNode::start(b, az, "spool-read", "sdk", "mode = \"cache-only\"\n")?;
    let (cold, warm) = read_twice(src, &node.mnt.join("ckpt"), node.proc.pid(), bytes)?;
    let st = node.ask(json!({"cmd": "status"}))?;
    let gets = st["blob_read"]["requests"]["get"].as_u64().unwrap_or(0);
    Ok((cold, warm, gets))
}

/// `rclone mount` of `container` in `b.dir/<name>/mnt` with `--vfs-cache-mode
/// <cache_mode>`; the mount is detached when the result drops.
fn rclone_mount(
    b: &BlobBench,
    az: &azurite::Azurite,
    name: &str,
    container: &str,
    cache_mode: &str,
) -> Result<(Proc, PathBuf)> {
    let dir = b.dir.join(name);
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    // rclone 1.60 builds https://ACCOUNT.ENDPOINT from an account; a container SAS URL
    // is the way to point it at Azurite's port.
    let sas = az.az(container, &["sas"]);
    let remote = format!(":azureblob,sas_url='{}':{container}", sas.trim());
    let log = std::fs::File::create(dir.join("rclone.log"))?;
    let child = Command::new("rclone")
        .args(["mount", &remote])
        .arg(&mnt)
        .args([
            "--vfs-cache-mode",
            cache_mode,
            "--vfs-write-back",
            "0s",
            "--cache-dir",
        ])
        .arg(dir.join("cache"))
        .args(["--config", "/dev/null"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting rclone mount (Debian package rclone)")?;
    let m = Proc(child, mnt.clone());
    wait_for("rclone mount", Duration::from_secs(30), || {
        Ok(is_mounted(&mnt))
    })?;
    Ok((m, mnt))
}

/// rclone's write rows: until the writers' close returned, and until every file is in
/// the container at its full size.
fn run_rclone(
    b: &BlobBench,
    az: &azurite::Azurite,
    src: &Path,
    bytes: u64,
) -> Result<(Timed, Timed)> {
    let (m, mnt) = rclone_mount(b, az, "rclone", "rclone", "writes")?;
    let (t0, cpu) = (Instant::now(), CpuSpan::start(vec![m.pid()]));
    write_checkpoint(src, &mnt)?;
    let closed = Timed::since(t0, &cpu, bytes);
    let want = b.files;
    wait_for(
        "rclone upload (see rclone/rclone.log)",
        Duration::from_secs(600),
        || {
            let n = az
                .list("rclone")
                .into_iter()
                .filter(|x| x.1 == b.file_size.0)
                .count();
            Ok(n == want)
        },
    )?;
    Ok((closed, Timed::since(t0, &cpu, bytes)))
}

/// rclone's read rows: a fresh mount of the SDK's container with `--vfs-cache-mode
/// full` (the mode that keeps what it reads; `writes` reads from the store every
/// time) reads the checkpoint cold, then warm from its cache.
fn run_rclone_read(
    b: &BlobBench,
    az: &azurite::Azurite,
    src: &Path,
    bytes: u64,
) -> Result<(Timed, Timed)> {
    let (m, mnt) = rclone_mount(b, az, "rclone-read", "sdk", "full")?;
    read_twice(src, &mnt.join("ckpt"), m.pid(), bytes)
}

pub fn run(b: &BlobBench) -> Result<()> {
    if b.files == 0 || b.files > 256 {
        bail!("--files {} must be between 1 and 256", b.files);
    }
    if b.file_size.0 == 0 {
        bail!("--file-size must be above 0");
    }
    let _ = std::fs::remove_dir_all(&b.dir);
    let src = b.dir.join("src");
    make_sources(&src, b.files, b.file_size.0)?;
    let total = b.files as u64 * b.file_size.0;
    let gb = total as f64 / 1e9;
    eprintln!(
        "bench blob: {} files x {} through each path, on one Azurite (data in /tmp)",
        b.files, b.file_size
    );
    let az = azurite::Azurite::start();
    for c in ["spool", "sdk", "rclone"] {
        az.az(c, &["create"]);
    }
    // The SDK times itself (its Python start-up is not in its seconds, but is in its
    // CPU).
    let sdk = |args: &[&str]| -> Result<Timed> {
        let cpu = CpuSpan::start(vec![]);
        let secs: f64 = az
            .az("sdk", args)
            .trim()
            .parse()
            .with_context(|| format!("azcheck {} output", args[0]))?;
        Ok(Timed {
            secs,
            cpu_s_per_gib: cpu.per_gib(total),
        })
    };
    let sdk_put = sdk(&["upload-dir", &src.display().to_string(), "ckpt/", "4"])?;
    verify(&az, "sdk", "ckpt/", &src)?;
    let (cache, in_blob, st) = run_spool(b, &az, &src, total)?;
    verify(&az, "spool", "ckpt/", &src)?;
    // A row against `peer`, or the peer's own row.
    let row = |what: &str, t: Timed, peer: Option<Timed>| {
        let note = match peer {
            None => format!("{:.2} GB/s (the peer)", gb / t.secs),
            Some(p) => format!(
                "{:.2} GB/s; {:.2}x the SDK's time",
                gb / t.secs,
                t.secs / p.secs
            ),
        };
        Row::new(what, t.secs, "s", note).cpu_s_per_gib(t.cpu_s_per_gib)
    };
    let put = Some(sdk_put);
    let mut rows = vec![
        row("Azure SDK (Python) direct upload", sdk_put, None),
        row("spool: durable in cache (fsync done)", cache, put),
        row("spool: durable in blob", in_blob, put),
    ];
    if !b.no_rclone {
        let (closed, uploaded) = run_rclone(b, &az, &src, total)?;
        verify(&az, "rclone", "", &src)?;
        rows.push(row("rclone vfs writes: close returned", closed, put));
        rows.push(row("rclone vfs writes: in blob", uploaded, put));
    }
    let get_dir = b.dir.join("sdk-get").display().to_string();
    let sdk_get = sdk(&["download-dir", "ckpt/", &get_dir, "4"])?;
    let get = Some(sdk_get);
    let (cold, warm, gets) = run_spool_read(b, &az, &src, total)?;
    rows.push(row("Azure SDK (Python) direct download", sdk_get, None));
    let mut cold_row = row("spool: cold read (cache-on-read from blob)", cold, get);
    cold_row.note = format!("{}; {gets} GETs for the cold and warm reads", cold_row.note);
    rows.push(cold_row);
    rows.push(row("spool: warm read (from the cache)", warm, get));
    if !b.no_rclone {
        let (cold, warm) = run_rclone_read(b, &az, &src, total)?;
        rows.push(row("rclone vfs full: cold read", cold, get));
        rows.push(row("rclone vfs full: warm read (its cache)", warm, get));
    }
    let up = st["bytes_uploaded"].as_u64().unwrap_or(0) as f64;
    let r = &st["requests"];
    let reqs: u64 = ["put", "put_block", "put_block_list", "delete"]
        .iter()
        .map(|k| r[k].as_u64().unwrap_or(0))
        .sum();
    rows.push(Row::new(
        "spool: bytes to blob per byte written",
        up / total as f64,
        "",
        format!("{} bytes written, {} uploaded", total, up as u64),
    ));
    rows.push(Row::new(
        "spool: blob requests per GB",
        reqs as f64 / gb,
        "",
        format!("{r}"),
    ));
    eprintln!("bench blob: every path's blobs checked against the source files (sha256)");
    print_rows(&rows, b.csv.as_deref())
}
