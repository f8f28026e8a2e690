//! This instance's credit leases: the in-memory side.
//!
//! A lease is a block of one user's credits that this instance took out of
//! the user's available balance in one statement (a hold with `lease = true`,
//! see `migrations/V6__credit_leases.sql`). Predictions of that user are then
//! admitted against it here, without a database round trip; each one's
//! `charge` (or `void`) row is written later by the settlement batches.
//!
//! Per lease, the credits the database still counts as held are always
//! `free + in_flight + queued` (what nobody uses yet, what running
//! predictions hold, what finished predictions kept but whose rows are not
//! written yet). So a release of at most `free` can never take what a
//! running or finished prediction needs.
//!
//! Leases never make a user poorer than the exact rule: when this instance
//! cannot admit a prediction (its leases and the available balance are too
//! small), it recalls the user's leases on every instance (each gives back
//! its free part at once and admits that user's predictions with exact holds
//! for a while) and tries once more; see `Ledger::admit`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;
use uuid::Uuid;

/// How long a user's predictions go through exact holds on this instance
/// after a recall (theirs or ours): the balance is nearly spent, and a new
/// lease would only be recalled again.
pub const EXACT_AFTER_RECALL: Duration = Duration::from_secs(10);

struct Lease {
    id: Uuid,
    taken_at: Instant,
    /// Credits not given to any prediction.
    free: i64,
    /// Credits held by running predictions.
    in_flight: i64,
    /// Running predictions.
    running: u32,
    /// Credits kept by finished predictions whose rows are not written yet.
    queued: i64,
    /// Admits nothing more; closed (the rest released) once nothing runs.
    closing: bool,
    last_used: Instant,
}

#[derive(Default)]
struct UserLeases {
    leases: Vec<Lease>,
    /// A lease is being taken for this user: others wait for it instead of
    /// taking their own (`true` is sent when it is done, either way).
    taking: Option<watch::Receiver<bool>>,
    /// Exact holds only, until then.
    exact_until: Option<Instant>,
    /// The available balance the database reported last.
    available: i64,
    /// The next lease is this many times the policy's size: doubled when a
    /// lease was used up within `BUSY`, so that a busy user's admissions
    /// rarely wait for a new one.
    scale: i64,
}

/// A lease used up faster than this makes the next one twice as large.
const BUSY: Duration = Duration::from_secs(1);
/// The largest lease, in multiples of the policy's size.
const MAX_SCALE: i64 = 32;

/// What `LeaseBook::admit` decided.
pub enum Decision {
    /// Admitted on `lease`; the user's available credits after it.
    Admitted { lease: Uuid, available_after: i64 },
    /// Another request is taking a lease for this user: wait, then ask again.
    Wait(watch::Receiver<bool>),
    /// The caller takes a lease for this user, `scale` times the policy's
    /// size (and must report back with `taken` or `not_taken`); `done` tells
    /// waiters when it is over.
    Take {
        done: watch::Sender<bool>,
        scale: i64,
    },
    /// Use an exact hold.
    Exact,
}

/// A lease to give back: `release` credits now, and close it when `close`.
#[derive(Debug, PartialEq, Eq)]
pub struct GiveBack {
    pub user_id: i64,
    pub lease: Uuid,
    pub release: i64,
    pub close: bool,
}

/// One lease of one user, if this instance still holds it.
fn lease_mut(
    users: &mut HashMap<i64, UserLeases>,
    user_id: i64,
    lease: Uuid,
) -> Option<&mut Lease> {
    users
        .get_mut(&user_id)?
        .leases
        .iter_mut()
        .find(|l| l.id == lease)
}

#[derive(Default)]
pub struct LeaseBook {
    users: Mutex<HashMap<i64, UserLeases>>,
}

impl LeaseBook {
    /// Admits a prediction holding `amount` on one of the user's leases.
    pub fn admit(&self, user_id: i64, amount: i64, now: Instant) -> Decision {
        let mut users = self.users.lock();
        let u = users.entry(user_id).or_default();
        if u.exact_until.is_some_and(|t| now < t) {
            return Decision::Exact;
        }
        if let Some(l) = u.leases.iter_mut().find(|l| !l.closing && l.free >= amount) {
            l.free -= amount;
            l.in_flight += amount;
            l.running += 1;
            l.last_used = now;
            let lease = l.id;
            let free: i64 = u.leases.iter().map(|l| l.free).sum();
            return Decision::Admitted {
                lease,
                available_after: u.available.saturating_add(free),
            };
        }
        if let Some(rx) = &u.taking {
            return Decision::Wait(rx.clone());
        }
        let (done, rx) = watch::channel(false);
        u.taking = Some(rx);
        u.scale = match u.leases.iter().map(|l| l.taken_at).max() {
            Some(last) if now.duration_since(last) < BUSY => (u.scale * 2).min(MAX_SCALE),
            _ => 1,
        };
        Decision::Take {
            done,
            scale: u.scale,
        }
    }

