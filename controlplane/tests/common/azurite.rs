//! A real Azurite (the Azure Storage emulator, from npm) for tests, with the Azure SDK
//! for Python as the independent client that checks what Spool uploaded. Both are
//! installed by deploy/install-deps.sh into $SPOOL_TOOLS_DIR (default /opt/spool-tools).
//! Dropping the server kills it, so a failing test leaves nothing running.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Azurite's well-known account key (public: the same in every Azurite).
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";

pub fn tools_dir() -> PathBuf {
    std::env::var_os("SPOOL_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/spool-tools"))
}

pub fn tool(rel: &str) -> PathBuf {
    let p = tools_dir().join(rel);
    assert!(
        p.exists(),
        "{} is missing: run deploy/install-deps.sh (it installs Azurite and the Azure SDK for Python there)",
        p.display()
    );
    p
}

/// One Azurite blob service (or none, between `stop` and `start_again`).
#[derive(Debug)]
pub struct Azurite {
    host: Ipv4Addr,
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
    // Last, so the data goes after the process is dead.
    dir: tempfile::TempDir,
}

impl Azurite {
    /// Starts Azurite on a free loopback port with its data in a tempdir.
    pub fn start() -> Azurite {
        Azurite::start_on(Ipv4Addr::LOCALHOST)
    }

    /// Starts Azurite listening on `host` (`0.0.0.0`: also reachable from network
    /// namespaces through the host's address).
    pub fn start_on(host: Ipv4Addr) -> Azurite {
        let dir = tempfile::tempdir_in("/tmp").expect("azurite tempdir");
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut a = Azurite {
            host,
            port,
            child: None,
            log: dir.path().join("azurite.log"),
            dir,
        };
        a.start_again();
        a
    }

    /// (Re)starts the process on the same port and data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "azurite already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("azurite log");
        let child = Command::new(tool("azurite/node_modules/.bin/azurite-blob"))
            .args([
                "--blobHost",
                &self.host.to_string(),
                "--blobPort",
                &self.port.to_string(),
            ])
            .arg("--location")
            .arg(self.dir.path().join("data"))
            // The access log (one line per request) goes to `access.log`: tests
            // count requests from it, independently of the daemon's counters.
            .args(["--skipApiVersionCheck", "--disableTelemetry"])
            .stdout(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path().join("access.log"))
                    .expect("azurite access log"),
            )
            .stderr(log)
            .spawn()
            .expect("spawn azurite-blob");
        self.child = Some(child);
        let t0 = Instant::now();
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "azurite exited with {st}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "azurite did not listen on port {} within 30 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the process (the outage); its data stays for `start_again`. SIGTERM,
    /// not SIGKILL: Azurite keeps its metadata in memory and saves it at exit, so a
    /// SIGKILL can lose a container created just before.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let t0 = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Requests Azurite answered so far whose request line (`METHOD PATH`, the path
    /// starting at the account) starts with `method_path`, e.g.
    /// `GET /devstoreaccount1/ckpt/job-7/model.bin` (query strings included).
    pub fn requests(&self, method_path: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        log.lines()
            .filter_map(|l| l.split('"').nth(1))
            .filter(|req| {
                req.strip_prefix(method_path)
                    .is_some_and(|rest| rest.starts_with([' ', '?']))
            })
            .count()
    }

    /// The account URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port)
    }

    /// Runs the independent client (tests/blob/azcheck.py) on `container`.
    pub fn az(&self, container: &str, args: &[&str]) -> String {
        checker("azcheck.py", &self.endpoint(), container, args)
    }

    /// Blobs of `container` as (name, size, sha256, etag), sorted by name.
    pub fn list(&self, container: &str) -> Vec<(String, u64, String, String)> {
        parse_listing(&self.az(container, &["list"]))
    }

    /// A `[blob]` config section for this server (the account key in a file), with
    /// `more` keys.
    pub fn blob_config(&self, container: &str, more: &str) -> String {
        self.blob_config_at(&self.endpoint(), container, more)
    }

    /// The same, with the server reached at `endpoint` (e.g. through another address).
    pub fn blob_config_at(&self, endpoint: &str, container: &str, more: &str) -> String {
        let key_file = self.dir.path().join("account.key");
        std::fs::write(&key_file, AZURITE_KEY).expect("key file");
        format!(
            "[blob]\nbackend = \"azure\"\ncontainer = \"{container}\"\naccount = \"{AZURITE_ACCOUNT}\"\n\
             endpoint = \"{endpoint}\"\nkey_file = \"{}\"\n{more}\n",
            key_file.display()
        )
    }
}

/// Runs tests/blob/SCRIPT (an independent client, in the tools venv) with the
/// server's endpoint and a container or bucket; its standard output.
pub fn checker(script: &str, endpoint: &str, container: &str, args: &[&str]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/blob")
        .join(script);
    let out = Command::new(tool("venv/bin/python"))
        .arg(path)
        .arg(endpoint)
        .arg(container)
        .args(args)
        .output()
        .expect("run a blob checker");
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A checker's `list` output (`NAME SIZE SHA256 ETAG` lines), sorted by name.
pub fn parse_listing(text: &str) -> Vec<(String, u64, String, String)> {
    let mut v: Vec<_> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 4, "listing line {l:?}");
            (
                f[0].to_owned(),
                f[1].parse().expect("size"),
                f[2].to_owned(),
                f[3].to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}
