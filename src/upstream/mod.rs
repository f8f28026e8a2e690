//! Flowise servers: selection (round-robin over the healthy ones, Pingora's load
//! balancer with an active HTTP health check on `/api/v1/ping`; a server that
//! refused a connection is skipped on the retry), the request header policy for
//! everything we send upstream, and the small client for the proxy's own calls.

pub mod client;
pub mod sse;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header;
use pingora_core::services::background::{background_service, GenBackgroundService};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use pingora_load_balancing::{health_check::HttpHealthCheck, selection::RoundRobin, LoadBalancer};

pub type HealthService = GenBackgroundService<LoadBalancer<RoundRobin>>;

use crate::config::{Config, FlowiseUrl};

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus the
/// client's credentials, which belong to the proxy and never reach Flowise.
const STRIP_UPSTREAM: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "authorization",
    "cookie",
    "x-api-key",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
];

/// Headers from Flowise that clients must not see or that describe one hop.
pub const STRIP_DOWNSTREAM: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "set-cookie",
    "x-powered-by",
];

pub struct Upstreams {
    pub lb: Arc<LoadBalancer<RoundRobin>>,
    /// The health-check service, handed to the server once at start-up.
    pub health_service: parking_lot::Mutex<Option<HealthService>>,
    servers: Vec<FlowiseUrl>,
    by_addr: HashMap<SocketAddr, usize>,
    /// `Bearer <FLOWISE_API_KEY>`, built once (marked sensitive).
    authorization: Option<http::HeaderValue>,
    /// Each server's `Host` header value, built once.
    host_values: Vec<http::HeaderValue>,
    connect_timeout: Duration,
    read_timeout: Duration,
    pub connector: pingora_core::connectors::http::Connector,
}

/// Which idle upstream connections a worker thread may take: its own.
///
/// Pingora keeps one pool of idle upstream connections for all worker
/// threads (one single-threaded runtime each, `work_stealing: false`), but a
/// connection stays registered with the reactor of the thread that opened it.
/// Taken by the other thread, each of its reads came through that reactor
/// and a cross-thread wake-up. With the thread in the pool key
/// (`HttpPeer::group_key`, which only separates pools) a connection is opened
/// and reused on one thread; its idle watcher stays there too
/// (`pingora_runtime::with_local_spawns`, vendor/README.md). The cost: idle
/// connections to Flowise are kept per thread.
fn worker_pool_key() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static KEY: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    KEY.with(|k| *k)
}

/// The chosen Flowise server for one request.
pub struct Chosen {
    pub peer: HttpPeer,
    pub index: usize,
}

