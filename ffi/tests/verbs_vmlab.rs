//! The verbs bindings against a real RDMA device: soft-RoCE (rxe) on the loopback
//! interface, in the VM lab's guest (this host has no RDMA device and its kernel no rxe).

#[path = "../../dataplane/tests/common/vmlab.rs"]
mod vmlab;

use std::process::Command;

fn run(cmd: &[&str]) {
    let st = Command::new(cmd[0]).args(&cmd[1..]).status().unwrap();
    assert!(st.success(), "{cmd:?}: {st}");
}

#[test]
fn soft_roce_device_ports_and_gids_are_listed() {
    if vmlab::in_guest().is_none() {
        return vmlab::run_in_guest("soft_roce_device_ports_and_gids_are_listed", 16);
    }
    assert!(
        spool_ffi::verbs::devices().unwrap().is_empty(),
        "no RDMA device before rxe"
    );
    // rxe needs a crc32 driver to create a link.
    run(&[
        "modprobe",
        "-d",
        "/tmp/vmlab-root",
        "-a",
        "crc32_generic",
        "rdma_rxe",
        "ib_uverbs",
    ]);
    run(&["ip", "link", "set", "lo", "up"]);
    run(&["rdma", "link", "add", "rxe0", "type", "rxe", "netdev", "lo"]);
    let devices = spool_ffi::verbs::devices().unwrap();
    for d in &devices {
        for p in &d.ports {
            let gids: Vec<String> = p
                .gids
                .iter()
                .map(|g| format!("{}:{:?}", g.index, g.ipv4()))
                .collect();
            println!(
                "{} port {} active {} mtu {} gids {gids:?}",
                d.name, p.number, p.active, p.active_mtu_bytes
            );
        }
    }
    let rxe = devices
        .iter()
        .find(|d| d.name == "rxe0")
        .expect("rxe0 listed");
    assert_eq!(rxe.ports.len(), 1);
    let port = &rxe.ports[0];
    assert!(port.active, "rxe0 port 1 is active on an up loopback");
    assert!(port.active_mtu_bytes >= 1024, "{port:?}");
    assert!(
        port.gids
            .iter()
            .any(|g| g.ipv4() == Some(std::net::Ipv4Addr::LOCALHOST)),
        "a RoCE v2 GID for 127.0.0.1: {port:?}"
    );
}
