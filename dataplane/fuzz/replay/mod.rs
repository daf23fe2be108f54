//! Replaying a fuzz corpus as an ordinary test, shared by the tests of targets whose
//! checks live outside `spool-dataplane` (included with `#[path]`): read the checked-in
//! inputs, then run seeded mutations of them through the same check the target makes.

use std::path::Path;

/// The inputs of `dataplane/fuzz/corpus/<target>`, sorted by name; the corpus must
/// exist and not be empty.
pub fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dataplane/fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).expect("read corpus file");
            (p.display().to_string(), data)
        })
        .collect()
}

/// Every corpus input through `check`, which must not panic.
pub fn replay(target: &str, check: fn(&[u8])) {
    for (name, data) in corpus(target) {
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "corpus input {name} panicked");
    }
}

/// `rounds` seeded mutations of the corpus (byte flips, insertions of `bytes` or any
/// byte, truncations, splices) through `check`, which must not panic.
pub fn mutate(target: &str, rounds: usize, bytes: &[u8], check: fn(&[u8])) {
    let seeds = corpus(target);
    // xorshift64*: deterministic, no dependency.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for i in 0..rounds {
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
                    let b = match bytes.is_empty() {
                        true => next() as u8,
                        false => bytes[(next() % bytes.len() as u64) as usize],
                    };
                    data.insert(at, b);
                }
                2 if !data.is_empty() => {
                    let at = (next() % data.len() as u64) as usize;
                    data.truncate(at);
                }
                _ => data.extend_from_slice(&seeds[(next() % seeds.len() as u64) as usize].1),
            }
        }
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(
            r.is_ok(),
            "mutated input {i} panicked: {:?}",
            String::from_utf8_lossy(&data)
        );
    }
}
