//! The contract's JSON errors: `{"detail": "...", "code": "..."}` with a fitting status.
//!
//! Every error a client can see is built here, so no handler can leak a stack trace,
//! SQL text, a secret or an upstream URL by accident: the detail is always one of
//! the fixed sentences below or a validation message we wrote ourselves.

use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub detail: String,
    /// Seconds for a `Retry-After` header (429 only).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub fn invalid_json(detail: impl Into<String>) -> Self {
        Self::new(400, "invalid_json", detail)
    }
    pub fn unauthorized() -> Self {
        Self::new(401, "unauthorized", "Authentication required")
    }
    pub fn invalid_token() -> Self {
        Self::new(401, "invalid_token", "Invalid or revoked token")
    }
    pub fn token_expired() -> Self {
        Self::new(401, "token_expired", "Token has expired")
    }
    pub fn invalid_credentials() -> Self {
        Self::new(401, "invalid_credentials", "Invalid username or password")
    }
    pub fn insufficient_credits() -> Self {
        Self::new(
            402,
            "insufficient_credits",
            "Not enough credits for this request",
        )
    }
    pub fn forbidden() -> Self {
        Self::new(403, "forbidden", "You do not have access to this resource")
    }
    pub fn not_found() -> Self {
        Self::new(404, "not_found", "Not found")
    }
    pub fn method_not_allowed() -> Self {
        Self::new(405, "method_not_allowed", "Method not allowed")
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(409, "conflict", detail)
    }
    pub fn body_too_large() -> Self {
        Self::new(413, "body_too_large", "Request body is too large")
    }
    pub fn validation(detail: impl Into<String>) -> Self {
        Self::new(422, "validation_error", detail)
    }
    pub fn rate_limited(retry_after: u64) -> Self {
        let mut e = Self::new(429, "rate_limited", "Too many attempts, try again later");
        e.retry_after = Some(retry_after.max(1));
        e
    }
    pub fn upstream_error() -> Self {
        Self::new(502, "upstream_error", "Flowise could not be reached")
    }
    pub fn unavailable() -> Self {
        Self::new(503, "unavailable", "Service unavailable")
    }
    /// Password hashing is saturated: try again in a second.
    pub fn busy() -> Self {
        let mut e = Self::unavailable();
        e.retry_after = Some(1);
        e
    }
    pub fn ledger_unavailable() -> Self {
        Self::new(
            503,
            "ledger_unavailable",
            "Credits cannot be checked right now, try again shortly",
        )
    }
    pub fn upstream_timeout() -> Self {
        Self::new(504, "upstream_timeout", "Flowise did not answer in time")
    }
    pub fn internal() -> Self {
        Self::new(500, "internal_error", "Internal error")
    }

    pub fn body(&self) -> Vec<u8> {
        json!({"detail": self.detail, "code": self.code})
            .to_string()
            .into_bytes()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.detail)
    }
}

impl std::error::Error for ApiError {}

/// Database failures never reach clients as text; handlers map them to this.
impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Unavailable(_) => ApiError::unavailable(),
            crate::store::StoreError::Conflict(what) => ApiError::conflict(what),
            crate::store::StoreError::NotFound => ApiError::not_found(),
            crate::store::StoreError::Invalid(what) => ApiError::validation(what),
        }
    }
}
