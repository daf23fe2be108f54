//! The daemon's configuration: a TOML file, every key checked when it is loaded.
//!
//! Unknown keys are errors (a typo fails at start instead of being ignored), and every
//! problem names the full dotted key and what is allowed, e.g.
//! `dataplane.cores = 0: must be between 1 and 64`. All problems of a file are
//! reported together.

pub mod blob;
pub mod size;

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

pub use blob::{BlobBackend, BlobConfig, BlobMode};
pub use size::{ByteSize, ParseSizeError};

use crate::Error;

/// The whole configuration (`spool serve --config FILE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[node]`
    #[serde(default)]
    pub node: NodeConfig,
    /// `[device]`
    #[serde(default)]
    pub device: DeviceConfig,
    /// `[dataplane]`
    #[serde(default)]
    pub dataplane: DataplaneConfig,
    /// `[hugepages]`
    #[serde(default)]
    pub hugepages: HugepagesConfig,
    /// `[admin]`
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[metrics]`
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[log]`
    #[serde(default)]
    pub log: LogConfig,
    /// `[mount]`
    #[serde(default)]
    pub mount: MountConfig,
    /// `[cluster]`: present = this node joins a cluster (etcd membership, chain
    /// replication over TCP); absent = a single node, no etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// `[blob]`: present = the mount drains to (and later reads through from) an object
    /// store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<BlobConfig>,
}

/// `[cluster]`: membership in etcd and replication between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster, 1..1000000.
    pub node_id: u32,
    /// Transport address peers and clients connect to ("ip:port"; not 0.0.0.0).
    pub listen: SocketAddr,
    /// etcd client URLs ("http://host:port"), at least one.
    pub etcd: Vec<String>,
    /// Cluster name: keys live under `/spool/<name>/` in etcd (default "spool").
    #[serde(default = "default_cluster_name")]
    pub name: String,
    /// File holding the shared cluster key (at least 16 bytes; mode 0600 advised).
    /// Peers and clients prove they hold it before anything else is accepted.
    pub key_file: PathBuf,
    /// Copies of every chunk, 1..3 (default 2).
    #[serde(default = "default_replication")]
    pub replication: u8,
    /// Nodes that must have registered before the leader publishes the first chain
    /// table, 1..1024 (default 1).
    #[serde(default = "default_initial_nodes")]
    pub initial_nodes: u32,
    /// Most chains in the table, 1..65536 (default 256).
    #[serde(default = "default_chains_max")]
    pub chains_max: u32,
    /// Membership lease TTL: a node silent this long is down, 1..60 (default 3).
    #[serde(default = "default_lease_ttl_s")]
    pub lease_ttl_s: u32,
    /// A node down this long is lost: its chains are refilled on other nodes,
    /// 1..604800 (default 300).
    #[serde(default = "default_node_lost_after_s")]
    pub node_lost_after_s: u32,
    /// How this node reaches its peers: "tcp" (default) or "rdma" (RC queue pairs on
    /// `rdma_device`; set-up over TCP on `listen`, where clients stay on TCP).
    #[serde(default)]
    pub transport: TransportKind,
    /// The RDMA device for `transport = "rdma"` ("mlx5_0", or soft-RoCE's "rxe0").
    #[serde(default)]
    pub rdma_device: Option<String>,
    /// Its GID index, 0..255 (default: the first RoCE v2 GID with an IPv4 address).
    #[serde(default)]
    pub rdma_gid_index: Option<u32>,
}

/// Peer transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    #[default]
    Tcp,
    Rdma,
}

fn default_cluster_name() -> String {
    "spool".to_owned()
}
fn default_replication() -> u8 {
    2
}
fn default_initial_nodes() -> u32 {
    1
}
fn default_chains_max() -> u32 {
    256
}
fn default_lease_ttl_s() -> u32 {
    3
}
fn default_node_lost_after_s() -> u32 {
    300
}

