//! Links between external identities (issuer, subject) and local users.

use chrono::{DateTime, Utc};
use serde_json::json;

use super::{Db, StoreError, StoreResult};

/// The local user behind an external identity, as the database has it now.
#[derive(Debug, Clone)]
pub struct LinkedUser {
    pub user_id: i64,
    pub role: String,
    pub active: bool,
    pub tokens_valid_after: DateTime<Utc>,
}

fn linked(r: &tokio_postgres::Row) -> LinkedUser {
    LinkedUser {
        user_id: r.get(0),
        role: r.get(1),
        active: r.get(2),
        tokens_valid_after: r.get(3),
    }
}

pub async fn find(db: &Db, issuer: &str, subject: &str) -> StoreResult<Option<LinkedUser>> {
    let c = db.get().await?;
    let row = c
        .query_opt(
            "SELECT u.id, u.role, u.active, u.tokens_valid_after
             FROM external_identities e JOIN users u ON u.id = e.user_id
             WHERE e.issuer = $1 AND e.subject = $2",
            &[&issuer, &subject],
        )
        .await?;
    Ok(row.as_ref().map(linked))
}

/// Whether a user was provisioned for an external identity.
pub async fn is_linked(db: &Db, user_id: i64) -> StoreResult<bool> {
    let c = db.get().await?;
    Ok(c.query_opt(
        "SELECT 1 FROM external_identities WHERE user_id = $1",
        &[&user_id],
    )
    .await?
    .is_some())
}

/// Creates a user (with an empty credit account) for an identity seen for the
/// first time, under the first free name of `usernames`. When another request
/// or instance provisions the same identity at the same moment, its user wins
/// and this one is rolled back: one identity, one user. The flag says whether
/// this call created the user.
pub async fn provision(
    db: &Db,
    issuer: &str,
    subject: &str,
    usernames: &[String],
    role: &str,
    password_hash: &str,
) -> StoreResult<(LinkedUser, bool)> {
    let mut c = db.get().await?;
    let tx = c.transaction().await?;
    let mut created = None;
    for name in usernames {
        if let Some(r) = tx
            .query_opt(
                "INSERT INTO users (username, password_hash, role) VALUES ($1, $2, $3)
                 ON CONFLICT (username) DO NOTHING
                 RETURNING id, role, active, tokens_valid_after",
                &[name, &password_hash, &role],
            )
            .await?
        {
            created = Some((linked(&r), name));
            break;
        }
    }
    let Some((user, username)) = created else {
        return Err(StoreError::Conflict(
            "every candidate username is taken".into(),
        ));
    };
    tx.execute(
        "INSERT INTO accounts (user_id) VALUES ($1)",
        &[&user.user_id],
    )
    .await?;
    let linked_now = tx
        .execute(
            "INSERT INTO external_identities (issuer, subject, user_id) VALUES ($1, $2, $3)
             ON CONFLICT (issuer, subject) DO NOTHING",
            &[&issuer, &subject, &user.user_id],
        )
        .await?;
    if linked_now == 0 {
        tx.rollback().await?;
        drop(c);
        let winner = find(db, issuer, subject)
            .await?
            .ok_or_else(|| StoreError::Unavailable("external identity vanished".into()))?;
        return Ok((winner, false));
    }
    tx.execute(
        "INSERT INTO audit_log (actor_id, action, target, details) VALUES (NULL, 'user.provision', $1, $2)",
        &[
            &format!("user:{}", user.user_id),
            &json!({"issuer": issuer, "subject": subject, "username": username, "role": role}),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok((user, true))
}
