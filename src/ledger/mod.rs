//! Every credit rule lives here.
//!
//! * Price: a chatflow's `credit_cost` per prediction (default
//!   `DEFAULT_CREDIT_COST`), or, with `credits_per_1k_tokens`, a usage price
//!   charged up to a hold of `max_hold`.
//! * Admission: one atomic statement moves the price from available to held
//!   (or refuses: 402) before Flowise is called. Admissions that arrive while
//!   another batch is being written are written together, in one transaction
//!   (one commit), statements ordered by user: each request still gets its own
//!   hold and ledger row and waits for the commit before Flowise is called; a
//!   failed batch answers every request in it 503, none goes through unpaid.
//! * Settlement: exactly once per hold, off the response path, through a queue
//!   that retries until the database has it:
//!   see `settlement` for the rule (captured when Flowise completed a
//!   successful answer, or the client walked away after it began; voided
//!   otherwise).
//! * Lifetime: a hold never expires while its request runs: the instance
//!   serving it renews it every third of `HOLD_TTL_SECONDS`. Holds never
//!   settled (the instance died, so renewal stopped) are voided by the sweeper
//!   `HOLD_TTL_SECONDS` after their last renewal; any number of instances may
//!   sweep at once. A capture that finds its hold already expired is logged
//!   and counted (`ledger_errors_total{op="late_capture"}`), never dropped
//!   silently.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::store::catalog::ChatflowRow;
use crate::store::ledger::{self as sql, SettleKind};
use crate::store::{Db, StoreError};
use crate::upstream::sse::Observation;

/// The price of one prediction on a chatflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub flat: i64,
    pub per_1k_tokens: Option<i64>,
    /// What admission holds.
    pub hold: i64,
}

impl Price {
    pub fn of(chatflow: Option<&ChatflowRow>, default_cost: i64) -> Price {
        let flat = chatflow
            .and_then(|c| c.credit_cost)
            .unwrap_or(default_cost)
            .max(0);
        let per_1k = chatflow.and_then(|c| c.credits_per_1k_tokens);
        let hold = match per_1k {
            Some(_) => chatflow.and_then(|c| c.max_hold).unwrap_or(flat.max(1)),
            None => flat,
        };
        Price {
            flat,
            per_1k_tokens: per_1k,
            hold,
        }
    }

    /// What a successful prediction costs, given what Flowise reported; never
    /// more than the hold.
    pub fn charge(&self, seen: &Observation) -> i64 {
        let amount = match self.per_1k_tokens {
            Some(rate) if seen.usage_seen => {
                let tokens = i64::try_from(seen.total_tokens).unwrap_or(i64::MAX);
                // Round up: a started thousand is charged.
                tokens.saturating_mul(rate).saturating_add(999) / 1000
            }
            _ => self.flat,
        };
        amount.clamp(0, self.hold)
    }
}

/// What happened upstream, as the settlement rules need it.
#[derive(Debug, Clone, Default)]
pub struct UpstreamOutcome {
    /// Flowise's response status, when a response header arrived.
    pub status: Option<u16>,
    pub seen: Observation,
    /// Flowise's answer reached its end (by its HTTP framing).
    pub completed: bool,
    /// The client went away after Flowise began answering.
    pub client_left: bool,
    /// Flowise broke its answer off (read error, or closed before the end).
    pub broken: bool,
}

/// The settlement rule: `Some(amount)` to capture, `None` to void.
///
/// Captured when Flowise answered successfully and either completed its
/// answer or the client walked away after it began answering. Voided when
/// Flowise was never reached or never answered (timeout, client gone first),
/// answered an error status, reported an `error` event, or broke its answer
/// off before its end.
pub fn settlement(price: &Price, outcome: &UpstreamOutcome) -> Option<i64> {
    let status = outcome.status?;
    if !(200..300).contains(&status) || outcome.seen.error || outcome.broken {
        return None;
    }
    if !(outcome.completed || outcome.client_left) {
        return None;
    }
    Some(price.charge(&outcome.seen))
}

pub use crate::store::ledger::Adjusted;

/// A credit change by an admin or the CLI: a top-up (`grant`, amount > 0) or a
/// correction (`adjust`, amount < 0), idempotent by key; never below zero.
pub async fn change_balance(
    db: &Db,
    user_id: i64,
    amount: i64,
    reason: &str,
    idempotency_key: Option<&str>,
    actor_id: Option<i64>,
) -> Result<Adjusted, StoreError> {
    if amount == 0 {
        return Err(StoreError::Conflict("amount must not be zero".into()));
    }
    let kind = if amount > 0 { "grant" } else { "adjust" };
    sql::adjust(db, user_id, amount, kind, reason, idempotency_key, actor_id).await
}

