//! One namespace for the whole cluster (docs/design/cluster-namespace.md).
//!
//! The namespace log lives in chunks of reserved inodes, which all map to one chain
//! (`NAMESPACE_INODE_BIT`), so they are replicated like data. The head of that chain
//! owns the namespace: it loads it from the replicated log and runs every namespace
//! call; every other node forwards its mount's calls to the owner over the namespace
//! RPC. The owner's log writes are conditional on the chain version it took ownership
//! at, so a node that lost the chain cannot append after its successor began: its
//! writes are refused, it drops its copy, and its calls go to the new owner, which
//! replays the log (nothing acknowledged is lost: every batch was on every replica
//! before its call returned).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spool_dataplane::net::ClusterKey;
use spool_dataplane::replica::Replica;

use crate::error::{errno, Error, Result};
use crate::io::ChunkIo;
use crate::meta::log::root_chunk;
use crate::meta::record::InodeRec;
use crate::meta::{DirEntry, Namespace, NewNode};
use crate::ops::{dispatch, FsStats, NsOps, NsReply, NsRequest, SetAttr};
use crate::rpc::{ns_addr, RpcConn};

/// How long a call waits for the namespace to have a reachable owner (a failover
/// takes a lease period and a table round, then the new owner replays the log).
const OWNER_WAIT: Duration = Duration::from_secs(30);
const RETRY_PAUSE: Duration = Duration::from_millis(50);
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Pooled connections to the owner.
const CONNS_POOLED_MAX: usize = 16;
/// An `unflushed` epoch no load has: writes went to more than one.
const LOST: u64 = 0;

#[derive(Debug)]
struct Owned {
    ns: Arc<Namespace>,
    /// This node's incarnation when it loaded the namespace: heading the chain under
    /// the same incarnation since then means nobody else could have owned it.
    incarnation: u64,
    chain_ver: u64,
    /// Names this load of the namespace: replies carry it, so a mount can tell that
    /// the owner it wrote to is gone (with the sizes it had not yet made durable).
    epoch: u64,
}

#[derive(Debug)]
enum Route {
    /// The namespace, the chain version it is fenced with, and its epoch.
    Local(Arc<Namespace>, u64, u64),
    Remote(SocketAddr),
}

/// Counters and the current role, for `spool status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ClusterNsStatus {
    /// The node heading the namespace chain in the installed table (0: none yet).
    pub owner: u32,
    /// This node holds the namespace loaded and serves it.
    pub owned: bool,
    pub loads: u64,
    pub calls_local: u64,
    pub calls_forwarded: u64,
    /// Reads of file data a follower made from the chunks' replicas itself.
    pub reads_direct: u64,
    pub inodes: Option<u64>,
}

pub struct ClusterNs {
    io: Arc<ChunkIo>,
    replica: Arc<Replica>,
    me: u32,
    key: ClusterKey,
    owned: Mutex<Option<Owned>>,
    conns: Mutex<Vec<RpcConn>>,
    /// Per inode, the epoch of the namespace load that took this node's writes since
    /// their last flush (`LOST` if they went to more than one).
    unflushed: Mutex<std::collections::HashMap<u64, u64>>,
    loads: AtomicU64,
    calls_local: AtomicU64,
    calls_forwarded: AtomicU64,
    reads_direct: AtomicU64,
    /// Runs on each namespace this node loads (a takeover), before it serves.
    on_load: std::sync::OnceLock<OnLoad>,
}

impl std::fmt::Debug for ClusterNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNs")
            .field("me", &self.me)
            .field("owned", &self.owned)
            .finish_non_exhaustive()
    }
}

/// A hook run on each load of the namespace.
pub type OnLoad = Box<dyn Fn(&Arc<Namespace>) + Send + Sync>;

/// Calls that change nothing: safe to send again when a connection breaks.
fn read_only(r: &NsRequest) -> bool {
    matches!(
        r,
        NsRequest::Getattr { .. }
            | NsRequest::Lookup { .. }
            | NsRequest::Readlink { .. }
            | NsRequest::Readdir { .. }
            | NsRequest::Read { .. }
            | NsRequest::Getxattr { .. }
            | NsRequest::Listxattr { .. }
            | NsRequest::Statfs
            | NsRequest::Fill { .. }
    )
}

