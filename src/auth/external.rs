//! Bearer tokens issued elsewhere, verified locally: the old Python service's
//! login service (HS256 with a shared secret, `EXTERNAL_JWT_*`) and one OpenID
//! Connect provider (RS256/ES256 against its JWKS, `OIDC_*`).
//!
//! A token is routed by its (not yet trusted) `iss` claim: this proxy's own
//! issuer goes to the local check, the provider's issuer to the JWKS check (which
//! accepts only the provider's asymmetric algorithms, so a token "signed" with
//! HS256 over the provider's public key is refused), anything else to the login
//! service when one is configured. The routing only picks which check runs; the
//! check then pins issuer, audience and algorithm itself.
//!
//! An identity (issuer, subject) maps to one local user, created the first time
//! it is seen (role from the configured claim, no credits, no grants). After
//! that it is a user like any other: grants, credits, deactivation and
//! "revoke all" (`tokens_valid_after` against the token's `iat`) apply, and a
//! single token can be revoked (its id is derived from a hash of the token).
//! Known identities are resolved from memory; only the first request of an
//! identity on an instance reads (or writes) the database.
//!
//! With `EXTERNAL_AUTH_URL`, `POST /chat/authenticate` of a user who is not a
//! local one (unknown here, or provisioned from the login service) forwards
//! username and password to the login service and verifies the token it returns
//! like any login-service token; the caller gets this proxy's own token pair.
//! Local users' passwords never leave the proxy.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use chrono::{DateTime, Utc};
use jsonwebtoken::{decode, decode_header, errors::ErrorKind, Algorithm, DecodingKey, Validation};
use parking_lot::RwLock;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::jwks::Jwks;
use super::{AuthFailure, Credential, Identity, Role, SnapshotStore};
use crate::config::{ClaimNames, ExternalAuthConfig};
use crate::errors::ApiError;
use crate::store::{self, identity::UserRow, Db};

/// The issuer recorded for login-service identities, whatever `iss` its tokens
/// carry: setting `EXTERNAL_JWT_ISSUER` later must not turn its users into new ones.
const LOGIN_SERVICE_ISSUER: &str = "external-login-service";
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;
/// An `iat` further in the future than this is refused: such a token would
/// outlive every "revoke all".
const MAX_FUTURE_IAT_SECONDS: i64 = 60;
const MAX_SUBJECT_CHARS: usize = 255;
const MAX_USERNAME_CHARS: usize = 64;
/// Bound of the verified-token cache (entries are ~200 bytes).
const VERIFIED_CACHE_ENTRIES: usize = 50_000;
/// Bounds one delegated login.
const LOGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

type Claims = Map<String, Value>;

struct LoginService {
    key: DecodingKey,
    validation: Validation,
    claims: ClaimNames,
}

struct Oidc {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    jwks: std::sync::Arc<Jwks>,
    claims: ClaimNames,
}

/// What a verified token says about its holder.
struct Verified {
    /// (issuer, subject): the identity, linked to one local user.
    identity: (String, String),
    username: String,
    admin: bool,
    issued_ms: i64,
    expires_at: DateTime<Utc>,
    token_id: Uuid,
}

/// What the login service said about a password login.
pub enum Delegated {
    /// Not its user (or no login service): the local password decides.
    No,
    Refused,
    Accepted(UserRow),
}

struct LoginDelegate {
    url: String,
    http: Result<reqwest::Client, String>,
}

struct Cached {
    verified: Arc<Verified>,
    /// The OIDC key-set version it was verified under; None: login service.
    keys_version: Option<u64>,
}

pub struct External {
    login_service: Option<LoginService>,
    oidc: Option<Oidc>,
    delegate: Option<LoginDelegate>,
    /// (issuer, subject) → local user id, learnt from the database.
    links: RwLock<HashMap<(String, String), i64>>,
    /// Tokens whose signature and claims were verified, by SHA-256 of the
    /// token: a repeated token costs a hash, not a signature check (RS256
    /// ~50 µs, ES256 ~150 µs). Expiry is checked on every use; an OIDC entry
    /// is used only under the key set it was verified with.
    verified: RwLock<HashMap<[u8; 32], Cached>>,
    db: Db,
}

