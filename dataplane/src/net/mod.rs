//! The network transport between nodes and from clients: framing, authentication,
//! and a blocking client for tools and tests. The polled server side lives in
//! `crate::replica`.

pub mod auth;
pub mod client;
pub mod frame;
pub mod fuzzing;
pub mod rdma;
pub mod transport;

pub use auth::ClusterKey;
pub use frame::{FrameError, Msg, MutKind, Status};
