//! The `spool` binary as a real process: it starts on a file-backed device, serves the
//! admin socket with mode 0600, reports counters, stops on SIGTERM, refuses a bad
//! config with a message naming the key, and allocates its device file up front.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SPOOL: &str = env!("CARGO_BIN_EXE_spool");

fn spool(args: &[&str]) -> std::process::Output {
    Command::new(SPOOL).args(args).output().expect("run spool")
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let cfg = dir.join("spool.toml");
    let text = format!(
        "[device]\npath = \"{d}/dev.img\"\nsize = \"256MiB\"\nchunk_size = \"1MiB\"\n\
         [dataplane]\ncores = 1\nidle_spin_us = 10\n\
         [admin]\nsocket = \"{d}/admin.sock\"\n{extra}",
        d = dir.display()
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// `spool serve --config CFG`, which must fail: its stderr.
fn serve_fails(cfg: &Path) -> String {
    let out = Command::new(SPOOL)
        .args(["serve", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "spool serve started with {}",
        cfg.display()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(cfg: &Path, socket: &Path) -> Daemon {
    let child = Command::new(SPOOL)
        .args(["serve", "--config"])
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn spool serve");
    let d = Daemon(child);
    let t0 = Instant::now();
    while !socket.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "admin socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

fn stop(mut d: Daemon) {
    let pid = d.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t0 = Instant::now();
    loop {
        if let Some(st) = d.0.try_wait().unwrap() {
            assert!(st.success(), "spool serve exited with {st} after SIGTERM");
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "spool serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn daemon_serves_admin_socket_and_counters_then_stops() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let sock = dir.path().join("admin.sock");
    let metrics_port = 20000 + (std::process::id() % 20000) as u16;
    let cfg = write_config(
        dir.path(),
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    );
    let d = start(&cfg, &sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode");
    let s = sock.to_str().unwrap();

    let out = spool(&["status", "--socket", s, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["engine"]["device"]["backend"], "uring");
    assert_eq!(v["engine"]["geometry"]["chunk_size"], 1 << 20);
    assert_eq!(v["engine"]["cores"].as_array().unwrap().len(), 1);

    let out = spool(&["perf", "dump", "--socket", s]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for c in [
        "chunk_write_ops",
        "chunk_read_ops",
        "chunk_write_bytes",
        "chunk_read_errors",
    ] {
        assert!(v["counters"][c].is_u64(), "counter {c} in perf dump: {v}");
    }
    assert!(v["histograms"]["chunk_write_latency_ns"].is_object());

    let out = spool(&["config", "show", "--socket", s]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dataplane"]["cores"], 1);

    let out = spool(&["log-level", "debug", "--socket", s]);
    assert!(out.status.success());
    let out = spool(&["log-level", "no-such-level!!", "--socket", s]);
    assert!(!out.status.success(), "a bad level is refused");

    // Prometheus text over HTTP.
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("spool_chunk_write_ops_total"), "{body}");

    // Malformed requests get an error reply and the daemon keeps serving.
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.write_all(b"{not json\n").unwrap();
    let mut reply = [0u8; 4096];
    let n = c.read(&mut reply).unwrap();
    let r: serde_json::Value = serde_json::from_slice(&reply[..n]).unwrap();
    assert_eq!(r["ok"], false);
    assert!(spool(&["status", "--socket", s]).status.success());

    stop(d);
    assert!(!sock.exists(), "socket removed at shutdown");

    // A restart finds the formatted device and serves again.
    let d = start(&cfg, &sock);
    assert!(spool(&["status", "--socket", s]).status.success());
    stop(d);
}

#[test]
fn bad_config_is_refused_with_the_key_named() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    for (extra, key) in [
        ("[hugepages]\nbuffers = 0\n", "hugepages.buffers"),
        ("[log]\nlevell = \"x\"\n", "levell"),
    ] {
        let err = serve_fails(&write_config(dir.path(), extra));
        assert!(err.contains(key), "error for {key} must name it: {err}");
    }
    // A value out of range in a table the base config has (a second [dataplane]
    // table would be refused as a duplicate, not for the value).
    let cfg = write_config(dir.path(), "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("cores = 1\n", "cores = 0\n")).unwrap();
    let err = serve_fails(&cfg);
    assert!(err.contains("dataplane.cores"), "{err}");
}

#[test]
fn format_refuses_an_occupied_device_without_force() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let img = dir.path().join("d.img");
    let p = img.to_str().unwrap();
    let out = spool(&["format", p, "--size", "64MiB", "--chunk-size", "1MiB"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = spool(&["format", p]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert!(spool(&["format", p, "--force"]).status.success());
    let out = spool(&[
        "status",
        "--socket",
        &dir.path().join("none.sock").to_string_lossy(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is spool serve running"));
}

/// A file-backed device gets its blocks when it is created: a device file its
/// filesystem cannot hold is refused at start, naming the key and the free space,
/// instead of failing writes mid-checkpoint; one that fits is allocated, not sparse.
#[test]
fn a_device_file_is_allocated_up_front_and_refused_when_it_does_not_fit() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let st = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=32m",
            "spool-test",
            small.to_str().unwrap(),
        ])
        .status()
        .expect("mount");
    assert!(st.success(), "mounting a 32 MiB tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _u = Unmount(&small);

    let err = serve_fails(&write_config(&small, ""));
    for want in ["device.size", "bytes free", "No space left"] {
        assert!(err.contains(want), "no {want:?} in: {err}");
    }
    assert!(
        !small.join("dev.img").exists(),
        "a device file that could not be allocated is not left behind"
    );

    let img = small.join("fits.img");
    let out = spool(&[
        "format",
        img.to_str().unwrap(),
        "--size",
        "16MiB",
        "--chunk-size",
        "1MiB",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = std::fs::metadata(&img).unwrap();
    assert_eq!(m.len(), 16 << 20);
    assert!(
        m.blocks() * 512 >= 16 << 20,
        "allocated, not sparse: {} blocks",
        m.blocks()
    );
}

/// Run by `a_panic_on_any_thread_aborts_the_daemon` in a child process: the daemon's
/// panic hook, then a panic on a thread other than the main one.
#[test]
#[ignore = "a helper: run in a child process by a_panic_on_any_thread_aborts_the_daemon"]
fn panic_child_helper() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .try_init();
    spool_controlplane::shutdown::abort_on_panic();
    let _ = std::thread::Builder::new()
        .name("spool-core-0".into())
        .spawn(|| panic!("an invariant broke"));
    std::thread::sleep(std::time::Duration::from_secs(60));
    unreachable!("the panic on another thread did not end the process");
}

/// `spool serve` installs a hook that turns a panic on any thread into an abort, so a
/// daemon never keeps running with one of its threads dead (requests waiting on it for
/// ever); the store recovers at the next start like after any crash.
#[test]
fn a_panic_on_any_thread_aborts_the_daemon() {
    use std::os::unix::process::ExitStatusExt;
    let started = std::time::Instant::now();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "panic_child_helper", "--ignored", "--nocapture"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{:?}\n{err}",
        out.status
    );
    assert!(
        started.elapsed().as_secs() < 30,
        "aborted only after the sleep"
    );
    assert!(
        err.contains("an invariant broke"),
        "the panic message:\n{err}"
    );
    assert!(
        err.contains("aborting the daemon") && err.contains("spool-core-0"),
        "the log line names the thread:\n{err}"
    );
}
