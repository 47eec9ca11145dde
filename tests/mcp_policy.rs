//! MCP-aware policy with real peers (rmcp client and server): tool restrictions, filtered `tools/list`
//! over JSON and SSE, user rules, per-tool limits, malformed JSON-RPC and the 2026-07-28 mirror headers.

mod common;

use common::*;
use governor::clock::FakeRelativeClock;
use http_body_util::BodyExt;
use mcp_tenant_proxy::policy::ratelimit::LimitClock;
use rmcp::model::CallToolRequestParams;

const TOOLS: &[&str] = &["whoami", "search_repos", "delete_repo", "create_issue"];

async fn names(client: &rmcp::service::RunningService<rmcp::RoleClient, rmcp::model::ClientConfig>) -> Vec<String> {
    client.list_all_tools().await.unwrap().into_iter().map(|t| t.name.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_tools_are_hidden_and_refused_over_json_and_sse() {
    for stateful in [true, false] {
        let (upstream, calls) = spawn_tool_server(TOOLS, stateful).await;
        let fields = "[upstreams.github.restrictions]\ntools = { block = [\"delete_*\"] }";
        let harness = Harness::start(&base_config(upstream, fields)).await;
        let client = mcp_client(&harness.url("/mcp/github"), ENTERPRISE_KEY, Some("alice")).await.unwrap();
        assert_eq!(names(&client).await, ["whoami", "search_repos", "create_issue"], "stateful={stateful}");

        let refused = client.call_tool(CallToolRequestParams::new("delete_repo")).await.unwrap_err();
        assert!(format!("{refused:?}").contains("tool_not_allowed"), "{refused:?}");
        client.call_tool(CallToolRequestParams::new("search_repos")).await.unwrap();
        let calls = calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            [("search_repos".to_owned(), "Bearer cred-alice".to_owned())],
            "the blocked call never arrived"
        );
        let _ = client.cancel().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_lists_and_user_rules() {
    let (upstream, calls) = spawn_tool_server(TOOLS, true).await;
    let fields = "[upstreams.github.restrictions]\ntools = { allow = [\"search_*\", \"whoami\"] }\nusers = { allow = [\"alice\", \"tenant-a-*\"] }";
    let harness = Harness::start(&base_config(upstream, fields)).await;
    let url = harness.url("/mcp/github");
    let alice = mcp_client(&url, ENTERPRISE_KEY, Some("alice")).await.unwrap();
    assert_eq!(names(&alice).await, ["whoami", "search_repos"]);
    assert!(alice.call_tool(CallToolRequestParams::new("create_issue")).await.is_err());
    let dave = mcp_client(&url, ENTERPRISE_KEY, Some("tenant-a-dave")).await.unwrap();
    dave.call_tool(CallToolRequestParams::new("whoami")).await.unwrap();

    let Err(bob) = mcp_client(&url, ENTERPRISE_KEY, Some("bob")).await else {
        panic!("bob is not allowed on this upstream");
    };
    assert!(bob.contains("user_not_permitted") || bob.contains("403"), "{bob}");
    let response = harness.send(mcp_post(&url, &[("authorization", "Bearer bob-key-0001")])).await;
    assert_eq!(response.status(), 403);
    assert_eq!(json(response).await["error"]["data"]["code"], "user_not_permitted");
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn per_tool_limits_count_per_user_and_tool() {
    let (upstream, calls) = spawn_tool_server(TOOLS, false).await;
    let fields = "[upstreams.github.tool_limits]\n\"create_issue\" = { requests = 2, per = \"1m\" }";
    let clock = FakeRelativeClock::default();
    let mut harness = Harness::start_with_clock(&base_config(upstream, fields), LimitClock::Fake(clock.clone())).await;
    let call = |tool: &str, user: &str| {
        let payload = format!(
            r#"{{"jsonrpc":"2.0","id":"t","method":"tools/call","params":{{"name":"{tool}","arguments":{{}}}}}}"#
        );
        let mut request = mcp_post(&harness.url("/mcp/github"), &[("authorization", "Bearer ent-key-0001")]);
        request.headers_mut().insert("x-alloy-userid", user.parse().unwrap());
        *request.body_mut() = body(payload);
        harness.send(request)
    };
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(call("create_issue", "alice").await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(call("search_repos", "alice").await.status(), 200, "other tools are not limited");
    assert_eq!(call("create_issue", "bob").await.status(), 200, "the limit is per user");
    let refused = call("create_issue", "alice").await;
    assert_eq!(refused.headers()["ratelimit-policy"], "\"tool\";q=2;w=60");
    clock.advance(std::time::Duration::from_secs(30));
    assert_eq!(call("create_issue", "alice").await.status(), 200);
    assert_eq!(calls.lock().unwrap().iter().filter(|(t, _)| t == "create_issue").count(), 4);
    let audit = harness.shutdown_and_read_audit().await;
    let limited: Vec<_> = audit.iter().filter(|l| l["reason"] == "rate_limited").collect();
    assert_eq!(limited.len(), 2);
    assert!(limited.iter().all(|l| l["rate_limit_level"] == "tool" && l["tool"] == "create_issue"));
}

#[tokio::test]
async fn malformed_json_rpc_and_mismatched_mirror_headers_are_refused() {
    let (upstream, seen) = recording_upstream().await;
    let fields = "[upstreams.github.restrictions]\ntools = { block = [\"delete_*\"] }";
    let harness = Harness::start(&base_config(upstream, fields)).await;
    let post = |payload: &'static str, extra: &[(&'static str, &'static str)]| {
        let mut request = mcp_post(&harness.url("/mcp/github"), &[("authorization", "Bearer alice-key-0001")]);
        for (n, v) in extra {
            request.headers_mut().insert(*n, v.parse().unwrap());
        }
        *request.body_mut() = body(payload);
        harness.send(request)
    };
    for (payload, code, jsonrpc) in [
        ("{\"jsonrpc\":\"2.0\",", "parse_error", -32700),
        ("{\"id\":1,\"method\":\"ping\"}", "invalid_request", -32600),
        ("[]", "invalid_request", -32600),
    ] {
        let response = post(payload, &[]).await;
        assert_eq!(response.status(), 400, "{payload}");
        let answer = json(response).await;
        assert_eq!(answer["error"]["code"], jsonrpc, "{payload}");
        assert_eq!(answer["error"]["data"]["code"], code);
        assert_eq!(answer["id"], serde_json::Value::Null);
    }

    let call = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"delete_repo","arguments":{}}}"#;
    let disguised =
        [("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/call"), ("mcp-name", "search_repos")];
    let response = post(call, &disguised).await;
    assert_eq!(response.status(), 400);
    let answer = json(response).await;
    assert_eq!(answer["error"]["code"], -32020);
    assert_eq!(answer["id"], 5);

    let honest = r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"search_repos","arguments":{}}}"#;
    let response = post(honest, &disguised).await;
    assert_eq!(response.status(), 200);
    let forwarded = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(forwarded.headers["mcp-name"], "search_repos");

    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_repos"}},
                    {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_repo"}}]"#;
    let response = post(batch, &[]).await;
    assert_eq!(response.status(), 403);
    assert_eq!(json(response).await["error"]["data"]["code"], "tool_not_allowed");
    assert_eq!(seen.lock().unwrap().len(), 1, "only the honest call reached the upstream");
}

#[tokio::test]
async fn every_post_body_is_inspected_whatever_its_content_type() {
    let (upstream, seen) = recording_upstream().await;
    let fields = "[upstreams.github.restrictions]\ntools = { block = [\"delete_*\"] }";
    let harness = Harness::start(&base_config(upstream, fields)).await;
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo","arguments":{}}}"#;
    for content_type in ["application/json, text/plain", "application/json-rpc", "text/plain", "application/JSON"] {
        let mut request = mcp_post(&harness.url("/mcp/github"), &[("authorization", "Bearer alice-key-0001")]);
        request.headers_mut().insert("content-type", content_type.parse().unwrap());
        *request.body_mut() = body(call);
        let response = harness.send(request).await;
        assert_eq!(response.status(), 403, "{content_type}");
        assert_eq!(json(response).await["error"]["data"]["code"], "tool_not_allowed");
    }
    // Bodies travel with POST only: another method with a body is refused, not forwarded unread.
    let request = http::Request::delete(harness.url("/mcp/github"))
        .header("authorization", "Bearer alice-key-0001")
        .body(body(call))
        .unwrap();
    assert_eq!(harness.send(request).await.status(), 400);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn tool_lists_that_cannot_be_read_are_never_passed_on() {
    // An upstream that compresses its answers although the proxy asked for identity, and one whose
    // stream uses the rarer line endings SSE allows.
    let answer = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_repo"}]}}"#;
    let upstream = spawn_http(move |req: http::Request<hyper::body::Incoming>| async move {
        let sse = req.headers().get("x-test").is_some_and(|v| v == "sse");
        let asked = req.headers().get("accept-encoding").map(|v| v.to_str().unwrap().to_owned());
        let mut response = if sse {
            let mut r = http::Response::new(body(format!(": hi\n\r\nevent: message\rdata: {answer}\n\r\n")));
            r.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            r
        } else {
            let mut r = http::Response::new(body(answer));
            r.headers_mut().insert("content-type", "application/json".parse().unwrap());
            r.headers_mut().insert("content-encoding", "gzip".parse().unwrap());
            r
        };
        response.headers_mut().insert("x-asked-encoding", asked.unwrap_or_default().parse().unwrap());
        response
    })
    .await;
    let fields = "[upstreams.github.restrictions]\ntools = { block = [\"delete_*\"] }";
    let harness = Harness::start(&base_config(upstream, fields)).await;
    let list = |sse: bool| {
        let mut request = mcp_post(&harness.url("/mcp/github"), &[("authorization", "Bearer alice-key-0001")]);
        request.headers_mut().insert("accept-encoding", "gzip, br".parse().unwrap());
        if sse {
            request.headers_mut().insert("x-test", "sse".parse().unwrap());
        }
        *request.body_mut() = body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#);
        harness.send(request)
    };
    let compressed = list(false).await;
    assert_eq!(compressed.status(), 502);
    let streamed = list(true).await;
    assert_eq!(streamed.headers()["x-asked-encoding"], "identity", "the client's Accept-Encoding is not passed on");
    let text = String::from_utf8(streamed.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains("search") && !text.contains("delete_repo"), "{text}");
}
