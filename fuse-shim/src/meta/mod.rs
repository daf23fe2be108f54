//! The namespace: inodes, directory entries and xattrs, persisted as records in a log
//! on the chunk store (see `log`), held whole in memory (see `state`).
//!
//! Every change follows one protocol: under the namespace lock, validate against the
//! current state (the errno is decided here), queue the records, apply them; then,
//! outside the lock, wait until they are durable and only then reply. Records queue in
//! apply order, so an op that depends on another's effect is always logged after it.

pub mod blob;
pub mod log;
pub mod record;
pub mod remote;
pub mod state;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use self::log::MetaLog;
use self::record::{
    InodeRec, Kind, Record, NAME_MAX_BYTES, SYMLINK_MAX_BYTES, XATTR_NAME_MAX_BYTES,
    XATTR_VALUE_MAX_BYTES,
};
use self::state::{State, ROOT_INO};
use crate::error::{errno, Error, Result};
use crate::io::ChunkIo;

/// Most xattr bytes (names and values) one inode may hold.
const XATTR_INODE_MAX_BYTES: usize = 256 << 10;
/// File inode numbers stay below this; reserved (metadata) inodes use the top bit.
const INO_MAX: u64 = 1 << 56;

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX_BYTES {
        return errno(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return errno(libc::EINVAL);
    }
    Ok(())
}

/// What a new inode is.
#[derive(Clone, Debug)]
pub struct NewNode<'a> {
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub target: &'a [u8],
}

/// One directory entry for readdir.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirEntry {
    pub cookie: u64,
    pub ino: u64,
    pub kind: Kind,
    pub name: Vec<u8>,
}

/// Counters for `status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct NsStatus {
    pub inodes: u64,
    pub dirty_inodes: u64,
    pub orphans: u64,
    pub generation: u64,
    pub log_bytes: u64,
    pub checkpoint_bytes: u64,
    pub failed: bool,
}

#[derive(Debug)]
pub struct Namespace {
    pub(crate) state: Mutex<State>,
    log: MetaLog,
    pub(crate) io: Arc<ChunkIo>,
    pub chunk_size: u64,
    checkpointing: AtomicBool,
    /// The blob tier's uploader runs for this namespace (see `blob`).
    blob_on: AtomicBool,
    /// Cache-on-read from the blob store (see `remote`).
    pub(crate) remote: remote::ReadThrough,
}

impl Namespace {
    /// Loads the namespace from the device (creating it on a fresh one), then finishes
    /// what a crash interrupted: frees unlinked files and purges unacknowledged data
    /// past each file's durable size.
    pub fn open(io: Arc<ChunkIo>) -> Result<Namespace> {
        let (log, loaded) = MetaLog::open(Arc::clone(&io))?;
        let mut st = State::default();
        if loaded.fresh {
            let t = now_ns();
            let root = InodeRec {
                ino: ROOT_INO,
                kind: Kind::Dir,
                perm: 0o755,
                uid: 0,
                gid: 0,
                nlink: 2,
                size: 0,
                alloc_end: 0,
                atime_ns: t,
                mtime_ns: t,
                ctime_ns: t,
                btime_ns: t,
                rdev: 0,
                parent: ROOT_INO,
                target: Vec::new(),
            };
            st.apply(&Record::Inode(root))?;
            st.next_ino = ROOT_INO + 1;
            let mut recs = Vec::new();
            st.to_records(&mut recs);
            let ns_id = rand::random::<u64>() | 1;
            log.create(ns_id, &recs)?;
            tracing::info!(
                ns_id = format_args!("{ns_id:#x}"),
                "created a new namespace"
            );
        } else {
            for r in &loaded.records {
                st.apply(r)?;
            }
        }
        Self::blob_after_load(&mut st);
        if !st.nodes.contains_key(&ROOT_INO) {
            return Err(Error::corrupt("namespace", "no root directory"));
        }
        let chunk_size = u64::from(io.chunk_size);
        let ns = Namespace {
            state: Mutex::new(st),
            log,
            io,
            chunk_size,
            checkpointing: AtomicBool::new(false),
            blob_on: AtomicBool::new(false),
            remote: remote::ReadThrough::default(),
        };
        ns.recover()?;
        Ok(ns)
    }

