//! Writing responses ourselves: JSON for the proxy's own endpoints and errors,
//! and the header policy for everything relayed from Flowise.

use bytes::Bytes;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::ctx::Ctx;
use crate::app::App;
use crate::errors::ApiError;
use crate::upstream::STRIP_DOWNSTREAM;

/// Headers every response gets: the request id and, when allowed, CORS.
pub fn decorate(app: &App, ctx: &Ctx, h: &mut ResponseHeader) {
    let _ = h.insert_header("X-Request-Id", ctx.request_id.as_str());
    cors(app, ctx, h);
}

fn cors(app: &App, ctx: &Ctx, h: &mut ResponseHeader) {
    let Some(origin) = ctx.origin.as_deref() else {
        return;
    };
    let allowed = &app.cfg.cors_allowed_origins;
    if allowed.iter().any(|o| o == origin) {
        let _ = h.insert_header("Access-Control-Allow-Origin", origin);
        let _ = h.insert_header("Access-Control-Allow-Credentials", "true");
        let _ = h.append_header("Vary", "Origin");
    } else if allowed.iter().any(|o| o == "*") {
        // `*` is never combined with credentials.
        let _ = h.insert_header("Access-Control-Allow-Origin", "*");
    }
    let _ = h.insert_header(
        "Access-Control-Expose-Headers",
        "X-Request-Id, X-Credits-Remaining, X-Credits-Charged",
    );
}

/// Flowise's own CORS answer is replaced by ours.
const STRIP_FLOWISE_CORS: &[&str] = &[
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-allow-methods",
    "access-control-allow-headers",
];

/// Removes what Flowise says that clients must not see (one pass over the
/// headers Flowise sent, not one lookup per name).
pub fn sanitize_upstream_headers(h: &mut ResponseHeader) {
    let mut doomed = crate::upstream::names_to_strip(&h.headers, STRIP_DOWNSTREAM, false);
    doomed.extend(crate::upstream::names_to_strip(
        &h.headers,
        STRIP_FLOWISE_CORS,
        false,
    ));
    for name in &doomed {
        h.remove_header(name);
    }
}

pub async fn json(
    session: &mut Session,
    app: &App,
    ctx: &mut Ctx,
    status: u16,
    body: Vec<u8>,
    extra: &[(&str, String)],
) -> pingora_core::Result<()> {
    let mut h = ResponseHeader::build(status, Some(6))?;
    h.insert_header("Content-Type", "application/json")?;
    h.insert_header("Content-Length", body.len().to_string())?;
    h.insert_header("Cache-Control", "no-store")?;
    for (k, v) in extra {
        h.insert_header(k.to_string(), v.as_str())?;
    }
    decorate(app, ctx, &mut h);
    ctx.status = Some(status);
    session.write_response_header(Box::new(h), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await?;
    Ok(())
}

pub async fn error(
    session: &mut Session,
    app: &App,
    ctx: &mut Ctx,
    e: &ApiError,
) -> pingora_core::Result<()> {
    let mut extra = Vec::new();
    if let Some(s) = e.retry_after {
        extra.push(("Retry-After", s.to_string()));
    }
    if e.status == 405 {
        extra.push(("Allow", "GET, POST, PATCH, DELETE, OPTIONS".to_string()));
    }
    json(session, app, ctx, e.status, e.body(), &extra).await
}

/// CORS preflight: 204 for allowed origins, 403 otherwise.
pub async fn preflight(
    session: &mut Session,
    app: &App,
    ctx: &mut Ctx,
) -> pingora_core::Result<()> {
    let origin_ok = ctx.origin.as_deref().is_some_and(|o| {
        app.cfg
            .cors_allowed_origins
            .iter()
            .any(|a| a == o || a == "*")
    });
    if !origin_ok {
        return error(session, app, ctx, &ApiError::forbidden()).await;
    }
    let mut h = ResponseHeader::build(204, Some(6))?;
    h.insert_header(
        "Access-Control-Allow-Methods",
        "GET,HEAD,PUT,PATCH,POST,DELETE",
    )?;
    let req_headers = session
        .req_header()
        .headers
        .get("access-control-request-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("content-type,authorization")
        .chars()
        .take(512)
        .collect::<String>();
    h.insert_header("Access-Control-Allow-Headers", req_headers)?;
    h.insert_header("Access-Control-Max-Age", "600")?;
    h.insert_header("Content-Length", "0")?;
    decorate(app, ctx, &mut h);
    ctx.status = Some(204);
    session.write_response_header(Box::new(h), true).await?;
    Ok(())
}
