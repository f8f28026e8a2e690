//! The shared state every request sees: configuration, database pool, identity,
//! ledger, Flowise servers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::auth::{Auth, SnapshotStore};
use crate::config::Config;
use crate::ledger::{LeasePolicy, Ledger};
use crate::sessions::SessionBindings;
use crate::store::Db;
use crate::upstream::Upstreams;

pub struct App {
    pub cfg: Config,
    pub db: Db,
    pub auth: Auth,
    pub ledger: Arc<Ledger>,
    pub upstreams: Upstreams,
    pub sessions: Arc<SessionBindings>,
    /// Set by SIGTERM: `/health` turns 503 while in-flight work finishes.
    draining: AtomicBool,
    /// Pingora has broadcast its shutdown: the listeners accept no more.
    listeners_closed: AtomicBool,
}

impl App {
    pub fn new(cfg: Config, db: Db) -> Result<Arc<App>, String> {
        let snapshot = Arc::new(SnapshotStore::new());
        let upstreams = Upstreams::new(&cfg)?;
        let sessions = Arc::new(SessionBindings::new());
        Ok(Arc::new(App {
            auth: Auth::new(&cfg, snapshot, db.clone()),
            ledger: Ledger::new(
                db.clone(),
                LeasePolicy {
                    predictions: cfg.credit_lease_predictions,
                    idle: cfg.credit_lease_idle,
                    hold_ttl: cfg.hold_ttl,
                },
                sessions.clone(),
            ),
            sessions,
            upstreams,
            db,
            cfg,
            draining: AtomicBool::new(false),
            listeners_closed: AtomicBool::new(false),
        }))
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn close_listeners(&self) {
        self.listeners_closed.store(true, Ordering::SeqCst);
    }

    pub fn listeners_closed(&self) -> bool {
        self.listeners_closed.load(Ordering::SeqCst)
    }
}
