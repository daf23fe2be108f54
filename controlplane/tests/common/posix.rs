//! POSIX semantics probes for a mounted filesystem, run differentially: every case runs in a
//! fresh directory on the filesystem under test and in one on a local filesystem, and the
//! two outcomes must be equal. Comparing against the local kernel filesystem (ext4 here)
//! instead of hard-coding errnos keeps the suite honest about what Linux really does, and
//! `local_expectations` pins that each case still probes what its name says.
//!
//! Outcomes only hold things two correct filesystems agree on: errno names, sizes, modes,
//! file nlink, content hashes, sorted names. Never inode numbers, st_dev, st_blocks,
//! st_blksize, atime or directory nlink (a FUSE fs may legally report 1 there).
//!
//! Besides the table there are non-differential stress helpers (`many_entries`,
//! `statfs_sane`, `rename_readers_never_see_enoent`) returning `Result<(), String>`.
#![allow(dead_code)]

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use spool_ffi::posix as px;

/// What a case observed: `Ok(summary)` or `Err("step: ERRNO")`.
pub type Outcome = Result<String, String>;

/// A raw errno; displays as its symbolic name so outcomes read like man pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&errno_name(self.0))
    }
}

pub fn errno_name(e: i32) -> String {
    let n = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ENOTTY => "ENOTTY",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::EPIPE => "EPIPE",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ESTALE => "ESTALE",
        libc::EDQUOT => "EDQUOT",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECANCELED => "ECANCELED",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

pub type Sys<T> = Result<T, Errno>;

/// Names the failing step, so an unexpected setup failure says where it happened.
pub trait At<T> {
    fn at(self, step: &str) -> Result<T, String>;
}

impl<T> At<T> for Sys<T> {
    fn at(self, step: &str) -> Result<T, String> {
        self.map_err(|e| format!("{step}: {e}"))
    }
}

/// "ok" or the errno name: for probes whose success value does not matter.
fn show<T>(r: &Sys<T>) -> String {
    match r {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string(),
    }
}

/// "ok" or the failing step's message, for composite helpers.
fn show_s(r: &Result<(), String>) -> String {
    match r {
        Ok(()) => "ok".to_string(),
        Err(e) => e.clone(),
    }
}

/// The count, or the errno name.
fn show_n(r: &Sys<usize>) -> String {
    match r {
        Ok(n) => n.to_string(),
        Err(e) => e.to_string(),
    }
}

fn text(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("string without NUL")
}

/// The errno of a failed `spool_ffi::posix` call.
fn sys<T>(r: std::io::Result<T>) -> Sys<T> {
    r.map_err(|e| Errno(e.raw_os_error().unwrap_or(0)))
}

// ---------------------------------------------------------------------------------------
// Thin wrappers over `spool_ffi::posix`. Each returns the raw errno so cases can compare it
// exactly. O_CLOEXEC everywhere: the mount tests spawn `spool` CLI children that must not
// inherit descriptors into the filesystem under test.

pub fn open(p: &Path, flags: i32, mode: u32) -> Sys<OwnedFd> {
    sys(px::open(&cpath(p), flags | libc::O_CLOEXEC, mode))
}

pub fn openat(dir: &OwnedFd, name: &str, flags: i32, mode: u32) -> Sys<OwnedFd> {
    sys(px::openat(
        dir.as_fd(),
        &cstr(name),
        flags | libc::O_CLOEXEC,
        mode,
    ))
}

/// close(2) with its result (dropping an OwnedFd ignores it, and close may report a
/// deferred write error, e.g. ENOSPC on a network or FUSE filesystem).
pub fn close(fd: OwnedFd) -> Sys<()> {
    sys(px::close(fd))
}

pub fn pwrite(fd: &OwnedFd, buf: &[u8], off: i64) -> Sys<usize> {
    sys(px::pwrite(fd.as_fd(), buf, off))
}

pub fn pread(fd: &OwnedFd, buf: &mut [u8], off: i64) -> Sys<usize> {
    sys(px::pread(fd.as_fd(), buf, off))
}

pub fn write(fd: &OwnedFd, buf: &[u8]) -> Sys<usize> {
    sys(px::write(fd.as_fd(), buf))
}

pub fn read(fd: &OwnedFd, buf: &mut [u8]) -> Sys<usize> {
    sys(px::read(fd.as_fd(), buf))
}

/// Writes all of `buf` at the file position, retrying short writes.
pub fn write_all(fd: &OwnedFd, mut buf: &[u8]) -> Sys<()> {
    while !buf.is_empty() {
        let n = write(fd, buf)?;
        if n == 0 {
            return Err(Errno(libc::EIO));
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Reads the whole file from offset 0 with pread, whatever the file position is.
pub fn read_all_fd(fd: &OwnedFd) -> Sys<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = pread(fd, &mut buf, out.len() as i64)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

pub fn lseek(fd: &OwnedFd, off: i64, whence: i32) -> Sys<i64> {
    sys(px::lseek(fd.as_fd(), off, whence))
}

pub fn fstat(fd: &OwnedFd) -> Sys<libc::stat> {
    sys(px::fstat(fd.as_fd()))
}

pub fn stat(p: &Path) -> Sys<libc::stat> {
    sys(px::stat(&cpath(p)))
}

pub fn lstat(p: &Path) -> Sys<libc::stat> {
    sys(px::lstat(&cpath(p)))
}

pub fn statvfs(p: &Path) -> Sys<libc::statvfs> {
    sys(px::statvfs(&cpath(p)))
}

pub fn ftruncate(fd: &OwnedFd, len: i64) -> Sys<()> {
    sys(px::ftruncate(fd.as_fd(), len))
}

pub fn truncate(p: &Path, len: i64) -> Sys<()> {
    sys(px::truncate(&cpath(p), len))
}

pub fn fsync(fd: &OwnedFd) -> Sys<()> {
    sys(px::fsync(fd.as_fd()))
}

pub fn fdatasync(fd: &OwnedFd) -> Sys<()> {
    sys(px::fdatasync(fd.as_fd()))
}

pub fn syncfs(fd: &OwnedFd) -> Sys<()> {
    sys(px::syncfs(fd.as_fd()))
}

pub fn mkdir(p: &Path, mode: u32) -> Sys<()> {
    sys(px::mkdir(&cpath(p), mode))
}

pub fn rmdir(p: &Path) -> Sys<()> {
    sys(px::rmdir(&cpath(p)))
}

pub fn unlink(p: &Path) -> Sys<()> {
    sys(px::unlink(&cpath(p)))
}

pub fn rename(a: &Path, b: &Path) -> Sys<()> {
    sys(px::rename(&cpath(a), &cpath(b)))
}

/// renameat2(2) through the raw syscall, so it works whatever glibc wraps.
pub fn renameat2(a: &Path, b: &Path, flags: libc::c_uint) -> Sys<()> {
    sys(px::renameat2(None, &cpath(a), None, &cpath(b), flags))
}

pub fn link(a: &Path, b: &Path) -> Sys<()> {
    sys(px::link(&cpath(a), &cpath(b)))
}

pub fn symlink(target: &[u8], p: &Path) -> Sys<()> {
    let ct = CString::new(target).expect("target without NUL");
    sys(px::symlink(&ct, &cpath(p)))
}

/// readlink(2) into a buffer of `bufsize` bytes (it truncates silently, which a case probes).
pub fn readlink(p: &Path, bufsize: usize) -> Sys<Vec<u8>> {
    let c = cpath(p);
    let mut buf = vec![0u8; bufsize];
    let n = sys(px::readlink(&c, &mut buf))?;
    buf.truncate(n);
    Ok(buf)
}

pub fn chmod(p: &Path, mode: u32) -> Sys<()> {
    sys(px::chmod(&cpath(p), mode))
}

pub fn fchmod(fd: &OwnedFd, mode: u32) -> Sys<()> {
    sys(px::fchmod(fd.as_fd(), mode))
}

pub fn chown(p: &Path, uid: u32, gid: u32) -> Sys<()> {
    sys(px::chown(&cpath(p), uid, gid))
}

/// utimensat(2) with explicit (sec, nsec) pairs; nsec may be UTIME_OMIT / UTIME_NOW.
pub fn utimens(p: &Path, atime: (i64, i64), mtime: (i64, i64), flags: i32) -> Sys<()> {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    sys(px::utimensat(None, &cpath(p), &ts, flags))
}

pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> Sys<()> {
    sys(px::setxattr(&cpath(p), &cstr(name), value, flags))
}

pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> Sys<()> {
    sys(px::lsetxattr(&cpath(p), &cstr(name), value, flags))
}

/// getxattr(2) into a buffer of `bufsize` bytes; bufsize 0 asks for the length only (the
/// returned vector is then empty and the length is in `getxattr_len`).
pub fn getxattr(p: &Path, name: &str, bufsize: usize) -> Sys<Vec<u8>> {
    let (cp, cn) = (cpath(p), cstr(name));
    let mut buf = vec![0u8; bufsize];
    let n = sys(px::getxattr(&cp, &cn, &mut buf))?;
    buf.truncate(n);
    Ok(buf)
}

pub fn getxattr_len(p: &Path, name: &str) -> Sys<usize> {
    sys(px::getxattr(&cpath(p), &cstr(name), &mut []))
}

/// listxattr(2) into `bufsize` bytes (0: length only, returned as that many zero bytes).
pub fn listxattr(p: &Path, bufsize: usize) -> Sys<Vec<u8>> {
    let cp = cpath(p);
    let mut buf = vec![0u8; bufsize];
    let n = sys(px::listxattr(&cp, &mut buf))?;
    if bufsize == 0 {
        return Ok(vec![0; n]);
    }
    buf.truncate(n);
    Ok(buf)
}

pub fn removexattr(p: &Path, name: &str) -> Sys<()> {
    sys(px::removexattr(&cpath(p), &cstr(name)))
}

/// One directory entry as getdents64 returns it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dirent {
    pub name: Vec<u8>,
    pub d_type: u8,
}

/// All entries of an open directory via raw getdents64 with a `bufsize`-byte buffer. A
/// small buffer forces many calls, which exercises the filesystem's readdir offsets.
pub fn getdents_fd(fd: &OwnedFd, bufsize: usize) -> Sys<Vec<Dirent>> {
    let mut buf = vec![0u8; bufsize];
    let mut out = Vec::new();
    loop {
        let n = sys(px::getdents64(fd.as_fd(), &mut buf))?;
        if n == 0 {
            return Ok(out);
        }
        // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
        let mut off = 0usize;
        while off < n {
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let d_type = buf[off + 18];
            let raw = &buf[off + 19..off + reclen];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            out.push(Dirent {
                name: raw[..end].to_vec(),
                d_type,
            });
            off += reclen;
        }
    }
}

pub fn getdents(dir: &Path, bufsize: usize) -> Sys<Vec<Dirent>> {
    let fd = open(dir, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    getdents_fd(&fd, bufsize)
}

/// Sorted entry names without `.` and `..`.
pub fn names(dir: &Path) -> Sys<Vec<Vec<u8>>> {
    let mut v: Vec<Vec<u8>> = getdents(dir, 32 << 10)?
        .into_iter()
        .map(|d| d.name)
        .filter(|n| n != b"." && n != b"..")
        .collect();
    v.sort();
    Ok(v)
}

fn show_names(r: &Sys<Vec<Vec<u8>>>) -> String {
    match r {
        Ok(v) => format!(
            "[{}]",
            v.iter().map(|n| text(n)).collect::<Vec<_>>().join(",")
        ),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Content helpers.

/// A 64-bit non-cryptographic content hash (word-wise multiply/rotate with a splitmix
/// finaliser): enough to tell torn or stale data from the real thing.
pub fn hash64(data: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ (data.len() as u64).wrapping_mul(K);
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    for (i, &b) in words.remainder().iter().enumerate() {
        h = (h ^ ((b as u64) << (i * 8)))
            .wrapping_mul(K)
            .rotate_left(29);
    }
    h ^= h >> 31;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

/// splitmix64: a tiny deterministic generator for test content (no `rand` dependency).
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let w = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&w[..n]);
    }
}

/// `len` bytes of incompressible, undedupable content determined by `seed`.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng(seed ^ 0x5EED_0000_0000_0000).fill(&mut v);
    v
}

/// A seed that differs between threads and runs.
fn fresh_seed() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ N
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Creates (or truncates) `p` with `data`, checking close too.
fn put(p: &Path, data: &[u8]) -> Result<(), String> {
    let fd = open(p, libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC, 0o644).at("create")?;
    write_all(&fd, data).at("write")?;
    close(fd).at("close")
}

fn get(p: &Path) -> Sys<Vec<u8>> {
    let fd = open(p, libc::O_RDONLY, 0)?;
    read_all_fd(&fd)
}

fn show_content(r: &Sys<Vec<u8>>) -> String {
    match r {
        Ok(v) if v.len() <= 64 => format!("\"{}\"", text(v)),
        Ok(v) => format!("len {} hash {:016x}", v.len(), hash64(v)),
        Err(e) => e.to_string(),
    }
}

/// Runs of non-zero bytes as "start+len", for checking that holes read back as zeros.
fn nonzero_runs(buf: &[u8], base: u64) -> String {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == 0 {
            i += 1;
            continue;
        }
        let s = i;
        while i < buf.len() && buf[i] != 0 {
            i += 1;
        }
        runs.push(format!("{}+{}", base + s as u64, i - s));
        if runs.len() > 8 {
            runs.push("...".into());
            break;
        }
    }
    format!("[{}]", runs.join(","))
}

fn kind(st: &libc::stat) -> &'static str {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        _ => "other",
    }
}

