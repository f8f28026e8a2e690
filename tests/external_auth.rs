//! Tokens issued elsewhere: an OpenID Connect provider (a real JWKS served over
//! HTTP by a test server, with discovery and key rotation) and the old Python
//! service's login service (HS256, shared secret, its own claim names). First
//! sight provisions a user with no credits and no grants; grants, credits,
//! revocation and deactivation then work as for any user, on every instance.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use serde_json::{json, Value};
use support::flowise::{PEER_TEST_CHATFLOW_ID as FLOW, SECOND_CHATFLOW_ID as FLOW2};
use support::setup::World;

const AUDIENCE: &str = "flowise-proxy-test";
const KEY_A: &str = include_str!("fixtures/jwks/key-a.pem");
const KEY_A_PUBLIC: &str = include_str!("fixtures/jwks/key-a.pub.pem");
const KEY_A_JWK: &str = include_str!("fixtures/jwks/key-a.jwk.json");
const KEY_B: &str = include_str!("fixtures/jwks/key-b.pem");
const KEY_B_JWK: &str = include_str!("fixtures/jwks/key-b.jwk.json");
const KEY_EC: &str = include_str!("fixtures/jwks/key-ec.pem");
const KEY_EC_JWK: &str = include_str!("fixtures/jwks/key-ec.jwk.json");

const LOGIN_SERVICE_SECRET: &str = "python-login-service-secret-0123456789";

fn jwk(text: &str) -> Value {
    serde_json::from_str(text).expect("fixture JWK is JSON")
}

fn rsa(pem: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(pem.as_bytes()).expect("fixture RSA key")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, key).expect("sign a test token")
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

/// A test identity provider: discovery document and JWKS over HTTP; its key
/// set can be changed while the proxy runs; it counts key-set fetches.
struct Idp {
    issuer: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    last_fetch: Arc<Mutex<Option<Instant>>>,
}

impl Idp {
    async fn start(keys: Vec<Value>) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the test IdP");
        Self::serve(listener, keys)
    }

    fn serve(listener: tokio::net::TcpListener, keys: Vec<Value>) -> Idp {
        let issuer = format!("http://{}", listener.local_addr().expect("addr"));
        let idp = Idp {
            issuer: issuer.clone(),
            keys: Arc::new(Mutex::new(keys)),
            fetches: Arc::new(AtomicUsize::new(0)),
            last_fetch: Arc::new(Mutex::new(None)),
        };
        let (keys, fetches, last) = (
            idp.keys.clone(),
            idp.fetches.clone(),
            idp.last_fetch.clone(),
        );
        let discovery = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks.json")});
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || {
                    let d = discovery.clone();
                    async move { axum::Json(d) }
                }),
            )
            .route(
                "/jwks.json",
                get(move || {
                    let body = json!({"keys": keys.lock().clone()});
                    fetches.fetch_add(1, Ordering::SeqCst);
                    *last.lock() = Some(Instant::now());
                    async move { axum::Json(body) }
                }),
            );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("[test idp] {e}");
            }
        });
        idp
    }

    fn set_keys(&self, keys: Vec<Value>) {
        *self.keys.lock() = keys;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Claims of a valid token for `sub`.
    fn claims(&self, sub: &str, username: &str) -> Value {
        let t = now();
        json!({"iss": self.issuer, "aud": AUDIENCE, "sub": sub,
               "preferred_username": username, "iat": t, "exp": t + 600})
    }
}

async fn status(w: &World, path: &str, token: &str) -> u16 {
    w.get(path, token).await.status().as_u16()
}

