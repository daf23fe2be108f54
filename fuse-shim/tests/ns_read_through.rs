//! Cache-on-read in the namespace (`meta::remote`) against an in-memory store that
//! counts its requests: imports from listings, one fetch per chunk under concurrent
//! readers, hydration before the first change, ETag changes, and a reload.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use spool_fuse_shim::meta::remote::{BlobReader, Fetched, ListedFile, Listing};
use spool_fuse_shim::meta::state::ROOT_INO;
use spool_fuse_shim::Namespace;

/// Objects by key (mount path) with their ETag.
#[derive(Debug, Default)]
struct FakeStore {
    objects: Mutex<BTreeMap<String, (Vec<u8>, String)>>,
    gets: AtomicUsize,
    lists: AtomicUsize,
    /// Fetches fail while set (an outage).
    down: std::sync::atomic::AtomicBool,
    ttl_ms: u64,
    /// Chunks fetched ahead of a sequential reader.
    prefetch: u32,
}

impl FakeStore {
    fn put(&self, key: &str, data: Vec<u8>) {
        let mut o = self.objects.lock().unwrap();
        let etag = format!("\"e{}\"", o.len() + 1000 * data.len());
        o.insert(key.to_owned(), (data, etag));
    }
}

impl BlobReader for FakeStore {
    fn list(&self, dir: &str) -> Result<Listing, String> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut l = Listing::default();
        for (k, (d, e)) in self.objects.lock().unwrap().iter() {
            let Some(rest) = k.strip_prefix(&prefix) else {
                continue;
            };
            match rest.split_once('/') {
                Some((sub, _)) => {
                    if !l.dirs.iter().any(|x| x == sub) {
                        l.dirs.push(sub.to_owned());
                    }
                }
                None => l.files.push(ListedFile {
                    name: rest.to_owned(),
                    size: d.len() as u64,
                    etag: e.trim_matches('"').to_owned(),
                    mtime_ns: 1,
                }),
            }
        }
        Ok(l)
    }
    fn get(&self, key: &str, etag: &str, off: u64, len: u64) -> Result<Fetched, String> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        if self.down.load(Ordering::Relaxed) {
            return Err("store down".to_owned());
        }
        // Slow enough that concurrent readers overlap.
        std::thread::sleep(Duration::from_millis(5));
        let o = self.objects.lock().unwrap();
        match o.get(key) {
            Some((d, e)) if e.trim_matches('"') == etag.trim_matches('"') => Ok(Fetched::Data(
                d[off as usize..(off + len) as usize].to_vec(),
            )),
            _ => Ok(Fetched::Changed),
        }
    }
    fn listing_ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }
    fn prefetch_chunks(&self) -> u32 {
        self.prefetch
    }
    fn spawn(&self, f: Box<dyn FnOnce() + Send>) {
        std::thread::spawn(f);
    }
    fn writeback(&self) -> bool {
        true
    }
    fn space_wait(&self) -> Duration {
        Duration::from_millis(500)
    }
}

fn read_all(ns: &Namespace, ino: u64) -> Vec<u8> {
    let size = ns.getattr(ino).unwrap().size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let got = ns
            .read(ino, out.len() as u64, 48 << 10, |d| d.to_vec())
            .unwrap();
        assert!(!got.is_empty(), "short read at {}", out.len());
        out.extend_from_slice(&got);
    }
    out
}

fn setup(
    ttl_ms: u64,
) -> (
    Arc<spool_dataplane::engine::Engine>,
    Arc<Namespace>,
    Arc<FakeStore>,
) {
    let engine = engine_on(fresh_device());
    let ns = Arc::new(open_ns(&engine).unwrap());
    let store = Arc::new(FakeStore {
        ttl_ms,
        ..FakeStore::default()
    });
    ns.blob_read_from(Arc::clone(&store) as Arc<dyn BlobReader>);
    (engine, ns, store)
}

const C: usize = CHUNK as usize;

