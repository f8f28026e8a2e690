//! Users, refresh tokens, API keys, revocations, grants and the audit log.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{Db, StoreError, StoreResult};

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct UserRow {
    pub id: i64,
    pub username: String,
    pub email: Option<String>,
    pub role: String,
    pub active: bool,
    pub created_at: DateTime<Utc>,
}

const USER_COLS: &str = "id, username, email, role, active, created_at";

fn user_row(r: &tokio_postgres::Row) -> UserRow {
    UserRow {
        id: r.get(0),
        username: r.get(1),
        email: r.get(2),
        role: r.get(3),
        active: r.get(4),
        created_at: r.get(5),
    }
}

/// Creates a user and its (empty) credit account in one transaction.
pub async fn create_user(
    db: &Db,
    username: &str,
    password_hash: &str,
    role: &str,
    email: Option<&str>,
) -> StoreResult<UserRow> {
    let mut c = db.get().await?;
    let tx = c.transaction().await?;
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO users (username, password_hash, role, email) VALUES ($1, $2, $3, $4) RETURNING {USER_COLS}"
            ),
            &[&username, &password_hash, &role, &email],
        )
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => StoreError::Conflict("username already taken".into()),
            other => other,
        })?;
    let user = user_row(&row);
    tx.execute("INSERT INTO accounts (user_id) VALUES ($1)", &[&user.id])
        .await?;
    tx.commit().await?;
    Ok(user)
}

pub async fn list_users(db: &Db, limit: i64, offset: i64) -> StoreResult<Vec<UserRow>> {
    let c = db.get().await?;
    let rows = c
        .query(
            &format!("SELECT {USER_COLS} FROM users ORDER BY id LIMIT $1 OFFSET $2"),
            &[&limit, &offset],
        )
        .await?;
    Ok(rows.iter().map(user_row).collect())
}

pub async fn get_user(db: &Db, id: i64) -> StoreResult<UserRow> {
    let c = db.get().await?;
    let row = c
        .query_opt(
            &format!("SELECT {USER_COLS} FROM users WHERE id = $1"),
            &[&id],
        )
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(user_row(&row))
}

pub async fn find_user_by_name(db: &Db, username: &str) -> StoreResult<Option<UserRow>> {
    let c = db.get().await?;
    let row = c
        .query_opt(
            &format!("SELECT {USER_COLS} FROM users WHERE username = $1"),
            &[&username],
        )
        .await?;
    Ok(row.as_ref().map(user_row))
}

/// (user, password hash) for a login attempt.
pub async fn login_lookup(db: &Db, username: &str) -> StoreResult<Option<(UserRow, String)>> {
    let c = db.get().await?;
    let row = c
        .query_opt(
            &format!("SELECT {USER_COLS}, password_hash FROM users WHERE username = $1"),
            &[&username],
        )
        .await?;
    Ok(row.map(|r| (user_row(&r), r.get(6))))
}

pub async fn update_user(
    db: &Db,
    id: i64,
    role: Option<&str>,
    active: Option<bool>,
    email: Option<&str>,
    password_hash: Option<&str>,
) -> StoreResult<UserRow> {
    let c = db.get().await?;
    let row = c
        .query_opt(
            &format!(
                "UPDATE users SET role = COALESCE($2, role), active = COALESCE($3, active),
                        email = COALESCE($4, email), password_hash = COALESCE($5, password_hash),
                        updated_at = now()
                 WHERE id = $1 RETURNING {USER_COLS}"
            ),
            &[&id, &role, &active, &email, &password_hash],
        )
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(user_row(&row))
}

/// Stores a new refresh token of `family`; returns the user's access-token
/// cut-off (`tokens_valid_after`), read in the same statement.
pub async fn insert_refresh_token(
    db: &Db,
    user_id: i64,
    token_hash: &[u8],
    family: Uuid,
    expires_at: DateTime<Utc>,
) -> StoreResult<DateTime<Utc>> {
    let c = db.get().await?;
    let r = c
        .query_one(
            "INSERT INTO refresh_tokens (user_id, token_hash, family, expires_at) VALUES ($1, $2, $3, $4)
             RETURNING (SELECT tokens_valid_after FROM users WHERE id = $1)",
            &[&user_id, &token_hash, &family, &expires_at],
        )
        .await?;
    Ok(r.get(0))
}

