//! What `request_filter` and `logging` do, step by step.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora_core::{Error, Result};
use pingora_proxy::Session;

use super::body::{BodyFlow, RequestBody, Seen};
use super::ctx::Ctx;
use super::flowise_route::{self, FlowiseCall};
use super::{predict, respond};
use crate::api;
use crate::app::App;
use crate::errors::ApiError;
use crate::route::{Access, Route, Serve};
use crate::upstream::client::UpstreamFailure;
use pingora_core::ErrorType;
use pingora_http::RequestHeader;

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
    ctx.method = req.method.clone();
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
        .map_or_else(new_request_id, str::to_string);
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

/// A random (version 4) UUID, from the thread's generator (uuid's
/// `fast-rng`: without it every UUID is a `getrandom` system call).
fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
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
    check_declared_length(session, app.cfg.max_body_bytes)?;

    if let Some(cf) = ctx.route.chatflow().map(str::to_string) {
        crate::access::check_chatflow(app, ctx.identity.as_ref(), &cf).await?;
        ctx.chatflow_id = Some(cf);
    }

    match ctx.route.serve() {
        Serve::Own => {
            if has_body(session) {
                ctx.body = Some(read_body(session, app.cfg.max_body_bytes).await?);
            }
            let reply = api::handle(app, &call_of(ctx)).await?;
            respond::json(session, app, ctx, reply.status, reply.body, &reply.headers)
                .await
                .map_err(|_| ApiError::internal())?;
            Ok(Next::Done)
        }
        Serve::SeedPrediction => {
            predict::admit_seed(app, session, ctx).await?;
            Ok(Next::Proxy)
        }
        Serve::DropInPrediction => {
            predict::admit_drop_in(app, session, ctx).await?;
            Ok(Next::Proxy)
        }
        Serve::Flowise => match flowise_route::decide(app, ctx).await? {
            FlowiseCall::Forward(path) => {
                ctx.upstream_path = path;
                Ok(Next::Proxy)
            }
            FlowiseCall::Answered(reply) => {
                respond::json(session, app, ctx, reply.status, reply.body, &reply.headers)
                    .await
                    .map_err(|_| ApiError::internal())?;
                Ok(Next::Done)
            }
        },
    }
}

/// The typed request a handler in `api/` sees.
pub fn call_of(ctx: &Ctx) -> api::Call {
    api::Call {
        route: ctx.route.clone(),
        identity: ctx.identity.clone(),
        query: ctx.query.clone(),
        body: ctx.body.clone(),
        client_ip: ctx.client_ip.clone(),
        request_id: ctx.request_id.clone(),
    }
}

fn has_body(session: &Session) -> bool {
    let h = &session.req_header().headers;
    h.get("transfer-encoding").is_some()
        || h.get("content-length")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// A declared `Content-Length` over the limit is refused before anything else.
fn check_declared_length(session: &Session, limit: usize) -> Result<(), ApiError> {
    let declared = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().parse::<usize>());
    match declared {
        Some(Ok(n)) if n > limit => Err(ApiError::body_too_large()),
        Some(Err(_)) => Err(ApiError::new(
            400,
            "invalid_request",
            "Invalid Content-Length",
        )),
        _ => Ok(()),
    }
}

