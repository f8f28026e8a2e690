//! Every credit rule lives here.
//!
//! * Price: a chatflow's `credit_cost` per prediction (default
//!   `DEFAULT_CREDIT_COST`), or, with `credits_per_1k_tokens`, a usage price
//!   charged up to a hold of `max_hold`.
//! * Admission, on a lease (the usual case, no database round trip): the
//!   instance took a block of the user's credits (`CREDIT_LEASE_PREDICTIONS`
//!   prices) out of their available balance in one statement, and admits
//!   their predictions against it in memory (`lease.rs`). Each prediction
//!   still gets its own ledger row (`charge`, or `void`), written by the
//!   settlement batches. Unused leases close after `CREDIT_LEASE_IDLE_MS`.
//! * Admission, exact: one atomic statement moves the price from available
//!   to held (or refuses: 402) before Flowise is called; used when leases are
//!   off, while the database or the recall channel is unreachable (so an
//!   outage is a 503), and for a while after a recall. Admissions (and lease
//!   takes) that arrive while another batch is being written are written
//!   together, in one transaction (one commit), statements ordered by user;
//!   a failed batch answers every request in it 503, none goes through unpaid.
//! * Never short of the whole balance: before a 402, the instance gives back
//!   its own leases' unused credits and asks every other instance for theirs
//!   (`NOTIFY flowise_proxy_ledger`, `RECALL_WAIT` at most), then tries once
//!   more. A dead instance's leases come back after `HOLD_TTL_SECONDS`.
//! * A kill -9 loses only what was answered and not yet written (the
//!   settlement queue: what the batch gathers, `GATHER`, plus the batch
//!   being written; at most `LEASE_QUEUE_LIMIT` rows, lease admissions wait
//!   while it is full), in the user's favour: the dead instance's leases
//!   expire whole.
//! * Distribution: every statement touches one user's rows and names its
//!   `user_id` (the tables can be distributed by it); see the README.
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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::store::catalog::ChatflowRow;
use crate::store::ledger::{self as sql, SettleKind};
use crate::store::{Db, StoreError};
use crate::upstream::sse::Observation;

mod lease;

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

/// `(credits, held)` of one user as the database sees them: the unused part
/// of open leases counts as the user's credits. `None` for an unknown user.
/// (`Ledger::balance` also knows this instance's running predictions.)
pub async fn balance(db: &Db, user_id: i64) -> Result<Option<(i64, i64)>, StoreError> {
    Ok(sql::balance_with_leases(db, user_id)
        .await?
        .map(|(available, held, leases)| {
            let leased: i64 = leases.iter().map(|(_, open)| open).sum();
            (available + leased, (held - leased).max(0))
        }))
}

/// The books check behind `flowise-proxy ledger verify`: every balance equals
/// the sum of its ledger rows, and no open hold outlived its lifetime.
pub async fn verify(db: &Db, hold_ttl: Duration) -> Result<Vec<String>, StoreError> {
    sql::verify(db, hold_ttl.as_secs_f64()).await
}

/// A placed hold, carried in the request context until settlement.
#[derive(Debug, Clone)]
pub struct Hold {
    /// The prediction's own id (its ledger rows' `hold_id`).
    pub id: Uuid,
    pub user_id: i64,
    pub price: Price,
    pub available_after: i64,
    /// The lease it was admitted on; `None` for an exact hold (its own row).
    pub lease: Option<Uuid>,
    pub request_id: String,
    pub chatflow_id: String,
}

pub enum Admission {
    Held(Hold),
    /// Too little available: 402.
    Insufficient,
    /// The price is zero: nothing to hold.
    Free,
}

/// A write the settlement batches carry.
enum Work {
    /// An exact hold: captured or voided.
    Settle {
        hold_id: Uuid,
        kind: SettleKind,
        amount: i64,
    },
    /// A prediction admitted on a lease: its `charge` or `void` row.
    Charge {
        lease: Uuid,
        id: Uuid,
        kept: i64,
        /// What its admission held (for the metrics).
        held: i64,
        request_id: String,
        chatflow_id: String,
    },
    /// Close a lease: what is left goes back to the balance.
    Close { lease: Uuid },
    /// A conversation Flowise started, bound to its owner; `number` is its
    /// place in `SessionBindings`' queue.
    Bind {
        session_id: String,
        chatflow_id: String,
        number: u64,
    },
}

struct Job {
    user_id: i64,
    work: Work,
    queued_at: Instant,
}

