//! The blob tier's writeback against a real Azurite, checked with an independent
//! client (the Azure SDK for Python): what lands in the container is compared with
//! what the test wrote through the FUSE mount, never with what the daemon says.

#[path = "common/azurite.rs"]
mod azurite;
#[path = "common/data.rs"]
mod data;
#[path = "common/moto.rs"]
mod moto;
#[path = "common/mount.rs"]
mod mount;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use azurite::Azurite;
use data::pattern;
use mount::{MountOpts, MountedNode};
use sha2::{Digest, Sha256};

const CONTAINER: &str = "ckpt";
const PREFIX: &str = "job-7/";

fn sha(data: &[u8]) -> String {
    let h = Sha256::digest(data);
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// A mount over `extra` (a `[blob]` section) with the tests' writeback settings.
fn node_with(blob: String) -> MountedNode {
    MountedNode::start(&MountOpts {
        extra: blob,
        ..MountOpts::default()
    })
}

/// A node whose mount drains to `az` `delay_ms` after a change; `more` adds `[blob]`
/// keys.
fn node(az: &Azurite, delay_ms: u64, more: &str) -> MountedNode {
    let cfg = az.blob_config(
        CONTAINER,
        &format!(
            "prefix = \"{PREFIX}\"\nwriteback_delay_ms = {delay_ms}\nscan_interval_ms = 100\n\
             part_size = \"1MiB\"\n{more}"
        ),
    );
    node_with(cfg)
}

fn cli_ok(n: &MountedNode, args: &[&str]) -> String {
    n.cli_ok(args)
}

fn flush_wait(n: &MountedNode) {
    cli_ok(n, &["flush", "--wait", "--timeout-s", "120"]);
}

/// `spool status PATH` (reads the file's `user.spool.state`).
fn state(path: &Path) -> String {
    let out = std::process::Command::new(mount::SPOOL)
        .arg("status")
        .arg(path)
        .output()
        .expect("spool status PATH");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status_json(n: &MountedNode) -> serde_json::Value {
    serde_json::from_str(&cli_ok(n, &["status", "--json"])).expect("status json")
}

/// The container holds exactly `want` (mount path, content) under the prefix.
fn assert_container(az: &Azurite, want: &[(&str, &[u8])]) {
    assert_listing(az.list(CONTAINER), want);
}

/// A checker's listing is exactly `want` (mount path, content) under the prefix.
fn assert_listing(listing: Vec<(String, u64, String, String)>, want: &[(&str, &[u8])]) {
    let got: Vec<(String, u64, String)> =
        listing.into_iter().map(|(n, s, h, _)| (n, s, h)).collect();
    let mut want: Vec<(String, u64, String)> = want
        .iter()
        .map(|(p, d)| (format!("{PREFIX}{p}"), d.len() as u64, sha(d)))
        .collect();
    want.sort();
    assert_eq!(got, want, "container contents (name, size, sha256)");
}

#[test]
fn writeback_mirrors_files_renames_and_unlinks_into_azurite() {
    let az = Azurite::start();
    az.az(CONTAINER, &["create"]);
    let n = node(&az, 200, "");
    let m = &n.mountpoint;
    let small = b"hello, blob\n".to_vec();
    let big = pattern(1, 5 * 1024 * 1024 + 12_345); // 6 blocks of 1 MiB
    let gone = pattern(2, 3000);
    std::fs::create_dir_all(m.join("step-100/shards")).unwrap();
    std::fs::write(m.join("meta.json"), &small).unwrap();
    std::fs::write(m.join("step-100/shards/rank-0.bin"), &big).unwrap();
    std::fs::write(m.join("step-100/empty"), b"").unwrap();
    std::fs::write(m.join("scratch.tmp"), &gone).unwrap();
    flush_wait(&n);
    assert_container(
        &az,
        &[
            ("meta.json", &small),
            ("step-100/shards/rank-0.bin", &big),
            ("step-100/empty", b""),
            ("scratch.tmp", &gone),
        ],
    );
    // The file's state names the blob's ETag, as the independent client sees it.
    let etag = az
        .list(CONTAINER)
        .into_iter()
        .find(|b| b.0 == format!("{PREFIX}meta.json"))
        .unwrap()
        .3;
    let st = state(&m.join("meta.json"));
    assert!(
        st.contains(&format!("in-blob etag={etag} key=meta.json")),
        "state {st:?}, etag {etag}"
    );
    let s = status_json(&n);
    assert!(
        s["blob"]["requests"]["put_block"].as_u64().unwrap() >= 6,
        "{s}"
    );

    // Renames (of a file and of a directory), an unlink and an overwrite.
    let big2 = pattern(3, 2 * 1024 * 1024);
    std::fs::rename(m.join("step-100"), m.join("step-200")).unwrap();
    std::fs::rename(m.join("step-200/empty"), m.join("step-200/done")).unwrap();
    std::fs::remove_file(m.join("scratch.tmp")).unwrap();
    std::fs::write(m.join("meta.json"), &big2).unwrap();
    flush_wait(&n);
    assert_container(
        &az,
        &[
            ("meta.json", &big2),
            ("step-200/shards/rank-0.bin", &big),
            ("step-200/done", b""),
        ],
    );
    // A blob replaced by a rename onto its name, and a name reused after an unlink.
    std::fs::write(m.join("a"), b"first a").unwrap();
    std::fs::write(m.join("b"), b"the b that replaces a").unwrap();
    flush_wait(&n);
    std::fs::rename(m.join("b"), m.join("a")).unwrap();
    std::fs::remove_file(m.join("meta.json")).unwrap();
    std::fs::write(m.join("meta.json"), b"meta again").unwrap();
    flush_wait(&n);
    assert_container(
        &az,
        &[
            ("a", b"the b that replaces a"),
            ("meta.json", b"meta again"),
            ("step-200/shards/rank-0.bin", &big),
            ("step-200/done", b""),
        ],
    );
}

#[test]
fn an_azurite_outage_keeps_dirty_files_and_the_upload_resumes() {
    let mut az = Azurite::start();
    az.az(CONTAINER, &["create"]);
    let n = node(&az, 200, "retry_delay_max_ms = 1000");
    let m = &n.mountpoint;
    let a = pattern(4, 3 * 1024 * 1024 + 7);
    std::fs::write(m.join("before.bin"), &a).unwrap();
    flush_wait(&n);
    az.stop();
    let b = pattern(5, 4 * 1024 * 1024);
    std::fs::write(m.join("during.bin"), &b).unwrap();
    cli_ok(&n, &["flush"]);
    // The store fails: the file stays dirty and readable, the error is reported.
    let t0 = Instant::now();
    loop {
        let s = status_json(&n);
        if s["blob"]["errors"].as_u64().unwrap_or(0) > 0 {
            assert!(s["blob"]["last_error"].as_str().is_some(), "{s}");
            assert_eq!(s["blob"]["backlog"]["dirty_files"], 1, "{s}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "no upload error reported: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(std::fs::read(m.join("during.bin")).unwrap(), b);
    assert!(!state(&m.join("during.bin")).contains("in-blob"));
    az.start_again();
    flush_wait(&n);
    assert_container(&az, &[("before.bin", &a), ("during.bin", &b)]);
}

#[test]
fn a_daemon_killed_during_an_upload_resumes_it_after_restart() {
    let az = Azurite::start();
    az.az(CONTAINER, &["create"]);
    let mut n = node(&az, 600_000, "parts_in_flight = 1");
    let data = pattern(6, 128 << 20);
    std::fs::write(n.mountpoint.join("model.bin"), &data).unwrap();
    cli_ok(&n, &["flush"]);
    // Kill it once some blocks are sent and before the block list is committed.
    let t0 = Instant::now();
    loop {
        let s = status_json(&n);
        let blocks = s["blob"]["requests"]["put_block"].as_u64().unwrap_or(0);
        if blocks >= 2 {
            assert_eq!(
                s["blob"]["files_uploaded"], 0,
                "upload ended before the kill: {s}"
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "upload never started: {s}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    n.kill9();
    assert_container(&az, &[]);
    n.restart();
    let st = state(&n.mountpoint.join("model.bin"));
    assert!(!st.contains("in-blob"), "state after restart: {st}");
    flush_wait(&n);
    assert_container(&az, &[("model.bin", &data)]);
}

#[test]
fn a_clean_shutdown_uploads_closed_files_first() {
    let az = Azurite::start();
    az.az(CONTAINER, &["create"]);
    // The delay is longer than the test: only the shutdown flush can send it.
    let mut n = node(&az, 600_000, "");
    let data = pattern(7, 1_500_000);
    std::fs::write(n.mountpoint.join("last-step.bin"), &data).unwrap();
    assert_container(&az, &[]);
    n.stop();
    assert_container(&az, &[("last-step.bin", &data)]);
}

#[test]
fn a_change_after_an_upload_is_never_taken_for_clean_after_a_crash() {
    let az = Azurite::start();
    az.az(CONTAINER, &["create"]);
    let mut n = node(&az, 600_000, "");
    let path = n.mountpoint.join("weights.bin");
    let mut data = pattern(8, 256 * 1024);
    std::fs::write(&path, &data).unwrap();
    flush_wait(&n);
    assert!(state(&path).contains("in-blob"));
    // An in-place overwrite acknowledged by the daemon (direct I/O: write(2) returns
    // once the daemon has it durably), then a crash before close or fsync: the file's
    // new times never reach the log.
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(8192)).unwrap();
    f.write_all(&[0xAB; 4096]).unwrap();
    data[8192..12288].fill(0xAB);
    n.kill9();
    drop(f);
    n.restart();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        data,
        "acknowledged write lost"
    );
    let st = state(&path);
    assert!(
        !st.contains("in-blob"),
        "changed file looks clean after the crash: {st}"
    );
    flush_wait(&n);
    assert_container(&az, &[("weights.bin", &data)]);
}

#[test]
fn writeback_to_s3_mirrors_files_renames_and_unlinks_checked_with_boto3() {
    let s3 = moto::Moto::start();
    s3.s3(CONTAINER, &["create"]);
    let n = node_with(s3.blob_config(
        CONTAINER,
        &format!(
            "prefix = \"{PREFIX}\"\nwriteback_delay_ms = 200\nscan_interval_ms = 100\n\
             part_size = \"5MiB\""
        ),
    ));
    let m = &n.mountpoint;
    let big = pattern(9, 12 * 1024 * 1024 + 5); // 3 parts of 5 MiB (the last shorter)
    let small = b"s3 small".to_vec();
    std::fs::create_dir_all(m.join("d")).unwrap();
    std::fs::write(m.join("d/big.bin"), &big).unwrap();
    std::fs::write(m.join("small"), &small).unwrap();
    std::fs::write(m.join("gone"), b"to be removed").unwrap();
    flush_wait(&n);
    assert_listing(
        s3.list(CONTAINER),
        &[
            ("d/big.bin", &big),
            ("small", &small),
            ("gone", b"to be removed"),
        ],
    );
    std::fs::rename(m.join("d"), m.join("e")).unwrap();
    std::fs::remove_file(m.join("gone")).unwrap();
    flush_wait(&n);
    assert_listing(
        s3.list(CONTAINER),
        &[("e/big.bin", &big), ("small", &small)],
    );
    let s = status_json(&n);
    assert_eq!(s["blob"]["requests"]["put_block_list"], 2, "{s}");
}

fn set_mode(dir: &Path, mode: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    spool_ffi::posix::setxattr(&c, c"user.spool.mode", mode.as_bytes(), 0)
}

#[test]
fn a_directory_in_cache_only_mode_is_never_uploaded() {
    let az = Azurite::start();
    az.az(CONTAINER, &["create"]);
    let n = node(&az, 100, "");
    let m = &n.mountpoint;
    std::fs::create_dir_all(m.join("scratch/keep")).unwrap();
    set_mode(&m.join("scratch"), "cache-only").unwrap();
    // The nearest directory wins: a writeback directory below a cache-only one.
    set_mode(&m.join("scratch/keep"), "writeback").unwrap();
    // Only directories, only the two modes.
    std::fs::write(m.join("f"), b"f").unwrap();
    let e = set_mode(&m.join("f"), "cache-only").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    let e = set_mode(&m.join("scratch"), "sometimes").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    let (a, b, c) = (pattern(71, 3000), pattern(72, 4000), pattern(73, 5000));
    std::fs::write(m.join("scratch/tmp.bin"), &a).unwrap();
    std::fs::write(m.join("scratch/keep/out.bin"), &b).unwrap();
    std::fs::write(m.join("top.bin"), &c).unwrap();
    flush_wait(&n);
    assert_container(
        &az,
        &[("f", b"f"), ("scratch/keep/out.bin", &b), ("top.bin", &c)],
    );
    let s = status_json(&n);
    assert_eq!(s["blob"]["backlog"]["cache_only_files"], 1, "{s}");
    assert_eq!(s["blob"]["backlog"]["dirty_files"], 0, "{s}");
    // Back to writeback: the file drains.
    set_mode(&m.join("scratch"), "writeback").unwrap();
    flush_wait(&n);
    assert_container(
        &az,
        &[
            ("f", b"f"),
            ("scratch/keep/out.bin", &b),
            ("scratch/tmp.bin", &a),
            ("top.bin", &c),
        ],
    );
}