impl ClusterConfig {
    fn check(&self, p: &mut Vec<String>) {
        CLUSTER_NODE_ID.check(u64::from(self.node_id), p);
        CLUSTER_REPLICATION.check(u64::from(self.replication), p);
        CLUSTER_INITIAL_NODES.check(u64::from(self.initial_nodes), p);
        CLUSTER_CHAINS_MAX.check(u64::from(self.chains_max), p);
        CLUSTER_LEASE_TTL_S.check(u64::from(self.lease_ttl_s), p);
        CLUSTER_NODE_LOST_AFTER_S.check(u64::from(self.node_lost_after_s), p);
        if let Some(i) = self.rdma_gid_index {
            CLUSTER_RDMA_GID_INDEX.check(u64::from(i), p);
        }
        match (self.transport, self.rdma_device.as_deref()) {
            (TransportKind::Rdma, None | Some("")) => p.push(
                "cluster.rdma_device: required when cluster.transport = \"rdma\" \
                 (an RDMA device name, see `rdma link`)"
                    .to_owned(),
            ),
            (TransportKind::Tcp, Some(_)) => p.push(
                "cluster.rdma_device: only used with cluster.transport = \"rdma\"".to_owned(),
            ),
            _ => {}
        }
        if self.listen.ip().is_unspecified() || self.listen.port() == 0 {
            p.push(format!(
                "cluster.listen = \"{}\": must be this node's own address and a port \
                 (peers dial it), not 0.0.0.0 or port 0",
                self.listen
            ));
        }
        if self.etcd.is_empty() {
            p.push("cluster.etcd = []: at least one etcd URL (\"http://host:port\")".to_owned());
        }
        for u in &self.etcd {
            let ok = u
                .strip_prefix("http://")
                .and_then(|r| r.trim_end_matches('/').rsplit_once(':'))
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                p.push(format!(
                    "cluster.etcd = {u:?}: must look like \"http://host:port\""
                ));
            }
        }
        if let Some(why) = node_name_problem(&self.name) {
            p.push(format!("cluster.name = {:?}: {why}", self.name));
        }
        if self.key_file.as_os_str().is_empty() {
            p.push("cluster.key_file = \"\": a file with the cluster key".to_owned());
        }
    }
}

/// `[mount]`: the FUSE mount the daemon serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MountConfig {
    /// Directory to mount Spool on at start; none = no mount (mount later with
    /// `spool mount`). An absolute path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<PathBuf>,
    /// FUSE request threads, 1..64 (default 8: with 8 writers, 8 threads reached 0.92x
    /// of the dataplane's write throughput and 4 threads 0.63x).
    pub threads: usize,
    /// Every open bypasses the kernel's page cache (FUSE direct I/O): one copy less
    /// per byte and no page-cache bookkeeping; mmap still works (default true:
    /// measured fastest for checkpoint writes and reads, see docs/PERFORMANCE.md).
    pub direct_io: bool,
    /// Kernel writeback cache: write(2) returns once the page cache holds the data;
    /// fsync and close make it durable (default false). Needs `direct_io = false`.
    pub writeback_cache: bool,
    /// Kernel readahead for the mount, a multiple of 4KiB, 4KiB..1GiB (default 16MiB).
    pub readahead: ByteSize,
    /// How long the kernel caches attributes and names, 0..3600000 (default 1000).
    pub attr_ttl_ms: u64,
    /// Let every user use the mount (allow_other; default true: jobs rarely run as root).
    pub allow_other: bool,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            mountpoint: None,
            threads: 8,
            direct_io: true,
            writeback_cache: false,
            readahead: ByteSize::mib(16),
            attr_ttl_ms: 1000,
            allow_other: true,
        }
    }
}

/// `[node]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's name (logs, metrics, membership). Default: `/etc/hostname`, else
    /// "spool". 1..253 characters of `A-Z a-z 0-9 . _ -`.
    pub name: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: default_node_name(),
        }
    }
}

