//! Cache-on-read against a real Azurite: blobs written by an independent client (the
//! Azure SDK for Python) appear in the mount, are fetched once per chunk however many
//! readers ask (counted from Azurite's own access log, not the daemon's counters),
//! are served from the cache afterwards (Azurite stopped), warm up ahead of a job,
//! are re-fetched when changed behind Spool's back, and keep their unread chunks when
//! a writer changes them.

#[path = "common/azurite.rs"]
mod azurite;
#[path = "common/data.rs"]
mod data;
#[path = "common/mount.rs"]
mod mount;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use azurite::{Azurite, AZURITE_ACCOUNT};
use data::pattern;
use mount::{MountOpts, MountedNode};
use sha2::{Digest, Sha256};

const CONTAINER: &str = "models";
const PREFIX: &str = "team-a/";
/// The mount's chunk size (MountOpts' default).
const CHUNK: usize = 1 << 20;
/// Short, so the tests see a blob changed behind the cache quickly.
const LISTING_TTL_MS: u64 = 300;

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Uploads `data` as the blob at mount path `path`, with the independent client.
fn put(az: &Azurite, path: &str, data: &[u8]) {
    let f = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    std::fs::write(f.path(), data).unwrap();
    az.az(
        CONTAINER,
        &[
            "put",
            &format!("{PREFIX}{path}"),
            f.path().to_str().unwrap(),
        ],
    );
}

/// Ranged GETs Azurite served for the blob at mount path `path`.
fn gets(az: &Azurite, path: &str) -> usize {
    az.requests(&format!(
        "GET /{AZURITE_ACCOUNT}/{CONTAINER}/{PREFIX}{path}"
    ))
}

fn node(az: &Azurite, more: &str, opts: MountOpts) -> MountedNode {
    let extra = az.blob_config(
        CONTAINER,
        &format!(
            "prefix = \"{PREFIX}\"\nwriteback_delay_ms = 100\nscan_interval_ms = 100\n\
             listing_ttl_ms = {LISTING_TTL_MS}\nfetch_timeout_ms = 3000\n{more}"
        ),
    );
    MountedNode::start(&MountOpts { extra, ..opts })
}

fn cli_ok(n: &MountedNode, args: &[&str]) -> String {
    n.cli_ok(args)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Waits out the listing TTL and the kernel's attribute cache (1 s).
fn let_listings_expire() {
    std::thread::sleep(Duration::from_millis(LISTING_TTL_MS) + Duration::from_millis(1200));
}

#[test]
fn blobs_of_another_client_appear_and_eight_readers_cost_one_download_per_chunk() {
    let az = Azurite::start();
    az.az(CONTAINER, &["create"]);
    let weights = pattern(11, 5 * CHUNK + 12_345); // 6 chunks, the last one short
    let config = b"{\"layers\": 32}\n".to_vec();
    put(&az, "llama/weights.bin", &weights);
    put(&az, "llama/config.json", &config);
    put(&az, "README", b"top\n");
    // DMA buffers smaller than a chunk: each fill is written in several pieces.
    let n = node(
        &az,
        "",
        MountOpts {
            io_size_max: "256KiB",
            ..MountOpts::default()
        },
    );
    let m = &n.mountpoint;
    assert_eq!(names(m), ["README", "llama"]);
    assert_eq!(names(&m.join("llama")), ["config.json", "weights.bin"]);
    let meta = std::fs::metadata(m.join("llama/weights.bin")).unwrap();
    assert_eq!(meta.len(), weights.len() as u64, "size from the listing");
    assert_eq!(gets(&az, "llama/weights.bin"), 0, "listing fetches no data");

    // Eight readers at once, each reading the whole file in odd-sized pieces.
    let path = m.join("llama/weights.bin");
    let want = sha(&weights);
    std::thread::scope(|s| {
        for r in 0..8 {
            let path = &path;
            let want = &want;
            s.spawn(move || {
                let mut f = std::fs::File::open(path).unwrap();
                let mut got = Vec::new();
                let mut buf = vec![0u8; 100_000 + r * 7_919];
                loop {
                    let k = f.read(&mut buf).unwrap();
                    if k == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..k]);
                }
                assert_eq!(&sha(&got), want, "reader {r}");
            });
        }
    });
    assert_eq!(
        gets(&az, "llama/weights.bin"),
        6,
        "one ranged GET per chunk for 8 readers (Azurite's access log)"
    );
    assert_eq!(std::fs::read(m.join("llama/config.json")).unwrap(), config);
    let st = cli_ok(
        &n,
        &["status", m.join("llama/config.json").to_str().unwrap()],
    );
    assert!(st.contains("in-blob etag="), "{st}");
    assert!(st.contains("key=llama/config.json"), "{st}");
    // Imported files are clean: nothing is uploaded back (the one PUT is the
    // independent client's).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        az.requests(&format!(
            "PUT /{AZURITE_ACCOUNT}/{CONTAINER}/{PREFIX}llama/weights.bin"
        )),
        1
    );

    // Served from the cache: the store can go away.
    let mut az = az;
    az.stop();
    assert_eq!(sha(&std::fs::read(&path).unwrap()), want);
    assert_eq!(std::fs::read(m.join("llama/config.json")).unwrap(), config);
    // A file never read is not in the cache: its read fails, clearly, and the mount
    // keeps serving.
    let err = std::fs::read(m.join("README")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    az.start_again();
    assert_eq!(std::fs::read(m.join("README")).unwrap(), b"top\n");
    let s: serde_json::Value = serde_json::from_str(&cli_ok(&n, &["status", "--json"])).unwrap();
    assert!(
        s["blob_read"]["bytes_fetched"].as_u64().unwrap() >= weights.len() as u64,
        "{s}"
    );
}

