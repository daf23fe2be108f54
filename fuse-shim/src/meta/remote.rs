//! Cache-on-read: objects of the blob container appear in the mount and their data is
//! fetched into the cache a chunk at a time, once per chunk (see docs/BLOB.md). The
//! store itself is behind [`BlobReader`], implemented by the control plane.
//!
//! Rules that keep the cache and the container consistent:
//! - **Listing.** The first lookup or readdir of a directory, and the first after the
//!   listing TTL, lists its prefix in the store (one listing per directory at a time;
//!   others wait for it). An object with no local name becomes a file whose blob state
//!   says clean (key, ETag, size): an *import*. A prefix becomes a directory. A name
//!   with a pending tombstone is not imported (its blob is being deleted). A clean file
//!   whose listed ETag differs is re-imported (its chunks dropped, its size and ETag
//!   replaced); a dirty file keeps its content and uploads over the blob.
//! - **Complete chunks.** A clean file's chunk is complete when its committed length
//!   reaches the file's size or the chunk's end (in whole blocks). A shorter one
//!   (never fetched, or a fetch that was interrupted) is fetched from the blob with
//!   its ETag as a precondition, one fetch per chunk at a time (single-flight: other
//!   readers wait for it), and written in ascending pieces with the last one alone,
//!   so a reader that sees the full length sees every byte.
//! - **Fills against changes.** A fill starts only while the file is clean, checked
//!   and registered under the namespace lock. The first change of a clean file runs
//!   under its io lock and first fetches every chunk it keeps (`hydrate`), then logs
//!   the blob stale, then waits for fills still running: no fill lands after a change
//!   and no change leaves a chunk missing. A re-import takes the io lock alone.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use spool_dataplane::store::{ChunkId, ChunkOp, BLOCK_SIZE};

use super::blob::{BlobState, BLOB_XATTR, GONE_PREFIX};
use super::record::{InodeRec, Kind, Record, NAME_MAX_BYTES};
use super::state::{State, ROOT_INO};
use super::{now_ns, Namespace};
use crate::error::{errno, Error, Result};
use crate::io::WINDOW_BUFFERS_MAX;

const BLOCK: u64 = BLOCK_SIZE as u64;
/// Records per commit when a listing imports many names.
const IMPORT_BATCH_MAX: usize = 1024;
/// Times one fill waits for other fills of the same chunk before giving up.
const FILL_WAITS_MAX: u32 = 64;
/// Pause of listings after a failed one; doubles per failure in a row up to the max.
const LISTING_BACKOFF_MIN: Duration = Duration::from_secs(1);
const LISTING_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Chunks one warmup or hydrate fetches at once.
pub const FILLS_PARALLEL_MAX: usize = 4;

/// One object directly below a listed directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedFile {
    pub name: String,
    pub size: u64,
    pub etag: String,
    pub mtime_ns: i64,
}

/// A directory of the container: its objects and its sub-prefixes (names only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub files: Vec<ListedFile>,
    pub dirs: Vec<String>,
}

/// What a ranged fetch got.
#[derive(Debug)]
pub enum Fetched {
    Data(Vec<u8>),
    /// The blob's ETag is no longer the one asked for (or it is gone).
    Changed,
}

/// The object store as the namespace reads it. Calls block; errors are messages.
/// Keys are mount paths (`a/b/c`); the reader adds the configured prefix.
pub trait BlobReader: Send + Sync + std::fmt::Debug {
    /// Objects and sub-prefixes directly below mount directory `dir` ("" is the root).
    fn list(&self, dir: &str) -> std::result::Result<Listing, String>;
    /// Bytes `[off, off + len)` of the blob at `key`, if its ETag is still `etag`.
    fn get(
        &self,
        key: &str,
        etag: &str,
        off: u64,
        len: u64,
    ) -> std::result::Result<Fetched, String>;
    /// How long a directory listing stays fresh.
    fn listing_ttl(&self) -> Duration;
    /// Chunks fetched ahead of a sequential reader.
    fn prefetch_chunks(&self) -> u32;
    /// Runs `f` on a blocking thread of the control plane (prefetch).
    fn spawn(&self, f: Box<dyn FnOnce() + Send>);
    /// Local removals delete blobs (writeback), or leave the container alone.
    fn writeback(&self) -> bool;
    /// How long a write that finds the cache full waits for eviction (and uploads
    /// making dirty files clean, so evictable) before it fails with ENOSPC.
    fn space_wait(&self) -> Duration;
}

