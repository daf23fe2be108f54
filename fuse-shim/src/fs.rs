//! The fuser `Filesystem`: each kernel request becomes a namespace or data-path call,
//! and every failure becomes the errno the design table names (docs/design/fuse.md).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};

use crate::error::Error;
use crate::meta::record::{InodeRec, Kind, NAME_MAX_BYTES};
use crate::meta::{now_ns, NewNode};
use crate::ops::{NsOps, SetAttr};

/// Largest FUSE request payload (= the kernel's `max_pages_limit` of 256 pages and the
/// DMA buffer size): one write becomes at most two chunk ops.
pub const MAX_WRITE_BYTES: u32 = 1 << 20;
/// What `stat` reports as the preferred I/O size: Python sizes its buffers from it, so
/// checkpoint writers hand us 1 MiB pieces.
const BLKSIZE_BYTES: u32 = 1 << 20;

/// Settings the filesystem needs from the mount configuration.
#[derive(Clone, Debug)]
pub struct FsOptions {
    pub attr_ttl: Duration,
    pub writeback_cache: bool,
    /// Every open is a FUSE direct-I/O open (no page cache).
    pub direct_io: bool,
    pub threads: usize,
}

#[derive(Debug)]
pub struct SpoolFs {
    ns: Arc<dyn NsOps>,
    opts: FsOptions,
}

fn to_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn from_time(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn attr(r: &InodeRec) -> FileAttr {
    FileAttr {
        ino: INodeNo(r.ino),
        size: r.size,
        blocks: r.size.div_ceil(512),
        atime: to_time(r.atime_ns),
        mtime: to_time(r.mtime_ns),
        ctime: to_time(r.ctime_ns),
        crtime: to_time(r.btime_ns),
        kind: file_type(r.kind),
        perm: r.perm,
        nlink: r.nlink,
        uid: r.uid,
        gid: r.gid,
        rdev: r.rdev,
        blksize: BLKSIZE_BYTES,
        flags: 0,
    }
}

fn err(e: &Error) -> Errno {
    if !matches!(e, Error::Errno(_)) {
        tracing::warn!(error = %e, "request failed");
    }
    Errno::from_i32(e.errno())
}

impl SpoolFs {
    pub fn new(ns: Arc<dyn NsOps>, opts: FsOptions) -> SpoolFs {
        SpoolFs { ns, opts }
    }

    fn entry(&self, r: Result<InodeRec, Error>, reply: ReplyEntry) {
        match r {
            Ok(rec) => {
                // The kernel now holds a reference until it sends FORGET.
                self.ns.remember(rec.ino);
                reply.entry(&self.opts.attr_ttl, &attr(&rec), Generation(0))
            }
            Err(e) => reply.error(err(&e)),
        }
    }

    fn empty(r: Result<(), Error>, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn open_flags(&self, flags: i32) -> FopenFlags {
        if self.opts.direct_io || flags & libc::O_DIRECT != 0 {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            FopenFlags::empty()
        }
    }
}

/// A new inode of `kind` owned by the caller, with `mode`'s permission bits minus `umask`.
fn new_node(req: &Request, kind: Kind, mode: u32, umask: u32, rdev: u32) -> NewNode<'static> {
    NewNode {
        kind,
        perm: (mode & !umask & 0o7777) as u16,
        uid: req.uid(),
        gid: req.gid(),
        rdev,
        target: &[],
    }
}

/// The kind and permission bits of a `mode`.
fn kind_of(mode: u32) -> Option<Kind> {
    Some(match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        libc::S_IFSOCK => Kind::Socket,
        libc::S_IFCHR => Kind::CharDev,
        libc::S_IFBLK => Kind::BlockDev,
        _ => return None,
    })
}

