//! The in-memory identity snapshot: users, API keys, revoked token ids, grants
//! and the chatflow catalogue. Authenticating and authorising a request reads
//! only this (no database round trip).
//!
//! Size: compact sharded tables (`table`): 24 bytes a user, 52 an API key,
//! 16 a grant (chatflow ids are interned), no per-user heap allocation; a
//! million users with a key and a grant each take about 92 MB. A full load
//! streams the rows, in key order, straight into them, and replaces the
//! installed tables shard by shard (see [`SnapshotStore::reload`]): a full
//! reload adds about a megabyte, not a second copy of the snapshot.
//!
//! Freshness: every instance LISTENs on [`CHANNEL`]; row triggers (V7) notify
//! what changed (`u:<user id>`, `g:<user id>` for their grants, `k:<key
//! prefix>`, `r:<revoked id>`, `c:<chatflow id>`). The reloader re-reads only
//! those rows and installs a patched copy (its cost follows the change, not
//! the number of users). A lost LISTEN connection or a payload it does not
//! understand means a full reload; so does a rare periodic safety net.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use super::table::{Rebuild, Table};
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

#[derive(Debug, Clone, Copy)]
pub struct UserEntry {
    pub role: Role,
    pub active: bool,
    pub tokens_valid_after: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub user_id: i64,
    pub secret_hash: [u8; 32],
}

impl KeyEntry {
    /// From a stored hash (always a SHA-256); `None` for anything else.
    pub fn new(user_id: i64, secret_hash: &[u8]) -> Option<KeyEntry> {
        Some(KeyEntry {
            user_id,
            secret_hash: secret_hash.try_into().ok()?,
        })
    }
}

/// An API key as the snapshot stores it: 40 bytes, alignment 1 (with its
/// 12-byte prefix, 52 bytes a key).
#[derive(Clone, Copy)]
struct KeyRow {
    hash: [u8; 32],
    user: [u8; 8],
}

fn prefix_key(prefix: &str) -> Option<[u8; 12]> {
    prefix.as_bytes().try_into().ok()
}

/// Chatflow ids as small numbers (a grant is a user id and one of these).
#[derive(Clone, Default)]
struct Interner {
    ids: HashMap<Box<str>, u32>,
}

impl Interner {
    fn get(&self, id: &str) -> Option<u32> {
        self.ids.get(id).copied()
    }
    fn intern(&mut self, id: &str) -> u32 {
        if let Some(n) = self.ids.get(id) {
            return *n;
        }
        let n = self.ids.len() as u32;
        self.ids.insert(id.into(), n);
        n
    }
}

/// What every request reads. Cheap to clone (shards are shared): a delta
/// clones it, patches the shards it touches and installs the copy.
#[derive(Clone, Default)]
pub struct Snapshot {
    users: Table<i64, UserEntry>,
    api_keys: Table<[u8; 12], KeyRow>,
    /// Revoked access-token ids (and login families), with their expiry
    /// (unix seconds).
    revoked: Table<Uuid, i64>,
    grants: Table<(i64, u32), ()>,
    chatflow_ids: Arc<Interner>,
    pub chatflows: Arc<HashMap<String, ChatflowRow>>,
    pub loaded: Option<Instant>,
}

impl Snapshot {
    pub fn user(&self, id: i64) -> Option<UserEntry> {
        self.users.get(&id).copied()
    }

    pub fn api_key(&self, prefix: &str) -> Option<KeyEntry> {
        let row = self.api_keys.get(&prefix_key(prefix)?)?;
        Some(KeyEntry {
            user_id: i64::from_le_bytes(row.user),
            secret_hash: row.hash,
        })
    }

    /// A revoked access-token id or login family.
    pub fn is_revoked(&self, id: &Uuid) -> bool {
        self.revoked.contains(id)
    }

    pub fn is_granted(&self, user_id: i64, chatflow_id: &str) -> bool {
        self.chatflow_ids
            .get(chatflow_id)
            .is_some_and(|c| self.grants.contains(&(user_id, c)))
    }

    /// A chatflow that exists in the catalogue and was not deleted in Flowise.
    pub fn chatflow(&self, id: &str) -> Option<&ChatflowRow> {
        self.chatflows.get(id).filter(|c| !c.deleted)
    }

