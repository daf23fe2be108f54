//! `cargo fuzz run superblock` (see deploy/fuzz.sh); the checks live in
//! `spool_dataplane::store::fuzzing::fuzz_superblock`, shared with tests/fuzz_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spool_dataplane::store::fuzzing::fuzz_superblock(data));
