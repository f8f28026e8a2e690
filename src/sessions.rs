//! Conversations belong to their owner. A conversation id (`sessionId`/`chatId`,
//! or the one Flowise assigns) is bound to (user, chatflow) the first time it is
//! used; anyone else presenting it is refused before Flowise is called.
//!
//! Owners never change, so positive answers are cached: continuing an
//! already-bound conversation costs no database round trip.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::store::{self, Db, StoreError};

const CACHE_LIMIT: usize = 200_000;

#[derive(Default)]
pub struct SessionBindings {
    owners: Mutex<HashMap<String, (i64, String)>>,
}

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
        Self::default()
    }

    fn remember(&self, id: &str, owner: (i64, String)) {
        let mut m = self.owners.lock();
        if m.len() >= CACHE_LIMIT {
            m.clear();
        }
        m.insert(id.to_string(), owner);
    }

    /// Claims `id` for the caller (binding it if new). `false` when another user owns it.
    pub async fn claim(
        &self,
        db: &Db,
        id: &str,
        user_id: i64,
        chatflow_id: &str,
    ) -> Result<bool, StoreError> {
        if let Some((owner, _)) = self.owners.lock().get(id) {
            return Ok(*owner == user_id);
        }
        let owner = store::sessions::bind(db, id, user_id, chatflow_id).await?;
        let mine = owner.0 == user_id;
        self.remember(id, owner);
        Ok(mine)
    }

    /// The chatflow of `id` when the caller owns it; `None` when unknown or not theirs.
    pub async fn owned(
        &self,
        db: &Db,
        id: &str,
        user_id: i64,
    ) -> Result<Option<String>, StoreError> {
        let cached = self.owners.lock().get(id).cloned();
        let owner = match cached {
            Some(o) => Some(o),
            None => {
                let o = store::sessions::owner(db, id).await?;
                if let Some(o) = &o {
                    self.remember(id, o.clone());
                }
                o
            }
        };
        Ok(owner.filter(|(u, _)| *u == user_id).map(|(_, cf)| cf))
    }

    pub fn forget(&self, id: &str) {
        self.owners.lock().remove(id);
    }
}