/// What one settlement statement did.
#[derive(Debug, Clone, Copy)]
enum Written {
    /// `(kept, held)`; `None`: the hold was no longer open.
    Settled(Option<(i64, i64)>),
    /// A lease's group: `false` where its charges found the lease no
    /// longer open (nothing written). Its close, if any, is done (by this
    /// call, or before).
    Charged(bool),
    Bound,
}

/// A statement of a settlement batch, by its groups (see `write_sorted`).
enum Statement {
    /// Consecutive groups of lease charges and closes: one call.
    Charges(std::ops::Range<usize>),
    /// An exact hold's capture or void (group `g`).
    Settle {
        g: usize,
        user_id: i64,
        hold_id: Uuid,
        kind: SettleKind,
        amount: i64,
    },
}

impl Statement {
    /// The groups it writes.
    fn groups(&self) -> std::ops::Range<usize> {
        match self {
            Statement::Charges(run) => run.clone(),
            Statement::Settle { g, .. } => *g..*g + 1,
        }
    }
}

/// One lease's charges and close, from its group of jobs.
fn lease_charges(group: &[Job]) -> sql::LeaseCharges<'_> {
    let mut charges = sql::LeaseCharges {
        user_id: group[0].user_id,
        lease_id: Uuid::nil(),
        rows: Vec::with_capacity(group.len()),
        close: false,
    };
    for job in group {
        match &job.work {
            Work::Charge {
                lease,
                id,
                kept,
                request_id,
                chatflow_id,
                ..
            } => {
                charges.lease_id = *lease;
                charges.rows.push(sql::LeaseCharge {
                    id: *id,
                    amount: *kept,
                    kind: if *kept > 0 { "charge" } else { "void" },
                    request_id,
                    chatflow_id,
                });
            }
            Work::Close { lease } => {
                charges.lease_id = *lease;
                charges.close = true;
            }
            Work::Settle { .. } | Work::Bind { .. } => {}
        }
    }
    charges
}

/// One admission waiting for its batch: an exact hold, or a lease of up to
/// `lease_max`.
struct HoldRequest {
    hold_id: Uuid,
    request_id: String,
    user_id: i64,
    chatflow_id: String,
    amount: i64,
    lease_max: Option<i64>,
    reply: tokio::sync::oneshot::Sender<Result<Option<(i64, i64)>, StoreError>>,
}

/// Admissions written in one transaction, at most.
const HOLD_BATCH: usize = 256;
/// Batches being written at once (each on its own connection).
const HOLD_WRITERS: usize = 2;
/// Settlement rows written in one transaction, at most: more than the lease
/// queue limit, so a settler that fell behind takes everything queued, and
/// each lease's rows (more of them the further behind) share one statement.
const SETTLE_BATCH: usize = 8192;
/// How long a request that found the balance short waits for other
/// instances to give their leases back before it is refused.
const RECALL_WAIT: Duration = Duration::from_secs(1);
/// Past this many queued settlement rows, lease admissions wait for the
/// settler: the bound on what a kill -9 can lose.
const LEASE_QUEUE_LIMIT: usize = 4096;
/// A settlement batch waits until its oldest row is this old (or the queue
/// holds `GATHER_ROWS`, or someone needs it written now): one commit, one
/// bindings statement and one statement per lease for many predictions,
/// instead of a batch per prediction or two at low rates. Everything it
/// gathers is what a kill -9 would lose: 100 ms made the kill -9 test lose
/// 61-134 answers (all of them, at ~600 predictions/s); 20 ms keeps most of
/// the gain (a commit per ~10 predictions at 500/s instead of per 1-2).
const GATHER: Duration = Duration::from_millis(20);
const GATHER_ROWS: usize = 2048;
/// How long a lease admission waits for room in a full settlement queue
/// before it takes the exact path.
const QUEUE_FULL_WAIT: Duration = Duration::from_secs(2);
/// Idle leases one look closes, and how soon the next look comes when it
/// found that many (otherwise: half the idle time).
const CLOSER_TICK: Duration = Duration::from_millis(100);
const IDLE_CLOSES_PER_TICK: usize = 100;
/// The channel instances ask each other for leases back on.
const RECALL_CHANNEL: &str = "flowise_proxy_ledger";

