//! Admission of a debited prediction, seed (`POST /chat/predict`) or drop-in
//! (`POST /api/v1/prediction/{id}`): validate, check the conversation is the
//! caller's, hold the price. Nothing here talks to Flowise: Pingora's proxy loop
//! carries the request, and `logging` settles the hold (see `ledger`).

use bytes::{Bytes, BytesMut};
use pingora_proxy::Session;
use serde_json::{Map, Value};

use super::body::{conversation_id, parse_object, FormInspector, RequestBody, SEED_BODY_LIMIT};
use super::ctx::Ctx;
use super::pipeline;
use crate::app::App;
use crate::errors::ApiError;
use crate::ledger::{Admission, Price};

/// The seed route: its body names the chatflow, so it is read here (see
/// `body.rs` for why, and why it is bounded by `SEED_BODY_LIMIT`).
pub async fn admit_seed(app: &App, session: &mut Session, ctx: &mut Ctx) -> Result<(), ApiError> {
    // Pingora replays what is read here from its retry buffer; enabled before
    // the first read, or nothing would be kept.
    session.as_mut().enable_retry_buffering();
    let raw = pipeline::read_body(session, SEED_BODY_LIMIT.min(app.cfg.max_body_bytes))
        .await
        .map_err(|e| {
            if e.code == "body_too_large" {
                ApiError::new(
                    413,
                    "body_too_large",
                    "A /chat/predict body is limited to 64 KiB; send files through \
                     POST /api/v1/prediction/{id} (multipart), which streams them",
                )
            } else {
                e
            }
        })?;
    let v = parse_object(&raw, false)?;
    let (chatflow_id, body, conversation) = seed_to_flowise(v)?;
    crate::access::check_chatflow(app, ctx.identity.as_ref(), &chatflow_id).await?;
    ctx.chatflow_id = Some(chatflow_id.clone());
    if let Some(conv) = &conversation {
        claim_conversation(app, ctx, conv).await?;
    }
    ctx.conversation = conversation;
    hold(app, ctx).await?;
    ctx.upstream_path = Some(format!("/api/v1/prediction/{chatflow_id}"));
    ctx.upstream_body = RequestBody::Replace(Bytes::from(body));
    Ok(())
}

/// The drop-in route: the chatflow is in the path, so the hold is placed
/// before Flowise is connected; the body (JSON or a multipart form) is checked
/// as it passes, in `request_body_filter`.
pub async fn admit_drop_in(app: &App, session: &Session, ctx: &mut Ctx) -> Result<(), ApiError> {
    let content_type = session
        .req_header()
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    ctx.upstream_body = if content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        let form = FormInspector::for_content_type(content_type)
            .ok_or_else(|| ApiError::invalid_json("The multipart form has no boundary"))?;
        RequestBody::Form(Box::new(form))
    } else {
        RequestBody::Json(BytesMut::new())
    };
    hold(app, ctx).await
}

/// The body has been seen whole: the conversation it names must be the
/// caller's (or new) before its last byte is released to Flowise.
pub async fn body_complete(
    app: &App,
    ctx: &mut Ctx,
    conversation: Option<String>,
) -> Result<(), ApiError> {
    if let Some(conv) = &conversation {
        claim_conversation(app, ctx, conv).await?;
    }
    ctx.conversation = conversation;
    Ok(())
}

async fn claim_conversation(app: &App, ctx: &Ctx, conversation: &str) -> Result<(), ApiError> {
    let who = ctx.identity.as_ref().ok_or_else(ApiError::unauthorized)?;
    let chatflow = ctx.chatflow_id.as_deref().unwrap_or("");
    match app
        .sessions
        .claim(&app.db, conversation, who.user_id, chatflow)
        .await
    {
        Ok(true) => Ok(()),
        Ok(false) => Err(ApiError::forbidden()),
        Err(_) => Err(ApiError::ledger_unavailable()),
    }
}

async fn hold(app: &App, ctx: &mut Ctx) -> Result<(), ApiError> {
    let who = ctx.identity.as_ref().ok_or_else(ApiError::unauthorized)?;
    let chatflow = ctx.chatflow_id.clone().unwrap_or_default();
    let price = {
        let snap = app.auth.snapshot.get();
        Price::of(snap.chatflow(&chatflow), app.cfg.default_credit_cost)
    };
    match app
        .ledger
        .admit(who.user_id, &chatflow, &ctx.request_id, price)
        .await
    {
        Ok(Admission::Held(h)) => ctx.hold = Some(h),
        Ok(Admission::Free) => {}
        Ok(Admission::Insufficient) => return Err(ApiError::insufficient_credits()),
        Err(_) => return Err(ApiError::ledger_unavailable()),
    }
    Ok(())
}

/// A conversation Flowise started: bind it to its owner (in `logging`, once
/// the answer told us its id).
pub fn bind_new_conversation(app: &App, ctx: &Ctx) {
    if ctx.conversation.is_some() {
        return;
    }
    let (Some(who), Some(chatflow), Some(learned)) = (
        ctx.identity.as_ref(),
        ctx.chatflow_id.as_deref(),
        ctx.upstream.seen.session_id.as_deref(),
    ) else {
        return;
    };
    if !crate::sessions::valid_session_id(learned) {
        return;
    }
    // The answer is out already: the binding is written with the next
    // settlement batch. Until then the session is unbound, and its owner's
    // next request claims it.
    app.ledger.bind_conversation(who.user_id, learned, chatflow);
}

/// Maps the seed API body onto Flowise's prediction body.
fn seed_to_flowise(v: Map<String, Value>) -> Result<(String, Vec<u8>, Option<String>), ApiError> {
    let chatflow_id = match v.get("chatflow_id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => s.clone(),
        _ => return Err(ApiError::validation("chatflow_id is required")),
    };
    let question = match v.get("question") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => return Err(ApiError::validation("question is required")),
    };
    let mut out = Map::new();
    out.insert("question".into(), Value::String(question));
    for key in ["overrideConfig", "history", "uploads"] {
        if let Some(x) = v.get(key).filter(|x| !x.is_null()) {
            let ok = match key {
                "overrideConfig" => x.is_object(),
                _ => x.is_array(),
            };
            if !ok {
                return Err(ApiError::validation(format!("{key} has the wrong type")));
            }
            out.insert(key.into(), x.clone());
        }
    }
    match v.get("streaming") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => {
            out.insert("streaming".into(), Value::Bool(*b));
        }
        Some(_) => return Err(ApiError::validation("streaming must be true or false")),
    }
    let conversation = conversation_id(&v)?;
    if let Some(c) = &conversation {
        out.insert("chatId".into(), Value::String(c.clone()));
        let oc = out
            .entry("overrideConfig")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = oc {
            m.insert("sessionId".into(), Value::String(c.clone()));
        }
    }
    let body = serde_json::to_vec(&Value::Object(out)).map_err(|_| ApiError::internal())?;
    Ok((chatflow_id, body, conversation))
}