    /// (users, api keys, grants, revoked ids) held.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        (
            self.users.len(),
            self.api_keys.len(),
            self.grants.len(),
            self.revoked.len(),
        )
    }

    /// Bytes held by the rows of the tables.
    pub fn bytes(&self) -> usize {
        self.users.bytes() + self.api_keys.bytes() + self.grants.bytes() + self.revoked.bytes()
    }

    fn set_user(&mut self, id: i64, role: &str, active: bool, after: DateTime<Utc>) {
        self.users.upsert(id, user_entry(role, active, after));
    }

    fn set_key(&mut self, prefix: &str, user_id: i64, hash: &[u8]) {
        if let (Some(p), Ok(hash)) = (prefix_key(prefix), hash.try_into()) {
            self.api_keys.upsert(
                p,
                KeyRow {
                    hash,
                    user: user_id.to_le_bytes(),
                },
            );
        }
    }
}

fn user_entry(role: &str, active: bool, after: DateTime<Utc>) -> UserEntry {
    UserEntry {
        role: Role::parse(role).unwrap_or(Role::User),
        active,
        tokens_valid_after: after,
    }
}

/// Bytes of new shards a full load builds before installing them (each
/// install lets go of the old shards they replace): about what a full reload
/// adds to the snapshot's memory, whatever the number of users.
const INSTALL_EVERY_BYTES: usize = 1 << 20;

/// Replaces the snapshot with a full load as its rows stream in (in key
/// order), installing each table shard by shard (see `SnapshotStore::reload`
/// for why that is safe).
struct Loader<'a> {
    store: &'a SnapshotStore,
    /// The snapshot as this load last installed it.
    view: Snapshot,
    users: Rebuild<i64, UserEntry>,
    api_keys: Rebuild<[u8; 12], KeyRow>,
    revoked: Rebuild<Uuid, i64>,
    grants: Rebuild<(i64, u32), ()>,
    chatflows: Vec<ChatflowRow>,
}

impl store::identity::IdentitySink for Loader<'_> {
    fn user(&mut self, id: i64, role: &str, active: bool, after: DateTime<Utc>) {
        self.users.push(id, user_entry(role, active, after));
        if self.users.bytes_since_view() >= INSTALL_EVERY_BYTES {
            self.view.users = self.users.view();
            self.install_view();
        }
    }
    fn api_key(&mut self, prefix: &str, user_id: i64, hash: &[u8]) {
        if let (Some(p), Ok(hash)) = (prefix_key(prefix), hash.try_into()) {
            self.api_keys.push(
                p,
                KeyRow {
                    hash,
                    user: user_id.to_le_bytes(),
                },
            );
        }
        if self.api_keys.bytes_since_view() >= INSTALL_EVERY_BYTES {
            self.view.api_keys = self.api_keys.view();
            self.install_view();
        }
    }
    fn revoked(&mut self, jti: Uuid, expires_at: DateTime<Utc>) {
        self.revoked.push(jti, expires_at.timestamp());
        if self.revoked.bytes_since_view() >= INSTALL_EVERY_BYTES {
            self.view.revoked = self.revoked.view();
            self.install_view();
        }
    }
    fn grant(&mut self, user_id: i64, chatflow_id: &str) {
        // Interned into the installed interner (ids only ever added), so
        // that the old shards' ids and the new ones' mean the same.
        let c = match self.view.chatflow_ids.get(chatflow_id) {
            Some(c) => c,
            None => Arc::make_mut(&mut self.view.chatflow_ids).intern(chatflow_id),
        };
        self.grants.push((user_id, c), ());
        if self.grants.bytes_since_view() >= INSTALL_EVERY_BYTES {
            self.view.grants = self.grants.view();
            self.install_view();
        }
    }
    fn chatflows(&mut self, rows: Vec<ChatflowRow>) {
        self.chatflows = rows;
    }
}

impl<'a> Loader<'a> {
    fn new(store: &'a SnapshotStore) -> Self {
        let view = Snapshot::clone(&store.current.load());
        Loader {
            store,
            users: Rebuild::new(view.users.clone()),
            api_keys: Rebuild::new(view.api_keys.clone()),
            revoked: Rebuild::new(view.revoked.clone()),
            grants: Rebuild::new(view.grants.clone()),
            view,
            chatflows: Vec::new(),
        }
    }

    fn install_view(&self) {
        self.store.install_view(self.view.clone());
    }

