//! Whether Flowise accepts `FLOWISE_API_KEY`, as the proxy's own calls last saw
//! it. A rejected key (401/403) is a configuration mistake, not an outage: it is
//! named as such in `/health`, the log and the sync's error, so the operator
//! looks at the key instead of the network.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::errors::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// No call that needs the key has been answered yet.
    Unknown,
    Accepted,
    Rejected,
}

static STATE: AtomicU8 = AtomicU8::new(0);

pub fn state() -> KeyState {
    match STATE.load(Ordering::Relaxed) {
        1 => KeyState::Accepted,
        2 => KeyState::Rejected,
        _ => KeyState::Unknown,
    }
}

fn set(s: KeyState) -> KeyState {
    let v = match s {
        KeyState::Unknown => 0,
        KeyState::Accepted => 1,
        KeyState::Rejected => 2,
    };
    match STATE.swap(v, Ordering::Relaxed) {
        1 => KeyState::Accepted,
        2 => KeyState::Rejected,
        _ => KeyState::Unknown,
    }
}

/// Flowise's answer to a request that carried the key: 401 and 403 say the key
/// is wrong (or missing).
pub fn is_rejection(status: u16) -> bool {
    status == 401 || status == 403
}

/// Records that Flowise rejected the key on `call` (logged once per change).
pub fn rejected(call: &str, status: u16, key_set: bool) {
    if set(KeyState::Rejected) != KeyState::Rejected {
        log::error!(
            "Flowise rejected FLOWISE_API_KEY: {call} answered HTTP {status}; {}",
            hint(key_set)
        );
    }
}

/// Records that a call which needs the key succeeded.
pub fn accepted() {
    if set(KeyState::Accepted) == KeyState::Rejected {
        log::info!("Flowise accepts FLOWISE_API_KEY again");
    }
}

fn hint(key_set: bool) -> &'static str {
    if key_set {
        "check it against an API key listed in Flowise (API Keys page)"
    } else {
        "FLOWISE_API_KEY is not set: create an API key in Flowise (API Keys page) and set it"
    }
}

/// The error the admin sync answers with (no key material in it).
pub fn rejected_error(status: u16, key_set: bool) -> ApiError {
    ApiError::new(
        502,
        "flowise_key_rejected",
        format!(
            "Flowise rejected FLOWISE_API_KEY (HTTP {status}); {}",
            hint(key_set)
        ),
    )
}
