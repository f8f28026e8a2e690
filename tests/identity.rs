//! Identity and access: token attacks, rotation, revocation across instances,
//! admin-only routes, grants.

mod support;

use std::time::Duration;

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use support::flowise::{PEER_TEST_CHATFLOW_ID as FLOW, SECOND_CHATFLOW_ID as FLOW2};
use support::setup::{password_of, World};

async fn status(w: &World, token: &str, method: reqwest::Method, path: &str) -> u16 {
    w.http
        .request(method, w.url(path))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .expect("send")
        .status()
        .as_u16()
}

fn forge(secret: &str, alg: jsonwebtoken::Algorithm, claims: Value) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_attacks_are_refused() {
    let w = World::start().await;
    let (uid, token) = w.user_with("alice", 5, FLOW).await;
    let secret = w.proxy.jwt_secret.clone();
    let now = chrono::Utc::now().timestamp();
    let good = json!({"sub": uid.to_string(), "role": "admin", "jti": uuid::Uuid::new_v4().to_string(),
                      "iat": now, "exp": now + 600, "iss": "flowise-proxy"});
    let mut expired = good.clone();
    expired["exp"] = json!(now - 10);
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("someone-else");
    let header_none = base64_url(r#"{"alg":"none","typ":"JWT"}"#);
    let alg_none = format!("{header_none}.{}.", base64_url(&good.to_string()));
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[1] = base64_url(&good.to_string()); // tampered payload, old signature
    let tampered = parts.join(".");
    let cases = [
        ("alg none", alg_none),
        (
            "wrong key",
            forge(
                "another-secret-that-is-long-enough-123456",
                jsonwebtoken::Algorithm::HS256,
                good.clone(),
            ),
        ),
        (
            "other algorithm",
            forge(&secret, jsonwebtoken::Algorithm::HS512, good.clone()),
        ),
        (
            "expired",
            forge(&secret, jsonwebtoken::Algorithm::HS256, expired),
        ),
        (
            "wrong issuer",
            forge(&secret, jsonwebtoken::Algorithm::HS256, wrong_iss),
        ),
        ("tampered", tampered),
        ("garbage", "not.a.jwt".to_string()),
        ("unknown api key", "fpk_0123456789ab_nope".to_string()),
    ];
    for (name, t) in cases {
        let r = w.get("/chat/credits", &t).await;
        assert_eq!(r.status(), 401, "{name}");
        let v: Value = r.json().await.expect("json");
        assert!(
            ["invalid_token", "token_expired", "unauthorized"]
                .contains(&v["code"].as_str().unwrap_or("")),
            "{name}: {v}"
        );
    }
    let r = w
        .http
        .get(w.url("/chat/credits"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    // The real token works, and carries the current role (user), not a forged one.
    assert_eq!(
        status(&w, &token, reqwest::Method::GET, "/chat/credits").await,
        200
    );
    assert_eq!(
        status(&w, &token, reqwest::Method::GET, "/admin/users").await,
        403
    );
}

fn base64_url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_failures_look_alike_and_are_throttled() {
    let w = World::start_with(|o| o.env("LOGIN_ATTEMPTS_PER_MINUTE", "3")).await;
    w.add_user("bob", "user", 0);
    let attempt = |u: &'static str, p: &'static str| {
        let http = w.http.clone();
        let url = w.url("/chat/authenticate");
        async move {
            let r = http
                .post(url)
                .json(&json!({"username": u, "password": p}))
                .send()
                .await
                .expect("send");
            (r.status().as_u16(), r.text().await.expect("text"))
        }
    };
    let wrong_pw = attempt("bob", "wrong-password").await;
    let no_user = attempt("nobody", "wrong-password").await;
    assert_eq!(wrong_pw.0, 401);
    assert_eq!(wrong_pw, no_user, "failures must be indistinguishable");
    attempt("bob", "wrong-password").await;
    attempt("bob", "wrong-password").await;
    let r = w
        .http
        .post(w.url("/chat/authenticate"))
        .json(&json!({"username": "bob", "password": password_of("bob")}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 429, "throttled even with the right password");
    assert!(r.headers().get("retry-after").is_some());
    let r = w
        .http
        .post(w.url("/chat/authenticate"))
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotates_and_reuse_revokes_the_family() {
    let w = World::start().await;
    w.add_user("carol", "user", 0);
    let r: Value = w
        .http
        .post(w.url("/chat/authenticate"))
        .json(&json!({"username": "carol", "password": password_of("carol")}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let rt1 = r["refresh_token"].as_str().expect("rt").to_string();
    assert_eq!(r["token_type"], "bearer");
    let refresh = |rt: String| {
        let http = w.http.clone();
        let url = w.url("/chat/refresh");
        async move {
            http.post(url)
                .json(&json!({"refresh_token": rt}))
                .send()
                .await
                .expect("send")
        }
    };
    let r2 = refresh(rt1.clone()).await;
    assert_eq!(r2.status(), 200);
    let v: Value = r2.json().await.expect("json");
    let rt2 = v["refresh_token"].as_str().expect("rt2").to_string();
    let at1 = r["access_token"].as_str().expect("at1").to_string();
    let at2 = v["access_token"].as_str().expect("at2").to_string();
    // Another login of the same user: a family of its own.
    let other = w.login("carol").await;
    for t in [&at1, &at2, &other] {
        assert_eq!(w.get("/chat/credits", t).await.status(), 200);
    }
    assert_eq!(
        refresh(rt1.clone()).await.status(),
        401,
        "rotated token reused"
    );
    assert_eq!(
        refresh(rt2).await.status(),
        401,
        "reuse revoked the whole family"
    );
    // The family's access tokens stop working too (whoever stole one of its
    // refresh tokens holds one of them); the other login is untouched.
    assert!(
        support::wait_until(Duration::from_secs(5), || async {
            w.get("/chat/credits", &at1).await.status() == 401
                && w.get("/chat/credits", &at2).await.status() == 401
        })
        .await,
        "access tokens of a reused family still work"
    );
    assert_eq!(w.get("/chat/credits", &other).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_admins_get_403_on_admin_and_other_flowise_paths() {
    let w = World::start().await;
    let (_, token) = w.user_with("dave", 5, FLOW).await;
    use reqwest::Method as M;
    for (m, p) in [
        (M::GET, "/admin/users"),
        (M::POST, "/admin/users"),
        (M::GET, "/admin/users/1"),
        (M::PATCH, "/admin/users/1"),
        (M::DELETE, "/admin/users/1"),
        (M::POST, "/admin/users/1/credits"),
        (M::GET, "/admin/users/1/ledger"),
        (M::POST, "/admin/users/1/api-keys"),
        (M::DELETE, "/admin/api-keys/1"),
        (M::GET, "/admin/chatflows"),
        (M::POST, "/admin/chatflows/sync"),
        (M::PATCH, &format!("/admin/chatflows/{FLOW}")),
        (M::GET, &format!("/admin/chatflows/{FLOW}/users")),
        (M::GET, "/admin/audit"),
        (M::GET, "/api/v1/credentials"),
        (M::GET, "/api/v1/apikey"),
        (M::DELETE, &format!("/api/v1/chatflows/{FLOW}")),
    ] {
        assert_eq!(status(&w, &token, m.clone(), p).await, 403, "{m} {p}");
    }
    // Grants: granted 200, not granted 403, unknown 404.
    assert_eq!(
        status(&w, &token, M::GET, &format!("/chatflows/{FLOW}")).await,
        200
    );
    assert_eq!(
        status(&w, &token, M::GET, &format!("/chatflows/{FLOW2}")).await,
        403
    );
    assert_eq!(
        status(
            &w,
            &token,
            M::GET,
            "/chatflows/00000000-0000-4000-8000-000000000000"
        )
        .await,
        404
    );
    assert_eq!(
        status(&w, &token, M::GET, &format!("/api/v1/chatflows/{FLOW2}")).await,
        403
    );
    let cfg: Value = w
        .get_json(&format!("/chatflows/{FLOW}/config"), &token)
        .await;
    assert!(cfg.get("flowData").is_none(), "flowData must not leak");
    let list: Value = w.get_json("/api/v1/chatflows", &token).await;
    let ids: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(ids, vec![FLOW], "drop-in list cut to grants");
    assert!(list[0].get("flowData").is_some(), "Flowise's own row shape");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_a_second_instance_within_a_second() {
    let w = World::start().await;
    let second = w.second_instance(|o| o).await;
    w.add_user("root", "admin", 0);
    let admin = w.login("root").await;
    let (uid, token) = w.user_with("erin", 5, FLOW).await;
    // API key issued on instance one, used on instance two.
    let key: Value = w
        .post_json(
            &format!("/admin/users/{uid}/api-keys"),
            &admin,
            &json!({"name": "ci"}),
        )
        .await;
    let key = key["api_key"].as_str().expect("api key").to_string();
    let within = |want: u16, token: String, path: String| {
        let (w, two) = (&w, &second.base_url);
        async move {
            w.answers_within(Duration::from_secs(1), two, &token, &path, want)
                .await
        }
    };
    assert!(
        within(200, key.clone(), format!("/chatflows/{FLOW}")).await,
        "key not usable on instance two"
    );
    // Grant removal on one: 403 on two within 1 s.
    let r = w
        .delete(
            &format!("/admin/chatflows/{FLOW}/users?user_id={uid}"),
            &admin,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        within(403, key.clone(), format!("/chatflows/{FLOW}")).await,
        "grant removal not seen in 1 s"
    );
    // Access token revoked on one: 401 on two within 1 s.
    assert!(within(200, token.clone(), "/chat/credits".into()).await);
    let r = w.post("/chat/revoke", &token, &json!({})).await;
    assert_eq!(r.status(), 200);
    assert!(
        within(401, token, "/chat/credits".into()).await,
        "revoked token still works on instance two"
    );
    // Key revoked on one: 401 on two within 1 s.
    let r = w
        .send(
            reqwest::Method::POST,
            &format!("/admin/users/{uid}/api-keys"),
            &admin,
            None,
        )
        .await;
    let key2: Value = r.json().await.expect("json");
    let key2_id = key2["id"].as_i64().expect("id");
    let key2 = key2["api_key"].as_str().expect("key").to_string();
    assert!(within(200, key2.clone(), "/chat/credits".into()).await);
    w.delete(&format!("/admin/api-keys/{key2_id}"), &admin)
        .await;
    assert!(
        within(401, key2, "/chat/credits".into()).await,
        "revoked key still works on instance two"
    );
    // Deactivation: every credential of the user stops working on two.
    w.delete(&format!("/admin/users/{uid}"), &admin).await;
    assert!(
        within(401, key, "/chat/credits".into()).await,
        "deactivated user still in on instance two"
    );
}

/// A grant, a key and a revocation made on instance one are in force on
/// instance two within 1 s as deltas: two re-reads only the changed rows and
/// never reloads the whole identity snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_a_second_instance_as_deltas_without_a_full_reload() {
    const RELOADS: &str = "flowise_proxy_identity_snapshot_reloads_total";
    const ROWS: &str = "flowise_proxy_identity_snapshot_rows_read_total";
    let w = World::start().await;
    w.wait_catalog().await;
    let second = w.second_instance(|o| o).await;
    w.add_user("root", "admin", 0);
    let admin = w.login("root").await;
    let (uid, token) = w.user_with("frank", 5, FLOW).await;
    let within = |want: u16, token: String, path: String| {
        let (w, two) = (&w, &second.base_url);
        async move {
            w.answers_within(Duration::from_secs(1), two, &token, &path, want)
                .await
        }
    };
    // Instance two knows the user (its start-up load or a delta).
    assert!(within(200, token.clone(), format!("/chatflows/{FLOW}")).await);
    assert_eq!(
        w.status_at(&second.base_url, &token, &format!("/chatflows/{FLOW2}"))
            .await,
        403
    );
    let m = &second.metrics_url;
    let full_before = w.metric_sum(m, RELOADS, None).await;
    let full_rows_before = w.metric_sum(m, ROWS, Some("kind=\"full\"")).await;
    let delta_rows_before = w.metric_sum(m, ROWS, Some("kind=\"delta\"")).await;

    // A grant through the admin API on one: in force on two within 1 s.
    let r = w
        .post(
            &format!("/admin/chatflows/{FLOW2}/users"),
            &admin,
            &json!({"user_id": uid}),
        )
        .await;
    assert!(r.status().is_success(), "grant: {}", r.status());
    assert!(
        within(200, token.clone(), format!("/chatflows/{FLOW2}")).await,
        "grant not in force on instance two within 1 s"
    );
    // A new key, then its revocation.
    let (key_id, key) = w.new_api_key(&admin, uid).await;
    assert!(within(200, key.clone(), "/chat/credits".into()).await);
    w.delete(&format!("/admin/api-keys/{key_id}"), &admin).await;
    assert!(
        within(401, key, "/chat/credits".into()).await,
        "revoked key still works on instance two"
    );
    // The grant's removal.
    w.delete(
        &format!("/admin/chatflows/{FLOW2}/users?user_id={uid}"),
        &admin,
    )
    .await;
    assert!(
        within(403, token.clone(), format!("/chatflows/{FLOW2}")).await,
        "grant removal not in force on instance two within 1 s"
    );

    assert_eq!(
        w.metric_sum(m, RELOADS, None).await,
        full_before,
        "instance two reloaded everything for a change of a few rows"
    );
    assert_eq!(
        w.metric_sum(m, ROWS, Some("kind=\"full\"")).await,
        full_rows_before
    );
    let delta_rows = w.metric_sum(m, ROWS, Some("kind=\"delta\"")).await - delta_rows_before;
    assert!(
        (1.0..50.0).contains(&delta_rows),
        "instance two read {delta_rows} rows for four changes"
    );
}

/// The curl commands of the README's "Using the API" block, one per entry,
/// continuation lines joined.
fn readme_curl_commands() -> Vec<String> {
    let readme = include_str!("../README.md");
    let block = readme
        .split("## Using the API")
        .nth(1)
        .and_then(|s| s.split("```sh").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("README.md has a ```sh block under \"## Using the API\"");
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block.lines().map(str::trim) {
        if current.is_empty() && !line.starts_with("curl ") {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    commands
}

/// Runs one README command with bash, `$P` and `$TOKEN` set; its stdout.
async fn run_readme(command: &str, base: &str, token: &str) -> String {
    let (cmd, base, token) = (command.to_string(), base.to_string(), token.to_string());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(cmd)
            .env("P", base)
            .env("TOKEN", token)
            .output()
    })
    .await
    .expect("join")
    .expect("run bash (curl)");
    assert!(out.status.success(), "{command}: {out:?}");
    String::from_utf8(out.stdout).expect("utf8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_curl_flow_works_as_written() {
    let w = World::start().await;
    w.add_user("admin", "admin", 5);
    let cmds = readme_curl_commands();
    let find = |path: &str, with: &str| {
        cmds.iter()
            .find(|c| c.contains(path) && c.contains(with))
            .unwrap_or_else(|| panic!("README has no curl for {path} {with}: {cmds:#?}"))
            .clone()
    };
    let base = w.proxy.base_url.clone();

    let login = find("/chat/authenticate", "password").replace('…', &password_of("admin"));
    let v: Value = serde_json::from_str(&run_readme(&login, &base, "").await).expect("login JSON");
    let token = v["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();
    assert_eq!(v["token_type"], "bearer");
    assert_eq!(v["user"]["username"], "admin");

    let list = run_readme(&find("/chatflows/", "Bearer"), &base, &token).await;
    let list: Value = serde_json::from_str(&list).expect("chatflows JSON");
    let ids: Vec<&str> = list
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert!(ids.contains(&FLOW), "admins see every chatflow: {list}");
    assert!(list[0].get("credit_cost").is_some(), "{list}");

    let predict = find("/chat/predict", "\"question\":\"Hello\"}").replace("CHATFLOW_ID", FLOW);
    let v: Value =
        serde_json::from_str(&run_readme(&predict, &base, &token).await).expect("prediction JSON");
    assert_eq!(v["text"], "MOCK ANSWER: Hello");

    let stream = find("/chat/predict", "\"streaming\":true").replace("CHATFLOW_ID", FLOW);
    let events = run_readme(&stream, &base, &token).await;
    assert!(events.contains("\"event\":\"token\""), "{events}");
    assert!(events.contains("\"event\":\"end\""), "{events}");

    let credits = run_readme(&find("/chat/credits", "Bearer"), &base, &token).await;
    let credits: Value = serde_json::from_str(&credits).expect("credits JSON");
    assert_eq!(credits["credits"], 3, "two predictions at 1: {credits}");

    let revoke = find("/chat/revoke", "all");
    run_readme(&revoke, &base, &token).await;
    assert_eq!(
        w.get("/chatflows/", &token).await.status(),
        401,
        "the revoked token no longer works"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granting_a_chatflow_not_yet_synced_says_what_to_do() {
    let w = World::start().await;
    w.add_user("boss", "admin", 0);
    let admin = w.login("boss").await;
    w.add_user("dora", "user", 0);
    let r = w
        .post(
            &format!(
                "/admin/chatflows/{}/users",
                support::flowise::UNKNOWN_CHATFLOW_ID
            ),
            &admin,
            &json!({"username": "dora"}),
        )
        .await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["code"], "not_found");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or("")
            .contains("/admin/chatflows/sync"),
        "{v}"
    );
}

/// A full reload that runs while changes are committed keeps every one of
/// them. The reload (after a lost LISTEN connection) is held half-way, its
/// read snapshot taken and its API keys read, by a lock on `users`; the
/// transaction holding the lock revokes a key, removes a grant, adds one and
/// deactivates a user, then commits. The reload then installs rows read
/// before those changes: the changes' notifications, come in the meantime,
/// must still be applied after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_reload_in_the_middle_of_changes_keeps_every_change() {
    use futures::FutureExt;
    const RELOADS: &str = "flowise_proxy_identity_snapshot_reloads_total";
    let w = World::start().await;
    let root = w.add_user("root", "admin", 0);
    let admin = w.login("root").await;
    let (erin, erin_token) = w.user_with("erin", 5, FLOW).await;
    let (frank, frank_token) = w.user_with("frank", 5, FLOW).await;
    let (gina, gina_token) = w.user_with("gina", 5, FLOW).await;
    let (_, kept_key) = w.new_api_key(&admin, erin).await;
    let (revoked_key_id, revoked_key) = w.new_api_key(&admin, erin).await;
    let db = w.db.client().await;
    // 100,000 more keys (no notifications: triggers off), so that the
    // reload's API keys come in several parts.
    db.batch_execute(&format!(
        "SET session_replication_role = replica;
         INSERT INTO api_keys (user_id, prefix, secret_hash)
             SELECT {root}, 'pad' || lpad(to_hex(i), 9, '0'), sha256(int4send(i))
             FROM generate_series(1, 100000) i;
         RESET session_replication_role;"
    ))
    .await
    .expect("padding keys");
    let status = |token: String, path: String| {
        let w = &w;
        async move { w.status_at(&w.proxy.base_url, &token, &path).await }
    };
    let flow = format!("/chatflows/{FLOW}");
    let flow2 = format!("/chatflows/{FLOW2}");
    let credits = "/chat/credits".to_string();
    assert_eq!(status(kept_key.clone(), flow.clone()).await, 200);
    assert_eq!(status(revoked_key.clone(), credits.clone()).await, 200);
    assert_eq!(status(frank_token.clone(), flow2.clone()).await, 403);
    assert_eq!(status(gina_token.clone(), credits.clone()).await, 200);
    let m = &w.proxy.metrics_url;
    let reloads_before = w
        .metric_sum(m, RELOADS, Some("trigger=\"reconnect\""))
        .await;

    let locker = w.db.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock users");
    let cut = db
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'flowise-proxy-listen' AND datname = current_database()",
            &[],
        )
        .await
        .expect("terminate the LISTEN connection");
    // The snapshot's and the ledger's (both reconnect).
    assert!(!cut.is_empty(), "no LISTEN connection");
    let reload_waits = support::wait_until(Duration::from_secs(20), || {
        db.query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE 'SELECT id, role, active, tokens_valid_after FROM users%'",
            &[],
        )
        .map(|r| r.map(|r| r.get::<_, i64>(0) == 1).unwrap_or(false))
    })
    .await;
    assert!(
        reload_waits,
        "the full reload never reached users\n{}",
        w.proxy.output_dump()
    );
    // Half-way through: the snapshot still lets a valid key in.
    assert_eq!(status(kept_key.clone(), flow.clone()).await, 200);
    locker
        .batch_execute(&format!(
            "UPDATE api_keys SET revoked_at = now() WHERE id = {revoked_key_id};
             DELETE FROM grants WHERE user_id = {erin} AND chatflow_id = '{FLOW}';
             INSERT INTO grants (user_id, chatflow_id) VALUES ({frank}, '{FLOW2}');
             UPDATE users SET active = false WHERE id = {gina};
             COMMIT"
        ))
        .await
        .expect("changes during the reload");

    let reloaded = support::wait_until(Duration::from_secs(20), || {
        w.metric_sum(m, RELOADS, Some("trigger=\"reconnect\""))
            .map(|n| n > reloads_before)
    })
    .await;
    assert!(reloaded, "no full reload\n{}", w.proxy.output_dump());
    let within = |want: u16, token: String, path: String| {
        let w = &w;
        async move {
            w.answers_within(
                Duration::from_secs(5),
                &w.proxy.base_url,
                &token,
                &path,
                want,
            )
            .await
        }
    };
    assert!(
        within(401, revoked_key, credits.clone()).await,
        "a key revoked during the reload still works after it"
    );
    assert!(
        within(403, kept_key, flow).await,
        "a grant removed during the reload still in force after it"
    );
    assert!(
        within(200, frank_token, flow2).await,
        "a grant added during the reload not in force after it"
    );
    assert!(
        within(401, gina_token, credits).await,
        "a user deactivated during the reload still in after it"
    );
    assert_eq!(status(erin_token, "/chat/credits".into()).await, 200);
}
