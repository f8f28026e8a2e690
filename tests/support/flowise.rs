//! A test double of Flowise 3.1.2: a real HTTP server (axum on 127.0.0.1:0)
//! inside the test process, answering in the shapes of the wire captures in
//! `shared/flowise/*.txt`.
//!
//! ```ignore
//! let flowise = support::flowise::start(FlowiseConfig::default()).await;
//! // ... point the proxy at flowise.url ...
//! flowise.set_token_delay(Duration::from_millis(300));
//! flowise.set_fail(Fail::CloseMidStream);
//! assert_eq!(flowise.prediction_count(), 1);
//! ```
//!
//! Every request is recorded (also those rejected) before it is answered.
//! The `Fail` modes and delays apply to predictions that would otherwise
//! succeed (known chatflow, valid key); validation and auth errors answer as
//! Flowise does regardless.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Id of the default chatflow recorded in the captures.
pub const PEER_TEST_CHATFLOW_ID: &str = "da1d5da2-3232-4684-8e21-7df065e96599";
/// Name of [`PEER_TEST_CHATFLOW_ID`].
pub const PEER_TEST_CHATFLOW_NAME: &str = "peer-test-conversation";
/// Id of the second default chatflow.
pub const SECOND_CHATFLOW_ID: &str = "3c214078-0d1c-49ec-8065-f75dbb219eb9";
/// Name of [`SECOND_CHATFLOW_ID`].
pub const SECOND_CHATFLOW_NAME: &str = "second-test-flow";
/// A well-formed chatflow id that no default config knows.
pub const UNKNOWN_CHATFLOW_ID: &str = "00000000-0000-4000-8000-000000000000";
/// Default Flowise API key.
pub const DEFAULT_API_KEY: &str = "test-flowise-key";

const WORKSPACE_ID: &str = "a77e5438-5898-403a-9d36-cbe970216b60";
const APIKEY_ID: &str = "0378c596-be70-4f06-be86-816452edab9c";
const CREATED: &str = "2026-11-25T21:35:32.000Z";
const UNAUTHORIZED_MSG: &str = "Error: predictionsServices.buildChatflow - Unauthorized";
const CONNECTION_ERROR_MSG: &str = "Error: predictionsServices.buildChatflow - Connection error.";
const BODY_LIMIT: usize = 64 * 1024 * 1024;

/// One chatflow the double knows.
#[derive(Clone, Debug)]
pub struct TestChatflow {
    pub id: String,
    pub name: String,
    /// Flowise stores tags as one string, e.g. `"support;beta"`; `None` → null.
    pub category: Option<String>,
    pub deployed: bool,
    /// Answer of `chatflows-streaming`; a streaming request to a chatflow with
    /// `false` gets the JSON answer, as Flowise does.
    pub is_streaming: bool,
}

impl TestChatflow {
    pub fn new(id: &str, name: &str) -> Self {
        TestChatflow {
            id: id.to_string(),
            name: name.to_string(),
            category: None,
            deployed: false,
            is_streaming: true,
        }
    }
}

#[derive(Clone, Debug)]
pub struct FlowiseConfig {
    pub api_key: String,
    pub chatflows: Vec<TestChatflow>,
}

impl Default for FlowiseConfig {
    /// Key `test-flowise-key`; chatflows [`PEER_TEST_CHATFLOW_ID`]
    /// (`peer-test-conversation`, no category) and [`SECOND_CHATFLOW_ID`]
    /// (`second-test-flow`, category `"test"`), both streaming-capable.
    fn default() -> Self {
        let mut second = TestChatflow::new(SECOND_CHATFLOW_ID, SECOND_CHATFLOW_NAME);
        second.category = Some("test".to_string());
        FlowiseConfig {
            api_key: DEFAULT_API_KEY.to_string(),
            chatflows: vec![
                TestChatflow::new(PEER_TEST_CHATFLOW_ID, PEER_TEST_CHATFLOW_NAME),
                second,
            ],
        }
    }
}

/// How successful predictions misbehave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fail {
    /// Answer normally.
    #[default]
    None,
    /// 500 JSON `Error: predictionsServices.buildChatflow - Connection error.`
    /// (streaming requests too).
    Status500,
    /// Streaming: 200 with an `error` event then `end` (as Flowise when the
    /// LLM is down). Non-streaming: the same 500 JSON as `Status500`.
    ErrorEvent,
    /// Never answer (no status line); the connection stays open.
    Hang,
    /// Streaming: headers and the `start` event, then nothing. Non-streaming:
    /// like `Hang`.
    HangAfterFirstEvent,
    /// Streaming: `start` and the first token, then the connection is cut
    /// (no terminating chunk). Non-streaming: headers with Content-Length and
    /// half of the body, then the connection is cut.
    CloseMidStream,
}

