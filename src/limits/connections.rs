//! The proxy service's connection handling: a cap on open client connections,
//! and each request's head and body read under the limits, around Pingora's
//! own HTTP/1 handling.
//!
//! This replaces the small HTTP/1 keep-alive loop of Pingora's
//! `impl<T: HttpServerApp> ServerApp for T` (pingora-core `apps/mod.rs`): it
//! runs the same `process_new_http` per request, with the head read here
//! first. HTTP/2 is not offered on this listener (no TLS, no h2c), so that
//! loop's HTTP/2 branch has no counterpart.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::time::Instant;

use super::body::LimitedStream;
use super::head::{read_head, Head, HeadLimits, Refusal};
use super::metrics::{OPEN, REFUSED};
use crate::config::ClientLimits;

const OVER_CAPACITY: Refusal = Refusal {
    status: 503,
    reason: "Service Unavailable",
    code: "unavailable",
    detail: "Too many open connections, try again shortly",
    retry_after: Some(1),
};
const HEADER_TIMEOUT: Refusal = Refusal {
    status: 408,
    reason: "Request Timeout",
    code: "request_timeout",
    detail: "The request header did not arrive in time",
    retry_after: None,
};
const HEADER_TOO_LARGE: Refusal = Refusal {
    status: 431,
    reason: "Request Header Fields Too Large",
    code: "header_too_large",
    detail: "The request header is too large",
    retry_after: None,
};

/// Over-capacity connections being answered at once, at most.
const MAX_REFUSING: usize = 128;
/// How long an over-capacity connection is read before and after its answer.
const REFUSAL_SETTLE: Duration = Duration::from_millis(20);
const REFUSAL_LINGER: Duration = Duration::from_millis(100);
/// How long a refused request's remaining bytes are read after its answer.
const ERROR_LINGER: Duration = Duration::from_secs(1);
static REFUSING: AtomicUsize = AtomicUsize::new(0);

/// Pingora's HTTP application `A` behind the client limits.
pub struct LimitedHttp<A> {
    inner: Arc<A>,
    limits: ClientLimits,
}

impl<A> LimitedHttp<A> {
    /// `limits.max_connections` is used as given (already fitted to the
    /// descriptor limit by the caller).
    pub fn new(inner: A, limits: ClientLimits) -> Self {
        LimitedHttp {
            inner: Arc::new(inner),
            limits,
        }
    }
}

#[async_trait]
impl<A> ServerApp for LimitedHttp<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = Instant::now();
        let mut stream = Box::new(LimitedStream::new(stream));
        let Some(_slot) = Slot::take(self.limits.max_connections) else {
            REFUSED.with_label_values(&["max_connections"]).inc();
            // Answering holds the descriptor for a moment; past that many
            // answers under way, a flood is closed without one.
            if REFUSING.fetch_add(1, Ordering::AcqRel) < MAX_REFUSING {
                // Its request is normally there already (TCP_DEFER_ACCEPT):
                // read it, so that closing does not reset the connection.
                OVER_CAPACITY
                    .send(&mut *stream, REFUSAL_SETTLE, REFUSAL_LINGER)
                    .await;
            }
            REFUSING.fetch_sub(1, Ordering::AcqRel);
            return None;
        };
        // Spawns made while serving this connection (Pingora's watcher of
        // each upstream connection it pools) stay on this thread: see
        // `crate::upstream::worker_pool_key` and vendor/README.md.
        pingora_runtime::with_local_spawns(self.serve(stream, accepted, shutdown)).await;
        None
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}

impl<A> LimitedHttp<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// The requests of one connection, one after another, until it closes.
    async fn serve(
        self: &Arc<Self>,
        mut stream: Box<LimitedStream>,
        accepted: Instant,
        shutdown: &ShutdownWatch,
    ) {
        let limits = &self.limits;
        let first_head_by = accepted + limits.header_timeout;
        let mut head_limits = HeadLimits {
            first_byte_by: first_head_by,
            complete_by: Some(first_head_by),
            header_timeout: limits.header_timeout,
            max_bytes: limits.max_header_bytes,
        };
        let mut settings: Option<HttpPersistentSettings> = None;
        loop {
            let (buf, len, framing) = match read_head(&mut stream, &head_limits, shutdown).await {
                Head::Complete { buf, len, framing } => (buf, len, framing),
                Head::Nothing => return,
                Head::TimedOut => {
                    REFUSED.with_label_values(&["header_timeout"]).inc();
                    HEADER_TIMEOUT
                        .send(&mut *stream, Duration::ZERO, ERROR_LINGER)
                        .await;
                    return;
                }
                Head::TooLarge => {
                    REFUSED.with_label_values(&["max_header_bytes"]).inc();
                    HEADER_TOO_LARGE
                        .send(&mut *stream, Duration::ZERO, ERROR_LINGER)
                        .await;
                    return;
                }
            };
            stream.expect_body(framing, &buf[len..], limits.body_timeout);
            stream.expect_answer_within(limits.first_byte_timeout);

            let mut session = ServerSession::new_http1(stream);
            match settings.take() {
                Some(previous) => previous.apply_to_session(&mut session),
                None => session.set_keepalive_reuses_remaining(
                    self.inner
                        .server_options()
                        .and_then(|o| o.keepalive_request_limit),
                ),
            }
            // Pingora parses the head from here and reads the socket only
            // for what follows it.
            session.set_pipelined_prefix(buf);
            let Some(reused) = self.inner.process_new_http(session, shutdown).await else {
                return;
            };
            let (next, persistent) = reused.consume();
            let Some(next) = LimitedStream::from_stream(next) else {
                return;
            };
            stream = next;
            settings = persistent;
            // A kept-alive connection: the next request may come within the
            // keep-alive timeout; its head then has the header timeout.
            head_limits.first_byte_by = Instant::now() + limits.keepalive_timeout;
            head_limits.complete_by = None;
        }
    }
}

/// One open client connection, counted while it lives.
struct Slot;

impl Slot {
    fn take(max: usize) -> Option<Slot> {
        let open = OPEN_COUNT.fetch_add(1, Ordering::AcqRel) + 1;
        if open > max {
            OPEN_COUNT.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        OPEN.set(open as i64);
        super::memory::note_open(open);
        Some(Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let open = OPEN_COUNT.fetch_sub(1, Ordering::AcqRel) - 1;
        OPEN.set(open as i64);
        super::memory::note_closed(open);
    }
}

/// Client connections open now (those past the cap are never counted).
pub static OPEN_COUNT: AtomicUsize = AtomicUsize::new(0);
