//! `spool bench cluster`: replicated write throughput with R = 1, 2, 3 between nodes
//! in network namespaces (veth pairs on a bridge, a real etcd), side by side with the
//! physical limits measured in the same run: iperf3 over the same veth and fio on a
//! file of the same filesystem. Then, with R = 2 and default membership settings: the
//! time from SIGKILL of a chain head until writes to its chains succeed again, and
//! resync throughput when the node comes back. Last, with R = 2 and every node
//! mounting the cluster namespace: a file written through the namespace owner's mount
//! and through another node's, and read back on a third.
//!
//! Every node is a real `spool serve` (this binary) started with `ip netns exec`. The
//! writers run in this process and send each write to its chain's head, as a client
//! that knows the chain table does.

#[path = "../../../tests/common/etcd.rs"]
mod etcd;
#[path = "../../../tests/common/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::CpuSpan;
use serde_json::{json, Value};
use spool_controlplane::cluster::etcd::Etcd;
use spool_controlplane::config::size::ByteSize;
use spool_dataplane::net::client::Client;
use spool_dataplane::net::frame::{Msg, MutKind};
use spool_dataplane::net::{ClusterKey, Status};
use spool_dataplane::replica::ChainTable;
use spool_dataplane::store::ChunkId;

const PORT: u16 = 7420;
const CHUNK: u64 = 4 << 20;
const IO: usize = 1 << 20;
/// Bytes per write(2) and read(2) through the mounts.
const FUSE_IO: usize = 8 << 20;

#[derive(Debug, clap::Args)]
pub struct ClusterBench {
    /// Nodes (network namespaces) in the cluster, 3..8.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Bytes written for each replication factor.
    #[arg(long, default_value = "1GiB")]
    size: ByteSize,
    /// Concurrent writers, each with its own connection to chain heads.
    #[arg(long, default_value_t = 3)]
    writers: usize,
    /// 1 MiB writes each writer keeps in flight (on different chunks).
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Replication factors to measure, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    replication: Vec<u8>,
    /// Directory for the nodes' device files (one filesystem, like fio's file).
    #[arg(long, default_value = "/var/tmp/spool-bench-cluster")]
    dir: PathBuf,
    /// Skip the failover and resync measurements.
    #[arg(long)]
    no_failover: bool,
    /// Skip the FUSE measurements over the cluster namespace.
    #[arg(long)]
    no_fuse: bool,
    /// Mount with the kernel's page cache and writeback cache instead of direct I/O
    /// (the default): writes return once in the page cache and go out in parallel.
    #[arg(long)]
    fuse_writeback: bool,
    /// The nodes' `dataplane.idle_spin_us`: how long an idle dataplane core spins
    /// before it parks (spinning cores compete with everything else on a small VM).
    #[arg(long, default_value_t = 50)]
    idle_spin_us: u64,
    /// Also write the results as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
}

pub(crate) struct Row {
    what: String,
    value: f64,
    unit: &'static str,
    /// CPU seconds per GiB moved, for rows that move data.
    cpu_s_per_gib: Option<f64>,
    pub(crate) note: String,
}

impl Row {
    pub(crate) fn new(
        what: impl Into<String>,
        value: f64,
        unit: &'static str,
        note: String,
    ) -> Row {
        Row {
            what: what.into(),
            value,
            unit,
            cpu_s_per_gib: None,
            note,
        }
    }

    /// The row's CPU cost: `cpu` measured over the `bytes` it moved.
    pub(crate) fn cpu(self, cpu: &CpuSpan, bytes: u64) -> Row {
        self.cpu_s_per_gib(cpu.per_gib(bytes))
    }

    pub(crate) fn cpu_s_per_gib(mut self, cpu_s_per_gib: f64) -> Row {
        self.cpu_s_per_gib = Some(cpu_s_per_gib);
        self
    }
}

