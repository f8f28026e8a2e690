//! The integration tests' Flowise double (`tests/support/flowise.rs`) as a
//! standalone server, for `bench/run.sh`: it prints its URL
//! (`http://127.0.0.1:PORT`) on the first line of stdout and the URL of its
//! control endpoint on the second, then serves until killed. Its API key is
//! `test-flowise-key`; its chatflows are those of `FlowiseConfig::default()`.
//!
//! A streamed prediction has one event per word of the question plus five
//! (`start`, two answer prefix tokens, `metadata`, `end`): a question of 45
//! words is a 50-event stream. The control endpoint sets the pause between
//! streamed events (the tests' `set_token_delay`), for every stream from then
//! on: `PUT /token-delay-us/2000` (0, the default, sends the events at once).
//!
//! ```text
//! cargo run --release --example flowise_double
//! ```

#[allow(dead_code)]
#[path = "../tests/support/flowise.rs"]
mod flowise;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::put;

#[tokio::main]
async fn main() {
    let double = Arc::new(flowise::start(flowise::FlowiseConfig::default()).await);
    let control = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the control endpoint on 127.0.0.1:0");
    let control_addr = control.local_addr().expect("control endpoint address");
    println!("{}", double.url);
    println!("http://{control_addr}");
    let _ = std::io::stdout().flush();

    let app = axum::Router::new()
        .route("/token-delay-us/{us}", put(set_token_delay))
        .with_state(double.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(control, app).await {
            eprintln!("[flowise double] control endpoint: {e}");
        }
    });

    // The double remembers every request and message for the tests'
    // assertions; a benchmark sends millions, so forget them as it goes.
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        double.forget();
    }
}

async fn set_token_delay(
    State(double): State<Arc<flowise::TestFlowise>>,
    Path(us): Path<u64>,
) -> &'static str {
    double.set_token_delay(Duration::from_micros(us));
    "ok\n"
}
