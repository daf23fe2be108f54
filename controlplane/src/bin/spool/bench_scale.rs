//! `spool bench scale`: what one cluster does per second on the paths that grow with
//! the node count, measured here, and a model that extrapolates them to 1k, 10k and
//! 100k nodes and names the first bottleneck (docs/SCALE.md explains the model).
//!
//! Measured, on a cluster of `spool serve` nodes in network namespaces with every node
//! mounting: metadata calls per second through the namespace owner's mount and through
//! a follower's (create, stat of files another node made, readdir, rename), the
//! namespace calls one checkpoint shard costs, the chain table's size, and etcd lease
//! keep-alives per second against the real etcd of the run.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use spool_controlplane::cluster::etcd::Etcd;

use crate::bench_cluster::{self, Row};

#[derive(Debug, clap::Args)]
pub struct ScaleBench {
    /// Files each of the 4 threads creates, stats, lists and renames per mount.
    #[arg(long, default_value_t = 250)]
    files: usize,
    /// GPU ranks per node in the model (one shard file each per checkpoint).
    #[arg(long, default_value_t = 8)]
    ranks_per_node: u64,
    /// Checkpoint bytes per node in the model (drained to blob storage).
    #[arg(long, default_value = "85GiB")]
    bytes_per_node: spool_controlplane::config::size::ByteSize,
    /// The window all nodes checkpoint in, in seconds.
    #[arg(long, default_value_t = 60)]
    window_s: u64,
    /// Membership lease TTL in the model, seconds (keep-alives every ttl/3).
    #[arg(long, default_value_t = 3)]
    lease_ttl_s: u64,
    #[arg(long, default_value = "/var/tmp/spool-bench-scale")]
    dir: std::path::PathBuf,
    /// Also write the results as CSV.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
}

const THREADS: usize = 4;

/// Runs `op` on `files` items in each of THREADS threads at once: operations per second.
fn rate(files: usize, op: impl Fn(usize, usize) -> std::io::Result<()> + Sync) -> Result<f64> {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let op = &op;
                s.spawn(move || (0..files).try_for_each(|i| op(t, i)))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("panicked")))
            })
            .collect::<std::io::Result<Vec<()>>>()
    })?;
    Ok((THREADS * files) as f64 / t0.elapsed().as_secs_f64())
}

fn status_u64(nodes: &bench_cluster::Nodes<'_>, i: usize, key: &str) -> u64 {
    nodes
        .status(i)
        .and_then(|s| s["mount"][key].as_u64())
        .unwrap_or(0)
}