/// `(available, held)` of one user; `None` for an unknown user.
pub async fn balance(db: &Db, user_id: i64) -> Result<Option<(i64, i64)>, StoreError> {
    sql::balance(db, user_id).await
}

/// The books check behind `flowise-proxy ledger verify`: every balance equals
/// the sum of its ledger rows, and no open hold outlived its lifetime.
pub async fn verify(db: &Db, hold_ttl: Duration) -> Result<Vec<String>, StoreError> {
    sql::verify(db, hold_ttl.as_secs_f64()).await
}

/// A placed hold, carried in the request context until settlement.
#[derive(Debug, Clone)]
pub struct Hold {
    pub id: Uuid,
    pub user_id: i64,
    pub price: Price,
    pub available_after: i64,
}

pub enum Admission {
    Held(Hold),
    /// Too little available: 402.
    Insufficient,
    /// The price is zero: nothing to hold.
    Free,
}

struct Job {
    hold_id: Uuid,
    user_id: i64,
    kind: SettleKind,
    amount: i64,
    queued_at: Instant,
}

/// One admission waiting for its batch.
struct HoldRequest {
    hold_id: Uuid,
    request_id: String,
    user_id: i64,
    chatflow_id: String,
    amount: i64,
    reply: tokio::sync::oneshot::Sender<Result<Option<i64>, StoreError>>,
}

/// Admissions written in one transaction, at most.
const HOLD_BATCH: usize = 256;
/// Batches being written at once (each on its own connection).
const HOLD_WRITERS: usize = 2;

pub struct Ledger {
    db: Db,
    holds: tokio::sync::mpsc::Sender<HoldRequest>,
    pending_holds: tokio::sync::Mutex<Option<tokio::sync::mpsc::Receiver<HoldRequest>>>,
    /// Holds of requests in flight on this instance (renewed until settled).
    live: Mutex<std::collections::HashMap<Uuid, i64>>,
    queue: Mutex<VecDeque<Job>>,
    wake: Notify,
    depth: AtomicUsize,
}

impl Ledger {
    pub fn new(db: Db) -> Arc<Ledger> {
        let (holds, pending) = tokio::sync::mpsc::channel(8192);
        Arc::new(Ledger {
            db,
            holds,
            pending_holds: tokio::sync::Mutex::new(Some(pending)),
            live: Mutex::new(std::collections::HashMap::new()),
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            depth: AtomicUsize::new(0),
        })
    }

