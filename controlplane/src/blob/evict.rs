//! The evictor: keeps the cache under `evict_high_pct` of the device by dropping clean
//! chunks (their blob holds them; a later read fetches them again) down to
//! `evict_low_pct`, least recently used first (`Namespace::blob_evict`). Dirty data is
//! never evicted: when it alone fills the cache, writers wait `space_wait_ms` for
//! uploads to make files clean, then get ENOSPC. Runs where the namespace runs.

use std::sync::Arc;
use std::time::Duration;

use spool_dataplane::engine::Engine;

use super::NsSource;
use crate::config::BlobConfig;

/// What to free now: bytes above the low watermark when use is above the high one.
pub fn excess(used: u64, capacity: u64, high_pct: u8, low_pct: u8) -> u64 {
    let pct = |p: u8| (capacity as u128 * u128::from(p) / 100) as u64;
    if used > pct(high_pct) {
        used - pct(low_pct)
    } else {
        0
    }
}

/// Checks the cache's use every `scan_interval_ms` until `stop`.
pub async fn run(
    cfg: BlobConfig,
    source: NsSource,
    engine: Arc<Engine>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let interval = Duration::from_millis(cfg.scan_interval_ms);
    loop {
        if *stop.borrow() {
            return;
        }
        let s = engine.status();
        let want = excess(
            s.used_bytes,
            s.capacity_bytes,
            cfg.evict_high_pct,
            cfg.evict_low_pct,
        );
        if let (Some(ns), true) = ((source)(), want > 0) {
            match tokio::task::spawn_blocking(move || ns.blob_evict(want)).await {
                Ok(Ok(freed)) => tracing::info!(
                    used_bytes = s.used_bytes,
                    capacity_bytes = s.capacity_bytes,
                    wanted_bytes = want,
                    freed_bytes = freed,
                    "blob: cache above evict_high_pct; evicted clean chunks"
                ),
                Ok(Err(e)) => tracing::warn!(error = %e, "blob: eviction failed"),
                Err(e) => tracing::warn!(error = %e, "blob: eviction task"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::excess;

    #[test]
    fn evicts_down_to_the_low_watermark_only_above_the_high_one() {
        assert_eq!(excess(89, 100, 90, 80), 0);
        assert_eq!(excess(90, 100, 90, 80), 0);
        assert_eq!(excess(95, 100, 90, 80), 15);
        assert_eq!(excess(100, 100, 100, 0), 0);
        // No overflow at the extremes.
        assert_eq!(
            excess(u64::MAX, u64::MAX, 90, 80),
            3_689_348_814_741_910_323
        );
    }
}
