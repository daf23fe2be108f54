//! A real `spool serve` with a FUSE mount, for tests: a fresh sparse device file, its own
//! admin socket and mountpoint in a tempdir. Dropping it kills the daemon and detaches
//! the mount, so a failing test leaves nothing mounted.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SPOOL: &str = env!("CARGO_BIN_EXE_spool");

/// How the kernel caches file data on the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    /// FUSE direct I/O for every open (the daemon's default).
    Direct,
    /// Page cache, every write(2) sent at once.
    WriteThrough,
    /// Page cache with the kernel's writeback cache.
    Writeback,
}

/// How the node is configured.
#[derive(Clone, Debug)]
pub struct MountOpts {
    pub device_size: &'static str,
    pub chunk_size: &'static str,
    /// Largest device I/O and DMA buffer size (at most the chunk size).
    pub io_size_max: &'static str,
    pub cache: Cache,
    pub threads: usize,
    pub buffers: usize,
    /// More TOML for the config (e.g. a `[blob]` section).
    pub extra: String,
    /// Use this NVMe controller (PCI address, bound to vfio-pci) through the nvme
    /// backend instead of a device file; `device_size` is then the namespace's.
    pub nvme: Option<String>,
}

impl Default for MountOpts {
    fn default() -> Self {
        MountOpts {
            device_size: "1GiB",
            chunk_size: "1MiB",
            io_size_max: "1MiB",
            cache: Cache::Direct,
            threads: 4,
            buffers: 32,
            extra: String::new(),
            nvme: None,
        }
    }
}

pub struct MountedNode {
    pub dir: tempfile::TempDir,
    pub mountpoint: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// Whether `path` is a mountpoint right now (from /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

impl MountedNode {
    /// Starts a node on a fresh device and waits until its mount answers.
    pub fn start(opts: &MountOpts) -> MountedNode {
        let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("mountpoint");
        let socket = dir.path().join("admin.sock");
        let config = dir.path().join("spool.toml");
        let log = dir.path().join("spool.log");
        let device = match &opts.nvme {
            Some(address) => format!("backend = \"nvme\"\npci_address = \"{address}\""),
            None => format!(
                "path = \"{}/dev.img\"\nsize = \"{}\"",
                dir.path().display(),
                opts.device_size
            ),
        };
        let text = format!(
            "[device]\n{device}\nchunk_size = \"{cs}\"\n\
             [dataplane]\ncores = 1\npin = false\nidle_spin_us = 20\nio_size_max = \"{io}\"\n\
             [hugepages]\npolicy = \"none\"\nbuffers = {buffers}\n\
             [admin]\nsocket = \"{sock}\"\n\
             [mount]\nmountpoint = \"{mnt}\"\nthreads = {threads}\n\
             direct_io = {dio}\nwriteback_cache = {wb}\n{extra}\n",
            cs = opts.chunk_size,
            io = opts.io_size_max,
            buffers = opts.buffers,
            sock = socket.display(),
            mnt = mountpoint.display(),
            threads = opts.threads,
            dio = opts.cache == Cache::Direct,
            wb = opts.cache == Cache::Writeback,
            extra = opts.extra,
        );
        std::fs::write(&config, text).expect("config");
        let mut node = MountedNode {
            dir,
            mountpoint,
            socket,
            config,
            log,
            child: None,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(SPOOL)
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn spool serve");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "spool serve exited with {st} at start:\n{}",
                    self.log_text()
                );
            }
            if is_mounted(&self.mountpoint) && self.socket.exists() {
                // The mount answers: stat goes through FUSE.
                if std::fs::metadata(&self.mountpoint).is_ok() {
                    return;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "mount never appeared at {}:\n{}",
                self.mountpoint.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node running").id()
    }

    /// SIGKILL: the daemon dies at once, leaving its mount behind (ENOTCONN).
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("node running");
        c.kill().expect("SIGKILL");
        c.wait().expect("wait");
    }

    /// Starts the daemon again on the same device and mountpoint (after `kill9` the
    /// daemon itself must clean the stale mount).
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// SIGTERM: asserts a clean exit and that the mount is gone.
    pub fn stop(&mut self) {
        let mut c = self.child.take().expect("node running");
        let pid = c.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "spool serve exited with {st} after SIGTERM:\n{}",
                    self.log_text()
                );
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "spool serve did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !is_mounted(&self.mountpoint),
            "mount left behind after SIGTERM"
        );
    }

    /// `spool ARGS --socket SOCKET` against this node.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(SPOOL)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("run spool")
    }

    /// The same, which must succeed: its standard output (the node's log on failure).
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "spool {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for MountedNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}
