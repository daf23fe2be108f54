//! Thin safe wrappers over plain POSIX / Linux file calls, for tests and tools that need
//! the exact errno of one syscall (std hides some calls, retries others, or sets flags of
//! its own). Each returns `std::io::Result`, with errno in `io::Error::raw_os_error`.
//!
//! Paths and names are `&CStr`, so a caller decides how to handle an interior NUL. No
//! flag is added to what the caller passes (O_CLOEXEC included).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// `Ok(r)` for a non-negative return value, else errno.
fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_unit(r: libc::c_int) -> io::Result<()> {
    cvt(r).map(|_| ())
}

fn cvt_size(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn cvt_long(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn dirfd(dir: Option<BorrowedFd<'_>>) -> libc::c_int {
    dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd())
}

/// Takes ownership of a descriptor a successful open-like call just returned.
fn owned(fd: libc::c_int) -> OwnedFd {
    // SAFETY: callers pass only a descriptor the kernel has just returned to them (checked
    // non-negative by `cvt`); nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// open(2).
pub fn open(path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: `path` is NUL-terminated and alive for the call; the mode vararg is passed
    // as an unsigned int, as open(2) reads it.
    let fd = cvt(unsafe { libc::open(path.as_ptr(), flags, mode as libc::c_uint) })?;
    Ok(owned(fd))
}

/// openat(2) relative to the open directory `dir`.
pub fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: `dir` is an open descriptor and `name` NUL-terminated, both alive for the
    // call; the mode vararg is passed as an unsigned int.
    let fd =
        cvt(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) })?;
    Ok(owned(fd))
}

/// close(2) with its result (dropping an `OwnedFd` ignores it, and close may report a
/// deferred write error).
pub fn close(fd: OwnedFd) -> io::Result<()> {
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` came from an OwnedFd given up just now, so it is open and this is its
    // only close.
    cvt_unit(unsafe { libc::close(raw) })
}

/// read(2) at the file position.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call.
    cvt_size(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// write(2) at the file position.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the call.
    cvt_size(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
}

/// pread(2).
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], off: i64) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call.
    cvt_size(unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off) })
}

/// pwrite(2).
pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], off: i64) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the call.
    cvt_size(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off) })
}

/// lseek(2); returns the new position.
pub fn lseek(fd: BorrowedFd<'_>, off: i64, whence: libc::c_int) -> io::Result<i64> {
    // SAFETY: integer arguments only, on a descriptor open for the call.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An all-zero `struct stat`, filled by the kernel below.
fn zeroed_stat() -> libc::stat {
    // SAFETY: `struct stat` is plain old data (integers only); all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// fstat(2).
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = zeroed_stat();
    // SAFETY: `st` is a valid, writable `struct stat` for the call.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// stat(2) (follows symlinks).
pub fn stat(path: &CStr) -> io::Result<libc::stat> {
    let mut st = zeroed_stat();
    // SAFETY: `path` is NUL-terminated and `st` writable, both alive for the call.
    cvt(unsafe { libc::stat(path.as_ptr(), &mut st) })?;
    Ok(st)
}

/// lstat(2) (does not follow a final symlink).
pub fn lstat(path: &CStr) -> io::Result<libc::stat> {
    let mut st = zeroed_stat();
    // SAFETY: `path` is NUL-terminated and `st` writable, both alive for the call.
    cvt(unsafe { libc::lstat(path.as_ptr(), &mut st) })?;
    Ok(st)
}

/// statvfs(3).
pub fn statvfs(path: &CStr) -> io::Result<libc::statvfs> {
    // SAFETY: `struct statvfs` is plain old data (integers only); all-zero is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` writable, both alive for the call.
    cvt(unsafe { libc::statvfs(path.as_ptr(), &mut st) })?;
    Ok(st)
}

/// ftruncate(2).
pub fn ftruncate(fd: BorrowedFd<'_>, len: i64) -> io::Result<()> {
    // SAFETY: integer arguments only, on a descriptor open for the call.
    cvt_unit(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })
}

/// truncate(2).
pub fn truncate(path: &CStr, len: i64) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated and alive for the call.
    cvt_unit(unsafe { libc::truncate(path.as_ptr(), len) })
}

/// fsync(2).
pub fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: integer argument only, a descriptor open for the call.
    cvt_unit(unsafe { libc::fsync(fd.as_raw_fd()) })
}

/// fdatasync(2).
pub fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: integer argument only, a descriptor open for the call.
    cvt_unit(unsafe { libc::fdatasync(fd.as_raw_fd()) })
}

