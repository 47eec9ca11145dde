//! `/metrics` on the admin listener: the counters move by exactly what the requests did, the open-streams
//! gauge follows SSE streams from start to teardown, audit write errors show, and no user is named.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use governor::clock::FakeRelativeClock;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use mcp_tenant_proxy::policy::ratelimit::LimitClock;

type Series = BTreeMap<String, f64>;

/// Scrapes `/metrics` and returns every sample by its series (name and labels as written).
async fn scrape(harness: &Harness) -> (Series, String) {
    let request = Request::get(format!("http://{}/metrics", harness.admin)).body(body("")).unwrap();
    let response = harness.send(request).await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("application/openmetrics-text; version=1.0.0"), "{content_type}");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(text.ends_with("# EOF\n"), "an OpenMetrics exposition ends with # EOF:\n{text}");
    let series = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
            (series.to_owned(), value.parse().unwrap_or_else(|_| panic!("not a number: {line}")))
        })
        .collect();
    (series, text)
}

/// How each counter of the given families moved between two scrapes (series that did not move are left out).
fn deltas(before: &Series, after: &Series, families: &[&str]) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter(|(series, _)| families.iter().any(|f| series.starts_with(&format!("{f}{{"))))
        .map(|(series, value)| (series.clone(), value - before.get(series).copied().unwrap_or(0.0)))
        .filter(|(_, delta)| *delta != 0.0)
        .collect()
}

fn value(series: &Series, name: &str) -> f64 {
    series.get(name).copied().unwrap_or(0.0)
}

/// Scrapes until `series` reads `want`, for at most 10 s: the proxy notices a closed stream on its own
/// connection task, a moment after the client saw it end.
async fn wait_for(harness: &Harness, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = value(&scrape(harness).await.0, series);
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {now}, expected {want}");
        tokio::task::yield_now().await;
    }
}

fn call(url: &str, headers: &[(&str, &str)], tool: &str) -> Request<TestBody> {
    let mut request = mcp_post(url, headers);
    *request.body_mut() = body(format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}","arguments":{{}}}}}}"#
    ));
    request
}

