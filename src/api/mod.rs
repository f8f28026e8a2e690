//! The proxy's own endpoints: JSON in, JSON out. Handlers return a `Reply` or an
//! `ApiError`; the pipeline writes either.

pub mod admin;
pub mod chat;
pub mod drop_in;
pub mod openapi;

use bytes::Bytes;
use pingora_http::RequestHeader;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::app::App;
use crate::auth::Identity;
use crate::errors::ApiError;
use crate::route::Route;
use crate::upstream::ForwardMeta;

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn ok(v: Value) -> Reply {
        Reply::with_status(200, v)
    }
    pub fn with_status(status: u16, v: Value) -> Reply {
        Reply {
            status,
            body: v.to_string().into_bytes(),
            headers: Vec::new(),
        }
    }
}

pub type ApiResult = Result<Reply, ApiError>;

/// What a handler knows of its request: typed, owned, independent of the
/// proxy's per-request context.
pub struct Call {
    pub route: Route,
    pub identity: Option<Identity>,
    pub query: Option<String>,
    /// The body, read whole (bounded) for the proxy's own endpoints.
    pub body: Option<Bytes>,
    pub client_ip: Option<String>,
    pub request_id: String,
}

impl Call {
    pub fn user_id(&self) -> Option<i64> {
        self.identity.as_ref().map(|i| i.user_id)
    }
}

pub async fn handle(app: &App, call: &Call) -> ApiResult {
    match call.route.clone() {
        Route::Root => Ok(Reply::ok(json!({
            "service": "flowise-proxy", "version": env!("CARGO_PKG_VERSION"), "status": "running"
        }))),
        Route::Health => health(app).await,
        Route::Info => Ok(Reply::ok(info(app))),
        Route::OpenApi => openapi::openapi_reply(),
        Route::Docs => openapi::docs_page(),
        Route::DocsAsset(file) => openapi::docs_asset(&file),
        Route::Authenticate => chat::authenticate(app, call).await,
        Route::Refresh => chat::refresh(app, call).await,
        Route::Revoke => chat::revoke(app, call).await,
        Route::ApiKeys => chat::api_keys(app, call).await,
        Route::ApiKeyRevoke(id) => chat::api_key_revoke(app, call, id).await,
        Route::Credits => chat::credits(app, call).await,
        Route::Sessions => chat::sessions(app, call).await,
        Route::SessionDelete(id) => chat::session_delete(app, call, &id).await,
        Route::Chatflows => chat::chatflows(app, call),
        Route::Chatflow(id) => chat::chatflow(app, &id),
        Route::Admin(r) => admin::handle(app, call, r).await,
        _ => Err(ApiError::not_found()),
    }
}

async fn health(app: &App) -> ApiResult {
    let database = crate::store::ping(&app.db).await;
    crate::store::record_pool_metrics(&app.db);
    let upstreams = app.upstreams.health();
    let flowise = upstreams.iter().any(|h| *h);
    let key_rejected = crate::catalog::key::state() == crate::catalog::key::KeyState::Rejected;
    let draining = app.is_draining();
    let ready = database && flowise && !key_rejected && !draining && app.auth.snapshot.is_loaded();
    let status = if ready { "healthy" } else { "unhealthy" };
    let body = json!({
        "status": status,
        "database": if database { "ok" } else { "unreachable" },
        "flowise": match (key_rejected, flowise) { (true, _) => "key_rejected", (_, true) => "ok", _ => "unreachable" },
        "flowise_servers": { "healthy": upstreams.iter().filter(|h| **h).count(), "total": upstreams.len() },
        "draining": draining,
        "version": env!("CARGO_PKG_VERSION"),
    });
    Ok(Reply::with_status(if ready { 200 } else { 503 }, body))
}

fn info(app: &App) -> Value {
    json!({
        "name": "flowise-proxy",
        "version": env!("CARGO_PKG_VERSION"),
        "features": {
            "jwt_auth": true, "api_keys": true, "refresh_tokens": true, "credits": true,
            "streaming": true, "drop_in_flowise_api": true, "metrics": app.cfg.metrics_addr.is_some(),
            "cors": !app.cfg.cors_allowed_origins.is_empty(),
        },
        "endpoints": Route::ENDPOINTS.iter().map(|e| e.line()).collect::<Vec<_>>(),
    })
}

/// Parses a JSON request body: 400 when it is not JSON, 422 when it does not fit.
pub fn parse_body<T: DeserializeOwned>(call: &Call) -> Result<T, ApiError> {
    let raw = call.body.as_deref().unwrap_or_default();
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_json("A JSON body is required"));
    }
    serde_json::from_slice(raw).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::validation(validation_message(&e)),
        _ => ApiError::invalid_json("The body is not valid JSON"),
    })
}

fn validation_message(e: &serde_json::Error) -> String {
    // serde's messages name fields and expected types, never values we hold.
    let msg = e.to_string();
    match msg.split(" at line ").next() {
        Some(m) => m.to_string(),
        None => "Invalid request body".into(),
    }
}

/// `?limit=&offset=` with bounds.
pub fn page(query: Option<&str>) -> (i64, i64) {
    let mut limit = 50;
    let mut offset = 0;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "limit" => limit = v.parse().unwrap_or(50),
            "offset" => offset = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    (limit.clamp(1, 500), offset.clamp(0, 1_000_000_000))
}

/// Calls Flowise for the proxy's own endpoints and returns (status, body).
pub async fn flowise_call(
    app: &App,
    call: &Call,
    method: &str,
    path_and_query: &str,
) -> Result<(u16, Bytes), ApiError> {
    let req = RequestHeader::build(method, path_and_query.as_bytes(), None)
        .map_err(|_| ApiError::internal())?;
    let meta = ForwardMeta {
        request_id: &call.request_id,
        client_ip: call.client_ip.as_deref(),
    };
    let mut resp = app
        .upstreams
        .send(req, Bytes::new(), &meta)
        .await
        .map_err(|f| f.api_error())?;
    let body = resp.read_all(32 << 20).await.map_err(|f| f.api_error())?;
    let status = resp.status();
    resp.release().await;
    Ok((status, body))
}

pub fn drop_in_query(call: &Call, name: &str) -> Option<String> {
    url::form_urlencoded::parse(call.query.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

pub fn drop_in_query_i64(call: &Call, name: &str) -> Option<i64> {
    drop_in_query(call, name).and_then(|v| v.parse().ok())
}
