//! The FUSE filesystem that turns POSIX calls into dataplane requests (issue: FUSE mount).
#![forbid(unsafe_code)]