/// ETags compare without the quotes HTTP headers carry and listings may not.
pub fn etag_eq(a: &str, b: &str) -> bool {
    a.trim_matches('"') == b.trim_matches('"')
}

/// Read-through state of a namespace.
#[derive(Default)]
pub(crate) struct ReadThrough {
    pub(crate) reader: std::sync::OnceLock<Arc<dyn BlobReader>>,
    pub(crate) me: std::sync::OnceLock<std::sync::Weak<Namespace>>,
    /// Chunks being fetched (single-flight) and their waiters.
    fills: Mutex<HashSet<(u64, u32)>>,
    fill_done: Condvar,
    /// Directory listings: when each was last done, and which are running.
    listings: Mutex<FxHashMap<u64, ListingState>>,
    listing_done: Condvar,
    /// After a failed listing no directory is listed until then (the store is down:
    /// lookups answer from the cache instead of waiting for it), with the failures
    /// in a row that set it.
    listing_backoff: Mutex<(Option<Instant>, u32)>,
    prefetching: std::sync::atomic::AtomicU32,
    /// Evictions since start: files and bytes (whole chunks).
    evicted_files: std::sync::atomic::AtomicU64,
    evicted_bytes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for ReadThrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadThrough")
            .field("reader", &self.reader.get())
            .finish()
    }
}

#[derive(Clone, Copy, Debug)]
enum ListingState {
    Running,
    Done(Instant),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a chunk whose committed length is `len` holds all `want` bytes.
fn complete(len: u32, want: u64) -> bool {
    u64::from(len).div_ceil(BLOCK) * BLOCK >= want.div_ceil(BLOCK) * BLOCK
}

/// Whether chunk `index` (of `chunk_size` bytes) of a file of `size` bytes is complete
/// when its committed length is `len`.
pub(crate) fn chunk_complete(len: u32, size: u64, index: u32, chunk_size: u64) -> bool {
    let start = u64::from(index) * chunk_size;
    start >= size || complete(len, (size - start).min(chunk_size))
}

impl Namespace {
    /// Turns on cache-on-read from `reader` (once; later calls keep the first).
    pub fn blob_read_from(self: &Arc<Self>, reader: Arc<dyn BlobReader>) {
        let _ = self.remote.me.set(Arc::downgrade(self));
        let _ = self.remote.reader.set(reader);
        self.blob_on.store(true, Ordering::Relaxed);
    }

    pub(crate) fn reader(&self) -> Option<&Arc<dyn BlobReader>> {
        self.remote.reader.get()
    }

    /// Whether removals write tombstones (the container follows the mount).
    pub(crate) fn blob_deletes(&self) -> bool {
        self.reader().is_none_or(|r| r.writeback())
    }

