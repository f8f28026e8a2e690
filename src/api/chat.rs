//! `/chat/*` and `/chatflows/*`: login, tokens, credits, conversations, catalogue.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{flowise_call, page, parse_body, ApiResult, Call, Reply};
use crate::app::App;
use crate::auth::Identity;
use crate::errors::ApiError;
use crate::ledger::Price;
use crate::store;

fn identity(call: &Call) -> Result<&Identity, ApiError> {
    call.identity.as_ref().ok_or_else(ApiError::unauthorized)
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct Login {
    username: String,
    password: String,
}

pub async fn authenticate(app: &App, call: &Call) -> ApiResult {
    let body: Login = parse_body(call)?;
    if body.username.is_empty()
        || body.username.len() > 64
        || body.password.len() > 1024
        || crate::validate::text("username", &body.username, 64).is_err()
    {
        // Same answer as any other failure.
        return Err(ApiError::invalid_credentials());
    }
    let ip = call.client_ip.clone().unwrap_or_default();
    let (pair, user) = app
        .auth
        .login(&app.db, &body.username, &body.password, &ip)
        .await?;
    Ok(Reply::ok(json!({
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "token_type": "bearer",
        "expires_in": pair.expires_in,
        "user": {"id": user.id, "username": user.username, "role": user.role},
    })))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct RefreshBody {
    refresh_token: String,
}

pub async fn refresh(app: &App, call: &Call) -> ApiResult {
    let body: RefreshBody = parse_body(call)?;
    let (pair, user_id, role) = app.auth.refresh(&app.db, &body.refresh_token).await?;
    Ok(Reply::ok(json!({
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "token_type": "bearer",
        "expires_in": pair.expires_in,
        "user": {"id": user_id, "role": role.as_str()},
    })))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct RevokeBody {
    refresh_token: Option<String>,
    /// Revoke every token of the caller.
    #[serde(default)]
    all: bool,
}

pub async fn revoke(app: &App, call: &Call) -> ApiResult {
    let who = identity(call)?;
    let body: RevokeBody = if call.body.is_some() {
        parse_body(call)?
    } else {
        RevokeBody {
            refresh_token: None,
            all: false,
        }
    };
    app.auth
        .revoke(&app.db, who, body.refresh_token.as_deref(), body.all)
        .await?;
    Ok(Reply::ok(json!({"revoked": true})))
}

/// `GET /chat/api-keys`: the caller's active keys (never their secrets).
pub async fn api_keys(app: &App, call: &Call) -> ApiResult {
    let who = identity(call)?;
    let keys = store::identity::list_own_api_keys(&app.db, who.user_id).await?;
    Ok(Reply::ok(Value::Array(keys)))
}

/// `DELETE /chat/api-keys/{id}`: revokes one of the caller's own keys (404
/// for anyone else's), in force here at once and elsewhere within a second.
pub async fn api_key_revoke(app: &App, call: &Call, key_id: i64) -> ApiResult {
    let who = identity(call)?;
    store::identity::revoke_own_api_key(&app.db, who.user_id, key_id).await?;
    store::identity::audit(
        &app.db,
        Some(who.user_id),
        "apikey.revoke",
        &format!("apikey:{key_id}"),
        &json!({"user_id": who.user_id, "by": "owner"}),
        &call.request_id,
    )
    .await?;
    app.auth.snapshot.refresh_now().await;
    Ok(Reply::ok(json!({"revoked": true, "id": key_id})))
}

pub async fn credits(app: &App, call: &Call) -> ApiResult {
    let who = identity(call)?;
    let (available, held) = app.ledger.balance(who.user_id).await?.unwrap_or((0, 0));
    Ok(Reply::ok(json!({"credits": available, "held": held})))
}

pub async fn sessions(app: &App, call: &Call) -> ApiResult {
    let who = identity(call)?;
    let (limit, offset) = page(call.query.as_deref());
    let rows = app
        .sessions
        .list(&app.db, who.user_id, limit, offset)
        .await?;
    Ok(Reply::ok(Value::Array(rows)))
}

/// The caller's session `id`: its chatflow and the Flowise path of its
/// messages. 404 when it is unknown or someone else's.
pub async fn owned_session_messages(
    app: &App,
    who: &Identity,
    id: &str,
) -> Result<(String, String), ApiError> {
    let chatflow = app
        .sessions
        .owned(&app.db, id, who.user_id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let path = format!(
        "/api/v1/chatmessage/{chatflow}?chatId={}",
        crate::route::urlencode(id)
    );
    Ok((chatflow, path))
}

/// Flowise's messages of one conversation in the seed API's shape (the
/// answer of `GET /chat/sessions/{id}/history`, rewritten as it passes).
pub fn history(id: &str, chatflow: &str, flowise_rows: Value) -> Value {
    let rows = match flowise_rows {
        Value::Array(rows) => rows,
        _ => Vec::new(),
    };
    let mut messages: Vec<Value> = rows
        .into_iter()
        .filter(|m| {
            m.get("chatId").and_then(Value::as_str) == Some(id)
                || m.get("sessionId").and_then(Value::as_str) == Some(id)
        })
        .map(|mut m| {
            let role = match m.get("role").and_then(Value::as_str) {
                Some("userMessage") => "user",
                Some("apiMessage") => "assistant",
                Some(other) => other,
                None => "unknown",
            }
            .to_string();
            let content = m.get("content").cloned().unwrap_or(Value::Null);
            let time = m.get("createdDate").cloned().unwrap_or(Value::Null);
            if let Value::Object(o) = &mut m {
                o.insert("role".into(), Value::String(role));
                o.insert("content".into(), content);
                o.insert("time".into(), time);
            }
            m
        })
        .collect();
    messages.sort_by(|a, b| {
        let t = |v: &Value| {
            v.get("time")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        t(a).cmp(&t(b))
    });
    json!({"session_id": id, "chatflow_id": chatflow, "messages": messages})
}

pub async fn session_delete(app: &App, call: &Call, id: &str) -> ApiResult {
    let who = identity(call)?;
    let (_, path) = owned_session_messages(app, who, id).await?;
    let (status, _) = flowise_call(app, call, "DELETE", &path).await?;
    if !(200..300).contains(&status) && status != 404 {
        return Err(ApiError::upstream_error());
    }
    store::sessions::delete(&app.db, id, who.user_id).await?;
    Ok(Reply::ok(json!({"deleted": true, "session_id": id})))
}

fn chatflow_json(app: &App, c: &store::catalog::ChatflowRow) -> Value {
    let price = Price::of(Some(c), app.cfg.default_credit_cost);
    json!({
        "id": c.id, "name": c.name, "category": c.category, "deployed": c.deployed,
        "credit_cost": price.flat,
        "credits_per_1k_tokens": c.credits_per_1k_tokens,
        "max_hold": c.max_hold,
    })
}

pub fn chatflows(app: &App, call: &Call) -> ApiResult {
    let who = identity(call)?;
    let snap = app.auth.snapshot.get();
    let mut list: Vec<&store::catalog::ChatflowRow> = snap
        .chatflows
        .values()
        .filter(|c| !c.deleted && (who.is_admin() || snap.is_granted(who.user_id, &c.id)))
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    Ok(Reply::ok(Value::Array(
        list.into_iter().map(|c| chatflow_json(app, c)).collect(),
    )))
}

/// Access was checked by the pipeline (404 unknown, 403 not granted).
pub fn chatflow(app: &App, id: &str) -> ApiResult {
    let snap = app.auth.snapshot.get();
    let c = snap.chatflow(id).ok_or_else(ApiError::not_found)?;
    Ok(Reply::ok(chatflow_json(app, c)))
}