/// Reads a whole request body that the proxy answers itself (or the seed
/// prediction's), refusing more than `limit` bytes, declared or sent.
pub async fn read_body(session: &mut Session, limit: usize) -> Result<Bytes, ApiError> {
    check_declared_length(session, limit)?;
    let mut buf = BytesMut::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(60), session.read_request_body())
            .await
            .map_err(|_| {
                ApiError::new(408, "request_timeout", "Request body not received in time")
            })?
            .map_err(|e| match e.etype() {
                // REQUEST_BODY_TIMEOUT_MS passed (see `limits`).
                ErrorType::ReadTimedout => {
                    ApiError::new(408, "request_timeout", "Request body not received in time")
                }
                _ => ApiError::new(400, "invalid_request", "Could not read the request body"),
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

/// `upstream_request_filter`: the path Flowise is asked for and, for the
/// seed prediction, the length of its rewritten body.
pub fn upstream_request(req: &mut RequestHeader, ctx: &Ctx) -> Result<()> {
    if let Some(path) = &ctx.upstream_path {
        let uri = path
            .parse()
            .map_err(|_| Error::explain(ErrorType::InternalError, "bad upstream path"))?;
        req.set_uri(uri);
    }
    match &ctx.upstream_body {
        RequestBody::Replace(body) => {
            req.set_method(http::Method::POST);
            req.remove_header("transfer-encoding");
            req.remove_header("expect");
            req.insert_header("Content-Length", body.len().to_string())?;
            req.insert_header("Content-Type", "application/json")?;
        }
        _ if ctx.route.is_drop_in() => {}
        // Seed reads mapped onto a Flowise GET carry no body.
        _ => {
            req.set_method(http::Method::GET);
            req.remove_header("content-length");
            req.remove_header("transfer-encoding");
            req.remove_header("content-type");
        }
    }
    Ok(())
}

/// `request_body_filter`: limits while streaming; a prediction body is
/// checked before its last byte is released to Flowise.
pub async fn request_body(
    app: &App,
    body: &mut Option<Bytes>,
    end: bool,
    ctx: &mut Ctx,
) -> Result<()> {
    let mut flow = BodyFlow {
        plan: &mut ctx.upstream_body,
        received: &mut ctx.body_received,
        limit: app.cfg.max_body_bytes,
    };
    let outcome = match flow.chunk(body, end).await {
        Ok(Seen::Complete(conversation)) if ctx.route.serve() == Serve::DropInPrediction => {
            predict::body_complete(app, ctx, conversation).await
        }
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    outcome.map_err(|e| {
        ctx.body_error = Some(e);
        Error::explain(ErrorType::InvalidHTTPHeader, "request body refused")
    })
}

/// `fail_to_proxy`: the contract's error for a request that could not be
/// proxied; `None` when the client is gone (nothing to answer).
pub fn proxy_failure(e: &Error, ctx: &mut Ctx) -> Option<ApiError> {
    if let Some(refused) = ctx.body_error.take() {
        return Some(refused);
    }
    if crate::limits::is_first_byte_timeout(e) {
        // Flowise did not begin answering within UPSTREAM_FIRST_BYTE_TIMEOUT_MS.
        UpstreamFailure::Timeout.count();
        ctx.upstream_failure = Some(UpstreamFailure::Timeout.label());
        return Some(UpstreamFailure::Timeout.api_error());
    }
    if client_caused(e) {
        return None;
    }
    match e.esource() {
        pingora_core::ErrorSource::Upstream => Some(upstream_failed(e, ctx)),
        _ if matches!(e.etype(), ErrorType::ConnectNoRoute) => Some(upstream_failed(e, ctx)),
        _ => Some(ApiError::internal()),
    }
}

/// Whether a failed request was the client's doing (it went away, or broke
/// its own request): the access log and the metrics record it, and Pingora's
/// ERROR line for it is left out, one per closed browser tab would drown
/// the proxy's real errors. A first-byte timeout surfaces as a client read
/// error but is Flowise's: it stays.
pub fn client_caused(e: &Error) -> bool {
    *e.esource() == pingora_core::ErrorSource::Downstream
        && !crate::limits::is_first_byte_timeout(e)
}

fn upstream_failed(e: &Error, ctx: &mut Ctx) -> ApiError {
    let f = UpstreamFailure::from_error(e);
    // Connect failures were counted in `fail_to_connect`, one per attempt.
    if f != UpstreamFailure::Connect {
        f.count();
    }
    ctx.upstream_failure = Some(f.label());
    f.api_error()
}

/// `logging`: settle the hold, bind a new conversation, record metrics and
/// write the access-log line. Runs for every request, failures included.
pub async fn finish(app: &App, session: &Session, e: Option<&Error>, ctx: &mut Ctx) {
    if ctx.upstream.status.is_some() {
        match e.map(|e| e.esource()) {
            None => {}
            // The client went away (or could not be written to) after
            // Flowise began answering.
            Some(pingora_core::ErrorSource::Downstream) => ctx.upstream.client_left = true,
            // Flowise broke its answer off, or we could not pass it on.
            Some(_) => {
                ctx.upstream.broken = true;
                if ctx.upstream_failure.is_none() {
                    ctx.upstream_failure = Some("read");
                    crate::metrics::UPSTREAM_ERRORS
                        .with_label_values(&["read"])
                        .inc();
                }
            }
        }
        if let Some(sent) = ctx.upstream_sent {
            crate::metrics::UPSTREAM_SECONDS
                .with_label_values(&[ctx.route.name()])
                .observe(sent.elapsed().as_secs_f64());
        }
    }
    if ctx.answer.is_stream() {
        crate::metrics::IN_FLIGHT_STREAMS.dec();
    }
    if let Some(hold) = ctx.hold.take() {
        ctx.credits_charged = Some(app.ledger.settle(&hold, &ctx.upstream));
    }
    if ctx.route.is_prediction() && ctx.upstream.completed {
        predict::bind_new_conversation(app, ctx);
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
            method_label(ctx.method.as_str()),
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
    crate::access_log::write(&crate::access_log::Line {
        json: app.cfg.log_json,
        request_id: &ctx.request_id,
        method: ctx.method.as_str(),
        route,
        status,
        user_id: ctx.user_id(),
        chatflow_id: ctx.chatflow_id.as_deref(),
        credits_charged: ctx.credits_charged,
        upstream_status: ctx.upstream.status,
        upstream_error: ctx.upstream_failure,
        bytes_sent: session.body_bytes_sent(),
        duration: elapsed,
    });
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