    /// Makes chunk `index` of `ino` complete when the file is clean in blob: fetches
    /// it unless it is, or waits for the fill already running. Nothing to do for a
    /// file that is not clean (its absent blocks are holes).
    pub fn blob_fill(&self, ino: u64, index: u32) -> Result<()> {
        let Some(reader) = self.reader() else {
            return Ok(());
        };
        for _ in 0..FILL_WAITS_MAX {
            let (state, size) = {
                let mut st = self.lock();
                let n = st.node_mut(ino)?;
                if !n.blob_clean {
                    return Ok(());
                }
                // A fetch is a use, for eviction's LRU order (warmup, prefetch).
                n.used_ns = now_ns();
                let Some(s) = n.xattrs.get(BLOB_XATTR).and_then(|v| BlobState::decode(v)) else {
                    return Ok(());
                };
                let size = n.rec.size;
                let mut fills = lock(&self.remote.fills);
                if fills.contains(&(ino, index)) {
                    drop(st);
                    let _unused = self
                        .remote
                        .fill_done
                        .wait_while(fills, |f| f.contains(&(ino, index)))
                        .unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                fills.insert((ino, index));
                (s, size)
            };
            let mut r = self.fetch_chunk(reader.as_ref(), ino, index, &state, size);
            // A full cache: make room among other clean files, then once more.
            if r.as_ref().is_err_and(|e| e.errno() == libc::ENOSPC) {
                if let Ok(freed) = self.blob_evict(self.chunk_size * 8) {
                    if freed > 0 {
                        r = self.fetch_chunk(reader.as_ref(), ino, index, &state, size);
                    }
                }
            }
            lock(&self.remote.fills).remove(&(ino, index));
            self.remote.fill_done.notify_all();
            return r;
        }
        Err(Error::Blob(format!(
            "chunk {ino}:{index}: other fills kept running"
        )))
    }

    /// `blob_fill` for a reader: then the next chunks in the background.
    pub(crate) fn blob_fill_ahead(&self, ino: u64, index: u32, size: u64) -> Result<()> {
        self.blob_fill(ino, index)?;
        self.blob_prefetch(ino, index, size);
        Ok(())
    }

    /// The fetch itself (this caller is the chunk's only filler).
    fn fetch_chunk(
        &self,
        reader: &dyn BlobReader,
        ino: u64,
        index: u32,
        state: &BlobState,
        size: u64,
    ) -> Result<()> {
        let start = u64::from(index) * self.chunk_size;
        if start >= size {
            return Ok(());
        }
        let want = (size - start).min(self.chunk_size);
        let chunk = ChunkId { inode: ino, index };
        let info = self.io.run_one(ChunkOp::Stat { chunk }).0?;
        if complete(info.len, want) {
            return Ok(());
        }
        let data = match reader.get(&state.key, &state.etag, start, want) {
            Ok(Fetched::Data(d)) => d,
            Ok(Fetched::Changed) => {
                // Changed behind our back: the next lookup lists again and re-imports.
                tracing::warn!(key = %state.key, "blob changed since it was listed; listing again");
                lock(&self.remote.listings).clear();
                return errno(libc::ESTALE);
            }
            Err(e) => {
                tracing::warn!(key = %state.key, error = %e, "blob: fetch failed");
                return Err(Error::Blob(format!("fetching {}: {e}", state.key)));
            }
        };
        if data.len() as u64 != want {
            return Err(Error::Blob(format!(
                "fetching {} at {start}: got {} bytes of {want}",
                state.key,
                data.len()
            )));
        }
        // Ascending pieces, the last one alone after the others are durable: the
        // committed length reaches `want` only when every byte is there.
        let step = u64::from(self.io.io_size_max);
        let pieces: Vec<(u64, u64)> = (0..want)
            .step_by(step as usize)
            .map(|o| (o, step.min(want - o)))
            .collect();
        let (last, rest) = pieces.split_last().expect("want > 0");
        let write = |&(o, len): &(u64, u64)| {
            let mut buf = self.io.buffer();
            let padded = len.div_ceil(BLOCK) * BLOCK;
            buf.set_len(padded as usize);
            let dst = buf.as_mut_slice();
            dst[..len as usize].copy_from_slice(&data[o as usize..(o + len) as usize]);
            dst[len as usize..].fill(0);
            ChunkOp::Write {
                chunk,
                offset: o as u32,
                len: len as u32,
                buf,
            }
        };
        for window in rest.chunks(WINDOW_BUFFERS_MAX) {
            for (r, _) in self.io.run(window.iter().map(write).collect()) {
                r?;
            }
        }
        self.io.run_one(write(last)).0?;
        Ok(())
    }

    /// A read of `ino` needed chunk `index` fetched: fetch the next few in the
    /// background, so a sequential reader finds them in the cache.
    pub(crate) fn blob_prefetch(&self, ino: u64, index: u32, size: u64) {
        let Some(reader) = self.reader() else { return };
        let Some(me) = self.remote.me.get().and_then(|w| w.upgrade()) else {
            return;
        };
        let ahead = reader.prefetch_chunks();
        for i in index.saturating_add(1)..index.saturating_add(1).saturating_add(ahead) {
            if u64::from(i) * self.chunk_size >= size {
                break;
            }
            if lock(&self.remote.fills).contains(&(ino, i)) {
                continue;
            }
            // Bounded: at most `ahead` prefetches per reader for a few readers run at
            // once, over all files.
            let cap = ahead.saturating_mul(FILLS_PARALLEL_MAX as u32);
            if self.remote.prefetching.fetch_add(1, Ordering::AcqRel) >= cap {
                self.remote.prefetching.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            let ns = Arc::clone(&me);
            reader.spawn(Box::new(move || {
                if let Err(e) = ns.blob_fill(ino, i) {
                    tracing::debug!(ino, chunk = i, error = %e, "prefetch failed");
                }
                ns.remote.prefetching.fetch_sub(1, Ordering::AcqRel);
            }));
        }
    }

    /// Before the first change of a clean file (caller holds its io lock): fetches
    /// every chunk below `keep_below` that is not complete.
    pub(crate) fn blob_hydrate(&self, ino: u64, keep_below: u64) -> Result<()> {
        if self.reader().is_none() {
            return Ok(());
        }
        let size = {
            let st = self.lock();
            let n = st.node(ino)?;
            if !n.blob_clean {
                return Ok(());
            }
            n.rec.size.min(keep_below)
        };
        self.fill_all(&[(ino, size)], &|_| {})
    }

    /// Fills every chunk below the given sizes of the `(inode, size)` files, a few at
    /// once; `done(bytes)` after each chunk. The first failure ends it.
    pub fn fill_all(&self, files: &[(u64, u64)], done: &(dyn Fn(u64) + Sync)) -> Result<()> {
        let cs = self.chunk_size;
        let work: Vec<(u64, u32, u64)> = files
            .iter()
            .flat_map(|&(ino, size)| {
                (0..size.div_ceil(cs)).map(move |i| (ino, i as u32, (size - i * cs).min(cs)))
            })
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..FILLS_PARALLEL_MAX.min(work.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(ino, index, bytes)) = work.get(i) else {
                        return;
                    };
                    if lock(&failed).is_some() {
                        return;
                    }
                    match self.blob_fill(ino, index) {
                        Ok(()) => done(bytes),
                        Err(e) => {
                            lock(&failed).get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits until no fill of `ino` runs (after it stopped being clean).
    pub(crate) fn blob_quiesce(&self, ino: u64) {
        if self.reader().is_none() {
            return;
        }
        let fills = lock(&self.remote.fills);
        let _unused = self
            .remote
            .fill_done
            .wait_while(fills, |f| f.iter().any(|&(i, _)| i == ino))
            .unwrap_or_else(|p| p.into_inner());
    }

    /// The mount path of directory `dir` ("" for the root), `None` when a name on the
    /// way is not UTF-8 or the directory is gone.
    fn dir_path(st: &State, mut dir: u64) -> Option<String> {
        let mut names = Vec::new();
        // Bounded: a directory's depth is below the inode count.
        for _ in 0..=st.nodes.len() {
            if dir == ROOT_INO {
                names.reverse();
                return Some(names.join("/"));
            }
            let parent = st.nodes.get(&dir)?.rec.parent;
            let pd = st.nodes.get(&parent)?.dir.as_ref()?;
            let name = pd.entries.iter().find(|(_, e)| e.0 == dir)?.0;
            names.push(std::str::from_utf8(name).ok()?.to_owned());
            dir = parent;
        }
        None
    }

    /// Lists directory `dir` in the store when its listing is stale, importing what is
    /// new. A failed listing is logged and the local view stands (the store may be
    /// down; the cache keeps serving).
    pub(crate) fn blob_refresh_dir(&self, dir: u64) -> Result<()> {
        let Some(reader) = self.reader() else {
            return Ok(());
        };
        let ttl = reader.listing_ttl();
        if lock(&self.remote.listing_backoff)
            .0
            .is_some_and(|until| Instant::now() < until)
        {
            return Ok(());
        }
        {
            let mut l = lock(&self.remote.listings);
            // Bounded: each wait ends with another caller's listing of `dir`.
            for _ in 0..FILL_WAITS_MAX {
                match l.get(&dir) {
                    Some(ListingState::Running) => {
                        l = self
                            .remote
                            .listing_done
                            .wait(l)
                            .unwrap_or_else(|p| p.into_inner());
                    }
                    Some(ListingState::Done(at)) if at.elapsed() < ttl => return Ok(()),
                    _ => break,
                }
            }
            l.insert(dir, ListingState::Running);
        }
        let started_ns = now_ns();
        let path = {
            let st = self.lock();
            match st.node(dir) {
                Ok(n) if n.rec.kind == Kind::Dir => Self::dir_path(&st, dir),
                _ => None,
            }
        };
        let r = match &path {
            Some(p) => match reader.list(p) {
                Ok(listing) => {
                    *lock(&self.remote.listing_backoff) = (None, 0);
                    self.blob_import(dir, p, &listing, started_ns)
                }
                Err(e) => {
                    let mut b = lock(&self.remote.listing_backoff);
                    b.1 = b.1.saturating_add(1);
                    let pause = LISTING_BACKOFF_MIN
                        .saturating_mul(1 << b.1.min(6))
                        .min(LISTING_BACKOFF_MAX);
                    b.0 = Some(Instant::now() + pause);
                    tracing::warn!(dir = %p, error = %e, pause_ms = pause.as_millis() as u64,
                        "blob: listing failed; serving the cached view");
                    Ok(())
                }
            },
            None => Ok(()),
        };
        lock(&self.remote.listings).insert(dir, ListingState::Done(Instant::now()));
        self.remote.listing_done.notify_all();
        r
    }

    /// Applies a listing of `dir` (mount path `path`) begun at `started_ns`.
    fn blob_import(&self, dir: u64, path: &str, l: &Listing, started_ns: i64) -> Result<()> {
        let key_of = |name: &str| {
            if path.is_empty() {
                name.to_owned()
            } else {
                format!("{path}/{name}")
            }
        };
        let ok_name =
            |n: &str| !n.is_empty() && n.len() <= NAME_MAX_BYTES && !n.contains(['/', '\0']);
        let mut changed = Vec::new();
        let mut files = l.files.iter().filter(|f| ok_name(&f.name)).peekable();
        let mut dirs = l.dirs.iter().filter(|d| ok_name(d)).peekable();
        // Bounded: each batch takes up to IMPORT_BATCH_MAX names of the listing.
        while files.peek().is_some() || dirs.peek().is_some() {
            let mut st = self.lock();
            let Ok(p) = st.node(dir) else { return Ok(()) };
            if p.rec.nlink == 0 || p.dir.is_none() {
                return Ok(());
            }
            let mut prec = p.rec.clone();
            let listed = |st: &State, name: &str| {
                st.nodes
                    .get(&dir)
                    .and_then(|n| n.dir.as_ref())
                    .and_then(|d| d.get(name.as_bytes()))
            };
            let gone: HashSet<Vec<u8>> = st
                .nodes
                .get(&ROOT_INO)
                .map(|r| {
                    r.xattrs
                        .range(GONE_PREFIX.to_vec()..)
                        .take_while(|(k, _)| k.starts_with(GONE_PREFIX))
                        .map(|(_, v)| v.clone())
                        .collect()
                })
                .unwrap_or_default();
            let t = now_ns();
            let mut recs = Vec::new();
            let mut clean = Vec::new();
            let mut taken = 0;
            while taken < IMPORT_BATCH_MAX {
                let (name, file) = if let Some(f) = files.next() {
                    (f.name.as_str(), Some(f))
                } else if let Some(d) = dirs.next() {
                    (d.as_str(), None)
                } else {
                    break;
                };
                taken += 1;
                let key = key_of(name);
                let existing = listed(&st, name).or_else(|| {
                    recs.iter().find_map(|r| match r {
                        Record::Dentry { name: n, ino, .. } if n == name.as_bytes() => Some(*ino),
                        _ => None,
                    })
                });
                match (existing, file) {
                    (Some(ino), Some(f)) => {
                        if let Some(n) = st.nodes.get(&ino) {
                            let s = n.xattrs.get(BLOB_XATTR).and_then(|v| BlobState::decode(v));
                            if n.blob_clean
                                && n.blob_marked_ns < started_ns
                                && s.is_some_and(|s| s.key == key && !etag_eq(&s.etag, &f.etag))
                            {
                                changed.push((ino, f.clone(), key));
                            }
                        }
                    }
                    (Some(_), None) => {}
                    (None, _) if gone.contains(key.as_bytes()) => {}
                    (None, f) => {
                        if st.next_ino >= super::INO_MAX {
                            return errno(libc::ENOSPC);
                        }
                        let ino = st.next_ino;
                        st.next_ino += 1;
                        let is_dir = f.is_none();
                        let mtime = f.map_or(t, |f| f.mtime_ns);
                        recs.push(Record::Inode(InodeRec {
                            ino,
                            kind: if is_dir { Kind::Dir } else { Kind::File },
                            perm: if is_dir { 0o755 } else { 0o644 },
                            uid: prec.uid,
                            gid: prec.gid,
                            nlink: if is_dir { 2 } else { 1 },
                            size: f.map_or(0, |f| f.size),
                            alloc_end: 0,
                            atime_ns: mtime,
                            mtime_ns: mtime,
                            ctime_ns: t,
                            btime_ns: t,
                            rdev: 0,
                            parent: if is_dir { dir } else { 0 },
                            target: Vec::new(),
                        }));
                        recs.push(Record::Dentry {
                            dir,
                            name: name.as_bytes().to_vec(),
                            ino,
                        });
                        if let Some(f) = f {
                            let s = BlobState {
                                key,
                                etag: f.etag.clone(),
                                size: f.size,
                                ctime_ns: t,
                            };
                            recs.push(Record::Xattr {
                                ino,
                                name: BLOB_XATTR.to_vec(),
                                value: s.encode(),
                            });
                            clean.push(ino);
                        } else {
                            prec.nlink += 1;
                        }
                    }
                }
            }
            if recs.is_empty() {
                continue;
            }
            recs.push(Record::Inode(prec));
            let lsn = self.log.append(&recs)?;
            for r in &recs {
                st.apply(r)?;
            }
            // Clean before anyone can look the new names up (the lock is still held).
            for ino in clean {
                if let Ok(n) = st.node_mut(ino) {
                    n.blob_clean = true;
                }
            }
            drop(st);
            self.log.wait(lsn)?;
        }
        for (ino, f, key) in changed {
            self.blob_reimport(ino, &f, key)?;
        }
        Ok(())
    }

    /// A clean file's blob changed behind Spool's back: drop its chunks and take the
    /// new size and ETag (the io lock keeps writers out; fills are waited for).
    fn blob_reimport(&self, ino: u64, f: &ListedFile, key: String) -> Result<()> {
        let io = self.io_lock(ino)?;
        let _g = io.write().unwrap_or_else(|p| p.into_inner());
        let old_end = {
            let mut st = self.lock();
            let n = st.node_mut(ino)?;
            if !n.blob_clean {
                return Ok(());
            }
            n.blob_clean = false;
            n.rec.size.max(n.rec.alloc_end)
        };
        self.blob_quiesce(ino);
        self.delete_chunks(ino, old_end)?;
        let mut st = self.lock();
        let n = st.node_mut(ino)?;
        let t = now_ns();
        let mut rec = n.rec.clone();
        rec.size = f.size;
        rec.alloc_end = 0;
        rec.mtime_ns = f.mtime_ns;
        rec.ctime_ns = t;
        n.dirty = false;
        let recs = vec![
            Record::Inode(rec),
            Record::Xattr {
                ino,
                name: BLOB_XATTR.to_vec(),
                value: BlobState {
                    key,
                    etag: f.etag.clone(),
                    size: f.size,
                    ctime_ns: t,
                }
                .encode(),
            },
        ];
        let lsn = self.log.append(&recs)?;
        for r in &recs {
            st.apply(r)?;
        }
        if let Ok(n) = st.node_mut(ino) {
            n.blob_clean = true;
        }
        drop(st);
        self.log.wait(lsn)?;
        tracing::info!(ino, etag = %f.etag, size = f.size, "blob changed behind the cache: re-imported");
        Ok(())
    }

    /// Evicts cached chunks of files that are clean in blob, least recently used
    /// first, until about `want` bytes are freed; returns the bytes freed. A file's
    /// chunks go together, under its io lock taken without waiting (a file being
    /// changed is skipped: it is about to stop being clean), so no change can find a
    /// chunk missing; a later read fetches them again. Dirty files are never evicted.
    pub fn blob_evict(&self, want: u64) -> Result<u64> {
        if self.reader().is_none() || want == 0 {
            return Ok(0);
        }
        let mut candidates: Vec<(i64, u64, u64)> = {
            let st = self.lock();
            st.nodes
                .values()
                .filter(|n| n.rec.kind == Kind::File && n.blob_clean && n.rec.size > 0)
                .map(|n| (n.used_ns.max(n.rec.ctime_ns), n.rec.ino, n.rec.size))
                .collect()
        };
        candidates.sort_unstable();
        let cs = self.chunk_size;
        let mut freed = 0u64;
        // Bounded: one pass over the candidates.
        for (_, ino, size) in candidates {
            if freed >= want {
                break;
            }
            let Ok(io) = self.io_lock(ino) else { continue };
            let Ok(_g) = io.try_write() else { continue };
            if !self.lock().node(ino).is_ok_and(|n| n.blob_clean) {
                continue;
            }
            let n = self.delete_chunks(ino, size)?;
            if n == 0 {
                continue;
            }
            freed += n * cs;
            self.remote.evicted_files.fetch_add(1, Ordering::Relaxed);
            self.remote
                .evicted_bytes
                .fetch_add(n * cs, Ordering::Relaxed);
        }
        if freed > 0 {
            tracing::debug!(bytes = freed, "blob: evicted clean chunks");
        }
        Ok(freed)
    }

    /// Evictions since start: (files, bytes).
    pub fn blob_evictions(&self) -> (u64, u64) {
        (
            self.remote.evicted_files.load(Ordering::Relaxed),
            self.remote.evicted_bytes.load(Ordering::Relaxed),
        )
    }

    /// How long a write waits for space (0 without cache-on-read: nothing to evict).
    pub(crate) fn space_wait(&self) -> Duration {
        self.reader().map_or(Duration::ZERO, |r| r.space_wait())
    }

    /// Files below mount path `path` (a file or a directory, listed as it is walked)
    /// that are clean in blob: `(inode, size)`, for `warmup`.
    pub fn blob_walk(&self, path: &str) -> Result<Vec<(u64, u64)>> {
        let mut ino = ROOT_INO;
        for name in path.split('/').filter(|s| !s.is_empty()) {
            self.blob_refresh_dir(ino)?;
            ino = self.lookup(ino, name.as_bytes())?.ino;
        }
        let mut out = Vec::new();
        let mut dirs = vec![ino];
        let mut seen = HashSet::from([ino]);
        let mut i = 0;
        while i < dirs.len() {
            let d = dirs[i];
            i += 1;
            let st = self.lock();
            let n = st.node(d)?;
            if n.rec.kind == Kind::File {
                if n.blob_clean {
                    out.push((d, n.rec.size));
                }
                continue;
            }
            drop(st);
            self.blob_refresh_dir(d)?;
            let st = self.lock();
            let Some(dd) = st.node(d)?.dir.as_ref() else {
                continue;
            };
            for (e, _) in dd.entries.values() {
                // Bounded: each inode is pushed once.
                if let Some(c) = st.nodes.get(e) {
                    let wanted =
                        c.rec.kind == Kind::Dir || (c.rec.kind == Kind::File && c.blob_clean);
                    if wanted && seen.insert(*e) {
                        dirs.push(*e);
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completeness_is_in_whole_blocks() {
        assert!(complete(4096, 100));
        assert!(complete(8192, 8192));
        assert!(!complete(4096, 4097));
        assert!(!complete(0, 1));
        assert!(complete(0, 0));
    }

    #[test]
    fn etags_compare_without_quotes() {
        assert!(etag_eq("\"0x8D1\"", "0x8D1"));
        assert!(!etag_eq("\"0x8D1\"", "0x8D2"));
    }
}