    fn recover(&self) -> Result<()> {
        let (orphans, purge, dangling) = {
            let st = self.lock();
            let orphans: Vec<u64> = st
                .nodes
                .values()
                .filter(|n| n.rec.nlink == 0 && n.rec.ino != ROOT_INO)
                .map(|n| n.rec.ino)
                .collect();
            let purge: Vec<u64> = st
                .nodes
                .values()
                .filter(|n| n.rec.kind == Kind::File && n.rec.nlink > 0)
                .filter(|n| n.rec.alloc_end > n.rec.size)
                .map(|n| n.rec.ino)
                .collect();
            let mut dangling = Vec::new();
            for n in st.nodes.values() {
                if let Some(d) = &n.dir {
                    for (name, (ino, _)) in &d.entries {
                        if !st.nodes.contains_key(ino) {
                            dangling.push(Record::DentryDel {
                                dir: n.rec.ino,
                                name: name.to_vec(),
                            });
                        }
                    }
                }
            }
            (orphans, purge, dangling)
        };
        if !dangling.is_empty() {
            tracing::error!(
                entries = dangling.len(),
                "directory entries point to missing inodes; removing them"
            );
            let st = self.lock();
            self.commit(st, dangling)?;
        }
        for ino in &orphans {
            self.free_inode(*ino)?;
        }
        for ino in &purge {
            self.purge_past_size(*ino)?;
        }
        if !orphans.is_empty() || !purge.is_empty() {
            tracing::info!(
                orphans = orphans.len(),
                purged = purge.len(),
                "namespace recovery finished"
            );
        }
        self.maybe_checkpoint();
        Ok(())
    }