/// One request as the double received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Raw query string without `?`, if any.
    pub query: Option<String>,
    /// All headers, names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// First header of that (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether this is `POST /api/v1/prediction/...`.
    pub fn is_prediction(&self) -> bool {
        self.method == "POST" && self.path.starts_with("/api/v1/prediction")
    }
}

/// Parses a Flowise event stream (`message:\ndata:{json}\n\n` blocks) into
/// the `{"event":..,"data":..}` objects, in order. Comment lines such as
/// `:heartbeat` are skipped.
pub fn parse_sse(text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let data: Vec<&str> = block
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .collect();
        if data.is_empty() {
            continue;
        }
        if let Ok(v) = serde_json::from_str::<Value>(&data.join("\n")) {
            out.push(v);
        }
    }
    out
}

/// The event names of [`parse_sse`], in order.
pub fn sse_event_names(text: &str) -> Vec<String> {
    parse_sse(text)
        .iter()
        .map(|v| v["event"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The token texts Flowise streams for an answer: "MOCK ", "ANSWER: ", then
/// the question's words, each with its trailing space.
pub fn answer_tokens(question: &str) -> Vec<String> {
    let mut t = vec!["MOCK ".to_string(), "ANSWER: ".to_string()];
    t.extend(question.split_inclusive(' ').map(str::to_string));
    t
}

#[derive(Clone, Debug)]
struct StoredMessage {
    id: String,
    role: &'static str,
    chatflowid: String,
    content: String,
    chat_id: String,
    session_id: String,
    created: String,
}

#[derive(Clone, Debug)]
struct StoredFile {
    chatflow_id: String,
    chat_id: String,
    name: String,
    mime: String,
    bytes: Vec<u8>,
}

struct Inner {
    requests: Vec<RecordedRequest>,
    token_delay: Duration,
    response_delay: Duration,
    fail: Fail,
    usage: Option<(u64, u64)>,
    predictions: u64,
    aborted: u64,
    messages: Vec<StoredMessage>,
    files: Vec<StoredFile>,
    last_ts: DateTime<Utc>,
    message_read_delay: Duration,
    message_reads_in_flight: u32,
    message_reads_max_parallel: u32,
    /// Every key is refused (as with a key deleted in Flowise's UI).
    reject_key: bool,
}

struct State {
    cfg: FlowiseConfig,
    inner: Mutex<Inner>,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn chatflow(&self, id: &str) -> Option<&TestChatflow> {
        self.cfg.chatflows.iter().find(|c| c.id == id)
    }

    fn key_ok(&self, headers: &HeaderMap) -> bool {
        let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let key = v.strip_prefix("Bearer ").unwrap_or(v);
        !self.cfg.api_key.is_empty() && key == self.cfg.api_key && !self.lock().reject_key
    }
}

struct Server {
    task: JoinHandle<()>,
    kill: watch::Sender<bool>,
}

/// The running double. Drop stops it.
pub struct TestFlowise {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub addr: SocketAddr,
    state: Arc<State>,
    server: Mutex<Option<Server>>,
}

/// Starts the double on 127.0.0.1:<free port>.
pub async fn start(cfg: FlowiseConfig) -> TestFlowise {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the test Flowise on 127.0.0.1:0");
    let addr = listener
        .local_addr()
        .expect("local_addr of the test Flowise");
    let state = Arc::new(State {
        cfg,
        inner: Mutex::new(Inner {
            requests: Vec::new(),
            token_delay: Duration::ZERO,
            response_delay: Duration::ZERO,
            fail: Fail::None,
            usage: None,
            predictions: 0,
            aborted: 0,
            messages: Vec::new(),
            files: Vec::new(),
            last_ts: Utc::now(),
            message_read_delay: Duration::ZERO,
            message_reads_in_flight: 0,
            message_reads_max_parallel: 0,
            reject_key: false,
        }),
    });
    let server = serve(listener, state.clone());
    TestFlowise {
        url: format!("http://{addr}"),
        addr,
        state,
        server: Mutex::new(Some(server)),
    }
}

fn serve(listener: TcpListener, state: Arc<State>) -> Server {
    let (kill, kill_rx) = watch::channel(false);
    let app = axum::Router::new().fallback(move |req: Request<Body>| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(state, req).await) }
    });
    let listener = KillableListener {
        inner: listener,
        kill: kill_rx,
    };
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("[test flowise] server error: {e}");
        }
    });
    Server { task, kill }
}

impl TestFlowise {
    /// While true, every API key is refused with Flowise's 401 (the key was
    /// deleted in Flowise, or the proxy has the wrong one).
    pub fn set_reject_key(&self, reject: bool) {
        self.state.lock().reject_key = reject;
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.lock().requests.clone()
    }

