//! Requests to Flowise's routes (drop-in `/api/v1/...`, and seed reads that
//! map onto them): ownership of the conversation they name, and the path and
//! query Flowise is asked for. Decided in `request_filter`; forwarded by the
//! proxy loop.

use crate::api::{self, Reply};
use crate::app::App;
use crate::errors::ApiError;
use crate::route::Route;

use super::ctx::Ctx;

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
            let who = ctx.identity.as_ref().ok_or_else(ApiError::unauthorized)?;
            let (chatflow, path) = api::chat::owned_session_messages(app, who, &id).await?;
            ctx.chatflow_id = Some(chatflow);
            return forward(path);
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
                        crate::route::urlencode(&id)
                    ))
                }
                None => Ok(FlowiseCall::Answered(
                    api::drop_in::own_messages(
                        app,
                        &super::pipeline::call_of(ctx),
                        &chatflow,
                        who.user_id,
                    )
                    .await?,
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
            crate::access::check_chatflow(app, Some(&who), &chatflow).await?;
            let owned = app.sessions.owned(&app.db, &chat, who.user_id).await?;
            if owned.as_deref() != Some(chatflow.as_str()) {
                return Err(ApiError::forbidden());
            }
            ctx.chatflow_id = Some(chatflow.clone());
            // A query rebuilt from the checked values only: duplicates or extra
            // parameters in the client's query never reach Flowise.
            let enc = crate::route::urlencode;
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
