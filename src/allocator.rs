//! The process's memory allocator: mimalloc, and when the proxy gives freed
//! memory back to the system.
//!
//! Why not glibc's malloc: profiled under load (`perf record`, 1000 users'
//! debited predictions), glibc's malloc, free and their consolidation took
//! about 14 % of the proxy's CPU; each request allocates and frees a few
//! hundred small blocks on one thread. With mimalloc, measured A/B on one
//! running setup (see bench/README.md): proxy CPU per pass-through request
//! -7 to -10 %, per debited prediction -9 to -12 %, per burst stream -4 to
//! -9 %, at the same resident memory.
//!
//! Options, set before the first allocation (`configure`):
//! * no eager commit of mimalloc's arenas: with it (mimalloc's default where
//!   the OS overcommits), the proxy's RSS after a minute of streams was
//!   63 MB instead of glibc's 27 MB; without it 26-37 MB, and the speed is
//!   the same.
//!
//! Freed memory goes back to the system when the thread that freed it next
//! allocates (after a short delay). Threads that sleep between bursts of
//! work call `give_back` when they finish one: the password threads after
//! each argon2 check (19 MiB each; without it 80 logins left RSS at 57 MB
//! instead of 17 MB), the connection trimmer, the identity reload.

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// mimalloc's `mi_option_arena_eager_commit` (its option enum's fifth
/// entry; the Rust bindings name only some of the options).
const OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Sets the allocator's options before the first allocation: mimalloc
/// reserves its first arena on the first `malloc`, which Rust's runtime
/// makes before `main` (set from `main`, the option came too late: RSS
/// stayed at 66 MB). So this runs as an ELF constructor (`.init_array`),
/// like mimalloc's own initialisation.
/// ELF only; elsewhere (a developer's macOS build) mimalloc keeps its
/// defaults.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static CONFIGURE_BEFORE_MAIN: extern "C" fn() = configure;

#[cfg(target_os = "linux")]
extern "C" fn configure() {
    // SAFETY: mi_option_set only stores an option value; constructors run
    // before any other thread exists.
    unsafe {
        libmimalloc_sys::mi_option_set(OPTION_ARENA_EAGER_COMMIT, 0);
    }
}

/// Gives memory that is free back to the system now, rather than after
/// mimalloc's purge delay: after thousands of connections closed, or a
/// full identity reload freed the previous tables. Cheap when there is
/// nothing to give back.
pub fn give_back() {
    // SAFETY: mi_collect only walks the allocator's own free lists.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}