/// The node name from `/etc/hostname` when it is a valid name, else "spool".
pub fn default_node_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| node_name_problem(s).is_none())
        .unwrap_or_else(|| "spool".to_owned())
}

/// Block-device backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceBackend {
    /// io_uring with O_DIRECT on a file or block device.
    #[default]
    Uring,
    /// RAM (tests).
    Mem,
    /// Spool's own NVMe driver over VFIO (the controller bound to vfio-pci).
    Nvme,
}

impl fmt::Display for DeviceBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceBackend::Uring => "uring",
            DeviceBackend::Mem => "mem",
            DeviceBackend::Nvme => "nvme",
        })
    }
}

/// `[device]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// `"uring"` (default), `"nvme"` or `"mem"`.
    pub backend: DeviceBackend,
    /// File or block device; required for `uring`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// PCI address of the NVMe controller (DDDD:BB:DD.F, bound to vfio-pci with
    /// `spool nvme bind`); required for `nvme`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<String>,
    /// `nvme`: namespace id, 1..1024 (default 1).
    pub nsid: u32,
    /// `nvme`: a command with no completion for this long fails the device,
    /// 100..600000 (default 30000).
    pub io_timeout_ms: u64,
    /// Bytes of the device to use; a missing file is created with this size. At least
    /// `chunk_size`, a multiple of 4KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    /// Format a device that holds no Spool format yet (default true).
    pub format_if_new: bool,
    /// Chunk size when formatting: a power of two, 64KiB..64MiB (default 4MiB).
    pub chunk_size: ByteSize,
    /// Shards when formatting: 0 = one per dataplane core (default), else 1..256.
    pub shards: u32,
    /// io_uring queue depth per core, 1..4096 (default 128).
    pub queue_depth: u32,
    /// IORING_SETUP_SQPOLL (default false).
    pub sqpoll: bool,
    /// IORING_SETUP_IOPOLL (default false).
    pub iopoll: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            backend: DeviceBackend::Uring,
            path: None,
            pci_address: None,
            nsid: 1,
            io_timeout_ms: 30_000,
            size: None,
            format_if_new: true,
            chunk_size: ByteSize::mib(4),
            shards: 0,
            queue_depth: 128,
            sqpoll: false,
            iopoll: false,
        }
    }
}

/// `[dataplane]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneConfig {
    /// Polling cores, 1..64 (default 1).
    pub cores: usize,
    /// CPU ids to pin the cores to, one per core, distinct, each 0..1023.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Vec<usize>>,
    /// Pin each core's thread to a CPU (default true).
    pub pin: bool,
    /// Spin this long when idle before parking, 0..1000000 (default 50).
    pub idle_spin_us: u64,
    /// Longest park (backoff cap) when idle, 1..1000000 (default 1000).
    pub idle_park_max_us: u64,
    /// Slots per request ring: a power of two, 2..65536 (default 1024).
    pub ring_capacity: usize,
    /// Largest device I/O: a multiple of 4KiB, 4KiB..device.chunk_size (default 1MiB).
    pub io_size_max: ByteSize,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            cores: 1,
            cpus: None,
            pin: true,
            idle_spin_us: 50,
            idle_park_max_us: 1000,
            ring_capacity: 1024,
            io_size_max: ByteSize::mib(1),
        }
    }
}

/// Where DMA buffers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HugepagePolicy {
    /// Hugepages if reserved, else ordinary pages.
    #[default]
    Prefer,
    /// Hugepages or refuse to start.
    Require,
    /// Ordinary pages. Written `"none"` (`"off"` is accepted too).
    #[serde(rename = "none", alias = "off")]
    Off,
}

/// `[hugepages]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HugepagesConfig {
    /// `"prefer"` (default), `"require"` or `"none"`.
    pub policy: HugepagePolicy,
    /// DMA buffers of `dataplane.io_size_max` bytes, 1..1000000 (default 64).
    pub buffers: usize,
}

