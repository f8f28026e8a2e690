//! Drop-in mode: the checks Flowise's own API needs when it is reached through
//! the proxy, and the answers we must filter.

use futures::StreamExt;
use pingora_http::RequestHeader;
use serde_json::Value;

use super::{flowise_call, ApiResult, Reply};
use crate::app::App;
use crate::errors::ApiError;
use crate::proxy::pipeline_check_chatflow;
use crate::proxy::route::Route;
use crate::proxy::Ctx;

fn query_param(ctx: &Ctx, name: &str) -> Option<String> {
    url::form_urlencoded::parse(ctx.query.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Checks a pass-through request. `Some(reply)` answers it here instead.
pub async fn check(
    app: &App,
    ctx: &mut Ctx,
    _req: &RequestHeader,
) -> Result<Option<Reply>, ApiError> {
    let Some(who) = ctx.identity.clone() else {
        return Ok(None);
    };
    if who.is_admin() {
        return Ok(None);
    }
    match ctx.route.clone() {
        Route::FlowiseChatMessage(chatflow) => {
            let wanted = query_param(ctx, "chatId").or_else(|| query_param(ctx, "sessionId"));
            match wanted {
                Some(id) => {
                    let owned = app.sessions.owned(&app.db, &id, who.user_id).await?;
                    if owned.as_deref() != Some(chatflow.as_str()) {
                        return Err(ApiError::forbidden());
                    }
                    ctx.forced_session = Some(id);
                    Ok(None)
                }
                None => Ok(Some(own_messages(app, ctx, &chatflow, who.user_id).await?)),
            }
        }
        Route::FlowiseAttachments(chatflow, chat) => {
            if !app
                .sessions
                .claim(&app.db, &chat, who.user_id, &chatflow)
                .await?
            {
                return Err(ApiError::forbidden());
            }
            Ok(None)
        }
        Route::FlowiseUploadFile => {
            let chatflow = query_param(ctx, "chatflowId")
                .ok_or_else(|| ApiError::validation("chatflowId is required"))?;
            let chat = query_param(ctx, "chatId")
                .ok_or_else(|| ApiError::validation("chatId is required"))?;
            pipeline_check_chatflow(app, ctx, &chatflow).await?;
            let owned = app.sessions.owned(&app.db, &chat, who.user_id).await?;
            if owned.as_deref() != Some(chatflow.as_str()) {
                return Err(ApiError::forbidden());
            }
            ctx.chatflow_id = Some(chatflow);
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// Without a session filter, a user gets the messages of their own sessions of
/// that chatflow, never everyone's: one Flowise call per session, a few at a
/// time (in sequence, 23 sessions took 2 s against 0.08 s for Flowise alone).
async fn own_messages(app: &App, ctx: &Ctx, chatflow: &str, user_id: i64) -> ApiResult {
    const PARALLEL_READS: usize = 8;
    let ids = crate::store::sessions::ids_of_chatflow(&app.db, user_id, chatflow, 100).await?;
    let reads = futures::stream::iter(ids)
        .map(|id| async move {
            let path = format!(
                "/api/v1/chatmessage/{chatflow}?chatId={}",
                crate::proxy::route_urlencode(&id)
            );
            flowise_call(app, ctx, "GET", &path).await
        })
        .buffered(PARALLEL_READS)
        .collect::<Vec<_>>()
        .await;
    let mut out = Vec::new();
    for read in reads {
        let (status, body) = read?;
        if (200..300).contains(&status) {
            if let Ok(Value::Array(rows)) = serde_json::from_slice::<Value>(&body) {
                out.extend(rows);
            }
        }
    }
    Ok(Reply::ok(Value::Array(out)))
}

/// `GET /api/v1/chatflows`: Flowise's list in Flowise's row shape, cut down to
/// the caller's grants.
pub async fn chatflows(app: &App, ctx: &Ctx) -> ApiResult {
    let who = ctx.identity.as_ref().ok_or_else(ApiError::unauthorized)?;
    let path = match ctx.query.as_deref() {
        Some(q) => format!("/api/v1/chatflows?{q}"),
        None => "/api/v1/chatflows".to_string(),
    };
    let (status, body) = flowise_call(app, ctx, "GET", &path).await?;
    if !(200..300).contains(&status) {
        return Err(ApiError::upstream_error());
    }
    if who.is_admin() {
        return Ok(Reply::raw_json(200, body.to_vec()));
    }
    let snap = app.auth.snapshot.get();
    let keep = |row: &Value| {
        row.get("id")
            .and_then(Value::as_str)
            .is_some_and(|id| snap.is_granted(who.user_id, id) && snap.chatflow(id).is_some())
    };
    let mut v: Value = serde_json::from_slice(&body).map_err(|_| ApiError::upstream_error())?;
    match &mut v {
        Value::Array(rows) => rows.retain(keep),
        Value::Object(m) => {
            if let Some(Value::Array(rows)) = m.get_mut("data") {
                rows.retain(keep);
                let n = rows.len();
                m.insert("total".into(), Value::from(n));
            }
        }
        _ => return Err(ApiError::upstream_error()),
    }
    Ok(Reply::ok(v))
}
