//! What happens to a request body on its way to Flowise, in
//! `request_body_filter`, chunk by chunk as Pingora's proxy loop reads it.
//!
//! * Pass-through bodies stream as they arrive, counted against
//!   `MAX_BODY_BYTES` (413 once the count is passed: Flowise then sees a body
//!   cut short and never acts on it).
//! * A drop-in JSON prediction is held back until it is whole: its
//!   conversation id (`chatId`/`sessionId`) must be checked to be the caller's
//!   before Flowise may act. It is then sent byte-exact.
//! * A drop-in multipart prediction streams (memory stays flat however large
//!   its files) while its form fields are read on the side; only the last
//!   chunk is held back until the conversation has been checked.
//! * The seed prediction's rewritten body replaces what Pingora replays.
//!
//! Why the seed route alone reads its body in `request_filter`: its chatflow id,
//! and so Flowise's path, the grant and the price, are inside the JSON body,
//! and the path must be known before the upstream request header is written,
//! which Pingora does before it reads any body. A body read there is replayed
//! by Pingora only from its 64 KiB retry buffer, so the seed body is limited to
//! that (`SEED_BODY_LIMIT`; measured: the README's flow sends 60–300 bytes, and
//! a question with a 50-turn history about 20 KiB); files go through the
//! drop-in route, which streams. Any other way (a second HTTP client, a
//! subrequest) would be a second path to Flowise.

use bytes::{Bytes, BytesMut};
use futures::channel::mpsc;
use futures::SinkExt;
use serde_json::{Map, Value};
use tokio::task::JoinHandle;

use crate::errors::ApiError;

/// What Pingora 0.9 can replay of a body read in `request_filter`.
pub const SEED_BODY_LIMIT: usize = 64 << 10;

/// Longest form field (other than files) read on the side of a multipart body.
const MAX_FORM_FIELD: usize = 64 << 10;

#[derive(Default)]
pub enum RequestBody {
    /// Passed on as it arrives.
    #[default]
    Stream,
    /// Replaces the body (the seed prediction, rewritten in `request_filter`).
    Replace(Bytes),
    /// Held back whole, then checked (a drop-in JSON prediction).
    Json(BytesMut),
    /// Streamed, fields read on the side, the last chunk held back.
    Form(Box<FormInspector>),
}

/// The conversation a prediction body names, once the body has been seen.
pub enum Seen {
    /// Not at the end yet: keep going.
    Pending,
    /// The body is complete; it names this conversation (or none).
    Complete(Option<String>),
}

pub struct BodyFlow<'a> {
    pub plan: &'a mut RequestBody,
    pub received: &'a mut usize,
    pub limit: usize,
}

impl BodyFlow<'_> {
    /// Handles one chunk. `body` is what goes to Flowise now (an empty chunk
    /// sends nothing); at the end, the conversation named by a prediction body
    /// comes back for the caller to check before releasing `held`.
    pub async fn chunk(&mut self, body: &mut Option<Bytes>, end: bool) -> Result<Seen, ApiError> {
        let n = body.as_ref().map_or(0, Bytes::len);
        *self.received += n;
        if !matches!(self.plan, RequestBody::Replace(_)) && *self.received > self.limit {
            return Err(ApiError::body_too_large());
        }
        match self.plan {
            RequestBody::Stream => Ok(if end {
                Seen::Complete(None)
            } else {
                Seen::Pending
            }),
            RequestBody::Replace(with) => {
                // Pingora replays what `request_filter` read in one call, with
                // `end` set; every call gets the whole replacement only then.
                *body = Some(if end { with.clone() } else { Bytes::new() });
                Ok(if end {
                    Seen::Complete(None)
                } else {
                    Seen::Pending
                })
            }
            RequestBody::Json(buf) => {
                if let Some(b) = body.take() {
                    buf.extend_from_slice(&b);
                }
                if !end {
                    *body = Some(Bytes::new());
                    return Ok(Seen::Pending);
                }
                let whole = std::mem::take(buf).freeze();
                let v = parse_object(&whole, true)?;
                let conversation = conversation_id(&v)?;
                *body = Some(whole);
                Ok(Seen::Complete(conversation))
            }
            RequestBody::Form(form) => {
                if let Some(b) = body.as_ref() {
                    form.feed(b.clone()).await?;
                }
                // Hold back the newest chunk; send the one before it.
                let newest = body.take().unwrap_or_default();
                let previous = std::mem::replace(&mut form.held, newest);
                if !end {
                    *body = Some(previous);
                    return Ok(Seen::Pending);
                }
                let fields = form.finish().await?;
                let last = std::mem::take(&mut form.held);
                let mut out = BytesMut::with_capacity(previous.len() + last.len());
                out.extend_from_slice(&previous);
                out.extend_from_slice(&last);
                *body = Some(out.freeze());
                Ok(Seen::Complete(conversation_id(&fields)?))
            }
        }
    }
}

