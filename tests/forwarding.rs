//! Forwarding: what the upstream receives, streaming, limits, timeouts and upstream failures.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Version};
use http_body_util::BodyExt;

fn alice() -> [(&'static str, &'static str); 2] {
    [("authorization", "Bearer ent-key-0001"), ("x-alloy-userid", "alice")]
}

#[tokio::test]
async fn upstream_sees_the_users_credential_and_none_of_the_clients_secrets() {
    let (upstream, seen) = recording_upstream().await;
    let harness = Harness::start(&base_config(upstream, r#"forward_user_header = "x-mcp-user""#)).await;
    let mut request = mcp_post(&harness.url("/mcp/github/sub/path?x=1&y=two"), &alice());
    let h = request.headers_mut();
    h.insert("x-credential-id", "default".parse().unwrap());
    h.insert("x-mcp-user", "bob".parse().unwrap()); // a forged copy of the forwarded user header
    h.insert("origin", format!("http://{}", harness.addr).parse().unwrap());
    h.insert("connection", "x-hop".parse().unwrap());
    h.insert("x-hop", "1".parse().unwrap());
    h.insert("proxy-authorization", "Basic Zm9vOmJhcg==".parse().unwrap());
    h.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    h.insert("mcp-param-region", "eu".parse().unwrap());
    let response = harness.send(request).await;
    assert_eq!(response.status(), 200);

    let seen = seen.lock().unwrap()[0].clone();
    assert_eq!(seen.uri.path(), "/mcp/sub/path");
    assert_eq!(seen.uri.query(), Some("x=1&y=two"));
    let h = &seen.headers;
    assert_eq!(h["authorization"], "Bearer cred-alice");
    assert_eq!(h.get_all("authorization").iter().count(), 1);
    assert_eq!(h["x-mcp-user"], "alice");
    assert_eq!(h.get_all("x-mcp-user").iter().count(), 1);
    assert_eq!(h["host"], upstream.to_string().as_str());
    for gone in ["x-alloy-userid", "x-credential-id", "origin", "x-hop", "proxy-authorization", "connection"] {
        assert!(h.get(gone).is_none(), "{gone} was forwarded");
    }
    let everything = format!("{h:?}");
    assert!(!everything.contains("ent-key-0001"), "the client's API key reached the upstream");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], harness.addr.to_string().as_str());
    assert_eq!(h["mcp-param-region"], "eu", "unknown headers are forwarded untouched");
    assert!(h.get("x-request-id").is_some());
    assert_eq!(
        seen.body,
        r#"{"jsonrpc":"2.0","id":"call-1","method":"tools/call","params":{"name":"whoami","arguments":{}}}"#
    );
}

#[tokio::test]
async fn routes_by_prefix_at_segment_boundaries() {
    let (upstream, seen) = recording_upstream().await;
    let config = format!(
        "{}\n[upstreams.root]\nurl = \"http://{upstream}/\"\npath = \"/mcp/github/v2\"\ninject = {{ header = \"x-api-key\", value = \"{{secret}}\" }}\n\n[[credentials]]\nuser = \"alice\"\nupstream = \"root\"\nsecret = \"root-cred\"\n",
        base_config(upstream, "")
    );
    let harness = Harness::start(&config).await;
    for (path, status) in [("/mcp/githubx", 404), ("/other", 404), ("/", 404)] {
        let response = harness.send(mcp_post(&harness.url(path), &alice())).await;
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(json(response).await["error"]["data"]["code"], "route_not_found");
    }
    let response = harness.send(mcp_post(&harness.url("/mcp/github/v2/x"), &alice())).await;
    assert_eq!(response.status(), 200);
    let response = harness.send(mcp_post(&harness.url("/mcp/github"), &alice())).await;
    assert_eq!(response.status(), 200);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "404s never reach an upstream");
    assert_eq!(seen[0].uri.path(), "/x");
    assert_eq!(seen[0].headers["x-api-key"], "root-cred");
    assert!(seen[0].headers.get("authorization").is_none());
    assert_eq!(seen[1].uri.path(), "/mcp");
    assert_eq!(seen[1].headers["authorization"], "Bearer cred-alice");
}