/// Prints the table (and writes it as CSV when asked).
pub(crate) fn print_rows(rows: &[Row], csv: Option<&std::path::Path>) -> Result<()> {
    let cpu = |r: &Row| r.cpu_s_per_gib.map_or(String::new(), |c| format!("{c:.2}"));
    println!(
        "{:<46} {:>10} {:<5} {:>9}  vs the limit",
        "what", "value", "", "CPU s/GiB"
    );
    for r in rows {
        println!(
            "{:<46} {:>10.1} {:<5} {:>9}  {}",
            r.what,
            r.value,
            r.unit,
            cpu(r),
            r.note
        );
    }
    if let Some(p) = csv {
        let mut f =
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
        writeln!(f, "what,value,unit,cpu_s_per_gib,note")?;
        for r in rows {
            writeln!(
                f,
                "{:?},{},{},{},{:?}",
                r.what,
                r.value,
                r.unit,
                cpu(r),
                r.note
            )?;
        }
    }
    Ok(())
}

/// The network namespaces, etcd and runtime that clusters of a run share.
pub(crate) struct Lab {
    b: ClusterBench,
    rt: tokio::runtime::Runtime,
    // Drop order: etcd before the network it listens on.
    etcd: etcd::EtcdServer,
    net: netns::Net,
}

impl Lab {
    /// `nodes` namespaces; device files under `dir`, sized for `bytes` of data at R = 3.
    pub(crate) fn new(nodes: usize, dir: &std::path::Path, bytes: u64) -> Result<Lab> {
        if !(3..=8).contains(&nodes) {
            bail!("--nodes {nodes}: between 3 and 8");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let net = netns::Net::new(nodes);
        let etcd = etcd::EtcdServer::start(net.host_ip());
        let b = ClusterBench {
            nodes,
            size: ByteSize(bytes),
            writers: 1,
            depth: 1,
            replication: Vec::new(),
            dir: dir.to_owned(),
            no_failover: true,
            no_fuse: true,
            fuse_writeback: false,
            idle_spin_us: 50,
            csv: None,
        };
        Ok(Lab { b, rt, etcd, net })
    }

    pub(crate) fn etcd_url(&self) -> String {
        self.etcd.url()
    }

    pub(crate) fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// A fresh cluster with replication `r` (every node mounting if `mount`).
    pub(crate) fn start(&self, r: u8, tag: &str, mount: bool) -> Result<Nodes<'_>> {
        start_nodes(
            &self.b,
            &self.net,
            &self.etcd.url(),
            &self.rt,
            r,
            tag,
            mount,
            None,
        )
    }
}

/// A running cluster of `spool serve` processes.
pub(crate) struct Nodes<'a> {
    net: &'a netns::Net,
    name: String,
    dir: PathBuf,
    key: ClusterKey,
    children: Vec<Option<Child>>,
    etcd: Etcd,
    rt: &'a tokio::runtime::Runtime,
    /// Every node mounts the cluster namespace at `n<i>/mnt`.
    mount: bool,
}

