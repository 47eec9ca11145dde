//! Request and response bodies.
//!
//! Every request body is an MCP JSON-RPC message, sent by POST: it is read whole (bounded by
//! `max_body_bytes` and `body_read_timeout`) and inspected whatever its Content-Type says, because the
//! policy steps need its method, tool and id before anything is forwarded, and a server that accepts a
//! looser Content-Type must not receive a body the proxy never read. Other methods carry no body.
//! Responses stream through frame by frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
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

/// Request-body bytes held in memory at once, over all requests and per API key. Bodies are read whole
/// (policy reads them before anything is forwarded), so without a bound a few connections with many
/// unfinished large bodies could make the proxy hold gigabytes.
pub struct BodyBudget {
    used: AtomicU64,
    by_key: DashMap<Arc<str>, u64>,
    /// The one share that every caller without a valid key draws on (no key id is empty).
    anonymous: Arc<str>,
}

impl Default for BodyBudget {
    fn default() -> Self {
        BodyBudget { used: AtomicU64::new(0), by_key: DashMap::new(), anonymous: Arc::from("") }
    }
}

/// The bounds of a [`BodyBudget`], from the config in force.
#[derive(Clone, Copy)]
pub struct BudgetLimits {
    pub total: u64,
    pub per_key: u64,
}

impl BodyBudget {
    /// A share of the budget for one request of `key` (`None`: no valid key), growing as its body
    /// arrives, given back on drop.
    pub fn share(&self, key: Option<&Arc<str>>, limits: BudgetLimits) -> Share<'_> {
        let key = key.unwrap_or(&self.anonymous).clone();
        Share { budget: self, key, limits, held: 0 }
    }

    /// Bytes held now (for tests and metrics).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

pub struct Share<'a> {
    budget: &'a BodyBudget,
    key: Arc<str>,
    limits: BudgetLimits,
    held: u64,
}

impl Share<'_> {
    /// Holds at least `bytes` in all: 429 past the key's bound, 503 past the total.
    pub fn hold(&mut self, bytes: u64) -> Result<(), ProxyError> {
        let more = bytes.saturating_sub(self.held);
        if more == 0 {
            return Ok(());
        }
        let mut of_key = self.budget.by_key.entry(self.key.clone()).or_insert(0);
        let refused = if *of_key + more > self.limits.per_key {
            Some(ProxyError::KeyBodiesExhausted)
        } else if self.budget.used.fetch_add(more, Ordering::Relaxed) + more > self.limits.total {
            self.budget.used.fetch_sub(more, Ordering::Relaxed);
            Some(ProxyError::ProxyBusy)
        } else {
            None
        };
        let Some(refused) = refused else {
            *of_key += more;
            self.held += more;
            return Ok(());
        };
        // A key that holds nothing keeps no entry.
        if *of_key == 0 {
            drop(of_key);
            self.budget.by_key.remove_if(&self.key, |_, of_key| *of_key == 0);
        }
        Err(refused)
    }
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        if self.held == 0 {
            return;
        }
        self.budget.used.fetch_sub(self.held, Ordering::Relaxed);
        self.budget.by_key.remove_if_mut(&self.key, |_, of_key| {
            *of_key -= self.held;
            *of_key == 0
        });
    }
}

/// Reads the request body, holding its bytes in `share` as they arrive. Returns the body to forward and,
/// for a POST, its bytes (the same buffer: forwarding it copies nothing). Trailers are dropped: they are
/// headers too, and the client's must not reach the upstream.
pub async fn read_request(
    body: Incoming,
    parts: &Parts,
    max_bytes: u64,
    read_timeout: Duration,
    share: &mut Share<'_>,
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
    // A declared length is held up front, so a body that cannot fit is refused before it is sent.
    share.hold(declared.unwrap_or(0))?;
    let bytes = tokio::time::timeout(read_timeout, collect(body, max_bytes, share))
        .await
        .map_err(|_| ProxyError::BodyTimeout)??;
    Ok((full(bytes.clone()), Some(bytes)))
}

/// The body's data frames, at most `max_bytes`, each held in `share` before it is kept.
async fn collect(mut body: Incoming, max_bytes: u64, share: &mut Share<'_>) -> Result<Bytes, ProxyError> {
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| ProxyError::BodyUnreadable)?.into_data() else { continue };
        len += data.len() as u64;
        if len > max_bytes {
            return Err(ProxyError::BodyTooLarge);
        }
        share.hold(len)?;
        // One frame (the usual case) is kept as it came; more are joined.
        match &first {
            None if rest.is_empty() => first = Some(data),
            _ => {
                if let Some(first) = first.take() {
                    rest.extend_from_slice(&first);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| rest.freeze()))
}

/// At most `max` bytes of a body that ends within `wait`: `None` when it is longer, slower or broken, or
/// when `share` cannot hold `max` bytes.
pub async fn read_prefix(body: Incoming, max: usize, wait: Duration, share: &mut Share<'_>) -> Option<Bytes> {
    share.hold(max as u64).ok()?;
    let collected = tokio::time::timeout(wait, Limited::new(body, max).collect()).await.ok()?.ok()?;
    Some(collected.to_bytes())
}

/// An MCP JSON-RPC POST: its body is read and inspected, and refusals answer with a JSON-RPC error.
pub fn is_json_post(method: &Method) -> bool {
    method == Method::POST
}