    /// The lease the caller took: `taken` credits, of which `amount` go to
    /// the caller's prediction. When a recall came meanwhile, the rest is to
    /// be given back at once (returned).
    pub fn taken(
        &self,
        user_id: i64,
        lease: Uuid,
        taken: i64,
        amount: i64,
        available: i64,
        now: Instant,
    ) -> (i64, Option<GiveBack>) {
        let mut users = self.users.lock();
        let u = users.entry(user_id).or_default();
        u.taking = None;
        u.available = available;
        let recalled = u.exact_until.is_some_and(|t| now < t);
        let free = taken - amount;
        u.leases.push(Lease {
            id: lease,
            taken_at: now,
            free: if recalled { 0 } else { free },
            in_flight: amount,
            running: 1,
            queued: 0,
            closing: recalled,
            last_used: now,
        });
        let free_all: i64 = u.leases.iter().map(|l| l.free).sum();
        let give_back = recalled.then_some(GiveBack {
            user_id,
            lease,
            release: free,
            close: false,
        });
        (available.saturating_add(free_all), give_back)
    }

    /// No lease was taken (too little available, or an error).
    pub fn not_taken(&self, user_id: i64) {
        if let Some(u) = self.users.lock().get_mut(&user_id) {
            u.taking = None;
        }
    }

    /// A prediction on `lease` finished, keeping `kept` of its `amount`.
    /// Returns the lease when it is now to be closed.
    pub fn finished(&self, user_id: i64, lease: Uuid, amount: i64, kept: i64) -> Option<GiveBack> {
        let mut users = self.users.lock();
        let l = lease_mut(&mut users, user_id, lease)?;
        let kept = kept.clamp(0, amount);
        l.in_flight -= amount;
        l.running = l.running.saturating_sub(1);
        l.queued += kept;
        l.free += amount - kept;
        (l.closing && l.running == 0).then_some(GiveBack {
            user_id,
            lease,
            release: 0,
            close: true,
        })
    }

    /// The rows of finished predictions holding `kept` were written.
    pub fn written(&self, user_id: i64, lease: Uuid, kept: i64) {
        if let Some(l) = lease_mut(&mut self.users.lock(), user_id, lease) {
            l.queued -= kept;
        }
    }

    /// The lease was closed in the database (or found closed): forget it.
    pub fn closed(&self, user_id: i64, lease: Uuid) {
        let mut users = self.users.lock();
        if let Some(u) = users.get_mut(&user_id) {
            u.leases.retain(|l| l.id != lease);
            if u.leases.is_empty() && u.taking.is_none() && u.exact_until.is_none() {
                users.remove(&user_id);
            }
        }
    }

    /// The lease was found expired in the database (this instance could not
    /// renew it for `HOLD_TTL_SECONDS`): nothing more is admitted on it.
    /// Returns it when it is to be closed (forgotten) now.
    pub fn expired(&self, user_id: i64, lease: Uuid) -> Option<GiveBack> {
        let mut users = self.users.lock();
        let l = lease_mut(&mut users, user_id, lease)?;
        l.free = 0;
        let newly_closing = !l.closing;
        l.closing = true;
        (newly_closing && l.running == 0).then_some(GiveBack {
            user_id,
            lease,
            release: 0,
            close: true,
        })
    }

    /// A recall of `user_id`'s leases (by another instance, or because this
    /// one ran short): every lease gives its free part back and admits no
    /// more; the user's predictions use exact holds until `until`. Each lease
    /// is returned (with `release` 0 when nothing is free: it is still
    /// marked as recalled).
    pub fn recall(&self, user_id: i64, until: Instant) -> Vec<GiveBack> {
        let mut users = self.users.lock();
        let u = users.entry(user_id).or_default();
        u.exact_until = Some(until);
        u.leases
            .iter_mut()
            .map(|l| {
                let release = l.free;
                l.free = 0;
                let newly_closing = !l.closing;
                l.closing = true;
                GiveBack {
                    user_id,
                    lease: l.id,
                    release,
                    close: newly_closing && l.running == 0,
                }
            })
            .collect()
    }

    /// Up to `most` leases unused since `idle_before` (nothing running): to
    /// be closed. With `idle_before` in the future, every lease (shutdown).
    /// Leases past `most` stay as they are, for a later call.
    pub fn idle(&self, idle_before: Instant, most: usize) -> Vec<GiveBack> {
        let mut users = self.users.lock();
        let mut out = Vec::new();
        for (user_id, u) in users.iter_mut() {
            if u.exact_until.is_some_and(|t| t <= idle_before) {
                u.exact_until = None;
            }
            for l in &mut u.leases {
                if out.len() == most {
                    break;
                }
                if l.last_used < idle_before && !l.closing {
                    l.closing = true;
                    if l.running == 0 {
                        out.push(GiveBack {
                            user_id: *user_id,
                            lease: l.id,
                            release: 0,
                            close: true,
                        });
                    }
                }
            }
        }
        users.retain(|_, u| !u.leases.is_empty() || u.taking.is_some() || u.exact_until.is_some());
        out
    }