    /// This copy stops writing its log (see `MetaLog::retire`): in a cluster, before
    /// another copy of the namespace is loaded on this node, or when it moves away.
    /// Calls still running on it fail instead of appending.
    pub fn retire(&self, why: &str) {
        self.log.retire(why);
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `recs`, applies them and waits until they are durable.
    pub(crate) fn commit(&self, mut st: MutexGuard<'_, State>, recs: Vec<Record>) -> Result<()> {
        let lsn = self.log.append(&recs)?;
        for r in &recs {
            if let Err(e) = st.apply(r) {
                // Validated before logging: this is our bug, not the caller's input.
                tracing::error!(error = %e, record = ?r, "applying a validated record failed");
            }
        }
        drop(st);
        self.log.wait(lsn)?;
        self.maybe_checkpoint();
        Ok(())
    }

    fn maybe_checkpoint(&self) {
        if !self.log.wants_checkpoint() || self.checkpointing.swap(true, Ordering::AcqRel) {
            return;
        }
        let st = self.lock();
        let mut recs = Vec::with_capacity(st.nodes.len() * 2 + 1);
        st.to_records(&mut recs);
        let t0 = std::time::Instant::now();
        match self.log.checkpoint(&recs) {
            Ok(()) => tracing::debug!(
                records = recs.len(),
                ms = t0.elapsed().as_millis() as u64,
                "namespace checkpoint"
            ),
            Err(e) => tracing::error!(error = %e, "namespace checkpoint failed"),
        }
        drop(st);
        self.checkpointing.store(false, Ordering::Release);
    }

    /// Writes a checkpoint now (clean unmount: the next start replays nothing).
    pub fn checkpoint_now(&self) -> Result<()> {
        self.flush_dirty()?;
        let st = self.lock();
        let mut recs = Vec::new();
        st.to_records(&mut recs);
        self.log.checkpoint(&recs)
    }

    pub fn status(&self) -> NsStatus {
        let (generation, log_bytes, checkpoint_bytes, failed) = self.log.stats();
        let st = self.lock();
        NsStatus {
            inodes: st.nodes.len() as u64,
            dirty_inodes: st.nodes.values().filter(|n| n.dirty).count() as u64,
            orphans: st.nodes.values().filter(|n| n.rec.nlink == 0).count() as u64,
            generation,
            log_bytes,
            checkpoint_bytes,
            failed,
        }
    }

    // ---- reads ----

    pub fn getattr(&self, ino: u64) -> Result<InodeRec> {
        Ok(self.lock().node(ino)?.rec.clone())
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<InodeRec> {
        if name.len() > NAME_MAX_BYTES {
            return errno(libc::ENAMETOOLONG);
        }
        self.blob_refresh_dir(parent)?;
        let st = self.lock();
        let ino = st
            .dir(parent)?
            .get(name)
            .ok_or(Error::Errno(libc::ENOENT))?;
        Ok(st.node(ino)?.rec.clone())
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.lock();
        let n = st.node(ino)?;
        if n.rec.kind != Kind::Symlink {
            return errno(libc::EINVAL);
        }
        Ok(n.rec.target.clone())
    }

    /// Up to `max` entries after `cookie` (0 = from the start; `.` and `..` are the
    /// caller's).
    pub fn readdir(&self, ino: u64, after: u64, max: usize) -> Result<Vec<DirEntry>> {
        // The first batch of a listing (cookies 1 and 2 are "." and "..").
        if after <= 2 {
            self.blob_refresh_dir(ino)?;
        }
        let st = self.lock();
        let d = st.dir(ino)?;
        let mut out = Vec::with_capacity(max.min(d.len()));
        for (cookie, name) in d.by_cookie.range(after + 1..) {
            if out.len() >= max {
                break;
            }
            let ino = d.entries[name].0;
            let Ok(n) = st.node(ino) else { continue };
            out.push(DirEntry {
                cookie: *cookie,
                ino,
                kind: n.rec.kind,
                name: name.to_vec(),
            });
        }
        Ok(out)
    }

    // ---- namespace changes ----

    fn parent_for_create<'a>(st: &'a State, parent: u64, name: &[u8]) -> Result<&'a InodeRec> {
        check_name(name)?;
        let p = st.node(parent)?;
        let d = p.dir.as_ref().ok_or(Error::Errno(libc::ENOTDIR))?;
        if p.rec.nlink == 0 {
            return errno(libc::ENOENT);
        }
        if d.get(name).is_some() {
            return errno(libc::EEXIST);
        }
        Ok(&p.rec)
    }

