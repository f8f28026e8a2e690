//! Compact, copy-on-write tables for the identity snapshot.
//!
//! A [`Table`] is a list of sorted vectors ("shards") of plain fixed-size
//! rows, each holding one range of keys: no per-row heap allocation, no
//! hash-table slack; a read is a binary search among the shards' first keys,
//! then one in the shard. Cloning a table clones one `Arc` per shard;
//! changing a row copies only its shard (about [`SHARD_BYTES`]), so a delta
//! patches a snapshot with a million users in microseconds while readers
//! keep the previous one.
//!
//! The shards are key ranges, not hash buckets, so that a full load read in
//! key order can replace a table one shard at a time ([`Rebuild`]): the
//! memory a full reload adds is the few shards built since the last install,
//! not a second copy of every table.

use std::sync::Arc;

use uuid::Uuid;

/// The size a shard is cut at by a full load (split in two by deltas at
/// twice this). Small enough that a delta's copy is cheap and a full
/// reload's extra memory small; large enough that a million users make a few
/// hundred shards, not millions of `Arc`s.
pub const SHARD_BYTES: usize = 64 * 1024;

/// A key, and what the shards are ranges of.
pub trait ShardKey: Ord + Copy {
    /// The key itself, or for a grant its user, so that all grants of one
    /// user stay in one shard. Ordered like the key (a key's route never
    /// decreases as the key grows).
    type Route: Ord + Copy;
    fn route(&self) -> Self::Route;
}

impl ShardKey for i64 {
    type Route = i64;
    fn route(&self) -> i64 {
        *self
    }
}

/// An API key prefix (12 ASCII characters), ordered bytewise.
impl ShardKey for [u8; 12] {
    type Route = [u8; 12];
    fn route(&self) -> [u8; 12] {
        *self
    }
}

impl ShardKey for Uuid {
    type Route = Uuid;
    fn route(&self) -> Uuid {
        *self
    }
}

/// A grant: (user id, interned chatflow), routed by the user.
impl ShardKey for (i64, u32) {
    type Route = i64;
    fn route(&self) -> i64 {
        self.0
    }
}

pub struct Table<K: ShardKey, V> {
    /// `starts[i]` is the first route of `shards[i + 1]` (the first shard
    /// takes everything below `starts[0]`). Shared: it changes only when a
    /// shard is split or a full load installs.
    starts: Arc<Vec<K::Route>>,
    shards: Vec<Arc<Vec<(K, V)>>>,
}

impl<K: ShardKey, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        Table {
            starts: self.starts.clone(),
            shards: self.shards.clone(),
        }
    }
}

impl<K: ShardKey, V: Clone> Default for Table<K, V> {
    fn default() -> Self {
        Table {
            starts: Arc::new(Vec::new()),
            shards: vec![Arc::new(Vec::new())],
        }
    }
}

/// Sorts rows by key; of equal keys the one that came last stays.
fn sorted_unique<K: Ord + Copy, V>(mut rows: Vec<(K, V)>) -> Vec<(K, V)> {
    // Stable: of equal keys the later row ends up last.
    rows.sort_by_key(|r| r.0);
    rows.dedup_by(|later, kept| {
        if later.0 == kept.0 {
            std::mem::swap(later, kept);
            true
        } else {
            false
        }
    });
    rows.shrink_to_fit();
    rows
}

impl<K: ShardKey, V: Clone> Table<K, V> {
    /// Rows a full load puts in one shard.
    fn rows_per_shard() -> usize {
        (SHARD_BYTES / std::mem::size_of::<(K, V)>().max(1)).max(16)
    }

    /// A table from rows in any order (a later duplicate key wins).
    #[cfg(test)]
    pub fn from_rows(rows: impl IntoIterator<Item = (K, V)>) -> Self {
        let mut rows: Vec<(K, V)> = rows.into_iter().collect();
        // Stable, by route only: duplicates keep their order for `push`.
        rows.sort_by_key(|r| r.0.route());
        let mut rebuild = Rebuild::new(Table::default());
        for (k, v) in rows {
            rebuild.push(k, v);
        }
        rebuild.finish()
    }

