//! What the snapshot does not know yet, asked of the database.
//!
//! A key, user or grant created a moment ago (on another instance, or with the
//! CLI) reaches this instance's snapshot only when the reload its NOTIFY asks
//! for is installed: a few to tens of milliseconds later. Behind a load
//! balancer the very next request may land here, so a snapshot miss is looked
//! up (one small indexed query) instead of refused.
//!
//! Bounded: at most [`PARALLEL`] look-ups run at once (a flood of random keys
//! waits for a permit, [`PERMIT_WAIT`] at most, then is refused without
//! touching the database), and answers are cached. A found entry is kept
//! until the next snapshot is installed (which then knows it, or knows it was
//! revoked); a miss is kept [`NEGATIVE_TTL`] at most, and never across a
//! snapshot, since a snapshot is installed after every identity change.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::snapshot::{KeyEntry, Role, SnapshotStore, UserEntry};
use crate::store::{self, Db};

const PARALLEL: usize = 4;
const PERMIT_WAIT: Duration = Duration::from_millis(500);
const NEGATIVE_TTL: Duration = Duration::from_secs(1);
const CACHE_LIMIT: usize = 10_000;

/// A chatflow as the database sees it for one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatflowAccess {
    Granted,
    NotGranted,
    Unknown,
}

/// A cached answer: `Some` found, `None` not found (until `Instant`).
enum Cached<T> {
    Found(T),
    Missing(Instant),
}

struct Cache {
    generation: u64,
    keys: HashMap<String, Cached<(KeyEntry, UserEntry)>>,
    users: HashMap<i64, Cached<UserEntry>>,
    chatflows: HashMap<(i64, String), Cached<ChatflowAccess>>,
}

impl Cache {
    fn clear(&mut self, generation: u64) {
        self.generation = generation;
        self.keys.clear();
        self.users.clear();
        self.chatflows.clear();
    }
}

pub struct Lookups {
    permits: Semaphore,
    cache: Mutex<Cache>,
}

impl Default for Lookups {
    fn default() -> Self {
        Self::new()
    }
}

/// What a look-up returned: `None` when it could not run (no permit in
/// time, or the database failed); then the caller refuses.
type Answer<T> = Option<Option<T>>;

impl Lookups {
    pub fn new() -> Self {
        Lookups {
            permits: Semaphore::new(PARALLEL),
            cache: Mutex::new(Cache {
                generation: 0,
                keys: HashMap::new(),
                users: HashMap::new(),
                chatflows: HashMap::new(),
            }),
        }
    }

    /// An active API key by its prefix, with its user.
    pub async fn api_key(
        &self,
        db: &Db,
        snapshot: &SnapshotStore,
        prefix: &str,
    ) -> Option<(KeyEntry, UserEntry)> {
        self.cached_or_lookup(
            snapshot,
            |c| &mut c.keys,
            prefix.to_string(),
            || async {
                let row = store::identity::api_key_by_prefix(db, prefix).await?;
                Ok(row.and_then(|(user_id, secret_hash, role, active, after)| {
                    Some((
                        KeyEntry::new(user_id, &secret_hash)?,
                        user_entry(&role, active, after),
                    ))
                }))
            },
        )
        .await
    }

    pub async fn user(&self, db: &Db, snapshot: &SnapshotStore, id: i64) -> Option<UserEntry> {
        self.cached_or_lookup(
            snapshot,
            |c| &mut c.users,
            id,
            || async {
                let row = store::identity::user_entry(db, id).await?;
                Ok(row.map(|(role, active, after)| user_entry(&role, active, after)))
            },
        )
        .await
    }

    /// Whether `user_id` may use `chatflow_id` according to the database.
    pub async fn chatflow(
        &self,
        db: &Db,
        snapshot: &SnapshotStore,
        user_id: i64,
        chatflow_id: &str,
    ) -> ChatflowAccess {
        let found = self
            .cached_or_lookup(
                snapshot,
                |c| &mut c.chatflows,
                (user_id, chatflow_id.to_string()),
                || async {
                    let row = store::identity::chatflow_grant(db, user_id, chatflow_id).await?;
                    Ok(Some(match row {
                        Some((false, true)) => ChatflowAccess::Granted,
                        Some((false, false)) => ChatflowAccess::NotGranted,
                        _ => ChatflowAccess::Unknown,
                    }))
                },
            )
            .await;
        // No answer (busy or failed): refused, as the snapshot said.
        found.unwrap_or(ChatflowAccess::NotGranted)
    }

    async fn cached_or_lookup<K, V, F, Fut>(
        &self,
        snapshot: &SnapshotStore,
        table: impl Fn(&mut Cache) -> &mut HashMap<K, Cached<V>>,
        key: K,
        lookup: F,
    ) -> Option<V>
    where
        K: Eq + Hash,
        V: Clone,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<V>, store::StoreError>>,
    {
        let generation = snapshot.generation();
        {
            let mut cache = self.cache.lock();
            if cache.generation != generation {
                cache.clear(generation);
            }
            match table(&mut cache).get(&key) {
                Some(Cached::Found(v)) => return Some(v.clone()),
                Some(Cached::Missing(until)) if Instant::now() < *until => return None,
                _ => {}
            }
        }
        let answer: Answer<V> =
            match tokio::time::timeout(PERMIT_WAIT, self.permits.acquire()).await {
                Ok(Ok(_permit)) => match lookup().await {
                    Ok(v) => Some(v),
                    Err(e) => {
                        log::warn!("identity look-up failed: {e}");
                        None
                    }
                },
                _ => {
                    crate::metrics::AUTH_FAILURES
                        .with_label_values(&["lookup_busy"])
                        .inc();
                    None
                }
            };
        let found = answer.clone().flatten();
        if let Some(v) = answer {
            let mut cache = self.cache.lock();
            // Only while no newer snapshot was installed: an answer read
            // before a change must not outlive the snapshot that has it.
            if cache.generation == generation && snapshot.generation() == generation {
                let t = table(&mut cache);
                if t.len() >= CACHE_LIMIT {
                    t.clear();
                }
                t.insert(
                    key,
                    match v {
                        Some(v) => Cached::Found(v),
                        None => Cached::Missing(Instant::now() + NEGATIVE_TTL),
                    },
                );
            }
        }
        found
    }
}

fn user_entry(role: &str, active: bool, after: chrono::DateTime<chrono::Utc>) -> UserEntry {
    UserEntry {
        role: Role::parse(role).unwrap_or(Role::User),
        active,
        tokens_valid_after: after,
    }
}
