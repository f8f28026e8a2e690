//! The open-file (descriptor) limit.
//!
//! At the default soft limit (1024 on most systems), 1,100 unfinished requests
//! left no descriptor for `accept()` ("Too many open files") and `/health`
//! timed out. The process raises its soft limit to the hard limit, and the
//! connection cap is lowered to what the limit leaves room for, so the cap
//! answers before descriptors run out.

/// Descriptors kept for everything but client connections: listeners, the
/// database pool, logs, health checks, over-capacity connections being
/// answered (at most 128).
const RESERVED: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit
/// in force afterwards (`None` if it cannot be read).
#[cfg(unix)]
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
pub fn raise_to_hard_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        log::warn!("cannot read the open file limit");
        return None;
    }
    let before = lim.rlim_cur;
    // An unlimited hard limit still stops at the kernel's nr_open.
    let target = if lim.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
    } else {
        lim.rlim_max
    };
    if before >= target {
        log::info!("open file limit: {before}");
        return Some(before as u64);
    }
    lim.rlim_cur = target;
    // SAFETY: setrlimit reads one rlimit struct; raising the soft limit up
    // to the hard limit needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        log::warn!(
            "open file limit: {before}; raising it to {target} failed: {}",
            std::io::Error::last_os_error()
        );
        return Some(before as u64);
    }
    log::info!("open file limit: raised from {before} to {target} (the hard limit)");
    Some(target as u64)
}

#[cfg(not(unix))]
pub fn raise_to_hard_limit() -> Option<u64> {
    None
}

/// The connection cap that fits `fd_limit`: each client connection may hold
/// one connection to Flowise as well.
pub fn fit_connections(configured: usize, fd_limit: Option<u64>) -> usize {
    let Some(fd_limit) = fd_limit else {
        return configured;
    };
    let room = (fd_limit.saturating_sub(RESERVED) / 2).max(1);
    let fitted = configured.min(usize::try_from(room).unwrap_or(usize::MAX));
    if fitted < configured {
        log::warn!(
            "MAX_CONNECTIONS {configured} lowered to {fitted}: the open file limit is {fd_limit} \
             (two descriptors per connection, {RESERVED} kept in reserve)"
        );
    } else {
        log::info!("MAX_CONNECTIONS {configured} (open file limit {fd_limit})");
    }
    fitted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_the_descriptor_limit() {
        assert_eq!(fit_connections(10_000, Some(1024)), 384);
        assert_eq!(fit_connections(10_000, Some(1 << 20)), 10_000);
        assert_eq!(fit_connections(10_000, None), 10_000);
        assert_eq!(fit_connections(10_000, Some(100)), 1);
    }

    /// Lowers this process's soft limit, then raises it back: the function
    /// must restore the hard limit.
    #[test]
    #[allow(clippy::unnecessary_cast)]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_to_hard_limit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        let hard = lim.rlim_max;
        assert!(
            hard > 512 || hard == libc::RLIM_INFINITY,
            "hard limit {hard} too low to test"
        );
        let lowered = libc::rlimit {
            rlim_cur: 512,
            rlim_max: hard,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        let now = raise_to_hard_limit().expect("limit readable");
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur as u64, now);
        assert!(now > 512);
        if hard != libc::RLIM_INFINITY {
            assert_eq!(now, hard as u64);
        }
    }
}
