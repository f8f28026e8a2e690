//! Conversations belong to their owner; drop-in mode with the real Flowise SDK.

mod support;

use serde_json::{json, Value};
use support::flowise::PEER_TEST_CHATFLOW_ID as FLOW;
use support::setup::World;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_session_is_out_of_reach() {
    let w = World::start().await;
    let (a, ta) = w.user_with("anna", 10, FLOW).await;
    let (b, tb) = w.user_with("ben", 10, FLOW).await;
    // Anna starts a conversation with an id of her choice, and one Flowise names.
    let r = w
        .post(
            "/chat/predict",
            &ta,
            &json!({"chatflow_id": FLOW, "question": "first", "sessionId": "anna-chat-1"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    w.post(
        "/chat/predict",
        &ta,
        &json!({"chatflow_id": FLOW, "question": "second", "sessionId": "anna-chat-1"}),
    )
    .await;
    let r: Value = w
        .post_json(
            &format!("/api/v1/prediction/{FLOW}"),
            &ta,
            &json!({"question": "flowise names this one"}),
        )
        .await;
    let assigned = r["chatId"].as_str().expect("chatId").to_string();
    let sessions: Value = w.get_json("/chat/sessions", &ta).await;
    let ids: Vec<&str> = sessions
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["session_id"].as_str())
        .collect();
    assert!(
        ids.contains(&"anna-chat-1") && ids.contains(&assigned.as_str()),
        "{ids:?}"
    );

    let history: Value = w.get_json("/chat/sessions/anna-chat-1/history", &ta).await;
    let contents: Vec<&str> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(
        contents,
        vec![
            "first",
            "MOCK ANSWER: first",
            "second",
            "MOCK ANSWER: second"
        ]
    );

    // Ben: continue, read, list, delete — all refused, and never charged.
    let before = w.flowise.prediction_count();
    for body in [
        json!({"question": "hijack", "chatId": "anna-chat-1"}),
        json!({"question": "hijack", "overrideConfig": {"sessionId": "anna-chat-1"}}),
        json!({"question": "hijack", "chatId": assigned}),
    ] {
        let r = w
            .post(&format!("/api/v1/prediction/{FLOW}"), &tb, &body)
            .await;
        assert_eq!(r.status(), 403, "{body}");
    }
    let r = w
        .post(
            "/chat/predict",
            &tb,
            &json!({"chatflow_id": FLOW, "question": "hijack", "sessionId": "anna-chat-1"}),
        )
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        w.flowise.prediction_count(),
        before,
        "Flowise never saw Ben's attempts"
    );
    for path in [
        "/chat/sessions/anna-chat-1/history".to_string(),
        format!("/api/v1/chatmessage/{FLOW}?chatId=anna-chat-1"),
        format!("/api/v1/get-upload-file?chatflowId={FLOW}&chatId=anna-chat-1&fileName=x.txt"),
    ] {
        let s = w.get(&path, &tb).await.status().as_u16();
        assert!(s == 403 || s == 404, "{path}: {s}");
    }
    let r = w.delete("/chat/sessions/anna-chat-1", &tb).await;
    assert_eq!(r.status(), 404);
    let all: Value = w
        .get_json(&format!("/api/v1/chatmessage/{FLOW}"), &tb)
        .await;
    assert_eq!(
        all,
        json!([]),
        "without a filter Ben sees only his own (none)"
    );
    let ben_sessions: Value = w.get_json("/chat/sessions", &tb).await;
    assert_eq!(ben_sessions, json!([]));
    assert_eq!(w.wait_settled(b).await, (10, 0), "Ben was not charged");
    assert_eq!(w.wait_settled(a).await, (7, 0));

    // Anna deletes her conversation: gone from the list and from Flowise.
    let r = w.delete("/chat/sessions/anna-chat-1", &ta).await;
    assert_eq!(r.status(), 200);
    assert!(w
        .flowise
        .messages()
        .iter()
        .all(|m| m["chatId"] != "anna-chat-1"));
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_mib_upload_arrives_byte_identical() {
    let w = World::start().await;
    let (_, token) = w.user_with("uploader", 5, FLOW).await;
    use base64::Engine;
    let data: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
    let body = json!({
        "question": "what is in this file?",
        "uploads": [{"data": format!("data:application/octet-stream;base64,{b64}"), "type": "file", "name": "blob.bin", "mime": "application/octet-stream"}]
    })
    .to_string();
    let r = w
        .http
        .post(w.url(&format!("/api/v1/prediction/{FLOW}")))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let seen = w.flowise.prediction_requests().pop().expect("seen");
    assert_eq!(seen.body.len(), body.len());
    assert!(seen.body == body.as_bytes(), "upload altered on the way");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flowise_sdk_works_unchanged_through_the_proxy() {
    let w = World::start().await;
    let (uid, _) = w.user_with("sdk", 10, FLOW).await;
    let key = {
        let out = support::setup::cli(&w.db.url, &["apikey", "create", "sdk"], None);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace().last().expect("key").to_string()
    };
    let sdk_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk");
    assert!(
        sdk_dir.join("node_modules/flowise-sdk").exists(),
        "run `npm install` in tests/sdk (scripts/test.sh does)"
    );
    let base = w.proxy.base_url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg("drive.mjs")
            .current_dir(sdk_dir)
            .env("FLOWISE_BASE_URL", base)
            .env("FLOWISE_API_KEY", key)
            .env("CHATFLOW_ID", FLOW)
            .output()
            .expect("node runs")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "sdk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("sdk output");
    assert_eq!(v["text"], "MOCK ANSWER: hello sdk");
    let events: Vec<&str> = v["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(events.first(), Some(&"start"));
    assert_eq!(events.last(), Some(&"end"));
    assert_eq!(w.wait_settled(uid).await, (8, 0), "charged once each");
    w.assert_books_balance().await;
}