impl External {
    /// None when no external issuer is configured.
    pub fn new(cfg: &ExternalAuthConfig, db: Db) -> Option<External> {
        if !cfg.any() {
            return None;
        }
        let login_service = cfg.login_service.as_ref().map(|c| {
            let mut validation = Validation::new(c.algorithm);
            validation.leeway = LEEWAY_SECONDS;
            validation.validate_nbf = true;
            let mut required = vec!["exp"];
            match &c.issuer {
                Some(iss) => {
                    validation.set_issuer(&[iss]);
                    required.push("iss");
                }
                None => validation.iss = None,
            }
            match &c.audience {
                Some(aud) => {
                    validation.set_audience(&[aud]);
                    required.push("aud");
                }
                None => validation.validate_aud = false,
            }
            validation.set_required_spec_claims(&required);
            LoginService {
                key: DecodingKey::from_secret(&c.secret),
                validation,
                claims: c.claims.clone(),
            }
        });
        let oidc = cfg.oidc.as_ref().map(|c| Oidc {
            issuer: c.issuer.clone(),
            audiences: c.audiences.clone(),
            algorithms: c.algorithms.clone(),
            jwks: std::sync::Arc::new(Jwks::new(c)),
            claims: c.claims.clone(),
        });
        let delegate = cfg.auth_url.as_ref().map(|url| LoginDelegate {
            url: url.clone(),
            http: reqwest::Client::builder()
                .timeout(LOGIN_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| format!("cannot build an HTTP client: {e}")),
        });
        Some(External {
            login_service,
            oidc,
            delegate,
            links: RwLock::new(HashMap::new()),
            verified: RwLock::new(HashMap::new()),
            db,
        })
    }

    /// Starts the background key-set fetcher (needs a running runtime).
    pub fn start(&self) {
        if let Some(o) = &self.oidc {
            tokio::spawn(o.jwks.clone().run());
        }
    }

