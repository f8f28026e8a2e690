//! Every Prometheus metric, registered once in the default registry that the
//! metrics listener serves. Labels stay bounded: routes are route names from
//! the route table, never raw paths; no user ids.

use once_cell::sync::Lazy;
use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

macro_rules! metric {
    ($name:ident: $ty:ty = $init:expr) => {
        pub static $name: Lazy<$ty> = Lazy::new(|| $init.expect("metric registers once"));
    };
}

metric!(REQUESTS: IntCounterVec = register_int_counter_vec!(
    "flowise_proxy_requests_total",
    "Requests by route, method and status class",
    &["route", "method", "status"]
));
metric!(REQUEST_SECONDS: HistogramVec = register_histogram_vec!(
    "flowise_proxy_request_duration_seconds",
    "Whole request duration by route",
    &["route"],
    LATENCY_BUCKETS.to_vec()
));
metric!(UPSTREAM_SECONDS: HistogramVec = register_histogram_vec!(
    "flowise_proxy_upstream_duration_seconds",
    "Time from sending to Flowise until its response ended, by route",
    &["route"],
    LATENCY_BUCKETS.to_vec()
));
metric!(TTFB_SECONDS: HistogramVec = register_histogram_vec!(
    "flowise_proxy_upstream_ttfb_seconds",
    "Time to Flowise's response header, by route",
    &["route"],
    LATENCY_BUCKETS.to_vec()
));
metric!(IN_FLIGHT: IntGauge = register_int_gauge!(
    "flowise_proxy_in_flight_requests",
    "Requests being handled now"
));
metric!(IN_FLIGHT_STREAMS: IntGauge = register_int_gauge!(
    "flowise_proxy_in_flight_streams",
    "Event streams being relayed now"
));
metric!(UPSTREAM_HEALTHY: IntGaugeVec = register_int_gauge_vec!(
    "flowise_proxy_upstream_healthy",
    "1 when the Flowise server at this index answers its health check",
    &["upstream"]
));
metric!(UPSTREAM_ERRORS: IntCounterVec = register_int_counter_vec!(
    "flowise_proxy_upstream_errors_total",
    "Failed upstream exchanges by kind (connect, timeout, read)",
    &["kind"]
));
metric!(AUTH_FAILURES: IntCounterVec = register_int_counter_vec!(
    "flowise_proxy_auth_failures_total",
    "Rejected authentications by reason",
    &["reason"]
));
metric!(LOGINS: IntCounterVec = register_int_counter_vec!(
    "flowise_proxy_logins_total",
    "Login attempts by outcome",
    &["outcome"]
));
metric!(SNAPSHOT_AGE_SECONDS: IntGauge = register_int_gauge!(
    "flowise_proxy_identity_snapshot_age_seconds",
    "Seconds since the identity snapshot was last known current (a load, a delta, or a live LISTEN connection)"
));
metric!(SNAPSHOT_RELOADS: IntCounterVec = register_int_counter_vec!(
    "flowise_proxy_identity_snapshot_reloads_total",
    "Full identity snapshot reloads by trigger (startup, reconnect, periodic, unparsed, overflow)",
    &["trigger"]
));
metric!(SNAPSHOT_DELTAS: IntCounter = register_int_counter!(
    "flowise_proxy_identity_snapshot_deltas_total",
    "Identity changes applied as deltas (only the changed rows re-read)"
));
metric!(SNAPSHOT_ROWS_READ: IntCounterVec = register_int_counter_vec!(
    "flowise_proxy_identity_snapshot_rows_read_total",
    "Rows read from the database into the identity snapshot, by kind (full, delta)",
    &["kind"]
));
metric!(SNAPSHOT_ENTRIES: IntGaugeVec = register_int_gauge_vec!(
    "flowise_proxy_identity_snapshot_entries",
    "Entries held by the identity snapshot by kind (users, api_keys, grants, revoked; bytes: their size)",
    &["kind"]
));
metric!(CREDITS: IntCounterVec = register_int_counter_vec!(
    "flowise_proxy_credits_total",
    "Credits moved, by kind (held, captured, voided, expired)",
    &["kind"]
));
metric!(HOLDS_REJECTED: IntCounter = register_int_counter!(
    "flowise_proxy_holds_rejected_total",
    "Admissions refused for insufficient credits"
));
metric!(SETTLEMENT_QUEUE: IntGauge = register_int_gauge!(
    "flowise_proxy_settlement_queue_depth",
    "Settlements waiting to be written"
));
metric!(SETTLEMENT_LAG_SECONDS: HistogramVec = register_histogram_vec!(
    "flowise_proxy_settlement_lag_seconds",
    "Time from the end of a request to its settlement being durable",
    &["outcome"],
    LATENCY_BUCKETS.to_vec()
));
metric!(LEDGER_ERRORS: IntCounterVec = register_int_counter_vec!(
    "flowise_proxy_ledger_errors_total",
    "Ledger operations that failed, by operation",
    &["op"]
));
metric!(DB_ERRORS: IntCounterVec = register_int_counter_vec!(
    "flowise_proxy_database_errors_total",
    "Database errors by kind",
    &["kind"]
));
metric!(DB_POOL: IntGaugeVec = register_int_gauge_vec!(
    "flowise_proxy_db_pool_connections",
    "Database pool connections by state (size, available, waiting, max)",
    &["state"]
));
metric!(CATALOG_SYNCS: IntCounterVec = register_int_counter_vec!(
    "flowise_proxy_catalog_syncs_total",
    "Chatflow catalogue syncs by outcome",
    &["outcome"]
));

