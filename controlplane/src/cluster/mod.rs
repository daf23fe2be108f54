//! Cluster membership and the chain table.
pub mod agent;
pub mod etcd;
