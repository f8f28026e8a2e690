//! The real `flowise-proxy` binary on free ports.
//!
//! ```ignore
//! let db = support::pg::fresh_db().await;
//! let flowise = support::flowise::start(Default::default()).await;
//! let proxy = support::proxy::start(ProxyOptions::new(&db.url, &flowise.url)).await;
//! let resp = support::proxy::client().get(format!("{}/", proxy.base_url)).send().await;
//! ```
//!
//! Zero-downtime upgrade, in this order:
//!
//! ```ignore
//! let new = old.start_upgrade().await;   // spawns `serve -c <same conf> -u`, same env and
//!                                        // port; returns once it listens on upgrade_sock
//! old.sigquit();                         // old hands its listening sockets over
//! assert!(new.wait_ready(Duration::from_secs(30)).await);
//! assert!(old.wait_exit(Duration::from_secs(60)).await.is_some());
//! ```
//!
//! Pingora's new process waits about 5 s (5 tries, 1 s apart) for the
//! sockets, and the old one tries about 5 s to hand them over, so send the
//! SIGQUIT promptly after `start_upgrade` returns.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;

/// How to start the proxy.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    pub database_url: String,
    /// Joined with `,` into FLOWISE_API_URL.
    pub flowise_urls: Vec<String>,
    pub flowise_api_key: String,
    /// Extra environment, applied last (overrides the defaults).
    pub env: Vec<(String, String)>,
    pub grace_period_seconds: u64,
}

impl ProxyOptions {
    /// One Flowise, key `test-flowise-key`, grace period 30 s, no extra env.
    pub fn new(database_url: impl Into<String>, flowise_url: impl Into<String>) -> Self {
        ProxyOptions {
            database_url: database_url.into(),
            flowise_urls: vec![flowise_url.into()],
            flowise_api_key: super::flowise::DEFAULT_API_KEY.to_string(),
            env: Vec::new(),
            grace_period_seconds: 30,
        }
    }

    /// Adds one environment variable (builder style).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A reqwest client for tests: no proxy, connect timeout 5 s, overall 60 s.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("build the test reqwest client")
}

/// Like [`client`] but without an overall timeout (for long streams): connect
/// timeout 5 s, at most 60 s between two reads.
pub fn streaming_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(60))
        .build()
        .expect("build the streaming reqwest client")
}

/// What both processes of an upgrade share.
struct Launch {
    dir: tempfile::TempDir,
    conf_path: PathBuf,
    upgrade_sock: PathBuf,
    env: Vec<(String, String)>,
}

/// A running `flowise-proxy serve`. Drop sends SIGKILL and reaps it.
pub struct ProxyProcess {
    /// `http://127.0.0.1:PORT`
    pub base_url: String,
    /// `http://127.0.0.1:METRICS_PORT` (append `/metrics`).
    pub metrics_url: String,
    pub port: u16,
    pub metrics_port: u16,
    /// JWT_SECRET_KEY given to the process (48 alphanumerics).
    pub jwt_secret: String,
    pid: u32,
    child: Mutex<Child>,
    status: Mutex<Option<ExitStatus>>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Reader threads that reached EOF (0..=2).
    readers_done: Arc<AtomicUsize>,
    stdout_paused: Arc<std::sync::atomic::AtomicBool>,
    launch: Arc<Launch>,
}