impl Default for HugepagesConfig {
    fn default() -> Self {
        HugepagesConfig {
            policy: HugepagePolicy::Prefer,
            buffers: 64,
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The admin Unix socket (default `/run/spool/admin.sock`), at most 107 bytes.
    pub socket: PathBuf,
}

/// The default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/spool/admin.sock";

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `"ADDR:PORT"` to serve `GET /metrics` on; none = no metrics listener.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "deserialize_socket_addr"
    )]
    pub listen: Option<SocketAddr>,
}

fn deserialize_socket_addr<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    s.trim().parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "invalid address {s:?}: expected IP:PORT, e.g. \"127.0.0.1:9464\" or \"[::1]:9464\""
        ))
    })
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// error | warn | info | debug | trace | off, or a filter such as
    /// "info,spool_dataplane=debug" (default "info").
    pub level: String,
    /// `"text"` (default) or `"json"`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// An integer key and its allowed range (inclusive).
struct IntRange {
    key: &'static str,
    min: u64,
    max: u64,
}

const DEVICE_SHARDS: IntRange = IntRange {
    key: "device.shards",
    min: 0,
    max: 256,
};
const DEVICE_NSID: IntRange = IntRange {
    key: "device.nsid",
    min: 1,
    max: 1024,
};
const DEVICE_IO_TIMEOUT_MS: IntRange = IntRange {
    key: "device.io_timeout_ms",
    min: 100,
    max: 600_000,
};
const DEVICE_QUEUE_DEPTH: IntRange = IntRange {
    key: "device.queue_depth",
    min: 1,
    max: 4096,
};
const DATAPLANE_CORES: IntRange = IntRange {
    key: "dataplane.cores",
    min: 1,
    max: 64,
};
const DATAPLANE_CPU: IntRange = IntRange {
    key: "dataplane.cpus",
    min: 0,
    max: 1023,
};
const DATAPLANE_IDLE_SPIN_US: IntRange = IntRange {
    key: "dataplane.idle_spin_us",
    min: 0,
    max: 1_000_000,
};
const DATAPLANE_IDLE_PARK_MAX_US: IntRange = IntRange {
    key: "dataplane.idle_park_max_us",
    min: 1,
    max: 1_000_000,
};
const DATAPLANE_RING_CAPACITY: IntRange = IntRange {
    key: "dataplane.ring_capacity",
    min: 2,
    max: 65536,
};
const HUGEPAGES_BUFFERS: IntRange = IntRange {
    key: "hugepages.buffers",
    min: 1,
    max: 1_000_000,
};

const MOUNT_THREADS: IntRange = IntRange {
    key: "mount.threads",
    min: 1,
    max: 64,
};
const MOUNT_ATTR_TTL_MS: IntRange = IntRange {
    key: "mount.attr_ttl_ms",
    min: 0,
    max: 3_600_000,
};

const CLUSTER_NODE_ID: IntRange = IntRange {
    key: "cluster.node_id",
    min: 1,
    max: 1_000_000,
};
const CLUSTER_REPLICATION: IntRange = IntRange {
    key: "cluster.replication",
    min: 1,
    max: 3,
};
const CLUSTER_INITIAL_NODES: IntRange = IntRange {
    key: "cluster.initial_nodes",
    min: 1,
    max: 1024,
};
const CLUSTER_CHAINS_MAX: IntRange = IntRange {
    key: "cluster.chains_max",
    min: 1,
    max: 65536,
};
const CLUSTER_LEASE_TTL_S: IntRange = IntRange {
    key: "cluster.lease_ttl_s",
    min: 1,
    max: 60,
};
const CLUSTER_NODE_LOST_AFTER_S: IntRange = IntRange {
    key: "cluster.node_lost_after_s",
    min: 1,
    max: 604_800,
};
const CLUSTER_RDMA_GID_INDEX: IntRange = IntRange {
    key: "cluster.rdma_gid_index",
    min: 0,
    max: 255,
};

