//! The `ProxyHttp` implementation: one path to Flowise. Each hook is a few
//! lines that hand over to the module owning that concern; every request the
//! proxy forwards on a client's behalf goes through Pingora's proxy loop.
//!
//! ```text
//!  client ─▶ request_filter  (pipeline.rs: decides, never forwards)
//!              ├─ route (crate::route) · CORS preflight answered
//!              ├─ auth/    identity from the in-memory snapshot (database on a miss)
//!              ├─ access   chatflow grant from the snapshot (404 / 403)
//!              ├─ own endpoint?   api/ ─▶ JSON response, done
//!              ├─ prediction?     predict.rs: seed body read (≤ 64 KiB),
//!              │                  conversation checked, ledger hold (402 / 503)
//!              └─ Flowise route?  flowise_route.rs: ownership, rebuilt query
//!        upstream_peer ─▶ upstream/ healthy Flowise not yet tried (pooled,
//!                           one pool per worker thread)
//!      fail_to_connect ─▶ refused before any byte was sent: next server
//! upstream_request_filter ─▶ strip credentials + hop-by-hop, Flowise key,
//!                           rewritten path, seed body length
//!  request_body_filter ─▶ body.rs: limits while streaming; prediction bodies
//!                           checked before their last byte is released
//!      response_filter ─▶ answer.rs: header policy, error mapping, credits headers
//! response_body_filter ─▶ answer.rs: bytes out as they come; streams observed,
//!                           own-route answers rewritten
//!        fail_to_proxy ─▶ contract JSON errors (413 / 403 / 502 / 504 …);
//!                           a client that went away is no ERROR line
//!              logging ─▶ ledger settle (queued, exactly once) · conversation
//!                           binding · metrics · access log
//! ```

mod answer;
mod body;
pub mod ctx;
mod flowise_route;
mod pipeline;
mod predict;
pub mod respond;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::app::App;
use crate::upstream::client::UpstreamFailure;
use crate::upstream::ForwardMeta;
pub use ctx::Ctx;

pub struct FlowiseProxy {
    pub app: Arc<App>,
}

#[async_trait]
impl ProxyHttp for FlowiseProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        pipeline::request_filter(&self.app, session, ctx).await
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        match self.app.upstreams.select(&ctx.tried) {
            Some(chosen) => {
                ctx.upstream_server = Some(chosen.index);
                Ok(Box::new(chosen.peer))
            }
            None => Error::e_explain(ErrorType::ConnectNoRoute, "no healthy Flowise server"),
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent: another healthy server may take the request.
        UpstreamFailure::Connect.count();
        if let Some(i) = ctx.upstream_server.take() {
            ctx.tried.push(i);
        }
        e.set_retry(self.app.upstreams.select(&ctx.tried).is_some());
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let server = ctx
            .upstream_server
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no Flowise server chosen"))?;
        pipeline::upstream_request(req, ctx)?;
        let meta = ForwardMeta {
            request_id: &ctx.request_id,
            client_ip: ctx.client_ip.as_deref(),
        };
        self.app.upstreams.prepare_request(req, server, &meta)?;
        ctx.upstream_sent = Some(Instant::now());
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        pipeline::request_body(&self.app, body, end_of_stream, ctx).await
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        answer::on_header(&self.app, resp, ctx);
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<std::time::Duration>> {
        answer::on_body(&self.app, body, end_of_stream, ctx);
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let api = pipeline::proxy_failure(e, ctx);
        // Only when nothing was sent yet; otherwise the connection is just
        // closed, and a stream ends without its terminating chunk.
        if let Some(api) = &api {
            if session.response_written().is_none() {
                // After a failed proxy attempt Pingora 0.9 drops the client's
                // connection whatever this hook answers: say so, or a keep-alive
                // client sends its next request into a closing socket.
                session.set_keepalive(None);
                let _ = respond::error(session, &self.app, ctx, api).await;
            }
        }
        FailToProxy {
            error_code: api.map_or(0, |a| a.status),
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        pipeline::client_caused(e)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        pipeline::finish(&self.app, session, e, ctx).await;
    }
}
