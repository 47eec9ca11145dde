//! Hostile input on real sockets: every request gets an answer and exactly one audit line, the audit
//! trail cannot be forged, tools/list filtering fails closed, token URLs stay out of the trail, limits
//! that the limiter cannot hold are refused, bodies are judged and bounded before they are buffered,
//! and Host is unambiguous.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mcp_tenant_proxy::config::Config;
use mcp_tenant_proxy::policy::ratelimit::LimitClock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BLOCK_DELETE: &str = "[upstreams.github.restrictions]\ntools = { block = [\"delete_*\"] }";

fn rpc(url: &str, headers: &[(&str, &str)], body_text: String) -> Request<TestBody> {
    let mut request = mcp_post(url, headers);
    *request.body_mut() = body(body_text);
    request
}

async fn text(response: Response<Incoming>) -> String {
    String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// Verifies the audit file with the same code as `audit verify`; returns its lines.
fn verified_audit(harness: &Harness) -> Vec<serde_json::Value> {
    let bytes = std::fs::read(&harness.audit).unwrap();
    let lines = mcp_tenant_proxy::telemetry::audit::verify(&bytes[..], false).expect("audit verify passes");
    let parsed: Vec<serde_json::Value> =
        bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
    assert_eq!(lines, parsed.len());
    parsed
}

#[tokio::test]
async fn every_refusal_answers_with_the_id_and_writes_one_audit_line_whatever_the_id() {
    // An upstream that never answers, so a forwarded call times out.
    let silent = spawn_http(|_req: Request<Incoming>| std::future::pending::<Response<TestBody>>()).await;
    let fields = format!("response_header_timeout = \"200ms\"\n{BLOCK_DELETE}");
    let mut harness = Harness::start(&base_config(silent, &fields)).await;
    let url = harness.url("/mcp/github");
    let call = |id: &str, tool: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}"}}}}"#)
    };
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Headers, &str, u16); 4] = [
        (&[], "whoami", 401),                                                                      // no key
        (&[("authorization", "Bearer alice-key-0001")], "delete_repo", 403),                       // blocked tool
        (&[("authorization", "Bearer alice-key-0001"), ("x-alloy-userid", "bob")], "whoami", 403), // override
        (&[("authorization", "Bearer alice-key-0001")], "whoami", 504),                            // upstream timeout
    ];
    for (headers, tool, want) in cases {
        let response = harness.send(rpc(&url, headers, call("123456789012345678901234567890", tool))).await;
        assert_eq!(response.status(), want, "{tool} {headers:?}");
        // The id is echoed as written, digit for digit.
        assert!(text(response).await.contains(r#""id":123456789012345678901234567890,"#));
    }
    // Ids that are not strings, numbers or null are not JSON-RPC, however deep; nor are numbers that no
    // JSON reader can hold (the audit trail must stay readable).
    let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
    for id in [deep.as_str(), "1e400", "{\"a\":1}", "true"] {
        let response = harness.send(rpc(&url, &[("authorization", "Bearer alice-key-0001")], call(id, "x"))).await;
        assert_eq!(response.status(), 400, "id {id}");
        assert_eq!(json(response).await["error"]["code"], -32600);
    }
    let lines = harness.shutdown_and_read_audit().await;
    assert_eq!(lines.len(), 8, "exactly one audit line per request");
    let reasons: Vec<_> = lines.iter().map(|l| l["reason"].as_str().unwrap().to_owned()).collect();
    assert_eq!(&reasons[..4], ["missing_api_key", "tool_not_allowed", "user_override_forbidden", "upstream_timeout"]);
    assert!(reasons[4..].iter().all(|r| r == "invalid_request"));
}

#[tokio::test]
async fn client_json_cannot_write_a_second_audit_line() {
    let (upstream, _) = recording_upstream().await;
    let mut harness = Harness::start(&base_config(upstream, "")).await;
    let url = harness.url("/mcp/github");
    // Without a key: an id with raw newlines and a forged record inside, and a string id with escapes.
    let forged = "[1,\n{\"prev\":\"0000\",\"decision\":\"allow\",\"acting_user\":\"root\"}\n]";
    for id in [forged, "\"line\\nbreak\u{2028}\u{85}\\\"}\""] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#);
        let _ = harness.send(rpc(&url, &[], body)).await;
    }
    let _ = harness.shutdown_and_read_audit().await;
    let lines = verified_audit(&harness);
    assert_eq!(lines.len(), 2, "one record is one line");
    // Not even a reader that also splits at U+2028 or U+0085 sees more: the trail is ASCII.
    assert!(std::fs::read(&harness.audit).unwrap().is_ascii());
    assert!(lines.iter().all(|l| l["acting_user"].is_null() && l["decision"] == "deny"));
    assert_eq!(lines[1]["jsonrpc_id"], "line\nbreak\u{2028}\u{85}\"}");
}