fn unexpected(r: &NsReply) -> Error {
    Error::Failed(format!("namespace owner sent an unexpected reply: {r:?}"))
}

impl ClusterNs {
    /// `io` must be in cluster mode (`ChunkIo::cluster`); `me` is this node's id.
    pub fn new(io: Arc<ChunkIo>, replica: Arc<Replica>, me: u32, key: ClusterKey) -> ClusterNs {
        ClusterNs {
            io,
            replica,
            me,
            key,
            owned: Mutex::new(None),
            conns: Mutex::new(Vec::new()),
            unflushed: Mutex::new(std::collections::HashMap::new()),
            loads: AtomicU64::new(0),
            calls_local: AtomicU64::new(0),
            calls_forwarded: AtomicU64::new(0),
            reads_direct: AtomicU64::new(0),
            on_load: std::sync::OnceLock::new(),
        }
    }

    /// Sets the hook run on each namespace this node loads (once; later calls are
    /// ignored).
    pub fn on_load(&self, f: OnLoad) {
        let _ = self.on_load.set(f);
    }

    pub fn status(&self) -> ClusterNsStatus {
        let t = self.replica.table();
        let owner = t
            .chain(t.chain_of(&root_chunk()))
            .and_then(|c| c.head())
            .unwrap_or(0);
        let owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        ClusterNsStatus {
            owner,
            owned: owned.is_some(),
            loads: self.loads.load(Ordering::Relaxed),
            calls_local: self.calls_local.load(Ordering::Relaxed),
            calls_forwarded: self.calls_forwarded.load(Ordering::Relaxed),
            reads_direct: self.reads_direct.load(Ordering::Relaxed),
            inodes: owned.as_ref().map(|o| o.ns.status().inodes),
        }
    }

