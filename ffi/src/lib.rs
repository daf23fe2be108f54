//! Every `unsafe` that talks to the kernel or to C: io_uring, CPU pinning, block-device
//! ioctls (and later VFIO/NVMe registers and ibverbs), behind safe types.

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Os { what: &'static str, source: std::io::Error },
    #[error("{0}")]
    Unsupported(String),
}
