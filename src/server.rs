//! Builds and runs the Pingora server: the proxy service, the metrics service,
//! and one background service for the periodic work (identity snapshot, catalogue
//! sync, settlement queue, hold sweeper).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;

use crate::app::App;
use crate::config::Config;
use crate::proxy::FlowiseProxy;

pub fn run(opt: Opt, cfg: Config) -> Result<(), String> {
    let mut conf = match &opt.conf {
        Some(path) => ServerConf::load_from_yaml(path).map_err(|e| format!("{path}: {e}"))?,
        None => {
            // As conf/flowise-proxy.yaml ships it: a single-threaded runtime
            // per thread (each connection stays on one thread) measured
            // 5-15 % faster here than Pingora's work-stealing default.
            let mut conf = ServerConf::new().ok_or("default Pingora configuration")?;
            conf.work_stealing = false;
            conf
        }
    };
    // Our drain (see `DrainingSignals`) ends the process as soon as in-flight work
    // is done; Pingora's grace period is only the upper bound.
    let grace = conf
        .grace_period_seconds
        .map(Duration::from_secs)
        .unwrap_or(cfg.grace_period);
    conf.grace_period_seconds = Some(grace.as_secs());
    if conf.graceful_shutdown_timeout_seconds.is_none() {
        conf.graceful_shutdown_timeout_seconds = Some(5);
    }

    if !opt.test {
        startup_checks(&cfg)?;
    }
    let db = crate::store::build_pool(&cfg.database_url, cfg.database_pool_size)?;
    let app = App::new(cfg.clone(), db)?;
    crate::metrics::init();

    // The YAML was read above; given its path again, Pingora would only warn
    // that it ignores it (an operator reads that as "-c was ignored").
    let opt = Opt { conf: None, ..opt };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut proxy = crate::limits::proxy_service(
        &server.configuration,
        FlowiseProxy { app: app.clone() },
        "flowise-proxy",
        &cfg.client_limits,
    );
    proxy.add_tcp(&cfg.listen_addr());
    server.add_service(proxy);

    if let Some(addr) = cfg.metrics_addr {
        let mut metrics = Service::new("metrics".to_string(), MetricsEndpoint);
        metrics.add_tcp(&addr.to_string());
        server.add_service(metrics);
    }
    if let Some(health) = app.upstreams.health_service.lock().take() {
        server.add_service(health);
    }
    server.add_service(background_service(
        "maintenance",
        Maintenance { app: app.clone() },
    ));

    server.run(RunArgs {
        shutdown_signal: Box::new(DrainingSignals { app: app.clone() }),
    });
    Ok(())
}

/// Waits for the database (bounded) and applies migrations, on a short-lived
/// runtime of our own before Pingora starts its runtimes.
fn startup_checks(cfg: &Config) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        crate::store::wait_for_database(&cfg.database_url, cfg.database_wait).await?;
        if cfg.migrate_on_start {
            let applied = crate::store::migrate(&cfg.database_url).await?;
            for m in applied {
                log::info!("applied migration {m}");
            }
        }
        Ok::<(), String>(())
    })
}

/// `/metrics` in Prometheus text format.
struct MetricsEndpoint;

#[async_trait]
impl ServeHttp for MetricsEndpoint {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        if path != "/metrics" {
            return http::Response::builder()
                .status(404)
                .header("Content-Type", "text/plain")
                .body(b"not found\n".to_vec())
                .unwrap_or_default();
        }
        let encoder = prometheus::TextEncoder::new();
        let body = encoder
            .encode_to_string(&prometheus::gather())
            .unwrap_or_default()
            .into_bytes();
        http::Response::builder()
            .status(200)
            .header("Content-Type", prometheus::TEXT_FORMAT)
            .header("Content-Length", body.len())
            .body(body)
            .unwrap_or_default()
    }
}

/// Periodic work, started once Pingora's runtimes run.
struct Maintenance {
    app: Arc<App>,
}