    /// Where calls go now, or `None` while there is no usable owner yet.
    fn try_route(&self) -> Result<Option<Route>> {
        let t = self.replica.table();
        let Some(chain) = t.chain(t.chain_of(&root_chunk())) else {
            return Ok(None); // no table yet
        };
        let Some(head) = chain.head() else {
            return Ok(None);
        };
        let mut owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        if head != self.me {
            if let Some(o) = owned.take() {
                tracing::warn!(owner = head, "the namespace moved to another node");
                o.ns.retire("the namespace moved to another node");
            }
            let Some(addr) = t.nodes.get(&head).and_then(|n| n.addr.parse().ok()) else {
                return Ok(None);
            };
            return Ok(Some(Route::Remote(ns_addr(addr))));
        }
        if !self.replica.admitted_in(self.me, &t) {
            return Ok(None); // fenced, or the table does not know this start yet
        }
        let inc = self.replica.incarnation();
        if let Some(o) = owned.as_mut() {
            // A copy whose log write failed while the chain stayed put stays failed
            // (it refuses changes, as on a single node, until the chain moves): the
            // write's outcome is unknown, and a reload at the same chain version
            // could miss it or append over it. A refused (fenced) write means the
            // chain moved: then the copy is dropped and reloaded.
            let failed_in_place = o.ns.status().failed && o.chain_ver == chain.version;
            if o.incarnation == inc && (!o.ns.status().failed || failed_in_place) {
                if o.chain_ver != chain.version {
                    // Still the head, same incarnation: nobody else owned it meanwhile.
                    o.chain_ver = chain.version;
                    self.io.set_fence(chain.version);
                }
                return Ok(Some(Route::Local(Arc::clone(&o.ns), o.chain_ver, o.epoch)));
            }
            // Threads still on the old copy must not append once the new one loads
            // (same chain version after an incarnation change: its writes would
            // pass the fence and land over the new copy's).
            if let Some(o) = owned.take() {
                o.ns.retire("this node reloads the namespace");
            }
        }
        // Take ownership: replay the replicated log (other callers wait on the lock).
        let t0 = Instant::now();
        self.io.set_fence(chain.version);
        let ns = match Namespace::open(Arc::clone(&self.io)) {
            Ok(ns) => Arc::new(ns),
            Err(Error::Store(spool_dataplane::Error::StaleChain { .. })) => return Ok(None),
            Err(e) => return Err(e),
        };
        if let Some(f) = self.on_load.get() {
            f(&ns);
        }
        self.loads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            chain_ver = chain.version,
            inodes = ns.status().inodes,
            ms = t0.elapsed().as_millis() as u64,
            "took over the cluster namespace"
        );
        let epoch = rand::random::<u64>() | 1;
        *owned = Some(Owned {
            ns: Arc::clone(&ns),
            incarnation: inc,
            chain_ver: chain.version,
            epoch,
        });
        Ok(Some(Route::Local(ns, chain.version, epoch)))
    }

    fn route(&self, deadline: Instant) -> Result<Route> {
        loop {
            if let Some(r) = self.try_route()? {
                return Ok(r);
            }
            if Instant::now() >= deadline {
                return Err(Error::Failed(format!(
                    "no node serves the cluster namespace (waited {OWNER_WAIT:?})"
                )));
            }
            std::thread::sleep(RETRY_PAUSE);
        }
    }

    /// The chain version of the namespace chain in the installed table.
    fn chain_ver_now(&self) -> u64 {
        let t = self.replica.table();
        t.chain(t.chain_of(&root_chunk())).map_or(0, |c| c.version)
    }

    fn forward(
        &self,
        addr: SocketAddr,
        req: &NsRequest,
        data: &[u8],
    ) -> std::io::Result<(u64, NsReply, Vec<u8>)> {
        let pooled = {
            let mut p = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            p.iter()
                .position(|c| c.addr == addr)
                .map(|i| p.swap_remove(i))
        }
        .filter(RpcConn::is_open);
        let mut c = match pooled {
            Some(c) => c,
            None => RpcConn::connect(addr, &self.key, RPC_TIMEOUT)?,
        };
        let r = c.call(req, data)?;
        let mut p = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if p.len() < CONNS_POOLED_MAX {
            p.push(c);
        }
        Ok(r)
    }

    /// Runs one call where the namespace is, and returns its reply and bytes.
    /// Also returns the epoch of the namespace load that ran it.
    fn exec(&self, req: &NsRequest, data: &[u8]) -> Result<(NsReply, Vec<u8>, u64)> {
        let deadline = Instant::now() + OWNER_WAIT;
        loop {
            match self.route(deadline)? {
                Route::Local(ns, chain_ver, epoch) => {
                    self.calls_local.fetch_add(1, Ordering::Relaxed);
                    let mut out = Vec::new();
                    let rep = dispatch(&*ns, req, data, &mut out);
                    if ns.status().failed && self.chain_ver_now() != chain_ver {
                        // The chain moved while this ran: its log write was refused
                        // (certainly not done). Drop the copy and run it again where
                        // the namespace is now.
                        tracing::info!(request = ?req, "namespace chain changed under a call; retrying");
                        self.owned.lock().unwrap_or_else(|p| p.into_inner()).take();
                        if Instant::now() < deadline {
                            continue;
                        }
                    }
                    return Ok((rep, out, epoch));
                }
                Route::Remote(addr) => {
                    self.calls_forwarded.fetch_add(1, Ordering::Relaxed);
                    match self.forward(addr, req, data) {
                        Ok((_, NsReply::NotOwner, _)) if Instant::now() < deadline => {
                            std::thread::sleep(RETRY_PAUSE);
                        }
                        Ok((epoch, rep, out)) => return Ok((rep, out, epoch)),
                        Err(e) if read_only(req) && Instant::now() < deadline => {
                            tracing::debug!(owner = %addr, error = %e, "namespace call; retrying");
                            std::thread::sleep(RETRY_PAUSE);
                        }
                        Err(e) => {
                            return Err(Error::Failed(format!(
                                "namespace owner {addr}: {e} (the call's outcome is unknown)"
                            )))
                        }
                    }
                }
            }
        }
    }

    /// The owner's side of the RPC: runs a forwarded call if this node owns the
    /// namespace now, else answers `NotOwner` (the follower asks again).
    pub fn serve(&self, req: &NsRequest, data: &[u8], out: &mut Vec<u8>) -> (u64, NsReply) {
        match self.try_route() {
            Ok(Some(Route::Local(ns, _, epoch))) => {
                let rep = dispatch(&*ns, req, data, out);
                // The follower's kernel takes a reference on the entry it gets back:
                // count it here, in the same call (see `remember`).
                if let (
                    NsRequest::Lookup { .. } | NsRequest::Create { .. } | NsRequest::Link { .. },
                    NsReply::Attr(a),
                ) = (req, &rep)
                {
                    ns.remember(a.ino);
                }
                (epoch, rep)
            }
            Ok(_) => (0, NsReply::NotOwner),
            Err(e) => (0, NsReply::Errno(e.errno())),
        }
    }

    fn call(&self, req: NsRequest, data: &[u8]) -> Result<(NsReply, Vec<u8>)> {
        self.call_epoch(req, data).map(|(r, b, _)| (r, b))
    }

    fn call_epoch(&self, req: NsRequest, data: &[u8]) -> Result<(NsReply, Vec<u8>, u64)> {
        match self.exec(&req, data)? {
            (NsReply::Errno(e), _, _) => errno(e),
            r => Ok(r),
        }
    }

    fn attr(&self, req: NsRequest) -> Result<InodeRec> {
        match self.call(req, &[])? {
            (NsReply::Attr(a), _) => Ok(a),
            (r, _) => Err(unexpected(&r)),
        }
    }

    fn done(&self, req: NsRequest) -> Result<()> {
        match self.call(req, &[])? {
            (NsReply::Done, _) => Ok(()),
            (r, _) => Err(unexpected(&r)),
        }
    }

    fn bytes(&self, req: NsRequest) -> Result<Vec<u8>> {
        match self.call(req, &[])? {
            (NsReply::Bytes, b) => Ok(b),
            (r, _) => Err(unexpected(&r)),
        }
    }

    /// The namespace when this node owns it (for the flusher, unmount and the blob
    /// tier's uploader).
    pub fn local(&self) -> Option<Arc<Namespace>> {
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|o| Arc::clone(&o.ns))
    }
}

