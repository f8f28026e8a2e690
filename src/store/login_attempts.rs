//! Login attempt counters shared by every instance (see `auth::throttle`).

use super::{Db, StoreResult};

/// One key's state after an attempt was counted.
#[derive(Debug, Clone, Copy)]
pub struct Counted {
    pub count: i32,
    /// Seconds until the key's window ends.
    pub seconds_left: f64,
}

/// Counts one attempt against each key, atomically, in one round trip: a key
/// whose window is over starts a new one at 1. Returns the counts in the
/// order of `keys`.
pub async fn count(db: &Db, keys: &[Vec<u8>], window_secs: f64) -> StoreResult<Vec<Counted>> {
    let c = db.get().await?;
    let stmt = c
        .prepare_cached(
            "INSERT INTO login_attempts AS a (key_hash, window_start, count)
             SELECT k, now(), 1 FROM unnest($1::bytea[]) WITH ORDINALITY AS t(k, i) ORDER BY i
             ON CONFLICT (key_hash) DO UPDATE SET
                 window_start = CASE WHEN a.window_start <= now() - make_interval(secs => $2)
                                     THEN now() ELSE a.window_start END,
                 count = CASE WHEN a.window_start <= now() - make_interval(secs => $2)
                              THEN 1 ELSE a.count + 1 END
             RETURNING key_hash, count,
                 EXTRACT(EPOCH FROM window_start + make_interval(secs => $2) - now())::float8",
        )
        .await?;
    let rows = c.query(&stmt, &[&keys, &window_secs]).await?;
    Ok(keys
        .iter()
        .map(|k| {
            rows.iter()
                .find(|r| r.get::<_, &[u8]>(0) == k.as_slice())
                .map(|r| Counted {
                    count: r.get(1),
                    seconds_left: r.get(2),
                })
                .unwrap_or(Counted {
                    count: 1,
                    seconds_left: window_secs,
                })
        })
        .collect())
}

/// Gives back one attempt of each key (a successful login does not use up the
/// budget of failures).
pub async fn refund(db: &Db, keys: &[Vec<u8>]) -> StoreResult<()> {
    let c = db.get().await?;
    c.execute(
        "UPDATE login_attempts SET count = count - 1 WHERE key_hash = ANY($1) AND count > 0",
        &[&keys],
    )
    .await?;
    Ok(())
}

/// Forgets windows that ended long ago.
pub async fn prune(db: &Db, window_secs: f64) -> StoreResult<u64> {
    let c = db.get().await?;
    Ok(c.execute(
        "DELETE FROM login_attempts WHERE window_start < now() - make_interval(secs => $1)",
        &[&(window_secs * 2.0)],
    )
    .await?)
}
