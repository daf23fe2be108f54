//! Detaching a mount (a FUSE mount whose daemon died leaves one behind, answering
//! ENOTCONN to everything).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::Error;

/// `umount2(path, MNT_DETACH)`: the mount disappears from the namespace at once; open
/// files on it keep working (or failing) until closed.
pub fn detach(path: &Path) -> Result<(), Error> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Unsupported(format!("{}: path contains NUL", path.display())))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; umount2 only
    // reads it.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        return Err(Error::last_os("umount2"));
    }
    Ok(())
}

/// `syncfs(2)` on the filesystem holding `f`: every dirty page of it is written back.
pub fn syncfs(f: &std::fs::File) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is open for the duration of the call (borrowed from `f`).
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc != 0 {
        return Err(Error::last_os("syncfs"));
    }
    Ok(())
}

/// `statfs(2)` on `path`, for its error only: unlike `stat`, the kernel never answers it
/// from a cache, so a FUSE mount whose daemon died fails it at once with ENOTCONN.
pub fn statfs_probe(path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is NUL-terminated and `st` is a writable statfs-sized buffer; both
    // outlive the call, and we never read `st`.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
