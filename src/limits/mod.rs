//! What one client may hold on to: time, header size, connections, memory.
//!
//! Left to Pingora 0.9's defaults, an idle keep-alive connection stayed open
//! forever, a head or body trickling one byte every few seconds was never cut,
//! 1 MB heads were accepted, and 1,100 unfinished requests used up the
//! descriptors (`accept()` failed, `/health` timed out). Here:
//!
//! | limit | setting | when reached |
//! |---|---|---|
//! | idle keep-alive | `KEEPALIVE_TIMEOUT_SECONDS` | connection closed quietly |
//! | whole request head | `REQUEST_HEADER_TIMEOUT_MS` | 408, connection closed |
//! | head size | `MAX_HEADER_BYTES` | 431, connection closed |
//! | whole request body, after its head | `REQUEST_BODY_TIMEOUT_MS` | read fails, connection closed |
//! | open client connections | `MAX_CONNECTIONS` | 503 + `Retry-After: 1`, connection closed |
//!
//! The proxy service is Pingora's `HttpProxy` behind [`LimitedHttp`], which
//! reads each request head itself ([`head`]) and wraps the connection's
//! stream for the body deadline ([`body`]). At start-up the open-file limit is
//! raised ([`descriptors`]); freed memory is returned after many connections
//! close ([`memory`]).

mod body;
mod connections;
mod descriptors;
mod head;
mod memory;
mod metrics;

use std::sync::Arc;

use pingora_core::server::configuration::ServerConf;
use pingora_core::services::listening::Service;
use pingora_proxy::{HttpProxy, ProxyHttp};

pub use body::is_first_byte_timeout;
pub use connections::LimitedHttp;
pub use memory::run_trimmer as run_memory_trimmer;

use crate::config::ClientLimits;

/// The proxy service for `inner`, behind the client limits. Raises the
/// open-file limit first (call before the runtimes start) and fits
/// `MAX_CONNECTIONS` to it.
pub fn proxy_service<SV>(
    conf: &Arc<ServerConf>,
    inner: SV,
    name: &str,
    limits: &ClientLimits,
) -> Service<LimitedHttp<HttpProxy<SV>>>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    let fd_limit = descriptors::raise_to_hard_limit();
    let mut limits = limits.clone();
    limits.max_connections = descriptors::fit_connections(limits.max_connections, fd_limit);
    metrics::OPEN.set(0);
    metrics::REFUSED.reset();
    let proxy = pingora_proxy::http_proxy(conf, inner);
    Service::new(name.to_string(), LimitedHttp::new(proxy, limits))
}
