//! `flowise-proxy`: an edge proxy in front of Flowise adding per-user login,
//! chatflow grants, prepaid credits and metrics. See README.md.

mod access_log;
mod api;
mod app;
mod auth;
mod catalog;
mod cli;
mod config;
mod errors;
mod ledger;
mod metrics;
mod proxy;
mod server;
mod sessions;
mod store;
mod upstream;

fn main() {
    std::process::exit(cli::main());
}