    fn finish(self) -> Snapshot {
        let mut chatflow_ids = self.view.chatflow_ids;
        for c in &self.chatflows {
            if chatflow_ids.get(&c.id).is_none() {
                Arc::make_mut(&mut chatflow_ids).intern(&c.id);
            }
        }
        Snapshot {
            users: self.users.finish(),
            api_keys: self.api_keys.finish(),
            revoked: self.revoked.finish(),
            grants: self.grants.finish(),
            chatflow_ids,
            chatflows: Arc::new(
                self.chatflows
                    .into_iter()
                    .map(|c| (c.id.clone(), c))
                    .collect(),
            ),
            loaded: Some(Instant::now()),
        }
    }
}

/// The notification channel; payloads name what changed (see
/// `migrations/V7__identity_deltas.sql`).
pub const CHANNEL: &str = "flowise_proxy_identity";

/// More changes than this in one batch: one full reload instead.
const DELTA_LIMIT: usize = 50_000;

/// Changes noted by the listener, not yet applied.
#[derive(Default)]
struct Pending {
    users: HashSet<i64>,
    grants_of: HashSet<i64>,
    api_keys: HashSet<String>,
    revoked: HashSet<Uuid>,
    chatflows: bool,
    /// A full reload is wanted (its trigger).
    full: Option<&'static str>,
    /// The highest of this instance's markers received (see `refresh_now`).
    marker: u64,
}

impl Pending {
    fn changes(&self) -> usize {
        self.users.len()
            + self.grants_of.len()
            + self.api_keys.len()
            + self.revoked.len()
            + usize::from(self.chatflows)
    }

    fn is_empty(&self) -> bool {
        self.changes() == 0 && self.full.is_none() && self.marker == 0
    }

    /// Puts back a batch that could not be applied.
    fn merge(&mut self, other: Pending) {
        self.users.extend(other.users);
        self.grants_of.extend(other.grants_of);
        self.api_keys.extend(other.api_keys);
        self.revoked.extend(other.revoked);
        self.chatflows |= other.chatflows;
        self.full = self.full.or(other.full);
        self.marker = self.marker.max(other.marker);
    }
}

pub struct SnapshotStore {
    current: ArcSwap<Snapshot>,
    /// Bumped at every install (the look-up cache keys on it).
    generation: AtomicU64,
    pending: Mutex<Pending>,
    /// Wakes the reloader (a local change, or a notification).
    wake: Notify,
    /// Names this instance's markers among every instance's.
    instance: String,
    /// Markers handed out by `refresh_now`, and the highest one whose
    /// changes are installed.
    next_marker: AtomicU64,
    done_marker: watch::Sender<u64>,
    /// The LISTEN connection is up (notifications are flowing).
    listening: AtomicBool,
    /// Connected at least once (the first connect asks for the start-up load).
    listened: AtomicBool,
    /// Set when the reloader starts (`refresh_now` sends its marker with it).
    db: OnceLock<Db>,
    /// One writer at a time.
    writer: tokio::sync::Mutex<()>,
    in_sync_at: Mutex<Option<Instant>>,
}

impl SnapshotStore {
    pub fn new() -> Self {
        SnapshotStore {
            current: ArcSwap::from_pointee(Snapshot::default()),
            generation: AtomicU64::new(0),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            instance: Uuid::new_v4().simple().to_string(),
            next_marker: AtomicU64::new(0),
            done_marker: watch::channel(0).0,
            listening: AtomicBool::new(false),
            listened: AtomicBool::new(false),
            db: OnceLock::new(),
            writer: tokio::sync::Mutex::new(()),
            in_sync_at: Mutex::new(None),
        }
    }

    pub fn get(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The number of the installed snapshot: it changes with every install
    /// (a full reload or a delta).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn is_loaded(&self) -> bool {
        self.current.load().loaded.is_some()
    }

    fn install(&self, s: Snapshot) {
        self.install_view(s);
        self.mark_in_sync();
    }

