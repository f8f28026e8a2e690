//! Giving memory back to the system after many connections close.
//!
//! Each open connection costs the proxy tens of kilobytes (task, buffers).
//! When thousands close, the allocator may keep the freed memory (with
//! glibc: 5,000 idle connections took RSS from 13 MB to 204 MB, and it
//! stayed there). `allocator::give_back` hands free pages back; it runs when
//! the number of open connections has dropped by `TRIM_AFTER_CLOSED` since the
//! last high-water mark, so a steady load never pays for it.
//!
//! It runs on two kinds of thread: the trimmer's, every `CHECK_EVERY`, and
//! each worker thread that closed connections during such a drop, once it
//! has been quiet for `WORKER_TRIM_DELAY`. A worker's freed memory sits in
//! its own heap, which only that thread can give back (mimalloc purges a
//! heap on its thread's next allocation, and a worker whose connections all
//! closed may not allocate again for a long time): with the trimmer alone,
//! 5,000 closed idle connections left 5–17 MB above the baseline.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::connections::OPEN_COUNT;

/// Connections that must have closed (below the high-water mark) to trim.
const TRIM_AFTER_CLOSED: usize = 256;
const CHECK_EVERY: Duration = Duration::from_secs(2);

static HIGH_WATER: AtomicUsize = AtomicUsize::new(0);

/// A worker thread waits this long after its last close in a drop before
/// it gives its memory back (one give-back for a whole wave of closes).
const WORKER_TRIM_DELAY: Duration = Duration::from_millis(500);

thread_local! {
    /// When this thread last closed a connection during a drop (`None`:
    /// no give-back scheduled on this thread).
    static LAST_CLOSE: Cell<Option<Instant>> = const { Cell::new(None) };
}

pub fn note_open(open: usize) {
    HIGH_WATER.fetch_max(open, Ordering::Relaxed);
}

/// A client connection closed on this (worker) thread, `open` remain. During
/// a drop of `TRIM_AFTER_CLOSED` or more below the high-water mark, this
/// thread gives its free memory back once its closes have stopped for
/// `WORKER_TRIM_DELAY`.
pub fn note_closed(open: usize) {
    if HIGH_WATER.load(Ordering::Relaxed) < open + TRIM_AFTER_CLOSED {
        return;
    }
    let scheduled = LAST_CLOSE.with(|last| last.replace(Some(Instant::now())).is_some());
    if scheduled {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        LAST_CLOSE.with(|last| last.set(None));
        return;
    };
    // With one runtime per worker thread (work stealing off, as shipped),
    // the task runs on this thread, whose heap it gives back.
    runtime.spawn(async {
        loop {
            let Some(last) = LAST_CLOSE.with(Cell::get) else {
                return;
            };
            let quiet_at = last + WORKER_TRIM_DELAY;
            if Instant::now() >= quiet_at {
                break;
            }
            tokio::time::sleep_until(quiet_at.into()).await;
        }
        LAST_CLOSE.with(|last| last.set(None));
        crate::allocator::give_back();
    });
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