#[test]
fn warmup_loads_a_prefix_so_a_job_reads_it_through_an_outage() {
    let mut az = Azurite::start();
    az.az(CONTAINER, &["create"]);
    let shards: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            (
                format!("ds/train/shard-{i}"),
                pattern(20 + i, CHUNK * 2 + i as usize * 1000),
            )
        })
        .collect();
    for (p, d) in &shards {
        put(&az, p, d);
    }
    put(&az, "ds/other", b"not warmed\n");
    let n = node(&az, "", MountOpts::default());
    let out = cli_ok(&n, &["warmup", "ds/train", "--timeout-s", "120"]);
    assert!(out.contains("warmed up: 4 file(s)"), "{out}");
    for (p, d) in &shards {
        assert_eq!(
            gets(&az, p),
            d.len().div_ceil(CHUNK),
            "{p}: one GET per chunk"
        );
    }
    assert_eq!(gets(&az, "ds/other"), 0, "outside the warmed prefix");
    az.stop();
    for (p, d) in &shards {
        let got = std::fs::read(n.mountpoint.join(p)).unwrap();
        assert_eq!(sha(&got), sha(d), "{p} from the cache");
    }
    // A warmup that cannot reach the store says so.
    let out = n.cli(&["warmup", "ds/other", "--timeout-s", "120"]);
    assert!(
        !out.status.success(),
        "warmup with the store down succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warmup"), "{err}");
}

#[test]
fn a_blob_changed_behind_the_cache_is_refetched_whole() {
    let az = Azurite::start();
    az.az(CONTAINER, &["create"]);
    let v1 = pattern(31, 3 * CHUNK);
    put(&az, "ckpt.bin", &v1);
    let n = node(&az, "prefetch_chunks = 0", MountOpts::default());
    let path = n.mountpoint.join("ckpt.bin");
    // Only the first chunk reaches the cache (no prefetch).
    let mut f = std::fs::File::open(&path).unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact(&mut head).unwrap();
    assert_eq!(head, v1[..4096]);
    drop(f);
    // Changed by someone else: another size, other bytes.
    let v2 = pattern(32, 2 * CHUNK + 777);
    put(&az, "ckpt.bin", &v2);
    let_listings_expire();
    let got = std::fs::read(&path).unwrap();
    assert_eq!(got.len(), v2.len(), "new size");
    assert_eq!(sha(&got), sha(&v2), "new content, no chunk of the old one");
    let s: serde_json::Value = serde_json::from_str(&cli_ok(&n, &["status", "--json"])).unwrap();
    assert_eq!(s["blob_read"]["errors"], 0, "{s}");
}

