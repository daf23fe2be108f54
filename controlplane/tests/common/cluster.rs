//! A real Spool cluster for tests: N `spool serve` processes, each in its own network
//! namespace (veth pairs on one bridge), and a real etcd on the bridge's host address.
//! Clients run in the test process and reach every node through the bridge.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spool_dataplane::net::client::Client;
use spool_dataplane::net::ClusterKey;

use super::etcd::EtcdServer;
use super::netns::Net;

pub const SPOOL: &str = env!("CARGO_BIN_EXE_spool");
pub const PORT: u16 = 7420;
pub const CHUNK: u32 = 1 << 20;
pub const IO: u32 = 256 << 10;

#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub nodes: usize,
    pub replication: u8,
    pub lease_ttl_s: u32,
    pub node_lost_after_s: u32,
    /// Every node mounts the cluster namespace at `<node dir>/mnt`.
    pub mount: bool,
    /// More TOML for every node's config; `{HOST_IP}` becomes the host's address on
    /// the test network (where etcd, or a blob server, listens).
    pub extra: String,
    /// More keys for the `[cluster]` section (a transport, say).
    pub cluster_extra: String,
    /// The `[device]` section's backend lines (default: a uring file in the node's
    /// directory).
    pub device: Option<String>,
    /// Nodes on loopback addresses instead of network namespaces (`Net::loopback`).
    pub loopback: bool,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            nodes: 3,
            replication: 2,
            lease_ttl_s: 2,
            node_lost_after_s: 3600,
            mount: false,
            extra: String::new(),
            cluster_extra: String::new(),
            device: None,
            loopback: false,
        }
    }
}

pub struct Cluster {
    pub opts: ClusterOpts,
    // Drop order: nodes (processes) first, then etcd, then the network.
    pub nodes: Vec<NodeProc>,
    pub etcd: EtcdServer,
    pub net: Net,
    pub key: ClusterKey,
    pub dir: tempfile::TempDir,
}

