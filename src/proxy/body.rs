//! Request and response bodies.
//!
//! MCP JSON-RPC POST bodies are read whole (bounded by `max_body_bytes` and `body_read_timeout`): the
//! policy steps need the method and id before anything is forwarded. Every other body, and every response,
//! streams through frame by frame.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, header, request::Parts};
use http_body::Frame;
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

/// Reads or wraps the request body. Returns the body to forward and, for a JSON POST, its bytes (the
/// same buffer: forwarding it copies nothing).
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
    let limit = usize::try_from(max_bytes).unwrap_or(usize::MAX);
    if !is_json_post(&parts.method, &parts.headers) {
        // Streamed; a body that outgrows the limit mid-way fails the upstream request (see forward).
        // Trailers are dropped: they are headers too, and the client's must not reach the upstream.
        let body = Limited::new(body, limit).map_frame(|frame| match frame.into_data() {
            Ok(data) => Frame::data(data),
            Err(_trailers) => Frame::data(Bytes::new()),
        });
        return Ok((body.boxed(), None));
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
    Ok((full(bytes.clone()), Some(bytes)))
}

/// At most `max` bytes of a body that ends within `wait`: `None` when it is longer, slower or broken.
pub async fn read_prefix(body: Incoming, max: usize, wait: Duration) -> Option<Bytes> {
    let collected = tokio::time::timeout(wait, Limited::new(body, max).collect()).await.ok()?.ok()?;
    Some(collected.to_bytes())
}

/// An MCP JSON-RPC POST: its body is read, and refusals answer with a JSON-RPC error.
pub fn is_json_post(method: &Method, headers: &http::HeaderMap) -> bool {
    method == Method::POST
        && headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| {
            let essence = ct.split(';').next().unwrap_or("").trim();
            essence.eq_ignore_ascii_case("application/json")
        })
}
