//! One access-log line per request on stdout. Never a password, token, API key
//! or prompt text: only the fields below.

use std::io::Write;
use std::time::Duration;

pub struct Line<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub user_id: Option<i64>,
    pub chatflow_id: Option<&'a str>,
    pub credits_charged: Option<i64>,
    pub upstream_status: Option<u16>,
    pub upstream_error: Option<&'a str>,
    pub bytes_sent: usize,
    pub duration: Duration,
}

pub fn write(json: bool, l: &Line<'_>) {
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let duration_ms = (l.duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
    let text = if json {
        serde_json::json!({
            "time": time, "request_id": l.request_id, "method": l.method, "route": l.route,
            "status": l.status, "user_id": l.user_id, "chatflow_id": l.chatflow_id,
            "credits_charged": l.credits_charged, "upstream_status": l.upstream_status,
            "upstream_error": l.upstream_error, "bytes": l.bytes_sent, "duration_ms": duration_ms,
        })
        .to_string()
    } else {
        format!(
            "{time} {} {} {} {} user={} chatflow={} charged={} upstream={} bytes={} {duration_ms}ms",
            l.request_id,
            l.method,
            l.route,
            l.status,
            l.user_id.map_or("-".into(), |u| u.to_string()),
            l.chatflow_id.unwrap_or("-"),
            l.credits_charged.map_or("-".into(), |c| c.to_string()),
            l.upstream_status.map_or("-".into(), |s| s.to_string()),
            l.bytes_sent,
        )
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
}
