//! What the namespace keeps for the blob tier (the uploader itself runs in the control
//! plane): which blob holds each file's content, and which blobs are left to delete.
//!
//! - A file's blob state is an internal xattr (`spool.blob`) holding the key it was
//!   uploaded to, the blob's ETag, and the file's size and ctime at that upload. The
//!   file is clean while its ctime and path still match; any change (data, attributes,
//!   a rename) makes it dirty, so the scan finds it again. Nothing about a file's blob
//!   lives outside the log, so a restart resumes exactly where the uploader stopped.
//! - Before the first data change after an upload, the write path logs that the blob
//!   is stale (`touch`), durably, before the data lands: a crash after a write whose
//!   size and times never reached the log cannot leave a file that looks clean while
//!   the cache and the blob differ.
//! - When a file with a blob loses its last name, the same commit leaves a tombstone
//!   on the root (`spool.gone.*`, value: the key); when a file's blob moves to another
//!   key, the old key gets one in the commit that records the new. The uploader
//!   deletes those blobs, then the tombstones.
//! - Internal xattrs (`spool.` names, which the kernel never passes through from a
//!   user) are hidden from listxattr; `user.spool.state` is a read-only view of the
//!   file's state: `dirty`, `flushing` or `in-blob etag=... key=...`.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::record::{Kind, Record};
use super::state::{State, ROOT_INO};
use super::{now_ns, Namespace};
use crate::error::{errno, Result};

/// The blob state of a file.
pub const BLOB_XATTR: &[u8] = b"spool.blob";
/// Tombstones on the root: `spool.gone.<ino>.<ns>` = key.
pub const GONE_PREFIX: &[u8] = b"spool.gone.";
/// Names of internal xattrs.
pub const INTERNAL_PREFIX: &[u8] = b"spool.";
/// The read-only state view.
pub const STATE_XATTR: &[u8] = b"user.spool.state";
/// A directory's mode for the files below it (`writeback` or `cache-only`),
/// overriding the mount's; the nearest directory that sets it wins.
pub const MODE_XATTR: &[u8] = b"user.spool.mode";
/// A blob state whose file changed after the upload: never equals a real ctime.
const CTIME_STALE: i64 = i64::MIN;

/// Which blob holds a file's content, as of one upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobState {
    /// The key (the mount path, under the configured prefix) uploaded to.
    pub key: String,
    pub etag: String,
    pub size: u64,
    /// The file's ctime when its upload began; `CTIME_STALE` once it changed.
    pub ctime_ns: i64,
}

impl BlobState {
    pub(crate) fn decode(v: &[u8]) -> Option<BlobState> {
        serde_json::from_slice(v).ok()
    }
    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A regular file as the uploader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobFile {
    pub ino: u64,
    /// The path below the mount root, `/`-separated; `None` when a name on it is not
    /// UTF-8 (blob keys are), so the file cannot be uploaded.
    pub path: Option<String>,
    pub size: u64,
    pub ctime_ns: i64,
    /// Written since its last close or fsync: its writer is not done.
    pub writing: bool,
    pub flushing: bool,
    /// The last upload, if any.
    pub uploaded: Option<BlobState>,
    /// A directory above it says `user.spool.mode = cache-only` (nearest wins): it is
    /// never uploaded.
    pub cache_only: bool,
}

impl BlobFile {
    /// Its blob does not hold its content at its path.
    pub fn is_dirty(&self) -> bool {
        match (&self.uploaded, &self.path) {
            (Some(u), Some(p)) => u.ctime_ns != self.ctime_ns || u.key != *p,
            _ => true,
        }
    }
}

/// One scan: every regular file reachable from the root, and the blobs left to delete.
#[derive(Clone, Debug, Default)]
pub struct BlobScan {
    pub files: Vec<BlobFile>,
    /// (tombstone name, key).
    pub gone: Vec<(Vec<u8>, String)>,
}

/// The tombstone record for a file's blob, if it has one.
pub(crate) fn tombstone(st: &State, ino: u64) -> Option<Record> {
    let v = st.nodes.get(&ino)?.xattrs.get(BLOB_XATTR)?;
    let s = BlobState::decode(v)?;
    Some(gone_record(ino, s.key))
}

fn gone_record(ino: u64, key: String) -> Record {
    let mut name = GONE_PREFIX.to_vec();
    name.extend_from_slice(format!("{ino:x}.{:x}", now_ns()).as_bytes());
    Record::Xattr {
        ino: ROOT_INO,
        name,
        value: key.into_bytes(),
    }
}

impl Namespace {
    /// Largest read one call should ask for (one DMA buffer).
    pub fn io_size_max(&self) -> u64 {
        u64::from(self.io.io_size_max)
    }

