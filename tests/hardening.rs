//! Holes found by attacking the proxy (issue 9): ownership and identity across
//! instances, login throttling, token rules, bad input, small leaks of order.

mod support;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use support::flowise::PEER_TEST_CHATFLOW_ID as FLOW;
use support::setup::World;

/// `method base+path` as `token` with an optional JSON body: (status, JSON or Null).
async fn call(
    http: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = http
        .request(method.clone(), format!("{base}{path}"))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(b);
    }
    let r = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Waits until `token` may use FLOW on the instance at `base`.
async fn wait_access_on(http: &reqwest::Client, base: &str, token: &str) {
    let ok = support::wait_until(Duration::from_secs(10), || async {
        call(
            http,
            base,
            Method::GET,
            &format!("/chatflows/{FLOW}"),
            token,
            None,
        )
        .await
        .0 == 200
    })
    .await;
    assert!(ok, "the grant never reached {base}");
}

fn predict_body(question: &str, session: &str) -> Value {
    json!({"chatflow_id": FLOW, "question": question, "sessionId": session})
}

// ---- 5. Conversation ownership is right on every instance at once ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_deleted_and_reused_changes_owner_on_every_instance() {
    let w = World::start().await;
    let second = w.second_instance(|o| o).await;
    let two = second.base_url.as_str();
    let (_, ta) = w.user_with("anna", 10, FLOW).await;
    let (_, tb) = w.user_with("ben", 10, FLOW).await;
    wait_access_on(&w.http, two, &ta).await;
    wait_access_on(&w.http, two, &tb).await;

    // Anna uses "shared-1" on instance two, then deletes it on instance one.
    let body = predict_body("anna speaking", "shared-1");
    let (s, _) = call(
        &w.http,
        two,
        Method::POST,
        "/chat/predict",
        &ta,
        Some(&body),
    )
    .await;
    assert_eq!(s, 200);
    let history = "/chat/sessions/shared-1/history";
    assert_eq!(
        call(&w.http, two, Method::GET, history, &ta, None).await.0,
        200
    );
    assert_eq!(w.delete("/chat/sessions/shared-1", &ta).await.status(), 200);
    // Ben starts a conversation of his own under the same id, on instance one.
    let r = w
        .post(
            "/chat/predict",
            &tb,
            &predict_body("ben's secret", "shared-1"),
        )
        .await;
    assert_eq!(r.status(), 200);

    // Instance two knows at once: Anna is out, Ben is the owner.
    let (s, _) = call(&w.http, two, Method::GET, history, &ta, None).await;
    assert_eq!(s, 404, "Anna reads Ben's conversation on instance two");
    let drop_in = format!("/api/v1/chatmessage/{FLOW}?chatId=shared-1");
    let (s, v) = call(&w.http, two, Method::GET, &drop_in, &ta, None).await;
    assert_eq!(s, 403, "Anna reads Ben's messages through drop-in: {v}");
    let before = w.flowise.prediction_count();
    let body = predict_body("anna again", "shared-1");
    let (s, _) = call(
        &w.http,
        two,
        Method::POST,
        "/chat/predict",
        &ta,
        Some(&body),
    )
    .await;
    assert_eq!(s, 403, "Anna predicts into Ben's conversation");
    assert_eq!(w.flowise.prediction_count(), before);
    let (s, v) = call(&w.http, two, Method::GET, history, &tb, None).await;
    assert_eq!(
        s, 200,
        "Ben is refused his own conversation on instance two"
    );
    let contents: Vec<&str> = v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(contents, vec!["ben's secret", "MOCK ANSWER: ben's secret"]);
    w.assert_books_balance().await;
}

