//! A real single-member etcd (`/usr/bin/etcd`) for tests: its own free ports, data dir
//! and log file in a tempdir. Dropping it kills the process, so a failing test leaves
//! nothing running.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ETCD: &str = "/usr/bin/etcd";
/// How long etcd gets to answer `/health` after a start.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// One etcd process (or none, between `kill` and `restart`).
#[derive(Debug)]
pub struct EtcdServer {
    ip: Ipv4Addr,
    client_port: u16,
    peer_port: u16,
    wrapper: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
    // Last, so the directory goes after the process is dead.
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd listening on `listen_ip` and waits until it answers.
    pub fn start(listen_ip: Ipv4Addr) -> EtcdServer {
        EtcdServer::start_with(listen_ip, &[])
    }

    /// Like `start`, with `wrapper` put before the etcd command line, e.g.
    /// `["ip", "netns", "exec", "ns1"]` (it must exec etcd, so that killing the child
    /// kills etcd). `/health` is still checked from the test's own namespace.
    pub fn start_with(listen_ip: Ipv4Addr, wrapper: &[&str]) -> EtcdServer {
        let dir = tempfile::tempdir().expect("etcd tempdir");
        let mut s = EtcdServer {
            ip: listen_ip,
            client_port: free_port(listen_ip),
            peer_port: free_port(listen_ip),
            wrapper: wrapper.iter().map(|w| w.to_string()).collect(),
            child: None,
            log: dir.path().join("etcd.log"),
            dir,
        };
        while s.peer_port == s.client_port {
            s.peer_port = free_port(listen_ip);
        }
        s.spawn();
        s
    }

    /// `http://IP:PORT` for clients.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.client_port)
    }

    /// Kills etcd (SIGKILL, like a crash) and reaps it. The data dir stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills etcd if it runs and starts it again on the same data dir and ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The last `n` bytes of etcd's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let mut start = text.len().saturating_sub(n);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_string()
    }

    fn spawn(&mut self) {
        let client = format!("http://{}:{}", self.ip, self.client_port);
        let peer = format!("http://{}:{}", self.ip, self.peer_port);
        let data = self.dir.path().join("data");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("etcd log");
        writeln!(log, "==== test: starting etcd").expect("etcd log");
        let mut argv: Vec<String> = self.wrapper.clone();
        argv.push(ETCD.into());
        for (flag, value) in [
            ("--name", "t".to_string()),
            ("--data-dir", data.display().to_string()),
            ("--listen-client-urls", client.clone()),
            ("--advertise-client-urls", client),
            ("--listen-peer-urls", peer.clone()),
            ("--initial-advertise-peer-urls", peer.clone()),
            ("--initial-cluster", format!("t={peer}")),
        ] {
            argv.extend([flag.to_string(), value]);
        }
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
        self.child = Some(child);
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let addr = SocketAddr::from((self.ip, self.client_port));
        let t0 = Instant::now();
        loop {
            if health(addr) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "etcd exited with {status} before answering; log:\n{}",
                    self.log_tail(4000)
                );
            }
            if t0.elapsed() > START_TIMEOUT {
                self.kill();
                panic!(
                    "etcd not healthy within {START_TIMEOUT:?}; log:\n{}",
                    self.log_tail(4000)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that is free now: from the OS on `ip`, or on loopback if `ip` is not an address
/// of this namespace (etcd may run in another).
fn free_port(ip: Ipv4Addr) -> u16 {
    let l = TcpListener::bind((ip, 0))
        .or_else(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .expect("bind for a free port");
    l.local_addr().expect("local addr").port()
}

/// True once `GET /health` says `"health":"true"` (etcd has a leader).
fn health(addr: SocketAddr) -> bool {
    let probe = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    };
    probe().is_ok_and(|r| r.starts_with("HTTP/1.1 200") && r.contains(r#""health":"true""#))
}
