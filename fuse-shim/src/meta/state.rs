//! The namespace in memory: inodes, directory entries and xattrs, changed only by
//! applying records (at replay and after validation), so memory and log never diverge.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::record::{InodeRec, Kind, Record};
use crate::error::{Error, Result};

pub const ROOT_INO: u64 = 1;

/// A directory's entries: a hash map for lookup and cookie order for readdir, so a
/// listing interleaved with creates and unlinks never repeats or skips an entry that
/// stays. Cookies live only in memory; 1 and 2 are `.` and `..`.
#[derive(Debug, Default)]
pub struct Dir {
    pub entries: FxHashMap<Box<[u8]>, (u64, u64)>,
    pub by_cookie: BTreeMap<u64, Box<[u8]>>,
    next_cookie: u64,
}

impl Dir {
    fn insert(&mut self, name: &[u8], ino: u64) {
        if let Some(e) = self.entries.get_mut(name) {
            e.0 = ino;
            return;
        }
        let cookie = self.next_cookie.max(3);
        self.next_cookie = cookie + 1;
        let name: Box<[u8]> = name.into();
        self.by_cookie.insert(cookie, name.clone());
        self.entries.insert(name, (ino, cookie));
    }
    fn remove(&mut self, name: &[u8]) -> Option<u64> {
        let (ino, cookie) = self.entries.remove(name)?;
        self.by_cookie.remove(&cookie);
        Some(ino)
    }
    pub fn get(&self, name: &[u8]) -> Option<u64> {
        self.entries.get(name).map(|e| e.0)
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One inode in memory.
#[derive(Debug)]
pub struct Node {
    pub rec: InodeRec,
    pub dir: Option<Dir>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Open file handles, and references the kernel holds (lookups not yet forgotten):
    /// an unlinked inode lives while either is above 0.
    pub opens: u32,
    pub lookups: u64,
    /// Attributes changed in memory (size, times) and not yet in the log.
    pub dirty: bool,
    /// Orders data-path changes of this file: block-aligned writes share it (they
    /// touch whole blocks only, so they can run side by side, e.g. the kernel's
    /// writeback); writes that read-modify-write a partial block, truncates and
    /// fallocate take it alone.
    pub io: Arc<std::sync::RwLock<()>>,
    /// Blob tier (see `meta::blob`): written since the last close or fsync, so the
    /// uploader leaves it alone until its writer is done.
    pub written_unsynced: bool,
    /// The blob holds this file's content and the log says so: the next data change
    /// must first log that it no longer does.
    pub blob_clean: bool,
    /// The log position of the record saying the blob is stale (0: none queued).
    pub blob_stale_lsn: u64,
    /// The uploader is sending this file now.
    pub blob_flushing: bool,
    /// When the uploader last recorded a blob for it (a listing begun earlier may
    /// show the blob before that upload: it is not a change behind Spool's back).
    pub blob_marked_ns: i64,
    /// Last read (cache-on-read: eviction takes the least recently used first).
    pub used_ns: i64,
}

impl Node {
    pub fn in_use(&self) -> bool {
        self.opens > 0 || self.lookups > 0
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub nodes: FxHashMap<u64, Node>,
    /// Next inode number to hand out: above every inode ever created, since a
    /// checkpoint keeps it (`NextIno`) and replayed inode records raise it, so numbers
    /// of deleted inodes are never reused.
    pub next_ino: u64,
}

impl State {
    pub fn node(&self, ino: u64) -> Result<&Node> {
        self.nodes.get(&ino).ok_or(Error::Errno(libc::ENOENT))
    }
    pub fn node_mut(&mut self, ino: u64) -> Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Error::Errno(libc::ENOENT))
    }
    pub fn dir(&self, ino: u64) -> Result<&Dir> {
        self.node(ino)?
            .dir
            .as_ref()
            .ok_or(Error::Errno(libc::ENOTDIR))
    }

    /// Applies one record. Replay calls this for every record in order; live ops call
    /// it for the records they log, after validating them.
    pub fn apply(&mut self, r: &Record) -> Result<()> {
        match r {
            Record::Inode(rec) => {
                let n = self.nodes.entry(rec.ino).or_insert_with(|| Node {
                    rec: rec.clone(),
                    dir: (rec.kind == Kind::Dir).then(Dir::default),
                    xattrs: BTreeMap::new(),
                    opens: 0,
                    lookups: 0,
                    dirty: false,
                    io: Arc::default(),
                    written_unsynced: false,
                    blob_clean: false,
                    blob_stale_lsn: 0,
                    blob_flushing: false,
                    blob_marked_ns: 0,
                    used_ns: 0,
                });
                if n.rec.kind != rec.kind {
                    return Err(Error::corrupt(
                        "record",
                        format!("inode {} changes kind", rec.ino),
                    ));
                }
                n.rec = rec.clone();
                self.next_ino = self.next_ino.max(rec.ino + 1);
            }
            Record::InodeDel { ino } => {
                self.nodes.remove(ino);
            }
            Record::Dentry { dir, name, ino } => {
                let d = self
                    .nodes
                    .get_mut(dir)
                    .and_then(|n| n.dir.as_mut())
                    .ok_or_else(|| {
                        Error::corrupt("record", format!("entry in missing directory {dir}"))
                    })?;
                d.insert(name, *ino);
            }
            Record::DentryDel { dir, name } => {
                if let Some(d) = self.nodes.get_mut(dir).and_then(|n| n.dir.as_mut()) {
                    d.remove(name);
                }
            }
            Record::Xattr { ino, name, value } => {
                if let Some(n) = self.nodes.get_mut(ino) {
                    n.xattrs.insert(name.clone(), value.clone());
                }
            }
            Record::XattrDel { ino, name } => {
                if let Some(n) = self.nodes.get_mut(ino) {
                    n.xattrs.remove(name);
                }
            }
            Record::NextIno { next } => {
                self.next_ino = self.next_ino.max(*next);
            }
        }
        Ok(())
    }

    /// The whole state as records (a checkpoint): inodes first (parents before
    /// children is not needed: entries come after every inode), then entries, xattrs
    /// and the inode high-water mark.
    pub fn to_records(&self, out: &mut Vec<Record>) {
        let mut inos: Vec<u64> = self.nodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in &inos {
            out.push(Record::Inode(self.nodes[ino].rec.clone()));
        }
        for ino in &inos {
            let n = &self.nodes[ino];
            if let Some(d) = &n.dir {
                for name in d.by_cookie.values() {
                    out.push(Record::Dentry {
                        dir: *ino,
                        name: name.to_vec(),
                        ino: d.entries[name].0,
                    });
                }
            }
            for (name, value) in &n.xattrs {
                out.push(Record::Xattr {
                    ino: *ino,
                    name: name.clone(),
                    value: value.clone(),
                });
            }
        }
        out.push(Record::NextIno {
            next: self.next_ino,
        });
    }
}
