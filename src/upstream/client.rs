//! The small client for calls the proxy makes for itself (the catalogue sync,
//! deleting a forgotten conversation's messages, gathering a user's own
//! messages), over Pingora's connector and pooled connections. Requests made
//! on a client's behalf never come here: they go through Pingora's proxy loop
//! (see `proxy/mod.rs`).

use std::time::Duration;

use bytes::Bytes;
use pingora_core::protocols::http::client::HttpSession as ClientSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType};
use pingora_http::{RequestHeader, ResponseHeader};

use super::{ForwardMeta, Upstreams};
use crate::errors::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Every Flowise server is marked unhealthy.
    NoHealthy,
    /// Connecting or sending failed: Flowise was never reached.
    Connect,
    /// No byte arrived within the read timeout.
    Timeout,
    /// The connection broke while reading the response.
    Read,
}

impl UpstreamFailure {
    pub fn api_error(self) -> ApiError {
        match self {
            UpstreamFailure::Timeout => ApiError::upstream_timeout(),
            _ => ApiError::upstream_error(),
        }
    }

    /// Every upstream failure, whichever path saw it, is counted here.
    pub fn count(self) {
        crate::metrics::UPSTREAM_ERRORS
            .with_label_values(&[self.label()])
            .inc();
    }

    pub fn label(self) -> &'static str {
        match self {
            UpstreamFailure::NoHealthy => "no_healthy",
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Read => "read",
        }
    }

    /// Classifies a Pingora error from the upstream side.
    pub fn from_error(e: &Error) -> UpstreamFailure {
        if matches!(e.etype(), ErrorType::ConnectNoRoute) && e.esource() != &ErrorSource::Upstream {
            return UpstreamFailure::NoHealthy;
        }
        match e.etype() {
            ErrorType::ReadTimedout => UpstreamFailure::Timeout,
            ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::SocketError
            | ErrorType::BindError
            | ErrorType::ConnectProxyFailure
            | ErrorType::TLSHandshakeFailure
            | ErrorType::WriteTimedout
            | ErrorType::WriteError => UpstreamFailure::Connect,
            _ => UpstreamFailure::Read,
        }
    }
}

pub struct UpstreamResponse<'a> {
    up: &'a Upstreams,
    session: ClientSession,
    peer: HttpPeer,
    pub header: ResponseHeader,
}

impl Upstreams {
    /// Sends `req` (path relative to Flowise's root) with `body`; returns once the
    /// response header has arrived.
    pub async fn send(
        &self,
        mut req: RequestHeader,
        body: Bytes,
        meta: &ForwardMeta<'_>,
    ) -> Result<UpstreamResponse<'_>, UpstreamFailure> {
        let chosen = self.select(&[]).ok_or_else(|| {
            UpstreamFailure::NoHealthy.count();
            UpstreamFailure::NoHealthy
        })?;
        self.prepare_request(&mut req, chosen.index, meta)
            .map_err(|_| UpstreamFailure::Connect)?;
        req.remove_header("transfer-encoding");
        req.remove_header("expect");
        if body.is_empty() && matches!(req.method.as_str(), "GET" | "HEAD" | "DELETE" | "OPTIONS") {
            req.remove_header("content-length");
        } else {
            req.insert_header("Content-Length", body.len().to_string())
                .map_err(|_| UpstreamFailure::Connect)?;
        }
        let idempotent = req.method.is_idempotent();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut session, reused) = self
                .connector
                .get_http_session(&chosen.peer)
                .await
                .map_err(|e| {
                    let f = UpstreamFailure::from_error(&e);
                    f.count();
                    f
                })?;
            session.set_read_timeout(chosen.peer.options.read_timeout);
            session.set_write_timeout(chosen.peer.options.write_timeout);
            match exchange(&mut session, &req, &body).await {
                Ok(()) => {
                    let header = match session.response_header() {
                        Some(h) => h.clone(),
                        None => return Err(UpstreamFailure::Read),
                    };
                    return Ok(UpstreamResponse {
                        up: self,
                        session,
                        peer: chosen.peer.clone(),
                        header,
                    });
                }
                // A pooled connection that Flowise closed while idle: an
                // idempotent request (all this client sends) is tried once more
                // on a fresh one; anything else is never sent twice.
                Err(e) if reused && attempt == 1 && idempotent && is_stale_connection(&e) => {
                    continue
                }
                Err(e) => {
                    let f = UpstreamFailure::from_error(&e);
                    f.count();
                    return Err(f);
                }
            }
        }
    }
}

async fn exchange(
    session: &mut ClientSession,
    req: &RequestHeader,
    body: &Bytes,
) -> pingora_core::Result<()> {
    session.write_request_header(Box::new(req.clone())).await?;
    if !body.is_empty() {
        session.write_request_body(body.clone(), true).await?;
    }
    session.finish_request_body().await?;
    loop {
        session.read_response_header().await?;
        // Skip informational answers (100 Continue).
        match session.response_header() {
            Some(h) if h.status.is_informational() => continue,
            _ => return Ok(()),
        }
    }
}

fn is_stale_connection(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed | ErrorType::WriteError | ErrorType::ReadError
    )
}

impl UpstreamResponse<'_> {
    pub fn status(&self) -> u16 {
        self.header.status.as_u16()
    }

    /// The next piece of the body as Flowise sent it; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, UpstreamFailure> {
        self.session.read_response_body().await.map_err(|e| {
            let f = UpstreamFailure::from_error(&e);
            f.count();
            f
        })
    }

    /// Reads the whole body, refusing more than `limit` bytes.
    pub async fn read_all(&mut self, limit: usize) -> Result<Bytes, UpstreamFailure> {
        let mut out = bytes::BytesMut::new();
        while let Some(c) = self.chunk().await? {
            if out.len() + c.len() > limit {
                return Err(UpstreamFailure::Read);
            }
            out.extend_from_slice(&c);
        }
        Ok(out.freeze())
    }

    /// Returns the connection to the pool when the response was read to its end,
    /// otherwise closes it.
    pub async fn release(mut self) {
        if self.session.response_done() {
            self.up
                .connector
                .release_http_session(self.session, &self.peer, Some(Duration::from_secs(4)))
                .await;
        } else {
            self.session.shutdown().await;
        }
    }
}