metric!(ACCESS_LOG_DROPPED: IntCounter = register_int_counter!(
    "flowise_proxy_access_log_dropped_total",
    "Access-log lines dropped because stdout's reader fell behind"
));

/// Status class label: "2xx", "4xx", ... ("none" when nothing was sent).
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

metric!(JWKS_REFRESHES: IntCounterVec = register_int_counter_vec!(
    "flowise_proxy_jwks_refreshes_total",
    "OIDC key-set refreshes by result (ok, error, rate_limited: an unknown key id asked too soon after the last one)",
    &["result"]
));
metric!(EXTERNAL_USERS_PROVISIONED: IntCounter = register_int_counter!(
    "flowise_proxy_external_users_provisioned_total",
    "Users created for external identities (login service, OIDC) seen for the first time"
));

/// Registers every metric so that the first scrape lists them all.
pub fn init() {
    Lazy::force(&REQUESTS);
    Lazy::force(&REQUEST_SECONDS);
    Lazy::force(&UPSTREAM_SECONDS);
    Lazy::force(&TTFB_SECONDS);
    Lazy::force(&IN_FLIGHT);
    Lazy::force(&IN_FLIGHT_STREAMS);
    Lazy::force(&UPSTREAM_HEALTHY);
    Lazy::force(&UPSTREAM_ERRORS);
    Lazy::force(&AUTH_FAILURES);
    Lazy::force(&LOGINS);
    Lazy::force(&SNAPSHOT_AGE_SECONDS);
    Lazy::force(&SNAPSHOT_RELOADS);
    Lazy::force(&SNAPSHOT_DELTAS);
    Lazy::force(&SNAPSHOT_ROWS_READ);
    Lazy::force(&SNAPSHOT_ENTRIES);
    Lazy::force(&CREDITS);
    Lazy::force(&HOLDS_REJECTED);
    Lazy::force(&SETTLEMENT_QUEUE);
    Lazy::force(&SETTLEMENT_LAG_SECONDS);
    Lazy::force(&LEDGER_ERRORS);
    Lazy::force(&DB_ERRORS);
    Lazy::force(&DB_POOL);
    Lazy::force(&CATALOG_SYNCS);
    Lazy::force(&ACCESS_LOG_DROPPED);
    // Every documented series exists from start-up (at zero), so that rates,
    // alerts and dashboards have data before the first event.
    let labelled: [(&IntCounterVec, &[&str]); 8] = [
        (&CREDITS, &["held", "captured", "voided", "expired"]),
        (
            &UPSTREAM_ERRORS,
            &["no_healthy", "connect", "timeout", "read"],
        ),
        (
            &AUTH_FAILURES,
            &[
                "missing",
                "malformed",
                "expired",
                "bad_signature",
                "revoked",
                "unknown_user",
                "inactive",
                "bad_api_key",
                "invalid_credentials",
                "throttled",
                "refresh_invalid",
                "refresh_reuse",
            ],
        ),
        (&LOGINS, &["success", "failure"]),
        (
            &SNAPSHOT_RELOADS,
            &["startup", "reconnect", "periodic", "unparsed", "overflow"],
        ),
        (&SNAPSHOT_ROWS_READ, &["full", "delta"]),
        (
            &LEDGER_ERRORS,
            &["hold", "settle", "sweep", "renew", "late_capture"],
        ),
        (&DB_ERRORS, &["pool", "query"]),
    ];
    for (vec, labels) in labelled {
        for l in labels {
            vec.with_label_values(&[l]);
        }
    }
    for l in ["ok", "failed", "empty"] {
        CATALOG_SYNCS.with_label_values(&[l]);
    }
    for l in ["captured", "voided"] {
        SETTLEMENT_LAG_SECONDS.with_label_values(&[l]);
    }
    for l in ["size", "available", "waiting", "max"] {
        DB_POOL.with_label_values(&[l]);
    }
    // Requests and latencies by route: the routes that carry traffic to Flowise.
    for route in ROUTES_TO_FLOWISE {
        REQUEST_SECONDS.with_label_values(&[route]);
        UPSTREAM_SECONDS.with_label_values(&[route]);
        TTFB_SECONDS.with_label_values(&[route]);
        for class in ["2xx", "4xx", "5xx"] {
            REQUESTS.with_label_values(&[route, "POST", class]);
        }
    }
    Lazy::force(&EXTERNAL_USERS_PROVISIONED);
    for result in ["ok", "error", "rate_limited"] {
        JWKS_REFRESHES.with_label_values(&[result]);
    }
}

/// Route labels pre-created at start-up (see `init`).
const ROUTES_TO_FLOWISE: [&str; 2] = ["chat_predict", "flowise_prediction"];
