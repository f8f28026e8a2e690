//! The `ProxyHttp` implementation. Each hook is a few lines that hand over to the
//! module owning that concern.
//!
//! ```text
//!  client ─▶ request_filter ─▶ route (route.rs) ─▶ CORS preflight? answer
//!                 │
//!                 ├─ auth/     identity from the in-memory snapshot (no database)
//!                 ├─ body      read here, bounded by MAX_BODY_BYTES (413)
//!                 ├─ access    chatflow grant from the snapshot (404 / 403)
//!                 ├─ own endpoint?        api/ ─▶ JSON response
//!                 ├─ prediction?          predict.rs: session binding, ledger hold
//!                 │                       (402 / 503), relay.rs ─▶ Flowise ─▶ client
//!                 ├─ body to pass on?     relay.rs (Pingora cannot replay > 64 KiB)
//!                 └─ else ─▶ Pingora's proxy loop:
//!        upstream_peer ─▶ upstream/ (healthy Flowise, pooled keep-alive)
//!  upstream_request_filter ─▶ strip client credentials + hop-by-hop, add Flowise key
//!      response_filter ─▶ strip Flowise-only headers, add X-Request-Id and CORS
//!        fail_to_proxy ─▶ contract JSON errors (502 / 504)
//!              logging ─▶ ledger settle (queued, exactly once) · metrics · access log
//! ```

pub mod ctx;
mod pipeline;
mod predict;
pub mod relay;
pub mod respond;
pub mod route;

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::app::App;
use crate::upstream::forward::UpstreamFailure;
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
        match self.app.upstreams.select() {
            Some(chosen) => {
                ctx.upstream_server = Some(chosen.server.clone());
                Ok(Box::new(chosen.peer))
            }
            None => Error::e_explain(ErrorType::ConnectNoRoute, "no healthy Flowise server"),
        }
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let server = ctx
            .upstream_server
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no Flowise server chosen"))?;
        let meta = ForwardMeta {
            request_id: &ctx.request_id,
            client_ip: ctx.client_ip.clone(),
        };
        self.app.upstreams.prepare_request(req, &server, &meta)?;
        pipeline::rewrite_pass_through(&self.app, req, ctx)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream.status = Some(resp.status.as_u16());
        respond::sanitize_upstream_headers(resp);
        respond::decorate(&self.app, ctx, resp);
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let failure = UpstreamFailure::from_error(e);
        let api = match e.esource() {
            pingora_core::ErrorSource::Upstream => {
                ctx.upstream_failure = Some(failure.label());
                failure.api_error()
            }
            pingora_core::ErrorSource::Downstream => {
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                }
            }
            _ if matches!(e.etype(), ErrorType::ConnectNoRoute) => failure.api_error(),
            _ => crate::errors::ApiError::internal(),
        };
        // Only when nothing was sent yet; otherwise the connection is just closed.
        if session.response_written().is_none() {
            // After a failed proxy attempt Pingora 0.9 drops the client's
            // connection whatever this hook answers (it reuses it only when
            // the upstream exchange succeeded). Say so, or a keep-alive
            // client sends its next request into a closing socket and gets
            // a reset.
            session.set_keepalive(None);
            let _ = respond::error(session, &self.app, ctx, &api).await;
        }
        FailToProxy {
            error_code: api.status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        pipeline::finish(&self.app, session, e, ctx);
    }
}

/// Percent-encodes a query value.
pub fn route_urlencode(s: &str) -> String {
    pipeline::urlencode(s)
}

/// The grant check, for handlers outside the pipeline.
pub async fn pipeline_check_chatflow(
    app: &App,
    ctx: &Ctx,
    chatflow_id: &str,
) -> std::result::Result<(), crate::errors::ApiError> {
    pipeline::check_chatflow_access(app, ctx, chatflow_id).await
}