pub fn run(b: &ScaleBench) -> Result<()> {
    if b.files == 0 {
        bail!("--files must be at least 1");
    }
    let lab = bench_cluster::Lab::new(3, &b.dir, 1 << 30)?;
    let nodes = lab.start(2, "scale", true)?;
    let owner = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(o) = nodes
                .status(0)
                .and_then(|s| s["mount"]["owner"].as_u64())
                .filter(|&o| o > 0)
            {
                break o as usize - 1;
            }
            if Instant::now() > deadline {
                bail!("no namespace owner within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (follower, third) = ((owner + 1) % 3, (owner + 2) % 3);
    let mut rows = Vec::new();
    let mut forwarded_rate = f64::MAX;
    for (who, i) in [("owner", owner), ("follower", follower)] {
        let base = nodes.mountpoint(i).join(format!("scale-{who}"));
        for t in 0..THREADS {
            std::fs::create_dir_all(base.join(format!("t{t}")))?;
        }
        let name = |t: usize, k: usize| format!("scale-{who}/t{t}/f{k}");
        let here = |t, k| nodes.mountpoint(i).join(name(t, k));
        let there = |t, k| nodes.mountpoint(third).join(name(t, k));
        let create = rate(b.files, |t, k| std::fs::File::create(here(t, k)).map(drop))?;
        let stat = rate(b.files, |t, k| std::fs::metadata(there(t, k)).map(drop))?;
        let t0 = Instant::now();
        let mut entries = 0;
        for t in 0..THREADS {
            entries +=
                std::fs::read_dir(nodes.mountpoint(third).join(format!("scale-{who}/t{t}")))?
                    .count();
        }
        let readdir = entries as f64 / t0.elapsed().as_secs_f64();
        let rename = rate(b.files, |t, k| {
            let from = here(t, k);
            std::fs::rename(&from, from.with_extension("done"))
        })?;
        let note = |what: &str| format!("{THREADS} threads via node {} ({who}){what}", i + 1);
        rows.push(Row::new(
            format!("create, {who}'s mount"),
            create,
            "op/s",
            note(""),
        ));
        rows.push(Row::new(
            format!("stat, third node (of the {who}'s files)"),
            stat,
            "op/s",
            format!("node {}: each a lookup at the owner", third + 1),
        ));
        rows.push(Row::new(
            "readdir entries, third node",
            readdir,
            "ent/s",
            format!("node {}", third + 1),
        ));
        rows.push(Row::new(
            format!("rename, {who}'s mount"),
            rename,
            "op/s",
            note(""),
        ));
        if who == "follower" {
            forwarded_rate = create.min(rename);
        }
    }

    // Namespace calls one checkpoint shard costs (through a follower's mount).
    let before = status_u64(&nodes, follower, "calls_forwarded");
    let shards = 20;
    let dir = nodes.mountpoint(follower).join("ckpt");
    std::fs::create_dir_all(&dir)?;
    let data = vec![7u8; 1 << 20];
    for k in 0..shards {
        let tmp = dir.join(format!("rank-{k}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, dir.join(format!("rank-{k}.distcp")))?;
    }
    let calls = status_u64(&nodes, follower, "calls_forwarded").saturating_sub(before);
    // Data writes of followers are forwarded too in this version: count only the
    // namespace calls (one 1 MiB write per shard here).
    let per_shard = calls.saturating_sub(shards) as f64 / shards as f64;
    rows.push(Row::new(
        "namespace calls per checkpoint shard",
        per_shard,
        "calls",
        "create, fsync, close, rename and the kernel's lookups".into(),
    ));
    let table_bytes = nodes
        .status(0)
        .map(|s| serde_json::to_vec(&s["cluster"]["table"]).map_or(0, |v| v.len()))
        .unwrap_or(0);

    // etcd: lease keep-alives per second from 4 clients.
    let etcd = Etcd::new(&[lab.etcd_url()], Duration::from_secs(2))?;
    let lease = lab.block_on(etcd.grant(60)).context("etcd lease")?;
    let t0 = Instant::now();
    let n = lab.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let e = etcd.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                let end = Instant::now() + Duration::from_secs(3);
                while Instant::now() < end {
                    if e.keep_alive(lease).await.is_ok() {
                        n += 1;
                    }
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap_or(0);
        }
        total
    });
    let keepalives = n as f64 / t0.elapsed().as_secs_f64();
    rows.push(Row::new(
        "etcd lease keep-alives",
        keepalives,
        "op/s",
        "16 concurrent clients, HTTP gateway".into(),
    ));
    drop(nodes);
    drop(lab);

    println!();
    println!(
        "spool bench scale: measured on 3 nodes in network namespaces (R=2, every node mounting)"
    );
    bench_cluster::print_rows(&rows, b.csv.as_deref())?;
    model(b, forwarded_rate, per_shard, keepalives, table_bytes);
    let _ = std::fs::remove_dir_all(&b.dir);
    Ok(())
}

/// The extrapolation: per node count, each shared resource's load against what one
/// of it sustains (measured above, or a published limit).
fn model(b: &ScaleBench, ns_ops: f64, calls_per_shard: f64, keepalives: f64, table_bytes: usize) {
    // A storage account's default limits (Azure standard GPv2): requests/s and ingress.
    const ACCOUNT_REQ_S: f64 = 20_000.0;
    const ACCOUNT_INGRESS_BPS: f64 = 25e9 / 8.0;
    // Blob writes in 4 MiB blocks plus one commit per file.
    const BLOCK_BYTES: f64 = 4.0 * 1048576.0;
    // A node's entry in the chain table (address, incarnation) in JSON, roughly.
    const NODE_ENTRY_BYTES: f64 = 70.0;
    let drain_s = 600.0;
    println!();
    println!(
        "model: {} ranks per node, one shard each per checkpoint, all nodes within {} s; {:.1} namespace calls per shard; {} GiB per node drained to blob storage within {} s; lease TTL {} s",
        b.ranks_per_node,
        b.window_s,
        calls_per_shard,
        b.bytes_per_node.0 >> 30,
        drain_s,
        b.lease_ttl_s
    );
    println!(
        "{:>8} {:>22} {:>22} {:>26} {:>22}",
        "nodes",
        "namespace owner load",
        "etcd keep-alive load",
        "table bytes to every node",
        "storage accounts"
    );
    for nodes in [1_000u64, 10_000, 100_000] {
        let n = nodes as f64;
        let ns = n * b.ranks_per_node as f64 * calls_per_shard / b.window_s as f64;
        let ka = n / (b.lease_ttl_s as f64 / 3.0);
        let table = table_bytes as f64 + n * NODE_ENTRY_BYTES;
        let bytes = n * b.bytes_per_node.0 as f64;
        let req = bytes / BLOCK_BYTES / drain_s;
        let accounts = (req / ACCOUNT_REQ_S)
            .max(bytes / drain_s / ACCOUNT_INGRESS_BPS)
            .ceil();
        println!(
            "{:>8} {:>14.0}/s {:>5.1}x {:>14.0}/s {:>5.1}x {:>12.1} MB x {:>8} {:>22.0}",
            nodes,
            ns,
            ns / ns_ops,
            ka,
            ka / keepalives,
            table / 1e6,
            nodes,
            accounts
        );
    }
    println!("(load / what one sustains; above 1.0x that resource is the bottleneck at that size)");
}
