//! The FUSE mount: POSIX calls become namespace records and chunk operations on the
//! dataplane (docs/design/fuse.md).
#![forbid(unsafe_code)]

pub mod cluster;
pub mod data;
pub mod error;
pub mod fs;
pub mod io;
pub mod meta;
pub mod mount;
pub mod ops;
pub mod rpc;

pub use error::{Error, Result};
pub use meta::Namespace;
pub use mount::{MountOptions, Mounted};
