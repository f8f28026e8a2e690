//! A debited prediction, seed (`POST /chat/predict`) or drop-in
//! (`POST /api/v1/prediction/{id}`): validate, bind the conversation, hold the
//! price, relay. Settlement happens in `logging` (see `ledger`).

use bytes::Bytes;
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use serde_json::{Map, Value};

use super::ctx::Ctx;
use super::route::Route;
use super::{pipeline, relay};
use crate::app::App;
use crate::errors::ApiError;
use crate::ledger::{Admission, Price};
use crate::sessions::valid_session_id;

pub async fn run(session: &mut Session, app: &App, ctx: &mut Ctx) -> Result<(), ApiError> {
    let who = ctx.identity.clone().ok_or_else(ApiError::unauthorized)?;
    let raw = ctx.body.clone().unwrap_or_default();
    let (chatflow_id, upstream_body, conversation) = match &ctx.route {
        Route::FlowisePrediction(id) => {
            // Drop-in: Flowise's body goes through byte-identical.
            let v = parse_object(&raw, true)?;
            (id.clone(), raw, conversation_id(&v)?)
        }
        _ => {
            let v = parse_object(&raw, false)?;
            let (id, body, conv) = seed_to_flowise(v)?;
            (id, Bytes::from(body), conv)
        }
    };
    if ctx.chatflow_id.is_none() {
        pipeline::check_chatflow_access(app, ctx, &chatflow_id).await?;
        ctx.chatflow_id = Some(chatflow_id.clone());
    }

    // The conversation must be the caller's (or new): refused before any charge.
    if let Some(conv) = &conversation {
        match app
            .sessions
            .claim(&app.db, conv, who.user_id, &chatflow_id)
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(ApiError::forbidden()),
            Err(_) => return Err(ApiError::ledger_unavailable()),
        }
    }

    let price = {
        let snap = app.auth.snapshot.get();
        Price::of(snap.chatflow(&chatflow_id), app.cfg.default_credit_cost)
    };
    match app
        .ledger
        .admit(who.user_id, &chatflow_id, &ctx.request_id, price)
        .await
    {
        Ok(Admission::Held(hold)) => ctx.hold = Some(hold),
        Ok(Admission::Free) => {}
        Ok(Admission::Insufficient) => return Err(ApiError::insufficient_credits()),
        Err(_) => return Err(ApiError::ledger_unavailable()),
    }

    let path = format!("/api/v1/prediction/{chatflow_id}");
    let mut req =
        RequestHeader::build("POST", path.as_bytes(), None).map_err(|_| ApiError::internal())?;
    req.insert_header("Content-Type", "application/json")
        .map_err(|_| ApiError::internal())?;
    req.insert_header("Accept", accept_of(session))
        .map_err(|_| ApiError::internal())?;
    relay::relay(session, app, ctx, req, upstream_body).await?;

    // A conversation Flowise started: bind it to its owner.
    if conversation.is_none() {
        if let Some(learned) = ctx.upstream.seen.session_id.clone() {
            if valid_session_id(&learned) {
                // The answer is out already; a failed bind leaves the session
                // unbound until its owner's next request claims it.
                if let Err(e) = app
                    .sessions
                    .claim(&app.db, &learned, who.user_id, &chatflow_id)
                    .await
                {
                    log::warn!("binding a new Flowise session failed: {e}");
                }
            }
        }
    }
    Ok(())
}

fn accept_of(session: &Session) -> String {
    session
        .req_header()
        .headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 256)
        .unwrap_or("*/*")
        .to_string()
}

/// Parses a JSON object body. Flowise accepts an empty body as `{}`.
fn parse_object(raw: &[u8], empty_ok: bool) -> Result<Map<String, Value>, ApiError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return if empty_ok {
            Ok(Map::new())
        } else {
            Err(ApiError::invalid_json("A JSON body is required"))
        };
    }
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::validation("The body must be a JSON object")),
        Err(_) => Err(ApiError::invalid_json("The body is not valid JSON")),
    }
}

/// The conversation id a prediction names, if any: `chatId`, `sessionId` or
/// `overrideConfig.sessionId`.
fn conversation_id(v: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    let candidates = [
        v.get("chatId"),
        v.get("sessionId"),
        v.get("overrideConfig").and_then(|o| o.get("sessionId")),
    ];
    let mut found: Option<String> = None;
    for c in candidates.into_iter().flatten() {
        match c {
            Value::Null => {}
            Value::String(s) if s.is_empty() => {}
            Value::String(s) if valid_session_id(s) => match &found {
                Some(f) if f != s => {
                    return Err(ApiError::validation(
                        "chatId and sessionId name different conversations",
                    ))
                }
                _ => found = Some(s.clone()),
            },
            _ => return Err(ApiError::validation("Invalid conversation id")),
        }
    }
    Ok(found)
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