impl Filesystem for SpoolFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_WRITE_BYTES) {
            tracing::info!(max, "kernel limits FUSE writes");
            let _ = config.set_max_write(max);
        }
        let _ = config.set_time_granularity(Duration::from_nanos(1));
        let bg = (2 * self.opts.threads).clamp(4, 64) as u16;
        let _ = config.set_max_background(bg);
        let _ = config.set_congestion_threshold(bg * 3 / 4);
        let mut want = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
        if self.opts.writeback_cache {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        if let Err(missing) = config.add_capabilities(want) {
            tracing::warn!(
                ?missing,
                "kernel lacks FUSE capabilities; continuing without them"
            );
            let _ = config.add_capabilities(want - missing);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(self.ns.lookup(parent.0, name.as_bytes()), reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if let Err(e) = self.ns.forget(ino.0, nlookup) {
            tracing::warn!(ino = ino.0, error = %e, "freeing a forgotten inode");
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.ns.getattr(ino.0) {
            Ok(r) => reply.attr(&self.opts.attr_ttl, &attr(&r)),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ino = ino.0;
        if let Some(s) = size {
            if let Err(e) = self.ns.set_size(ino, s) {
                return reply.error(err(&e));
            }
        }
        let t = |v: TimeOrNow| match v {
            TimeOrNow::Now => now_ns(),
            TimeOrNow::SpecificTime(s) => from_time(s),
        };
        let r = if mode.is_some()
            || uid.is_some()
            || gid.is_some()
            || atime.is_some()
            || mtime.is_some()
            || ctime.is_some()
        {
            let a = SetAttr {
                perm: mode.map(|m| (m & 0o7777) as u16),
                uid,
                gid,
                atime_ns: atime.map(t),
                mtime_ns: mtime.map(t),
                ctime_ns: ctime.map(from_time),
            };
            self.ns.setattr(ino, &a)
        } else {
            self.ns.getattr(ino)
        };
        match r {
            Ok(r) => reply.attr(&self.opts.attr_ttl, &attr(&r)),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.ns.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(kind) = kind_of(mode) else {
            return reply.error(Errno::EINVAL);
        };
        if matches!(kind, Kind::Dir | Kind::Symlink) {
            return reply.error(Errno::EINVAL);
        }
        let new = new_node(req, kind, mode, umask, rdev);
        self.entry(self.ns.create(parent.0, name.as_bytes(), &new), reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let new = new_node(req, Kind::Dir, mode, umask, 0);
        self.entry(self.ns.create(parent.0, name.as_bytes(), &new), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.ns.remove(parent.0, name.as_bytes(), false), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.ns.remove(parent.0, name.as_bytes(), true), reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let new = NewNode {
            kind: Kind::Symlink,
            perm: 0o777,
            uid: req.uid(),
            gid: req.gid(),
            rdev: 0,
            target: target.as_os_str().as_bytes(),
        };
        self.entry(self.ns.create(parent.0, link_name.as_bytes(), &new), reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return Self::empty(
                self.ns
                    .exchange(parent.0, name.as_bytes(), newparent.0, newname.as_bytes()),
                reply,
            );
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        Self::empty(
            self.ns.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                noreplace,
            ),
            reply,
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(self.ns.link(ino.0, newparent.0, newname.as_bytes()), reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let ino = ino.0;
        match self.ns.open_file(ino) {
            Ok(rec) => {
                if flags.0 & libc::O_TRUNC != 0 && rec.kind == Kind::File && rec.size > 0 {
                    if let Err(e) = self.ns.set_size(ino, 0) {
                        let _ = self.ns.release(ino);
                        return reply.error(err(&e));
                    }
                }
                reply.opened(FileHandle(0), self.open_flags(flags.0));
            }
            Err(e) => reply.error(err(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut reply = Some(reply);
        let r = self.ns.read(ino.0, offset, size, &mut |data| {
            if let Some(rp) = reply.take() {
                rp.data(data);
            }
        });
        if let (Err(e), Some(rp)) = (r, reply) {
            rp.error(err(&e));
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.ns.write(ino.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Every close: what was written through this file is durable when close returns
        // (checkpoint writers fsync before their last buffered bytes reach us).
        Self::empty(self.ns.flush_inode(ino.0), reply);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let r = self
            .ns
            .flush_inode(ino.0)
            .and_then(|()| self.ns.release(ino.0));
        Self::empty(r, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Data is durable when each WRITE is acknowledged; the size and times are not.
        Self::empty(self.ns.flush_inode(ino.0), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.ns.getattr(ino.0) {
            Ok(r) if r.kind == Kind::Dir => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let ino = ino.0;
        let dir = match self.ns.getattr(ino) {
            Ok(r) => r,
            Err(e) => return reply.error(err(&e)),
        };
        if dir.nlink == 0 {
            // A removed directory still open lists nothing (not even "." and "..").
            return reply.ok();
        }
        // Offsets: 1 is after ".", 2 after "..", then entry cookies (all above 2).
        if offset < 1 && reply.add(INodeNo(ino), 1, FileType::Directory, ".") {
            return reply.ok();
        }
        if offset < 2 && reply.add(INodeNo(dir.parent.max(1)), 2, FileType::Directory, "..") {
            return reply.ok();
        }
        let mut after = offset.max(2);
        loop {
            let entries = match self.ns.readdir(ino, after, 128) {
                Ok(e) => e,
                Err(e) => return reply.error(err(&e)),
            };
            if entries.is_empty() {
                return reply.ok();
            }
            for e in entries {
                if reply.add(
                    INodeNo(e.ino),
                    e.cookie,
                    file_type(e.kind),
                    OsStr::from_bytes(&e.name),
                ) {
                    return reply.ok();
                }
                after = e.cookie;
            }
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Every namespace change is durable before it is acknowledged.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = match self.ns.statfs() {
            Ok(s) => s,
            Err(e) => return reply.error(err(&e)),
        };
        let frsize = 4096u64;
        let blocks = s.capacity_bytes / frsize;
        let free = s.capacity_bytes.saturating_sub(s.used_bytes) / frsize;
        let files = s.inodes;
        reply.statfs(
            blocks,
            free,
            free,
            files + (1 << 30),
            1 << 30,
            BLKSIZE_BYTES,
            NAME_MAX_BYTES as u32,
            frsize as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        Self::empty(
            self.ns.setxattr(ino.0, name.as_bytes(), value, flags),
            reply,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr_reply(self.ns.getxattr(ino.0, name.as_bytes()), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(self.ns.listxattr(ino.0), size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.ns.removexattr(ino.0, name.as_bytes()), reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let new = new_node(req, Kind::File, mode, umask, 0);
        let rec = match self.ns.create(parent.0, name.as_bytes(), &new) {
            Ok(r) => r,
            Err(e) => return reply.error(err(&e)),
        };
        if let Err(e) = self.ns.open_file(rec.ino) {
            return reply.error(err(&e));
        }
        self.ns.remember(rec.ino);
        reply.created(
            &self.opts.attr_ttl,
            &attr(&rec),
            Generation(0),
            FileHandle(0),
            self.open_flags(flags),
        );
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Python's open() asks isatty (TCGETS) on every file: not a terminal, quietly.
        reply.error(Errno::ENOTTY);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.ns.fallocate(ino.0, offset, length, mode), reply);
    }
}

fn xattr_reply(r: Result<Vec<u8>, Error>, size: u32, reply: ReplyXattr) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(err(&e)),
    }
}