impl Upstreams {
    pub fn new(cfg: &Config) -> Result<Upstreams, String> {
        let mut addrs = Vec::new();
        let mut by_addr = HashMap::new();
        for (i, s) in cfg.flowise_urls.iter().enumerate() {
            let resolved: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&s.addr())
                .map_err(|e| format!("FLOWISE_API_URL: cannot resolve {}: {e}", s.addr()))?
                .collect();
            // Prefer IPv4 when a name resolves to both (Flowise listens on 0.0.0.0 by default).
            let addr = resolved
                .iter()
                .find(|a| a.is_ipv4())
                .or(resolved.first())
                .copied()
                .ok_or_else(|| format!("FLOWISE_API_URL: {} resolves to nothing", s.addr()))?;
            by_addr.insert(addr, i);
            addrs.push(addr.to_string());
        }
        let lb = LoadBalancer::<RoundRobin>::try_from_iter(addrs.iter().map(String::as_str))
            .map_err(|e| format!("FLOWISE_API_URL: {e}"))?;
        let first = &cfg.flowise_urls[0];
        let mut hc = HttpHealthCheck::new(&first.host_header(), false);
        hc.req = {
            let path = format!("{}/api/v1/ping", first.base_path);
            let mut req = RequestHeader::build("GET", path.as_bytes(), None)
                .map_err(|e| format!("health check request: {e}"))?;
            req.insert_header("Host", first.host_header())
                .map_err(|e| format!("health check request: {e}"))?;
            // With the key, a Flowise (or its gateway) that rejects it says so
            // here too; Flowise's own ping needs none and ignores it.
            if let Some(key) = &cfg.flowise_api_key {
                req.insert_header("Authorization", format!("Bearer {key}"))
                    .map_err(|e| format!("health check request: {e}"))?;
            }
            req
        };
        let key_set = cfg.flowise_api_key.is_some();
        hc.validator = Some(Box::new(move |resp| {
            let status = resp.status.as_u16();
            if crate::catalog::key::is_rejection(status) {
                crate::catalog::key::rejected("GET /api/v1/ping (health check)", status, key_set);
            }
            if status == 200 {
                Ok(())
            } else {
                pingora_core::Error::e_explain(
                    pingora_core::ErrorType::CustomCode("non 200 code", status),
                    "health check",
                )
            }
        }));
        hc.peer_template.options.connection_timeout = Some(Duration::from_millis(1000));
        hc.peer_template.options.read_timeout = Some(Duration::from_millis(2000));
        let mut lb = lb;
        lb.set_health_check(Box::new(hc));
        lb.health_check_frequency = Some(cfg.health_check_interval);
        lb.parallel_health_check = true;
        let service = background_service("flowise health check", lb);
        Ok(Upstreams {
            lb: service.task(),
            health_service: parking_lot::Mutex::new(Some(service)),
            servers: cfg.flowise_urls.clone(),
            by_addr,
            authorization: match &cfg.flowise_api_key {
                Some(key) => {
                    let mut v = http::HeaderValue::from_str(&format!("Bearer {key}"))
                        .map_err(|_| "FLOWISE_API_KEY: not a valid header value".to_string())?;
                    v.set_sensitive(true);
                    Some(v)
                }
                None => None,
            },
            host_values: cfg
                .flowise_urls
                .iter()
                .map(|s| {
                    http::HeaderValue::from_str(&s.host_header())
                        .map_err(|_| format!("FLOWISE_API_URL: bad host {}", s.addr()))
                })
                .collect::<Result<_, _>>()?,
            connect_timeout: cfg.upstream_connect_timeout,
            read_timeout: cfg.upstream_read_timeout,
            connector: pingora_core::connectors::http::Connector::new(None),
        })
    }

    /// The next healthy server not in `tried`, round-robin; `None` when there is none.
    pub fn select(&self, tried: &[usize]) -> Option<Chosen> {
        let index_of = |b: &pingora_load_balancing::Backend| {
            b.addr.as_inet().and_then(|a| self.by_addr.get(a).copied())
        };
        let backend = self.lb.select_with(b"", 256, |b, healthy| {
            healthy && index_of(b).is_some_and(|i| !tried.contains(&i))
        })?;
        let index = index_of(&backend)?;
        let addr = *backend.addr.as_inet()?;
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.total_connection_timeout = Some(self.connect_timeout);
        // Applies to every read: the first byte (Flowise hangs forever on an unknown
        // chatflow with streaming on) and each later chunk (streams send a heartbeat
        // every 30 s, so a long stream stays alive).
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(self.connect_timeout.max(Duration::from_secs(30)));
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        peer.group_key = worker_pool_key();
        Some(Chosen { peer, index })
    }

    /// Health of each configured server, in configuration order.
    pub fn health(&self) -> Vec<bool> {
        let backends = self.lb.backends().get_backend();
        let mut out = vec![false; self.servers.len()];
        for b in backends.iter() {
            if let Some(addr) = b.addr.as_inet() {
                if let Some(&i) = self.by_addr.get(addr) {
                    out[i] = self.lb.backends().ready(b);
                }
            }
        }
        for (i, h) in out.iter().enumerate() {
            crate::metrics::UPSTREAM_HEALTHY
                .with_label_values(&[&i.to_string()])
                .set(i64::from(*h));
        }
        out
    }

    /// Applies the upstream header policy to a request about to go to `server`:
    /// hop-by-hop headers and the client's credentials removed, the Flowise key
    /// injected, forwarding headers and the request id set, the path prefixed with
    /// the server's base path.
    pub fn prepare_request(
        &self,
        req: &mut RequestHeader,
        index: usize,
        meta: &ForwardMeta<'_>,
    ) -> pingora_core::Result<()> {
        let server = self.servers.get(index).ok_or_else(|| {
            pingora_core::Error::explain(
                pingora_core::ErrorType::ConnectNoRoute,
                "no Flowise server chosen",
            )
        })?;
        // One pass over the headers the client sent (a handful) instead of one
        // lookup per name on the list; headers named in `Connection` are
        // hop-by-hop too.
        let doomed = names_to_strip(&req.headers, STRIP_UPSTREAM, true);
        for name in &doomed {
            // The client's `Authorization` is replaced just below when a
            // Flowise key is set: one map update instead of two.
            if self.authorization.is_some() && name == header::AUTHORIZATION {
                continue;
            }
            req.remove_header(name);
        }
        req.insert_header(header::HOST, self.host_values[index].clone())?;
        if let Some(key) = &self.authorization {
            req.insert_header(header::AUTHORIZATION, key.clone())?;
        }
        req.insert_header("X-Request-Id", meta.request_id)?;
        if let Some(ip) = meta.client_ip {
            req.insert_header("X-Forwarded-For", ip)?;
        }
        req.insert_header("X-Forwarded-Proto", http::HeaderValue::from_static("http"))?;
        if !server.base_path.is_empty() {
            let pq = req
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            let uri: http::Uri = format!("{}{}", server.base_path, pq)
                .parse()
                .map_err(|_| pingora_core::Error::new_str("bad upstream path"))?;
            req.set_uri(uri);
        }
        Ok(())
    }
}

