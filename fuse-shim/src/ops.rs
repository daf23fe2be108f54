//! What the FUSE layer asks of a namespace, as one trait: the node's own
//! ([`Namespace`]) or the cluster's ([`crate::cluster::ClusterNs`], which runs the
//! namespace here when this node owns it and forwards each call to the owner when not).
//!
//! Every call is also a [`NsRequest`], the form it takes on the wire to the owner, and
//! [`dispatch`] turns a request back into the call, so the two cannot drift apart.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::meta::record::{InodeRec, Kind};
use crate::meta::{now_ns, DirEntry, Namespace, NewNode};

/// Attribute changes of a `setattr` (the size goes through [`NsOps::set_size`]).
/// Times are nanoseconds since the epoch; a missing ctime means "now, at the owner".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime_ns: Option<i64>,
    pub mtime_ns: Option<i64>,
    pub ctime_ns: Option<i64>,
}

impl SetAttr {
    pub fn is_empty(&self) -> bool {
        *self == SetAttr::default()
    }

    pub fn apply(&self, r: &mut InodeRec) {
        if let Some(p) = self.perm {
            r.perm = p & 0o7777;
        }
        if let Some(u) = self.uid {
            r.uid = u;
        }
        if let Some(g) = self.gid {
            r.gid = g;
        }
        if let Some(a) = self.atime_ns {
            r.atime_ns = a;
        }
        if let Some(m) = self.mtime_ns {
            r.mtime_ns = m;
        }
        r.ctime_ns = self.ctime_ns.unwrap_or_else(now_ns);
    }
}

/// Capacity figures for `statfs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub inodes: u64,
}

/// The namespace calls of the FUSE layer. Errors carry the errno the caller sees.
pub trait NsOps: Send + Sync + std::fmt::Debug {
    fn getattr(&self, ino: u64) -> Result<InodeRec>;
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<InodeRec>;
    fn readlink(&self, ino: u64) -> Result<Vec<u8>>;
    fn readdir(&self, ino: u64, after: u64, max: usize) -> Result<Vec<DirEntry>>;
    fn create(&self, parent: u64, name: &[u8], new: &NewNode<'_>) -> Result<InodeRec>;
    fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<InodeRec>;
    fn remove(&self, parent: u64, name: &[u8], dir: bool) -> Result<()>;
    fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        noreplace: bool,
    ) -> Result<()>;
    fn exchange(&self, parent: u64, name: &[u8], newparent: u64, newname: &[u8]) -> Result<()>;
    fn setattr(&self, ino: u64, a: &SetAttr) -> Result<InodeRec>;
    fn set_size(&self, ino: u64, size: u64) -> Result<()>;
    fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> Result<()>;
    fn open_file(&self, ino: u64) -> Result<InodeRec>;
    fn release(&self, ino: u64) -> Result<()>;
    /// The kernel took a reference (an entry reply).
    fn remember(&self, ino: u64);
    fn forget(&self, ino: u64, count: u64) -> Result<()>;
    /// Hands the bytes read (short at end of file) to `out`.
    fn read(&self, ino: u64, off: u64, len: u32, out: &mut dyn FnMut(&[u8])) -> Result<()>;
    fn write(&self, ino: u64, off: u64, data: &[u8]) -> Result<usize>;
    /// Cache-on-read: makes chunk `index` of a file that is clean in blob complete
    /// (fetched once, where the namespace runs); nothing for other files.
    fn fill_chunk(&self, ino: u64, index: u32) -> Result<()>;
    fn flush_inode(&self, ino: u64) -> Result<()>;
    fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>>;
    fn listxattr(&self, ino: u64) -> Result<Vec<u8>>;
    fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()>;
    fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()>;
    fn statfs(&self) -> Result<FsStats>;
    /// Persists every dirty inode (the background flusher); nothing to do where the
    /// namespace runs elsewhere.
    fn flush_dirty(&self) -> Result<()>;
    /// A checkpoint at unmount, where the namespace runs here.
    fn checkpoint_now(&self) -> Result<()>;
}

