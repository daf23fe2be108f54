//! VFIO: a PCI function handed to userspace. A container with the type-1 IOMMU, the
//! function's IOMMU group attached to it, the device's BAR0 mapped for register access
//! (`Mmio`), its PCI config space, and DMA mappings of our own memory at chosen IOVAs.
//!
//! Rules encoded here:
//! - Register access is bounds- and alignment-checked and volatile (`Mmio`), so it is
//!   safe to call; what a register write makes the device do is bounded by the IOMMU,
//!   which only lets the device reach memory mapped with `map_dma`.
//! - DMA is mapped only for a whole `DmaPool`, whose `Arc` the device keeps: the memory
//!   the device may write to outlives every mapping of it.
//! - Dropping a `VfioDevice` unmaps BAR0 and closes the device, group and container fds,
//!   which removes every DMA mapping and lets vfio-pci reset the function; only then are
//!   the pools released.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use spool_hugepages::DmaPool;

use crate::Error;

// ioctl numbers: _IO(';', 100 + n) from <linux/vfio.h>; not in the libc crate.
const VFIO_TYPE: libc::Ioctl = b';' as libc::Ioctl;
const fn vfio_io(nr: libc::Ioctl) -> libc::Ioctl {
    (VFIO_TYPE << 8) | (100 + nr)
}
const VFIO_GET_API_VERSION: libc::Ioctl = vfio_io(0);
const VFIO_CHECK_EXTENSION: libc::Ioctl = vfio_io(1);
const VFIO_SET_IOMMU: libc::Ioctl = vfio_io(2);
const VFIO_GROUP_GET_STATUS: libc::Ioctl = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: libc::Ioctl = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: libc::Ioctl = vfio_io(6);
const VFIO_DEVICE_GET_REGION_INFO: libc::Ioctl = vfio_io(8);
const VFIO_IOMMU_MAP_DMA: libc::Ioctl = vfio_io(13);

const VFIO_API_VERSION: libc::c_int = 0;
const VFIO_TYPE1_IOMMU: libc::c_ulong = 1;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
const VFIO_DMA_MAP_FLAG_READ: u32 = 1;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 2;
const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

/// PCI config space: the command register and its memory-space and bus-master bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

#[repr(C)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

const _: () = assert!(std::mem::size_of::<GroupStatus>() == 8);
const _: () = assert!(std::mem::size_of::<RegionInfo>() == 32);
const _: () = assert!(std::mem::size_of::<DmaMap>() == 32);

/// An ioctl whose argument is a pointer to `arg`, failing with the call's name.
fn ioctl_ptr<T>(
    fd: &OwnedFd,
    req: libc::Ioctl,
    arg: &mut T,
    what: &'static str,
) -> Result<libc::c_int, Error> {
    // SAFETY: every caller passes a request whose argument is a `T` of the matching
    // #[repr(C)] layout (sizes asserted above) with argsz set; `arg` is a live exclusive
    // reference for the duration of the call and `fd` is open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if rc < 0 {
        return Err(Error::last_os(what));
    }
    Ok(rc)
}

/// An ioctl whose argument is an integer.
fn ioctl_int(
    fd: &OwnedFd,
    req: libc::Ioctl,
    arg: libc::c_ulong,
    what: &'static str,
) -> Result<libc::c_int, Error> {
    // SAFETY: the requests used with this take a plain integer argument and touch no
    // user memory; `fd` is open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if rc < 0 {
        return Err(Error::last_os(what));
    }
    Ok(rc)
}

fn open_rw(path: &Path) -> Result<OwnedFd, Error> {
    let f: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::Unsupported(format!("cannot open {}: {e}", path.display())))?;
    Ok(OwnedFd::from(f))
}

/// The IOMMU group number of the PCI function `bdf` (e.g. "0000:00:04.0").
pub fn iommu_group(bdf: &str) -> Result<u32, Error> {
    let link = Path::new("/sys/bus/pci/devices")
        .join(bdf)
        .join("iommu_group");
    let target = std::fs::read_link(&link).map_err(|e| {
        Error::Unsupported(format!(
            "{bdf}: no IOMMU group ({}: {e}): no such PCI function, or no IOMMU (boot with \
             intel_iommu=on or amd_iommu=on)",
            link.display()
        ))
    })?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: unexpected target {}",
                link.display(),
                target.display()
            ))
        })
}

