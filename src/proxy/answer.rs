//! How Flowise's answer is passed on: one header policy and one error mapping
//! for every route, and the observation of predictions for settlement.
//!
//! * Drop-in routes (`/api/v1/...`): Flowise's status and body shape pass
//!   through (its clients expect them), except that a JSON error body loses
//!   its `stack` field.
//! * The proxy's own routes (`/chat/*`, `/chatflows/*`): a Flowise failure
//!   becomes the contract's `{"detail","code"}` (502 `upstream_error`), and an
//!   `error` event in a stream loses Flowise's internal message.
//! * Predictions: streams are observed as they pass (usage, session id,
//!   errors, whether they ended); JSON answers are passed on and a bounded copy
//!   is observed at the end.
//! * Some own routes reshape Flowise's JSON (history, public config, the
//!   granted part of the chatflow list): collected (bounded), rewritten at the
//!   end and sent chunked.

use bytes::{Bytes, BytesMut};
use pingora_http::ResponseHeader;
use serde_json::Value;

use super::ctx::Ctx;
use super::respond;
use crate::app::App;
use crate::errors::ApiError;
use crate::route::Route;
use crate::upstream::sse::{ErrorRedactor, Observation, StreamObserver};

/// Largest answer collected to be rewritten or observed whole.
const MAX_COLLECTED: usize = 32 << 20;

#[derive(Default)]
pub enum Answer {
    /// Bytes pass as they come.
    #[default]
    Pass,
    /// A prediction's event stream: passed on, observed; on own routes its
    /// error events are redacted.
    Stream {
        observer: Box<StreamObserver>,
        redactor: Option<ErrorRedactor>,
    },
    /// A prediction's JSON answer: passed on, a copy observed at the end.
    Json(BytesMut),
    /// Collected and rewritten at the end.
    Rewrite { buf: BytesMut, how: Rewrite },
    /// Flowise's body is dropped and this one sent instead.
    Replace(Bytes),
}

#[derive(Clone, Copy)]
pub enum Rewrite {
    /// A drop-in JSON error without its `stack`.
    StripStack,
    /// `GET /api/v1/chatflows` cut down to the caller's grants.
    GrantedChatflows,
    /// `GET /chatflows/{id}/config` without `flowData`.
    PublicConfig,
    /// `GET /chat/sessions/{id}/history` in the seed API's shape.
    History,
}

impl Answer {
    pub fn is_stream(&self) -> bool {
        matches!(self, Answer::Stream { .. })
    }
}

/// `response_filter`: decide how the answer is passed on and apply the header policy.
pub fn on_header(app: &App, resp: &mut ResponseHeader, ctx: &mut Ctx) {
    let status = resp.status.as_u16();
    ctx.upstream.status = Some(status);
    if let Some(sent) = ctx.upstream_sent {
        crate::metrics::TTFB_SECONDS
            .with_label_values(&[ctx.route.name()])
            .observe(sent.elapsed().as_secs_f64());
    }
    respond::sanitize_upstream_headers(resp);
    respond::decorate(app, ctx, resp);

    let ok = (200..300).contains(&status);
    let content_type = resp
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .as_bytes();
    // Case-insensitive, without a lower-cased copy per response.
    let is_json = content_type
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"json"));
    let is_event_stream = content_type
        .get(..17)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"text/event-stream"));
    let own_route = !ctx.route.is_drop_in();
    // A bodiless answer has no chunk to replace or rewrite.
    let empty = resp
        .headers
        .get("content-length")
        .is_some_and(|v| v.as_bytes() == b"0");
    ctx.answer = if empty {
        Answer::Pass
    } else if !ok && own_route {
        Answer::Replace(Bytes::from(own_route_error(&ctx.route, status).body()))
    } else if !ok {
        if is_json {
            Answer::Rewrite {
                buf: BytesMut::new(),
                how: Rewrite::StripStack,
            }
        } else {
            Answer::Pass
        }
    } else if ctx.route.is_prediction() {
        if is_event_stream {
            Answer::Stream {
                observer: Box::default(),
                redactor: own_route.then(ErrorRedactor::default),
            }
        } else {
            Answer::Json(BytesMut::new())
        }
    } else {
        match ctx.route {
            Route::SessionHistory(_) => rewrite(Rewrite::History),
            Route::ChatflowConfig(_) => rewrite(Rewrite::PublicConfig),
            Route::FlowiseChatflows if !is_admin(ctx) => rewrite(Rewrite::GrantedChatflows),
            _ => Answer::Pass,
        }
    };

    match &ctx.answer {
        Answer::Replace(body) => {
            let e = own_route_error(&ctx.route, status);
            let _ = resp.set_status(e.status);
            resp.remove_header("transfer-encoding");
            let _ = resp.insert_header("Content-Type", "application/json");
            let _ = resp.insert_header("Content-Length", body.len().to_string());
            let _ = resp.insert_header("Cache-Control", "no-store");
        }
        Answer::Rewrite { .. } => {
            resp.remove_header("content-length");
            let _ = resp.insert_header("Transfer-Encoding", "chunked");
        }
        Answer::Stream { .. } => {
            crate::metrics::IN_FLIGHT_STREAMS.inc();
            if own_route {
                // Redacting changes lengths; streams are chunked anyway.
                resp.remove_header("content-length");
                let _ = resp.insert_header("Transfer-Encoding", "chunked");
            }
        }
        _ => {}
    }
    if ctx.route.is_prediction() {
        credit_headers(resp, ctx, ok);
    }
}