const INT_RANGES: [&IntRange; 17] = [
    &CLUSTER_NODE_ID,
    &CLUSTER_REPLICATION,
    &CLUSTER_INITIAL_NODES,
    &CLUSTER_CHAINS_MAX,
    &CLUSTER_LEASE_TTL_S,
    &CLUSTER_NODE_LOST_AFTER_S,
    &CLUSTER_RDMA_GID_INDEX,
    &DEVICE_SHARDS,
    &DEVICE_QUEUE_DEPTH,
    &DATAPLANE_CORES,
    &DATAPLANE_CPU,
    &DATAPLANE_IDLE_SPIN_US,
    &DATAPLANE_IDLE_PARK_MAX_US,
    &DATAPLANE_RING_CAPACITY,
    &HUGEPAGES_BUFFERS,
    &MOUNT_THREADS,
    &MOUNT_ATTR_TTL_MS,
];

const CHUNK_SIZE_MIN: ByteSize = ByteSize::kib(64);
const CHUNK_SIZE_MAX: ByteSize = ByteSize::mib(64);
const BLOCK: u64 = 4096;
/// `sun_path` holds 108 bytes including the terminating NUL.
const SOCKET_PATH_MAX_BYTES: usize = 107;
const NODE_NAME_MAX_CHARS: usize = 253;

impl IntRange {
    fn contains(&self, value: u64) -> bool {
        (self.min..=self.max).contains(&value)
    }

    fn check(&self, value: u64, problems: &mut Vec<String>) {
        if !self.contains(value) {
            problems.push(format!("{} = {value}: {}", self.key, self.allowed()));
        }
    }

    fn allowed(&self) -> String {
        format!("must be between {} and {}", self.min, self.max)
    }
}

