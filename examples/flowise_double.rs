//! The integration tests' Flowise double (`tests/support/flowise.rs`) as a
//! standalone server, for `bench/run.sh`: it prints its URL
//! (`http://127.0.0.1:PORT`) on the first line of stdout, then serves until
//! killed. Its API key is `test-flowise-key`; its chatflows are those of
//! `FlowiseConfig::default()`.
//!
//! ```text
//! cargo run --release --example flowise_double
//! ```

#[allow(dead_code)]
#[path = "../tests/support/flowise.rs"]
mod flowise;

use std::io::Write;
use std::time::Duration;

#[tokio::main]
async fn main() {
    let double = flowise::start(flowise::FlowiseConfig::default()).await;
    println!("{}", double.url);
    let _ = std::io::stdout().flush();
    // The double remembers every request and message for the tests'
    // assertions; a benchmark sends millions, so forget them as it goes.
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        double.forget();
    }
}
