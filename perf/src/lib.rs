//! Per-core counters and latency histograms, merged when read.
#![forbid(unsafe_code)]