    /// Only the `POST /api/v1/prediction/...` requests.
    pub fn prediction_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.is_prediction())
            .collect()
    }

    pub fn clear_requests(&self) {
        self.state.lock().requests.clear();
    }

    /// Drops the recorded requests, stored messages and uploads (for a
    /// long-running double, see `examples/flowise_double.rs`).
    pub fn forget(&self) {
        let mut inner = self.state.lock();
        inner.requests.clear();
        inner.messages.clear();
        inner.files.clear();
    }

    /// How many `POST /api/v1/prediction/...` requests arrived whole (whatever
    /// the outcome: rejected, failed, hung or answered).
    pub fn prediction_count(&self) -> u64 {
        self.state.lock().predictions
    }

    /// Requests whose body was cut short by the client (never acted on).
    pub fn aborted_count(&self) -> u64 {
        self.state.lock().aborted
    }

    /// Pause between streamed events (read live before each event).
    pub fn set_token_delay(&self, d: Duration) {
        self.state.lock().token_delay = d;
    }

    /// Pause before a non-streaming prediction answer.
    pub fn set_response_delay(&self, d: Duration) {
        self.state.lock().response_delay = d;
    }

    /// Pause before answering `GET /api/v1/chatmessage/...`.
    pub fn set_message_read_delay(&self, d: Duration) {
        self.state.lock().message_read_delay = d;
    }

    /// The most `GET /api/v1/chatmessage/...` requests that were in progress
    /// at once so far.
    pub fn max_parallel_message_reads(&self) -> u32 {
        self.state.lock().message_reads_max_parallel
    }

    pub fn set_fail(&self, fail: Fail) {
        self.state.lock().fail = fail;
    }

    /// `Some((input, output))`: streams gain a `usageMetadata` event before
    /// `metadata`, JSON answers a top-level `usageMetadata` object.
    pub fn set_usage(&self, usage: Option<(u64, u64)>) {
        self.state.lock().usage = usage;
    }

    /// All stored chat messages (every chatflow), as Flowise's rows.
    pub fn messages(&self) -> Vec<Value> {
        self.state
            .lock()
            .messages
            .iter()
            .map(message_json)
            .collect()
    }

    /// Uploaded attachments: (chatflowId, chatId, fileName, bytes).
    pub fn uploaded_files(&self) -> Vec<(String, String, String, Vec<u8>)> {
        self.state
            .lock()
            .files
            .iter()
            .map(|f| {
                (
                    f.chatflow_id.clone(),
                    f.chat_id.clone(),
                    f.name.clone(),
                    f.bytes.clone(),
                )
            })
            .collect()
    }

    /// Stops the server: the port refuses connections and open connections
    /// (keep-alive ones, running streams) are cut. Waits until the listener
    /// is closed (at most 5 s).
    pub async fn stop(&self) {
        let server = self.server.lock().expect("server mutex").take();
        if let Some(s) = server {
            let _ = s.kill.send(true);
            s.task.abort();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.task).await;
        }
    }

    /// Serves again on the same port after [`stop`](Self::stop), with the
    /// same state (messages, recorded requests, controls).
    pub async fn restart(&self) {
        self.stop().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("[test flowise] rebinding {}: {e}; retrying", self.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebinding the test Flowise on {}: {e}", self.addr),
            }
        };
        let server = serve(listener, self.state.clone());
        *self.server.lock().expect("server mutex") = Some(server);
    }
}

