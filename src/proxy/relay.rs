//! Relays a request whose body we hold to Flowise and its answer back to the
//! client: event streams chunk by chunk as they arrive (never buffered whole),
//! other answers whole (they are small, and a non-streaming prediction needs its
//! price in `X-Credits-Charged` before the body goes out).

use bytes::Bytes;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use super::ctx::Ctx;
use super::respond;
use crate::app::App;
use crate::errors::ApiError;
use crate::ledger;
use crate::upstream::sse::{Observation, StreamObserver};
use crate::upstream::ForwardMeta;

/// Non-streaming answers larger than this are refused rather than buffered.
const MAX_BUFFERED_ANSWER: usize = 64 << 20;

/// Sends `req` + `body` upstream and writes the answer to the client. An
/// `Err` means nothing was written yet: the caller answers with that error.
pub async fn relay(
    session: &mut Session,
    app: &App,
    ctx: &mut Ctx,
    req: RequestHeader,
    body: Bytes,
) -> Result<(), ApiError> {
    let meta = ForwardMeta {
        request_id: &ctx.request_id,
        client_ip: ctx.client_ip.clone(),
    };
    let route = ctx.route.name();
    let mut resp = match app.upstreams.send(req, body, &meta).await {
        Ok(r) => r,
        Err(f) => {
            ctx.upstream_failure = Some(f.label());
            return Err(f.api_error());
        }
    };
    crate::metrics::TTFB_SECONDS
        .with_label_values(&[route])
        .observe(resp.ttfb.as_secs_f64());
    let status = resp.status();
    ctx.upstream.status = Some(status);

    let mut h = ResponseHeader::build(status, Some(resp.header.headers.len() + 4))
        .map_err(|_| ApiError::upstream_error())?;
    for (k, v) in resp.header.headers.iter() {
        if k != "content-length" && k != "transfer-encoding" {
            let _ = h.append_header(k.clone(), v.clone());
        }
    }
    respond::sanitize_upstream_headers(&mut h);
    respond::decorate(app, ctx, &mut h);
    if let Some(hold) = &ctx.hold {
        let _ = h.insert_header("X-Credits-Remaining", hold.available_after.to_string());
    }

    if resp.is_event_stream() {
        stream_back(session, ctx, &mut resp, h).await;
    } else {
        let body = match resp.read_all(MAX_BUFFERED_ANSWER).await {
            Ok(b) => b,
            Err(f) => {
                ctx.upstream_failure = Some(f.label());
                // Flowise did not complete its answer: treat as not answered.
                ctx.upstream.status = None;
                return Err(f.api_error());
            }
        };
        ctx.upstream.seen = Observation::from_json_body(status, &body);
        if let Some(hold) = &ctx.hold {
            let charged = ledger::settlement(&hold.price, &ctx.upstream).unwrap_or(0);
            let _ = h.insert_header("X-Credits-Charged", charged.to_string());
        }
        let _ = h.insert_header("Content-Length", body.len().to_string());
        ctx.status = Some(status);
        if session
            .write_response_header(Box::new(h), false)
            .await
            .is_ok()
        {
            let _ = session.write_response_body(Some(body), true).await;
        }
    }
    crate::metrics::UPSTREAM_SECONDS
        .with_label_values(&[route])
        .observe(resp.sent_at.elapsed().as_secs_f64());
    resp.release().await;
    Ok(())
}

/// Streams an event stream through, observing it. Stops reading Flowise when the
/// client goes away (the settlement rules decide what that costs).
async fn stream_back(
    session: &mut Session,
    ctx: &mut Ctx,
    resp: &mut crate::upstream::forward::UpstreamResponse<'_>,
    h: ResponseHeader,
) {
    ctx.streamed = true;
    ctx.status = Some(h.status.as_u16());
    crate::metrics::IN_FLIGHT_STREAMS.inc();
    let mut observer = StreamObserver::default();
    let mut client_ok = session
        .write_response_header(Box::new(h), false)
        .await
        .is_ok();
    while client_ok {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                observer.feed(&chunk);
                if session
                    .write_response_body(Some(chunk), false)
                    .await
                    .is_err()
                {
                    client_ok = false;
                }
            }
            Ok(None) => {
                let _ = session.write_response_body(None, true).await;
                break;
            }
            Err(f) => {
                ctx.upstream_failure = Some(f.label());
                break;
            }
        }
    }
    ctx.upstream.seen = observer.seen;
    crate::metrics::IN_FLIGHT_STREAMS.dec();
}
