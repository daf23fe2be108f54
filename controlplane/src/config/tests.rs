use super::*;

const MINIMAL: &str = "[device]\npath = \"/var/lib/spool/device.img\"\n";

/// The config with `extra` appended to MINIMAL: keys before any header land in
/// [device].
fn with(extra: &str) -> Result<Config, Error> {
    Config::from_toml_str(&format!("{MINIMAL}{extra}"))
}

/// The problems of a config that must fail, joined.
fn problems(toml: &str) -> String {
    match Config::from_toml_str(toml) {
        Ok(c) => panic!("accepted: {toml}\n{c:?}"),
        Err(Error::Config { problems, origin }) => {
            assert_eq!(origin, "<string>");
            problems.join("\n")
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn device(extra: &str) -> String {
    problems(&format!("{MINIMAL}{extra}"))
}

fn assert_has(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} not in:\n{text}");
    }
}

#[test]
fn example_config_loads() {
    let example = include_str!("../../../deploy/examples/single-node.toml");
    let c = Config::from_toml_str(example).unwrap();
    assert_eq!(c.node.name, "spool-demo");
    assert_eq!(c.device.size, Some(ByteSize::gib(2)));
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
}

#[test]
fn cluster_example_configs_load() {
    for (id, text) in [
        (
            1,
            include_str!("../../../deploy/examples/cluster/node1.toml"),
        ),
        (
            2,
            include_str!("../../../deploy/examples/cluster/node2.toml"),
        ),
        (
            3,
            include_str!("../../../deploy/examples/cluster/node3.toml"),
        ),
    ] {
        let c = Config::from_toml_str(text).unwrap().cluster.unwrap();
        assert_eq!((c.node_id, c.transport), (id, TransportKind::Tcp));
    }
}

#[test]
fn defaults() {
    let c = Config::from_toml_str(MINIMAL).unwrap();
    assert!(node_name_problem(&c.node.name).is_none());
    assert_eq!(c.device.backend, DeviceBackend::Uring);
    assert_eq!(
        c.device.path.as_deref(),
        Some(Path::new("/var/lib/spool/device.img"))
    );
    assert_eq!(c.device.size, None);
    assert!(c.device.format_if_new);
    assert_eq!(c.device.chunk_size, ByteSize::mib(4));
    assert_eq!(c.device.shards, 0);
    assert_eq!(c.device.queue_depth, 128);
    assert!(!c.device.sqpoll && !c.device.iopoll);
    assert_eq!(c.dataplane.cores, 1);
    assert_eq!(c.dataplane.cpus, None);
    assert!(c.dataplane.pin);
    assert_eq!(c.dataplane.idle_spin_us, 50);
    assert_eq!(c.dataplane.idle_park_max_us, 1000);
    assert_eq!(c.dataplane.ring_capacity, 1024);
    assert_eq!(c.dataplane.io_size_max, ByteSize::mib(1));
    assert_eq!(c.hugepages.policy, HugepagePolicy::Prefer);
    assert_eq!(c.hugepages.buffers, 64);
    assert_eq!(c.admin.socket, Path::new("/run/spool/admin.sock"));
    assert_eq!(c.metrics.listen, None);
    assert_eq!(c.log.level, "info");
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.effective_shards(), 1);
}

#[test]
fn mem_backend_needs_no_path() {
    let c = Config::from_toml_str("[device]\nbackend = \"mem\"\nsize = \"64MiB\"\n").unwrap();
    assert_eq!(c.device.backend, DeviceBackend::Mem);
    assert_eq!(c.device.size, Some(ByteSize::mib(64)));
}

#[test]
fn uring_needs_a_path() {
    assert_has(&problems(""), &["device.path: required"]);
    assert_has(
        &problems("[device]\npath = \"\"\n"),
        &["device.path = \"\": must not be empty"],
    );
}

#[test]
fn unknown_backend_is_named() {
    assert_has(
        &problems("[device]\nbackend = \"spdk\"\n"),
        &[
            "device.backend",
            "unknown variant `spdk`",
            "`uring`",
            "`mem`",
            "(line 2)",
        ],
    );
}