impl Drop for TestFlowise {
    fn drop(&mut self) {
        if let Ok(mut s) = self.server.lock() {
            if let Some(s) = s.take() {
                let _ = s.kill.send(true);
                s.task.abort();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Listener whose connections can be cut at once
// ---------------------------------------------------------------------------

struct KillableListener {
    inner: TcpListener,
    kill: watch::Receiver<bool>,
}

impl axum::serve::Listener for KillableListener {
    type Io = KillableIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let mut rx = self.kill.clone();
                    let killed = Box::pin(async move {
                        let _ = rx.wait_for(|k| *k).await;
                    });
                    return (
                        KillableIo {
                            inner: stream,
                            killed,
                            dead: false,
                        },
                        addr,
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

struct KillableIo {
    inner: TcpStream,
    killed: Pin<Box<dyn Future<Output = ()> + Send>>,
    dead: bool,
}

impl KillableIo {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        if self.dead {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "test Flowise stopped",
            ))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for KillableIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------

async fn handle(state: Arc<State>, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(e) => {
            // Like Flowise (Express's body parser: "request aborted"), a request
            // whose body never completed is not acted on, and not recorded.
            eprintln!("[test flowise] reading request body: {e}");
            state.lock().aborted += 1;
            return error_json(400, "request aborted");
        }
    };
    let method = parts.method.clone();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let headers = parts.headers;
    let recorded = RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    };
    {
        let mut inner = state.lock();
        if recorded.is_prediction() {
            inner.predictions += 1;
        }
        inner.requests.push(recorded);
    }

    let q = parse_query(query.as_deref().unwrap_or(""));
    let mut resp = route(&state, &method, &path, &q, &headers, body).await;
    let h = resp.headers_mut();
    h.insert("vary", HeaderValue::from_static("Origin"));
    if method != Method::OPTIONS {
        if let Some(origin) = headers.get("origin") {
            h.insert("access-control-allow-origin", origin.clone());
        }
    }
    resp
}

async fn route(
    state: &Arc<State>,
    method: &Method,
    path: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response<Body> {
    if *method == Method::OPTIONS {
        return preflight(headers);
    }
    let Some(rest) = path.strip_prefix("/api/v1/") else {
        return index_html();
    };
    let segs: Vec<&str> = rest.split('/').collect();
    let authed = state.key_ok(headers);
    match (method.as_str(), segs.as_slice()) {
        ("POST", ["prediction"]) | ("POST", ["prediction", ""]) => error_json(
            412,
            "Error: predictionsController.createPrediction - id not provided!",
        ),
        ("POST", ["prediction", id]) => prediction(state.clone(), id, headers, &body).await,
        ("GET", ["ping"]) => text(StatusCode::OK, "text/html; charset=utf-8", "pong"),
        ("GET", ["version"]) => json_response(200, &serde_json::json!({"version": "3.1.2"})),
        ("GET", ["chatflows"]) | ("GET", ["chatflows", ""]) => {
            if !authed {
                return unauthorized_access();
            }
            let rows: Vec<ChatflowRow> = state.cfg.chatflows.iter().map(chatflow_row).collect();
            match (
                q.get("page").and_then(|p| p.parse::<usize>().ok()),
                q.get("limit").and_then(|l| l.parse::<usize>().ok()),
            ) {
                (Some(page), Some(limit)) => {
                    let total = rows.len();
                    let data: Vec<ChatflowRow> = rows
                        .into_iter()
                        .skip(page.saturating_sub(1) * limit)
                        .take(limit)
                        .collect();
                    json_response(200, &serde_json::json!({"data": data, "total": total}))
                }
                _ => json_response(200, &rows),
            }
        }
        ("GET", ["chatflows", id]) => {
            if !authed {
                return unauthorized_access();
            }
            match state.chatflow(id) {
                Some(c) => json_response(200, &chatflow_row(c)),
                None => error_json(404, &format!("Chatflow {id} not found in the database!")),
            }
        }
        ("GET", ["public-chatbotConfig", id]) => match state.chatflow(id) {
            Some(_) => json_response(
                200,
                &serde_json::json!({
                    "uploads": uploads_config(),
                    "flowData": FLOW_DATA,
                    "isTTSEnabled": false,
                }),
            ),
            None => error_json(
                500,
                &format!(
                    "Error: chatflowsService.getSinglePublicChatbotConfig - Chatflow {id} not found"
                ),
            ),
        },
        ("GET", ["chatflows-streaming", id]) => match state.chatflow(id) {
            Some(c) => json_response(200, &serde_json::json!({"isStreaming": c.is_streaming})),
            None => error_json(
                500,
                &format!(
                    "Error: chatflowsService.checkIfChatflowIsValidForStreaming - Chatflow {id} not found"
                ),
            ),
        },
        ("GET", ["chatflows-uploads", id]) => match state.chatflow(id) {
            Some(_) => json_response(200, &uploads_config()),
            // Not captured; Flowise's shape for a missing chatflow.
            None => error_json(404, &format!("Chatflow {id} not found")),
        },
        ("GET", ["chatmessage", id]) => {
            if !authed {
                return unauthorized_access();
            }
            let delay = {
                let mut inner = state.lock();
                inner.message_reads_in_flight += 1;
                inner.message_reads_max_parallel = inner
                    .message_reads_max_parallel
                    .max(inner.message_reads_in_flight);
                inner.message_read_delay
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut inner = state.lock();
            inner.message_reads_in_flight -= 1;
            let mut rows: Vec<&StoredMessage> = inner
                .messages
                .iter()
                .filter(|m| m.chatflowid == *id)
                .filter(|m| q.get("chatId").is_none_or(|c| *c == m.chat_id))
                .filter(|m| q.get("sessionId").is_none_or(|s| *s == m.session_id))
                .collect();
            if q.get("order").map(|o| o.eq_ignore_ascii_case("DESC")) == Some(true) {
                rows.reverse();
            }
            let rows: Vec<Value> = rows.into_iter().map(message_json).collect();
            drop(inner);
            json_response(200, &rows)
        }
        ("DELETE", ["chatmessage", id]) => {
            if !authed {
                return unauthorized_access();
            }
            let mut inner = state.lock();
            let before = inner.messages.len();
            inner.messages.retain(|m| {
                !(m.chatflowid == *id
                    && q.get("chatId").is_none_or(|c| *c == m.chat_id)
                    && q.get("sessionId").is_none_or(|s| *s == m.session_id))
            });
            let affected = before - inner.messages.len();
            drop(inner);
            json_response(200, &serde_json::json!({"raw": [], "affected": affected}))
        }
        ("POST", ["attachments", chatflow_id, chat_id]) => {
            attachments(state, chatflow_id, chat_id, headers, &body)
        }
        ("GET", ["get-upload-file"]) => {
            let inner = state.lock();
            let found = inner.files.iter().rev().find(|f| {
                Some(&f.chatflow_id) == q.get("chatflowId")
                    && Some(&f.chat_id) == q.get("chatId")
                    && Some(&f.name) == q.get("fileName")
            });
            match found {
                Some(f) => Response::builder()
                    .status(200)
                    .header("content-type", f.mime.as_str())
                    .header(
                        "content-disposition",
                        format!("attachment; filename=\"{}\"", f.name),
                    )
                    .body(Body::from(f.bytes.clone()))
                    .expect("build get-upload-file response"),
                // Not captured.
                None => error_json(404, "Error: get-upload-file - File not found"),
            }
        }
        _ => index_html(),
    }
}

fn preflight(headers: &HeaderMap) -> Response<Body> {
    let mut b = Response::builder()
        .status(204)
        .header("vary", "Origin, Access-Control-Request-Headers")
        .header(
            "access-control-allow-methods",
            "GET,HEAD,PUT,PATCH,POST,DELETE",
        );
    if let Some(o) = headers.get("origin") {
        b = b.header("access-control-allow-origin", o.clone());
    }
    if let Some(h) = headers.get("access-control-request-headers") {
        b = b.header("access-control-allow-headers", h.clone());
    }
    b.header("content-length", "0")
        .body(Body::empty())
        .expect("build preflight response")
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PredictionJson<'a> {
    text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    question: Option<&'a str>,
    chat_id: &'a str,
    chat_message_id: &'a str,
    is_stream_valid: bool,
    session_id: &'a str,
    memory_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage_metadata: Option<Usage>,
}

#[derive(Serialize, Clone, Copy)]
struct Usage {
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Metadata<'a> {
    chat_id: &'a str,
    chat_message_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    question: Option<&'a str>,
    session_id: &'a str,
    memory_type: &'static str,
}

#[derive(Serialize)]
struct Event<'a, T: Serialize> {
    event: &'a str,
    data: T,
}

fn sse_event<T: Serialize>(event: &str, data: T) -> Bytes {
    let json = serde_json::to_string(&Event { event, data }).expect("serialize an SSE event");
    Bytes::from(format!("message:\ndata:{json}\n\n"))
}

fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok() && s.len() == 36
}

async fn prediction(
    state: Arc<State>,
    id: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response<Body> {
    if !is_uuid(id) {
        return error_json(400, "Invalid Chatflow ID");
    }
    let parsed: Value = if body.is_empty() {
        Value::Object(Default::default())
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                let ct = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if ct.contains("json") {
                    return error_json(400, &format!("Unexpected token in JSON: {e}"));
                }
                Value::Object(Default::default())
            }
        }
    };
    let wants_stream = matches!(parsed.get("streaming"), Some(Value::Bool(true)))
        || matches!(parsed.get("streaming"), Some(Value::String(s)) if s == "true");
    let Some(chatflow) = state.chatflow(id).cloned() else {
        if wants_stream {
            // Flowise 3.1.2 never answers this one.
            std::future::pending::<()>().await;
        }
        return error_json(404, &format!("Chatflow {id} not found in the database!"));
    };
    let streaming = wants_stream && chatflow.is_streaming;
    if !state.key_ok(headers) {
        if streaming {
            return stream_response(vec![
                sse_event("error", UNAUTHORIZED_MSG),
                sse_event("end", "[DONE]"),
            ]);
        }
        return error_json(500, UNAUTHORIZED_MSG);
    }

    let (fail, usage, response_delay) = {
        let inner = state.lock();
        (inner.fail, inner.usage, inner.response_delay)
    };
    match fail {
        Fail::Status500 => return error_json(500, CONNECTION_ERROR_MSG),
        Fail::ErrorEvent if streaming => {
            return stream_response(vec![
                sse_event("error", CONNECTION_ERROR_MSG),
                sse_event("end", "[DONE]"),
            ])
        }
        Fail::ErrorEvent => return error_json(500, CONNECTION_ERROR_MSG),
        Fail::Hang => return std::future::pending().await,
        Fail::HangAfterFirstEvent if !streaming => return std::future::pending().await,
        _ => {}
    }

    let question: Option<String> = match parsed.get("question") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    let chat_id = parsed
        .get("chatId")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .or_else(|| {
            parsed
                .pointer("/overrideConfig/sessionId")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let q_text = question.clone().unwrap_or_else(|| "undefined".to_string());
    let answer = format!("MOCK ANSWER: {q_text}");
    let message_id = uuid::Uuid::new_v4().to_string();
    let usage = usage.map(|(i, o)| Usage {
        input_tokens: i,
        output_tokens: o,
        total_tokens: i + o,
    });

    if fail == Fail::None {
        let mut inner = state.lock();
        let t1 = next_ts(&mut inner);
        let t2 = next_ts(&mut inner);
        inner.messages.push(StoredMessage {
            id: uuid::Uuid::new_v4().to_string(),
            role: "userMessage",
            chatflowid: chatflow.id.clone(),
            content: q_text.clone(),
            chat_id: chat_id.clone(),
            session_id: chat_id.clone(),
            created: t1,
        });
        inner.messages.push(StoredMessage {
            id: message_id.clone(),
            role: "apiMessage",
            chatflowid: chatflow.id.clone(),
            content: answer.clone(),
            chat_id: chat_id.clone(),
            session_id: chat_id.clone(),
            created: t2,
        });
    }

    if !streaming {
        if !response_delay.is_zero() {
            tokio::time::sleep(response_delay).await;
        }
        let json = serde_json::to_vec(&PredictionJson {
            text: answer,
            question: question.as_deref(),
            chat_id: &chat_id,
            chat_message_id: &message_id,
            is_stream_valid: false,
            session_id: &chat_id,
            memory_type: "Buffer Memory",
            usage_metadata: usage,
        })
        .expect("serialize the prediction answer");
        if fail == Fail::CloseMidStream {
            let (mut feed, body) = body_feed();
            let half = Bytes::from(json[..json.len() / 2].to_vec());
            tokio::spawn(async move {
                if feed.send(half).await {
                    feed.cut().await;
                }
            });
            return Response::builder()
                .status(200)
                .header("content-type", "application/json; charset=utf-8")
                .header("content-length", json.len().to_string())
                .body(body)
                .expect("build a cut JSON response");
        }
        return Response::builder()
            .status(200)
            .header("content-type", "application/json; charset=utf-8")
            .body(Body::from(json))
            .expect("build the prediction answer");
    }

    let mut events = vec![sse_event("start", "")];
    events.extend(
        answer_tokens(&q_text)
            .into_iter()
            .map(|t| sse_event("token", t)),
    );
    if let Some(u) = usage {
        events.push(sse_event("usageMetadata", u));
    }
    events.push(sse_event(
        "metadata",
        Metadata {
            chat_id: &chat_id,
            chat_message_id: &message_id,
            question: question.as_deref(),
            session_id: &chat_id,
            memory_type: "Buffer Memory",
        },
    ));
    events.push(sse_event("end", "[DONE]"));

    let (mut feed, body) = body_feed();
    tokio::spawn(async move {
        for (i, ev) in events.into_iter().enumerate() {
            if i > 0 {
                let delay = state.lock().token_delay;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                match fail {
                    Fail::HangAfterFirstEvent => {
                        feed.tx.closed().await;
                        return;
                    }
                    Fail::CloseMidStream if i >= 2 => {
                        feed.cut().await;
                        return;
                    }
                    _ => {}
                }
            }
            if !feed.send(ev).await {
                return;
            }
        }
    });
    sse_headers().body(body).expect("build the event stream")
}

/// The sending side of a streamed response body.
struct BodyFeed {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    sent: u64,
    /// Number of chunks hyper had taken when it last found the channel empty.
    idle_after: watch::Receiver<u64>,
}

impl BodyFeed {
    /// Queues a chunk; false if the client is gone.
    async fn send(&mut self, b: Bytes) -> bool {
        self.sent += 1;
        self.tx.send(Ok(b)).await.is_ok()
    }

    /// Cuts the connection after what was sent so far has been written out:
    /// waits until hyper has taken every chunk and asked for more (it then
    /// flushes), then makes the body fail, which makes hyper drop the
    /// connection without finishing the response.
    async fn cut(mut self) {
        let sent = self.sent;
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.idle_after.wait_for(|n| *n >= sent),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = self
            .tx
            .send(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "test Flowise cuts the connection",
            )))
            .await;
    }
}

fn body_feed() -> (BodyFeed, Body) {
    let (tx, rx) = mpsc::channel(4);
    let (idle_tx, idle_rx) = watch::channel(0);
    let stream = ReceiverStream {
        rx,
        taken: 0,
        idle_after: idle_tx,
    };
    (
        BodyFeed {
            tx,
            sent: 0,
            idle_after: idle_rx,
        },
        Body::from_stream(stream),
    )
}

struct ReceiverStream {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
    taken: u64,
    idle_after: watch::Sender<u64>,
}

impl futures::Stream for ReceiverStream {
    type Item = Result<Bytes, io::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => {
                this.taken += 1;
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Pending => {
                this.idle_after.send_replace(this.taken);
                Poll::Pending
            }
            other => other,
        }
    }
}

fn sse_headers() -> axum::http::response::Builder {
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .header("connection", "keep-alive")
        .header("x-accel-buffering", "no")
}

/// A complete event stream, no delays.
fn stream_response(events: Vec<Bytes>) -> Response<Body> {
    let chunks: Vec<Result<Bytes, io::Error>> = events.into_iter().map(Ok).collect();
    sse_headers()
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .expect("build the event stream")
}

fn next_ts(inner: &mut Inner) -> String {
    let mut now = Utc::now();
    if now <= inner.last_ts {
        now = inner.last_ts + chrono::Duration::milliseconds(1);
    }
    // Millisecond precision, as Flowise.
    let now = DateTime::<Utc>::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now);
    let now = if now <= inner.last_ts {
        inner.last_ts + chrono::Duration::milliseconds(1)
    } else {
        now
    };
    inner.last_ts = now;
    now.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MessageRow<'a> {
    id: &'a str,
    role: &'a str,
    chatflowid: &'a str,
    execution_id: Option<()>,
    content: &'a str,
    source_documents: Option<()>,
    used_tools: Option<()>,
    file_annotations: Option<()>,
    agent_reasoning: Option<()>,
    reason_content: Option<()>,
    file_uploads: Option<()>,
    artifacts: Option<()>,
    action: Option<()>,
    chat_type: &'a str,
    chat_id: &'a str,
    memory_type: &'a str,
    session_id: &'a str,
    created_date: &'a str,
    lead_email: Option<()>,
    follow_up_prompts: Option<()>,
    execution: Option<()>,
}

fn message_json(m: &StoredMessage) -> Value {
    serde_json::to_value(MessageRow {
        id: &m.id,
        role: m.role,
        chatflowid: &m.chatflowid,
        execution_id: None,
        content: &m.content,
        source_documents: None,
        used_tools: None,
        file_annotations: None,
        agent_reasoning: None,
        reason_content: None,
        file_uploads: None,
        artifacts: None,
        action: None,
        chat_type: "EXTERNAL",
        chat_id: &m.chat_id,
        memory_type: "Buffer Memory",
        session_id: &m.session_id,
        created_date: &m.created,
        lead_email: None,
        follow_up_prompts: None,
        execution: None,
    })
    .expect("serialize a chat message")
}

const FLOW_DATA: &str = r#"{"nodes":[{"id":"chatOpenAI_0","position":{"x":100,"y":100},"type":"customNode","data":{"label":"OpenAI","name":"chatOpenAI","type":"ChatOpenAI","category":"Chat Models","inputs":{"modelName":"gpt-4o-mini","temperature":0.9,"streaming":true}}},{"id":"bufferMemory_0","position":{"x":100,"y":500},"type":"customNode","data":{"label":"Buffer Memory","name":"bufferMemory","type":"BufferMemory","category":"Memory","inputs":{"sessionId":"","memoryKey":"chat_history"}}},{"id":"conversationChain_0","position":{"x":500,"y":300},"type":"customNode","data":{"label":"Conversation Chain","name":"conversationChain","type":"ConversationChain","category":"Chains","inputs":{"model":"{{chatOpenAI_0.data.instance}}","memory":"{{bufferMemory_0.data.instance}}"}}}],"edges":[{"source":"chatOpenAI_0","target":"conversationChain_0","type":"buttonedge","id":"chatOpenAI_0-conversationChain_0"},{"source":"bufferMemory_0","target":"conversationChain_0","type":"buttonedge","id":"bufferMemory_0-conversationChain_0"}],"viewport":{"x":0,"y":0,"zoom":1}}"#;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ChatflowRow {
    id: String,
    name: String,
    flow_data: &'static str,
    deployed: bool,
    is_public: bool,
    apikeyid: &'static str,
    chatbot_config: Option<()>,
    api_config: Option<()>,
    analytic: Option<()>,
    speech_to_text: Option<()>,
    text_to_speech: Option<()>,
    follow_up_prompts: Option<()>,
    category: Option<String>,
    #[serde(rename = "type")]
    kind: &'static str,
    created_date: &'static str,
    updated_date: &'static str,
    workspace_id: &'static str,
}