#[test]
fn listed_blobs_are_fetched_once_per_chunk_by_concurrent_readers() {
    let (engine, ns, store) = setup(60_000);
    let model = data(7, 5 * C + 333);
    store.put("m/w.bin", model.clone());
    store.put("top", b"hello".to_vec());
    let mut names: Vec<Vec<u8>> = ns
        .readdir(ROOT_INO, 0, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    names.sort();
    assert_eq!(names, [b"m".to_vec(), b"top".to_vec()]);
    let ino = lookup_path(&ns, &["m", "w.bin"]).unwrap();
    assert_eq!(ns.getattr(ino).unwrap().size, model.len() as u64);
    assert_eq!(store.gets.load(Ordering::Relaxed), 0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| assert!(read_all(&ns, ino) == model));
        }
    });
    assert_eq!(store.gets.load(Ordering::Relaxed), 6, "one GET per chunk");
    // Listings are cached for the TTL.
    let lists = store.lists.load(Ordering::Relaxed);
    lookup_path(&ns, &["m", "w.bin"]).unwrap();
    assert_eq!(store.lists.load(Ordering::Relaxed), lists);
    // The store goes away: the cache serves.
    store.down.store(true, Ordering::Relaxed);
    assert!(read_all(&ns, ino) == model);
    let top = lookup_path(&ns, &["top"]).unwrap();
    let e = ns.read(top, 0, 10, |d| d.to_vec()).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    drop(ns);
    shutdown(engine);
}

#[test]
fn a_change_fetches_what_it_keeps_first() {
    let (engine, ns, store) = setup(60_000);
    let orig = data(9, 4 * C + 10);
    store.put("f", orig.clone());
    let ino = lookup_path(&ns, &["f"]).unwrap();
    // A write in the third chunk, nothing read before.
    ns.write(ino, 2 * C as u64 + 7, b"XYZ").unwrap();
    let mut want = orig.clone();
    want[2 * C + 7..2 * C + 10].copy_from_slice(b"XYZ");
    assert_eq!(store.gets.load(Ordering::Relaxed), 5, "every chunk fetched");
    store.down.store(true, Ordering::Relaxed);
    assert!(read_all(&ns, ino) == want);
    // A blob put after the listing was cached is not visible until the TTL ends.
    store.down.store(false, Ordering::Relaxed);
    store.put("g", data(10, 4 * C));
    let g = lookup_path(&ns, &["g"]);
    assert_eq!(g.unwrap_err().errno(), libc::ENOENT);
    drop(ns);
    shutdown(engine);
}

#[test]
fn truncating_an_unfetched_file_keeps_its_head() {
    let (engine, ns, store) = setup(0);
    let orig = data(11, 4 * C);
    store.put("g", orig.clone());
    let ino = lookup_path(&ns, &["g"]).unwrap();
    ns.set_size(ino, C as u64 + 5).unwrap();
    assert_eq!(
        store.gets.load(Ordering::Relaxed),
        2,
        "only the chunks kept"
    );
    store.down.store(true, Ordering::Relaxed);
    assert!(read_all(&ns, ino) == orig[..C + 5]);
    drop(ns);
    shutdown(engine);
}

#[test]
fn an_etag_change_replaces_the_cached_content() {
    let (engine, ns, store) = setup(0);
    store.put("f", data(1, 3 * C));
    let ino = lookup_path(&ns, &["f"]).unwrap();
    let first = ns.read(ino, 0, 4096, |d| d.to_vec()).unwrap();
    assert_eq!(first, data(1, 3 * C)[..4096]);
    // Replaced behind the cache; a fetch with the old ETag is refused.
    let v2 = data(2, 2 * C + 99);
    store.put("f", v2.clone());
    let e = ns.read(ino, C as u64, 4096, |d| d.to_vec()).unwrap_err();
    assert_eq!(e.errno(), libc::ESTALE, "{e}");
    // The next lookup lists again and re-imports it: new size, no old chunk.
    let again = lookup_path(&ns, &["f"]).unwrap();
    assert_eq!(again, ino);
    assert_eq!(ns.getattr(ino).unwrap().size, v2.len() as u64);
    assert!(read_all(&ns, ino) == v2);
    drop(ns);
    shutdown(engine);
}

