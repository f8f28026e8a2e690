//! Login throttling: a fixed window of failed attempts per username and per
//! client address. Memory is bounded: the table is pruned when it grows.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

const WINDOW: Duration = Duration::from_secs(60);
const MAX_KEYS: usize = 100_000;

pub struct LoginThrottle {
    per_user: u32,
    per_ip: u32,
    table: Mutex<HashMap<String, (Instant, u32)>>,
}

impl LoginThrottle {
    pub fn new(per_minute: u32) -> Self {
        LoginThrottle {
            per_user: per_minute.max(1),
            per_ip: per_minute.max(1).saturating_mul(5),
            table: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(seconds)` to wait when this username or address is over its budget.
    pub fn check(&self, username: &str, ip: &str) -> Option<u64> {
        let now = Instant::now();
        let t = self.table.lock();
        let over = |key: String, limit: u32| {
            t.get(&key).and_then(|(start, n)| {
                let elapsed = now.duration_since(*start);
                (elapsed < WINDOW && *n >= limit).then(|| (WINDOW - elapsed).as_secs() + 1)
            })
        };
        over(format!("u:{}", username.to_lowercase()), self.per_user)
            .or_else(|| over(format!("i:{ip}"), self.per_ip))
    }

    pub fn failed(&self, username: &str, ip: &str) {
        let now = Instant::now();
        let mut t = self.table.lock();
        if t.len() > MAX_KEYS {
            t.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        for key in [format!("u:{}", username.to_lowercase()), format!("i:{ip}")] {
            let e = t.entry(key).or_insert((now, 0));
            if now.duration_since(e.0) >= WINDOW {
                *e = (now, 0);
            }
            e.1 += 1;
        }
    }

    pub fn succeeded(&self, username: &str) {
        self.table
            .lock()
            .remove(&format!("u:{}", username.to_lowercase()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_budget() {
        let t = LoginThrottle::new(3);
        for _ in 0..3 {
            assert!(t.check("alice", "1.2.3.4").is_none());
            t.failed("alice", "1.2.3.4");
        }
        assert!(t.check("alice", "1.2.3.4").is_some());
        assert!(t.check("ALICE", "5.6.7.8").is_some());
        assert!(t.check("bob", "5.6.7.8").is_none());
    }
}
