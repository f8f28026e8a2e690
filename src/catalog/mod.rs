//! The chatflow catalogue, synced from Flowise (`GET /api/v1/chatflows` with the
//! Flowise key) at start-up, periodically and on demand. A failed or empty answer
//! never wipes what we have; chatflows that disappear are marked deleted and
//! keep their grants. Flowise rejecting the key is recorded in [`key`].

pub mod key;

use bytes::Bytes;
use pingora_http::RequestHeader;
use serde_json::Value;

use crate::app::App;
use crate::errors::ApiError;
use crate::store::{self, catalog::SyncedChatflow};
use crate::upstream::ForwardMeta;

pub async fn sync(app: &App) -> Result<usize, ApiError> {
    let result = fetch(app).await;
    let flows = match result {
        Ok(f) if !f.is_empty() => f,
        Ok(_) => {
            crate::metrics::CATALOG_SYNCS
                .with_label_values(&["empty"])
                .inc();
            return Ok(0);
        }
        Err(e) => {
            crate::metrics::CATALOG_SYNCS
                .with_label_values(&["failed"])
                .inc();
            return Err(e);
        }
    };
    store::catalog::sync(&app.db, &flows).await?;
    crate::metrics::CATALOG_SYNCS
        .with_label_values(&["ok"])
        .inc();
    app.auth.snapshot.invalidate();
    Ok(flows.len())
}

async fn fetch(app: &App) -> Result<Vec<SyncedChatflow>, ApiError> {
    let req = RequestHeader::build("GET", b"/api/v1/chatflows", None)
        .map_err(|_| ApiError::internal())?;
    let rid = format!("sync-{}", uuid::Uuid::new_v4());
    let meta = ForwardMeta {
        request_id: &rid,
        client_ip: None,
    };
    let mut resp = app
        .upstreams
        .send(req, Bytes::new(), &meta)
        .await
        .map_err(|f| f.api_error())?;
    let body = resp.read_all(64 << 20).await.map_err(|f| f.api_error())?;
    let status = resp.status();
    resp.release().await;
    let key_set = app.cfg.flowise_api_key.is_some();
    if key::is_rejection(status) {
        key::rejected("GET /api/v1/chatflows (catalogue sync)", status, key_set);
        return Err(key::rejected_error(status, key_set));
    }
    if status != 200 {
        return Err(ApiError::upstream_error());
    }
    key::accepted();
    parse_list(&body).ok_or_else(ApiError::upstream_error)
}

/// Flowise's list: an array of rows, or `{data, total}` when paginated.
pub fn parse_list(body: &[u8]) -> Option<Vec<SyncedChatflow>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let rows = match &v {
        Value::Array(a) => a,
        Value::Object(m) => m.get("data")?.as_array()?,
        _ => return None,
    };
    let mut out = Vec::new();
    for r in rows {
        let Some(id) = r.get("id").and_then(Value::as_str) else {
            continue;
        };
        if id.is_empty() || id.len() > 128 {
            continue;
        }
        // Agent flows and assistants are listed too; only chatflows are served.
        if let Some(t) = r.get("type").and_then(Value::as_str) {
            if t != "CHATFLOW" && t != "AGENTFLOW" && t != "MULTIAGENT" {
                continue;
            }
        }
        out.push(SyncedChatflow {
            id: id.to_string(),
            name: r
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            category: r
                .get("category")
                .and_then(Value::as_str)
                .map(str::to_string),
            deployed: r.get("deployed").and_then(Value::as_bool).unwrap_or(false),
        });
    }
    Some(out)
}