    /// Installs `s` (a whole snapshot, or part of a full reload: see
    /// `reload`).
    fn install_view(&self, s: Snapshot) {
        let (users, keys, grants, revoked) = s.counts();
        for (kind, n) in [
            ("users", users),
            ("api_keys", keys),
            ("grants", grants),
            ("revoked", revoked),
            ("bytes", s.bytes()),
        ] {
            crate::metrics::SNAPSHOT_ENTRIES
                .with_label_values(&[kind])
                .set(n as i64);
        }
        self.current.store(Arc::new(s));
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn mark_in_sync(&self) {
        *self.in_sync_at.lock() = Some(Instant::now());
        crate::metrics::SNAPSHOT_AGE_SECONDS.set(0);
    }

    fn finish_marker(&self, upto: u64) {
        self.done_marker.send_if_modified(|done| {
            if upto > *done {
                *done = upto;
                true
            } else {
                false
            }
        });
    }

    /// Reloads everything now, streamed in key order into the compact
    /// tables, which are installed shard by shard as the rows come (a full
    /// reload adds about `INSTALL_EVERY_BYTES` to the memory, not a second
    /// copy of the snapshot). Covers every `refresh_now` that began before
    /// it.
    ///
    /// Why readers may see the partial installs:
    ///
    /// - No change is lost. This holds the writer lock: no delta is applied
    ///   while it runs, and the notifications that arrive meanwhile wait in
    ///   `pending`, to be applied after it; a delta re-reads its rows then, so
    ///   it overwrites this load's older reading of them, never the other way
    ///   round. A change committed before the load's read snapshot (one
    ///   repeatable-read transaction) is in the rows read; one committed after
    ///   it notifies after its commit, so after the reloader took the batch
    ///   that asked for this reload: it is in `pending`. A lost LISTEN
    ///   connection asks for another full reload; a load that fails half-way
    ///   puts its batch (and so the full reload) back, and the next attempt
    ///   starts again from whatever it had installed.
    /// - Each row goes once from the value readers had before (the previous
    ///   snapshot) to its value in the load's read snapshot, at the install
    ///   that covers its key: never later than the single install at the end
    ///   used to, never back. Rows of one user's grants move together (one
    ///   shard). A miss is looked up in the database (`auth::lookup`), so a
    ///   row not read yet never refuses a valid user; and a row a table gains
    ///   (a key, a grant, a user) is what that look-up would have answered
    ///   anyway.
    /// - What a half-installed snapshot can combine that neither the old nor
    ///   the new one holds: a row already at its new value with another still
    ///   at its old one. Revoked ids, API keys and grants only ever change a
    ///   row the snapshot has to something stricter (an id revoked, a key or
    ///   a grant gone; this proxy never changes a key's hash or owner in
    ///   place, and a revoked id goes only once its token has expired):
    ///   taken early, they only take away. Only a user row can change to
    ///   something laxer (re-activated, made admin); users are read last
    ///   (see `store::identity::load_identity`), so such a row is only ever
    ///   combined with keys, grants and revocations already at their new
    ///   values.
    /// - The cost: a change committed while the load runs is, from the
    ///   install that covers its key until the deltas after the load, at the
    ///   load's value, as it was before from the end of the load until the
    ///   deltas: the same lag, begun earlier (at most the load's duration).
    pub async fn reload(&self, db: &Db, trigger: &str) -> Result<(), store::StoreError> {
        let _writer = self.writer.lock().await;
        let covers = self.next_marker.load(Ordering::SeqCst);
        let started = Instant::now();
        let mut loader = Loader::new(self);
        let rows = store::identity::load_identity(db, &mut loader).await?;
        let s = loader.finish();
        let (users, keys, grants, revoked) = s.counts();
        self.install(s);
        self.finish_marker(covers);
        crate::metrics::SNAPSHOT_RELOADS
            .with_label_values(&[trigger])
            .inc();
        crate::metrics::SNAPSHOT_ROWS_READ
            .with_label_values(&["full"])
            .inc_by(rows);
        log::info!(
            "identity snapshot loaded ({trigger}): {users} users, {keys} api keys, {grants} grants, \
             {revoked} revoked ids in {} ms",
            started.elapsed().as_millis()
        );
        // The previous tables (as large as the new ones) are free once the
        // last reader lets go of them: give their pages back to the system,
        // or the process keeps twice the snapshot's size after every full
        // reload.
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = tokio::task::spawn_blocking(crate::allocator::give_back).await;
            });
        }
        Ok(())
    }

    /// Re-reads only the rows a batch names and patches a copy of the
    /// snapshot (copying only the shards it touches).
    async fn apply_delta(&self, db: &Db, batch: &Pending) -> Result<(), store::StoreError> {
        let _writer = self.writer.lock().await;
        if batch.changes() > 0 {
            let keys = store::identity::ChangedKeys {
                users: batch.users.iter().copied().collect(),
                grants_of: batch.grants_of.iter().copied().collect(),
                api_keys: batch.api_keys.iter().cloned().collect(),
                revoked: batch.revoked.iter().copied().collect(),
                chatflows: batch.chatflows,
            };
            let rows = store::identity::read_changes(db, &keys).await?;
            let read = rows.count();
            let mut s = Snapshot::clone(&self.current.load());
            for id in &keys.users {
                s.users.remove(id);
            }
            for (id, role, active, after) in &rows.users {
                s.set_user(*id, role, *active, *after);
            }
            let mut granted: HashMap<i64, Vec<(u32, ())>> =
                keys.grants_of.iter().map(|u| (*u, Vec::new())).collect();
            if !rows.grants.is_empty() {
                let ids = Arc::make_mut(&mut s.chatflow_ids);
                for (user, chatflow) in &rows.grants {
                    granted
                        .entry(*user)
                        .or_default()
                        .push((ids.intern(chatflow), ()));
                }
            }
            for (user, list) in granted {
                s.grants.replace_user(user, list);
            }
            for prefix in &keys.api_keys {
                if let Some(p) = prefix_key(prefix) {
                    s.api_keys.remove(&p);
                }
            }
            for (prefix, user_id, hash) in &rows.api_keys {
                s.set_key(prefix, *user_id, hash);
            }
            for jti in &keys.revoked {
                s.revoked.remove(jti);
            }
            for (jti, expires_at) in &rows.revoked {
                s.revoked.upsert(*jti, expires_at.timestamp());
            }
            if let Some(chatflows) = rows.chatflows {
                let ids = Arc::make_mut(&mut s.chatflow_ids);
                for c in &chatflows {
                    ids.intern(&c.id);
                }
                s.chatflows = Arc::new(chatflows.into_iter().map(|c| (c.id.clone(), c)).collect());
            }
            self.install(s);
            crate::metrics::SNAPSHOT_DELTAS.inc();
            crate::metrics::SNAPSHOT_ROWS_READ
                .with_label_values(&["delta"])
                .inc_by(read);
        }
        self.finish_marker(batch.marker);
        Ok(())
    }

    /// Asks the reloader to read the chatflow catalogue again soon (after a
    /// sync on this instance).
    pub fn invalidate(&self) {
        self.pending.lock().chatflows = true;
        self.wake.notify_one();
    }

    /// Notes one notification payload (see the V7 migration): the rows it
    /// names are read again; anything unparseable asks for a full reload.
    fn note(&self, payload: &str) {
        let mut p = self.pending.lock();
        let ok = match payload.split_once(':') {
            Some(("u", id)) => id.parse().map(|id| p.users.insert(id)).is_ok(),
            Some(("g", id)) => id.parse().map(|id| p.grants_of.insert(id)).is_ok(),
            Some(("k", prefix)) => {
                // A prefix of another length is never in the snapshot.
                if prefix.len() == 12 {
                    p.api_keys.insert(prefix.to_string());
                }
                true
            }
            Some(("r", jti)) => Uuid::parse_str(jti).map(|j| p.revoked.insert(j)).is_ok(),
            Some(("c", _)) => {
                p.chatflows = true;
                true
            }
            Some(("m", marker)) => match marker.split_once(':') {
                Some((instance, n)) if instance == self.instance => match n.parse::<u64>() {
                    Ok(n) => {
                        p.marker = p.marker.max(n);
                        true
                    }
                    Err(_) => false,
                },
                // Another instance's marker: nothing changed.
                Some(_) => return,
                None => false,
            },
            _ => false,
        };
        if !ok {
            log::warn!("identity notification not understood ({payload:.40}): full reload");
            p.full = Some("unparsed");
        }
        drop(p);
        self.wake.notify_one();
    }

    fn request_full(&self, trigger: &'static str) {
        self.pending.lock().full = Some(trigger);
        self.wake.notify_one();
    }

    /// Waits (up to 2 s) until every change committed before this call is
    /// installed here, so that a change made through this instance (a
    /// revoke, a deactivation, a grant) is in force before its answer goes
    /// out. It sends a marker notification after the change: notifications
    /// arrive in commit order, so once the marker is back, the change's own
    /// notification is in, and its rows are re-read with the marker's batch.
    /// Other instances follow through the change's notification.
    pub async fn refresh_now(&self) {
        let n = self.next_marker.fetch_add(1, Ordering::SeqCst) + 1;
        let mut done = self.done_marker.subscribe();
        if self.listening.load(Ordering::SeqCst) {
            if let Some(db) = self.db.get() {
                let payload = format!("m:{}:{n}", self.instance);
                if let Err(e) = store::identity::notify_marker(db, CHANNEL, &payload).await {
                    log::warn!("identity marker not sent: {e}");
                }
            }
        }
        // Without LISTEN, the reconnect's full reload covers the change.
        let waited = tokio::time::timeout(Duration::from_secs(2), done.wait_for(|d| *d >= n)).await;
        if !matches!(waited, Ok(Ok(_))) {
            log::warn!(
                "identity snapshot not updated within 2 s of a change; the reloader keeps trying"
            );
        }
    }

    /// Runs forever: loads everything once the LISTEN connection is up (or
    /// after 3 s without it), then applies the changes the notifications
    /// name. A full reload happens again only after a lost LISTEN connection,
    /// an unparseable notification, or every `full_every` (rare: the deltas
    /// keep the snapshot current; it is a safety net).
    pub async fn run_reloader(self: Arc<Self>, db: Db, every: Duration, full_every: Duration) {
        let _ = self.db.set(db.clone());
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while !self.listened.load(Ordering::SeqCst) {
                self.wake.notified().await;
            }
        })
        .await;
        {
            let mut p = self.pending.lock();
            if !self.is_loaded() {
                p.full = Some("startup");
            }
        }
        let mut last_full = Instant::now();
        loop {
            let batch = std::mem::take(&mut *self.pending.lock());
            if batch.is_empty() {
                let woken = tokio::select! {
                    _ = self.wake.notified() => true,
                    _ = tokio::time::sleep(every) => false,
                };
                if !woken {
                    if last_full.elapsed() >= full_every {
                        self.request_full("periodic");
                    } else if self.listening.load(Ordering::SeqCst) {
                        // Notifications flow (the listener's heartbeat
                        // answers): the snapshot is current.
                        self.mark_in_sync();
                    } else if let Some(at) = *self.in_sync_at.lock() {
                        crate::metrics::SNAPSHOT_AGE_SECONDS.set(at.elapsed().as_secs() as i64);
                    }
                }
                continue;
            }
            let result = match batch.full {
                Some(trigger) => self.reload(&db, trigger).await.map(|_| {
                    last_full = Instant::now();
                    self.finish_marker(batch.marker);
                }),
                None if batch.changes() > DELTA_LIMIT => {
                    self.reload(&db, "overflow").await.map(|_| {
                        last_full = Instant::now();
                        self.finish_marker(batch.marker);
                    })
                }
                None => self.apply_delta(&db, &batch).await,
            };
            if let Err(e) = result {
                log::warn!("identity snapshot update failed: {e}");
                self.pending.lock().merge(batch);
                // Retry soon rather than waiting a whole period.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// Runs forever: holds a LISTEN connection and notes every notification;
    /// reconnects when the connection is lost, then reloads everything (it
    /// may have missed notifications).
    pub async fn run_listener(self: Arc<Self>, database_url: String) {
        loop {
            let store = &*self;
            let listened = crate::store::listen(
                &database_url,
                CHANNEL,
                || {
                    store.listening.store(true, Ordering::SeqCst);
                    // Changes made while we were not listening: read
                    // everything (the first time, this is the start-up load).
                    if store.listened.swap(true, Ordering::SeqCst) {
                        store.request_full("reconnect");
                    } else {
                        store.wake.notify_one();
                    }
                },
                |payload| store.note(payload),
            )
            .await;
            match listened {
                Ok(()) => log::warn!("snapshot LISTEN connection closed; reconnecting"),
                Err(e) => log::warn!("snapshot LISTEN failed: {e}; retrying"),
            }
            self.listening.store(false, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Default for SnapshotStore {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_rows_and_anything_else_asks_for_a_full_reload() {
        let s = SnapshotStore::new();
        s.note("u:42");
        s.note("g:7");
        s.note("k:0123456789ab");
        s.note("r:67e55044-10b1-426f-9247-bb680e5fe0c8");
        s.note("c:some-flow");
        s.note(&format!("m:{}:3", s.instance));
        s.note("m:someone-else:9");
        {
            let p = s.pending.lock();
            assert!(p.users.contains(&42) && p.grants_of.contains(&7));
            assert!(p.api_keys.contains("0123456789ab") && p.revoked.len() == 1);
            assert!(p.chatflows && p.marker == 3 && p.full.is_none());
        }
        s.note("users");
        assert_eq!(s.pending.lock().full, Some("unparsed"));
    }

    #[test]
    fn rows_are_small() {
        assert_eq!(std::mem::size_of::<(i64, UserEntry)>(), 24);
        assert_eq!(std::mem::size_of::<([u8; 12], KeyRow)>(), 52);
        assert_eq!(std::mem::size_of::<((i64, u32), ())>(), 16);
    }
}
