//! A merged, serializable view of the metrics and its Prometheus text rendering.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::{HistogramSummary, Kind};

/// Reads one quantile of a summary.
type QuantileOf = fn(&HistogramSummary) -> u64;

/// Quantiles reported for every histogram: (Prometheus label, accessor).
const QUANTILES: [(&str, QuantileOf); 4] = [
    ("0.5", |h| h.p50),
    ("0.9", |h| h.p90),
    ("0.99", |h| h.p99),
    ("0.999", |h| h.p999),
];

/// Every metric merged over all slots, as `spool perf dump` prints it (JSON) and
/// `GET /metrics` serves it ([`Snapshot::to_prometheus`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    /// Number of core slots.
    pub cores: usize,
    /// Counter name -> sum over the core slots and the global slot.
    pub counters: BTreeMap<String, u64>,
    /// Gauge name -> sum over all slots.
    pub gauges: BTreeMap<String, i64>,
    /// Histogram name -> summary of the merged buckets.
    pub histograms: BTreeMap<String, HistogramSummary>,
    /// Counter name -> value of each core slot, indexed by core (no global slot).
    pub per_core: BTreeMap<String, Vec<u64>>,
    /// Metric name -> help text (for `# HELP` lines).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub help: BTreeMap<String, String>,
}

impl Snapshot {
    /// Renders the snapshot in the Prometheus text exposition format, version 0.0.4.
    ///
    /// Every family gets `# HELP` and `# TYPE` lines. With `prefix` "spool":
    /// - counter `write_ops` -> `spool_write_ops_total` (the merged value), and
    ///   `spool_core_write_ops_total{core="N"}` per dataplane core (a separate family,
    ///   so that summing a family never counts a value twice);
    /// - gauge `in_flight` -> `spool_in_flight`;
    /// - histogram `write_latency_ns` -> summary `spool_write_latency_ns` with
    ///   `quantile` labels 0.5, 0.9, 0.99, 0.999, plus `_sum` and `_count`.
    ///
    /// Characters outside `[a-zA-Z0-9_]` in names are replaced by `_`.
    pub fn to_prometheus(&self, prefix: &str) -> String {
        let prefix = sanitize(prefix);
        let prefix = prefix.trim_end_matches('_');
        let full = |name: &str| {
            if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}_{name}")
            }
        };
        let mut out = String::with_capacity(
            256 * (self.counters.len() + self.gauges.len() + 4 * self.histograms.len())
                + 48 * self.per_core.values().map(Vec::len).sum::<usize>(),
        );

        for (name, value) in &self.counters {
            let family = full(&counter_name(&sanitize(name)));
            header(&mut out, &family, self.help_of(name), "counter");
            let _ = writeln!(out, "{family} {value}");
        }
        for (name, values) in &self.per_core {
            if values.is_empty() {
                continue;
            }
            let family = full(&format!("core_{}", counter_name(&sanitize(name))));
            let help = format!("{} (per dataplane core)", self.help_of(name));
            header(&mut out, &family, &help, "counter");
            for (core, value) in values.iter().enumerate() {
                let _ = writeln!(out, "{family}{{core=\"{core}\"}} {value}");
            }
        }
        for (name, value) in &self.gauges {
            let family = full(&sanitize(name));
            header(&mut out, &family, self.help_of(name), "gauge");
            let _ = writeln!(out, "{family} {value}");
        }
        for (name, h) in &self.histograms {
            let family = full(&sanitize(name));
            header(&mut out, &family, self.help_of(name), "summary");
            for (label, get) in QUANTILES {
                let _ = writeln!(out, "{family}{{quantile=\"{label}\"}} {}", get(h));
            }
            let _ = writeln!(out, "{family}_sum {}", h.sum);
            let _ = writeln!(out, "{family}_count {}", h.count);
        }
        out
    }

    fn help_of<'a>(&'a self, name: &'a str) -> &'a str {
        self.help.get(name).map_or(name, String::as_str)
    }
}

/// `# HELP` (escaped: backslash and newline) and `# TYPE` lines of one family.
fn header(out: &mut String, family: &str, help: &str, kind: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {family} {help}");
    let _ = writeln!(out, "# TYPE {family} {kind}");
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, the names this crate accepts in a schema.
pub(crate) fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `name` with every character outside `[a-zA-Z0-9_]` replaced by `_`, and a leading
/// `_` added before a digit.
fn sanitize(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

/// A counter's exposed name: `name_total` (unless it already ends so).
pub(crate) fn counter_name(name: &str) -> String {
    if name.ends_with("_total") {
        name.to_owned()
    } else {
        format!("{name}_total")
    }
}

/// The series names (without prefix) a metric puts in the Prometheus text.
pub(crate) fn exposed_series(name: &str, kind: Kind) -> Vec<String> {
    match kind {
        Kind::Counter => {
            let total = counter_name(name);
            vec![format!("core_{total}"), total]
        }
        Kind::Gauge => vec![name.to_owned()],
        Kind::Histogram => vec![
            name.to_owned(),
            format!("{name}_sum"),
            format!("{name}_count"),
        ],
    }
}