fn chatflow_row(c: &TestChatflow) -> ChatflowRow {
    ChatflowRow {
        id: c.id.clone(),
        name: c.name.clone(),
        flow_data: FLOW_DATA,
        deployed: c.deployed,
        is_public: false,
        apikeyid: APIKEY_ID,
        chatbot_config: None,
        api_config: None,
        analytic: None,
        speech_to_text: None,
        text_to_speech: None,
        follow_up_prompts: None,
        category: c.category.clone(),
        kind: "CHATFLOW",
        created_date: CREATED,
        updated_date: CREATED,
        workspace_id: WORKSPACE_ID,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UploadsConfig {
    is_speech_to_text_enabled: bool,
    is_image_upload_allowed: bool,
    #[serde(rename = "isRAGFileUploadAllowed")]
    is_rag_file_upload_allowed: bool,
    img_upload_size_and_types: Vec<()>,
    file_upload_size_and_types: Vec<()>,
}

fn uploads_config() -> UploadsConfig {
    UploadsConfig {
        is_speech_to_text_enabled: false,
        is_image_upload_allowed: false,
        is_rag_file_upload_allowed: false,
        img_upload_size_and_types: vec![],
        file_upload_size_and_types: vec![],
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AttachmentItem {
    name: String,
    mime_type: String,
    size: usize,
    content: String,
}

fn attachments(
    state: &Arc<State>,
    chatflow_id: &str,
    chat_id: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response<Body> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let mut files: Vec<(String, String, Vec<u8>)> = Vec::new();
    if let Some(boundary) = multipart_boundary(&ct) {
        files = parse_multipart(body, &boundary);
    }
    if files.is_empty() {
        let name = headers
            .get("x-filename")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("upload.bin")
            .to_string();
        let mime = ct.split(';').next().unwrap_or("").trim().to_string();
        files.push((name, mime, body.to_vec()));
    }
    let mut items = Vec::new();
    let mut inner = state.lock();
    for (name, mime, bytes) in files {
        items.push(AttachmentItem {
            name: name.clone(),
            mime_type: mime.clone(),
            size: bytes.len(),
            content: String::from_utf8_lossy(&bytes).into_owned(),
        });
        inner.files.push(StoredFile {
            chatflow_id: chatflow_id.to_string(),
            chat_id: chat_id.to_string(),
            name,
            mime,
            bytes,
        });
    }
    drop(inner);
    json_response(200, &items)
}

fn multipart_boundary(ct: &str) -> Option<String> {
    if !ct.to_ascii_lowercase().starts_with("multipart/") {
        return None;
    }
    ct.split(';').map(str::trim).find_map(|p| {
        p.strip_prefix("boundary=")
            .map(|b| b.trim_matches('"').to_string())
    })
}

/// (filename, content type, bytes) of every part that has a filename.
fn parse_multipart(body: &[u8], boundary: &str) -> Vec<(String, String, Vec<u8>)> {
    let delim = format!("--{boundary}").into_bytes();
    let mut out = Vec::new();
    let mut positions = Vec::new();
    let mut i = 0;
    while i + delim.len() <= body.len() {
        if body[i..].starts_with(&delim) {
            positions.push(i);
            i += delim.len();
        } else {
            i += 1;
        }
    }
    for w in positions.windows(2) {
        let part = &body[w[0] + delim.len()..w[1]];
        let part = part.strip_prefix(b"\r\n").unwrap_or(part);
        let part = part.strip_suffix(b"\r\n").unwrap_or(part);
        let Some(split) = part.windows(4).position(|x| x == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&part[..split]).to_string();
        let data = part[split + 4..].to_vec();
        let mut filename = None;
        let mut mime = "application/octet-stream".to_string();
        for line in head.lines() {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("content-disposition:") {
                filename = line.split(';').map(str::trim).find_map(|p| {
                    p.strip_prefix("filename=")
                        .map(|f| f.trim_matches('"').to_string())
                });
            } else if lower.starts_with("content-type:") {
                mime = line["content-type:".len()..].trim().to_string();
            }
        }
        if let Some(f) = filename {
            out.push((f, mime, data));
        }
    }
    out
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response<T: Serialize + ?Sized>(status: u16, v: &T) -> Response<Body> {
    let body = serde_json::to_vec(v).expect("serialize a JSON answer");
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .body(Body::from(body))
        .expect("build a JSON answer")
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody<'a> {
    status_code: u16,
    success: bool,
    message: &'a str,
    stack: serde_json::Map<String, Value>,
}

/// Flowise's error shape: `{"statusCode":N,"success":false,"message":M,"stack":{}}`.
fn error_json(status: u16, message: &str) -> Response<Body> {
    json_response(
        status,
        &ErrorBody {
            status_code: status,
            success: false,
            message,
            stack: Default::default(),
        },
    )
}

fn unauthorized_access() -> Response<Body> {
    json_response(401, &serde_json::json!({"error": "Unauthorized Access"}))
}

fn text(status: StatusCode, content_type: &str, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Body::from(body))
        .expect("build a text answer")
}

const INDEX_HTML: &str = "<!DOCTYPE html>\n<html lang=\"en\">\n    <head>\n        <title>Flowise - Build AI Agents, Visually</title>\n        <link rel=\"icon\" href=\"favicon.ico\" />\n        <meta charset=\"utf-8\" />\n        <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\" />\n    </head>\n    <body>\n        <noscript>You need to enable JavaScript to run this app.</noscript>\n        <div id=\"root\"></div>\n    </body>\n</html>\n";

/// The UI's index.html, which Flowise answers for any unknown path.
fn index_html() -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", "text/html; charset=UTF-8")
        .header("cache-control", "public, max-age=0")
        .header("accept-ranges", "bytes")
        .body(Body::from(INDEX_HTML))
        .expect("build index.html")
}
