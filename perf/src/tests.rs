use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::*;

const WRITE_OPS: usize = 0;
const WRITE_BYTES: usize = 1;
const READ_ERRORS: usize = 2;
const IN_FLIGHT: usize = 0;
const WRITE_LATENCY_NS: usize = 0;
const READ_LATENCY_NS: usize = 1;

static SCHEMA: Schema = Schema {
    counters: &[
        MetricDef::new("write_ops", "Chunk writes completed."),
        MetricDef::new("write_bytes", "Bytes written."),
        MetricDef::new("read_errors", "Reads that failed.\nSee the log."),
    ],
    gauges: &[MetricDef::new(
        "in_flight",
        "Requests submitted, not completed.",
    )],
    histograms: &[
        MetricDef::new("write_latency_ns", "Write latency."),
        MetricDef::new("read_latency_ns", "Read latency."),
    ],
};

#[test]
fn schema_validates() {
    SCHEMA.validate().unwrap();
    assert_eq!(SCHEMA.counter_index("write_bytes"), Some(WRITE_BYTES));
    assert_eq!(SCHEMA.gauge_index("in_flight"), Some(IN_FLIGHT));
    assert_eq!(
        SCHEMA.histogram_index("read_latency_ns"),
        Some(READ_LATENCY_NS)
    );
    assert_eq!(SCHEMA.counter_index("nope"), None);
}

#[test]
fn schema_rejects_bad_and_colliding_names() {
    static BAD: Schema = Schema {
        counters: &[MetricDef::new("write-ops", "")],
        gauges: &[],
        histograms: &[],
    };
    assert_eq!(
        BAD.validate(),
        Err(Error::InvalidName { name: "write-ops" })
    );
    static DIGIT: Schema = Schema {
        counters: &[],
        gauges: &[MetricDef::new("9lives", "")],
        histograms: &[],
    };
    assert!(DIGIT.validate().is_err());
    static TWICE: Schema = Schema {
        counters: &[MetricDef::new("ops", "")],
        gauges: &[MetricDef::new("ops", "")],
        histograms: &[],
    };
    assert_eq!(TWICE.validate(), Err(Error::DuplicateName { name: "ops" }));
    static SERIES: Schema = Schema {
        counters: &[],
        gauges: &[MetricDef::new("lat_count", "")],
        histograms: &[MetricDef::new("lat", "")],
    };
    assert_eq!(SERIES.validate(), Err(Error::DuplicateName { name: "lat" }));
    static TOTAL: Schema = Schema {
        counters: &[MetricDef::new("ops", "")],
        gauges: &[MetricDef::new("ops_total", "")],
        histograms: &[],
    };
    assert!(TOTAL.validate().is_err());
}

#[test]
fn counters_and_gauges_merge_across_cores_and_global() {
    let perf = Perf::new(&SCHEMA, 3);
    assert_eq!(perf.cores(), 3);
    perf.core(0).add(WRITE_OPS, 5);
    perf.core(1).add(WRITE_OPS, 7);
    perf.core(2).inc(WRITE_OPS);
    perf.core(2).add(WRITE_BYTES, 4096);
    perf.global().add(WRITE_OPS, 100);
    perf.global().inc(READ_ERRORS);
    perf.core(0).gauge_set(IN_FLIGHT, 10);
    perf.core(1).gauge_add(IN_FLIGHT, 3);
    perf.core(1).gauge_add(IN_FLIGHT, -5);
    perf.global().gauge_add(IN_FLIGHT, 1);

    let s = perf.snapshot();
    assert_eq!(s.cores, 3);
    assert_eq!(s.counters["write_ops"], 113);
    assert_eq!(s.counters["write_bytes"], 4096);
    assert_eq!(s.counters["read_errors"], 1);
    assert_eq!(s.per_core["write_ops"], vec![5, 7, 1]);
    assert_eq!(s.per_core["read_errors"], vec![0, 0, 0]);
    assert_eq!(s.gauges["in_flight"], 10 + 3 - 5 + 1);
    assert_eq!(s.help["write_ops"], "Chunk writes completed.");
    assert!(perf.try_core(3).is_none());
    assert!(perf.try_core(2).is_some());
}