    /// Authenticates a token from another issuer; None when the token is not
    /// one (it names this proxy as issuer, or no configured issuer matches):
    /// the local check then decides.
    pub async fn authenticate(
        &self,
        token: &str,
        snapshot: &SnapshotStore,
    ) -> Option<Result<Identity, AuthFailure>> {
        // This proxy's own tokens pay only this peek (~1 µs) for the detour.
        let issuer = peek_issuer(token)?;
        if issuer.as_deref() == Some(super::ISSUER) {
            return None;
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(v) = self.recall(&digest) {
            if v.expires_at.timestamp() < Utc::now().timestamp() - LEEWAY_SECONDS as i64 {
                return Some(Err(AuthFailure::Expired));
            }
            return Some(self.identity(&v, snapshot).await);
        }
        let (verified, keys_version) = if let Some(o) = self
            .oidc
            .as_ref()
            .filter(|o| issuer.as_deref() == Some(o.issuer.as_str()))
        {
            // The version before the check: a set replaced meanwhile makes the
            // entry stale at once, never the other way round.
            let version = o.jwks.version();
            (o.verify(token, &digest).await, Some(version))
        } else if let Some(l) = self.login_service.as_ref() {
            (l.verify(token, &digest), None)
        } else {
            return None;
        };
        Some(match verified {
            Ok(v) => {
                let v = Arc::new(v);
                self.remember(digest, v.clone(), keys_version);
                self.identity(&v, snapshot).await
            }
            Err(f) => Err(f),
        })
    }

    /// A token verified before, under the current key set.
    fn recall(&self, digest: &[u8; 32]) -> Option<Arc<Verified>> {
        let cache = self.verified.read();
        let hit = cache.get(digest)?;
        match (hit.keys_version, &self.oidc) {
            (None, _) => Some(hit.verified.clone()),
            (Some(v), Some(o)) if v == o.jwks.version() => Some(hit.verified.clone()),
            _ => None,
        }
    }

    fn remember(&self, digest: [u8; 32], verified: Arc<Verified>, keys_version: Option<u64>) {
        let mut cache = self.verified.write();
        if cache.len() >= VERIFIED_CACHE_ENTRIES {
            let now = Utc::now();
            cache.retain(|_, c| c.verified.expires_at > now);
            if cache.len() >= VERIFIED_CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(
            digest,
            Cached {
                verified,
                keys_version,
            },
        );
    }

    /// A password login through the login service, for users who are not local.
    pub async fn login(
        &self,
        db: &Db,
        snapshot: &SnapshotStore,
        username: &str,
        password: &str,
        local_user: Option<i64>,
    ) -> Result<Delegated, ApiError> {
        let (Some(delegate), Some(service)) = (&self.delegate, &self.login_service) else {
            return Ok(Delegated::No);
        };
        if let Some(id) = local_user {
            if !store::external::is_linked(db, id).await? {
                return Ok(Delegated::No);
            }
        }
        let Some(token) = delegate.call(username, password).await? else {
            return Ok(Delegated::Refused);
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let Ok(v) = service.verify(&token, &digest) else {
            log::warn!(
                "EXTERNAL_AUTH_URL returned a token that does not verify with EXTERNAL_JWT_SECRET and the EXTERNAL_* claim settings"
            );
            return Err(ApiError::unavailable());
        };
        let identity = match self.identity(&v, snapshot).await {
            Ok(i) => i,
            Err(AuthFailure::Unavailable) => return Err(ApiError::busy()),
            // Deactivated here, or its tokens revoked after this one was issued.
            Err(_) => return Ok(Delegated::Refused),
        };
        let mut user = store::identity::get_user(db, identity.user_id).await?;
        if user.role == Role::Admin.as_str() && identity.role != Role::Admin {
            // The login service no longer says admin: neither do we.
            user =
                store::identity::update_user(db, user.id, Some("user"), None, None, None).await?;
            snapshot.refresh_now().await;
        } else if snapshot.get().user(user.id).is_none() {
            // Just provisioned: the tokens we are about to issue are checked
            // against the snapshot, so it must hold the user first.
            snapshot.refresh_now().await;
        }
        Ok(Delegated::Accepted(user))
    }

    /// The local user of a verified token: from memory when known, otherwise
    /// found or provisioned in the database.
    async fn identity(
        &self,
        v: &Verified,
        snapshot: &SnapshotStore,
    ) -> Result<Identity, AuthFailure> {
        let known = self.links.read().get(&v.identity).copied();
        if let Some(user_id) = known {
            let snap = snapshot.get();
            if let Some(user) = snap.user(user_id) {
                if snap.is_revoked(&v.token_id) {
                    return Err(AuthFailure::Revoked);
                }
                return admit(v, user_id, user.role, user.active, user.tokens_valid_after);
            }
        }
        // First sight on this instance, or a user the snapshot does not hold yet.
        let (issuer, subject) = &v.identity;
        let linked = match store::external::find(&self.db, issuer, subject).await {
            Ok(Some(l)) => l,
            Ok(None) => self.provision(v).await?,
            Err(e) => {
                log::warn!("external identity lookup failed: {e}");
                return Err(AuthFailure::Unavailable);
            }
        };
        self.links
            .write()
            .insert(v.identity.clone(), linked.user_id);
        if snapshot.get().is_revoked(&v.token_id) {
            return Err(AuthFailure::Revoked);
        }
        admit(
            v,
            linked.user_id,
            Role::parse(&linked.role).unwrap_or(Role::User),
            linked.active,
            linked.tokens_valid_after,
        )
    }

    async fn provision(&self, v: &Verified) -> Result<store::external::LinkedUser, AuthFailure> {
        // A real hash of a password nobody knows: a local password login as this
        // user costs the same time as any other failed one, and never succeeds.
        let hash =
            match super::password::hash_password_pooled(super::password::random_token(32)).await {
                Some(Ok(h)) => h,
                _ => return Err(AuthFailure::Unavailable),
            };
        let role = if v.admin { Role::Admin } else { Role::User };
        let (issuer, subject) = &v.identity;
        let names = candidate_usernames(&v.username, issuer, subject);
        match store::external::provision(&self.db, issuer, subject, &names, role.as_str(), &hash)
            .await
        {
            Ok((u, created)) => {
                if created {
                    crate::metrics::EXTERNAL_USERS_PROVISIONED.inc();
                    log::info!(
                        "provisioned user {} for a new identity of {}",
                        u.user_id,
                        issuer
                    );
                }
                Ok(u)
            }
            Err(e) => {
                log::warn!("provisioning an external identity failed: {e}");
                Err(AuthFailure::Unavailable)
            }
        }
    }
}

impl LoginDelegate {
    /// The login service's token for these credentials; None when it refuses them.
    async fn call(&self, username: &str, password: &str) -> Result<Option<String>, ApiError> {
        let http = self.http.as_ref().map_err(|e| {
            log::error!("EXTERNAL_AUTH_URL: {e}");
            ApiError::unavailable()
        })?;
        let resp = http
            .post(&self.url)
            .json(&serde_json::json!({"username": username, "password": password}))
            .send()
            .await
            .map_err(|e| {
                log::warn!(
                    "EXTERNAL_AUTH_URL could not be reached: {}",
                    e.without_url()
                );
                ApiError::unavailable()
            })?;
        let status = resp.status();
        if status.is_client_error() {
            return Ok(None);
        }
        if !status.is_success() {
            log::warn!("EXTERNAL_AUTH_URL answered {status}");
            return Err(ApiError::unavailable());
        }
        let body: Value = resp.json().await.map_err(|_| {
            log::warn!("EXTERNAL_AUTH_URL answered 2xx without a JSON body");
            ApiError::unavailable()
        })?;
        match ["access_token", "token"]
            .iter()
            .find_map(|k| body.get(*k).and_then(Value::as_str))
        {
            Some(t) => Ok(Some(t.to_string())),
            None => {
                log::warn!("EXTERNAL_AUTH_URL answered 2xx without access_token");
                Err(ApiError::unavailable())
            }
        }
    }
}

/// The checks every token of a known user passes, external or not.
fn admit(
    v: &Verified,
    user_id: i64,
    role: Role,
    active: bool,
    tokens_valid_after: DateTime<Utc>,
) -> Result<Identity, AuthFailure> {
    if !active {
        return Err(AuthFailure::Inactive);
    }
    if v.issued_ms < tokens_valid_after.timestamp_millis() {
        return Err(AuthFailure::Revoked);
    }
    Ok(Identity {
        user_id,
        // Admin only while both this proxy and the issuer say so: a local
        // demotion and one at the issuer both take effect at once.
        role: if role == Role::Admin && v.admin {
            Role::Admin
        } else {
            Role::User
        },
        credential: Credential::Jwt {
            jti: v.token_id,
            expires_at: v.expires_at,
        },
    })
}

impl LoginService {
    fn verify(&self, token: &str, digest: &[u8; 32]) -> Result<Verified, AuthFailure> {
        let claims = decode::<Claims>(token, &self.key, &self.validation)
            .map_err(failure)?
            .claims;
        verified(digest, LOGIN_SERVICE_ISSUER, &self.claims, &claims)
    }
}

impl Oidc {
    async fn verify(&self, token: &str, digest: &[u8; 32]) -> Result<Verified, AuthFailure> {
        let header = decode_header(token).map_err(|_| AuthFailure::Malformed)?;
        // Only the provider's asymmetric algorithms: never HS* (its public key
        // is public), never a key the token brings along (`jwk`, `jku`, `x5u`).
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthFailure::BadSignature);
        }
        let key = self
            .jwks
            .key_for(header.kid.as_deref(), header.alg)
            .await
            .ok_or(AuthFailure::BadSignature)?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&self.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = decode::<Claims>(token, &key.key, &validation)
            .map_err(failure)?
            .claims;
        verified(digest, &self.issuer, &self.claims, &claims)
    }
}

fn failure(e: jsonwebtoken::errors::Error) -> AuthFailure {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthFailure::Expired,
        ErrorKind::InvalidSignature => AuthFailure::BadSignature,
        _ => AuthFailure::Malformed,
    }
}