/// syncfs(2) on the filesystem holding `fd`.
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: integer argument only, a descriptor open for the call.
    cvt_unit(unsafe { libc::syncfs(fd.as_raw_fd()) })
}

/// fallocate(2) with the raw `mode` bits (FALLOC_FL_*).
pub fn fallocate(fd: BorrowedFd<'_>, mode: libc::c_int, off: i64, len: i64) -> io::Result<()> {
    // SAFETY: integer arguments only, on a descriptor open for the call.
    cvt_unit(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, len) })
}

/// mkdir(2).
pub fn mkdir(path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated and alive for the call.
    cvt_unit(unsafe { libc::mkdir(path.as_ptr(), mode) })
}

/// rmdir(2).
pub fn rmdir(path: &CStr) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated and alive for the call.
    cvt_unit(unsafe { libc::rmdir(path.as_ptr()) })
}

/// unlink(2).
pub fn unlink(path: &CStr) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated and alive for the call.
    cvt_unit(unsafe { libc::unlink(path.as_ptr()) })
}

/// rename(2).
pub fn rename(old: &CStr, new: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated and alive for the call.
    cvt_unit(unsafe { libc::rename(old.as_ptr(), new.as_ptr()) })
}

/// renameat2(2) through the raw syscall, so it works whatever libc wraps. A `None`
/// directory means the current working directory (AT_FDCWD).
pub fn renameat2(
    olddir: Option<BorrowedFd<'_>>,
    old: &CStr,
    newdir: Option<BorrowedFd<'_>>,
    new: &CStr,
    flags: libc::c_uint,
) -> io::Result<()> {
    // SAFETY: the syscall takes (int, const char *, int, const char *, unsigned int); both
    // descriptors are open (or AT_FDCWD) and both strings NUL-terminated, all alive for
    // the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            dirfd(olddir),
            old.as_ptr(),
            dirfd(newdir),
            new.as_ptr(),
            flags,
        )
    };
    cvt_long(r).map(|_| ())
}

/// link(2).
pub fn link(old: &CStr, new: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated and alive for the call.
    cvt_unit(unsafe { libc::link(old.as_ptr(), new.as_ptr()) })
}

/// symlink(2): creates `linkpath` pointing at `target`.
pub fn symlink(target: &CStr, linkpath: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated and alive for the call.
    cvt_unit(unsafe { libc::symlink(target.as_ptr(), linkpath.as_ptr()) })
}

/// readlink(2) into `buf`; returns the bytes placed (the kernel truncates silently and
/// adds no NUL).
pub fn readlink(path: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `path` is NUL-terminated; `buf` is writable for `buf.len()` bytes.
    cvt_size(unsafe { libc::readlink(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// chmod(2).
pub fn chmod(path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated and alive for the call.
    cvt_unit(unsafe { libc::chmod(path.as_ptr(), mode) })
}

/// fchmod(2).
pub fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: integer arguments only, on a descriptor open for the call.
    cvt_unit(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })
}

/// chown(2).
pub fn chown(path: &CStr, uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated and alive for the call.
    cvt_unit(unsafe { libc::chown(path.as_ptr(), uid, gid) })
}

/// utimensat(2): `times` is [atime, mtime]; a nsec of UTIME_OMIT / UTIME_NOW means what
/// the man page says. A `None` directory means the current working directory.
pub fn utimensat(
    dir: Option<BorrowedFd<'_>>,
    path: &CStr,
    times: &[libc::timespec; 2],
    flags: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated and `times` points to two timespecs, as the call
    // requires; both are alive for the call.
    cvt_unit(unsafe { libc::utimensat(dirfd(dir), path.as_ptr(), times.as_ptr(), flags) })
}

/// The value pointer for a size-query-capable xattr call: NULL for an empty buffer.
fn xattr_buf(buf: &mut [u8]) -> *mut libc::c_void {
    if buf.is_empty() {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    }
}

/// getxattr(2) into `buf`; returns the value's length. An empty `buf` asks only for the
/// length.
pub fn getxattr(path: &CStr, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    let len = buf.len();
    let ptr = xattr_buf(buf);
    // SAFETY: path and name are NUL-terminated; `ptr` is NULL with size 0 (the
    // documented length query) or `buf`, writable for `len` bytes.
    cvt_size(unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), ptr, len) })
}

/// listxattr(2) into `buf` (NUL-separated names); returns the list's length. An empty
/// `buf` asks only for the length.
pub fn listxattr(path: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    let len = buf.len();
    let ptr = xattr_buf(buf);
    // SAFETY: `path` is NUL-terminated; `ptr` is NULL with size 0 (the documented length
    // query) or `buf`, writable for `len` bytes.
    cvt_size(unsafe { libc::listxattr(path.as_ptr(), ptr.cast(), len) })
}

