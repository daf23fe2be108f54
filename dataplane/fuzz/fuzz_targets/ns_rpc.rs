//! `cargo fuzz run ns_rpc` (see deploy/fuzz.sh); the checks live in
//! `spool_fuse_shim::rpc::fuzz_message`, shared with fuse-shim/tests/rpc_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spool_fuse_shim::rpc::fuzz_message(data));