/// Memory-mapped device registers (a BAR), read and written with volatile accesses.
#[derive(Debug)]
pub struct Mmio {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned for the life of `Mmio`; accesses are volatile register
// reads and writes, which the device serializes; no Rust reference into it exists.
unsafe impl Send for Mmio {}
// SAFETY: as for Send: concurrent volatile accesses to distinct registers (e.g. two
// cores' doorbells) are what the hardware is built for.
unsafe impl Sync for Mmio {}

impl Mmio {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at(&self, offset: usize, size: usize) -> *mut u8 {
        assert!(
            offset % size == 0 && offset.checked_add(size).is_some_and(|e| e <= self.len),
            "register access at {offset:#x} (size {size}) outside the {}-byte BAR or unaligned",
            self.len
        );
        // SAFETY: offset + size <= len, checked above, so the pointer stays inside the
        // mapping.
        unsafe { self.base.as_ptr().add(offset) }
    }

    pub fn read32(&self, offset: usize) -> u32 {
        // SAFETY: `at` checked bounds and alignment; the mapping is live and readable.
        unsafe { std::ptr::read_volatile(self.at(offset, 4).cast::<u32>()) }
    }
    pub fn write32(&self, offset: usize, value: u32) {
        // SAFETY: `at` checked bounds and alignment; the mapping is live and writable.
        unsafe { std::ptr::write_volatile(self.at(offset, 4).cast::<u32>(), value) }
    }
    /// A 64-bit register read as two 32-bit halves, low first (NVMe allows either; some
    /// hosts split 64-bit MMIO anyway).
    pub fn read64(&self, offset: usize) -> u64 {
        let lo = u64::from(self.read32(offset));
        let hi = u64::from(self.read32(offset + 4));
        lo | (hi << 32)
    }
    pub fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

impl Drop for Mmio {
    fn drop(&mut self) {
        // SAFETY: base/len are what mmap returned; nothing borrows the mapping.
        let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        debug_assert_eq!(rc, 0, "munmap of our own BAR mapping");
    }
}

/// A PCI function opened through VFIO, with BAR0 mapped and bus mastering enabled.
#[derive(Debug)]
pub struct VfioDevice {
    bdf: String,
    bar0: Mmio,
    config: File,
    config_offset: u64,
    // Field order is drop order: the device fd closes before the group and container.
    _device: OwnedFd,
    _group: OwnedFd,
    container: OwnedFd,
    /// Pools mapped for DMA: dropped after the container, so after their mappings.
    pools: Mutex<Vec<Arc<DmaPool>>>,
}

impl VfioDevice {
    /// Opens `bdf` (bound to vfio-pci), attaches its group to a new type-1 container,
    /// maps BAR0 and enables memory space and bus mastering.
    pub fn open(bdf: &str) -> Result<VfioDevice, Error> {
        let group_no = iommu_group(bdf)?;
        let driver =
            std::fs::read_link(Path::new("/sys/bus/pci/devices").join(bdf).join("driver")).ok();
        let driver = driver
            .as_deref()
            .and_then(|d| d.file_name())
            .and_then(|d| d.to_str())
            .unwrap_or("none");
        if driver != "vfio-pci" {
            return Err(Error::Unsupported(format!(
                "{bdf} is bound to driver '{driver}', not vfio-pci: run `spool nvme bind {bdf}` first"
            )));
        }
        let container = open_rw(Path::new("/dev/vfio/vfio"))?;
        let version = ioctl_int(&container, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")?;
        if version != VFIO_API_VERSION {
            return Err(Error::Unsupported(format!(
                "VFIO API version {version}, expected {VFIO_API_VERSION}"
            )));
        }
        if ioctl_int(
            &container,
            VFIO_CHECK_EXTENSION,
            VFIO_TYPE1_IOMMU,
            "VFIO_CHECK_EXTENSION",
        )? == 0
        {
            return Err(Error::Unsupported(
                "VFIO has no type-1 IOMMU: load vfio_iommu_type1".into(),
            ));
        }
        let group = open_rw(&Path::new("/dev/vfio").join(group_no.to_string()))?;
        let mut status = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        ioctl_ptr(
            &group,
            VFIO_GROUP_GET_STATUS,
            &mut status,
            "VFIO_GROUP_GET_STATUS",
        )?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(Error::Unsupported(format!(
                "IOMMU group {group_no} of {bdf} is not viable: every device in \
                 /sys/kernel/iommu_groups/{group_no}/devices must be bound to vfio-pci"
            )));
        }
        let mut container_fd = container.as_raw_fd();
        ioctl_ptr(
            &group,
            VFIO_GROUP_SET_CONTAINER,
            &mut container_fd,
            "VFIO_GROUP_SET_CONTAINER",
        )?;
        ioctl_int(
            &container,
            VFIO_SET_IOMMU,
            VFIO_TYPE1_IOMMU,
            "VFIO_SET_IOMMU (needs interrupt remapping, or allow_unsafe_interrupts)",
        )?;
        let name = std::ffi::CString::new(bdf)
            .map_err(|_| Error::Unsupported(format!("bad PCI address {bdf:?}")))?;
        // SAFETY: GET_DEVICE_FD reads a NUL-terminated string through the pointer, which
        // `name` keeps alive for the call; the group fd is open.
        let fd = unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_DEVICE_FD, name.as_ptr()) };
        if fd < 0 {
            return Err(Error::last_os("VFIO_GROUP_GET_DEVICE_FD"));
        }
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        let device = unsafe { OwnedFd::from_raw_fd(fd) };