// ---- 12. Small: sessions ordered by use; drop-in message reads in parallel ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_listed_by_last_use() {
    let w = World::start().await;
    let (_, t) = w.user_with("carl", 10, FLOW).await;
    for (q, s) in [("one", "conv-a"), ("two", "conv-b")] {
        let r = w.post("/chat/predict", &t, &predict_body(q, s)).await;
        assert_eq!(r.status(), 200);
    }
    // Both were used a minute ago (last use is recorded to the second).
    w.db.client()
        .await
        .execute(
            "UPDATE sessions SET created_at = created_at - interval '1 minute',
                                 last_used_at = last_used_at - interval '1 minute'",
            &[],
        )
        .await
        .expect("age the sessions");
    let r = w
        .post("/chat/predict", &t, &predict_body("three", "conv-a"))
        .await;
    assert_eq!(r.status(), 200);
    let list: Value = w.get_json("/chat/sessions", &t).await;
    let ids: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["session_id"].as_str())
        .collect();
    assert_eq!(ids, vec!["conv-a", "conv-b"], "{list}");
    assert!(list[0]["last_used_at"].as_str() > list[0]["created_at"].as_str());
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_in_messages_of_many_sessions_are_read_in_parallel() {
    let w = World::start().await;
    let (_, t) = w.user_with("dina", 20, FLOW).await;
    let sessions: Vec<String> = (0..10).map(|i| format!("many-{i}")).collect();
    for s in &sessions {
        let r = w.post("/chat/predict", &t, &predict_body(s, s)).await;
        assert_eq!(r.status(), 200);
    }
    w.flowise.set_message_read_delay(Duration::from_millis(300));
    let started = Instant::now();
    let all: Value = w.get_json(&format!("/api/v1/chatmessage/{FLOW}"), &t).await;
    let took = started.elapsed();
    let rows = all.as_array().expect("array of messages");
    assert_eq!(rows.len(), 20, "two messages per session");
    for s in &sessions {
        assert!(rows.iter().any(|m| m["chatId"] == *s), "{s} missing");
    }
    assert!(
        w.flowise.max_parallel_message_reads() >= 2,
        "one Flowise call at a time ({took:?} for 10 sessions)"
    );
    w.assert_books_balance().await;
}

// ---- 6. Login throttling holds under concurrency and across instances ----

/// `POST /chat/authenticate` on `base`: the status.
async fn login_status(http: &reqwest::Client, base: &str, user: &str, password: &str) -> u16 {
    http.post(format!("{base}/chat/authenticate"))
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .expect("authenticate")
        .status()
        .as_u16()
}