impl Nodes<'_> {
    fn socket(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{}", i + 1)).join("admin.sock")
    }
    fn config(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{}", i + 1)).join("spool.toml")
    }
    fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.net.node_ip(i), PORT))
    }
    pub(crate) fn mountpoint(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{}", i + 1)).join("mnt")
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let exe = std::env::current_exe().context("this binary's path")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("n{}", i + 1)).join("spool.log"))?;
        // A mounting node shares this process's mount namespace (`ip netns exec` would
        // give it its own), so the mount is usable here.
        let mut cmd = match self.mount {
            true => self.net.command_net_only(i, exe),
            false => self.net.command(i, exe),
        };
        let child = cmd
            .args(["serve", "--config"])
            .arg(self.config(i))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting spool serve in its namespace")?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// The running nodes' process ids.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.children.iter().flatten().map(Child::id).collect()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn status(&self, i: usize) -> Option<Value> {
        spool_controlplane::admin::request_blocking_with_timeout(
            &self.socket(i),
            &json!({"cmd": "status"}),
            Duration::from_secs(2),
        )
        .ok()
    }

    fn counter(&self, i: usize, name: &str) -> u64 {
        spool_controlplane::admin::request_blocking_with_timeout(
            &self.socket(i),
            &json!({"cmd": "perf dump"}),
            Duration::from_secs(2),
        )
        .ok()
        .and_then(|v| v["counters"][name].as_u64())
        .unwrap_or(0)
    }

    /// Every node runs, is admitted and sees one table in which every target serves.
    fn all_serving(&self) -> bool {
        let mut version = None;
        for i in 0..self.children.len() {
            let Some(s) = self.status(i) else {
                return false;
            };
            let cl = &s["cluster"];
            let states = cl["table"]["target_states"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            if cl["table"]["chains"].as_u64().unwrap_or(0) == 0
                || states.keys().any(|k| k != "serving")
                || cl["agent"]["fenced"].as_bool() != Some(false)
            {
                return false;
            }
            let v = cl["table"]["version"].as_u64();
            if version.is_some() && version != v {
                return false;
            }
            version = v;
        }
        true
    }

    /// Node `victim` is gone from every chain, every chain has its replicas again,
    /// and every other node serves that table with all its targets serving.
    fn restored(&self, victim: usize) -> bool {
        let Ok(t) = self.table() else { return false };
        let lost = victim as u32 + 1;
        let full = t.chains.iter().all(|c| {
            c.targets.len() >= usize::from(t.replication)
                && c.targets.iter().all(|x| x.node != lost)
        });
        full && (0..self.children.len()).filter(|&i| i != victim).all(|i| {
            self.status(i).is_some_and(|s| {
                let tb = &s["cluster"]["table"];
                tb["version"].as_u64() == Some(t.version)
                    && tb["target_states"]
                        .as_object()
                        .is_some_and(|m| m.keys().all(|k| k == "serving"))
            })
        })
    }

    fn wait_serving(&self, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        while !self.all_serving() {
            if t0.elapsed() > timeout {
                bail!(
                    "cluster not serving within {timeout:?}; logs in {}",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(t0.elapsed())
    }

    fn table(&self) -> Result<ChainTable> {
        let key = format!("/spool/{}/table", self.name);
        let kv = self
            .rt
            .block_on(self.etcd.get(&key))?
            .context("no chain table in etcd")?;
        Ok(serde_json::from_slice(&kv.value)?)
    }
}

impl Drop for Nodes<'_> {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
            if self.mount {
                // A killed node leaves its mount behind, disconnected.
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(self.mountpoint(i))
                    .stderr(Stdio::null())
                    .status();
            }
            // Device files are allocated whole: a run starts several clusters, and
            // keeping each one's would take its size times nodes times clusters.
            // The logs stay.
            let _ = std::fs::remove_file(self.dir.join(format!("n{}", i + 1)).join("device.img"));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn start_nodes<'a>(
    b: &ClusterBench,
    net: &'a netns::Net,
    etcd_url: &str,
    rt: &'a tokio::runtime::Runtime,
    r: u8,
    tag: &str,
    mount: bool,
    lost_after_s: Option<u32>,
) -> Result<Nodes<'a>> {
    let dir = b.dir.join(tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let secret = format!("bench-{}-{}", std::process::id(), rand::random::<u64>());
    std::fs::write(dir.join("cluster.key"), &secret)?;
    let name = format!("bench-{tag}");
    // Each node holds about size x R / nodes; leave room.
    let dev_mib = (b.size.0 * 3 / b.nodes as u64 + (1 << 30)) >> 20;
    for i in 0..b.nodes {
        let nd = dir.join(format!("n{}", i + 1));
        std::fs::create_dir_all(&nd)?;
        let toml = format!(
            r#"[node]
name = "n{id}"
[device]
path = "{dev}"
size = "{dev_mib}MiB"
format_if_new = true
chunk_size = "4MiB"
[dataplane]
cores = 1
pin = false
io_size_max = "1MiB"
idle_spin_us = {spin}
[hugepages]
buffers = 64
policy = "off"
[admin]
socket = "{sock}"
[log]
level = "info"
[cluster]
node_id = {id}
listen = "{ip}:{PORT}"
etcd = ["{etcd_url}"]
name = "{name}"
key_file = "{key}"
replication = {r}
initial_nodes = {n}
{lost}
{mount}"#,
            id = i + 1,
            dev = nd.join("device.img").display(),
            sock = nd.join("admin.sock").display(),
            ip = net.node_ip(i),
            key = dir.join("cluster.key").display(),
            n = b.nodes,
            spin = b.idle_spin_us,
            lost = lost_after_s.map_or(String::new(), |s| format!("node_lost_after_s = {s}")),
            mount = match mount {
                true => format!(
                    "[mount]\nmountpoint = \"{}\"\nthreads = 8\ndirect_io = {}\nwriteback_cache = {}\n",
                    nd.join("mnt").display(),
                    !b.fuse_writeback,
                    b.fuse_writeback
                ),
                false => String::new(),
            },
        );
        std::fs::write(nd.join("spool.toml"), toml)?;
    }
    let etcd = Etcd::new(&[etcd_url.to_owned()], Duration::from_secs(2))?;
    let mut nodes = Nodes {
        net,
        name,
        dir,
        key: ClusterKey::from_secret(secret.as_bytes()).context("key")?,
        children: (0..b.nodes).map(|_| None).collect(),
        etcd,
        rt,
        mount,
    };
    for i in 0..b.nodes {
        nodes.spawn(i)?;
    }
    nodes.wait_serving(Duration::from_secs(60))?;
    Ok(nodes)
}

/// Chunks of file `inode` whose chain head is node `head` (ids are 1-based).
fn chunks_headed_by(t: &ChainTable, inode: u64, head: u32, n: usize) -> Vec<ChunkId> {
    (0..u32::MAX)
        .map(|index| ChunkId { inode, index })
        .filter(|c| t.chain(t.chain_of(c)).and_then(|ch| ch.head()) == Some(head))
        .take(n)
        .collect()
}

/// One writer: `chunks` written whole, `depth` of them at a time, 1 MiB per request.
fn writer(
    addr: SocketAddr,
    key: &ClusterKey,
    chunks: &[ChunkId],
    depth: usize,
    data: &[u8],
) -> Result<u64> {
    let mut c =
        Client::connect(addr, key, Duration::from_secs(10)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let per_chunk = (CHUNK / IO as u64) as u32;
    let mut next = 0usize;
    let mut inflight: BTreeMap<u64, (ChunkId, u32)> = BTreeMap::new();
    let mut bytes = 0u64;
    let send = |c: &mut Client, chunk: ChunkId, k: u32| -> Result<u64> {
        c.send(&Msg::Mutate {
            chain_ver: 0,
            chunk,
            kind: MutKind::Write,
            offset: k * IO as u32,
            version: 0,
            data,
        })
        .map_err(|e| anyhow::anyhow!("{e}"))
    };
    while next < chunks.len().min(depth) {
        let id = send(&mut c, chunks[next], 0)?;
        inflight.insert(id, (chunks[next], 0));
        next += 1;
    }
    while !inflight.is_empty() {
        let r = c.recv().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (chunk, k) = inflight
            .remove(&r.req_id)
            .context("reply to an unknown request")?;
        if r.status != Status::Ok {
            bail!("write {chunk} +{} MiB: {:?}", k, r.status);
        }
        bytes += IO as u64;
        if k + 1 < per_chunk {
            let id = send(&mut c, chunk, k + 1)?;
            inflight.insert(id, (chunk, k + 1));
        } else if next < chunks.len() {
            let id = send(&mut c, chunks[next], 0)?;
            inflight.insert(id, (chunks[next], 0));
            next += 1;
        }
    }
    Ok(bytes)
}

/// Writes `size` bytes with `writers` writers spread over the nodes; returns MB/s and
/// the bytes written.
fn replicated_write(
    nodes: &Nodes<'_>,
    b: &ClusterBench,
    inode_base: u64,
    data: &[u8],
) -> Result<(f64, u64)> {
    let t = nodes.table()?;
    let per_writer = (b.size.0 / b.writers as u64).div_ceil(CHUNK) as usize;
    let plans: Vec<(SocketAddr, Vec<ChunkId>)> = (0..b.writers)
        .map(|w| {
            let node = w % b.nodes;
            let chunks = chunks_headed_by(&t, inode_base + w as u64, node as u32 + 1, per_writer);
            (nodes.addr(node), chunks)
        })
        .collect();
    let t0 = Instant::now();
    let bytes: Result<Vec<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = plans
            .iter()
            .map(|(addr, chunks)| {
                let key = &nodes.key;
                s.spawn(move || writer(*addr, key, chunks, b.depth, data))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let total: u64 = bytes?.iter().sum();
    Ok((total as f64 / secs / 1e6, total))
}

/// iperf3 from node 1 to node 2: MB/s, and the CPU seconds per GiB of both ends.
fn iperf3(net: &netns::Net) -> Result<(f64, f64)> {
    let mut server = net
        .command(1, "iperf3")
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 (apt-get install iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    let cpu = CpuSpan::start(vec![server.id()]);
    let out = net
        .command(0, "iperf3")
        .args([
            "-c",
            &net.node_ip(1).to_string(),
            "-p",
            "5201",
            "-t",
            "5",
            "-J",
        ])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bytes = v["end"]["sum_received"]["bytes"]
        .as_u64()
        .context("iperf3 bytes")?;
    // Read before the server exits (`-1`: after its one test) and its CPU leaves view.
    let cpu_per_gib = cpu.per_gib(bytes.max(1));
    let _ = server.kill();
    let _ = server.wait();
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 bits_per_second")?;
    Ok((bps / 8.0 / 1e6, cpu_per_gib))
}

/// SIGKILL a chain head while a client writes to one of its chunks through another
/// node; seconds until a write succeeds again.
fn failover(nodes: &mut Nodes<'_>, data: &[u8]) -> Result<f64> {
    let victim = nodes.children.len() - 1;
    let t = nodes.table()?;
    let chunk = chunks_headed_by(&t, 9_000_000, victim as u32 + 1, 1)[0];
    let addr = nodes.addr(0);
    let key = nodes.key.clone();
    let write = |c: &mut Option<Client>| -> bool {
        if c.is_none() {
            *c = Client::connect(addr, &key, Duration::from_millis(500)).ok();
        }
        let Some(cl) = c.as_mut() else { return false };
        match cl.write(chunk, 0, &data[..64 << 10]) {
            Ok(r) => r.status == Status::Ok,
            Err(_) => {
                *c = None;
                false
            }
        }
    };
    let mut c = None;
    if !write(&mut c) {
        bail!("the first write to {chunk} failed");
    }
    nodes.kill(victim);
    let t0 = Instant::now();
    while !write(&mut c) {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("writes did not resume within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Writes `bytes` of file `inode` to chunks whose chain includes node index
/// `victim`, through each chunk's chain head.
fn write_to_chains_of(
    nodes: &Nodes<'_>,
    victim: usize,
    inode: u64,
    bytes: u64,
    data: &[u8],
) -> Result<()> {
    let t = nodes.table()?;
    let n = bytes.div_ceil(CHUNK) as usize;
    let chunks: Vec<ChunkId> = (0..u32::MAX)
        .map(|index| ChunkId { inode, index })
        .filter(|c| {
            t.chain(t.chain_of(c))
                .is_some_and(|ch| ch.targets.iter().any(|x| x.node == victim as u32 + 1))
        })
        .take(n)
        .collect();
    let by_head: BTreeMap<u32, Vec<ChunkId>> = chunks.iter().fold(BTreeMap::new(), |mut m, c| {
        if let Some(h) = t.chain(t.chain_of(c)).and_then(|ch| ch.head()) {
            m.entry(h).or_insert_with(Vec::new).push(*c);
        }
        m
    });
    for (head, cs) in &by_head {
        writer(nodes.addr(*head as usize - 1), &nodes.key, cs, 4, data)?;
    }
    Ok(())
}

/// With the victim down, writes `bytes` to its chains, restarts it and times the
/// resync; returns (MB/s, bytes sent, seconds, CPU seconds per GiB sent by every node).
fn resync(nodes: &mut Nodes<'_>, bytes: u64, data: &[u8]) -> Result<(f64, u64, f64, f64)> {
    let victim = nodes.children.len() - 1;
    // Chunks whose chain includes the victim (now offline there).
    write_to_chains_of(nodes, victim, 9_100_000, bytes, data)?;
    let before: u64 = (0..victim)
        .map(|i| nodes.counter(i, "sync_bytes_sent"))
        .sum();
    nodes.spawn(victim)?;
    let (t0, cpu) = (Instant::now(), CpuSpan::start(nodes.pids()));
    nodes.wait_serving(Duration::from_secs(300))?;
    let secs = t0.elapsed().as_secs_f64();
    let sent: u64 = (0..victim)
        .map(|i| nodes.counter(i, "sync_bytes_sent"))
        .sum::<u64>()
        - before;
    let cpu_per_gib = cpu.per_gib(sent.max(1));
    Ok((sent as f64 / secs / 1e6, sent, secs, cpu_per_gib))
}

/// `node_lost_after_s` of the restore measurement: a lost node's chains are refilled
/// this long after it went down (the default is an hour, for maintenance restarts).
const RESTORE_LOST_AFTER_S: u32 = 5;

/// Writes `bytes` to chains that include the victim, kills it, and times until its
/// chains have their replicas again on the other nodes; returns (seconds, bytes
/// re-replicated).
fn restore(nodes: &mut Nodes<'_>, bytes: u64, data: &[u8]) -> Result<(f64, u64)> {
    let victim = nodes.children.len() - 1;
    write_to_chains_of(nodes, victim, 9_200_000, bytes, data)?;
    let before: u64 = (0..victim)
        .map(|i| nodes.counter(i, "sync_bytes_sent"))
        .sum();
    nodes.kill(victim);
    let t0 = Instant::now();
    while !nodes.restored(victim) {
        if t0.elapsed() > Duration::from_secs(600) {
            bail!(
                "chains not restored within 600 s; logs in {}",
                nodes.dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let secs = t0.elapsed().as_secs_f64();
    let sent: u64 = (0..victim)
        .map(|i| nodes.counter(i, "sync_bytes_sent"))
        .sum::<u64>()
        - before;
    Ok((secs, sent))
}

pub fn run(b: &ClusterBench) -> Result<()> {
    if !(3..=8).contains(&b.nodes) {
        bail!("--nodes {}: between 3 and 8", b.nodes);
    }
    if b.replication.iter().any(|r| !(1..=3).contains(r)) {
        bail!("--replication: each between 1 and 3");
    }
    std::fs::create_dir_all(&b.dir).with_context(|| format!("creating {}", b.dir.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let net = netns::Net::new(b.nodes);
    let etcd = etcd::EtcdServer::start(net.host_ip());
    let data: Vec<u8> = (0..IO)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut rows = Vec::new();

    eprintln!("iperf3 between two namespaces over the veth bridge ...");
    let (net_mbs, net_cpu) = iperf3(&net)?;
    let iperf3_what = "iperf3 node1 -> node2 (veth)";
    rows.push(Row::new(iperf3_what, net_mbs, "MB/s", String::new()).cpu_s_per_gib(net_cpu));
    eprintln!("fio sequential write on {} ...", b.dir.display());
    let fio_file = b.dir.join("fio.img");
    crate::bench::prepare_file(&fio_file, b.size.0)?;
    let cpu = CpuSpan::start(vec![]);
    let f = crate::bench::fio(&fio_file, "write", b.size.0, 1 << 20, 16, false, false)?;
    let _ = std::fs::remove_file(&fio_file);
    let dev_mbs = f.bytes as f64 / f.secs / 1e6;
    rows.push(
        Row::new(
            "fio seq write 1MiB qd16 (device)",
            dev_mbs,
            "MB/s",
            String::new(),
        )
        .cpu(&cpu, f.bytes),
    );

    for &r in &b.replication {
        eprintln!("R = {r}: starting {} nodes ...", b.nodes);
        let nodes = start_nodes(b, &net, &etcd.url(), &rt, r, &format!("r{r}"), false, None)?;
        eprintln!("R = {r}: writing {} ...", b.size);
        let cpu = CpuSpan::start(nodes.pids());
        let (mbs, bytes) = replicated_write(&nodes, b, 1_000_000 * u64::from(r), &data)?;
        // Every replica lands on this one machine's disk, so the device share of one
        // copy is fio / R; the network carries R - 1 copies per byte over the veths.
        let limit = net_mbs.min(dev_mbs / f64::from(r));
        let note = format!(
            "{:.2}x min(iperf3, fio/R = {:.0}); {:.2}x min(iperf3, fio); CPU: every node and the writers",
            mbs / limit,
            dev_mbs / f64::from(r),
            mbs / net_mbs.min(dev_mbs)
        );
        rows.push(Row::new(format!("replicated write R={r}"), mbs, "MB/s", note).cpu(&cpu, bytes));
        drop(nodes);
    }

    if !b.no_failover {
        eprintln!("failover: R = 2, lease_ttl_s 3 (the default) ...");
        let mut nodes = start_nodes(b, &net, &etcd.url(), &rt, 2, "failover", false, None)?;
        let secs = failover(&mut nodes, &data)?;
        rows.push(Row::new(
            "kill -9 chain head -> writes succeed",
            secs,
            "s",
            "default settings (lease_ttl_s = 3)".into(),
        ));
        eprintln!("resync: writing while the node is down, then restarting it ...");
        let (mbs, sent, secs, cpu) = resync(&mut nodes, (b.size.0 / 2).max(CHUNK), &data)?;
        let note = format!(
            "{:.0} MiB sent, restart -> all serving in {secs:.1} s",
            sent as f64 / (1 << 20) as f64
        );
        rows.push(Row::new("resync of the returning node", mbs, "MB/s", note).cpu_s_per_gib(cpu));
    }
    if !b.no_failover {
        eprintln!(
            "restore: R = 2, a node lost for good (node_lost_after_s = {RESTORE_LOST_AFTER_S}) ..."
        );
        let mut nodes = start_nodes(
            b,
            &net,
            &etcd.url(),
            &rt,
            2,
            "restore",
            false,
            Some(RESTORE_LOST_AFTER_S),
        )?;
        let (secs, sent) = restore(&mut nodes, (b.size.0 / 2).max(CHUNK), &data)?;
        rows.push(Row::new(
            "restore after a node loss (R = 2)",
            secs,
            "s",
            format!(
                "kill -9 -> every chain at R again, including the lease (3 s) and node_lost_after_s ({RESTORE_LOST_AFTER_S} s) before the refill starts; {:.0} MiB re-replicated",
                sent as f64 / (1 << 20) as f64,
            ),
        ));
    }
    if !b.no_fuse {
        eprintln!("FUSE over the cluster namespace: R = 2, every node mounts ...");
        let nodes = start_nodes(b, &net, &etcd.url(), &rt, 2, "fuse", true, None)?;
        // Checkpoint writers hand the kernel whole tensors: several MiB per write(2),
        // from page-aligned memory (large allocations are mmap'd), as dd does. With
        // direct I/O the kernel cuts requests at the buffer's page boundaries, so from
        // an unaligned buffer every request would start and end mid-block.
        let mut backing = vec![0u8; FUSE_IO + 4096];
        let skip = backing.as_ptr().align_offset(4096);
        let big = &mut backing[skip..skip + FUSE_IO];
        for (d, s) in big.iter_mut().zip(data.iter().cycle()) {
            *d = *s;
        }
        let big = &*big;
        let cache = match b.fuse_writeback {
            true => "writeback cache",
            false => "direct I/O",
        };
        rows.extend(fuse_rows(
            &nodes,
            b.size.0.min(1 << 30),
            b.writers,
            big,
            cache,
        )?);
    }
    drop(etcd);

    println!();
    println!("spool bench cluster: {} nodes in network namespaces, {} per run, {} writers x depth {}, 1 MiB writes, 4 MiB chunks", b.nodes, b.size, b.writers, b.depth);
    print_rows(&rows, b.csv.as_deref())?;
    let _ = std::fs::remove_dir_all(&b.dir);
    Ok(())
}

/// Sequential writes of `data`-sized pieces, `bytes` in all, to a new file, then fsync.
fn fuse_write(path: &std::path::Path, bytes: u64, data: &[u8]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(data.len() as u64) as usize;
        f.write_all(&data[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all()
        .with_context(|| format!("fsync {}", path.display()))
}

/// Reads `path` whole in `data`-sized pieces, checking every piece.
fn fuse_read(path: &std::path::Path, bytes: u64, data: &[u8]) -> Result<()> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // Page-aligned, like the writer's (see `run`).
    let mut backing = vec![0u8; data.len() + 4096];
    let skip = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[skip..skip + data.len()];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(data.len() as u64) as usize;
        f.read_exact(&mut buf[..n])
            .with_context(|| format!("reading {}", path.display()))?;
        if buf[..n] != data[..n] {
            bail!("{}: read back different bytes", path.display());
        }
        left -= n as u64;
    }
    Ok(())
}

/// Runs `f` on `files` in parallel threads: aggregate MB/s for `bytes` in total, and
/// the bytes moved.
fn parallel(
    files: &[PathBuf],
    bytes: u64,
    data: &[u8],
    f: fn(&std::path::Path, u64, &[u8]) -> Result<()>,
) -> Result<(f64, u64)> {
    let each = bytes / files.len() as u64;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let hs: Vec<_> = files
            .iter()
            .map(|p| s.spawn(move || f(p, each, data)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a worker panicked")))
            .collect::<Result<Vec<()>>>()
    })?;
    let moved = each * files.len() as u64;
    Ok((moved as f64 / t0.elapsed().as_secs_f64() / 1e6, moved))
}

/// Files written through the owner's mount and through a follower's (one per writer),
/// read back on a third node (followers forward to the owner; the owner writes down
/// the chains).
fn fuse_rows(
    nodes: &Nodes<'_>,
    bytes: u64,
    writers: usize,
    data: &[u8],
    cache: &str,
) -> Result<Vec<Row>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let owner = loop {
        let o = nodes
            .status(0)
            .and_then(|s| s["mount"]["owner"].as_u64())
            .filter(|&o| o > 0);
        if let Some(o) = o {
            break o as usize - 1;
        }
        if Instant::now() > deadline {
            bail!("no namespace owner within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let n = nodes.children.len();
    let (follower, reader) = ((owner + 1) % n, (owner + 2) % n);
    let mut rows = Vec::new();
    for (who, i) in [("owner", owner), ("follower", follower)] {
        let names: Vec<String> = (0..writers)
            .map(|w| format!("bench-{who}-{w}.bin"))
            .collect();
        let at = |node: usize| -> Vec<PathBuf> {
            names
                .iter()
                .map(|f| nodes.mountpoint(node).join(f))
                .collect()
        };
        let cpu = CpuSpan::start(nodes.pids());
        let (w, moved) = parallel(&at(i), bytes, data, fuse_write)?;
        let note = format!(
            "R=2, {writers} writers x {} MiB, {} MiB writes, fsync, {}",
            (bytes / writers as u64) >> 20,
            data.len() >> 20,
            cache
        );
        let what = format!("FUSE write via node {} ({who})", i + 1);
        rows.push(Row::new(what, w, "MB/s", note).cpu(&cpu, moved));
        let cpu = CpuSpan::start(nodes.pids());
        let (r, moved) = parallel(&at(reader), bytes, data, fuse_read)?;
        let what = format!("FUSE read of it via node {}", reader + 1);
        let note = "a follower's mount, checked byte for byte".into();
        rows.push(Row::new(what, r, "MB/s", note).cpu(&cpu, moved));
    }
    Ok(rows)
}
