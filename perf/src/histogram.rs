//! Log-linear latency histogram: bucket math, the atomic per-slot storage, and the
//! summary (count, sum, min, max, quantiles) computed from merged buckets.
//!
//! Values below `2^SUB_BUCKET_BITS` (16) get one bucket each. Above that, every power
//! of two `[2^k, 2^(k+1))` is split into 16 equal sub-buckets, up to `2^40` (about 18
//! minutes in nanoseconds); larger values land in the last bucket (`max` stays exact).
//! A bucket's width is at most 1/16 of its lower bound, and a quantile is reported as
//! the bucket's midpoint, so a reported quantile is within 1/32 (about 3%) of the true
//! one.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use crate::lanes::Lanes;

/// log2 of the number of sub-buckets per power of two.
pub const SUB_BUCKET_BITS: u32 = 4;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
/// Values at or above `2^MAX_VALUE_BITS` are counted in the last bucket.
pub const MAX_VALUE_BITS: u32 = 40;
/// Number of buckets of every histogram.
pub const BUCKETS: usize = ((MAX_VALUE_BITS - SUB_BUCKET_BITS) as usize + 1) << SUB_BUCKET_BITS;

/// The bucket that counts `value`.
#[inline]
pub fn bucket_index(value: u64) -> usize {
    let v = value.min((1u64 << MAX_VALUE_BITS) - 1);
    if v < SUB_BUCKETS {
        return v as usize;
    }
    // msb >= SUB_BUCKET_BITS; the top SUB_BUCKET_BITS + 1 bits select the sub-bucket.
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BUCKET_BITS;
    let top = v >> shift; // in [SUB_BUCKETS, 2 * SUB_BUCKETS)
    ((shift as u64) * SUB_BUCKETS + top) as usize
}

/// `(lowest, width)` of the values counted in bucket `index` (`index < BUCKETS`).
#[inline]
pub fn bucket_range(index: usize) -> (u64, u64) {
    let i = index as u64;
    if i < SUB_BUCKETS {
        return (i, 1);
    }
    let shift = i / SUB_BUCKETS - 1;
    let top = i % SUB_BUCKETS + SUB_BUCKETS;
    (top << shift, 1 << shift)
}

/// The value reported for a quantile that falls in bucket `index`: its midpoint.
#[inline]
fn bucket_value(index: usize) -> u64 {
    let (low, width) = bucket_range(index);
    low + (width - 1) / 2
}

/// One slot's histogram. Bucket counters, `sum`, `min` and `max` are separate relaxed
/// atomics: a reader racing a writer may see a sample in a bucket before its `sum`.
#[derive(Debug)]
pub(crate) struct AtomicHistogram {
    buckets: Lanes<AtomicU64>,
    sum: AtomicU64,
    min: AtomicU64,
    max: AtomicU64,
}

impl AtomicHistogram {
    pub(crate) fn new() -> Self {
        AtomicHistogram {
            buckets: Lanes::new(BUCKETS),
            sum: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
        }
    }

    /// Single-writer record: plain loads and stores, no locked instruction.
    #[inline]
    pub(crate) fn record_single_writer(&self, value: u64) {
        if let Some(bucket) = self.buckets.get(bucket_index(value)) {
            bucket.store(bucket.load(Relaxed).wrapping_add(1), Relaxed);
        }
        self.sum
            .store(self.sum.load(Relaxed).wrapping_add(value), Relaxed);
        if value < self.min.load(Relaxed) {
            self.min.store(value, Relaxed);
        }
        if value > self.max.load(Relaxed) {
            self.max.store(value, Relaxed);
        }
    }

    /// Record from any thread: atomic read-modify-write.
    #[inline]
    pub(crate) fn record_shared(&self, value: u64) {
        if let Some(bucket) = self.buckets.get(bucket_index(value)) {
            bucket.fetch_add(1, Relaxed);
        }
        self.sum.fetch_add(value, Relaxed);
        self.min.fetch_min(value, Relaxed);
        self.max.fetch_max(value, Relaxed);
    }

    /// Adds this slot's state into `acc`.
    pub(crate) fn merge_into(&self, acc: &mut MergedHistogram) {
        for (count, b) in acc.buckets.iter_mut().zip(self.buckets.iter()) {
            *count = count.wrapping_add(b.load(Relaxed));
        }
        acc.sum = acc.sum.wrapping_add(self.sum.load(Relaxed));
        acc.min = acc.min.min(self.min.load(Relaxed));
        acc.max = acc.max.max(self.max.load(Relaxed));
    }
}

/// Buckets summed over slots, before the summary is computed.
#[derive(Debug, Clone)]
pub(crate) struct MergedHistogram {
    buckets: Vec<u64>,
    sum: u64,
    min: u64,
    max: u64,
}

