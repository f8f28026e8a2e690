//! What `request_filter` and `logging` do, step by step.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora_core::{Error, Result};
use pingora_http::RequestHeader;
use pingora_proxy::Session;

use super::ctx::Ctx;
use super::route::{Access, Route};
use super::{predict, relay, respond};
use crate::api;
use crate::app::App;
use crate::errors::ApiError;

pub enum Next {
    /// A response was written: stop here.
    Done,
    /// Hand over to Pingora's proxy loop.
    Proxy,
}

pub async fn request_filter(app: &App, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
    begin(session, ctx);
    match admit(app, session, ctx).await {
        Ok(Next::Done) => Ok(true),
        Ok(Next::Proxy) => Ok(false),
        Err(e) => {
            respond::error(session, app, ctx, &e).await?;
            Ok(true)
        }
    }
}

fn begin(session: &Session, ctx: &mut Ctx) {
    let req = session.req_header();
    ctx.method = req.method.as_str().to_string();
    ctx.query = req
        .uri
        .query()
        .filter(|q| q.len() <= 4096)
        .map(str::to_string);
    ctx.route = Route::resolve(req.method.as_str(), req.uri.path());
    ctx.request_id = req
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| sane_request_id(v))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    ctx.origin = req
        .headers
        .get("origin")
        .and_then(|v| v.to_str().ok())
        .filter(|o| o.len() <= 256)
        .map(str::to_string);
    ctx.client_ip = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string());
    ctx.counted = true;
    crate::metrics::IN_FLIGHT.inc();
}

fn sane_request_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

async fn admit(app: &App, session: &mut Session, ctx: &mut Ctx) -> Result<Next, ApiError> {
    match ctx.route {
        Route::CorsPreflight => {
            respond::preflight(session, app, ctx)
                .await
                .map_err(|_| ApiError::internal())?;
            return Ok(Next::Done);
        }
        Route::NotFound => return Err(ApiError::not_found()),
        Route::MethodNotAllowed => return Err(ApiError::method_not_allowed()),
        _ => {}
    }

    let access = ctx.route.access();
    if access != Access::Anyone {
        let header = session
            .req_header()
            .headers
            .get("authorization")
            .map(|v| v.as_bytes());
        match app.auth.authenticate(&app.db, header).await {
            Ok(id) => ctx.identity = Some(id),
            Err(f) => {
                crate::metrics::AUTH_FAILURES
                    .with_label_values(&[f.label()])
                    .inc();
                return Err(f.api_error());
            }
        }
        if access == Access::Admin && !ctx.identity.as_ref().is_some_and(|i| i.is_admin()) {
            return Err(ApiError::forbidden());
        }
    }

    if has_body(session) {
        ctx.body = Some(read_body(session, app.cfg.max_body_bytes).await?);
    }

    if let Some(cf) = ctx.route.chatflow().map(str::to_string) {
        check_chatflow_access(app, ctx, &cf).await?;
        ctx.chatflow_id = Some(cf);
    }

    if ctx.route.is_prediction() {
        predict::run(session, app, ctx).await?;
        return Ok(Next::Done);
    }
    if !ctx.route.is_pass_through() {
        let reply = api::handle(app, ctx).await?;
        respond::json(session, app, ctx, reply.status, reply.body, &reply.headers)
            .await
            .map_err(|_| ApiError::internal())?;
        return Ok(Next::Done);
    }
    let req_header = session.req_header().clone();
    if let Some(reply) = api::drop_in::check(app, ctx, &req_header).await? {
        respond::json(session, app, ctx, reply.status, reply.body, &reply.headers)
            .await
            .map_err(|_| ApiError::internal())?;
        return Ok(Next::Done);
    }
    if let Some(body) = ctx.body.clone() {
        let mut req = session.req_header().clone();
        rewrite_pass_through(app, &mut req, ctx).map_err(|_| ApiError::internal())?;
        relay::relay(session, app, ctx, req, body).await?;
        return Ok(Next::Done);
    }
    Ok(Next::Proxy)
}