/// How this instance uses credit leases.
#[derive(Debug, Clone, Copy)]
pub struct LeasePolicy {
    /// A lease holds this many predictions' prices; 0 turns leases off.
    pub predictions: i64,
    /// Unused this long, a lease is closed.
    pub idle: Duration,
    /// Leases not renewed this long belong to a dead instance.
    pub hold_ttl: Duration,
}

pub struct Ledger {
    db: Db,
    /// Told when the conversation bindings it queued are written.
    sessions: Arc<crate::sessions::SessionBindings>,
    leases: lease::LeaseBook,
    policy: LeasePolicy,
    holds: tokio::sync::mpsc::Sender<HoldRequest>,
    pending_holds: tokio::sync::Mutex<Option<tokio::sync::mpsc::Receiver<HoldRequest>>>,
    /// Holds and leases of this instance to renew until settled or closed.
    live: Mutex<std::collections::HashMap<Uuid, i64>>,
    queue: Mutex<VecDeque<Job>>,
    wake: Notify,
    /// Told after each settlement batch is written (admissions waiting for
    /// room in a full queue).
    written: Notify,
    /// Ends a batch's gathering wait: the queue reached `GATHER_ROWS`, or
    /// shutdown drains it.
    write_now: Notify,
    depth: AtomicUsize,
    /// Leases are used only while other instances can recall them (this
    /// instance listens) and the database takes our writes: otherwise every
    /// admission is an exact hold (so an outage is a 503, not a lease).
    listening: AtomicBool,
    writes_failing: AtomicBool,
}

impl Ledger {
    pub fn new(
        db: Db,
        policy: LeasePolicy,
        sessions: Arc<crate::sessions::SessionBindings>,
    ) -> Arc<Ledger> {
        let (holds, pending) = tokio::sync::mpsc::channel(8192);
        Arc::new(Ledger {
            db,
            sessions,
            leases: lease::LeaseBook::default(),
            policy,
            holds,
            pending_holds: tokio::sync::Mutex::new(Some(pending)),
            live: Mutex::new(std::collections::HashMap::new()),
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            written: Notify::new(),
            write_now: Notify::new(),
            depth: AtomicUsize::new(0),
            listening: AtomicBool::new(false),
            writes_failing: AtomicBool::new(false),
        })
    }

