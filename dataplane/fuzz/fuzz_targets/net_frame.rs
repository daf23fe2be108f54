//! `cargo fuzz run net_frame` (see deploy/fuzz.sh); the checks live in
//! `spool_dataplane::net::fuzzing::fuzz_net_frame`, shared with tests/fuzz_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spool_dataplane::net::fuzzing::fuzz_net_frame(data));