/// The holder's identity from verified claims.
fn verified(
    digest: &[u8; 32],
    issuer_key: &str,
    names: &ClaimNames,
    claims: &Claims,
) -> Result<Verified, AuthFailure> {
    let subject = match claims.get(&names.subject) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(AuthFailure::Malformed),
    };
    if subject.is_empty() || subject.chars().count() > MAX_SUBJECT_CHARS {
        return Err(AuthFailure::Malformed);
    }
    // `iat` decides whether a "revoke all" covers the token: required.
    let iat = claims
        .get("iat")
        .and_then(Value::as_f64)
        .ok_or(AuthFailure::Malformed)?;
    let now = Utc::now().timestamp();
    if !iat.is_finite() || iat as i64 > now + MAX_FUTURE_IAT_SECONDS {
        return Err(AuthFailure::Malformed);
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_f64)
        .ok_or(AuthFailure::Malformed)?;
    let username = match claims.get(&names.username) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        _ => subject.clone(),
    };
    let admin = role_values(claims, &names.role)
        .iter()
        .any(|r| names.admin_roles.iter().any(|a| a == r));
    Ok(Verified {
        identity: (issuer_key.to_string(), subject),
        username,
        admin,
        issued_ms: (iat * 1000.0) as i64,
        expires_at: DateTime::from_timestamp(exp as i64, 0).unwrap_or_else(Utc::now),
        token_id: token_id(digest),
    })
}

