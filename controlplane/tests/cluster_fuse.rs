//! One namespace for the whole cluster, through real FUSE mounts: three `spool serve`
//! processes in network namespaces (sharing the test's mount namespace, so their
//! mounts are visible here) and a real etcd. What one node's mount writes, every
//! other node's mount lists and reads byte for byte; a DCP-style commit (write a
//! temporary file, rename it over the final name) is seen whole or not at all; and
//! when the node that owns the namespace is killed, another takes it over from the
//! replicated log with nothing acknowledged lost.

#[path = "common/azurite.rs"]
mod azurite;
#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/data.rs"]
mod data;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/netns.rs"]
mod netns;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cluster::{Cluster, ClusterOpts};
use data::pattern;
use sha2::{Digest, Sha256};

fn mnt(c: &Cluster, i: usize) -> PathBuf {
    c.nodes[i].mountpoint.clone().expect("mounted nodes")
}

fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

/// Writes and fsyncs a whole file (create or replace).
fn put(path: &Path, data: &[u8]) {
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
}

/// Retries `f` until it returns `Some` (mount caches expire, owners take over).
fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn owner(c: &Cluster, i: usize) -> Option<u32> {
    c.status(i)?["mount"]["owner"].as_u64().map(|v| v as u32)
}

#[test]
fn a_file_written_on_one_node_is_read_on_every_other() {
    let mut c = Cluster::start(ClusterOpts {
        mount: true,
        ..ClusterOpts::default()
    });
    written_on_one_read_on_every_other(&mut c);
    // The killed node comes back and sees everything, including what was written
    // while it was gone.
    let killed = (0..c.nodes.len())
        .find(|&i| !c.running(i))
        .expect("a killed node");
    c.start_node(killed);
    c.wait_all_serving(Duration::from_secs(90));
    let back = mnt(&c, killed);
    let got = eventually("the returned node reads", Duration::from_secs(60), || {
        std::fs::read(back.join("ckpt/after-failover.bin")).ok()
    });
    assert_eq!(sha(&got), sha(&pattern(3, 1 << 20)));
    assert_eq!(
        sha(&std::fs::read(back.join("ckpt/step-1/.metadata")).unwrap()),
        sha(&pattern(2, 200_000))
    );
    assert_eq!(
        sha(&std::fs::read(back.join("ckpt/step-1/shard-0.bin")).unwrap()),
        sha(&pattern(1, (3 << 20) + 12345))
    );
}

/// The same cluster with its nodes replicating over the `rdma` transport: soft-RoCE
/// (rxe0 on the loopback interface) in the VM lab's guest, where the three `spool
/// serve` processes run on loopback addresses (rxe on this kernel works only in the
/// initial network namespace) with in-memory devices (the guest's /tmp is tmpfs, which
/// takes no O_DIRECT). Files written through one mount are read through the others,
/// the namespace owner is killed and taken over, and the survivors count the peer
/// links they lost to it.
#[test]
fn a_cluster_replicating_over_rdma_serves_every_mount_and_survives_an_owner_kill() {
    #[path = "../../dataplane/tests/common/vmlab.rs"]
    mod vmlab;
    if vmlab::in_guest().is_none() {
        return vmlab::run_in_guest(
            "a_cluster_replicating_over_rdma_serves_every_mount_and_survives_an_owner_kill",
            16,
        );
    }
    vmlab::add_rxe();
    let mut c = Cluster::start(ClusterOpts {
        mount: true,
        loopback: true,
        device: Some("backend = \"mem\"\nsize = \"128MiB\"".into()),
        cluster_extra: "transport = \"rdma\"\nrdma_device = \"rxe0\"".into(),
        ..ClusterOpts::default()
    });
    for i in 0..c.nodes.len() {
        let log = std::fs::read_to_string(&c.nodes[i].log).unwrap();
        assert!(
            log.lines()
                .any(|l| l.contains("transport listening") && l.contains("rdma")),
            "node {} is not on rdma:\n{log}",
            i + 1
        );
    }
    written_on_one_read_on_every_other(&mut c);
    let lost: u64 = (0..c.nodes.len())
        .filter(|&i| c.running(i))
        .filter_map(|i| c.perf(i)?["counters"]["net_peer_links_lost"].as_u64())
        .sum();
    assert!(
        lost >= 1,
        "the survivors counted their links to the killed node"
    );
    println!("rdma cluster: files on every mount, owner taken over, {lost} peer links lost");
}

