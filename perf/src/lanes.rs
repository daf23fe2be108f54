//! Fixed-length arrays of atomics stored in whole, aligned cache lines, so that one
//! core's array never shares a line with another allocation (no false sharing
//! between cores whose arrays happen to be neighbours on the heap).

use crossbeam_utils::CachePadded;

/// Elements per block: 16 x 8 bytes = 128 bytes, the padding of `CachePadded` on
/// x86_64 and aarch64 (adjacent-line prefetch pairs).
const LANES: usize = 16;

#[derive(Debug)]
pub(crate) struct Lanes<A> {
    blocks: Box<[CachePadded<[A; LANES]>]>,
    len: usize,
}

impl<A: Default> Lanes<A> {
    pub(crate) fn new(len: usize) -> Self {
        let blocks = (0..len.div_ceil(LANES))
            .map(|_| CachePadded::new(std::array::from_fn(|_| A::default())))
            .collect();
        Lanes { blocks, len }
    }
}

impl<A> Lanes<A> {
    #[inline]
    pub(crate) fn get(&self, index: usize) -> Option<&A> {
        if index >= self.len {
            return None;
        }
        self.blocks
            .get(index / LANES)
            .map(|block| &block[index % LANES])
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &A> {
        self.blocks.iter().flat_map(|b| b.iter()).take(self.len)
    }
}
