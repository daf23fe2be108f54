//! Several threads write one file at once through the mount: block-aligned writes run
//! side by side in the daemon, unaligned ones (read-modify-write of a partial block)
//! run alone, and the file must hold exactly what each thread wrote, also after a
//! restart of the daemon.

#[path = "common/mount.rs"]
mod mount;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use mount::{Cache, MountOpts, MountedNode};

const THREADS: u64 = 4;
const BLOCKS: u64 = 64;
const BLOCK_BYTES: u64 = 256 << 10;

fn pattern(block: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (block as u8).wrapping_mul(29) ^ (i as u8).wrapping_mul(7) ^ (i >> 9) as u8)
        .collect()
}

fn expected() -> Vec<u8> {
    let mut want = vec![0u8; (BLOCKS * BLOCK_BYTES) as usize];
    for b in 0..BLOCKS {
        let off = (b * BLOCK_BYTES) as usize;
        let p = pattern(b, BLOCK_BYTES as usize);
        if b % 8 == 7 {
            // Unaligned: starts 100 bytes in and stops 100 bytes short.
            want[off + 100..off + BLOCK_BYTES as usize - 100]
                .copy_from_slice(&p[100..BLOCK_BYTES as usize - 100]);
        } else {
            want[off..off + BLOCK_BYTES as usize].copy_from_slice(&p);
        }
    }
    // The last block is an unaligned one: the file ends 100 bytes short of it.
    assert_eq!(BLOCKS % 8, 0);
    want.truncate(want.len() - 100);
    want
}

fn run(cache: Cache) {
    let mut node = MountedNode::start(&MountOpts {
        cache,
        ..MountOpts::default()
    });
    let path = node.mountpoint.join("shared.bin");
    let f = Arc::new(
        OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap(),
    );
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || {
                for b in (t..BLOCKS).step_by(THREADS as usize) {
                    let p = pattern(b, BLOCK_BYTES as usize);
                    let off = b * BLOCK_BYTES;
                    if b % 8 == 7 {
                        f.write_all_at(&p[100..BLOCK_BYTES as usize - 100], off + 100)
                            .unwrap();
                    } else {
                        f.write_all_at(&p, off).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let want = expected();
    let got = std::fs::read(&path).unwrap();
    assert_eq!(got.len(), want.len(), "size");
    let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(first_bad.is_none(), "content differs at byte {first_bad:?}");
    node.stop();
    node.restart();
    let again = std::fs::read(&path).unwrap();
    assert!(again == want, "content differs after a restart");
    node.stop();
}

#[test]
fn parallel_writers_to_one_file_write_through() {
    run(Cache::WriteThrough);
}

#[test]
fn parallel_writers_to_one_file_direct_io() {
    run(Cache::Direct);
}

#[test]
fn parallel_writers_to_one_file_writeback() {
    run(Cache::Writeback);
}