impl NsOps for ClusterNs {
    fn getattr(&self, ino: u64) -> Result<InodeRec> {
        self.attr(NsRequest::Getattr { ino })
    }
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<InodeRec> {
        self.attr(NsRequest::Lookup {
            parent,
            name: name.to_vec(),
        })
    }
    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        self.bytes(NsRequest::Readlink { ino })
    }
    fn readdir(&self, ino: u64, after: u64, max: usize) -> Result<Vec<DirEntry>> {
        let req = NsRequest::Readdir {
            ino,
            after,
            max: max.min(crate::ops::READDIR_MAX) as u32,
        };
        match self.call(req, &[])? {
            (NsReply::Entries(e), _) => Ok(e),
            (r, _) => Err(unexpected(&r)),
        }
    }
    fn create(&self, parent: u64, name: &[u8], new: &NewNode<'_>) -> Result<InodeRec> {
        self.attr(NsRequest::Create {
            parent,
            name: name.to_vec(),
            kind: new.kind,
            perm: new.perm,
            uid: new.uid,
            gid: new.gid,
            rdev: new.rdev,
            target: new.target.to_vec(),
        })
    }
    fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<InodeRec> {
        self.attr(NsRequest::Link {
            ino,
            newparent,
            newname: newname.to_vec(),
        })
    }
    fn remove(&self, parent: u64, name: &[u8], dir: bool) -> Result<()> {
        self.done(NsRequest::Remove {
            parent,
            name: name.to_vec(),
            dir,
        })
    }
    fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        noreplace: bool,
    ) -> Result<()> {
        self.done(NsRequest::Rename {
            parent,
            name: name.to_vec(),
            newparent,
            newname: newname.to_vec(),
            noreplace,
        })
    }
    fn exchange(&self, parent: u64, name: &[u8], newparent: u64, newname: &[u8]) -> Result<()> {
        self.done(NsRequest::Exchange {
            parent,
            name: name.to_vec(),
            newparent,
            newname: newname.to_vec(),
        })
    }
    fn setattr(&self, ino: u64, a: &SetAttr) -> Result<InodeRec> {
        self.attr(NsRequest::SetAttr {
            ino,
            attr: a.clone(),
        })
    }
    fn set_size(&self, ino: u64, size: u64) -> Result<()> {
        self.done(NsRequest::SetSize { ino, size })
    }
    fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        self.done(NsRequest::Fallocate {
            ino,
            off,
            len,
            mode,
        })
    }
    fn open_file(&self, ino: u64) -> Result<InodeRec> {
        self.attr(NsRequest::Open { ino })
    }
    fn release(&self, ino: u64) -> Result<()> {
        self.done(NsRequest::Release { ino })
    }
    fn remember(&self, ino: u64) {
        // An entry a forwarded call returned was counted by the owner as it answered
        // (`serve`), which saves a round trip per lookup; only calls run here are
        // counted here. If ownership moved in between, the inode is counted twice,
        // which only delays freeing an unlinked file (never frees one in use).
        if let Ok(Some(Route::Local(ns, _, _))) = self.try_route() {
            ns.remember(ino);
        }
    }
    fn forget(&self, ino: u64, count: u64) -> Result<()> {
        self.done(NsRequest::Forget { ino, count })
    }
    fn read(&self, ino: u64, off: u64, len: u32, out: &mut dyn FnMut(&[u8])) -> Result<()> {
        if let Some(Route::Local(ns, _, _)) = self.try_route()? {
            self.calls_local.fetch_add(1, Ordering::Relaxed);
            return ns.read(ino, off, len, |d| out(d));
        }
        // A follower reads file data itself, from the chunks' replicas (often its own
        // copy), with the size the owner holds now: data below it was written and
        // acknowledged before the size covered it.
        let rec = self.getattr(ino)?;
        if rec.kind == crate::meta::record::Kind::Dir {
            return errno(libc::EISDIR);
        }
        self.reads_direct.fetch_add(1, Ordering::Relaxed);
        // A chunk read short may be one of a file in blob not fetched yet: the owner
        // fetches it (once for the cluster), then it is read again.
        let fill = |index: u32| self.fill_chunk(ino, index);
        crate::data::read_at(&self.io, ino, rec.size, off, len, Some(&fill), |d| out(d))
    }
    fn fill_chunk(&self, ino: u64, index: u32) -> Result<()> {
        if let Some(Route::Local(ns, _, _)) = self.try_route()? {
            return NsOps::fill_chunk(ns.as_ref(), ino, index);
        }
        self.done(NsRequest::Fill { ino, index })
    }
    fn write(&self, ino: u64, off: u64, data: &[u8]) -> Result<usize> {
        match self.call_epoch(NsRequest::Write { ino, off }, data)? {
            (NsReply::Written(n), _, epoch) => {
                // The size this write set is durable only at the next flush, and only
                // if the same load of the namespace makes it so (see flush_inode).
                let mut u = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
                let e = u.entry(ino).or_insert(epoch);
                if *e != epoch {
                    *e = LOST;
                }
                Ok(n as usize)
            }
            (r, _, _) => Err(unexpected(&r)),
        }
    }
    fn flush_inode(&self, ino: u64) -> Result<()> {
        let r = self.call_epoch(NsRequest::Flush { ino }, &[]);
        let mut u = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
        match (r, u.get(&ino).copied()) {
            (Err(e), _) => Err(e),
            (Ok((NsReply::Done, _, _)), None) => Ok(()),
            (Ok((NsReply::Done, _, epoch)), Some(w)) => {
                u.remove(&ino);
                if w == epoch {
                    Ok(())
                } else {
                    // Writes since the last flush went to a load of the namespace that
                    // is gone: their data may be purged and the file's size does not
                    // cover them. Say so once, like a lost page on a local disk.
                    tracing::warn!(
                        ino,
                        "writes since the last flush were lost with the namespace owner"
                    );
                    errno(libc::EIO)
                }
            }
            (Ok((r, _, _)), _) => Err(unexpected(&r)),
        }
    }
    fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        self.bytes(NsRequest::Getxattr {
            ino,
            name: name.to_vec(),
        })
    }
    fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        self.bytes(NsRequest::Listxattr { ino })
    }
    fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        self.done(NsRequest::Setxattr {
            ino,
            name: name.to_vec(),
            value: value.to_vec(),
            flags,
        })
    }
    fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.done(NsRequest::Removexattr {
            ino,
            name: name.to_vec(),
        })
    }
    fn statfs(&self) -> Result<FsStats> {
        match self.call(NsRequest::Statfs, &[])? {
            (NsReply::Stats(s), _) => Ok(s),
            (r, _) => Err(unexpected(&r)),
        }
    }
    fn flush_dirty(&self) -> Result<()> {
        self.local().map_or(Ok(()), |ns| ns.flush_dirty())
    }
    fn checkpoint_now(&self) -> Result<()> {
        self.local().map_or(Ok(()), |ns| ns.checkpoint_now())
    }
}
