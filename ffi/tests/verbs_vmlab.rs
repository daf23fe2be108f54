//! The verbs bindings against a real RDMA device: soft-RoCE (rxe) on the loopback
//! interface, in the VM lab's guest (this host has no RDMA device and its kernel no rxe).

#[path = "../../dataplane/tests/common/vmlab.rs"]
mod vmlab;

use vmlab::add_rxe;

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
/// registered memory, one by RDMA WRITE with immediate (which completes an empty
/// receive carrying the value and wakes the completion channel), one pulled by RDMA
/// READ, and a queue pair closed with a receive outstanding gives its buffer back only
/// after the flush.
#[test]
fn rc_queue_pairs_send_write_and_read_over_soft_roce() {
    use spool_ffi::verbs::rc::{
        Access, Completion, Domain, MemoryRegion, ProtectionDomain, QueuePair, SendOp,
    };
    use spool_hugepages::{DmaPool, PagePolicy};
    if vmlab::in_guest().is_none() {
        return vmlab::run_in_guest("rc_queue_pairs_send_write_and_read_over_soft_roce", 16);
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
    let domain = Domain::open("rxe0").unwrap();
    let pd = ProtectionDomain::new(&domain).unwrap();
    let region = MemoryRegion::register(&pd, &pool, Access::RemoteReadWrite).unwrap();
    let fill = |seed: u8, b: &mut [u8]| {
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed ^ (i as u8) ^ ((i >> 8) as u8);
        }
    };
    let pattern = |seed: u8, len: usize| {
        let mut v = vec![0u8; len];
        fill(seed, &mut v);
        v
    };
    {
        let regions = vec![std::sync::Arc::clone(&region)];
        let mut a = QueuePair::new(&pd, regions.clone(), 8, gid.index as u8, 0x1111).unwrap();
        let mut b = QueuePair::new(&pd, regions, 8, gid.index as u8, 0x2222).unwrap();
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
            for c in &out {
                assert!(c.error.is_none(), "{c:?}");
            }
            out
        };

        // SEND into a posted receive.
        b.post_recv(Some(pool.alloc().unwrap())).unwrap();
        let mut msg = pool.alloc().unwrap();
        fill(7, &mut msg.as_mut_slice()[..4096]);
        a.post_send(Some(msg), 4096, SendOp::Send, None).unwrap();
        let sent = wait(&mut a, 1);
        assert!(
            sent[0].buf.is_some() && !sent[0].recv,
            "the send's buffer comes back"
        );
        let got = wait(&mut b, 1).remove(0);
        assert!(got.recv && got.imm.is_none());
        assert_eq!(got.byte_len, 4096);
        assert!(
            got.buf.unwrap().as_slice()[..4096] == pattern(7, 4096)[..],
            "received bytes"
        );

        // RDMA WRITE into b's memory: a buffer b holds and has not posted.
        let mut target = pool.alloc().unwrap();
        target.as_mut_slice().fill(0);
        let into = region.remote_of(&target).unwrap();
        let mut payload = pool.alloc().unwrap();
        fill(9, &mut payload.as_mut_slice()[..8192]);
        a.post_send(Some(payload), 8192, SendOp::Write(into, 0), None)
            .unwrap();
        wait(&mut a, 1);
        assert!(
            target.as_slice()[..8192] == pattern(9, 8192)[..],
            "RDMA WRITE landed in the peer's buffer"
        );
        assert!(
            target.as_slice()[8192..].iter().all(|&x| x == 0),
            "and nothing past it"
        );

        // RDMA WRITE with immediate at an offset: completes b's empty receive with the
        // value and the length, and b's armed channel turns readable.
        b.post_recv(None).unwrap();
        b.arm().unwrap();
        let mut payload = pool.alloc().unwrap();
        fill(11, &mut payload.as_mut_slice()[..1000]);
        a.post_send(
            Some(payload),
            1000,
            SendOp::Write(into, 20_000),
            Some(0xdead_beef),
        )
        .unwrap();
        wait(&mut a, 1);
        let mut pfd = libc::pollfd {
            fd: b.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a live local; one entry.
        let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(ready, 1, "the completion channel turns readable");
        let got = wait(&mut b, 1).remove(0);
        assert!(got.recv && got.buf.is_none());
        assert_eq!((got.imm, got.byte_len), (Some(0xdead_beef), 1000));
        let mut landed = vec![0u8; 1000];
        target.copy_out(20_000, &mut landed);
        assert!(
            landed == pattern(11, 1000),
            "the payload with the immediate"
        );
        b.arm().unwrap();
        // An empty message with immediate carries only the value.
        b.post_recv(None).unwrap();
        a.post_send(None, 0, SendOp::Send, Some(42)).unwrap();
        wait(&mut a, 1);
        let got = wait(&mut b, 1).remove(0);
        assert_eq!((got.imm, got.byte_len), (Some(42), 0));

        // RDMA READ of b's memory into a's buffer.
        let sink = pool.alloc().unwrap();
        a.post_send(Some(sink), 8192, SendOp::Read(into, 0), None)
            .unwrap();
        let read = wait(&mut a, 1).remove(0);
        assert!(
            read.buf.unwrap().as_slice()[..8192] == pattern(9, 8192)[..],
            "RDMA READ brought the peer's bytes"
        );
        // Reads outside the peer's region are refused before posting.
        let r = a.post_send(
            Some(pool.alloc().unwrap()),
            8192,
            SendOp::Read(into, 60 << 10),
            None,
        );
        let (_, back) = r.unwrap_err();
        assert!(back.is_some(), "a refused post gives its buffer back");

        // Closing with a receive outstanding flushes it before its buffer returns.
        b.post_recv(Some(pool.alloc().unwrap())).unwrap();
        assert_eq!(b.outstanding(), 1);
        drop(target);
    }
    // The flush is waited for by a closing thread: the buffers come back soon after.
    let t0 = std::time::Instant::now();
    while pool.available() < pool.count() && t0.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        pool.available(),
        pool.count(),
        "every buffer back in the pool"
    );
    println!("SEND, RDMA WRITE (with immediate) and RDMA READ over rxe0 verified");
}
