//! Fast tests of the test support itself (no proxy binary needed).

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use support::flowise::{
    self, Fail, FlowiseConfig, DEFAULT_API_KEY, PEER_TEST_CHATFLOW_ID, UNKNOWN_CHATFLOW_ID,
};
use support::pg::{self, PrivateCluster};
use support::proxy::client;

const UNAUTHORIZED_BODY: &str = r#"{"statusCode":500,"success":false,"message":"Error: predictionsServices.buildChatflow - Unauthorized","stack":{}}"#;

fn prediction_url(f: &flowise::TestFlowise, id: &str) -> String {
    format!("{}/api/v1/prediction/{id}", f.url)
}

fn bearer() -> String {
    format!("Bearer {DEFAULT_API_KEY}")
}

/// `method url` to the double with its API key and an optional JSON body.
async fn double(method: reqwest::Method, url: String, body: Option<&Value>) -> reqwest::Response {
    let mut req = client()
        .request(method.clone(), &url)
        .header("authorization", bearer());
    if let Some(b) = body {
        req = req.json(b);
    }
    req.send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// The same, the answer read as JSON (whatever its status).
async fn double_json(method: reqwest::Method, url: String, body: Option<&Value>) -> Value {
    let r = double(method, url, body).await;
    let status = r.status();
    r.json()
        .await
        .unwrap_or_else(|e| panic!("a JSON body with status {status}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_db_is_usable_and_dropped() {
    let db = pg::fresh_db().await;
    assert!(db.name.starts_with("fp_test_"), "name {}", db.name);
    assert!(db.url.ends_with(&format!("/{}", db.name)), "url {}", db.url);
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'x')")
        .await
        .expect("create and fill a table");
    let v: String = client
        .query_one("SELECT v FROM t WHERE id = 1", &[])
        .await
        .expect("select from the table")
        .get(0);
    assert_eq!(v, "x");
    let current: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .expect("current_database()")
        .get(0);
    assert_eq!(current, db.name);
    let name = db.name.clone();
    assert!(pg::db_exists(&name).await);
    // Drop with an open connection: WITH (FORCE) must still drop it.
    drop(db);
    assert!(!pg::db_exists(&name).await, "database {name} still exists");
    drop(client);
}

#[test]
fn url_with_db_rewrites_only_the_database() {
    assert_eq!(
        pg::url_with_db("postgresql://postgres@127.0.0.1:5432/postgres", "x"),
        "postgresql://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        pg::url_with_db("postgres://u:p@h:1/db?sslmode=disable", "y"),
        "postgres://u:p@h:1/y?sslmode=disable"
    );
    assert_eq!(pg::url_with_db("postgres://u@h", "z"), "postgres://u@h/z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowise_nonstream_prediction_has_capture_shape() {
    let f = flowise::start(FlowiseConfig::default()).await;
    let resp = double(
        reqwest::Method::POST,
        prediction_url(&f, PEER_TEST_CHATFLOW_ID),
        Some(&json!({"question": "hi"})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    assert!(resp.headers().contains_key("content-length"));
    assert_eq!(resp.headers()["vary"], "Origin");
    let text = resp.text().await.expect("read body");
    assert!(
        text.starts_with(r#"{"text":"MOCK ANSWER: hi","question":"hi","chatId":""#),
        "{text}"
    );
    let v: Value = serde_json::from_str(&text).expect("JSON body");
    let keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "text",
        "question",
        "chatId",
        "chatMessageId",
        "isStreamValid",
        "sessionId",
        "memoryType",
    ];
    expected.sort();
    assert_eq!(keys, expected);
    // Field order as Flowise.
    let order: Vec<usize> = [
        "\"text\"",
        "\"question\"",
        "\"chatId\"",
        "\"chatMessageId\"",
        "\"isStreamValid\"",
        "\"sessionId\"",
        "\"memoryType\"",
    ]
    .iter()
    .map(|k| text.find(k).expect("key present"))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "order {text}");
    assert_eq!(v["isStreamValid"], false);
    assert_eq!(v["memoryType"], "Buffer Memory");
    assert_eq!(v["chatId"], v["sessionId"]);
    uuid::Uuid::parse_str(v["chatId"].as_str().expect("chatId string")).expect("chatId uuid");

    // chatId from the body, then from overrideConfig.sessionId.
    let v: Value = client()
        .post(prediction_url(&f, PEER_TEST_CHATFLOW_ID))
        .header("authorization", DEFAULT_API_KEY) // raw key, no Bearer: accepted
        .json(&json!({"question": "with chat id", "chatId": "peer-chat-1"}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(v["chatId"], "peer-chat-1");
    assert_eq!(v["sessionId"], "peer-chat-1");
    let v: Value = double_json(
        reqwest::Method::POST,
        prediction_url(&f, PEER_TEST_CHATFLOW_ID),
        Some(&json!({"question": "first turn", "overrideConfig": {"sessionId": "peer-session-1"}})),
    )
    .await;
    assert_eq!(v["chatId"], "peer-session-1");

    // Empty body: "undefined", no question field.
    let v: Value = double_json(
        reqwest::Method::POST,
        prediction_url(&f, PEER_TEST_CHATFLOW_ID),
        Some(&json!({})),
    )
    .await;
    assert_eq!(v["text"], "MOCK ANSWER: undefined");
    assert!(v.get("question").is_none());

    // Usage.
    f.set_usage(Some((7, 5)));
    let v: Value = double_json(
        reqwest::Method::POST,
        prediction_url(&f, PEER_TEST_CHATFLOW_ID),
        Some(&json!({"question": "u"})),
    )
    .await;
    assert_eq!(
        v["usageMetadata"],
        json!({"input_tokens": 7, "output_tokens": 5, "total_tokens": 12})
    );

    // Stored messages, shaped like chatmessage_list.txt.
    let rows: Value = double_json(
        reqwest::Method::GET,
        format!(
            "{}/api/v1/chatmessage/{PEER_TEST_CHATFLOW_ID}?chatId=peer-chat-1",
            f.url
        ),
        None,
    )
    .await;
    let rows = rows.as_array().expect("array");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["role"], "userMessage");
    assert_eq!(rows[0]["content"], "with chat id");
    assert_eq!(rows[1]["role"], "apiMessage");
    assert_eq!(rows[1]["content"], "MOCK ANSWER: with chat id");
    assert_eq!(rows[1]["chatType"], "EXTERNAL");
    assert!(rows[0]["createdDate"].as_str() < rows[1]["createdDate"].as_str());
    assert_eq!(rows[0].as_object().expect("row").len(), 21);
    assert_eq!(f.prediction_count(), 5);
    assert_eq!(f.prediction_requests().len(), 5);
    let r = &f.prediction_requests()[0];
    assert_eq!(r.header("Authorization"), Some(bearer().as_str()));
    assert_eq!(r.json(), Some(json!({"question": "hi"})));
}

/// Reads a streaming response, returning (body, arrival time of each chunk).
async fn read_stream(resp: reqwest::Response) -> (String, Vec<(Instant, String)>) {
    let mut chunks = Vec::new();
    let mut body = String::new();
    let mut s = resp.bytes_stream();
    while let Some(c) = s.next().await {
        let c = c.expect("stream chunk");
        let t = String::from_utf8_lossy(&c).into_owned();
        body.push_str(&t);
        chunks.push((Instant::now(), t));
    }
    (body, chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowise_streams_with_message_data_framing() {
    let f = flowise::start(FlowiseConfig::default()).await;
    for streaming in [json!(true), json!("true")] {
        f.set_usage(None);
        let resp = double(reqwest::Method::POST, prediction_url(&f, PEER_TEST_CHATFLOW_ID), Some(&json!({"question": "stream with chat id", "chatId": "peer-chat-2", "streaming": streaming}))).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert_eq!(resp.headers()["cache-control"], "no-cache");
        assert_eq!(resp.headers()["x-accel-buffering"], "no");
        assert_eq!(resp.headers()["transfer-encoding"], "chunked");
        assert!(!resp.headers().contains_key("content-length"));
        let (body, _) = read_stream(resp).await;
        assert!(
            body.starts_with("message:\ndata:{\"event\":\"start\",\"data\":\"\"}\n\nmessage:\ndata:{\"event\":\"token\",\"data\":\"MOCK \"}\n\n"),
            "{body}"
        );
        assert!(body.ends_with("message:\ndata:{\"event\":\"end\",\"data\":\"[DONE]\"}\n\n"));
        for block in body.trim_end_matches("\n\n").split("\n\n") {
            assert!(block.starts_with("message:\ndata:{"), "block {block:?}");
        }
        let events = flowise::parse_sse(&body);
        let names: Vec<&str> = events
            .iter()
            .map(|e| e["event"].as_str().expect("event name"))
            .collect();
        assert_eq!(
            names,
            ["start", "token", "token", "token", "token", "token", "token", "metadata", "end"]
        );
        let tokens: Vec<&str> = events
            .iter()
            .filter(|e| e["event"] == "token")
            .map(|e| e["data"].as_str().expect("token text"))
            .collect();
        assert_eq!(
            tokens,
            ["MOCK ", "ANSWER: ", "stream ", "with ", "chat ", "id"]
        );
        let meta = &events[7]["data"];
        assert_eq!(meta["chatId"], "peer-chat-2");
        assert_eq!(meta["sessionId"], "peer-chat-2");
        assert_eq!(meta["question"], "stream with chat id");
        assert_eq!(meta["memoryType"], "Buffer Memory");
        assert!(body
            .contains(r#"{"event":"metadata","data":{"chatId":"peer-chat-2","chatMessageId":""#));
    }

    // usageMetadata before metadata.
    f.set_usage(Some((3, 4)));
    let resp = double(
        reqwest::Method::POST,
        prediction_url(&f, PEER_TEST_CHATFLOW_ID),
        Some(&json!({"question": "hi", "streaming": true})),
    )
    .await;
    let (body, _) = read_stream(resp).await;
    assert_eq!(
        flowise::sse_event_names(&body),
        [
            "start",
            "token",
            "token",
            "token",
            "usageMetadata",
            "metadata",
            "end"
        ]
    );
    assert!(body.contains(
        r#"data:{"event":"usageMetadata","data":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}"#
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowise_token_delay_spreads_events() {
    let f = flowise::start(FlowiseConfig::default()).await;
    f.set_token_delay(Duration::from_millis(300));
    let sent = Instant::now();
    let resp = double(
        reqwest::Method::POST,
        prediction_url(&f, PEER_TEST_CHATFLOW_ID),
        Some(&json!({"question": "one two three", "streaming": true})),
    )
    .await;
    let (body, chunks) = read_stream(resp).await;
    // start, 5 tokens, metadata, end: 7 gaps of 300 ms.
    assert_eq!(flowise::sse_event_names(&body).len(), 8);
    let first = chunks
        .iter()
        .find(|(_, t)| t.contains("\"start\""))
        .expect("start chunk")
        .0;
    let last = chunks
        .iter()
        .find(|(_, t)| t.contains("[DONE]"))
        .expect("end chunk")
        .0;
    assert!(
        first.duration_since(sent) < Duration::from_millis(1500),
        "first event after {:?}",
        first.duration_since(sent)
    );
    assert!(
        last.duration_since(first) >= Duration::from_millis(1800),
        "first-to-last {:?}",
        last.duration_since(first)
    );
    assert!(chunks.len() >= 8, "{} chunks", chunks.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowise_rejects_wrong_keys_like_flowise() {
    let f = flowise::start(FlowiseConfig::default()).await;
    for auth in [
        Some("Bearer wrong-key".to_string()),
        Some(format!("bearer {DEFAULT_API_KEY}")),
        None,
    ] {
        let mut req = client()
            .post(prediction_url(&f, PEER_TEST_CHATFLOW_ID))
            .json(&json!({"question": "hi"}));
        if let Some(a) = &auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.expect("send");
        assert_eq!(resp.status(), 500, "auth {auth:?}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/json; charset=utf-8"
        );
        assert_eq!(resp.text().await.expect("body"), UNAUTHORIZED_BODY);
    }
    let resp = client()
        .post(prediction_url(&f, PEER_TEST_CHATFLOW_ID))
        .json(&json!({"question": "hi", "streaming": true}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.expect("body");
    assert_eq!(
        body,
        "message:\ndata:{\"event\":\"error\",\"data\":\"Error: predictionsServices.buildChatflow - Unauthorized\"}\n\nmessage:\ndata:{\"event\":\"end\",\"data\":\"[DONE]\"}\n\n"
    );
    // Management API: 401.
    let resp = client()
        .get(format!("{}/api/v1/chatflows", f.url))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.text().await.expect("body"),
        r#"{"error":"Unauthorized Access"}"#
    );
    // Recorded although rejected; nothing stored.
    assert_eq!(f.prediction_count(), 4);
    assert_eq!(f.requests().len(), 5);
    assert!(f.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowise_unknown_chatflow_and_other_routes() {
    let f = flowise::start(FlowiseConfig::default()).await;
    // Streaming to an unknown chatflow never answers.
    let pending = client()
        .post(prediction_url(&f, UNKNOWN_CHATFLOW_ID))
        .header("authorization", bearer())
        .json(&json!({"question": "hi", "streaming": true}))
        .send();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), pending)
            .await
            .is_err(),
        "unknown chatflow + streaming must hang"
    );
    let resp = double(
        reqwest::Method::POST,
        prediction_url(&f, UNKNOWN_CHATFLOW_ID),
        Some(&json!({"question": "hi"})),
    )
    .await;
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.text().await.expect("body"),
        r#"{"statusCode":404,"success":false,"message":"Chatflow 00000000-0000-4000-8000-000000000000 not found in the database!","stack":{}}"#
    );
    let resp = double(
        reqwest::Method::POST,
        prediction_url(&f, "not-a-uuid"),
        Some(&json!({"question": "hi"})),
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.text().await.expect("body"),
        r#"{"statusCode":400,"success":false,"message":"Invalid Chatflow ID","stack":{}}"#
    );
    let resp = double(
        reqwest::Method::POST,
        prediction_url(&f, ""),
        Some(&json!({"question": "hi"})),
    )
    .await;
    assert_eq!(resp.status(), 412);

    let get = |path: &str, key: bool| {
        let mut r = client().get(format!("{}{path}", f.url));
        if key {
            r = r.header("authorization", bearer());
        }
        r.send()
    };
    let resp = get("/api/v1/ping", false).await.expect("ping");
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(resp.text().await.expect("body"), "pong");
    let resp = get("/api/v1/does-not-exist", true).await.expect("unknown");
    assert_eq!(resp.status(), 200);
    assert!(resp
        .text()
        .await
        .expect("body")
        .starts_with("<!DOCTYPE html>"));
    let list: Value = get("/api/v1/chatflows", true)
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], PEER_TEST_CHATFLOW_ID);
    assert_eq!(list[0]["name"], "peer-test-conversation");
    assert_eq!(list[0]["type"], "CHATFLOW");
    assert!(list[0]["flowData"].is_string());
    serde_json::from_str::<Value>(list[0]["flowData"].as_str().expect("flowData"))
        .expect("flowData is JSON text");
    assert_eq!(list[0].as_object().expect("row").len(), 17);
    let page: Value = get("/api/v1/chatflows?page=2&limit=1", true)
        .await
        .expect("page")
        .json()
        .await
        .expect("json");
    assert_eq!(page["total"], 2);
    assert_eq!(page["data"][0]["id"], flowise::SECOND_CHATFLOW_ID);
    let resp = get(&format!("/api/v1/chatflows/{UNKNOWN_CHATFLOW_ID}"), true)
        .await
        .expect("get unknown");
    assert_eq!(resp.status(), 404);
    let v: Value = get(
        &format!("/api/v1/chatflows-streaming/{PEER_TEST_CHATFLOW_ID}"),
        false,
    )
    .await
    .expect("streaming")
    .json()
    .await
    .expect("json");
    assert_eq!(v, json!({"isStreaming": true}));
    let resp = get(
        &format!("/api/v1/public-chatbotConfig/{UNKNOWN_CHATFLOW_ID}"),
        false,
    )
    .await
    .expect("public config unknown");
    assert_eq!(resp.status(), 500);
    let v: Value = get(
        &format!("/api/v1/public-chatbotConfig/{PEER_TEST_CHATFLOW_ID}"),
        false,
    )
    .await
    .expect("public config")
    .json()
    .await
    .expect("json");
    assert_eq!(v["isTTSEnabled"], false);
    assert_eq!(v["uploads"]["isRAGFileUploadAllowed"], false);

    // Attachments round trip.
    let items: Value = client()
        .post(format!(
            "{}/api/v1/attachments/{PEER_TEST_CHATFLOW_ID}/chat-9",
            f.url
        ))
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body("--XyZ\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nhello file\r\n--XyZ--\r\n")
        .send()
        .await
        .expect("attach")
        .json()
        .await
        .expect("json");
    assert_eq!(
        items,
        json!([{"name": "a.txt", "mimeType": "text/plain", "size": 10, "content": "hello file"}])
    );
    let resp = get(
        &format!(
            "/api/v1/get-upload-file?chatflowId={PEER_TEST_CHATFLOW_ID}&chatId=chat-9&fileName=a.txt"
        ),
        false,
    )
    .await
    .expect("get file");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), "hello file");

    // Big bodies are accepted.
    let big = "x".repeat(20 * 1024 * 1024);
    let resp = double(
        reqwest::Method::POST,
        prediction_url(&f, PEER_TEST_CHATFLOW_ID),
        Some(&json!({"question": big})),
    )
    .await;
    assert_eq!(resp.status(), 200);

    // Delete messages of one chat.
    let v: Value = double_json(
        reqwest::Method::DELETE,
        format!(
            "{}/api/v1/chatmessage/{PEER_TEST_CHATFLOW_ID}?chatId=nope",
            f.url
        ),
        None,
    )
    .await;
    assert_eq!(v, json!({"raw": [], "affected": 0}));
    let v: Value = double_json(
        reqwest::Method::DELETE,
        format!("{}/api/v1/chatmessage/{PEER_TEST_CHATFLOW_ID}", f.url),
        None,
    )
    .await;
    assert_eq!(v, json!({"raw": [], "affected": 2}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowise_fail_modes_and_stop() {
    let f = flowise::start(FlowiseConfig::default()).await;
    let stream_req = || {
        client()
            .post(prediction_url(&f, PEER_TEST_CHATFLOW_ID))
            .header("authorization", bearer())
            .json(&json!({"question": "a b c", "streaming": true}))
            .send()
    };
    f.set_fail(Fail::Status500);
    assert_eq!(stream_req().await.expect("send").status(), 500);
    f.set_fail(Fail::ErrorEvent);
    let body = stream_req()
        .await
        .expect("send")
        .text()
        .await
        .expect("body");
    assert_eq!(flowise::sse_event_names(&body), ["error", "end"]);
    f.set_fail(Fail::CloseMidStream);
    let resp = stream_req().await.expect("send");
    assert_eq!(resp.status(), 200);
    let mut s = resp.bytes_stream();
    let mut got = String::new();
    let mut errored = false;
    while let Some(c) = s.next().await {
        match c {
            Ok(b) => got.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => {
                errored = true;
                break;
            }
        }
    }
    assert!(errored, "the stream must end in an error, got {got:?}");
    assert_eq!(flowise::sse_event_names(&got), ["start", "token"]);
    f.set_fail(Fail::HangAfterFirstEvent);
    let resp = stream_req().await.expect("send");
    let mut s = resp.bytes_stream();
    let first = s.next().await.expect("first chunk").expect("chunk ok");
    assert!(String::from_utf8_lossy(&first).contains("\"start\""));
    assert!(tokio::time::timeout(Duration::from_millis(800), s.next())
        .await
        .is_err());
    f.set_fail(Fail::Hang);
    assert!(
        tokio::time::timeout(Duration::from_millis(800), stream_req())
            .await
            .is_err()
    );
    assert!(f.messages().is_empty());

    // stop(): the open hanging stream is cut and the port refuses.
    f.set_fail(Fail::HangAfterFirstEvent);
    let resp = stream_req().await.expect("send");
    let mut s = resp.bytes_stream();
    s.next().await.expect("first chunk").expect("chunk ok");
    f.stop().await;
    let rest = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("the stream ends promptly after stop()");
    assert!(!matches!(rest, Some(Ok(_))), "no more data after stop");
    let err = client()
        .get(format!("{}/api/v1/ping", f.url))
        .send()
        .await
        .expect_err("connection refused after stop()");
    assert!(err.is_connect(), "{err:?}");
    f.restart().await;
    f.set_fail(Fail::None);
    let resp = client()
        .get(format!("{}/api/v1/ping", f.url))
        .send()
        .await
        .expect("ping after restart");
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_cluster_stop_and_start_again() {
    let cluster = PrivateCluster::start().await;
    let url = cluster.url("postgres");
    assert!(pg::answers(&url, Duration::from_secs(10)).await);
    let client = pg::connect(&url).await;
    client
        .batch_execute("CREATE DATABASE kept")
        .await
        .expect("create a database");
    tokio::task::block_in_place(|| cluster.stop());
    assert!(!pg::answers(&url, Duration::from_secs(2)).await);
    assert!(client.simple_query("SELECT 1").await.is_err());
    tokio::task::block_in_place(|| cluster.start_again());
    assert!(pg::answers(&cluster.url("kept"), Duration::from_secs(10)).await);
}
