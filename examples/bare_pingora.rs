//! The framework's floor for `bench/run.sh`: a bare Pingora 0.9 reverse proxy
//! with the same upstream and the same minimal gateway check as the nginx
//! reference, and nothing else (no identity, no credits, no metrics, no log).
//!
//! - a request without `Authorization: Bearer …` gets 401;
//! - every other request goes to one upstream over Pingora's pooled
//!   keep-alive connections, its `Authorization` replaced by the upstream key.
//!
//! ```text
//! BARE_LISTEN=127.0.0.1:8001 BARE_UPSTREAM=127.0.0.1:3000 \
//!     BARE_UPSTREAM_KEY=test-flowise-key BARE_THREADS=2 BARE_WORK_STEALING=true \
//!     cargo run --release --example bare_pingora
//! ```

use async_trait::async_trait;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::Result;
use pingora_http::RequestHeader;
use pingora_proxy::{ProxyHttp, Session};

struct BareProxy {
    upstream: String,
    /// `Bearer <key>`, sent upstream instead of the client's credentials.
    upstream_authorization: String,
}

#[async_trait]
impl ProxyHttp for BareProxy {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let has_bearer = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes().starts_with(b"Bearer "));
        if has_bearer {
            return Ok(false);
        }
        session.respond_error(401).await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        upstream_request.insert_header(
            http::header::AUTHORIZATION,
            self.upstream_authorization.as_str(),
        )
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() {
    let listen = env_or("BARE_LISTEN", "127.0.0.1:8001");
    let upstream = env_or("BARE_UPSTREAM", "127.0.0.1:3000");
    let key = env_or("BARE_UPSTREAM_KEY", "test-flowise-key");
    let threads: usize = env_or("BARE_THREADS", "2").parse().unwrap_or(2);

    let mut conf = ServerConf::new().expect("Pingora's default configuration");
    conf.threads = threads;
    // BARE_WORK_STEALING=false: one single-threaded runtime per thread, as
    // flowise-proxy's default configuration has it (same setting, same floor).
    conf.work_stealing = env_or("BARE_WORK_STEALING", "true") != "false";
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service(
        &server.configuration,
        BareProxy {
            upstream,
            upstream_authorization: format!("Bearer {key}"),
        },
    );
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    eprintln!("bare pingora on {listen}");
    server.run_forever();
}