impl NsOps for Namespace {
    fn getattr(&self, ino: u64) -> Result<InodeRec> {
        Namespace::getattr(self, ino)
    }
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<InodeRec> {
        Namespace::lookup(self, parent, name)
    }
    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        Namespace::readlink(self, ino)
    }
    fn readdir(&self, ino: u64, after: u64, max: usize) -> Result<Vec<DirEntry>> {
        Namespace::readdir(self, ino, after, max)
    }
    fn create(&self, parent: u64, name: &[u8], new: &NewNode<'_>) -> Result<InodeRec> {
        Namespace::create(self, parent, name, new)
    }
    fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<InodeRec> {
        Namespace::link(self, ino, newparent, newname)
    }
    fn remove(&self, parent: u64, name: &[u8], dir: bool) -> Result<()> {
        Namespace::remove(self, parent, name, dir)
    }
    fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        noreplace: bool,
    ) -> Result<()> {
        Namespace::rename(self, parent, name, newparent, newname, noreplace)
    }
    fn exchange(&self, parent: u64, name: &[u8], newparent: u64, newname: &[u8]) -> Result<()> {
        Namespace::exchange(self, parent, name, newparent, newname)
    }
    fn setattr(&self, ino: u64, a: &SetAttr) -> Result<InodeRec> {
        if a.is_empty() {
            return Namespace::getattr(self, ino);
        }
        self.update(ino, |r| {
            a.apply(r);
            Ok(())
        })
    }
    fn set_size(&self, ino: u64, size: u64) -> Result<()> {
        Namespace::set_size(self, ino, size)
    }
    fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        Namespace::fallocate(self, ino, off, len, mode)
    }
    fn open_file(&self, ino: u64) -> Result<InodeRec> {
        Namespace::open_file(self, ino)
    }
    fn release(&self, ino: u64) -> Result<()> {
        Namespace::release(self, ino)
    }
    fn remember(&self, ino: u64) {
        Namespace::remember(self, ino)
    }
    fn forget(&self, ino: u64, count: u64) -> Result<()> {
        Namespace::forget(self, ino, count)
    }
    fn read(&self, ino: u64, off: u64, len: u32, out: &mut dyn FnMut(&[u8])) -> Result<()> {
        Namespace::read(self, ino, off, len, |d| out(d))
    }
    fn write(&self, ino: u64, off: u64, data: &[u8]) -> Result<usize> {
        Namespace::write(self, ino, off, data)
    }
    fn fill_chunk(&self, ino: u64, index: u32) -> Result<()> {
        let size = Namespace::getattr(self, ino)?.size;
        self.blob_fill_ahead(ino, index, size)
    }
    fn flush_inode(&self, ino: u64) -> Result<()> {
        Namespace::flush_inode(self, ino)
    }
    fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        Namespace::getxattr(self, ino, name)
    }
    fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        Namespace::listxattr(self, ino)
    }
    fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        Namespace::setxattr(self, ino, name, value, flags)
    }
    fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        Namespace::removexattr(self, ino, name)
    }
    fn statfs(&self) -> Result<FsStats> {
        let s = self.io.engine().status();
        Ok(FsStats {
            capacity_bytes: s.capacity_bytes,
            used_bytes: s.used_bytes,
            inodes: self.status().inodes,
        })
    }
    fn flush_dirty(&self) -> Result<()> {
        Namespace::flush_dirty(self)
    }
    fn checkpoint_now(&self) -> Result<()> {
        Namespace::checkpoint_now(self)
    }
}

/// One namespace call on the wire. A write's bytes and a read's result travel beside
/// it (see `cluster::rpc`), not in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NsRequest {
    Getattr {
        ino: u64,
    },
    Lookup {
        parent: u64,
        name: Vec<u8>,
    },
    Readlink {
        ino: u64,
    },
    Readdir {
        ino: u64,
        after: u64,
        max: u32,
    },
    Create {
        parent: u64,
        name: Vec<u8>,
        kind: Kind,
        perm: u16,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Vec<u8>,
    },
    Link {
        ino: u64,
        newparent: u64,
        newname: Vec<u8>,
    },
    Remove {
        parent: u64,
        name: Vec<u8>,
        dir: bool,
    },
    Rename {
        parent: u64,
        name: Vec<u8>,
        newparent: u64,
        newname: Vec<u8>,
        noreplace: bool,
    },
    Exchange {
        parent: u64,
        name: Vec<u8>,
        newparent: u64,
        newname: Vec<u8>,
    },
    SetAttr {
        ino: u64,
        attr: SetAttr,
    },
    SetSize {
        ino: u64,
        size: u64,
    },
    Fallocate {
        ino: u64,
        off: u64,
        len: u64,
        mode: i32,
    },
    Open {
        ino: u64,
    },
    Release {
        ino: u64,
    },
    Remember {
        ino: u64,
    },
    Forget {
        ino: u64,
        count: u64,
    },
    Read {
        ino: u64,
        off: u64,
        len: u32,
    },
    Write {
        ino: u64,
        off: u64,
    },
    Flush {
        ino: u64,
    },
    Getxattr {
        ino: u64,
        name: Vec<u8>,
    },
    Listxattr {
        ino: u64,
    },
    Setxattr {
        ino: u64,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
    },
    Removexattr {
        ino: u64,
        name: Vec<u8>,
    },
    Statfs,
    Fill {
        ino: u64,
        index: u32,
    },
}

