//! Per-core counters, gauges and latency histograms, merged when read.
//!
//! A user crate declares a static [`Schema`] (names and help texts); [`Perf::new`]
//! allocates one [`CoreSlot`] per dataplane core plus one [`GlobalSlot`] for the
//! control plane. Metrics are addressed by their index in the schema's arrays, so the
//! hot path does no lookup and no allocation:
//!
//! ```
//! use spool_perf::{MetricDef, Perf, Schema};
//!
//! const WRITE_OPS: usize = 0;
//! const IN_FLIGHT: usize = 0;
//! const WRITE_LATENCY_NS: usize = 0;
//! static SCHEMA: Schema = Schema {
//!     counters: &[MetricDef::new("write_ops", "Chunk writes completed.")],
//!     gauges: &[MetricDef::new("in_flight", "Requests submitted and not completed.")],
//!     histograms: &[MetricDef::new("write_latency_ns", "Chunk write latency.")],
//! };
//!
//! let perf = Perf::new(&SCHEMA, 2);
//! let core = perf.core(1);
//! core.add(WRITE_OPS, 1);
//! core.gauge_add(IN_FLIGHT, 1);
//! core.record(WRITE_LATENCY_NS, 12_345);
//! let snap = perf.snapshot();
//! assert_eq!(snap.counters["write_ops"], 1);
//! assert!(snap.to_prometheus("spool").contains("spool_write_ops_total 1\n"));
//! ```
//!
//! Each [`CoreSlot`] has exactly one writer, its dataplane core: its methods use
//! relaxed loads and stores instead of read-modify-write instructions, so counting
//! costs no locked instruction. Two threads writing the same core slot lose counts (it
//! is never undefined behaviour). [`GlobalSlot`] may be written from any thread and
//! uses atomic read-modify-write. Readers ([`Perf::snapshot`]) merge all slots with
//! relaxed loads, without stopping the writers.
#![forbid(unsafe_code)]

mod error;
mod histogram;
mod lanes;
mod snapshot;

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_utils::CachePadded;

pub use error::Error;
pub use histogram::{bucket_index, bucket_range, HistogramSummary, BUCKETS};
pub use snapshot::Snapshot;

use histogram::{AtomicHistogram, MergedHistogram};
use lanes::Lanes;

/// One metric of a [`Schema`]: its name (units last: `write_latency_ns`) and help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    /// `[a-zA-Z_][a-zA-Z0-9_]*`; counters get `_total` appended in Prometheus text.
    pub name: &'static str,
    /// One line of help for `# HELP` and for the perf dump.
    pub help: &'static str,
}

impl MetricDef {
    /// A metric definition, usable in a `static` schema.
    pub const fn new(name: &'static str, help: &'static str) -> Self {
        MetricDef { name, help }
    }
}

/// The metrics a user crate declares, once, as a `static`. A metric is addressed by
/// its index in its array.
#[derive(Debug)]
pub struct Schema {
    /// Monotonic counters (u64), summed over slots.
    pub counters: &'static [MetricDef],
    /// Gauges (i64), summed over slots (a per-core queue depth sums to the node's).
    pub gauges: &'static [MetricDef],
    /// Histograms of u64 values (latencies in ns, sizes in bytes).
    pub histograms: &'static [MetricDef],
}

impl Schema {
    /// Checks that every name is a valid metric name and that no name is used twice
    /// (across the three kinds, also after counters get their `_total` suffix). Call
    /// it from a unit test of the crate that declares the schema.
    pub fn validate(&self) -> Result<(), Error> {
        let mut names = std::collections::BTreeSet::new();
        let mut series = std::collections::BTreeSet::new();
        let kinds = [
            (self.counters, Kind::Counter),
            (self.gauges, Kind::Gauge),
            (self.histograms, Kind::Histogram),
        ];
        for (defs, kind) in kinds {
            for def in defs {
                if !snapshot::is_valid_name(def.name) {
                    return Err(Error::InvalidName { name: def.name });
                }
                if !names.insert(def.name) {
                    return Err(Error::DuplicateName { name: def.name });
                }
                for exposed in snapshot::exposed_series(def.name, kind) {
                    if !series.insert(exposed) {
                        return Err(Error::DuplicateName { name: def.name });
                    }
                }
            }
        }
        Ok(())
    }

    /// Index of the counter called `name`.
    pub fn counter_index(&self, name: &str) -> Option<usize> {
        self.counters.iter().position(|d| d.name == name)
    }