pub struct NodeProc {
    pub id: u32,
    pub index: usize,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub mountpoint: Option<PathBuf>,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A killed node leaves its FUSE mount behind, disconnected.
        if let Some(m) = &self.mountpoint {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(m)
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Cluster {
    /// Starts etcd and every node, and waits until all targets serve.
    pub fn start(opts: ClusterOpts) -> Cluster {
        let net = match opts.loopback {
            true => Net::loopback(opts.nodes),
            false => Net::new(opts.nodes),
        };
        let etcd = EtcdServer::start(net.host_ip());
        // SPOOL_TEST_KEEP=1 keeps the nodes' directories (configs, logs) for a post-mortem.
        let keep = std::env::var_os("SPOOL_TEST_KEEP").is_some();
        let dir = tempfile::Builder::new()
            .prefix("spool-cluster-")
            .disable_cleanup(keep)
            .tempdir_in("/tmp")
            .expect("tempdir");
        if keep {
            eprintln!("cluster files kept in {}", dir.path().display());
        }
        // SPOOL_TEST_LOG sets the nodes' log level (e.g. "debug").
        let level = std::env::var("SPOOL_TEST_LOG").unwrap_or_else(|_| "info".into());
        let secret = format!("cluster-key-{}-{}", std::process::id(), net.slot());
        let key_file = dir.path().join("cluster.key");
        std::fs::write(&key_file, &secret).unwrap();
        let key = ClusterKey::from_secret(secret.as_bytes()).unwrap();
        let mut nodes = Vec::new();
        for i in 0..opts.nodes {
            let id = i as u32 + 1;
            let nd = dir.path().join(format!("n{id}"));
            std::fs::create_dir_all(&nd).unwrap();
            let config = nd.join("spool.toml");
            let socket = nd.join("admin.sock");
            let toml = format!(
                r#"
[node]
name = "n{id}"
[device]
{device}
chunk_size = "1MiB"
[dataplane]
cores = 1
pin = false
io_size_max = "256KiB"
idle_spin_us = 50
[hugepages]
buffers = 96
policy = "off"
[admin]
socket = "{socket}"
[log]
level = "{level}"
[cluster]
node_id = {id}
listen = "{ip}:{PORT}"
etcd = ["{etcd}"]
name = "t{slot}"
key_file = "{key}"
replication = {r}
initial_nodes = {n}
lease_ttl_s = {ttl}
node_lost_after_s = {lost}
{cluster_extra}
"#,
                device = opts.device.clone().unwrap_or_else(|| format!(
                    "backend = \"uring\"\npath = \"{}\"\nsize = \"256MiB\"\nformat_if_new = true",
                    nd.join("device.img").display()
                )),
                cluster_extra = opts.cluster_extra,
                socket = socket.display(),
                ip = net.node_ip(i),
                etcd = etcd.url(),
                slot = net.slot(),
                key = key_file.display(),
                r = opts.replication,
                n = opts.nodes,
                ttl = opts.lease_ttl_s,
                lost = opts.node_lost_after_s,
                level = level,
            );
            let mountpoint = opts.mount.then(|| nd.join("mnt"));
            let toml = match &mountpoint {
                Some(m) => format!(
                    "{toml}[mount]\nmountpoint = \"{}\"\nthreads = 4\n",
                    m.display()
                ),
                None => toml,
            };
            let toml = format!(
                "{toml}{}\n",
                opts.extra.replace("{HOST_IP}", &net.host_ip().to_string())
            );
            std::fs::write(&config, toml).unwrap();
            nodes.push(NodeProc {
                id,
                index: i,
                config,
                socket,
                log: nd.join("spool.log"),
                child: None,
                mountpoint,
            });
        }
        let mut c = Cluster {
            opts,
            nodes,
            etcd,
            net,
            key,
            dir,
        };
        for i in 0..c.nodes.len() {
            c.start_node(i);
        }
        c.wait_all_serving(Duration::from_secs(60));
        c
    }

    pub fn start_node(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        assert!(n.child.is_none(), "node {} already running", n.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .unwrap();
        let mut cmd = match self.opts.mount {
            // The test reads and writes through the nodes' mounts.
            true => self.net.command_net_only(i, SPOOL),
            false => self.net.command(i, SPOOL),
        };
        let child = cmd
            .args(["serve", "--config"])
            .arg(&n.config)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn spool serve");
        n.child = Some(child);
    }

    /// SIGKILL: no clean shutdown, the lease just expires.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    pub fn addr(&self, i: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::from((self.net.node_ip(i), PORT))
    }

    pub fn client(&self, i: usize, timeout: Duration) -> Option<Client> {
        Client::connect(self.addr(i), &self.key, timeout).ok()
    }

    pub fn status(&self, i: usize) -> Option<Value> {
        spool_controlplane::admin::request_blocking_with_timeout(
            &self.nodes[i].socket,
            &json!({"cmd": "status"}),
            Duration::from_secs(2),
        )
        .ok()
    }

    /// Node i's merged perf counters (`perf dump`).
    pub fn perf(&self, i: usize) -> Option<Value> {
        spool_controlplane::admin::request_blocking_with_timeout(
            &self.nodes[i].socket,
            &json!({"cmd": "perf dump"}),
            Duration::from_secs(2),
        )
        .ok()
    }

    /// Every running node sees one table version in which every target serves and
    /// none of them is fenced.
    pub fn all_serving(&self) -> bool {
        let mut version = None;
        for i in 0..self.nodes.len() {
            if !self.running(i) {
                return false;
            }
            let Some(s) = self.status(i) else {
                return false;
            };
            let cl = &s["cluster"];
            let t = &cl["table"];
            let states = t["target_states"].as_object().cloned().unwrap_or_default();
            if t["chains"].as_u64().unwrap_or(0) == 0
                || states.keys().any(|k| k != "serving")
                || cl["agent"]["fenced"].as_bool() != Some(false)
            {
                return false;
            }
            let v = t["version"].as_u64();
            if version.is_some() && version != v {
                return false;
            }
            // Quiet: no request still on its way down a chain.
            if cl["replica"]["ops_in_flight"].as_u64() != Some(0) {
                return false;
            }
            version = v;
        }
        true
    }

    pub fn wait_all_serving(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.all_serving() {
            if Instant::now() > deadline {
                panic!(
                    "cluster not serving within {timeout:?}\n{}",
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // What a probe would ask agrees.
        for i in 0..self.nodes.len() {
            let (ok, out) = self.ready(i);
            assert!(ok, "node {}: spool status --ready: {out}", i + 1);
        }
    }

    /// `spool status --ready` for node i: (exit 0, output).
    pub fn ready(&self, i: usize) -> (bool, String) {
        let out = std::process::Command::new(SPOOL)
            .args(["status", "--ready", "--socket"])
            .arg(&self.nodes[i].socket)
            .output()
            .expect("run spool status");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// Status and log tails of every node, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let st = self.status(i).map(|s| {
                let c = &s["cluster"];
                format!(
                    "agent {} table v{} states {} syncs {} ops in flight {}",
                    c["agent"],
                    c["table"]["version"],
                    c["table"]["target_states"],
                    c["replica"]["syncs"],
                    c["replica"]["ops_in_flight"]
                )
            });
            out += &format!(
                "--- node {} (running: {}): {:?}\n{}\n",
                n.id,
                self.running(i),
                st,
                interesting(&n.log, 25)
            );
        }
        out += &format!("--- etcd\n{}\n", self.etcd.log_tail(5));
        out
    }
}

/// The last `n` lines that warn, fail or change the table.
pub fn interesting(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s
        .lines()
        .filter(|l| {
            l.contains("WARN")
                || l.contains("ERROR")
                || l.contains("table")
                || l.contains("resync")
                || l.contains("panick")
        })
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
