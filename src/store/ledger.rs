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

// A batch's lease charges and closes, one call: the function (migrations V9,
// V12) runs, per lease, the statements that write its rows and close it; see
// there for why it is one call and not one statement per lease.
const CHARGE_AND_CLOSE_LEASES_SQL: &str =
    "SELECT charge_and_close_leases($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

// Part of an open lease back to available, answering another instance's
// recall (a lease's close is the settlement's, in the call above).
const GIVE_BACK_SQL: &str = "WITH cur AS (
                SELECT hold_id,
                       LEAST($3, amount - COALESCE(captured, 0) - released) AS r
                FROM holds WHERE user_id = $1 AND hold_id = $2 AND state = 'open' AND lease
                FOR UPDATE
             ), h AS (
                UPDATE holds SET released = released + cur.r, recalled = true
                FROM cur WHERE holds.user_id = $1 AND holds.hold_id = cur.hold_id
                RETURNING cur.r
             ), a AS (
                UPDATE accounts SET held = held - h.r, available = available + h.r, updated_at = now()
                FROM h WHERE accounts.user_id = $1 AND h.r > 0
             ), l AS (
                INSERT INTO ledger (user_id, kind, delta_available, delta_held, hold_id, lease_id)
                SELECT $1, 'release', r, -r, $4, $2 FROM h WHERE r > 0
             )
             SELECT r FROM h";

const SETTLE_SQL: &str = "WITH h AS (
                UPDATE holds SET state = $2::text::hold_state, captured = LEAST($3, amount), settled_at = now()
                WHERE user_id = $5 AND hold_id = $1 AND state = 'open'
                RETURNING user_id, amount, LEAST($3, amount) AS kept, request_id, chatflow_id
             ), a AS (
                UPDATE accounts SET held = held - h.amount, available = available + (h.amount - h.kept),
                       updated_at = now()
                FROM h WHERE accounts.user_id = h.user_id
             ), l AS (
                INSERT INTO ledger (user_id, kind, delta_available, delta_held, hold_id, request_id, chatflow_id)
                SELECT user_id, $4::text::ledger_kind, amount - kept, -amount, $1, request_id, chatflow_id FROM h
             )
             SELECT kept, amount FROM h";

/// Prepares the settlement statements on this connection before a batch
/// pipelines them: a statement's query goes out when it is first polled only
/// once its preparation is cached, and a lease's charges must reach the
/// server before its close.
pub async fn prepare_settlement(
    c: &deadpool_postgres::Transaction<'_>,
) -> Result<(), tokio_postgres::Error> {
    for sql in [SETTLE_SQL, CHARGE_AND_CLOSE_LEASES_SQL] {
        c.prepare_cached(sql).await?;
    }
    Ok(())
}

/// Takes a lease: moves up to `max` (at least `min`) from available to held as
/// one hold with `lease = true`, and writes its `lease` ledger row, in one
/// statement. `(available after, taken)`, or `None` when less than `min` is
/// available. Runs inside the caller's transaction.
pub async fn take_lease(
    c: &deadpool_postgres::Transaction<'_>,
    lease_id: Uuid,
    user_id: i64,
    min: i64,
    max: i64,
) -> Result<Option<(i64, i64)>, tokio_postgres::Error> {
    let stmt = c
        .prepare_cached(
            "WITH cur AS (
                SELECT user_id, LEAST(available, $4) AS take FROM accounts
                WHERE user_id = $2 AND available >= $3
                FOR UPDATE
             ), a AS (
                UPDATE accounts SET available = available - cur.take, held = held + cur.take,
                       updated_at = now()
                FROM cur WHERE accounts.user_id = $2 AND accounts.user_id = cur.user_id
                RETURNING accounts.user_id, accounts.available, cur.take
             ), h AS (
                INSERT INTO holds (hold_id, request_id, user_id, amount, lease)
                SELECT $1, 'lease', user_id, take, true FROM a
             ), l AS (
                INSERT INTO ledger (user_id, kind, delta_available, delta_held, hold_id, lease_id)
                SELECT user_id, 'lease', -take, take, $1, $1 FROM a
             )
             SELECT available, take FROM a",
        )
        .await?;
    let row = c
        .query_opt(&stmt, &[&lease_id, &user_id, &min, &max])
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// One prediction admitted on a lease, as its ledger row records it.
pub struct LeaseCharge<'a> {
    /// The prediction's own id (the row's `hold_id`).
    pub id: Uuid,
    /// Credits kept; 0 for a voided prediction.
    pub amount: i64,
    /// `charge`, or `void` (nothing moves).
    pub kind: &'static str,
    pub request_id: &'a str,
    pub chatflow_id: &'a str,
}

/// The predictions admitted on one lease of one user since the last batch,
/// and whether the lease closes after them.
pub struct LeaseCharges<'a> {
    pub user_id: i64,
    pub lease_id: Uuid,
    pub rows: Vec<LeaseCharge<'a>>,
    /// Close the lease after its rows: what it still holds goes back to
    /// available, with a `release` ledger row.
    pub close: bool,
}

