//! The mount's life: clean a stale mount a crashed daemon left, mount with the
//! throughput settings, flush dirty attributes in the background, unmount cleanly.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};

use crate::error::{Error, Result};
use crate::fs::{FsOptions, SpoolFs};
use crate::ops::NsOps;

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub mountpoint: PathBuf,
    pub threads: usize,
    pub writeback_cache: bool,
    pub direct_io: bool,
    pub readahead_bytes: u64,
    pub attr_ttl: Duration,
    pub allow_other: bool,
    /// Dirty sizes and times reach the log at least this often.
    pub attr_flush: Duration,
}

/// A live mount.
#[derive(Debug)]
pub struct Mounted {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    ns: Arc<dyn NsOps>,
    stop: Arc<AtomicBool>,
    flusher: Option<JoinHandle<()>>,
}

/// One line of /proc/self/mountinfo at `path`: (fstype, source).
fn mount_at(path: &Path) -> Option<(String, String)> {
    let want = path.to_string_lossy();
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in info.lines() {
        let mut halves = line.splitn(2, " - ");
        let left = halves.next()?;
        let right = halves.next().unwrap_or("");
        // Mountpoints escape spaces as \040; ours are compared escaped the same way.
        if left.split(' ').nth(4) == Some(want.replace(' ', "\\040").as_str()) {
            let mut r = right.split(' ');
            let fstype = r.next().unwrap_or("").to_owned();
            let source = r.next().unwrap_or("").to_owned();
            return Some((fstype, source));
        }
    }
    None
}

/// Detaches a FUSE mount at `path` whose daemon is gone (it answers ENOTCONN); refuses
/// a live mount or another filesystem there.
pub fn clean_stale(path: &Path) -> Result<()> {
    let Some((fstype, source)) = mount_at(path) else {
        return Ok(());
    };
    let is_fuse = fstype == "fuse" || fstype.starts_with("fuse.");
    match spool_ffi::mount::statfs_probe(path) {
        Err(e) if is_fuse && e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::warn!(mountpoint = %path.display(), %source, "detaching a stale FUSE mount left by a daemon that died");
            spool_ffi::mount::detach(path).map_err(|e| Error::Mount(e.to_string()))
        }
        _ => Err(Error::Mount(format!(
            "{} already has a live {fstype} mount ({source}); unmount it first (umount {})",
            path.display(),
            path.display()
        ))),
    }
}

/// Share of the dirty page limit the mount may use (the kernel's default for FUSE is 1).
const DIRTY_MAX_RATIO_PERCENT: u32 = 20;

/// FUSE names its backing device info by the mount's device number.
fn tune_bdi(mountpoint: &Path, readahead_bytes: u64) {
    let Ok(md) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = md.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let bdi = PathBuf::from(format!("/sys/class/bdi/{major}:{minor}"));
    let ra = bdi.join("read_ahead_kb");
    if let Err(e) = std::fs::write(&ra, format!("{}", readahead_bytes / 1024)) {
        tracing::info!(path = %ra.display(), error = %e, "could not raise readahead");
    }
    // FUSE caps a mount's dirty pages at 1% of the dirty limit (strictly), which throttles
    // a checkpoint writer long before the device is busy; the kernel lets root raise it.
    let ratio = bdi.join("max_ratio");
    if let Err(e) = std::fs::write(&ratio, format!("{DIRTY_MAX_RATIO_PERCENT}")) {
        tracing::info!(path = %ratio.display(), error = %e, "could not raise the dirty page share");
    }
}

impl Mounted {
    pub fn mount(ns: Arc<dyn NsOps>, opts: &MountOptions) -> Result<Mounted> {
        let mp = &opts.mountpoint;
        if !mp.exists() && mount_at(mp).is_none() {
            std::fs::create_dir_all(mp)
                .map_err(|e| Error::Mount(format!("creating mountpoint {}: {e}", mp.display())))?;
        }
        if !mp.is_dir() && mount_at(mp).is_none() {
            return Err(Error::Mount(format!(
                "mountpoint {} is not a directory",
                mp.display()
            )));
        }
        clean_stale(mp)?;
        let fs = SpoolFs::new(
            Arc::clone(&ns),
            FsOptions {
                attr_ttl: opts.attr_ttl,
                writeback_cache: opts.writeback_cache,
                direct_io: opts.direct_io,
                threads: opts.threads,
            },
        );
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("spool".to_owned()),
            MountOption::Subtype("spool".to_owned()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        cfg.acl = if opts.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        cfg.n_threads = Some(opts.threads);
        cfg.clone_fd = true;
        let session = Session::new(fs, mp, &cfg)
            .and_then(Session::spawn)
            .map_err(|e| Error::Mount(format!("mounting {}: {e}", mp.display())))?;
        tune_bdi(mp, opts.readahead_bytes);
        let stop = Arc::new(AtomicBool::new(false));
        let flusher = {
            let ns = Arc::clone(&ns);
            let stop = Arc::clone(&stop);
            let every = opts.attr_flush;
            std::thread::Builder::new()
                .name("spool-flush".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        std::thread::park_timeout(every);
                        if let Err(e) = ns.flush_dirty() {
                            tracing::warn!(error = %e, "flushing file sizes");
                        }
                    }
                })
                .map_err(|e| Error::Mount(format!("starting the flusher: {e}")))?
        };
        tracing::info!(mountpoint = %mp.display(), threads = opts.threads, direct_io = opts.direct_io, writeback_cache = opts.writeback_cache, "mounted");
        Ok(Mounted {
            session: Some(session),
            mountpoint: mp.clone(),
            ns,
            stop,
            flusher: Some(flusher),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Flushes sizes, unmounts and waits for the FUSE threads, then checkpoints the
    /// namespace so the next start replays nothing.
    pub fn unmount(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // Dirty pages of the kernel's writeback cache become WRITEs before unmount.
        if let Ok(f) = std::fs::File::open(&self.mountpoint) {
            if let Err(e) = spool_ffi::mount::syncfs(&f) {
                tracing::warn!(error = %e, "syncfs before unmount");
            }
        }
        let r = session
            .umount_and_join()
            .map_err(|e| Error::Mount(format!("unmounting {}: {e}", self.mountpoint.display())));
        self.stop.store(true, Ordering::Release);
        if let Some(f) = self.flusher.take() {
            f.thread().unpark();
            let _ = f.join();
        }
        self.ns.checkpoint_now()?;
        tracing::info!(mountpoint = %self.mountpoint.display(), "unmounted");
        r
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "unmount at drop");
        }
    }
}
