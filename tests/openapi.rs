//! The described API: `/openapi.json` is a valid OpenAPI 3.1 document (checked
//! by a standard validator, `openapi-spec-validator`), lists every route of the
//! route table, and describes what the proxy really answers; `/docs` and its
//! assets are served by the proxy itself, with no reference outside it.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::Method;
use serde_json::{json, Value};
use support::flowise::{PEER_TEST_CHATFLOW_ID as FLOW, UNKNOWN_CHATFLOW_ID};
use support::setup::{password_of, World};

/// The virtualenv `scripts/dev-deps.sh` installs `openapi-spec-validator` into.
fn tools_python() -> PathBuf {
    let python = std::env::var_os("OPENAPI_TOOLS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".local/pytools/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run `bash scripts/dev-deps.sh` (installs openapi-spec-validator)",
        python.display()
    );
    python
}

/// Runs `openapi-spec-validator` on a document: (passed, its output).
fn validate(doc: &Value, dir: &Path, name: &str) -> (bool, String) {
    let file = dir.join(name);
    std::fs::write(&file, serde_json::to_vec(doc).expect("json")).expect("write document");
    let out = Command::new(tools_python())
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("run openapi-spec-validator");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn public_get(w: &World, path: &str) -> reqwest::Response {
    let r = w
        .http
        .get(w.url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(r.status(), 200, "GET {path} without a token");
    r
}

fn content_type(r: &reqwest::Response) -> String {
    r.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_valid_openapi_and_lists_every_route() {
    let w = World::start().await;
    let r = public_get(&w, "/openapi.json").await;
    assert_eq!(content_type(&r), "application/json");
    let doc: Value = r.json().await.expect("the document is JSON");
    assert_eq!(doc["openapi"], "3.1.0");

    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, out) = validate(&doc, dir.path(), "openapi.json");
    assert!(ok, "openapi-spec-validator rejects /openapi.json:\n{out}");
    // The validator does validate: a response without its required
    // description is refused.
    let mut broken = doc.clone();
    broken["paths"]["/health"]["get"]["responses"]["200"]
        .as_object_mut()
        .expect("documented /health 200")
        .remove("description");
    let (ok, _) = validate(&broken, dir.path(), "broken.json");
    assert!(!ok, "the validator accepted a document with an error");

    // `/info` lists the route table (`route::ENDPOINTS`); each of its lines
    // must be an operation of the document.
    let info: Value = public_get(&w, "/info").await.json().await.expect("info");
    let endpoints = info["endpoints"].as_array().expect("endpoint list");
    assert!(endpoints.len() >= 45, "{endpoints:?}");
    for line in endpoints {
        let line = line.as_str().expect("METHOD /path");
        let (method, path) = line.split_once(' ').expect("METHOD /path");
        let op = &doc["paths"][path][method.to_ascii_lowercase()];
        assert!(op.is_object(), "{line} is not in /openapi.json");
        assert!(op["operationId"].is_string(), "{line}");
    }
    for path in ["/openapi.json", "/docs", "/admin/users/{user_id}/credits"] {
        assert!(
            endpoints
                .iter()
                .any(|l| l.as_str().is_some_and(|l| l.ends_with(path))),
            "{path}"
        );
    }

    // The contract's error shape, and bearer authentication (JWT or API key).
    let error = &doc["components"]["schemas"]["Error"];
    assert_eq!(error["required"], json!(["detail", "code"]));
    let bearer = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(bearer["type"], "http");
    assert_eq!(bearer["scheme"], "bearer");
    assert!(bearer["bearerFormat"]
        .as_str()
        .is_some_and(|f| f.contains("JWT") && f.contains("fpk_")));
    let credits = &doc["paths"]["/admin/users/{user_id}/credits"]["post"];
    assert!(credits["security"].is_array());
    let body = &doc["components"]["schemas"]["CreditChange"];
    assert!(
        body["required"]
            .as_array()
            .is_some_and(|r| r.contains(&json!("idempotency_key"))),
        "{body}"
    );
    assert!(doc["paths"]["/health"]["get"].get("security").is_none());
}

/// One answer for `tests/openapi_answers.py`.
fn case(method: &str, template: &str, status: u16, body: Value) -> Value {
    json!({"method": method, "path": template, "status": status, "body": body})
}

/// Sends one request; returns its case for the checker and its JSON body.
async fn answer(
    w: &World,
    method: Method,
    path: &str,
    template: &str,
    token: Option<String>,
    body: Option<Value>,
) -> (Value, Value) {
    let mut req = w.http.request(method.clone(), w.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = r.status().as_u16();
    let v: Value = r
        .json()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (case(method.as_str(), template, status, v.clone()), v)
}

/// Real answers of the proxy fit the schemas and statuses the document gives
/// for them: the document describes the code, not what it was meant to be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_fit_the_documented_schemas() {
    let w = World::start().await;
    let doc: Value = public_get(&w, "/openapi.json")
        .await
        .json()
        .await
        .expect("doc");
    w.add_user("root", "admin", 0);
    let admin = w.login("root").await;
    let (user_id, user) = w.user_with("alice", 5, FLOW).await;
    let mut cases = Vec::new();
    let a = || Some(admin.clone());
    let u = || Some(user.clone());
    macro_rules! check {
        ($m:ident, $path:expr, $t:expr, $tok:expr, $body:expr) => {{
            let (c, v) = answer(&w, Method::$m, &$path.to_string(), $t, $tok, $body).await;
            cases.push(c);
            v
        }};
    }
    check!(GET, "/", "/", None, None);
    check!(GET, "/health", "/health", None, None);
    check!(GET, "/info", "/info", None, None);
    let login = json!({"username": "alice", "password": password_of("alice")});
    let pair = check!(
        POST,
        "/chat/authenticate",
        "/chat/authenticate",
        None,
        Some(login)
    );
    let wrong = json!({"username": "alice", "password": "not-the-password"});
    check!(
        POST,
        "/chat/authenticate",
        "/chat/authenticate",
        None,
        Some(wrong)
    );
    check!(
        POST,
        "/chat/authenticate",
        "/chat/authenticate",
        None,
        Some(json!({"username": 1}))
    );
    let refresh = json!({"refresh_token": pair["refresh_token"]});
    check!(POST, "/chat/refresh", "/chat/refresh", None, Some(refresh));
    check!(GET, "/chat/credits", "/chat/credits", u(), None);
    check!(GET, "/chat/credits", "/chat/credits", None, None);
    let ask = json!({"chatflow_id": FLOW, "question": "hello there", "chatId": "openapi-conv-1"});
    check!(POST, "/chat/predict", "/chat/predict", u(), Some(ask));
    check!(GET, "/chat/sessions", "/chat/sessions", u(), None);
    check!(
        GET,
        "/chat/sessions/openapi-conv-1/history",
        "/chat/sessions/{session_id}/history",
        u(),
        None
    );
    check!(GET, "/chatflows/", "/chatflows/", u(), None);
    check!(
        GET,
        format!("/chatflows/{FLOW}"),
        "/chatflows/{chatflow_id}",
        u(),
        None
    );
    check!(
        GET,
        format!("/chatflows/{UNKNOWN_CHATFLOW_ID}"),
        "/chatflows/{chatflow_id}",
        u(),
        None
    );
    check!(
        GET,
        format!("/api/v1/chatflows-streaming/{FLOW}"),
        "/api/v1/chatflows-streaming/{chatflow_id}",
        None,
        None
    );
    // Drop-in routes: Flowise's answers, the proxy's refusals.
    check!(
        POST,
        format!("/api/v1/prediction/{FLOW}"),
        "/api/v1/prediction/{chatflow_id}",
        u(),
        Some(json!({"question": "drop in"}))
    );
    check!(
        GET,
        format!("/api/v1/chatmessage/{FLOW}"),
        "/api/v1/chatmessage/{chatflow_id}",
        u(),
        None
    );
    check!(
        GET,
        format!("/api/v1/chatflows/{UNKNOWN_CHATFLOW_ID}"),
        "/api/v1/chatflows/{chatflow_id}",
        u(),
        None
    );
    check!(GET, "/api/v1/apikey", "/api/v1/apikey", a(), None);
    check!(
        GET,
        "/api/v1/node-config",
        "/api/v1/{flowise_path}",
        u(),
        None
    );
    check!(GET, "/admin/users", "/admin/users", u(), None);
    check!(GET, "/admin/users", "/admin/users", a(), None);
    let new = json!({"username": "bob", "password": "long-enough-password"});
    let bob = check!(POST, "/admin/users", "/admin/users", a(), Some(new));
    let bob_id = bob["id"].as_i64().expect("bob's id");
    check!(
        POST,
        "/admin/users",
        "/admin/users",
        a(),
        Some(json!({"username": "x"}))
    );
    check!(
        GET,
        format!("/admin/users/{user_id}"),
        "/admin/users/{user_id}",
        a(),
        None
    );
    check!(
        PATCH,
        format!("/admin/users/{bob_id}"),
        "/admin/users/{user_id}",
        a(),
        Some(json!({"email": "bob@example.org"}))
    );
    let topup = json!({"amount": 3, "reason": "openapi test", "idempotency_key": "k-1"});
    check!(
        POST,
        format!("/admin/users/{bob_id}/credits"),
        "/admin/users/{user_id}/credits",
        a(),
        Some(topup)
    );
    check!(
        GET,
        format!("/admin/users/{bob_id}/ledger"),
        "/admin/users/{user_id}/ledger",
        a(),
        None
    );
    let key = check!(
        POST,
        format!("/admin/users/{bob_id}/api-keys"),
        "/admin/users/{user_id}/api-keys",
        a(),
        Some(json!({"name": "ci"}))
    );
    check!(
        DELETE,
        format!("/admin/api-keys/{}", key["id"]),
        "/admin/api-keys/{key_id}",
        a(),
        None
    );
    check!(
        POST,
        "/admin/chatflows/sync",
        "/admin/chatflows/sync",
        a(),
        None
    );
    check!(GET, "/admin/chatflows", "/admin/chatflows", a(), None);
    check!(
        PATCH,
        format!("/admin/chatflows/{FLOW}"),
        "/admin/chatflows/{chatflow_id}",
        a(),
        Some(json!({"credit_cost": 2}))
    );
    check!(
        POST,
        format!("/admin/chatflows/{FLOW}/users"),
        "/admin/chatflows/{chatflow_id}/users",
        a(),
        Some(json!({"user_id": bob_id}))
    );
    check!(
        POST,
        format!("/admin/chatflows/{UNKNOWN_CHATFLOW_ID}/users"),
        "/admin/chatflows/{chatflow_id}/users",
        a(),
        Some(json!({"user_id": bob_id}))
    );
    check!(
        GET,
        format!("/admin/chatflows/{FLOW}/users"),
        "/admin/chatflows/{chatflow_id}/users",
        a(),
        None
    );
    check!(
        DELETE,
        format!("/admin/chatflows/{FLOW}/users"),
        "/admin/chatflows/{chatflow_id}/users",
        a(),
        Some(json!({"username": "bob"}))
    );
    check!(GET, "/admin/audit", "/admin/audit", a(), None);
    check!(
        DELETE,
        format!("/admin/users/{bob_id}"),
        "/admin/users/{user_id}",
        a(),
        None
    );
    check!(
        POST,
        "/chat/revoke",
        "/chat/revoke",
        u(),
        Some(json!({"all": true}))
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let doc_file = dir.path().join("openapi.json");
    let cases_file = dir.path().join("cases.json");
    std::fs::write(&doc_file, serde_json::to_vec(&doc).expect("json")).expect("write");
    std::fs::write(&cases_file, serde_json::to_vec(&cases).expect("json")).expect("write");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openapi_answers.py");
    let out = Command::new(tools_python())
        .arg(script)
        .arg(&doc_file)
        .arg(&cases_file)
        .output()
        .expect("run tests/openapi_answers.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "answers that the document does not describe:\n{text}"
    );
    assert!(
        text.contains(&format!("{} answers checked, 0 mismatches", cases.len())),
        "{text}"
    );
}

/// Every `href`/`src` value of a page.
fn links(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["href=\"", "src=\""] {
        for part in html.split(attr).skip(1) {
            out.push(part.split('"').next().unwrap_or_default().to_string());
        }
    }
    out
}

/// `http(s)://` addresses in a text, except XML namespace names (inline SVG
/// in the style sheet), which are never fetched.
fn outside_urls(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for scheme in ["http://", "https://"] {
        for (at, _) in text.match_indices(scheme) {
            let url: String = text[at..]
                .chars()
                .take_while(|c| !c.is_whitespace() && !"\"'()<>\\".contains(*c))
                .collect();
            if url != "http://www.w3.org/2000/svg" {
                found.push(url);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_page_is_served_whole_by_the_proxy() {
    let w = World::start().await;
    for page in ["/docs", "/docs/"] {
        let r = public_get(&w, page).await;
        assert!(content_type(&r).starts_with("text/html"), "{page}");
        let html = r.text().await.expect("html");
        assert!(html.contains("swagger-ui"), "{html}");
        assert!(outside_urls(&html).is_empty(), "{:?}", outside_urls(&html));
        let assets = links(&html);
        assert!(assets.len() >= 4, "{assets:?}");
        let mut scripts = 0;
        for asset in &assets {
            assert!(asset.starts_with("/docs/"), "{page} links {asset}");
            let r = public_get(&w, asset).await;
            let ct = content_type(&r);
            let expected = match asset.rsplit('.').next() {
                Some("css") => "text/css",
                Some("js") => "text/javascript",
                Some("png") => "image/png",
                other => panic!("unexpected asset type {other:?}: {asset}"),
            };
            assert!(ct.starts_with(expected), "{asset}: {ct}");
            assert_eq!(
                r.headers()
                    .get("x-content-type-options")
                    .and_then(|v| v.to_str().ok()),
                Some("nosniff")
            );
            let bytes = r.bytes().await.expect("asset");
            assert!(!bytes.is_empty(), "{asset}");
            if expected == "text/javascript" {
                scripts += 1;
            }
            // Scripts and styles that the page runs at load: nothing from outside.
            if asset.ends_with("initializer.js") || expected == "text/css" {
                let text = String::from_utf8_lossy(&bytes);
                assert!(
                    outside_urls(&text).is_empty(),
                    "{asset}: {:?}",
                    outside_urls(&text)
                );
            }
            if asset.ends_with("initializer.js") {
                let text = String::from_utf8_lossy(&bytes);
                assert!(text.contains("\"url\": \"/openapi.json\""), "{text}");
                // No online validator badge.
                assert!(text.contains("\"validatorUrl\": \"none\""), "{text}");
            }
        }
        assert!(scripts >= 2, "{assets:?}");
    }
    let r = w
        .http
        .get(w.url("/docs/no-such-file.js"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["code"], "not_found");
    let r = w.http.post(w.url("/docs")).send().await.expect("post");
    assert_eq!(r.status(), 405);
}
