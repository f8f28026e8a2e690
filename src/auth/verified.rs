//! Access tokens whose signature was already checked: a client sends the same
//! token with every request, and verifying it (base64, HMAC-SHA256, two JSON
//! parses of the claims, UUID parsing) was most of the authentication cost.
//!
//! Only what the token itself says is kept, never a decision: expiry is
//! compared with the clock on every use, and revocation, the user's state
//! and the revoke-all cut-off are read from the snapshot on every request,
//! exactly as for a token seen for the first time. A token that failed
//! verification is never kept.
//!
//! Entries are found by a keyed hash of the token (SipHash with a per-process
//! random key, so a client cannot aim at another token's slot) and then
//! compared in constant time with the token presented.

use std::collections::HashMap;
use std::hash::BuildHasher;

use parking_lot::RwLock;
use uuid::Uuid;

/// Tokens kept at most; the cache starts over when full (every entry must
/// carry a valid signature, so only real tokens fill it).
const CAPACITY: usize = 16_384;
/// Longer tokens are not kept (ours are ~300 bytes).
const MAX_TOKEN_BYTES: usize = 1024;

/// The claims of a verified token, parsed.
#[derive(Debug, Clone)]
pub struct VerifiedClaims {
    pub user_id: i64,
    pub jti: Uuid,
    pub family: Option<Uuid>,
    /// Issue time in milliseconds (checked against `iat` when verified).
    pub issued_ms: i64,
    /// Expiry, seconds since the epoch (as jsonwebtoken compares it).
    pub exp: u64,
    pub nbf: Option<i64>,
}

struct Entry {
    token: Box<[u8]>,
    claims: VerifiedClaims,
}

pub struct VerifiedTokens {
    hasher: std::collections::hash_map::RandomState,
    entries: RwLock<HashMap<u64, Entry>>,
}

impl VerifiedTokens {
    pub fn new() -> Self {
        VerifiedTokens {
            hasher: std::collections::hash_map::RandomState::new(),
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// The claims of `token` if it was verified before.
    pub fn get(&self, token: &str) -> Option<VerifiedClaims> {
        let key = self.hasher.hash_one(token.as_bytes());
        let entries = self.entries.read();
        let entry = entries.get(&key)?;
        crate::auth::password::ct_eq(&entry.token, token.as_bytes()).then(|| entry.claims.clone())
    }

    /// Keeps the claims of a token whose signature and claims just passed.
    pub fn insert(&self, token: &str, claims: &VerifiedClaims) {
        if token.len() > MAX_TOKEN_BYTES {
            return;
        }
        let key = self.hasher.hash_one(token.as_bytes());
        let mut entries = self.entries.write();
        if entries.len() >= CAPACITY && !entries.contains_key(&key) {
            entries.clear();
        }
        entries.insert(
            key,
            Entry {
                token: token.as_bytes().into(),
                claims: claims.clone(),
            },
        );
    }
}

impl Default for VerifiedTokens {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(user_id: i64) -> VerifiedClaims {
        VerifiedClaims {
            user_id,
            jti: Uuid::new_v4(),
            family: None,
            issued_ms: 1_000,
            exp: 2_000,
            nbf: None,
        }
    }

    #[test]
    fn only_the_same_token_finds_its_claims() {
        let cache = VerifiedTokens::new();
        assert!(cache.get("a.b.c").is_none());
        cache.insert("a.b.c", &claims(7));
        assert_eq!(cache.get("a.b.c").map(|c| c.user_id), Some(7));
        assert!(cache.get("a.b.d").is_none());
        assert!(cache.get("a.b.c ").is_none());
    }

    #[test]
    fn stays_bounded() {
        let cache = VerifiedTokens::new();
        for i in 0..(CAPACITY as i64 + 10) {
            cache.insert(&format!("token-{i}"), &claims(i));
        }
        assert!(cache.entries.read().len() <= CAPACITY);
        let last = CAPACITY as i64 + 9;
        assert_eq!(
            cache.get(&format!("token-{last}")).map(|c| c.user_id),
            Some(last)
        );
    }

    #[test]
    fn long_tokens_are_not_kept() {
        let cache = VerifiedTokens::new();
        let long = "x".repeat(MAX_TOKEN_BYTES + 1);
        cache.insert(&long, &claims(1));
        assert!(cache.get(&long).is_none());
    }
}
