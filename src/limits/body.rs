//! The request body deadline: the client connection's stream, wrapped so that
//! a read waiting for body bytes fails once the body's deadline has passed.
//!
//! Pingora only bounds each single read (60 s by default), so a client sending
//! one byte every few seconds kept a request (and its connection) forever.
//! The deadline must not touch reads after the body: while a response streams,
//! Pingora keeps a read pending on the client connection to notice a
//! disconnect, and failing that read would cut the stream. So the wrapper
//! follows the body's framing (Content-Length or chunked, the same rules
//! Pingora applies) and drops the deadline the moment the last body byte has
//! been read.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::SslDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How a request's body ends, read from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (no Content-Length, no Transfer-Encoding).
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding` present: chunked, ending with the zero-size chunk.
    Chunked,
}

impl Framing {
    /// The framing of a request head (request line and header lines, with
    /// the blank line). Transfer-Encoding wins over Content-Length, as in
    /// Pingora (RFC 9112 §6.3). A Content-Length that does not parse means
    /// Pingora refuses the request: no body to wait for.
    pub fn of_head(head: &[u8]) -> Framing {
        let Some(line_end) = head.iter().position(|&b| b == b'\n') else {
            return Framing::None;
        };
        let mut headers = [httparse::EMPTY_HEADER; 256];
        let Ok(httparse::Status::Complete((_, headers))) =
            httparse::parse_headers(&head[line_end + 1..], &mut headers)
        else {
            return Framing::None;
        };
        Framing::of_headers(headers)
    }

    /// The framing of parsed header lines (see [`Framing::of_head`]).
    pub fn of_headers(headers: &[httparse::Header<'_>]) -> Framing {
        let mut length = None;
        for h in headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Framing::Chunked;
            }
            if h.name.eq_ignore_ascii_case("content-length") && length.is_none() {
                length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
            }
        }
        match length {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        }
    }
}

/// Where reading a body stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Progress {
    /// Nothing left to read.
    Done,
    /// Bytes of a Content-Length body still to come.
    Remaining(u64),
    Chunked(Chunk),
}

/// A chunked body's decoder state, only as far as finding its end.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    /// In the chunk-size digits.
    Size { size: u64, digits: bool },
    /// After the size: extensions or whitespace up to the line's end.
    SizeLine { size: u64 },
    /// Chunk data still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last (zero) chunk: trailer lines until an empty one.
    Trailer { line_start: bool },
    /// Not valid chunked framing: Pingora fails the request; the deadline
    /// stays until the connection closes.
    Invalid,
    /// The trailer's empty line has been read: the body is complete.
    End,
}

impl Progress {
    fn start(framing: Framing) -> Progress {
        match framing {
            Framing::None | Framing::Length(0) => Progress::Done,
            Framing::Length(n) => Progress::Remaining(n),
            Framing::Chunked => Progress::Chunked(Chunk::Size {
                size: 0,
                digits: false,
            }),
        }
    }

    fn is_done(&self) -> bool {
        matches!(self, Progress::Done)
    }

    /// Counts bytes read from the client. Bytes past the body's end belong
    /// to the next request and are ignored.
    fn feed(&mut self, bytes: &[u8]) {
        match self {
            Progress::Done => {}
            Progress::Remaining(n) => {
                *n -= (*n).min(bytes.len() as u64);
                if *n == 0 {
                    *self = Progress::Done;
                }
            }
            Progress::Chunked(state) => {
                state.feed(bytes);
                if *state == Chunk::End {
                    *self = Progress::Done;
                }
            }
        }
    }
}

impl Chunk {
    /// Consumes bytes until the body's end (or all of them).
    fn feed(&mut self, bytes: &[u8]) {
        let mut at = 0;
        while at < bytes.len() {
            let b = bytes[at];
            at += 1;
            *self = match *self {
                Chunk::Size { size, digits } => match (b as char).to_digit(16) {
                    Some(d) => match size.checked_mul(16).and_then(|s| s.checked_add(d.into())) {
                        Some(size) => Chunk::Size { size, digits: true },
                        None => Chunk::Invalid,
                    },
                    None if !digits => Chunk::Invalid,
                    None if b == b'\n' => Chunk::after_size_line(size),
                    None => Chunk::SizeLine { size },
                },
                Chunk::SizeLine { size } if b == b'\n' => Chunk::after_size_line(size),
                Chunk::SizeLine { size } => Chunk::SizeLine { size },
                Chunk::Data(n) => {
                    // This byte and as many more as the chunk still has.
                    let more = (n - 1).min((bytes.len() - at) as u64);
                    at += more as usize;
                    match n - 1 - more {
                        0 => Chunk::DataEnd,
                        left => Chunk::Data(left),
                    }
                }
                Chunk::DataEnd if b == b'\n' => Chunk::Size {
                    size: 0,
                    digits: false,
                },
                Chunk::DataEnd if b == b'\r' => Chunk::DataEnd,
                Chunk::DataEnd => Chunk::Invalid,
                Chunk::Trailer { line_start: true } if b == b'\n' => Chunk::End,
                Chunk::Trailer { .. } if b == b'\n' => Chunk::Trailer { line_start: true },
                Chunk::Trailer { line_start } if b == b'\r' => Chunk::Trailer { line_start },
                Chunk::Trailer { .. } => Chunk::Trailer { line_start: false },
                Chunk::Invalid => return,
                Chunk::End => return,
            };
            if *self == Chunk::End {
                return;
            }
        }
    }

    fn after_size_line(size: u64) -> Chunk {
        if size == 0 {
            Chunk::Trailer { line_start: true }
        } else {
            Chunk::Data(size)
        }
    }
}

/// The client connection's stream with the body deadline in front of reads.
///
/// It also carries the proxy's time-to-first-byte limit
/// (`UPSTREAM_FIRST_BYTE_TIMEOUT_MS`): once a request's body is complete and
/// until the first byte of its answer is written, Pingora keeps a read pending
/// on this stream (to notice a client leaving) while it waits for Flowise.
/// That read fails with [`FirstByteTimeout`] when the limit passes, which ends
/// the wait (answered 504, the hold voided). Pingora 0.9 applies one read
/// timeout to every upstream read, header and body alike, so this is where a
/// first-byte limit separate from the stream idle limit can live.
pub struct LimitedStream {
    inner: Stream,
    progress: Progress,
    /// Set while a body is being read and its deadline applies.
    deadline: Option<Pin<Box<Sleep>>>,
    /// The deadline has passed (counted once in the metrics).
    timed_out: bool,
    /// The time-to-first-byte limit of the current request.
    first_byte_limit: Option<Duration>,
    /// Runs from the body's end until the answer's first byte is written.
    first_byte: Option<Pin<Box<Sleep>>>,
}

/// The error a pending client read ends with when no answer began within
/// `UPSTREAM_FIRST_BYTE_TIMEOUT_MS` (see [`LimitedStream`]).
#[derive(Debug)]
pub struct FirstByteTimeout;

impl fmt::Display for FirstByteTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no answer began within UPSTREAM_FIRST_BYTE_TIMEOUT_MS")
    }
}

impl std::error::Error for FirstByteTimeout {}

/// Whether a Pingora error is the first-byte limit passing.
pub fn is_first_byte_timeout(e: &pingora_core::Error) -> bool {
    let root = e.root_cause();
    root.downcast_ref::<io::Error>()
        .and_then(|io| io.get_ref())
        .is_some_and(|inner| inner.is::<FirstByteTimeout>())
        || root.is::<FirstByteTimeout>()
}

impl LimitedStream {
    pub fn new(inner: Stream) -> LimitedStream {
        LimitedStream {
            inner,
            progress: Progress::Done,
            deadline: None,
            timed_out: false,
            first_byte_limit: None,
            first_byte: None,
        }
    }

    /// The answer's first byte must be written within `limit` of the body's end.
    pub fn expect_answer_within(&mut self, limit: Option<Duration>) {
        self.first_byte_limit = limit;
        self.first_byte = None;
        if self.progress.is_done() {
            self.start_first_byte_clock();
        }
    }

    fn start_first_byte_clock(&mut self) {
        self.first_byte = self
            .first_byte_limit
            .take()
            .map(|l| Box::pin(tokio::time::sleep_until(Instant::now() + l)));
    }

    /// A new request's header has been read: its body (framed as `framing`,
    /// `already_read` bytes of it, or of what follows it, read with the
    /// header) must be complete within `limit` from now.
    pub fn expect_body(&mut self, framing: Framing, already_read: &[u8], limit: Duration) {
        self.progress = Progress::start(framing);
        self.progress.feed(already_read);
        self.deadline = if self.progress.is_done() {
            None
        } else {
            Some(Box::pin(tokio::time::sleep_until(Instant::now() + limit)))
        };
    }

    /// Takes the stream back from a finished session. `None` if it is not
    /// one of ours (never: every session gets its stream from here).
    pub fn from_stream(stream: Stream) -> Option<Box<LimitedStream>> {
        stream.into_any().downcast::<LimitedStream>().ok()
    }
}

impl fmt::Debug for LimitedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitedStream")
            .field("inner", &self.inner)
            .field("progress", &self.progress)
            .finish()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.deadline.is_some() {
                    this.progress.feed(&buf.filled()[before..]);
                    if this.progress.is_done() {
                        this.deadline = None;
                        this.start_first_byte_clock();
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if let Some(sleep) = this.first_byte.as_mut() {
                    if sleep.as_mut().poll(cx).is_ready() {
                        this.first_byte = None;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            FirstByteTimeout,
                        )));
                    }
                }
                let expired = match this.deadline.as_mut() {
                    Some(sleep) => sleep.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if !expired {
                    return Poll::Pending;
                }
                if !this.timed_out {
                    this.timed_out = true;
                    super::metrics::REFUSED
                        .with_label_values(&["body_timeout"])
                        .inc();
                }
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request body not complete within REQUEST_BODY_TIMEOUT_MS",
                )))
            }
            ready_err => ready_err,
        }
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // An answer began: the first-byte limit is met.
        self.first_byte = None;
        self.first_byte_limit = None;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.first_byte = None;
        self.first_byte_limit = None;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// Everything else Pingora asks of a stream is the inner stream's.

#[async_trait]
impl Shutdown for LimitedStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for LimitedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for LimitedStream {
    fn get_ssl(&self) -> Option<&pingora_core::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for LimitedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for LimitedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for LimitedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for LimitedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress_after(framing: Framing, parts: &[&[u8]]) -> Progress {
        let mut p = Progress::start(framing);
        for part in parts {
            p.feed(part);
        }
        p
    }

    #[test]
    fn framing_follows_pingora() {
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n";
        assert_eq!(Framing::of_head(head), Framing::Length(12));
        let head = b"POST / HTTP/1.1\r\ncontent-length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(Framing::of_head(head), Framing::Chunked);
        assert_eq!(
            Framing::of_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Framing::None
        );
        let head = b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n";
        assert_eq!(Framing::of_head(head), Framing::None);
    }

    #[test]
    fn length_bodies_end_at_their_length() {
        assert!(!progress_after(Framing::Length(10), &[b"12345", b"6789"]).is_done());
        assert!(progress_after(Framing::Length(10), &[b"12345", b"67890GET /"]).is_done());
    }

    #[test]
    fn chunked_bodies_end_after_the_trailer() {
        let body: &[u8] = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nGET /";
        assert!(progress_after(Framing::Chunked, &[body]).is_done());
        // Byte by byte: not done until the very last byte of the body.
        let end = body.len() - b"GET /".len();
        let mut p = Progress::start(Framing::Chunked);
        for (i, b) in body[..end].iter().enumerate() {
            assert!(!p.is_done(), "done early at byte {i}");
            p.feed(&[*b]);
        }
        assert!(p.is_done());
        assert!(progress_after(Framing::Chunked, &[b"0\r\n\r\n"]).is_done());
        assert!(!progress_after(Framing::Chunked, &[b"0\r\n"]).is_done());
        assert!(!progress_after(Framing::Chunked, &[b"zz\r\n\r\n"]).is_done());
    }
}
