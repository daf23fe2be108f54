//! The namespace-RPC fuzz corpus (dataplane/fuzz/corpus/ns_rpc) replayed as an ordinary
//! test, plus a seeded run of mutated inputs, through the checks the fuzz target makes
//! (`spool_fuse_shim::rpc::fuzz_message`).

use std::path::{Path, PathBuf};

use spool_fuse_shim::rpc::{fuzz_message, seed_inputs};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dataplane/fuzz/corpus/ns_rpc")
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = dir();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files
        .into_iter()
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read(&p).expect("read corpus file"),
            )
        })
        .collect()
}

#[test]
fn ns_rpc_corpus() {
    for (name, data) in corpus() {
        let r = std::panic::catch_unwind(|| fuzz_message(&data));
        assert!(r.is_ok(), "corpus input {name} panicked");
    }
}

#[test]
fn ns_rpc_mutations() {
    let seeds = corpus();
    // xorshift64*: deterministic, no dependency.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for i in 0..5000 {
        let (_, seed) = &seeds[(next() % seeds.len() as u64) as usize];
        let mut data = seed.clone();
        for _ in 0..(1 + next() % 4) {
            match next() % 4 {
                0 if !data.is_empty() => {
                    let at = (next() % data.len() as u64) as usize;
                    data[at] = next() as u8;
                }
                1 => {
                    let at = (next() % (data.len() as u64 + 1)) as usize;
                    data.insert(at, next() as u8);
                }
                2 if !data.is_empty() => {
                    let at = (next() % data.len() as u64) as usize;
                    data.truncate(at);
                }
                _ => data.extend_from_slice(&seeds[(next() % seeds.len() as u64) as usize].1),
            }
        }
        let r = std::panic::catch_unwind(|| fuzz_message(&data));
        assert!(r.is_ok(), "mutated input {i} panicked: {data:?}");
    }
}

#[test]
#[ignore = "writes the seed corpus: SPOOL_WRITE_SEEDS=1"]
fn write_seed_corpus() {
    if std::env::var_os("SPOOL_WRITE_SEEDS").is_none() {
        return;
    }
    let dir = dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in seed_inputs() {
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    }
}
