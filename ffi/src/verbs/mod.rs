//! RDMA verbs through the system's libibverbs (rdma-core): the generated bindings
//! (`sys`, from build.rs) and safe wrappers over them. This first part discovers RDMA
//! devices, their ports and GIDs; queue pairs for the `rdma` transport come next (see
//! docs/design/rdma.md).

use std::ffi::CStr;
use std::net::Ipv4Addr;

use crate::Error;

pub mod rc;

/// The bindgen output for `<infiniband/verbs.h>`: raw C types and functions.
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    missing_debug_implementations,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]
pub mod sys {
    include!(concat!(env!("OUT_DIR"), "/verbs.rs"));
}

/// One GID table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gid {
    pub index: u32,
    pub raw: [u8; 16],
}

impl Gid {
    /// The IPv4 address of a RoCE v2 GID of the form ::ffff:a.b.c.d.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        let r = &self.raw;
        (r[..10].iter().all(|&b| b == 0) && r[10] == 0xff && r[11] == 0xff)
            .then(|| Ipv4Addr::new(r[12], r[13], r[14], r[15]))
    }
}

/// One port of an RDMA device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub number: u8,
    pub active: bool,
    /// The active path MTU in bytes (256..4096).
    pub active_mtu_bytes: u32,
    /// Non-zero GID table entries.
    pub gids: Vec<Gid>,
}

/// One RDMA device (an HCA, or a soft-RoCE link such as rxe0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub ports: Vec<Port>,
}

/// Frees the device list on every path.
struct DeviceList(pub(crate) *mut *mut sys::ibv_device);

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the pointer came from ibv_get_device_list and is freed once, here.
        unsafe { sys::ibv_free_device_list(self.0) }
    }
}

/// An open device context, closed on drop.
struct Context(*mut sys::ibv_context);

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the context came from ibv_open_device and is closed once, here.
        unsafe { sys::ibv_close_device(self.0) };
    }
}

fn mtu_bytes(mtu: sys::ibv_mtu) -> u32 {
    // IBV_MTU_256 = 1 .. IBV_MTU_4096 = 5.
    match mtu.0 {
        m @ 1..=5 => 128 << m,
        _ => 0,
    }
}

/// Every RDMA device with its ports and GIDs. A kernel without RDMA support, or none
/// configured, gives an empty list.
pub fn devices() -> Result<Vec<Device>, Error> {
    let mut n: std::os::raw::c_int = 0;
    // SAFETY: n is a live local the call writes the count to.
    let list = unsafe { sys::ibv_get_device_list(&mut n) };
    if list.is_null() {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSYS) {
            return Ok(Vec::new());
        }
        return Err(Error::Os {
            what: "ibv_get_device_list",
            source: e,
        });
    }
    let list = DeviceList(list);
    let mut out = Vec::new();
    for i in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: the list holds n device pointers, i < n.
        let dev = unsafe { *list.0.add(i) };
        // SAFETY: dev is a device of the live list; the name is a NUL-terminated string
        // owned by it, copied before the list is freed.
        let name = unsafe { CStr::from_ptr(sys::ibv_get_device_name(dev)) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: dev is a device of the live list.
        let ctx = unsafe { sys::ibv_open_device(dev) };
        if ctx.is_null() {
            return Err(Error::Unsupported(format!(
                "cannot open RDMA device {name}: {} (is ib_uverbs loaded, /dev/infiniband present?)",
                std::io::Error::last_os_error()
            )));
        }
        let ctx = Context(ctx);
        let mut attr = sys::ibv_device_attr::default();
        // SAFETY: ctx is open; attr is a live local of the type the call fills.
        if unsafe { sys::ibv_query_device(ctx.0, &mut attr) } != 0 {
            return Err(Error::last_os("ibv_query_device"));
        }
        let mut ports = Vec::new();
        for number in 1..=attr.phys_port_cnt {
            let mut pa = sys::ibv_port_attr::default();
            // SAFETY: ctx is open, the port exists (1..=phys_port_cnt), pa is a live local
            // of the full, current struct (not the compat one).
            if unsafe { sys::___ibv_query_port(ctx.0, number, &mut pa) } != 0 {
                return Err(Error::last_os("ibv_query_port"));
            }
            let mut gids = Vec::new();
            for index in 0..pa.gid_tbl_len.max(0) {
                let mut gid = sys::ibv_gid::default();
                // SAFETY: ctx is open, index < gid_tbl_len, gid is a live local.
                if unsafe { sys::ibv_query_gid(ctx.0, number, index, &mut gid) } != 0 {
                    continue; // an empty slot
                }
                // SAFETY: every bit pattern of the union is a valid [u8; 16].
                let raw = unsafe { gid.raw };
                if raw != [0; 16] {
                    gids.push(Gid {
                        index: index as u32,
                        raw,
                    });
                }
            }
            ports.push(Port {
                number,
                active: pa.state == sys::ibv_port_state::IBV_PORT_ACTIVE,
                active_mtu_bytes: mtu_bytes(pa.active_mtu),
                gids,
            });
        }
        out.push(Device { name, ports });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_tell_their_ipv4_address() {
        let mut raw = [0u8; 16];
        raw[10] = 0xff;
        raw[11] = 0xff;
        raw[12..].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(Gid { index: 1, raw }.ipv4(), Some(Ipv4Addr::LOCALHOST));
        raw[0] = 0xfe;
        assert_eq!(Gid { index: 0, raw }.ipv4(), None);
        assert_eq!(mtu_bytes(sys::ibv_mtu(5)), 4096);
        assert_eq!(mtu_bytes(sys::ibv_mtu(1)), 256);
    }

    #[test]
    fn listing_devices_works_without_any() {
        // This host has no RDMA hardware; the VM lab's test lists soft-RoCE's rxe0.
        for d in devices().unwrap() {
            assert!(!d.name.is_empty());
        }
    }
}