/// A page-aligned, zeroed heap buffer for O_DIRECT. Over-allocates a Vec and uses an
/// aligned window of it (a Vec's heap block does not move when the Vec does).
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        const ALIGN: usize = 4096;
        let raw = vec![0u8; len + ALIGN];
        // For a byte pointer align_offset is always < ALIGN.
        let start = raw.as_ptr().align_offset(ALIGN);
        assert!(start < ALIGN, "cannot align a byte buffer");
        Aligned { raw, start, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

const O_RDONLY: i32 = libc::O_RDONLY;
const O_RDWR: i32 = libc::O_RDWR;
const O_WRONLY: i32 = libc::O_WRONLY;
const O_CREAT: i32 = libc::O_CREAT;
const O_EXCL: i32 = libc::O_EXCL;

fn j(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

fn jb(root: &Path, name: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(name))
}

// ---------------------------------------------------------------------------------------
// The cases. Each runs in its own fresh, empty directory `root` and must not mention
// `root` in its outcome (it differs between the two filesystems).

fn lookup_enoent(root: &Path) -> Outcome {
    let m = j(root, "missing");
    let mut s = vec![
        format!("stat={}", show(&stat(&m))),
        format!("lstat={}", show(&lstat(&m))),
        format!("open={}", show(&open(&m, O_RDONLY, 0))),
        format!(
            "create_below={}",
            show(&open(&m.join("x"), O_CREAT | O_WRONLY, 0o644))
        ),
        format!("mkdir_below={}", show(&mkdir(&m.join("x"), 0o755))),
        format!("unlink={}", show(&unlink(&m))),
        format!("rmdir={}", show(&rmdir(&m))),
        format!("rename={}", show(&rename(&m, &j(root, "x")))),
        format!("link={}", show(&link(&m, &j(root, "y")))),
        format!("readlink={}", show(&readlink(&m, 64))),
        format!("chmod={}", show(&chmod(&m, 0o600))),
        format!("truncate={}", show(&truncate(&m, 0))),
        format!("getxattr={}", show(&getxattr(&m, "user.x", 64))),
    ];
    // A negative lookup may be cached; it must not hide a file created afterwards, and a
    // positive one must not outlive the unlink.
    put(&m, b"x")?;
    s.push(format!("after_create={}", show(&stat(&m))));
    unlink(&m).at("unlink")?;
    s.push(format!("after_unlink={}", show(&stat(&m))));
    Ok(s.join(" "))
}

fn path_through_file_enotdir(root: &Path) -> Outcome {
    let f = j(root, "f");
    put(&f, b"data")?;
    let s = [
        format!("stat={}", show(&stat(&f.join("x")))),
        format!("stat_slash={}", show(&stat(&j(root, "f/")))),
        format!(
            "create={}",
            show(&open(&f.join("x"), O_CREAT | O_WRONLY, 0o644))
        ),
        format!("mkdir={}", show(&mkdir(&f.join("d"), 0o755))),
        format!(
            "opendir={}",
            show(&open(&f, O_RDONLY | libc::O_DIRECTORY, 0))
        ),
        format!("unlink={}", show(&unlink(&f.join("x")))),
        format!("rename_into={}", show(&rename(&f, &f.join("y")))),
        format!("symlink={}", show(&symlink(b"t", &f.join("l")))),
    ];
    Ok(s.join(" "))
}

fn create_excl_existing_eexist(root: &Path) -> Outcome {
    let f = j(root, "f");
    put(&f, b"hello")?;
    let d = j(root, "d");
    mkdir(&d, 0o755).at("mkdir")?;
    symlink(b"nowhere", &j(root, "dangling")).at("symlink")?;
    let s = [
        format!(
            "file={}",
            show(&open(&f, O_CREAT | O_EXCL | O_WRONLY, 0o644))
        ),
        format!(
            "dir={}",
            show(&open(&d, O_CREAT | O_EXCL | O_RDONLY, 0o644))
        ),
        // O_EXCL never follows a symlink, even a dangling one.
        format!(
            "dangling={}",
            show(&open(
                &j(root, "dangling"),
                O_CREAT | O_EXCL | O_WRONLY,
                0o644
            ))
        ),
        format!("nowhere={}", show(&stat(&j(root, "nowhere")))),
        format!("content={}", show_content(&get(&f))),
    ];
    Ok(s.join(" "))
}

fn open_creat_existing_ok(root: &Path) -> Outcome {
    let f = j(root, "f");
    put(&f, b"hello")?;
    let mut s = Vec::new();
    let fd = open(&f, O_CREAT | O_RDWR, 0o600).at("open creat")?;
    s.push(format!("content={}", show_content(&read_all_fd(&fd))));
    s.push(format!(
        "mode_kept={:o}",
        fstat(&fd).at("fstat")?.st_mode & 0o7777
    ));
    close(fd).at("close")?;
    let fd = open(&f, O_CREAT | O_RDWR | libc::O_TRUNC, 0o644).at("open trunc")?;
    s.push(format!(
        "size_after_trunc={}",
        fstat(&fd).at("fstat")?.st_size
    ));
    drop(fd);
    let d = j(root, "d");
    mkdir(&d, 0o755).at("mkdir")?;
    s.push(format!(
        "creat_dir={}",
        show(&open(&d, O_CREAT | O_RDONLY, 0o644))
    ));
    // O_CREAT without O_EXCL follows a dangling symlink and creates its target.
    symlink(b"target", &j(root, "dangling")).at("symlink")?;
    s.push(format!(
        "through_dangling={}",
        show(&open(&j(root, "dangling"), O_CREAT | O_WRONLY, 0o644))
    ));
    s.push(format!("target={}", show(&lstat(&j(root, "target")))));
    s.push(format!("names={}", show_names(&names(root))));
    Ok(s.join(" "))
}

fn create_modes_follow_umask(root: &Path) -> Outcome {
    // The process umask (022 for the tests) applies on both filesystems; a FUSE fs that
    // negotiates DONT_MASK must apply it itself.
    let f = j(root, "f");
    drop(open(&f, O_CREAT | O_WRONLY, 0o666).at("create")?);
    let d = j(root, "d");
    mkdir(&d, 0o777).at("mkdir")?;
    let g = j(root, "g");
    drop(open(&g, O_CREAT | O_WRONLY, 0o640).at("create g")?);
    Ok(format!(
        "f={:o} d={:o} g={:o}",
        stat(&f).at("stat f")?.st_mode,
        stat(&d).at("stat d")?.st_mode,
        stat(&g).at("stat g")?.st_mode
    ))
}

fn mkdir_existing_eexist(root: &Path) -> Outcome {
    let d = j(root, "d");
    mkdir(&d, 0o755).at("mkdir")?;
    put(&j(root, "f"), b"x")?;
    symlink(b"nowhere", &j(root, "dangling")).at("symlink")?;
    let s = [
        format!("dir={}", show(&mkdir(&d, 0o755))),
        format!("file={}", show(&mkdir(&j(root, "f"), 0o755))),
        format!("dangling={}", show(&mkdir(&j(root, "dangling"), 0o755))),
        format!("dot={}", show(&mkdir(&j(root, "d/."), 0o755))),
        format!("names={}", show_names(&names(root))),
    ];
    Ok(s.join(" "))
}

fn rmdir_nonempty_enotempty(root: &Path) -> Outcome {
    let d = j(root, "d");
    mkdir(&d, 0o755).at("mkdir")?;
    put(&d.join("f"), b"x")?;
    let e = j(root, "e");
    mkdir(&e, 0o755).at("mkdir e")?;
    mkdir(&e.join("sub"), 0o755).at("mkdir e/sub")?;
    let mut s = vec![
        format!("with_file={}", show(&rmdir(&d))),
        format!("with_subdir={}", show(&rmdir(&e))),
        format!("dot={}", show(&rmdir(&j(root, "d/.")))),
    ];
    unlink(&d.join("f")).at("unlink")?;
    s.push(format!("emptied={}", show(&rmdir(&d))));
    s.push(format!("gone={}", show(&stat(&d))));
    Ok(s.join(" "))
}

fn rmdir_file_enotdir(root: &Path) -> Outcome {
    let f = j(root, "f");
    put(&f, b"x")?;
    mkdir(&j(root, "d"), 0o755).at("mkdir")?;
    symlink(b"d", &j(root, "l")).at("symlink")?;
    let s = [
        format!("file={}", show(&rmdir(&f))),
        format!("symlink_to_dir={}", show(&rmdir(&j(root, "l")))),
        format!("names={}", show_names(&names(root))),
    ];
    Ok(s.join(" "))
}

fn unlink_dir_eisdir(root: &Path) -> Outcome {
    let d = j(root, "d");
    mkdir(&d, 0o755).at("mkdir")?;
    let s = [
        format!("unlink={}", show(&unlink(&d))),
        format!("still_there={}", show(&stat(&d))),
    ];
    Ok(s.join(" "))
}

fn rename_file_over_file(root: &Path) -> Outcome {
    let (a, b) = (j(root, "a"), j(root, "b"));
    put(&a, b"new")?;
    put(&b, b"old content")?;
    let old = open(&b, O_RDONLY, 0).at("open b")?;
    rename(&a, &b).at("rename")?;
    let s = [
        // The replaced inode lives on while open: same bytes, no names left.
        format!("old_fd={}", show_content(&read_all_fd(&old))),
        format!("old_nlink={}", fstat(&old).at("fstat old")?.st_nlink),
        format!("b={}", show_content(&get(&b))),
        format!("a={}", show(&stat(&a))),
        format!("b_nlink={}", stat(&b).at("stat b")?.st_nlink),
        format!("names={}", show_names(&names(root))),
    ];
    Ok(s.join(" "))
}

fn rename_over_hardlinked_target(root: &Path) -> Outcome {
    let (a, b, c) = (j(root, "a"), j(root, "b"), j(root, "c"));
    put(&a, b"new")?;
    put(&b, b"old")?;
    link(&b, &c).at("link")?;
    rename(&a, &b).at("rename")?;
    let s = [
        format!("b={}", show_content(&get(&b))),
        format!("c={}", show_content(&get(&c))),
        format!("c_nlink={}", stat(&c).at("stat c")?.st_nlink),
        format!("b_nlink={}", stat(&b).at("stat b")?.st_nlink),
    ];
    Ok(s.join(" "))
}

fn rename_same_inode_noop(root: &Path) -> Outcome {
    // POSIX: renaming one link of a file onto another link of the same file does nothing
    // and succeeds; both names stay.
    let (a, b) = (j(root, "a"), j(root, "b"));
    put(&a, b"x")?;
    link(&a, &b).at("link")?;
    let s = [
        format!("over_link={}", show(&rename(&a, &b))),
        format!("self={}", show(&rename(&a, &a))),
        format!("names={}", show_names(&names(root))),
        format!("nlink={}", stat(&a).at("stat a")?.st_nlink),
    ];
    Ok(s.join(" "))
}

fn rename_file_over_dir_eisdir(root: &Path) -> Outcome {
    let (f, d) = (j(root, "f"), j(root, "d"));
    put(&f, b"x")?;
    mkdir(&d, 0o755).at("mkdir")?;
    let s = [
        format!("rename={}", show(&rename(&f, &d))),
        format!("names={}", show_names(&names(root))),
    ];
    Ok(s.join(" "))
}

fn rename_dir_over_file_enotdir(root: &Path) -> Outcome {
    let (f, d) = (j(root, "f"), j(root, "d"));
    put(&f, b"x")?;
    mkdir(&d, 0o755).at("mkdir")?;
    let s = [
        format!("rename={}", show(&rename(&d, &f))),
        format!("f={}", show_content(&get(&f))),
        format!("names={}", show_names(&names(root))),
    ];
    Ok(s.join(" "))
}

fn rename_dir_over_nonempty_dir_enotempty(root: &Path) -> Outcome {
    let (a, b) = (j(root, "a"), j(root, "b"));
    mkdir(&a, 0o755).at("mkdir a")?;
    mkdir(&b, 0o755).at("mkdir b")?;
    put(&b.join("x"), b"keep")?;
    let s = [
        format!("rename={}", show(&rename(&a, &b))),
        format!("b_x={}", show_content(&get(&b.join("x")))),
        format!("names={}", show_names(&names(root))),
    ];
    Ok(s.join(" "))
}

fn rename_dir_over_empty_dir_ok(root: &Path) -> Outcome {
    let (a, b) = (j(root, "a"), j(root, "b"));
    mkdir(&a, 0o755).at("mkdir a")?;
    put(&a.join("child"), b"payload")?;
    mkdir(&b, 0o755).at("mkdir b")?;
    let s = [
        format!("rename={}", show(&rename(&a, &b))),
        format!("a={}", show(&stat(&a))),
        format!("b_child={}", show_content(&get(&b.join("child")))),
        format!("a_child={}", show(&stat(&a.join("child")))),
        format!("names={}", show_names(&names(root))),
    ];
    Ok(s.join(" "))
}

fn rename_dir_into_own_subdir_einval(root: &Path) -> Outcome {
    let a = j(root, "a");
    mkdir(&a, 0o755).at("mkdir a")?;
    mkdir(&a.join("b"), 0o755).at("mkdir a/b")?;
    let s = [
        format!("into_grandchild={}", show(&rename(&a, &a.join("b/c")))),
        format!("into_child={}", show(&rename(&a, &a.join("c")))),
        format!("names={}", show_names(&names(root))),
    ];
    Ok(s.join(" "))
}

fn rename_dir_moves_children(root: &Path) -> Outcome {
    let x = j(root, "x");
    mkdir(&x, 0o755).at("mkdir x")?;
    mkdir(&x.join("y"), 0o755).at("mkdir x/y")?;
    put(&x.join("y/f"), b"deep")?;
    // Warm the kernel's caches on the old paths first, so stale entries would show.
    stat(&x.join("y/f")).at("stat old")?;
    let (p, q) = (j(root, "p"), j(root, "q"));
    mkdir(&p, 0o755).at("mkdir p")?;
    mkdir(&q, 0o755).at("mkdir q")?;
    rename(&x, &p.join("w")).at("rename dir")?;
    put(&j(root, "loose"), b"moved")?;
    rename(&j(root, "loose"), &q.join("loose")).at("rename file")?;
    let s = [
        format!("new_deep={}", show_content(&get(&p.join("w/y/f")))),
        format!("old_deep={}", show(&stat(&x.join("y/f")))),
        format!("old_dir={}", show(&stat(&x))),
        format!("moved={}", show_content(&get(&q.join("loose")))),
        format!("root={}", show_names(&names(root))),
        format!("p={}", show_names(&names(&p))),
        format!("q={}", show_names(&names(&q))),
    ];
    Ok(s.join(" "))
}

fn renameat2_noreplace_eexist(root: &Path) -> Outcome {
    let (a, b, c) = (j(root, "a"), j(root, "b"), j(root, "c"));
    put(&a, b"A")?;
    put(&b, b"B")?;
    let s = [
        format!(
            "over_existing={}",
            show(&renameat2(&a, &b, libc::RENAME_NOREPLACE))
        ),
        format!("b={}", show_content(&get(&b))),
        format!(
            "to_free={}",
            show(&renameat2(&a, &c, libc::RENAME_NOREPLACE))
        ),
        format!("names={}", show_names(&names(root))),
    ];
    Ok(s.join(" "))
}

fn renameat2_exchange(root: &Path) -> Outcome {
    let (a, b, d) = (j(root, "a"), j(root, "b"), j(root, "d"));
    put(&a, b"A")?;
    put(&b, b"B")?;
    mkdir(&d, 0o755).at("mkdir")?;
    put(&d.join("inner"), b"I")?;
    let s = [
        format!("swap={}", show(&renameat2(&a, &b, libc::RENAME_EXCHANGE))),
        format!("a={}", show_content(&get(&a))),
        format!("b={}", show_content(&get(&b))),
        format!(
            "missing={}",
            show(&renameat2(&a, &j(root, "missing"), libc::RENAME_EXCHANGE))
        ),
        format!(
            "file_dir={}",
            show(&renameat2(&a, &d, libc::RENAME_EXCHANGE))
        ),
        format!("a_inner={}", show_content(&get(&a.join("inner")))),
        format!("d={}", show_content(&get(&d))),
    ];
    Ok(s.join(" "))
}

fn name_max_255(root: &Path) -> Outcome {
    let n255 = "a".repeat(255);
    let n256 = "b".repeat(256);
    // 85 three-byte characters: 255 bytes, the limit is in bytes not characters.
    let euro = "\u{20ac}".repeat(85);
    let euro86 = "\u{20ac}".repeat(86);
    put(&j(root, &n255), b"long")?;
    let s = [
        format!("stat255={}", show(&stat(&j(root, &n255)))),
        format!("read255={}", show_content(&get(&j(root, &n255)))),
        format!(
            "create256={}",
            show(&open(&j(root, &n256), O_CREAT | O_WRONLY, 0o644))
        ),
        format!("stat256={}", show(&stat(&j(root, &n256)))),
        format!("mkdir256={}", show(&mkdir(&j(root, &n256), 0o755))),
        format!(
            "rename_to256={}",
            show(&rename(&j(root, &n255), &j(root, &n256)))
        ),
        format!("symlink256={}", show(&symlink(b"x", &j(root, &n256)))),
        format!("link256={}", show(&link(&j(root, &n255), &j(root, &n256)))),
        format!(
            "euro255={}",
            show(&open(&j(root, &euro), O_CREAT | O_WRONLY, 0o644))
        ),
        format!(
            "euro258={}",
            show(&open(&j(root, &euro86), O_CREAT | O_WRONLY, 0o644))
        ),
        format!(
            "mkdir255={}",
            show(&mkdir(&j(root, &"d".repeat(255)), 0o755))
        ),
        format!(
            "listing_lens={:?}",
            names(root)
                .at("names")?
                .iter()
                .map(|n| n.len())
                .collect::<Vec<_>>()
        ),
    ];
    Ok(s.join(" "))
}

fn non_utf8_names_round_trip(root: &Path) -> Outcome {
    let weird: [&[u8]; 5] = [
        b"\xff\xfe name",
        b"\x80",
        b"a\nb",
        b"\x01ctrl\x7f",
        b"\xc3\x28 bad utf8",
    ];
    for n in weird {
        put(&jb(root, n), n)?;
    }
    let mut s = vec![format!("created={}", show_names(&names(root)))];
    for n in weird {
        let got = get(&jb(root, n)).at("read")?;
        if got != n {
            return Err(format!("content of {} is {}", text(n), text(&got)));
        }
    }
    let (from, to) = (
        jb(root, b"\xff\xfe name"),
        jb(root, b"\xfe\xff renamed \x80"),
    );
    s.push(format!("rename={}", show(&rename(&from, &to))));
    s.push(format!("old={}", show(&stat(&from))));
    s.push(format!("new={}", show_content(&get(&to))));
    s.push(format!(
        "mkdir={}",
        show(&mkdir(&jb(root, b"dir\xff"), 0o755))
    ));
    s.push(format!(
        "nested={}",
        show_s(&put(&jb(root, b"dir\xff/\xee"), b"n"))
    ));
    s.push(format!("renamed={}", show_names(&names(root))));
    unlink(&to).at("unlink renamed")?;
    for n in &weird[1..] {
        unlink(&jb(root, n)).at("unlink")?;
    }
    unlink(&jb(root, b"dir\xff/\xee")).at("unlink nested")?;
    rmdir(&jb(root, b"dir\xff")).at("rmdir")?;
    s.push(format!("after={}", show_names(&names(root))));
    Ok(s.join(" "))
}

/// 2^63 - 4096: far above any real filesystem's maximum file size but still a valid off_t.
const NEAR_2_63: i64 = i64::MAX - 4095;

fn pwrite_near_2_63_efbig(root: &Path) -> Outcome {
    let f = j(root, "f");
    let fd = open(&f, O_CREAT | O_RDWR, 0o644).at("create")?;
    pwrite(&fd, b"x", NEAR_2_63).at("pwrite")?;
    // Accepted: with a write-back cache the refusal can only show up when the data is
    // flushed, so look there before calling it a success.
    fsync(&fd).at("fsync")?;
    Ok(format!(
        "accepted, size {}",
        fstat(&fd).at("fstat")?.st_size
    ))
}

fn pread_far_offsets(root: &Path) -> Outcome {
    let f = j(root, "f");
    put(&f, b"hello")?;
    let fd = open(&f, O_RDONLY, 0).at("open")?;
    let mut buf = [0u8; 16];
    let s = [
        // pos + count overflows off_t here, which the VFS refuses (EINVAL) before any
        // filesystem sees it; a 0-byte read at the same offset is fine.
        format!("at_max={}", show_n(&pread(&fd, &mut buf, i64::MAX))),
        format!(
            "at_max_len0={}",
            show_n(&pread(&fd, &mut buf[..0], i64::MAX))
        ),
        format!("near_2_63={}", show_n(&pread(&fd, &mut buf, NEAR_2_63))),
        format!("at_eof={}", show_n(&pread(&fd, &mut buf, 5))),
        format!("negative={}", show_n(&pread(&fd, &mut buf, -1))),
        format!("pwrite_negative={}", {
            let w = open(&f, O_WRONLY, 0).at("open w")?;
            show_n(&pwrite(&w, b"x", -1))
        }),
        format!(
            "seek_end={}",
            lseek(&fd, 0, libc::SEEK_END)
                .map(|o| o.to_string())
                .unwrap_or_else(|e| e.to_string())
        ),
        format!("read_at_end={}", show_n(&read(&fd, &mut buf))),
    ];
    Ok(s.join(" "))
}

fn ftruncate_huge_efbig(root: &Path) -> Outcome {
    let f = j(root, "f");
    put(&f, b"hello")?;
    let fd = open(&f, O_RDWR, 0).at("open")?;
    let s = [
        format!("to_max={}", show(&ftruncate(&fd, i64::MAX))),
        // 2^63 does not fit in off_t: it arrives as a negative length.
        format!("to_2_63={}", show(&ftruncate(&fd, i64::MIN))),
        format!("to_minus_1={}", show(&ftruncate(&fd, -1))),
        format!("path_to_max={}", show(&truncate(&f, i64::MAX))),
        format!("size={}", fstat(&fd).at("fstat")?.st_size),
        format!("content={}", show_content(&read_all_fd(&fd))),
    ];
    Ok(s.join(" "))
}

fn sparse_holes_read_zeros(root: &Path) -> Outcome {
    const MIB: i64 = 1 << 20;
    let mut s = Vec::new();
    let f = j(root, "f");
    let fd = open(&f, O_CREAT | O_RDWR, 0o644).at("create")?;
    pwrite(&fd, b"A", 0).at("pwrite A")?;
    pwrite(&fd, b"B", 3 * MIB + 17).at("pwrite B")?;
    s.push(format!("size={}", fstat(&fd).at("fstat")?.st_size));
    let all = read_all_fd(&fd).at("read")?;
    s.push(format!(
        "len={} nonzero={}",
        all.len(),
        nonzero_runs(&all, 0)
    ));
    ftruncate(&fd, 8 * MIB).at("extend")?;
    let all = read_all_fd(&fd).at("read extended")?;
    s.push(format!(
        "extended={} nonzero={}",
        all.len(),
        nonzero_runs(&all, 0)
    ));
    // Data beyond a shrink must not come back when the file grows again.
    pwrite(&fd, &vec![0xCC; 8192], MIB + MIB / 2).at("pwrite CC")?;
    ftruncate(&fd, MIB).at("shrink")?;
    ftruncate(&fd, 2 * MIB).at("regrow")?;
    let all = read_all_fd(&fd).at("read regrown")?;
    s.push(format!(
        "regrown={} nonzero={}",
        all.len(),
        nonzero_runs(&all, 0)
    ));
    // Same inside one page: the tail of a partially truncated page must read as zeros.
    let g = j(root, "g");
    let gd = open(&g, O_CREAT | O_RDWR, 0o644).at("create g")?;
    pwrite(&gd, &[0xAA; 4096], 0).at("pwrite AA")?;
    ftruncate(&gd, 100).at("shrink g")?;
    ftruncate(&gd, 4096).at("regrow g")?;
    let all = read_all_fd(&gd).at("read g")?;
    s.push(format!(
        "page={} nonzero={}",
        all.len(),
        nonzero_runs(&all, 0)
    ));
    // A hole read through a fresh descriptor (nothing cached for it).
    drop(fd);
    let fd = open(&f, O_RDONLY, 0).at("reopen")?;
    let mut buf = vec![0xEEu8; 4096];
    let n = pread(&fd, &mut buf, 2 * MIB - 4096).at("pread hole")?;
    s.push(format!(
        "hole_read={} nonzero={}",
        n,
        nonzero_runs(&buf[..n], 0)
    ));
    Ok(s.join(" "))
}

fn o_append_appends(root: &Path) -> Outcome {
    let f = j(root, "f");
    put(&f, b"start")?;
    let a = open(&f, O_WRONLY | libc::O_APPEND, 0).at("open append")?;
    write_all(&a, b"-one").at("write one")?;
    lseek(&a, 0, libc::SEEK_SET).at("lseek")?;
    write_all(&a, b"-two").at("write two")?;
    // Another descriptor extends the file; the append descriptor must follow the new end.
    let w = open(&f, O_WRONLY, 0).at("open plain")?;
    pwrite(&w, b"-other", 13).at("pwrite other")?;
    write_all(&a, b"-three").at("write three")?;
    // Linux quirk (pwrite(2) BUGS): pwrite on an O_APPEND descriptor appends anyway.
    pwrite(&a, b"-p", 0).at("pwrite append")?;
    let s = [
        format!("content={}", show_content(&get(&f))),
        format!("pos={}", lseek(&a, 0, libc::SEEK_CUR).at("lseek cur")?),
        format!("size={}", stat(&f).at("stat")?.st_size),
    ];
    Ok(s.join(" "))
}

fn unlink_while_open(root: &Path) -> Outcome {
    let f = j(root, "f");
    put(&f, b"hello")?;
    let fd = open(&f, O_RDWR, 0).at("open")?;
    unlink(&f).at("unlink")?;
    pwrite(&fd, b"XY", 5).at("pwrite after unlink")?;
    let st = fstat(&fd).at("fstat")?;
    let s = [
        format!("read={}", show_content(&read_all_fd(&fd))),
        format!("nlink={} size={}", st.st_nlink, st.st_size),
        format!("stat={}", show(&stat(&f))),
        format!("names={}", show_names(&names(root))),
        format!("fsync={}", show(&fsync(&fd))),
        format!("ftruncate={}", show(&ftruncate(&fd, 3))),
        format!("read2={}", show_content(&read_all_fd(&fd))),
        format!("recreate={}", show_s(&put(&f, b"new"))),
        format!("old_fd_after_recreate={}", show_content(&read_all_fd(&fd))),
        format!("close={}", show(&close(fd))),
        format!("new={}", show_content(&get(&f))),
    ];
    Ok(s.join(" "))
}

fn symlink_readlink(root: &Path) -> Outcome {
    let t = j(root, "t");
    put(&t, b"target data")?;
    let l = j(root, "l");
    symlink(b"t", &l).at("symlink")?;
    mkdir(&j(root, "d"), 0o755).at("mkdir")?;
    let long: Vec<u8> = b"x/".iter().copied().cycle().take(4095).collect();
    let too_long: Vec<u8> = b"y/".iter().copied().cycle().take(4096).collect();
    let ls = lstat(&l).at("lstat")?;
    let s = [
        format!("readlink={}", show_content(&readlink(&l, 256))),
        format!("lstat={} size={}", kind(&ls), ls.st_size),
        format!("stat={}", kind(&stat(&l).at("stat")?)),
        format!("through={}", show_content(&get(&l))),
        format!("on_file={}", show(&readlink(&t, 256))),
        format!("on_dir={}", show(&readlink(&j(root, "d"), 256))),
        format!("bufsize0={}", show(&readlink(&l, 0))),
        format!("truncated={}", {
            symlink(b"0123456789", &j(root, "l10")).at("symlink l10")?;
            show_content(&readlink(&j(root, "l10"), 3))
        }),
        format!("existing={}", show(&symlink(b"other", &t))),
        format!(
            "nofollow={}",
            show(&open(&l, O_RDONLY | libc::O_NOFOLLOW, 0))
        ),
        format!(
            "long={}",
            show(&symlink(&long, &j(root, "long")).and_then(|_| readlink(&j(root, "long"), 8192)))
        ),
        format!(
            "long_ok={}",
            readlink(&j(root, "long"), 8192)
                .map(|v| v == long)
                .unwrap_or(false)
        ),
        format!(
            "too_long={}",
            show(&symlink(&too_long, &j(root, "too_long")))
        ),
        format!("dangling={}", {
            symlink(b"nowhere", &j(root, "dl")).at("symlink dl")?;
            format!(
                "stat {} lstat {}",
                show(&stat(&j(root, "dl"))),
                show(&lstat(&j(root, "dl")))
            )
        }),
        format!("loop={}", {
            symlink(b"loop2", &j(root, "loop1")).at("symlink loop1")?;
            symlink(b"loop1", &j(root, "loop2")).at("symlink loop2")?;
            show(&stat(&j(root, "loop1")))
        }),
        format!("unlink_link={}", show(&unlink(&l))),
        format!("target_kept={}", show_content(&get(&t))),
    ];
    Ok(s.join(" "))
}

fn hard_links_nlink(root: &Path) -> Outcome {
    let (a, b, c) = (j(root, "a"), j(root, "b"), j(root, "c"));
    put(&a, b"one")?;
    link(&a, &b).at("link b")?;
    let (sa, sb) = (stat(&a).at("stat a")?, stat(&b).at("stat b")?);
    let mut s = vec![
        format!("nlink={},{}", sa.st_nlink, sb.st_nlink),
        format!("same_ino={}", sa.st_ino == sb.st_ino),
    ];
    // Writes through one name are visible through the other.
    let fd = open(&b, O_WRONLY, 0).at("open b")?;
    pwrite(&fd, b"ONE", 0).at("pwrite b")?;
    drop(fd);
    s.push(format!("a_sees={}", show_content(&get(&a))));
    link(&a, &c).at("link c")?;
    s.push(format!("nlink3={}", stat(&c).at("stat c")?.st_nlink));
    unlink(&a).at("unlink a")?;
    s.push(format!(
        "after_unlink_a={}",
        stat(&b).at("stat b")?.st_nlink
    ));
    unlink(&b).at("unlink b")?;
    s.push(format!(
        "after_unlink_b={}",
        stat(&c).at("stat c")?.st_nlink
    ));
    let fd = open(&c, O_RDONLY, 0).at("open c")?;
    unlink(&c).at("unlink c")?;
    s.push(format!(
        "open_unlinked={}",
        fstat(&fd).at("fstat")?.st_nlink
    ));
    put(&a, b"x")?;
    mkdir(&j(root, "d"), 0o755).at("mkdir")?;
    put(&j(root, "e"), b"y")?;
    s.push(format!(
        "to_dir={}",
        show(&link(&j(root, "d"), &j(root, "d2")))
    ));
    s.push(format!("onto_existing={}", show(&link(&a, &j(root, "e")))));
    s.push(format!(
        "from_missing={}",
        show(&link(&j(root, "zz"), &j(root, "z")))
    ));
    s.push(format!("names={}", show_names(&names(root))));
    Ok(s.join(" "))
}

fn chmod_chown_utimens(root: &Path) -> Outcome {
    let f = j(root, "f");
    put(&f, b"x")?;
    let mut s = Vec::new();
    let mode = |p: &Path| stat(p).map(|st| format!("{:o}", st.st_mode));
    chmod(&f, 0o640).at("chmod 640")?;
    s.push(format!("m640={}", mode(&f).at("stat")?));
    chmod(&f, 0o6755).at("chmod 6755")?;
    s.push(format!("m6755={}", mode(&f).at("stat")?));
    chown(&f, 1234, 5678).at("chown")?;
    let st = stat(&f).at("stat")?;
    // chown of a regular file drops set-user-ID and (with group exec) set-group-ID, even
    // for root.
    s.push(format!(
        "owner={}:{} mode_after_chown={:o}",
        st.st_uid, st.st_gid, st.st_mode
    ));
    chown(&f, u32::MAX, 42).at("chown gid only")?;
    let st = stat(&f).at("stat")?;
    s.push(format!("gid_only={}:{}", st.st_uid, st.st_gid));
    let fd = open(&f, O_RDONLY, 0).at("open")?;
    fchmod(&fd, 0o600).at("fchmod")?;
    s.push(format!("fchmod={}", mode(&f).at("stat")?));
    drop(fd);
    let d = j(root, "d");
    mkdir(&d, 0o755).at("mkdir")?;
    chmod(&d, 0o1777).at("chmod dir")?;
    s.push(format!("dir={}", mode(&d).at("stat d")?));

    utimens(
        &f,
        (1_000_000_000, 123_456_789),
        (1_234_567_890, 987_654_321),
        0,
    )
    .at("utimensat")?;
    let st = stat(&f).at("stat")?;
    s.push(format!(
        "times={}.{:09}/{}.{:09}",
        st.st_atime, st.st_atime_nsec, st.st_mtime, st.st_mtime_nsec
    ));
    utimens(&f, (0, libc::UTIME_OMIT), (1_300_000_000, 1), 0).at("utimensat omit")?;
    let st = stat(&f).at("stat")?;
    s.push(format!(
        "omit_atime={}.{:09}/{}.{:09}",
        st.st_atime, st.st_atime_nsec, st.st_mtime, st.st_mtime_nsec
    ));
    let fd = open(&f, O_WRONLY, 0).at("open w")?;
    pwrite(&fd, b"y", 0).at("pwrite")?;
    let st = fstat(&fd).at("fstat")?;
    // A write sets mtime to now; the exact value differs, the fact it moved must not.
    s.push(format!(
        "mtime_moved_by_write={}",
        st.st_mtime > 1_300_000_000
    ));
    drop(fd);
    let l = j(root, "l");
    symlink(b"f", &l).at("symlink")?;
    s.push(format!(
        "symlink_times={}",
        show(&utimens(&l, (5, 6), (7, 8), libc::AT_SYMLINK_NOFOLLOW))
    ));
    let ls = lstat(&l).at("lstat")?;
    s.push(format!("lmtime={}.{}", ls.st_mtime, ls.st_mtime_nsec));
    s.push(format!(
        "target_mtime_untouched={}",
        stat(&f).at("stat")?.st_mtime > 1_300_000_000
    ));
    // ctime follows metadata changes; coarse timestamp clocks need a little time to tick.
    let c0 = stat(&f).at("stat")?;
    std::thread::sleep(Duration::from_millis(50));
    chmod(&f, 0o644).at("chmod 644")?;
    let c1 = stat(&f).at("stat")?;
    s.push(format!(
        "ctime_after_chmod={}",
        (c1.st_ctime, c1.st_ctime_nsec) > (c0.st_ctime, c0.st_ctime_nsec)
    ));
    Ok(s.join(" "))
}

fn getattr_sizes(root: &Path) -> Outcome {
    let f = j(root, "f");
    let fd = open(&f, O_CREAT | O_RDWR, 0o644).at("create")?;
    let mut s = Vec::new();
    let mut size = |label: &str, fd: &OwnedFd| -> Result<(), String> {
        let a = fstat(fd).at("fstat")?.st_size;
        let b = stat(&f).at("stat")?.st_size;
        s.push(format!("{label}={a}/{b}"));
        Ok(())
    };
    size("empty", &fd)?;
    write_all(&fd, b"0123456789").at("write")?;
    size("write10", &fd)?;
    pwrite(&fd, b"x", 100_000).at("pwrite far")?;
    size("pwrite100000", &fd)?;
    pwrite(&fd, b"abc", 4).at("pwrite inside")?;
    size("overwrite_inside", &fd)?;
    ftruncate(&fd, 50).at("ftruncate 50")?;
    size("ftruncate50", &fd)?;
    ftruncate(&fd, 3 << 20).at("ftruncate 3M")?;
    size("ftruncate3M", &fd)?;
    truncate(&f, 7).at("truncate 7")?;
    size("truncate7", &fd)?;
    let content = read_all_fd(&fd).at("read")?;
    drop(fd);
    let fd = open(&f, O_RDWR | libc::O_TRUNC, 0).at("open trunc")?;
    size("o_trunc", &fd)?;
    write_all(&fd, &vec![7u8; 3 * 4096 + 5]).at("write pages")?;
    size("pages", &fd)?;
    drop(fd);
    s.push(format!("content7={}", show_content(&Ok(content))));
    Ok(s.join(" "))
}

fn write_read_patterns(root: &Path) -> Outcome {
    // Overlapping writes at unaligned offsets across page and 1 MiB boundaries, checked
    // against an in-memory model, then read back with several chunk sizes.
    let f = j(root, "f");
    let fd = open(&f, O_CREAT | O_RDWR, 0o644).at("create")?;
    let mut model: Vec<u8> = Vec::new();
    let mut rng = Rng(42);
    for i in 0..64 {
        let off = rng.below(3 << 20) as usize;
        let len = 1 + rng.below(if i % 8 == 0 { 300_000 } else { 9000 }) as usize;
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        pwrite(&fd, &data, off as i64).at("pwrite")?;
        if model.len() < off + len {
            model.resize(off + len, 0);
        }
        model[off..off + len].copy_from_slice(&data);
    }
    let mut s = vec![format!("size={}", fstat(&fd).at("fstat")?.st_size)];
    for chunk in [1usize, 4095, 4096, 65536 + 3, 1 << 20] {
        let mut got = Vec::with_capacity(model.len());
        let mut buf = vec![0u8; chunk];
        // Only a few single-byte reads: they are there for the unaligned path, not volume.
        let limit = if chunk == 1 { 10_000 } else { usize::MAX };
        while got.len() < model.len().min(limit) {
            let n = pread(&fd, &mut buf, got.len() as i64).at("pread")?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let want = &model[..got.len().min(model.len())];
        s.push(format!("chunk{chunk}_match={}", got.as_slice() == want));
    }
    drop(fd);
    let back = get(&f).at("reread")?;
    s.push(format!("reopen_match={}", back == model));
    s.push(format!("hash={:016x}", hash64(&back)));
    Ok(s.join(" "))
}

fn xattrs_user_namespace(root: &Path) -> Outcome {
    let f = j(root, "f");
    put(&f, b"x")?;
    let mut s = Vec::new();
    let user_list = |p: &Path| -> String {
        match listxattr(p, 4096) {
            Ok(raw) => {
                let mut v: Vec<String> = raw
                    .split(|&b| b == 0)
                    .filter(|n| n.starts_with(b"user."))
                    .map(text)
                    .collect();
                v.sort();
                format!("[{}]", v.join(","))
            }
            Err(e) => e.to_string(),
        }
    };
    s.push(format!("set_a={}", show(&setxattr(&f, "user.a", b"1", 0))));
    s.push(format!(
        "get_a={}",
        show_content(&getxattr(&f, "user.a", 64))
    ));
    s.push(format!("len_a={}", show_n(&getxattr_len(&f, "user.a"))));
    s.push(format!(
        "set_b={}",
        show(&setxattr(&f, "user.b", b"hello", 0))
    ));
    s.push(format!("list={}", user_list(&f)));
    let full = listxattr(&f, 4096).at("listxattr")?;
    s.push(format!(
        "list_len_query_consistent={}",
        listxattr(&f, 0)
            .map(|v| v.len() == full.len())
            .unwrap_or(false)
    ));
    s.push(format!("list_small={}", show(&listxattr(&f, 1))));
    s.push(format!(
        "create_existing={}",
        show(&setxattr(&f, "user.a", b"2", libc::XATTR_CREATE))
    ));
    s.push(format!(
        "replace_missing={}",
        show(&setxattr(&f, "user.c", b"3", libc::XATTR_REPLACE))
    ));
    s.push(format!(
        "replace_existing={}",
        show(&setxattr(&f, "user.a", b"22", libc::XATTR_REPLACE))
    ));
    s.push(format!(
        "get_a2={}",
        show_content(&getxattr(&f, "user.a", 64))
    ));
    s.push(format!(
        "get_missing={}",
        show(&getxattr(&f, "user.missing", 64))
    ));
    s.push(format!("get_small={}", show(&getxattr(&f, "user.b", 2))));
    s.push(format!("remove_a={}", show(&removexattr(&f, "user.a"))));
    s.push(format!("remove_again={}", show(&removexattr(&f, "user.a"))));
    s.push(format!("list2={}", user_list(&f)));
    s.push(format!(
        "set_empty={}",
        show(&setxattr(&f, "user.empty", b"", 0))
    ));
    s.push(format!(
        "get_empty={}",
        show_content(&getxattr(&f, "user.empty", 64))
    ));
    let binary: Vec<u8> = (0..=255u8).cycle().take(2000).collect();
    s.push(format!(
        "set_bin={}",
        show(&setxattr(&f, "user.bin", &binary, 0))
    ));
    s.push(format!(
        "get_bin_ok={}",
        getxattr(&f, "user.bin", 4096)
            .map(|v| v == binary)
            .unwrap_or(false)
    ));
    // Through a second open and after rename the attributes stay with the inode.
    rename(&f, &j(root, "g")).at("rename")?;
    s.push(format!("after_rename={}", user_list(&j(root, "g"))));
    let d = j(root, "d");
    mkdir(&d, 0o755).at("mkdir")?;
    s.push(format!(
        "dir_set={}",
        show(&setxattr(&d, "user.d", b"dv", 0))
    ));
    s.push(format!(
        "dir_get={}",
        show_content(&getxattr(&d, "user.d", 64))
    ));
    // user.* is not allowed on symlinks (the VFS refuses before the filesystem sees it).
    symlink(b"g", &j(root, "l")).at("symlink")?;
    s.push(format!(
        "symlink_set={}",
        show(&lsetxattr(&j(root, "l"), "user.l", b"v", 0))
    ));
    s.push(format!(
        "missing_file={}",
        show(&setxattr(&j(root, "nope"), "user.a", b"v", 0))
    ));
    Ok(s.join(" "))
}

fn readdir_listing(root: &Path) -> Outcome {
    let d = j(root, "d");
    mkdir(&d, 0o755).at("mkdir")?;
    let mut want = Vec::new();
    for i in 0..25 {
        // Some long names so a listing spans several getdents buffers.
        let n = if i % 5 == 0 {
            format!("file_{i:02}_{}", "L".repeat(200))
        } else {
            format!("file_{i:02}")
        };
        put(&d.join(&n), b"")?;
        want.push(n);
        let n = format!("dir_{i:02}");
        mkdir(&d.join(&n), 0o755).at("mkdir child")?;
        want.push(n);
    }
    let mut s = Vec::new();
    let sorted = |v: Vec<Dirent>| {
        let mut v: Vec<Vec<u8>> = v.into_iter().map(|e| e.name).collect();
        v.sort();
        v
    };
    let big = sorted(getdents(&d, 64 << 10).at("getdents big")?);
    let fd = open(&d, O_RDONLY | libc::O_DIRECTORY, 0).at("opendir")?;
    let small = sorted(getdents_fd(&fd, 1024).at("getdents small")?);
    // After rewinding the same descriptor the whole listing comes back again.
    lseek(&fd, 0, libc::SEEK_SET).at("rewind")?;
    let again = sorted(getdents_fd(&fd, 1024).at("getdents rewound")?);
    s.push(format!("count={}", big.len()));
    s.push(format!(
        "dots={}",
        big.iter().filter(|n| *n == b"." || *n == b"..").count()
    ));
    let mut with_dots: Vec<Vec<u8>> = want.iter().map(|n| n.as_bytes().to_vec()).collect();
    with_dots.push(b".".to_vec());
    with_dots.push(b"..".to_vec());
    with_dots.sort();
    s.push(format!("exact_set={}", big == with_dots));
    s.push(format!("small_buffer_same={}", small == big));
    s.push(format!("rewound_same={}", again == big));
    s.push(format!("hash={:016x}", hash64(&big.concat())));
    // `..` of a child is the parent.
    let parent = stat(&d).at("stat d")?;
    let dotdot = stat(&d.join("dir_00/..")).at("stat ..")?;
    s.push(format!(
        "dotdot_is_parent={}",
        parent.st_ino == dotdot.st_ino
    ));
    // Entries added and removed show up in a fresh listing.
    unlink(&d.join("file_01")).at("unlink")?;
    rmdir(&d.join("dir_01")).at("rmdir")?;
    put(&d.join("late"), b"")?;
    let after = names(&d).at("names")?;
    s.push(format!("after_count={}", after.len()));
    s.push(format!(
        "late={} file_01={}",
        after.iter().any(|n| n == b"late"),
        after.iter().any(|n| n == b"file_01")
    ));
    Ok(s.join(" "))
}

fn readdir_d_type(root: &Path) -> Outcome {
    put(&j(root, "f"), b"")?;
    mkdir(&j(root, "d"), 0o755).at("mkdir")?;
    symlink(b"f", &j(root, "l")).at("symlink")?;
    let mut v: Vec<String> = getdents(root, 4096)
        .at("getdents")?
        .into_iter()
        .map(|e| {
            let t = match e.d_type {
                libc::DT_REG => "reg",
                libc::DT_DIR => "dir",
                libc::DT_LNK => "lnk",
                libc::DT_UNKNOWN => "unknown",
                _ => "other",
            };
            format!("{}:{t}", text(&e.name))
        })
        .collect();
    v.sort();
    Ok(v.join(","))
}

fn deleted_dir_refuses_entries(root: &Path) -> Outcome {
    let d = j(root, "d");
    mkdir(&d, 0o755).at("mkdir")?;
    let dfd = open(&d, O_RDONLY | libc::O_DIRECTORY, 0).at("opendir")?;
    rmdir(&d).at("rmdir")?;
    let s = [
        format!(
            "create_in_deleted={}",
            show(&openat(&dfd, "x", O_CREAT | O_WRONLY, 0o644))
        ),
        format!(
            "listing_of_deleted={}",
            getdents_fd(&dfd, 4096)
                .map(|v| v.len().to_string())
                .unwrap_or_else(|e| e.to_string())
        ),
        format!(
            "fstat_nlink_zero={}",
            fstat(&dfd).at("fstat")?.st_nlink == 0
        ),
    ];
    Ok(s.join(" "))
}

fn fsync_fdatasync_file_and_dir(root: &Path) -> Outcome {
    let f = j(root, "f");
    let fd = open(&f, O_CREAT | O_RDWR, 0o644).at("create")?;
    write_all(&fd, b"durable").at("write")?;
    let ro = open(&f, O_RDONLY, 0).at("open ro")?;
    let dfd = open(root, O_RDONLY | libc::O_DIRECTORY, 0).at("opendir")?;
    let s = [
        format!("file_fsync={}", show(&fsync(&fd))),
        format!("file_fdatasync={}", show(&fdatasync(&fd))),
        format!("ro_fsync={}", show(&fsync(&ro))),
        format!("dir_fsync={}", show(&fsync(&dfd))),
        format!("dir_fdatasync={}", show(&fdatasync(&dfd))),
        format!("syncfs={}", show(&syncfs(&fd))),
        format!("close={}", show(&close(fd))),
        format!("content={}", show_content(&get(&f))),
    ];
    Ok(s.join(" "))
}

fn o_direct_aligned_io(root: &Path) -> Outcome {
    const LEN: usize = 16 << 10;
    let f = j(root, "f");
    let fd = open(&f, O_CREAT | O_RDWR | libc::O_DIRECT, 0o644).at("open O_DIRECT")?;
    let mut wbuf = Aligned::new(LEN);
    Rng(7).fill(wbuf.as_mut());
    let w = pwrite(&fd, wbuf.as_mut(), 0).at("pwrite direct")?;
    let w2 = pwrite(&fd, &wbuf.as_mut()[..4096], LEN as i64).at("pwrite direct 2")?;
    let mut rbuf = Aligned::new(LEN + 4096);
    let r = pread(&fd, rbuf.as_mut(), 0).at("pread direct")?;
    let mut want = wbuf.as_mut().to_vec();
    want.extend_from_slice(&wbuf.as_mut()[..4096]);
    let direct_ok = rbuf.as_mut()[..r] == want[..];
    // Direct and buffered I/O on the same file must agree.
    let buffered = get(&f).at("buffered read")?;
    let bfd = open(&f, O_WRONLY, 0).at("open buffered")?;
    pwrite(&bfd, b"buffered!", 100).at("buffered pwrite")?;
    drop(bfd);
    let r2 = pread(&fd, rbuf.as_mut(), 0).at("pread direct 2")?;
    let s = [
        format!("wrote={w}+{w2} read={r}"),
        format!("direct_ok={direct_ok}"),
        format!("buffered_ok={}", buffered == want),
        format!(
            "direct_sees_buffered={} ({r2})",
            &rbuf.as_mut()[100..109] == b"buffered!"
        ),
        format!("size={}", fstat(&fd).at("fstat")?.st_size),
    ];
    Ok(s.join(" "))
}

fn truncate_dir_eisdir(root: &Path) -> Outcome {
    let d = j(root, "d");
    mkdir(&d, 0o755).at("mkdir")?;
    let f = j(root, "f");
    put(&f, b"hello")?;
    let dfd = open(&d, O_RDONLY | libc::O_DIRECTORY, 0).at("opendir")?;
    let ro = open(&f, O_RDONLY, 0).at("open ro")?;
    let mut buf = [0u8; 16];
    let s = [
        format!("truncate_dir={}", show(&truncate(&d, 0))),
        format!("open_dir_wronly={}", show(&open(&d, O_WRONLY, 0))),
        format!("open_dir_rdwr={}", show(&open(&d, O_RDWR, 0))),
        format!("read_dir_fd={}", show_n(&read(&dfd, &mut buf))),
        format!("ftruncate_dir_fd={}", show(&ftruncate(&dfd, 0))),
        format!("ftruncate_readonly={}", show(&ftruncate(&ro, 0))),
        format!("write_readonly={}", show_n(&write(&ro, b"x"))),
        format!("content={}", show_content(&get(&f))),
    ];
    Ok(s.join(" "))
}

fn mmap_shared_write_then_read(root: &Path) -> Outcome {
    const LEN: usize = 3 * 4096;
    let f = j(root, "f");
    let fd = open(&f, O_CREAT | O_RDWR, 0o644).at("create")?;
    ftruncate(&fd, LEN as i64).at("ftruncate")?;
    let mut map = sys(px::Mapping::new(&fd, 0, LEN, true)).at("mmap")?;
    let mut data = vec![0u8; LEN];
    Rng(3).fill(&mut data);
    map.as_mut_slice()[..LEN].copy_from_slice(&data);
    let sync = sys(map.msync());
    // pwrite through the descriptor must show in the mapping (one page cache).
    pwrite(&fd, b"via-fd", 4096).at("pwrite")?;
    let mut seen = [0u8; 6];
    seen.copy_from_slice(&map.as_slice()[4096..4102]);
    let unmap = sys(map.unmap());
    data[4096..4102].copy_from_slice(b"via-fd");
    let back = get(&f).at("read back")?;
    let s = [
        format!("msync={} munmap={}", show(&sync), show(&unmap)),
        format!("mapping_sees_pwrite={}", &seen == b"via-fd"),
        format!("file_matches={}", back == data),
    ];
    Ok(s.join(" "))
}

/// One table entry: the probe, and a substring its outcome on the local filesystem must
/// contain (checked by `local_expectations`, so the suite cannot silently probe nothing).
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub name: &'static str,
    pub run: fn(&Path) -> Outcome,
    pub expect: &'static str,
}

macro_rules! case {
    ($f:ident, $expect:expr) => {
        Case {
            name: stringify!($f),
            run: $f,
            expect: $expect,
        }
    };
}

pub const CASES: &[Case] = &[
    case!(lookup_enoent, "stat=ENOENT lstat=ENOENT open=ENOENT"),
    case!(
        path_through_file_enotdir,
        "stat=ENOTDIR stat_slash=ENOTDIR create=ENOTDIR"
    ),
    case!(
        create_excl_existing_eexist,
        "file=EEXIST dir=EEXIST dangling=EEXIST"
    ),
    case!(
        open_creat_existing_ok,
        "content=\"hello\" mode_kept=644 size_after_trunc=0 creat_dir=EISDIR"
    ),
    case!(create_modes_follow_umask, "f=100644 d=40755 g=100640"),
    case!(
        mkdir_existing_eexist,
        "dir=EEXIST file=EEXIST dangling=EEXIST"
    ),
    case!(
        rmdir_nonempty_enotempty,
        "with_file=ENOTEMPTY with_subdir=ENOTEMPTY dot=EINVAL emptied=ok gone=ENOENT"
    ),
    case!(rmdir_file_enotdir, "file=ENOTDIR symlink_to_dir=ENOTDIR"),
    case!(unlink_dir_eisdir, "unlink=EISDIR still_there=ok"),
    case!(
        rename_file_over_file,
        "old_fd=\"old content\" old_nlink=0 b=\"new\" a=ENOENT"
    ),
    case!(
        rename_over_hardlinked_target,
        "b=\"new\" c=\"old\" c_nlink=1"
    ),
    case!(
        rename_same_inode_noop,
        "over_link=ok self=ok names=[a,b] nlink=2"
    ),
    case!(rename_file_over_dir_eisdir, "rename=EISDIR"),
    case!(rename_dir_over_file_enotdir, "rename=ENOTDIR"),
    case!(rename_dir_over_nonempty_dir_enotempty, "rename=ENOTEMPTY"),
    case!(
        rename_dir_over_empty_dir_ok,
        "rename=ok a=ENOENT b_child=\"payload\""
    ),
    case!(
        rename_dir_into_own_subdir_einval,
        "into_grandchild=EINVAL into_child=EINVAL"
    ),
    case!(
        rename_dir_moves_children,
        "new_deep=\"deep\" old_deep=ENOENT"
    ),
    case!(
        renameat2_noreplace_eexist,
        "over_existing=EEXIST b=\"B\" to_free=ok"
    ),
    case!(
        renameat2_exchange,
        "swap=ok a=\"B\" b=\"A\" missing=ENOENT file_dir=ok"
    ),
    case!(
        name_max_255,
        "stat255=ok read255=\"long\" create256=ENAMETOOLONG stat256=ENAMETOOLONG"
    ),
    case!(non_utf8_names_round_trip, "rename=ok old=ENOENT"),
    case!(pwrite_near_2_63_efbig, "pwrite: EFBIG"),
    case!(
        pread_far_offsets,
        "at_max=EINVAL at_max_len0=0 near_2_63=0 at_eof=0 negative=EINVAL"
    ),
    case!(ftruncate_huge_efbig, "to_max=EFBIG to_2_63=EINVAL"),
    case!(
        sparse_holes_read_zeros,
        "size=3145746 len=3145746 nonzero=[0+1,3145745+1]"
    ),
    case!(o_append_appends, "content=\"start-one-two-other-three-p\""),
    case!(
        unlink_while_open,
        "read=\"helloXY\" nlink=0 size=7 stat=ENOENT"
    ),
    case!(
        symlink_readlink,
        "readlink=\"t\" lstat=symlink size=1 stat=file"
    ),
    case!(hard_links_nlink, "nlink=2,2 same_ino=true"),
    case!(
        chmod_chown_utimens,
        "times=1000000000.123456789/1234567890.987654321"
    ),
    case!(getattr_sizes, "write10=10/10 pwrite100000=100001/100001"),
    case!(
        write_read_patterns,
        "chunk1_match=true chunk4095_match=true"
    ),
    case!(
        xattrs_user_namespace,
        "create_existing=EEXIST replace_missing=ENODATA"
    ),
    case!(
        readdir_listing,
        "count=52 dots=2 exact_set=true small_buffer_same=true rewound_same=true"
    ),
    case!(readdir_d_type, "..:dir,.:dir,d:dir,f:reg,l:lnk"),
    case!(
        deleted_dir_refuses_entries,
        "create_in_deleted=ENOENT listing_of_deleted=ENOENT"
    ),
    case!(
        fsync_fdatasync_file_and_dir,
        "file_fsync=ok file_fdatasync=ok ro_fsync=ok dir_fsync=ok dir_fdatasync=ok"
    ),
    case!(
        o_direct_aligned_io,
        "direct_ok=true buffered_ok=true direct_sees_buffered=true"
    ),
    case!(
        truncate_dir_eisdir,
        "truncate_dir=EISDIR open_dir_wronly=EISDIR"
    ),
    case!(
        mmap_shared_write_then_read,
        "mapping_sees_pwrite=true file_matches=true"
    ),
];

/// An intended difference: the mismatch for `case` is not reported when the mount's
/// outcome satisfies `mount_ok` (so the allowance stays as narrow as the reason).
#[derive(Clone, Copy, Debug)]
pub struct Allowed {
    pub case: &'static str,
    pub mount_ok: fn(&Outcome) -> bool,
    pub reason: &'static str,
}

fn efbig_at_fsync(o: &Outcome) -> bool {
    matches!(o, Err(e) if e == "fsync: EFBIG" || e == "fsync: EIO")
}

pub const ALLOWED: &[Allowed] = &[
    Allowed {
        case: "pwrite_near_2_63_efbig",
        mount_ok: efbig_at_fsync,
        reason: "FUSE's s_maxbytes is 2^63-1, so with writeback_cache the kernel caches the \
                 write and the daemon's refusal can only surface when it is flushed (fsync)",
    },
    Allowed {
        case: "fsync_fdatasync_file_and_dir",
        mount_ok: syncfs_reports_earlier_efbig,
        reason: "syncfs reports the superblock's writeback errors since the mount (errseq): \
                 with writeback_cache the EFBIG of pwrite_near_2_63_efbig's refused flush \
                 surfaces again here; everything else in the case must match",
    },
];

/// The mount's outcome equals the expected one except `syncfs=EFBIG`.
fn syncfs_reports_earlier_efbig(o: &Outcome) -> bool {
    matches!(o, Ok(s) if s == "file_fsync=ok file_fdatasync=ok ro_fsync=ok dir_fsync=ok dir_fdatasync=ok syncfs=EFBIG close=ok content=\"durable\"")
}

/// Both outcomes of one case.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub name: &'static str,
    pub mount: Outcome,
    pub local: Outcome,
}