/// Writes the rows of predictions admitted on leases, moves what they kept
/// out of held, and closes the leases that asked for it: per lease, one
/// statement for its charges and one for its close, inside one call (so a
/// batch costs one round trip, migrations V9 and V12). `leases` must be in
/// the batch's lock order (by user). Rows already written (a batch retried
/// after a commit whose answer was lost) are skipped, and a lease already
/// closed is not closed again. Per lease, `false` when it had rows and is no
/// longer open (expired): nothing is written for them. The charge changes no
/// indexed column (renewal is the renewer's), so both of its updates are
/// HOT: no index entries per batch.
pub async fn charge_and_close_leases(
    c: &deadpool_postgres::Transaction<'_>,
    leases: &[LeaseCharges<'_>],
) -> Result<Vec<bool>, StoreError> {
    let stmt = c.prepare_cached(CHARGE_AND_CLOSE_LEASES_SQL).await?;
    let users: Vec<i64> = leases.iter().map(|l| l.user_id).collect();
    let ids_of_leases: Vec<Uuid> = leases.iter().map(|l| l.lease_id).collect();
    let closes: Vec<bool> = leases.iter().map(|l| l.close).collect();
    // The id of each close's `release` row (unused where nothing closes).
    let release_ids: Vec<Uuid> = leases
        .iter()
        .map(|l| if l.close { Uuid::now_v7() } else { Uuid::nil() })
        .collect();
    // Where each lease's rows end in the row arrays (a batch holds at most
    // `SETTLE_BATCH` rows, far below i32::MAX).
    let mut end = 0usize;
    let ends: Vec<i32> = leases
        .iter()
        .map(|l| {
            end += l.rows.len();
            i32::try_from(end).unwrap_or(i32::MAX)
        })
        .collect();
    let rows = || leases.iter().flat_map(|l| l.rows.iter());
    let ids: Vec<Uuid> = rows().map(|c| c.id).collect();
    let amounts: Vec<i64> = rows().map(|c| c.amount).collect();
    let kinds: Vec<&str> = rows().map(|c| c.kind).collect();
    let rids: Vec<&str> = rows().map(|c| c.request_id).collect();
    let cfs: Vec<&str> = rows().map(|c| c.chatflow_id).collect();
    let row = c
        .query_one(
            &stmt,
            &[
                &users,
                &ids_of_leases,
                &ends,
                &closes,
                &release_ids,
                &ids,
                &amounts,
                &kinds,
                &rids,
                &cfs,
            ],
        )
        .await?;
    let open: Vec<bool> = row.try_get(0)?;
    if open.len() != leases.len() {
        // The batch is rolled back and retried rather than settled on a
        // guess.
        return Err(StoreError::Unavailable(format!(
            "charge_and_close_leases answered for {} leases, asked for {}",
            open.len(),
            leases.len()
        )));
    }
    Ok(open)
}

/// Gives back up to `amount` of an open lease (at most its open remainder)
/// with a `release` ledger row, and marks the lease as having answered a
/// recall; it stays open. Returns what was released, `None` when the lease
/// is not open.
pub async fn give_back_part(
    c: &deadpool_postgres::Transaction<'_>,
    user_id: i64,
    lease_id: Uuid,
    amount: i64,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let stmt = c.prepare_cached(GIVE_BACK_SQL).await?;
    let release_id = Uuid::now_v7();
    let row = c
        .query_opt(&stmt, &[&user_id, &lease_id, &amount, &release_id])
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Open leases of `user_id` held by other instances (not in `own`) that are
/// alive (renewed within `alive_seconds`) and not yet recalled.
pub async fn unrecalled_leases(
    db: &Db,
    user_id: i64,
    own: &[Uuid],
    alive_seconds: f64,
) -> StoreResult<i64> {
    let c = db.get().await?;
    let stmt = c
        .prepare_cached(
            "SELECT count(*) FROM holds
             WHERE user_id = $1 AND state = 'open' AND lease AND NOT recalled
               AND hold_id <> ALL($2) AND renewed_at > now() - make_interval(secs => $3)",
        )
        .await?;
    Ok(c.query_one(&stmt, &[&user_id, &own, &alive_seconds])
        .await?
        .get(0))
}

/// `(available, held, open leases with their open remainders)` of one user.
pub async fn balance_with_leases(
    db: &Db,
    user_id: i64,
) -> StoreResult<Option<(i64, i64, Vec<(Uuid, i64)>)>> {
    let c = db.get().await?;
    let stmt = c
        .prepare_cached(
            "SELECT a.available, a.held,
                    COALESCE(array_agg(h.hold_id) FILTER (WHERE h.hold_id IS NOT NULL), '{}'),
                    COALESCE(array_agg(h.amount - COALESCE(h.captured, 0) - h.released)
                             FILTER (WHERE h.hold_id IS NOT NULL), '{}')
             FROM accounts a
             LEFT JOIN holds h ON h.user_id = a.user_id AND h.state = 'open' AND h.lease
             WHERE a.user_id = $1
             GROUP BY a.available, a.held",
        )
        .await?;
    let Some(r) = c.query_opt(&stmt, &[&user_id]).await? else {
        return Ok(None);
    };
    let ids: Vec<Uuid> = r.get(2);
    let open: Vec<i64> = r.get(3);
    Ok(Some((
        r.get(0),
        r.get(1),
        ids.into_iter().zip(open).collect(),
    )))
}

/// Binds conversations Flowise started to their owners (first use wins), in
/// one statement; written with a settlement batch.
pub async fn bind_sessions(
    c: &deadpool_postgres::Transaction<'_>,
    session_ids: &[&str],
    user_ids: &[i64],
    chatflow_ids: &[&str],
) -> Result<(), tokio_postgres::Error> {
    let stmt = c
        .prepare_cached(
            "INSERT INTO sessions (session_id, user_id, chatflow_id)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])
             ON CONFLICT (session_id) DO NOTHING",
        )
        .await?;
    c.execute(&stmt, &[&session_ids, &user_ids, &chatflow_ids])
        .await?;
    Ok(())
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
    let stmt = c.prepare_cached(SETTLE_SQL).await?;
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
                UPDATE holds SET state = 'expired', captured = COALESCE(captured, 0), settled_at = now()
                WHERE state = 'open' AND hold_id IN (
                    SELECT hold_id FROM holds
                    WHERE state = 'open' AND renewed_at < now() - make_interval(secs => $1)
                    ORDER BY renewed_at LIMIT 500 FOR UPDATE SKIP LOCKED)
                RETURNING hold_id, user_id, amount - captured - released AS amount, request_id, chatflow_id,
                          CASE WHEN lease THEN hold_id END AS lease_id
             ), s AS (
                SELECT user_id, sum(amount) AS amount FROM h GROUP BY user_id
             ), a AS (
                UPDATE accounts SET held = held - s.amount, available = available + s.amount, updated_at = now()
                FROM s WHERE accounts.user_id = s.user_id
             ), l AS (
                INSERT INTO ledger (user_id, kind, delta_available, delta_held, hold_id, request_id, chatflow_id, lease_id)
                SELECT user_id, 'expire', amount, -amount, hold_id, request_id, chatflow_id, lease_id FROM h
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
                SELECT $1, $3::text::ledger_kind, $2, 0, $4, $5, $6 FROM accounts WHERE user_id = $1
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
            "SELECT id, kind::text, delta_available, delta_held, request_id, idempotency_key, chatflow_id,
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
    // Each check: a query whose rows are problems, and how a row reads.
    let mut check = async |sql: &str,
                           params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
                           describe: fn(&tokio_postgres::Row) -> String|
           -> StoreResult<()> {
        let rows = c.query(sql, params).await?;
        problems.extend(rows.iter().map(describe));
        Ok(())
    };
    check(
        "SELECT a.user_id, a.available, a.held,
                COALESCE(l.avail, 0)::bigint, COALESCE(l.held, 0)::bigint, COALESCE(h.open, 0)::bigint
         FROM accounts a
         LEFT JOIN (SELECT user_id, sum(delta_available) avail, sum(delta_held) held
                    FROM ledger GROUP BY user_id) l ON l.user_id = a.user_id
         LEFT JOIN (SELECT user_id, sum(amount - COALESCE(captured, 0) - released) open
                    FROM holds WHERE state = 'open'
                    GROUP BY user_id) h ON h.user_id = a.user_id
         WHERE a.available <> COALESCE(l.avail, 0) OR a.held <> COALESCE(l.held, 0)
            OR a.held <> COALESCE(h.open, 0)
         ORDER BY a.user_id",
        &[],
        |r| {
            format!(
                "user {}: available {} held {} but ledger sums to available {} held {}, open holds {}",
                r.get::<_, i64>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2),
                r.get::<_, i64>(3),
                r.get::<_, i64>(4),
                r.get::<_, i64>(5)
            )
        },
    )
    .await?;
    // The ledger has no foreign key (migration V8): a row whose user has no
    // account is found here instead.
    check(
        "SELECT l.user_id, count(*) FROM ledger l
         WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = l.user_id)
         GROUP BY l.user_id ORDER BY l.user_id LIMIT 100",
        &[],
        |r| {
            format!(
                "user {}: {} ledger rows but no account",
                r.get::<_, i64>(0),
                r.get::<_, i64>(1)
            )
        },
    )
    .await?;
    check(
        "SELECT hold_id, user_id, amount, created_at FROM holds
         WHERE state = 'open' AND renewed_at < now() - make_interval(secs => $1)
         ORDER BY created_at LIMIT 100",
        &[&ttl_seconds],
        |r| {
            format!(
                "hold {} of user {} ({} credits) open since {} (older than the TTL)",
                r.get::<_, Uuid>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2),
                r.get::<_, DateTime<Utc>>(3).to_rfc3339()
            )
        },
    )
    .await?;
    Ok(problems)
}