/// The names in `headers` that are on `list` (lower case) and, with
/// `connection_listed`, those named in a `Connection` header: found in one
/// pass over the (few) headers present rather than one lookup per name.
pub fn names_to_strip(
    headers: &http::HeaderMap,
    list: &[&str],
    connection_listed: bool,
) -> Vec<header::HeaderName> {
    let mut doomed = Vec::new();
    for name in headers.keys() {
        if list.contains(&name.as_str()) {
            doomed.push(name.clone());
        }
    }
    if connection_listed {
        for v in headers.get_all(header::CONNECTION) {
            let Ok(v) = v.to_str() else { continue };
            for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                // An invalid name cannot be present: nothing to remove.
                if let Ok(name) = header::HeaderName::from_bytes(token.as_bytes()) {
                    doomed.push(name);
                }
            }
        }
    }
    doomed
}

pub struct ForwardMeta<'a> {
    pub request_id: &'a str,
    pub client_ip: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use std::thread::{self, ThreadId};
    use std::time::Duration;

    use pingora_runtime::{current_handle, with_local_spawns, Runtime};

    #[test]
    fn each_worker_thread_has_its_own_pool_key() {
        let here = super::worker_pool_key();
        assert_eq!(here, super::worker_pool_key());
        let there = thread::spawn(super::worker_pool_key)
            .join()
            .expect("thread");
        assert_ne!(here, there);
    }

    /// Pingora spawns each pooled connection's idle watcher with
    /// `current_handle()`: inside `with_local_spawns` that is the calling
    /// thread every time; outside it, a random thread of the pool
    /// (vendor/README.md).
    #[test]
    fn spawns_in_the_local_scope_stay_on_the_calling_thread() {
        async fn spawned_on() -> ThreadId {
            current_handle()
                .spawn(async { thread::current().id() })
                .await
                .expect("spawned task")
        }
        let rt = Runtime::new_no_steal(4, "local-spawns");
        let (tx, rx) = std::sync::mpsc::channel();
        rt.get_handle().spawn(async move {
            let here = thread::current().id();
            let mut inside = Vec::new();
            with_local_spawns(async {
                for _ in 0..32 {
                    inside.push(spawned_on().await);
                }
            })
            .await;
            let mut outside = Vec::new();
            for _ in 0..64 {
                outside.push(spawned_on().await);
            }
            let _ = tx.send((here, inside, outside));
        });
        let (here, inside, outside) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the test task answers");
        rt.shutdown_timeout(Duration::from_secs(5));
        assert!(inside.iter().all(|t| *t == here), "{inside:?}");
        // 64 random picks of 4 threads all landing here: (1/4)^64.
        assert!(outside.iter().any(|t| *t != here), "{outside:?}");
    }
}
