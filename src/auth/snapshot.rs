//! The in-memory identity snapshot: users, API keys, revoked token ids, grants
//! and the chatflow catalogue. Authenticating and authorising a request reads
//! only this (no database round trip).
//!
//! Freshness: every instance LISTENs on `flowise_proxy_snapshot` (triggers on the
//! tables notify on any change) and reloads at once; a periodic full reload is the
//! safety net, and a lost LISTEN connection is re-established in a loop.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::store::{self, catalog::ChatflowRow, Db};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }
}

#[derive(Debug, Clone)]
pub struct UserEntry {
    pub role: Role,
    pub active: bool,
    pub tokens_valid_after: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub user_id: i64,
    pub secret_hash: Vec<u8>,
}

#[derive(Default)]
pub struct Snapshot {
    pub users: HashMap<i64, UserEntry>,
    pub api_keys: HashMap<String, KeyEntry>,
    pub revoked: HashSet<Uuid>,
    pub grants: HashSet<(i64, String)>,
    pub chatflows: HashMap<String, ChatflowRow>,
    pub loaded: Option<Instant>,
}

impl Snapshot {
    pub fn is_granted(&self, user_id: i64, chatflow_id: &str) -> bool {
        self.grants.contains(&(user_id, chatflow_id.to_string()))
    }

    /// A chatflow that exists in the catalogue and was not deleted in Flowise.
    pub fn chatflow(&self, id: &str) -> Option<&ChatflowRow> {
        self.chatflows.get(id).filter(|c| !c.deleted)
    }
}

pub struct SnapshotStore {
    current: ArcSwap<Snapshot>,
    /// Wakes the reloader (a local change, or a notification).
    wake: Notify,
    /// Reloads are numbered when they start reading. A reload installs its
    /// snapshot only if no later-started one is in place (an older read
    /// never replaces a newer one), and [`refresh_now`](Self::refresh_now)
    /// waits on `installed` for a reload that started after its change.
    started: AtomicU64,
    installed: watch::Sender<u64>,
}

impl SnapshotStore {
    pub fn new() -> Self {
        SnapshotStore {
            current: ArcSwap::from_pointee(Snapshot::default()),
            wake: Notify::new(),
            started: AtomicU64::new(0),
            installed: watch::channel(0).0,
        }
    }

    pub fn get(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The number of the installed snapshot: it changes with every install.
    pub fn generation(&self) -> u64 {
        *self.installed.borrow()
    }

    pub fn is_loaded(&self) -> bool {
        self.current.load().loaded.is_some()
    }

    /// Reloads everything now.
    pub async fn reload(&self, db: &Db, trigger: &str) -> Result<(), store::StoreError> {
        let seq = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let rows = store::identity::load_snapshot(db).await?;
        let mut s = Snapshot {
            loaded: Some(Instant::now()),
            ..Default::default()
        };
        for (id, _username, role, active, after) in rows.users {
            s.users.insert(
                id,
                UserEntry {
                    role: Role::parse(&role).unwrap_or(Role::User),
                    active,
                    tokens_valid_after: after,
                },
            );
        }
        for (_id, user_id, prefix, secret_hash) in rows.api_keys {
            s.api_keys.insert(
                prefix,
                KeyEntry {
                    user_id,
                    secret_hash,
                },
            );
        }
        s.revoked = rows.revoked.into_iter().collect();
        s.grants = rows.grants.into_iter().collect();
        s.chatflows = rows
            .chatflows
            .into_iter()
            .map(|c| (c.id.clone(), c))
            .collect();
        let newest = self.installed.send_if_modified(|installed| {
            if seq < *installed {
                return false;
            }
            *installed = seq;
            self.current.store(Arc::new(s));
            true
        });
        if !newest {
            return Ok(());
        }
        crate::metrics::SNAPSHOT_RELOADS
            .with_label_values(&[trigger])
            .inc();
        crate::metrics::SNAPSHOT_AGE_SECONDS.set(0);
        Ok(())
    }

    /// Asks the reloader for a reload soon (after a local change).
    pub fn invalidate(&self) {
        self.wake.notify_one();
    }

    /// Wakes the reloader and waits (up to 2 s) until a reload that started
    /// after the caller's change is installed, so that a change made through
    /// this instance (a revoke, a deactivation, a grant) is in force here
    /// before its answer goes out. It is the same reload the change's NOTIFY
    /// asks for, not a second one. Other instances follow through NOTIFY.
    pub async fn refresh_now(&self) {
        let wanted = self.started.load(Ordering::SeqCst) + 1;
        let mut installed = self.installed.subscribe();
        self.invalidate();
        let waited = tokio::time::timeout(
            Duration::from_secs(2),
            installed.wait_for(|seq| *seq >= wanted),
        )
        .await;
        if !matches!(waited, Ok(Ok(_))) {
            log::warn!(
                "identity snapshot not reloaded within 2 s of a change; the reloader keeps trying"
            );
        }
    }

    /// Runs forever: reload on wake-ups and periodically.
    pub async fn run_reloader(self: Arc<Self>, db: Db, every: Duration) {
        loop {
            let woken = tokio::select! {
                _ = self.wake.notified() => true,
                _ = tokio::time::sleep(every) => false,
            };
            if let Err(e) = self
                .reload(&db, if woken { "notify" } else { "periodic" })
                .await
            {
                log::warn!("identity snapshot reload failed: {e}");
                // Retry soon rather than waiting a whole period.
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.wake.notify_one();
            }
            if let Some(at) = self.current.load().loaded {
                crate::metrics::SNAPSHOT_AGE_SECONDS.set(at.elapsed().as_secs() as i64);
            }
        }
    }

    /// Runs forever: holds a LISTEN connection and wakes the reloader on every
    /// notification; reconnects when the connection is lost.
    pub async fn run_listener(self: Arc<Self>, database_url: String) {
        loop {
            match listen_once(&self, &database_url).await {
                Ok(()) => log::warn!("snapshot LISTEN connection closed; reconnecting"),
                Err(e) => log::warn!("snapshot LISTEN failed: {e}; retrying"),
            }
            // A reconnect may have missed notifications: reload.
            self.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Default for SnapshotStore {
    fn default() -> Self {
        Self::new()
    }
}

async fn listen_once(store: &SnapshotStore, url: &str) -> Result<(), tokio_postgres::Error> {
    let mut pg: tokio_postgres::Config = url.parse()?;
    pg.connect_timeout(Duration::from_secs(3));
    pg.application_name("flowise-proxy-listen");
    pg.keepalives_idle(Duration::from_secs(10));
    let (client, mut conn) = pg.connect(tokio_postgres::NoTls).await?;
    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
    let listen = async {
        client
            .batch_execute("LISTEN flowise_proxy_snapshot")
            .await?;
        // Changes made while we were not listening: catch up.
        store.wake.notify_one();
        // Detect a dead server with a cheap query now and then.
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            client.simple_query("SELECT 1").await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), tokio_postgres::Error>(())
    };
    let pump = async {
        while let Some(msg) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(_) = msg? {
                store.wake.notify_one();
            }
        }
        Ok(())
    };
    tokio::select! {
        r = listen => r,
        r = pump => r,
    }
}
