//! Login throttling: a fixed window of attempts per username and per client
//! address, shared by every instance through PostgreSQL.
//!
//! An attempt is counted before its password is checked, in one atomic
//! statement, so neither concurrency (60 guesses at once) nor a second
//! instance gets more than the budget verified. A successful login gives its
//! attempt back: only failures use up the budget.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::auth::password::sha256;
use crate::errors::ApiError;
use crate::store::{self, Db};

const WINDOW: Duration = Duration::from_secs(60);
/// Stale windows are pruned once every this many attempts.
const PRUNE_EVERY: u64 = 64;

pub struct LoginThrottle {
    per_user: i32,
    per_ip: i32,
    attempts: AtomicU64,
}

/// The counter keys of one attempt: the username (case-insensitive) and the
/// client address.
fn keys(username: &str, ip: &str) -> Vec<Vec<u8>> {
    vec![
        sha256(format!("u:{}", username.to_lowercase()).as_bytes()),
        sha256(format!("i:{ip}").as_bytes()),
    ]
}

impl LoginThrottle {
    pub fn new(per_minute: u32) -> Self {
        let per_user = per_minute.clamp(1, i32::MAX as u32 / 5) as i32;
        LoginThrottle {
            per_user,
            per_ip: per_user * 5,
            attempts: AtomicU64::new(0),
        }
    }

    /// Counts this attempt. `Err(429)` when the username or the address is over
    /// its budget (the password must then not be checked).
    pub async fn admit(&self, db: &Db, username: &str, ip: &str) -> Result<(), ApiError> {
        if self
            .attempts
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(PRUNE_EVERY)
        {
            if let Err(e) = store::login_attempts::prune(db, WINDOW.as_secs_f64()).await {
                log::warn!("pruning login attempts failed: {e}");
            }
        }
        let counted =
            store::login_attempts::count(db, &keys(username, ip), WINDOW.as_secs_f64()).await?;
        let over = counted
            .iter()
            .zip([self.per_user, self.per_ip])
            .filter(|(c, limit)| c.count > *limit)
            .map(|(c, _)| c.seconds_left.ceil().max(1.0) as u64)
            .max();
        match over {
            Some(wait) => Err(ApiError::rate_limited(wait)),
            None => Ok(()),
        }
    }

    /// A successful login gives its attempt back.
    pub async fn succeeded(&self, db: &Db, username: &str, ip: &str) {
        if let Err(e) = store::login_attempts::refund(db, &keys(username, ip)).await {
            log::warn!("refunding a login attempt failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_count_case_insensitively_and_apart_from_addresses() {
        assert_eq!(keys("Alice", "1.2.3.4"), keys("alice", "1.2.3.4"));
        assert_ne!(keys("alice", "1.2.3.4")[1], keys("alice", "5.6.7.8")[1]);
        assert_ne!(keys("1.2.3.4", "x")[0], keys("x", "1.2.3.4")[1]);
    }
}