/// Sends every (instance, password) guess at once; the statuses.
async fn guess_at_once(http: &reqwest::Client, user: &str, guesses: &[(&str, String)]) -> Vec<u16> {
    futures::future::join_all(
        guesses
            .iter()
            .map(|(base, pw)| login_status(http, base, user, pw)),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_concurrent_guesses_get_no_more_than_the_limit_checked() {
    let w = World::start_with(|o| o.env("LOGIN_ATTEMPTS_PER_MINUTE", "10")).await;
    w.add_user("vic", "user", 0);
    let base = w.proxy.base_url.as_str();
    let guesses: Vec<(&str, String)> = (0..60).map(|i| (base, format!("guess-{i}"))).collect();
    let statuses = guess_at_once(&w.http, "vic", &guesses).await;
    let checked = statuses.iter().filter(|s| **s != 429).count();
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        (1..=10).contains(&checked),
        "{checked} of 60 concurrent guesses were checked: {statuses:?}"
    );
    let right = support::setup::password_of("vic");
    assert_eq!(login_status(&w.http, base, "vic", &right).await, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_login_budget() {
    let w = World::start_with(|o| o.env("LOGIN_ATTEMPTS_PER_MINUTE", "10")).await;
    let second = w
        .second_instance(|o| o.env("LOGIN_ATTEMPTS_PER_MINUTE", "10"))
        .await;
    w.add_user("wes", "user", 0);
    let (one, two) = (w.proxy.base_url.as_str(), second.base_url.as_str());
    let guesses: Vec<(&str, String)> = (0..20)
        .map(|i| (if i % 2 == 0 { one } else { two }, format!("guess-{i}")))
        .collect();
    let statuses = guess_at_once(&w.http, "wes", &guesses).await;
    let checked = statuses.iter().filter(|s| **s != 429).count();
    assert!(
        checked <= 10,
        "{checked} of 20 guesses over two instances were checked: {statuses:?}"
    );
    let right = support::setup::password_of("wes");
    for base in [one, two] {
        assert_eq!(
            login_status(&w.http, base, "wes", &right).await,
            429,
            "the right password after the limit, on {base}"
        );
    }
}

// ---- 7. A new key, user or grant works on its first request anywhere ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_keys_users_and_grants_work_at_once_on_another_instance() {
    let w = World::start().await;
    let second = w.second_instance(|o| o).await;
    let two = second.base_url.as_str();
    w.add_user("root", "admin", 0);
    let admin = w.login("root").await;
    let (uid, _) = w.user_with("kim", 5, FLOW).await;
    let flow_path = format!("/chatflows/{FLOW}");
    for i in 0..12 {
        let v = w
            .post_json(
                &format!("/admin/users/{uid}/api-keys"),
                &admin,
                &json!({"name": format!("admin-{i}")}),
            )
            .await;
        let key = v["api_key"].as_str().expect("api_key").to_string();
        let (s, _) = call(&w.http, two, Method::GET, &flow_path, &key, None).await;
        assert_eq!(s, 200, "a key from the admin API, try {i}");

        let out = support::setup::cli(&w.db.url, &["apikey", "create", "kim"], None);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let key = text.split_whitespace().last().expect("key").to_string();
        let (s, _) = call(&w.http, two, Method::GET, &flow_path, &key, None).await;
        assert_eq!(s, 200, "a key from the CLI, try {i}");
    }
    // A user made with the CLI, logged in on one, then granted with the CLI.
    w.add_user("lou", "user", 3);
    let token = w.login("lou").await;
    let (s, _) = call(&w.http, two, Method::GET, "/chat/credits", &token, None).await;
    assert_eq!(s, 200, "a new user's token on instance two");
    let out = support::setup::cli(&w.db.url, &["grant", "lou", FLOW], None);
    assert!(out.status.success());
    let (s, _) = call(&w.http, two, Method::GET, &flow_path, &token, None).await;
    assert_eq!(s, 200, "a new grant on instance two");
    // Unknown keys are still refused (and looked up once, then cached).
    for _ in 0..3 {
        let (s, _) = call(
            &w.http,
            two,
            Method::GET,
            &flow_path,
            "fpk_0123456789ab_nope",
            None,
        )
        .await;
        assert_eq!(s, 401);
    }
}

// ---- 8. Token times, revoke-all, and a user's own keys ----

fn forge(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

/// Claims as the proxy writes them, issued `ahead_ms` in the future.
fn claims_ahead(user_id: i64, ahead_ms: i64) -> Value {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let iat_ms = now_ms + ahead_ms;
    json!({"sub": user_id.to_string(), "role": "user", "jti": uuid::Uuid::new_v4().to_string(),
           "iat": iat_ms.div_euclid(1000), "iat_ms": iat_ms, "exp": now_ms / 1000 + 3600,
           "iss": "flowise-proxy"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_the_future_are_refused_and_revoke_all_wins_over_them() {
    let w = World::start().await;
    let (uid, token) = w.user_with("mia", 5, FLOW).await;
    let secret = w.proxy.jwt_secret.clone();
    let now = chrono::Utc::now().timestamp();
    let mut future_iat = claims_ahead(uid, 0);
    future_iat["iat"] = json!(now + 600);
    future_iat.as_object_mut().expect("object").remove("iat_ms");
    let mut future_nbf = claims_ahead(uid, 0);
    future_nbf["nbf"] = json!(now + 600);
    let mut moved_iat_ms = claims_ahead(uid, 0);
    moved_iat_ms["iat_ms"] = json!((now + 86_400) * 1000);
    for (name, claims) in [
        ("iat in ten minutes", future_iat),
        ("nbf in ten minutes", future_nbf),
        ("iat_ms a day ahead of iat", moved_iat_ms),
        ("both a day ahead", claims_ahead(uid, 86_400_000)),
    ] {
        let r = w.get("/chat/credits", &forge(&secret, &claims)).await;
        assert_eq!(r.status(), 401, "{name}");
    }
    // Within the clock leeway (30 s) a token is accepted...
    let ahead = forge(&secret, &claims_ahead(uid, 20_000));
    assert_eq!(w.get("/chat/credits", &ahead).await.status(), 200);
    // ...until "revoke all", which wins over any issue time it claims.
    let r = w.post("/chat/revoke", &token, &json!({"all": true})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        w.get("/chat/credits", &ahead).await.status(),
        401,
        "a token issued 20 s ahead survived revoke-all"
    );
    assert_eq!(w.get("/chat/credits", &token).await.status(), 401);
    // A new login right after works at once, here and after a refresh.
    let fresh = w.login("mia").await;
    assert_eq!(w.get("/chat/credits", &fresh).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_revoke_their_own_api_keys() {
    let w = World::start().await;
    let (_, old_login) = w.user_with("ned", 5, FLOW).await;
    let (_, other) = w.user_with("ora", 5, FLOW).await;
    let new_key = |user: &str| {
        let out = support::setup::cli(&w.db.url, &["apikey", "create", user], None);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace().last().expect("key").to_string()
    };
    let (k1, k2, k3) = (new_key("ned"), new_key("ned"), new_key("ned"));
    let ora_key = new_key("ora");
    // Revoking "all" with an API key revokes that key.
    let r = w.post("/chat/revoke", &k1, &json!({"all": true})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        w.get("/chat/credits", &k1).await.status(),
        401,
        "key still works"
    );
    // "All" also ended every login of the user (not other users' keys).
    assert_eq!(w.get("/chat/credits", &old_login).await.status(), 401);
    assert_eq!(w.get("/chat/credits", &ora_key).await.status(), 200);
    let token = w.login("ned").await;
    // A bare revoke with a key revokes that key too.
    assert_eq!(w.post("/chat/revoke", &k2, &json!({})).await.status(), 200);
    assert_eq!(w.get("/chat/credits", &k2).await.status(), 401);
    // The remaining key is listed (without its secret) and can be revoked.
    let (s, list) = call(
        &w.http,
        &w.proxy.base_url,
        Method::GET,
        "/chat/api-keys",
        &k3,
        None,
    )
    .await;
    assert_eq!(s, 200, "{list}");
    let keys = list.as_array().expect("a list of keys");
    assert_eq!(keys.len(), 1, "{list}");
    assert!(k3.contains(keys[0]["prefix"].as_str().expect("prefix")));
    assert!(!list
        .to_string()
        .contains(k3.rsplit('_').next().expect("secret")));
    let id = keys[0]["id"].as_i64().expect("id");
    let (s, _) = call(
        &w.http,
        &w.proxy.base_url,
        Method::DELETE,
        &format!("/chat/api-keys/{id}"),
        &other,
        None,
    )
    .await;
    assert_eq!(s, 404, "someone else's key");
    assert_eq!(w.get("/chat/credits", &k3).await.status(), 200);
    assert_eq!(w.get("/chat/credits", &ora_key).await.status(), 200);
    let r = w.delete(&format!("/chat/api-keys/{id}"), &token).await;
    assert_eq!(r.status(), 200);
    assert_eq!(w.get("/chat/credits", &k3).await.status(), 401);
    let (s, list) = call(
        &w.http,
        &w.proxy.base_url,
        Method::GET,
        "/chat/api-keys",
        &token,
        None,
    )
    .await;
    assert_eq!((s, list), (200, json!([])));
    assert_eq!(w.get("/chat/credits", &ora_key).await.status(), 200);
}

// ---- 10. A client's mistake is a 422, never a 503 ----

/// Σ `flowise_proxy_database_errors_total` on the proxy.
async fn database_errors(w: &World) -> f64 {
    w.metric_sum(
        &w.proxy.metrics_url,
        "flowise_proxy_database_errors_total",
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_and_overflowing_top_ups_are_the_clients_mistake() {
    let w = World::start().await;
    w.add_user("root", "admin", 0);
    let admin = w.login("root").await;
    let (uid, user) = w.user_with("pat", 5, FLOW).await;
    let errors_before = database_errors(&w).await;
    let nul = "a\u{0}b";
    let credits = format!("/admin/users/{uid}/credits");
    let cases: Vec<(Method, String, &str, Value)> = vec![
        (
            Method::POST,
            "/admin/users".into(),
            &admin,
            json!({"username": "newbie", "password": "long-enough", "email": nul}),
        ),
        (
            Method::PATCH,
            format!("/admin/users/{uid}"),
            &admin,
            json!({"email": nul}),
        ),
        (
            Method::POST,
            credits.clone(),
            &admin,
            json!({"amount": 5, "reason": nul, "idempotency_key": "k1"}),
        ),
        (
            Method::POST,
            credits.clone(),
            &admin,
            json!({"amount": 5, "reason": "top-up", "idempotency_key": nul}),
        ),
        (
            Method::POST,
            format!("/admin/users/{uid}/api-keys"),
            &admin,
            json!({"name": nul}),
        ),
        (
            Method::POST,
            format!("/admin/chatflows/{FLOW}/users"),
            &admin,
            json!({"username": nul}),
        ),
        (
            Method::DELETE,
            format!("/admin/chatflows/{FLOW}/users"),
            &admin,
            json!({"username": nul}),
        ),
        (
            Method::POST,
            "/chat/predict".into(),
            &user,
            json!({"chatflow_id": format!("{FLOW}\u{0}"), "question": "hi"}),
        ),
        (
            Method::POST,
            "/chat/predict".into(),
            &admin,
            json!({"chatflow_id": format!("{FLOW}\u{0}"), "question": "hi"}),
        ),
    ];
    for (method, path, token, body) in &cases {
        let (s, v) = call(
            &w.http,
            &w.proxy.base_url,
            method.clone(),
            path,
            token,
            Some(body),
        )
        .await;
        assert_eq!(s, 422, "{method} {path} {body}: {v}");
        assert_eq!(v["code"], "validation_error", "{v}");
        assert!(v["detail"].is_string(), "{v}");
    }
    // A top-up that would overflow the balance.
    let big = json!({"amount": i64::MAX, "reason": "a lot", "idempotency_key": "big-1"});
    let (s, v) = call(
        &w.http,
        &w.proxy.base_url,
        Method::POST,
        &credits,
        &admin,
        Some(&big),
    )
    .await;
    assert_eq!((s, &v["code"]), (422, &json!("validation_error")), "{v}");
    let out = support::setup::cli(
        &w.db.url,
        &[
            "credits",
            "grant",
            "pat",
            &i64::MAX.to_string(),
            "--reason",
            "a lot",
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(!stderr.contains("database unavailable"), "{stderr}");
    assert!(stderr.contains("amount"), "{stderr}");
    // A NUL in a login or a conversation id: the usual refusals.
    let r = w
        .http
        .post(w.url("/chat/authenticate"))
        .json(&json!({"username": nul, "password": "whatever-it-is"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let r = w
        .get(&format!("/api/v1/chatmessage/{FLOW}?chatId=a%00b"), &user)
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        database_errors(&w).await,
        errors_before,
        "client mistakes counted as database errors"
    );
    assert_eq!(w.balance(uid).await, (5, 0));
    w.assert_books_balance().await;
}
