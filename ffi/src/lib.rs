//! Every `unsafe` that talks to the kernel or to C: io_uring, CPU pinning, block-device
//! ioctls (and later VFIO/NVMe registers and ibverbs), behind safe types.

pub mod affinity;
pub mod blkdev;
pub mod mount;
pub mod posix;
pub mod uring;
pub mod verbs;
pub mod vfio;

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    /// No free slot (or submission queue entry) right now; reap completions and retry.
    #[error("io_uring full: {in_flight} operations in flight")]
    RingFull { in_flight: usize },
    /// An RDMA queue pair has as much work posted as it was created for; poll first.
    #[error("RDMA queue pair full: {outstanding} requests outstanding")]
    QueuePairFull { outstanding: usize },
    /// The kernel would access bytes past the end of the buffer.
    #[error("I/O of {len} bytes does not fit a buffer of {capacity} bytes")]
    BufferTooSmall { len: u32, capacity: usize },
}

impl Error {
    /// Wraps `errno` of the failed call `what`.
    pub(crate) fn last_os(what: &'static str) -> Error {
        Error::Os {
            what,
            source: std::io::Error::last_os_error(),
        }
    }
}