    /// The control plane runs an uploader for this namespace (turns on the state view).
    pub fn blob_enable(&self) {
        self.blob_on.store(true, Ordering::Relaxed);
    }

    pub fn blob_enabled(&self) -> bool {
        self.blob_on.load(Ordering::Relaxed)
    }

    /// After replay: a file is clean in blob when its logged state matches it.
    pub(crate) fn blob_after_load(st: &mut State) {
        for n in st.nodes.values_mut() {
            n.blob_clean = n
                .xattrs
                .get(BLOB_XATTR)
                .and_then(|v| BlobState::decode(v))
                .is_some_and(|s| s.ctime_ns == n.rec.ctime_ns);
        }
    }

    /// Called before a data change of `ino`: logs, durably, that its blob is stale.
    /// Every writer waits for that record (not just the one that queued it), so no
    /// change is acknowledged before the log knows the blob is stale. It also marks the
    /// file as being written, under the lock, so an upload that began before this
    /// change cannot be recorded as holding the content (`blob_mark`).
    ///
    /// With cache-on-read, the caller holds the file's io lock: chunks below
    /// `keep_below` are fetched first (the file stops being a copy of its blob, so
    /// nothing may be left to fetch), and fills still running end before it returns.
    pub(crate) fn blob_touch(&self, ino: u64, keep_below: u64) -> Result<()> {
        let mut st = self.lock();
        let mut hydrated = false;
        if st.node(ino).is_ok_and(|n| n.blob_clean) && self.reader().is_some() {
            // Only the first change of a clean file pays this (the io lock is held,
            // so it stays clean until this returns).
            drop(st);
            self.blob_hydrate(ino, keep_below)?;
            hydrated = true;
            st = self.lock();
        }
        let r = self.blob_touch_log(st, ino);
        if hydrated {
            // Fills past `keep_below` may still run (a truncate): let them land first.
            self.blob_quiesce(ino);
        }
        r
    }

    fn blob_touch_log(&self, mut st: std::sync::MutexGuard<'_, State>, ino: u64) -> Result<()> {
        let Ok(n) = st.node_mut(ino) else {
            return Ok(());
        };
        n.written_unsynced = true;
        let lsn = if n.blob_clean {
            n.blob_clean = false;
            let Some(mut s) = n.xattrs.get(BLOB_XATTR).and_then(|v| BlobState::decode(v)) else {
                return Ok(());
            };
            s.ctime_ns = CTIME_STALE;
            let rec = Record::Xattr {
                ino,
                name: BLOB_XATTR.to_vec(),
                value: s.encode(),
            };
            let lsn = self.log.append(std::slice::from_ref(&rec))?;
            st.apply(&rec)?;
            if let Ok(n) = st.node_mut(ino) {
                n.blob_stale_lsn = lsn;
            }
            lsn
        } else {
            n.blob_stale_lsn
        };
        drop(st);
        if lsn != 0 {
            self.log.wait(lsn)?;
        }
        Ok(())
    }

    /// Every regular file reachable from the root with its path and blob state, and
    /// the tombstones. Directories are walked breadth-first; each is visited once
    /// (directories have one parent), a file with several names once, at the first.
    pub fn blob_scan(&self) -> BlobScan {
        let st = self.lock();
        let mut out = BlobScan::default();
        let mut seen = rustc_hash::FxHashSet::default();
        let mode_of = |ino: u64, inherited: bool| match st
            .nodes
            .get(&ino)
            .and_then(|n| n.xattrs.get(MODE_XATTR))
            .map(Vec::as_slice)
        {
            Some(b"cache-only") => true,
            Some(b"writeback") => false,
            _ => inherited,
        };
        let mut dirs: Vec<(u64, String, bool)> =
            vec![(ROOT_INO, String::new(), mode_of(ROOT_INO, false))];
        let mut i = 0;
        while i < dirs.len() {
            // Bounded: every directory is pushed at most once (one parent each).
            assert!(
                dirs.len() <= st.nodes.len(),
                "directory walk exceeds inode count"
            );
            let (dir, prefix, cache_only) = dirs[i].clone();
            i += 1;
            let Some(d) = st.nodes.get(&dir).and_then(|n| n.dir.as_ref()) else {
                continue;
            };
            for name in d.by_cookie.values() {
                let Some(ino) = d.get(name) else { continue };
                let Some(n) = st.nodes.get(&ino) else {
                    continue;
                };
                let path = std::str::from_utf8(name)
                    .ok()
                    .map(|s| format!("{prefix}{s}"));
                match n.rec.kind {
                    Kind::Dir => {
                        if let Some(p) = path {
                            dirs.push((ino, format!("{p}/"), mode_of(ino, cache_only)));
                        } else {
                            tracing::warn!(
                                dir = ino,
                                "a directory name is not UTF-8; its files are not uploaded"
                            );
                        }
                    }
                    Kind::File if seen.insert(ino) => out.files.push(BlobFile {
                        ino,
                        path,
                        size: n.rec.size,
                        ctime_ns: n.rec.ctime_ns,
                        writing: n.written_unsynced,
                        flushing: n.blob_flushing,
                        uploaded: n.xattrs.get(BLOB_XATTR).and_then(|v| BlobState::decode(v)),
                        cache_only,
                    }),
                    _ => {}
                }
            }
        }
        if let Some(root) = st.nodes.get(&ROOT_INO) {
            for (name, value) in root.xattrs.range(GONE_PREFIX.to_vec()..) {
                if !name.starts_with(GONE_PREFIX) {
                    break;
                }
                if let Ok(k) = std::str::from_utf8(value) {
                    out.gone.push((name.clone(), k.to_owned()));
                }
            }
        }
        out
    }

