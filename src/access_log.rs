//! One access-log line per request on stdout. Never a password, token, API key
//! or prompt text: only the fields below.
//!
//! Logging never blocks a request: a line is formatted on the worker (a
//! `Serialize` struct written straight into a per-thread buffer, no
//! intermediate JSON value or string) and appended to that thread's own
//! batch; a writer thread swaps every thread's batch out and writes them in
//! one system call. When stdout's reader stalls and `QUEUE` lines wait,
//! further lines are dropped and counted
//! (`flowise_proxy_access_log_dropped_total`); requests complete regardless.
//!
//! Why a batch per thread: with one shared batch, a worker preempted by the
//! kernel while appending its line held the lock, and the other worker (its
//! whole event loop) waited for it: 0.07 % of lines found the lock taken
//! under load on this 2-core machine, some for 0.7-3.1 ms. A thread's batch
//! is shared only with the writer, which holds it for a swap.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use once_cell::sync::Lazy;
use parking_lot::{Condvar, Mutex};
use serde::Serialize;

/// Lines waiting for the writer thread, at most.
const QUEUE: usize = 4_096;
/// The writer's pause between batches: under load it wakes once per pause,
/// not once per request (a line waits at most about this long).
const GATHER: Duration = Duration::from_millis(2);

pub struct Line<'a> {
    pub json: bool,
    pub request_id: &'a str,
    pub method: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub user_id: Option<i64>,
    pub chatflow_id: Option<&'a str>,
    pub credits_charged: Option<i64>,
    pub upstream_status: Option<u16>,
    pub upstream_error: Option<&'a str>,
    pub bytes_sent: usize,
    pub duration: Duration,
}

/// The JSON line, fields in this order.
#[derive(Serialize)]
struct Record<'a> {
    time: &'a str,
    request_id: &'a str,
    method: &'a str,
    route: &'a str,
    status: u16,
    user_id: Option<i64>,
    chatflow_id: Option<&'a str>,
    credits_charged: Option<i64>,
    upstream_status: Option<u16>,
    upstream_error: Option<&'a str>,
    bytes: usize,
    duration_ms: f64,
}

/// One thread's lines not yet taken by the writer.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    lines: usize,
}

struct Shared {
    /// Every thread's batch (a thread registers on its first line).
    batches: Mutex<Vec<Arc<Mutex<Batch>>>>,
    /// The writer waits for a first line (and must be woken).
    writer_idle: AtomicBool,
    wake: Mutex<()>,
    ready: Condvar,
}

static SHARED: Lazy<&'static Shared> = Lazy::new(|| {
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        batches: Mutex::new(Vec::new()),
        writer_idle: AtomicBool::new(false),
        wake: Mutex::new(()),
        ready: Condvar::new(),
    }));
    let spawned = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || run_writer(shared));
    if let Err(e) = spawned {
        log::error!("access log writer thread: {e}");
    }
    shared
});

fn run_writer(shared: &Shared) {
    let stdout = std::io::stdout();
    let mut out = Vec::with_capacity(64 << 10);
    // One spare buffer per thread's batch, swapped with it: a worker never
    // waits for more than a swap.
    let mut spares: Vec<Vec<u8>> = Vec::new();
    let mut batches: Vec<Arc<Mutex<Batch>>> = Vec::new();
    loop {
        if PENDING.load(Ordering::SeqCst) == 0 {
            // `writer_idle` is raised before `PENDING` is read again, and a
            // line reads it after counting itself: no line is left unwoken.
            shared.writer_idle.store(true, Ordering::SeqCst);
            let mut wake = shared.wake.lock();
            while PENDING.load(Ordering::SeqCst) == 0 {
                shared.ready.wait(&mut wake);
            }
            shared.writer_idle.store(false, Ordering::SeqCst);
        }
        {
            // The list is held only to copy it: a thread registering its
            // batch never waits while the writer waits for a swap.
            let registered = shared.batches.lock();
            if registered.len() != batches.len() {
                batches.clone_from(&registered);
                spares.resize_with(batches.len(), Vec::new);
            }
        }
        let mut lines = 0;
        for (batch, spare) in batches.iter().zip(spares.iter_mut()) {
            {
                let mut b = batch.lock();
                std::mem::swap(&mut b.buf, spare);
                lines += std::mem::replace(&mut b.lines, 0);
            }
            out.extend_from_slice(spare);
            spare.clear();
        }
        {
            // Whatever is queued goes out in one write.
            let mut stdout = stdout.lock();
            let _ = stdout.write_all(&out);
            let _ = stdout.flush();
        }
        out.clear();
        PENDING.fetch_sub(lines, Ordering::SeqCst);
        std::thread::sleep(GATHER);
    }
}

thread_local! {
    /// This thread's batch, registered with the writer on first use.
    static BATCH: Arc<Mutex<Batch>> = {
        let batch = Arc::new(Mutex::new(Batch::default()));
        SHARED.batches.lock().push(batch.clone());
        batch
    };
    /// The line being formatted (reused: no allocation per request).
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    /// The current second, formatted (`2026-12-01T12:00:00`), and which one.
    static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
}