#[test]
fn imports_survive_a_reload_and_fetch_again() {
    let engine = engine_on(fresh_device());
    let store = Arc::new(FakeStore {
        ttl_ms: 60_000,
        ..FakeStore::default()
    });
    let blob = data(5, 2 * C + 1);
    store.put("d/x", blob.clone());
    {
        let ns = Arc::new(open_ns(&engine).unwrap());
        ns.blob_read_from(Arc::clone(&store) as Arc<dyn BlobReader>);
        let ino = lookup_path(&ns, &["d", "x"]).unwrap();
        assert_eq!(ns.read(ino, 0, 10, |d| d.to_vec()).unwrap(), blob[..10]);
        ns.checkpoint_now().unwrap();
    }
    let ns = Arc::new(open_ns(&engine).unwrap());
    ns.blob_read_from(Arc::clone(&store) as Arc<dyn BlobReader>);
    let lists = store.lists.load(Ordering::Relaxed);
    let ino = ns.lookup(ROOT_INO, b"d").unwrap().ino;
    let ino = ns.lookup(ino, b"x").unwrap().ino;
    assert!(read_all(&ns, ino) == blob);
    assert_eq!(
        store.gets.load(Ordering::Relaxed),
        3,
        "the cached chunk is not fetched again"
    );
    assert!(
        store.lists.load(Ordering::Relaxed) > lists,
        "listed again after a reload"
    );
    drop(ns);
    shutdown(engine);
}

#[test]
fn eviction_drops_clean_chunks_least_recently_read_first_and_never_dirty_ones() {
    let (engine, ns, store) = setup(60_000);
    let (a, b) = (data(21, 2 * C), data(22, 2 * C));
    store.put("a", a.clone());
    store.put("b", b.clone());
    let ia = lookup_path(&ns, &["a"]).unwrap();
    let ib = lookup_path(&ns, &["b"]).unwrap();
    assert!(read_all(&ns, ia) == a);
    std::thread::sleep(Duration::from_millis(2));
    assert!(read_all(&ns, ib) == b);
    let w = ns.create(ROOT_INO, b"w", &file(0o644)).unwrap().ino;
    let wd = data(23, 3 * C);
    ns.write(w, 0, &wd).unwrap();
    assert_eq!(store.gets.load(Ordering::Relaxed), 4);
    // The least recently read file goes first, whole.
    assert_eq!(ns.blob_evict(1).unwrap(), 2 * C as u64);
    assert_eq!(ns.blob_evictions(), (1, 2 * C as u64));
    assert!(read_all(&ns, ib) == b);
    assert_eq!(store.gets.load(Ordering::Relaxed), 4, "b stayed");
    assert!(read_all(&ns, ia) == a);
    assert_eq!(store.gets.load(Ordering::Relaxed), 6, "a fetched again");
    // Everything evictable goes; the dirty file stays, readable with the store down.
    assert_eq!(ns.blob_evict(u64::MAX).unwrap(), 4 * C as u64);
    store.down.store(true, Ordering::Relaxed);
    assert!(read_all(&ns, w) == wd);
    drop(ns);
    shutdown(engine);
}

/// Waits (bounded) until the store has served `n` GETs.
fn wait_gets(store: &FakeStore, n: usize) {
    let t0 = std::time::Instant::now();
    while store.gets.load(Ordering::Relaxed) < n {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} GETs, waiting for {n}",
            store.gets.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A sequential reader keeps its prefetch window ahead: entering a chunk that was
/// prefetched fetches the next one, so the reader does not stall on a whole fetch at
/// the end of every window. Still one GET per chunk.
#[test]
fn a_sequential_reader_keeps_the_prefetch_window_ahead() {
    let engine = engine_on(fresh_device());
    let ns = Arc::new(open_ns(&engine).unwrap());
    let store = Arc::new(FakeStore {
        ttl_ms: 60_000,
        prefetch: 2,
        ..FakeStore::default()
    });
    ns.blob_read_from(Arc::clone(&store) as Arc<dyn BlobReader>);
    let blob = data(11, 6 * C);
    store.put("seq.bin", blob.clone());
    let ino = lookup_path(&ns, &["seq.bin"]).unwrap();
    // A miss in chunk 0: fetched, and chunks 1 and 2 ahead.
    assert_eq!(ns.read(ino, 0, 4096, |d| d.to_vec()).unwrap(), blob[..4096]);
    wait_gets(&store, 3);
    // Let the two prefetches land (5 ms of GET, then the writes); were chunk 1 still
    // in flight, the read below would wait for it and prefetch as a miss does.
    std::thread::sleep(Duration::from_millis(300));
    // Chunk 1 is a hit; entering it moves the window to chunk 3.
    let c1 = ns.read(ino, C as u64, 4096, |d| d.to_vec()).unwrap();
    assert_eq!(c1, blob[C..C + 4096]);
    wait_gets(&store, 4);
    assert!(read_all(&ns, ino) == blob);
    assert_eq!(store.gets.load(Ordering::Relaxed), 6, "one GET per chunk");
    drop(ns);
    shutdown(engine);
}
