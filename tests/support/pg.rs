//! PostgreSQL for tests.
//!
//! [`fresh_db`] gives every test its own database (`fp_test_<hex>`), dropped
//! again when the [`TestDb`] is dropped. The server is chosen once per test
//! process:
//!
//! 1. `TEST_DATABASE_URL` (a `postgresql://user[:pass]@host:port/db` URL of a
//!    role that may `CREATE DATABASE`), if set;
//! 2. else `postgresql://postgres@127.0.0.1:5432/postgres` if it answers
//!    within 2 s;
//! 3. else a [`PrivateCluster`] started for this process. It lives in a temp
//!    dir and is stopped (and its dir removed) by a small watchdog shell
//!    process when the test process exits, however it exits;
//!    (`TEST_PG_PRIVATE=1` skips step 2 and forces this.)
//! 4. else a panic: "no PostgreSQL: set TEST_DATABASE_URL or install
//!    PostgreSQL server binaries (initdb, pg_ctl)".
//!
//! Tests that need to stop the database (outage tests) start their own
//! [`PrivateCluster`] and never touch the shared server except to create and
//! drop their own databases.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio_postgres::NoTls;

const SHARED_URL: &str = "postgresql://postgres@127.0.0.1:5432/postgres";
const NO_PG: &str =
    "no PostgreSQL: set TEST_DATABASE_URL or install PostgreSQL server binaries (initdb, pg_ctl)";

enum Server {
    Url(String),
    Private(Box<PrivateCluster>),
}

impl Server {
    fn admin_url(&self) -> String {
        match self {
            Server::Url(u) => u.clone(),
            Server::Private(c) => c.url("postgres"),
        }
    }
}

static SERVER: OnceCell<Server> = OnceCell::const_new();

async fn server() -> &'static Server {
    SERVER
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
                if !url.trim().is_empty() {
                    return Server::Url(url);
                }
            }
            let force_private = std::env::var("TEST_PG_PRIVATE").is_ok_and(|v| v == "1");
            if !force_private && answers(SHARED_URL, Duration::from_secs(2)).await {
                return Server::Url(SHARED_URL.to_string());
            }
            match tokio::task::spawn_blocking(PrivateCluster::try_start)
                .await
                .expect("PrivateCluster::try_start task panicked")
            {
                Ok(c) => {
                    eprintln!(
                        "[support::pg] using a private cluster at {}",
                        c.url("postgres")
                    );
                    Server::Private(Box::new(c))
                }
                Err(StartError::NoBinaries) => panic!("{NO_PG}"),
                Err(StartError::Failed(msg)) => {
                    panic!("{NO_PG} (a private cluster failed to start: {msg})")
                }
            }
        })
        .await
}

/// The URL of the maintenance database (`postgres` or TEST_DATABASE_URL's db)
/// of the server chosen for this test process.
pub async fn admin_url() -> String {
    server().await.admin_url()
}

