//! `[blob]`: the object store the mount drains to (docs/BLOB.md).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ByteSize;

/// Object store backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobBackend {
    /// Azure Blob Storage (or Azurite): `account`, `container`, credentials.
    Azure,
    /// S3 or an S3-compatible server: `container` is the bucket; `region`, `endpoint`.
    S3,
    /// A directory (tests, or a shared filesystem): `path`.
    Local,
}

/// What the mount does with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BlobMode {
    /// Files drain to the store in the background after close or fsync plus
    /// `writeback_delay_ms`.
    #[default]
    Writeback,
    /// Nothing is uploaded.
    CacheOnly,
}

/// `[blob]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobConfig {
    pub backend: BlobBackend,
    #[serde(default)]
    pub mode: BlobMode,
    /// Azure: the container; S3: the bucket. It must exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Azure: the storage account. Default: `AZURE_STORAGE_ACCOUNT_NAME` from the
    /// environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Azure: the account URL, e.g. `http://127.0.0.1:10000/devstoreaccount1` for
    /// Azurite. Default: `https://ACCOUNT.blob.core.windows.net`. S3: the server's URL
    /// for an S3-compatible server (path-style requests). Default: AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Azure: a file holding the account key. S3: a file holding the access key id
    /// and the secret access key, one per line. Without it (and without `sas_file`),
    /// credentials come from the environment as the cloud's SDKs read them (Azure:
    /// account key, SAS, managed identity, AKS workload identity; S3: AWS_* variables,
    /// web identity, instance metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Azure: a file holding a SAS token (the query string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sas_file: Option<PathBuf>,
    /// S3: the region (default: AWS_REGION from the environment, else us-east-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Local: the directory (it must exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Keys are this prefix plus the path in the mount (`a/b.bin`); empty or ending
    /// in `/`.
    #[serde(default)]
    pub prefix: String,
    /// How long a file rests after its last change (and close or fsync) before it
    /// uploads, 0..86400000 (default 2000).
    #[serde(default = "d_delay")]
    pub writeback_delay_ms: u64,
    /// Bytes per block of a large file's upload, 1MiB..100MiB (S3: 5MiB..100MiB; default
    /// 8MiB). Files up to this size go in one request.
    #[serde(default = "d_part")]
    pub part_size: ByteSize,
    /// Blocks of one file in flight at once, 1..64 (default 4). Memory held by uploads
    /// is at most `files_in_flight x parts_in_flight x part_size`.
    #[serde(default = "d_parts")]
    pub parts_in_flight: usize,
    /// Files uploading at once, 1..64 (default 4).
    #[serde(default = "d_files")]
    pub files_in_flight: usize,
    /// How often the namespace is scanned for dirty files, 100..600000 (default 1000).
    #[serde(default = "d_scan")]
    pub scan_interval_ms: u64,
    /// Longest wait between retries of a failing upload, 100..3600000 (default 30000);
    /// waits double from 250 ms with jitter.
    #[serde(default = "d_retry")]
    pub retry_delay_max_ms: u64,
    /// How long a clean shutdown keeps uploading dirty files, 0..86400000 (default
    /// 60000); what is left uploads after the next start.
    #[serde(default = "d_shutdown")]
    pub shutdown_flush_ms: u64,
    /// Cache-on-read: objects of the container under the prefix appear in the mount
    /// and are fetched on first read (default true).
    #[serde(default = "d_true")]
    pub read_through: bool,
    /// How long a directory's listing of the container stays fresh, 0..86400000
    /// (default 10000; 0 lists at every lookup).
    #[serde(default = "d_ttl")]
    pub listing_ttl_ms: u64,
    /// Chunks fetched ahead of a sequential reader, 0..64 (default 4).
    #[serde(default = "d_prefetch")]
    pub prefetch_chunks: u32,
    /// How long one fetch or listing may take, retries included, before the read
    /// fails with EIO, 1000..600000 (default 30000).
    #[serde(default = "d_fetch_timeout")]
    pub fetch_timeout_ms: u64,
    /// Cache use (percent of the device) above which clean chunks (in blob, so
    /// fetched again on demand) are evicted, least recently used first, down to
    /// `evict_low_pct`; 1..100 (default 90). Needs `read_through`.
    #[serde(default = "d_high")]
    pub evict_high_pct: u8,
    /// 0..`evict_high_pct` - 1 (default 80).
    #[serde(default = "d_low")]
    pub evict_low_pct: u8,
    /// How long a write that finds the cache full waits for eviction and uploads
    /// before it fails with ENOSPC, 0..600000 (default 10000).
    #[serde(default = "d_space_wait")]
    pub space_wait_ms: u64,
}

impl BlobBackend {
    pub fn name(self) -> &'static str {
        match self {
            BlobBackend::Azure => "azure",
            BlobBackend::S3 => "s3",
            BlobBackend::Local => "local",
        }
    }
}