/// Alice's GET stream on the `github` upstream.
fn alice_get(harness: &Harness) -> Request<TestBody> {
    Request::get(harness.url("/mcp/github")).header("authorization", "Bearer alice-key-0001").body(body("")).unwrap()
}

/// The data of every event an EventSource client would dispatch from `bytes` (type `message`).
fn client_messages(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let (mut out, mut data, mut kind) = (Vec::new(), None::<String>, None::<String>);
    let mut lines = text.split("\r\n").flat_map(|l| l.split(['\r', '\n'])).peekable();
    // `split` leaves a last piece that no line ending closed: the client does not read it as a line.
    while let Some(line) = lines.next() {
        if lines.peek().is_none() {
            break;
        }
        if line.is_empty() {
            if let Some(d) = data.take()
                && kind.take().is_none_or(|k| k.is_empty() || k == "message")
            {
                out.push(d);
            }
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "data" => data = Some(data.map_or(value.to_owned(), |d| format!("{d}\n{value}"))),
            "event" => kind = Some(value.to_owned()),
            _ => {}
        }
    }
    out
}

fn tool_names(messages: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    for m in messages {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(m) else { continue };
        for tool in v["result"]["tools"].as_array().into_iter().flatten() {
            names.push(tool["name"].as_str().unwrap_or_default().to_owned());
        }
    }
    names
}

#[tokio::test]
async fn tools_list_filtering_reads_every_event_as_the_client_will() {
    let list = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"delete_repo"},{"name":"search"}]}}"#;
    let escaped = r#"{"jsonrpc":"2.0","id":1,"result":{"t\u006fols":[{"name":"delete_repo"},{"name":"search"}]}}"#;
    let not_utf8 = [&b"data: "[..], list.replace("delete_repo", "delete_\u{1}").as_bytes(), b"\n\n"]
        .concat()
        .into_iter()
        .map(|b| if b == 1 { 0xff } else { b })
        .collect::<Vec<u8>>();
    let streams: [(&str, Vec<u8>); 6] = [
        ("POST", [&b"\xef\xbb\xbfdata: "[..], list.as_bytes(), b"\n\n"].concat()), // a BOM first
        ("POST", not_utf8),                                                        // a byte not UTF-8
        ("POST", [&b"data: "[..], list.as_bytes(), b"\n\r"].concat()),             // CR ends the stream
        ("GET", [&b"data: "[..], escaped.as_bytes(), b"\n\n"].concat()),           // escapes on a GET stream
        ("POST", [&b"event:\ndata: "[..], list.as_bytes(), b"\n\n"].concat()),     // an empty type is `message`
        ("GET", [&b"event\ndata:"[..], list.as_bytes(), b"\r\r"].concat()),        // so is a bare `event`
    ];
    for (method, event) in streams {
        let mut upstream = sse_upstream().await;
        let harness = Harness::start(&base_config(upstream.addr, BLOCK_DELETE)).await;
        let headers = [("authorization", "Bearer alice-key-0001")];
        let request = match method {
            "POST" => {
                rpc(&harness.url("/mcp/github"), &headers, r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#.into())
            }
            _ => alice_get(&harness),
        };
        let response = harness.send(request).await;
        assert_eq!(response.status(), 200);
        let (mut events, _) = upstream.streams.recv().await.unwrap();
        events.send_data(Bytes::from(event.clone())).await.unwrap();
        drop(events);
        let out = response.into_body().collect().await.unwrap().to_bytes();
        let names = tool_names(&client_messages(&out));
        assert!(
            names.iter().all(|n| !n.starts_with("delete_")),
            "{method} {:?} leaked: {names:?}",
            String::from_utf8_lossy(&event)
        );
        assert!(
            names.iter().any(|n| n == "search"),
            "{method}: the allowed tool is kept: {:?}",
            String::from_utf8_lossy(&out)
        );
    }
}

