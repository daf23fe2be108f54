//! The control plane's one error type.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything the control plane's library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("cannot read config {path}: {source}")]
    ConfigRead {
        /// The file given.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },

    /// The config is not valid TOML, has an unknown key, a value of the wrong type or
    /// out of range. Each problem names the full dotted key.
    #[error("invalid config {origin}: {}", problems.join("; "))]
    Config {
        /// The file, or `<string>`.
        origin: String,
        /// One message per problem, e.g.
        /// `dataplane.cores = 0: must be between 1 and 64`.
        problems: Vec<String>,
    },

    /// Another daemon answers on the admin socket.
    #[error(
        "admin socket {path}: another spool daemon is already listening on it; \
         stop it first (spool serve runs once per node) or set [admin] socket"
    )]
    AlreadyRunning {
        /// The socket.
        path: PathBuf,
    },

    /// The admin socket could not be set up (directory, stale file, bind, mode).
    #[error("admin socket {path}: {what}: {source}")]
    AdminSocket {
        /// The socket.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// Why.
        source: io::Error,
    },

    /// The admin socket is missing, refuses, or the daemon does not answer.
    #[error("is spool serve running? socket {path}: {reason}")]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// What happened (no such file, connection refused, no answer within N s).
        reason: String,
    },

    /// The daemon's reply was not a valid admin reply.
    #[error("admin socket {path}: bad reply: {reason}")]
    AdminProtocol {
        /// The socket.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },

    /// The daemon answered `{"ok":false,"error":...}`.
    #[error("spool daemon: {0}")]
    Remote(String),

    /// The metrics listener could not be bound.
    #[error("metrics listener {addr}: {source}")]
    MetricsBind {
        /// The address from `[metrics] listen`.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },

    /// A log filter that does not parse, or a subscriber that cannot be installed.
    #[error("log: {0}")]
    Log(String),

    /// An etcd request failed: no endpoint reachable, no answer in time, a rejection
    /// by etcd, or a response that is not what the gateway should send.
    #[error("etcd {endpoint}: {reason}")]
    Etcd {
        /// The endpoint URL (all of them, comma-separated, when none was reachable).
        endpoint: String,
        /// What happened.
        reason: String,
    },

    /// The object store: a config that cannot be used, or a request that failed.
    #[error("{0}")]
    Blob(String),
}
