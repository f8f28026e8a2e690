//! An OpenID Connect provider's signing keys (its JWKS), fetched in the
//! background and held in memory: verifying a token never waits on the network,
//! except that a token naming a key id we do not know may wait (up to
//! `OIDC_JWKS_WAIT_MS`) for one refresh, and at most one such refresh runs per
//! `OIDC_JWKS_MIN_REFRESH_SECONDS`. Unknown key ids beyond that are refused at
//! once, so a flood of made-up `kid`s costs the provider nothing.
//!
//! Every refresh replaces the whole set: a key the provider removed stops
//! verifying tokens after the next refresh (periodic or on an unknown `kid`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{watch, Notify};

/// Bounds one fetch (discovery document or key set).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A key set larger than this is refused (a provider publishes a handful of keys).
const MAX_BODY: usize = 1 << 20;
/// After a failed fetch, the next try comes this soon (not a whole period later).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// One verification key and the algorithms it may verify.
pub struct VerifyKey {
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<VerifyKey>>,
    /// Keys published without a `kid` (usable only by tokens without one, and
    /// only when exactly one key fits).
    without_kid: Vec<Arc<VerifyKey>>,
}

#[derive(Default)]
struct RefreshState {
    /// A refresh was asked for and has not finished yet.
    pending: bool,
    last_started: Option<Instant>,
}

pub struct Jwks {
    issuer: String,
    jwks_url: Mutex<Option<String>>,
    allowed: Vec<Algorithm>,
    keys: ArcSwap<KeySet>,
    /// Bumped whenever the key set is replaced.
    version: AtomicU64,
    /// Counts finished refreshes (successful or not): waiters watch it.
    finished: watch::Sender<u64>,
    wake: Notify,
    state: Mutex<RefreshState>,
    every: Duration,
    min_interval: Duration,
    wait: Duration,
    /// Built once; an error (no TLS backend) is reported by every refresh.
    http: Result<reqwest::Client, String>,
}

impl Jwks {
    pub fn new(cfg: &crate::config::OidcConfig) -> Jwks {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .user_agent(concat!("flowise-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"));
        Jwks {
            issuer: cfg.issuer.clone(),
            jwks_url: Mutex::new(cfg.jwks_url.clone()),
            allowed: cfg.algorithms.clone(),
            keys: ArcSwap::from_pointee(KeySet::default()),
            version: AtomicU64::new(0),
            finished: watch::channel(0).0,
            wake: Notify::new(),
            state: Mutex::new(RefreshState {
                // The first fetch is on its way from start-up on: requests
                // arriving before it wait for it instead of asking again.
                pending: true,
                last_started: None,
            }),
            every: cfg.jwks_refresh,
            min_interval: cfg.jwks_min_refresh,
            wait: cfg.jwks_wait,
            http,
        }
    }

    /// Changes whenever the key set is replaced: what was verified under an
    /// older version must be verified again.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// The key for a token's `kid` and `alg`, from memory only.
    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Option<Arc<VerifyKey>> {
        let keys = self.keys.load();
        let usable = |k: &&Arc<VerifyKey>| k.algorithms.contains(&alg);
        match kid {
            Some(kid) => keys.by_kid.get(kid).filter(usable).cloned(),
            // No key id: only an unambiguous key will do.
            None => {
                let mut candidates = keys
                    .without_kid
                    .iter()
                    .chain(keys.by_kid.values())
                    .filter(usable);
                match (candidates.next(), candidates.next()) {
                    (Some(only), None) => Some(only.clone()),
                    _ => None,
                }
            }
        }
    }

    /// The key for a token. An unknown key id asks for one refresh (unless one
    /// ran less than the minimum interval ago) and waits for it, bounded.
    pub async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Option<Arc<VerifyKey>> {
        if let Some(k) = self.lookup(kid, alg) {
            return Some(k);
        }
        let mut finished = self.finished.subscribe();
        let seen = *finished.borrow_and_update();
        // A refresh may have finished between the lookup and the subscription.
        if let Some(k) = self.lookup(kid, alg) {
            return Some(k);
        }
        if !self.ask_refresh() {
            return None;
        }
        let _ = tokio::time::timeout(self.wait, finished.wait_for(|n| *n > seen)).await;
        self.lookup(kid, alg)
    }

    /// Whether a refresh is (now) on its way: either one was pending already
    /// or this call asked for one; false when rate-limited.
    fn ask_refresh(&self) -> bool {
        let mut st = self.state.lock();
        if st.pending {
            return true;
        }
        if st
            .last_started
            .is_some_and(|t| t.elapsed() < self.min_interval)
        {
            crate::metrics::JWKS_REFRESHES
                .with_label_values(&["rate_limited"])
                .inc();
            return false;
        }
        st.pending = true;
        drop(st);
        self.wake.notify_one();
        true
    }

