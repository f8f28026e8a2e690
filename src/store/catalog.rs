//! The chatflow catalogue as synced from Flowise, plus our pricing fields.

use super::{Db, StoreError, StoreResult};

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ChatflowRow {
    pub id: String,
    pub name: String,
    pub category: Option<String>,
    pub deployed: bool,
    pub deleted: bool,
    pub credit_cost: Option<i64>,
    pub credits_per_1k_tokens: Option<i64>,
    pub max_hold: Option<i64>,
}

const COLS: &str =
    "id, name, category, deployed, deleted, credit_cost, credits_per_1k_tokens, max_hold";

fn row(r: &tokio_postgres::Row) -> ChatflowRow {
    ChatflowRow {
        id: r.get(0),
        name: r.get(1),
        category: r.get(2),
        deployed: r.get(3),
        deleted: r.get(4),
        credit_cost: r.get(5),
        credits_per_1k_tokens: r.get(6),
        max_hold: r.get(7),
    }
}

pub async fn all_in(c: &impl deadpool_postgres::GenericClient) -> StoreResult<Vec<ChatflowRow>> {
    let rows = c
        .query(
            &format!("SELECT {COLS} FROM chatflows ORDER BY name, id"),
            &[],
        )
        .await?;
    Ok(rows.iter().map(row).collect())
}

/// Adds a placeholder row for a chatflow the catalogue has not synced yet
/// (the next sync fills it in); an existing row is left alone.
pub async fn ensure_known(db: &Db, id: &str) -> StoreResult<()> {
    let c = db.get().await?;
    c.execute(
        "INSERT INTO chatflows (id) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&id],
    )
    .await?;
    Ok(())
}

pub async fn all(db: &Db) -> StoreResult<Vec<ChatflowRow>> {
    let c = db.get().await?;
    all_in(&c).await
}

/// One synced chatflow as Flowise lists it.
pub struct SyncedChatflow {
    pub id: String,
    pub name: String,
    pub category: Option<String>,
    pub deployed: bool,
}

/// Upserts what Flowise listed and marks the rest deleted (grants are kept).
/// Only called with a non-empty, successfully parsed list. Concurrent syncs from
/// several instances serialise on a transaction-scoped advisory lock.
pub async fn sync(db: &Db, flows: &[SyncedChatflow]) -> StoreResult<(u64, u64)> {
    let mut c = db.get().await?;
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(7172034)", &[])
        .await?;
    let mut upserted = 0;
    let ids: Vec<&str> = flows.iter().map(|f| f.id.as_str()).collect();
    for f in flows {
        upserted += tx
            .execute(
                "INSERT INTO chatflows (id, name, category, deployed, deleted, synced_at)
                 VALUES ($1, $2, $3, $4, false, now())
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, category = EXCLUDED.category,
                    deployed = EXCLUDED.deployed, deleted = false, synced_at = now()
                 WHERE (chatflows.name, chatflows.category, chatflows.deployed, chatflows.deleted)
                    IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.category, EXCLUDED.deployed, false)",
                &[&f.id, &f.name, &f.category, &f.deployed],
            )
            .await?;
    }
    let deleted = tx
        .execute(
            "UPDATE chatflows SET deleted = true WHERE NOT deleted AND NOT (id = ANY($1))",
            &[&ids],
        )
        .await?;
    tx.commit().await?;
    Ok((upserted, deleted))
}

pub async fn set_pricing(
    db: &Db,
    id: &str,
    credit_cost: Option<Option<i64>>,
    per_1k: Option<Option<i64>>,
    max_hold: Option<Option<i64>>,
) -> StoreResult<ChatflowRow> {
    let c = db.get().await?;
    let r = c
        .query_opt(
            &format!(
                "UPDATE chatflows SET
                    credit_cost = CASE WHEN $2 THEN $3 ELSE credit_cost END,
                    credits_per_1k_tokens = CASE WHEN $4 THEN $5 ELSE credits_per_1k_tokens END,
                    max_hold = CASE WHEN $6 THEN $7 ELSE max_hold END
                 WHERE id = $1 RETURNING {COLS}"
            ),
            &[
                &id,
                &credit_cost.is_some(),
                &credit_cost.flatten(),
                &per_1k.is_some(),
                &per_1k.flatten(),
                &max_hold.is_some(),
                &max_hold.flatten(),
            ],
        )
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(row(&r))
}
