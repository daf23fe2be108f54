//! The etcd client (`cluster::etcd`) against a real etcd 3.4 (`common/etcd.rs` starts it):
//! key-value calls, leases, conditional puts under a race, watches, dead endpoints,
//! failover, and an etcd restart under a watch.

#[path = "common/etcd.rs"]
mod etcd;

use etcd::EtcdServer;
use spool_controlplane::cluster::etcd::{Etcd, EventKind};
use spool_controlplane::Error;
use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(2);

fn server() -> EtcdServer {
    EtcdServer::start(Ipv4Addr::LOCALHOST)
}

fn client(urls: &[String]) -> Etcd {
    Etcd::new(urls, TIMEOUT).expect("client")
}

/// A loopback URL where nothing listens (connections are refused).
fn dead_url() -> String {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

#[tokio::test]
async fn put_get_prefix_delete() {
    let srv = server();
    let c = client(&[srv.url()]);
    assert_eq!(c.get("p/a").await.unwrap(), None);
    let r1 = c.put("p/b", b"2", None).await.unwrap();
    let r2 = c.put("p/a", b"1", None).await.unwrap();
    assert!(r2 > r1, "{r1} {r2}");
    // Neighbours of the prefix on both sides, and an empty value.
    c.put("p", b"x", None).await.unwrap();
    c.put("p0", b"x", None).await.unwrap();
    let r3 = c.put("p/c", b"", None).await.unwrap();

    let a = c.get("p/a").await.unwrap().expect("p/a");
    assert_eq!(
        (a.key.as_str(), a.value.as_slice(), a.lease),
        ("p/a", &b"1"[..], 0)
    );
    assert_eq!((a.create_revision, a.mod_revision), (r2, r2));

    let (kvs, rev) = c.get_prefix("p/").await.unwrap();
    let keys: Vec<&str> = kvs.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["p/a", "p/b", "p/c"]);
    assert_eq!(kvs[2].value, b"");
    assert_eq!(rev, r3);

    let r4 = c.put("p/a", b"one", None).await.unwrap();
    let a = c.get("p/a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_slice(), a.create_revision, a.mod_revision),
        (&b"one"[..], r2, r4)
    );

    c.delete("p/a").await.unwrap();
    c.delete("p/never").await.unwrap();
    assert_eq!(c.get("p/a").await.unwrap(), None);
    let (kvs, _) = c.get_prefix("p/").await.unwrap();
    assert_eq!(kvs.len(), 2);
    assert!(c.get_prefix("nothing/").await.unwrap().0.is_empty());
}

#[tokio::test]
async fn leases() {
    let srv = server();
    let c = client(&[srv.url()]);
    let lease = c.grant(30).await.unwrap();
    assert_ne!(lease, 0);
    c.put("node/1", b"up", Some(lease)).await.unwrap();
    assert_eq!(c.get("node/1").await.unwrap().unwrap().lease, lease);
    let ttl = c.keep_alive(lease).await.unwrap();
    assert!((1..=30).contains(&ttl), "{ttl}");

    c.revoke(lease).await.unwrap();
    assert_eq!(
        c.get("node/1").await.unwrap(),
        None,
        "revoke deletes the lease's keys"
    );
    assert_eq!(
        c.keep_alive(lease).await.unwrap(),
        0,
        "a revoked lease is gone"
    );
    c.revoke(lease)
        .await
        .expect("revoking a gone lease is not an error");

    // Left alone, a short lease expires by itself and takes its key along.
    let short = c.grant(1).await.unwrap();
    c.put("node/2", b"up", Some(short)).await.unwrap();
    let t0 = Instant::now();
    while c.get("node/2").await.unwrap().is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(c.keep_alive(short).await.unwrap(), 0);

    let e = c.put("node/3", b"x", Some(12345)).await.unwrap_err();
    assert!(matches!(e, Error::Etcd { .. }), "{e}");
}

