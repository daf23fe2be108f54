//! NVMe controllers on the PCI bus, and moving them between the kernel's nvme driver
//! and vfio-pci, through sysfs (what `spool nvme list | bind | unbind` do).

use std::path::{Path, PathBuf};

use crate::Error;

/// PCI class code of an NVM Express controller (mass storage, NVM, NVMe).
const CLASS_NVME: u32 = 0x01_08_02;

/// One NVMe controller as sysfs shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PciFunction {
    /// Domain:bus:device.function, e.g. 0000:00:04.0.
    pub address: String,
    pub vendor: String,
    pub device: String,
    /// The bound driver: "nvme", "vfio-pci", or "" for none.
    pub driver: String,
    /// The IOMMU group, when an IOMMU is on.
    pub iommu_group: Option<u32>,
    /// Block devices of the kernel driver (e.g. nvme0n1), when bound to nvme.
    pub block_devices: Vec<String>,
}

fn sysfs_root() -> PathBuf {
    PathBuf::from("/sys/bus/pci")
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

fn sysfs_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Nvme(format!("{what} ({}): {e}", path.display()))
}

/// Checks that `address` looks like a PCI address, so it is never used to build an
/// arbitrary sysfs path.
pub fn check_address(address: &str) -> Result<(), Error> {
    let b = address.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    let ok = b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11]);
    if !ok {
        return Err(Error::Nvme(format!(
            "'{address}' is not a PCI address (expected DDDD:BB:DD.F, e.g. 0000:00:04.0)"
        )));
    }
    Ok(())
}

fn function(address: &str) -> Result<PciFunction, Error> {
    check_address(address)?;
    let dir = sysfs_root().join("devices").join(address);
    if !dir.exists() {
        return Err(Error::Nvme(format!(
            "{address}: no such PCI function ({} is missing)",
            dir.display()
        )));
    }
    let link_name = |p: PathBuf| {
        std::fs::read_link(p)
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    let mut block_devices = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir.join("nvme")) {
        for ctrl in rd.flatten() {
            if let Ok(inner) = std::fs::read_dir(ctrl.path()) {
                let ctrl_name = ctrl.file_name().to_string_lossy().into_owned();
                for e in inner.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with(&ctrl_name) && n.contains('n') && n.len() > ctrl_name.len() {
                        block_devices.push(n);
                    }
                }
            }
        }
    }
    block_devices.sort();
    Ok(PciFunction {
        address: address.to_owned(),
        vendor: read_trim(&dir.join("vendor")).unwrap_or_default(),
        device: read_trim(&dir.join("device")).unwrap_or_default(),
        driver: link_name(dir.join("driver")).unwrap_or_default(),
        iommu_group: link_name(dir.join("iommu_group")).and_then(|g| g.parse().ok()),
        block_devices,
    })
}

/// Every NVMe controller on the PCI bus, sorted by address.
pub fn list() -> Result<Vec<PciFunction>, Error> {
    let dir = sysfs_root().join("devices");
    let rd = std::fs::read_dir(&dir).map_err(|e| sysfs_err("cannot list PCI devices", &dir, e))?;
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let class = read_trim(&e.path().join("class"))
            .and_then(|c| u32::from_str_radix(c.trim_start_matches("0x"), 16).ok());
        if class == Some(CLASS_NVME) {
            out.push(function(&name)?);
        }
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(out)
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    std::fs::write(path, value)
        .map_err(|e| sysfs_err(&format!("cannot write '{}'", value.trim()), path, e))
}

fn unbind_current(f: &PciFunction) -> Result<(), Error> {
    if !f.driver.is_empty() {
        let unbind = sysfs_root()
            .join("devices")
            .join(&f.address)
            .join("driver/unbind");
        write(&unbind, &f.address)?;
    }
    Ok(())
}

/// Hands `address` to vfio-pci (unbinding the kernel's nvme driver, whose block devices
/// then disappear). Already bound to vfio-pci: nothing to do.
pub fn bind_vfio(address: &str) -> Result<PciFunction, Error> {
    let f = function(address)?;
    if f.driver == "vfio-pci" {
        return Ok(f);
    }
    if !sysfs_root().join("drivers/vfio-pci").exists() {
        return Err(Error::Nvme(
            "the vfio-pci driver is not loaded: run `modprobe vfio-pci` (and boot with \
             intel_iommu=on or amd_iommu=on)"
                .into(),
        ));
    }
    if f.iommu_group.is_none() {
        return Err(Error::Nvme(format!(
            "{address} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on)"
        )));
    }
    unbind_current(&f)?;
    let dir = sysfs_root().join("devices").join(address);
    write(&dir.join("driver_override"), "vfio-pci")?;
    write(&sysfs_root().join("drivers_probe"), address)?;
    let now = function(address)?;
    if now.driver != "vfio-pci" {
        return Err(Error::Nvme(format!(
            "{address}: vfio-pci did not take the device (driver is now '{}')",
            now.driver
        )));
    }
    Ok(now)
}

/// Gives `address` back to the kernel: clears the override and probes again, so the
/// nvme driver (when loaded) binds it.
pub fn unbind_vfio(address: &str) -> Result<PciFunction, Error> {
    let f = function(address)?;
    if f.driver == "vfio-pci" {
        unbind_current(&f)?;
    }
    write(
        &sysfs_root()
            .join("devices")
            .join(address)
            .join("driver_override"),
        "\n",
    )?;
    write(&sysfs_root().join("drivers_probe"), address)?;
    function(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_before_touching_sysfs() {
        check_address("0000:00:04.0").unwrap();
        check_address("abcd:ef:1f.7").unwrap();
        for bad in [
            "00:04.0",
            "0000:00:04.8",
            "../../../etc",
            "0000:00:04.0/../x",
            "",
        ] {
            let e = check_address(bad).unwrap_err().to_string();
            assert!(e.contains("not a PCI address"), "{bad}: {e}");
        }
        assert!(bind_vfio("0000:ff:1f.7")
            .unwrap_err()
            .to_string()
            .contains("no such PCI function"));
    }

    #[test]
    fn list_reads_this_host_without_failing() {
        // This host has no NVMe; the VM lab test lists the emulated one.
        for f in list().unwrap() {
            check_address(&f.address).unwrap();
        }
    }
}
