//! Accounts, holds and the append-only ledger. Each balance change is one SQL
//! statement that moves the balance and writes its ledger row together, or does
//! nothing; the table constraints make a negative balance impossible.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{Db, StoreError, StoreResult};

/// Places a hold: moves `amount` from available to held and writes the `hold`
/// ledger row, in one statement. `None` when the balance is too low. Runs
/// inside the caller's transaction (a batch of admissions, one commit).
pub async fn place_hold(
    c: &deadpool_postgres::Transaction<'_>,
    hold_id: Uuid,
    request_id: &str,
    user_id: i64,
    chatflow_id: &str,
    amount: i64,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let stmt = c
        .prepare_cached(
            "WITH a AS (
                UPDATE accounts SET available = available - $4, held = held + $4, updated_at = now()
                WHERE user_id = $3 AND available >= $4
                RETURNING user_id, available
             ), h AS (
                INSERT INTO holds (hold_id, request_id, user_id, chatflow_id, amount)
                SELECT $1, $2, user_id, $5, $4 FROM a
             ), l AS (
                INSERT INTO ledger (user_id, kind, delta_available, delta_held, hold_id, request_id, chatflow_id)
                SELECT user_id, 'hold', -$4, $4, $1, $2, $5 FROM a
             )
             SELECT available FROM a",
        )
        .await?;
    let row = c
        .query_opt(
            &stmt,
            &[&hold_id, &request_id, &user_id, &amount, &chatflow_id],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleKind {
    Capture,
    Void,
}

impl SettleKind {
    fn state(self) -> &'static str {
        match self {
            SettleKind::Capture => "captured",
            SettleKind::Void => "voided",
        }
    }
    fn ledger_kind(self) -> &'static str {
        match self {
            SettleKind::Capture => "capture",
            SettleKind::Void => "void",
        }
    }
}

