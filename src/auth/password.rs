//! Secrets at rest: argon2id for passwords, SHA-256 for high-entropy tokens
//! (refresh tokens and API key secrets are 256-bit random, so a slow hash adds
//! nothing but latency), constant-time comparison everywhere.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use base64::Engine;
use once_cell::sync::Lazy;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing failed: {e}"))
}

/// A real hash of a random password, verified against when the username is
/// unknown so that a missing user costs the same time as a wrong password.
static DUMMY_HASH: Lazy<String> =
    Lazy::new(|| hash_password(&random_token(16)).unwrap_or_default());

/// Verifies `password` against `hash` (or against a dummy when there is no user).
pub fn verify_password(password: &str, hash: Option<&str>) -> bool {
    let (h, real) = match hash {
        Some(h) => (h.to_string(), true),
        None => (DUMMY_HASH.clone(), false),
    };
    let ok = match PasswordHash::new(&h) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    };
    ok && real
}

/// Argon2 runs on a few dedicated threads, never on tokio's blocking pool.
///
/// Each hash or verification allocates 19 MiB. On the blocking pool (up to
/// 512 threads) glibc kept those blocks in per-thread arenas: 24 concurrent
/// logins left the proxy at 330 MB RSS (measured before the allocator was
/// mimalloc; the bound holds for any allocator). With a fixed pool the memory is
/// bounded by the pool size and the CPU spent on passwords by its threads.
mod workers {
    use once_cell::sync::Lazy;
    use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
    use std::sync::{Arc, Mutex};

    type Job = Box<dyn FnOnce() + Send>;

    /// Jobs waiting beyond this are refused: a login flood costs queue
    /// space, not unbounded memory.
    const QUEUE: usize = 256;

    static POOL: Lazy<SyncSender<Job>> = Lazy::new(|| {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let threads = std::thread::available_parallelism()
            .map(|n| n.get().min(4))
            .unwrap_or(1);
        for i in 0..threads {
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("password-{i}"))
                .spawn(move || serve(&rx));
        }
        tx
    });

    fn serve(rx: &Mutex<Receiver<Job>>) {
        loop {
            let job = match rx.lock() {
                Ok(r) => r.recv(),
                Err(_) => return,
            };
            match job {
                Ok(job) => {
                    job();
                    // The job's 19 MiB went back to the allocator; hand it
                    // to the system now. mimalloc would only purge it on its
                    // next allocation, and these threads sleep between
                    // logins: 80 logins left RSS at 57 MB instead of 16 MB.
                    crate::allocator::give_back();
                }
                Err(_) => return,
            }
        }
    }

    /// Runs `f` on the pool; `None` when the queue is full.
    pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        match POOL.try_send(job) {
            Ok(()) => rx.await.ok(),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => None,
        }
    }
}

/// [`hash_password`] on the password threads; `None` when they are saturated.
pub async fn hash_password_pooled(password: String) -> Option<Result<String, String>> {
    workers::run(move || hash_password(&password)).await
}

/// [`verify_password`] on the password threads; `None` when they are saturated.
pub async fn verify_password_pooled(password: String, hash: Option<String>) -> Option<bool> {
    workers::run(move || verify_password(&password, hash.as_deref())).await
}

/// `n` random bytes, base64url without padding.
pub fn random_token(n: usize) -> String {
    let mut buf = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// Equal contents, in time that depends only on the length. The
/// differences are OR-folded eight bytes at a time (every byte is read, no
/// early exit) and the fold is tested once with `subtle`; `subtle`'s own
/// slice comparison goes byte by byte behind an optimisation barrier, which
/// was 1.2 % of the proxy's CPU per request on a ~300-byte access token.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8]));
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut diff = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .fold(0u64, |d, (x, y)| d | u64::from(x ^ y));
    for (x, y) in ac.zip(bc) {
        diff |= word(x) ^ word(y);
    }
    bool::from(diff.ct_eq(&0))
}

/// API keys look like `fpk_<prefix>_<secret>`: the prefix finds the key, the
/// secret proves it. Only the prefix and the secret's hash are stored.
pub struct NewApiKey {
    pub token: String,
    pub prefix: String,
    pub secret_hash: Vec<u8>,
}

pub fn new_api_key() -> NewApiKey {
    let mut p = [0u8; 6];
    rand::thread_rng().fill_bytes(&mut p);
    let prefix = hex::encode(p);
    let secret = random_token(32);
    NewApiKey {
        token: format!("fpk_{prefix}_{secret}"),
        secret_hash: sha256(secret.as_bytes()),
        prefix,
    }
}

/// Splits a presented API key into (prefix, secret).
pub fn parse_api_key(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("fpk_")?;
    let (prefix, secret) = rest.split_once('_')?;
    let plain = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (prefix.len() == 12
        && prefix.bytes().all(|b| b.is_ascii_alphanumeric())
        && !secret.is_empty()
        && secret.len() <= 128
        && plain(secret))
    .then_some((prefix, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq_finds_a_difference_at_every_position() {
        let a: Vec<u8> = (0..37u8).collect();
        assert!(ct_eq(&a, &a.clone()));
        for i in 0..a.len() {
            let mut b = a.clone();
            b[i] ^= 0x80;
            assert!(!ct_eq(&a, &b), "difference at byte {i} missed");
        }
        assert!(!ct_eq(&a, &a[..36]));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn passwords_and_keys() {
        let h = hash_password("correct horse").expect("hash");
        assert!(verify_password("correct horse", Some(&h)));
        assert!(!verify_password("wrong", Some(&h)));
        assert!(!verify_password("correct horse", None));
        let k = new_api_key();
        let (prefix, secret) = parse_api_key(&k.token).expect("parse");
        assert_eq!(prefix, k.prefix);
        assert!(ct_eq(&sha256(secret.as_bytes()), &k.secret_hash));
        assert!(parse_api_key("fpk_short_x").is_none());
    }
}