#[tokio::test]
async fn counters_move_by_exactly_what_the_requests_did() {
    let (upstream, seen) = recording_upstream().await;
    let fields = "[upstreams.github.restrictions]\ntools = { block = [\"delete_*\"] }";
    // One request per user per hour, on a clock that does not move.
    let config = format!("rate_limit = {{ requests = 1, per = \"1h\" }}\n{}", base_config(upstream, fields));
    let harness = Harness::start_with_clock(&config, LimitClock::Fake(FakeRelativeClock::default())).await;
    let url = harness.url("/mcp/github");
    let alice = [("authorization", "Bearer alice-key-0001")];
    let as_bob = [("authorization", "Bearer ent-key-0001"), ("x-alloy-userid", "bob")];
    let (before, _) = scrape(&harness).await;

    // Allowed, not a tool call: an enterprise key acting as bob lists the tools.
    let mut list = mcp_post(&url, &as_bob);
    *list.body_mut() = body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#);
    assert_eq!(harness.send(list).await.status(), 200);
    // Allowed tool call.
    assert_eq!(harness.send(call(&url, &alice, "whoami")).await.status(), 200);
    // A blocked tool (carol's first request this hour, so not rate limited): refused by policy, no tool call.
    let as_carol = [("authorization", "Bearer tenant-key-0001"), ("x-alloy-userid", "carol")];
    assert_eq!(harness.send(call(&url, &as_carol, "delete_repo")).await.status(), 403);
    // A bad key.
    assert_eq!(harness.send(call(&url, &[("authorization", "Bearer wrong-key")], "whoami")).await.status(), 401);
    // Alice's one request this hour is spent: rate limited at the user level.
    assert_eq!(harness.send(call(&url, &alice, "whoami")).await.status(), 429);
    // No upstream serves this path.
    assert_eq!(harness.send(call(&harness.url("/nowhere"), &alice, "whoami")).await.status(), 404);
    assert_eq!(seen.lock().unwrap().len(), 2, "only the two allowed requests reached the upstream");

    let (after, text) = scrape(&harness).await;
    let families = [
        "mcp_proxy_requests_total",
        "mcp_proxy_denials_total",
        "mcp_proxy_rate_limited_total",
        "mcp_proxy_tool_calls_total",
        "mcp_proxy_upstream_latency_seconds_count",
    ];
    let expected: BTreeMap<String, f64> = [
        (r#"mcp_proxy_requests_total{upstream="github",status="200",code="ok"}"#, 2.0),
        (r#"mcp_proxy_requests_total{upstream="github",status="403",code="tool_not_allowed"}"#, 1.0),
        (r#"mcp_proxy_requests_total{upstream="github",status="401",code="invalid_api_key"}"#, 1.0),
        (r#"mcp_proxy_requests_total{upstream="github",status="429",code="rate_limited"}"#, 1.0),
        (r#"mcp_proxy_requests_total{upstream="",status="404",code="route_not_found"}"#, 1.0),
        (r#"mcp_proxy_denials_total{reason="tool_not_allowed"}"#, 1.0),
        (r#"mcp_proxy_denials_total{reason="invalid_api_key"}"#, 1.0),
        (r#"mcp_proxy_denials_total{reason="rate_limited"}"#, 1.0),
        (r#"mcp_proxy_denials_total{reason="route_not_found"}"#, 1.0),
        (r#"mcp_proxy_rate_limited_total{level="user"}"#, 1.0),
        (r#"mcp_proxy_tool_calls_total{upstream="github",tool="whoami"}"#, 1.0),
        (r#"mcp_proxy_upstream_latency_seconds_count{upstream="github"}"#, 2.0),
    ]
    .into_iter()
    .map(|(series, delta)| (series.to_owned(), delta))
    .collect();
    assert_eq!(deltas(&before, &after, &families), expected, "\n{text}");
    // Both upstream answers were quick: their latency lies in a finite bucket.
    assert_eq!(value(&after, r#"mcp_proxy_upstream_latency_seconds_bucket{le="30.0",upstream="github"}"#), 2.0);
    assert_eq!(value(&after, "mcp_proxy_audit_write_errors_total"), 0.0);

    // Every forwarded body was sent to the end and dropped.
    wait_for(&harness, "mcp_proxy_open_streams", 0.0).await;

    // No per-user (or per-key) labels: users and keys appear nowhere in the exposition.
    for name in ["alice", "bob", "acme-service", "ent-key", "wrong-key", "-laptop", "acme-backend"] {
        assert!(!text.contains(name), "{name} appears in the metrics:\n{text}");
    }
}

#[tokio::test]
async fn open_streams_follow_sse_streams_until_they_end_or_the_client_leaves() {
    let mut upstream = sse_upstream().await;
    let harness = Harness::start(&base_config(upstream.addr, "")).await;
    assert_eq!(value(&scrape(&harness).await.0, "mcp_proxy_open_streams"), 0.0);
    let stream_request = || {
        Request::get(harness.url("/mcp/github"))
            .header("host", harness.addr.to_string())
            .header("authorization", "Bearer alice-key-0001")
            .header("accept", "text/event-stream")
            .body(body(""))
            .unwrap()
    };

    // Stream A, on a connection of its own that the test can cut.
    let tcp = tokio::net::TcpStream::connect(harness.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    let connection = tokio::spawn(connection);
    let a = sender.send_request(stream_request()).await.unwrap();
    assert_eq!(a.status(), 200);
    let (mut a_events, a_dropped) = upstream.streams.recv().await.unwrap();
    a_events.send_data(Bytes::from_static(b"data: a\n\n")).await.unwrap();
    let mut a_body = a.into_body();
    assert_eq!(a_body.frame().await.unwrap().unwrap().into_data().unwrap(), "data: a\n\n");
    assert_eq!(value(&scrape(&harness).await.0, "mcp_proxy_open_streams"), 1.0);

    // Stream B, over the harness's pooled client.
    let b = harness.send(stream_request()).await;
    let (mut b_events, _b_dropped) = upstream.streams.recv().await.unwrap();
    b_events.send_data(Bytes::from_static(b"data: b\n\n")).await.unwrap();
    let mut b_body = b.into_body();
    assert_eq!(b_body.frame().await.unwrap().unwrap().into_data().unwrap(), "data: b\n\n");
    assert_eq!(value(&scrape(&harness).await.0, "mcp_proxy_open_streams"), 2.0);

    // B ends upstream: the client reads it to the end and it is no longer open.
    drop(b_events);
    assert!(b_body.frame().await.is_none());
    wait_for(&harness, "mcp_proxy_open_streams", 1.0).await;

    // A's client goes away mid-stream: the proxy drops the body (and so the upstream stream) and the gauge
    // comes back to zero.
    drop(a_body);
    drop(sender);
    connection.abort();
    tokio::time::timeout(Duration::from_secs(10), a_dropped).await.expect("upstream stream still open").ok();
    wait_for(&harness, "mcp_proxy_open_streams", 0.0).await;
    drop(a_events);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn audit_write_errors_are_exposed() {
    let (upstream, _) = recording_upstream().await;
    let config = base_config(upstream, "").replacen("[server]\n", "[server]\nshutdown_grace = \"200ms\"\n", 1);
    // Every write to /dev/full fails with ENOSPC.
    let mut harness = Harness::start_with_audit(&config, Path::new("/dev/full")).await;
    let audit = harness.app.as_ref().unwrap().audit_health().clone();
    assert_eq!(value(&scrape(&harness).await.0, "mcp_proxy_audit_write_errors_total"), 0.0);

    let response =
        harness.send(mcp_post(&harness.url("/mcp/github"), &[("authorization", "Bearer alice-key-0001")])).await;
    assert_eq!(response.status(), 200);
    tokio::time::timeout(Duration::from_secs(10), audit.wait_until(|h| h.write_errors() >= 1))
        .await
        .expect("the audit writer reports its failed writes");
    // The writer keeps retrying, so the count may grow while the scrape runs.
    let low = audit.write_errors();
    let scraped = value(&scrape(&harness).await.0, "mcp_proxy_audit_write_errors_total");
    let high = audit.write_errors();
    assert!((low as f64..=high as f64).contains(&scraped), "{scraped} not in {low}..={high}");

    let app = harness.app.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), app.shutdown()).await.expect("shutdown ends");
}