/// A multipart body's form fields, parsed on the side by `multer` while the
/// bytes stream to Flowise untouched. Files are read and dropped, never kept.
pub struct FormInspector {
    tx: Option<mpsc::Sender<Result<Bytes, std::io::Error>>>,
    task: Option<JoinHandle<Result<Map<String, Value>, ApiError>>>,
    held: Bytes,
}

impl FormInspector {
    /// `None` when the content type is not a multipart form with a boundary.
    pub fn for_content_type(content_type: &str) -> Option<FormInspector> {
        let boundary = multer::parse_boundary(content_type).ok()?;
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let task = tokio::spawn(async move {
            let mut form = multer::Multipart::new(rx, boundary);
            let mut fields = Map::new();
            loop {
                let field = form.next_field().await.map_err(|_| malformed())?;
                let Some(mut field) = field else {
                    return Ok(fields);
                };
                let name = field.name().unwrap_or("").to_string();
                let wanted = field.file_name().is_none()
                    && matches!(
                        name.as_str(),
                        "chatId" | "sessionId" | "overrideConfig" | "overrideConfig[sessionId]"
                    );
                let mut value = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(|_| malformed())? {
                    if wanted {
                        if value.len() + chunk.len() > MAX_FORM_FIELD {
                            return Err(ApiError::validation("A form field is too long"));
                        }
                        value.extend_from_slice(&chunk);
                    }
                }
                if wanted {
                    let text = String::from_utf8(value).map_err(|_| malformed())?;
                    let v = match name.as_str() {
                        // Flowise parses overrideConfig from its JSON text.
                        "overrideConfig" => serde_json::from_str(&text)
                            .map_err(|_| ApiError::validation("overrideConfig is not JSON"))?,
                        "overrideConfig[sessionId]" => {
                            let mut m = Map::new();
                            m.insert("sessionId".into(), Value::String(text));
                            fields.insert("overrideConfig".into(), Value::Object(m));
                            continue;
                        }
                        _ => Value::String(text),
                    };
                    fields.insert(name, v);
                }
            }
        });
        Some(FormInspector {
            tx: Some(tx),
            task: Some(task),
            held: Bytes::new(),
        })
    }

    async fn feed(&mut self, chunk: Bytes) -> Result<(), ApiError> {
        if let Some(tx) = self.tx.as_mut() {
            // The parser stopped early only on a malformed form: `finish` says so.
            let _ = tx.send(Ok(chunk)).await;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<Map<String, Value>, ApiError> {
        self.tx = None;
        match self.task.take() {
            Some(t) => t.await.map_err(|_| ApiError::internal())?,
            None => Err(malformed()),
        }
    }
}

impl Drop for FormInspector {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn malformed() -> ApiError {
    ApiError::invalid_json("The multipart form is malformed")
}

/// Parses a JSON object body. Flowise accepts an empty body as `{}`.
pub fn parse_object(raw: &[u8], empty_ok: bool) -> Result<Map<String, Value>, ApiError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return if empty_ok {
            Ok(Map::new())
        } else {
            Err(ApiError::invalid_json("A JSON body is required"))
        };
    }
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::validation("The body must be a JSON object")),
        Err(_) => Err(ApiError::invalid_json("The body is not valid JSON")),
    }
}

/// The conversation id a prediction names, if any: `chatId`, `sessionId` or
/// `overrideConfig.sessionId`; they must agree.
pub fn conversation_id(v: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    let candidates = [
        v.get("chatId"),
        v.get("sessionId"),
        v.get("overrideConfig").and_then(|o| o.get("sessionId")),
    ];
    let mut found: Option<String> = None;
    for c in candidates.into_iter().flatten() {
        match c {
            Value::Null => {}
            Value::String(s) if s.is_empty() => {}
            Value::String(s) if crate::sessions::valid_session_id(s) => match &found {
                Some(f) if f != s => {
                    return Err(ApiError::validation(
                        "chatId and sessionId name different conversations",
                    ))
                }
                _ => found = Some(s.clone()),
            },
            _ => return Err(ApiError::validation("Invalid conversation id")),
        }
    }
    Ok(found)
}
