//! Drop-in mode: the answers the proxy gives itself for Flowise's routes
//! (the checks and forwarding decisions live in `proxy/flowise_route.rs`).

use futures::StreamExt;
use serde_json::Value;

use super::{flowise_call, ApiResult, Call, Reply};
use crate::app::App;

/// Without a session filter, a user gets the messages of their own sessions of
/// that chatflow, never everyone's: one Flowise call per session, a few at a
/// time (in sequence, 23 sessions took 2 s against 0.08 s for Flowise alone).
pub async fn own_messages(app: &App, call: &Call, chatflow: &str, user_id: i64) -> ApiResult {
    const PARALLEL_READS: usize = 8;
    let ids = crate::store::sessions::ids_of_chatflow(&app.db, user_id, chatflow, 100).await?;
    let reads = futures::stream::iter(ids)
        .map(|id| async move {
            let path = format!(
                "/api/v1/chatmessage/{chatflow}?chatId={}",
                crate::route::urlencode(&id)
            );
            flowise_call(app, call, "GET", &path).await
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