#[test]
fn histograms_merge_across_cores() {
    let perf = Perf::new(&SCHEMA, 2);
    for v in 1..=1000u64 {
        perf.core((v % 2) as usize)
            .record(WRITE_LATENCY_NS, v * 1000);
    }
    perf.global().record(WRITE_LATENCY_NS, 7);
    let s = perf.snapshot();
    let h = s.histograms["write_latency_ns"];
    assert_eq!(h.count, 1001);
    assert_eq!(h.sum, 1000 * 1001 / 2 * 1000 + 7);
    assert_eq!(h.min, 7);
    assert_eq!(h.max, 1_000_000);
    for (got, exact) in [(h.p50, 500_000u64), (h.p90, 900_000), (h.p99, 990_000)] {
        assert!(
            got.abs_diff(exact) * 32 <= exact,
            "got {got}, exact {exact}"
        );
    }
    assert!(h.p50 <= h.p90 && h.p90 <= h.p99 && h.p99 <= h.p999 && h.p999 <= h.max);
    assert_eq!(s.histograms["read_latency_ns"], HistogramSummary::default());
}

#[test]
fn zero_cores_has_a_global_slot() {
    let perf = Perf::new(&SCHEMA, 0);
    perf.global().add(WRITE_OPS, 2);
    let s = perf.snapshot();
    assert_eq!(s.counters["write_ops"], 2);
    assert!(s.per_core["write_ops"].is_empty());
    assert!(!s.to_prometheus("spool").contains("core="));
}

#[test]
fn snapshot_round_trips_through_json() {
    let perf = Perf::new(&SCHEMA, 2);
    perf.core(1).add(WRITE_BYTES, 1 << 20);
    perf.core(0).record(READ_LATENCY_NS, 1234);
    let s = perf.snapshot();
    let json = serde_json::to_string(&s).unwrap();
    let back: Snapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    // Fields added later must not break older readers: missing fields default.
    let partial: Snapshot = serde_json::from_str(r#"{"counters":{"x":1}}"#).unwrap();
    assert_eq!(partial.counters["x"], 1);
    assert!(partial.to_prometheus("p").contains("p_x_total 1\n"));
}

/// Checks the text exposition format line by line: every line is a HELP, a TYPE or a
/// sample; each family has HELP then TYPE before its samples; sample names belong to
/// the family last declared; values are numbers. Returns family -> type.
fn check_prometheus_shape(text: &str) -> Vec<(String, String)> {
    assert!(text.ends_with('\n'), "text must end with a newline");
    let mut families = Vec::new();
    let mut declared = BTreeSet::new();
    let mut current: Option<(String, String)> = None;
    let mut pending_help: Option<String> = None;
    let valid_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(valid_name(name), "{line}");
            assert!(!help.contains('\n'));
            pending_help = Some(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert_eq!(
                pending_help.take().as_deref(),
                Some(name),
                "HELP before TYPE"
            );
            assert!(["counter", "gauge", "summary"].contains(&kind), "{line}");
            assert!(
                declared.insert(name.to_owned()),
                "family declared twice: {name}"
            );
            families.push((name.to_owned(), kind.to_owned()));
            current = Some((name.to_owned(), kind.to_owned()));
        } else {
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            let (series, value) = line.rsplit_once(' ').expect("sample: series value");
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("value not a number: {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => {
                    let l = l.strip_suffix('}').expect("labels end with }");
                    (n, Some(l))
                }
                None => (series, None),
            };
            let (family, kind) = current.as_ref().expect("sample before TYPE");
            match kind.as_str() {
                "summary" => {
                    let base_ok =
                        name == family && labels.is_some_and(|l| l.starts_with("quantile=\""));
                    let sum_ok = name == format!("{family}_sum") && labels.is_none();
                    let count_ok = name == format!("{family}_count") && labels.is_none();
                    assert!(base_ok || sum_ok || count_ok, "{line}");
                }
                _ => assert_eq!(name, family, "{line}"),
            }
            if let Some(labels) = labels {
                for pair in labels.split(',') {
                    let (k, v) = pair.split_once('=').expect("label k=v");
                    assert!(valid_name(k), "{line}");
                    assert!(
                        v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                        "{line}"
                    );
                }
            }
        }
    }
    families
}

