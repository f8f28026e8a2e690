//! A Flowise that rejects FLOWISE_API_KEY is named as such (issue 11, point 4):
//! in `/health` (its own state, not "unreachable"), in the log, and in the
//! error of `POST /admin/chatflows/sync`; and it clears once Flowise accepts
//! the key. Flowise being down stays "unreachable".

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::flowise::{self, FlowiseConfig, DEFAULT_API_KEY};
use support::proxy::{self, ProxyOptions, ProxyProcess};
use support::setup::{add_user, password_of};

/// Polls `/health` until `pred` holds for (status, body); returns the last answer.
async fn health_until(
    proxy: &ProxyProcess,
    pred: impl Fn(u16, &Value) -> bool,
) -> Option<(u16, Value)> {
    let http = proxy::client();
    let url = format!("{}/health", proxy.base_url);
    let last = std::sync::Mutex::new(None);
    let ok = support::wait_until(Duration::from_secs(30), || {
        let (http, url, last, pred) = (&http, &url, &last, &pred);
        async move {
            let Ok(r) = http.get(url).send().await else {
                return false;
            };
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            let hit = pred(status, &body);
            *last.lock().expect("last") = Some((status, body));
            hit
        }
    })
    .await;
    let last = last.into_inner().expect("last");
    if ok {
        last
    } else {
        panic!(
            "/health never matched; last {last:?}\n{}",
            proxy.output_dump()
        )
    }
}

async fn admin_token(proxy: &ProxyProcess, db_url: &str) -> String {
    add_user(db_url, "keyadmin", "admin", 0);
    let http = proxy::client();
    let token = std::sync::Mutex::new(None);
    // A user just created is in force on its first request; retry a little anyway.
    support::wait_until(Duration::from_secs(10), || {
        let (http, token) = (&http, &token);
        async move {
            let r = http
                .post(format!("{}/chat/authenticate", proxy.base_url))
                .json(&json!({"username": "keyadmin", "password": password_of("keyadmin")}))
                .send()
                .await;
            let Ok(r) = r else { return false };
            if r.status() != 200 {
                return false;
            }
            let v: Value = r.json().await.unwrap_or(Value::Null);
            let found = v["access_token"].as_str().map(str::to_string);
            let hit = found.is_some();
            *token.lock().expect("token") = found;
            hit
        }
    })
    .await;
    let token = token.into_inner().expect("token");
    token.expect("admin login")
}

async fn sync(proxy: &ProxyProcess, token: &str) -> (u16, Value) {
    let r = proxy::client()
        .post(format!("{}/admin/chatflows/sync", proxy.base_url))
        .bearer_auth(token)
        .send()
        .await
        .expect("POST /admin/chatflows/sync");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON answer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_is_named_in_health_log_and_sync() {
    let db = support::pg::fresh_db().await;
    let flowise = flowise::start(FlowiseConfig::default()).await;
    flowise.set_reject_key(true);
    let proxy = proxy::start(ProxyOptions::new(&db.url, &flowise.url)).await;

    let (status, body) = health_until(&proxy, |_, b| b["flowise"] == "key_rejected")
        .await
        .expect("health answer");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unhealthy", "{body}");
    assert_eq!(body["database"], "ok", "{body}");
    assert!(
        proxy
            .wait_for_stderr(
                |l| l.contains("Flowise rejected FLOWISE_API_KEY"),
                Duration::from_secs(10)
            )
            .await,
        "no log line names the key\n{}",
        proxy.output_dump()
    );

    let token = admin_token(&proxy, &db.url).await;
    let (status, body) = sync(&proxy, &token).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "flowise_key_rejected", "{body}");
    let detail = body["detail"].as_str().expect("detail");
    assert!(
        detail.contains("Flowise rejected FLOWISE_API_KEY"),
        "{detail}"
    );
    assert!(
        !detail.contains(DEFAULT_API_KEY),
        "the key leaked: {detail}"
    );
    for line in proxy.stderr_lines().iter().chain(&proxy.stdout_lines()) {
        assert!(!line.contains(DEFAULT_API_KEY), "the key leaked: {line}");
    }

    // The operator fixes the key on Flowise's side: the next sync clears it.
    flowise.set_reject_key(false);
    let (status, body) = sync(&proxy, &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["synced"], 2, "{body}");
    let (status, body) = health_until(&proxy, |s, _| s == 200)
        .await
        .expect("health answer");
    assert_eq!(body["flowise"], "ok", "{body}");
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_flowise_is_not_called_a_key_problem() {
    let db = support::pg::fresh_db().await;
    // Nothing listens there (a test Flowise started and stopped).
    let gone = flowise::start(FlowiseConfig::default()).await;
    let url = gone.url.clone();
    drop(gone);
    let proxy = proxy::start(ProxyOptions::new(&db.url, &url)).await;

    let (status, body) = health_until(&proxy, |_, b| b["flowise"] == "unreachable")
        .await
        .expect("health answer");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["flowise_servers"]["healthy"], 0, "{body}");

    let token = admin_token(&proxy, &db.url).await;
    let (status, body) = sync(&proxy, &token).await;
    assert_ne!(body["code"], "flowise_key_rejected", "{body}");
    assert!(
        status == 502 || status == 503 || status == 504,
        "{status} {body}"
    );
    let (_, body) = health_until(&proxy, |_, _| true)
        .await
        .expect("health answer");
    assert_eq!(body["flowise"], "unreachable", "{body}");
    assert!(
        !proxy
            .stderr_lines()
            .iter()
            .any(|l| l.contains("rejected FLOWISE_API_KEY")),
        "{}",
        proxy.output_dump()
    );
}
