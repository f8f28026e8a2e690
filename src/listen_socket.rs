//! `TCP_DEFER_ACCEPT` on the proxy's listening socket.
//!
//! When Pingora broadcasts its shutdown (after SIGTERM's drain, or 5 s into
//! a `-u` upgrade hand-over) it drops every connection it has accepted but
//! not yet read a request from, and the client sees its request fail. On
//! loopback under load the upgrade test caught one such connection in a few
//! upgrades: accepted just before the broadcast, its bytes a moment after.
//! With `TCP_DEFER_ACCEPT` the kernel hands a connection to `accept()` only
//! once its first bytes have arrived, so Pingora reads the request before it
//! looks at the shutdown, and serves it.
//!
//! Pingora binds the socket itself and has no setting for this, so the
//! option is set on the bound socket, found among the process's descriptors
//! by its port. After an upgrade the new process inherits the same socket,
//! option included.

use std::time::Duration;

/// Sets the option once Pingora has bound `port` (waits up to 10 s).
pub async fn defer_accept(port: u16) {
    for _ in 0..100 {
        if set_on_listeners(port) {
            log::info!("TCP_DEFER_ACCEPT set on port {port}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log::warn!("no listening socket on port {port} found for TCP_DEFER_ACCEPT");
}

#[cfg(target_os = "linux")]
fn set_on_listeners(port: u16) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return false;
    };
    let mut found = false;
    for entry in dir.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if is_tcp_listener_on(fd, port) {
            // Seconds the kernel waits for the first bytes before handing
            // the connection over anyway.
            let secs: libc::c_int = 5;
            // SAFETY: setsockopt on a descriptor just checked to be a
            // listening socket, with a correctly sized c_int value.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_DEFER_ACCEPT,
                    (&secs as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            found |= rc == 0;
        }
    }
    found
}

#[cfg(target_os = "linux")]
fn is_tcp_listener_on(fd: libc::c_int, port: u16) -> bool {
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `listening`; on a
    // descriptor that is not a socket it fails with ENOTSOCK.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || listening != 1 {
        return false;
    }
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`.
    let rc = unsafe {
        libc::getsockname(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return false;
    }
    let bound = match libc::c_int::from(addr.ss_family) {
        // SAFETY: the family says which sockaddr variant the storage holds.
        libc::AF_INET => unsafe {
            (*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()).sin_port
        },
        // SAFETY: as above.
        libc::AF_INET6 => unsafe {
            (*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()).sin6_port
        },
        _ => return false,
    };
    u16::from_be(bound) == port
}

#[cfg(not(target_os = "linux"))]
fn set_on_listeners(_port: u16) -> bool {
    true
}