#[test]
fn prometheus_text_has_the_expected_shape() {
    let perf = Perf::new(&SCHEMA, 2);
    perf.core(0).add(WRITE_OPS, 3);
    perf.core(1).add(WRITE_OPS, 4);
    perf.global().inc(READ_ERRORS);
    perf.core(1).gauge_set(IN_FLIGHT, -2);
    // Values below 32 have buckets of width 1: quantiles are exact.
    for v in [10, 20, 30] {
        perf.core(0).record(WRITE_LATENCY_NS, v);
    }
    let text = perf.snapshot().to_prometheus("spool");
    let families = check_prometheus_shape(&text);
    let kinds: std::collections::BTreeMap<_, _> = families.into_iter().collect();
    assert_eq!(kinds["spool_write_ops_total"], "counter");
    assert_eq!(kinds["spool_core_write_ops_total"], "counter");
    assert_eq!(kinds["spool_in_flight"], "gauge");
    assert_eq!(kinds["spool_write_latency_ns"], "summary");

    for expected in [
        "# HELP spool_write_ops_total Chunk writes completed.\n",
        "# TYPE spool_write_ops_total counter\n",
        "spool_write_ops_total 7\n",
        "spool_core_write_ops_total{core=\"0\"} 3\n",
        "spool_core_write_ops_total{core=\"1\"} 4\n",
        "spool_read_errors_total 1\n",
        "# HELP spool_read_errors_total Reads that failed.\\nSee the log.\n",
        "spool_in_flight -2\n",
        "# TYPE spool_write_latency_ns summary\n",
        "spool_write_latency_ns{quantile=\"0.5\"} 20\n",
        "spool_write_latency_ns{quantile=\"0.999\"} 30\n",
        "spool_write_latency_ns_sum 60\n",
        "spool_write_latency_ns_count 3\n",
        "spool_read_latency_ns_count 0\n",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
}

#[test]
fn prometheus_sanitizes_foreign_names_and_prefix() {
    let mut s = Snapshot::default();
    s.counters.insert("bad-name".into(), 1);
    s.gauges.insert("9x".into(), 2);
    s.per_core.insert("a.b".into(), vec![1, 2]);
    s.histograms
        .insert("lat ns".into(), HistogramSummary::default());
    for prefix in ["", "sp-ool_", "spool"] {
        check_prometheus_shape(&s.to_prometheus(prefix));
    }
    let text = s.to_prometheus("");
    assert!(text.contains("\nbad_name_total 1\n"), "{text}");
    assert!(text.contains("\n_9x 2\n"), "{text}");
    assert!(s
        .to_prometheus("sp-ool_")
        .contains("\nsp_ool_bad_name_total 1\n"));
}

/// One writer thread per core slot, plus a reader that snapshots while they run: every
/// snapshot is monotonic and the final one is exact.
#[test]
fn concurrent_writers_and_reader() {
    const CORES: usize = 4;
    const OPS: u64 = 200_000;
    let perf = Perf::new(&SCHEMA, CORES);
    let done = Arc::new(AtomicBool::new(false));

    let reader = {
        let perf = Arc::clone(&perf);
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut last_total = 0u64;
            let mut last_per_core = vec![0u64; CORES];
            let mut last_count = 0u64;
            let mut snapshots = 0u32;
            loop {
                let finished = done.load(Ordering::Acquire);
                let s = perf.snapshot();
                let total = s.counters["write_ops"];
                assert!(
                    total >= last_total,
                    "total went back: {last_total} -> {total}"
                );
                for (core, (&now, &before)) in s.per_core["write_ops"]
                    .iter()
                    .zip(&last_per_core)
                    .enumerate()
                {
                    assert!(now >= before, "core {core} went back");
                }
                let h = s.histograms["write_latency_ns"];
                assert!(h.count >= last_count);
                if h.count > 0 {
                    assert!(h.min <= h.p50 && h.p50 <= h.p99 && h.p99 <= h.max, "{h:?}");
                }
                last_total = total;
                last_per_core = s.per_core["write_ops"].clone();
                last_count = h.count;
                snapshots += 1;
                if finished {
                    return snapshots;
                }
            }
        })
    };

    let writers: Vec<_> = (0..CORES)
        .map(|core| {
            let perf = Arc::clone(&perf);
            std::thread::spawn(move || {
                let slot = perf.core(core);
                for i in 0..OPS {
                    slot.inc(WRITE_OPS);
                    slot.add(WRITE_BYTES, 4096);
                    slot.gauge_add(IN_FLIGHT, 1);
                    slot.record(WRITE_LATENCY_NS, 1000 + (i % 1000));
                    slot.gauge_add(IN_FLIGHT, -1);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::Release);
    let snapshots = reader.join().unwrap();
    assert!(snapshots >= 1);

    let s = perf.snapshot();
    assert_eq!(s.counters["write_ops"], CORES as u64 * OPS);
    assert_eq!(s.counters["write_bytes"], CORES as u64 * OPS * 4096);
    assert_eq!(s.per_core["write_ops"], vec![OPS; CORES]);
    assert_eq!(s.gauges["in_flight"], 0);
    let h = s.histograms["write_latency_ns"];
    assert_eq!(h.count, CORES as u64 * OPS);
    assert_eq!(h.min, 1000);
    assert_eq!(h.max, 1999);
}