/// setxattr(2) (follows symlinks); `flags` is 0, XATTR_CREATE or XATTR_REPLACE.
pub fn setxattr(path: &CStr, name: &CStr, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    // SAFETY: path and name are NUL-terminated; `value` is readable for its length.
    cvt_unit(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// lsetxattr(2) (on a symlink itself).
pub fn lsetxattr(path: &CStr, name: &CStr, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    // SAFETY: path and name are NUL-terminated; `value` is readable for its length.
    cvt_unit(unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// removexattr(2).
pub fn removexattr(path: &CStr, name: &CStr) -> io::Result<()> {
    // SAFETY: path and name are NUL-terminated and alive for the call.
    cvt_unit(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) })
}

/// getdents64(2) through the raw syscall: fills `buf` with `struct linux_dirent64`
/// records and returns the bytes used (0 at the end of the directory).
pub fn getdents64(dir: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the syscall takes (unsigned int, void *, size_t); `buf` is writable for
    // `buf.len()` bytes and the descriptor open, both for the call.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            dir.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    cvt_long(n).map(|n| n as usize)
}

/// The page size, sysconf(_SC_PAGESIZE).
pub fn page_size() -> io::Result<usize> {
    // SAFETY: sysconf takes an integer and reads a constant; no memory is involved.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        Ok(p as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// kill(2): sends `sig` to `pid` (negative: a process group).
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: integer arguments only; no memory is involved.
    cvt_unit(unsafe { libc::kill(pid, sig) })
}

/// A MAP_SHARED mapping of part of a file, unmapped on drop.
///
/// For tests and tools only: the slices reflect a file that other processes (or other
/// descriptors in this one, or the filesystem itself) may change or truncate at any time.
/// Bytes may change under a live slice, and a page that is wholly past EOF when touched
/// raises SIGBUS. Use it where the caller controls the file.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut libc::c_void,
    /// The length asked for.
    len: usize,
    /// `len` rounded up to whole pages: the kernel maps pages, so all of these bytes are
    /// addressable.
    mapped: usize,
    writable: bool,
}

impl Mapping {
    /// Maps `len` bytes of `fd` from `offset` (a multiple of the page size), MAP_SHARED,
    /// readable, and writable if `writable` (the descriptor must then be open for
    /// writing).
    pub fn new(fd: &impl AsFd, offset: u64, len: usize, writable: bool) -> io::Result<Mapping> {
        let page = page_size()?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a fresh mapping at an address the kernel picks (NULL hint, no
        // MAP_FIXED) cannot alias any Rust object; the descriptor is open for the call and
        // the mapping keeps its own reference to the file. The result is checked against
        // MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr,
            len,
            mapped: len.div_ceil(page) * page,
            writable,
        })
    }

    /// The length asked for in `new`.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an empty mapping cannot be made.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped bytes: `len` rounded up to whole pages, since the kernel maps pages
    /// (bytes of the page holding EOF that lie past EOF read as zeros). See the type's
    /// note on concurrent change.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `mapped` readable bytes (whole pages) until
        // drop, which the borrow of `self` outlasts. Changes by others to the underlying
        // file are the documented caveat of this type.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.mapped) }
    }

    /// The mapped bytes, writable; panics if the mapping was made read-only.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.writable, "as_mut_slice on a read-only mapping");
        // SAFETY: as in `as_slice`, the mapping is PROT_WRITE (asserted), and `&mut self`
        // makes this the only slice of it in this program.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u8>(), self.mapped) }
    }

    /// msync(MS_SYNC) of the whole mapping: written pages reach the file now.
    pub fn msync(&self) -> io::Result<()> {
        // SAFETY: `ptr`/`len` are exactly the live mapping made in `new`.
        cvt_unit(unsafe { libc::msync(self.ptr, self.len, libc::MS_SYNC) })
    }

    /// munmap(2) with its result (dropping the mapping ignores it).
    pub fn unmap(self) -> io::Result<()> {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `ptr`/`len` are exactly the live mapping made in `new`; `me` is consumed
        // and never dropped, so it is unmapped once and no slice of it can remain.
        cvt_unit(unsafe { libc::munmap(me.ptr, me.len) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the live mapping made in `new`, unmapped once;
        // no slice of it outlives `&self`.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// One piece of the note the SIGBUS reporter prints.
#[derive(Debug)]
pub enum NotePart {
    Text(&'static str),
    /// A counter's value at the time of the signal, in decimal.
    Dec(&'static AtomicU64),
    /// A counter's value at the time of the signal, in hex (no prefix).
    Hex(&'static AtomicU64),
}

static SIGBUS_NOTE: OnceLock<&'static [NotePart]> = OnceLock::new();

/// Installs a SIGBUS handler that writes `note` to stderr (at most 256 bytes) and then
/// dies of the same signal, e.g. to say which step of a test touched an mmap page the
/// filesystem failed. Only the first note installed is used; later calls do nothing.
/// It replaces any SIGBUS handler already installed.
pub fn install_sigbus_reporter(note: &'static [NotePart]) -> io::Result<()> {
    if SIGBUS_NOTE.set(note).is_err() {
        return Ok(());
    }
    // SAFETY: `struct sigaction` is plain old data; all-zero is "no flags, empty mask".
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: `sa.sa_mask` is a valid, writable sigset_t.
    cvt_unit(unsafe { libc::sigemptyset(&mut sa.sa_mask) })?;
    // SAFETY: `sa` is a valid sigaction whose handler (no SA_SIGINFO, so the one-argument
    // form) only reads 'static data and atomics, fills a stack buffer and makes
    // async-signal-safe calls (write, signal, raise).
    cvt_unit(unsafe { libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) })
}

extern "C" fn on_sigbus(sig: libc::c_int) {
    let mut buf = [0u8; 256];
    let mut n = 0;
    let mut put = |b: &[u8]| {
        let k = b.len().min(buf.len() - n);
        buf[n..n + k].copy_from_slice(&b[..k]);
        n += k;
    };
    // OnceLock::get is a plain atomic load: no lock, nothing to deadlock on.
    for part in SIGBUS_NOTE.get().copied().unwrap_or(&[]) {
        match part {
            NotePart::Text(s) => put(s.as_bytes()),
            NotePart::Dec(v) => put(&digits(v.load(Ordering::Relaxed), 10)),
            NotePart::Hex(v) => put(&digits(v.load(Ordering::Relaxed), 16)),
        }
    }
    // SAFETY: write, signal and raise are async-signal-safe; `buf` outlives the write.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// `v` in base `radix` (10 or 16) without allocating, usable in a signal handler.
fn digits(mut v: u64, radix: u64) -> Digits {
    let mut d = Digits {
        b: [0; 20],
        start: 20,
    };
    loop {
        d.start -= 1;
        d.b[d.start] = b"0123456789abcdef"[(v % radix) as usize];
        v /= radix;
        if v == 0 {
            return d;
        }
    }
}

/// The digits of a u64 (at most 20), right-aligned in a fixed buffer.
struct Digits {
    b: [u8; 20],
    start: usize,
}

impl std::ops::Deref for Digits {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.b[self.start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn c(p: &std::path::Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }

    #[test]
    fn digits_render() {
        assert_eq!(&*digits(0, 10), b"0");
        assert_eq!(&*digits(u64::MAX, 10), b"18446744073709551615");
        assert_eq!(&*digits(0xdead_beef, 16), b"deadbeef");
    }

    #[test]
    fn file_calls_and_errno() {
        let dir = std::env::temp_dir().join(format!("spool-ffi-posix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        mkdir(&c(&dir), 0o755).unwrap();
        let f = dir.join("f");
        let fd = open(
            &c(&f),
            libc::O_CREAT | libc::O_RDWR | libc::O_CLOEXEC,
            0o644,
        )
        .unwrap();
        assert_eq!(pwrite(fd.as_fd(), b"hello", 0).unwrap(), 5);
        let mut buf = [0u8; 8];
        assert_eq!(pread(fd.as_fd(), &mut buf, 0).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        assert_eq!(fstat(fd.as_fd()).unwrap().st_size, 5);
        let e = mkdir(&c(&dir), 0o755).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        let e = stat(&c(&dir.join("missing"))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let g = dir.join("g");
        renameat2(None, &c(&f), None, &c(&g), 0).unwrap();
        symlink(c"g", &c(&f)).unwrap();
        let mut lb = [0u8; 16];
        let n = readlink(&c(&f), &mut lb).unwrap();
        assert_eq!(&lb[..n], b"g");

        let mut m = Mapping::new(&fd, 0, 5, true).unwrap();
        assert_eq!(&m.as_slice()[..5], b"hello");
        m.as_mut_slice()[..5].copy_from_slice(b"HELLO");
        m.msync().unwrap();
        m.unmap().unwrap();
        assert_eq!(pread(fd.as_fd(), &mut buf, 0).unwrap(), 5);
        assert_eq!(&buf[..5], b"HELLO");
        close(fd).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
