//! The limits' metrics, in the default registry `/metrics` serves.

use once_cell::sync::Lazy;
use prometheus::{register_int_counter_vec, register_int_gauge, IntCounterVec, IntGauge};

pub static OPEN: Lazy<IntGauge> = Lazy::new(|| {
    register_int_gauge!(
        "flowise_proxy_client_connections",
        "Client connections open now (within MAX_CONNECTIONS)"
    )
    .expect("metric registers once")
});

/// `limit`: max_connections, max_header_bytes, header_timeout, body_timeout.
pub static REFUSED: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "flowise_proxy_client_limit_hits_total",
        "Client connections answered and closed because they reached a limit",
        &["limit"]
    )
    .expect("metric registers once")
});
