//! One access-log line per request on stdout. Never a password, token, API key
//! or prompt text: only the fields below.
//!
//! Logging never blocks a request: lines are formatted on the worker (a
//! `Serialize` struct, no intermediate JSON value) and handed to one writer
//! thread through a bounded queue. When stdout's reader stalls and the queue
//! is full, the line is dropped and counted
//! (`flowise_proxy_access_log_dropped_total`); requests complete regardless.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::Duration;

use once_cell::sync::Lazy;
use serde::Serialize;

/// Lines waiting for the writer thread, at most.
const QUEUE: usize = 4_096;
/// Bytes written in one system call, about.
const BATCH_BYTES: usize = 256 << 10;
/// The writer's pause between batches.
const GATHER: Duration = Duration::from_millis(2);

#[derive(Serialize)]
pub struct Line<'a> {
    #[serde(skip)]
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
    #[serde(rename = "bytes")]
    pub bytes_sent: usize,
    #[serde(skip)]
    pub duration: Duration,
}

#[derive(Serialize)]
struct Stamped<'a> {
    time: String,
    #[serde(flatten)]
    line: &'a Line<'a>,
    duration_ms: f64,
}

static WRITER: Lazy<SyncSender<String>> = Lazy::new(|| {
    let (tx, rx) = sync_channel::<String>(QUEUE);
    let spawned = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || {
            let stdout = std::io::stdout();
            while let Ok(first) = rx.recv() {
                // Whatever is queued goes out in one write: one system call
                // per batch, not one per request.
                let mut batch = first;
                let mut written = 1;
                while batch.len() < BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(more) => {
                            batch.push_str(&more);
                            written += 1;
                        }
                        Err(_) => break,
                    }
                }
                {
                    let mut out = stdout.lock();
                    let _ = out.write_all(batch.as_bytes());
                    let _ = out.flush();
                }
                PENDING.fetch_sub(written, Ordering::SeqCst);
                // Let lines gather: under load the writer then wakes once per
                // pause, not once per request (a line waits at most this long).
                std::thread::sleep(GATHER);
            }
        });
    if let Err(e) = spawned {
        log::error!("access log writer thread: {e}");
    }
    tx
});

pub fn write(l: &Line<'_>) {
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let duration_ms = (l.duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
    let mut text = if l.json {
        serde_json::to_string(&Stamped {
            time,
            line: l,
            duration_ms,
        })
        .unwrap_or_default()
    } else {
        format!(
            "{time} {} {} {} {} user={} chatflow={} charged={} upstream={} bytes={} {duration_ms}ms",
            l.request_id,
            l.method,
            l.route,
            l.status,
            l.user_id.map_or("-".into(), |u| u.to_string()),
            l.chatflow_id.unwrap_or("-"),
            l.credits_charged.map_or("-".into(), |c| c.to_string()),
            l.upstream_status.map_or("-".into(), |s| s.to_string()),
            l.bytes_sent,
        )
    };
    text.push('\n');
    PENDING.fetch_add(1, Ordering::SeqCst);
    match WRITER.try_send(text) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            PENDING.fetch_sub(1, Ordering::SeqCst);
            crate::metrics::ACCESS_LOG_DROPPED.inc();
        }
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
