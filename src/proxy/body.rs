//! Request and response bodies.
//!
//! Every request body is an MCP JSON-RPC message, sent by POST: it is read whole (bounded by
//! `max_body_bytes` and `body_read_timeout`) and inspected whatever its Content-Type says, because the
//! policy steps need its method, tool and id before anything is forwarded, and a server that accepts a
//! looser Content-Type must not receive a body the proxy never read. Other methods carry no body.
//! Responses stream through frame by frame.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, header, request::Parts};
use http_body_util::{BodyExt, Empty, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;

use crate::error::ProxyError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Reads the request body. Returns the body to forward and, for a POST, its bytes (the same buffer:
/// forwarding it copies nothing). Trailers are dropped: they are headers too, and the client's must not
/// reach the upstream.
pub async fn read_request(
    body: Incoming,
    parts: &Parts,
    max_bytes: u64,
    read_timeout: Duration,
) -> Result<(ProxyBody, Option<Bytes>), ProxyError> {
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_bytes) {
        return Err(ProxyError::BodyTooLarge);
    }
    if parts.method != Method::POST {
        // MCP sends bodies with POST only; a body on any other method is never forwarded unread.
        let has_body = declared.is_some_and(|len| len > 0) || parts.headers.contains_key(header::TRANSFER_ENCODING);
        return if has_body { Err(ProxyError::InvalidRequest) } else { Ok((empty(), None)) };
    }
    let limit = usize::try_from(max_bytes).unwrap_or(usize::MAX);
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
    Ok((full(bytes.clone()), Some(bytes)))
}

/// At most `max` bytes of a body that ends within `wait`: `None` when it is longer, slower or broken.
pub async fn read_prefix(body: Incoming, max: usize, wait: Duration) -> Option<Bytes> {
    let collected = tokio::time::timeout(wait, Limited::new(body, max).collect()).await.ok()?.ok()?;
    Some(collected.to_bytes())
}

/// An MCP JSON-RPC POST: its body is read and inspected, and refusals answer with a JSON-RPC error.
pub fn is_json_post(method: &Method) -> bool {
    method == Method::POST
}