/// Whether a connection to `url` and `SELECT 1` succeed within `timeout`.
pub async fn answers(url: &str, timeout: Duration) -> bool {
    let attempt = async {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await.ok()?;
        let task = tokio::spawn(conn);
        let ok = client.simple_query("SELECT 1").await.is_ok();
        drop(client);
        task.abort();
        Some(ok)
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// Connects to `url` and spawns the connection task on the current runtime.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) =
        tokio::time::timeout(Duration::from_secs(30), tokio_postgres::connect(url, NoTls))
            .await
            .unwrap_or_else(|_| panic!("connecting to {url} timed out after 30 s"))
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Replaces the database name in a `postgresql://` URL.
pub fn url_with_db(url: &str, db: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .unwrap_or_else(|| panic!("database URL {url:?} is not a postgresql:// URL"));
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let tail = &rest[authority_end..];
    let query = tail.find('?').map(|i| &tail[i..]).unwrap_or("");
    format!("{scheme}://{authority}/{db}{query}")
}

/// Whether a database of that name exists on the chosen server.
pub async fn db_exists(name: &str) -> bool {
    let client = connect(&admin_url().await).await;
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .expect("query pg_database");
    row.get::<_, i64>(0) > 0
}

/// A database of its own for one test. Dropped (`WITH (FORCE)`) on Drop.
pub struct TestDb {
    /// URL of this database (same server and role as the admin URL).
    pub url: String,
    /// `fp_test_<16 hex>`.
    pub name: String,
    admin_url: String,
}

/// Creates a fresh, empty, uniquely named database.
pub async fn fresh_db() -> TestDb {
    let admin_url = admin_url().await;
    let name = format!("fp_test_{}", super::random_hex(16));
    let client = connect(&admin_url).await;
    let sql = format!("CREATE DATABASE \"{name}\"");
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.batch_execute(&sql).await {
            Ok(()) => break,
            // Concurrent CREATE DATABASE from template1 can collide briefly.
            Err(e) if attempt < 20 && e.to_string().contains("being accessed by other users") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("CREATE DATABASE {name} on {admin_url}: {e}"),
        }
    }
    TestDb {
        url: url_with_db(&admin_url, &name),
        name,
        admin_url,
    }
}

impl TestDb {
    /// A connected client (connection task spawned on the current runtime).
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// URL of the server's maintenance database.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        let result = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("building a runtime: {e}"))?;
            rt.block_on(async move {
                let work = async {
                    let (client, conn) = tokio_postgres::connect(&admin, NoTls)
                        .await
                        .map_err(|e| format!("connecting to {admin}: {e}"))?;
                    let task = tokio::spawn(conn);
                    let r = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .await
                        .map_err(|e| format!("DROP DATABASE {name}: {e}"));
                    drop(client);
                    let _ = task.await;
                    r
                };
                tokio::time::timeout(Duration::from_secs(60), work)
                    .await
                    .map_err(|_| format!("dropping database {name} timed out"))?
            })
        })
        .join();
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("[support::pg] warning: {e}"),
            Err(_) => eprintln!("[support::pg] warning: the drop thread panicked"),
        }
    }
}

// ---------------------------------------------------------------------------
// Private cluster
// ---------------------------------------------------------------------------

#[derive(Debug)]
enum StartError {
    NoBinaries,
    Failed(String),
}

/// A PostgreSQL cluster of its own: initdb into a temp dir, listening on
/// 127.0.0.1:<free port> only, unix socket inside the temp dir, `fsync=off`,
/// trust auth, superuser `postgres`. When the test process runs as root, the
/// binaries run as the `postgres` user via `runuser` and the temp dir is
/// chowned to it.
///
/// `stop`/`start_again` are blocking (they wait for `pg_ctl -w`, about a
/// second): in a test, call them as
/// `tokio::task::block_in_place(|| cluster.stop())`. Drop stops the cluster and
/// removes the dir; a watchdog process does the same if the test process dies
/// without running Drop.
pub struct PrivateCluster {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
    as_postgres: bool,
    watchdog: Mutex<Option<(Child, ChildStdin)>>,
}

impl PrivateCluster {
    /// initdb + start. Panics with a clear message if it cannot.
    pub async fn start() -> PrivateCluster {
        match tokio::task::spawn_blocking(Self::try_start)
            .await
            .expect("PrivateCluster::try_start task panicked")
        {
            Ok(c) => c,
            Err(StartError::NoBinaries) => panic!("{NO_PG}"),
            Err(StartError::Failed(m)) => panic!("starting a private PostgreSQL cluster: {m}"),
        }
    }

    /// Whether initdb and pg_ctl can be found.
    pub fn binaries_available() -> bool {
        find_bin_dir().is_some()
    }

