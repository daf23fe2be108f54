//! Bringing a node up from its config: the device (created and formatted when new),
//! the DMA pool, the dataplane engine, the admin socket and metrics; and taking it down
//! cleanly on SIGTERM or SIGINT.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use spool_controlplane::admin::{AdminServer, AdminTarget};
use spool_controlplane::blob::{self, NsSource, StoreReader, Warmup, Writeback};
use spool_controlplane::cluster::agent::Agent;
use spool_controlplane::config::{BlobMode, Config, DeviceBackend, HugepagePolicy};
use spool_controlplane::logging::{self, LogHandle};
use spool_controlplane::{metrics, shutdown};
use spool_dataplane::device::mem::MemDevice;
use spool_dataplane::device::nvme::{pci, NvmeController, NvmeOptions};
use spool_dataplane::device::uring::{UringDevice, UringOptions};
use spool_dataplane::device::BlockDevice;
use spool_dataplane::engine::{Engine, EngineOptions};
use spool_dataplane::metrics::SCHEMA;
use spool_dataplane::net::ClusterKey;
use spool_dataplane::replica::{Replica, ReplicaOptions, TargetState};
use spool_dataplane::store::{self, FormatOptions, Superblock};
use spool_dataplane::Error as DpError;
use spool_fuse_shim::cluster::ClusterNs;
use spool_fuse_shim::io::ChunkIo;
use spool_fuse_shim::meta::remote::BlobReader;
use spool_fuse_shim::ops::NsOps;
use spool_fuse_shim::rpc::{self, RpcServer};
use spool_fuse_shim::{MountOptions, Mounted, Namespace};
use spool_hugepages::{DmaPool, PagePolicy};
use spool_perf::Perf;

/// Whether `path` names an NVMe controller by PCI address (and no file of that name).
pub fn is_pci_address(path: &Path) -> bool {
    path.to_str().is_some_and(|a| pci::check_address(a).is_ok()) && !path.exists()
}

/// Creates `path` as a file of `size` bytes when asked (or when missing), then formats.
/// A PCI address formats that NVMe controller (bound to vfio-pci) through the nvme
/// backend.
pub fn format_path(
    path: &Path,
    size: Option<u64>,
    chunk_size: u64,
    shards: u32,
    force: bool,
) -> Result<Superblock> {
    let opts = FormatOptions {
        chunk_size: u32::try_from(chunk_size).context("chunk size")?,
        shards,
        wal_size: 0,
        force,
    };
    if is_pci_address(path) {
        if size.is_some() {
            bail!("--size applies to files; an NVMe namespace has its own size");
        }
        let address = path.to_str().unwrap_or_default();
        let mut q = open_nvme(address, 1, &NvmeOptions::default(), &[])?;
        return Ok(store::format(&mut q[0], &opts)?);
    }
    if let Some(size) = size {
        create_file(path, size)?;
    } else if !path.exists() {
        bail!(
            "{} does not exist; pass --size to create a file-backed device",
            path.display()
        );
    }
    let uo = UringOptions {
        queue_depth: 16,
        sqpoll: false,
        iopoll: false,
    };
    let mut dev = UringDevice::open(path, &uo, &[])?;
    Ok(store::format(&mut dev, &opts)?)
}

/// Opens `queues` queue pairs on the NVMe controller at `address`.
pub fn open_nvme(
    address: &str,
    queues: usize,
    opts: &NvmeOptions,
    pools: &[Arc<DmaPool>],
) -> Result<Vec<spool_dataplane::device::nvme::NvmeQueue>> {
    NvmeController::open(address, queues, opts, pools)
        .with_context(|| format!("opening NVMe controller {address} (spool nvme list shows it)"))
}