#[test]
fn sizes_accept_integers_and_units() {
    let c = Config::from_toml_str(
        "[device]\npath = \"/d\"\nsize = 1073741824\nchunk_size = \"64 KiB\"\n\
         [dataplane]\nio_size_max = 65536\n",
    )
    .unwrap();
    assert_eq!(c.device.size, Some(ByteSize::gib(1)));
    assert_eq!(c.device.chunk_size, ByteSize::kib(64));
    assert_eq!(c.dataplane.io_size_max, ByteSize::kib(64));
}

#[test]
fn garbage_sizes_are_rejected_with_the_key() {
    for (value, why) in [
        ("\"4 parsecs\"", "unknown unit"),
        ("\"4MB\"", "decimal units are ambiguous"),
        ("\"1.5GiB\"", "fractions"),
        ("-4096", "must not be negative"),
        ("true", "expected bytes as an integer or a string"),
    ] {
        assert_has(
            &problems(&format!("[device]\npath = \"/d\"\nsize = {value}\n")),
            &["device.size: ", why, "(line 3)"],
        );
    }
}

#[test]
fn device_size_is_checked() {
    assert_has(
        &device("size = 4097\n"),
        &["device.size = 4097: must be a multiple of 4KiB and at least device.chunk_size (4MiB)"],
    );
    assert_has(
        &device("size = \"1MiB\"\n"),
        &["device.size = 1MiB: must be a multiple of 4KiB"],
    );
}

#[test]
fn chunk_size_is_checked() {
    for bad in ["\"32KiB\"", "\"128MiB\"", "\"3MiB\"", "0"] {
        assert_has(
            &device(&format!("chunk_size = {bad}\n")),
            &[
                "device.chunk_size = ",
                "must be a power of two between 64KiB and 64MiB",
            ],
        );
    }
    for good in ["\"64KiB\"", "\"64MiB\"", "\"1MiB\""] {
        with(&format!(
            "chunk_size = {good}\n[dataplane]\nio_size_max = \"64KiB\"\n"
        ))
        .unwrap();
    }
}

#[test]
fn shards_and_queue_depth_are_checked() {
    assert_has(
        &device("shards = 257\n"),
        &["device.shards = 257: must be between 0 and 256"],
    );
    assert_has(
        &device("queue_depth = 0\n"),
        &["device.queue_depth = 0: must be between 1 and 4096"],
    );
    assert_has(
        &device("queue_depth = 4097\n"),
        &["device.queue_depth = 4097: must be between 1 and 4096"],
    );
    // Out of the integer type: still names the key and the range.
    assert_has(
        &device("queue_depth = -1\n"),
        &["device.queue_depth: ", "must be between 1 and 4096"],
    );
    assert_has(
        &device("queue_depth = \"deep\"\n"),
        &[
            "device.queue_depth: invalid type",
            "must be between 1 and 4096",
        ],
    );
    let c = with("shards = 256\nqueue_depth = 4096\n").unwrap();
    assert_eq!(c.effective_shards(), 256);
}

#[test]
fn cores_are_checked() {
    assert_has(
        &problems(&format!("{MINIMAL}[dataplane]\ncores = 0\n")),
        &["dataplane.cores = 0: must be between 1 and 64"],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[dataplane]\ncores = 65\n")),
        &["dataplane.cores = 65: must be between 1 and 64"],
    );
    let c = with("[dataplane]\ncores = 64\npin = false\n").unwrap();
    assert_eq!(c.effective_shards(), 64);
}

#[test]
fn cpus_are_checked() {
    let c = with("[dataplane]\ncores = 2\ncpus = [2, 3]\n").unwrap();
    assert_eq!(c.dataplane.cpus, Some(vec![2, 3]));
    assert_has(
        &problems(&format!("{MINIMAL}[dataplane]\ncores = 2\ncpus = [2]\n")),
        &["dataplane.cpus = [2]: must list exactly dataplane.cores (2) CPU ids"],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[dataplane]\ncores = 2\ncpus = [2, 2]\n")),
        &["dataplane.cpus: CPU 2 is listed twice"],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[dataplane]\ncpus = [1024]\n")),
        &["dataplane.cpus: CPU 1024: must be between 0 and 1023"],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[dataplane]\ncpus = [-1]\n")),
        &["dataplane.cpus", "must be between 0 and 1023"],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[dataplane]\ncpus = [0]\npin = false\n")),
        &["dataplane.cpus is set but dataplane.pin = false"],
    );
}

