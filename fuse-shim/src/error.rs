//! The FUSE layer's one error type: every failure carries the errno the caller sees.

use spool_dataplane::Error as DpError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A POSIX failure decided by the namespace or data path (ENOENT, EEXIST, ...).
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    /// The store failed; the errno comes from the store's error.
    #[error("store: {0}")]
    Store(#[from] DpError),
    /// An on-device namespace record is damaged.
    #[error("corrupt namespace {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// The metadata log could not be written; the namespace refuses changes until the
    /// daemon restarts and recovers from the device.
    #[error("namespace failed: {0}")]
    Failed(String),
    #[error("mount: {0}")]
    Mount(String),
    /// The blob store failed a fetch or returned something unexpected.
    #[error("blob: {0}")]
    Blob(String),
}

impl Error {
    pub fn errno(&self) -> i32 {
        match self {
            Error::Errno(e) => *e,
            Error::Store(e) => e.errno(),
            _ => libc::EIO,
        }
    }
    pub fn corrupt(what: &'static str, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            what,
            detail: detail.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for a POSIX failure.
pub fn errno<T>(e: i32) -> Result<T> {
    Err(Error::Errno(e))
}