        let bar = region_info(&device, VFIO_PCI_BAR0_REGION_INDEX)?;
        if bar.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || bar.size == 0 {
            return Err(Error::Unsupported(format!(
                "{bdf}: BAR0 cannot be memory-mapped (flags {:#x}, size {})",
                bar.flags, bar.size
            )));
        }
        let len =
            usize::try_from(bar.size).map_err(|_| Error::Unsupported("BAR0 too large".into()))?;
        // SAFETY: a shared mapping of the device fd at the region's offset, of the size
        // the kernel reported; the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                bar.offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os("mmap BAR0"));
        }
        let bar0 = Mmio {
            base: NonNull::new(p.cast()).expect("mmap never returns null on success"),
            len,
        };

        let cfg = region_info(&device, VFIO_PCI_CONFIG_REGION_INDEX)?;
        // A second handle on the device fd for pread/pwrite of config space.
        let config = File::from(device.try_clone().map_err(|source| Error::Os {
            what: "dup VFIO device fd",
            source,
        })?);
        let dev = VfioDevice {
            bdf: bdf.to_owned(),
            bar0,
            config,
            config_offset: cfg.offset,
            _device: device,
            _group: group,
            container,
            pools: Mutex::new(Vec::new()),
        };
        let cmd = dev.config_read16(PCI_COMMAND)?;
        dev.config_write16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)?;
        Ok(dev)
    }

    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    pub fn bar0(&self) -> &Mmio {
        &self.bar0
    }

    fn config_read16(&self, reg: u64) -> Result<u16, Error> {
        let mut b = [0u8; 2];
        self.config
            .read_exact_at(&mut b, self.config_offset + reg)
            .map_err(|source| Error::Os {
                what: "read PCI config space",
                source,
            })?;
        Ok(u16::from_le_bytes(b))
    }

    fn config_write16(&self, reg: u64, value: u16) -> Result<(), Error> {
        self.config
            .write_all_at(&value.to_le_bytes(), self.config_offset + reg)
            .map_err(|source| Error::Os {
                what: "write PCI config space",
                source,
            })
    }

    /// Lets the device read and write all of `pool` through bus addresses from `iova`
    /// (page-aligned) on. The device keeps the pool alive until it is dropped.
    pub fn map_pool(&self, pool: &Arc<DmaPool>, iova: u64) -> Result<(), Error> {
        let r = pool.region();
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the pool's region stays mapped while its Arc lives, and `self.pools`
        // holds that Arc until after the container (and with it the mapping) is closed.
        unsafe { self.map_dma(r.addr, r.len, iova)? };
        pools.push(Arc::clone(pool));
        Ok(())
    }

    /// Lets the device read and write `len` bytes at `vaddr` through the bus address
    /// `iova`. Page-aligned addresses and length.
    ///
    /// # Safety
    /// The memory must stay mapped, and must not be handed to anything that device
    /// writes could corrupt, until this device is dropped: the device may access it at
    /// any time in between.
    unsafe fn map_dma(&self, vaddr: usize, len: usize, iova: u64) -> Result<(), Error> {
        assert!(
            vaddr % 4096 == 0 && len % 4096 == 0 && iova % 4096 == 0 && len > 0,
            "DMA mapping must be page-aligned and non-empty"
        );
        let mut map = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size: len as u64,
        };
        ioctl_ptr(
            &self.container,
            VFIO_IOMMU_MAP_DMA,
            &mut map,
            "VFIO_IOMMU_MAP_DMA",
        )?;
        Ok(())
    }
}

fn region_info(device: &OwnedFd, index: u32) -> Result<RegionInfo, Error> {
    let mut info = RegionInfo {
        argsz: std::mem::size_of::<RegionInfo>() as u32,
        index,
        ..RegionInfo::default()
    };
    ioctl_ptr(
        device,
        VFIO_DEVICE_GET_REGION_INFO,
        &mut info,
        "VFIO_DEVICE_GET_REGION_INFO",
    )?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_vfio_h() {
        // Values from <linux/vfio.h> as compiled by the kernel headers.
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_SET_IOMMU, 0x3b66);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
    }

    #[test]
    fn a_missing_function_is_a_clear_error() {
        let e = iommu_group("0000:ff:1f.7").unwrap_err().to_string();
        assert!(e.contains("0000:ff:1f.7") && e.contains("iommu"), "{e}");
        let e = VfioDevice::open("0000:ff:1f.7").unwrap_err().to_string();
        assert!(e.contains("0000:ff:1f.7"), "{e}");
    }
}
