//! The dataplane's one error type.

/// Everything that can go wrong in the dataplane. Bad input (an on-disk record, a
/// request) is an error, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("device {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("device I/O error (errno {errno}): {}", std::io::Error::from_raw_os_error(*.errno))]
    Io { errno: i32 },
    #[error("short device I/O: {done} of {expected} bytes")]
    ShortIo { expected: u32, done: u32 },
    #[error("device unsupported: {0}")]
    Unsupported(String),
    #[error("invalid I/O request: {0}")]
    BadRequest(String),
    #[error("not a Spool device: {0}")]
    NotSpool(String),
    #[error("device holds {0}; use --force to overwrite it")]
    Occupied(String),
    #[error("on-device format version {found} is newer than this build supports ({supported}); upgrade spool")]
    FutureVersion { found: u32, supported: u32 },
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("checksum mismatch in chunk {chunk} block {block} (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        chunk: String,
        block: u32,
        stored: u32,
        computed: u32,
    },
    #[error("no space left on device shard {shard}")]
    NoSpace { shard: u32 },
    #[error("no such chunk {0}")]
    NoChunk(String),
    /// The userspace NVMe driver: a failed command, a timeout, a failed controller.
    #[error("nvme {0}")]
    Nvme(String),
    #[error("queue full")]
    Busy,
    #[error("dataplane is shutting down")]
    Shutdown,
    /// A chunk op sent through the cluster failed (or its outcome is unknown).
    #[error("cluster: {0}")]
    Cluster(String),
    /// A conditional write was refused: its chain moved to another version (the
    /// writer's authority over it may have passed to another node).
    #[error("chain version {expected} is stale (now {current})")]
    StaleChain { expected: u64, current: u64 },
    #[error(transparent)]
    Ffi(#[from] spool_ffi::Error),
    #[error(transparent)]
    Pool(#[from] spool_hugepages::Error),
}

impl Error {
    /// The errno a POSIX caller (the FUSE layer) should see.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { errno } => *errno,
            Error::NoSpace { .. } => libc_errno::ENOSPC,
            Error::NoChunk(_) => libc_errno::ENOENT,
            Error::BadRequest(_) => libc_errno::EINVAL,
            Error::Busy => libc_errno::EAGAIN,
            _ => libc_errno::EIO,
        }
    }
}

/// The few errno values we map to, kept here so this crate needs no libc.
mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const EAGAIN: i32 = 11;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
}
