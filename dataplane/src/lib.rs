//! Spool's dataplane: block devices, the on-device format, the chunk store and the
//! polled, core-pinned engine that drives them.
//!
//! Everything here runs on dataplane cores: single-threaded state machines driven by
//! `poll`, with buffers from the hugepage pool, no allocation, no lock and no logging
//! per I/O.
#![forbid(unsafe_code)]

pub mod device;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod net;
pub mod replica;
pub mod store;

pub use error::Error;
