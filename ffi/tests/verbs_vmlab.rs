//! The verbs bindings against a real RDMA device: soft-RoCE (rxe) on the loopback
//! interface, in the VM lab's guest (this host has no RDMA device and its kernel no rxe).

#[path = "../../dataplane/tests/common/vmlab.rs"]
mod vmlab;

use std::process::Command;

fn run(cmd: &[&str]) {
    let st = Command::new(cmd[0]).args(&cmd[1..]).status().unwrap();
    assert!(st.success(), "{cmd:?}: {st}");
}

/// Loads soft-RoCE and adds rxe0 on the loopback interface.
fn add_rxe() {
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
    add_rxe();
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

/// Two reliable-connected queue pairs on rxe0, connected to each other: a message by
/// SEND into a posted receive, a payload by RDMA WRITE straight into the peer's
/// registered memory, and a queue pair closed with a receive outstanding gives its
/// buffer back only after the flush.
#[test]
fn rc_queue_pairs_send_and_rdma_write_over_soft_roce() {
    use spool_ffi::verbs::rc::{Completion, Domain, QueuePair};
    use spool_hugepages::{DmaPool, PagePolicy};
    if vmlab::in_guest().is_none() {
        return vmlab::run_in_guest("rc_queue_pairs_send_and_rdma_write_over_soft_roce", 16);
    }
    add_rxe();
    let port = spool_ffi::verbs::devices()
        .unwrap()
        .remove(0)
        .ports
        .remove(0);
    let gid = port
        .gids
        .iter()
        .find(|g| g.ipv4() == Some(std::net::Ipv4Addr::LOCALHOST))
        .expect("an IPv4 GID");
    let pool = DmaPool::new("rdma", 64 << 10, 16, PagePolicy::PreferHuge).unwrap();
    let mut domain = Domain::open("rxe0").unwrap();
    let region = domain.register(&pool).unwrap();
    let fill = |seed: u8, b: &mut [u8]| {
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed ^ (i as u8) ^ ((i >> 8) as u8);
        }
    };
    {
        let mut a = QueuePair::new(&domain, 8, gid.index as u8, 0x1111).unwrap();
        let mut b = QueuePair::new(&domain, 8, gid.index as u8, 0x2222).unwrap();
        let (ea, eb) = (a.endpoint().unwrap(), b.endpoint().unwrap());
        a.connect(&eb).unwrap();
        b.connect(&ea).unwrap();
        let wait = |qp: &mut QueuePair, n: usize| -> Vec<Completion> {
            let mut out = Vec::new();
            let t0 = std::time::Instant::now();
            while out.len() < n {
                qp.poll(&mut out);
                assert!(
                    t0.elapsed().as_secs() < 20,
                    "only {} of {n} completions",
                    out.len()
                );
            }
            out
        };

        // SEND into a posted receive.
        b.post_recv(pool.alloc().unwrap()).unwrap();
        let mut msg = pool.alloc().unwrap();
        fill(7, &mut msg.as_mut_slice()[..4096]);
        a.post_send(msg, 4096, None).unwrap();
        let sent = wait(&mut a, 1);
        assert!(sent[0].error.is_none(), "{:?}", sent[0].error);
        assert!(sent[0].buf.is_some(), "the send's buffer comes back");
        let got = wait(&mut b, 1).remove(0);
        assert!(got.error.is_none(), "{:?}", got.error);
        assert_eq!(got.byte_len, 4096);
        let mut want = vec![0u8; 4096];
        fill(7, &mut want);
        assert!(
            got.buf.unwrap().as_slice()[..4096] == want[..],
            "received bytes"
        );

        // RDMA WRITE into b's memory: a buffer b holds and has not posted.
        let mut target = pool.alloc().unwrap();
        target.as_mut_slice().fill(0);
        let offset = target.addr() as u64 - region.addr;
        let mut payload = pool.alloc().unwrap();
        fill(9, &mut payload.as_mut_slice()[..8192]);
        a.post_send(payload, 8192, Some((region, offset))).unwrap();
        let done = wait(&mut a, 1);
        assert!(done[0].error.is_none(), "{:?}", done[0].error);
        let mut want = vec![0u8; 8192];
        fill(9, &mut want);
        assert!(
            target.as_slice()[..8192] == want[..],
            "RDMA WRITE landed in the peer's buffer"
        );
        assert!(
            target.as_slice()[8192..].iter().all(|&x| x == 0),
            "and nothing past it"
        );

        // Closing with a receive outstanding flushes it before its buffer returns.
        b.post_recv(pool.alloc().unwrap()).unwrap();
        assert_eq!(b.outstanding(), 1);
    }
    assert_eq!(
        pool.available(),
        pool.count(),
        "every buffer back in the pool"
    );
    println!("SEND and RDMA WRITE over rxe0 verified");
}