/// How long one case may take before the filesystem is considered wedged.
const CASE_LIMIT: Duration = Duration::from_secs(60);

/// Runs `case` in `dir` on its own thread; None if it did not finish within CASE_LIMIT
/// (the thread is left blocked: the caller stops using that filesystem).
fn run_timed(case: &Case, dir: PathBuf) -> Option<Outcome> {
    let (tx, rx) = mpsc::channel();
    let run = case.run;
    std::thread::Builder::new()
        .name(format!("posix-{}", case.name))
        .spawn(move || {
            let r = std::panic::catch_unwind(|| run(&dir)).unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(format!("panic: {msg}"))
            });
            let _ = tx.send(r);
        })
        .expect("spawn case thread");
    rx.recv_timeout(CASE_LIMIT).ok()
}

fn run_in(root: &Path, case: &Case) -> Option<Outcome> {
    let dir = root.join(case.name);
    if let Err(e) = mkdir(&dir, 0o755) {
        return Some(Err(format!("setup mkdir: {e}")));
    }
    run_timed(case, dir)
}

/// Runs every case on both roots (mount first, then local) and returns both outcomes.
pub fn run_cases(mount: &Path, local: &Path) -> Vec<CaseResult> {
    let mut out = Vec::new();
    let mut wedged = false;
    for case in CASES {
        let m = if wedged {
            Err("skipped: an earlier case hung on this filesystem".to_string())
        } else {
            run_in(mount, case).unwrap_or_else(|| {
                wedged = true;
                Err(format!("TIMEOUT after {CASE_LIMIT:?}"))
            })
        };
        let l = run_in(local, case)
            .unwrap_or_else(|| Err(format!("TIMEOUT after {CASE_LIMIT:?} (local)")));
        if std::env::var_os("SPOOL_POSIX_VERBOSE").is_some() {
            eprintln!("{}:\n  mount={m:?}\n  local={l:?}", case.name);
        }
        out.push(CaseResult {
            name: case.name,
            mount: m,
            local: l,
        });
    }
    out
}

