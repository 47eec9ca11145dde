//! Test harness: the real app on 127.0.0.1:0, real upstreams on other :0 ports, a plain HTTP client.
#![allow(dead_code)]

pub mod pg;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mcp_tenant_proxy::app::App;
use mcp_tenant_proxy::config::Config;
use mcp_tenant_proxy::policy::ratelimit::LimitClock;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn body(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pub const ENTERPRISE_KEY: &str = "ent-key-0001";
pub const ALICE_KEY: &str = "alice-key-0001";
pub const BOB_KEY: &str = "bob-key-0001";
pub const TENANT_KEY: &str = "tenant-key-0001";

/// Keys, users and credentials most tests share. `{upstream}` is replaced by the upstream's address.
pub fn base_config(upstream: SocketAddr, extra_upstream_fields: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"

[[keys]]
id = "acme-backend"
kind = "enterprise"
secret = "{ENTERPRISE_KEY}"
user = "acme-service"
act_as = ["*"]

[[keys]]
id = "tenant-a"
kind = "enterprise"
secret = "{TENANT_KEY}"
user = "tenant-a-admin"
act_as = ["tenant-a-*", "carol"]

[[keys]]
id = "alice-laptop"
kind = "standard"
sha256 = "{alice_hash}"
user = "alice"

[[keys]]
id = "bob-laptop"
kind = "standard"
secret = "{BOB_KEY}"
user = "bob"

[[users]]
id = "alice"
[[users]]
id = "bob"
[[users]]
id = "carol"
[[users]]
id = "tenant-a-dave"
[[users]]
id = "tenant-b-erin"

[upstreams.github]
url = "http://{upstream}/mcp"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
{extra_upstream_fields}

[[credentials]]
user = "alice"
upstream = "github"
secret = "cred-alice"

[[credentials]]
user = "bob"
upstream = "github"
secret = "cred-bob"

[[credentials]]
user = "acme-service"
upstream = "github"
secret = "cred-acme"

[[credentials]]
user = "tenant-a-dave"
upstream = "github"
secret = "cred-dave"

[[credentials]]
user = "tenant-a-admin"
upstream = "github"
secret = "cred-tenant-admin"

[[credentials]]
user = "carol"
upstream = "github"
id = "work"
secret = "cred-carol-work"

[[credentials]]
user = "carol"
upstream = "github"
id = "home"
secret = "cred-carol-home"
"#,
        alice_hash = hex::encode(mcp_tenant_proxy::secret::sha256(ALICE_KEY.as_bytes())),
    )
}

/// The running app, its URLs and its audit file.
pub struct Harness {
    pub app: Option<App>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub audit: PathBuf,
    pub client: Client<HttpConnector, TestBody>,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// Starts the app on `config` (TOML). The audit trail goes to a file in a temporary directory.
    pub async fn start(config: &str) -> Harness {
        Self::start_with_clock(config, LimitClock::default()).await
    }