/// Creates (or grows) a file-backed device of `size` bytes, with its blocks allocated
/// now: a sparse file would let the filesystem run out under the store later, and a
/// write the store had room for would fail mid-checkpoint. A file system without
/// fallocate keeps the file sparse, with a warning.
fn create_file(path: &Path, size: u64) -> Result<()> {
    use std::os::fd::AsFd as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let existed = path.exists();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    if f.metadata()?.len() < size {
        f.set_len(size)
            .with_context(|| format!("sizing {} to {size} bytes", path.display()))?;
    }
    let len = i64::try_from(size).context("device size above 2^63 bytes")?;
    match spool_ffi::posix::fallocate(f.as_fd(), 0, 0, len) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            tracing::warn!(path = %path.display(), "the filesystem cannot preallocate; the device file stays sparse and may run out of space under the store");
            Ok(())
        }
        Err(e) => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let free = std::fs::canonicalize(dir.unwrap_or(Path::new(".")))
                .ok()
                .and_then(|d| std::ffi::CString::new(d.into_os_string().into_encoded_bytes()).ok())
                .and_then(|d| spool_ffi::posix::statvfs(&d).ok())
                .map(|v| v.f_bavail * v.f_frsize);
            if !existed {
                let _ = std::fs::remove_file(path);
            }
            Err(e).with_context(|| {
                format!(
                    "allocating {size} bytes for the device file {} (device.size){}",
                    path.display(),
                    free.map_or(String::new(), |b| format!(
                        "; its filesystem has {b} bytes free"
                    ))
                )
            })
        }
    }
}

/// The running node, as the admin socket sees it.
struct Node {
    config: Config,
    engine: Arc<Engine>,
    log: LogHandle,
    started: Instant,
    /// The namespace, loaded at the first mount (recovery runs then).
    ns: Mutex<Option<Arc<Namespace>>>,
    mount: Mutex<Option<Mounted>>,
    /// Cluster mode: the replication service and the membership agent.
    replica: Option<Arc<Replica>>,
    agent: std::sync::OnceLock<Agent>,
    /// Cluster mode: the cluster-wide namespace (run here while this node owns it,
    /// forwarded to the owner otherwise) and the RPC that serves it to other nodes.
    cluster_ns: Option<(Arc<ClusterNs>, RpcServer)>,
    /// `[blob]` in writeback mode: the uploader.
    blob: std::sync::OnceLock<Writeback>,
    /// `[blob]` with `read_through`: what the namespace fetches from.
    reader: Option<Arc<StoreReader>>,
    /// The last `spool warmup`.
    warmup: Mutex<Option<Arc<Warmup>>>,
}

impl Node {
    fn namespace(&self) -> Result<Arc<Namespace>> {
        let mut ns = self.ns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = ns.as_ref() {
            return Ok(Arc::clone(n));
        }
        let t0 = Instant::now();
        let io = Arc::new(ChunkIo::new(Arc::clone(&self.engine)));
        let n = Arc::new(Namespace::open(io).context("loading the namespace")?);
        if let Some(r) = &self.reader {
            n.blob_read_from(Arc::clone(r) as Arc<dyn BlobReader>);
        }
        tracing::info!(
            ms = t0.elapsed().as_millis() as u64,
            inodes = n.status().inodes,
            "namespace loaded"
        );
        *ns = Some(Arc::clone(&n));
        Ok(n)
    }

    /// What the mount serves: the cluster's namespace in cluster mode, else this
    /// node's own.
    fn ns_ops(&self) -> Result<Arc<dyn NsOps>> {
        match &self.cluster_ns {
            Some((c, _)) => Ok(Arc::clone(c) as Arc<dyn NsOps>),
            None => Ok(self.namespace()? as Arc<dyn NsOps>),
        }
    }

    fn do_mount(&self, path: &Path) -> Result<PathBuf> {
        let mut m = self.mount.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cur) = m.as_ref() {
            bail!("already mounted at {}", cur.mountpoint().display());
        }
        let c = &self.config.mount;
        let opts = MountOptions {
            mountpoint: path.to_owned(),
            threads: c.threads,
            writeback_cache: c.writeback_cache,
            direct_io: c.direct_io,
            readahead_bytes: c.readahead.0,
            attr_ttl: Duration::from_millis(c.attr_ttl_ms),
            allow_other: c.allow_other,
            attr_flush: Duration::from_secs(1),
        };
        let mounted = Mounted::mount(self.ns_ops()?, &opts)?;
        *m = Some(mounted);
        Ok(path.to_owned())
    }

    fn do_umount(&self) -> Result<PathBuf> {
        let mounted = self
            .mount
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .context("nothing is mounted")?;
        let path = mounted.mountpoint().to_owned();
        mounted.unmount()?;
        Ok(path)
    }
}