#[test]
fn idle_policy_is_checked() {
    assert_has(
        &problems(&format!("{MINIMAL}[dataplane]\nidle_spin_us = 1000001\n")),
        &["dataplane.idle_spin_us = 1000001: must be between 0 and 1000000"],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[dataplane]\nidle_park_max_us = 0\n")),
        &["dataplane.idle_park_max_us = 0: must be between 1 and 1000000"],
    );
    assert_has(
        &problems(&format!(
            "{MINIMAL}[dataplane]\nidle_park_max_us = 1000001\n"
        )),
        &["dataplane.idle_park_max_us = 1000001: must be between 1 and 1000000"],
    );
    with("[dataplane]\nidle_spin_us = 0\nidle_park_max_us = 1000000\n").unwrap();
}

#[test]
fn ring_capacity_is_checked() {
    for bad in [0, 1, 3, 1000, 131072] {
        assert_has(
            &problems(&format!("{MINIMAL}[dataplane]\nring_capacity = {bad}\n")),
            &[
                &format!("dataplane.ring_capacity = {bad}: "),
                "must be a power of two between 2 and 65536",
            ],
        );
    }
    for good in [2, 65536] {
        with(&format!("[dataplane]\nring_capacity = {good}\n")).unwrap();
    }
}

#[test]
fn io_size_max_is_checked() {
    for bad in ["0", "\"6KiB\"", "\"8MiB\"", "1000"] {
        assert_has(
            &problems(&format!("{MINIMAL}[dataplane]\nio_size_max = {bad}\n")),
            &[
                "dataplane.io_size_max = ",
                "must be a multiple of 4KiB between 4KiB and device.chunk_size (4MiB)",
            ],
        );
    }
    with("[dataplane]\nio_size_max = \"4MiB\"\n").unwrap();
    with("[dataplane]\nio_size_max = \"4KiB\"\n").unwrap();
}

#[test]
fn hugepages_are_checked() {
    assert_has(
        &problems(&format!("{MINIMAL}[hugepages]\nbuffers = 0\n")),
        &["hugepages.buffers = 0: must be between 1 and 1000000"],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[hugepages]\nbuffers = 1000001\n")),
        &["hugepages.buffers = 1000001: must be between 1 and 1000000"],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[hugepages]\npolicy = \"always\"\n")),
        &[
            "hugepages.policy",
            "unknown variant `always`",
            "`prefer`",
            "`require`",
            "`none`",
        ],
    );
    for (text, policy) in [
        ("prefer", HugepagePolicy::Prefer),
        ("require", HugepagePolicy::Require),
        ("none", HugepagePolicy::Off),
        ("off", HugepagePolicy::Off),
    ] {
        let c = with(&format!("[hugepages]\npolicy = \"{text}\"\n")).unwrap();
        assert_eq!(c.hugepages.policy, policy);
    }
}

#[test]
fn admin_socket_is_checked() {
    assert_has(
        &problems(&format!("{MINIMAL}[admin]\nsocket = \"\"\n")),
        &["admin.socket = \"\": must not be empty"],
    );
    let long = format!("/run/{}", "s".repeat(103));
    assert_has(
        &problems(&format!("{MINIMAL}[admin]\nsocket = \"{long}\"\n")),
        &[
            "admin.socket = ",
            "is 108 bytes; a Unix socket path must be at most 107 bytes",
        ],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[admin]\nsocket = \"/run/spool/\"\n")),
        &["admin.socket = \"/run/spool/\": must be a file path"],
    );
    let c = with("[admin]\nsocket = \"/tmp/x.sock\"\n").unwrap();
    assert_eq!(c.admin.socket, Path::new("/tmp/x.sock"));
}