#[test]
fn writing_into_a_file_not_yet_fetched_keeps_its_other_bytes() {
    let az = Azurite::start();
    az.az(CONTAINER, &["create"]);
    let orig = pattern(41, 3 * CHUNK + 5);
    put(&az, "run/state.bin", &orig);
    let n = node(&az, "", MountOpts::default());
    let path = n.mountpoint.join("run/state.bin");
    // An in-place overwrite of 10 bytes in the middle chunk, nothing read first.
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(CHUNK as u64 + 100)).unwrap();
    f.write_all(b"0123456789").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut want = orig.clone();
    want[CHUNK + 100..CHUNK + 110].copy_from_slice(b"0123456789");
    assert_eq!(
        sha(&std::fs::read(&path).unwrap()),
        sha(&want),
        "in the cache"
    );
    // A truncate keeps what is below the new size.
    let t = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    t.set_len(2 * CHUNK as u64 - 3).unwrap();
    drop(t);
    want.truncate(2 * CHUNK - 3);
    assert_eq!(
        sha(&std::fs::read(&path).unwrap()),
        sha(&want),
        "after truncate"
    );
    // And the changed file drains back to its blob.
    cli_ok(&n, &["flush", "--wait", "--timeout-s", "120"]);
    let blob = az
        .list(CONTAINER)
        .into_iter()
        .find(|b| b.0 == format!("{PREFIX}run/state.bin"))
        .expect("blob listed");
    assert_eq!(
        (blob.1, blob.2),
        (want.len() as u64, sha(&want)),
        "the blob"
    );
}

#[test]
fn a_full_cache_evicts_clean_chunks_and_never_dirty_ones() {
    let mut az = Azurite::start();
    az.az(CONTAINER, &["create"]);
    // 96 MiB of blobs through a 64 MiB device.
    let blobs: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("big/f{i}"), pattern(50 + i, 16 * CHUNK)))
        .collect();
    for (p, d) in &blobs {
        put(&az, p, d);
    }
    let n = node(
        &az,
        "evict_high_pct = 70\nevict_low_pct = 40\nspace_wait_ms = 2000\nprefetch_chunks = 0",
        MountOpts {
            device_size: "64MiB",
            ..MountOpts::default()
        },
    );
    let m = &n.mountpoint;
    for (p, d) in &blobs {
        let got = std::fs::read(m.join(p)).unwrap_or_else(|e| panic!("{p}: {e}\n{}", n.log_text()));
        assert_eq!(sha(&got), sha(d), "{p}");
    }
    let s: serde_json::Value = serde_json::from_str(&cli_ok(&n, &["status", "--json"])).unwrap();
    assert!(s["blob_read"]["evicted_bytes"].as_u64().unwrap() > 0, "{s}");
    // The first file was evicted (least recently used): read again, fetched again.
    let before = gets(&az, "big/f0");
    assert_eq!(
        sha(&std::fs::read(m.join("big/f0")).unwrap()),
        sha(&blobs[0].1)
    );
    assert!(
        gets(&az, "big/f0") > before,
        "f0 fetched again after its eviction"
    );

    // With the store down nothing can be uploaded: dirty data fills the cache, clean
    // chunks make way for it, and the write that finds no room gets ENOSPC.
    az.stop();
    std::fs::create_dir_all(m.join("dirty")).unwrap();
    let mut written = Vec::new();
    let mut full = None;
    // Bounded: 64 MiB of device holds fewer than 16 files of 4 MiB.
    for i in 0..16u64 {
        let p = m.join(format!("dirty/d{i}"));
        let d = pattern(100 + i, 4 * CHUNK);
        let r = std::fs::File::create(&p).and_then(|mut f| {
            f.write_all(&d)?;
            f.sync_all()
        });
        match r {
            Ok(()) => written.push((p, d)),
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let e = full.expect("the cache never filled");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert!(written.len() >= 4, "only {} files fitted", written.len());
    // The namespace's own log still has room: it did not fail.
    let s: serde_json::Value = serde_json::from_str(&cli_ok(&n, &["status", "--json"])).unwrap();
    assert_eq!(s["mount"]["failed"], false, "{s}");
    // Every acknowledged dirty file is whole, read with the store still down.
    for (p, d) in &written {
        let got = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(sha(&got), sha(d), "{}", p.display());
    }
    // Back up: the dirty files drain and become evictable; writing goes on.
    az.start_again();
    cli_ok(&n, &["flush", "--wait", "--timeout-s", "120"]);
    let p = m.join("dirty/after");
    let d = pattern(200, 4 * CHUNK);
    std::fs::write(&p, &d)
        .unwrap_or_else(|e| panic!("write after the flush: {e}\n{}", n.log_text()));
    assert_eq!(sha(&std::fs::read(&p).unwrap()), sha(&d));
}
