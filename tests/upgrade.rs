//! Pingora's graceful upgrade: a new process started with `-u` takes the
//! listening socket over from the old one (SIGQUIT) without refusing anyone.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::setup::World;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_hands_over_without_refused_connections() {
    let w = World::start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let url = w.url("/");
    let load = {
        let (stop, ok, failed, errors) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
        tokio::spawn(async move {
            // A fresh connection per request: the listener itself is under test.
            while !stop.load(Ordering::SeqCst) {
                let http = reqwest::Client::builder()
                    .no_proxy()
                    .pool_max_idle_per_host(0)
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("client");
                let what = match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    Ok(r) => format!("status {}", r.status()),
                    Err(e) => format!("{e:?}"),
                };
                failed.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut errors) = errors.lock() {
                    errors.push(what);
                }
            }
        })
    };
    assert!(
        support::wait_until(Duration::from_secs(10), || async {
            ok.load(Ordering::SeqCst) > 20
        })
        .await
    );
    let new = w.proxy.start_upgrade().await;
    w.proxy.sigquit();
    let old_exit = w.proxy.wait_exit(Duration::from_secs(60)).await;
    assert!(old_exit.is_some(), "old process did not exit");
    let before = ok.load(Ordering::SeqCst);
    assert!(
        support::wait_until(Duration::from_secs(10), || async {
            ok.load(Ordering::SeqCst) > before + 20
        })
        .await,
        "new process not serving\n{}",
        new.output_dump()
    );
    stop.store(true, Ordering::SeqCst);
    load.await.expect("load task");
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed during the upgrade: {:?}\nold:\n{}\nnew:\n{}",
        errors.lock().map(|e| e.clone()).unwrap_or_default(),
        w.proxy.output_dump(),
        new.output_dump()
    );
    assert!(new.try_status().is_none(), "new process still running");
}