/// Writes on node 1 read on every node, a commit seen whole, the namespace owner
/// killed and taken over; leaves the owner's node killed.
fn written_on_one_read_on_every_other(c: &mut Cluster) {
    let n = c.nodes.len();
    // A multi-chunk file (chunks are 1 MiB here) and a directory tree, on node 1.
    let big = pattern(1, (3 << 20) + 12345);
    std::fs::create_dir_all(mnt(c, 0).join("ckpt/step-1")).unwrap();
    put(&mnt(c, 0).join("ckpt/step-1/shard-0.bin"), &big);
    // Every node lists and reads it, byte for byte.
    for i in 0..n {
        let p = mnt(c, i).join("ckpt/step-1/shard-0.bin");
        let got = eventually(
            &format!("node {} reads the file", i + 1),
            Duration::from_secs(30),
            || std::fs::read(&p).ok().filter(|d| d.len() == big.len()),
        );
        assert_eq!(sha(&got), sha(&big), "node {}: contents differ", i + 1);
        let names: Vec<String> = std::fs::read_dir(mnt(c, i).join("ckpt/step-1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["shard-0.bin"], "node {}", i + 1);
    }

    // A DCP-style commit on node 2 while node 3 polls: `.metadata` is absent or whole.
    let meta = pattern(2, 200_000);
    let tmp = mnt(c, 1).join("ckpt/step-1/.metadata.tmp");
    let watcher = {
        let p = mnt(c, 2).join("ckpt/step-1/.metadata");
        let want = sha(&meta);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                match std::fs::read(&p) {
                    Ok(d) => {
                        assert_eq!(sha(&d), want, "a reader saw a partial .metadata");
                        return;
                    }
                    Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}"),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!(".metadata never appeared on node 3");
        })
    };
    put(&tmp, &meta);
    std::fs::rename(&tmp, mnt(c, 1).join("ckpt/step-1/.metadata")).unwrap();
    watcher.join().expect("watcher");

    // Kill the namespace owner; another node takes over from the replicated log.
    let first = eventually("an owner", Duration::from_secs(10), || owner(c, 0));
    let killed = first as usize - 1;
    c.kill_node(killed);
    let survivor = (killed + 1) % n;
    let p = mnt(c, survivor).join("ckpt/step-1/shard-0.bin");
    let got = eventually(
        "the file after the owner died",
        Duration::from_secs(60),
        || std::fs::read(&p).ok(),
    );
    assert_eq!(sha(&got), sha(&big), "contents after failover");
    let after = pattern(3, 1 << 20);
    put(&mnt(c, survivor).join("ckpt/after-failover.bin"), &after);
    let new_owner = eventually("a new owner", Duration::from_secs(30), || {
        owner(c, survivor).filter(|&o| o != first)
    });
    assert_ne!(new_owner, first);
}

