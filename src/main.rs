//! `flowise-proxy`: an edge proxy in front of Flowise adding per-user login,
//! chatflow grants, prepaid credits and metrics. See README.md.

mod access;
mod access_log;
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
    keep_large_allocations_mapped();
    std::process::exit(cli::main());
}

/// Every password check allocates argon2's 19 MiB. After the first such block
/// is freed, glibc raises its mmap threshold above it and from then on keeps
/// these blocks in its per-thread arenas: RSS ratcheted up to 170 MB after
/// 80 logins. A fixed threshold keeps large blocks mapped on their own and
/// returned to the system when freed (back to ~13 MB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_large_allocations_mapped() {
    // SAFETY: mallopt only tunes the allocator; this runs first in main,
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_large_allocations_mapped() {}
