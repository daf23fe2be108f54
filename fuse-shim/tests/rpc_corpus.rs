//! The namespace-RPC fuzz corpus (dataplane/fuzz/corpus/ns_rpc) replayed as an ordinary
//! test, plus a seeded run of mutated inputs, through the checks the fuzz target makes
//! (`spool_fuse_shim::rpc::fuzz_message`).

#[path = "../../dataplane/fuzz/replay/mod.rs"]
mod replay;

use std::path::Path;

use spool_fuse_shim::rpc::{fuzz_message, seed_inputs};

#[test]
fn ns_rpc_corpus() {
    replay::replay("ns_rpc", fuzz_message);
}

#[test]
fn ns_rpc_mutations() {
    replay::mutate("ns_rpc", 5000, &[], fuzz_message);
}

#[test]
#[ignore = "writes the seed corpus: SPOOL_WRITE_SEEDS=1"]
fn write_seed_corpus() {
    if std::env::var_os("SPOOL_WRITE_SEEDS").is_none() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dataplane/fuzz/corpus/ns_rpc");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in seed_inputs() {
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    }
}
