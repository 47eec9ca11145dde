//! MCP sessions bound to the user and upstream that created them: a session id is useless to anyone else.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use http::Request;
use http_body_util::BodyExt;
use rmcp::model::CallToolRequestParams;

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
const CALL: &str = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"whoami","arguments":{}}}"#;

fn post(harness: &Harness, user: &str, session: Option<&str>, payload: &'static str) -> Request<TestBody> {
    let mut request = mcp_post(&harness.url("/mcp/github"), &[("authorization", "Bearer ent-key-0001")]);
    request.headers_mut().insert("x-alloy-userid", user.parse().unwrap());
    request.headers_mut().insert("mcp-protocol-version", "2025-06-18".parse().unwrap());
    if let Some(session) = session {
        request.headers_mut().insert("mcp-session-id", session.parse().unwrap());
    }
    *request.body_mut() = body(payload);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_belongs_to_the_user_who_opened_it() {
    let (upstream, calls) = spawn_tool_server(&["whoami"], true).await;
    let mut harness = Harness::start(&format!(
        "[sessions]\nsecret = \"0123456789abcdef0123456789abcdef\"\n{}",
        base_config(upstream, "")
    ))
    .await;

    // An SDK client works through the proxy: it never notices its session id is bound.
    let client = mcp_client(&harness.url("/mcp/github"), ENTERPRISE_KEY, Some("alice")).await.unwrap();
    client.call_tool(CallToolRequestParams::new("whoami")).await.unwrap();
    let _ = client.cancel().await;

    // Alice opens a session by hand, to see the id.
    let response = harness.send(post(&harness, "alice", None, INIT)).await;
    assert_eq!(response.status(), 200);
    let alice_session = response.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    let (upstream_id, tag) = alice_session.rsplit_once('.').unwrap();
    assert_eq!(tag.len(), 32, "the client gets the upstream id plus a tag");
    let _ = response.into_body().collect().await;
    let initialized = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    assert_eq!(harness.send(post(&harness, "alice", Some(&alice_session), initialized)).await.status(), 202);
    let before = calls.lock().unwrap().len();
    let response = harness.send(post(&harness, "alice", Some(&alice_session), CALL)).await;
    assert_eq!(response.status(), 200);
    let _ = response.into_body().collect().await;
    assert_eq!(calls.lock().unwrap().len(), before + 1);

    // Bob with alice's session id, or with the bare upstream id, or a forged tag: 404, and the upstream
    // never hears of it.
    let upstream_only = upstream_id.to_owned();
    let forged = format!("{upstream_id}.{}", "0".repeat(32));
    for (user, session) in
        [("bob", alice_session.as_str()), ("alice", upstream_only.as_str()), ("alice", forged.as_str())]
    {
        let response = harness.send(post(&harness, user, Some(session), CALL)).await;
        assert_eq!(response.status(), 404, "{user} with {session}");
        let answer = json(response).await;
        assert_eq!(answer["error"]["data"]["code"], "session_not_found");
        assert_eq!(answer["id"], 2);
    }
    // The same for GET streams and DELETE.
    for method in [http::Method::GET, http::Method::DELETE] {
        let request = Request::builder()
            .method(method.clone())
            .uri(harness.url("/mcp/github"))
            .header("authorization", "Bearer ent-key-0001")
            .header("x-alloy-userid", "bob")
            .header("mcp-session-id", &alice_session)
            .body(body(""))
            .unwrap();
        assert_eq!(harness.send(request).await.status(), 404, "{method}");
    }
    assert_eq!(calls.lock().unwrap().len(), before + 1);

    // Alice ends her session.
    let request = Request::delete(harness.url("/mcp/github"))
        .header("authorization", "Bearer ent-key-0001")
        .header("x-alloy-userid", "alice")
        .header("mcp-session-id", &alice_session)
        .body(body(""))
        .unwrap();
    assert!(harness.send(request).await.status().is_success());

    let audit = harness.shutdown_and_read_audit().await;
    let fingerprints: std::collections::HashSet<_> =
        audit.iter().filter(|l| l["acting_user"] == "alice").filter_map(|l| l["session"].as_str()).collect();
    assert!(!fingerprints.is_empty());
    let text = serde_json::to_string(&audit).unwrap();
    assert!(!text.contains(upstream_id), "the audit trail holds session fingerprints, not ids");
}

/// A 2024-11-05 server: GET opens a stream whose events the test sends through `streams`; POSTs (the
/// messages) are recorded and answered 202.
struct LegacyServer {
    addr: std::net::SocketAddr,
    streams: tokio::sync::mpsc::Receiver<http_body_util::channel::Sender<bytes::Bytes, std::convert::Infallible>>,
    posted: Arc<Mutex<Vec<String>>>,
}

async fn legacy_server() -> LegacyServer {
    let (streams_tx, streams) = tokio::sync::mpsc::channel(4);
    let posted: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = posted.clone();
    let addr = spawn_http(move |req: http::Request<hyper::body::Incoming>| {
        let (streams_tx, record) = (streams_tx.clone(), record.clone());
        async move {
            if req.method() == http::Method::GET {
                let (events, channel) =
                    http_body_util::channel::Channel::<bytes::Bytes, std::convert::Infallible>::new(8);
                streams_tx.send(events).await.unwrap();
                let mut response = http::Response::new(channel.map_err(|never| match never {}).boxed());
                response.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
                response
            } else {
                record.lock().unwrap().push(req.uri().to_string());
                let mut response = http::Response::new(body(""));
                *response.status_mut() = http::StatusCode::ACCEPTED;
                response
            }
        }
    })
    .await;
    LegacyServer { addr, streams, posted }
}

/// The shared test config with the upstream at the legacy server's root, as legacy servers need.
async fn legacy_harness(server: &LegacyServer, upstream_fields: &str) -> Harness {
    let upstream = server.addr;
    let config = base_config(upstream, upstream_fields)
        .replace(&format!("url = \"http://{upstream}/mcp\""), &format!("url = \"http://{upstream}\""));
    Harness::start(&config).await
}

fn open_stream(harness: &Harness, user: &str) -> Request<TestBody> {
    Request::get(harness.url("/mcp/github/sse"))
        .header("authorization", "Bearer ent-key-0001")
        .header("x-alloy-userid", user)
        .header("accept", "text/event-stream")
        .body(body(""))
        .unwrap()
}

fn message(harness: &Harness, endpoint: &str, user: &str, payload: &'static str) -> Request<TestBody> {
    let mut request = mcp_post(&harness.url(endpoint), &[("authorization", "Bearer ent-key-0001")]);
    request.headers_mut().insert("x-alloy-userid", user.parse().unwrap());
    *request.body_mut() = body(payload);
    request
}

async fn next(stream: &mut hyper::body::Incoming) -> String {
    let frame = stream.frame().await.unwrap().unwrap();
    String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
}

const BLOCKED_CALL: &str =
    r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"delete_repo","arguments":{}}}"#;

