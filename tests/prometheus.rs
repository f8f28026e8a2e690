//! conf/alerts.yml and the Grafana dashboard against a real Prometheus (the
//! Debian package `prometheus`, installed by scripts/dev-deps.sh): promtool
//! accepts the rules and the example configuration, and every PromQL
//! expression of the rules and of the dashboard returns data from a running
//! proxy scraped under a little traffic.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::flowise::PEER_TEST_CHATFLOW_ID as FLOW;
use support::setup::World;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn tool(name: &str) -> String {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run `bash scripts/dev-deps.sh` (Debian package `prometheus`)"
    );
    name.to_string()
}

fn promtool(args: &[&str]) {
    let out = Command::new(tool("promtool"))
        .args(args)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus server on a free port; killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts Prometheus with `config` in `dir`; waits (60 s) for /-/ready, retrying
/// on a new port when the one picked was taken meanwhile.
async fn start_prometheus(dir: &Path, config: &Path) -> Prometheus {
    let http = support::proxy::client();
    let mut failures = Vec::new();
    for attempt in 1..=3 {
        let port = support::free_port();
        let log = dir.join(format!("prometheus-{attempt}.log"));
        let log_file = std::fs::File::create(&log).expect("create the Prometheus log");
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join(format!("data-{attempt}")).display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn prometheus");
        let mut prom = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = prom.child.try_wait() {
                failures.push(format!(
                    "attempt {attempt}: exited {status}\n{}",
                    prom.log_text()
                ));
                break;
            }
            let ready = http
                .get(format!("{}/-/ready", prom.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if matches!(ready, Ok(r) if r.status() == 200) {
                return prom;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready within 60 s:\n{}",
                prom.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = prom.child.kill();
    }
    panic!("Prometheus did not start:\n{}", failures.join("\n---\n"));
}

/// `GET /api/v1/query`: Ok(result vector) or Err(Prometheus's error).
async fn query(http: &reqwest::Client, prom: &str, expr: &str) -> Result<Vec<Value>, String> {
    let url = url::Url::parse_with_params(&format!("{prom}/api/v1/query"), &[("query", expr)])
        .expect("query URL");
    let r = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("request: {e}"))?;
    let v: Value = r.json().await.map_err(|e| format!("body: {e}"))?;
    if v["status"] != "success" {
        return Err(format!("{}: {}", v["errorType"], v["error"]));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// The left side of an alert's top-level comparison (`x > 5` -> `x`): the
/// value the alert watches, which must have data whether or not it fires.
fn watched_value(expr: &str) -> String {
    let bytes = expr.as_bytes();
    let (mut depth, mut quote, mut cut) = (0i32, None::<u8>, None);
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if let Some(q) = quote {
            if c == b'\\' {
                i += 1;
            } else if c == q {
                quote = None;
            }
        } else {
            match c {
                b'"' | b'\'' | b'`' => quote = Some(c),
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                b'>' | b'<' | b'=' | b'!' if depth == 0 => {
                    let next = bytes.get(i + 1).copied();
                    let is_cmp = matches!(c, b'>' | b'<')
                        || (matches!(c, b'=' | b'!') && next == Some(b'='));
                    if is_cmp {
                        cut = Some(i);
                        if next == Some(b'=') {
                            i += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    match cut {
        Some(at) => expr[..at].trim().to_string(),
        None => expr.trim().to_string(),
    }
}

/// Every expression to check: (where it is from, PromQL).
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo("conf/alerts.yml")).expect("read conf/alerts.yml"),
    )
    .expect("conf/alerts.yml is YAML");
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let expr = rule["expr"].as_str().expect("expr").trim().to_string();
            if let Some(name) = rule["record"].as_str() {
                out.push((format!("record {name}"), expr.clone()));
                // The recorded series itself, as the alerts read it.
                out.push((format!("recorded series {name}"), name.to_string()));
            } else {
                let name = rule["alert"].as_str().expect("alert or record");
                out.push((
                    format!("alert {name} (watched value)"),
                    watched_value(&expr),
                ));
            }
        }
    }
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("conf/grafana/dashboards/flowise-proxy.json"))
            .expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let provisioned: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo("conf/grafana/provisioning/datasources/prometheus.yml"))
            .expect("read the data source provisioning"),
    )
    .expect("data source provisioning is YAML");
    let uid = provisioned["datasources"][0]["uid"]
        .as_str()
        .expect("data source uid");
    let mut panels = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        panels += 1;
        let title = panel["title"].as_str().expect("title");
        assert_eq!(
            panel["datasource"]["uid"], uid,
            "panel {title}: data source"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            // Grafana's variables, as Grafana would fill them in.
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            assert!(!expr.contains('$'), "unknown variable in {expr}");
            out.push((format!("panel {title:?}"), expr));
        }
    }
    assert!(panels >= 10, "only {panels} panels");
    for var in dash["templating"]["list"].as_array().expect("templating") {
        let q = var["query"]["query"].as_str().expect("variable query");
        // label_values(METRIC, LABEL) lists LABEL of METRIC's series.
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .expect("label_values(...)");
        let (metric, label) = inner.rsplit_once(',').expect("metric, label");
        out.push((
            format!("variable {}", var["name"]),
            format!("count by ({}) ({})", label.trim(), metric.trim()),
        ));
    }
    out
}

/// Some of every kind of request: logins good and bad, a bad token, listings,
/// debited predictions, health.
async fn traffic(w: &World, token: &str) {
    for i in 0..3 {
        let r = w
            .post(
                &format!("/api/v1/prediction/{FLOW}"),
                token,
                &json!({"question": format!("hello {i}")}),
            )
            .await;
        assert_eq!(r.status(), 200);
        let r = w
            .post(
                "/chat/predict",
                token,
                &json!({"chatflow_id": FLOW, "question": "hi"}),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    let r = w
        .http
        .post(w.url("/chat/authenticate"))
        .json(&json!({"username": "promuser", "password": "wrong password"}))
        .send()
        .await
        .expect("bad login");
    assert_eq!(r.status(), 401);
    assert_eq!(w.get("/chat/credits", "not-a-token").await.status(), 401);
    assert_eq!(w.get("/chatflows/", token).await.status(), 200);
    assert_eq!(w.get("/nope", token).await.status(), 404);
    assert_eq!(
        w.http
            .get(w.url("/health"))
            .send()
            .await
            .expect("health")
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_dashboard_return_data_from_a_scraped_proxy() {
    promtool(&[
        "check",
        "rules",
        repo("conf/alerts.yml").to_str().expect("path"),
    ]);
    promtool(&[
        "check",
        "config",
        repo("conf/prometheus.yml").to_str().expect("path"),
    ]);
    let exprs = expressions();

    let w = World::start().await;
    let (_, token) = w.user_with("promuser", 1000, FLOW).await;
    traffic(&w, &token).await;

    let dir = tempfile::Builder::new()
        .prefix("fp-prometheus-")
        .tempdir()
        .expect("temp dir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: flowise-proxy\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            repo("conf/alerts.yml").display(),
            w.proxy.metrics_port
        ),
    )
    .expect("write the Prometheus config");
    let prom = start_prometheus(dir.path(), &config).await;
    let http = support::proxy::client();

    let scraped = support::wait_until(Duration::from_secs(60), || {
        let (http, url) = (&http, &prom.url);
        async move {
            matches!(query(http, url, "up{job=\"flowise-proxy\"} == 1").await,
                     Ok(r) if !r.is_empty())
        }
    })
    .await;
    assert!(scraped, "the proxy was never scraped:\n{}", prom.log_text());
    // More traffic while Prometheus watches, so rates have two samples.
    traffic(&w, &token).await;

    // Every expression returns data; recorded series need a few evaluations.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut pending: Vec<(String, String)> = exprs.clone();
    let mut last_error = std::collections::HashMap::new();
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (from, expr) in pending {
            match query(&http, &prom.url, &expr).await {
                Ok(result) if !result.is_empty() => {}
                Ok(_) => {
                    last_error.insert(from.clone(), "no data".to_string());
                    still.push((from, expr));
                }
                Err(e) => {
                    last_error.insert(from.clone(), e);
                    still.push((from, expr));
                }
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(
        pending.is_empty(),
        "{} of {} expressions returned no data:\n{}\n--- Prometheus log ---\n{}",
        pending.len(),
        exprs.len(),
        pending
            .iter()
            .map(|(from, expr)| format!("{from}: {expr}\n    -> {}", last_error[from]))
            .collect::<Vec<_>>()
            .join("\n"),
        prom.log_text()
    );

    // Prometheus loaded every rule, and each has evaluated without error.
    let in_file = exprs
        .iter()
        .filter(|(f, _)| f.starts_with("record ") || f.starts_with("alert "))
        .count();
    let last = std::sync::Mutex::new(Value::Null);
    let all_ok = support::wait_until(Duration::from_secs(30), || {
        let (http, url, last) = (&http, &prom.url, &last);
        async move {
            let Ok(r) = http.get(format!("{url}/api/v1/rules")).send().await else {
                return false;
            };
            let v: Value = r.json().await.unwrap_or(Value::Null);
            let rules: Vec<Value> = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let ok = rules.len() == in_file && rules.iter().all(|r| r["health"] == "ok");
            *last.lock().expect("last") = v;
            ok
        }
    })
    .await;
    assert!(
        all_ok,
        "not every rule of conf/alerts.yml loaded and evaluated ok ({in_file} in the file):\n{}",
        last.lock().expect("last")
    );
}

#[test]
fn watched_value_cuts_at_the_top_level_comparison() {
    assert_eq!(watched_value("x > 0.1"), "x");
    assert_eq!(watched_value("up{job=\"a\"} == 0"), "up{job=\"a\"}");
    assert_eq!(
        watched_value("max by (i) (m{a!=\"b\",c=~\"d\"}) >= 5"),
        "max by (i) (m{a!=\"b\",c=~\"d\"})"
    );
    assert_eq!(watched_value("sum(rate(x[5m]))"), "sum(rate(x[5m]))");
}