    /// create, mkdir, mknod, symlink.
    pub fn create(&self, parent: u64, name: &[u8], new: &NewNode<'_>) -> Result<InodeRec> {
        if new.target.len() > SYMLINK_MAX_BYTES {
            return errno(libc::ENAMETOOLONG);
        }
        let mut st = self.lock();
        let prec = Self::parent_for_create(&st, parent, name)?.clone();
        if st.next_ino >= INO_MAX {
            return errno(libc::ENOSPC);
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        let t = now_ns();
        let is_dir = new.kind == Kind::Dir;
        let rec = InodeRec {
            ino,
            kind: new.kind,
            perm: new.perm & 0o7777,
            uid: new.uid,
            gid: new.gid,
            nlink: if is_dir { 2 } else { 1 },
            size: if new.kind == Kind::Symlink {
                new.target.len() as u64
            } else {
                0
            },
            alloc_end: 0,
            atime_ns: t,
            mtime_ns: t,
            ctime_ns: t,
            btime_ns: t,
            rdev: new.rdev,
            parent: if is_dir { parent } else { 0 },
            target: new.target.to_vec(),
        };
        let mut p = prec;
        p.mtime_ns = t;
        p.ctime_ns = t;
        if is_dir {
            p.nlink += 1;
        }
        let recs = vec![
            Record::Inode(rec.clone()),
            Record::Dentry {
                dir: parent,
                name: name.to_vec(),
                ino,
            },
            Record::Inode(p),
        ];
        self.commit(st, recs)?;
        Ok(rec)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<InodeRec> {
        let st = self.lock();
        let mut p = Self::parent_for_create(&st, newparent, newname)?.clone();
        let n = st.node(ino)?;
        if n.rec.kind == Kind::Dir {
            return errno(libc::EPERM);
        }
        if n.rec.nlink == u32::MAX {
            return errno(libc::EMLINK);
        }
        if n.rec.nlink == 0 {
            return errno(libc::ENOENT);
        }
        let t = now_ns();
        let mut rec = n.rec.clone();
        rec.nlink += 1;
        rec.ctime_ns = t;
        p.mtime_ns = t;
        p.ctime_ns = t;
        let recs = vec![
            Record::Inode(rec.clone()),
            Record::Dentry {
                dir: newparent,
                name: newname.to_vec(),
                ino,
            },
            Record::Inode(p),
        ];
        self.commit(st, recs)?;
        Ok(rec)
    }

    /// unlink (`dir == false`) and rmdir (`dir == true`).
    pub fn remove(&self, parent: u64, name: &[u8], dir: bool) -> Result<()> {
        if name.len() > NAME_MAX_BYTES {
            return errno(libc::ENAMETOOLONG);
        }
        let st = self.lock();
        let p = st.node(parent)?;
        let d = p.dir.as_ref().ok_or(Error::Errno(libc::ENOTDIR))?;
        let ino = d.get(name).ok_or(Error::Errno(libc::ENOENT))?;
        let victim = st.node(ino)?;
        let t = now_ns();
        let mut prec = p.rec.clone();
        prec.mtime_ns = t;
        prec.ctime_ns = t;
        let mut recs = vec![Record::DentryDel {
            dir: parent,
            name: name.to_vec(),
        }];
        let mut free_after = false;
        match (dir, victim.dir.as_ref()) {
            (false, Some(_)) => return errno(libc::EISDIR),
            (true, None) => return errno(libc::ENOTDIR),
            (true, Some(vd)) => {
                if !vd.is_empty() {
                    return errno(libc::ENOTEMPTY);
                }
                prec.nlink = prec.nlink.saturating_sub(1);
                if !victim.in_use() {
                    recs.push(Record::InodeDel { ino });
                } else {
                    let mut v = victim.rec.clone();
                    v.nlink = 0;
                    v.ctime_ns = t;
                    recs.push(Record::Inode(v));
                }
            }
            (false, None) => {
                let mut v = victim.rec.clone();
                v.nlink = v.nlink.saturating_sub(1);
                v.ctime_ns = t;
                free_after = v.nlink == 0 && !victim.in_use();
                if v.nlink == 0 && self.blob_deletes() {
                    recs.extend(blob::tombstone(&st, ino));
                }
                recs.push(Record::Inode(v));
            }
        }
        recs.push(Record::Inode(prec));
        self.commit(st, recs)?;
        if free_after {
            self.free_inode(ino)?;
        }
        Ok(())
    }

    /// Whether `dir` is `ancestor` or lies below it.
    fn is_within(st: &State, mut dir: u64, ancestor: u64) -> bool {
        for _ in 0..=st.nodes.len() {
            if dir == ancestor {
                return true;
            }
            if dir == ROOT_INO {
                return false;
            }
            match st.nodes.get(&dir) {
                Some(n) => dir = n.rec.parent,
                None => return false,
            }
        }
        false
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        noreplace: bool,
    ) -> Result<()> {
        if name.len() > NAME_MAX_BYTES {
            return errno(libc::ENAMETOOLONG);
        }
        check_name(newname)?;
        let st = self.lock();
        let src = st
            .dir(parent)?
            .get(name)
            .ok_or(Error::Errno(libc::ENOENT))?;
        let np = st.node(newparent)?;
        let nd = np.dir.as_ref().ok_or(Error::Errno(libc::ENOTDIR))?;
        if np.rec.nlink == 0 {
            return errno(libc::ENOENT);
        }
        let srec = st.node(src)?.rec.clone();
        let src_is_dir = srec.kind == Kind::Dir;
        if src_is_dir && Self::is_within(&st, newparent, src) {
            return errno(libc::EINVAL);
        }
        let t = now_ns();
        let mut recs = Vec::with_capacity(8);
        let mut free_after = None;
        // Parent updates accumulate here (the two parents may be one directory).
        let mut parents: Vec<InodeRec> = vec![st.node(parent)?.rec.clone()];
        if newparent != parent {
            parents.push(np.rec.clone());
        }
        if let Some(dst) = nd.get(newname) {
            if dst == src {
                // Two names of one file: POSIX says do nothing.
                return Ok(());
            }
            if noreplace {
                return errno(libc::EEXIST);
            }
            let v = st.node(dst)?;
            match (src_is_dir, v.dir.as_ref()) {
                (true, None) => return errno(libc::ENOTDIR),
                (false, Some(_)) => return errno(libc::EISDIR),
                (true, Some(vd)) => {
                    if !vd.is_empty() {
                        return errno(libc::ENOTEMPTY);
                    }
                    let np_idx = parents.len() - 1;
                    parents[np_idx].nlink = parents[np_idx].nlink.saturating_sub(1);
                    if !v.in_use() {
                        recs.push(Record::InodeDel { ino: dst });
                    } else {
                        let mut vr = v.rec.clone();
                        vr.nlink = 0;
                        recs.push(Record::Inode(vr));
                    }
                }
                (false, None) => {
                    let mut vr = v.rec.clone();
                    vr.nlink = vr.nlink.saturating_sub(1);
                    vr.ctime_ns = t;
                    if vr.nlink == 0 && !v.in_use() {
                        free_after = Some(dst);
                    }
                    if vr.nlink == 0 && self.blob_deletes() {
                        recs.extend(blob::tombstone(&st, dst));
                    }
                    recs.push(Record::Inode(vr));
                }
            }
        }
        recs.push(Record::DentryDel {
            dir: parent,
            name: name.to_vec(),
        });
        recs.push(Record::Dentry {
            dir: newparent,
            name: newname.to_vec(),
            ino: src,
        });
        let mut s = srec;
        s.ctime_ns = t;
        if src_is_dir && newparent != parent {
            s.parent = newparent;
            parents[0].nlink = parents[0].nlink.saturating_sub(1);
            parents[1].nlink += 1;
        }
        recs.push(Record::Inode(s));
        for mut p in parents {
            p.mtime_ns = t;
            p.ctime_ns = t;
            recs.push(Record::Inode(p));
        }
        self.commit(st, recs)?;
        if let Some(ino) = free_after {
            self.free_inode(ino)?;
        }
        Ok(())
    }

    /// RENAME_EXCHANGE: the two names swap inodes, atomically.
    pub fn exchange(&self, parent: u64, name: &[u8], newparent: u64, newname: &[u8]) -> Result<()> {
        if name.len() > NAME_MAX_BYTES || newname.len() > NAME_MAX_BYTES {
            return errno(libc::ENAMETOOLONG);
        }
        let st = self.lock();
        let a = st
            .dir(parent)?
            .get(name)
            .ok_or(Error::Errno(libc::ENOENT))?;
        let b = st
            .dir(newparent)?
            .get(newname)
            .ok_or(Error::Errno(libc::ENOENT))?;
        if a == b {
            return Ok(());
        }
        let (ra, rb) = (st.node(a)?.rec.clone(), st.node(b)?.rec.clone());
        let moves = parent != newparent;
        if moves
            && ((ra.kind == Kind::Dir && Self::is_within(&st, newparent, a))
                || (rb.kind == Kind::Dir && Self::is_within(&st, parent, b)))
        {
            return errno(libc::EINVAL);
        }
        let t = now_ns();
        let mut recs = vec![
            Record::Dentry {
                dir: parent,
                name: name.to_vec(),
                ino: b,
            },
            Record::Dentry {
                dir: newparent,
                name: newname.to_vec(),
                ino: a,
            },
        ];
        let mut p1 = st.node(parent)?.rec.clone();
        let mut p2 = st.node(newparent)?.rec.clone();
        for (mut r, to) in [(ra, newparent), (rb, parent)] {
            r.ctime_ns = t;
            if moves && r.kind == Kind::Dir {
                r.parent = to;
                // A directory moving adds a link to its new parent and drops one from
                // the old.
                if to == newparent {
                    p2.nlink += 1;
                    p1.nlink = p1.nlink.saturating_sub(1);
                } else {
                    p1.nlink += 1;
                    p2.nlink = p2.nlink.saturating_sub(1);
                }
            }
            recs.push(Record::Inode(r));
        }
        p1.mtime_ns = t;
        p1.ctime_ns = t;
        recs.push(Record::Inode(p1));
        if moves {
            p2.mtime_ns = t;
            p2.ctime_ns = t;
            recs.push(Record::Inode(p2));
        }
        self.commit(st, recs)
    }

    /// Changes attributes with `f` and makes the result durable.
    pub fn update(
        &self,
        ino: u64,
        f: impl FnOnce(&mut InodeRec) -> Result<()>,
    ) -> Result<InodeRec> {
        let mut st = self.lock();
        let n = st.node_mut(ino)?;
        let mut rec = n.rec.clone();
        f(&mut rec)?;
        n.dirty = false;
        self.commit(st, vec![Record::Inode(rec.clone())])?;
        Ok(rec)
    }

    // ---- opens, orphans ----

    pub fn open_file(&self, ino: u64) -> Result<InodeRec> {
        let mut st = self.lock();
        let n = st.node_mut(ino)?;
        n.opens += 1;
        Ok(n.rec.clone())
    }

    /// The last close of an unlinked file frees it.
    pub fn release(&self, ino: u64) -> Result<()> {
        let free = {
            let mut st = self.lock();
            let Ok(n) = st.node_mut(ino) else {
                return Ok(());
            };
            n.opens = n.opens.saturating_sub(1);
            n.rec.nlink == 0 && !n.in_use()
        };
        if free {
            self.free_inode(ino)?;
        }
        Ok(())
    }

    /// The kernel took a reference (an entry reply).
    pub fn remember(&self, ino: u64) {
        if let Ok(n) = self.lock().node_mut(ino) {
            n.lookups += 1;
        }
    }

    /// The kernel dropped `count` references; an unlinked inode nobody holds is freed.
    pub fn forget(&self, ino: u64, count: u64) -> Result<()> {
        let free = {
            let mut st = self.lock();
            let Ok(n) = st.node_mut(ino) else {
                return Ok(());
            };
            n.lookups = n.lookups.saturating_sub(count);
            n.rec.nlink == 0 && !n.in_use() && ino != ROOT_INO
        };
        if free {
            self.free_inode(ino)?;
        }
        Ok(())
    }

    /// Deletes an unlinked inode's data, then its record.
    fn free_inode(&self, ino: u64) -> Result<()> {
        let (alloc_end, size) = {
            let st = self.lock();
            let Ok(n) = st.node(ino) else { return Ok(()) };
            (n.rec.alloc_end, n.rec.size)
        };
        self.delete_chunks(ino, alloc_end.max(size))?;
        let st = self.lock();
        self.commit(st, vec![Record::InodeDel { ino }])
    }

    // ---- xattrs ----

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let st = self.lock();
        if name == blob::STATE_XATTR {
            st.node(ino)?;
            return self
                .blob_state_view(&st, ino)
                .ok_or(Error::Errno(libc::ENODATA));
        }
        if name.starts_with(blob::INTERNAL_PREFIX) {
            return errno(libc::ENODATA);
        }
        st.node(ino)?
            .xattrs
            .get(name)
            .cloned()
            .ok_or(Error::Errno(libc::ENODATA))
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.lock();
        let mut out = Vec::new();
        for k in st.node(ino)?.xattrs.keys() {
            if !k.starts_with(blob::INTERNAL_PREFIX) {
                out.extend_from_slice(k);
                out.push(0);
            }
        }
        if self.blob_state_view(&st, ino).is_some() {
            out.extend_from_slice(blob::STATE_XATTR);
            out.push(0);
        }
        Ok(out)
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        if name.is_empty() || name.len() > XATTR_NAME_MAX_BYTES {
            return errno(libc::ERANGE);
        }
        if value.len() > XATTR_VALUE_MAX_BYTES {
            return errno(libc::E2BIG);
        }
        if name.starts_with(b"system.posix_acl_") {
            return errno(libc::EOPNOTSUPP);
        }
        Self::xattr_reserved(name)?;
        let st = self.lock();
        Self::xattr_check_value(&st, ino, name, value)?;
        let n = st.node(ino)?;
        let exists = n.xattrs.contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return errno(libc::EEXIST);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return errno(libc::ENODATA);
        }
        let total: usize = n
            .xattrs
            .iter()
            .filter(|(k, _)| k.as_slice() != name)
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if total + name.len() + value.len() > XATTR_INODE_MAX_BYTES {
            return errno(libc::ENOSPC);
        }
        let mut rec = n.rec.clone();
        rec.ctime_ns = now_ns();
        let recs = vec![
            Record::Xattr {
                ino,
                name: name.to_vec(),
                value: value.to_vec(),
            },
            Record::Inode(rec),
        ];
        self.commit(st, recs)
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        Self::xattr_reserved(name)?;
        let st = self.lock();
        let n = st.node(ino)?;
        if !n.xattrs.contains_key(name) {
            return errno(libc::ENODATA);
        }
        let mut rec = n.rec.clone();
        rec.ctime_ns = now_ns();
        let recs = vec![
            Record::XattrDel {
                ino,
                name: name.to_vec(),
            },
            Record::Inode(rec),
        ];
        self.commit(st, recs)
    }

