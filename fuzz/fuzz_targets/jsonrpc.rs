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
use mcp_tenant_proxy::policy::mcp::{Rpc, check_mirrored_headers, inspect};
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

static SKIP_KNOWN: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| match std::env::var("FUZZ_SKIP_KNOWN").unwrap_or_default().as_str() {
        "1" | "all" => vec!["surrogate_id", "float_id"],
        list => list.split(',').map(|c| &*String::from(c.trim()).leak()).filter(|c| !c.is_empty()).collect(),
    });

fn check_error_answers(rpc: &Rpc) {
    let id = rpc.error_id();
    // Known (reported): `inspect` accepts ids with a lone surrogate escape ("\ud83d"), which serde_json
    // cannot read back, and `ProxyError::body` then panics. `FUZZ_SKIP_KNOWN=surrogate_id` (or `1`) skips those inputs.
    if SKIP_KNOWN.contains(&"surrogate_id") && id.is_some_and(|id| serde_json::from_str::<Value>(id.get()).is_err()) {
        return;
    }
    // Known (reported): `ProxyError::body` turns the id into a `serde_json::Value`, and serde_json's default
    // float parsing is not exact, so a float id (or an integer beyond u64/i64) comes back as another
    // number. `FUZZ_SKIP_KNOWN=float_id` (or `1`) skips those inputs.
    let inexact = |id: &RawValue| {
        serde_json::from_str::<Value>(id.get()).is_ok_and(|v| v.as_f64().is_some() && !v.is_i64() && !v.is_u64())
    };
    if SKIP_KNOWN.contains(&"float_id") && id.is_some_and(inexact) {
        return;
    }
    // The id as a client reads it. `inspect` should accept only ids that are JSON (RFC 8259: a lone
    // surrogate escape such as "\ud83d" is not something a JSON parser must accept).
    let expected_id: Option<Value> = id.map(|id| {
        serde_json::from_str(id.get())
            .unwrap_or_else(|e| panic!("inspect accepted an id that is not JSON: {} ({e})", id.get()))
    });
    // Refusals before the body is read answer with `id: null`.
    let null = RawValue::from_string("null".into()).unwrap();
    for error in errors() {
        let (status, _, jsonrpc_code) = error.describe();
        for (id, expected_id) in [(id, expected_id.as_ref()), (Some(&*null), Some(&Value::Null))] {
            let body = error.body(id);
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
