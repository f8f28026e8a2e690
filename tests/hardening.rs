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