    fn shard_of(&self, route: &K::Route) -> usize {
        self.starts.partition_point(|start| start <= route)
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        let shard = &self.shards[self.shard_of(&k.route())];
        shard
            .binary_search_by(|(key, _)| key.cmp(k))
            .ok()
            .map(|i| &shard[i].1)
    }

    pub fn contains(&self, k: &K) -> bool {
        self.get(k).is_some()
    }

    /// Rows held (during a [`Rebuild`], counting the rows of the old shard
    /// being replaced twice).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Inserts or replaces.
    pub fn upsert(&mut self, k: K, v: V) {
        let idx = self.shard_of(&k.route());
        let shard = Arc::make_mut(&mut self.shards[idx]);
        match shard.binary_search_by(|(key, _)| key.cmp(&k)) {
            Ok(i) => shard[i].1 = v,
            Err(i) => shard.insert(i, (k, v)),
        }
        self.split_if_large(idx);
    }

    pub fn remove(&mut self, k: &K) {
        let idx = self.shard_of(&k.route());
        if let Ok(i) = self.shards[idx].binary_search_by(|(key, _)| key.cmp(k)) {
            Arc::make_mut(&mut self.shards[idx]).remove(i);
        }
    }

    /// Splits shard `idx` in two (at a change of route near its middle) once
    /// deltas have grown it to twice a full load's size: new users get
    /// ever higher ids, and would otherwise pile up in the last shard, whose
    /// every copy would then cost more.
    fn split_if_large(&mut self, idx: usize) {
        let shard = &self.shards[idx];
        if shard.len() <= 2 * Self::rows_per_shard() {
            return;
        }
        let middle = shard[shard.len() / 2].0.route();
        let mut at = shard.partition_point(|(k, _)| k.route() < middle);
        if at == 0 {
            at = shard.partition_point(|(k, _)| k.route() <= middle);
        }
        if at == shard.len() {
            // One route only (a user with thousands of grants): cannot split.
            return;
        }
        let upper: Vec<(K, V)> = shard[at..].to_vec();
        let start = upper[0].0.route();
        let lower = Arc::make_mut(&mut self.shards[idx]);
        lower.truncate(at);
        lower.shrink_to_fit();
        self.shards.insert(idx + 1, Arc::new(upper));
        Arc::make_mut(&mut self.starts).insert(idx, start);
    }

    /// Bytes held by the rows (capacity, not counting the `Arc` headers).
    pub fn bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.capacity() * std::mem::size_of::<(K, V)>())
            .sum()
    }
}

impl<V: Clone> Table<(i64, u32), V> {
    /// Replaces every row of user `user` with `rows`.
    pub fn replace_user(&mut self, user: i64, rows: impl IntoIterator<Item = (u32, V)>) {
        let idx = self.shard_of(&user);
        let shard = &self.shards[idx];
        let start = shard.partition_point(|((u, _), _)| *u < user);
        let end = shard.partition_point(|((u, _), _)| *u <= user);
        let mut new: Vec<((i64, u32), V)> = rows.into_iter().map(|(c, v)| ((user, c), v)).collect();
        new.sort_by_key(|r| r.0);
        new.dedup_by(|a, b| a.0 == b.0);
        if start == end && new.is_empty() {
            return;
        }
        Arc::make_mut(&mut self.shards[idx]).splice(start..end, new);
        self.split_if_large(idx);
    }
}

/// Builds the replacement of a table from rows read in route order, one
/// shard at a time, and gives at any point the table to install so far
/// ([`Rebuild::view`]): the new shards below the last route read, the old
/// table's shards from there on. Once a view no longer holds an old shard,
/// it is freed as soon as the readers of earlier views let go of it.
///
/// A row that comes out of route order (a source that does not sort like
/// the table) is still applied, at [`Rebuild::finish`], by an upsert.
pub struct Rebuild<K: ShardKey, V> {
    /// What is left of the table being replaced: the shards at and above the
    /// last completed new shard's end.
    old: Table<K, V>,
    /// The completed new shards, and the first route of each one after
    /// them (so one more start than completed shards: the last start is
    /// where the shard being filled begins).
    starts: Vec<K::Route>,
    shards: Vec<Arc<Vec<(K, V)>>>,
    /// The rows of the shard being filled, in arrival order.
    filling: Vec<(K, V)>,
    last_route: Option<K::Route>,
    out_of_order: Vec<(K, V)>,
    /// Bytes of the shards completed since the last view.
    bytes_since_view: usize,
}

