//! One path to Flowise: HTTP framing kept end to end, a body never sent twice,
//! failover on a refused connection, multipart predictions, and the error
//! policy of seed and drop-in routes.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::flowise::{Fail, PEER_TEST_CHATFLOW_ID as FLOW};
use support::setup::World;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(30);

/// One HTTP/1.1 exchange on a connection the caller keeps, read by its framing.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body ended by its framing (the terminating chunk, or the length).
    framed_end: bool,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn exchange(conn: &mut BufReader<TcpStream>, request: &[u8]) -> Answer {
    conn.get_mut().write_all(request).await.expect("write");
    tokio::time::timeout(WAIT, read_answer(conn))
        .await
        .expect("answer in time")
}

async fn read_line(conn: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        match conn.read(&mut b).await {
            Ok(1) => {
                line.push(b[0]);
                if line.ends_with(b"\r\n") {
                    line.truncate(line.len() - 2);
                    return Some(String::from_utf8_lossy(&line).into_owned());
                }
            }
            _ => return None,
        }
    }
}

async fn read_answer(conn: &mut BufReader<TcpStream>) -> Answer {
    let status_line = read_line(conn).await.expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let mut headers = Vec::new();
    while let Some(line) = read_line(conn).await {
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').expect("header");
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut a = Answer {
        status,
        headers,
        body: Vec::new(),
        framed_end: false,
    };
    if a.header("transfer-encoding") == Some("chunked") {
        loop {
            let Some(size_line) = read_line(conn).await else {
                return a; // cut: no terminating chunk
            };
            let size = usize::from_str_radix(size_line.trim(), 16).expect("chunk size");
            if size == 0 {
                read_line(conn).await;
                a.framed_end = true;
                return a;
            }
            let mut chunk = vec![0u8; size + 2];
            if conn.read_exact(&mut chunk).await.is_err() {
                return a;
            }
            a.body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = a.header("content-length").and_then(|v| v.parse().ok()) {
        let mut body = vec![0u8; n];
        a.framed_end = conn.read_exact(&mut body).await.is_ok();
        a.body = body;
    } else {
        let _ = conn.read_to_end(&mut a.body).await;
    }
    a
}

fn post(path: &str, token: &str, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn get(path: &str, token: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {token}\r\n\r\n")
        .into_bytes()
}

async fn connect(base_url: &str) -> BufReader<TcpStream> {
    let addr = base_url.trim_start_matches("http://");
    BufReader::new(TcpStream::connect(addr).await.expect("connect"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_chunked_and_the_connection_is_kept() {
    let w = World::start().await;
    let (uid, token) = w.user_with("keeper", 10, FLOW).await;
    let mut conn = connect(&w.proxy.base_url).await;
    for path in ["/chat/predict", &format!("/api/v1/prediction/{FLOW}")] {
        let body = json!({"chatflow_id": FLOW, "question": "one two three", "streaming": true});
        let a = exchange(&mut conn, &post(path, &token, &body)).await;
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(a.header("transfer-encoding"), Some("chunked"), "{path}");
        assert!(
            a.framed_end,
            "{path}: the stream ended with its terminating chunk"
        );
        let text = String::from_utf8_lossy(&a.body);
        assert!(text.contains("\"event\":\"end\""), "{text}");
        // The same connection carries the next request.
        let a = exchange(&mut conn, &get("/chat/credits", &token)).await;
        assert_eq!(a.status, 200, "{path}: the connection was kept");
    }
    assert_eq!(
        w.wait_settled(uid).await,
        (8, 0),
        "two streams, charged once each"
    );
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flowise_breaks_off_arrives_truncated_and_is_not_charged() {
    let w = World::start().await;
    let (uid, token) = w.user_with("cut", 5, FLOW).await;
    w.flowise.set_fail(Fail::CloseMidStream);
    for path in ["/chat/predict", &format!("/api/v1/prediction/{FLOW}")] {
        let mut conn = connect(&w.proxy.base_url).await;
        let body = json!({"chatflow_id": FLOW, "question": "one two three", "streaming": true});
        let a = exchange(&mut conn, &post(path, &token, &body)).await;
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(a.header("transfer-encoding"), Some("chunked"));
        assert!(
            !a.framed_end,
            "{path}: a broken stream must not end with the terminating chunk"
        );
        assert!(String::from_utf8_lossy(&a.body).contains("\"event\":\"start\""));
    }
    assert_eq!(
        w.wait_settled(uid).await,
        (5, 0),
        "broken streams are voided"
    );
    w.assert_books_balance().await;
}

/// A Flowise stand-in that answers its health check and catalogue, and reads
/// each prediction whole and then drops the connection without answering.
async fn dropping_flowise() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let mut conn = BufReader::new(sock);
                loop {
                    let Some(line) = read_line(&mut conn).await else {
                        return;
                    };
                    let mut length = 0usize;
                    while let Some(h) = read_line(&mut conn).await {
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                length = v.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0u8; length];
                    if conn.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if line.contains("/api/v1/prediction/") {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        return; // dropped without a word
                    }
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]";
                    if conn.get_mut().write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prediction_is_never_sent_twice() {
    let w = World::start().await;
    let (uid, token) = w.user_with("once", 5, FLOW).await;
    let (dropper, seen) = dropping_flowise().await;
    let second = w
        .second_instance(|mut o| {
            o.flowise_urls = vec![dropper.clone()];
            o
        })
        .await;
    let http = support::proxy::client();
    for (path, body) in [
        (
            format!("/api/v1/prediction/{FLOW}"),
            json!({"question": "hi"}),
        ),
        (
            "/chat/predict".to_string(),
            json!({"chatflow_id": FLOW, "question": "hi"}),
        ),
    ] {
        let before = seen.load(std::sync::atomic::Ordering::SeqCst);
        // A warm connection first, so that a retry on a "stale" one would be tempting.
        let _ = http
            .get(format!("{}/api/v1/ping", second.base_url))
            .bearer_auth(&token)
            .send()
            .await;
        let r = http
            .post(format!("{}{path}", second.base_url))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 502, "{path}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["code"], "upstream_error");
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            before + 1,
            "{path}: Flowise saw the prediction exactly once"
        );
    }
    assert_eq!(w.wait_settled(uid).await, (5, 0), "nothing charged");
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_fails_over_to_another_server() {
    let w = World::start().await;
    let (uid, token) = w.user_with("failover", 20, FLOW).await;
    let other = support::flowise::start(Default::default()).await;
    let second = w
        .second_instance(|mut o| {
            o.flowise_urls = vec![w.flowise.url.clone(), other.url.clone()];
            // The health check must not notice first: the connection refusal is what is tested.
            o.env("HEALTH_CHECK_INTERVAL_MS", "3600000")
        })
        .await;
    other.stop().await;
    let http = support::proxy::client();
    for i in 0..8 {
        let r = http
            .post(format!("{}/api/v1/prediction/{FLOW}", second.base_url))
            .bearer_auth(&token)
            .json(&json!({"question": format!("q{i}")}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "prediction {i}");
    }
    assert_eq!(w.flowise.prediction_count(), 8, "each sent once");
    assert_eq!(w.wait_settled(uid).await, (12, 0), "each charged once");
    w.assert_books_balance().await;
}

fn multipart(boundary: &str, question: &str, chat_id: Option<&str>, file: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    let mut field = |name: &str, value: &str| {
        b.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    };
    field("question", question);
    if let Some(c) = chat_id {
        field("chatId", c);
    }
    b.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    b.extend_from_slice(file);
    b.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_prediction_passes_byte_exact_and_is_debited_once() {
    let w = World::start().await;
    let (uid, token) = w.user_with("uploader", 5, FLOW).await;
    let (_, other) = w.user_with("other", 5, FLOW).await;
    let file: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let boundary = "----fp-test-boundary-7MA4YWxkTrZu0gW";
    let body = multipart(boundary, "what is in this file?", None, &file);
    let r = w
        .http
        .post(w.url(&format!("/api/v1/prediction/{FLOW}")))
        .bearer_auth(&token)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    let chat_id = v["chatId"].as_str().expect("chatId").to_string();
    let seen = w.flowise.prediction_requests().pop().expect("seen");
    assert!(seen.body == body, "the form reached Flowise byte-exact");
    assert_eq!(
        seen.header("content-type"),
        Some(format!("multipart/form-data; boundary={boundary}").as_str())
    );
    assert_eq!(w.wait_settled(uid).await, (4, 0), "debited once");

    // Another user naming that conversation in the form is refused, uncharged.
    let before = w.flowise.prediction_count();
    let hijack = multipart(boundary, "mine now", Some(&chat_id), b"x");
    let r = w
        .http
        .post(w.url(&format!("/api/v1/prediction/{FLOW}")))
        .bearer_auth(&other)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(hijack)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);
    assert_eq!(w.flowise.prediction_count(), before, "Flowise never acted");
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_stream_with_flat_memory() {
    let w = World::start().await;
    let (_, token) = w.user_with("bulk", 100, FLOW).await;
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmHWM")
    };
    let before = rss(w.proxy.pid());
    let file: Vec<u8> = vec![b'z'; 9 * 1024 * 1024];
    let boundary = "----fp-bulk";
    let body = bytes::Bytes::from(multipart(boundary, "bulk", None, &file));
    let futs = (0..50).map(|_| {
        let http = w.http.clone();
        let body = body.clone();
        let url = w.url(&format!("/api/v1/prediction/{FLOW}"));
        let token = token.clone();
        async move {
            http.post(url)
                .bearer_auth(token)
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    });
    let statuses = futures::future::join_all(futs).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let peak = rss(w.proxy.pid());
    let grown_mb = peak.saturating_sub(before) / 1024;
    eprintln!("proxy peak RSS grew by {grown_mb} MB over 50 concurrent 9 MiB uploads");
    // Buffered whole, 50 × 9 MiB would be 450 MB.
    assert!(grown_mb < 120, "peak RSS grew by {grown_mb} MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowise_failures_follow_the_route_policy() {
    let w = World::start().await;
    let (uid, token) = w.user_with("policy", 10, FLOW).await;
    w.flowise.set_fail(Fail::Status500);

    // Seed route: the contract's error, never Flowise's body or stack.
    let r = w
        .post(
            "/chat/predict",
            &token,
            &json!({"chatflow_id": FLOW, "question": "hi"}),
        )
        .await;
    assert_eq!(r.status(), 502);
    let text = r.text().await.expect("text");
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        v,
        json!({"detail": "Flowise could not be reached", "code": "upstream_error"})
    );
    assert!(
        !text.contains("stack") && !text.contains("buildChatflow"),
        "{text}"
    );

    // Drop-in route: Flowise's status and shape, without the stack.
    let r = w
        .post(
            &format!("/api/v1/prediction/{FLOW}"),
            &token,
            &json!({"question": "hi"}),
        )
        .await;
    assert_eq!(r.status(), 500);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["statusCode"], 500, "{v}");
    assert!(v.get("stack").is_none(), "{v}");

    // An error event inside a seed stream loses Flowise's internal message.
    w.flowise.set_fail(Fail::ErrorEvent);
    let r = w
        .post(
            "/chat/predict",
            &token,
            &json!({"chatflow_id": FLOW, "question": "hi", "streaming": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("text");
    assert!(text.contains("\"code\":\"upstream_error\""), "{text}");
    assert!(!text.contains("buildChatflow"), "{text}");
    assert_eq!(
        w.wait_settled(uid).await,
        (10, 0),
        "failures are not charged"
    );
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flowise_key_never_leaves_the_proxy() {
    let w = World::start().await;
    w.add_user("root", "admin", 10);
    let admin = w.login("root").await;
    let key = support::flowise::DEFAULT_API_KEY;
    for path in [
        "/api/v1/apikey",
        "/api/v1/apikey/",
        "/api/v1/credentials",
        "/api/v1/variables",
        "/api/v1/APIKEY",
    ] {
        let r = w.get(path, &admin).await;
        assert_eq!(r.status(), 403, "{path} is refused to admins too");
        assert!(!r.text().await.expect("text").contains(key));
    }
    let r = w
        .post(
            &format!("/api/v1/prediction/{FLOW}"),
            &admin,
            &json!({"question": "hi"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    for path in [
        "/api/v1/ping".to_string(),
        "/api/v1/chatflows".to_string(),
        format!("/api/v1/chatflows/{FLOW}"),
        format!("/api/v1/public-chatbotConfig/{FLOW}"),
        format!("/api/v1/chatflows-streaming/{FLOW}"),
        format!("/api/v1/chatmessage/{FLOW}"),
        "/api/v1/version".to_string(),
        "/api/v1/nodes".to_string(),
    ] {
        let r = w.get(&path, &admin).await;
        let headers = format!("{:?}", r.headers());
        let text = r.text().await.expect("text");
        assert!(
            !text.contains(key) && !headers.contains(key),
            "{path}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_before_flowise_answers_frees_its_hold() {
    // Flowise never answers (as 3.1.2 does for an unknown chatflow with
    // streaming on); only the client leaving can end the request early.
    let w = World::start_with(|o| o.env("UPSTREAM_READ_TIMEOUT_MS", "300000")).await;
    let (uid, token) = w.user_with("quitter", 5, FLOW).await;
    w.flowise.set_fail(Fail::Hang);
    let mut conn = connect(&w.proxy.base_url).await;
    let body = json!({"question": "anyone there?", "streaming": true});
    conn.get_mut()
        .write_all(&post(&format!("/api/v1/prediction/{FLOW}"), &token, &body))
        .await
        .expect("write");
    // The hold is placed and Flowise has the request...
    let deadline = std::time::Instant::now() + WAIT;
    while w.flowise.prediction_count() == 0 || w.balance(uid).await.1 == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "request never reached Flowise"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...then the client goes away.
    drop(conn);
    assert_eq!(
        w.wait_settled(uid).await,
        (5, 0),
        "voided long before the 300 s read timeout"
    );
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_file_reads_forward_only_the_checked_query() {
    let w = World::start().await;
    let (_, token) = w.user_with("reader", 5, FLOW).await;
    let r = w
        .post(
            &format!("/api/v1/prediction/{FLOW}"),
            &token,
            &json!({"question": "hi", "chatId": "reader-chat-1"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = w
        .get(
            &format!(
                "/api/v1/get-upload-file?chatflowId={FLOW}&chatId=reader-chat-1&fileName=..%2F..%2F..%2F..%2Fetc%2Fpasswd"
            ),
            &token,
        )
        .await;
    assert_eq!(r.status(), 422, "a path in fileName is refused");
    w.flowise.clear_requests();
    let other = support::flowise::SECOND_CHATFLOW_ID;
    let _ = w
        .get(
            &format!(
                "/api/v1/get-upload-file?chatflowId={FLOW}&chatId=reader-chat-1&fileName=a.txt\
                 &chatflowId={other}&chatId=someone-else&extra=1"
            ),
            &token,
        )
        .await;
    let seen: Vec<_> = w
        .flowise
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/get-upload-file"))
        .collect();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].query.as_deref(),
        Some(format!("chatflowId={FLOW}&chatId=reader-chat-1&fileName=a.txt").as_str()),
        "Flowise sees the checked values only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_byte_and_stream_idle_limits_are_separate() {
    // 1.5 s for an answer to begin; 20 s between the pieces of a begun stream.
    let w = World::start_with(|o| {
        o.env("UPSTREAM_FIRST_BYTE_TIMEOUT_MS", "1500")
            .env("UPSTREAM_READ_TIMEOUT_MS", "20000")
    })
    .await;
    let (uid, token) = w.user_with("timer", 5, FLOW).await;
    w.flowise.set_fail(Fail::Hang);
    let started = std::time::Instant::now();
    let r = w
        .post(
            &format!("/api/v1/prediction/{FLOW}"),
            &token,
            &json!({"question": "hello?", "streaming": true}),
        )
        .await;
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["code"], "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answered after {:?}, not after the 20 s read timeout",
        started.elapsed()
    );
    // A stream that began may pause longer than the first-byte limit.
    w.flowise.set_fail(Fail::None);
    w.flowise.set_token_delay(Duration::from_millis(2500));
    let r = w
        .post(
            &format!("/api/v1/prediction/{FLOW}"),
            &token,
            &json!({"question": "one two", "streaming": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("text");
    assert!(text.contains("\"event\":\"end\""), "{text}");
    assert_eq!(
        w.wait_settled(uid).await,
        (4, 0),
        "the timeout voided, the stream captured"
    );
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voided_credits_are_counted() {
    let w = World::start().await;
    let (uid, token) = w.user_with("voided", 5, FLOW).await;
    w.flowise.set_fail(Fail::Status500);
    for _ in 0..3 {
        let r = w
            .post(
                &format!("/api/v1/prediction/{FLOW}"),
                &token,
                &json!({"question": "hi"}),
            )
            .await;
        assert_eq!(r.status(), 500);
    }
    assert_eq!(w.wait_settled(uid).await, (5, 0));
    // The counter moves just after the settlement is written: poll, bounded.
    let deadline = std::time::Instant::now() + WAIT;
    let voided = loop {
        let text = w
            .http
            .get(format!("{}/metrics", w.proxy.metrics_url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let voided: f64 = text
            .lines()
            .find(|l| l.starts_with("flowise_proxy_credits_total{kind=\"voided\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .expect("voided series");
        if voided >= 3.0 || std::time::Instant::now() > deadline {
            break voided;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(voided, 3.0, "three holds of 1 credit given back");
}