#[async_trait]
impl BackgroundService for Maintenance {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let app = self.app.clone();
        tokio::spawn(crate::listen_socket::defer_accept(app.cfg.port));
        tokio::spawn(crate::limits::run_memory_trimmer());
        // The listener connects first; the reloader's start-up load follows
        // its LISTEN, so no change between the two is missed.
        let snapshot = app.auth.snapshot.clone();
        tokio::spawn(snapshot.clone().run_listener(app.cfg.database_url.clone()));
        tokio::spawn(snapshot.run_reloader(
            app.db.clone(),
            app.cfg.snapshot_reload_interval,
            app.cfg.snapshot_full_reload_interval,
        ));
        app.auth.start_background();
        tokio::spawn(app.ledger.clone().run_settler());
        tokio::spawn(app.ledger.clone().run_hold_writers());
        tokio::spawn(app.ledger.clone().run_renewer(app.cfg.hold_ttl));
        tokio::spawn(app.ledger.clone().run_lease_closer());
        tokio::spawn(
            app.ledger
                .clone()
                .run_recall_listener(app.cfg.database_url.clone()),
        );
        tokio::spawn(
            app.ledger
                .clone()
                .run_sweeper(app.cfg.hold_ttl, app.cfg.sweeper_interval),
        );
        let sync_app = app.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = crate::catalog::sync(&sync_app).await {
                    log::warn!("chatflow catalogue sync failed: {e}");
                }
                tokio::time::sleep(sync_app.cfg.catalog_sync_interval).await;
            }
        });
        let prune_app = app.clone();
        tokio::spawn(async move {
            loop {
                crate::store::record_pool_metrics(&prune_app.db);
                prune_app.upstreams.health();
                let _ = crate::store::identity::prune_revoked(&prune_app.db).await;
                tokio::time::sleep(Duration::from_secs(15)).await;
            }
        });
        let _ = shutdown.changed().await;
        // The accept loops stop on this same broadcast.
        app.close_listeners();
    }
}

/// Signals, with a drain in front of Pingora's own handling:
/// SIGTERM turns `/health` 503 at once, keeps serving until in-flight requests
/// (streams included) are done, flushes the settlement queue, then lets Pingora
/// exit. SIGQUIT hands the listeners to a new process started with `-u` and exits
/// as soon as this process's in-flight work is done. SIGINT exits at once,
/// without waiting for in-flight requests, once its settlement queue is written.
struct DrainingSignals {
    app: Arc<App>,
}

#[async_trait]
impl ShutdownSignalWatch for DrainingSignals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!("cannot install signal handlers");
            return ShutdownSignal::FastShutdown;
        };
        let grace = self.app.cfg.grace_period;
        tokio::select! {
            _ = term.recv() => {
                log::info!("SIGTERM: draining");
                self.app.start_draining();
                wait_idle(&self.app, grace).await;
                spawn_exit_when_idle(self.app.clone(), grace);
                ShutdownSignal::GracefulTerminate
            }
            _ = quit.recv() => {
                log::info!("SIGQUIT: handing listeners over");
                self.app.start_draining();
                spawn_exit_when_idle(self.app.clone(), grace);
                ShutdownSignal::GracefulUpgrade
            }
            _ = int.recv() => {
                // Pingora's own fast shutdown stops its runtimes without
                // waiting; three times here its accept loop kept running on
                // a stopped runtime instead, logging "Accept() failed …
                // being shutdown" at ~130 MB/s for minutes. This process
                // exits by itself, after the books: what it answered is
                // written and its idle leases go back to the balances.
                log::info!("SIGINT: writing the settlement queue, then exiting");
                write_books(&self.app, SIGINT_BOOKS_LIMIT).await;
                std::process::exit(0);
            }
        }
    }
}

/// How long SIGINT waits for the settlement queue to be written.
const SIGINT_BOOKS_LIMIT: Duration = Duration::from_secs(2);

/// Waits until no request is in flight (or `limit` passed).
async fn wait_idle(app: &App, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while crate::metrics::IN_FLIGHT.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    write_books(app, Duration::from_secs(10)).await;
}

/// Closes this instance's idle leases, writes the settlement queue (at most
/// `limit`) and the access log: the last thing before exiting.
async fn write_books(app: &App, limit: Duration) {
    app.ledger.close_all_leases();
    if !app.ledger.drain(limit).await {
        log::warn!(
            "{} settlement rows not written before exiting; their leases and holds expire after HOLD_TTL_SECONDS",
            app.ledger.pending()
        );
    }
    crate::access_log::flush(Duration::from_secs(2));
}

/// Ends the process once idle, instead of sleeping out Pingora's whole grace
/// period. Runs on its own thread: Pingora's main thread is asleep by then.
fn spawn_exit_when_idle(app: Arc<App>, limit: Duration) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            // After SIGQUIT this process keeps accepting for Pingora's 5 s
            // hand-over window: exiting earlier kills the connections it
            // accepts meanwhile. Wait for the shutdown broadcast, then give
            // the last accepted connections time to start their request.
            let deadline = tokio::time::Instant::now() + limit;
            while !app.listeners_closed() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            wait_idle(&app, limit).await;
        });
        log::info!("drained; exiting");
        std::process::exit(0);
    });
}