#[test]
fn metrics_listen_is_a_socket_address() {
    let c = with("[metrics]\nlisten = \"[::1]:9464\"\n").unwrap();
    assert_eq!(c.metrics.listen, Some("[::1]:9464".parse().unwrap()));
    for bad in ["localhost:9464", "127.0.0.1", "127.0.0.1:99999", ""] {
        assert_has(
            &problems(&format!("{MINIMAL}[metrics]\nlisten = \"{bad}\"\n")),
            &["metrics.listen: invalid address", "expected IP:PORT"],
        );
    }
    assert_has(
        &problems(&format!("{MINIMAL}[metrics]\nlisten = 9464\n")),
        &["metrics.listen: invalid type"],
    );
}

#[test]
fn log_is_checked() {
    let c = with("[log]\nlevel = \"info,spool_dataplane=debug\"\nformat = \"json\"\n").unwrap();
    assert_eq!(c.log.format, LogFormat::Json);
    assert_has(
        &problems(&format!("{MINIMAL}[log]\nlevel = \"warning\"\n")),
        &["log.level = \"warning\": not a level"],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[log]\nlevel = \"spool=loud\"\n")),
        &["log.level = \"spool=loud\": invalid log filter"],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[log]\nformat = \"xml\"\n")),
        &["log.format", "unknown variant `xml`", "`text`", "`json`"],
    );
}

#[test]
fn node_name_is_checked() {
    let c = with("[node]\nname = \"gpu-node-07.cluster\"\n").unwrap();
    assert_eq!(c.node.name, "gpu-node-07.cluster");
    for bad in ["", "has space", "slash/name"] {
        assert_has(
            &problems(&format!("{MINIMAL}[node]\nname = \"{bad}\"\n")),
            &[&format!("node.name = {bad:?}: ")],
        );
    }
    assert_has(
        &problems(&format!(
            "{MINIMAL}[node]\nname = \"{}\"\n",
            "n".repeat(254)
        )),
        &["must be 1 to 253 characters"],
    );
}

#[test]
fn unknown_keys_are_named_with_their_full_key() {
    assert_has(
        &problems(&format!("{MINIMAL}queue_dpeth = 5\n")),
        &[
            "device.queue_dpeth: unknown key (line 3), expected one of",
            "`queue_depth`",
        ],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[dataplane]\ncore = 2\n")),
        &["dataplane.core: unknown key (line 4)"],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[devices]\n")),
        &["devices: unknown key (line 3)", "`device`"],
    );
    assert_has(
        &problems("device = { path = \"/d\", colour = \"blue\" }\n"),
        &["device.colour: unknown key (line 1)"],
    );
    assert_has(
        &problems(&format!("{MINIMAL}[log.sink]\nfile = \"x\"\n")),
        &["log.sink: unknown key"],
    );
    assert_has(&problems("top = 1\n"), &["top: unknown key (line 1)"]);
}

#[test]
fn syntax_errors_give_the_line() {
    assert_has(&problems("[device\npath = 1\n"), &["line 1, column"]);
    assert_has(&problems("[device]\npath = \n"), &["line 2, column"]);
    assert_has(
        &problems("[device]\npath = \"/d\"\npath = \"/e\"\n"),
        &["line 3", "duplicate key"],
    );
}

#[test]
fn all_problems_are_reported_together() {
    let text = problems(&format!(
        "{MINIMAL}[dataplane]\ncores = 0\nring_capacity = 3\n[hugepages]\nbuffers = 0\n"
    ));
    assert_has(
        &text,
        &[
            "dataplane.cores = 0",
            "dataplane.ring_capacity = 3",
            "hugepages.buffers = 0",
        ],
    );
    let Err(err) = with("[dataplane]\ncores = 0\nring_capacity = 3\n") else {
        panic!("accepted")
    };
    let shown = err.to_string();
    assert_has(&shown, &["invalid config <string>: dataplane.cores = 0: must be between 1 and 64; dataplane.ring_capacity"]);
}

