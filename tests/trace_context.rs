//! Following one call across services: the W3C `traceparent` goes to the upstream (the client's, or a
//! new one), its trace id is in the audit line, and every JSON log line of the request carries the
//! request id and the trace id.

mod common;

use common::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test]
async fn the_clients_traceparent_reaches_the_upstream_and_the_audit_line() {
    let (upstream, seen) = recording_upstream().await;
    let mut harness = Harness::start(&base_config(upstream, "")).await;
    let url = harness.url("/mcp/github");
    let auth = [("authorization", "Bearer ent-key-0001"), ("x-alloy-userid", "alice")];
    let with = [auth[0], auth[1], ("traceparent", TRACEPARENT), ("tracestate", "vendor=opaque")];
    assert_eq!(harness.send(mcp_post(&url, &with)).await.status(), 200);
    // Without one (or with a malformed one) the proxy starts a trace, and drops the orphan tracestate.
    assert_eq!(harness.send(mcp_post(&url, &auth)).await.status(), 200);
    let bad = [auth[0], auth[1], ("traceparent", "00-zz-00-01"), ("tracestate", "vendor=opaque")];
    assert_eq!(harness.send(mcp_post(&url, &bad)).await.status(), 200);
    // A refused request has a trace id in its audit line too.
    let refused = [("authorization", "Bearer wrong-key"), ("traceparent", TRACEPARENT)];
    assert_eq!(harness.send(mcp_post(&url, &refused)).await.status(), 401);

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen[0].headers["traceparent"], TRACEPARENT);
    assert_eq!(seen[0].headers["tracestate"], "vendor=opaque");
    let started: Vec<String> =
        seen[1..].iter().map(|s| s.headers["traceparent"].to_str().unwrap().to_owned()).collect();
    for (s, traceparent) in seen[1..].iter().zip(&started) {
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!((parts[0], parts[1].len(), parts[2].len(), parts[3]), ("00", 32, 16, "01"), "{traceparent}");
        assert!(s.headers.get("tracestate").is_none());
    }
    assert_ne!(started[0], started[1], "each request starts its own trace");

    let lines = harness.shutdown_and_read_audit().await;
    let trace_ids: Vec<&str> = lines.iter().map(|l| l["trace_id"].as_str().unwrap()).collect();
    assert_eq!(trace_ids[0], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(trace_ids[1], &started[0][3..35]);
    assert_eq!(trace_ids[2], &started[1][3..35]);
    assert_eq!(trace_ids[3], "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_id_and_trace_id_on_a_requests_own_lines() {
    let (upstream, _seen) = recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    // `[log] format = "json"` in the file; the same comes from --log-format or MCP_PROXY_LOG_FORMAT.
    std::fs::write(&config, format!("[log]\nformat = \"json\"\n{}", base_config(upstream, ""))).unwrap();
    let log = dir.path().join("proxy.log");
    let proxy = Running::spawn(&config, &log);
    let url = format!("http://{}/mcp/github", proxy.proxy);
    let refused = mcp_post(&url, &[("authorization", "Bearer wrong-key"), ("traceparent", TRACEPARENT)]);
    let response = plain_client().request(refused).await.unwrap();
    assert_eq!(response.status(), 401);

    // The refusal is logged once, as JSON, inside the request's span.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("request refused")) {
            break line.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "no refusal logged:\n{text}");
        tokio::task::yield_now().await;
    };
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["fields"]["code"], "invalid_api_key");
    assert_eq!(line["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    let request_id = line["span"]["request_id"].as_str().unwrap();
    assert!(!request_id.is_empty());
    assert!(!line.to_string().contains("wrong-key"), "no key in the logs");
    // Every line of the file is JSON.
    for l in std::fs::read_to_string(&log).unwrap().lines() {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"));
    }
}

#[test]
fn an_unknown_log_format_is_refused_before_anything_starts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-tenant-proxy"))
        .arg("keygen")
        .env("MCP_PROXY_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MCP_PROXY_LOG_FORMAT"));
}

fn plain_client() -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, TestBody> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}
