//! `spool bench checkpoint`: an MLPerf Storage-style checkpoint through the cluster
//! namespace. A cluster of `spool serve` nodes in network namespaces, every node
//! mounting; N rank processes spread over the nodes' mounts each write one shard and
//! fsync; rank 0 commits a `.metadata` file (temporary name, fsync, rename, as
//! PyTorch DCP does); a process on another node waits until it sees the commit; then
//! the checkpoint is read back, verified, through that other node's mount. The same
//! ranks on the local filesystem give the comparison. Sizes follow MLPerf Storage's
//! checkpointing table (`--model`); `smoke` is small enough for CI.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::CpuSpan;
use crate::bench_cluster::{self, Row};
use spool_controlplane::config::size::ByteSize;

/// Bytes per write(2) and read(2): a tensor's worth, from page-aligned memory.
const RANK_IO: usize = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Model {
    /// 6 ranks, 384 MiB: seconds (CI runs a smaller one still).
    Smoke,
    /// MLPerf Storage: 8 processes, 105 GiB.
    #[value(name = "llama3-8b")]
    Llama3_8b,
    /// 64 processes, 912 GiB.
    #[value(name = "llama3-70b")]
    Llama3_70b,
    /// 512 processes, 5.29 TiB.
    #[value(name = "llama3-405b")]
    Llama3_405b,
    /// 1024 processes, 18 TiB.
    #[value(name = "llama3-1t")]
    Llama3_1t,
}

