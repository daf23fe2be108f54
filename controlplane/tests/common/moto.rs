//! A real S3 server for tests: moto's server (PyPI, in $SPOOL_TOOLS_DIR/venv), with
//! boto3 as the independent client (tests/blob/s3check.py). Dropping it kills it.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::azurite::{checker, parse_listing, tool};

/// The credentials the tests give both sides (moto accepts any).
pub const S3_KEY_ID: &str = "spooltest";
pub const S3_SECRET: &str = "spooltestsecret";

#[derive(Debug)]
pub struct Moto {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Moto {
    pub fn start() -> Moto {
        let dir = tempfile::tempdir_in("/tmp").expect("moto tempdir");
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = std::fs::File::create(dir.path().join("moto.log")).expect("moto log");
        let mut child = Command::new(tool("venv/bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn moto_server");
        let t0 = Instant::now();
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("moto_server exited with {st}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "moto_server did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto { port, child, dir }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs tests/blob/s3check.py on `bucket`.
    pub fn s3(&self, bucket: &str, args: &[&str]) -> String {
        checker("s3check.py", &self.endpoint(), bucket, args)
    }

    /// Objects of `bucket` as (key, size, sha256, etag), sorted by key.
    pub fn list(&self, bucket: &str) -> Vec<(String, u64, String, String)> {
        parse_listing(&self.s3(bucket, &["list"]))
    }

    /// A `[blob]` section for this server, with `more` keys.
    pub fn blob_config(&self, bucket: &str, more: &str) -> String {
        let key_file = self.dir.path().join("s3.key");
        std::fs::write(&key_file, format!("{S3_KEY_ID}\n{S3_SECRET}\n")).expect("key file");
        format!(
            "[blob]\nbackend = \"s3\"\ncontainer = \"{bucket}\"\nregion = \"us-east-1\"\n\
             endpoint = \"{}\"\nkey_file = \"{}\"\n{more}\n",
            self.endpoint(),
            key_file.display()
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