    /// Runs forever: fetches at once, then periodically and when asked.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.state.lock().last_started = Some(Instant::now());
            let next = match self.refresh().await {
                Ok(n) => {
                    crate::metrics::JWKS_REFRESHES
                        .with_label_values(&["ok"])
                        .inc();
                    log::info!("OIDC key set of {} refreshed: {n} usable keys", self.issuer);
                    self.every
                }
                Err(e) => {
                    crate::metrics::JWKS_REFRESHES
                        .with_label_values(&["error"])
                        .inc();
                    log::warn!("OIDC key set of {} not refreshed: {e}", self.issuer);
                    RETRY_AFTER_FAILURE.min(self.every)
                }
            };
            self.state.lock().pending = false;
            self.finished.send_modify(|n| *n += 1);
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(next) => {
                    self.state.lock().pending = true;
                }
            }
        }
    }

    /// One refresh: the discovery document when needed, then the key set.
    async fn refresh(&self) -> Result<usize, String> {
        let known = self.jwks_url.lock().clone();
        let url = match known {
            Some(u) => u,
            None => {
                let u = self.discover().await?;
                *self.jwks_url.lock() = Some(u.clone());
                u
            }
        };
        let body = self.fetch_json(&url).await?;
        let set = parse_key_set(&body, &self.allowed)?;
        let n = set.by_kid.len() + set.without_kid.len();
        self.keys.store(Arc::new(set));
        self.version.fetch_add(1, Ordering::SeqCst);
        Ok(n)
    }

    async fn discover(&self) -> Result<String, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let doc = self.fetch_json(&url).await?;
        if doc.get("issuer").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(format!(
                "{url}: the discovery document names another issuer"
            ));
        }
        doc.get("jwks_uri")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("{url}: no jwks_uri"))
    }

    async fn fetch_json(&self, url: &str) -> Result<Value, String> {
        let http = self.http.as_ref().map_err(Clone::clone)?;
        let mut resp = http
            .get(url)
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: status {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(format!("{url}: larger than {MAX_BODY} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))
    }
}

/// The usable signature keys of a JWKS document. Keys for encryption, of an
/// unknown type, symmetric (`oct`: a published secret is no secret) or for no
/// allowed algorithm are skipped one by one, not the whole set.
fn parse_key_set(doc: &Value, allowed: &[Algorithm]) -> Result<KeySet, String> {
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no \"keys\" array")?;
    let mut set = KeySet::default();
    for raw in keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let mut algorithms: Vec<Algorithm> = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => continue,
            },
            _ => continue,
        };
        if let Some(named) = jwk.common.key_algorithm {
            algorithms.retain(|a| key_algorithm_is(named, *a));
        }
        algorithms.retain(|a| allowed.contains(a));
        if algorithms.is_empty() {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let entry = Arc::new(VerifyKey { key, algorithms });
        match jwk.common.key_id {
            Some(kid) => {
                set.by_kid.insert(kid, entry);
            }
            None => set.without_kid.push(entry),
        }
    }
    Ok(set)
}

fn key_algorithm_is(named: KeyAlgorithm, alg: Algorithm) -> bool {
    matches!(
        (named, alg),
        (KeyAlgorithm::RS256, Algorithm::RS256)
            | (KeyAlgorithm::RS384, Algorithm::RS384)
            | (KeyAlgorithm::RS512, Algorithm::RS512)
            | (KeyAlgorithm::PS256, Algorithm::PS256)
            | (KeyAlgorithm::PS384, Algorithm::PS384)
            | (KeyAlgorithm::PS512, Algorithm::PS512)
            | (KeyAlgorithm::ES256, Algorithm::ES256)
            | (KeyAlgorithm::ES384, Algorithm::ES384)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn skips_unusable_keys_and_keeps_the_rest() {
        let doc = json!({"keys": [
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "kid": "ec", "crv": "P-256",
             "x": "E1nN092Aq_Yy8jGalFaDAp0aQz2edGAOyFICE-Z7pIU",
             "y": "1Tu0vxa6HjL_w8tSHHlv_cJhI_jmiuRTJDLnJEdLBEA"},
            {"kty": "RSA", "kid": "rs", "alg": "RS256", "n": "AQAB", "e": "AQAB"},
            {"kty": "weird", "kid": "x"}
        ]});
        let set = parse_key_set(&doc, &[Algorithm::RS256, Algorithm::ES256]).expect("parses");
        let mut kids: Vec<_> = set.by_kid.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["ec", "rs"]);
        assert_eq!(set.by_kid["rs"].algorithms, [Algorithm::RS256]);
        assert_eq!(set.by_kid["ec"].algorithms, [Algorithm::ES256]);
        let only_rs = parse_key_set(&doc, &[Algorithm::RS256]).expect("parses");
        assert!(!only_rs.by_kid.contains_key("ec"));
        assert!(parse_key_set(&json!({"nokeys": []}), &[Algorithm::RS256]).is_err());
    }
}
