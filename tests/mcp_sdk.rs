//! Real MCP peers on both sides: the official Rust SDK (`rmcp`) as the client and as the single-user
//! upstream server, two users at once through one proxy.

mod common;

use std::collections::HashMap;

use common::*;
use http::{HeaderName, HeaderValue};
use mcp_tenant_proxy::demo::spawn_whoami_server;
use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, ClientConfig};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;

/// Connects an rmcp client to `url`, calls `whoami` and returns the headers the upstream saw.
async fn whoami(url: &str, key: &str, user: Option<&str>) -> serde_json::Map<String, serde_json::Value> {
    let mut headers = HashMap::new();
    if let Some(user) = user {
        headers.insert(HeaderName::from_static("x-alloy-userid"), HeaderValue::from_str(user).unwrap());
    }
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(url).auth_header(key).custom_headers(headers),
    );
    let client = ClientConfig::default().serve(transport).await.expect("initialize through the proxy");
    let tools = client.list_all_tools().await.unwrap();
    assert_eq!(tools.iter().map(|t| t.name.as_ref()).collect::<Vec<_>>(), ["whoami"]);
    let mut seen = Vec::new();
    // Several calls on the same session: every one carries the same user's credential.
    for _ in 0..3 {
        let result = client.call_tool(CallToolRequestParams::new("whoami")).await.unwrap();
        let text = result.content[0].as_text().unwrap().text.clone();
        seen.push(serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text).unwrap());
    }
    let _ = client.cancel().await;
    assert!(seen.windows(2).all(|w| w[0]["authorization"] == w[1]["authorization"]));
    seen.pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_share_one_upstream_each_with_their_own_credential() {
    for stateful in [true, false] {
        let upstream =
            spawn_whoami_server(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), stateful).await.unwrap();
        let harness = Harness::start(&base_config(upstream, r#"forward_user_header = "x-mcp-user""#)).await;
        let url = harness.url("/mcp/github");

        let (alice, bob, bob_own) = tokio::join!(
            whoami(&url, ENTERPRISE_KEY, Some("alice")),
            whoami(&url, ENTERPRISE_KEY, Some("bob")),
            whoami(&url, BOB_KEY, None),
        );
        assert_eq!(alice["authorization"], "Bearer cred-alice", "stateful={stateful}");
        assert_eq!(alice["x-mcp-user"], "alice");
        assert_eq!(bob["authorization"], "Bearer cred-bob");
        assert_eq!(bob["x-mcp-user"], "bob");
        assert_eq!(bob_own["authorization"], "Bearer cred-bob");
        for seen in [&alice, &bob, &bob_own] {
            assert!(!seen.contains_key("x-alloy-userid"), "the user header reached the upstream");
            let all = serde_json::to_string(seen).unwrap();
            assert!(!all.contains(ENTERPRISE_KEY) && !all.contains(BOB_KEY), "a client key reached the upstream");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_client_sees_the_refusal() {
    let upstream =
        spawn_whoami_server(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), true).await.unwrap();
    let harness = Harness::start(&base_config(upstream, "")).await;
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(harness.url("/mcp/github")).auth_header(BOB_KEY).custom_headers(
            HashMap::from([(HeaderName::from_static("x-alloy-userid"), HeaderValue::from_static("alice"))]),
        ),
    );
    let Err(error) = ClientConfig::default().serve(transport).await else {
        panic!("bob's key cannot act as alice");
    };
    let message = format!("{error:?}");
    assert!(message.contains("403") || message.contains("user_override_forbidden"), "{message}");
}