/// Grant check: unknown chatflow 404, not granted 403 (see `Auth::check_chatflow`).
pub async fn check_chatflow_access(
    app: &App,
    ctx: &Ctx,
    chatflow_id: &str,
) -> Result<(), ApiError> {
    let Some(who) = &ctx.identity else {
        return Ok(()); // open routes (chatflows-streaming) carry no grant
    };
    app.auth.check_chatflow(&app.db, who, chatflow_id).await
}

fn has_body(session: &Session) -> bool {
    let h = &session.req_header().headers;
    h.get("transfer-encoding").is_some()
        || h.get("content-length")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// Reads the whole request body, refusing more than `limit` bytes (declared or
/// actually sent, chunked included). Flowise never sees a truncated body: it sees
/// nothing until the body is complete.
async fn read_body(session: &mut Session, limit: usize) -> Result<Bytes, ApiError> {
    let declared = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().parse::<usize>());
    match declared {
        Some(Ok(n)) if n > limit => return Err(ApiError::body_too_large()),
        Some(Err(_)) => {
            return Err(ApiError::new(
                400,
                "invalid_request",
                "Invalid Content-Length",
            ))
        }
        _ => {}
    }
    let mut buf = BytesMut::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(60), session.read_request_body())
            .await
            .map_err(|_| {
                ApiError::new(408, "request_timeout", "Request body not received in time")
            })?
            .map_err(|_| {
                ApiError::new(400, "invalid_request", "Could not read the request body")
            })?;
        match chunk {
            Some(c) => {
                if buf.len() + c.len() > limit {
                    return Err(ApiError::body_too_large());
                }
                buf.extend_from_slice(&c);
            }
            None => return Ok(buf.freeze()),
        }
    }
}

/// Adjusts a pass-through request: a user's chat message query is limited to
/// their own conversation.
pub fn rewrite_pass_through(_app: &App, req: &mut RequestHeader, ctx: &Ctx) -> Result<()> {
    if let (Route::FlowiseChatMessage(_), Some(session_id)) = (&ctx.route, &ctx.forced_session) {
        let path = req.uri.path().to_string();
        let uri = format!("{path}?chatId={}", urlencode(session_id));
        req.set_uri(
            uri.parse()
                .map_err(|_| Error::new_str("bad rewritten uri"))?,
        );
    }
    Ok(())
}

pub fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `logging`: settle the hold, record metrics, write the access-log line.
pub fn finish(app: &App, session: &Session, e: Option<&Error>, ctx: &mut Ctx) {
    if let Some(hold) = ctx.hold.take() {
        ctx.credits_charged = Some(app.ledger.settle(&hold, &ctx.upstream));
    }
    let status = ctx
        .status
        .or_else(|| session.response_written().map(|h| h.status.as_u16()))
        .unwrap_or(if e.is_some() { 502 } else { 0 });
    let route = ctx.route.name();
    let elapsed = ctx.started.elapsed();
    crate::metrics::REQUESTS
        .with_label_values(&[
            route,
            method_label(&ctx.method),
            crate::metrics::status_class(status),
        ])
        .inc();
    crate::metrics::REQUEST_SECONDS
        .with_label_values(&[route])
        .observe(elapsed.as_secs_f64());
    if ctx.counted {
        crate::metrics::IN_FLIGHT.dec();
        ctx.counted = false;
    }
    crate::access_log::write(
        app.cfg.log_json,
        &crate::access_log::Line {
            request_id: &ctx.request_id,
            method: &ctx.method,
            route,
            status,
            user_id: ctx.user_id(),
            chatflow_id: ctx.chatflow_id.as_deref(),
            credits_charged: ctx.credits_charged,
            upstream_status: ctx.upstream.status,
            upstream_error: ctx.upstream_failure,
            bytes_sent: session.body_bytes_sent(),
            duration: elapsed,
        },
    );
}

fn method_label(m: &str) -> &'static str {
    match m {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    }
}