#[tokio::test]
async fn origin_is_checked_at_the_edge() {
    let (upstream, seen) = recording_upstream().await;
    let harness = Harness::start(&base_config(upstream, "")).await;
    let with_origin = |origin: &str| {
        let mut request = mcp_post(&harness.url("/mcp/github"), &alice());
        request.headers_mut().insert("origin", origin.parse().unwrap());
        request
    };
    let response = harness.send(with_origin("http://evil.example")).await;
    assert_eq!(response.status(), 403);
    assert_eq!(json(response).await["error"]["data"]["code"], "origin_not_allowed");
    let response = harness.send(with_origin(&format!("http://{}", harness.addr))).await;
    assert_eq!(response.status(), 200);
    assert_eq!(seen.lock().unwrap().len(), 1);

    let listed = format!("[server]\nallowed_origins = [\"https://app.example.com\"]\n{}", base_config(upstream, ""))
        .replacen("[server]\nlisten", "listen", 1);
    let harness = Harness::start(&listed).await;
    let with_origin = |origin: &str| {
        let mut request = mcp_post(&harness.url("/mcp/github"), &alice());
        request.headers_mut().insert("origin", origin.parse().unwrap());
        request
    };
    assert_eq!(harness.send(with_origin("https://app.example.com")).await.status(), 200);
    assert_eq!(harness.send(with_origin(&format!("http://{}", harness.addr))).await.status(), 403);
}

#[tokio::test]
async fn sse_events_pass_through_as_they_arrive() {
    let mut upstream = sse_upstream().await;
    let harness = Harness::start(&base_config(upstream.addr, "")).await;
    let request = Request::get(harness.url("/mcp/github"))
        .header("authorization", "Bearer alice-key-0001")
        .header("accept", "text/event-stream")
        .body(body(""))
        .unwrap();
    let response = harness.send(request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (mut events, _dropped) = upstream.streams.recv().await.unwrap();
    let mut body = response.into_body();

    // The upstream sends one event and then waits: the test must see it before the upstream goes on.
    events.send_data(Bytes::from_static(b"event: message\ndata: one\n\n")).await.unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame()).await.expect("event one was held back");
    assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "event: message\ndata: one\n\n");
    events.send_data(Bytes::from_static(b"event: message\ndata: two\n\n")).await.unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame()).await.expect("event two was held back");
    assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "event: message\ndata: two\n\n");
    drop(events);
    assert!(body.frame().await.is_none(), "the stream ends when the upstream ends it");
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_stream() {
    let mut upstream = sse_upstream().await;
    let harness = Harness::start(&base_config(upstream.addr, "")).await;
    let request = Request::get(harness.url("/mcp/github"))
        .header("authorization", "Bearer alice-key-0001")
        .body(body(""))
        .unwrap();
    let response = harness.send(request).await;
    let (mut events, dropped) = upstream.streams.recv().await.unwrap();
    events.send_data(Bytes::from_static(b"data: hello\n\n")).await.unwrap();
    let mut body = response.into_body();
    assert!(body.frame().await.is_some());
    drop(body);
    drop(harness); // closes the client's pooled connection too
    tokio::time::timeout(Duration::from_secs(10), dropped).await.expect("upstream stream still open").ok();
}