fn rewrite(how: Rewrite) -> Answer {
    Answer::Rewrite {
        buf: BytesMut::new(),
        how,
    }
}

fn is_admin(ctx: &Ctx) -> bool {
    ctx.identity.as_ref().is_some_and(|i| i.is_admin())
}

/// What a Flowise failure is on the proxy's own routes.
fn own_route_error(route: &Route, status: u16) -> ApiError {
    match (route, status) {
        // Flowise answers 404 (or 500 in older versions) for an unknown chatflow.
        (Route::ChatflowConfig(_), 404 | 500) => ApiError::not_found(),
        (_, 504) => ApiError::upstream_timeout(),
        _ => ApiError::upstream_error(),
    }
}

/// `X-Credits-Remaining` (after the hold) on every debited answer;
/// `X-Credits-Charged` on JSON answers whose price is known before the body:
/// a failure (0) or a flat price. A usage-priced answer's charge depends on
/// the usage inside its body, written after this header; it is in the ledger.
fn credit_headers(resp: &mut ResponseHeader, ctx: &Ctx, ok: bool) {
    let Some(hold) = &ctx.hold else {
        return;
    };
    let _ = resp.insert_header("X-Credits-Remaining", hold.available_after.to_string());
    if ctx.answer.is_stream() {
        return;
    }
    if !ok {
        let _ = resp.insert_header("X-Credits-Charged", "0");
    } else if hold.price.per_1k_tokens.is_none() {
        let _ = resp.insert_header("X-Credits-Charged", hold.price.flat.to_string());
    }
}

/// `response_body_filter`: pass, observe or rewrite one chunk.
pub fn on_body(app: &App, body: &mut Option<Bytes>, end: bool, ctx: &mut Ctx) {
    if end {
        ctx.upstream.completed = true;
    }
    match &mut ctx.answer {
        Answer::Pass => {}
        Answer::Stream { observer, redactor } => {
            if let Some(b) = body.as_ref() {
                observer.feed(b);
            }
            if let Some(r) = redactor {
                let chunk = body.take().unwrap_or_default();
                *body = Some(Bytes::from(r.filter(&chunk, end)));
            }
            if end {
                ctx.upstream.seen = observer.seen.clone();
            }
        }
        Answer::Json(copy) => {
            if let Some(b) = body.as_ref() {
                if copy.len() + b.len() <= MAX_COLLECTED {
                    copy.extend_from_slice(b);
                }
            }
            if end {
                let status = ctx.upstream.status.unwrap_or(0);
                ctx.upstream.seen = Observation::from_json_body(status, copy);
            }
        }
        Answer::Replace(ours) => {
            *body = end.then(|| ours.clone());
        }
        Answer::Rewrite { buf, how } => {
            if let Some(b) = body.take() {
                if buf.len() + b.len() <= MAX_COLLECTED {
                    buf.extend_from_slice(&b);
                }
            }
            if end {
                let how = *how;
                let whole = std::mem::take(buf);
                *body = Some(Bytes::from(rewritten(app, ctx, how, &whole)));
            }
        }
    }
}

fn rewritten(app: &App, ctx: &Ctx, how: Rewrite, raw: &[u8]) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<Value>(raw) else {
        return match how {
            Rewrite::StripStack => raw.to_vec(),
            _ => ApiError::upstream_error().body(),
        };
    };
    match (how, &ctx.route) {
        (Rewrite::StripStack, _) => {
            if let Value::Object(m) = &mut v {
                m.remove("stack");
            }
        }
        (Rewrite::PublicConfig, _) => {
            if let Value::Object(m) = &mut v {
                // The flow's internals (nodes, credential ids, prompts) stay private.
                m.remove("flowData");
            }
        }
        (Rewrite::History, Route::SessionHistory(id)) => {
            v = crate::api::chat::history(id, ctx.chatflow_id.as_deref().unwrap_or(""), v);
        }
        (Rewrite::GrantedChatflows, _) => {
            let Some(who) = &ctx.identity else {
                return ApiError::forbidden().body();
            };
            let snap = app.auth.snapshot.get();
            crate::api::drop_in::keep_granted(&mut v, |id| {
                snap.is_granted(who.user_id, id) && snap.chatflow(id).is_some()
            });
        }
        _ => {}
    }
    serde_json::to_vec(&v).unwrap_or_default()
}