impl<K: ShardKey, V: Clone> Rebuild<K, V> {
    pub fn new(old: Table<K, V>) -> Self {
        Rebuild {
            old,
            starts: Vec::new(),
            shards: Vec::new(),
            filling: Vec::new(),
            last_route: None,
            out_of_order: Vec::new(),
            bytes_since_view: 0,
        }
    }

    pub fn push(&mut self, k: K, v: V) {
        let route = k.route();
        if let Some(last) = self.last_route {
            if route < last {
                self.out_of_order.push((k, v));
                return;
            }
            // A shard ends where the route changes (all rows of one route
            // stay together).
            if route != last && self.filling.len() >= Table::<K, V>::rows_per_shard() {
                self.complete_shard(route);
            }
        }
        if self.filling.capacity() == 0 {
            self.filling.reserve_exact(Table::<K, V>::rows_per_shard());
        }
        self.last_route = Some(route);
        self.filling.push((k, v));
    }

    /// Completes the shard being filled; the next one starts at `next`.
    fn complete_shard(&mut self, next: K::Route) {
        let rows = sorted_unique(std::mem::take(&mut self.filling));
        self.bytes_since_view += rows.capacity() * std::mem::size_of::<(K, V)>();
        self.shards.push(Arc::new(rows));
        self.starts.push(next);
    }

    /// Bytes of the new shards no view holds yet (what installing a view
    /// now would let go of in old shards, about).
    pub fn bytes_since_view(&self) -> usize {
        self.bytes_since_view
    }

    /// The table to install now: new shards for the routes read, old ones
    /// for the rest.
    pub fn view(&mut self) -> Table<K, V> {
        self.bytes_since_view = 0;
        let Some(&cursor) = self.starts.last() else {
            return self.old.clone();
        };
        // The old shards wholly below the cursor are replaced: forget them.
        let first_kept = self.old.shard_of(&cursor);
        if first_kept > 0 {
            self.old.shards.drain(..first_kept);
            Arc::make_mut(&mut self.old.starts).drain(..first_kept);
        }
        let mut starts = self.starts.clone();
        starts.extend_from_slice(&self.old.starts);
        let mut shards = self.shards.clone();
        shards.extend(self.old.shards.iter().cloned());
        Table {
            starts: Arc::new(starts),
            shards,
        }
    }