/// Starts the proxy and waits (60 s) until `GET /` answers 200. Retries with
/// new ports (3 attempts) if the process exits early or its port is taken;
/// then panics with the captured output.
pub async fn start(opts: ProxyOptions) -> ProxyProcess {
    let mut failures = Vec::new();
    for attempt in 1..=3 {
        let port = super::free_port();
        let mut metrics_port = super::free_port();
        while metrics_port == port {
            metrics_port = super::free_port();
        }
        let jwt_secret: String = rand::thread_rng()
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(48)
            .map(char::from)
            .collect();
        let dir = tempfile::Builder::new()
            .prefix("fp-proxy-")
            .tempdir()
            .expect("create a temp dir for the proxy conf");
        let conf_path = dir.path().join("pingora.yaml");
        let upgrade_sock = dir.path().join("upgrade.sock");
        let conf = format!(
            "---\nversion: 1\nthreads: 2\nwork_stealing: false\npid_file: {}\nupgrade_sock: {}\n\
             grace_period_seconds: {}\ngraceful_shutdown_timeout_seconds: 2\n",
            dir.path().join("proxy.pid").display(),
            upgrade_sock.display(),
            opts.grace_period_seconds
        );
        std::fs::write(&conf_path, conf).expect("write the proxy conf");
        let mut env: Vec<(String, String)> = vec![
            ("HOST".into(), "127.0.0.1".into()),
            ("PORT".into(), port.to_string()),
            ("METRICS_ADDR".into(), format!("127.0.0.1:{metrics_port}")),
            ("DATABASE_URL".into(), opts.database_url.clone()),
            ("FLOWISE_API_URL".into(), opts.flowise_urls.join(",")),
            ("FLOWISE_API_KEY".into(), opts.flowise_api_key.clone()),
            ("JWT_SECRET_KEY".into(), jwt_secret.clone()),
            ("LOG_FORMAT".into(), "json".into()),
            ("RUST_LOG".into(), "info".into()),
            // Tests read balances from the database once the answers are in:
            // leases unused for 300 ms are closed, so that `held` is back to
            // the running predictions' holds promptly (the default is 5 s).
            ("CREDIT_LEASE_IDLE_MS".into(), "300".into()),
        ];
        env.extend(opts.env.iter().cloned());
        let launch = Arc::new(Launch {
            dir,
            conf_path,
            upgrade_sock,
            env,
        });
        let proc = spawn_process(launch, false, port, metrics_port, jwt_secret);

        let deadline = Instant::now() + Duration::from_secs(60);
        let http = client();
        loop {
            if let Some(status) = proc.try_status() {
                proc.wait_output_complete(Duration::from_secs(2)).await;
                failures.push(format!(
                    "attempt {attempt}: exited before serving ({status})\n{}",
                    proc.output_dump()
                ));
                break;
            }
            if proc.port_taken() {
                failures.push(format!(
                    "attempt {attempt}: port taken\n{}",
                    proc.output_dump()
                ));
                break;
            }
            // The 200 must come from this process: a port picked free can
            // be taken by another test's server before the proxy binds it.
            if is_ready(&http, &proc.base_url).await && listens_on(proc.pid, port) {
                return proc;
            }
            if Instant::now() >= deadline {
                panic!(
                    "flowise-proxy did not answer 200 on {}/ within 60 s\n{}",
                    proc.base_url,
                    proc.output_dump()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(proc);
    }
    panic!(
        "flowise-proxy failed to start 3 times:\n{}",
        failures.join("\n----\n")
    );
}

/// Whether process `pid` holds a socket listening on `port` (Linux:
/// /proc/net/tcp gives the listening socket's inode, /proc/PID/fd its owner).
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return true; // no procfs: trust the answer
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let listening = *f.get(3)? == "0A";
            let inode = f.get(9)?;
            (local_port == port && listening).then(|| format!("socket:[{inode}]"))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
            .unwrap_or(false)
    })
}

async fn is_ready(http: &reqwest::Client, base_url: &str) -> bool {
    let req = http
        .get(format!("{base_url}/"))
        .timeout(Duration::from_secs(2))
        .send();
    matches!(req.await, Ok(r) if r.status() == 200)
}

impl ProxyProcess {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Stops (true) or resumes reading the proxy's stdout, as a stalled log
    /// collector would: the pipe fills and the proxy's writes would block.
    pub fn pause_stdout(&self, paused: bool) {
        self.stdout_paused.store(paused, Ordering::SeqCst);
    }

