//! The blob tier: the mount's files drain to an object store (Azure Blob, or a local
//! directory) in the background. See docs/BLOB.md.

pub mod evict;
pub mod reader;
pub mod store;
pub mod warmup;
pub mod writeback;

pub use reader::StoreReader;
pub use warmup::Warmup;
pub use writeback::{Backlog, NsSource, Writeback};
