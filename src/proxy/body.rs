//! Request and response bodies.
//!
//! MCP JSON-RPC POST bodies are read whole (bounded by `max_body_bytes` and `body_read_timeout`): the
//! policy steps need the method and id before anything is forwarded. Every other body, and every response,
//! streams through frame by frame.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, header, request::Parts};
use http_body_util::{BodyExt, Empty, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ProxyError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// What the proxy knows of a JSON-RPC request body.
#[derive(Debug)]
pub struct JsonRpc {
    /// The request's id, `null` for notifications and batches: error answers carry it back.
    pub id: Box<RawValue>,
    pub method: Option<Box<str>>,
}

/// Reads or wraps the request body. Returns the body to forward and, for an MCP JSON-RPC POST, its facts.
pub async fn read_request(
    body: Incoming,
    parts: &Parts,
    max_bytes: u64,
    read_timeout: Duration,
) -> Result<(ProxyBody, Option<JsonRpc>), ProxyError> {
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_bytes) {
        return Err(ProxyError::BodyTooLarge);
    }
    let limit = usize::try_from(max_bytes).unwrap_or(usize::MAX);
    if !is_json_post(&parts.method, &parts.headers) {
        // Streamed; a body that outgrows the limit mid-way fails the upstream request (see forward).
        return Ok((Limited::new(body, limit).boxed(), None));
    }
    let collected = tokio::time::timeout(read_timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| ProxyError::BodyTimeout)?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ProxyError::BodyTooLarge
            } else {
                ProxyError::BodyUnreadable
            }
        })?;
    let bytes = collected.to_bytes();
    let jsonrpc = peek_jsonrpc(&bytes);
    Ok((full(bytes), jsonrpc))
}

/// An MCP JSON-RPC POST: its body is read, and refusals answer with a JSON-RPC error.
pub fn is_json_post(method: &Method, headers: &http::HeaderMap) -> bool {
    method == Method::POST
        && headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| {
            let essence = ct.split(';').next().unwrap_or("").trim();
            essence.eq_ignore_ascii_case("application/json")
        })
}

/// Reads the id and method of a JSON-RPC message without copying the rest of it. `None` when the body
/// is not JSON-RPC at all.
pub fn peek_jsonrpc(bytes: &[u8]) -> Option<JsonRpc> {
    #[derive(Deserialize)]
    struct Peek<'a> {
        jsonrpc: Cow<'a, str>,
        #[serde(borrow, default)]
        id: Option<&'a RawValue>,
        #[serde(borrow, default)]
        method: Option<Cow<'a, str>>,
    }
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first == b'[' {
        // A batch (protocol 2025-03-26): no single id to answer with.
        serde_json::from_slice::<Vec<&RawValue>>(bytes).ok()?;
        return Some(JsonRpc { id: null_id(), method: None });
    }
    let peek: Peek<'_> = serde_json::from_slice(bytes).ok()?;
    (peek.jsonrpc == "2.0").then(|| JsonRpc {
        id: peek.id.map_or_else(null_id, RawValue::to_owned),
        method: peek.method.map(|m| m.into()),
    })
}

pub fn null_id() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peeks_id_and_method() {
        let rpc = peek_jsonrpc(br#"{"jsonrpc":"2.0","id":"a-1","method":"tools/call","params":{"name":"x"}}"#).unwrap();
        assert_eq!(rpc.id.get(), r#""a-1""#);
        assert_eq!(rpc.method.as_deref(), Some("tools/call"));
        let note = peek_jsonrpc(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert_eq!(note.id.get(), "null");
        let batch = peek_jsonrpc(br#" [{"jsonrpc":"2.0","id":1,"method":"ping"}]"#).unwrap();
        assert_eq!(batch.id.get(), "null");
        assert!(peek_jsonrpc(br#"{"id":1,"method":"ping"}"#).is_none());
        assert!(peek_jsonrpc(b"not json").is_none());
    }
}