impl Model {
    /// (ranks, checkpoint bytes), from MLPerf Storage's checkpointing rules (Table 2;
    /// sizes in binary units, as the benchmark reports them).
    fn shape(self) -> (usize, u64) {
        const GIB: u64 = 1 << 30;
        match self {
            Model::Smoke => (6, 384 << 20),
            Model::Llama3_8b => (8, 105 * GIB),
            Model::Llama3_70b => (64, 912 * GIB),
            Model::Llama3_405b => (512, 5417 * GIB),
            Model::Llama3_1t => (1024, 18 * 1024 * GIB),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct CheckpointBench {
    /// Nodes (network namespaces), 3..8; ranks are spread over their mounts.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Replication factor of the cluster.
    #[arg(long, default_value_t = 2)]
    replication: u8,
    /// The checkpoint's shape: ranks and total size.
    #[arg(long, value_enum, default_value = "smoke")]
    model: Model,
    /// Overrides the model's rank count.
    #[arg(long)]
    ranks: Option<usize>,
    /// Overrides the model's checkpoint size.
    #[arg(long)]
    size: Option<ByteSize>,
    /// Directory for the nodes' device files and the local-filesystem comparison.
    #[arg(long, default_value = "/var/tmp/spool-bench-checkpoint")]
    dir: PathBuf,
    /// Also write the results as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
}

/// One rank's work, run as its own process (`spool bench checkpoint-rank`).
#[derive(Debug, clap::Args)]
pub struct RankArgs {
    /// The shard file.
    #[arg(long)]
    path: PathBuf,
    #[arg(long)]
    bytes: u64,
    /// Seeds the shard's bytes (the rank number).
    #[arg(long)]
    seed: u64,
    /// Read the shard back and verify it instead of writing it.
    #[arg(long)]
    read: bool,
}

/// A page-aligned buffer of `RANK_IO` bytes, filled for `seed` at file offset `at`:
/// every 4 KiB block starts with (seed, offset), so a misplaced block is caught.
struct Shard {
    backing: Vec<u8>,
    skip: usize,
}

impl Shard {
    fn new() -> Shard {
        let backing = vec![0u8; RANK_IO + 4096];
        let skip = backing.as_ptr().align_offset(4096);
        Shard { backing, skip }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.backing[self.skip..self.skip + RANK_IO]
    }
    fn fill(&mut self, seed: u64, at: u64) {
        for (k, b) in self.buf().chunks_mut(4096).enumerate() {
            let off = at + (k as u64) * 4096;
            b[..8].copy_from_slice(&seed.to_le_bytes());
            b[8..16].copy_from_slice(&off.to_le_bytes());
            let fill = (seed as u8).wrapping_mul(31) ^ (off >> 12) as u8;
            b[16..].fill(fill);
        }
    }
}

/// Writes (and fsyncs) or reads and verifies one shard; prints the seconds it took.
pub fn rank(a: &RankArgs) -> Result<()> {
    let mut s = Shard::new();
    let mut want = Shard::new();
    let t0 = Instant::now();
    if a.read {
        let mut f = std::fs::File::open(&a.path)
            .with_context(|| format!("opening {}", a.path.display()))?;
        let mut at = 0u64;
        while at < a.bytes {
            let n = (a.bytes - at).min(RANK_IO as u64) as usize;
            f.read_exact(&mut s.buf()[..n])
                .with_context(|| format!("reading {} at {at}", a.path.display()))?;
            want.fill(a.seed, at);
            if s.buf()[..n] != want.buf()[..n] {
                bail!("{}: wrong bytes at offset {at}", a.path.display());
            }
            at += n as u64;
        }
    } else {
        let mut f = std::fs::File::create(&a.path)
            .with_context(|| format!("creating {}", a.path.display()))?;
        let mut at = 0u64;
        while at < a.bytes {
            let n = (a.bytes - at).min(RANK_IO as u64) as usize;
            s.fill(a.seed, at);
            f.write_all(&s.buf()[..n])
                .with_context(|| format!("writing {} at {at}", a.path.display()))?;
            at += n as u64;
        }
        f.sync_all()
            .with_context(|| format!("fsync {}", a.path.display()))?;
    }
    println!("{}", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Runs every rank as a process at once (rank r on `dirs[r % dirs.len()]`) and
/// returns each one's seconds.
fn ranks(dirs: &[PathBuf], ranks: usize, shard: u64, read: bool) -> Result<Vec<f64>> {
    let exe = std::env::current_exe().context("this binary's path")?;
    let children: Vec<_> = (0..ranks)
        .map(|r| {
            let path = dirs[r % dirs.len()].join(format!("rank-{r:04}.distcp"));
            let mut c = Command::new(&exe);
            c.args(["bench", "checkpoint-rank", "--path"])
                .arg(&path)
                .args(["--bytes", &shard.to_string(), "--seed", &r.to_string()])
                .stdout(Stdio::piped());
            if read {
                c.arg("--read");
            }
            c.spawn().context("starting a rank process")
        })
        .collect::<Result<_>>()?;
    children
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let out = c.wait_with_output()?;
            if !out.status.success() {
                bail!("rank {r} failed ({})", out.status);
            }
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<f64>()
                .with_context(|| format!("rank {r}'s output"))
        })
        .collect()
}

/// Commits the checkpoint as DCP does: `.metadata.tmp`, fsync, rename.
fn commit(dir: &Path, ranks: usize, shard: u64) -> Result<f64> {
    let t0 = Instant::now();
    let tmp = dir.join(".metadata.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{{\"ranks\": {ranks}, \"shard_bytes\": {shard}}}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(".metadata"))?;
    Ok(t0.elapsed().as_secs_f64())
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

pub fn run(b: &CheckpointBench) -> Result<()> {
    let (model_ranks, model_bytes) = b.model.shape();
    let nranks = b.ranks.unwrap_or(model_ranks);
    let total = b.size.map_or(model_bytes, |s| s.0);
    if nranks == 0 || total < nranks as u64 * 4096 {
        bail!("--ranks {nranks} and --size {total}: every rank needs at least 4 KiB");
    }
    let shard = (total / nranks as u64).div_ceil(4096) * 4096;
    let total = shard * nranks as u64;
    std::fs::create_dir_all(&b.dir).with_context(|| format!("creating {}", b.dir.display()))?;
    let mut rows = Vec::new();
    let gb = |secs: f64| total as f64 / secs / 1e9;
    let what = format!(
        "{} ranks x {} MiB = {:.2} GiB",
        nranks,
        shard >> 20,
        total as f64 / (1u64 << 30) as f64
    );

    // The local filesystem, for comparison.
    let local = b.dir.join("local");
    let _ = std::fs::remove_dir_all(&local);
    std::fs::create_dir_all(&local)?;
    eprintln!("local filesystem: {what} ...");
    let cpu_w = CpuSpan::start(vec![]);
    let w = max(&ranks(std::slice::from_ref(&local), nranks, shard, false)?);
    let cpu_w = cpu_w.per_gib(total);
    let c = commit(&local, nranks, shard)?;
    let _ = std::process::Command::new("sh")
        .args(["-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
        .status();
    let cpu_r = CpuSpan::start(vec![]);
    let r = max(&ranks(std::slice::from_ref(&local), nranks, shard, true)?);
    let cpu_r = cpu_r.per_gib(total);
    let _ = std::fs::remove_dir_all(&local);
    let (local_w, local_r) = (gb(w), gb(r));
    rows.push(
        Row::new(
            "local fs: checkpoint write (slowest rank)",
            w,
            "s",
            format!("{local_w:.2} GB/s; commit {:.1} ms", c * 1e3),
        )
        .cpu_s_per_gib(cpu_w),
    );
    rows.push(
        Row::new(
            "local fs: read back (slowest rank)",
            r,
            "s",
            format!("{local_r:.2} GB/s"),
        )
        .cpu_s_per_gib(cpu_r),
    );

    eprintln!(
        "cluster: {} nodes, R = {}, every node mounting ...",
        b.nodes, b.replication
    );
    let lab = bench_cluster::Lab::new(b.nodes, &b.dir, total)?;
    let nodes = lab.start(b.replication, "ckpt", true)?;
    let n = b.nodes;
    let step = |i: usize| nodes.mountpoint(i).join("ckpt/step-1");
    std::fs::create_dir_all(step(0)).context("creating the checkpoint directory")?;
    // Every node's mount sees the directory before its ranks start.
    for i in 0..n {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !step(i).is_dir() {
            if Instant::now() > deadline {
                bail!("node {} does not see the checkpoint directory", i + 1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!("cluster: writing {what} through {n} mounts ...");
    let dirs: Vec<PathBuf> = (0..n).map(step).collect();
    let cpu_w = CpuSpan::start(nodes.pids());
    let times = ranks(&dirs, nranks, shard, false)?;
    let cpu_w = cpu_w.per_gib(total);
    let w = max(&times);
    let c = commit(&step(0), nranks, shard)?;
    // Another node waits for the commit.
    let t0 = Instant::now();
    let seen = step(n - 1).join(".metadata");
    while !seen.exists() {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("node {n} did not see the commit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let visible = t0.elapsed().as_secs_f64();
    eprintln!("cluster: reading it back through node {n}'s mount ...");
    let cpu_r = CpuSpan::start(nodes.pids());
    let r = max(&ranks(&[step(n - 1)], nranks, shard, true)?);
    let cpu_r = cpu_r.per_gib(total);
    let (w_gb, r_gb) = (gb(w), gb(r));
    rows.push(
        Row::new(
            "cluster: checkpoint write (slowest rank)",
            w,
            "s",
            format!(
                "{w_gb:.2} GB/s ({:.2}x local), R={}, ranks on {n} nodes' mounts; CPU: ranks and every node",
                w_gb / local_w,
                b.replication
            ),
        )
        .cpu_s_per_gib(cpu_w),
    );
    rows.push(Row::new(
        "cluster: commit (.metadata rename)",
        c * 1e3,
        "ms",
        "on node 1".into(),
    ));
    rows.push(Row::new(
        "cluster: commit visible on another node",
        visible * 1e3,
        "ms",
        format!("node {n}, after the rename returned"),
    ));
    rows.push(
        Row::new(
            "cluster: read back on another node",
            r,
            "s",
            format!(
                "{r_gb:.2} GB/s ({:.2}x local), all ranks via node {n}",
                r_gb / local_r
            ),
        )
        .cpu_s_per_gib(cpu_r),
    );
    drop(nodes);
    drop(lab);

    println!();
    println!(
        "spool bench checkpoint: {:?}, {what}, {} MiB writes from page-aligned memory, fsync per shard",
        b.model,
        RANK_IO >> 20
    );
    bench_cluster::print_rows(&rows, b.csv.as_deref())?;
    let _ = std::fs::remove_dir_all(&b.dir);
    Ok(())
}
