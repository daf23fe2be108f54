//! Replication: the chain table and the service that applies CRAQ over the transport.

pub mod chain;
pub mod service;

pub use chain::{ChainTable, TargetState};
pub use service::{Replica, ReplicaOptions, ReplicaStatus};