pub enum RefreshOutcome {
    /// The token was current: it is now rotated; issue a new one in this family.
    Rotated { user_id: i64, family: Uuid },
    /// The token had already been rotated: the whole family is now revoked.
    Reused { family: Uuid },
    /// Unknown, expired or revoked.
    Invalid,
}

/// Rotates a refresh token in one statement; detects reuse of a rotated one.
pub async fn rotate_refresh_token(db: &Db, token_hash: &[u8]) -> StoreResult<RefreshOutcome> {
    let c = db.get().await?;
    if let Some(r) = c
        .query_opt(
            "UPDATE refresh_tokens SET rotated_at = now()
             WHERE token_hash = $1 AND rotated_at IS NULL AND revoked_at IS NULL AND expires_at > now()
             RETURNING user_id, family",
            &[&token_hash],
        )
        .await?
    {
        return Ok(RefreshOutcome::Rotated {
            user_id: r.get(0),
            family: r.get(1),
        });
    }
    let reused = c
        .query_opt(
            "SELECT family FROM refresh_tokens WHERE token_hash = $1 AND rotated_at IS NOT NULL",
            &[&token_hash],
        )
        .await?;
    match reused {
        Some(r) => {
            let family: Uuid = r.get(0);
            c.execute(
                "UPDATE refresh_tokens SET revoked_at = now() WHERE family = $1 AND revoked_at IS NULL",
                &[&family],
            )
            .await?;
            Ok(RefreshOutcome::Reused { family })
        }
        None => Ok(RefreshOutcome::Invalid),
    }
}

