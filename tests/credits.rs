//! Credits: holds that can never overspend, exactly-once settlement, expiry.

mod support;

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use support::flowise::{Fail, PEER_TEST_CHATFLOW_ID as FLOW};
use support::setup::World;

fn predict_url(base: &str) -> String {
    format!("{base}/api/v1/prediction/{FLOW}")
}

async fn predict(w: &World, token: &str, body: Value) -> reqwest::Response {
    w.http
        .post(predict_url(&w.proxy.base_url))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("send")
}

async fn burst(urls: Vec<String>, token: &str, n: usize) -> (usize, usize) {
    let http = support::proxy::client();
    let futs = (0..n).map(|i| {
        let http = http.clone();
        let url = urls[i % urls.len()].clone();
        let token = token.to_string();
        async move {
            http.post(url)
                .bearer_auth(token)
                .json(&json!({"question": "hi"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    });
    let statuses = futures::future::join_all(futs).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let short = statuses.iter().filter(|s| **s == 402).count();
    (ok, short)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_predictions_on_ten_credits() {
    let w = World::start().await;
    let (uid, token) = w.user_with("burst", 10, FLOW).await;
    let (ok, short) = burst(vec![predict_url(&w.proxy.base_url)], &token, 50).await;
    assert_eq!((ok, short), (10, 40));
    assert_eq!(
        w.flowise.prediction_count(),
        10,
        "only paid requests reach Flowise"
    );
    assert_eq!(w.wait_settled(uid).await, (0, 0));
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_predictions_split_over_two_instances() {
    let w = World::start().await;
    let second = w.second_instance(|o| o).await;
    let (uid, token) = w.user_with("burst2", 10, FLOW).await;
    let (ok, short) = burst(
        vec![
            predict_url(&w.proxy.base_url),
            predict_url(&second.base_url),
        ],
        &token,
        50,
    )
    .await;
    assert_eq!((ok, short), (10, 40));
    assert_eq!(w.flowise.prediction_count(), 10);
    assert_eq!(w.wait_settled(uid).await, (0, 0));
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_never_charged() {
    let w = World::start_with(|o| o.env("UPSTREAM_READ_TIMEOUT_MS", "1500")).await;
    let (uid, token) = w.user_with("unlucky", 5, FLOW).await;
    w.flowise.set_fail(Fail::Status500);
    let r = predict(&w, &token, json!({"question": "hi"})).await;
    assert_eq!(r.status(), 500);
    assert_eq!(r.headers()["x-credits-charged"], "0");
    w.flowise.set_fail(Fail::ErrorEvent);
    let r = predict(&w, &token, json!({"question": "hi", "streaming": true})).await;
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .expect("text")
        .contains("\"event\":\"error\""));
    w.flowise.set_fail(Fail::Hang);
    let r = predict(&w, &token, json!({"question": "hi", "streaming": true})).await;
    assert_eq!(r.status(), 504);
    assert_eq!(w.wait_settled(uid).await, (5, 0), "nothing charged");
    let n: i64 =
        w.db.client()
            .await
            .query_one(
                "SELECT count(*) FROM ledger WHERE user_id = $1 AND kind = 'void'",
                &[&uid],
            )
            .await
            .expect("count")
            .get(0);
    assert_eq!(n, 3, "each failed prediction voided once");
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successes_are_charged_once() {
    let w = World::start().await;
    let (uid, token) = w.user_with("payer", 10, FLOW).await;
    let r = predict(&w, &token, json!({"question": "hi"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credits-charged"], "1");
    assert_eq!(r.headers()["x-credits-remaining"], "9");
    let r = predict(
        &w,
        &token,
        json!({"question": "stream me", "streaming": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.expect("text").contains("\"event\":\"end\""));
    // A client that walks away after the first token is charged too.
    w.flowise.set_token_delay(Duration::from_millis(300));
    let r = support::proxy::streaming_client()
        .post(predict_url(&w.proxy.base_url))
        .bearer_auth(&token)
        .json(&json!({"question": "a b c d e", "streaming": true}))
        .send()
        .await
        .expect("send");
    let mut s = r.bytes_stream();
    s.next().await.expect("first").expect("chunk");
    drop(s);
    assert!(
        support::wait_until(Duration::from_secs(20), || async {
            w.balance(uid).await == (7, 0)
        })
        .await,
        "balance {:?}",
        w.balance(uid).await
    );
    // Seed route, same rules.
    let r = w
        .post(
            "/chat/predict",
            &token,
            &json!({"chatflow_id": FLOW, "question": "seed"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["text"], "MOCK ANSWER: seed");
    let credits: Value = w.get_json("/chat/credits", &token).await;
    // The hold took the credit before Flowise was called; the capture that
    // empties `held` is queued, so `held` may still be 1 here.
    assert_eq!(credits["credits"], 6, "{credits}");
    assert!(matches!(credits["held"].as_i64(), Some(0 | 1)), "{credits}");
    assert_eq!(w.wait_settled(uid).await, (6, 0));
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_priced_chatflows_charge_tokens_up_to_the_hold() {
    let w = World::start().await;
    w.add_user("boss", "admin", 0);
    let admin = w.login("boss").await;
    let r = w
        .patch(
            &format!("/admin/chatflows/{FLOW}"),
            &admin,
            &json!({"credit_cost": 1, "credits_per_1k_tokens": 10, "max_hold": 20}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let (uid, token) = w.user_with("meter", 100, FLOW).await;
    // The PATCH answered once the price was in force on this instance.
    let v: Value = w.get_json("/chatflows/", &token).await;
    assert_eq!(v[0]["credits_per_1k_tokens"], 10, "{v}");
    w.flowise.set_usage(Some((1000, 500)));
    let r = predict(&w, &token, json!({"question": "hi", "streaming": true})).await;
    r.text().await.expect("text");
    assert_eq!(
        w.wait_settled(uid).await,
        (85, 0),
        "1500 tokens at 10/1k = 15"
    );
    w.flowise.set_usage(Some((100_000, 0)));
    let r = predict(&w, &token, json!({"question": "hi"})).await;
    // A usage price is known only from the answer's body, after its header:
    // the charge is in the ledger, not in a header that would have to guess.
    assert!(r.headers().get("x-credits-charged").is_none());
    assert_eq!(w.wait_settled(uid).await, (65, 0), "capped at max_hold");
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_top_ups_are_idempotent() {
    let w = World::start().await;
    w.add_user("ops", "admin", 0);
    let admin = w.login("ops").await;
    let uid = w.add_user("frank", "user", 0);
    for _ in 0..2 {
        let r = w
            .post(
                &format!("/admin/users/{uid}/credits"),
                &admin,
                &json!({"amount": 25, "reason": "welcome", "idempotency_key": "k-1"}),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(w.balance(uid).await, (25, 0));
    let r = w
        .post(
            &format!("/admin/users/{uid}/credits"),
            &admin,
            &json!({"amount": -100, "reason": "too much", "idempotency_key": "k-2"}),
        )
        .await;
    assert_eq!(r.status(), 409, "a balance never goes below zero");
    let ledger: Value = w
        .get_json(&format!("/admin/users/{uid}/ledger"), &admin)
        .await;
    assert_eq!(ledger["entries"].as_array().map(Vec::len), Some(1));
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_leaves_no_stranded_credits() {
    let w = World::start_with(|o| {
        o.env("HOLD_TTL_SECONDS", "8")
            .env("SWEEPER_INTERVAL_MS", "300")
    })
    .await;
    let (uid, token) = w.user_with("crash", 5, FLOW).await;
    let victim = w
        .second_instance(|o| o.env("SWEEPER_INTERVAL_MS", "600000"))
        .await;
    // Streams of twelve tokens a second apart outlive the hold TTL: what
    // settles these holds is the sweeper, never a finished stream.
    w.flowise.set_token_delay(Duration::from_secs(1));
    let mut streams = Vec::new();
    for _ in 0..3 {
        let r = support::proxy::streaming_client()
            .post(predict_url(&victim.base_url))
            .bearer_auth(&token)
            .json(&json!({
                "question": "a long answer here that keeps streaming while the test checks its holds",
                "streaming": true
            }))
            .send()
            .await
            .expect("send");
        let mut s = r.bytes_stream();
        s.next().await.expect("first").expect("chunk");
        streams.push(s);
    }
    // The victim reserved at least the three running predictions' credits
    // (exact holds or a lease): none is available anywhere else.
    let (available, held) = w.balance(uid).await;
    assert!(available + held == 5 && held >= 3, "{available} {held}");
    victim.kill9();
    drop(streams);
    assert!(
        support::wait_until(Duration::from_secs(40), || async {
            w.balance(uid).await == (5, 0)
        })
        .await,
        "holds of the dead instance were not voided: {:?}",
        w.balance(uid).await
    );
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_refuses_debited_requests_and_recovers() {
    // A private cluster: the test stops and restarts its server.
    let cluster = support::pg::PrivateCluster::start().await;
    support::pg::connect(&cluster.url("postgres"))
        .await
        .batch_execute("CREATE DATABASE proxy")
        .await
        .expect("create db");
    let db_url = cluster.url("proxy");
    let flowise = support::flowise::start(Default::default()).await;
    let proxy =
        support::proxy::start(support::proxy::ProxyOptions::new(&db_url, &flowise.url)).await;
    let db = support::pg::connect(&db_url).await;
    assert!(
        support::wait_until(Duration::from_secs(30), || async {
            db.query_one("SELECT count(*) FROM chatflows", &[])
                .await
                .map(|r| r.get::<_, i64>(0) >= 1)
                .unwrap_or(false)
        })
        .await,
        "catalogue never synced"
    );
    let uid = support::setup::add_user(&db_url, "outage", "user", 5);
    db.execute(
        "INSERT INTO grants (user_id, chatflow_id) VALUES ($1, $2)",
        &[&uid, &FLOW],
    )
    .await
    .expect("grant");
    drop(db);
    let http = support::proxy::client();
    let login: Value = http
        .post(format!("{}/chat/authenticate", proxy.base_url))
        .json(&json!({"username": "outage", "password": support::setup::password_of("outage")}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    let token = login["access_token"].as_str().expect("token").to_string();
    let predict = || async {
        http.post(predict_url(&proxy.base_url))
            .bearer_auth(&token)
            .json(&json!({"question": "hi"}))
            .send()
            .await
            .expect("send")
    };
    assert!(
        support::wait_until(Duration::from_secs(10), || async {
            predict().await.status() == 200
        })
        .await,
        "the grant never took effect"
    );

    tokio::task::block_in_place(|| cluster.stop());
    // Credits the proxy reserved before the outage (a lease) may pay for a
    // prediction until it sees the database gone; after that, 503, and
    // nothing beyond what was reserved reaches Flowise.
    let mut paid_from_lease: i64 = 0;
    let r = loop {
        let r = predict().await;
        if r.status() != 200 {
            break r;
        }
        paid_from_lease += 1;
        assert!(
            paid_from_lease < 4,
            "more predictions than reserved credits"
        );
    };
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["code"], "ledger_unavailable");
    assert_eq!(
        flowise.prediction_count(),
        1 + paid_from_lease as u64,
        "nothing unpaid reached Flowise"
    );

    tokio::task::block_in_place(|| cluster.start_again());
    assert!(
        support::wait_until(Duration::from_secs(30), || async {
            predict().await.status() == 200
        })
        .await,
        "never recovered"
    );
    assert_eq!(flowise.prediction_count(), 2 + paid_from_lease as u64);
    let db = support::pg::connect(&db_url).await;
    assert!(
        support::wait_until(Duration::from_secs(20), || async {
            db.query_one(
                "SELECT available, held FROM accounts WHERE user_id = $1",
                &[&uid],
            )
            .await
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)) == (3 - paid_from_lease, 0))
            .unwrap_or(false)
        })
        .await,
        "every prediction charged once: {:?}\n{}",
        db.query(
            "SELECT kind::text, delta_available, delta_held FROM ledger ORDER BY id",
            &[]
        )
        .await
        .map(|rows| rows
            .iter()
            .map(|r| (
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2)
            ))
            .collect::<Vec<_>>()),
        proxy.output_dump()
    );
    support::setup::assert_books_balance(&db_url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_outliving_the_hold_ttl_is_charged_once() {
    // Holds live 3 s unless renewed; the sweeper looks every 300 ms.
    let w = World::start_with(|o| {
        o.env("HOLD_TTL_SECONDS", "3")
            .env("SWEEPER_INTERVAL_MS", "300")
    })
    .await;
    let (uid, token) = w.user_with("slow", 3, FLOW).await;
    // Eight tokens one second apart: the stream runs about 8 s, well past the TTL.
    w.flowise.set_token_delay(Duration::from_millis(1000));
    let r = predict(
        &w,
        &token,
        json!({"question": "one two three four five six seven eight", "streaming": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("text");
    assert!(text.contains("\"event\":\"end\""), "{text}");
    assert_eq!(
        w.wait_settled(uid).await,
        (2, 0),
        "the slow answer was paid"
    );
    let expired: i64 =
        w.db.client()
            .await
            .query_one(
                "SELECT count(*) FROM ledger WHERE user_id = $1 AND kind = 'expire'",
                &[&uid],
            )
            .await
            .expect("count")
            .get(0);
    assert_eq!(expired, 0, "a running request's hold never expires");
    w.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_and_four_hundred_predictions_on_thirty_seven_credits() {
    let w = World::start().await;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(w.second_instance(|o| o).await);
    }
    let (uid, token) = w.user_with("spread", 37, FLOW).await;
    let mut urls = vec![predict_url(&w.proxy.base_url)];
    urls.extend(others.iter().map(|p| predict_url(&p.base_url)));
    let (ok, short) = burst(urls, &token, 400).await;
    assert_eq!((ok, short), (37, 363), "exactly the balance, never more");
    assert_eq!(w.flowise.prediction_count(), 37);
    assert_eq!(w.wait_settled(uid).await, (0, 0));
    w.assert_books_balance().await;
    assert!(
        w.ledger_rows(uid, "lease").await > 0,
        "credits were leased (this tests leases, not only exact holds)"
    );
    assert_eq!(
        w.ledger_rows(uid, "charge").await + w.ledger_rows(uid, "capture").await,
        37,
        "one charge or capture row per answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternating_instances_use_the_whole_balance() {
    let w = World::start().await;
    let second = w.second_instance(|o| o).await;
    let (uid, token) = w.user_with("alternate", 10, FLOW).await;
    let urls = [
        predict_url(&w.proxy.base_url),
        predict_url(&second.base_url),
    ];
    let http = support::proxy::client();
    for i in 0..12 {
        let r = http
            .post(&urls[i % 2])
            .bearer_auth(&token)
            .json(&json!({"question": "hi"}))
            .send()
            .await
            .expect("send");
        let want = if i < 10 { 200 } else { 402 };
        assert_eq!(r.status(), want, "request {i}");
    }
    assert_eq!(w.wait_settled(uid).await, (0, 0));
    w.assert_books_balance().await;
    assert!(
        w.ledger_rows(uid, "lease").await > 0,
        "credits were leased, and recalled by the other instance"
    );
}

/// kill -9 of an instance while it serves a stream of predictions on leases:
/// the books stay exact, nothing is overspent, and the loss is only what was
/// answered but not yet written, in the user's favour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_under_load_keeps_the_books_exact() {
    const CREDITS: i64 = 400;
    let w = World::start_with(|o| {
        o.env("HOLD_TTL_SECONDS", "3")
            .env("SWEEPER_INTERVAL_MS", "300")
    })
    .await;
    let (uid, token) = w.user_with("kill9", CREDITS, FLOW).await;
    let victim = w.second_instance(|o| o).await;
    let url = predict_url(&victim.base_url);
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (url, token) = (url.clone(), token.clone());
            let (answered, stop) = (answered.clone(), stop.clone());
            tokio::spawn(async move {
                let http = support::proxy::client();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let r = http
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&json!({"question": "hi"}))
                        .send()
                        .await;
                    let Ok(r) = r else { break };
                    if r.status() == 200 && r.bytes().await.is_ok() {
                        answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    // Kill it once it has answered a good number under load.
    assert!(
        support::wait_until(Duration::from_secs(30), || async {
            answered.load(std::sync::atomic::Ordering::SeqCst) >= 60
        })
        .await,
        "the load never got going"
    );
    victim.kill9();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for worker in workers {
        let _ = worker.await;
    }
    let answered = answered.load(std::sync::atomic::Ordering::SeqCst) as i64;
    // The dead instance's leases expire after the TTL: all held comes back.
    assert!(
        support::wait_until(Duration::from_secs(40), || async {
            w.balance(uid).await.1 == 0
        })
        .await,
        "the dead instance's reservations never came back: {:?}",
        w.balance(uid).await
    );
    w.assert_books_balance().await;
    let charged = w.ledger_rows(uid, "charge").await + w.ledger_rows(uid, "capture").await;
    let (available, _) = w.balance(uid).await;
    assert_eq!(available, CREDITS - charged, "every written charge, once");
    assert!(
        charged <= w.flowise.prediction_count() as i64,
        "never charged for an answer Flowise did not give"
    );
    let lost = answered - charged;
    // Lost: answered, but the charge row was still queued when it died. The
    // window is the settlement queue: rows are written as fast as they come,
    // and admissions stop using leases while more than 4096 wait (usually a
    // handful; 128 leaves room for a slow, busy test machine). Below zero by
    // at most the 8 requests in flight: an answer settled whose last bytes
    // the kill cut off.
    eprintln!(
        "kill -9 under load: answered {answered}, charged {charged}, lost {lost}, voids {}, leases {}",
        w.ledger_rows(uid, "void").await,
        w.ledger_rows(uid, "lease").await
    );
    assert!(
        (-8..=128).contains(&lost),
        "answered {answered}, charged {charged}: lost {lost}"
    );
    // The survivor serves the user on what is left.
    let r = predict(&w, &token, json!({"question": "after"})).await;
    assert_eq!(r.status(), 200);
}

/// Ctrl-C (SIGINT) stops an instance at once, not its books: once it has
/// exited, every answer it gave is charged and its lease is back in the
/// balance, with nothing left for the hold TTL to clean up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_at_once_with_its_answers_charged() {
    let w = World::start().await;
    let (uid, token) = w.user_with("ctrl-c", 10, FLOW).await;
    for _ in 0..3 {
        let r = predict(&w, &token, json!({"question": "hi"})).await;
        assert_eq!(r.status(), 200);
    }
    w.proxy.sigint();
    let status = w
        .proxy
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("the proxy did not exit after SIGINT");
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(w.balance(uid).await, (7, 0), "(available, held) after exit");
    assert_eq!(w.ledger_rows(uid, "charge").await, 3);
    w.assert_books_balance().await;
    assert!(
        w.proxy.wait_output_complete(Duration::from_secs(10)).await,
        "output not read to the end"
    );
    let spinning = w.proxy.stderr_lines_containing("Accept() failed");
    assert!(
        spinning.is_empty(),
        "{} lines: {:?}",
        spinning.len(),
        spinning.first()
    );
}

/// A settlement batch charges and closes all of its leases in one database
/// call (migrations V9, V12): each lease gets its own rows and its own
/// answer, in the batch's order; a lease that is no longer open gets nothing
/// written (its predictions are logged as late captures); a lease asked to
/// close gives what it still holds back to available after its rows; a
/// batch retried after a commit whose answer was lost moves nothing twice;
/// the previous version's `charge_leases` charges the same way. The books
/// balance throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_charges_and_closes_each_lease_of_a_batch_once() {
    let w = World::start_with(|o| o.env("CREDIT_LEASE_IDLE_MS", "600000")).await;
    let (a, token_a) = w.user_with("batch-a", 100, FLOW).await;
    let (b, token_b) = w.user_with("batch-b", 100, FLOW).await;
    for token in [&token_a, &token_b] {
        let r = predict(&w, token, json!({"question": "lease"})).await;
        assert_eq!(r.status(), 200);
    }
    // Each user's first prediction took a lease and was charged on it.
    for user in [a, b] {
        assert!(
            support::wait_until(Duration::from_secs(20), || async {
                w.ledger_rows(user, "charge").await == 1
            })
            .await,
            "the first prediction of user {user} was never charged"
        );
    }
    let db = w.db.client().await;
    let lease_of = |user: i64| {
        let db = &db;
        async move {
            let row = db
                .query_one(
                    "SELECT hold_id FROM holds WHERE user_id = $1 AND lease AND state = 'open'",
                    &[&user],
                )
                .await
                .expect("an open lease");
            row.get::<_, uuid::Uuid>(0)
        }
    };
    let (lease_a, lease_b) = (lease_of(a).await, lease_of(b).await);
    let gone = uuid::Uuid::new_v4();
    let ids: Vec<uuid::Uuid> = (0..5).map(|_| uuid::Uuid::new_v4()).collect();
    let releases: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::now_v7()).collect();
    // Groups: a (a charge and a void), b on a lease that is not open (one
    // charge), b (two charges, then its lease closes).
    let users = vec![a, b, b];
    let leases = vec![lease_a, gone, lease_b];
    let ends: Vec<i32> = vec![2, 3, 5];
    let closes = vec![false, false, true];
    let amounts: Vec<i64> = vec![1, 0, 1, 1, 1];
    let kinds = vec!["charge", "void", "charge", "charge", "charge"];
    let rids = vec!["r1", "r2", "r3", "r4", "r5"];
    let cfs = vec![FLOW; 5];
    let call = || async {
        db.query_one(
            "SELECT charge_and_close_leases($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &users, &leases, &ends, &closes, &releases, &ids, &amounts, &kinds, &rids, &cfs,
            ],
        )
        .await
        .expect("charge_and_close_leases")
        .get::<_, Vec<bool>>(0)
    };
    let before = (w.balance(a).await, w.balance(b).await);
    assert_eq!(call().await, vec![true, false, true]);
    let after = (w.balance(a).await, w.balance(b).await);
    assert_eq!(after.0 .1, before.0 .1 - 1, "a's charge left held");
    assert_eq!(after.0 .0, before.0 .0, "a charge never touches available");
    assert_eq!(
        after.1,
        (before.1 .0 + before.1 .1 - 2, 0),
        "b paid its two charges and its lease gave the rest back"
    );
    let rows_on = |lease: uuid::Uuid, kinds: &'static [&'static str]| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT count(*) FROM ledger WHERE lease_id = $1 AND kind::text = ANY($2)",
                &[&lease, &kinds],
            )
            .await
            .expect("count")
            .get::<_, i64>(0)
        }
    };
    const CHARGES: &[&str] = &["charge", "void"];
    const RELEASES: &[&str] = &["release"];
    assert_eq!(
        rows_on(lease_a, CHARGES).await,
        1 + 2,
        "a's first charge and the two new rows"
    );
    assert_eq!(rows_on(lease_b, CHARGES).await, 1 + 2);
    assert_eq!(rows_on(lease_b, RELEASES).await, 1, "b's close");
    assert_eq!(rows_on(lease_a, RELEASES).await, 0, "a's lease stays open");
    assert_eq!(
        rows_on(gone, CHARGES).await,
        0,
        "nothing for a lease that is not open"
    );
    w.assert_books_balance().await;
    // The same batch again (its commit's answer lost): nothing moves twice;
    // b's lease is closed now, so its group reports it.
    assert_eq!(call().await, vec![true, false, false]);
    assert_eq!((w.balance(a).await, w.balance(b).await), after);
    assert_eq!(rows_on(lease_a, CHARGES).await, 3);
    assert_eq!(rows_on(lease_b, CHARGES).await, 3);
    assert_eq!(rows_on(lease_b, RELEASES).await, 1);
    w.assert_books_balance().await;
    // An instance of the previous version (a rolling upgrade) still calls
    // charge_leases: the same charge, no close.
    let older = db
        .query_one(
            "SELECT charge_leases($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &vec![a],
                &vec![lease_a],
                &vec![1i32],
                &vec![uuid::Uuid::new_v4()],
                &vec![1i64],
                &vec!["charge"],
                &vec!["r6"],
                &vec![FLOW],
            ],
        )
        .await
        .expect("charge_leases")
        .get::<_, Vec<bool>>(0);
    assert_eq!(older, vec![true]);
    let a_now = w.balance(a).await;
    assert_eq!(a_now, (after.0 .0, after.0 .1 - 1), "charged, still open");
    assert_eq!(rows_on(lease_a, RELEASES).await, 0);
    // A close alone (an idle lease): no rows to charge, the rest goes back;
    // asked twice, it closes once.
    let close_only = || async {
        let none_u: Vec<uuid::Uuid> = Vec::new();
        let none_i: Vec<i64> = Vec::new();
        let none_s: Vec<&str> = Vec::new();
        db.query_one(
            "SELECT charge_and_close_leases($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &vec![a],
                &vec![lease_a],
                &vec![0i32],
                &vec![true],
                &vec![uuid::Uuid::now_v7()],
                &none_u,
                &none_i,
                &none_s,
                &none_s,
                &none_s,
            ],
        )
        .await
        .expect("charge_and_close_leases, a close alone")
        .get::<_, Vec<bool>>(0)
    };
    for _ in 0..2 {
        assert_eq!(close_only().await, vec![true]);
        assert_eq!(
            w.balance(a).await,
            (a_now.0 + a_now.1, 0),
            "a's lease gave back all it held"
        );
        assert_eq!(rows_on(lease_a, RELEASES).await, 1);
        w.assert_books_balance().await;
    }
}

/// The books refuse what no code path may write, whatever the statement:
/// an unknown ledger kind or hold state (enumerated types since migration
/// V10, which dropped their per-statement CHECKs), a hold captured beyond
/// its amount, a negative balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_books_refuse_impossible_rows() {
    let w = World::start().await;
    let (uid, token) = w.user_with("guards", 5, FLOW).await;
    let r = predict(&w, &token, json!({"question": "one"})).await;
    assert_eq!(r.status(), 200);
    let db = w.db.client().await;
    use tokio_postgres::error::SqlState;
    let impossible = [
        (
            "an unknown ledger kind",
            "INSERT INTO ledger (user_id, kind, delta_available, delta_held) VALUES ($1, 'gift', 5, 0)",
            SqlState::INVALID_TEXT_REPRESENTATION,
        ),
        (
            "an unknown hold state",
            "UPDATE holds SET state = 'forgotten' WHERE user_id = $1",
            SqlState::INVALID_TEXT_REPRESENTATION,
        ),
        (
            "a hold captured beyond what it holds",
            "UPDATE holds SET captured = amount + 1 WHERE user_id = $1",
            SqlState::CHECK_VIOLATION,
        ),
        (
            "a negative balance",
            "UPDATE accounts SET available = available - 1000 WHERE user_id = $1",
            SqlState::CHECK_VIOLATION,
        ),
    ];
    for (what, sql, refusal) in impossible {
        let taken = db.execute(sql, &[&uid]).await;
        assert_eq!(
            taken.as_ref().err().and_then(|e| e.code()),
            Some(&refusal),
            "{what}: {sql} gave {taken:?}"
        );
    }
    w.assert_books_balance().await;
}

/// The settlement's lease charges and closes are never compiled by PostgreSQL's JIT,
/// whatever the planner estimates. Where the ledger has no statistics
/// (autovacuum off, or a large import not yet analyzed) the charge
/// statement's estimate grows with the table and crosses `jit_above_cost`:
/// each lease of each batch then cost ~12 ms of compiling
/// (`bench/charge_leases.sh`: 1.5 s per batch of 100 leases on a 2.4
/// million-row ledger, 8 ms with JIT off). Here the session's
/// `jit_above_cost = 0` makes every plan qualify, and auto_explain reports
/// each statement the function runs, with a `JIT:` section when it was
/// compiled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_charges_are_never_jit_compiled() {
    let w = World::start().await;
    let (uid, token) = w.user_with("jit", 5, FLOW).await;
    let r = predict(&w, &token, json!({"question": "one"})).await;
    assert_eq!(r.status(), 200);

    let (client, mut conn) = tokio_postgres::connect(&w.db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notice(n) = m {
                let _ = tx.send(n.message().to_string());
            }
        }
    });
    let jit: bool = client
        .query_one("SELECT pg_jit_available()", &[])
        .await
        .expect("pg_jit_available")
        .get(0);
    // auto_explain ships with the server on Debian, in a contrib package
    // elsewhere.
    let explained = client.batch_execute("LOAD 'auto_explain'").await.is_ok();
    if !jit || !explained {
        // A server without llvmjit (a separate package on some systems)
        // compiles nothing, and without auto_explain nothing shows what ran:
        // what protects such a server once JIT is installed is the
        // function's own setting.
        let settings: Option<Vec<String>> = client
            .query_one(
                "SELECT proconfig FROM pg_proc WHERE proname = 'charge_and_close_leases'",
                &[],
            )
            .await
            .expect("charge_and_close_leases settings")
            .get(0);
        assert!(
            settings.is_some_and(|s| s.iter().any(|kv| kv == "jit=off")),
            "charge_and_close_leases does not turn JIT off for itself"
        );
        return;
    }
    client
        .batch_execute(
            "SET auto_explain.log_min_duration = 0;
             SET auto_explain.log_nested_statements = on;
             SET auto_explain.log_level = notice;
             SET client_min_messages = notice;
             SET jit_above_cost = 0;
             BEGIN",
        )
        .await
        .expect("session settings");
    let lease: uuid::Uuid = client
        .query_one(
            "SELECT hold_id FROM holds WHERE user_id = $1 AND lease ORDER BY created_at DESC LIMIT 1",
            &[&uid],
        )
        .await
        .expect("the user's lease")
        .get(0);
    // A batch of one zero-credit row, as the settlement writes it; rolled
    // back below, so the books do not change.
    let row = uuid::Uuid::new_v4();
    client
        .query_one(
            "SELECT charge_and_close_leases($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &vec![uid],
                &vec![lease],
                &vec![1i32],
                &vec![true],
                &vec![uuid::Uuid::now_v7()],
                &vec![row],
                &vec![0i64],
                &vec!["void"],
                &vec!["jit-test"],
                &vec![FLOW],
            ],
        )
        .await
        .expect("charge_and_close_leases");
    client.batch_execute("ROLLBACK").await.expect("rollback");
    // The notices of the call arrive before its answer; the ROLLBACK's
    // answer came after them on the same connection.
    drop(client);
    let mut plans = Vec::new();
    while let Some(n) = notices.recv().await {
        plans.push(n);
    }
    // Two statements write the ledger: the charge and the close.
    let ledger_plans: Vec<&String> = plans
        .iter()
        .filter(|p| p.contains("INSERT INTO ledger"))
        .collect();
    assert!(
        ledger_plans.len() >= 2,
        "auto_explain did not show the charge and the close: {plans:#?}"
    );
    for plan in ledger_plans {
        assert!(
            !plan.contains("JIT:"),
            "a settlement statement was compiled by JIT:\n{plan}"
        );
    }
    w.assert_books_balance().await;
}
