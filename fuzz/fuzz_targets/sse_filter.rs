//! The `tools/list` filter over an event stream, as the proxy applies it to POST answers
//! (`proxy::respond::filter_tools` with `Content-Type: text/event-stream`), rule `block = ["blocked*"]`.
//!
//! Input: `n = data[0] % 9` frame lengths follow in `data[1..=n]` (0 = an empty frame); the rest is the
//! upstream's stream, cut into frames of those lengths (the remainder is the last frame).
//!
//! Oracle: the proxy's output is read the way a browser's `EventSource` (WHATWG HTML, "Parsing an event
//! stream") reads it, by a parser written here independently of `proxy::sse`. No dispatched `message`
//! event whose data is JSON may hold a JSON-RPC message (single or in a batch) with a
//! `result.tools[*].name` that matches `blocked*`. Also: no panic, and the filter never fails the stream.

#![no_main]

use std::collections::VecDeque;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use mcp_tenant_proxy::policy::mcp::Rule;
use mcp_tenant_proxy::proxy::body::{BoxError, ProxyBody};
use mcp_tenant_proxy::proxy::respond::filter_tools;

/// The upstream's body: one frame per chunk, always ready.
struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

fn frames(data: &[u8]) -> VecDeque<Bytes> {
    let Some((&n, rest)) = data.split_first() else { return VecDeque::new() };
    let n = usize::from(n % 9).min(rest.len());
    let (lengths, mut stream) = rest.split_at(n);
    let mut out = VecDeque::new();
    for &len in lengths {
        let (frame, tail) = stream.split_at(usize::from(len).min(stream.len()));
        out.push_back(Bytes::copy_from_slice(frame));
        stream = tail;
    }
    if !stream.is_empty() {
        out.push_back(Bytes::copy_from_slice(stream));
    }
    out
}

/// Runs the proxy's filter over the frames; everything is always ready, so a no-op waker suffices.
fn filtered(chunks: VecDeque<Bytes>) -> Vec<u8> {
    let body: ProxyBody = Frames(chunks).boxed();
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(body)
        .unwrap();
    let rule = Arc::new(Rule::Block(vec!["blocked*".into()]));
    let mut cx = Context::from_waker(Waker::noop());
    let response = match pin!(filter_tools(response, rule)).poll(&mut cx) {
        Poll::Ready(r) => r.expect("an identity-encoded event stream is always filterable"),
        Poll::Pending => panic!("filter_tools waited on an event stream"),
    };
    let mut body = response.into_body();
    let mut out = Vec::new();
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(None) => return out,
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Poll::Ready(Some(Err(e))) => panic!("the filter failed the stream: {e}"),
            Poll::Pending => panic!("the filter waited on a ready body"),
        }
    }
}

/// A spec-faithful `EventSource` stream parser: the (type, data) of every event it dispatches.
fn client_events(stream: &[u8]) -> Vec<(String, String)> {
    // "Streams must be decoded using the UTF-8 decode algorithm": invalid bytes become U+FFFD, and one
    // leading BOM is stripped.
    let text = String::from_utf8_lossy(stream);
    let mut text: &str = &text;
    if let Some(rest) = text.strip_prefix('\u{FEFF}') {
        text = rest;
    }
    let mut events = Vec::new();
    let (mut data, mut kind) = (String::new(), String::new());
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let end = match bytes[i] {
            b'\n' => i + 1,
            b'\r' if bytes.get(i + 1) == Some(&b'\n') => i + 2,
            b'\r' => i + 1,
            _ => {
                i += 1;
                continue;
            }
        };
        let line = &text[start..i];
        i = end;
        start = end;
        if line.is_empty() {
            // Dispatch.
            if !data.is_empty() {
                data.pop(); // the last LF
                let event_type = if kind.is_empty() { "message".to_owned() } else { kind.clone() };
                events.push((event_type, std::mem::take(&mut data)));
            }
            data.clear();
            kind.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => kind = value.to_owned(),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            _ => {} // id, retry and unknown fields do not matter here
        }
    }
    // A line without its terminator, and an event without its blank line, are discarded at the end.
    events
}

/// The names of blocked tools the client can see in one event's data.
fn visible_blocked_tools(data: &str) -> Vec<String> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(data) else { return Vec::new() };
    let messages = match &value {
        serde_json::Value::Array(batch) => batch.iter().collect(),
        single => vec![single],
    };
    let mut found = Vec::new();
    for message in messages {
        let Some(tools) = message.get("result").and_then(|r| r.get("tools")).and_then(|t| t.as_array()) else {
            continue;
        };
        for tool in tools {
            if let Some(name) = tool.get("name").and_then(|n| n.as_str())
                && name.starts_with("blocked")
            {
                found.push(name.to_owned());
            }
        }
    }
    found
}

fuzz_target!(|data: &[u8]| {
    let chunks = frames(data);
    let input: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let output = filtered(chunks);
    // Clients read `message` events only, but the proxy filters JSON in events of every type: check all.
    for (_kind, data) in client_events(&output) {
        let blocked = visible_blocked_tools(&data);
        assert!(
            blocked.is_empty(),
            "FAIL OPEN: the client sees blocked tools {blocked:?}\n upstream sent: b\"{}\"\n proxy sent:    b\"{}\"",
            input.escape_ascii(),
            output.escape_ascii(),
        );
    }
});