/// Revokes the family of one refresh token, if it belongs to `user_id`;
/// returns the family.
pub async fn revoke_refresh_family(
    db: &Db,
    user_id: i64,
    token_hash: &[u8],
) -> StoreResult<Option<Uuid>> {
    let c = db.get().await?;
    let row = c
        .query_opt(
            "WITH f AS (SELECT family FROM refresh_tokens WHERE token_hash = $1 AND user_id = $2),
                  r AS (UPDATE refresh_tokens SET revoked_at = now()
                        WHERE revoked_at IS NULL AND family IN (SELECT family FROM f))
             SELECT family FROM f",
            &[&token_hash, &user_id],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Revokes every refresh token of a user and every access token issued so far
/// (see `auth::CLOCK_LEEWAY_SECS` for how the cut-off is compared).
pub async fn revoke_all_for_user(db: &Db, user_id: i64) -> StoreResult<()> {
    let mut c = db.get().await?;
    let tx = c.transaction().await?;
    tx.execute(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
        &[&user_id],
    )
    .await?;
    tx.execute(
        "UPDATE users SET tokens_valid_after = now(), updated_at = now() WHERE id = $1",
        &[&user_id],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn revoke_access_token(db: &Db, jti: Uuid, expires_at: DateTime<Utc>) -> StoreResult<()> {
    let c = db.get().await?;
    c.execute(
        "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&jti, &expires_at],
    )
    .await?;
    Ok(())
}

pub async fn insert_api_key(
    db: &Db,
    user_id: i64,
    prefix: &str,
    secret_hash: &[u8],
    name: Option<&str>,
) -> StoreResult<(i64, DateTime<Utc>)> {
    let c = db.get().await?;
    let r = c
        .query_one(
            "INSERT INTO api_keys (user_id, prefix, secret_hash, name) VALUES ($1, $2, $3, $4)
             RETURNING id, created_at",
            &[&user_id, &prefix, &secret_hash, &name],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

/// Revokes a key; returns its owner.
pub async fn revoke_api_key(db: &Db, key_id: i64) -> StoreResult<i64> {
    let c = db.get().await?;
    let r = c
        .query_opt(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 RETURNING user_id",
            &[&key_id],
        )
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(r.get(0))
}

pub async fn grant(db: &Db, user_id: i64, chatflow_id: &str) -> StoreResult<bool> {
    let c = db.get().await?;
    let n = c
        .execute(
            "INSERT INTO grants (user_id, chatflow_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&user_id, &chatflow_id],
        )
        .await?;
    Ok(n > 0)
}

pub async fn revoke_grant(db: &Db, user_id: i64, chatflow_id: &str) -> StoreResult<bool> {
    let c = db.get().await?;
    let n = c
        .execute(
            "DELETE FROM grants WHERE user_id = $1 AND chatflow_id = $2",
            &[&user_id, &chatflow_id],
        )
        .await?;
    Ok(n > 0)
}

pub async fn chatflow_users(db: &Db, chatflow_id: &str) -> StoreResult<Vec<UserRow>> {
    let c = db.get().await?;
    let rows = c
        .query(
            &format!(
                "SELECT {} FROM users u JOIN grants g ON g.user_id = u.id WHERE g.chatflow_id = $1 ORDER BY u.id",
                USER_COLS.split(", ").map(|c| format!("u.{c}")).collect::<Vec<_>>().join(", ")
            ),
            &[&chatflow_id],
        )
        .await?;
    Ok(rows.iter().map(user_row).collect())
}

pub async fn audit(
    db: &Db,
    actor_id: Option<i64>,
    action: &str,
    target: &str,
    details: &Value,
    request_id: &str,
) -> StoreResult<()> {
    let c = db.get().await?;
    c.execute(
        "INSERT INTO audit_log (actor_id, action, target, details, request_id) VALUES ($1, $2, $3, $4, $5)",
        &[&actor_id, &action, &target, details, &request_id],
    )
    .await?;
    Ok(())
}

pub async fn audit_page(db: &Db, limit: i64, offset: i64) -> StoreResult<Vec<Value>> {
    let c = db.get().await?;
    let rows = c
        .query(
            "SELECT id, at, actor_id, action, target, details, request_id FROM audit_log
             ORDER BY id DESC LIMIT $1 OFFSET $2",
            &[&limit, &offset],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let at: DateTime<Utc> = r.get(1);
            serde_json::json!({
                "id": r.get::<_, i64>(0), "at": at, "actor_id": r.get::<_, Option<i64>>(2),
                "action": r.get::<_, String>(3), "target": r.get::<_, Option<String>>(4),
                "details": r.get::<_, Value>(5), "request_id": r.get::<_, Option<String>>(6),
            })
        })
        .collect())
}

/// Receives the rows of a full identity load as they stream in (nothing is
/// collected in between: a million users never sit in a `Vec` of tuples).
pub trait IdentitySink {
    fn user(&mut self, id: i64, role: &str, active: bool, tokens_valid_after: DateTime<Utc>);
    fn api_key(&mut self, prefix: &str, user_id: i64, secret_hash: &[u8]);
    fn revoked(&mut self, jti: Uuid, expires_at: DateTime<Utc>);
    fn grant(&mut self, user_id: i64, chatflow_id: &str);
    fn chatflows(&mut self, rows: Vec<super::catalog::ChatflowRow>);
}

/// Streams everything the in-memory identity snapshot holds into `sink`, read
/// in one repeatable-read transaction; returns the number of rows read.
///
/// Each table comes in the order of the snapshot's keys (a grant by its
/// user), so that the snapshot can be replaced shard by shard as the rows
/// come. Key prefixes come in the database's collation, which orders the
/// lowercase hex prefixes this proxy makes bytewise, like the snapshot
/// (`COLLATE "C"` would have PostgreSQL sort a million rows, 0.6 s, instead
/// of reading the prefix index, 0.15 s); a prefix it orders otherwise is
/// still loaded, at the end (`auth::table::Rebuild`). The tables come in this
/// order: revoked ids, API keys, grants, then users (the one table whose
/// changes can let more in: see `auth::snapshot::SnapshotStore::reload`).
pub async fn load_identity(db: &Db, sink: &mut impl IdentitySink) -> StoreResult<u64> {
    let mut c = db.get().await?;
    let tx = c
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let mut read = 0u64;
    read += each_row(
        &tx,
        "SELECT jti, expires_at FROM revoked_tokens WHERE expires_at > now() ORDER BY jti",
        |r| sink.revoked(r.get(0), r.get(1)),
    )
    .await?;
    read += each_row(
        &tx,
        "SELECT prefix, user_id, secret_hash FROM api_keys WHERE revoked_at IS NULL
         ORDER BY prefix",
        |r| sink.api_key(r.get(0), r.get(1), r.get(2)),
    )
    .await?;
    read += each_row(
        &tx,
        "SELECT user_id, chatflow_id FROM grants ORDER BY user_id",
        |r| sink.grant(r.get(0), r.get(1)),
    )
    .await?;
    read += each_row(
        &tx,
        "SELECT id, role, active, tokens_valid_after FROM users ORDER BY id",
        |r| sink.user(r.get(0), r.get(1), r.get(2), r.get(3)),
    )
    .await?;
    let chatflows = super::catalog::all_in(&tx).await?;
    read += chatflows.len() as u64;
    sink.chatflows(chatflows);
    tx.commit().await?;
    Ok(read)
}

/// Streams the rows of `sql` into `each` (no result set held in memory);
/// returns how many there were.
async fn each_row(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    mut each: impl FnMut(&tokio_postgres::Row),
) -> StoreResult<u64> {
    use futures::TryStreamExt;
    let none: [&(dyn tokio_postgres::types::ToSql + Sync); 0] = [];
    let rows = tx.query_raw(sql, none).await?;
    futures::pin_mut!(rows);
    let mut n = 0;
    while let Some(r) = rows.try_next().await? {
        each(&r);
        n += 1;
    }
    Ok(n)
}

/// What changed, as the notifications named it: only these rows are read
/// again (see `auth::snapshot`).
#[derive(Debug, Default)]
pub struct ChangedKeys {
    pub users: Vec<i64>,
    pub grants_of: Vec<i64>,
    pub api_keys: Vec<String>,
    pub revoked: Vec<Uuid>,
    pub chatflows: bool,
}

/// The current rows of [`ChangedKeys`]; a key with no row here is gone
/// (deleted, revoked, or expired).
#[derive(Debug, Default)]
pub struct ChangedRows {
    pub users: Vec<(i64, String, bool, DateTime<Utc>)>,
    pub grants: Vec<(i64, String)>,
    pub api_keys: Vec<(String, i64, Vec<u8>)>,
    pub revoked: Vec<(Uuid, DateTime<Utc>)>,
    pub chatflows: Option<Vec<super::catalog::ChatflowRow>>,
}

impl ChangedRows {
    pub fn count(&self) -> u64 {
        (self.users.len()
            + self.grants.len()
            + self.api_keys.len()
            + self.revoked.len()
            + self.chatflows.as_ref().map_or(0, Vec::len)) as u64
    }
}

/// Reads the rows of `keys` (one indexed query per kind that changed).
pub async fn read_changes(db: &Db, keys: &ChangedKeys) -> StoreResult<ChangedRows> {
    let c = db.get().await?;
    let mut out = ChangedRows::default();
    if !keys.users.is_empty() {
        let stmt = c
            .prepare_cached(
                "SELECT id, role, active, tokens_valid_after FROM users WHERE id = ANY($1)",
            )
            .await?;
        out.users = c
            .query(&stmt, &[&keys.users])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
    }
    if !keys.grants_of.is_empty() {
        let stmt = c
            .prepare_cached("SELECT user_id, chatflow_id FROM grants WHERE user_id = ANY($1)")
            .await?;
        out.grants = c
            .query(&stmt, &[&keys.grants_of])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    }
    if !keys.api_keys.is_empty() {
        let stmt = c
            .prepare_cached(
                "SELECT prefix, user_id, secret_hash FROM api_keys
                 WHERE prefix = ANY($1) AND revoked_at IS NULL",
            )
            .await?;
        out.api_keys = c
            .query(&stmt, &[&keys.api_keys])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
    }
    if !keys.revoked.is_empty() {
        let stmt = c
            .prepare_cached(
                "SELECT jti, expires_at FROM revoked_tokens WHERE jti = ANY($1) AND expires_at > now()",
            )
            .await?;
        out.revoked = c
            .query(&stmt, &[&keys.revoked])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    }
    if keys.chatflows {
        out.chatflows = Some(super::catalog::all_in(&c).await?);
    }
    Ok(out)
}

/// Asks every instance (this one included) to mark the point in the
/// notification stream reached after this instance's change: `payload` comes
/// back on the LISTEN connection after every notification of an earlier commit.
pub async fn notify_marker(db: &Db, channel: &str, payload: &str) -> StoreResult<()> {
    let c = db.get().await?;
    let stmt = c.prepare_cached("SELECT pg_notify($1, $2)").await?;
    c.execute(&stmt, &[&channel, &payload]).await?;
    Ok(())
}

/// Forgets revocations of tokens that have expired anyway.
pub async fn prune_revoked(db: &Db) -> StoreResult<u64> {
    let c = db.get().await?;
    Ok(c.execute(
        "DELETE FROM revoked_tokens WHERE expires_at < now() - interval '1 minute'",
        &[],
    )
    .await?)
}

/// An active API key and its user, by the key's prefix (a snapshot miss):
/// (user id, secret hash, role, active, tokens valid after).
pub async fn api_key_by_prefix(
    db: &Db,
    prefix: &str,
) -> StoreResult<Option<(i64, Vec<u8>, String, bool, DateTime<Utc>)>> {
    let c = db.get().await?;
    let stmt = c
        .prepare_cached(
            "SELECT k.user_id, k.secret_hash, u.role, u.active, u.tokens_valid_after
             FROM api_keys k JOIN users u ON u.id = k.user_id
             WHERE k.prefix = $1 AND k.revoked_at IS NULL",
        )
        .await?;
    let r = c.query_opt(&stmt, &[&prefix]).await?;
    Ok(r.map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))))
}

/// A user as the snapshot holds it (a snapshot miss): (role, active, tokens valid after).
pub async fn user_entry(db: &Db, id: i64) -> StoreResult<Option<(String, bool, DateTime<Utc>)>> {
    let c = db.get().await?;
    let stmt = c
        .prepare_cached("SELECT role, active, tokens_valid_after FROM users WHERE id = $1")
        .await?;
    let r = c.query_opt(&stmt, &[&id]).await?;
    Ok(r.map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// A chatflow for one user (a snapshot miss): `None` when the chatflow is
/// unknown, else (deleted, granted to the user).
pub async fn chatflow_grant(
    db: &Db,
    user_id: i64,
    chatflow_id: &str,
) -> StoreResult<Option<(bool, bool)>> {
    let c = db.get().await?;
    let stmt = c
        .prepare_cached(
            "SELECT c.deleted,
                    EXISTS (SELECT 1 FROM grants g WHERE g.user_id = $1 AND g.chatflow_id = c.id)
             FROM chatflows c WHERE c.id = $2",
        )
        .await?;
    let r = c.query_opt(&stmt, &[&user_id, &chatflow_id]).await?;
    Ok(r.map(|r| (r.get(0), r.get(1))))
}

/// Revokes the user's key with this prefix (a key revoking itself).
pub async fn revoke_api_key_by_prefix(db: &Db, user_id: i64, prefix: &str) -> StoreResult<()> {
    let c = db.get().await?;
    c.execute(
        "UPDATE api_keys SET revoked_at = now()
         WHERE prefix = $1 AND user_id = $2 AND revoked_at IS NULL",
        &[&prefix, &user_id],
    )
    .await?;
    Ok(())
}

/// A user's active API keys (never their secrets).
pub async fn list_own_api_keys(db: &Db, user_id: i64) -> StoreResult<Vec<Value>> {
    let c = db.get().await?;
    let rows = c
        .query(
            "SELECT id, prefix, name, created_at FROM api_keys
             WHERE user_id = $1 AND revoked_at IS NULL ORDER BY id",
            &[&user_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let at: DateTime<Utc> = r.get(3);
            serde_json::json!({"id": r.get::<_, i64>(0), "prefix": r.get::<_, String>(1),
                               "name": r.get::<_, Option<String>>(2), "created_at": at})
        })
        .collect())
}

/// Revokes one of the user's own keys; `NotFound` when it is not theirs.
pub async fn revoke_own_api_key(db: &Db, user_id: i64, key_id: i64) -> StoreResult<()> {
    let c = db.get().await?;
    c.query_opt(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now())
         WHERE id = $1 AND user_id = $2 RETURNING id",
        &[&key_id, &user_id],
    )
    .await?
    .ok_or(StoreError::NotFound)?;
    Ok(())
}
