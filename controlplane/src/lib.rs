//! Spool's control plane: configuration, the admin socket, metrics, the daemon.
#![forbid(unsafe_code)]

pub mod admin;
pub mod blob;
pub mod cluster;
pub mod config;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod shutdown;

pub use error::Error;