/// Mismatches not covered by `ALLOWED`, as "case: mount=... local=..." lines.
pub fn mismatches(results: &[CaseResult]) -> Vec<String> {
    results
        .iter()
        .filter(|r| r.mount != r.local)
        .filter(|r| {
            let allowed = ALLOWED
                .iter()
                .find(|a| a.case == r.name && (a.mount_ok)(&r.mount));
            if let Some(a) = allowed {
                // Visible with --nocapture, so an allowance never hides silently.
                eprintln!(
                    "allowed difference in {}: mount={:?} local={:?} ({})",
                    r.name, r.mount, r.local, a.reason
                );
            }
            allowed.is_none()
        })
        .map(|r| format!("{}:\n  mount={:?}\n  local={:?}", r.name, r.mount, r.local))
        .collect()
}

/// Runs every case in a fresh subdirectory of both roots and returns the mismatches
/// (case name, mount outcome, local outcome), minus the allow-list.
pub fn run_all(mount: &Path, local: &Path) -> Vec<String> {
    mismatches(&run_cases(mount, local))
}

/// Runs every case on `local` and checks each outcome contains its `expect` text: the
/// suite's own check that the probes exercise what they claim on a real kernel fs.
pub fn local_expectations(local: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    for case in CASES {
        let got = run_in(local, case).unwrap_or_else(|| Err("TIMEOUT".into()));
        let shown = match &got {
            Ok(s) => s.clone(),
            Err(e) => e.clone(),
        };
        if !shown.contains(case.expect) {
            bad.push(format!(
                "{}: expected to contain {:?}, got {:?}",
                case.name, case.expect, got
            ));
        }
    }
    bad
}