#[tokio::test]
async fn the_legacy_endpoint_event_points_at_the_proxy_with_a_bound_session() {
    let mut server = legacy_server().await;
    let harness = legacy_harness(&server, "").await;
    let response = harness.send(open_stream(&harness, "alice")).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.into_body();
    let mut events = server.streams.recv().await.unwrap();
    events.send_data("event: endpoint\r\ndata: /messages/?session_id=5f2a\r\n\r\n".into()).await.unwrap();
    let first = next(&mut stream).await;
    let endpoint = first.strip_prefix("event: endpoint\ndata: ").unwrap().trim_end().to_owned();
    assert!(endpoint.starts_with("/mcp/github/messages/?session_id=5f2a."), "{first}");
    events.send_data("event: message\ndata: {}\n\n".into()).await.unwrap();
    assert_eq!(next(&mut stream).await, "event: message\ndata: {}\n\n", "other events pass untouched");

    // The bound endpoint works for alice, who gets the upstream's own session id through; not for bob.
    assert_eq!(harness.send(message(&harness, &endpoint, "alice", CALL)).await.status(), 202);
    let response = harness.send(message(&harness, &endpoint, "bob", CALL)).await;
    assert_eq!(response.status(), 404);
    assert_eq!(json(response).await["error"]["data"]["code"], "session_not_found");
    assert_eq!(*server.posted.lock().unwrap(), ["/messages/?session_id=5f2a"]);
}

#[tokio::test]
async fn legacy_streams_get_filtered_tool_lists_and_the_proxys_refusals() {
    let mut server = legacy_server().await;
    let harness = legacy_harness(&server, "[upstreams.github.restrictions]\ntools = { block = [\"delete_*\"] }").await;
    let mut stream = harness.send(open_stream(&harness, "alice")).await.into_body();
    let mut events = server.streams.recv().await.unwrap();
    events.send_data("event: endpoint\ndata: /messages/?session_id=s1\n\n".into()).await.unwrap();
    let endpoint = next(&mut stream).await;
    let endpoint = endpoint.strip_prefix("event: endpoint\ndata: ").unwrap().trim_end().to_owned();

    // The server's tools/list answer arrives on the stream: filtered there.
    let listed = r#"event: message
data: {"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_repo"}]}}

"#;
    events.send_data(listed.into()).await.unwrap();
    let listed = next(&mut stream).await;
    assert!(listed.contains("search") && !listed.contains("delete_repo"), "{listed}");

    // A blocked call: 202 like any message, and the JSON-RPC error arrives on the stream.
    assert_eq!(harness.send(message(&harness, &endpoint, "alice", BLOCKED_CALL)).await.status(), 202);
    let refusal = next(&mut stream).await;
    let data: serde_json::Value =
        serde_json::from_str(refusal.strip_prefix("event: message\ndata: ").unwrap().trim_end()).unwrap();
    assert_eq!(data["id"], 7);
    assert_eq!(data["error"]["data"]["code"], "tool_not_allowed");
    assert!(server.posted.lock().unwrap().is_empty(), "the blocked call never reached the upstream");

    // Once the stream is gone, refusals are answered on the POST itself (as soon as the proxy has seen
    // the stream close; each attempt is a full round trip, so the loop is bounded in time too).
    drop(stream);
    let mut status = harness.send(message(&harness, &endpoint, "alice", BLOCKED_CALL)).await.status();
    for _ in 0..100 {
        if status == 403 {
            break;
        }
        tokio::task::yield_now().await;
        status = harness.send(message(&harness, &endpoint, "alice", BLOCKED_CALL)).await.status();
    }
    assert_eq!(status, 403);
}

#[tokio::test]
async fn encoded_spellings_of_the_legacy_session_parameter_are_refused() {
    let (upstream, seen) = recording_upstream().await;
    let harness = Harness::start(&base_config(upstream, "")).await;
    for query in ["session%5Fid=abc", "session%49d=abc", "SESSION_ID=abc", "session_id=abc.0&session%5fid=abc"] {
        let mut request = mcp_post(
            &harness.url(&format!("/mcp/github/messages/?{query}")),
            &[("authorization", "Bearer ent-key-0001")],
        );
        request.headers_mut().insert("x-alloy-userid", "bob".parse().unwrap());
        let response = harness.send(request).await;
        assert_eq!(response.status(), 404, "{query}");
    }
    assert!(seen.lock().unwrap().is_empty());
}