impl Node {
    /// Membership, chains and resyncs as `spool status` shows them.
    /// The namespace when it runs here: this node's own (once loaded), or the
    /// cluster's while this node owns it.
    fn running_namespace(&self) -> Option<Arc<Namespace>> {
        match &self.cluster_ns {
            Some((c, _)) => c.local(),
            None => self.ns.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// `path` as a path in the mount: relative paths are taken as such; absolute
    /// ones must lie under the mountpoint.
    fn mount_path(&self, path: Option<&str>) -> Result<String, String> {
        let Some(p) = path else {
            return Ok(String::new());
        };
        if !p.starts_with('/') {
            return Ok(p.trim_matches('/').to_owned());
        }
        let mp = self
            .mount
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|m| m.mountpoint().to_owned())
            .or_else(|| self.config.mount.mountpoint.clone())
            .ok_or_else(|| format!("{p}: nothing is mounted; give a path relative to the mount"))?;
        Path::new(p)
            .strip_prefix(&mp)
            .map(|r| r.to_string_lossy().into_owned())
            .map_err(|_| format!("{p} is not under the mount {}", mp.display()))
    }

    fn writeback(&self) -> Result<&Writeback, String> {
        self.blob.get().ok_or_else(|| {
            "no blob writeback here: the config has no [blob] section, or its mode is cache-only"
                .to_owned()
        })
    }

    fn cluster_status(&self) -> Value {
        let Some(r) = &self.replica else {
            return Value::Null;
        };
        let t = r.table();
        let me = self.config.cluster.as_ref().map_or(0, |c| c.node_id);
        let mut states = std::collections::BTreeMap::<String, usize>::new();
        let mut mine = Vec::new();
        let mut members = std::collections::BTreeSet::new();
        for c in &t.chains {
            for x in &c.targets {
                *states
                    .entry(format!("{:?}", x.state).to_lowercase())
                    .or_default() += 1;
                members.insert(x.node);
            }
            if let Some(st) = c.state_of(me) {
                if st != TargetState::Serving || c.head() == Some(me) {
                    mine.push(json!({"chain": c.id, "version": c.version, "state": st,
                        "head": c.head() == Some(me), "targets": c.targets}));
                }
            }
        }
        json!({
            "agent": self.agent.get().map(Agent::status),
            "replica": r.status(),
            "table": {
                "version": t.version,
                "replication": t.replication,
                "chains": t.chains.len(),
                "nodes": t.nodes,
                "target_states": states,
                // Nodes holding at least one target.
                "members": members,
                // Chains this node heads or is not serving in (the interesting ones).
                "my_chains": mine,
            },
        })
    }
}

impl AdminTarget for Node {
    fn status(&self) -> Value {
        let ns = self.ns.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mountpoint = self
            .mount
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|m| m.mountpoint().display().to_string());
        let mut mount = match &self.cluster_ns {
            Some((c, _)) => serde_json::to_value(c.status()).ok(),
            None => ns.map(|n| serde_json::to_value(n.status()).unwrap_or(Value::Null)),
        };
        if let Some(v) = mount.as_mut() {
            v["mountpoint"] = json!(mountpoint);
        }
        json!({
            "node": self.config.node.name,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "log_level": self.log.level(),
            "engine": self.engine.status(),
            "mount": mount,
            "cluster": self.cluster_status(),
            "blob": self.blob.get().map(|w| {
                let mut v = w.status();
                v["backlog"] = json!(w.backlog(""));
                v
            }),
            "blob_read": self.reader.as_ref().map(|r| {
                let mut v = r.status();
                if let Some(ns) = self.running_namespace() {
                    let (files, bytes) = ns.blob_evictions();
                    v["evicted_files"] = json!(files);
                    v["evicted_bytes"] = json!(bytes);
                }
                v
            }),
        })
    }
    fn perf_dump(&self) -> Value {
        serde_json::to_value(self.engine.perf().snapshot())
            .unwrap_or_else(|e| json!({"error": e.to_string()}))
    }
    fn config_show(&self) -> Value {
        serde_json::to_value(&self.config).unwrap_or_else(|e| json!({"error": e.to_string()}))
    }
    fn set_log_level(&self, level: &str) -> Result<(), String> {
        self.log.set_level(level).map_err(|e| e.to_string())
    }
    fn mount(&self, path: &str) -> Result<Value, String> {
        self.do_mount(Path::new(path))
            .map(|p| json!({"mountpoint": p}))
            .map_err(|e| format!("{e:#}"))
    }
    fn umount(&self) -> Result<Value, String> {
        self.do_umount()
            .map(|p| json!({"mountpoint": p}))
            .map_err(|e| format!("{e:#}"))
    }
    fn flush(&self, path: Option<&str>) -> Result<Value, String> {
        let w = self.writeback()?;
        let p = self.mount_path(path)?;
        w.flush(&p);
        self.blob_status(path)
    }
    fn warmup(&self, path: Option<&str>) -> Result<Value, String> {
        if self.reader.is_none() {
            return Err("no cache-on-read here: the config has no [blob] section, or blob.read_through is false".to_owned());
        }
        let p = self.mount_path(path)?;
        let ns = self.running_namespace().ok_or(
            "the namespace does not run on this node (ask the namespace owner: spool status shows it)",
        )?;
        let mut cur = self.warmup.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = cur.as_ref().filter(|w| !w.finished()) {
            return Err(format!(
                "a warmup of {:?} is running; wait for it (spool warmup --status)",
                w.path
            ));
        }
        let w = Warmup::start(ns, p);
        let v = w.status();
        *cur = Some(w);
        Ok(v)
    }
    fn warmup_status(&self) -> Result<Value, String> {
        let cur = self.warmup.lock().unwrap_or_else(|p| p.into_inner());
        cur.as_ref()
            .map(|w| w.status())
            .ok_or_else(|| "no warmup has run since the daemon started".to_owned())
    }
    fn blob_status(&self, path: Option<&str>) -> Result<Value, String> {
        let w = self.writeback()?;
        let p = self.mount_path(path)?;
        let backlog = w.backlog(&p).ok_or(
            "the namespace does not run on this node (ask the namespace owner: spool status shows it)",
        )?;
        let mut v = w.status();
        v["path"] = json!(p);
        v["backlog"] = json!(backlog);
        Ok(v)
    }
}

