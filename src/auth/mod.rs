//! Who is calling: access JWTs issued by this proxy, API keys (`fpk_…`), refresh
//! tokens with rotation, login with throttling. Checking a token reads the
//! in-memory snapshot, and the database only for what the snapshot does not
//! know yet (see `lookup`). Tokens of other issuers (the old login service, an
//! OIDC provider) are checked in `external`.

pub mod external;
mod jwks;
pub mod lookup;
pub mod password;
pub mod snapshot;
mod table;
pub mod throttle;
mod verified;

use std::sync::Arc;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use jsonwebtoken::{
    decode, encode, errors::ErrorKind, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::Config;
use crate::errors::ApiError;
use crate::store::{self, identity::RefreshOutcome, Db};
pub use snapshot::{Role, SnapshotStore};

const ISSUER: &str = "flowise-proxy";

/// Clock leeway for a token's `iat` and `nbf`: a token that claims to be
/// issued (or valid) more than this far in the future is refused. It covers
/// clock differences between instances. A token of this proxy is revoked by
/// "revoke all" when it claims an issue time before the cut-off plus this
/// leeway, and tokens issued in that time carry cut-off + leeway as their
/// issue time, so a revocation wins over every token that existed before it,
/// whatever issue time it claims. (Tokens of other issuers, see `external`,
/// are compared with the cut-off itself: their issuer sets their times.)
pub const CLOCK_LEEWAY_SECS: i64 = 30;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
    pub iss: String,
    /// Issue time in milliseconds, so "revoke all" cuts precisely.
    #[serde(default)]
    pub iat_ms: i64,
    /// Not valid before (never set by this proxy; honoured when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// The login (refresh-token family) this token belongs to: revoking the
    /// family, or reusing one of its rotated refresh tokens, revokes it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fam: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Credential {
    Jwt {
        jti: Uuid,
        expires_at: DateTime<Utc>,
    },
    ApiKey {
        prefix: String,
    },
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: i64,
    pub role: Role,
    pub credential: Credential,
}

impl Identity {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// Why a token was refused (the metric label and the client's error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed,
    Expired,
    BadSignature,
    Revoked,
    /// `iat` or `nbf` in the future (beyond the leeway).
    NotYetValid,
    UnknownUser,
    Inactive,
    BadApiKey,
    /// A first-seen external user could not be provisioned (database down).
    Unavailable,
}

impl AuthFailure {
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::Expired => "expired",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::Revoked => "revoked",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::Inactive => "inactive",
            AuthFailure::BadApiKey => "bad_api_key",
            AuthFailure::Unavailable => "unavailable",
        }
    }

    pub fn api_error(self) -> ApiError {
        match self {
            AuthFailure::Missing => ApiError::unauthorized(),
            AuthFailure::Expired => ApiError::token_expired(),
            AuthFailure::Unavailable => ApiError::busy(),
            _ => ApiError::invalid_token(),
        }
    }
}

pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: i64,
}

pub struct Auth {
    pub snapshot: Arc<SnapshotStore>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    algorithm: jsonwebtoken::Algorithm,
    access_lifetime: ChronoDuration,
    refresh_lifetime: ChronoDuration,
    pub throttle: throttle::LoginThrottle,
    lookups: lookup::Lookups,
    /// Tokens of other issuers (login service, OIDC), when configured.
    external: Option<external::External>,
    /// Access tokens of this proxy already verified (see `verified`).
    verified: verified::VerifiedTokens,
}