    /// Admission: on one of the user's leases (no database round trip), or
    /// with a lease or an exact hold written in the next admission batch.
    /// A database failure is an error (503), never a pass.
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
        let held = |id, lease, available_after| {
            crate::metrics::CREDITS
                .with_label_values(&["held"])
                .inc_by(price.hold as u64);
            Admission::Held(Hold {
                id,
                user_id,
                price,
                available_after,
                lease,
                request_id: request_id.to_string(),
                chatflow_id: chatflow_id.to_string(),
            })
        };
        if self.leases_usable().await {
            loop {
                match self.leases.admit(user_id, price.hold, Instant::now()) {
                    lease::Decision::Admitted {
                        lease,
                        available_after,
                    } => return Ok(held(Uuid::now_v7(), Some(lease), available_after)),
                    lease::Decision::Wait(mut done) => {
                        // Bounded: the taker reports within one batch.
                        let _ = tokio::time::timeout(Duration::from_secs(5), done.wait_for(|d| *d))
                            .await;
                    }
                    lease::Decision::Take { done, scale } => {
                        let id = Uuid::now_v7();
                        let max = price
                            .hold
                            .saturating_mul(self.policy.predictions)
                            .saturating_mul(scale);
                        let taken = self
                            .write_admission(
                                user_id,
                                chatflow_id,
                                request_id,
                                id,
                                price.hold,
                                Some(max),
                            )
                            .await;
                        let outcome = match taken {
                            Ok(Some((available, taken))) => {
                                self.live.lock().insert(id, user_id);
                                let (after, give_back) = self.leases.taken(
                                    user_id,
                                    id,
                                    taken,
                                    price.hold,
                                    available,
                                    Instant::now(),
                                );
                                if let Some(g) = give_back {
                                    self.give_back(vec![g]).await;
                                }
                                Some(Ok(held(Uuid::now_v7(), Some(id), after)))
                            }
                            Ok(None) => {
                                self.leases.not_taken(user_id);
                                None
                            }
                            Err(e) => {
                                self.leases.not_taken(user_id);
                                Some(Err(e))
                            }
                        };
                        let _ = done.send(true);
                        match outcome {
                            Some(Ok(a)) => return Ok(a),
                            Some(Err(e)) => return Err(self.admission_failed(e)),
                            // Less than one price available: the exact path
                            // (and, when that is short too, the recall).
                            None => break,
                        }
                    }
                    lease::Decision::Exact => break,
                }
            }
        }
        let id = Uuid::now_v7();
        let mut placed = self
            .write_admission(user_id, chatflow_id, request_id, id, price.hold, None)
            .await;
        // Short: recall leases, then try once more in any case (a lease of
        // this instance may have been closed, its credits back in the
        // balance, between the first try and the recall).
        if matches!(placed, Ok(None)) && self.policy.predictions > 0 {
            self.recall(user_id).await;
            placed = self
                .write_admission(user_id, chatflow_id, request_id, id, price.hold, None)
                .await;
        }
        match placed {
            Ok(Some((available_after, _))) => {
                self.live.lock().insert(id, user_id);
                Ok(held(id, None, available_after))
            }
            Ok(None) => {
                crate::metrics::HOLDS_REJECTED.inc();
                Ok(Admission::Insufficient)
            }
            Err(e) => Err(self.admission_failed(e)),
        }
    }

    /// Leases are used while other instances can recall them and the
    /// database takes our writes. What a kill -9 loses (answered, not yet
    /// written; in the user's favour) is at most the settlement queue, so
    /// while it is full an admission waits for the next batch to be written,
    /// as a bounded channel's sender would. It used to fall back to exact
    /// holds instead, which is backwards under load: an exact hold costs the
    /// database two statements where a lease charge costs a share of one, so
    /// the queue never drained again (1000 users: 32k of 36k predictions on
    /// exact holds, 19 s to settle a 6 s run). Only a queue that stays full
    /// for `QUEUE_FULL_WAIT` (the database is stuck) sends it to the exact
    /// path, which waits for the database itself.
    async fn leases_usable(&self) -> bool {
        let usable = || {
            self.policy.predictions > 0
                && self.listening.load(Ordering::Relaxed)
                && !self.writes_failing.load(Ordering::Relaxed)
        };
        if !usable() {
            return false;
        }
        let deadline = tokio::time::Instant::now() + QUEUE_FULL_WAIT;
        loop {
            // Registered before the check: a batch written in between wakes it.
            let written = self.written.notified();
            if self.pending() < LEASE_QUEUE_LIMIT {
                return true;
            }
            if tokio::time::timeout_at(deadline, written).await.is_err() || !usable() {
                return false;
            }
        }
    }

    fn admission_failed(&self, e: StoreError) -> StoreError {
        crate::metrics::LEDGER_ERRORS
            .with_label_values(&["hold"])
            .inc();
        e
    }

    /// Sends one admission to the batch writers and waits for its commit:
    /// `(available after, held)`, `None` when the balance is too low.
    async fn write_admission(
        &self,
        user_id: i64,
        chatflow_id: &str,
        request_id: &str,
        hold_id: Uuid,
        amount: i64,
        lease_max: Option<i64>,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = HoldRequest {
            hold_id,
            request_id: request_id.to_string(),
            user_id,
            chatflow_id: chatflow_id.to_string(),
            amount,
            lease_max,
            reply,
        };
        match self.holds.send(request).await {
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("hold writer stopped".into()))),
            Err(_) => Err(StoreError::Unavailable("hold writer stopped".into())),
        }
    }

    /// The user's balance was too short here: take this instance's leases
    /// back, and ask the other instances to give theirs back (waiting
    /// `RECALL_WAIT` at most).
    async fn recall(&self, user_id: i64) {
        let own = self
            .leases
            .recall(user_id, Instant::now() + lease::EXACT_AFTER_RECALL);
        let own_ids: Vec<Uuid> = own.iter().map(|g| g.lease).collect();
        self.give_back(own).await;
        let alive = self.policy.hold_ttl.as_secs_f64();
        let deadline = Instant::now() + RECALL_WAIT;
        let mut asked: Option<Instant> = None;
        loop {
            let others = match sql::unrecalled_leases(&self.db, user_id, &own_ids, alive).await {
                Ok(n) => n,
                Err(e) => {
                    log::warn!("looking up other instances' leases failed: {e}");
                    break;
                }
            };
            if others == 0 || Instant::now() >= deadline {
                break;
            }
            // Ask (again, now and then: a lease may have been taken since).
            if asked.is_none_or(|t| t.elapsed() >= Duration::from_millis(200)) {
                if let Err(e) = self.ask_for_leases(user_id).await {
                    log::warn!("asking other instances for leases back failed: {e}");
                    break;
                }
                asked = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn ask_for_leases(&self, user_id: i64) -> Result<(), StoreError> {
        let c = self.db.get().await?;
        c.execute(
            "SELECT pg_notify($1, $2)",
            &[&RECALL_CHANNEL, &format!("recall:{user_id}")],
        )
        .await?;
        Ok(())
    }

    /// Gives leases back: releases free parts at once (marked as answering a
    /// recall), and queues closes behind the leases' queued rows.
    async fn give_back(&self, back: Vec<lease::GiveBack>) {
        for g in back {
            let released = async {
                let mut c = self.db.get().await?;
                let tx = c.transaction().await?;
                let r = sql::give_back_part(&tx, g.user_id, g.lease, g.release).await?;
                tx.commit().await?;
                Ok::<_, StoreError>(r)
            }
            .await;
            if let Err(e) = released {
                // Still ours in the database: the close gives it back.
                log::warn!("giving back {} credits of a lease failed: {e}", g.release);
            }
            if g.close {
                self.enqueue(g.user_id, Work::Close { lease: g.lease });
            }
        }
    }

    /// Runs forever: answers other instances' recalls (LISTEN
    /// `flowise_proxy_ledger`), reconnecting when the connection is lost.
    pub async fn run_recall_listener(self: Arc<Self>, database_url: String) {
        loop {
            let me = self.clone();
            let up = self.clone();
            let result = crate::store::listen(
                &database_url,
                RECALL_CHANNEL,
                move || up.listening.store(true, Ordering::SeqCst),
                move |payload| {
                    let me = me.clone();
                    let Some(user_id) = payload
                        .strip_prefix("recall:")
                        .and_then(|u| u.parse::<i64>().ok())
                    else {
                        return;
                    };
                    tokio::spawn(async move {
                        let back = me
                            .leases
                            .recall(user_id, Instant::now() + lease::EXACT_AFTER_RECALL);
                        me.give_back(back).await;
                    });
                },
            )
            .await;
            // Recalls may be missed from now on: no new admissions on leases,
            // and those held close once idle.
            self.listening.store(false, Ordering::SeqCst);
            self.close_all_leases();
            match result {
                Ok(()) => log::warn!("ledger LISTEN connection closed; reconnecting"),
                Err(e) => log::warn!("ledger LISTEN failed: {e}; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
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
        let placed = self.place_holds(&batch).await;
        self.writes_failing
            .store(placed.is_err(), Ordering::Relaxed);
        let results = match placed {
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

    async fn place_holds(
        &self,
        batch: &[HoldRequest],
    ) -> Result<Vec<Option<(i64, i64)>>, StoreError> {
        let mut c = self.db.get().await?;
        let txn = c.transaction().await?;
        let tx = &txn;
        let placed = futures::future::join_all(batch.iter().map(|h| async move {
            match h.lease_max {
                Some(max) => sql::take_lease(tx, h.hold_id, h.user_id, h.amount, max).await,
                None => sql::place_hold(
                    tx,
                    h.hold_id,
                    &h.request_id,
                    h.user_id,
                    &h.chatflow_id,
                    h.amount,
                )
                .await
                .map(|p| p.map(|available| (available, h.amount))),
            }
        }))
        .await;
        let mut out = Vec::with_capacity(placed.len());
        for p in placed {
            out.push(p?);
        }
        txn.commit().await?;
        Ok(out)
    }

    /// Queues the settlement of `hold` (returns at once). Returns what will be
    /// captured, for the access log.
    pub fn settle(&self, hold: &Hold, outcome: &UpstreamOutcome) -> i64 {
        let kept = settlement(&hold.price, outcome);
        let amount = kept.unwrap_or(0);
        match hold.lease {
            Some(lease) => {
                let close = self
                    .leases
                    .finished(hold.user_id, lease, hold.price.hold, amount);
                self.enqueue(
                    hold.user_id,
                    Work::Charge {
                        lease,
                        id: hold.id,
                        kept: amount,
                        held: hold.price.hold,
                        request_id: hold.request_id.clone(),
                        chatflow_id: hold.chatflow_id.clone(),
                    },
                );
                if close.is_some() {
                    self.enqueue(hold.user_id, Work::Close { lease });
                }
            }
            None => {
                // Settled (queued): no longer renewed. The queue retries until
                // the database has it, within the hold's lifetime in all but a
                // long outage.
                self.live.lock().remove(&hold.id);
                let kind = match kept {
                    Some(_) => SettleKind::Capture,
                    None => SettleKind::Void,
                };
                self.enqueue(
                    hold.user_id,
                    Work::Settle {
                        hold_id: hold.id,
                        kind,
                        amount,
                    },
                );
            }
        }
        amount
    }

    /// Queues the binding of a conversation Flowise started (written with the
    /// next settlement batch).
    pub fn bind_conversation(&self, user_id: i64, session_id: &str, chatflow_id: &str) {
        let mut queue = self.queue.lock();
        let number = self.sessions.queued();
        queue.push_back(Job {
            user_id,
            work: Work::Bind {
                session_id: session_id.to_string(),
                chatflow_id: chatflow_id.to_string(),
                number,
            },
            queued_at: Instant::now(),
        });
        drop(queue);
        self.queued_one();
    }

    fn enqueue(&self, user_id: i64, work: Work) {
        self.queue.lock().push_back(Job {
            user_id,
            work,
            queued_at: Instant::now(),
        });
        self.queued_one();
    }

    fn queued_one(&self) {
        let depth = self.depth.fetch_add(1, Ordering::SeqCst) + 1;
        crate::metrics::SETTLEMENT_QUEUE.set(depth as i64);
        self.wake.notify_one();
        if depth == GATHER_ROWS {
            self.write_now.notify_one();
        }
    }

    pub fn pending(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// `(credits, held)` of one user as this instance sees them: leases'
    /// unused credits count as the user's (this instance's exactly; other
    /// instances' including what their running predictions hold), and held
    /// is what running predictions hold. `None` for an unknown user.
    pub async fn balance(&self, user_id: i64) -> Result<Option<(i64, i64)>, StoreError> {
        let Some((available, held, leases)) = sql::balance_with_leases(&self.db, user_id).await?
        else {
            return Ok(None);
        };
        let own = self.leases.usage(user_id);
        let mut credits = available;
        let mut held = held;
        for (id, open) in leases {
            held -= open;
            match own.get(&id) {
                Some((free, in_flight)) => {
                    credits += free;
                    held += in_flight;
                }
                None => credits += open,
            }
        }
        Ok(Some((credits, held.max(0))))
    }

    /// Drains the queue in batches, forever. Failed batches stay queued and are
    /// retried with backoff: a settlement is never dropped.
    pub async fn run_settler(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.pending() == 0 {
                self.wake.notified().await;
            }
            self.gather().await;
            let batch: Vec<Job> = {
                let mut q = self.queue.lock();
                let n = q.len().min(SETTLE_BATCH);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                continue;
            }
            let n = batch.len();
            let written = self.write_batch(batch).await;
            self.writes_failing
                .store(written.is_err(), Ordering::Relaxed);
            match written {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    let depth = self.depth.fetch_sub(n, Ordering::SeqCst) - n;
                    crate::metrics::SETTLEMENT_QUEUE.set(depth as i64);
                    self.written.notify_waiters();
                }
                Err((e, batch)) => {
                    crate::metrics::LEDGER_ERRORS
                        .with_label_values(&["settle"])
                        .inc();
                    log::warn!("settlement batch of {n} failed, will retry: {e}");
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

    /// Waits until the oldest queued row is `GATHER` old, unless the queue
    /// is big enough already or someone needs the rows written now (a
    /// reader of conversations, shutdown). Adds at most `GATHER` to what a
    /// kill -9 can lose, which stays bounded by `LEASE_QUEUE_LIMIT`.
    async fn gather(&self) {
        let Some(oldest) = self.queue.lock().front().map(|j| j.queued_at) else {
            return;
        };
        if self.pending() >= GATHER_ROWS {
            return;
        }
        let due = tokio::time::Instant::from_std(oldest + GATHER);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = self.write_now.notified() => {}
            _ = self.sessions.wanted() => {}
        }
    }

    /// Writes a batch in one transaction (one commit), its statements
    /// pipelined on one connection. Each statement touches one user's rows;
    /// they are ordered by user (a stable sort: a lease's rows stay before
    /// its close), so that concurrent batches of other instances lock
    /// accounts in the same order (no deadlock). A lease's consecutive rows
    /// go in one statement, its close in the next, and consecutive leases'
    /// statements in one call (`charge_and_close_leases`). Every statement
    /// is guarded (`state = 'open'`, rows already written skipped), so a
    /// retried batch is harmless.
    async fn write_batch(&self, mut batch: Vec<Job>) -> Result<(), (StoreError, Vec<Job>)> {
        // Bindings last (one statement for all): a lease's charges are then
        // consecutive, one statement per lease instead of one per row (512
        // charges of one user, interleaved with their bindings, took 0.5-1 s
        // as 512 updates of one row; as one statement, milliseconds).
        batch.sort_by_key(|j| (matches!(j.work, Work::Bind { .. }), j.user_id));
        match self.write_sorted(&batch).await {
            Ok(done) => {
                self.account_for(&batch, done);
                Ok(())
            }
            Err(e) => Err((e, batch)),
        }
    }

    async fn write_sorted(&self, batch: &[Job]) -> Result<Vec<Written>, StoreError> {
        // Groups: a run of one lease's charges, ended by its close if one
        // follows; a close alone; a single settle.
        let mut groups: Vec<(usize, usize)> = Vec::new();
        let mut binds: Vec<usize> = Vec::new();
        for (i, job) in batch.iter().enumerate() {
            let extends = |&(start, end): &(usize, usize), lease: &Uuid| {
                end == i
                    && batch[start].user_id == job.user_id
                    && matches!(&batch[start].work, Work::Charge { lease: l, .. } if l == lease)
                    && !matches!(batch[end - 1].work, Work::Close { .. })
            };
            match (&job.work, groups.last_mut()) {
                (Work::Bind { .. }, _) => binds.push(i),
                (Work::Charge { lease, .. } | Work::Close { lease }, Some(group))
                    if extends(group, lease) =>
                {
                    group.1 = i + 1
                }
                _ => groups.push((i, i + 1)),
            }
        }
        let mut c = self.db.get().await?;
        let txn = c.transaction().await?;
        // The lease-charge function keeps its generic plan and runs without
        // JIT by its own settings (migration V11): no statement for it here.
        sql::prepare_settlement(&txn).await?;
        // One statement per settle; each run of consecutive lease groups
        // (the usual batch: all of it) is one call that runs their
        // statements in this same order.
        let mut statements: Vec<Statement> = Vec::new();
        for (g, &(start, _)) in groups.iter().enumerate() {
            match (&batch[start].work, statements.last_mut()) {
                (Work::Charge { .. } | Work::Close { .. }, Some(Statement::Charges(run)))
                    if run.end == g =>
                {
                    run.end = g + 1
                }
                (Work::Charge { .. } | Work::Close { .. }, _) => {
                    statements.push(Statement::Charges(g..g + 1))
                }
                (
                    Work::Settle {
                        hold_id,
                        kind,
                        amount,
                    },
                    _,
                ) => statements.push(Statement::Settle {
                    g,
                    user_id: batch[start].user_id,
                    hold_id: *hold_id,
                    kind: *kind,
                    amount: *amount,
                }),
                // Not in `groups`: written in one statement after.
                (Work::Bind { .. }, _) => {}
            }
        }
        let tx = &txn;
        let groups = &groups;
        let written = futures::future::join_all(statements.iter().map(|statement| async move {
            match statement {
                Statement::Charges(run) => {
                    let leases: Vec<sql::LeaseCharges> = groups[run.clone()]
                        .iter()
                        .map(|&(start, end)| lease_charges(&batch[start..end]))
                        .collect();
                    sql::charge_and_close_leases(tx, &leases)
                        .await
                        .map(|open| open.into_iter().map(Written::Charged).collect())
                }
                &Statement::Settle {
                    user_id,
                    hold_id,
                    kind,
                    amount,
                    ..
                } => {
                    let settled = sql::settle(tx, user_id, hold_id, kind, amount).await?;
                    Ok(vec![Written::Settled(settled)])
                }
            }
        }))
        .await;
        let mut by_job = vec![Written::Bound; batch.len()];
        for (statement, w) in statements.iter().zip(written) {
            for (&(start, end), w) in groups[statement.groups()].iter().zip(w?) {
                for slot in &mut by_job[start..end] {
                    *slot = w;
                }
            }
        }
        if !binds.is_empty() {
            let mut ids = Vec::new();
            let mut users = Vec::new();
            let mut flows = Vec::new();
            for &i in &binds {
                if let Work::Bind {
                    session_id,
                    chatflow_id,
                    ..
                } = &batch[i].work
                {
                    ids.push(session_id.as_str());
                    users.push(batch[i].user_id);
                    flows.push(chatflow_id.as_str());
                }
            }
            sql::bind_sessions(tx, &ids, &users, &flows).await?;
        }
        txn.commit().await?;
        Ok(by_job)
    }

    /// After a batch's commit: metrics, and this instance's leases.
    fn account_for(&self, batch: &[Job], done: Vec<Written>) {
        let bound = batch
            .iter()
            .filter_map(|j| match j.work {
                Work::Bind { number, .. } => Some(number),
                _ => None,
            })
            .max();
        if let Some(through) = bound {
            self.sessions.written(through);
        }
        let count = |label: &str, credits: i64| {
            crate::metrics::CREDITS
                .with_label_values(&[label])
                .inc_by(credits.max(0) as u64);
        };
        let late = |amount: i64, id: Uuid| {
            if amount > 0 {
                crate::metrics::LEDGER_ERRORS
                    .with_label_values(&["late_capture"])
                    .inc();
                log::error!(
                    "capture of {amount} credits for prediction {id} found its hold or lease no longer open (expired): not charged"
                );
            }
        };
        for (job, written) in batch.iter().zip(done) {
            let label = match (&job.work, written) {
                (
                    Work::Settle {
                        hold_id,
                        kind,
                        amount,
                    },
                    Written::Settled(settled),
                ) => {
                    if settled.is_none() && *kind == SettleKind::Capture {
                        late(*amount, *hold_id);
                    }
                    if let Some((kept, held)) = settled {
                        match kind {
                            SettleKind::Capture => count("captured", kept),
                            SettleKind::Void => count("voided", held),
                        }
                    }
                    match kind {
                        SettleKind::Capture => "captured",
                        SettleKind::Void => "voided",
                    }
                }
                (
                    Work::Charge {
                        lease,
                        id,
                        kept,
                        held,
                        ..
                    },
                    Written::Charged(open),
                ) => {
                    self.leases.written(job.user_id, *lease, *kept);
                    if open {
                        count("captured", *kept);
                        count("voided", held - kept);
                    } else {
                        late(*kept, *id);
                        if self.leases.expired(job.user_id, *lease).is_some() {
                            self.enqueue(job.user_id, Work::Close { lease: *lease });
                        }
                    }
                    if *kept > 0 {
                        "captured"
                    } else {
                        "voided"
                    }
                }
                (Work::Close { lease }, _) => {
                    self.leases.closed(job.user_id, *lease);
                    self.live.lock().remove(lease);
                    continue;
                }
                _ => continue,
            };
            crate::metrics::SETTLEMENT_LAG_SECONDS
                .with_label_values(&[label])
                .observe(job.queued_at.elapsed().as_secs_f64());
        }
    }

    /// Waits (bounded) until every queued settlement is written.
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.pending() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            self.wake.notify_one();
            self.write_now.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Closes every lease of this instance (shutdown): those in use close
    /// when their last prediction ends.
    pub fn close_all_leases(&self) {
        for g in self
            .leases
            .idle(Instant::now() + Duration::from_secs(3600), usize::MAX)
        {
            self.enqueue(g.user_id, Work::Close { lease: g.lease });
        }
    }

    /// Runs forever: closes leases unused for the policy's idle time, so
    /// that what a user does not spend soon is back in their balance.
    ///
    /// At most `IDLE_CLOSES_PER_TICK` per look: when a crowd of users stops
    /// at once (the end of a 1000-user benchmark run), their closes go out
    /// over a second in small batches instead of as one batch that kept a
    /// database backend busy for a fifth of a second (1000 closes, ~220 ms
    /// of PostgreSQL CPU on the benchmark machine) while the proxy, on the
    /// same cores, answered other requests.
    pub async fn run_lease_closer(self: Arc<Self>) {
        let every = (self.policy.idle / 2).max(Duration::from_millis(50));
        let mut wait = every;
        loop {
            tokio::time::sleep(wait).await;
            let Some(before) = Instant::now().checked_sub(self.policy.idle) else {
                continue;
            };
            let idle = self.leases.idle(before, IDLE_CLOSES_PER_TICK);
            // A full tick may have left more behind: look again soon.
            wait = if idle.len() == IDLE_CLOSES_PER_TICK {
                every.min(CLOSER_TICK)
            } else {
                every
            };
            for g in idle {
                self.enqueue(g.user_id, Work::Close { lease: g.lease });
            }
        }
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