/// The blob tier in a cluster: the namespace owner's uploader drains files written
/// through any node's mount, and after the owner is killed the new owner drains what
/// came since. Checked with the Azure SDK for Python against Azurite.
#[test]
fn a_cluster_drains_to_azurite_from_its_namespace_owner_across_a_failover() {
    let az = azurite::Azurite::start_on(std::net::Ipv4Addr::UNSPECIFIED);
    az.az("ckpt", &["create"]);
    let endpoint = format!(
        "http://{{HOST_IP}}:{}/{}",
        az.port,
        azurite::AZURITE_ACCOUNT
    );
    let mut c = Cluster::start(ClusterOpts {
        mount: true,
        extra: az.blob_config_at(
            &endpoint,
            "ckpt",
            "writeback_delay_ms = 100\nscan_interval_ms = 100\npart_size = \"1MiB\"",
        ),
        ..ClusterOpts::default()
    });
    let hex = |d: &[u8]| -> String { sha(d).iter().map(|b| format!("{b:02x}")).collect() };
    let listing = |az: &azurite::Azurite| -> Vec<(String, u64, String)> {
        az.list("ckpt")
            .into_iter()
            .map(|(n, s, h, _)| (n, s, h))
            .collect()
    };
    let flush_on_owner = |c: &Cluster, i: usize| {
        let o = eventually("an owner", Duration::from_secs(30), || owner(c, i)) as usize - 1;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_spool"))
            .args(["flush", "--wait", "--timeout-s", "120", "--socket"])
            .arg(&c.nodes[o].socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "flush on the owner (node {}): {}{}",
            o + 1,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        o
    };
    // One file through a follower's mount, one through the owner's (either way round).
    let a = pattern(11, (2 << 20) + 777);
    let b = pattern(12, 5000);
    std::fs::create_dir_all(mnt(&c, 1).join("run")).unwrap();
    put(&mnt(&c, 1).join("run/a.bin"), &a);
    put(&mnt(&c, 0).join("run/b.bin"), &b);
    let first = flush_on_owner(&c, 0);
    let mut want = vec![
        ("run/a.bin".to_owned(), a.len() as u64, hex(&a)),
        ("run/b.bin".to_owned(), b.len() as u64, hex(&b)),
    ];
    want.sort();
    assert_eq!(listing(&az), want);

    // The owner dies; the next owner uploads what is written after.
    c.kill_node(first);
    let survivor = (first + 1) % c.nodes.len();
    let after = pattern(13, 1 << 20);
    eventually(
        "a write after the failover",
        Duration::from_secs(60),
        || {
            let p = mnt(&c, survivor).join("run/after.bin");
            let mut f = std::fs::File::create(&p).ok()?;
            f.write_all(&after).ok()?;
            f.sync_all().ok()
        },
    );
    eventually("a new owner", Duration::from_secs(30), || {
        owner(&c, survivor).filter(|&o| o as usize - 1 != first)
    });
    let second = flush_on_owner(&c, survivor);
    assert_ne!(second, first);
    want.push(("run/after.bin".to_owned(), after.len() as u64, hex(&after)));
    want.sort();
    assert_eq!(listing(&az), want);
}

/// Cache-on-read in a cluster: a blob written by an independent client is read on
/// every node at once and fetched once per chunk for the whole cluster (counted in
/// Azurite's access log); then the store goes away and every node still reads it.
#[test]
fn a_cluster_fetches_each_chunk_of_a_blob_once_for_readers_on_every_node() {
    let mut az = azurite::Azurite::start_on(std::net::Ipv4Addr::UNSPECIFIED);
    az.az("models", &["create"]);
    let model = pattern(21, 4 * (1 << 20) + 4321); // 5 chunks of 1 MiB
    let tmp = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    std::fs::write(tmp.path(), &model).unwrap();
    az.az(
        "models",
        &["put", "llm/model.bin", tmp.path().to_str().unwrap()],
    );
    let endpoint = format!(
        "http://{{HOST_IP}}:{}/{}",
        az.port,
        azurite::AZURITE_ACCOUNT
    );
    let c = Cluster::start(ClusterOpts {
        mount: true,
        extra: az.blob_config_at(&endpoint, "models", "fetch_timeout_ms = 5000"),
        ..ClusterOpts::default()
    });
    let want = sha(&model);
    // Every node's mount sees the blob (the first lookup lists it at the owner).
    for i in 0..c.nodes.len() {
        eventually("the blob in the mount", Duration::from_secs(60), || {
            std::fs::metadata(mnt(&c, i).join("llm/model.bin"))
                .ok()
                .filter(|m| m.len() == model.len() as u64)
        });
    }
    std::thread::scope(|s| {
        for i in 0..c.nodes.len() {
            for r in 0..2 {
                let p = mnt(&c, i).join("llm/model.bin");
                let want = &want;
                s.spawn(move || {
                    let got = std::fs::read(&p).unwrap_or_else(|e| panic!("node {i}: {e}"));
                    assert_eq!(&sha(&got), want, "node {i} reader {r}");
                });
            }
        }
    });
    let gets = az.requests(&format!(
        "GET /{}/models/llm/model.bin",
        azurite::AZURITE_ACCOUNT
    ));
    assert_eq!(gets, 5, "one GET per chunk for 6 readers on 3 nodes");
    az.stop();
    for i in 0..c.nodes.len() {
        let got = std::fs::read(mnt(&c, i).join("llm/model.bin")).unwrap();
        assert_eq!(sha(&got), want, "node {i} from the cache");
    }
}

/// What one writer thread saw: files whose final rename returned, with their hash.
type Acked = Vec<(PathBuf, Vec<u8>)>;

/// Writes files through node `i`'s mount until `stop`: each is written to a temporary
/// name, fsynced and renamed over its final name (a checkpoint's commit). A rename
/// that returned is acknowledged; any failure (the node or the namespace owner dying
/// under it) leaves that file's outcome unknown, and the writer goes on.
fn writer(
    mount: PathBuf,
    i: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Acked, usize) {
    let mut acked = Vec::new();
    let mut failed = 0;
    let mut k = 0u64;
    // Every file takes a chunk (1 MiB here) on R nodes of 256 MiB devices: a writer
    // commits at most FILES_MAX files, paced to span the nemesis rounds.
    const FILES_MAX: usize = 60;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && acked.len() < FILES_MAX {
        std::thread::sleep(Duration::from_millis(150));
        k += 1;
        let len = 16 * 1024 * (1 + (k as usize * 7 + i) % 48);
        let data = pattern((i as u64) << 32 | k, len);
        let tmp = mount.join(format!("w{i}-{k}.tmp"));
        let done = mount.join(format!("w{i}-{k}"));
        let r = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&data).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &done));
        match r {
            Ok(()) => acked.push((done.file_name().unwrap().into(), sha(&data))),
            Err(_) => {
                failed += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    (acked, failed)
}

/// The namespace owner is SIGKILLed three times while every node's mount commits
/// files; afterwards every acknowledged file is there, whole, on every node.
///
/// Not in CI yet (docs/ARCHITECTURE.md, "Open bug"): under CPU load it lost an
/// acknowledged file in about 1 run in 3, when an owner reloaded the namespace at an
/// unchanged chain version after one of its own log writes stalled for 30 s and failed
/// with an unknown outcome. An owner now stays failed instead (6 of 6 runs passed
/// under the same load); the stall itself is not understood. Run it by hand:
/// `cargo nextest run -p spool-controlplane --test cluster_fuse --run-ignored all`.
#[test]
#[ignore = "open bug: log writes of the namespace owner can stall 30 s (docs/ARCHITECTURE.md)"]
fn committed_files_survive_owner_kills() {
    let mut c = Cluster::start(ClusterOpts {
        mount: true,
        ..ClusterOpts::default()
    });
    let n = c.nodes.len();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..n)
        .map(|i| {
            let (m, s) = (mnt(&c, i), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || writer(m, i, s))
        })
        .collect();
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        let alive = (0..n).find(|&i| c.running(i)).expect("a running node");
        let o = eventually("an owner", Duration::from_secs(30), || owner(&c, alive));
        eprintln!("round {round}: killing node {o}, the namespace owner");
        c.kill_node(o as usize - 1);
        std::thread::sleep(Duration::from_millis(2500));
        c.start_node(o as usize - 1);
        c.wait_all_serving(Duration::from_secs(90));
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    for (i, w) in writers.into_iter().enumerate() {
        let (a, failed) = w.join().expect("writer");
        eprintln!(
            "writer on node {}: {} files committed, {failed} failed",
            i + 1,
            a.len()
        );
        acked.extend(a);
    }
    assert!(acked.len() > 10, "too few files committed: {}", acked.len());
    c.wait_all_serving(Duration::from_secs(90));
    for i in 0..n {
        for (name, want) in &acked {
            let p = mnt(&c, i).join(name);
            let deadline = Instant::now() + Duration::from_secs(30);
            let got = loop {
                match std::fs::read(&p) {
                    Ok(d) => break d,
                    Err(e) if Instant::now() > deadline => panic!(
                        "{} on node {}: {e} for 30 s (the directory holds {:?})\n{}",
                        p.display(),
                        i + 1,
                        std::fs::read_dir(mnt(&c, i))
                            .map(|d| d
                                .filter_map(|e| e.ok())
                                .filter(|e| e
                                    .file_name()
                                    .to_string_lossy()
                                    .starts_with(&name.to_string_lossy()[..2]))
                                .count())
                            .ok(),
                        c.describe()
                    ),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            if &sha(&got) != want {
                // Say where it differs, and what the other nodes read.
                let others: Vec<String> = (0..n)
                    .map(|j| {
                        let d = std::fs::read(mnt(&c, j).join(name)).unwrap_or_default();
                        format!(
                            "node {}: {} bytes, same as wanted: {}",
                            j + 1,
                            d.len(),
                            &sha(&d) == want
                        )
                    })
                    .collect();
                // The bytes it should hold: writer i's file k (see `writer`).
                let (wi, k) = name.to_string_lossy()[1..]
                    .split_once('-')
                    .map(|(a, b)| (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()))
                    .unwrap();
                let len = 16 * 1024 * (1 + (k as usize * 7 + wi as usize) % 48);
                let expect = pattern(wi << 32 | k, len);
                let bad: Vec<usize> = (0..len.max(got.len()))
                    .step_by(4096)
                    .filter(|&o| got.get(o..o + 4096) != expect.get(o..o + 4096))
                    .collect();
                let zeros = bad
                    .iter()
                    .filter(|&&o| {
                        got.get(o..o + 4096)
                            .is_some_and(|b| b.iter().all(|&x| x == 0))
                    })
                    .count();
                eprintln!(
                    "MISMATCH {}: want {len} bytes, got {}; {} bad blocks (first at {:?}, {zeros} all zero)",
                    name.display(),
                    got.len(),
                    bad.len(),
                    bad.first()
                );
                eprintln!(
                    "MISMATCH {}: got {} bytes; {:?}",
                    name.display(),
                    got.len(),
                    others
                );
            }
            assert_eq!(
                &sha(&got),
                want,
                "{} on node {}: contents differ",
                name.display(),
                i + 1
            );
        }
    }
}
