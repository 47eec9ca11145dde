//! The request path, one step at a time, so a regression shows in the step that caused it:
//!
//!     cargo bench --bench request_path
//!
//! key lookup (Authorization -> SHA-256 -> key), user resolution (the user header of an enterprise
//! key), JSON-RPC inspection of a `tools/call` body, the trace context, the request rewrite (strip,
//! inject, X-Forwarded-*), and audit serialization (the event as JSON, then chained). The config has
//! 1,000 users, each with a credential, as `../shared/bench/compare.sh` uses.

use std::hint::black_box;

use bytes::Bytes;
use criterion::Criterion;
use http::{HeaderMap, HeaderValue, Request};
use mcp_tenant_proxy::config::Config;
use mcp_tenant_proxy::policy::{auth, identity, mcp};
use mcp_tenant_proxy::proxy::headers::{self, Rewrite};
use mcp_tenant_proxy::telemetry::audit::{self, AuditEvent, AuditSink};
use mcp_tenant_proxy::telemetry::trace::TraceContext;

const KEY: &str = "bench-enterprise-key-0001";
const BODY: &[u8] =
    br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search_issues","arguments":{"q":"is:open label:bug"}}}"#;

fn config() -> Config {
    let mut text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = ""
[[keys]]
id = "backend"
kind = "enterprise"
secret = "{KEY}"
user = "service"
act_as = ["*"]
[upstreams.github]
url = "http://127.0.0.1:9/mcp"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
forward_user_header = "x-mcp-user"
"#
    );
    for i in 0..1000 {
        text.push_str(&format!(
            "[[users]]\nid = \"user-{i:04}\"\n[[credentials]]\nuser = \"user-{i:04}\"\nupstream = \"github\"\nsecret = \"tok-{i:04}\"\n"
        ));
    }
    Config::from_toml(&text, std::path::Path::new(".")).expect("bench config")
}

fn client_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("authorization", HeaderValue::from_str(&format!("Bearer {KEY}")).unwrap());
    headers.insert("x-alloy-userid", HeaderValue::from_static("user-0421"));
    headers.insert("host", HeaderValue::from_static("127.0.0.1:8080"));
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("accept", HeaderValue::from_static("application/json, text/event-stream"));
    headers.insert("mcp-session-id", HeaderValue::from_static("3f1c2a"));
    headers.insert("traceparent", HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
    headers
}

fn main() {
    let config = config();
    let headers = client_headers();
    let upstream = &config.upstreams[0];
    let mut c = Criterion::default().configure_from_args();

    c.bench_function("key_lookup", |b| b.iter(|| auth::authenticate(&config, black_box(&headers)).unwrap()));

    let key = auth::authenticate(&config, &headers).unwrap();
    c.bench_function("user_resolution", |b| {
        b.iter(|| {
            let requested = identity::requested_user(&config.identity, black_box(&headers)).unwrap();
            identity::resolve(&config.identity, &config, &key, requested, false).unwrap()
        })
    });

    c.bench_function("jsonrpc_inspection", |b| b.iter(|| mcp::inspect(black_box(BODY)).unwrap()));

    c.bench_function("trace_context", |b| b.iter(|| TraceContext::from_headers(black_box(&headers))));
    c.bench_function("trace_context_started", |b| b.iter(|| TraceContext::from_headers(black_box(&HeaderMap::new()))));

    let user = identity::resolve(&config.identity, &config, &key, Some("user-0421"), false).unwrap().user;
    let credentials = config.credentials(&user, upstream).expect("a credential");
    let trace = TraceContext::from_headers(&headers);
    let peer = "127.0.0.1:40000".parse().unwrap();
    c.bench_function("header_rewrite", |b| {
        b.iter_batched(
            || {
                let mut request = Request::new(Bytes::from_static(BODY));
                *request.headers_mut() = headers.clone();
                *request.uri_mut() = "/mcp/github".parse().unwrap();
                request.into_parts().0
            },
            |mut parts| {
                let rewrite = Rewrite {
                    user_header: &config.identity.user_header,
                    token_header: &config.identity.token_header,
                    credential: &credentials[0].header_value,
                    acting_user: &user.name,
                    peer,
                    tls: false,
                    request_id: "0badc0de-1",
                    trace: &trace,
                };
                headers::rewrite_request(&mut parts, upstream, &rewrite).unwrap();
                parts
            },
            criterion::BatchSize::SmallInput,
        )
    });

    let rpc = mcp::inspect(BODY).unwrap();
    let event = AuditEvent {
        request_id: "0badc0de-1",
        trace_id: trace.trace_id(),
        method: "POST",
        path: "/mcp/github",
        key_id: Some("backend"),
        key_kind: Some("enterprise"),
        requested_user: Some("user-0421"),
        acting_user: Some("user-0421"),
        user_proof: None,
        token_issuer: None,
        decision: "allow",
        reason: "ok",
        fallback: false,
        upstream: Some("github"),
        mcp_method: rpc.method(),
        jsonrpc_id: rpc.error_id(),
        tool: Some("search_issues"),
        prompt: None,
        resource: None,
        rate_limit_level: None,
        session: Some("9f2c41d07a3b"),
        status: 200,
        latency_ms: 0.42,
    };
    c.bench_function("audit_serialization", |b| b.iter(|| AuditSink::line(black_box(&event))));
    let line = AuditSink::line(&event);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut prev = [0u8; 32];
    c.bench_function("audit_chain", |b| {
        b.iter(|| {
            out.clear();
            audit::chain_line(&mut out, &mut prev, black_box(&line));
        })
    });
    c.final_summary();
}