    // ---- dirty attributes (sizes and times changed by the data path) ----

    /// Persists `ino`'s attributes if they changed since last logged.
    pub fn flush_inode(&self, ino: u64) -> Result<()> {
        let mut st = self.lock();
        let Ok(n) = st.node_mut(ino) else {
            return Ok(());
        };
        n.written_unsynced = false;
        if !n.dirty {
            // Another thread (the flusher, another close, an update) may have queued
            // this inode's record and not yet seen it durable: wait for it too.
            drop(st);
            return self.log.wait_all();
        }
        n.dirty = false;
        let rec = n.rec.clone();
        self.commit(st, vec![Record::Inode(rec)])
    }

    /// Persists every dirty inode (the background flusher and unmount).
    pub fn flush_dirty(&self) -> Result<()> {
        let mut st = self.lock();
        let mut recs = Vec::new();
        for n in st.nodes.values_mut() {
            if n.dirty {
                n.dirty = false;
                recs.push(Record::Inode(n.rec.clone()));
            }
        }
        if recs.is_empty() {
            return Ok(());
        }
        // One op's records travel in one batch; keep each group under a batch.
        let per = (self.io.io_size_max as usize / 256).max(1);
        let mut groups: Vec<Vec<Record>> = Vec::new();
        while !recs.is_empty() {
            let rest = recs.split_off(recs.len().min(per));
            groups.push(std::mem::replace(&mut recs, rest));
        }
        let mut last = 0;
        for g in &groups {
            last = self.log.append(g)?;
        }
        drop(st);
        self.log.wait(last)
    }
}
