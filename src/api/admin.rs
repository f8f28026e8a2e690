//! `/admin/*` (role admin). Every change writes an audit row.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{page, parse_body, ApiResult, Call, Reply};
use crate::app::App;
use crate::auth::password;
use crate::errors::ApiError;
use crate::ledger::{self, Adjusted};
use crate::route::AdminRoute;
use crate::store;
use crate::validate;

async fn audit(
    app: &App,
    call: &Call,
    action: &str,
    target: String,
    details: Value,
) -> Result<(), ApiError> {
    store::identity::audit(
        &app.db,
        call.user_id(),
        action,
        &target,
        &details,
        &call.request_id,
    )
    .await?;
    Ok(())
}

/// Audits a change to users, keys, grants or prices, then reloads this
/// instance's identity snapshot so the change is in force here before the
/// answer goes out (other instances follow through NOTIFY).
async fn audit_identity_change(
    app: &App,
    call: &Call,
    action: &str,
    target: String,
    details: Value,
) -> Result<(), ApiError> {
    audit(app, call, action, target, details).await?;
    app.auth.snapshot.refresh_now().await;
    Ok(())
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct NewUser {
    username: String,
    password: String,
    #[serde(default = "default_role")]
    #[schema(default = "user")]
    role: String,
    email: Option<String>,
}
fn default_role() -> String {
    "user".into()
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct UserPatch {
    role: Option<String>,
    active: Option<bool>,
    email: Option<String>,
    password: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct CreditChange {
    /// Positive grants, negative takes back; never zero.
    amount: i64,
    /// Up to 500 characters, kept in the ledger.
    reason: String,
    /// 1-200 characters: a change with a key already applied is not applied again.
    idempotency_key: String,
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
pub(crate) struct NewKey {
    name: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct Pricing {
    #[serde(default, with = "double_option")]
    credit_cost: Option<Option<i64>>,
    #[serde(default, with = "double_option")]
    credits_per_1k_tokens: Option<Option<i64>>,
    #[serde(default, with = "double_option")]
    max_hold: Option<Option<i64>>,
}

/// Tells an absent field (leave as is) from `null` (clear it).
mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
        Option::<i64>::deserialize(d).map(Some)
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct GrantBody {
    user_id: Option<i64>,
    username: Option<String>,
}

async fn hash(p: String) -> Result<String, ApiError> {
    password::hash_password_pooled(p)
        .await
        .ok_or_else(ApiError::busy)?
        .map_err(|_| ApiError::internal())
}

async fn resolve_user(app: &App, body: &GrantBody) -> Result<i64, ApiError> {
    if let Some(id) = body.user_id {
        return Ok(store::identity::get_user(&app.db, id).await?.id);
    }
    if let Some(name) = &body.username {
        validate::username(name)?;
        return store::identity::find_user_by_name(&app.db, name)
            .await?
            .map(|u| u.id)
            .ok_or_else(ApiError::not_found);
    }
    Err(ApiError::validation("user_id or username is required"))
}

pub async fn handle(app: &App, call: &Call, route: AdminRoute) -> ApiResult {
    use AdminRoute::*;
    let (limit, offset) = page(call.query.as_deref());
    match route {
        ListUsers => Ok(Reply::ok(json!(
            store::identity::list_users(&app.db, limit, offset).await?
        ))),
        GetUser(id) => {
            let u = store::identity::get_user(&app.db, id).await?;
            let (available, held) = app.ledger.balance(id).await?.unwrap_or((0, 0));
            let mut v = json!(u);
            v["credits"] = json!(available);
            v["held"] = json!(held);
            Ok(Reply::ok(v))
        }
        CreateUser => {
            let b: NewUser = parse_body(call)?;
            validate::username(&b.username)?;
            validate::password(&b.password)?;
            validate::role(&b.role)?;
            if let Some(e) = &b.email {
                validate::email(e)?;
            }
            let h = hash(b.password).await?;
            let u =
                store::identity::create_user(&app.db, &b.username, &h, &b.role, b.email.as_deref())
                    .await?;
            audit_identity_change(
                app,
                call,
                "user.create",
                format!("user:{}", u.id),
                json!({"username": u.username, "role": u.role}),
            )
            .await?;
            Ok(Reply::with_status(201, json!(u)))
        }
        PatchUser(id) => {
            let b: UserPatch = parse_body(call)?;
            if let Some(r) = &b.role {
                validate::role(r)?;
            }
            if let Some(e) = &b.email {
                validate::email(e)?;
            }
            let h = match b.password {
                Some(p) => {
                    validate::password(&p)?;
                    Some(hash(p).await?)
                }
                None => None,
            };
            let u = store::identity::update_user(
                &app.db,
                id,
                b.role.as_deref(),
                b.active,
                b.email.as_deref(),
                h.as_deref(),
            )
            .await?;
            audit_identity_change(
                app,
                call,
                "user.update",
                format!("user:{id}"),
                json!({"role": b.role, "active": b.active, "password_changed": h.is_some()}),
            )
            .await?;
            Ok(Reply::ok(json!(u)))
        }
        DeleteUser(id) => {
            // Deactivate: the ledger keeps its history.
            let u =
                store::identity::update_user(&app.db, id, None, Some(false), None, None).await?;
            audit_identity_change(
                app,
                call,
                "user.deactivate",
                format!("user:{id}"),
                json!({}),
            )
            .await?;
            Ok(Reply::ok(json!(u)))
        }
        UserCredits(id) => {
            let b: CreditChange = parse_body(call)?;
            validate::credit_change(b.amount, &b.reason, Some(&b.idempotency_key))?;
            store::identity::get_user(&app.db, id).await?;
            let res = ledger::change_balance(
                &app.db,
                id,
                b.amount,
                &b.reason,
                Some(&b.idempotency_key),
                call.user_id(),
            )
            .await?;
            let (available, replayed) = match res {
                Adjusted::Applied { available } => (available, false),
                Adjusted::Replayed { available } => (available, true),
            };
            if !replayed {
                audit(app, call, "credits.change", format!("user:{id}"),
                    json!({"amount": b.amount, "reason": b.reason, "idempotency_key": b.idempotency_key})).await?;
            }
            Ok(Reply::ok(
                json!({"user_id": id, "credits": available, "replayed": replayed}),
            ))
        }
        UserLedger(id) => {
            store::identity::get_user(&app.db, id).await?;
            let rows = store::ledger::ledger_page(&app.db, id, limit, offset).await?;
            Ok(Reply::ok(
                json!({"user_id": id, "limit": limit, "offset": offset, "entries": rows}),
            ))
        }
        CreateApiKey(id) => {
            let b: NewKey = if call.body.is_some() {
                parse_body(call)?
            } else {
                NewKey::default()
            };
            if let Some(n) = &b.name {
                validate::key_name(n)?;
            }
            store::identity::get_user(&app.db, id).await?;
            let k = password::new_api_key();
            let (key_id, created) = store::identity::insert_api_key(
                &app.db,
                id,
                &k.prefix,
                &k.secret_hash,
                b.name.as_deref(),
            )
            .await?;
            audit_identity_change(
                app,
                call,
                "apikey.create",
                format!("user:{id}"),
                json!({"key_id": key_id, "prefix": k.prefix}),
            )
            .await?;
            Ok(Reply::with_status(
                201,
                json!({"id": key_id, "user_id": id, "api_key": k.token, "prefix": k.prefix, "created_at": created}),
            ))
        }
        RevokeApiKey(key_id) => {
            let owner = store::identity::revoke_api_key(&app.db, key_id).await?;
            audit_identity_change(
                app,
                call,
                "apikey.revoke",
                format!("apikey:{key_id}"),
                json!({"user_id": owner}),
            )
            .await?;
            Ok(Reply::ok(json!({"revoked": true, "id": key_id})))
        }
        ListChatflows => Ok(Reply::ok(json!(store::catalog::all(&app.db).await?))),
        SyncChatflows => {
            let n = crate::catalog::sync(app).await?;
            audit(
                app,
                call,
                "chatflows.sync",
                "chatflows".into(),
                json!({"count": n}),
            )
            .await?;
            Ok(Reply::ok(
                json!({"synced": n, "chatflows": store::catalog::all(&app.db).await?}),
            ))
        }
        PatchChatflow(id) => {
            let b: Pricing = parse_body(call)?;
            for v in [b.credit_cost, b.credits_per_1k_tokens]
                .into_iter()
                .flatten()
                .flatten()
            {
                if v < 0 {
                    return Err(ApiError::validation("prices must not be negative"));
                }
            }
            if let Some(Some(m)) = b.max_hold {
                if m <= 0 {
                    return Err(ApiError::validation("max_hold must be positive"));
                }
            }
            let c = store::catalog::set_pricing(
                &app.db,
                &id,
                b.credit_cost,
                b.credits_per_1k_tokens,
                b.max_hold,
            )
            .await?;
            audit_identity_change(app, call, "chatflow.pricing", format!("chatflow:{id}"),
                json!({"credit_cost": c.credit_cost, "credits_per_1k_tokens": c.credits_per_1k_tokens, "max_hold": c.max_hold})).await?;
            Ok(Reply::ok(json!(c)))
        }
        ChatflowUsers(id) => Ok(Reply::ok(json!(
            store::identity::chatflow_users(&app.db, &id).await?
        ))),
        GrantChatflow(id) => {
            let b: GrantBody = parse_body(call)?;
            let user_id = resolve_user(app, &b).await?;
            if !app.auth.snapshot.get().chatflows.contains_key(&id) {
                return Err(ApiError::new(
                    404,
                    "not_found",
                    "This chatflow is not in the catalogue: grants name chatflows the proxy \
                     synced from Flowise; run POST /admin/chatflows/sync (or wait for the \
                     periodic sync) after creating it in Flowise",
                ));
            }
            let created = store::identity::grant(&app.db, user_id, &id).await?;
            audit_identity_change(
                app,
                call,
                "grant.add",
                format!("chatflow:{id}"),
                json!({"user_id": user_id}),
            )
            .await?;
            Ok(Reply::with_status(
                if created { 201 } else { 200 },
                json!({"chatflow_id": id, "user_id": user_id, "granted": true}),
            ))
        }
        RevokeChatflow(id) => {
            let b: GrantBody = if call.body.is_some() {
                parse_body(call)?
            } else {
                GrantBody {
                    user_id: crate::api::drop_in_query_i64(call, "user_id"),
                    username: crate::api::drop_in_query(call, "username"),
                }
            };
            let user_id = resolve_user(app, &b).await?;
            let removed = store::identity::revoke_grant(&app.db, user_id, &id).await?;
            audit_identity_change(
                app,
                call,
                "grant.remove",
                format!("chatflow:{id}"),
                json!({"user_id": user_id}),
            )
            .await?;
            Ok(Reply::ok(
                json!({"chatflow_id": id, "user_id": user_id, "revoked": removed}),
            ))
        }
        Audit => Ok(Reply::ok(
            json!({"limit": limit, "offset": offset, "entries": store::identity::audit_page(&app.db, limit, offset).await?}),
        )),
    }
}
