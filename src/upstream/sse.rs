//! Observes what Flowise says, without changing a byte of it: token usage, the
//! conversation id Flowise assigned, and whether the prediction failed.
//!
//! Flowise's event stream frames every event as `message:\ndata:{"event":E,"data":D}\n\n`
//! (a literal `message:` line, not `event:`). Failures arrive as an `error` event
//! inside a 200 stream; token accounting as `usageMetadata` events, one per LLM node.

use serde_json::Value;

/// Longest event line we are willing to buffer while waiting for its newline.
/// Longer lines are passed through unobserved.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Default, Clone)]
pub struct Observation {
    /// Saw the start of an answer (any event other than an error).
    pub answered: bool,
    /// Flowise reported a failure (`error` event, or an error JSON body).
    pub error: bool,
    /// Saw the `end` event.
    pub ended: bool,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    pub usage_seen: bool,
    /// The conversation id (`sessionId`, else `chatId`) Flowise used.
    pub session_id: Option<String>,
}

#[derive(Debug, Default)]
pub struct StreamObserver {
    line: Vec<u8>,
    overflow: bool,
    pub seen: Observation,
}

impl StreamObserver {
    /// Lines wholly inside `chunk` are observed where they lie; only a line
    /// split across chunks is copied (it used to copy every byte, one push
    /// at a time).
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while let Some(end) = memchr::memchr(b'\n', chunk) {
            let head = &chunk[..end];
            chunk = &chunk[end + 1..];
            if self.overflow || self.line.len() + head.len() > MAX_LINE {
                // Too long to observe: passed through unobserved.
            } else if self.line.is_empty() {
                self.on_line(head);
            } else {
                // Its start came with an earlier chunk (the buffer is kept
                // for reuse and cleared below).
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                self.on_line(&line);
                self.line = line;
            }
            self.line.clear();
            self.overflow = false;
        }
        if self.overflow || self.line.len() + chunk.len() > MAX_LINE {
            self.overflow = true;
            self.line.clear();
        } else {
            self.line.extend_from_slice(chunk);
        }
    }

    fn on_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.trim_ascii_start();
        // Most events are tokens, which settlement needs only to know that an
        // answer began: no JSON parse (and no allocation) for them.
        if data.starts_with(br#"{"event":"token","#) {
            self.seen.answered = true;
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        let event = v.get("event").and_then(Value::as_str).unwrap_or("");
        let payload = v.get("data").unwrap_or(&Value::Null);
        match event {
            "error" => self.seen.error = true,
            "end" => self.seen.ended = true,
            "usageMetadata" => self.seen.add_usage(payload),
            "metadata" => {
                self.seen.answered = true;
                self.seen.learn_session(payload);
            }
            _ => self.seen.answered = true,
        }
    }
}

/// The line that replaces an `error` event on the proxy's own routes: the
/// contract's error shape, never Flowise's internal message.
const REDACTED_ERROR: &[u8] = br#"data:{"event":"error","data":{"detail":"Flowise could not answer this prediction","code":"upstream_error"}}"#;

/// Passes an event stream on in whole lines, replacing each `error` event's
/// data line by `REDACTED_ERROR` (seed routes). A line longer than `MAX_LINE`
/// is passed on as it is.
#[derive(Debug, Default)]
pub struct ErrorRedactor {
    partial: Vec<u8>,
}

impl ErrorRedactor {
    pub fn filter(&mut self, chunk: &[u8], end: bool) -> Vec<u8> {
        self.partial.extend_from_slice(chunk);
        let cut = if end || self.partial.len() > MAX_LINE {
            self.partial.len()
        } else {
            match self.partial.iter().rposition(|b| *b == b'\n') {
                Some(i) => i + 1,
                None => return Vec::new(),
            }
        };
        let ready: Vec<u8> = self.partial.drain(..cut).collect();
        if !ready.windows(7).any(|w| w == b"\"error\"") {
            return ready;
        }
        let mut out = Vec::with_capacity(ready.len());
        for line in ready.split_inclusive(|b| *b == b'\n') {
            let body = line.strip_suffix(b"\n").unwrap_or(line);
            let body = body.strip_suffix(b"\r").unwrap_or(body);
            if is_error_event(body) {
                out.extend_from_slice(REDACTED_ERROR);
                out.extend_from_slice(&line[body.len()..]);
            } else {
                out.extend_from_slice(line);
            }
        }
        out
    }
}

fn is_error_event(line: &[u8]) -> bool {
    let Some(data) = line.strip_prefix(b"data:") else {
        return false;
    };
    serde_json::from_slice::<Value>(data.trim_ascii_start())
        .ok()
        .is_some_and(|v| v.get("event").and_then(Value::as_str) == Some("error"))
}