impl Auth {
    pub fn new(cfg: &Config, snapshot: Arc<SnapshotStore>, db: Db) -> Auth {
        let mut validation = Validation::new(cfg.jwt_algorithm);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "sub"]);
        validation.leeway = 0;
        Auth {
            snapshot,
            encoding: EncodingKey::from_secret(&cfg.jwt_secret),
            decoding: DecodingKey::from_secret(&cfg.jwt_secret),
            validation,
            algorithm: cfg.jwt_algorithm,
            access_lifetime: ChronoDuration::milliseconds(cfg.jwt_expiration.as_millis() as i64),
            refresh_lifetime: ChronoDuration::milliseconds(
                cfg.refresh_token_lifetime.as_millis() as i64
            ),
            throttle: throttle::LoginThrottle::new(cfg.login_attempts_per_minute),
            lookups: lookup::Lookups::new(),
            external: external::External::new(&cfg.external, db),
            verified: verified::VerifiedTokens::new(),
        }
    }

    /// Starts background work (fetching OIDC keys); needs a running runtime.
    pub fn start_background(&self) {
        if let Some(ext) = &self.external {
            ext.start();
        }
    }

    /// Authenticates an `Authorization` header value against the snapshot
    /// (and the database for a key or user the snapshot does not know yet; a
    /// first-seen external identity is provisioned in the database).
    pub async fn authenticate(
        &self,
        db: &Db,
        header: Option<&[u8]>,
    ) -> Result<Identity, AuthFailure> {
        let header = header.ok_or(AuthFailure::Missing)?;
        let header = std::str::from_utf8(header).map_err(|_| AuthFailure::Malformed)?;
        let (scheme, token) = header
            .trim()
            .split_once(' ')
            .ok_or(AuthFailure::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthFailure::Malformed);
        }
        let token = token.trim();
        if token.is_empty() || token.len() > 4096 {
            return Err(AuthFailure::Malformed);
        }
        if token.starts_with("fpk_") {
            return self.authenticate_api_key(db, token).await;
        }
        if let Some(ext) = &self.external {
            if let Some(outcome) = ext.authenticate(token, &self.snapshot).await {
                return outcome;
            }
        }
        self.authenticate_jwt(db, token).await
    }

    /// A user by id: from the snapshot, else from the database.
    async fn user(&self, db: &Db, id: i64) -> Option<snapshot::UserEntry> {
        let known = self.snapshot.get().user(id);
        match known {
            Some(u) => Some(u),
            None => self.lookups.user(db, &self.snapshot, id).await,
        }
    }

    async fn authenticate_api_key(&self, db: &Db, token: &str) -> Result<Identity, AuthFailure> {
        let (prefix, secret) = password::parse_api_key(token).ok_or(AuthFailure::BadApiKey)?;
        let known = {
            let snap = self.snapshot.get();
            snap.api_key(prefix).map(|k| {
                let user = snap.user(k.user_id);
                (k, user)
            })
        };
        let (key, user) = match known {
            Some(found) => found,
            None => {
                let (key, user) = self
                    .lookups
                    .api_key(db, &self.snapshot, prefix)
                    .await
                    .ok_or(AuthFailure::BadApiKey)?;
                (key, Some(user))
            }
        };
        if !password::ct_eq(&password::sha256(secret.as_bytes()), &key.secret_hash) {
            return Err(AuthFailure::BadApiKey);
        }
        let user = match user {
            Some(u) => u,
            None => self
                .user(db, key.user_id)
                .await
                .ok_or(AuthFailure::UnknownUser)?,
        };
        if !user.active {
            return Err(AuthFailure::Inactive);
        }
        Ok(Identity {
            user_id: key.user_id,
            role: user.role,
            credential: Credential::ApiKey {
                prefix: prefix.to_string(),
            },
        })
    }

    async fn authenticate_jwt(&self, db: &Db, token: &str) -> Result<Identity, AuthFailure> {
        // A token verified before skips the signature and parsing, not the
        // checks below (expiry here; revocation, user, cut-off from the snapshot).
        let c = match self.verified.get(token) {
            Some(c) if c.exp < jsonwebtoken::get_current_timestamp() => {
                return Err(AuthFailure::Expired)
            }
            Some(c) => c,
            None => {
                let c = self.verify_jwt(token)?;
                self.verified.insert(token, &c);
                c
            }
        };
        let (user_id, jti, family, issued_ms) = (c.user_id, c.jti, c.family, c.issued_ms);
        if not_yet_valid(issued_ms, c.nbf) {
            return Err(AuthFailure::NotYetValid);
        }
        let revoked = {
            let snap = self.snapshot.get();
            snap.is_revoked(&jti) || family.is_some_and(|f| snap.is_revoked(&f))
        };
        if revoked {
            return Err(AuthFailure::Revoked);
        }
        let user = self
            .user(db, user_id)
            .await
            .ok_or(AuthFailure::UnknownUser)?;
        if !user.active {
            return Err(AuthFailure::Inactive);
        }
        let cut_off_ms = user.tokens_valid_after.timestamp_millis() + CLOCK_LEEWAY_SECS * 1000;
        if issued_ms < cut_off_ms {
            return Err(AuthFailure::Revoked);
        }
        Ok(Identity {
            user_id,
            // The current role, not the one in the token: a demotion is immediate.
            role: user.role,
            credential: Credential::Jwt {
                jti,
                expires_at: i64::try_from(c.exp)
                    .ok()
                    .and_then(|exp| DateTime::from_timestamp(exp, 0))
                    .unwrap_or_else(Utc::now),
            },
        })
    }

    /// Signature, standard claims and the parts this proxy reads.
    fn verify_jwt(&self, token: &str) -> Result<verified::VerifiedClaims, AuthFailure> {
        let data =
            decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthFailure::Expired,
                    ErrorKind::InvalidSignature => AuthFailure::BadSignature,
                    _ => AuthFailure::Malformed,
                }
            })?;
        let c = data.claims;
        let issued_ms = issue_time_ms(&c)?;
        if not_yet_valid(issued_ms, c.nbf) {
            return Err(AuthFailure::NotYetValid);
        }
        let user_id: i64 = c.sub.parse().map_err(|_| AuthFailure::Malformed)?;
        let jti = Uuid::parse_str(&c.jti).map_err(|_| AuthFailure::Malformed)?;
        let family = match c.fam.as_deref() {
            Some(f) => Some(Uuid::parse_str(f).map_err(|_| AuthFailure::Malformed)?),
            None => None,
        };
        // Validation required `exp`, parsed by jsonwebtoken as a u64.
        let exp = u64::try_from(c.exp).map_err(|_| AuthFailure::Malformed)?;
        Ok(verified::VerifiedClaims {
            user_id,
            jti,
            family,
            issued_ms,
            exp,
            nbf: c.nbf,
        })
    }

    /// An access token. Its issue time is never before the user's cut-off
    /// (`tokens_valid_after`, set by "revoke all") plus the clock leeway.
    fn issue_access(
        &self,
        user_id: i64,
        role: Role,
        family: Uuid,
        valid_after: DateTime<Utc>,
    ) -> Result<String, ApiError> {
        let now = Utc::now();
        let issued = now.max(valid_after + ChronoDuration::seconds(CLOCK_LEEWAY_SECS));
        let claims = Claims {
            sub: user_id.to_string(),
            role: role.as_str().into(),
            jti: Uuid::new_v4().to_string(),
            iat: issued.timestamp(),
            exp: (now + self.access_lifetime).timestamp(),
            iss: ISSUER.into(),
            iat_ms: issued.timestamp_millis(),
            nbf: None,
            fam: Some(family.to_string()),
        };
        encode(&Header::new(self.algorithm), &claims, &self.encoding)
            .map_err(|_| ApiError::internal())
    }

    async fn issue_pair(
        &self,
        db: &Db,
        user_id: i64,
        role: Role,
        family: Uuid,
    ) -> Result<TokenPair, ApiError> {
        let refresh_token = password::random_token(32);
        let valid_after = store::identity::insert_refresh_token(
            db,
            user_id,
            &password::sha256(refresh_token.as_bytes()),
            family,
            Utc::now() + self.refresh_lifetime,
        )
        .await?;
        let access_token = self.issue_access(user_id, role, family, valid_after)?;
        Ok(TokenPair {
            access_token,
            refresh_token,
            expires_in: self.access_lifetime.num_seconds(),
        })
    }

    /// Password login. Every failure is the same 401, after the same work.
    pub async fn login(
        &self,
        db: &Db,
        username: &str,
        password: &str,
        client_ip: &str,
    ) -> Result<(TokenPair, store::identity::UserRow), ApiError> {
        // Counted before the password is checked (see `throttle`).
        if let Err(e) = self.throttle.admit(db, username, client_ip).await {
            if e.status == 429 {
                crate::metrics::LOGINS
                    .with_label_values(&["throttled"])
                    .inc();
            }
            return Err(e);
        }
        let found = store::identity::login_lookup(db, username).await?;
        let local_id = found.as_ref().map(|(u, _)| u.id);
        let delegated = match &self.external {
            Some(ext) => {
                ext.login(db, &self.snapshot, username, password, local_id)
                    .await?
            }
            None => external::Delegated::No,
        };
        let (ok, found) = match delegated {
            external::Delegated::Accepted(user) => (true, Some(user)),
            external::Delegated::Refused => (false, None),
            external::Delegated::No => {
                let hash = found.as_ref().map(|(_, h)| h.clone());
                let pw = password.to_string();
                let ok = password::verify_password_pooled(pw, hash)
                    .await
                    .ok_or_else(ApiError::busy)?;
                (ok, found.map(|(u, _)| u))
            }
        };
        match found {
            Some(user) if ok && user.active => {
                self.throttle.succeeded(db, username, client_ip).await;
                crate::metrics::LOGINS.with_label_values(&["success"]).inc();
                let role = Role::parse(&user.role).unwrap_or(Role::User);
                let pair = self.issue_pair(db, user.id, role, Uuid::new_v4()).await?;
                Ok((pair, user))
            }
            _ => {
                crate::metrics::LOGINS.with_label_values(&["failure"]).inc();
                crate::metrics::AUTH_FAILURES
                    .with_label_values(&["invalid_credentials"])
                    .inc();
                Err(ApiError::invalid_credentials())
            }
        }
    }

    /// Whether the caller may use `chatflow_id`: unknown 404, not granted 403.
    /// From the snapshot, else (a chatflow or grant added a moment ago) from
    /// the database.
    pub async fn check_chatflow(
        &self,
        db: &Db,
        who: &Identity,
        chatflow_id: &str,
    ) -> Result<(), ApiError> {
        crate::validate::chatflow_id(chatflow_id)?;
        if who.is_admin() {
            return Ok(());
        }
        let granted = {
            let snap = self.snapshot.get();
            snap.chatflow(chatflow_id).is_some() && snap.is_granted(who.user_id, chatflow_id)
        };
        if granted {
            return Ok(());
        }
        match self
            .lookups
            .chatflow(db, &self.snapshot, who.user_id, chatflow_id)
            .await
        {
            lookup::ChatflowAccess::Granted => Ok(()),
            lookup::ChatflowAccess::NotGranted => Err(ApiError::forbidden()),
            lookup::ChatflowAccess::Unknown => Err(ApiError::not_found()),
        }
    }

    /// Exchanges a refresh token for a new pair (rotation with reuse detection).
    pub async fn refresh(
        &self,
        db: &Db,
        refresh_token: &str,
    ) -> Result<(TokenPair, i64, Role), ApiError> {
        if refresh_token.is_empty() || refresh_token.len() > 256 {
            return Err(ApiError::invalid_token());
        }
        let hash = password::sha256(refresh_token.as_bytes());
        match store::identity::rotate_refresh_token(db, &hash).await? {
            RefreshOutcome::Rotated { user_id, family } => {
                let user = match self.user(db, user_id).await {
                    Some(u) if u.active => u,
                    _ => return Err(ApiError::invalid_token()),
                };
                let pair = self.issue_pair(db, user_id, user.role, family).await?;
                Ok((pair, user_id, user.role))
            }
            RefreshOutcome::Reused { family } => {
                crate::metrics::AUTH_FAILURES
                    .with_label_values(&["refresh_reuse"])
                    .inc();
                // A rotated token came back: one of its holders is a thief.
                // The family's refresh tokens are revoked already; its access
                // tokens go too (all expire within one access lifetime).
                self.revoke_family_access(db, family).await?;
                Err(ApiError::invalid_token())
            }
            RefreshOutcome::Invalid => {
                crate::metrics::AUTH_FAILURES
                    .with_label_values(&["refresh_invalid"])
                    .inc();
                Err(ApiError::invalid_token())
            }
        }
    }

    /// Revokes every access token of a login: the family id joins the
    /// revoked ids until the last of them has expired.
    async fn revoke_family_access(&self, db: &Db, family: Uuid) -> Result<(), ApiError> {
        store::identity::revoke_access_token(db, family, Utc::now() + self.access_lifetime).await?;
        self.snapshot.refresh_now().await;
        Ok(())
    }

    /// Revokes the presented credential (an access token, or an API key), and
    /// a refresh family or, with `all`, every login of the user: all refresh
    /// tokens and every access token issued so far. API keys are separate
    /// credentials: each is revoked by presenting it here or through
    /// `DELETE /chat/api-keys/{id}`.
    pub async fn revoke(
        &self,
        db: &Db,
        who: &Identity,
        refresh_token: Option<&str>,
        all: bool,
    ) -> Result<(), ApiError> {
        if all {
            store::identity::revoke_all_for_user(db, who.user_id).await?;
        } else if let Some(rt) = refresh_token {
            let family = store::identity::revoke_refresh_family(
                db,
                who.user_id,
                &password::sha256(rt.as_bytes()),
            )
            .await?;
            if let Some(family) = family {
                self.revoke_family_access(db, family).await?;
            }
        }
        match &who.credential {
            Credential::Jwt { jti, expires_at } => {
                store::identity::revoke_access_token(db, *jti, *expires_at).await?;
            }
            Credential::ApiKey { prefix } => {
                store::identity::revoke_api_key_by_prefix(db, who.user_id, prefix).await?;
            }
        }
        self.snapshot.refresh_now().await;
        Ok(())
    }
}

/// `iat` or `nbf` later than now plus the clock leeway.
fn not_yet_valid(issued_ms: i64, nbf: Option<i64>) -> bool {
    let latest_ms = Utc::now().timestamp_millis() + CLOCK_LEEWAY_SECS * 1000;
    issued_ms > latest_ms || nbf.is_some_and(|nbf| nbf.saturating_mul(1000) > latest_ms)
}

/// The issue time a token claims, in milliseconds. `iat_ms` (ours) must agree
/// with `iat`, so neither can be moved alone.
fn issue_time_ms(c: &Claims) -> Result<i64, AuthFailure> {
    if c.iat_ms == 0 {
        return Ok(c.iat.saturating_mul(1000));
    }
    if c.iat_ms.div_euclid(1000) != c.iat {
        return Err(AuthFailure::Malformed);
    }
    Ok(c.iat_ms)
}