fn d_delay() -> u64 {
    2000
}
fn d_part() -> ByteSize {
    ByteSize::mib(8)
}
fn d_parts() -> usize {
    4
}
fn d_files() -> usize {
    4
}
fn d_scan() -> u64 {
    1000
}
fn d_retry() -> u64 {
    30_000
}
fn d_shutdown() -> u64 {
    60_000
}
fn d_true() -> bool {
    true
}
fn d_ttl() -> u64 {
    10_000
}
fn d_prefetch() -> u32 {
    4
}
fn d_fetch_timeout() -> u64 {
    30_000
}
fn d_high() -> u8 {
    90
}
fn d_low() -> u8 {
    80
}
fn d_space_wait() -> u64 {
    10_000
}

fn range(p: &mut Vec<String>, key: &str, v: u64, min: u64, max: u64) {
    if !(min..=max).contains(&v) {
        p.push(format!("blob.{key} = {v}: must be between {min} and {max}"));
    }
}

impl BlobConfig {
    pub(super) fn check(&self, p: &mut Vec<String>) {
        range(
            p,
            "writeback_delay_ms",
            self.writeback_delay_ms,
            0,
            86_400_000,
        );
        range(p, "parts_in_flight", self.parts_in_flight as u64, 1, 64);
        range(p, "files_in_flight", self.files_in_flight as u64, 1, 64);
        range(p, "scan_interval_ms", self.scan_interval_ms, 100, 600_000);
        range(
            p,
            "retry_delay_max_ms",
            self.retry_delay_max_ms,
            100,
            3_600_000,
        );
        range(
            p,
            "shutdown_flush_ms",
            self.shutdown_flush_ms,
            0,
            86_400_000,
        );
        range(p, "listing_ttl_ms", self.listing_ttl_ms, 0, 86_400_000);
        range(p, "prefetch_chunks", u64::from(self.prefetch_chunks), 0, 64);
        range(p, "fetch_timeout_ms", self.fetch_timeout_ms, 1000, 600_000);
        range(p, "evict_high_pct", u64::from(self.evict_high_pct), 1, 100);
        if self.evict_low_pct >= self.evict_high_pct {
            p.push(format!(
                "blob.evict_low_pct = {}: must be below blob.evict_high_pct = {}",
                self.evict_low_pct, self.evict_high_pct
            ));
        }
        range(p, "space_wait_ms", self.space_wait_ms, 0, 600_000);
        let part = self.part_size.0;
        if !(1 << 20..=100 << 20).contains(&part) {
            p.push(format!(
                "blob.part_size = {}: must be between 1MiB and 100MiB",
                self.part_size
            ));
        }
        if !self.prefix.is_empty() && !self.prefix.ends_with('/') {
            p.push(format!(
                "blob.prefix = {:?}: must be empty or end with '/'",
                self.prefix
            ));
        }
        if self.prefix.starts_with('/') || self.prefix.contains("//") {
            p.push(format!(
                "blob.prefix = {:?}: must not start with '/' or hold an empty segment",
                self.prefix
            ));
        }
        let cloud = matches!(self.backend, BlobBackend::Azure | BlobBackend::S3);
        if cloud && self.container.as_deref().is_none_or(str::is_empty) {
            p.push(format!(
                "blob.container: required for backend = \"{}\" (the {})",
                self.backend.name(),
                if self.backend == BlobBackend::S3 {
                    "bucket"
                } else {
                    "container"
                }
            ));
        }
        if cloud && self.path.is_some() {
            p.push("blob.path: only for backend = \"local\"".to_owned());
        }
        if let Some(e) = self.endpoint.as_ref().filter(|_| cloud) {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                p.push(format!(
                    "blob.endpoint = {e:?}: must be an http:// or https:// URL"
                ));
            }
        }
        if self.backend != BlobBackend::Azure {
            for (key, set) in [
                ("account", self.account.is_some()),
                ("sas_file", self.sas_file.is_some()),
            ] {
                if set {
                    p.push(format!("blob.{key}: only for backend = \"azure\""));
                }
            }
        }
        if self.backend != BlobBackend::S3 && self.region.is_some() {
            p.push("blob.region: only for backend = \"s3\"".to_owned());
        }
        match self.backend {
            BlobBackend::S3 => {
                if part < 5 << 20 {
                    p.push(format!(
                        "blob.part_size = {}: S3 needs parts of at least 5MiB",
                        self.part_size
                    ));
                }
            }
            BlobBackend::Azure => {
                if self.key_file.is_some() && self.sas_file.is_some() {
                    p.push("blob.sas_file: give key_file or sas_file, not both".to_owned());
                }
            }
            BlobBackend::Local => match &self.path {
                Some(d) if d.is_absolute() => {}
                Some(d) => p.push(format!(
                    "blob.path = {:?}: must be an absolute path",
                    d.display().to_string()
                )),
                None => p.push("blob.path: required for backend = \"local\"".to_owned()),
            },
        }
    }
}