async fn predict(w: &World, chatflow: &str, token: &str) -> (u16, Value) {
    let r = w
        .post(
            &format!("/api/v1/prediction/{chatflow}"),
            token,
            &json!({"question": "hi"}),
        )
        .await;
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// The local user (id, username, role) linked to `subject`.
async fn linked_user(w: &World, subject: &str) -> Option<(i64, String, String)> {
    let c = w.db.client().await;
    c.query_opt(
        "SELECT u.id, u.username, u.role FROM external_identities e
         JOIN users u ON u.id = e.user_id WHERE e.subject = $1",
        &[&subject],
    )
    .await
    .expect("query")
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

async fn admin_token(w: &World) -> String {
    w.add_user("root", "admin", 0);
    w.login("root").await
}

/// Asserts 401 with one of the token codes.
async fn refused(w: &World, name: &str, token: &str) {
    let r = w.get("/chat/credits", token).await;
    assert_eq!(r.status(), 401, "{name}");
    let v: Value = r.json().await.expect("json");
    assert!(
        ["invalid_token", "token_expired"].contains(&v["code"].as_str().unwrap_or("")),
        "{name}: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_tokens_provision_users_and_follow_key_rotation() {
    let idp = Idp::start(vec![jwk(KEY_A_JWK), jwk(KEY_EC_JWK)]).await;
    let oidc_env = |o: support::proxy::ProxyOptions| {
        o.env("OIDC_ISSUER", idp.issuer.clone())
            .env("OIDC_AUDIENCE", AUDIENCE)
            .env("OIDC_JWKS_MIN_REFRESH_SECONDS", "1")
            .env("OIDC_JWKS_WAIT_MS", "10000")
    };
    // Periodic refresh far away: key changes reach this instance only through
    // the refresh an unknown key id asks for.
    let w = World::start_with(|o| oidc_env(o).env("OIDC_JWKS_REFRESH_SECONDS", "3600")).await;
    let admin = admin_token(&w).await;
    let key_a = rsa(KEY_A);

    // First request of a new identity: provisioned, no credits, no grants.
    let alice_a = sign(
        Algorithm::RS256,
        Some("key-a"),
        &key_a,
        &idp.claims("idp-alice", "alice"),
    );
    let r = w.get("/chat/credits", &alice_a).await;
    assert_eq!(r.status(), 200, "{}", w.proxy.output_dump());
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["credits"], 0);
    let (alice, name, role) = linked_user(&w, "idp-alice").await.expect("provisioned");
    assert_eq!((name.as_str(), role.as_str()), ("alice", "user"));
    assert_eq!(predict(&w, FLOW, &alice_a).await.0, 403, "not granted yet");

    // Granted: 402 without credits; credits granted: 200; other flows stay 403.
    let r = w
        .post(
            &format!("/admin/chatflows/{FLOW}/users"),
            &admin,
            &json!({"user_id": alice}),
        )
        .await;
    assert!(r.status().is_success(), "grant: {}", r.status());
    w.wait_access(&alice_a, FLOW).await;
    let (s, body) = predict(&w, FLOW, &alice_a).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (402, Some("insufficient_credits"))
    );
    let r = w
        .post(
            &format!("/admin/users/{alice}/credits"),
            &admin,
            &json!({"amount": 2, "reason": "welcome", "idempotency_key": "alice-1"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(predict(&w, FLOW, &alice_a).await.0, 200);
    assert_eq!(predict(&w, FLOW2, &alice_a).await.0, 403);

    // The hot path never fetches keys: many requests, no new fetch.
    let fetched = idp.fetches();
    for _ in 0..20 {
        assert_eq!(status(&w, "/chat/credits", &alice_a).await, 200);
    }
    assert_eq!(idp.fetches(), fetched, "a request fetched the key set");

    // ES256 works too; the role claim makes an admin, and only while it says so.
    let erin = sign(
        Algorithm::ES256,
        Some("key-ec"),
        &EncodingKey::from_ec_pem(KEY_EC.as_bytes()).expect("EC key"),
        &idp.claims("idp-erin", "erin"),
    );
    assert_eq!(status(&w, "/chat/credits", &erin).await, 200);
    let mut boss = idp.claims("idp-boss", "boss");
    boss["role"] = json!("admin");
    let boss_admin = sign(Algorithm::RS256, Some("key-a"), &key_a, &boss);
    assert_eq!(status(&w, "/admin/users", &boss_admin).await, 200);
    assert_eq!(linked_user(&w, "idp-boss").await.expect("boss").2, "admin");
    boss["role"] = json!("user");
    let boss_demoted = sign(Algorithm::RS256, Some("key-a"), &key_a, &boss);
    assert_eq!(status(&w, "/admin/users", &boss_demoted).await, 403);

    // No key id: the one RSA key of the set fits, so it is used.
    let no_kid = sign(
        Algorithm::RS256,
        None,
        &key_a,
        &idp.claims("idp-alice", "alice"),
    );
    assert_eq!(status(&w, "/chat/credits", &no_kid).await, 200);

    // Refused, all with 401.
    let good = idp.claims("idp-alice", "alice");
    let with = |field: &str, value: Value| {
        let mut c = good.clone();
        if value.is_null() {
            c.as_object_mut().expect("object").remove(field);
        } else {
            c[field] = value;
        }
        c
    };
    let signed_a = |c: &Value| sign(Algorithm::RS256, Some("key-a"), &key_a, c);
    let mut tampered: Vec<String> = alice_a.split('.').map(str::to_string).collect();
    tampered[1] = b64(&with("sub", json!("idp-erin")).to_string());
    let mut embedded = Header::new(Algorithm::RS256);
    embedded.kid = Some("attacker".into());
    embedded.jwk = Some(serde_json::from_value(jwk(KEY_B_JWK)).expect("jwk"));
    let cases = [
        (
            "wrong issuer",
            signed_a(&with("iss", json!("http://evil.example"))),
        ),
        (
            "wrong audience",
            signed_a(&with("aud", json!("another-app"))),
        ),
        ("no audience", signed_a(&with("aud", Value::Null))),
        ("expired", signed_a(&with("exp", json!(now() - 120)))),
        ("no iat", signed_a(&with("iat", Value::Null))),
        (
            "iat in the future",
            signed_a(&with("iat", json!(now() + 3600))),
        ),
        ("not yet valid", signed_a(&with("nbf", json!(now() + 3600)))),
        ("no subject", signed_a(&with("sub", Value::Null))),
        ("tampered", tampered.join(".")),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(r#"{"alg":"none","kid":"key-a"}"#),
                b64(&good.to_string())
            ),
        ),
        (
            "HS256 keyed with the public key",
            sign(
                Algorithm::HS256,
                Some("key-a"),
                &EncodingKey::from_secret(KEY_A_PUBLIC.as_bytes()),
                &good,
            ),
        ),
        (
            "another key under kid key-a",
            sign(Algorithm::RS256, Some("key-a"), &rsa(KEY_B), &good),
        ),
        (
            "key embedded in the header",
            encode(&embedded, &good, &rsa(KEY_B)).expect("sign"),
        ),
    ];
    for (name, token) in &cases {
        refused(&w, name, token).await;
    }

    // Rotation: the provider drops key A and publishes key B. The first token
    // signed with B asks for one refresh and is accepted, without a restart.
    // (The rate limit allows one refresh per second: let a second pass since
    // the last fetch, which the "attacker" kid above may have caused.)
    assert!(
        support::wait_until(Duration::from_secs(10), || async {
            idp.last_fetch
                .lock()
                .is_some_and(|t| t.elapsed() > Duration::from_millis(1200))
        })
        .await
    );
    idp.set_keys(vec![jwk(KEY_B_JWK), jwk(KEY_EC_JWK)]);
    let before = idp.fetches();
    let alice_b = sign(
        Algorithm::RS256,
        Some("key-b"),
        &rsa(KEY_B),
        &idp.claims("idp-alice", "alice"),
    );
    assert_eq!(status(&w, "/chat/credits", &alice_b).await, 200);
    assert_eq!(idp.fetches(), before + 1, "exactly one refresh for key B");
    assert_eq!(
        linked_user(&w, "idp-alice").await.expect("alice").0,
        alice,
        "same identity, same user"
    );
    // Key A is gone with that refresh.
    refused(&w, "key A after rotation", &alice_a).await;

    // Made-up key ids cost the provider at most one fetch per second.
    let before = idp.fetches();
    let started = Instant::now();
    for i in 0..10 {
        let t = sign(
            Algorithm::RS256,
            Some(&format!("made-up-{i}")),
            &rsa(KEY_B),
            &good,
        );
        refused(&w, "unknown kid", &t).await;
    }
    let allowed = 1 + started.elapsed().as_secs() as usize;
    assert!(
        idp.fetches() - before <= allowed,
        "{} fetches for 10 unknown kids in {:?}",
        idp.fetches() - before,
        started.elapsed()
    );

    // An instance refreshing periodically drops a removed key without any
    // unknown kid asking: the EC key stops working there.
    let second = w
        .second_instance(|o| oidc_env(o).env("OIDC_JWKS_REFRESH_SECONDS", "1"))
        .await;
    let second_status = |token: String| {
        let http = w.http.clone();
        let url = format!("{}/chat/credits", second.base_url);
        async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(
        second_status(erin.clone()).await,
        200,
        "EC token on the second instance"
    );
    idp.set_keys(vec![jwk(KEY_B_JWK)]);
    assert!(
        support::wait_until(Duration::from_secs(15), || async {
            second_status(erin.clone()).await == 401
        })
        .await,
        "a removed key kept working"
    );
    assert_eq!(second_status(alice_b.clone()).await, 200);
}

/// A token of the old Python service's login service: HS256 with the shared
/// secret, the user's id in `user_id`, its name in `username`, its role in `role`.
fn login_service_token(user_id: &str, username: &str, role: &str, iat: i64) -> String {
    let claims = json!({"user_id": user_id, "username": username, "role": role,
                        "type": "access", "iat": iat, "exp": iat + 900});
    sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(LOGIN_SERVICE_SECRET.as_bytes()),
        &claims,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_service_tokens_work_and_follow_revocation_and_deactivation() {
    let login_service_env = |o: support::proxy::ProxyOptions| {
        o.env("EXTERNAL_JWT_SECRET", LOGIN_SERVICE_SECRET)
            .env("EXTERNAL_SUBJECT_CLAIM", "user_id")
    };
    let w = World::start_with(login_service_env).await;
    let second = w.second_instance(login_service_env).await;
    let admin = admin_token(&w).await;
    // A local user with the same name as the login service's user.
    let local_bob = w.add_user("bob", "user", 0);
    let local_bob_token = w.login("bob").await;

    let t1 = login_service_token("64f1c0ffee", "bob", "enduser", now() - 10);
    let r = w.get("/chat/credits", &t1).await;
    assert_eq!(r.status(), 200, "{}", w.proxy.output_dump());
    let (bob, name, role) = linked_user(&w, "64f1c0ffee").await.expect("provisioned");
    assert_ne!(bob, local_bob, "a name never links to a local user");
    assert!(name.starts_with("bob~"), "{name}");
    assert_eq!(role, "user");
    assert_eq!(status(&w, "/chat/credits", &local_bob_token).await, 200);
    assert_eq!(status(&w, "/admin/users", &admin).await, 200, "own tokens");

    let on_second = |token: String| {
        let http = w.http.clone();
        let url = format!("{}/chat/credits", second.base_url);
        async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(
        on_second(t1.clone()).await,
        200,
        "second instance, same user"
    );

    let forged = |secret: &str, alg: Algorithm, claims: Value| {
        sign(
            alg,
            None,
            &EncodingKey::from_secret(secret.as_bytes()),
            &claims,
        )
    };
    let t = now();
    let base = json!({"user_id": "64f1c0ffee", "username": "bob", "role": "admin",
                      "iat": t, "exp": t + 900});
    let mut expired = base.clone();
    expired["exp"] = json!(t - 120);
    let mut no_iat = base.clone();
    no_iat.as_object_mut().expect("object").remove("iat");
    let mut no_subject = base.clone();
    no_subject
        .as_object_mut()
        .expect("object")
        .remove("user_id");
    for (name, token) in [
        (
            "wrong secret",
            forged(
                "another-secret-0123456789abcdef",
                Algorithm::HS256,
                base.clone(),
            ),
        ),
        (
            "other algorithm",
            forged(LOGIN_SERVICE_SECRET, Algorithm::HS512, base.clone()),
        ),
        (
            "expired",
            forged(LOGIN_SERVICE_SECRET, Algorithm::HS256, expired),
        ),
        (
            "no iat",
            forged(LOGIN_SERVICE_SECRET, Algorithm::HS256, no_iat),
        ),
        (
            "no subject",
            forged(LOGIN_SERVICE_SECRET, Algorithm::HS256, no_subject),
        ),
    ] {
        refused(&w, name, &token).await;
    }

    // Many first requests of one new identity at once, on both instances:
    // one user.
    let carol = login_service_token("carol-id", "carol", "enduser", now());
    let urls = [
        w.url("/chat/credits"),
        format!("{}/chat/credits", second.base_url),
    ];
    let statuses = futures::future::join_all((0..8).map(|i| {
        let http = w.http.clone();
        let (url, token) = (urls[i % 2].clone(), carol.clone());
        async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    }))
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let c = w.db.client().await;
    let carols: i64 = c
        .query_one(
            "SELECT count(*) FROM users WHERE username LIKE 'carol%'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(carols, 1, "one identity, one user");

    // Revoking the presented token: that token only, on every instance.
    let t2 = login_service_token("64f1c0ffee", "bob", "enduser", now() - 5);
    assert_eq!(status(&w, "/chat/credits", &t2).await, 200);
    let r = w.post("/chat/revoke", &t1, &json!({})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(status(&w, "/chat/credits", &t1).await, 401);
    assert!(
        support::wait_until(Duration::from_secs(10), || async {
            on_second(t1.clone()).await == 401
        })
        .await,
        "revoked token still works on the second instance"
    );
    assert_eq!(status(&w, "/chat/credits", &t2).await, 200);

    // Revoke all: every token issued so far stops, on every instance, not
    // only the presented one; a new one from the login service works.
    let t2b = login_service_token("64f1c0ffee", "bob", "enduser", now() - 4);
    assert_eq!(status(&w, "/chat/credits", &t2b).await, 200);
    assert_eq!(on_second(t2b.clone()).await, 200);
    let r = w.post("/chat/revoke", &t2, &json!({"all": true})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(status(&w, "/chat/credits", &t2).await, 401);
    assert_eq!(status(&w, "/chat/credits", &t2b).await, 401);
    assert!(
        support::wait_until(Duration::from_secs(10), || async {
            on_second(t2.clone()).await == 401 && on_second(t2b.clone()).await == 401
        })
        .await,
        "revoke-all did not reach the second instance"
    );
    let t3 = login_service_token("64f1c0ffee", "bob", "enduser", now() + 2);
    assert_eq!(status(&w, "/chat/credits", &t3).await, 200);
    assert_eq!(on_second(t3.clone()).await, 200);

    // Deactivation refuses the external token everywhere; reactivation restores it.
    let r = w
        .patch(
            &format!("/admin/users/{bob}"),
            &admin,
            &json!({"active": false}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(status(&w, "/chat/credits", &t3).await, 401);
    assert!(
        support::wait_until(Duration::from_secs(10), || async {
            on_second(t3.clone()).await == 401
        })
        .await,
        "deactivation did not reach the second instance"
    );
    let r = w
        .patch(
            &format!("/admin/users/{bob}"),
            &admin,
            &json!({"active": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(status(&w, "/chat/credits", &t3).await, 200);
    // Still the same user: deactivation did not make a new one.
    assert_eq!(linked_user(&w, "64f1c0ffee").await.expect("bob").0, bob);
}

/// A stand-in for the login service behind `EXTERNAL_AUTH_URL`: accepts
/// `right-NAME` as NAME's password, answers with its HS256 token (role admin
/// for "ada"), and records the usernames it was asked about.
async fn start_login_service() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the test login service");
    let url = format!("http://{}/login", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_by_handler = seen.clone();
    let app = axum::Router::new().route(
        "/login",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let seen = seen_by_handler.clone();
            async move {
                let user = body["username"].as_str().unwrap_or("").to_string();
                seen.lock().push(user.clone());
                if body["password"].as_str() != Some(format!("right-{user}").as_str()) {
                    return (
                        axum::http::StatusCode::UNAUTHORIZED,
                        axum::Json(json!({"detail": "Invalid credentials"})),
                    );
                }
                let role = if user == "ada" { "admin" } else { "enduser" };
                let token = login_service_token(&format!("ls-{user}"), &user, role, now());
                (
                    axum::http::StatusCode::OK,
                    axum::Json(json!({"access_token": token, "token_type": "bearer"})),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("[test login service] {e}");
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_logins_of_login_service_users_are_delegated() {
    let (url, seen) = start_login_service().await;
    let w = World::start_with(|o| {
        o.env("EXTERNAL_JWT_SECRET", LOGIN_SERVICE_SECRET)
            .env("EXTERNAL_SUBJECT_CLAIM", "user_id")
            .env("EXTERNAL_AUTH_URL", url)
    })
    .await;
    let admin = admin_token(&w).await;
    assert!(
        seen.lock().is_empty(),
        "a local user's password went to the login service"
    );
    let login = |user: &str, password: &str| {
        let http = w.http.clone();
        let url = w.url("/chat/authenticate");
        let body = json!({"username": user, "password": password});
        async move { http.post(url).json(&body).send().await.expect("send") }
    };

    let r = login("dora", "right-dora").await;
    assert_eq!(r.status(), 200, "{}", w.proxy.output_dump());
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["user"]["username"], "dora");
    let access = v["access_token"].as_str().expect("access").to_string();
    let refresh = v["refresh_token"].as_str().expect("refresh").to_string();
    let (dora, _, role) = linked_user(&w, "ls-dora").await.expect("provisioned");
    assert_eq!(role, "user");
    assert_eq!(v["user"]["id"], dora);
    assert_eq!(status(&w, "/chat/credits", &access).await, 200);
    let r = w
        .http
        .post(w.url("/chat/refresh"))
        .json(&json!({"refresh_token": refresh}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200, "a proxy session: refresh works");

    let r = login("dora", "wrong").await;
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["code"], "invalid_credentials");

    // The login service's admin role maps to an admin here.
    let r = login("ada", "right-ada").await;
    assert_eq!(r.status(), 200);
    let ada: Value = r.json().await.expect("json");
    let ada_token = ada["access_token"].as_str().expect("access");
    assert_eq!(status(&w, "/admin/users", ada_token).await, 200);

    // Deactivated here: the login service's yes is not enough.
    let r = w
        .patch(
            &format!("/admin/users/{dora}"),
            &admin,
            &json!({"active": false}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(login("dora", "right-dora").await.status(), 401);
    assert_eq!(status(&w, "/chat/credits", &access).await, 401);

    // Local users log in locally: their passwords never reach the login service.
    w.login("root").await;
    assert!(
        !seen.lock().iter().any(|u| u == "root"),
        "{:?}",
        seen.lock()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_provider_refuses_its_tokens_until_it_answers() {
    let port = support::free_port();
    let issuer = format!("http://127.0.0.1:{port}");
    let w = World::start_with(|o| {
        o.env("OIDC_ISSUER", issuer.clone())
            .env("OIDC_AUDIENCE", AUDIENCE)
            .env("OIDC_JWKS_MIN_REFRESH_SECONDS", "1")
    })
    .await;
    // The proxy started without its provider, and its own tokens work.
    w.add_user("local", "user", 0);
    let local = w.login("local").await;
    assert_eq!(status(&w, "/chat/credits", &local).await, 200);
    let t = now();
    let claims = json!({"iss": issuer, "aud": AUDIENCE, "sub": "idp-frank",
                        "iat": t, "exp": t + 600});
    let token = sign(Algorithm::RS256, Some("key-a"), &rsa(KEY_A), &claims);
    refused(&w, "provider unreachable", &token).await;

    // The provider comes up at its address: its tokens work, without a restart.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("port {port} of the test IdP was taken meanwhile: {e}"));
    let idp = Idp::serve(listener, vec![jwk(KEY_A_JWK)]);
    assert!(
        support::wait_until(Duration::from_secs(20), || async {
            status(&w, "/chat/credits", &token).await == 200
        })
        .await,
        "provider tokens still refused after it came up"
    );
    assert!(idp.fetches() >= 1);
    assert!(linked_user(&w, "idp-frank").await.is_some());
}
