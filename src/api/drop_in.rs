//! Drop-in mode: the checks Flowise's own API needs when it is reached through
//! the proxy, and the answers we must filter.

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

/// How a request to a Flowise route goes on.
pub enum FlowiseCall {
    /// Through the proxy loop, to this path (and query) when not the client's own.
    Forward(Option<String>),
    /// Answered here.
    Answered(Reply),
}

/// Decides a request to a Flowise route: ownership of the conversation it
/// names, and the path Flowise is asked for.
pub async fn decide(app: &App, ctx: &mut Ctx) -> Result<FlowiseCall, ApiError> {
    let forward = |p: String| Ok(FlowiseCall::Forward(Some(p)));
    match ctx.route.clone() {
        Route::SessionHistory(id) => {
            return forward(super::chat::history_path(app, ctx, &id).await?)
        }
        Route::ChatflowConfig(id) => return forward(format!("/api/v1/public-chatbotConfig/{id}")),
        Route::FlowiseSecret => return Err(ApiError::forbidden()),
        _ => {}
    }
    let Some(who) = ctx.identity.clone() else {
        return Ok(FlowiseCall::Forward(None));
    };
    if who.is_admin() {
        return Ok(FlowiseCall::Forward(None));
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
                    // Only the checked conversation, whatever else the query said.
                    forward(format!(
                        "/api/v1/chatmessage/{chatflow}?chatId={}",
                        crate::proxy::route_urlencode(&id)
                    ))
                }
                None => Ok(FlowiseCall::Answered(
                    own_messages(app, ctx, &chatflow, who.user_id).await?,
                )),
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
            Ok(FlowiseCall::Forward(None))
        }
        Route::FlowiseUploadFile => {
            let chatflow = query_param(ctx, "chatflowId")
                .ok_or_else(|| ApiError::validation("chatflowId is required"))?;
            let chat = query_param(ctx, "chatId")
                .ok_or_else(|| ApiError::validation("chatId is required"))?;
            let file = query_param(ctx, "fileName")
                .ok_or_else(|| ApiError::validation("fileName is required"))?;
            if file.is_empty()
                || file.len() > 255
                || file.contains(['/', '\\', '\0'])
                || file == "."
                || file == ".."
            {
                return Err(ApiError::validation("Invalid fileName"));
            }
            pipeline_check_chatflow(app, ctx, &chatflow)?;
            let owned = app.sessions.owned(&app.db, &chat, who.user_id).await?;
            if owned.as_deref() != Some(chatflow.as_str()) {
                return Err(ApiError::forbidden());
            }
            ctx.chatflow_id = Some(chatflow.clone());
            // A query rebuilt from the checked values only: duplicates or extra
            // parameters in the client's query never reach Flowise.
            let enc = crate::proxy::route_urlencode;
            forward(format!(
                "/api/v1/get-upload-file?chatflowId={}&chatId={}&fileName={}",
                enc(&chatflow),
                enc(&chat),
                enc(&file)
            ))
        }
        _ => Ok(FlowiseCall::Forward(None)),
    }
}

/// Without a session filter, a user gets the messages of their own sessions of
/// that chatflow, never everyone's.
async fn own_messages(app: &App, ctx: &Ctx, chatflow: &str, user_id: i64) -> ApiResult {
    let sessions = crate::store::sessions::list(&app.db, user_id, 100, 0).await?;
    let mut out = Vec::new();
    for s in sessions {
        if s.get("chatflow_id").and_then(Value::as_str) != Some(chatflow) {
            continue;
        }
        let Some(id) = s.get("session_id").and_then(Value::as_str) else {
            continue;
        };
        let path = format!(
            "/api/v1/chatmessage/{chatflow}?chatId={}",
            crate::proxy::route_urlencode(id)
        );
        let (status, body) = flowise_call(app, ctx, "GET", &path).await?;
        if (200..300).contains(&status) {
            if let Ok(Value::Array(rows)) = serde_json::from_slice::<Value>(&body) {
                out.extend(rows);
            }
        }
    }
    Ok(Reply::ok(Value::Array(out)))
}

/// `GET /api/v1/chatflows` for a non-admin: Flowise's list in Flowise's row
/// shape (array, or `{data,total}` when paginated), cut down to `keep`.
pub fn keep_granted(v: &mut Value, keep: impl Fn(&str) -> bool) {
    let keep_row = |row: &Value| row.get("id").and_then(Value::as_str).is_some_and(&keep);
    match v {
        Value::Array(rows) => rows.retain(keep_row),
        Value::Object(m) => {
            if let Some(Value::Array(rows)) = m.get_mut("data") {
                rows.retain(keep_row);
                let n = rows.len();
                m.insert("total".into(), Value::from(n));
            }
        }
        _ => *v = Value::Array(Vec::new()),
    }
}