#[test]
fn serializes_and_loads_back() {
    let c = with(
        "[node]\nname = \"n1\"\n[dataplane]\ncores = 2\ncpus = [0, 1]\n\
         [metrics]\nlisten = \"0.0.0.0:9464\"\n[hugepages]\npolicy = \"off\"\n",
    )
    .unwrap();
    let text = c.to_toml_string();
    assert_has(
        &text,
        &[
            "chunk_size = \"4MiB\"",
            "policy = \"none\"",
            "listen = \"0.0.0.0:9464\"",
        ],
    );
    assert_eq!(Config::from_toml_str(&text).unwrap(), c);
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["device"]["chunk_size"], "4MiB");
    assert_eq!(json["dataplane"]["cpus"], serde_json::json!([0, 1]));
    assert_eq!(json["device"]["path"], "/var/lib/spool/device.img");
}

#[test]
fn load_reads_a_file_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(
        c.device.path.as_deref(),
        Some(Path::new("/var/lib/spool/device.img"))
    );

    std::fs::write(&path, "[dataplane]\ncores = 0\n").unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert_has(&err, &[&path.display().to_string(), "dataplane.cores = 0"]);

    let missing = dir.path().join("missing.toml");
    let err = Config::load(&missing).unwrap_err().to_string();
    assert_has(
        &err,
        &["cannot read config", &missing.display().to_string()],
    );

    std::fs::write(&path, b"[node]\nname = \"\xff\"\n").unwrap();
    assert!(Config::load(&path).is_err());
}

#[test]
fn mount_section_defaults_and_validation() {
    let c = Config::from_toml_str(MINIMAL).unwrap();
    assert_eq!(c.mount.mountpoint, None);
    assert_eq!(c.mount.threads, 8);
    assert!(!c.mount.writeback_cache);
    assert!(c.mount.direct_io);
    assert_has(
        &device("[mount]\nwriteback_cache = true\n"),
        &["mount.writeback_cache = true", "mount.direct_io = false"],
    );
    assert!(with("[mount]\nwriteback_cache = true\ndirect_io = false\n").is_ok());
    assert_eq!(c.mount.readahead, ByteSize::mib(16));
    let ok = with("[mount]\nmountpoint = \"/mnt/spool\"\nthreads = 8\n").unwrap();
    assert_eq!(
        ok.mount.mountpoint.as_deref(),
        Some(Path::new("/mnt/spool"))
    );
    assert_has(
        &device("[mount]\nthreads = 0\n"),
        &["mount.threads = 0", "between 1 and 64"],
    );
    assert_has(
        &device("[mount]\nmountpoint = \"rel/dir\"\n"),
        &["mount.mountpoint", "absolute"],
    );
    assert_has(
        &device("[mount]\nreadahead = \"1000\"\n"),
        &["mount.readahead"],
    );
    assert_has(
        &device("[mount]\nthreads = 40\n"),
        &["hugepages.buffers = 64", "2 x mount.threads + 8 = 88"],
    );
    assert_has(&device("[mount]\nthread = 4\n"), &["thread"]);
}

const CLUSTER: &str = "[cluster]\nnode_id = 1\nlisten = \"10.0.0.1:7420\"\netcd = [\"http://10.0.0.100:2379\"]\nkey_file = \"/etc/spool/cluster.key\"\n";

