//! Spool's control plane: configuration, the admin socket, metrics, the daemon.
#![forbid(unsafe_code)]
