//! The admin-request fuzz corpus (dataplane/fuzz/corpus/admin_request) replayed as an
//! ordinary test, plus a seeded run of mutated inputs, through the same checks the
//! fuzz target makes.

use std::path::Path;

use spool_controlplane::admin::fuzz_parse_request;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dataplane/fuzz/corpus/admin_request");
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
fn admin_request_corpus() {
    for (name, data) in corpus() {
        let r = std::panic::catch_unwind(|| fuzz_parse_request(&data));
        assert!(r.is_ok(), "corpus input {name} panicked");
    }
}

#[test]
fn admin_request_mutations() {
    let seeds = corpus();
    // xorshift64*: deterministic, no dependency.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    const BYTES: &[u8] = b"{}[]\":,\\ \r\n\xff";
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
                    data.insert(at, BYTES[(next() % BYTES.len() as u64) as usize]);
                }
                2 if !data.is_empty() => {
                    let at = (next() % data.len() as u64) as usize;
                    data.truncate(at);
                }
                _ => data.extend_from_slice(&seeds[(next() % seeds.len() as u64) as usize].1),
            }
        }
        let r = std::panic::catch_unwind(|| fuzz_parse_request(&data));
        assert!(
            r.is_ok(),
            "mutated input {i} panicked: {:?}",
            String::from_utf8_lossy(&data)
        );
    }
}
