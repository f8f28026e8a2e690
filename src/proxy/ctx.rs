//! Per-request context, carried from `request_filter` to `logging`.

use std::time::Instant;

use bytes::Bytes;

use super::route::Route;
use crate::auth::Identity;
use crate::ledger::{Hold, UpstreamOutcome};

pub struct Ctx {
    pub request_id: String,
    pub started: Instant,
    pub route: Route,
    pub method: String,
    pub query: Option<String>,
    pub identity: Option<Identity>,
    pub chatflow_id: Option<String>,
    pub client_ip: Option<String>,
    pub origin: Option<String>,
    /// The request body, read in `request_filter` (bounded by MAX_BODY_BYTES).
    pub body: Option<Bytes>,
    pub hold: Option<Hold>,
    /// What Flowise did, for settlement and the access log.
    pub upstream: UpstreamOutcome,
    pub upstream_failure: Option<&'static str>,
    /// The Flowise server Pingora's proxy loop is talking to.
    pub upstream_server: Option<crate::config::FlowiseUrl>,
    /// Status of the response we wrote ourselves (own endpoints, relayed, errors).
    pub status: Option<u16>,
    pub credits_charged: Option<i64>,
    pub streamed: bool,
    /// Drop-in chat message reads are limited to this conversation.
    pub forced_session: Option<String>,
    pub counted: bool,
}

impl Ctx {
    pub fn new() -> Ctx {
        Ctx {
            request_id: String::new(),
            started: Instant::now(),
            route: Route::NotFound,
            method: String::new(),
            query: None,
            identity: None,
            chatflow_id: None,
            client_ip: None,
            origin: None,
            body: None,
            hold: None,
            upstream: UpstreamOutcome::default(),
            upstream_failure: None,
            upstream_server: None,
            status: None,
            credits_charged: None,
            streamed: false,
            forced_session: None,
            counted: false,
        }
    }

    pub fn user_id(&self) -> Option<i64> {
        self.identity.as_ref().map(|i| i.user_id)
    }
}

impl Default for Ctx {
    fn default() -> Self {
        Self::new()
    }
}
