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

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use crate::store::{self, Db, StoreError};

/// Conversations Flowise started are bound to their owner by the ledger's
/// settlement batches, a few milliseconds after the answer (no commit of
/// their own). Every ownership read first waits until the bindings queued
/// before it are written, so that an owner who asks right after the answer
/// finds the conversation.
pub struct SessionBindings {
    queued: AtomicU64,
    written: watch::Sender<u64>,
    /// A reader is waiting: the settlement batch stops gathering.
    wanted: tokio::sync::Notify,
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
        SessionBindings {
            queued: AtomicU64::new(0),
            written: watch::channel(0).0,
            wanted: tokio::sync::Notify::new(),
        }
    }

    /// A binding was queued: its number, to report as written.
    pub fn queued(&self) -> u64 {
        self.queued.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The bindings numbered up to `through` are in the database.
    pub fn written(&self, through: u64) {
        self.written.send_if_modified(|w| {
            let newer = through > *w;
            if newer {
                *w = through;
            }
            newer
        });
    }

    /// Completes when a reader waits for bindings (the settlement batch
    /// writes at once instead of gathering more rows).
    pub async fn wanted(&self) {
        self.wanted.notified().await
    }

    /// Waits (2 s at most) until every binding queued so far is written.
    async fn settled(&self) {
        let target = self.queued.load(Ordering::SeqCst);
        let mut written = self.written.subscribe();
        if *written.borrow() < target {
            self.wanted.notify_one();
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(2), written.wait_for(|w| *w >= target)).await;
    }

    /// The caller's conversations, newest use first.
    pub async fn list(
        &self,
        db: &Db,
        user_id: i64,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<Value>, StoreError> {
        self.settled().await;
        store::sessions::list(db, user_id, limit, offset).await
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
        self.settled().await;
        let owner = store::sessions::owner(db, id).await?;
        Ok(owner.filter(|(u, _)| *u == user_id).map(|(_, cf)| cf))
    }
}

impl Default for SessionBindings {
    fn default() -> Self {
        Self::new()
    }
}