// ---------------------------------------------------------------------------------------
// Non-differential stress helpers.

/// Creates `dir/many` with `n` files from `threads` threads, then checks: a listing has
/// exactly those names once each; every name looks up; a listing interleaved with unlinks
/// never returns a name twice and returns every name that was never removed; rmdir says
/// ENOTEMPTY until the directory is empty and then succeeds.
pub fn many_entries(dir: &Path, n: usize, threads: usize) -> Result<(), String> {
    let threads = threads.max(1);
    let d = dir.join("many");
    mkdir(&d, 0o755).at("mkdir many")?;
    let name = |i: usize| format!("entry-{i:08}");
    let t0 = Instant::now();
    let run_parallel = |what: &str, op: &(dyn Fn(usize) -> Result<(), String> + Sync)| {
        let failures = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for t in 0..threads {
                let failures = &failures;
                s.spawn(move || {
                    for i in (t..n).step_by(threads) {
                        if let Err(e) = op(i) {
                            let mut f = failures.lock().unwrap();
                            f.push(e);
                            return;
                        }
                    }
                });
            }
        });
        let f = failures.into_inner().unwrap();
        if f.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{what}: {} thread(s) failed, first: {}",
                f.len(),
                f[0]
            ))
        }
    };

    run_parallel("create", &|i| {
        let fd = open(&d.join(name(i)), O_CREAT | O_EXCL | O_WRONLY, 0o644)
            .at(&format!("create {}", name(i)))?;
        close(fd).at("close")
    })?;
    eprintln!("many_entries: created {n} in {:?}", t0.elapsed());

    let t1 = Instant::now();
    let listed: Vec<String> = std::fs::read_dir(&d)
        .map_err(|e| format!("read_dir: {e}"))?
        .map(|e| {
            e.map(|e| e.file_name().to_string_lossy().into_owned())
                .map_err(|e| format!("read_dir entry: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let set: HashSet<&String> = listed.iter().collect();
    if set.len() != listed.len() {
        return Err(format!(
            "listing has duplicates: {} entries, {} distinct",
            listed.len(),
            set.len()
        ));
    }
    if listed.len() != n {
        return Err(format!("listing has {} entries, created {n}", listed.len()));
    }
    if let Some(i) = (0..n).find(|&i| !set.contains(&name(i))) {
        return Err(format!("listing lacks {}", name(i)));
    }
    eprintln!("many_entries: listed in {:?}", t1.elapsed());

    let t2 = Instant::now();
    run_parallel("lookup", &|i| {
        let st = stat(&d.join(name(i))).at(&format!("stat {}", name(i)))?;
        if kind(&st) != "file" {
            return Err(format!("{} is a {}", name(i), kind(&st)));
        }
        Ok(())
    })?;
    eprintln!("many_entries: looked up in {:?}", t2.elapsed());

    // `rm -rf` pattern: readdir while unlinking what was returned (every other entry)
    // and, now and then, an entry not returned yet. A readdir cookie that is an index into
    // the current listing skips or repeats names here.
    let t3 = Instant::now();
    let mut seen = HashSet::new();
    let mut removed = HashSet::new();
    let mut victim = n; // out-of-band unlinks walk down from the end
    let mut returned = 0usize;
    for e in std::fs::read_dir(&d).map_err(|e| format!("read_dir: {e}"))? {
        let e = e.map_err(|e| format!("read_dir entry during unlinks: {e}"))?;
        let nm = e.file_name().to_string_lossy().into_owned();
        let idx: usize = nm
            .strip_prefix("entry-")
            .and_then(|s| s.parse().ok())
            .filter(|&i| i < n)
            .ok_or_else(|| format!("unexpected name {nm:?} in listing"))?;
        if !seen.insert(idx) {
            return Err(format!("{nm} returned twice while unlinking"));
        }
        returned += 1;
        if idx % 2 == 0 && !removed.contains(&idx) {
            unlink(&d.join(&nm)).at(&format!("unlink {nm}"))?;
            removed.insert(idx);
        }
        if returned % 7 == 0 {
            while victim > 0 {
                victim -= 1;
                if !seen.contains(&victim) && !removed.contains(&victim) {
                    unlink(&d.join(name(victim))).at("unlink ahead")?;
                    removed.insert(victim);
                    break;
                }
            }
        }
    }
    if let Some(i) = (0..n).find(|i| !removed.contains(i) && !seen.contains(i)) {
        return Err(format!(
            "{} was never removed but the listing during unlinks skipped it",
            name(i)
        ));
    }
    let mut remaining: Vec<String> = std::fs::read_dir(&d)
        .map_err(|e| format!("read_dir: {e}"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("read_dir entry: {e}"))?;
    remaining.sort();
    let mut want: Vec<String> = (0..n).filter(|i| !removed.contains(i)).map(name).collect();
    want.sort();
    if remaining != want {
        return Err(format!(
            "after unlinks the listing has {} entries, expected {}",
            remaining.len(),
            want.len()
        ));
    }
    eprintln!(
        "many_entries: listing with unlinks in {:?}, {} left",
        t3.elapsed(),
        remaining.len()
    );

    let t4 = Instant::now();
    let step = (remaining.len() / 8).max(1);
    while !remaining.is_empty() {
        match rmdir(&d) {
            Err(Errno(libc::ENOTEMPTY)) | Err(Errno(libc::EEXIST)) => {}
            other => {
                return Err(format!(
                    "rmdir with {} entries left: {}, expected ENOTEMPTY",
                    remaining.len(),
                    show(&other)
                ))
            }
        }
        // Remove a batch, but leave the very last entry for an rmdir check of its own.
        let take = if remaining.len() == 1 {
            1
        } else {
            step.min(remaining.len() - 1)
        };
        for nm in remaining.drain(..take) {
            unlink(&d.join(&nm)).at(&format!("unlink {nm}"))?;
        }
    }
    rmdir(&d).at("rmdir emptied dir")?;
    match stat(&d) {
        Err(Errno(libc::ENOENT)) => {}
        other => return Err(format!("stat after rmdir: {}", show(&other))),
    }
    eprintln!("many_entries: drained in {:?}", t4.elapsed());
    Ok(())
}

/// statvfs on `mount` is plausible: nonzero block size and blocks, free within total,
/// the 255-byte name limit.
pub fn statfs_sane(mount: &Path) -> Result<(), String> {
    let v = statvfs(mount).at("statvfs")?;
    let mut bad = Vec::new();
    if v.f_bsize == 0 {
        bad.push("f_bsize is 0".to_string());
    }
    if v.f_blocks == 0 {
        bad.push("f_blocks is 0".to_string());
    }
    if v.f_bfree > v.f_blocks {
        bad.push(format!("f_bfree {} > f_blocks {}", v.f_bfree, v.f_blocks));
    }
    if v.f_bavail > v.f_bfree {
        bad.push(format!("f_bavail {} > f_bfree {}", v.f_bavail, v.f_bfree));
    }
    if v.f_ffree > v.f_files {
        bad.push(format!("f_ffree {} > f_files {}", v.f_ffree, v.f_files));
    }
    if v.f_namemax != 255 {
        bad.push(format!("f_namemax is {}, expected 255", v.f_namemax));
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} (bsize {} frsize {} blocks {} bfree {} bavail {} files {} ffree {})",
            bad.join("; "),
            v.f_bsize,
            v.f_frsize,
            v.f_blocks,
            v.f_bfree,
            v.f_bavail,
            v.f_files,
            v.f_ffree
        ))
    }
}

/// `meta` file format: "META", u32 payload length, payload, u64 hash of payload.
fn encode_meta(rng: &mut Rng) -> Vec<u8> {
    let len = rng.below(20_000) as usize;
    let mut payload = vec![0u8; len];
    rng.fill(&mut payload);
    let mut v = Vec::with_capacity(len + 16);
    v.extend_from_slice(b"META");
    v.extend_from_slice(&(len as u32).to_le_bytes());
    v.extend_from_slice(&payload);
    v.extend_from_slice(&hash64(&payload).to_le_bytes());
    v
}

fn check_meta(v: &[u8]) -> Result<(), String> {
    if v.len() < 16 || &v[..4] != b"META" {
        // Say what was there instead: zeros mean data not yet visible through this inode.
        let head: String = v.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let zeros = v.iter().filter(|&&b| b == 0).count();
        return Err(format!(
            "bad header ({} bytes, starts {head}, {zeros} zero bytes)",
            v.len()
        ));
    }
    let len = u32::from_le_bytes(v[4..8].try_into().expect("4 bytes")) as usize;
    if v.len() != len + 16 {
        return Err(format!(
            "torn: header says {len} payload bytes, file has {}",
            v.len()
        ));
    }
    let want = u64::from_le_bytes(v[8 + len..].try_into().expect("8 bytes"));
    if hash64(&v[8..8 + len]) != want {
        return Err(format!("checksum mismatch in {len}-byte payload"));
    }
    Ok(())
}

/// The write-temp-then-rename pattern under concurrent readers: a writer keeps replacing
/// `dir/meta` by renaming a freshly written `meta.tmp` over it; readers keep opening and
/// reading `meta`. A reader must never get ENOENT (rename replaces atomically) nor
/// content that is torn or mixed between versions.
pub fn rename_readers_never_see_enoent(dir: &Path, seconds: u64) -> Result<(), String> {
    const READERS: usize = 3;
    let meta = dir.join("meta");
    let tmp = dir.join("meta.tmp");
    let mut rng = Rng(fresh_seed());
    std::fs::write(&meta, encode_meta(&mut rng)).map_err(|e| format!("initial meta: {e}"))?;
    let stop = AtomicBool::new(false);
    let failures = Mutex::new(Vec::<String>::new());
    let reads = AtomicU64::new(0);
    let mut writes = 0u64;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    std::thread::scope(|s| {
        for r in 0..READERS {
            let (stop, failures, reads, meta) = (&stop, &failures, &reads, &meta);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let got = open(meta, O_RDONLY, 0).and_then(|fd| read_all_fd(&fd));
                    let err = match got {
                        Ok(v) => check_meta(&v).err(),
                        Err(e) => Some(format!("open/read meta: {e}")),
                    };
                    reads.fetch_add(1, Ordering::Relaxed);
                    if let Some(e) = err {
                        let mut f = failures.lock().unwrap();
                        if f.len() < 10 {
                            f.push(format!("reader {r}: {e}"));
                        }
                    }
                }
            });
        }
        while Instant::now() < deadline && failures.lock().unwrap().is_empty() {
            let step =
                put(&tmp, &encode_meta(&mut rng)).and_then(|()| rename(&tmp, &meta).at("rename"));
            if let Err(e) = step {
                failures.lock().unwrap().push(format!("writer: {e}"));
                break;
            }
            writes += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });
    let failures = failures.into_inner().unwrap();
    let reads = reads.into_inner();
    eprintln!("rename_readers: {writes} renames, {reads} reads");
    if !failures.is_empty() {
        return Err(format!(
            "after {writes} renames and {reads} reads: {}",
            failures.join("; ")
        ));
    }
    if writes < 10 || reads < 10 {
        return Err(format!(
            "too little traffic to mean anything: {writes} renames, {reads} reads"
        ));
    }
    Ok(())
}
