//! Conversation bindings: a session id belongs to the (user, chatflow) that used it first.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::{Db, StoreResult};

/// Binds `session_id` to the user unless it is bound already; returns the owner
/// (user, chatflow) either way, in one statement.
pub async fn bind(
    db: &Db,
    session_id: &str,
    user_id: i64,
    chatflow_id: &str,
) -> StoreResult<(i64, String)> {
    let c = db.get().await?;
    let stmt = c
        .prepare_cached(
            "INSERT INTO sessions (session_id, user_id, chatflow_id) VALUES ($1, $2, $3)
             ON CONFLICT (session_id) DO UPDATE SET last_used_at = now()
                 WHERE sessions.user_id = EXCLUDED.user_id
             RETURNING user_id, chatflow_id",
        )
        .await?;
    match c
        .query_opt(&stmt, &[&session_id, &user_id, &chatflow_id])
        .await?
    {
        Some(r) => Ok((r.get(0), r.get(1))),
        None => {
            // Bound to someone else (the conflict update did not apply).
            let r = c
                .query_one(
                    "SELECT user_id, chatflow_id FROM sessions WHERE session_id = $1",
                    &[&session_id],
                )
                .await?;
            Ok((r.get(0), r.get(1)))
        }
    }
}

pub async fn owner(db: &Db, session_id: &str) -> StoreResult<Option<(i64, String)>> {
    let c = db.get().await?;
    let r = c
        .query_opt(
            "SELECT user_id, chatflow_id FROM sessions WHERE session_id = $1",
            &[&session_id],
        )
        .await?;
    Ok(r.map(|r| (r.get(0), r.get(1))))
}

pub async fn list(db: &Db, user_id: i64, limit: i64, offset: i64) -> StoreResult<Vec<Value>> {
    let c = db.get().await?;
    let rows = c
        .query(
            "SELECT session_id, chatflow_id, created_at, last_used_at FROM sessions
             WHERE user_id = $1 ORDER BY last_used_at DESC, session_id LIMIT $2 OFFSET $3",
            &[&user_id, &limit, &offset],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let (c, l): (DateTime<Utc>, DateTime<Utc>) = (r.get(2), r.get(3));
            json!({"session_id": r.get::<_, String>(0), "chatflow_id": r.get::<_, String>(1),
                   "created_at": c, "last_used_at": l})
        })
        .collect())
}

pub async fn delete(db: &Db, session_id: &str, user_id: i64) -> StoreResult<bool> {
    let c = db.get().await?;
    Ok(c.execute(
        "DELETE FROM sessions WHERE session_id = $1 AND user_id = $2",
        &[&session_id, &user_id],
    )
    .await?
        > 0)
}