/// What is wrong with a node name, if anything.
fn node_name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.chars().count() > NODE_NAME_MAX_CHARS {
        return Some(format!("must be 1 to {NODE_NAME_MAX_CHARS} characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Some("may only contain A-Z a-z 0-9 . _ -".to_owned());
    }
    None
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates a config given as a string.
    pub fn from_toml_str(s: &str) -> Result<Config, Error> {
        Self::parse(s, "<string>")
    }

    fn parse(s: &str, origin: &str) -> Result<Config, Error> {
        let fail = |problems: Vec<String>| Error::Config {
            origin: origin.to_owned(),
            problems,
        };
        let config = deserialize(s).map_err(|p| fail(vec![p]))?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems))
        }
    }

    /// Every value checked against its allowed range; empty when the config is valid.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(why) = node_name_problem(&self.node.name) {
            p.push(format!("node.name = {:?}: {why}", self.node.name));
        }
        self.device.check(&mut p);
        self.dataplane.check(self.device.chunk_size, &mut p);
        HUGEPAGES_BUFFERS.check(self.hugepages.buffers as u64, &mut p);
        check_socket_path(&self.admin.socket, &mut p);
        self.mount.check(&mut p);
        if let Some(c) = &self.cluster {
            c.check(&mut p);
        }
        if let Some(b) = &self.blob {
            b.check(&mut p);
        }
        // Each FUSE thread holds up to two buffers while it waits for more.
        let need = 2 * self.mount.threads + 8;
        if self.hugepages.buffers < need {
            p.push(format!(
                "hugepages.buffers = {}: must be at least 2 x mount.threads + 8 = {need}",
                self.hugepages.buffers
            ));
        }
        if let Err(why) = crate::logging::parse_level(&self.log.level) {
            p.push(format!("log.level = {:?}: {why}", self.log.level));
        }
        p
    }

    /// Shards to format the device with: `device.shards`, or one per dataplane core.
    pub fn effective_shards(&self) -> u32 {
        match self.device.shards {
            0 => u32::try_from(self.dataplane.cores).unwrap_or(u32::MAX),
            n => n,
        }
    }

    /// The config as TOML (what `config show` prints in text form); it loads back.
    pub fn to_toml_string(&self) -> String {
        // Every field serializes to TOML (None is skipped), so this cannot fail; an
        // error would still be reported rather than panic.
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

impl DeviceConfig {
    fn check(&self, p: &mut Vec<String>) {
        if self.backend == DeviceBackend::Uring {
            match &self.path {
                None => p.push(
                    "device.path: required when device.backend = \"uring\" \
                     (a file or block device, e.g. \"/var/lib/spool/device.img\")"
                        .to_owned(),
                ),
                Some(path) if path.as_os_str().is_empty() => {
                    p.push("device.path = \"\": must not be empty".to_owned())
                }
                Some(_) => {}
            }
        }
        if self.backend == DeviceBackend::Nvme {
            match self.pci_address.as_deref() {
                None => p.push(
                    "device.pci_address: required when device.backend = \"nvme\" \
                     (the controller's PCI address, e.g. \"0000:00:04.0\"; see `spool nvme list`)"
                        .to_owned(),
                ),
                Some(a) => {
                    if let Err(e) = spool_dataplane::device::nvme::pci::check_address(a) {
                        p.push(format!("device.pci_address = {a:?}: {e}"));
                    }
                }
            }
        }
        DEVICE_NSID.check(u64::from(self.nsid), p);
        DEVICE_IO_TIMEOUT_MS.check(self.io_timeout_ms, p);
        let chunk = self.chunk_size;
        if !chunk.0.is_power_of_two() || chunk < CHUNK_SIZE_MIN || chunk > CHUNK_SIZE_MAX {
            p.push(format!(
                "device.chunk_size = {chunk}: must be a power of two between \
                 {CHUNK_SIZE_MIN} and {CHUNK_SIZE_MAX}"
            ));
        }
        if let Some(size) = self.size {
            if size.0 % BLOCK != 0 || size < chunk {
                p.push(format!(
                    "device.size = {size}: must be a multiple of 4KiB and at least \
                     device.chunk_size ({chunk})"
                ));
            }
        }
        DEVICE_SHARDS.check(u64::from(self.shards), p);
        DEVICE_QUEUE_DEPTH.check(u64::from(self.queue_depth), p);
    }
}

impl DataplaneConfig {
    fn check(&self, chunk_size: ByteSize, p: &mut Vec<String>) {
        DATAPLANE_CORES.check(self.cores as u64, p);
        if let Some(cpus) = &self.cpus {
            if cpus.len() != self.cores {
                p.push(format!(
                    "dataplane.cpus = {cpus:?}: must list exactly dataplane.cores ({}) CPU ids",
                    self.cores
                ));
            }
            let mut seen = BTreeSet::new();
            for &cpu in cpus {
                if cpu as u64 > DATAPLANE_CPU.max {
                    p.push(format!(
                        "dataplane.cpus: CPU {cpu}: {}",
                        DATAPLANE_CPU.allowed()
                    ));
                } else if !seen.insert(cpu) {
                    p.push(format!(
                        "dataplane.cpus: CPU {cpu} is listed twice: each core needs its own CPU"
                    ));
                }
            }
            if !self.pin {
                p.push(
                    "dataplane.cpus is set but dataplane.pin = false: remove cpus or set pin = true"
                        .to_owned(),
                );
            }
        }
        DATAPLANE_IDLE_SPIN_US.check(self.idle_spin_us, p);
        DATAPLANE_IDLE_PARK_MAX_US.check(self.idle_park_max_us, p);
        let ring = self.ring_capacity as u64;
        if !ring.is_power_of_two() || !DATAPLANE_RING_CAPACITY.contains(ring) {
            p.push(format!(
                "dataplane.ring_capacity = {ring}: must be a power of two between {} and {}",
                DATAPLANE_RING_CAPACITY.min, DATAPLANE_RING_CAPACITY.max
            ));
        }
        let io = self.io_size_max;
        if io.0 % BLOCK != 0 || io.0 < BLOCK || io > chunk_size {
            p.push(format!(
                "dataplane.io_size_max = {io}: must be a multiple of 4KiB between 4KiB and \
                 device.chunk_size ({chunk_size})"
            ));
        }
    }
}

impl MountConfig {
    fn check(&self, p: &mut Vec<String>) {
        MOUNT_THREADS.check(self.threads as u64, p);
        MOUNT_ATTR_TTL_MS.check(self.attr_ttl_ms, p);
        if let Some(m) = &self.mountpoint {
            if !m.is_absolute() {
                p.push(format!(
                    "mount.mountpoint = {:?}: must be an absolute path",
                    m.display().to_string()
                ));
            }
        }
        if self.direct_io && self.writeback_cache {
            p.push(
                "mount.writeback_cache = true: needs mount.direct_io = false (direct I/O \
                 bypasses the page cache the writeback cache lives in)"
                    .to_owned(),
            );
        }
        let ra = self.readahead.0;
        if ra % BLOCK != 0 || !(BLOCK..=1 << 30).contains(&ra) {
            p.push(format!(
                "mount.readahead = {}: must be a multiple of 4KiB between 4KiB and 1GiB",
                self.readahead
            ));
        }
    }
}

fn check_socket_path(path: &Path, p: &mut Vec<String>) {
    let len = path.as_os_str().len();
    if len == 0 {
        p.push("admin.socket = \"\": must not be empty".to_owned());
    } else if len > SOCKET_PATH_MAX_BYTES {
        p.push(format!(
            "admin.socket = {:?}: is {len} bytes; a Unix socket path must be at most \
             {SOCKET_PATH_MAX_BYTES} bytes",
            path.display().to_string()
        ));
    } else if path.as_os_str().to_string_lossy().ends_with('/') {
        p.push(format!(
            "admin.socket = {:?}: must be a file path, not a directory",
            path.display().to_string()
        ));
    }
}

/// TOML -> `Config`, with one message naming the full dotted key on failure.
///
/// Two passes: the text is parsed into a table first (syntax errors, with line and
/// column), then the table is deserialized, which reports the dotted key path of a
/// bad value; the line is taken from a span-aware pass when it reports the same error.
fn deserialize(s: &str) -> Result<Config, String> {
    let table: toml::Table = toml::from_str(s).map_err(|e| {
        let at = e.span().map(|span| line_col(s, span.start));
        match at {
            Some((line, col)) => format!("line {line}, column {col}: {}", one_line(e.message())),
            None => one_line(e.message()),
        }
    })?;
    let err = match Config::deserialize(toml::Value::Table(table)) {
        Ok(config) => return Ok(config),
        Err(err) => err,
    };
    let message = err.message().trim();
    let shown = err.to_string();
    let path = shown
        .strip_prefix(err.message())
        .map(str::trim)
        .and_then(|rest| rest.strip_prefix("in `"))
        .and_then(|rest| rest.strip_suffix('`'))
        .unwrap_or("");
    let line = match toml::from_str::<Config>(s) {
        Err(e) if e.message().trim() == message => e.span().map(|span| line_col(s, span.start).0),
        _ => None,
    };
    let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();

    // serde: "unknown field `foo`, expected one of `a`, `b`"
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            let key = join_key(path, field);
            return Err(format!("{key}: unknown key{at}{expected}"));
        }
    }
    let mut text = if path.is_empty() {
        message.to_owned()
    } else {
        format!("{path}: {message}")
    };
    if let Some(range) = INT_RANGES.iter().find(|r| r.key == path) {
        text = format!("{text}; {}", range.allowed());
    }
    Err(format!("{text}{at}"))
}

/// A multi-line parser message on one line.
fn one_line(message: &str) -> String {
    message
        .trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(", ")
}

fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// 1-based line and column of byte offset `at`.
fn line_col(s: &str, at: usize) -> (usize, usize) {
    let before = s.get(..at).unwrap_or(s);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests;
