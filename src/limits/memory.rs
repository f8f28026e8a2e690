//! Giving memory back to the system after many connections close.
//!
//! Each open connection costs the proxy tens of kilobytes (task, buffers).
//! When thousands close, the allocator may keep the freed memory (with
//! glibc: 5,000 idle connections took RSS from 13 MB to 204 MB, and it
//! stayed there). `allocator::give_back` hands free pages back; it runs when
//! the number of open connections has dropped by `TRIM_AFTER_CLOSED` since the
//! last high-water mark, so a steady load never pays for it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::connections::OPEN_COUNT;

/// Connections that must have closed (below the high-water mark) to trim.
const TRIM_AFTER_CLOSED: usize = 256;
const CHECK_EVERY: Duration = Duration::from_secs(2);

static HIGH_WATER: AtomicUsize = AtomicUsize::new(0);

pub fn note_open(open: usize) {
    HIGH_WATER.fetch_max(open, Ordering::Relaxed);
}

/// Runs for the life of the process (a background task).
pub async fn run_trimmer() {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let open = OPEN_COUNT.load(Ordering::Relaxed);
        let high = HIGH_WATER.load(Ordering::Relaxed);
        if high >= open + TRIM_AFTER_CLOSED {
            HIGH_WATER.store(open, Ordering::Relaxed);
            let before = rss_kib();
            crate::allocator::give_back();
            log::info!(
                "{} client connections closed: freed memory returned to the system (RSS {} KiB -> {} KiB)",
                high - open,
                before.unwrap_or(0),
                rss_kib().unwrap_or(0)
            );
        }
    }
}

/// The process's resident set (VmRSS), in KiB.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
