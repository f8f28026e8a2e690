//! Client limits (issue 9, point 11): idle keep-alive, slow heads and bodies,
//! oversized heads, the connection cap, memory after many connections close.
//! Raw TCP clients, so the test sees exactly what the proxy does with the
//! connection.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use support::flowise::PEER_TEST_CHATFLOW_ID as FLOW;
use support::setup::World;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One parsed response.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

async fn connect(w: &World) -> TcpStream {
    tokio::time::timeout(
        Duration::from_secs(10),
        TcpStream::connect(("127.0.0.1", w.proxy.port)),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

/// Reads one response with a Content-Length body (all the proxy's own
/// answers have one). `None` if the connection ended first or `limit` passed.
async fn read_response(stream: &mut TcpStream, limit: Duration) -> Option<Response> {
    tokio::time::timeout(limit, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(len)) = resp.parse(&buf) {
                let status = resp.code?;
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let length: usize = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < len + length {
                    let n = stream.read(&mut chunk).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                return Some(Response {
                    status,
                    headers,
                    body: buf[len..len + length].to_vec(),
                });
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .ok()
    .flatten()
}

/// Waits until the proxy closes the connection (EOF or reset), discarding
/// whatever it still sends; `None` if it is still open after `limit`.
async fn wait_closed(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut sink = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// Keeps sending `byte` every `every` until the connection breaks.
fn trickle(mut writer: tokio::net::tcp::OwnedWriteHalf, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if writer.write_all(b"a").await.is_err() {
                return;
            }
        }
    });
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connections_are_closed() {
    let w = World::start_with(|o| o.env("KEEPALIVE_TIMEOUT_SECONDS", "2")).await;
    let mut conn = connect(&w).await;
    for _ in 0..2 {
        conn.write_all(get("/").as_bytes()).await.expect("send");
        let r = read_response(&mut conn, Duration::from_secs(10))
            .await
            .expect("an answer");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
    // Now idle: closed after about 2 s, not before, and certainly not never.
    let idle = wait_closed(&mut conn, Duration::from_secs(15))
        .await
        .expect("an idle keep-alive connection must be closed after KEEPALIVE_TIMEOUT_SECONDS");
    assert!(
        idle >= Duration::from_millis(1800),
        "closed after {idle:?}: keep-alive must last its timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_trickling_in_is_cut_at_the_header_deadline() {
    let w = World::start_with(|o| o.env("REQUEST_HEADER_TIMEOUT_MS", "2000")).await;
    let conn = connect(&w).await;
    let started = Instant::now();
    let (mut reader, mut writer) = conn.into_split();
    writer
        .write_all(b"GET / HTTP/1.1\r\nHost: proxy\r\nX-Slow: ")
        .await
        .expect("send");
    // One header byte every 300 ms: each read is quick, the head never ends.
    trickle(writer, Duration::from_millis(300));
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), reader.read_to_end(&mut answer)).await;
    let elapsed = started.elapsed();
    assert!(
        read.is_ok(),
        "a head trickling in must be cut at REQUEST_HEADER_TIMEOUT_MS; still open after {elapsed:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(1800),
        "cut after {elapsed:?}, before the deadline"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickling_in_is_cut_but_a_slow_answer_is_not() {
    let w = World::start_with(|o| o.env("REQUEST_BODY_TIMEOUT_MS", "2000")).await;

    // A body sent in time (chunked, in two chunks), answered slowly: a
    // stream lasting longer than the body deadline. The deadline ends with
    // the body, so the stream is not cut.
    let (_, token) = w.user_with("slowanswer", 10, FLOW).await;
    w.flowise.set_token_delay(Duration::from_millis(400));
    let body = json!({"question": "one two three four five six seven", "streaming": true})
        .to_string()
        .into_bytes();
    let (first, second) = body.split_at(10);
    let chunks = vec![Ok::<_, std::io::Error>(first.to_vec()), Ok(second.to_vec())];
    let started = Instant::now();
    let r = support::proxy::streaming_client()
        .post(w.url(&format!("/api/v1/prediction/{FLOW}")))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = Vec::new();
    while let Some(c) = body.next().await {
        text.extend_from_slice(&c.expect("the stream must not be cut"));
    }
    assert!(started.elapsed() > Duration::from_millis(2500));
    assert!(String::from_utf8_lossy(&text).contains("\"event\":\"end\""));

    // A body trickling in: cut at the deadline.
    let conn = connect(&w).await;
    let started = Instant::now();
    let (mut reader, mut writer) = conn.into_split();
    writer
        .write_all(
            b"POST /chat/authenticate HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n\
              Content-Length: 200\r\n\r\n{",
        )
        .await
        .expect("send");
    trickle(writer, Duration::from_millis(300));
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), reader.read_to_end(&mut answer)).await;
    let elapsed = started.elapsed();
    assert!(
        read.is_ok(),
        "a body trickling in must be cut at REQUEST_BODY_TIMEOUT_MS; still open after {elapsed:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(1800),
        "cut after {elapsed:?}, before the deadline"
    );
    eprintln!("slow body answered: {:?}", String::from_utf8_lossy(&answer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_are_refused() {
    // Default MAX_HEADER_BYTES: 65536.
    let w = World::start().await;
    let request = |filler: usize| {
        format!(
            "GET / HTTP/1.1\r\nHost: proxy\r\nX-Filler: {}\r\n\r\n",
            "x".repeat(filler)
        )
    };

    let mut conn = connect(&w).await;
    conn.write_all(request(32 * 1024).as_bytes())
        .await
        .expect("send");
    let r = read_response(&mut conn, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert_eq!(r.status, 200, "a 32 KiB head is within the limit");

    // 1 MB, as in the report: refused, and the client reads the answer (no
    // reset although it was still sending).
    let mut conn = connect(&w).await;
    let (mut reader, mut writer) = conn.split();
    let big = request(1024 * 1024);
    let (_, answer) = tokio::join!(writer.write_all(big.as_bytes()), async {
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(15), reader.read_to_end(&mut answer)).await;
        answer
    });
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    assert!(text.contains("\"code\":\"header_too_large\""), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_cap_new_connections_are_answered_at_once() {
    const CAP: usize = 20;
    let w = World::start_with(|o| o.env("MAX_CONNECTIONS", CAP.to_string())).await;
    // Open keep-alive connections (one request each, then idle) until the
    // proxy refuses one. The test's HTTP client may hold a pooled
    // connection or two of its own, which count too.
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..CAP + 5 {
        let mut conn = connect(&w).await;
        let asked = Instant::now();
        conn.write_all(get("/health").as_bytes())
            .await
            .expect("send");
        let r = read_response(&mut conn, Duration::from_secs(10))
            .await
            .expect("every connection gets an answer, promptly");
        if r.status == 503 {
            refused = Some((r, asked.elapsed(), conn));
            break;
        }
        assert_eq!(r.status, 200);
        held.push(conn);
    }
    let Some((r, took, mut conn)) = refused else {
        panic!("{} connections held open, none refused", held.len());
    };
    assert!(
        held.len() <= CAP && held.len() + 3 >= CAP,
        "refused after {} connections, cap {CAP}",
        held.len()
    );
    assert!(took < Duration::from_secs(5), "refusal took {took:?}");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.json()["code"], "unavailable");
    assert!(wait_closed(&mut conn, Duration::from_secs(10))
        .await
        .is_some());

    // Connections freed: /health answers again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut conn = connect(&w).await;
        conn.write_all(get("/health").as_bytes())
            .await
            .expect("send");
        let r = read_response(&mut conn, Duration::from_secs(10)).await;
        if r.as_ref().map(|r| r.status) == Some(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/health still refused after the connections closed: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The proxy's resident set, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The RSS once two readings 500 ms apart differ by less than 256 KiB.
async fn settled_rss(pid: u32) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = rss_kib(pid);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_kib(pid);
        if now.abs_diff(last) < 256 {
            return now;
        }
        last = now;
    }
    last
}

/// Opens `n` connections, each with one answered request, and keeps them.
async fn open_idle(w: &World, n: usize) -> Vec<TcpStream> {
    let mut all = Vec::with_capacity(n);
    let batches: Vec<_> = (0..n).collect();
    for batch in batches.chunks(250) {
        let opened = futures::future::join_all(batch.iter().map(|_| async {
            let mut conn = connect(w).await;
            conn.write_all(get("/").as_bytes()).await.expect("send");
            let r = read_response(&mut conn, Duration::from_secs(30))
                .await
                .expect("an answer");
            assert_eq!(r.status, 200);
            conn
        }))
        .await;
        all.extend(opened);
    }
    all
}

/// Raises this test process's descriptor limit to the hard limit (it holds
/// thousands of connections); returns the soft limit now in force.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux only
fn raise_own_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write one rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            }
        }
    }
    lim.rlim_cur as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_after_many_idle_connections_close() {
    // The report's figure. About 5 s here (debug build, loopback).
    const CONNECTIONS: usize = 5000;
    let fd_limit = raise_own_fd_limit();
    assert!(
        fd_limit >= CONNECTIONS as u64 + 1024,
        "this test needs an open-file limit of at least {} (ulimit -Hn), not {fd_limit}",
        CONNECTIONS + 1024
    );
    let w = World::start().await;
    let pid = w.proxy.pid();
    // Warm up (lazy statics, runtime threads, pools); the baseline is the
    // RSS once the warm-up's connections are gone and it has settled.
    drop(open_idle(&w, 300).await);
    let baseline = settled_rss(pid).await;

    let held = open_idle(&w, CONNECTIONS).await;
    let peak = rss_kib(pid);
    let growth = peak.saturating_sub(baseline);
    assert!(
        growth > 20 * 1024,
        "{CONNECTIONS} connections grew RSS by only {growth} KiB: the test measures nothing"
    );
    drop(held);

    // Back near the baseline: within a tenth of what the connections took
    // (measured: 38 MB baseline, 255 MB with 5,000 connections, 27 MB after;
    // without the trim it stayed at the peak). With only the trimmer's
    // thread giving memory back, the workers' heaps kept 5-17 MB above the
    // baseline, and CI once failed here at 18 MB over a 17 MB tolerance;
    // with each worker giving its own back, 2-10 MB above or below it.
    let tolerance = growth / 10;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut now = rss_kib(pid);
    while now > baseline + tolerance && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        now = rss_kib(pid);
    }
    eprintln!("RSS: baseline {baseline} KiB, {CONNECTIONS} idle connections {peak} KiB, after close {now} KiB");
    assert!(
        now <= baseline + tolerance,
        "RSS {now} KiB after {CONNECTIONS} connections closed; baseline {baseline} KiB, peak {peak} KiB"
    );
}

/// Every password check allocates argon2's 19 MiB on a password thread.
/// Once the logins are over that memory is the system's again: logins do
/// not leave the proxy larger (with mimalloc and nothing handing the blocks
/// back, 80 logins left it 41 MB larger, a 19 MiB block per password
/// thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_after_logins() {
    let w = World::start_with(|o| o.env("LOGIN_ATTEMPTS_PER_MINUTE", "1000")).await;
    let pid = w.proxy.pid();
    w.add_user("argon", "user", 0);
    let baseline = settled_rss(pid).await;
    for _ in 0..3 {
        futures::future::join_all((0..8).map(|_| w.login("argon"))).await;
    }
    let after = settled_rss(pid).await;
    let growth = after.saturating_sub(baseline);
    assert!(
        growth < 12 * 1024,
        "24 logins left RSS {growth} KiB above its {baseline} KiB before them"
    );
}
