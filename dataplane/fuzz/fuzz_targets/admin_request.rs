//! `cargo fuzz run admin_request` (see deploy/fuzz.sh); the checks live in
//! `spool_controlplane::admin::fuzz_parse_request`, shared with
//! controlplane/tests/admin_request_corpus.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spool_controlplane::admin::fuzz_parse_request(data));