    /// Admission: one round trip. A database failure is an error (503), never a pass.
    pub async fn admit(
        &self,
        user_id: i64,
        chatflow_id: &str,
        request_id: &str,
        price: Price,
    ) -> Result<Admission, StoreError> {
        if price.hold <= 0 {
            return Ok(Admission::Free);
        }
        let id = Uuid::now_v7();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = HoldRequest {
            hold_id: id,
            request_id: request_id.to_string(),
            user_id,
            chatflow_id: chatflow_id.to_string(),
            amount: price.hold,
            reply,
        };
        let placed = match self.holds.send(request).await {
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("hold writer stopped".into()))),
            Err(_) => Err(StoreError::Unavailable("hold writer stopped".into())),
        };
        match placed {
            Ok(Some(available_after)) => {
                self.live.lock().insert(id, user_id);
                crate::metrics::CREDITS
                    .with_label_values(&["held"])
                    .inc_by(price.hold as u64);
                Ok(Admission::Held(Hold {
                    id,
                    user_id,
                    price,
                    available_after,
                }))
            }
            Ok(None) => {
                crate::metrics::HOLDS_REJECTED.inc();
                Ok(Admission::Insufficient)
            }
            Err(e) => {
                crate::metrics::LEDGER_ERRORS
                    .with_label_values(&["hold"])
                    .inc();
                Err(e)
            }
        }
    }

    /// Writes admissions in batches, forever: `HOLD_WRITERS` tasks share the
    /// queue; each takes what is waiting (up to `HOLD_BATCH`) and writes it
    /// in one transaction.
    pub async fn run_hold_writers(self: Arc<Self>) {
        let Some(rx) = self.pending_holds.lock().await.take() else {
            return;
        };
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let writers = (0..HOLD_WRITERS).map(|_| {
            let me = self.clone();
            let rx = rx.clone();
            tokio::spawn(async move {
                loop {
                    let mut batch = Vec::new();
                    {
                        let mut rx = rx.lock().await;
                        match rx.recv().await {
                            Some(first) => batch.push(first),
                            None => return,
                        }
                        while batch.len() < HOLD_BATCH {
                            match rx.try_recv() {
                                Ok(more) => batch.push(more),
                                Err(_) => break,
                            }
                        }
                    }
                    me.write_holds(batch).await;
                }
            })
        });
        futures::future::join_all(writers).await;
    }

    async fn write_holds(&self, mut batch: Vec<HoldRequest>) {
        batch.sort_by_key(|h| h.user_id);
        let results = match self.place_holds(&batch).await {
            Ok(placed) => placed.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => {
                log::warn!("a batch of {} admissions failed: {e}", batch.len());
                batch
                    .iter()
                    .map(|_| Err(StoreError::Unavailable(e.to_string())))
                    .collect()
            }
        };
        for (h, r) in batch.into_iter().zip(results) {
            let _ = h.reply.send(r);
        }
    }

    async fn place_holds(&self, batch: &[HoldRequest]) -> Result<Vec<Option<i64>>, StoreError> {
        let mut c = self.db.get().await?;
        let tx = c.transaction().await?;
        let placed = futures::future::join_all(batch.iter().map(|h| {
            sql::place_hold(
                &tx,
                h.hold_id,
                &h.request_id,
                h.user_id,
                &h.chatflow_id,
                h.amount,
            )
        }))
        .await;
        let mut out = Vec::with_capacity(placed.len());
        for p in placed {
            out.push(p?);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Queues the settlement of `hold` (returns at once). Returns what will be
    /// captured, for the access log.
    pub fn settle(&self, hold: &Hold, outcome: &UpstreamOutcome) -> i64 {
        let (kind, amount) = match settlement(&hold.price, outcome) {
            Some(a) => (SettleKind::Capture, a),
            None => (SettleKind::Void, 0),
        };
        // Settled (queued): no longer renewed. The queue retries until the
        // database has it, within the hold's lifetime in all but a long outage.
        self.live.lock().remove(&hold.id);
        self.queue.lock().push_back(Job {
            hold_id: hold.id,
            user_id: hold.user_id,
            kind,
            amount,
            queued_at: Instant::now(),
        });
        let depth = self.depth.fetch_add(1, Ordering::SeqCst) + 1;
        crate::metrics::SETTLEMENT_QUEUE.set(depth as i64);
        self.wake.notify_one();
        amount
    }

    pub fn pending(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Drains the queue in batches, forever. Failed batches stay queued and are
    /// retried with backoff: a settlement is never dropped.
    pub async fn run_settler(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.pending() == 0 {
                self.wake.notified().await;
            }
            let batch: Vec<Job> = {
                let mut q = self.queue.lock();
                let n = q.len().min(256);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                continue;
            }
            match self.write_batch(&batch).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    let depth = self.depth.fetch_sub(batch.len(), Ordering::SeqCst) - batch.len();
                    crate::metrics::SETTLEMENT_QUEUE.set(depth as i64);
                }
                Err(e) => {
                    crate::metrics::LEDGER_ERRORS
                        .with_label_values(&["settle"])
                        .inc();
                    log::warn!(
                        "settlement batch of {} failed, will retry: {e}",
                        batch.len()
                    );
                    {
                        let mut q = self.queue.lock();
                        for job in batch.into_iter().rev() {
                            q.push_front(job);
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Writes a batch on one connection, pipelined. Each settlement is its own
    /// statement, guarded by `state = 'open'`, so a retried batch is harmless.
    ///
    /// One transaction (one commit) per batch, its statements pipelined and
    /// ordered by user so that concurrent batches of other instances lock
    /// accounts in the same order (no deadlock).
    async fn write_batch(&self, batch: &[Job]) -> Result<(), StoreError> {
        let mut order: Vec<&Job> = batch.iter().collect();
        order.sort_by_key(|j| j.user_id);
        let mut c = self.db.get().await?;
        let tx = c.transaction().await?;
        let results = futures::future::join_all(
            order
                .iter()
                .map(|j| sql::settle(&tx, j.user_id, j.hold_id, j.kind, j.amount)),
        )
        .await;
        let mut settled_all = Vec::with_capacity(order.len());
        for r in results {
            settled_all.push(r?);
        }
        tx.commit().await?;
        for (job, settled) in order.into_iter().zip(settled_all) {
            let label = match job.kind {
                SettleKind::Capture => "captured",
                _ => "voided",
            };
            // Captured: what was kept; voided: what was given back.
            if settled.is_none() && job.kind == SettleKind::Capture && job.amount > 0 {
                crate::metrics::LEDGER_ERRORS
                    .with_label_values(&["late_capture"])
                    .inc();
                log::error!(
                    "capture of {} credits for hold {} found it no longer open (expired): not charged",
                    job.amount,
                    job.hold_id
                );
            }
            if let Some((kept, amount)) = settled {
                let moved = match job.kind {
                    SettleKind::Capture => kept,
                    _ => amount,
                };
                crate::metrics::CREDITS
                    .with_label_values(&[label])
                    .inc_by(moved.max(0) as u64);
            }
            crate::metrics::SETTLEMENT_LAG_SECONDS
                .with_label_values(&[label])
                .observe(job.queued_at.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Waits (bounded) until every queued settlement is written.
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.pending() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            self.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Renews this instance's in-flight holds every third of the TTL, so that a
    /// running request's hold never expires however long it runs.
    pub async fn run_renewer(self: Arc<Self>, ttl: Duration) {
        let every = (ttl / 3).max(Duration::from_millis(500));
        loop {
            tokio::time::sleep(every).await;
            let (holds, users): (Vec<Uuid>, Vec<i64>) =
                self.live.lock().iter().map(|(h, u)| (*h, *u)).unzip();
            if holds.is_empty() {
                continue;
            }
            if let Err(e) = sql::renew(&self.db, &users, &holds).await {
                crate::metrics::LEDGER_ERRORS
                    .with_label_values(&["renew"])
                    .inc();
                log::warn!("renewing {} in-flight holds failed: {e}", holds.len());
            }
        }
    }

    /// Voids holds not renewed within the TTL; runs on every instance.
    pub async fn run_sweeper(self: Arc<Self>, ttl: Duration, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match sql::expire_stale(&self.db, ttl.as_secs_f64()).await {
                Ok((n, credits)) if n > 0 => {
                    crate::metrics::CREDITS
                        .with_label_values(&["expired"])
                        .inc_by(credits as u64);
                    log::warn!("sweeper expired {n} stale holds ({credits} credits released)");
                }
                Ok(_) => {}
                Err(e) => {
                    crate::metrics::LEDGER_ERRORS
                        .with_label_values(&["sweep"])
                        .inc();
                    log::warn!("sweeper failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(cost: Option<i64>, per_1k: Option<i64>, max_hold: Option<i64>) -> ChatflowRow {
        ChatflowRow {
            id: "f".into(),
            name: "f".into(),
            category: None,
            deployed: true,
            deleted: false,
            credit_cost: cost,
            credits_per_1k_tokens: per_1k,
            max_hold,
        }
    }

    #[test]
    fn prices_and_rules() {
        let p = Price::of(None, 1);
        assert_eq!((p.flat, p.hold), (1, 1));
        let ok = UpstreamOutcome {
            status: Some(200),
            completed: true,
            ..Default::default()
        };
        let mut broken = ok.clone();
        broken.completed = false;
        broken.broken = true;
        assert_eq!(settlement(&p, &broken), None, "broken off: voided");
        let mut left = broken.clone();
        left.broken = false;
        left.client_left = true;
        assert_eq!(
            settlement(&p, &left),
            Some(1),
            "client walked away: captured"
        );
        assert_eq!(settlement(&p, &ok), Some(1));
        assert_eq!(settlement(&p, &UpstreamOutcome::default()), None);
        let err = UpstreamOutcome {
            status: Some(500),
            ..Default::default()
        };
        assert_eq!(settlement(&p, &err), None);
        let mut ev = ok.clone();
        ev.seen.error = true;
        assert_eq!(settlement(&p, &ev), None);

        let usage = Price::of(Some(&flow(Some(2), Some(10), Some(50))), 1);
        assert_eq!(usage.hold, 50);
        let mut seen = ok.clone();
        seen.seen.usage_seen = true;
        seen.seen.total_tokens = 1500;
        assert_eq!(settlement(&usage, &seen), Some(15));
        seen.seen.total_tokens = 1_000_000;
        assert_eq!(settlement(&usage, &seen), Some(50), "capped at the hold");
        assert_eq!(settlement(&usage, &ok), Some(2), "no usage: flat price");
    }
}