fn page_policy(p: HugepagePolicy) -> PagePolicy {
    match p {
        HugepagePolicy::Prefer => PagePolicy::PreferHuge,
        HugepagePolicy::Require => PagePolicy::RequireHuge,
        HugepagePolicy::Off => PagePolicy::Normal,
    }
}

/// Opens one device queue per core, formatting a new device first when configured.
fn open_devices(
    cfg: &Config,
    pool: &Arc<DmaPool>,
) -> Result<(Vec<Box<dyn BlockDevice>>, Superblock)> {
    let d = &cfg.device;
    let cores = cfg.dataplane.cores;
    let fo = FormatOptions {
        chunk_size: u32::try_from(d.chunk_size.0).context("device.chunk_size")?,
        shards: cfg.effective_shards(),
        wal_size: 0,
        force: false,
    };
    match d.backend {
        DeviceBackend::Mem => {
            let size = d.size.map(|s| s.0).unwrap_or(256 << 20);
            let mut first = MemDevice::new(size, d.queue_depth as usize);
            let sb = store::format(&mut first, &fo)?;
            let mut devs: Vec<Box<dyn BlockDevice>> = (1..cores)
                .map(|_| Box::new(first.another_queue()) as Box<dyn BlockDevice>)
                .collect();
            devs.insert(0, Box::new(first));
            tracing::warn!(
                "device.backend = \"mem\": data lives in memory and is lost at exit (tests only)"
            );
            Ok((devs, sb))
        }
        DeviceBackend::Uring => {
            let path = d
                .path
                .as_deref()
                .context("device.path is required for the uring backend")?;
            let uo = UringOptions {
                queue_depth: d.queue_depth,
                sqpoll: d.sqpoll,
                iopoll: d.iopoll,
            };
            let is_new = !path.exists();
            if is_new {
                let (true, Some(size)) = (d.format_if_new, d.size) else {
                    bail!("device.path {} does not exist; set device.size and device.format_if_new = true to create it, or run `spool format`", path.display());
                };
                create_file(path, size.0)?;
            }
            let mut probe = UringDevice::open(
                path,
                &UringOptions {
                    queue_depth: 16,
                    sqpoll: false,
                    iopoll: false,
                },
                &[],
            )?;
            let sb = superblock_or_format(&mut probe, is_new, d.format_if_new, &fo)?;
            drop(probe);
            let devs = (0..cores)
                .map(|_| {
                    UringDevice::open(path, &uo, std::slice::from_ref(pool))
                        .map(|d| Box::new(d) as Box<dyn BlockDevice>)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((devs, sb))
        }
        DeviceBackend::Nvme => {
            let address = d
                .pci_address
                .as_deref()
                .context("device.pci_address is required for the nvme backend")?;
            let no = NvmeOptions {
                queue_depth: d.queue_depth,
                io_timeout_ms: d.io_timeout_ms,
                nsid: d.nsid,
                ..NvmeOptions::default()
            };
            let mut queues = open_nvme(address, cores, &no, std::slice::from_ref(pool))?;
            let sb = superblock_or_format(&mut queues[0], false, d.format_if_new, &fo)?;
            let devs = queues
                .into_iter()
                .map(|q| Box::new(q) as Box<dyn BlockDevice>)
                .collect();
            Ok((devs, sb))
        }
    }
}

/// The device's superblock; a device with none is formatted when it was just created
/// (`is_new`), or when `format_if_new` is set and it holds nothing (a blank head).
fn superblock_or_format(
    dev: &mut dyn BlockDevice,
    is_new: bool,
    format_if_new: bool,
    fo: &FormatOptions,
) -> Result<Superblock> {
    let name = dev.info().name.clone();
    match store::read_superblock(dev) {
        Ok(sb) => Ok(sb),
        Err(DpError::NotSpool(why)) if is_new || (format_if_new && probe_is_blank(dev)?) => {
            tracing::info!(device = %name, reason = %why, "formatting new device");
            Ok(store::format(dev, fo)?)
        }
        Err(e) => Err(e).with_context(|| format!("opening {name}")),
    }
}

/// A device whose first 128 KiB are zero holds nothing to lose.
fn probe_is_blank(dev: &mut dyn BlockDevice) -> Result<bool> {
    let pool = DmaPool::new("probe", 128 << 10, 1, PagePolicy::Normal)?;
    let buf = pool.alloc().expect("fresh pool");
    let len = (128u64 << 10).min(dev.info().size_bytes / 4096 * 4096) as u32;
    let req = spool_dataplane::device::IoRequest {
        tag: 0,
        kind: spool_dataplane::device::IoKind::Read,
        offset: 0,
        len,
        buf: Some(buf),
    };
    let (r, buf) = spool_dataplane::device::run_sync(dev, req);
    r?;
    Ok(buf.expect("buffer").as_slice()[..len as usize]
        .iter()
        .all(|&b| b == 0))
}

pub fn serve(config_path: &Path) -> Result<()> {
    let cfg = Config::load(config_path)?;
    let log = logging::init(&cfg.log)?;
    tracing::info!(config = %config_path.display(), node = %cfg.node.name, "spool starting");
    let buffers = cfg.hugepages.buffers;
    let pool = DmaPool::new(
        "data",
        cfg.dataplane.io_size_max.0 as usize,
        buffers,
        page_policy(cfg.hugepages.policy),
    )?;
    let (devices, sb) = open_devices(&cfg, &pool)?;
    let dp = &cfg.dataplane;
    let opts = EngineOptions {
        cores: dp.cores,
        cpus: dp.cpus.clone(),
        pin: dp.pin,
        idle_spin_us: dp.idle_spin_us,
        idle_park_max_us: dp.idle_park_max_us,
        ring_capacity: dp.ring_capacity,
    };
    let perf = Perf::new(&SCHEMA, dp.cores);
    let engine = Arc::new(Engine::start(&opts, devices, sb, pool, perf)?);
    let status = engine.status();
    tracing::info!(
        device = %status.device.name,
        capacity_bytes = status.capacity_bytes,
        chunks = status.chunks,
        cores = dp.cores,
        "dataplane running"
    );
    // Before the mount: cache-on-read blocks FUSE threads on it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("spool-ctl")
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    let reader = match cfg.blob.as_ref().filter(|b| b.read_through) {
        Some(b) => Some(Arc::new(StoreReader::new(
            b.clone(),
            blob::store::open(b)?,
            rt.handle().clone(),
        ))),
        None => None,
    };
    let (replica, cluster_ns) = match &cfg.cluster {
        Some(c) => {
            let secret = std::fs::read(&c.key_file)
                .with_context(|| format!("cluster.key_file {}", c.key_file.display()))?;
            let key = ClusterKey::from_secret(secret.trim_ascii()).with_context(|| {
                format!(
                    "cluster.key_file {}: the key must be at least {} bytes",
                    c.key_file.display(),
                    spool_dataplane::net::auth::KEY_BYTES_MIN
                )
            })?;
            let mut ro = ReplicaOptions::new(c.node_id, c.listen, key.clone());
            ro.transport = transport(c)?;
            let transport = ro.transport.name();
            let r = Replica::start(Arc::clone(&engine), ro)?;
            tracing::info!(node_id = c.node_id, listen = %c.listen, transport, "transport listening");
            let r = Arc::new(r);
            let heads = Arc::clone(&r);
            let head_of: spool_fuse_shim::io::HeadOf = Arc::new(move |chunk| {
                let t = heads.table();
                let head = t.chain(t.chain_of(chunk))?.head()?;
                t.nodes.get(&head)?.addr.parse().ok()
            });
            let io = Arc::new(ChunkIo::cluster(
                Arc::clone(&engine),
                c.listen,
                key.clone(),
                head_of,
            ));
            let cns = Arc::new(ClusterNs::new(io, Arc::clone(&r), c.node_id, key.clone()));
            if let Some(rd) = &reader {
                // Each load of the namespace (a takeover) reads through the store.
                let rd = Arc::clone(rd) as Arc<dyn BlobReader>;
                cns.on_load(Box::new(move |ns| ns.blob_read_from(Arc::clone(&rd))));
            }
            let served = Arc::clone(&cns);
            let server = RpcServer::start(
                rpc::ns_addr(c.listen),
                key,
                Arc::new(move |req, data, out| served.serve(req, data, out)),
            )
            .with_context(|| {
                format!(
                    "cluster.listen {}: the namespace RPC listens on the next port, {}",
                    c.listen,
                    rpc::ns_addr(c.listen)
                )
            })?;
            (Some(r), Some((cns, server)))
        }
        None => (None, None),
    };
    let node = Arc::new(Node {
        config: cfg.clone(),
        engine: Arc::clone(&engine),
        log,
        started: Instant::now(),
        ns: Mutex::new(None),
        mount: Mutex::new(None),
        replica,
        agent: std::sync::OnceLock::new(),
        cluster_ns,
        blob: std::sync::OnceLock::new(),
        reader,
        warmup: Mutex::new(None),
    });
    // The namespace while it runs here (the uploader, the evictor and /metrics).
    let ns_source: NsSource = {
        let weak = Arc::downgrade(&node);
        Arc::new(move || weak.upgrade()?.running_namespace())
    };
    if let Some(b) = cfg.blob.as_ref().filter(|b| b.mode == BlobMode::Writeback) {
        let store = blob::store::open(b)?;
        let _ = node
            .blob
            .set(Writeback::new(b.clone(), store, Arc::clone(&ns_source)));
    }
    // In cluster mode the mount waits for membership: its first calls need a chain
    // table to find the namespace.
    if let (Some(mp), None) = (&cfg.mount.mountpoint, &cfg.cluster) {
        node.do_mount(mp)?;
    }
    rt.block_on(async {
        if let (Some(c), Some(r)) = (&cfg.cluster, &node.replica) {
            let agent = Agent::start(c, Arc::clone(r))?;
            let _ = node.agent.set(agent);
            if let Some(mp) = cfg.mount.mountpoint.clone() {
                let n = Arc::clone(&node);
                tokio::task::spawn_blocking(move || n.do_mount(&mp)).await??;
            }
        }
        let (stop_tx, stop_rx) = shutdown::channel();
        let admin = AdminServer::bind(&cfg.admin.socket, node.clone() as Arc<dyn AdminTarget>).await?;
        let admin_task = tokio::spawn(admin.run(stop_rx.clone()));
        let (blob_stop_tx, blob_stop_rx) = shutdown::channel();
        let blob_task = node.blob.get().map(|w| tokio::spawn(w.clone().run(blob_stop_rx)));
        let evict_task = cfg.blob.as_ref().filter(|b| b.read_through).map(|b| {
            let source = Arc::clone(&ns_source);
            tokio::spawn(blob::evict::run(b.clone(), source, Arc::clone(&engine), stop_rx.clone()))
        });
        let metrics_task = match cfg.metrics.listen {
            Some(addr) => {
                let perf = Arc::clone(engine.perf());
                let blob = node.blob.get().cloned();
                let reader = node.reader.clone();
                let source = Arc::clone(&ns_source);
                let render = move || {
                    let mut text = perf.snapshot().to_prometheus("spool_");
                    if let Some(w) = &blob {
                        text.push_str(&w.prometheus());
                    }
                    if let Some(r) = &reader {
                        text.push_str(&r.prometheus());
                        if let Some(ns) = source() {
                            let (files, bytes) = ns.blob_evictions();
                            text.push_str(&blob::reader::eviction_prometheus(files, bytes));
                        }
                    }
                    text
                };
                let server = metrics::MetricsServer::bind(addr, Arc::new(render)).await?;
                Some(tokio::spawn(server.run(stop_rx.clone())))
            }
            None => None,
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            r = tokio::signal::ctrl_c() => { r.context("SIGINT handler")?; tracing::info!("SIGINT: shutting down") }
        }
        // Unmount first: the kernel flushes dirty pages through us while we still serve.
        if node.mount.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            let n = Arc::clone(&node);
            match tokio::task::spawn_blocking(move || n.do_umount()).await {
                Ok(Ok(p)) => tracing::info!(mountpoint = %p.display(), "unmounted"),
                Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "unmount"),
                Err(e) => tracing::error!(error = %e, "unmount task"),
            }
        }
        if let (Some(w), Some(t)) = (node.blob.get(), blob_task) {
            // Closed files upload now, within blob.shutdown_flush_ms; the rest resumes
            // after the next start (the log knows what is dirty).
            blob_stop_tx.send_replace(true);
            if let Err(e) = t.await {
                tracing::warn!(error = %e, "blob writeback task");
            }
            if let Some(left) = w.drain().await {
                tracing::info!(dirty_files = left.dirty_files, dirty_bytes = left.dirty_bytes, "blob: shutdown flush done");
            }
        }
        if let Some(a) = node.agent.get() {
            // Leave at once so the leader moves our chains now, not after the lease.
            a.leave().await;
        }
        stop_tx.send_replace(true);
        if let Some(t) = evict_task {
            if let Err(e) = t.await {
                tracing::warn!(error = %e, "blob evictor task");
            }
        }
        if let Err(e) = admin_task.await {
            tracing::warn!(error = %e, "admin server task");
        }
        if let Some(t) = metrics_task {
            if let Err(e) = t.await {
                tracing::warn!(error = %e, "metrics server task");
            }
        }
        anyhow::Ok(())
    })?;
    // The namespace holds engine clients; drop it before stopping the engine.
    node.ns.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(rt);
    let replica = Arc::into_inner(node).and_then(|n| {
        drop(n.cluster_ns); // the RPC server stops; the namespace drops its engine clients
        n.replica
    });
    if let Some(r) = replica.and_then(Arc::into_inner) {
        r.shutdown();
    }
    match Arc::try_unwrap(engine) {
        Ok(e) => e.shutdown(),
        Err(_) => tracing::warn!("engine still referenced at exit; dropping"),
    }
    tracing::info!("spool stopped");
    Ok(())
}

/// The peer transport `cluster.transport` names.
fn transport(
    c: &spool_controlplane::config::ClusterConfig,
) -> Result<Arc<dyn spool_dataplane::net::transport::Transport>> {
    use spool_controlplane::config::TransportKind;
    use spool_dataplane::net::rdma::{Rdma, RdmaOptions};
    Ok(match c.transport {
        TransportKind::Tcp => Arc::new(spool_dataplane::net::transport::Tcp),
        TransportKind::Rdma => {
            let dev = c.rdma_device.as_deref().unwrap_or_default();
            let gid = c.rdma_gid_index.map(|i| i as u8);
            let rdma = Rdma::open(dev, gid, RdmaOptions::default())
                .with_context(|| format!("cluster.rdma_device = {dev:?}"))?;
            Arc::new(rdma)
        }
    })
}