    /// Captured stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().expect("stdout lines mutex").clone()
    }

    /// Captured stderr lines so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().expect("stderr lines mutex").clone()
    }

    /// Captured stderr lines so far that contain `text`.
    pub fn stderr_lines_containing(&self, text: &str) -> Vec<String> {
        self.stderr
            .lock()
            .expect("stderr lines mutex")
            .iter()
            .filter(|l| l.contains(text))
            .cloned()
            .collect()
    }

    /// Path of the Pingora YAML conf.
    pub fn conf_path(&self) -> PathBuf {
        self.launch.conf_path.clone()
    }

    /// The temp dir holding conf, pid file and upgrade socket.
    pub fn dir(&self) -> PathBuf {
        self.launch.dir.path().to_path_buf()
    }

    pub fn sigterm(&self) {
        self.signal(Signal::SIGTERM);
    }

    pub fn sigquit(&self) {
        self.signal(Signal::SIGQUIT);
    }

    pub fn sigint(&self) {
        self.signal(Signal::SIGINT);
    }

    pub fn kill9(&self) {
        self.signal(Signal::SIGKILL);
    }

    fn signal(&self, sig: Signal) {
        if self.try_status().is_some() {
            return;
        }
        if let Err(e) = kill(Pid::from_raw(self.pid as i32), sig) {
            eprintln!("[support::proxy] kill({}, {sig:?}): {e}", self.pid);
        }
    }

    /// The exit status if the process has exited (reaps it).
    pub fn try_status(&self) -> Option<ExitStatus> {
        let mut status = self.status.lock().expect("status mutex");
        if status.is_none() {
            if let Ok(Some(s)) = self.child.lock().expect("child mutex").try_wait() {
                *status = Some(s);
            }
        }
        *status
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to `timeout` for a stdout line matching `pred`.
    pub async fn wait_for_stdout(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> bool {
        wait_lines(&self.stdout, pred, timeout).await
    }

    /// Waits up to `timeout` for a stderr line matching `pred`.
    pub async fn wait_for_stderr(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> bool {
        wait_lines(&self.stderr, pred, timeout).await
    }

    /// Polls `GET /` until 200 (while the process runs) or `timeout`. Note:
    /// during an upgrade the old process may still answer on the same port.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let http = client();
        let deadline = Instant::now() + timeout;
        loop {
            if self.try_status().is_some() {
                return false;
            }
            if is_ready(&http, &self.base_url).await {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Spawns the same binary with the same conf, env and ports plus `-u`,
    /// and waits (up to 15 s) until it has created the upgrade socket (or
    /// exited). Does not wait for `/`: send [`sigquit`](Self::sigquit) to
    /// `self` next, then [`wait_ready`](Self::wait_ready) on the new one.
    pub async fn start_upgrade(&self) -> ProxyProcess {
        let sock = self.launch.upgrade_sock.clone();
        let _ = std::fs::remove_file(&sock);
        let new = spawn_process(
            self.launch.clone(),
            true,
            self.port,
            self.metrics_port,
            self.jwt_secret.clone(),
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if sock.exists() || new.try_status().is_some() {
                break;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "[support::proxy] the upgrading process did not create {} within 15 s",
                    sock.display()
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        new
    }

    /// After the process exited: waits (bounded) until its stdout and stderr
    /// have been read to the end.
    pub async fn wait_output_complete(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.readers_done.load(Ordering::SeqCst) < 2 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// All captured output, for panic messages.
    pub fn output_dump(&self) -> String {
        format!(
            "--- stdout ({}) ---\n{}\n--- stderr ---\n{}",
            self.pid,
            self.stdout_lines().join("\n"),
            self.stderr_lines().join("\n")
        )
    }

    fn port_taken(&self) -> bool {
        let taken = |lines: &[String]| {
            lines.iter().any(|l| {
                let l = l.to_ascii_lowercase();
                // Pingora 0.9 says "<addr> is in use, will try again".
                l.contains("address already in use")
                    || l.contains("addrinuse")
                    || l.contains("is in use")
            })
        };
        taken(&self.stdout_lines()) || taken(&self.stderr_lines())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_lines(
    lines: &Arc<Mutex<Vec<String>>>,
    pred: impl Fn(&str) -> bool,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if lines
            .lock()
            .expect("output lines mutex")
            .iter()
            .any(|l| pred(l))
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn_process(
    launch: Arc<Launch>,
    upgrade: bool,
    port: u16,
    metrics_port: u16,
    jwt_secret: String,
) -> ProxyProcess {
    let mut cmd = Command::new(proxy_bin());
    cmd.arg("serve").arg("-c").arg(&launch.conf_path);
    if upgrade {
        cmd.arg("-u");
    }
    cmd.envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(launch.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_with_parent_death_signal(cmd);
    let pid = child.id();
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let readers_done = Arc::new(AtomicUsize::new(0));
    let tag = if upgrade { "proxy-u" } else { "proxy" };
    let stdout_paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    match child.stdout.take() {
        Some(out) => read_lines(
            out,
            stdout.clone(),
            format!("[{tag} {pid} out]"),
            readers_done.clone(),
            stdout_paused.clone(),
        ),
        None => {
            readers_done.fetch_add(1, Ordering::SeqCst);
        }
    }
    match child.stderr.take() {
        Some(err) => read_lines(
            err,
            stderr.clone(),
            format!("[{tag} {pid} err]"),
            readers_done.clone(),
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        ),
        None => {
            readers_done.fetch_add(1, Ordering::SeqCst);
        }
    }
    ProxyProcess {
        base_url: format!("http://127.0.0.1:{port}"),
        metrics_url: format!("http://127.0.0.1:{metrics_port}"),
        port,
        metrics_port,
        jwt_secret,
        pid,
        child: Mutex::new(child),
        status: Mutex::new(None),
        stdout,
        stderr,
        readers_done,
        stdout_paused,
        launch,
    }
}

fn read_lines(
    stream: impl Read + Send + 'static,
    sink: Arc<Mutex<Vec<String>>>,
    prefix: String,
    done: Arc<AtomicUsize>,
    paused: Arc<std::sync::atomic::AtomicBool>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            // A stalled reader of the proxy's output (see `pause_stdout`).
            while paused.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    eprintln!("{prefix} {line}");
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            }
        }
        done.fetch_add(1, Ordering::SeqCst);
    });
}

/// The binary to run: `FLOWISE_PROXY_BIN` if set (e.g. a release build),
/// else the one cargo built for these tests.
pub fn proxy_bin() -> String {
    std::env::var("FLOWISE_PROXY_BIN")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_flowise-proxy").to_string())
}

type SpawnJob = (Command, std_mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from one long-lived thread with PR_SET_PDEATHSIG=SIGKILL, so
/// the proxy dies with the test process even if Drop never runs (the signal
/// fires when the spawning *thread* exits, hence the dedicated thread).
fn spawn_with_parent_death_signal(cmd: Command) -> Child {
    static SPAWNER: OnceLock<Mutex<std_mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("proxy-spawner".into())
            .spawn(move || {
                use std::os::unix::process::CommandExt;
                for (mut cmd, reply) in rx {
                    let parent = std::process::id();
                    // SAFETY: only async-signal-safe calls (prctl, getppid)
                    // between fork and exec.
                    unsafe {
                        cmd.pre_exec(move || {
                            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                            if nix::unistd::getppid().as_raw() as u32 != parent {
                                return Err(std::io::Error::other("parent already gone"));
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the proxy-spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = std_mpsc::channel();
    spawner
        .lock()
        .expect("proxy-spawner mutex")
        .send((cmd, reply_tx))
        .expect("send a spawn job to the proxy-spawner thread");
    reply_rx
        .recv()
        .expect("the proxy-spawner thread answered")
        .unwrap_or_else(|e| panic!("spawning {}: {e}", proxy_bin()))
}
