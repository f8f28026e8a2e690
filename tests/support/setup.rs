//! A whole test world: a fresh database, a test Flowise, a running proxy, and
//! helpers to create users through the real CLI and log them in.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

use super::flowise::{self, FlowiseConfig, TestFlowise};
use super::pg::{fresh_db, TestDb};
use super::proxy::{self, ProxyOptions, ProxyProcess};

pub struct World {
    pub db: TestDb,
    pub flowise: TestFlowise,
    pub proxy: ProxyProcess,
    pub http: reqwest::Client,
}

impl World {
    pub async fn start() -> World {
        Self::start_with(|o| o).await
    }

    pub async fn start_with(f: impl FnOnce(ProxyOptions) -> ProxyOptions) -> World {
        let db = fresh_db().await;
        let flowise = flowise::start(FlowiseConfig::default()).await;
        let opts = f(ProxyOptions::new(db.url.clone(), flowise.url.clone()));
        let proxy = proxy::start(opts).await;
        let w = World {
            db,
            flowise,
            proxy,
            http: proxy::client(),
        };
        w.wait_catalog().await;
        w
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.proxy.base_url, path)
    }

    /// `method path` on the proxy as `token`, with an optional JSON body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .request(method.clone(), self.url(path))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        req.send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// `GET path` as `token` on the proxy at `base_url` (this world's or
    /// another instance's): its status, 0 when it could not be reached.
    pub async fn status_at(&self, base_url: &str, token: &str, path: &str) -> u16 {
        self.http
            .get(format!("{base_url}{path}"))
            .bearer_auth(token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Polls `GET path` as `token` on `base_url` until it answers `want`,
    /// `limit` at most: whether it did.
    pub async fn answers_within(
        &self,
        limit: Duration,
        base_url: &str,
        token: &str,
        path: &str,
        want: u16,
    ) -> bool {
        super::wait_until(limit, || async {
            self.status_at(base_url, token, path).await == want
        })
        .await
    }

    /// The sum of a metric's series on a proxy's metrics listener (0 when
    /// absent), only those whose labels contain `label` when given.
    pub async fn metric_sum(&self, metrics_url: &str, name: &str, label: Option<&str>) -> f64 {
        let text = self
            .http
            .get(format!("{metrics_url}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|l| {
                l.split(['{', ' ']).next() == Some(name) && label.is_none_or(|lb| l.contains(lb))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// A new API key for `user_id`, made by `admin`: `(id, key)`.
    pub async fn new_api_key(&self, admin: &str, user_id: i64) -> (i64, String) {
        let key: Value = self
            .post_json(
                &format!("/admin/users/{user_id}/api-keys"),
                admin,
                &json!({}),
            )
            .await;
        (
            key["id"].as_i64().expect("key id"),
            key["api_key"].as_str().expect("api key").to_string(),
        )
    }

    /// `GET path` as `token`.
    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.send(reqwest::Method::GET, path, token, None).await
    }

    /// `POST path` with a JSON body, as `token`.
    pub async fn post(&self, path: &str, token: &str, body: &Value) -> reqwest::Response {
        self.send(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    /// `DELETE path` as `token`.
    pub async fn delete(&self, path: &str, token: &str) -> reqwest::Response {
        self.send(reqwest::Method::DELETE, path, token, None).await
    }

    /// `PATCH path` with a JSON body, as `token`.
    pub async fn patch(&self, path: &str, token: &str, body: &Value) -> reqwest::Response {
        self.send(reqwest::Method::PATCH, path, token, Some(body))
            .await
    }

    /// Another proxy instance on the same database, Flowise and JWT secret,
    /// with extra environment from `f`.
    pub async fn second_instance(
        &self,
        f: impl FnOnce(ProxyOptions) -> ProxyOptions,
    ) -> ProxyProcess {
        let opts = ProxyOptions::new(self.db.url.clone(), self.flowise.url.clone())
            .env("JWT_SECRET_KEY", self.proxy.jwt_secret.clone());
        proxy::start(f(opts)).await
    }

    /// `GET path` as `token`: the JSON answer, whatever its status.
    pub async fn get_json(&self, path: &str, token: &str) -> Value {
        json_of(self.get(path, token).await).await
    }

    /// `POST path` as `token`: the JSON answer, whatever its status.
    pub async fn post_json(&self, path: &str, token: &str, body: &Value) -> Value {
        json_of(self.post(path, token, body).await).await
    }

    /// Waits until the proxy has synced the test Flowise's chatflows.
    pub async fn wait_catalog(&self) {
        let c = self.db.client().await;
        let ok = super::wait_until(Duration::from_secs(30), || {
            let c = &c;
            async move {
                c.query_one("SELECT count(*) FROM chatflows", &[])
                    .await
                    .map(|r| r.get::<_, i64>(0) >= 2)
                    .unwrap_or(false)
            }
        })
        .await;
        assert!(ok, "catalogue never synced\n{}", self.proxy.output_dump());
    }

    /// Creates a user through the CLI and returns its id.
    pub fn add_user(&self, name: &str, role: &str, credits: i64) -> i64 {
        add_user(&self.db.url, name, role, credits)
    }

    pub async fn login(&self, name: &str) -> String {
        let r = self
            .http
            .post(self.url("/chat/authenticate"))
            .json(&json!({"username": name, "password": password_of(name)}))
            .send()
            .await
            .expect("authenticate");
        assert_eq!(r.status(), 200, "login of {name}");
        let v: Value = r.json().await.expect("json");
        v["access_token"].as_str().expect("token").to_string()
    }

    /// A user with credits, granted `chatflow`, logged in.
    pub async fn user_with(&self, name: &str, credits: i64, chatflow: &str) -> (i64, String) {
        let id = self.add_user(name, "user", credits);
        self.grant(id, chatflow).await;
        let token = self.login(name).await;
        self.wait_access(&token, chatflow).await;
        (id, token)
    }

    pub async fn grant(&self, user_id: i64, chatflow: &str) {
        let c = self.db.client().await;
        c.execute(
            "INSERT INTO grants (user_id, chatflow_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&user_id, &chatflow],
        )
        .await
        .expect("grant");
    }

    pub async fn balance(&self, user_id: i64) -> (i64, i64) {
        let c = self.db.client().await;
        let r = c
            .query_one(
                "SELECT available, held FROM accounts WHERE user_id = $1",
                &[&user_id],
            )
            .await
            .expect("balance");
        (r.get(0), r.get(1))
    }

    /// The number of `kind` ledger rows of `user_id`.
    pub async fn ledger_rows(&self, user_id: i64, kind: &str) -> i64 {
        self.db
            .client()
            .await
            .query_one(
                "SELECT count(*) FROM ledger WHERE user_id = $1 AND kind::text = $2",
                &[&user_id, &kind],
            )
            .await
            .expect("count ledger rows")
            .get(0)
    }

    /// Σ ledger = balance for every account, and held = Σ open holds.
    pub async fn assert_books_balance(&self) {
        assert_books_balance(&self.db.url).await;
    }

    pub async fn wait_settled(&self, user_id: i64) -> (i64, i64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let b = self.balance(user_id).await;
            if b.1 == 0 {
                return b;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "holds never settled: {b:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `token` may use `chatflow` (the grant reached the snapshot).
    pub async fn wait_access(&self, token: &str, chatflow: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.get(&format!("/chatflows/{chatflow}"), token).await;
            if r.status() == 200 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "grant never took effect"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The body of `r` as JSON (panics, with the status, when it is not).
pub async fn json_of(r: reqwest::Response) -> Value {
    let status = r.status();
    r.json()
        .await
        .unwrap_or_else(|e| panic!("a JSON body with status {status}: {e}"))
}

pub fn password_of(name: &str) -> String {
    format!("pw-{name}-secret")
}

pub fn cli(db_url: &str, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(proxy::proxy_bin())
        .args(args)
        .env("DATABASE_URL", db_url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cli");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().expect("cli output")
}

pub fn add_user(db_url: &str, name: &str, role: &str, credits: i64) -> i64 {
    let credits_s = credits.to_string();
    let out = cli(
        db_url,
        &["user", "add", name, "--role", role, "--credits", &credits_s],
        Some(&format!("{}\n", password_of(name))),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "user add failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "created user NAME (id N, role R)"
    text.split("(id ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("user id in output")
}

pub async fn assert_books_balance(db_url: &str) {
    let out = cli(db_url, &["ledger", "verify"], None);
    assert!(
        out.status.success(),
        "ledger verify failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