    /// As [`Harness::start`], with the rate limiters on `clock` (a `governor` fake clock in tests).
    pub async fn start_with_clock(config: &str, clock: LimitClock) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit.log");
        Self::start_in(dir, config, &audit, clock).await
    }

    /// As [`Harness::start`], with the audit trail appended to `audit`: a file that outlives this harness
    /// (to start the app again on it), or a device such as `/dev/full`.
    pub async fn start_with_audit(config: &str, audit: &Path) -> Harness {
        Self::start_in(tempfile::tempdir().unwrap(), config, audit, LimitClock::default()).await
    }

    async fn start_in(dir: tempfile::TempDir, config: &str, audit: &Path, clock: LimitClock) -> Harness {
        let audit = audit.to_owned();
        let config = format!("{config}\n[audit]\npath = \"{}\"\n", audit.display());
        let config = Config::from_toml(&config, dir.path()).unwrap_or_else(|e| panic!("config: {e}"));
        let app = App::start_with_clock(config, clock).await.unwrap();
        Harness {
            addr: app.proxy_addr,
            admin: app.admin_addr.unwrap(),
            app: Some(app),
            audit,
            client: Client::builder(TokioExecutor::new()).build_http(),
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn send(&self, request: Request<TestBody>) -> Response<Incoming> {
        self.client.request(request).await.unwrap()
    }

    /// Audit lines written so far, after a clean shutdown flushed them.
    pub async fn shutdown_and_read_audit(&mut self) -> Vec<serde_json::Value> {
        self.app.take().unwrap().shutdown().await;
        let text = std::fs::read_to_string(&self.audit).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

/// A POST of a JSON-RPC `tools/call` with the given headers.
pub fn mcp_post(url: &str, headers: &[(&str, &str)]) -> Request<TestBody> {
    let mut builder = Request::post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(body(
            r#"{"jsonrpc":"2.0","id":"call-1","method":"tools/call","params":{"name":"whoami","arguments":{}}}"#,
        ))
        .unwrap()
}

pub async fn json(response: Response<Incoming>) -> serde_json::Value {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
}

/// What an upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Serves `handler` over HTTP/1.1 and h2c on 127.0.0.1:0.
pub async fn spawn_http<H, F>(handler: H) -> SocketAddr
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

/// An upstream that records every request and answers 200 `{"ok":true}`.
pub async fn recording_upstream() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    recording_upstream_answering(|_| Response::new(self::body(r#"{"ok":true}"#))).await
}

/// An upstream that records every request and answers with `answer(&request)`, as JSON.
pub async fn recording_upstream_answering<A>(answer: A) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>)
where
    A: Fn(&Seen) -> Response<TestBody> + Clone + Send + Sync + 'static,
{
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let addr = spawn_http(move |req: Request<Incoming>| {
        let (record, answer) = (record.clone(), answer.clone());
        async move {
            let (parts, incoming) = req.into_parts();
            let body = incoming.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let seen =
                Seen { method: parts.method, uri: parts.uri, version: parts.version, headers: parts.headers, body };
            let mut response = answer(&seen);
            response.headers_mut().insert("content-type", "application/json".parse().unwrap());
            record.lock().unwrap().push(seen);
            response
        }
    })
    .await;
    (addr, seen)
}

/// A body that tells `dropped` when it is dropped: proves a stream was torn down.
pub struct NotifyOnDrop<B> {
    pub inner: B,
    pub dropped: Option<oneshot::Sender<()>>,
}

impl<B: Body + Unpin> Body for NotifyOnDrop<B> {
    type Data = B::Data;
    type Error = B::Error;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
}

impl<B> Drop for NotifyOnDrop<B> {
    fn drop(&mut self) {
        if let Some(tx) = self.dropped.take() {
            let _ = tx.send(());
        }
    }
}

/// An SSE upstream: each request gets a stream whose events the test sends through the returned channel.
pub struct SseUpstream {
    pub addr: SocketAddr,
    /// One item per request: the sender of its events, and a receiver that fires when its body is dropped.
    pub streams: mpsc::Receiver<(http_body_util::channel::Sender<Bytes, Infallible>, oneshot::Receiver<()>)>,
}

pub async fn sse_upstream() -> SseUpstream {
    let (tx, streams) = mpsc::channel(8);
    let addr = spawn_http(move |_req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let (events, channel) = http_body_util::channel::Channel::<Bytes, Infallible>::new(8);
            let (dropped_tx, dropped_rx) = oneshot::channel();
            tx.send((events, dropped_rx)).await.unwrap();
            let body = NotifyOnDrop { inner: channel, dropped: Some(dropped_tx) };
            let mut response = Response::new(body.map_err(|never| match never {}).boxed());
            response.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            response
        }
    })
    .await;
    SseUpstream { addr, streams }
}

pub fn status(response: &Response<Incoming>) -> StatusCode {
    response.status()
}

/// An rmcp (official Rust MCP SDK) server with the given tools; every call is recorded as
/// `(tool, authorization header)` and answered with the tool's name.
#[derive(Clone)]
pub struct ToolServer {
    pub tools: Vec<&'static str>,
    pub calls: Arc<Mutex<Vec<(String, String)>>>,
}

impl rmcp::ServerHandler for ToolServer {
    fn get_info(&self) -> rmcp::model::ServerConfig {
        rmcp::model::ServerConfig::new(rmcp::model::ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        _context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::ListToolsResult, rmcp::ErrorData> {
        let schema: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"type":"object","properties":{}}"#).unwrap();
        let schema = Arc::new(schema);
        let tools = self.tools.iter().map(|t| rmcp::model::Tool::new(*t, "test tool", schema.clone())).collect();
        Ok(rmcp::model::ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: rmcp::model::CallToolRequestParams,
        context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, rmcp::ErrorData> {
        let auth = context
            .extensions
            .get::<http::request::Parts>()
            .and_then(|p| p.headers.get("authorization"))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        self.calls.lock().unwrap().push((request.name.to_string(), auth));
        let text = rmcp::model::ContentBlock::text(format!("called {}", request.name));
        Ok(rmcp::model::CallToolResult::success(vec![text]).into())
    }
}

/// Serves a [`ToolServer`] at `http://<addr>/mcp`: stateful (sessions, SSE answers) or stateless
/// (JSON answers).
pub async fn spawn_tool_server(
    tools: &[&'static str],
    stateful: bool,
) -> (SocketAddr, Arc<Mutex<Vec<(String, String)>>>) {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
    let server = ToolServer { tools: tools.to_vec(), calls: Arc::default() };
    let calls = server.calls.clone();
    let config = StreamableHttpServerConfig::default().with_legacy_session_mode(stateful).with_json_response(!stateful);
    let service: StreamableHttpService<ToolServer, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(server.clone()), Default::default(), config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    (addr, calls)
}

/// An rmcp client connected through the proxy at `url`.
pub async fn mcp_client(
    url: &str,
    key: &str,
    user: Option<&str>,
) -> Result<rmcp::service::RunningService<rmcp::RoleClient, rmcp::model::ClientConfig>, String> {
    use rmcp::ServiceExt;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    let mut headers = std::collections::HashMap::new();
    if let Some(user) = user {
        headers.insert(http::HeaderName::from_static("x-alloy-userid"), http::HeaderValue::from_str(user).unwrap());
    }
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(url).auth_header(key).custom_headers(headers),
    );
    rmcp::model::ClientConfig::default().serve(transport).await.map_err(|e| format!("{e:?}"))
}

/// One HTTP/1.1 GET on a connection of its own (`Connection: close`), read to EOF: status and body.
pub async fn get_once(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not HTTP: {text:?}"));
    (status, text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default())
}

/// The value of `series` in the admin listener's `/metrics`.
pub async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let (status, text) = get_once(admin, "/metrics").await;
    assert_eq!(status, 200);
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until `series` reads `want` (10 s at most).
pub async fn wait_for_metric(admin: SocketAddr, series: &str, want: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = metric(admin, series).await;
        if now == Some(want) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{series} stayed at {now:?}, expected {want}");
        tokio::task::yield_now().await;
    }
}

/// An upstream with GET event streams (as [`sse_upstream`]) whose POSTs are answered only when the test
/// releases them: each POST's arrival sends its release on `posts`.
pub struct StreamsAndSlowPosts {
    pub addr: SocketAddr,
    pub streams: mpsc::Receiver<(http_body_util::channel::Sender<Bytes, Infallible>, oneshot::Receiver<()>)>,
    pub posts: mpsc::Receiver<oneshot::Sender<()>>,
}

/// The answer a released POST gets.
pub const SLOW_ANSWER: &str = r#"{"jsonrpc":"2.0","id":"call-1","result":{"content":[]}}"#;

pub async fn streams_and_slow_posts() -> StreamsAndSlowPosts {
    let (stream_tx, streams) = mpsc::channel(8);
    let (post_tx, posts) = mpsc::channel(8);
    let addr = spawn_http(move |req: Request<Incoming>| {
        let (stream_tx, post_tx) = (stream_tx.clone(), post_tx.clone());
        async move {
            if req.method() == Method::POST {
                let (release, released) = oneshot::channel();
                post_tx.send(release).await.unwrap();
                let _ = released.await;
                let mut response = Response::new(body(SLOW_ANSWER));
                response.headers_mut().insert("content-type", "application/json".parse().unwrap());
                return response;
            }
            let (events, channel) = http_body_util::channel::Channel::<Bytes, Infallible>::new(8);
            let (dropped_tx, dropped_rx) = oneshot::channel();
            stream_tx.send((events, dropped_rx)).await.unwrap();
            let body = NotifyOnDrop { inner: channel, dropped: Some(dropped_tx) };
            let mut response = Response::new(body.map_err(|never| match never {}).boxed());
            response.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            response
        }
    })
    .await;
    StreamsAndSlowPosts { addr, streams, posts }
}

/// A GET of the event stream at `url`, as alice.
pub fn stream_request(url: &str) -> Request<TestBody> {
    // hyper's connection-level client sends no Host of its own, and the proxy requires one.
    let uri: Uri = url.parse().unwrap();
    Request::get(url)
        .header("host", uri.authority().unwrap().as_str())
        .header("authorization", format!("Bearer {ALICE_KEY}"))
        .header("accept", "text/event-stream")
        .body(body(""))
        .unwrap()
}

/// The proxy binary, running (`run --config`): killed and reaped when dropped.
pub struct Running {
    pub child: std::process::Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    log: Option<(PathBuf, std::thread::JoinHandle<()>)>,
}

impl Running {
    /// Starts the binary and reads the addresses it logs (it listens on port 0; the config must have an
    /// admin listener); the rest of its log goes on to `log`, which a failing test prints.
    pub fn spawn(config: &Path, log: &Path) -> Running {
        Running::spawn_with(config, log, &[])
    }

    /// As [`Running::spawn`], with more arguments after `run --config FILE` (text or JSON logs).
    pub fn spawn_with(config: &Path, log: &Path, args: &[&str]) -> Running {
        use std::io::{BufRead, BufReader};
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-tenant-proxy"))
            .args(["run", "--config"])
            .arg(config)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("MCP_PROXY_LOG_FORMAT")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Killed and reaped when dropped, also when the start fails below.
        let unbound = "0.0.0.0:0".parse().unwrap();
        let mut running = Running { child, proxy: unbound, admin: unbound, log: None };
        let mut stderr = BufReader::new(running.child.stderr.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "the proxy exited before listening");
            // `proxy_addr=127.0.0.1:1 admin_addr=Some(127.0.0.1:2)`, or the same as JSON fields.
            let json: Option<serde_json::Value> = serde_json::from_str(&line).ok();
            let field = |name: &str| match &json {
                Some(json) => json["fields"][name].as_str().map(|v| v.trim_start_matches("Some(").to_owned()),
                None => Some(line.split(&format!("{name}=")).nth(1)?.split_whitespace().next()?.to_owned()),
            };
            if let (Some(proxy), Some(admin)) = (field("proxy_addr"), field("admin_addr")) {
                let admin = admin.trim_start_matches("Some(");
                let mut file = std::fs::File::create(log).unwrap();
                let copy = std::thread::spawn(move || drop(std::io::copy(&mut stderr, &mut file)));
                running.log = Some((log.to_owned(), copy));
                running.admin = admin.trim_end_matches(')').parse().unwrap();
                running.proxy = proxy.parse().unwrap();
                return running;
            }
        }
    }
}

impl Running {
    /// Kills the proxy and returns its whole log (once every line it wrote is in the file).
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (path, copy) = self.log.take().expect("started");
        copy.join().unwrap();
        std::fs::read_to_string(path).unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