#[tokio::test]
async fn create_if_absent_race() {
    let srv = server();
    let (a, b) = (client(&[srv.url()]), client(&[srv.url()]));
    for round in 0..20 {
        let key = format!("lock/{round}");
        let (ra, rb) = tokio::join!(
            a.create_if_absent(&key, b"a", None),
            b.create_if_absent(&key, b"b", None)
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(ra ^ rb, "round {round}: exactly one must win ({ra}, {rb})");
        let v = a.get(&key).await.unwrap().unwrap().value;
        assert_eq!(v, if ra { b"a" } else { b"b" });
    }
    let lease = a.grant(30).await.unwrap();
    assert!(a
        .create_if_absent("leased", b"1", Some(lease))
        .await
        .unwrap());
    assert_eq!(a.get("leased").await.unwrap().unwrap().lease, lease);
}

#[tokio::test]
async fn put_if_mod_revision() {
    let srv = server();
    let c = client(&[srv.url()]);
    assert!(
        c.put_if_mod_revision("table", b"v1", 0).await.unwrap(),
        "absent, 0 expected"
    );
    assert!(
        !c.put_if_mod_revision("table", b"v1'", 0).await.unwrap(),
        "exists now"
    );
    let kv = c.get("table").await.unwrap().unwrap();
    assert!(c
        .put_if_mod_revision("table", b"v2", kv.mod_revision)
        .await
        .unwrap());
    assert!(
        !c.put_if_mod_revision("table", b"v3", kv.mod_revision)
            .await
            .unwrap(),
        "stale"
    );
    assert_eq!(c.get("table").await.unwrap().unwrap().value, b"v2");
}

#[tokio::test]
async fn watch_prefix_sees_changes_in_order() {
    let srv = server();
    let c = client(&[srv.url()]);
    c.put("w/old", b"0", None).await.unwrap();
    let (_, rev) = c.get_prefix("w/").await.unwrap();
    let mut w = c.watch_prefix("w/", rev + 1).await.unwrap();

    c.put("w/a", b"1", None).await.unwrap();
    c.put("wx", b"outside", None).await.unwrap();
    c.put("w/b", b"2", None).await.unwrap();
    c.delete("w/a").await.unwrap();
    c.delete("w/old").await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let batch = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("events within 10 s")
            .unwrap();
        assert!(!batch.is_empty());
        seen.extend(batch);
    }
    let got: Vec<(EventKind, &str, &[u8])> = seen
        .iter()
        .map(|e| (e.kind, e.kv.key.as_str(), e.kv.value.as_slice()))
        .collect();
    assert_eq!(
        got,
        [
            (EventKind::Put, "w/a", &b"1"[..]),
            (EventKind::Put, "w/b", b"2"),
            (EventKind::Delete, "w/a", b""),
            (EventKind::Delete, "w/old", b""),
        ]
    );
    assert!(seen
        .windows(2)
        .all(|p| p[0].kv.mod_revision < p[1].kv.mod_revision));

    // From an old revision, the history is replayed.
    let mut replay = c.watch_prefix("w/", rev + 1).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), replay.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (first[0].kind, first[0].kv.key.as_str()),
        (EventKind::Put, "w/a")
    );

    // A watch from now (0) sees only what comes after it is created.
    let mut now = c.watch_prefix("w/", 0).await.unwrap();
    c.put("w/c", b"3", None).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), now.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next[0].kv.key, "w/c");
}

/// Compacts etcd's history up to `rev` (the client has no call for it; tests only).
fn compact(url: &str, rev: i64) {
    use std::io::{Read as _, Write as _};
    let body = format!(r#"{{"revision":"{rev}","physical":true}}"#);
    let mut s = std::net::TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    let req = format!(
        "POST /v3/kv/compaction HTTP/1.1\r\nHost: etcd\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test]
async fn watch_from_a_compacted_revision_fails() {
    let srv = server();
    let c = client(&[srv.url()]);
    let first = c.put("k/a", b"1", None).await.unwrap();
    let last = c.put("k/a", b"2", None).await.unwrap();
    compact(&srv.url(), last);
    let mut w = c.watch_prefix("k/", first).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("compacted"), "{e}");
    // From the current revision on it works.
    let mut w = c.watch_prefix("k/", last).await.unwrap();
    let evs = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (evs[0].kv.value.as_slice(), evs[0].kv.mod_revision),
        (&b"2"[..], last)
    );
}

#[tokio::test]
async fn watch_fails_when_etcd_dies_and_the_client_recovers_after_restart() {
    let mut srv = server();
    let c = client(&[srv.url()]);
    c.put("r/a", b"1", None).await.unwrap();
    let mut w = c.watch_prefix("r/", 0).await.unwrap();
    srv.kill();
    let e = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("the watch notices the dead server")
        .unwrap_err();
    assert!(matches!(e, Error::Etcd { .. }), "{e}");
    assert!(c.get("r/a").await.is_err());

    srv.restart();
    assert_eq!(
        c.get("r/a").await.unwrap().unwrap().value,
        b"1",
        "data survives"
    );
    let mut w = c.watch_prefix("r/", 0).await.unwrap();
    c.put("r/b", b"2", None).await.unwrap();
    let evs = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(evs[0].kv.key, "r/b");
}

#[tokio::test]
async fn dead_endpoint_fails_within_the_timeout() {
    let url = dead_url();
    let c = client(std::slice::from_ref(&url));
    let t0 = Instant::now();
    let e = c.get("k").await.unwrap_err();
    assert!(
        t0.elapsed() < TIMEOUT + Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    match &e {
        Error::Etcd { endpoint, reason } => {
            assert_eq!(endpoint, &url);
            assert!(
                reason.contains("no endpoint reachable") && reason.contains(&url),
                "{e}"
            );
        }
        other => panic!("not an etcd error: {other}"),
    }

    // A server that accepts the connection (the kernel does, from the backlog) but never
    // answers: the request must still end at the timeout, naming the endpoint.
    let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let c = client(std::slice::from_ref(&url));
    let t0 = Instant::now();
    let e = c.put("k", b"v", None).await.unwrap_err();
    let took = t0.elapsed();
    assert!(
        took >= TIMEOUT && took < TIMEOUT + Duration::from_secs(1),
        "{took:?}"
    );
    assert!(
        matches!(&e, Error::Etcd { endpoint, reason } if *endpoint == url && reason.contains("no answer")),
        "{e}"
    );
    let t0 = Instant::now();
    assert!(c.watch_prefix("p/", 0).await.is_err());
    assert!(t0.elapsed() < TIMEOUT + Duration::from_secs(1));
}

#[tokio::test]
async fn fails_over_to_the_next_endpoint() {
    let srv = server();
    let c = client(&[dead_url(), srv.url()]);
    c.put("f", b"1", None).await.unwrap();
    assert_eq!(c.get("f").await.unwrap().unwrap().value, b"1");
    let mut w = c.watch_prefix("f", 0).await.unwrap();
    c.delete("f").await.unwrap();
    let evs = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(evs[0].kind, EventKind::Delete);
    // The clone shares the preference and works too.
    assert_eq!(c.clone().get("f").await.unwrap(), None);
}
