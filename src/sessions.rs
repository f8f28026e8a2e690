//! Conversations belong to their owner. A conversation id (`sessionId`/`chatId`,
//! or the one Flowise assigns) is bound to (user, chatflow) the first time it is
//! used; anyone else presenting it is refused before Flowise is called.
//!
//! Every ownership decision asks the database (one indexed single-row
//! statement). Owners do change: a conversation deleted on one instance may be
//! started again, under the same id, by another user on any instance, so no
//! instance may keep an owner it learned earlier. A claim is also the "last
//! used" update (to the second), so `/chat/sessions` is ordered by use at no
//! extra round trip; see `store::sessions::bind` for what that costs.

use crate::store::{self, Db, StoreError};

pub struct SessionBindings;

/// A conversation id a client may send: bounded and printable.
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
}

impl SessionBindings {
    pub fn new() -> Self {
        SessionBindings
    }

    /// Claims `id` for the caller (binding it if new, else marking it used).
    /// `false` when another user owns it, or when `id` is not a valid id.
    pub async fn claim(
        &self,
        db: &Db,
        id: &str,
        user_id: i64,
        chatflow_id: &str,
    ) -> Result<bool, StoreError> {
        if !valid_session_id(id) {
            return Ok(false);
        }
        let owner = store::sessions::bind(db, id, user_id, chatflow_id).await?;
        Ok(owner.0 == user_id)
    }

    /// The chatflow of `id` when the caller owns it; `None` when unknown, not
    /// theirs, or not a valid id.
    pub async fn owned(
        &self,
        db: &Db,
        id: &str,
        user_id: i64,
    ) -> Result<Option<String>, StoreError> {
        if !valid_session_id(id) {
            return Ok(None);
        }
        let owner = store::sessions::owner(db, id).await?;
        Ok(owner.filter(|(u, _)| *u == user_id).map(|(_, cf)| cf))
    }
}

impl Default for SessionBindings {
    fn default() -> Self {
        Self::new()
    }
}
