//! Per-request context, carried from `request_filter` to `logging`.

use std::time::Instant;

use bytes::Bytes;

use super::answer::Answer;
use super::body::RequestBody;
use crate::auth::Identity;
use crate::ledger::{Hold, UpstreamOutcome};
use crate::route::Route;

pub struct Ctx {
    pub request_id: String,
    pub started: Instant,
    pub route: Route,
    pub method: http::Method,
    pub query: Option<String>,
    pub identity: Option<Identity>,
    pub chatflow_id: Option<String>,
    pub client_ip: Option<String>,
    pub origin: Option<String>,
    /// A body read whole in `request_filter`: the proxy's own endpoints and
    /// the seed prediction (see `body.rs` for why only those).
    pub body: Option<Bytes>,
    /// What `request_body_filter` does with the bytes going to Flowise.
    pub upstream_body: RequestBody,
    /// Request body bytes seen by `request_body_filter`.
    pub body_received: usize,
    /// Why `request_body_filter` refused the body (answered by `fail_to_proxy`).
    pub body_error: Option<crate::errors::ApiError>,
    /// The path (and query) Flowise is asked for, when it differs from the
    /// client's (seed routes mapped onto Flowise routes, rebuilt queries).
    pub upstream_path: Option<String>,
    /// The conversation a prediction continues (already checked to be the
    /// caller's); `None` for a new one, whose id Flowise assigns.
    pub conversation: Option<String>,
    pub hold: Option<Hold>,
    /// What Flowise did, for settlement and the access log.
    pub upstream: UpstreamOutcome,
    pub upstream_failure: Option<&'static str>,
    /// Servers this request already failed to connect to (failover).
    pub tried: Vec<usize>,
    /// The Flowise server Pingora's proxy loop is talking to.
    pub upstream_server: Option<usize>,
    /// When the request header went to Flowise (time to first byte).
    pub upstream_sent: Option<Instant>,
    /// How Flowise's answer is passed on (see `answer.rs`).
    pub answer: Answer,
    /// Status of a response we wrote ourselves (own endpoints, errors).
    pub status: Option<u16>,
    pub credits_charged: Option<i64>,
    pub counted: bool,
}

impl Ctx {
    pub fn new() -> Ctx {
        Ctx {
            request_id: String::new(),
            started: Instant::now(),
            route: Route::NotFound,
            method: http::Method::GET,
            query: None,
            identity: None,
            chatflow_id: None,
            client_ip: None,
            origin: None,
            body: None,
            upstream_body: RequestBody::default(),
            body_received: 0,
            body_error: None,
            upstream_path: None,
            conversation: None,
            hold: None,
            upstream: UpstreamOutcome::default(),
            upstream_failure: None,
            tried: Vec::new(),
            upstream_server: None,
            upstream_sent: None,
            answer: Answer::default(),
            status: None,
            credits_charged: None,
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