/// Settles one open hold: keeps `capture` (clamped to the hold) and releases the
/// rest. Returns the captured amount, or `None` when the hold was already settled
/// (replays change nothing).
pub async fn settle(
    c: &deadpool_postgres::Transaction<'_>,
    user_id: i64,
    hold_id: Uuid,
    kind: SettleKind,
    capture: i64,
) -> Result<Option<(i64, i64)>, tokio_postgres::Error> {
    let stmt = c
        .prepare_cached(
            "WITH h AS (
                UPDATE holds SET state = $2, captured = LEAST($3, amount), settled_at = now()
                WHERE user_id = $5 AND hold_id = $1 AND state = 'open'
                RETURNING user_id, amount, LEAST($3, amount) AS kept, request_id, chatflow_id
             ), a AS (
                UPDATE accounts SET held = held - h.amount, available = available + (h.amount - h.kept),
                       updated_at = now()
                FROM h WHERE accounts.user_id = h.user_id
             ), l AS (
                INSERT INTO ledger (user_id, kind, delta_available, delta_held, hold_id, request_id, chatflow_id)
                SELECT user_id, $4, amount - kept, -amount, $1, request_id, chatflow_id FROM h
             )
             SELECT kept, amount FROM h",
        )
        .await?;
    let capture = if kind == SettleKind::Capture {
        capture.max(0)
    } else {
        0
    };
    let row = c
        .query_opt(
            &stmt,
            &[
                &hold_id,
                &kind.state(),
                &capture,
                &kind.ledger_kind(),
                &user_id,
            ],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Marks the open holds of requests still running as alive (`renewed_at`).
pub async fn renew(db: &Db, user_ids: &[i64], hold_ids: &[Uuid]) -> StoreResult<u64> {
    let c = db.get().await?;
    let stmt = c
        .prepare_cached(
            "UPDATE holds SET renewed_at = now()
             WHERE user_id = ANY($1) AND hold_id = ANY($2) AND state = 'open'",
        )
        .await?;
    Ok(c.execute(&stmt, &[&user_ids, &hold_ids]).await?)
}

/// Expires open holds whose renewal stopped more than `ttl_seconds`, as any instance may, at once with
/// others (rows being settled elsewhere are skipped). Returns (holds, credits).
pub async fn expire_stale(db: &Db, ttl_seconds: f64) -> StoreResult<(i64, i64)> {
    let c = db.get().await?;
    let row = c
        .query_one(
            "WITH h AS (
                UPDATE holds SET state = 'expired', captured = 0, settled_at = now()
                WHERE state = 'open' AND hold_id IN (
                    SELECT hold_id FROM holds
                    WHERE state = 'open' AND renewed_at < now() - make_interval(secs => $1)
                    ORDER BY renewed_at LIMIT 500 FOR UPDATE SKIP LOCKED)
                RETURNING hold_id, user_id, amount, request_id, chatflow_id
             ), s AS (
                SELECT user_id, sum(amount) AS amount FROM h GROUP BY user_id
             ), a AS (
                UPDATE accounts SET held = held - s.amount, available = available + s.amount, updated_at = now()
                FROM s WHERE accounts.user_id = s.user_id
             ), l AS (
                INSERT INTO ledger (user_id, kind, delta_available, delta_held, hold_id, request_id, chatflow_id)
                SELECT user_id, 'expire', amount, -amount, hold_id, request_id, chatflow_id FROM h
             )
             SELECT count(*), COALESCE(sum(amount), 0)::bigint FROM h",
            &[&ttl_seconds],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

pub enum Adjusted {
    Applied {
        available: i64,
    },
    /// The idempotency key was used before: nothing changed.
    Replayed {
        available: i64,
    },
}

/// A top-up (`grant`) or correction (`adjust`), idempotent by key.
pub async fn adjust(
    db: &Db,
    user_id: i64,
    amount: i64,
    kind: &str,
    reason: &str,
    idempotency_key: Option<&str>,
    actor_id: Option<i64>,
) -> StoreResult<Adjusted> {
    let c = db.get().await?;
    let row = c
        .query_opt(
            "WITH l AS (
                INSERT INTO ledger (user_id, kind, delta_available, delta_held, idempotency_key, reason, actor_id)
                SELECT $1, $3, $2, 0, $4, $5, $6 FROM accounts WHERE user_id = $1
                ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                RETURNING delta_available
             )
             UPDATE accounts SET available = available + l.delta_available, updated_at = now()
             FROM l WHERE accounts.user_id = $1
             RETURNING available",
            &[&user_id, &amount, &kind, &idempotency_key, &reason, &actor_id],
        )
        .await;
    match row {
        Ok(Some(r)) => Ok(Adjusted::Applied {
            available: r.get(0),
        }),
        Ok(None) => {
            let (available, _) = balance(db, user_id).await?.ok_or(StoreError::NotFound)?;
            Ok(Adjusted::Replayed { available })
        }
        Err(e)
            if e.as_db_error().map(|d| d.code())
                == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) =>
        {
            Err(StoreError::Conflict(
                "the balance cannot go below zero".into(),
            ))
        }
        Err(e)
            if e.as_db_error().map(|d| d.code())
                == Some(&tokio_postgres::error::SqlState::NUMERIC_VALUE_OUT_OF_RANGE) =>
        {
            Err(StoreError::Invalid(
                "amount: the balance would exceed the largest possible amount".into(),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// (available, held)
pub async fn balance(db: &Db, user_id: i64) -> StoreResult<Option<(i64, i64)>> {
    let c = db.get().await?;
    let stmt = c
        .prepare_cached("SELECT available, held FROM accounts WHERE user_id = $1")
        .await?;
    let row = c.query_opt(&stmt, &[&user_id]).await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

pub async fn ledger_page(
    db: &Db,
    user_id: i64,
    limit: i64,
    offset: i64,
) -> StoreResult<Vec<Value>> {
    let c = db.get().await?;
    let rows = c
        .query(
            "SELECT id, kind, delta_available, delta_held, request_id, idempotency_key, chatflow_id,
                    reason, actor_id, created_at
             FROM ledger WHERE user_id = $1 ORDER BY id DESC LIMIT $2 OFFSET $3",
            &[&user_id, &limit, &offset],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let at: DateTime<Utc> = r.get(9);
            json!({
                "id": r.get::<_, i64>(0), "kind": r.get::<_, String>(1),
                "delta_available": r.get::<_, i64>(2), "delta_held": r.get::<_, i64>(3),
                "request_id": r.get::<_, Option<String>>(4),
                "idempotency_key": r.get::<_, Option<String>>(5),
                "chatflow_id": r.get::<_, Option<String>>(6), "reason": r.get::<_, Option<String>>(7),
                "actor_id": r.get::<_, Option<i64>>(8), "created_at": at,
            })
        })
        .collect())
}

/// Accounts whose balance differs from the sum of their ledger rows or from
/// their open holds, and open holds older than the TTL.
pub async fn verify(db: &Db, ttl_seconds: f64) -> StoreResult<Vec<String>> {
    let c = db.get().await?;
    let mut problems = Vec::new();
    let drift = c
        .query(
            "SELECT a.user_id, a.available, a.held,
                    COALESCE(l.avail, 0)::bigint, COALESCE(l.held, 0)::bigint, COALESCE(h.open, 0)::bigint
             FROM accounts a
             LEFT JOIN (SELECT user_id, sum(delta_available) avail, sum(delta_held) held
                        FROM ledger GROUP BY user_id) l ON l.user_id = a.user_id
             LEFT JOIN (SELECT user_id, sum(amount) open FROM holds WHERE state = 'open'
                        GROUP BY user_id) h ON h.user_id = a.user_id
             WHERE a.available <> COALESCE(l.avail, 0) OR a.held <> COALESCE(l.held, 0)
                OR a.held <> COALESCE(h.open, 0)
             ORDER BY a.user_id",
            &[],
        )
        .await?;
    for r in drift {
        problems.push(format!(
            "user {}: available {} held {} but ledger sums to available {} held {}, open holds {}",
            r.get::<_, i64>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3),
            r.get::<_, i64>(4),
            r.get::<_, i64>(5)
        ));
    }
    let orphans = c
        .query(
            "SELECT hold_id, user_id, amount, created_at FROM holds
             WHERE state = 'open' AND renewed_at < now() - make_interval(secs => $1)
             ORDER BY created_at LIMIT 100",
            &[&ttl_seconds],
        )
        .await?;
    for r in orphans {
        let at: DateTime<Utc> = r.get(3);
        problems.push(format!(
            "hold {} of user {} ({} credits) open since {} (older than the TTL)",
            r.get::<_, Uuid>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            at.to_rfc3339()
        ));
    }
    Ok(problems)
}