/// `Utc::now()` as RFC 3339 with milliseconds and `Z` (24 bytes) into `out`,
/// returning its length; the part up to the second is formatted once per
/// second per thread.
fn write_time(out: &mut [u8; 40]) -> usize {
    let now = chrono::Utc::now();
    let millis = now.timestamp_subsec_millis();
    let mut put = |bytes: &[u8], at: usize| {
        let n = bytes.len().min(out.len() - at);
        out[at..at + n].copy_from_slice(&bytes[..n]);
        at + n
    };
    if millis >= 1000 {
        // A leap second: chrono's own formatting.
        let t = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        return put(t.as_bytes(), 0);
    }
    let at = SECOND.with(|s| {
        let mut s = s.borrow_mut();
        let secs = now.timestamp();
        if s.0 != secs {
            s.0 = secs;
            s.1 = now.format("%Y-%m-%dT%H:%M:%S").to_string();
        }
        put(s.1.as_bytes(), 0)
    });
    put(
        &[
            b'.',
            b'0' + (millis / 100) as u8,
            b'0' + (millis / 10 % 10) as u8,
            b'0' + (millis % 10) as u8,
            b'Z',
        ],
        at,
    )
}

fn format_line(l: &Line<'_>, out: &mut Vec<u8>) {
    let mut time = [0u8; 40];
    let len = write_time(&mut time);
    let time = std::str::from_utf8(&time[..len]).unwrap_or_default();
    let duration_ms = (l.duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
    if l.json {
        let _ = serde_json::to_writer(
            &mut *out,
            &Record {
                time,
                request_id: l.request_id,
                method: l.method,
                route: l.route,
                status: l.status,
                user_id: l.user_id,
                chatflow_id: l.chatflow_id,
                credits_charged: l.credits_charged,
                upstream_status: l.upstream_status,
                upstream_error: l.upstream_error,
                bytes: l.bytes_sent,
                duration_ms,
            },
        );
    } else {
        let dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
        let _ = write!(
            out,
            "{time} {} {} {} {} user={} chatflow={} charged={} upstream={} bytes={} {duration_ms}ms",
            l.request_id,
            l.method,
            l.route,
            l.status,
            dash(l.user_id.map(|u| u.to_string())),
            l.chatflow_id.unwrap_or("-"),
            dash(l.credits_charged.map(|c| c.to_string())),
            dash(l.upstream_status.map(|s| s.to_string())),
            l.bytes_sent,
        );
    }
    out.push(b'\n');
}

pub fn write(l: &Line<'_>) {
    if PENDING.load(Ordering::SeqCst) >= QUEUE {
        crate::metrics::ACCESS_LOG_DROPPED.inc();
        return;
    }
    // Counted before it is queued: the writer never subtracts a line the
    // count has not seen yet.
    PENDING.fetch_add(1, Ordering::SeqCst);
    SCRATCH.with(|scratch| {
        let mut line = scratch.borrow_mut();
        line.clear();
        format_line(l, &mut line);
        BATCH.with(|batch| {
            let mut b = batch.lock();
            b.buf.extend_from_slice(&line);
            b.lines += 1;
        });
    });
    let shared = *SHARED;
    if shared.writer_idle.swap(false, Ordering::SeqCst) {
        let _wake = shared.wake.lock();
        shared.ready.notify_one();
    }
}

/// Waits (bounded) until queued lines are written: at shutdown.
pub fn flush(limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while PENDING.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Lines queued and not yet written.
static PENDING: AtomicUsize = AtomicUsize::new(0);

#[cfg(test)]
mod tests {
    use super::*;

    fn line(json: bool) -> Line<'static> {
        Line {
            json,
            request_id: "req-1",
            method: "GET",
            route: "flowise_ping",
            status: 200,
            user_id: Some(7),
            chatflow_id: None,
            credits_charged: None,
            upstream_status: Some(200),
            upstream_error: None,
            bytes_sent: 12,
            duration: Duration::from_micros(1500),
        }
    }

    #[test]
    fn json_line_fields_in_order() {
        let mut out = Vec::new();
        format_line(&line(true), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        let time = v["time"].as_str().unwrap();
        assert_eq!(time.len(), "2026-12-01T12:00:00.000Z".len(), "{time}");
        assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{time}");
        let parts: Vec<&str> = text.split("\":").collect();
        // Each part but the last ends with a key; the last is the final value.
        let keys: Vec<&str> = parts[..parts.len() - 1]
            .iter()
            .filter_map(|k| k.rsplit('"').next())
            .collect();
        assert_eq!(
            keys,
            [
                "time",
                "request_id",
                "method",
                "route",
                "status",
                "user_id",
                "chatflow_id",
                "credits_charged",
                "upstream_status",
                "upstream_error",
                "bytes",
                "duration_ms"
            ]
        );
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["chatflow_id"], serde_json::Value::Null);
    }

    #[test]
    fn a_line_never_waits_for_another_threads_line() {
        // Thread A logs once and hands over its batch: holding that batch's
        // lock here stands for A preempted in the middle of its append.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            write(&line(true));
            let _ = tx.send(BATCH.with(|b| b.clone()));
        });
        let a = rx.recv_timeout(Duration::from_secs(10)).expect("thread A");
        let held = a.lock();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            write(&line(true));
            let _ = done.send(());
        });
        let waited = finished.recv_timeout(Duration::from_secs(10));
        drop(held);
        assert!(waited.is_ok(), "thread B's line waited for thread A's");
    }

    #[test]
    fn text_line() {
        let mut out = Vec::new();
        format_line(&line(false), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.ends_with(
                " req-1 GET flowise_ping 200 user=7 chatflow=- charged=- upstream=200 bytes=12 1.5ms\n"
            ),
            "{text}"
        );
    }
}
