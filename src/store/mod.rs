//! The only code that talks SQL. One function per statement, grouped by concern:
//! `identity` (users, tokens, keys, grants, audit), `catalog` (chatflows),
//! `ledger` (accounts, holds, ledger rows), `sessions` (conversation bindings),
//! `external` (identities of other issuers linked to local users).

pub mod catalog;
pub mod external;
pub mod identity;
pub mod ledger;
pub mod login_attempts;
pub mod sessions;

use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime, Timeouts,
};
use tokio_postgres::NoTls;

mod embedded {
    refinery::embed_migrations!("migrations");
}

pub type Db = Pool;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or the statement failed unexpectedly.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness rule was broken (e.g. a username already taken).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not found")]
    NotFound,
    /// The statement refused the values it was given (text PostgreSQL cannot
    /// store, a number out of range): the caller's mistake, not an outage.
    #[error("invalid: {0}")]
    Invalid(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            if db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION {
                return StoreError::Conflict("already exists".into());
            }
            if db.code() == &tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION {
                return StoreError::NotFound;
            }
            use tokio_postgres::error::SqlState;
            if [
                SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
                SqlState::CHARACTER_NOT_IN_REPERTOIRE,
                SqlState::UNTRANSLATABLE_CHARACTER,
                SqlState::STRING_DATA_RIGHT_TRUNCATION,
            ]
            .contains(db.code())
            {
                return StoreError::Invalid(match *db.code() {
                    SqlState::NUMERIC_VALUE_OUT_OF_RANGE => "a number is out of range".into(),
                    _ => "a text value cannot be stored".into(),
                });
            }
        }
        crate::metrics::DB_ERRORS
            .with_label_values(&["query"])
            .inc();
        StoreError::Unavailable(e.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        crate::metrics::DB_ERRORS.with_label_values(&["pool"]).inc();
        StoreError::Unavailable(e.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Builds the pool without touching the network: connections open lazily, inside
/// Pingora's runtimes (a runtime here would clash with Pingora's own).
pub fn build_pool(url: &str, size: usize) -> Result<Pool, String> {
    let mut pg: tokio_postgres::Config = url
        .parse()
        .map_err(|_| "DATABASE_URL: not a valid PostgreSQL URL".to_string())?;
    pg.connect_timeout(Duration::from_secs(3));
    pg.application_name("flowise-proxy");
    let mgr = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let mut pool_cfg = PoolConfig::new(size);
    pool_cfg.timeouts = Timeouts {
        wait: Some(Duration::from_secs(3)),
        create: Some(Duration::from_secs(3)),
        recycle: Some(Duration::from_secs(3)),
    };
    Pool::builder(mgr)
        .config(pool_cfg)
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| format!("database pool: {e}"))
}

/// Opens one dedicated connection (migrations, LISTEN). The connection task is
/// spawned on the current runtime.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut pg: tokio_postgres::Config = url.parse()?;
    pg.connect_timeout(Duration::from_secs(3));
    pg.application_name("flowise-proxy");
    let (client, conn) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// LISTENs on `channel`, calls `on_listening` once it listens and
/// `on_payload` for every notification, until the connection is lost (an
/// error, or `Ok` when the server closed it). A cheap query now and then
/// detects a dead server.
pub async fn listen(
    url: &str,
    channel: &str,
    on_listening: impl FnOnce(),
    on_payload: impl Fn(&str),
) -> Result<(), tokio_postgres::Error> {
    use futures::StreamExt;
    let mut pg: tokio_postgres::Config = url.parse()?;
    pg.connect_timeout(Duration::from_secs(3));
    pg.application_name("flowise-proxy-listen");
    pg.keepalives_idle(Duration::from_secs(10));
    let (client, mut conn) = pg.connect(NoTls).await?;
    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
    let keep = async {
        client.batch_execute(&format!("LISTEN {channel}")).await?;
        on_listening();
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            client.simple_query("SELECT 1").await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), tokio_postgres::Error>(())
    };
    let pump = async {
        while let Some(msg) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg? {
                on_payload(n.payload());
            }
        }
        Ok(())
    };
    tokio::select! {
        r = keep => r,
        r = pump => r,
    }
}

/// Waits until the database answers, up to `wait`.
pub async fn wait_for_database(url: &str, wait: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match connect(url).await {
            Ok(c) => match c.simple_query("SELECT 1").await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("database not answering: {}", short_pg_error(&e)))
                }
                Err(_) => {}
            },
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "database unreachable after {}s: {}",
                    wait.as_secs(),
                    short_pg_error(&e)
                ))
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn short_pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    }
}

/// Applies `migrations/` (numbered plain SQL, each once, each in its own
/// transaction). An advisory lock serialises instances that start together.
pub async fn migrate(url: &str) -> Result<Vec<String>, String> {
    let mut client = connect(url)
        .await
        .map_err(|e| format!("migrate: {}", short_pg_error(&e)))?;
    // Arbitrary constant shared by every flowise-proxy instance.
    const LOCK: i64 = 0x0066_6c6f_7769_7365;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK])
        .await
        .map_err(|e| format!("migrate: {}", short_pg_error(&e)))?;
    let result = embedded::migrations::runner()
        .set_migration_table_name("flowise_proxy_migrations")
        .run_async(&mut client)
        .await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK])
        .await;
    let report = result.map_err(|e| match e.kind() {
        // Migrations only go forward, and a schema is not promised to work
        // with the code before it (V10 changed column types): an older
        // binary refuses to run rather than write what the schema rejects.
        refinery::error::Kind::MissingVersion(m) => format!(
            "migrate: the database was migrated by a newer flowise-proxy: it has migration {m}, \
             which this version does not know. Run that version or a later one (migrations only go forward)"
        ),
        _ => format!("migrate: {e}"),
    })?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect())
}

/// Publishes pool usage to the metrics.
pub fn record_pool_metrics(pool: &Pool) {
    let s = pool.status();
    for (label, value) in [
        ("size", s.size),
        ("available", s.available),
        ("waiting", s.waiting),
        ("max", s.max_size),
    ] {
        crate::metrics::DB_POOL
            .with_label_values(&[label])
            .set(value as i64);
    }
}

/// Cheap liveness probe used by `/health`.
pub async fn ping(pool: &Pool) -> bool {
    match tokio::time::timeout(Duration::from_secs(2), pool.get()).await {
        Ok(Ok(c)) => matches!(
            tokio::time::timeout(Duration::from_secs(2), c.simple_query("SELECT 1")).await,
            Ok(Ok(_))
        ),
        _ => false,
    }
}
