//! The admin-request fuzz corpus (dataplane/fuzz/corpus/admin_request) replayed as an
//! ordinary test, plus a seeded run of mutated inputs, through the same checks the
//! fuzz target makes.

#[path = "../../dataplane/fuzz/replay/mod.rs"]
mod replay;

use spool_controlplane::admin::fuzz_parse_request;

#[test]
fn admin_request_corpus() {
    replay::replay("admin_request", fuzz_parse_request);
}

#[test]
fn admin_request_mutations() {
    replay::mutate(
        "admin_request",
        5000,
        b"{}[]\":,\\ \r\n\xff",
        fuzz_parse_request,
    );
}