    /// Index of the gauge called `name`.
    pub fn gauge_index(&self, name: &str) -> Option<usize> {
        self.gauges.iter().position(|d| d.name == name)
    }

    /// Index of the histogram called `name`.
    pub fn histogram_index(&self, name: &str) -> Option<usize> {
        self.histograms.iter().position(|d| d.name == name)
    }
}

/// The three kinds of metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Storage of one slot: counters, gauges and histograms, each in whole cache lines.
struct Slot {
    counters: Lanes<AtomicU64>,
    gauges: Lanes<AtomicI64>,
    histograms: Box<[CachePadded<AtomicHistogram>]>,
}

impl Slot {
    fn new(schema: &Schema) -> Self {
        Slot {
            counters: Lanes::new(schema.counters.len()),
            gauges: Lanes::new(schema.gauges.len()),
            histograms: (0..schema.histograms.len())
                .map(|_| CachePadded::new(AtomicHistogram::new()))
                .collect(),
        }
    }

    #[inline]
    fn counter(&self, idx: usize) -> Option<&AtomicU64> {
        let c = self.counters.get(idx);
        debug_assert!(c.is_some(), "spool-perf: counter index {idx} out of range");
        c
    }

    #[inline]
    fn gauge(&self, idx: usize) -> Option<&AtomicI64> {
        let g = self.gauges.get(idx);
        debug_assert!(g.is_some(), "spool-perf: gauge index {idx} out of range");
        g
    }

    #[inline]
    fn histogram(&self, idx: usize) -> Option<&AtomicHistogram> {
        let h = self.histograms.get(idx).map(|h| &**h);
        debug_assert!(
            h.is_some(),
            "spool-perf: histogram index {idx} out of range"
        );
        h
    }
}

/// The slot of one dataplane core. Exactly one thread (the core's) may write it.
///
/// An index out of the schema's range is ignored (and asserts in debug builds).
pub struct CoreSlot(Slot);

impl CoreSlot {
    /// Adds `v` to counter `counter_idx` (wrapping).
    #[inline]
    pub fn add(&self, counter_idx: usize, v: u64) {
        if let Some(c) = self.0.counter(counter_idx) {
            c.store(c.load(Relaxed).wrapping_add(v), Relaxed);
        }
    }

    /// Adds 1 to counter `counter_idx`.
    #[inline]
    pub fn inc(&self, counter_idx: usize) {
        self.add(counter_idx, 1);
    }

    /// Sets gauge `gauge_idx` to `v`.
    #[inline]
    pub fn gauge_set(&self, gauge_idx: usize, v: i64) {
        if let Some(g) = self.0.gauge(gauge_idx) {
            g.store(v, Relaxed);
        }
    }

    /// Adds `v` (may be negative) to gauge `gauge_idx` (wrapping).
    #[inline]
    pub fn gauge_add(&self, gauge_idx: usize, v: i64) {
        if let Some(g) = self.0.gauge(gauge_idx) {
            g.store(g.load(Relaxed).wrapping_add(v), Relaxed);
        }
    }

    /// Records `value` in histogram `hist_idx`. No allocation, no locked instruction.
    #[inline]
    pub fn record(&self, hist_idx: usize, value: u64) {
        if let Some(h) = self.0.histogram(hist_idx) {
            h.record_single_writer(value);
        }
    }
}

impl fmt::Debug for CoreSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreSlot").finish_non_exhaustive()
    }
}

/// The slot of the control plane: any thread may write it (atomic read-modify-write).
///
/// An index out of the schema's range is ignored (and asserts in debug builds).
pub struct GlobalSlot(Slot);

impl GlobalSlot {
    /// Adds `v` to counter `counter_idx` (wrapping).
    #[inline]
    pub fn add(&self, counter_idx: usize, v: u64) {
        if let Some(c) = self.0.counter(counter_idx) {
            c.fetch_add(v, Relaxed);
        }
    }

    /// Adds 1 to counter `counter_idx`.
    #[inline]
    pub fn inc(&self, counter_idx: usize) {
        self.add(counter_idx, 1);
    }

    /// Sets gauge `gauge_idx` to `v`.
    #[inline]
    pub fn gauge_set(&self, gauge_idx: usize, v: i64) {
        if let Some(g) = self.0.gauge(gauge_idx) {
            g.store(v, Relaxed);
        }
    }

    /// Adds `v` (may be negative) to gauge `gauge_idx` (wrapping).
    #[inline]
    pub fn gauge_add(&self, gauge_idx: usize, v: i64) {
        if let Some(g) = self.0.gauge(gauge_idx) {
            g.fetch_add(v, Relaxed);
        }
    }