#[test]
fn cluster_section_is_optional_and_checked_by_key() {
    assert!(with("").unwrap().cluster.is_none());
    let c = with(CLUSTER).unwrap().cluster.unwrap();
    assert_eq!(
        (c.replication, c.lease_ttl_s, c.name.as_str()),
        (2, 3, "spool")
    );
    assert_has(
        &device(&CLUSTER.replace("node_id = 1", "node_id = 0")),
        &["cluster.node_id = 0", "between 1 and 1000000"],
    );
    assert_has(
        &device(&format!("{CLUSTER}replication = 4\n")),
        &["cluster.replication = 4", "between 1 and 3"],
    );
    assert_has(
        &device(&CLUSTER.replace("10.0.0.1:7420", "0.0.0.0:7420")),
        &["cluster.listen", "not 0.0.0.0"],
    );
    assert_has(
        &device(&CLUSTER.replace("http://10.0.0.100:2379", "10.0.0.100")),
        &["cluster.etcd", "http://host:port"],
    );
    assert_has(
        &device(&CLUSTER.replace("etcd = [\"http://10.0.0.100:2379\"]", "etcd = []")),
        &["cluster.etcd = []"],
    );
    assert_has(
        &device(&format!("{CLUSTER}lease_ttl_s = 0\n")),
        &["cluster.lease_ttl_s = 0"],
    );
    assert_has(&device(&format!("{CLUSTER}colour = 1\n")), &["colour"]);
    // The transport: tcp by default; rdma needs its device.
    assert_eq!(c.transport, TransportKind::Tcp);
    let rdma = with(&format!(
        "{CLUSTER}transport = \"rdma\"\nrdma_device = \"rxe0\"\nrdma_gid_index = 1\n"
    ))
    .unwrap()
    .cluster
    .unwrap();
    assert_eq!(
        (
            rdma.transport,
            rdma.rdma_device.as_deref(),
            rdma.rdma_gid_index
        ),
        (TransportKind::Rdma, Some("rxe0"), Some(1))
    );
    assert_has(
        &device(&format!("{CLUSTER}transport = \"rdma\"\n")),
        &["cluster.rdma_device: required when cluster.transport = \"rdma\""],
    );
    assert_has(
        &device(&format!("{CLUSTER}rdma_device = \"rxe0\"\n")),
        &["cluster.rdma_device: only used with cluster.transport = \"rdma\""],
    );
    assert_has(
        &device(&format!(
            "{CLUSTER}transport = \"rdma\"\nrdma_device = \"rxe0\"\nrdma_gid_index = 300\n"
        )),
        &["cluster.rdma_gid_index = 300", "between 0 and 255"],
    );
    assert_has(
        &device(&format!("{CLUSTER}transport = \"udp\"\n")),
        &["cluster.transport", "tcp", "rdma"],
    );
    // Every cluster node may mount: the mount serves the cluster-wide namespace.
    let m = with(&format!("{CLUSTER}[mount]\nmountpoint = \"/mnt/spool\"\n")).unwrap();
    assert!(m.cluster.is_some() && m.mount.mountpoint.is_some());
}

#[test]
fn blob_section_defaults_and_round_trip() {
    let c =
        with("[blob]\nbackend = \"azure\"\ncontainer = \"ckpt\"\naccount = \"acct\"\n").unwrap();
    let b = c.blob.as_ref().unwrap();
    assert_eq!(b.mode, BlobMode::Writeback);
    assert_eq!(b.writeback_delay_ms, 2000);
    assert_eq!(b.part_size, ByteSize::mib(8));
    assert!(b.read_through);
    assert_eq!(
        (b.listing_ttl_ms, b.prefetch_chunks, b.fetch_timeout_ms),
        (10_000, 4, 30_000)
    );
    assert_eq!(
        (b.evict_high_pct, b.evict_low_pct, b.space_wait_ms),
        (90, 80, 10_000)
    );
    assert_eq!(Config::from_toml_str(&c.to_toml_string()).unwrap(), c);
    let l =
        with("[blob]\nbackend = \"local\"\npath = \"/srv/blob\"\nmode = \"cache-only\"\n").unwrap();
    assert_eq!(l.blob.unwrap().mode, BlobMode::CacheOnly);
}