impl MergedHistogram {
    pub(crate) fn new() -> Self {
        MergedHistogram {
            buckets: vec![0; BUCKETS],
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    pub(crate) fn summary(&self) -> HistogramSummary {
        let count: u64 = self.buckets.iter().fold(0u64, |a, &c| a.wrapping_add(c));
        if count == 0 {
            return HistogramSummary::default();
        }
        let first = self.buckets.iter().position(|&c| c != 0).unwrap_or(0);
        let last = self.buckets.iter().rposition(|&c| c != 0).unwrap_or(0);
        // A reader racing a writer can see a bucket before min/max: fall back to the
        // bucket bounds so that min <= quantiles <= max always holds.
        let min = if self.min == u64::MAX {
            bucket_range(first).0
        } else {
            self.min
        };
        let max = if self.max < min {
            let (low, width) = bucket_range(last);
            (low + (width - 1)).max(min)
        } else {
            self.max
        };
        let q = |per_mille: u64| self.quantile(count, per_mille).clamp(min, max);
        HistogramSummary {
            count,
            sum: self.sum,
            min,
            max,
            p50: q(500),
            p90: q(900),
            p99: q(990),
            p999: q(999),
        }
    }

    /// The value at rank `ceil(count * q)` (at least 1), q in thousandths.
    fn quantile(&self, count: u64, per_mille: u64) -> u64 {
        let rank = ((u128::from(count) * u128::from(per_mille)).div_ceil(1000) as u64).max(1);
        let mut seen = 0u64;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(c);
            if seen >= rank {
                return bucket_value(i);
            }
        }
        self.max
    }
}

/// A histogram merged over all slots, as reported by a snapshot.
///
/// Quantiles are bucket midpoints clamped to `[min, max]`: within 1/32 of the exact
/// value of the same rank. `count == 0` reports zeros everywhere.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramSummary {
    /// Number of recorded values.
    pub count: u64,
    /// Sum of the recorded values (wraps on overflow).
    pub sum: u64,
    /// Smallest recorded value.
    pub min: u64,
    /// Largest recorded value (exact, also above the last bucket).
    pub max: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_the_range() {
        let mut next = 0u64;
        for i in 0..BUCKETS {
            let (low, width) = bucket_range(i);
            assert_eq!(low, next, "bucket {i}");
            assert!(width >= 1);
            if low >= SUB_BUCKETS {
                assert!(width * SUB_BUCKETS <= low, "bucket {i} too wide");
            }
            assert_eq!(bucket_index(low), i);
            assert_eq!(bucket_index(low + width - 1), i);
            next = low + width;
        }
        assert_eq!(next, 1u64 << MAX_VALUE_BITS);
        assert_eq!(bucket_index(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_index(1 << MAX_VALUE_BITS), BUCKETS - 1);
    }

    fn exact_quantile(sorted: &[u64], per_mille: u64) -> u64 {
        let n = sorted.len() as u64;
        let rank = ((n * per_mille).div_ceil(1000)).max(1);
        sorted[(rank - 1) as usize]
    }

    #[test]
    fn quantiles_are_within_the_bucket_error_bound() {
        // A deterministic spread over 6 orders of magnitude (xorshift).
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut values = Vec::new();
        let h = AtomicHistogram::new();
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = 100 + (x % 1_000) * (1 << (x % 14));
            values.push(v);
            h.record_single_writer(v);
        }
        values.sort_unstable();
        let mut merged = MergedHistogram::new();
        h.merge_into(&mut merged);
        let s = merged.summary();
        assert_eq!(s.count, values.len() as u64);
        assert_eq!(s.sum, values.iter().sum::<u64>());
        assert_eq!(s.min, values[0]);
        assert_eq!(s.max, *values.last().unwrap());
        for (per_mille, got) in [(500, s.p50), (900, s.p90), (990, s.p99), (999, s.p999)] {
            let exact = exact_quantile(&values, per_mille);
            let err = got.abs_diff(exact);
            assert!(
                err * 32 <= exact,
                "q{per_mille}: got {got}, exact {exact}, error {err} > 1/32"
            );
        }
    }

    #[test]
    fn small_values_are_exact_and_large_values_saturate() {
        let h = AtomicHistogram::new();
        for v in [0, 1, 2, 3] {
            h.record_shared(v);
        }
        h.record_shared(u64::MAX);
        let mut merged = MergedHistogram::new();
        h.merge_into(&mut merged);
        let s = merged.summary();
        assert_eq!(s.count, 5);
        assert_eq!(s.min, 0);
        assert_eq!(s.p50, 2);
        assert_eq!(s.max, u64::MAX);
        assert!(s.p999 >= 1 << (MAX_VALUE_BITS - 1));
    }

    #[test]
    fn empty_histogram_reports_zeros() {
        assert_eq!(
            MergedHistogram::new().summary(),
            HistogramSummary::default()
        );
    }
}