#[tokio::test]
async fn a_legacy_endpoint_whose_path_says_tools_is_kept() {
    let mut upstream = sse_upstream().await;
    let harness = Harness::start(&base_config(upstream.addr, BLOCK_DELETE)).await;
    let response = harness.send(alice_get(&harness)).await;
    let (mut events, _) = upstream.streams.recv().await.unwrap();
    events
        .send_data(Bytes::from_static(b"event: endpoint\ndata: /mcp/tools/messages?session_id=abc\n\n"))
        .await
        .unwrap();
    drop(events);
    let out = text(response).await;
    assert!(out.starts_with("event: endpoint\ndata: /mcp/github/tools/messages?session_id=abc."), "{out}");
}

#[tokio::test]
async fn token_urls_are_redacted_where_the_router_found_them() {
    let (upstream, seen) = recording_upstream().await;
    // An upstream whose own prefix contains `/t/`.
    let config = base_config(upstream, "").replace("[upstreams.github]", "[upstreams.github]\npath = \"/mcp/t/gh\"");
    let mut harness = Harness::start(&config).await;
    for (path, status) in [
        ("/mcp/t/gh/t/tok-secret-1", 401),
        ("/mcp/t/gh/t/tok-secret-2/sse", 401),
        // No upstream serves these (a mistyped or removed route), but the token is still a secret.
        ("/mcp/T/gh/t/tok-secret-4", 404),
        ("/old/t/tok-secret-5/t/x", 404),
    ] {
        let response = harness.send(Request::get(harness.url(path)).body(body("")).unwrap()).await;
        assert_eq!(response.status(), status, "{path}");
    }
    // Refused before routing even looked at the key (headers too large): still redacted.
    let big = "x".repeat(8300);
    let request = Request::get(harness.url("/mcp/t/gh/t/tok-secret-3")).header("x-big", big).body(body("")).unwrap();
    assert_eq!(harness.send(request).await.status(), 431);
    let lines = harness.shutdown_and_read_audit().await;
    let paths: Vec<_> = lines.iter().map(|l| l["path"].as_str().unwrap().to_owned()).collect();
    assert_eq!(
        paths,
        ["/mcp/t/gh/t/***", "/mcp/t/gh/t/***/sse", "/mcp/T/gh/t/***", "/old/t/***/t/***", "/mcp/t/gh/t/***"]
    );
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn names_the_store_cannot_hold_and_limits_the_limiter_cannot_hold_are_config_errors() {
    let base = base_config("127.0.0.1:9".parse().unwrap(), "");
    let long = "u".repeat(129);
    let cases = [
        (base.replace("upstreams.github", &format!("upstreams.{long}")), format!("upstreams.{long}")),
        (format!("[identity]\nmax_user_id_len = 1024\n{base}"), "identity.max_user_id_len".to_owned()),
        (base.replacen("id = \"acme-backend\"", "id = \"acme backend\"", 1), "keys[0].id".to_owned()),
        (format!("rate_limit = {{ requests = 1, per = \"600y\" }}\n{base}"), "rate_limit".to_owned()),
        (format!("rate_limit = {{ requests = 10, per = \"1y\", burst = 1000 }}\n{base}"), "rate_limit".to_owned()),
    ];
    for (config, field) in cases {
        let error = Config::from_toml(&config, std::path::Path::new(".")).err().expect("refused").to_string();
        assert!(error.contains(&field), "{field} not named in: {error}");
    }
}

/// A POST whose body the test sends when it wants; `Content-Length` is declared.
fn pending_post(
    harness: &Harness,
    key: &str,
    len: usize,
) -> (Request<TestBody>, http_body_util::channel::Sender<Bytes, Infallible>) {
    let (tx, channel) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
    let request = Request::post(harness.url("/mcp/github"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("content-length", len)
        .body(channel.map_err(|never| match never {}).boxed())
        .unwrap();
    (request, tx)
}

/// Alice's plain tool call; its status.
async fn alice_calls(harness: &Harness) -> u16 {
    let request = mcp_post(&harness.url("/mcp/github"), &[("authorization", "Bearer alice-key-0001")]);
    harness.send(request).await.status().as_u16()
}

#[tokio::test]
async fn a_rate_limited_caller_is_refused_before_its_body_is_read() {
    let (upstream, seen) = recording_upstream().await;
    let config = format!("rate_limit = {{ requests = 1, per = \"1h\" }}\n{}", base_config(upstream, ""));
    let harness = Harness::start_with_clock(&config, LimitClock::Fake(Default::default())).await;
    assert_eq!(alice_calls(&harness).await, 200);
    // A declared 1 MiB body that never comes: the answer must not wait for it (body_read_timeout is 30 s).
    let (request, _tx) = pending_post(&harness, ALICE_KEY, 1 << 20);
    let response = tokio::time::timeout(Duration::from_secs(5), harness.client.request(request)).await;
    assert_eq!(response.expect("answered without the body").unwrap().status(), 429);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn buffered_bodies_are_bounded_per_key_and_in_total() {
    let (upstream, seen) = recording_upstream().await;
    let limits =
        "[server]\nmax_body_bytes = 1000\nmax_buffered_body_bytes_per_key = 2000\nmax_buffered_body_bytes = 3000\n";
    let config = base_config(upstream, "").replacen("[server]\n", limits, 1);
    let harness = Harness::start(&config).await;
    let send = |request| {
        let client = harness.client.clone();
        tokio::spawn(async move { client.request(request).await.map(|r| r.status().as_u16()) })
    };
    // Waits until the proxy holds `bytes` of bodies: the requests sent so far have reached the budget.
    let app = harness.app.as_ref().unwrap();
    let held = |bytes: u64| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while app.buffered_body_bytes() != bytes {
            assert!(std::time::Instant::now() < deadline, "the proxy never held {bytes} bytes");
            tokio::task::yield_now().await;
        }
    };
    // Alice holds two unfinished 1000-byte bodies: her key's whole share. A third is refused at once.
    let (a1, mut a1_tx) = pending_post(&harness, ALICE_KEY, 1000);
    let a1 = send(a1);
    held(1000).await;
    let (a2, mut a2_tx) = pending_post(&harness, ALICE_KEY, 1000);
    let a2 = send(a2);
    held(2000).await;
    let (third, _tx) = pending_post(&harness, ALICE_KEY, 1000);
    let answer = harness.send(third).await;
    assert_eq!(answer.status(), 429);
    assert_eq!(answer.headers()["retry-after"], "1");
    assert_eq!(json(answer).await["error"]["data"]["code"], "too_many_pending_bodies");
    // Bob fits in the total once; past it everyone gets 503.
    let (b1, mut b1_tx) = pending_post(&harness, BOB_KEY, 1000);
    let b1 = send(b1);
    held(3000).await;
    let (over, _tx) = pending_post(&harness, BOB_KEY, 1000);
    let answer = harness.send(over).await;
    assert_eq!(answer.status(), 503);
    assert_eq!(json(answer).await["error"]["data"]["code"], "proxy_busy");
    assert_eq!(seen.lock().unwrap().len(), 0);
    // Finished bodies give their share back.
    let rest = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let padded = format!("{}{}", std::str::from_utf8(rest).unwrap(), " ".repeat(1000 - rest.len()));
    for tx in [&mut a1_tx, &mut a2_tx, &mut b1_tx] {
        tx.send_data(Bytes::from(padded.clone())).await.unwrap();
    }
    drop((a1_tx, a2_tx, b1_tx));
    for task in [a1, a2, b1] {
        assert_eq!(task.await.unwrap().unwrap(), 200);
    }
    assert_eq!(alice_calls(&harness).await, 200);
    assert_eq!(seen.lock().unwrap().len(), 4);
    held(0).await;
}

/// Sends raw HTTP/1.1 bytes and returns the status line.
async fn raw_status(harness: &Harness, request: String) -> String {
    let mut tcp = tokio::net::TcpStream::connect(harness.addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tcp.read(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer[..n]).lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn http1_requests_need_exactly_one_host_and_an_absolute_target_wins() {
    let (upstream, seen) = recording_upstream().await;
    let harness = Harness::start(&base_config(upstream, "")).await;
    let auth = "authorization: Bearer alice-key-0001\r\n";
    for headers in ["host: a\r\nhost: b\r\n", "", "host: a@b\r\n", "host: bad host\r\n"] {
        let status = raw_status(&harness, format!("GET /mcp/github HTTP/1.1\r\n{headers}{auth}\r\n")).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{headers:?}: {status}");
    }
    // Userinfo in an absolute-form target is refused too: it is the authority that wins.
    let request =
        format!("GET http://user:pw@public.example/mcp/github HTTP/1.1\r\nhost: public.example\r\n{auth}\r\n");
    assert!(raw_status(&harness, request).await.starts_with("HTTP/1.1 400"));
    assert!(seen.lock().unwrap().is_empty());
    let request = format!("GET http://public.example/mcp/github HTTP/1.1\r\nhost: other.example\r\n{auth}\r\n");
    assert!(raw_status(&harness, request).await.starts_with("HTTP/1.1 200"));
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].headers["x-forwarded-host"], "public.example");
}

#[tokio::test]
async fn an_answer_with_any_coding_but_identity_is_not_passed_on_unread() {
    let upstream = spawn_http(|_req: Request<Incoming>| async {
        let list = r#"data: {"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"delete_repo"}]}}"#;
        let mut response = Response::new(body(format!("{list}\n\n")));
        let headers = response.headers_mut();
        headers.insert("content-type", "text/event-stream".parse().unwrap());
        // A second field line: a client applies every coding of every line.
        headers.append("content-encoding", "identity".parse().unwrap());
        headers.append("content-encoding", "gzip".parse().unwrap());
        response
    })
    .await;
    let harness = Harness::start(&base_config(upstream, BLOCK_DELETE)).await;
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#.to_owned();
    let response =
        harness.send(rpc(&harness.url("/mcp/github"), &[("authorization", "Bearer alice-key-0001")], list)).await;
    assert_eq!(response.status(), 502);
}

#[tokio::test]
async fn one_event_is_bounded_however_its_frames_are_cut() {
    let mut upstream = sse_upstream().await;
    let harness = Harness::start(&base_config(upstream.addr, BLOCK_DELETE)).await;
    let response = harness.send(alice_get(&harness)).await;
    let (mut events, _) = upstream.streams.recv().await.unwrap();
    // Every frame starts with a line end, so each looks "complete" on its own; together they are one
    // event of more than 8 MiB.
    let feed = tokio::spawn(async move {
        events.send_data(Bytes::from_static(b"data: x")).await.unwrap();
        let frame = Bytes::from(format!("\ndata: {}", "A".repeat(64 * 1024)));
        for _ in 0..(9 * 16) {
            if events.send_data(frame.clone()).await.is_err() {
                return; // the proxy gave up on the stream: what this test wants
            }
        }
    });
    assert!(response.into_body().collect().await.is_err(), "the stream ends with an error");
    feed.await.unwrap();
}

#[tokio::test]
async fn a_client_that_leaves_before_the_answer_still_gets_its_audit_line() {
    let (reached, mut reached_rx) = tokio::sync::mpsc::channel::<()>(1);
    let upstream = spawn_http(move |_req: Request<Incoming>| {
        let reached = reached.clone();
        async move {
            let _ = reached.send(()).await;
            std::future::pending::<Response<TestBody>>().await
        }
    })
    .await;
    let mut harness = Harness::start(&base_config(upstream, "")).await;
    let call =
        harness.client.request(mcp_post(&harness.url("/mcp/github"), &[("authorization", "Bearer alice-key-0001")]));
    let call = tokio::spawn(call);
    reached_rx.recv().await.unwrap();
    call.abort(); // the client leaves while the upstream works on the call
    // The line is written as soon as the proxy sees the connection go, and at the latest when shutdown
    // drops what is left.
    let lines = harness.shutdown_and_read_audit().await;
    assert_eq!(lines.len(), 1, "exactly one line for the abandoned call");
    let line = &lines[0];
    assert_eq!(line["reason"], "client_gone");
    assert_eq!((line["status"].as_u64(), line["acting_user"].as_str()), (Some(499), Some("alice")));
    assert_eq!(line["tool"], "whoami");
}
