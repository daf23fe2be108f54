//! Block-device facts the kernel only tells through ioctls, and the open flag the
//! dataplane needs but cannot name without libc.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::Error;

/// `O_DIRECT`, for `OpenOptionsExt::custom_flags`.
pub const O_DIRECT: i32 = libc::O_DIRECT;

/// `_IOR(0x12, 114, size_t)`: not in the libc crate. This is the encoding of the
/// generic ioctl layout (x86_64, aarch64, riscv64).
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// The size in bytes of the block device `file` is open on (fails with ENOTTY on a
/// regular file).
pub fn block_device_size(file: &File) -> Result<u64, Error> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live
    // local; the fd is open for as long as `file` is borrowed.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(Error::last_os("ioctl(BLKGETSIZE64)"));
    }
    Ok(size)
}

/// The smallest unit the block device can address (512 or 4096 in practice).
pub fn logical_block_size(file: &File) -> Result<u32, Error> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live local;
    // the fd is open for as long as `file` is borrowed.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut size as *mut libc::c_int,
        )
    };
    if rc != 0 {
        return Err(Error::last_os("ioctl(BLKSSZGET)"));
    }
    u32::try_from(size).map_err(|_| Error::Unsupported(format!("logical block size {size}")))
}

/// Splits a device number (`MetadataExt::rdev`) into major and minor, as in
/// `/sys/dev/block/MAJ:MIN`.
pub fn dev_major_minor(rdev: u64) -> (u32, u32) {
    (libc::major(rdev), libc::minor(rdev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_file_is_not_a_block_device() {
        let f = File::open("/proc/self/exe").unwrap();
        assert!(matches!(block_device_size(&f), Err(Error::Os { .. })));
        assert!(matches!(logical_block_size(&f), Err(Error::Os { .. })));
    }

    #[test]
    fn major_minor_of_dev_null() {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata("/dev/null").unwrap().rdev();
        assert_eq!(dev_major_minor(rdev), (1, 3));
    }
}
