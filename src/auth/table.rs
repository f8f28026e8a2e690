//! Compact, copy-on-write tables for the identity snapshot.
//!
//! A [`Table`] is a set of sorted vectors ("shards", chosen by a hash of the
//! key) of plain fixed-size rows: no per-row heap allocation, no hash-table
//! slack, a binary search to read. Cloning a table clones [`SHARDS`] `Arc`s;
//! changing a row copies only its shard (about 1/256 of the table), so a
//! snapshot with a million users is patched by a delta in microseconds while
//! readers keep the previous one.

use std::sync::Arc;

use uuid::Uuid;

pub const SHARDS: usize = 256;

/// A key that picks its shard.
pub trait ShardKey: Ord + Copy {
    fn shard(&self) -> usize;
}

fn mix(x: u64) -> usize {
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize
}

impl ShardKey for i64 {
    fn shard(&self) -> usize {
        mix(*self as u64)
    }
}

/// An API key prefix (12 ASCII characters).
impl ShardKey for [u8; 12] {
    fn shard(&self) -> usize {
        let mut h = [0u8; 8];
        h.copy_from_slice(&self[..8]);
        mix(u64::from_le_bytes(h) ^ (u64::from(self[8]) << 3) ^ (u64::from(self[11]) << 11))
    }
}

impl ShardKey for Uuid {
    fn shard(&self) -> usize {
        let (hi, lo) = self.as_u64_pair();
        mix(hi ^ lo)
    }
}

/// A grant: (user id, interned chatflow), sharded by the user, so that all
/// grants of one user are neighbours in one shard.
impl ShardKey for (i64, u32) {
    fn shard(&self) -> usize {
        self.0.shard()
    }
}

pub struct Table<K, V> {
    shards: Vec<Arc<Vec<(K, V)>>>,
}

impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        Table {
            shards: self.shards.clone(),
        }
    }
}

impl<K: ShardKey, V: Clone> Default for Table<K, V> {
    fn default() -> Self {
        Table {
            shards: (0..SHARDS).map(|_| Arc::new(Vec::new())).collect(),
        }
    }
}

impl<K: ShardKey, V: Clone> Table<K, V> {
    /// A table from rows in any order (a later duplicate key wins).
    pub fn from_buckets(buckets: Buckets<K, V>) -> Self {
        Table {
            shards: buckets
                .0
                .into_iter()
                .map(|mut rows| {
                    // Stable: of equal keys the later row ends up last.
                    rows.sort_by_key(|r| r.0);
                    let mut out: Vec<(K, V)> = Vec::with_capacity(rows.len());
                    for r in rows {
                        match out.last_mut() {
                            Some(last) if last.0 == r.0 => *last = r,
                            _ => out.push(r),
                        }
                    }
                    out.shrink_to_fit();
                    Arc::new(out)
                })
                .collect(),
        }
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        let shard = &self.shards[k.shard()];
        shard
            .binary_search_by(|(key, _)| key.cmp(k))
            .ok()
            .map(|i| &shard[i].1)
    }

    pub fn contains(&self, k: &K) -> bool {
        self.get(k).is_some()
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Inserts or replaces.
    pub fn upsert(&mut self, k: K, v: V) {
        let shard = Arc::make_mut(&mut self.shards[k.shard()]);
        match shard.binary_search_by(|(key, _)| key.cmp(&k)) {
            Ok(i) => shard[i].1 = v,
            Err(i) => shard.insert(i, (k, v)),
        }
    }

    pub fn remove(&mut self, k: &K) {
        let i = self.shards[k.shard()].binary_search_by(|(key, _)| key.cmp(k));
        if let Ok(i) = i {
            Arc::make_mut(&mut self.shards[k.shard()]).remove(i);
        }
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
        let idx = user.shard();
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
    }
}

/// Rows collected per shard, before sorting (a full load).
pub struct Buckets<K, V>(Vec<Vec<(K, V)>>);

impl<K: ShardKey, V> Buckets<K, V> {
    /// `expected` rows in all (a hint for the first allocation).
    pub fn new(expected: usize) -> Self {
        let each = expected / SHARDS + expected / SHARDS / 16 + 1;
        Buckets((0..SHARDS).map(|_| Vec::with_capacity(each)).collect())
    }

    pub fn push(&mut self, k: K, v: V) {
        self.0[k.shard()].push((k, v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_remove_and_clone_on_write() {
        let mut b = Buckets::new(10);
        for i in 0..1000i64 {
            b.push(i, i * 2);
        }
        b.push(5, 99);
        let mut t = Table::from_buckets(b);
        assert_eq!(t.len(), 1000);
        assert_eq!(t.get(&5), Some(&99));
        let before = t.clone();
        t.upsert(5, 1);
        t.upsert(5000, 7);
        t.remove(&6);
        assert_eq!(t.get(&5), Some(&1));
        assert_eq!(t.get(&5000), Some(&7));
        assert_eq!(t.get(&6), None);
        assert_eq!(before.get(&5), Some(&99));
        assert_eq!(before.get(&6), Some(&12));
        assert_eq!(before.get(&5000), None);
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
}
