//! Reading a request's head (request line and headers) under the limits,
//! before Pingora sees the request.
//!
//! Pingora 0.9 waits for a request head with no total deadline: each read may
//! take 60 s on a new connection and forever on a kept-alive one (its HTTP/1.1
//! keep-alive is "infinite"), and it accepts heads up to 1 MiB. So the head is
//! read here, bounded in time and size, and handed to Pingora already read (as
//! a "pipelined prefix", which Pingora parses without waiting on the socket).

use std::time::Duration;

use bytes::BytesMut;
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use std::mem::MaybeUninit;

use super::body::{Framing, LimitedStream};

/// What came of waiting for a request head.
pub enum Head {
    /// A complete head, `len` bytes, at the start of `buf` (which may hold
    /// body bytes or a further request after it), and how its body ends.
    Complete {
        buf: BytesMut,
        len: usize,
        framing: Framing,
    },
    /// No request: the client closed, or sent nothing in time, or the server
    /// is shutting down. Close quietly.
    Nothing,
    /// Part of a head arrived but not all of it in time.
    TimedOut,
    /// The head is larger than the limit.
    TooLarge,
}

/// How long to wait, and for what.
pub struct HeadLimits {
    /// Until the first byte of the request.
    pub first_byte_by: Instant,
    /// The whole head: counted from the accept for a connection's first
    /// request (`Some`), from the first byte for later ones (`None`).
    pub complete_by: Option<Instant>,
    pub header_timeout: Duration,
    pub max_bytes: usize,
}

pub async fn read_head(
    stream: &mut LimitedStream,
    limits: &HeadLimits,
    shutdown: &ShutdownWatch,
) -> Head {
    let mut buf = BytesMut::with_capacity(1024.min(limits.max_bytes + 1));
    // An idle connection waits here; the server's shutdown ends the wait
    // (bytes already there are read first).
    let first = tokio::select! {
        biased;
        read = timeout_at(limits.first_byte_by, stream.read_buf(&mut buf)) => read,
        _ = shutdown_signalled(shutdown.clone()) => return Head::Nothing,
    };
    match first {
        Ok(Ok(n)) if n > 0 => {}
        // Closed, failed, or idle past the limit.
        _ => return Head::Nothing,
    }
    let complete_by = limits
        .complete_by
        .unwrap_or_else(|| Instant::now() + limits.header_timeout);
    loop {
        if let Some((len, framing)) = head_end(&buf) {
            if len > limits.max_bytes {
                return Head::TooLarge;
            }
            return Head::Complete { buf, len, framing };
        }
        if buf.len() > limits.max_bytes {
            return Head::TooLarge;
        }
        // Grow by doubling, never past one byte over the limit.
        let room = (limits.max_bytes + 1).saturating_sub(buf.len());
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().max(1024).min(room).max(1));
        }
        match timeout_at(complete_by, stream.read_buf(&mut buf)).await {
            Err(_) => return Head::TimedOut,
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Head::Nothing,
        }
    }
}

/// Where the head ends, if it is complete, and its body's framing (from the
/// same parse: the head is parsed once here, once more by Pingora). A head
/// httparse calls invalid is still handed to Pingora once its blank line is
/// there: Pingora repairs some (unescaped bytes in the request line) and
/// answers 400 to the rest.
fn head_end(buf: &[u8]) -> Option<(usize, Framing)> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 256];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => Some((len, Framing::of_headers(req.headers))),
        Ok(httparse::Status::Partial) => None,
        Err(_) => [&b"\r\n\r\n"[..], &b"\n\n"[..]]
            .iter()
            .filter_map(|end| {
                buf.windows(end.len())
                    .position(|w| w == *end)
                    .map(|at| at + end.len())
            })
            .min()
            .map(|len| (len, Framing::of_head(&buf[..len]))),
    }
}

async fn shutdown_signalled(mut watch: ShutdownWatch) {
    loop {
        if *watch.borrow_and_update() {
            return;
        }
        if watch.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A refusal written straight to the socket, before (or instead of) Pingora.
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub code: &'static str,
    pub detail: &'static str,
    pub retry_after: Option<u64>,
}

impl Refusal {
    fn bytes(&self) -> Vec<u8> {
        let body = serde_json::json!({"detail": self.detail, "code": self.code}).to_string();
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\nX-Request-Id: {}\r\n",
            self.status,
            self.reason,
            body.len(),
            uuid::Uuid::new_v4()
        );
        if let Some(secs) = self.retry_after {
            head.push_str(&format!("Retry-After: {secs}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }

    /// Reads what the client has sent so far (waiting at most `settle`),
    /// writes the answer, ends the sending side, and reads what the client
    /// still sends for up to `linger`: closing with unread bytes makes the
    /// kernel reset the connection, and the client may lose the answer.
    pub async fn send<S>(&self, stream: &mut S, settle: Duration, linger: Duration)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut sink = [0u8; 8192];
        let _ = tokio::time::timeout(settle, stream.read(&mut sink)).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            stream.write_all(&self.bytes()).await?;
            stream.flush().await?;
            stream.shutdown().await
        })
        .await;
        let end = Instant::now() + linger;
        let mut drained = 0usize;
        while drained < (1 << 20) {
            match timeout_at(end, stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => drained += n,
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::head_end;
    use crate::limits::body::Framing;

    #[test]
    fn head_ends_after_the_blank_line() {
        assert_eq!(
            head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"),
            Some((27, Framing::None))
        );
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        // Not valid for httparse (a space in the path), still complete.
        assert_eq!(
            head_end(b"GET /a b HTTP/1.1\r\n\r\n"),
            Some((21, Framing::None))
        );
    }

    #[test]
    fn framing_comes_from_the_same_parse() {
        assert_eq!(
            head_end(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"),
            Some((38, Framing::Length(5)))
        );
        assert_eq!(
            head_end(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some((66, Framing::Chunked))
        );
        // Invalid request line: the framing is still read from the headers.
        assert_eq!(
            head_end(b"POST /a b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
            Some((41, Framing::Length(3)))
        );
    }
}
