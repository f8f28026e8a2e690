//! The edge: streaming, credentials, upstream failures, body limits, health, shutdown.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use support::flowise::{Fail, PEER_TEST_CHATFLOW_ID as FLOW};
use support::setup::World;

fn prediction_path() -> String {
    format!("/api/v1/prediction/{FLOW}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_info_and_request_id() {
    let w = World::start().await;
    let r = w.http.get(w.url("/")).send().await.expect("get /");
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-request-id").is_some());
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["service"], "flowise-proxy");
    assert_eq!(v["status"], "running");

    let r = w
        .http
        .get(w.url("/info"))
        .header("X-Request-Id", "abc-123")
        .send()
        .await
        .expect("info");
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let text = r.text().await.expect("text");
    assert!(
        !text.contains(&w.flowise.url),
        "info must not reveal upstream URLs"
    );
    assert!(!text.contains("test-flowise-key"));

    let r = w.http.get(w.url("/nope")).send().await.expect("404");
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["code"], "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_arrives_unbuffered_and_credentials_are_swapped() {
    let w = World::start().await;
    let (_, token) = w.user_with("streamer", 10, FLOW).await;
    w.flowise.set_token_delay(Duration::from_millis(300));
    let started = Instant::now();
    let r = support::proxy::streaming_client()
        .post(w.url(&prediction_path()))
        .bearer_auth(&token)
        .json(&json!({"question": "one two three four", "streaming": true}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert!(r.headers().get("x-credits-remaining").is_some());
    let mut body = r.bytes_stream();
    let first = body.next().await.expect("first chunk").expect("chunk");
    let first_at = started.elapsed();
    let mut all = first.to_vec();
    while let Some(c) = body.next().await {
        all.extend_from_slice(&c.expect("chunk"));
    }
    let end_at = started.elapsed();
    let text = String::from_utf8(all).expect("utf8");
    assert!(
        text.contains("message:\ndata:{\"event\":\"start\""),
        "{text}"
    );
    assert!(text.contains("\"event\":\"end\""));
    // Events are 300 ms apart: the first one must arrive long before the last.
    assert!(
        first_at + Duration::from_millis(900) < end_at,
        "first chunk at {first_at:?}, end at {end_at:?}: the stream was buffered"
    );

    let req = w
        .flowise
        .prediction_requests()
        .pop()
        .expect("flowise saw the prediction");
    assert_eq!(req.header("authorization"), Some("Bearer test-flowise-key"));
    assert!(
        req.headers.iter().all(|(_, v)| !v.contains(&token)),
        "client token leaked upstream"
    );
    assert!(req.header("x-request-id").is_some());
    assert!(req.header("x-forwarded-for").is_some());
    assert!(!text.contains("test-flowise-key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gives_502_and_hang_gives_504() {
    let w = World::start_with(|o| o.env("UPSTREAM_READ_TIMEOUT_MS", "1500")).await;
    let (user, token) = w.user_with("waiter", 10, FLOW).await;

    w.flowise.set_fail(Fail::Hang);
    let t = Instant::now();
    let r = w
        .post(
            &prediction_path(),
            &token,
            &json!({"question": "hi", "streaming": true}),
        )
        .await;
    assert_eq!(r.status(), 504);
    assert!(t.elapsed() < Duration::from_secs(20));
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["code"], "upstream_timeout");

    w.flowise.set_fail(Fail::None);
    w.flowise.stop().await;
    for path in ["/api/v1/ping"] {
        let r = w.get(path, &token).await;
        assert_eq!(r.status(), 502, "{path}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["code"], "upstream_error");
        assert!(
            !v.to_string().contains("127.0.0.1"),
            "no upstream URL in errors"
        );
    }
    let r = w
        .post(&prediction_path(), &token, &json!({"question": "hi"}))
        .await;
    assert_eq!(r.status(), 502);
    assert_eq!(w.wait_settled(user).await, (10, 0), "nothing charged");
    w.assert_books_balance().await;
}

/// A prediction whose body goes out chunked (no Content-Length), in pieces
/// of `chunk` bytes.
async fn post_chunked(
    w: &World,
    token: &str,
    body: String,
    chunk: usize,
) -> reqwest::Result<reqwest::Response> {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
        .into_bytes()
        .chunks(chunk)
        .map(|c| Ok(c.to_vec()))
        .collect();
    w.http
        .post(w.url(&prediction_path()))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_never_reach_flowise() {
    let w = World::start_with(|o| o.env("MAX_BODY_BYTES", "2000")).await;
    let (_, token) = w.user_with("big", 10, FLOW).await;
    let big = json!({"question": "x".repeat(5000)}).to_string();
    let r = w
        .http
        .post(w.url(&prediction_path()))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["code"], "body_too_large");

    // Chunked, no length: refused once the limit is crossed.
    if let Ok(r) = post_chunked(&w, &token, big, 500).await {
        assert_eq!(r.status(), 413);
    }
    assert_eq!(
        w.flowise.prediction_count(),
        0,
        "Flowise saw an oversized body"
    );

    // Under the limit, chunked: passes whole.
    let small = json!({"question": "small"}).to_string();
    let r = post_chunked(&w, &token, small.clone(), 5)
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let req = w.flowise.prediction_requests().pop().expect("seen");
    assert_eq!(req.body, small.into_bytes(), "body passed byte-identical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database() {
    let cluster = support::pg::PrivateCluster::start().await;
    let admin = support::pg::connect(&cluster.url("postgres")).await;
    admin
        .batch_execute("CREATE DATABASE proxy")
        .await
        .expect("create db");
    let flowise = support::flowise::start(Default::default()).await;
    let proxy = support::proxy::start(support::proxy::ProxyOptions::new(
        cluster.url("proxy"),
        flowise.url.clone(),
    ))
    .await;
    let http = support::proxy::client();
    // Waits until /health answers `want`.
    let health_turns = |want: u16, secs: u64| {
        let (http, url) = (http.clone(), format!("{}/health", proxy.base_url));
        support::wait_until(Duration::from_secs(secs), move || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                http.get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == want)
            }
        })
    };
    assert!(health_turns(200, 20).await, "never healthy");
    tokio::task::block_in_place(|| cluster.stop());
    assert!(
        health_turns(503, 20).await,
        "health stayed 200 with the database down"
    );
    tokio::task::block_in_place(|| cluster.start_again());
    assert!(health_turns(200, 30).await, "never recovered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams() {
    let w = World::start().await;
    let (_, token) = w.user_with("drain", 10, FLOW).await;
    w.flowise.set_token_delay(Duration::from_millis(300));
    let r = support::proxy::streaming_client()
        .post(w.url(&prediction_path()))
        .bearer_auth(&token)
        .json(&json!({"question": "a b c d e f", "streaming": true}))
        .send()
        .await
        .expect("send");
    let mut body = r.bytes_stream();
    let mut all = body.next().await.expect("first").expect("chunk").to_vec();
    w.proxy.sigterm();
    // The signal lands asynchronously: /health turns 503 soon after (or the
    // listener is already gone).
    assert!(
        support::wait_until(Duration::from_secs(10), || async {
            match w.http.get(w.url("/health")).send().await {
                Ok(r) => r.status() == 503,
                Err(_) => true,
            }
        })
        .await,
        "health must turn 503 while draining"
    );
    while let Some(c) = body.next().await {
        all.extend_from_slice(&c.expect("stream cut by SIGTERM"));
    }
    let text = String::from_utf8(all).expect("utf8");
    assert!(
        text.contains("\"event\":\"end\""),
        "stream did not finish: {text}"
    );
    let status = w
        .proxy
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exited");
    assert!(status.success(), "exit status {status:?}");
    // The whole run's log, read to its end: nothing in it says the settings
    // file given with -c was ignored (Pingora warned so when handed its path
    // after the proxy had read it).
    assert!(
        w.proxy.wait_output_complete(Duration::from_secs(10)).await,
        "output not read to the end"
    );
    let misleading = w
        .proxy
        .stderr_lines_containing("Ignoring command line argument");
    assert!(misleading.is_empty(), "{misleading:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exposed() {
    let w = World::start().await;
    w.http.get(w.url("/")).send().await.expect("get");
    let text = w
        .http
        .get(format!("{}/metrics", w.proxy.metrics_url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for name in [
        "flowise_proxy_requests_total",
        "flowise_proxy_request_duration_seconds",
        "flowise_proxy_in_flight_requests",
        "flowise_proxy_upstream_healthy",
        "flowise_proxy_credits_total",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    assert!(
        w.proxy
            .stdout_lines()
            .iter()
            .any(|l| l.contains("\"route\":\"root\"")),
        "access log line"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_never_blocks_requests() {
    let w = World::start().await;
    w.proxy.pause_stdout(true);
    // Far more access-log lines than a pipe holds (64 KiB, ~250 lines).
    let http = support::proxy::client();
    for chunk in 0..60 {
        let futs = (0..100).map(|_| {
            let http = http.clone();
            let url = w.url("/");
            async move {
                tokio::time::timeout(Duration::from_secs(20), http.get(url).send())
                    .await
                    .map(|r| r.map(|r| r.status().as_u16()).unwrap_or(0))
                    .unwrap_or(0)
            }
        });
        let statuses = futures::future::join_all(futs).await;
        assert!(
            statuses.iter().all(|s| *s == 200),
            "batch {chunk}: requests blocked behind the log: {statuses:?}"
        );
    }
    let metrics = http
        .get(format!("{}/metrics", w.proxy.metrics_url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let dropped: f64 = metrics
        .lines()
        .find(|l| l.starts_with("flowise_proxy_access_log_dropped_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("dropped counter");
    assert!(dropped > 0.0, "lost lines are counted");
    w.proxy.pause_stdout(false);
    assert!(
        w.proxy
            .wait_for_stdout(
                |l| l.contains("\"route\":\"root\""),
                Duration::from_secs(20)
            )
            .await,
        "logging resumes"
    );
}

/// A client that goes away before its answer is the client's doing: the
/// access log records the request, the error log has no line for it (one
/// ERROR line per closed browser tab drowns the real ones). A Flowise
/// failure still is an ERROR line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_walking_away_is_no_error_in_the_log() {
    use tokio::io::AsyncWriteExt;
    let w = World::start().await;
    let (user, token) = w.user_with("leaver", 10, FLOW).await;
    w.flowise.set_fail(Fail::Hang);
    let body = r#"{"question":"hi"}"#;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", w.proxy.port))
        .await
        .expect("connect");
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        prediction_path(),
        body.len()
    );
    conn.write_all(request.as_bytes()).await.expect("write");
    assert!(
        support::wait_until(Duration::from_secs(20), || async {
            w.flowise
                .requests()
                .iter()
                .any(|r| r.path.contains("/prediction/"))
        })
        .await,
        "the prediction never reached Flowise"
    );
    drop(conn);
    let logged = format!("\"user_id\":{user}");
    assert!(
        w.proxy
            .wait_for_stdout(|l| l.contains(&logged), Duration::from_secs(20))
            .await,
        "no access log line for the request whose client went away:\n{}",
        w.proxy.output_dump()
    );

    // A Flowise failure afterwards is logged: once its line is there, any
    // line about the client's request (written earlier) is there too.
    w.flowise.set_fail(Fail::None);
    w.flowise.stop().await;
    assert_eq!(w.get("/api/v1/ping", &token).await.status(), 502);
    assert!(
        w.proxy
            .wait_for_stderr(|l| l.contains("Fail to proxy"), Duration::from_secs(20))
            .await,
        "a Flowise failure is no longer logged:\n{}",
        w.proxy.output_dump()
    );
    let about_the_client = w.proxy.stderr_lines_containing("Downstream");
    assert!(
        about_the_client.is_empty(),
        "the client's leaving was logged as an error: {about_the_client:#?}"
    );
}