impl Observation {
    fn add_usage(&mut self, u: &Value) {
        let get = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
        let (i, o) = (get("input_tokens"), get("output_tokens"));
        let t = u
            .get("total_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(i + o);
        self.input_tokens = self.input_tokens.saturating_add(i);
        self.output_tokens = self.output_tokens.saturating_add(o);
        self.total_tokens = self.total_tokens.saturating_add(t);
        self.usage_seen = true;
    }

    fn learn_session(&mut self, v: &Value) {
        let id = v
            .get("sessionId")
            .and_then(Value::as_str)
            .or_else(|| v.get("chatId").and_then(Value::as_str));
        if let Some(id) = id.filter(|s| !s.is_empty() && s.len() <= 200) {
            self.session_id = Some(id.to_string());
        }
    }

    /// Observes a complete JSON answer (non-streaming prediction).
    pub fn from_json_body(status: u16, body: &[u8]) -> Observation {
        let mut o = Observation::default();
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            o.answered = true;
            o.ended = true;
            o.learn_session(&v);
            if let Some(u) = v.get("usageMetadata") {
                o.add_usage(u);
            }
        } else {
            o.error = true;
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPTURE: &str = "message:\ndata:{\"event\":\"start\",\"data\":\"\"}\n\nmessage:\ndata:{\"event\":\"token\",\"data\":\"MOCK \"}\n\nmessage:\ndata:{\"event\":\"usageMetadata\",\"data\":{\"input_tokens\":10,\"output_tokens\":5,\"total_tokens\":15}}\n\nmessage:\ndata:{\"event\":\"metadata\",\"data\":{\"chatId\":\"c1\",\"sessionId\":\"s1\"}}\n\nmessage:\ndata:{\"event\":\"end\",\"data\":\"[DONE]\"}\n\n";

    #[test]
    fn observes_capture_split_anywhere() {
        for split in [1usize, 3, 7, 50, CAPTURE.len()] {
            let mut o = StreamObserver::default();
            for chunk in CAPTURE.as_bytes().chunks(split) {
                o.feed(chunk);
            }
            assert!(o.seen.answered && o.seen.ended && !o.seen.error);
            assert_eq!(o.seen.total_tokens, 15);
            assert_eq!(o.seen.session_id.as_deref(), Some("s1"));
        }
    }

    #[test]
    fn a_line_too_long_to_observe_is_skipped_and_the_next_ones_are_not() {
        let long = format!(
            "data:{{\"event\":\"error\",\"data\":\"{}\"}}\n\n",
            "x".repeat(MAX_LINE)
        );
        let input = format!("{long}{CAPTURE}");
        for split in [1000usize, 65536, input.len()] {
            let mut o = StreamObserver::default();
            for chunk in input.as_bytes().chunks(split) {
                o.feed(chunk);
            }
            assert!(!o.seen.error, "the over-long line was not parsed");
            assert!(o.seen.answered && o.seen.ended);
            assert_eq!(o.seen.session_id.as_deref(), Some("s1"));
        }
    }

    #[test]
    fn error_event_is_a_failure() {
        let mut o = StreamObserver::default();
        o.feed(b":heartbeat\n\nmessage:\ndata:{\"event\":\"error\",\"data\":\"Error: x\"}\n\nmessage:\ndata:{\"event\":\"end\",\"data\":\"[DONE]\"}\n\n");
        assert!(o.seen.error);
        assert!(!o.seen.answered);
    }

    #[test]
    fn redactor_replaces_error_events_split_anywhere() {
        let input: &[u8] = b"message:\ndata:{\"event\":\"token\",\"data\":\"hi\"}\n\nmessage:\ndata:{\"event\":\"error\",\"data\":\"Error: buildChatflow - Connection error.\"}\n\n";
        for split in [1usize, 5, 17, input.len()] {
            let mut r = ErrorRedactor::default();
            let mut out = Vec::new();
            let chunks: Vec<&[u8]> = input.chunks(split).collect();
            for (i, c) in chunks.iter().enumerate() {
                out.extend(r.filter(c, i + 1 == chunks.len()));
            }
            let text = String::from_utf8(out).expect("utf8");
            assert!(!text.contains("buildChatflow"), "{text}");
            assert!(text.contains("upstream_error") && text.contains("\"data\":\"hi\""));
        }
    }

    #[test]
    fn json_answer_gives_session_and_usage() {
        let o = Observation::from_json_body(
            200,
            br#"{"text":"x","chatId":"a","sessionId":"a","usageMetadata":{"input_tokens":1,"output_tokens":2}}"#,
        );
        assert_eq!(o.session_id.as_deref(), Some("a"));
        assert_eq!(o.total_tokens, 3);
        assert!(Observation::from_json_body(500, b"{}").error);
    }
}