    /// `(free, in_flight)` of each of this instance's leases of `user_id`.
    pub fn usage(&self, user_id: i64) -> HashMap<Uuid, (i64, i64)> {
        self.users
            .lock()
            .get(&user_id)
            .map(|u| {
                u.leases
                    .iter()
                    .map(|l| (l.id, (l.free, l.in_flight)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(d: Decision) -> Uuid {
        match d {
            Decision::Admitted { lease, .. } => lease,
            _ => panic!("not admitted"),
        }
    }

    /// User 1 with a lease of 4 credits, one prediction of 1 running on it.
    fn running_on_a_lease_of_four() -> (LeaseBook, Uuid, Instant) {
        let book = LeaseBook::default();
        let now = Instant::now();
        let Decision::Take { .. } = book.admit(1, 1, now) else {
            panic!("the first request takes a lease")
        };
        let id = Uuid::now_v7();
        book.taken(1, id, 4, 1, 0, now);
        (book, id, now)
    }

    #[test]
    fn a_lease_is_shared_then_closed_with_what_is_left() {
        let book = LeaseBook::default();
        let now = Instant::now();
        let Decision::Take { done, scale: 1 } = book.admit(7, 2, now) else {
            panic!("first request takes the lease")
        };
        assert!(matches!(book.admit(7, 2, now), Decision::Wait(_)));
        let id = Uuid::now_v7();
        let (after, back) = book.taken(7, id, 5, 2, 100, now);
        drop(done);
        assert_eq!((after, back), (103, None));
        assert_eq!(admitted(book.admit(7, 2, now)), id);
        assert!(
            matches!(book.admit(7, 2, now), Decision::Take { scale: 2, .. }),
            "1 free < 2; used up at once: a lease twice as large"
        );
        book.not_taken(7);
        assert_eq!(book.finished(7, id, 2, 2), None);
        assert_eq!(book.finished(7, id, 2, 0), None, "voided: back to free");
        assert_eq!(book.usage(7)[&id], (3, 0));
        let back = book.recall(7, now + EXACT_AFTER_RECALL);
        assert_eq!(
            back,
            vec![GiveBack {
                user_id: 7,
                lease: id,
                release: 3,
                close: true
            }]
        );
        assert!(matches!(book.admit(7, 1, now), Decision::Exact));
        book.written(7, id, 2);
        book.closed(7, id);
        assert!(book.usage(7).is_empty());
    }

    #[test]
    fn a_lease_recalled_while_running_closes_when_its_last_prediction_ends() {
        let (book, id, now) = running_on_a_lease_of_four();
        let back = book.recall(1, now + EXACT_AFTER_RECALL);
        assert_eq!(back[0].release, 3);
        assert!(!back[0].close, "a prediction still runs");
        assert_eq!(
            book.finished(1, id, 1, 1),
            Some(GiveBack {
                user_id: 1,
                lease: id,
                release: 0,
                close: true
            })
        );
    }

    #[test]
    fn a_lease_taken_during_a_recall_gives_its_rest_back() {
        let book = LeaseBook::default();
        let now = Instant::now();
        let Decision::Take { done: _done, .. } = book.admit(1, 1, now) else {
            panic!()
        };
        book.recall(1, now + EXACT_AFTER_RECALL);
        let id = Uuid::now_v7();
        let (_, back) = book.taken(1, id, 10, 1, 0, now);
        assert_eq!(back.map(|b| b.release), Some(9));
    }

    #[test]
    fn idle_leases_close_a_bounded_number_at_a_time() {
        let book = LeaseBook::default();
        let now = Instant::now();
        for user in 1..=5 {
            let Decision::Take { .. } = book.admit(user, 1, now) else {
                panic!("the first request takes a lease")
            };
            let id = Uuid::now_v7();
            book.taken(user, id, 4, 1, 0, now);
            assert!(book.finished(user, id, 1, 1).is_none(), "still open");
        }
        let later = now + Duration::from_secs(1);
        let mut closed: Vec<i64> = Vec::new();
        for expected in [2, 2, 1, 0] {
            let idle = book.idle(later, 2);
            assert_eq!(idle.len(), expected, "after {closed:?}");
            assert!(idle.iter().all(|g| g.close));
            closed.extend(idle.iter().map(|g| g.user_id));
        }
        closed.sort_unstable();
        assert_eq!(closed, vec![1, 2, 3, 4, 5], "each lease closed once");
    }

    #[test]
    fn idle_leases_close() {
        let (book, id, now) = running_on_a_lease_of_four();
        assert!(book.idle(now, usize::MAX).is_empty(), "not idle yet");
        let later = now + Duration::from_secs(1);
        assert!(book.idle(later, usize::MAX).is_empty(), "one still running");
        assert!(
            book.finished(1, id, 1, 1).is_some_and(|b| b.close),
            "closing, and now nothing runs"
        );
    }
}