/// The strings at a claim name or dotted path (`realm_access.roles`).
fn role_values(claims: &Claims, path: &str) -> Vec<String> {
    let value = claims.get(path).or_else(|| {
        let mut parts = path.split('.');
        let first = claims.get(parts.next()?)?;
        parts.try_fold(first, |v, p| v.get(p))
    });
    match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// A stable id for one external token (from its SHA-256), so that it can be
/// revoked alone.
fn token_id(digest: &[u8; 32]) -> Uuid {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// The claimed name, then the name with a suffix derived from the identity
/// (a local user of the same name keeps it; the link never follows names).
fn candidate_usernames(claimed: &str, issuer: &str, subject: &str) -> Vec<String> {
    let clean: String = claimed
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_USERNAME_CHARS)
        .collect();
    let clean = if clean.trim().is_empty() {
        "user".to_string()
    } else {
        clean.trim().to_string()
    };
    let digest = hex::encode(Sha256::digest(format!("{issuer}\0{subject}").as_bytes()));
    let mut names = vec![clean.clone()];
    for len in [8, 16, 32] {
        let suffix = &digest[..len];
        let stem: String = clean.chars().take(MAX_USERNAME_CHARS - len - 1).collect();
        names.push(format!("{stem}~{suffix}"));
    }
    names
}

/// The `iss` claim of a token, unverified, to route it to its check.
/// None when the token is not a JWT at all; Some(None) when it has no `iss`.
fn peek_issuer(token: &str) -> Option<Option<String>> {
    #[derive(serde::Deserialize)]
    struct Peek {
        iss: Option<Value>,
    }
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let peek: Peek = serde_json::from_slice(&bytes).ok()?;
    Some(match peek.iss {
        Some(Value::String(s)) => Some(s),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An External with both issuers and a pool that never connects.
    fn external() -> External {
        use crate::config::{LoginServiceConfig, OidcConfig};
        let names = ClaimNames {
            subject: "sub".into(),
            username: "username".into(),
            role: "role".into(),
            admin_roles: vec!["admin".into()],
        };
        let cfg = ExternalAuthConfig {
            login_service: Some(LoginServiceConfig {
                secret: b"0123456789abcdef".to_vec(),
                algorithm: Algorithm::HS256,
                issuer: None,
                audience: None,
                claims: names.clone(),
            }),
            oidc: Some(OidcConfig {
                issuer: "https://idp.example".into(),
                audiences: vec!["app".into()],
                jwks_url: Some("http://127.0.0.1:1/jwks".into()),
                algorithms: vec![Algorithm::RS256],
                claims: names,
                jwks_refresh: std::time::Duration::from_secs(300),
                jwks_min_refresh: std::time::Duration::from_secs(10),
                jwks_wait: std::time::Duration::ZERO,
            }),
            auth_url: None,
        };
        let pg: tokio_postgres::Config =
            "postgresql://nobody@127.0.0.1:1/none".parse().expect("url");
        let manager = deadpool_postgres::Manager::new(pg, tokio_postgres::NoTls);
        let db = deadpool_postgres::Pool::builder(manager)
            .max_size(1)
            .build()
            .expect("pool");
        External::new(&cfg, db).expect("configured")
    }

    fn remembered(ext: &External, token: &str, expires_in: i64, keys: Option<u64>) {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let v = Verified {
            identity: ("iss".into(), "sub".into()),
            username: "u".into(),
            admin: false,
            issued_ms: 0,
            expires_at: Utc::now() + chrono::Duration::seconds(expires_in),
            token_id: token_id(&digest),
        };
        ext.remember(digest, Arc::new(v), keys);
    }

    #[tokio::test]
    async fn a_remembered_token_still_expires() {
        let ext = external();
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!("{}.{}.sig", b64("{}"), b64(r#"{"iss":"someone"}"#));
        remembered(&ext, &token, -(LEEWAY_SECONDS as i64) - 5, None);
        let outcome = ext.authenticate(&token, &SnapshotStore::new()).await;
        assert!(matches!(outcome, Some(Err(AuthFailure::Expired))));
    }

    #[test]
    fn a_remembered_oidc_token_needs_the_same_key_set() {
        let ext = external();
        let current = ext.oidc.as_ref().expect("oidc").jwks.version();
        remembered(&ext, "same.key.set", 600, Some(current));
        remembered(&ext, "other.key.set", 600, Some(current + 1));
        remembered(&ext, "login.service.token", 600, None);
        let digest = |t: &str| -> [u8; 32] { Sha256::digest(t.as_bytes()).into() };
        assert!(ext.recall(&digest("same.key.set")).is_some());
        assert!(ext.recall(&digest("other.key.set")).is_none());
        assert!(ext.recall(&digest("login.service.token")).is_some());
        assert!(ext.recall(&digest("never.seen.token")).is_none());
    }

    #[test]
    fn roles_come_from_a_name_or_a_path() {
        let claims: Claims = serde_json::from_value(json!({
            "role": "admin",
            "realm_access": {"roles": ["offline", "proxy-admin"]},
            "groups": "x"
        }))
        .expect("map");
        assert_eq!(role_values(&claims, "role"), ["admin"]);
        assert_eq!(
            role_values(&claims, "realm_access.roles"),
            ["offline", "proxy-admin"]
        );
        assert!(role_values(&claims, "missing.path").is_empty());
    }

    #[test]
    fn usernames_fit_and_differ_per_identity() {
        let long = "x".repeat(100);
        let names = candidate_usernames(&long, "iss", "sub");
        assert!(names
            .iter()
            .all(|n| n.chars().count() <= MAX_USERNAME_CHARS));
        assert_eq!(names[0].chars().count(), MAX_USERNAME_CHARS);
        let other = candidate_usernames(&long, "iss", "sub2");
        assert_ne!(names[1], other[1]);
        assert_eq!(candidate_usernames("  ", "i", "s")[0], "user");
    }

    #[test]
    fn issuer_peek_routes_only() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let t = format!("{}.{}.sig", b64("{}"), b64(r#"{"iss":"https://idp"}"#));
        assert_eq!(peek_issuer(&t), Some(Some("https://idp".into())));
        let t = format!("{}.{}.sig", b64("{}"), b64(r#"{"sub":"1"}"#));
        assert_eq!(peek_issuer(&t), Some(None));
        assert_eq!(peek_issuer("not-a-jwt"), None);
        assert_eq!(peek_issuer("a.b.c.d"), None);
    }
}
