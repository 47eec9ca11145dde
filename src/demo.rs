//! `mcp-tenant-proxy demo`: a real single-user MCP server (the official Rust SDK, `rmcp`) with a
//! `whoami` tool that reports the headers it received, and the proxy in front of it with two users.
//! The demo calls the server through the proxy as alice and as bob and prints what each was seen as.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult, PaginatedRequestParams,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use tokio::net::TcpListener;

use crate::app::App;
use crate::config::Config;

/// A single-user MCP server: it acts with whatever credential arrives in its `Authorization` header, and
/// its `whoami` tool answers with every request header it saw, as a JSON object.
#[derive(Clone, Default)]
pub struct WhoAmIServer;

impl ServerHandler for WhoAmIServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_instructions("A single-user demo server: whoami reports the credential it received.")
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let schema = serde_json::json!({ "type": "object", "properties": {} });
        let serde_json::Value::Object(schema) = schema else { unreachable!() };
        Ok(ListToolsResult::with_all_items(vec![Tool::new(
            "whoami",
            "Reports the request headers this server received, credential included",
            Arc::new(schema),
        )]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if request.name != "whoami" {
            return Err(ErrorData::invalid_params(format!("unknown tool {}", request.name), None));
        }
        let headers: serde_json::Map<String, serde_json::Value> = context
            .extensions
            .get::<http::request::Parts>()
            .map(|parts| {
                parts
                    .headers
                    .iter()
                    .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into()))
                    .collect()
            })
            .unwrap_or_default();
        let text = serde_json::Value::Object(headers).to_string();
        Ok(CallToolResult::success(vec![ContentBlock::text(text)]).into())
    }
}

/// Serves [`WhoAmIServer`] over MCP streamable HTTP at `http://<addr>/mcp`. `stateful` keeps sessions
/// (`Mcp-Session-Id`); stateless answers each POST on its own, so one `curl` can call a tool.
pub async fn spawn_whoami_server(listener: TcpListener, stateful: bool) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let config = StreamableHttpServerConfig::default().with_legacy_session_mode(stateful).with_json_response(!stateful);
    let service: StreamableHttpService<WhoAmIServer, LocalSessionManager> =
        StreamableHttpService::new(|| Ok(WhoAmIServer), Default::default(), config);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let service = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let builder = auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(addr)
}

pub const ENTERPRISE_KEY: &str = "demo-enterprise-key";
pub const ALICE_KEY: &str = "demo-alice-key";

fn demo_config(listen: SocketAddr, admin: SocketAddr, upstream: SocketAddr, audit: &Path) -> String {
    // TOML basic strings escape like JSON strings.
    let audit = serde_json::to_string(&audit.to_string_lossy()).unwrap_or_default();
    format!(
        r#"
[server]
listen = "{listen}"
[admin]
listen = "{admin}"
[audit]
path = {audit}
[sessions]
secret = "demo-session-key-not-for-production"

[[keys]]
id = "acme-backend"
kind = "enterprise"
secret = "{ENTERPRISE_KEY}"
user = "acme-service"
act_as = ["*"]

[[keys]]
id = "alice-laptop"
kind = "standard"
secret = "{ALICE_KEY}"
user = "alice"

[[users]]
id = "alice"
[[users]]
id = "bob"

[upstreams.demo]
url = "http://{upstream}/mcp"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
forward_user_header = "x-mcp-user"

[[credentials]]
user = "alice"
upstream = "demo"
secret = "ghp_demo_alice_0001"

[[credentials]]
user = "bob"
upstream = "demo"
secret = "ghp_demo_bob_0002"
"#
    )
}

/// Runs the demo until Ctrl-C; the audit trail goes to `audit` (a restart continues its chain), and
/// is verified at the end.
pub async fn run(listen: SocketAddr, admin: SocketAddr, audit: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let upstream = spawn_whoami_server(TcpListener::bind("127.0.0.1:0").await?, false).await?;
    let config = Config::from_toml(&demo_config(listen, admin, upstream, audit), Path::new("."))?;
    let app = App::start(config).await?;
    let url = format!("http://{}/mcp/demo", app.proxy_addr);

    println!("mcp-tenant-proxy demo");
    println!("  single-user MCP server (rmcp): http://{upstream}/mcp, it acts with whatever Authorization it gets");
    println!("  proxy:                         {url}");
    println!("  audit trail:                   {}", audit.display());
    println!("  users alice and bob each own a credential for it; the proxy injects the right one\n");
    for (label, key, user) in [
        ("enterprise key acting as alice", ENTERPRISE_KEY, Some("alice")),
        ("enterprise key acting as bob  ", ENTERPRISE_KEY, Some("bob")),
        ("alice's standard key          ", ALICE_KEY, None),
        ("alice's key naming bob        ", ALICE_KEY, Some("bob")),
    ] {
        println!("  {label} -> {}", call_whoami(&url, key, user).await?);
    }
    println!("\nEach call above is one line of the audit trail (who acted as whom, allowed or why not):");
    println!("  tail -f {}\n", audit.display());
    println!("Try it yourself:\n");
    println!("{}\n", curl_command(&url, ENTERPRISE_KEY, Some("bob")));
    println!(
        "Point an MCP client at {url} with the headers 'Authorization: Bearer {ENTERPRISE_KEY}' and 'x-alloy-userid: alice'."
    );
    println!("Press Ctrl-C to stop; the demo then checks the trail's hash chain.\n");
    crate::shutdown_signal().await;
    app.shutdown().await;
    // Every line is written once the app has shut down.
    let file = std::io::BufReader::new(std::fs::File::open(audit)?);
    match crate::telemetry::audit::verify(file, false) {
        Ok(lines) => println!(
            "\naudit trail {}: {lines} lines, hash chain intact (mcp-tenant-proxy audit verify {})",
            audit.display(),
            audit.display()
        ),
        Err(e) => println!("\naudit trail {}: {e}", audit.display()),
    }
    Ok(())
}

fn tools_call_body() -> &'static str {
    r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"whoami","arguments":{}}}"#
}

fn curl_command(url: &str, key: &str, user: Option<&str>) -> String {
    let user = user.map(|u| format!(" \\\n  -H 'x-alloy-userid: {u}'")).unwrap_or_default();
    format!(
        "curl -s {url} \\\n  -H 'Authorization: Bearer {key}'{user} \\\n  -H 'Content-Type: application/json' \\\n  -H 'Accept: application/json, text/event-stream' \\\n  -d '{}'",
        tools_call_body()
    )
}

/// One `tools/call whoami` through the proxy; returns a one-line summary of what the server saw.
async fn call_whoami(url: &str, key: &str, user: Option<&str>) -> Result<String, Box<dyn std::error::Error>> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::post(url)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream");
    if let Some(user) = user {
        request = request.header("x-alloy-userid", user);
    }
    let response = client.request(request.body(Full::new(Bytes::from_static(tools_call_body().as_bytes())))?).await?;
    let status = response.status();
    let body: serde_json::Value = serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
    if let Some(error) = body.get("error") {
        return Ok(format!("refused ({status}): {}", error["message"].as_str().unwrap_or_default()));
    }
    let text = body["result"]["content"][0]["text"].as_str().ok_or("unexpected answer from the server")?;
    let seen: serde_json::Value = serde_json::from_str(text)?;
    Ok(format!(
        "server saw Authorization: {}, x-mcp-user: {}",
        seen["authorization"].as_str().unwrap_or("(none)"),
        seen["x-mcp-user"].as_str().unwrap_or("(none)")
    ))
}