    /// The new table, every old shard let go.
    pub fn finish(mut self) -> Table<K, V> {
        let rows = sorted_unique(std::mem::take(&mut self.filling));
        self.shards.push(Arc::new(rows));
        let mut table = Table {
            starts: Arc::new(self.starts),
            shards: self.shards,
        };
        if !self.out_of_order.is_empty() {
            log::warn!(
                "identity snapshot: {} rows came out of key order (applied one by one)",
                self.out_of_order.len()
            );
        }
        for (k, v) in self.out_of_order {
            table.upsert(k, v);
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_remove_and_clone_on_write() {
        let mut rows: Vec<(i64, i64)> = (0..100_000i64).map(|i| (i, i * 2)).collect();
        rows.push((5, 99));
        let mut t = Table::from_rows(rows);
        assert_eq!(t.len(), 100_000);
        assert!(t.shards.len() > 10, "{} shards", t.shards.len());
        assert_eq!(t.get(&5), Some(&99));
        assert_eq!(t.get(&77_777), Some(&155_554));
        let before = t.clone();
        t.upsert(5, 1);
        t.upsert(500_000, 7);
        t.upsert(-3, 4);
        t.remove(&6);
        assert_eq!(t.get(&5), Some(&1));
        assert_eq!(t.get(&500_000), Some(&7));
        assert_eq!(t.get(&-3), Some(&4));
        assert_eq!(t.get(&6), None);
        assert_eq!(before.get(&5), Some(&99));
        assert_eq!(before.get(&6), Some(&12));
        assert_eq!(before.get(&500_000), None);
    }

    #[test]
    fn a_shard_that_deltas_grow_is_split() {
        let mut t: Table<i64, i64> = Table::default();
        let n = 10 * Table::<i64, i64>::rows_per_shard() as i64;
        for i in 0..n {
            t.upsert(i, i);
        }
        assert!(t.shards.len() >= 5, "{} shards", t.shards.len());
        assert!(t
            .shards
            .iter()
            .all(|s| s.len() <= 2 * Table::<i64, i64>::rows_per_shard()));
        assert!((0..n).all(|i| t.get(&i) == Some(&i)));
        assert_eq!(t.len(), n as usize);
    }

    #[test]
    fn grants_of_one_user_are_replaced_together() {
        let mut t: Table<(i64, u32), ()> = Table::default();
        t.replace_user(7, [(1, ()), (3, ())]);
        t.replace_user(8, [(1, ())]);
        assert!(t.contains(&(7, 1)) && t.contains(&(7, 3)) && t.contains(&(8, 1)));
        t.replace_user(7, [(2, ())]);
        assert!(!t.contains(&(7, 1)) && t.contains(&(7, 2)) && !t.contains(&(7, 3)));
        assert!(t.contains(&(8, 1)));
        t.replace_user(7, []);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_user_with_many_grants_stays_in_one_shard() {
        let per_shard = Table::<(i64, u32), ()>::rows_per_shard() as u32;
        let mut rows = Vec::new();
        for user in 0..10i64 {
            let n = if user == 5 {
                3 * per_shard
            } else {
                per_shard / 2
            };
            rows.extend((0..n).rev().map(|c| ((user, c), ())));
        }
        let mut t = Table::from_rows(rows);
        assert!(t.contains(&(5, 0)) && t.contains(&(5, 3 * per_shard - 1)));
        t.replace_user(5, [(1, ())]);
        assert!(t.contains(&(5, 1)) && !t.contains(&(5, 0)));
        assert!(!t.contains(&(5, 2)) && t.contains(&(4, 0)) && t.contains(&(6, 0)));
        assert_eq!(t.len(), 1 + 9 * (per_shard / 2) as usize);
    }

    /// Every view of a rebuild answers each key with its old or its new row
    /// (old above the rows read so far, new below), never with nothing when
    /// both have it; the old shards are let go as the rebuild passes them.
    #[test]
    fn a_rebuild_replaces_shard_by_shard() {
        let old = Table::from_rows((0..50_000i64).map(|i| (i * 2, 0u64)));
        let old_shard = Arc::downgrade(&old.shards[0]);
        let mut rebuild = Rebuild::new(old.clone());
        drop(old);
        let mut views = 0;
        for i in 0..100_000i64 {
            // New: every integer, value 1; the even ones were there before.
            rebuild.push(i, 1);
            if rebuild.bytes_since_view() >= 4 * SHARD_BYTES {
                let view = rebuild.view();
                views += 1;
                for k in (0..100_000i64).step_by(7) {
                    let got = view.get(&k).copied();
                    if k < i - 4 * Table::<i64, u64>::rows_per_shard() as i64 {
                        assert_eq!(got, Some(1), "key {k} after row {i}");
                    } else if k > i && k % 2 == 0 {
                        assert_eq!(got, Some(0), "key {k} after row {i}");
                    } else {
                        assert!(got.is_some() || k % 2 == 1, "key {k} after row {i}");
                    }
                }
            }
        }
        assert!(views > 3);
        assert!(old_shard.upgrade().is_none(), "old shard still held");
        // Out of order: still applied.
        rebuild.push(3, 9);
        let t = rebuild.finish();
        assert_eq!(t.len(), 100_000);
        assert!((0..100_000i64).all(|i| t.get(&i) == Some(if i == 3 { &9 } else { &1 })));
        assert_eq!(t.get(&100_000), None);
    }
}
