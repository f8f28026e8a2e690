//! `flowise-proxy`: an edge proxy in front of Flowise adding per-user login,
//! chatflow grants, prepaid credits and metrics. See README.md.

mod access;
mod access_log;
mod allocator;
mod api;
mod app;
mod auth;
mod catalog;
mod cli;
mod config;
mod errors;
mod ledger;
mod limits;
mod listen_socket;
mod metrics;
mod proxy;
mod route;
mod server;
mod sessions;
mod store;
mod upstream;
mod validate;

fn main() {
    std::process::exit(cli::main());
}