#[tokio::test]
async fn upstream_failures_map_to_502_and_504() {
    // Refused: a port bound but not listening (held, so no other test can take it meanwhile).
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = held.local_addr().unwrap();
    let harness = Harness::start(&base_config(closed, "")).await;
    let response = harness.send(mcp_post(&harness.url("/mcp/github"), &alice())).await;
    assert_eq!(response.status(), 502);
    let body = json(response).await;
    assert_eq!(body["error"]["data"]["code"], "upstream_unavailable");
    assert_eq!(body["id"], "call-1");

    // Accepts but never answers: the response-header timeout applies.
    let silent = spawn_http(|_req| std::future::pending()).await;
    let harness = Harness::start(&base_config(silent, r#"response_header_timeout = "300ms""#)).await;
    let response = harness.send(mcp_post(&harness.url("/mcp/github"), &alice())).await;
    assert_eq!(response.status(), 504);
    assert_eq!(json(response).await["error"]["data"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn header_and_body_limits() {
    let (upstream, seen) = recording_upstream().await;
    let config = base_config(upstream, "").replacen(
        "[server]\n",
        "[server]\nmax_header_bytes = 2048\nmax_body_bytes = 1024\n",
        1,
    );
    let harness = Harness::start(&config).await;
    let mut request = mcp_post(&harness.url("/mcp/github"), &alice());
    request.headers_mut().insert("x-padding", "p".repeat(3000).parse().unwrap());
    let response = harness.send(request).await;
    assert_eq!(response.status(), 431);

    let big = format!(
        r#"{{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{{"name":"x","arguments":{{"p":"{}"}}}}}}"#,
        "x".repeat(2000)
    );
    let mut request = mcp_post(&harness.url("/mcp/github"), &alice());
    *request.body_mut() = body(big.clone());
    let response = harness.send(request).await;
    assert_eq!(response.status(), 413);

    // Streamed (no Content-Length) and not JSON: the limit still holds.
    let (mut tx, channel) = http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
    let request = Request::post(harness.url("/mcp/github"))
        .header("authorization", "Bearer alice-key-0001")
        .header("content-type", "application/octet-stream")
        .body(channel.map_err(|never| match never {}).boxed())
        .unwrap();
    let sending = tokio::spawn(async move {
        for _ in 0..4 {
            if tx.send_data(Bytes::from(vec![b'z'; 512])).await.is_err() {
                break;
            }
        }
    });
    let response = harness.send(request).await;
    assert_eq!(response.status(), 413);
    let _ = sending.await;
    assert!(seen.lock().unwrap().iter().all(|s| s.body.len() <= 1024), "no oversized body reached the upstream intact");
}

#[tokio::test]
async fn inbound_h2c_and_h2_prior_knowledge_upstream() {
    let (upstream, seen) = recording_upstream().await;
    let harness = Harness::start(&base_config(upstream, "http2_prior_knowledge = true")).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<TestBody>();
    let response = client.request(mcp_post(&harness.url("/mcp/github"), &alice())).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), Version::HTTP_2);
    let seen = seen.lock().unwrap()[0].clone();
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(seen.headers["authorization"], "Bearer cred-alice");
}

#[tokio::test]
async fn health_endpoints_on_the_admin_listener() {
    let (upstream, _) = recording_upstream().await;
    let harness = Harness::start(&base_config(upstream, "")).await;
    for path in ["/healthz", "/readyz"] {
        let request = Request::get(format!("http://{}{path}", harness.admin)).body(body("")).unwrap();
        assert_eq!(harness.send(request).await.status(), 200, "{path}");
    }
    let request = Request::get(harness.url("/healthz")).body(body("")).unwrap();
    assert_eq!(harness.send(request).await.status(), 404, "admin paths are not on the proxy listener");
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let (arrived_tx, mut arrived_rx) = tokio::sync::mpsc::channel(1);
    let upstream = spawn_http(move |_req| {
        let mut release = release_rx.clone();
        let arrived = arrived_tx.clone();
        async move {
            arrived.send(()).await.unwrap();
            release.wait_for(|r| *r).await.unwrap();
            http::Response::new(body("finished"))
        }
    })
    .await;
    let mut harness = Harness::start(&base_config(upstream, "")).await;
    let client = harness.client.clone();
    let in_flight = tokio::spawn(client.request(mcp_post(&harness.url("/mcp/github"), &alice())));
    arrived_rx.recv().await.unwrap();

    let app = harness.app.take().unwrap();
    let addr = harness.addr;
    let shutdown = tokio::spawn(app.shutdown());
    // New connections are refused once the listener has closed.
    let mut refused = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused, "the listener still accepts after shutdown began");
    release_tx.send(true).unwrap();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "finished");
    shutdown.await.unwrap();
}

#[tokio::test]
async fn paths_that_could_escape_the_route_never_reach_the_upstream() {
    let (upstream, seen) = recording_upstream().await;
    let harness = Harness::start(&base_config(upstream, "")).await;
    for path in
        ["/mcp/github/../admin", "/mcp/github/%2e%2e/admin", "/mcp/github/.%2E/x", "/mcp//github", "/mcp/github/a%2Fb"]
    {
        let response = harness.send(mcp_post(&harness.url(path), &alice())).await;
        assert_eq!(response.status(), 400, "{path}");
        assert_eq!(json(response).await["error"]["data"]["code"], "invalid_path", "{path}");
    }
    assert!(seen.lock().unwrap().is_empty());
}

const PING: &str = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;

#[tokio::test]
async fn request_trailers_never_reach_the_upstream() {
    let (upstream, seen) = recording_upstream().await;
    let harness = Harness::start(&base_config(upstream, "http2_prior_knowledge = true")).await;
    let (mut tx, channel) = http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
    let request = Request::post(harness.url("/mcp/github"))
        .header("authorization", "Bearer alice-key-0001")
        .header("content-type", "application/json")
        .body(channel.map_err(|never| match never {}).boxed())
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<TestBody>();
    let sending = tokio::spawn(async move {
        tx.send_data(Bytes::from_static(PING.as_bytes())).await.unwrap();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("authorization", "Bearer alice-key-0001".parse().unwrap());
        trailers.insert("x-mcp-user", "bob".parse().unwrap());
        tx.send_trailers(trailers).await.unwrap();
    });
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    sending.await.unwrap();
    let seen = seen.lock().unwrap()[0].clone();
    assert_eq!(seen.body, PING);
    assert_eq!(seen.headers["authorization"], "Bearer cred-alice");
    assert!(seen.headers.get("x-mcp-user").is_none());
}

#[tokio::test]
async fn a_rebinding_page_is_refused_even_when_host_agrees_with_origin() {
    let (upstream, seen) = recording_upstream().await;
    let harness = Harness::start(&base_config(upstream, "")).await;
    let mut request = mcp_post(&harness.url("/mcp/github"), &alice());
    request.headers_mut().insert("host", "evil.example:8080".parse().unwrap());
    request.headers_mut().insert("origin", "http://evil.example:8080".parse().unwrap());
    let response = harness.send(request).await;
    assert_eq!(response.status(), 403);
    for origin in
        [format!("http://localhost:{}", harness.addr.port()), format!("http://127.0.0.1:{}", harness.addr.port())]
    {
        let mut request = mcp_post(&harness.url("/mcp/github"), &alice());
        request.headers_mut().insert("origin", origin.parse().unwrap());
        assert_eq!(harness.send(request).await.status(), 200, "{origin}");
    }
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_client_that_disconnects_before_the_answer_cancels_the_upstream_request() {
    // The upstream holds the request; its handler future tells us when it is dropped.
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::channel::<tokio::sync::oneshot::Receiver<()>>(1);
    let upstream = spawn_http(move |_req| {
        let arrived_tx = arrived_tx.clone();
        async move {
            let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
            arrived_tx.send(dropped_rx).await.unwrap();
            let _guard = NotifyOnDrop { inner: http_body_util::Empty::<Bytes>::new(), dropped: Some(dropped_tx) };
            std::future::pending::<http::Response<TestBody>>().await
        }
    })
    .await;
    let harness = Harness::start(&base_config(upstream, "")).await;
    let mut stream = tokio::net::TcpStream::connect(harness.addr).await.unwrap();
    let payload = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let request = format!(
        "POST /mcp/github HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-key-0001\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes()).await.unwrap();
    let dropped =
        tokio::time::timeout(Duration::from_secs(10), arrived.recv()).await.expect("never forwarded").unwrap();
    drop(stream);
    tokio::time::timeout(Duration::from_secs(10), dropped)
        .await
        .expect("the upstream request is still pending after the client left")
        .ok();
}