#[test]
fn blob_values_are_checked_with_their_keys() {
    let p = device(
        "[blob]\nbackend = \"azure\"\nprefix = \"/abs\"\npart_size = \"512KiB\"\n\
         files_in_flight = 0\nendpoint = \"ftp://x\"\npath = \"/x\"\n",
    );
    assert_has(
        &p,
        &[
            "blob.container: required",
            "blob.prefix = \"/abs\": must be empty or end with '/'",
            "blob.prefix = \"/abs\": must not start with '/'",
            "blob.part_size = 512KiB: must be between 1MiB and 100MiB",
            "blob.files_in_flight = 0: must be between 1 and 64",
            "blob.endpoint = \"ftp://x\"",
            "blob.path: only for backend = \"local\"",
        ],
    );
    assert_has(
        &device(
            "[blob]\nbackend = \"local\"\npath = \"/x\"\nlisting_ttl_ms = 86400001\n\
             prefetch_chunks = 65\nfetch_timeout_ms = 999\nevict_high_pct = 101\n\
             evict_low_pct = 101\nspace_wait_ms = 600001\n",
        ),
        &[
            "blob.evict_high_pct = 101: must be between 1 and 100",
            "blob.evict_low_pct = 101: must be below blob.evict_high_pct = 101",
            "blob.space_wait_ms = 600001: must be between 0 and 600000",
            "blob.listing_ttl_ms = 86400001: must be between 0 and 86400000",
            "blob.prefetch_chunks = 65: must be between 0 and 64",
            "blob.fetch_timeout_ms = 999: must be between 1000 and 600000",
        ],
    );
    assert_has(
        &device("[blob]\nbackend = \"local\"\npath = \"rel\"\n"),
        &["blob.path = \"rel\": must be an absolute path"],
    );
    assert_has(&device("[blob]\nbackend = \"gcs\"\n"), &["blob.backend"]);
    assert_has(
        &device("[blob]\nbackend = \"local\"\npath = \"/x\"\ntypo = 1\n"),
        &["typo"],
    );
}

#[test]
fn example_blob_section_loads_when_uncommented() {
    let example = include_str!("../../../deploy/examples/single-node.toml");
    let (head, tail) = example.split_once("# [blob]\n").expect("a [blob] example");
    let mut text = format!("{head}[blob]\n");
    for line in tail.lines() {
        // `# key = value` lines are the settings; other comment lines explain them.
        if let Some(kv) = line.strip_prefix("# ").filter(|l| {
            l.split_once(" = ")
                .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        }) {
            text.push_str(kv);
            text.push('\n');
        }
    }
    // The example shows both credential files as alternatives; keep one.
    let text = text.replace("sas_file = \"/etc/spool/azure.sas\"\n", "");
    let c = Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let b = c.blob.unwrap();
    assert_eq!(b.container.as_deref(), Some("checkpoints"));
    assert_eq!(b.prefix, "job-7/");
    assert_eq!(b.listing_ttl_ms, 10_000);
}

#[test]
fn s3_section_is_checked_with_its_keys() {
    let c = with(
        "[blob]\nbackend = \"s3\"\ncontainer = \"ckpt\"\nregion = \"eu-west-1\"\n\
         endpoint = \"http://127.0.0.1:5000\"\n",
    )
    .unwrap();
    assert_eq!(c.blob.unwrap().backend, BlobBackend::S3);
    assert_has(
        &device(
            "[blob]\nbackend = \"s3\"\npart_size = \"4MiB\"\naccount = \"a\"\nsas_file = \"/s\"\n",
        ),
        &[
            "blob.container: required for backend = \"s3\" (the bucket)",
            "blob.part_size = 4MiB: S3 needs parts of at least 5MiB",
            "blob.account: only for backend = \"azure\"",
            "blob.sas_file: only for backend = \"azure\"",
        ],
    );
    assert_has(
        &device("[blob]\nbackend = \"azure\"\ncontainer = \"c\"\nregion = \"x\"\n"),
        &["blob.region: only for backend = \"s3\""],
    );
}

#[test]
fn nvme_backend_needs_a_valid_pci_address() {
    let nvme = "[device]\nbackend = \"nvme\"\npci_address = \"0000:00:04.0\"\n";
    let c = Config::from_toml_str(nvme).unwrap();
    assert_eq!(c.device.backend, DeviceBackend::Nvme);
    assert_eq!(c.device.nsid, 1);
    assert_eq!(c.device.io_timeout_ms, 30_000);
    assert_has(
        &problems("[device]\nbackend = \"nvme\"\n"),
        &["device.pci_address: required when device.backend = \"nvme\""],
    );
    assert_has(
        &problems("[device]\nbackend = \"nvme\"\npci_address = \"../../etc\"\n"),
        &["device.pci_address = \"../../etc\"", "not a PCI address"],
    );
    assert_has(
        &problems(&format!("{nvme}nsid = 0\nio_timeout_ms = 5\n")),
        &["device.nsid", "device.io_timeout_ms"],
    );
}
