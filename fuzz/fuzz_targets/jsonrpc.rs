//! JSON-RPC inspection (`policy::mcp::inspect`), the error answers built from what it found, and the
//! mirror-header check (`policy::mcp::check_mirrored_headers`).
//!
//! Input: the POST body, then optionally a NUL byte and header fields separated by NUL bytes (a NUL never
//! occurs in a JSON text, so bodies split losslessly). Each field's first byte picks the name (even:
//! `mcp-method`, odd: `mcp-name`), the rest is its value; a name may repeat.
//!
//! Properties, when `inspect` accepts the body:
//! - for several `ProxyError`s, `body(error_id)` and `into_response(error_id)` are JSON; with an id they are
//!   JSON-RPC 2.0 errors whose `id` equals the request's, with the variant's code; the response's status is
//!   the variant's.
//! - `check_mirrored_headers` never panics on arbitrary values; when it accepts, the mirrors present agree
//!   with the body's method and target; headers that mirror the body exactly are accepted.

#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::Body;
use libfuzzer_sys::fuzz_target;
use mcp_tenant_proxy::error::ProxyError;
use mcp_tenant_proxy::policy::mcp::{Id, Rpc, check_mirrored_headers, inspect};
use mcp_tenant_proxy::policy::ratelimit::{Level, Limit, Refusal};
use serde_json::Value;
use serde_json::value::RawValue;

fn errors() -> Vec<ProxyError> {
    let limit = Limit::new(10.try_into().unwrap(), Duration::from_secs(60), None).unwrap();
    vec![
        ProxyError::ParseError,
        ProxyError::InvalidRequest,
        ProxyError::HeaderMismatch,
        ProxyError::ToolNotAllowed,
        ProxyError::InvalidUserId("only ASCII letters, digits and . _ @ : - are allowed"),
        ProxyError::DuplicateHeader("user"),
        ProxyError::RateLimited(Refusal { level: Level::Tool, limit, retry_after: Duration::from_millis(1500) }),
        ProxyError::InvalidApiKey,
    ]
}

fn response_bytes(error: &ProxyError, id: Option<&RawValue>) -> (u16, Vec<u8>) {
    let response = error.into_response(id);
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => out.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
            Poll::Ready(None) => return (status, out),
            Poll::Ready(Some(Err(e))) => panic!("an error body failed: {e}"),
            Poll::Pending => panic!("an error body is not ready"),
        }
    }
}

fn check_error_answers(rpc: &Rpc) {
    let id = rpc.error_id().map(Id::as_raw);
    // The id as a client reads it: `inspect` accepts only ids that any JSON reader can hold (no lone
    // surrogate escape, no number beyond f64), and the answer carries it as written, on one ASCII line.
    if let Some(id) = id {
        assert!(id.get().is_ascii() && !id.get().contains('\n'), "an id that is not one ASCII line: {}", id.get());
    }
    let expected_id: Option<Value> = id.map(|id| {
        serde_json::from_str(id.get())
            .unwrap_or_else(|e| panic!("inspect accepted an id that is not JSON: {} ({e})", id.get()))
    });
    // Refusals before the body is read answer with `id: null`.
    let null = RawValue::from_string("null".into()).unwrap();
    for error in errors() {
        let (status, _, jsonrpc_code) = error.describe();
        for (id, expected_id) in [(id, expected_id.as_ref()), (Some(&*null), Some(&Value::Null))] {
            let body: Value = serde_json::from_str(&error.body(id)).expect("the error body is JSON");
            let (response_status, bytes) = response_bytes(&error, id);
            assert_eq!(response_status, status.as_u16(), "{error:?}");
            let answered: Value = serde_json::from_slice(&bytes).expect("the error answer is JSON");
            assert_eq!(answered, body, "into_response and body disagree");
            match expected_id {
                Some(expected_id) => {
                    assert_eq!(answered["jsonrpc"], "2.0");
                    assert_eq!(&answered["id"], expected_id, "the answer's id differs from the request's");
                    assert_eq!(answered["error"]["code"], jsonrpc_code);
                    assert_eq!(answered["error"]["data"]["code"], error.code());
                }
                None => {
                    assert!(answered.get("id").is_none());
                    assert_eq!(answered["error"]["code"], error.code());
                }
            }
        }
    }
}

fn headers_from(fields: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for field in fields.split(|&b| b == 0) {
        let Some((&which, value)) = field.split_first() else { continue };
        let name = if which % 2 == 0 { "mcp-method" } else { "mcp-name" };
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(HeaderName::from_static(name), value);
        }
    }
    headers
}

fn check_mirrors(rpc: &Rpc, headers: &HeaderMap) {
    let method_values: Vec<_> = headers.get_all("mcp-method").iter().collect();
    let name_values: Vec<_> = headers.get_all("mcp-name").iter().collect();
    if check_mirrored_headers(headers, rpc).is_ok() {
        assert!(method_values.len() <= 1 && name_values.len() <= 1, "a repeated mirror header was accepted");
        if method_values.is_empty() && name_values.is_empty() {
            return;
        }
        let message = rpc.single().expect("mirrors accepted for a batch");
        if let Some(method) = method_values.first() {
            assert_eq!(Some(method.as_bytes()), message.method.as_deref().map(str::as_bytes));
        }
        let target = message.target.as_ref().map(|t| t.name().as_bytes());
        assert_eq!(name_values.first().map(|v| v.as_bytes()), target, "Mcp-Name accepted but differs from the body");
    }
    // Exact mirrors of a single message must be accepted.
    if let Some(message) = rpc.single() {
        let mut exact = HeaderMap::new();
        if let Some(method) = &message.method {
            let Ok(value) = HeaderValue::from_str(method) else { return };
            exact.insert("mcp-method", value);
        }
        if let Some(target) = &message.target {
            let Ok(value) = HeaderValue::from_str(target.name()) else { return };
            exact.insert("mcp-name", value);
        }
        assert_eq!(check_mirrored_headers(&exact, rpc), Ok(()), "exact mirrors refused");
    }
}

fuzz_target!(|data: &[u8]| {
    let (body, fields) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(rpc) = inspect(body) else { return };
    assert!(!rpc.messages.is_empty());
    check_error_answers(&rpc);
    check_mirrors(&rpc, &headers_from(fields));
});