/// A call's result on the wire (bytes, such as read data, travel beside it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NsReply {
    Done,
    Attr(InodeRec),
    /// readlink, xattrs, read: the bytes beside the reply.
    Bytes,
    Entries(Vec<DirEntry>),
    Written(u64),
    Stats(FsStats),
    /// The call failed with this errno.
    Errno(i32),
    /// This node does not own the namespace (any more): ask the owner the current
    /// chain table names.
    NotOwner,
}

/// Runs `req` (with a write's `data`) on `ns`; read data and other bytes go to `out`.
pub fn dispatch(ns: &dyn NsOps, req: &NsRequest, data: &[u8], out: &mut Vec<u8>) -> NsReply {
    use NsRequest as R;
    let bytes = |r: Result<Vec<u8>>, out: &mut Vec<u8>| {
        r.map(|v| {
            *out = v;
            NsReply::Bytes
        })
    };
    let done = |r: Result<()>| r.map(|()| NsReply::Done);
    let r = match req {
        R::Getattr { ino } => ns.getattr(*ino).map(NsReply::Attr),
        R::Lookup { parent, name } => ns.lookup(*parent, name).map(NsReply::Attr),
        R::Readlink { ino } => bytes(ns.readlink(*ino), out),
        R::Readdir { ino, after, max } => ns
            .readdir(*ino, *after, (*max as usize).min(READDIR_MAX))
            .map(NsReply::Entries),
        R::Create {
            parent,
            name,
            kind,
            perm,
            uid,
            gid,
            rdev,
            target,
        } => {
            let new = NewNode {
                kind: *kind,
                perm: *perm,
                uid: *uid,
                gid: *gid,
                rdev: *rdev,
                target,
            };
            ns.create(*parent, name, &new).map(NsReply::Attr)
        }
        R::Link {
            ino,
            newparent,
            newname,
        } => ns.link(*ino, *newparent, newname).map(NsReply::Attr),
        R::Remove { parent, name, dir } => done(ns.remove(*parent, name, *dir)),
        R::Rename {
            parent,
            name,
            newparent,
            newname,
            noreplace,
        } => done(ns.rename(*parent, name, *newparent, newname, *noreplace)),
        R::Exchange {
            parent,
            name,
            newparent,
            newname,
        } => done(ns.exchange(*parent, name, *newparent, newname)),
        R::SetAttr { ino, attr } => ns.setattr(*ino, attr).map(NsReply::Attr),
        R::SetSize { ino, size } => done(ns.set_size(*ino, *size)),
        R::Fallocate {
            ino,
            off,
            len,
            mode,
        } => done(ns.fallocate(*ino, *off, *len, *mode)),
        R::Open { ino } => ns.open_file(*ino).map(NsReply::Attr),
        R::Release { ino } => done(ns.release(*ino)),
        R::Remember { ino } => {
            ns.remember(*ino);
            Ok(NsReply::Done)
        }
        R::Forget { ino, count } => done(ns.forget(*ino, *count)),
        R::Read { ino, off, len } => ns
            .read(*ino, *off, *len, &mut |d| out.extend_from_slice(d))
            .map(|()| NsReply::Bytes),
        R::Write { ino, off } => ns
            .write(*ino, *off, data)
            .map(|n| NsReply::Written(n as u64)),
        R::Flush { ino } => done(ns.flush_inode(*ino)),
        R::Getxattr { ino, name } => bytes(ns.getxattr(*ino, name), out),
        R::Listxattr { ino } => bytes(ns.listxattr(*ino), out),
        R::Setxattr {
            ino,
            name,
            value,
            flags,
        } => done(ns.setxattr(*ino, name, value, *flags)),
        R::Removexattr { ino, name } => done(ns.removexattr(*ino, name)),
        R::Statfs => ns.statfs().map(NsReply::Stats),
        R::Fill { ino, index } => done(ns.fill_chunk(*ino, *index)),
    };
    r.unwrap_or_else(|e: Error| {
        if !matches!(e, Error::Errno(_)) {
            tracing::warn!(error = %e, request = ?req, "namespace request failed");
        }
        NsReply::Errno(e.errno())
    })
}

/// Most directory entries one readdir request returns.
pub const READDIR_MAX: usize = 1024;