    /// A truncate or fallocate finished: durable by itself, like a close.
    pub(crate) fn blob_synced(&self, ino: u64) {
        if let Ok(n) = self.lock().node_mut(ino) {
            n.written_unsynced = false;
        }
    }

    /// Marks `ino` as being uploaded (or no longer); shown by the state view.
    pub fn blob_set_flushing(&self, ino: u64, on: bool) {
        if let Ok(n) = self.lock().node_mut(ino) {
            n.blob_flushing = on;
        }
    }

    /// Records an upload of `ino` that began when its ctime was `state.ctime_ns` and
    /// its path `state.key`. Returns false (and records nothing) when the file changed
    /// or is gone since: the blob may not hold its content, so it stays dirty. A
    /// previous blob at another key gets a tombstone in the same commit.
    pub fn blob_mark(&self, ino: u64, state: &BlobState) -> Result<bool> {
        let mut st = self.lock();
        let Ok(n) = st.node_mut(ino) else {
            return Ok(false);
        };
        if n.rec.ctime_ns != state.ctime_ns || n.rec.nlink == 0 || n.written_unsynced {
            return Ok(false);
        }
        let old = n.xattrs.get(BLOB_XATTR).and_then(|v| BlobState::decode(v));
        n.blob_clean = true;
        n.blob_marked_ns = now_ns();
        let mut recs = vec![Record::Xattr {
            ino,
            name: BLOB_XATTR.to_vec(),
            value: state.encode(),
        }];
        if let Some(o) = old.filter(|o| o.key != state.key) {
            recs.push(gone_record(ino, o.key));
        }
        self.commit(st, recs)?;
        Ok(true)
    }

    /// Drops tombstones whose blobs are deleted (or must stay: a live file has the key).
    pub fn blob_forget_gone(&self, names: &[Vec<u8>]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let st = self.lock();
        let recs = names
            .iter()
            .map(|name| Record::XattrDel {
                ino: ROOT_INO,
                name: name.clone(),
            })
            .collect();
        self.commit(st, recs)
    }

    /// The `user.spool.state` view of `ino`, when the blob tier runs.
    pub(crate) fn blob_state_view(&self, st: &State, ino: u64) -> Option<Vec<u8>> {
        if !self.blob_enabled() {
            return None;
        }
        let n = st.nodes.get(&ino)?;
        if n.rec.kind != Kind::File {
            return None;
        }
        let s = n.xattrs.get(BLOB_XATTR).and_then(|v| BlobState::decode(v));
        let text = match s {
            _ if n.blob_flushing => "flushing".to_owned(),
            Some(s) if s.ctime_ns == n.rec.ctime_ns => {
                // ETags travel quoted in HTTP; Azure's tools show them bare.
                format!("in-blob etag={} key={}", s.etag.trim_matches('"'), s.key)
            }
            _ => "dirty".to_owned(),
        };
        Some(text.into_bytes())
    }

    /// xattr names a user may not set or remove.
    pub(crate) fn xattr_reserved(name: &[u8]) -> Result<()> {
        if name.starts_with(INTERNAL_PREFIX) || name == STATE_XATTR {
            return errno(libc::EPERM);
        }
        Ok(())
    }

    /// `user.spool.mode` goes on directories only, with a mode's name.
    pub(crate) fn xattr_check_value(st: &State, ino: u64, name: &[u8], value: &[u8]) -> Result<()> {
        if name != MODE_XATTR {
            return Ok(());
        }
        if st.node(ino)?.rec.kind != Kind::Dir {
            return errno(libc::EINVAL);
        }
        match value {
            b"writeback" | b"cache-only" => Ok(()),
            _ => errno(libc::EINVAL),
        }
    }
}
