//! Test support for `flowise-proxy` integration tests.
//!
//! Use from a `tests/*.rs` file with `mod support;`. Everything here expects a
//! `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` test.
//!
//! - [`pg`]: a fresh PostgreSQL database per test ([`pg::fresh_db`]) and a
//!   private, stoppable cluster for outage tests ([`pg::PrivateCluster`]).
//! - [`flowise`]: an in-process test double of Flowise 3.1.2 ([`flowise::start`]).
//! - [`proxy`]: the real `flowise-proxy` binary on free ports ([`proxy::start`]).
#![allow(dead_code)]

pub mod flowise;
pub mod pg;
pub mod proxy;
pub mod setup;

use std::future::Future;
use std::time::{Duration, Instant};

/// A TCP port on 127.0.0.1 that was free a moment ago (bind :0, read, close).
/// Another process may still take it before you bind it: callers retry.
pub fn free_port() -> u16 {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of a freshly bound listener")
        .port()
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
/// Returns whether it became true. Use instead of a bare sleep.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` random lowercase hex characters.
pub fn random_hex(n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| char::from_digit(rng.gen_range(0..16), 16).expect("digit below 16"))
        .collect()
}
