//! Streamed answers, framed as the client asks: NDJSON lines (`Accept: application/x-ndjson`,
//! or `"stream": true` in the body), or server-sent events (`Accept: text/event-stream`),
//! which browsers' `EventSource` and most SSE clients read. Both carry the same JSON objects;
//! an event's name is the object's kind (`stdout`, `exit`, `step_started`, …).

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc::Receiver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Ndjson,
    Sse,
}

impl Framing {
    /// How the request asks for its answer to be streamed; `None`: whole, at the end.
    pub fn of(headers: &HeaderMap, stream: bool) -> Option<Framing> {
        let accept = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if accept.contains("text/event-stream") {
            Some(Framing::Sse)
        } else if stream || accept.contains("application/x-ndjson") {
            Some(Framing::Ndjson)
        } else {
            None
        }
    }

    /// One message: `{…}\n`, or `event: KIND\ndata: {…}\n\n`.
    pub fn frame(self, kind: &str, value: &Value) -> Bytes {
        let json = value.to_string();
        match self {
            Framing::Ndjson => Bytes::from(json + "\n"),
            // serde_json escapes line breaks inside strings, so the data is one line.
            Framing::Sse => Bytes::from(format!("event: {kind}\ndata: {json}\n\n")),
        }
    }

    /// The answer whose body is what arrives on `rx`, until its senders are gone.
    pub fn response(self, rx: Receiver<Bytes>) -> Response {
        let content_type = match self {
            Framing::Ndjson => "application/x-ndjson",
            Framing::Sse => "text/event-stream",
        };
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
        });
        (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(stream),
        )
            .into_response()
    }
}