    /// Records `value` in histogram `hist_idx`.
    #[inline]
    pub fn record(&self, hist_idx: usize, value: u64) {
        if let Some(h) = self.0.histogram(hist_idx) {
            h.record_shared(value);
        }
    }
}

impl fmt::Debug for GlobalSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GlobalSlot").finish_non_exhaustive()
    }
}

/// The metrics of one process: a slot per dataplane core and a global slot.
pub struct Perf {
    schema: &'static Schema,
    cores: Box<[CachePadded<CoreSlot>]>,
    global: CachePadded<GlobalSlot>,
}

impl Perf {
    /// Allocates the slots of `cores` dataplane cores (0 is allowed: global only).
    pub fn new(schema: &'static Schema, cores: usize) -> Arc<Perf> {
        Arc::new(Perf {
            schema,
            cores: (0..cores)
                .map(|_| CachePadded::new(CoreSlot(Slot::new(schema))))
                .collect(),
            global: CachePadded::new(GlobalSlot(Slot::new(schema))),
        })
    }

    /// The schema the slots were made for.
    pub fn schema(&self) -> &'static Schema {
        self.schema
    }

    /// Number of core slots.
    pub fn cores(&self) -> usize {
        self.cores.len()
    }

    /// The slot of core `i`, to be written only by that core.
    ///
    /// # Panics
    /// If `i >= self.cores()`: core ids come from the same configuration as the count
    /// given to [`Perf::new`]. Use [`Perf::try_core`] where that is not certain.
    pub fn core(&self, i: usize) -> &CoreSlot {
        match self.cores.get(i) {
            Some(slot) => slot,
            None => panic!(
                "spool-perf: core {i} out of range ({} core slots)",
                self.cores.len()
            ),
        }
    }

    /// The slot of core `i`, or `None` if there is no such core.
    pub fn try_core(&self, i: usize) -> Option<&CoreSlot> {
        self.cores.get(i).map(|s| &**s)
    }

    /// The control-plane slot (any thread may write it).
    pub fn global(&self) -> &GlobalSlot {
        &self.global
    }

    /// Merges every slot (relaxed loads; writers are not stopped). Counters are the
    /// sum of the core slots and the global slot; `per_core` has the core slots alone.
    pub fn snapshot(&self) -> Snapshot {
        let schema = self.schema;
        let mut snap = Snapshot {
            cores: self.cores.len(),
            ..Snapshot::default()
        };
        let slots = || {
            self.cores
                .iter()
                .map(|c| &c.0)
                .chain(std::iter::once(&self.global.0))
        };

        for (idx, def) in schema.counters.iter().enumerate() {
            let per_core: Vec<u64> = self
                .cores
                .iter()
                .map(|c| c.0.counters.get(idx).map_or(0, |a| a.load(Relaxed)))
                .collect();
            let global = self
                .global
                .0
                .counters
                .get(idx)
                .map_or(0, |a| a.load(Relaxed));
            let total = per_core.iter().fold(global, |acc, &v| acc.wrapping_add(v));
            snap.counters.insert(def.name.to_owned(), total);
            snap.per_core.insert(def.name.to_owned(), per_core);
            snap.help.insert(def.name.to_owned(), def.help.to_owned());
        }
        for (idx, def) in schema.gauges.iter().enumerate() {
            let total = slots().fold(0i64, |acc, s| {
                acc.wrapping_add(s.gauges.get(idx).map_or(0, |a| a.load(Relaxed)))
            });
            snap.gauges.insert(def.name.to_owned(), total);
            snap.help.insert(def.name.to_owned(), def.help.to_owned());
        }
        for (idx, def) in schema.histograms.iter().enumerate() {
            let mut merged = MergedHistogram::new();
            for slot in slots() {
                if let Some(h) = slot.histograms.get(idx) {
                    h.merge_into(&mut merged);
                }
            }
            snap.histograms
                .insert(def.name.to_owned(), merged.summary());
            snap.help.insert(def.name.to_owned(), def.help.to_owned());
        }
        snap
    }
}

impl fmt::Debug for Perf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Perf")
            .field("cores", &self.cores.len())
            .field("counters", &self.schema.counters.len())
            .field("gauges", &self.schema.gauges.len())
            .field("histograms", &self.schema.histograms.len())
            .finish()
    }
}

#[cfg(test)]
mod tests;