    fn try_start() -> Result<PrivateCluster, StartError> {
        let bin_dir = find_bin_dir().ok_or(StartError::NoBinaries)?;
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("fp-pgcluster-")
            .tempdir()
            .map_err(|e| StartError::Failed(format!("creating a temp dir: {e}")))?;
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock)
            .map_err(|e| StartError::Failed(format!("creating {}: {e}", sock.display())))?;
        if as_postgres {
            let (uid, gid) = postgres_ids().map_err(StartError::Failed)?;
            for p in [dir.path(), sock.as_path()] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|e| {
                    StartError::Failed(format!("chown {} to postgres: {e}", p.display()))
                })?;
            }
        }
        let mut cluster = PrivateCluster {
            port: 0,
            dir,
            bin_dir,
            as_postgres,
            watchdog: Mutex::new(None),
        };
        let data = cluster.data_dir();
        let out = cluster
            .pg_command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale"])
            .arg("--no-sync")
            .output()
            .map_err(|e| StartError::Failed(format!("running initdb: {e}")))?;
        if !out.status.success() {
            return Err(StartError::Failed(format!(
                "initdb failed: {}",
                describe_output(&out)
            )));
        }
        // fsync off is safe for the tests' outages (an immediate stop is a
        // server crash, not an OS crash); synchronous_commit stays on, or a
        // commit acknowledged just before the stop would be lost.
        let base_conf = format!(
            "\n# flowise-proxy tests\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nfull_page_writes = off\nmax_connections = 200\n\
             shared_buffers = 32MB\n",
            sock.display()
        );
        append_file(&data.join("postgresql.conf"), &base_conf).map_err(StartError::Failed)?;
        cluster.start_watchdog().map_err(StartError::Failed)?;

        let mut last_err = String::new();
        for _ in 0..4 {
            let port = super::free_port();
            append_file(&data.join("postgresql.conf"), &format!("port = {port}\n"))
                .map_err(StartError::Failed)?;
            cluster.port = port;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    last_err = e;
                    let log = std::fs::read_to_string(cluster.log_file()).unwrap_or_default();
                    if !(log.contains("could not bind") || log.contains("already in use")) {
                        break;
                    }
                }
            }
        }
        Err(StartError::Failed(last_err))
    }

    /// `postgresql://postgres@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// `pg_ctl -m immediate stop` (blocking). Connections fail afterwards.
    pub fn stop(&self) {
        let out = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "-t", "60", "stop"])
            .output()
            .expect("running pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            describe_output(&out)
        );
    }

    /// Starts the stopped cluster again, same port and data dir (blocking).
    pub fn start_again(&self) {
        let mut last = String::new();
        for _ in 0..3 {
            match self.pg_ctl_start() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("starting the private cluster again failed: {last}");
    }

    /// Whether the postmaster is running (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        self.pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("status")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let out = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file())
            .args(["-w", "-t", "60", "start"])
            .output()
            .map_err(|e| format!("running pg_ctl start: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(format!(
                "pg_ctl start failed: {}\nserver log tail:\n{}",
                describe_output(&out),
                tail.join("\n")
            ))
        }
    }

    fn pg_command(&self, prog: &str) -> Command {
        let bin = self.bin_dir.join(prog);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        cmd.current_dir(self.dir.path())
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .stdin(Stdio::null());
        cmd
    }

    /// A `sh` that waits for EOF on its stdin (held by us, closed when this
    /// process exits in any way), then stops the cluster and removes its dir.
    fn start_watchdog(&self) -> Result<(), String> {
        use std::os::unix::process::CommandExt;
        let runas = if self.as_postgres {
            "runuser -u postgres --"
        } else {
            ""
        };
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(
                "cat >/dev/null; $FP_RUNAS \"$FP_PG_CTL\" -D \"$FP_DATA\" -m immediate -w stop; \
                 rm -rf \"$FP_DIR\"",
            )
            .env("FP_RUNAS", runas)
            .env("FP_PG_CTL", self.bin_dir.join("pg_ctl"))
            .env("FP_DATA", self.data_dir())
            .env("FP_DIR", self.dir.path())
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Not in our process group: a Ctrl-C must not kill it before it
            // has stopped the cluster.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawning the cluster watchdog: {e}"))?;
        let stdin = child.stdin.take().ok_or("the watchdog has no stdin pipe")?;
        *self.watchdog.lock().expect("watchdog mutex") = Some((child, stdin));
        Ok(())
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if self.port != 0 {
            let _ = self
                .pg_command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let watchdog = self.watchdog.lock().map(|mut w| w.take()).unwrap_or(None);
        if let Some((mut child, stdin)) = watchdog {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

fn describe_output(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

fn append_file(path: &Path, text: &str) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// A directory holding both `initdb` and `pg_ctl`: first in PATH, else the
/// newest `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir() -> Option<PathBuf> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has_both(&d) {
                return Some(d);
            }
        }
    }
    let mut versions: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let key: Vec<u64> = name.split('.').filter_map(|p| p.parse().ok()).collect();
            let bin = e.path().join("bin");
            (!key.is_empty() && has_both(&bin)).then_some((key, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

/// Effective uid 0? Read from /proc/self/status (Linux).
fn is_root() -> bool {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            // Uid: real effective saved fs
            if let Some(euid) = line.split_whitespace().nth(2) {
                return euid == "0";
            }
        }
    }
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn postgres_ids() -> Result<(u32, u32), String> {
    let id = |flag: &str| -> Result<u32, String> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| format!("running id {flag} postgres: {e}"))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                "running as root, but there is no `postgres` user to run initdb/pg_ctl as"
                    .to_string()
            })
    };
    Ok((id("-u")?, id("-g")?))
}
