//! Per-user upstream OAuth against a real provider (npm `oidc-provider`, tests/oauth/provider.mjs) and a
//! real browser (headless Chromium driven by tests/oauth/connect.mjs): connect, use, expire, refresh
//! with rotation, revoke, reconnect; two users never see each other's token.
//!
//! Needs `npm ci --prefix tests/oauth` and Debian's `chromium` (scripts/test installs both).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::pg::TestDb;
use common::{body, json, recording_upstream_answering};
use http::{Method, Request};
use http_body_util::BodyExt;
use mcp_tenant_proxy::secret::Secret;
use mcp_tenant_proxy::store::Store;
use mcp_tenant_proxy::store::connection::{CONNECTION_ID, Tokens};
use mcp_tenant_proxy::store::crypto::MasterKey;
use mcp_tenant_proxy::store::postgres::PgStore;
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const CLIENT_SECRET: &str = "proxy-client-secret-0123456789";
/// Short, so the test sees tokens expire; the proxy refreshes 1 s before.
const ACCESS_TTL: u64 = 4;

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oauth")
}

/// The provider, stopped when this is dropped (it exits when its stdin closes).
struct Provider {
    child: Child,
    meta: Value,
    /// Kept open: a provider writing to a closed pipe would die.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Drop for Provider {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Provider {
    fn start(redirect_uris: &[String]) -> Provider {
        assert!(
            peers_dir().join("node_modules/oidc-provider").exists(),
            "run `npm ci --prefix tests/oauth` first (scripts/test does)"
        );
        let settings = json!({
            "redirect_uris": redirect_uris,
            "client_id": "mcp-proxy",
            "client_secret": CLIENT_SECRET,
            "access_token_ttl": ACCESS_TTL,
            "scopes": ["repo"],
        });
        let mut child = Command::new("node")
            .arg(peers_dir().join("provider.mjs"))
            .arg(settings.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let meta: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("provider said {line:?}"));
        Provider { child, meta, _stdout: stdout }
    }

    fn endpoint(&self, name: &str) -> String {
        self.meta[name].as_str().unwrap().to_owned()
    }

    /// What the provider says about a token it issued (RFC 7662).
    async fn introspect(&self, token: &str) -> Value {
        self.post("introspection_endpoint", &format!("token={token}")).await.1
    }

    async fn revoke(&self, refresh_token: &str) {
        let (status, _) =
            self.post("revocation_endpoint", &format!("token={refresh_token}&token_type_hint=refresh_token")).await;
        assert_eq!(status, 200);
    }

    async fn post(&self, endpoint: &str, form: &str) -> (u16, Value) {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("mcp-proxy:{CLIENT_SECRET}"));
        let request = Request::post(self.endpoint(endpoint))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("authorization", format!("Basic {basic}"))
            .body(body(form.to_owned()))
            .unwrap();
        let response = client().request(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

fn client() -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, common::TestBody>
{
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// The browser: opens `url`, signs in at the provider as `login`, consents; the page it ends on.
async fn browse(options: Value) -> Value {
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node").arg(peers_dir().join("connect.mjs")).arg(options.to_string()).output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "connect.mjs: {stdout} {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

/// Opens a connect link's page and presses its button as the browser would: a same-origin POST with the
/// page's cookie; or, with `origin` or without `cookie`, as another site's page would. The status and
/// page text of the answer.
async fn press_connect(url: &str, origin: Option<&str>, cookie: bool) -> (u16, String) {
    let page = client().request(Request::get(url).body(body("")).unwrap()).await.unwrap();
    assert_eq!(page.status(), 200, "the link's page");
    let set_cookie = page.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set_cookie.contains("SameSite=Strict") && set_cookie.contains("HttpOnly"), "{set_cookie}");
    let cookie_value = set_cookie.split(';').next().unwrap().to_owned();
    let html = String::from_utf8(page.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let field = |name: &str| {
        let start = html.find(&format!("name=\"{name}\" value=\"")).unwrap() + name.len() + 15;
        html[start..].split('"').next().unwrap().to_owned()
    };
    let (link, confirm) = (field("link"), field("confirm"));
    let target = format!("{}/oauth/connect", url.split("/oauth/").next().unwrap());
    let mut request = Request::post(target).header("content-type", "application/x-www-form-urlencoded");
    if cookie {
        request = request.header("cookie", cookie_value);
    }
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    let response =
        client().request(request.body(body(format!("link={link}&confirm={confirm}"))).unwrap()).await.unwrap();
    let status = response.status().as_u16();
    (status, String::from_utf8_lossy(&response.into_body().collect().await.unwrap().to_bytes()).into_owned())
}

struct Setup {
    app: mcp_tenant_proxy::app::App,
    /// More replicas on the same store (PostgreSQL), each with its own public URL.
    replicas: Vec<mcp_tenant_proxy::app::App>,
    provider: Provider,
    dir: tempfile::TempDir,
    master: Secret,
    seen: std::sync::Arc<std::sync::Mutex<Vec<common::Seen>>>,
    keys: Vec<(String, String)>,
    db: Option<TestDb>,
}

impl Setup {
    async fn start(users: &[&str]) -> Setup {
        Setup::start_with(users, None, 1, "").await
    }

    /// `replicas` proxies on one store: a SQLite file, or with `db`, PostgreSQL. `extra` is more config
    /// (`{upstream}` stands for the recording upstream's address).
    async fn start_with(users: &[&str], db: Option<TestDb>, replicas: usize, extra: &str) -> Setup {
        Setup::start_full(users, db, replicas, extra, false).await
    }

    /// With `discover`, the proxy finds the provider from the upstream's RFC 9728 metadata (which the
    /// recording upstream serves, naming the provider) and the provider's OpenID metadata.
    async fn start_full(users: &[&str], db: Option<TestDb>, replicas: usize, extra: &str, discover: bool) -> Setup {
        let issuer = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
        let (upstream, seen) = {
            let issuer = issuer.clone();
            recording_upstream_answering(move |seen: &common::Seen| {
                if seen.uri.path() != "/.well-known/oauth-protected-resource/mcp" {
                    let mut answer = hyper::Response::new(body(r#"{"ok":true}"#));
                    // A session for every initialize, as a Streamable HTTP server hands out.
                    if seen.body.windows(12).any(|w| w == b"\"initialize\"") {
                        answer.headers_mut().insert("mcp-session-id", "upstream-session-1".parse().unwrap());
                    }
                    return answer;
                }
                let host = seen.headers["host"].to_str().unwrap();
                let metadata =
                    json!({"resource": format!("http://{host}/mcp"), "authorization_servers": [issuer.get()]});
                hyper::Response::new(body(metadata.to_string()))
            })
            .await
        };
        // The provider must know the callbacks, and the proxies the provider: reserve the proxies' ports.
        let ports: Vec<u16> = (0..replicas)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
            .collect();
        let callbacks: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}/oauth/callback")).collect();
        let provider = Provider::start(&callbacks);
        issuer.set(provider.endpoint("issuer")).unwrap();
        let endpoints = match discover {
            true => format!("discover = true\nissuer = \"{}\"", provider.endpoint("issuer")),
            false => format!(
                "authorization_endpoint = \"{}\"\ntoken_endpoint = \"{}\"",
                provider.endpoint("authorization_endpoint"),
                provider.endpoint("token_endpoint")
            ),
        };
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::generate();
        std::fs::write(dir.path().join("master.key"), master.expose()).unwrap();
        std::fs::write(dir.path().join("admin.token"), ADMIN_TOKEN).unwrap();
        std::fs::write(dir.path().join("client.secret"), CLIENT_SECRET).unwrap();
        let store = match &db {
            None => "path = \"store.db\"".to_owned(),
            Some(db) => {
                let (url, password) = db.url_and_password();
                std::fs::write(dir.path().join("pg.password"), password.expose()).unwrap();
                format!("url = \"{url}\"\npassword_file = \"pg.password\"")
            }
        };
        let mut apps = Vec::new();
        for (n, port) in ports.iter().enumerate() {
            let text = format!(
                r#"
[server]
listen = "127.0.0.1:{port}"
body_read_timeout = "2s"
[admin]
listen = "127.0.0.1:0"
token_file = "admin.token"
[store]
{store}
master_key_file = "master.key"
[audit]
path = "audit-{n}.log"
[oauth]
public_url = "http://127.0.0.1:{port}"
[upstreams.github]
url = "http://{upstream}/mcp"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
forward_user_header = "x-forwarded-user"
[upstreams.github.oauth]
{endpoints}
client_id = "mcp-proxy"
client_secret_file = "client.secret"
scopes = ["openid", "repo"]
refresh_before = "1s"
{extra}
"#,
                extra = extra.replace("{upstream}", &upstream.to_string()),
            );
            let path = dir.path().join(format!("proxy-{n}.toml"));
            std::fs::write(&path, text).unwrap();
            let config = mcp_tenant_proxy::config::Config::load(&path, None).unwrap();
            apps.push(mcp_tenant_proxy::app::App::start(config).await.unwrap());
        }
        let app = apps.remove(0);
        let mut setup = Setup { app, replicas: apps, provider, dir, master, seen, keys: Vec::new(), db };
        for user in users {
            assert_eq!(setup.admin(Method::POST, "/admin/v1/users", json!({"id": user})).await.0, 201);
            let (status, key) =
                setup.admin(Method::POST, "/admin/v1/keys", json!({"user": user, "kind": "standard"})).await;
            assert_eq!(status, 201, "{key}");
            setup.keys.push((user.to_string(), key["key"].as_str().unwrap().to_owned()));
        }
        setup
    }

    fn open_store(&self) -> Box<dyn Store> {
        match &self.db {
            None => Box::new(
                mcp_tenant_proxy::store::SqliteStore::open(&self.dir.path().join("store.db"), Some(&self.master))
                    .unwrap(),
            ),
            Some(db) => {
                let (config, master) = (db.config.clone(), self.master.clone());
                Box::new(common::pg::off_thread(move || PgStore::open(&config, Some(&master)).unwrap()))
            }
        }
    }

    async fn admin(&self, method: Method, path: &str, body: Value) -> (u16, Value) {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.app.admin_addr.unwrap()))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(common::body(body.to_string()))
            .unwrap();
        let response = client().request(request).await.unwrap();
        (response.status().as_u16(), json(response).await)
    }

    /// An MCP request as `user`: the HTTP status and the JSON answer.
    async fn call(&self, user: &str, message: Value) -> (u16, Value) {
        self.call_at(&self.app, user, "github", message).await
    }

    async fn call_at(
        &self,
        app: &mcp_tenant_proxy::app::App,
        user: &str,
        upstream: &str,
        message: Value,
    ) -> (u16, Value) {
        let (status, _, answer) = self.call_in(app, user, upstream, None, message).await;
        (status, answer)
    }

    /// An MCP request in `session` (as the proxy handed it out): the status, the session the answer
    /// hands out, and the JSON answer.
    async fn call_in(
        &self,
        app: &mcp_tenant_proxy::app::App,
        user: &str,
        upstream: &str,
        session: Option<&str>,
        message: Value,
    ) -> (u16, Option<String>, Value) {
        let key = &self.keys.iter().find(|(u, _)| u == user).unwrap().1;
        let mut request = Request::post(format!("http://{}/mcp/{upstream}", app.proxy_addr))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("authorization", format!("Bearer {key}"));
        if let Some(session) = session {
            request = request.header("mcp-session-id", session);
        }
        let response = client().request(request.body(body(message.to_string())).unwrap()).await.unwrap();
        let handed_out = response.headers().get("mcp-session-id").map(|v| v.to_str().unwrap().to_owned());
        (response.status().as_u16(), handed_out, json(response).await)
    }

    async fn tool_call(&self, user: &str) -> (u16, Value) {
        self.call(user, json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"whoami"}})).await
    }

    /// Connects `user`'s provider account `login` through the connect link the proxy answered with.
    async fn connect(&self, user: &str, login: &str) -> Value {
        let (status, answer) = self.tool_call(user).await;
        assert_eq!(status, 200, "{answer}");
        let url = answer["error"]["data"]["connect_url"].as_str().unwrap().to_owned();
        browse(json!({"url": url, "login": login, "expect_text": "Account connected"})).await
    }

    /// The access token the upstream got with its last request for `user`.
    fn last_token_of(&self, user: &str) -> String {
        let seen = self.seen.lock().unwrap();
        let last = seen.iter().rev().find(|s| s.headers["x-forwarded-user"] == user).expect("a request for the user");
        last.headers["authorization"].to_str().unwrap().strip_prefix("Bearer ").unwrap().to_owned()
    }

    /// The connection to github as stored (read with a second handle on the store).
    fn stored(&self, user: &str) -> Tokens {
        let secrets = self.open_store().credential_secrets(Some(user)).unwrap();
        let secret = secrets
            .into_iter()
            .find(|c| c.credential_id == CONNECTION_ID && c.upstream == "github")
            .expect("connected");
        Tokens::parse(&secret.secret).unwrap()
    }

    fn audit(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join("audit-0.log")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

fn code(answer: &Value) -> &str {
    answer["error"]["data"]["code"].as_str().unwrap_or_default()
}

async fn until_expired(tokens: &Tokens) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let left = tokens.expires_at.unwrap() - now;
    tokio::time::sleep(Duration::from_secs(left.max(0) as u64 + 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_connects_uses_refreshes_loses_and_reconnects_an_account() {
    let s = Setup::start(&["alice"]).await;

    // Not connected: a client that takes URL elicitation gets -32042 with the link, others the link in data.
    let initialize = json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{
        "protocolVersion":"2025-11-25","clientInfo":{"name":"t","version":"1"},
        "capabilities":{"elicitation":{"url":{}}}}});
    let (status, answer) = s.call("alice", initialize.clone()).await;
    assert_eq!((status, answer["error"]["code"].as_i64()), (200, Some(-32042)), "{answer}");
    let elicitation = &answer["error"]["data"]["elicitations"][0];
    assert_eq!(elicitation["mode"], "url");
    assert!(elicitation["url"].as_str().unwrap().contains("/oauth/connect?link="));
    let (status, answer) = s.tool_call("alice").await;
    assert_eq!((status, answer["error"]["code"].as_i64(), code(&answer)), (200, Some(-32001), "oauth_not_connected"));
    assert!(s.seen.lock().unwrap().is_empty(), "nothing reached the upstream");

    // Connect in the browser: the provider's login and consent, then the proxy's success page.
    let url = answer["error"]["data"]["connect_url"].as_str().unwrap().to_owned();
    let page = browse(json!({"url": url, "login": "alice-gh", "expect_text": "Account connected"})).await;
    assert!(page["text"].as_str().unwrap().contains("Connected alice-gh to github for alice"), "{page}");
    // Before anything happened, the link's page said whom the account would be connected to.
    let confirm = page["confirm_text"].as_str().unwrap();
    assert!(confirm.contains("github account to the proxy user \"alice\""), "{confirm}");
    // The link was for one use.
    let (status, text) = press_connect(&url, None, true).await;
    assert_eq!(status, 410, "{text}");

    // Connected: the upstream gets alice's own access token, which the provider vouches for.
    let (status, _) = s.tool_call("alice").await;
    assert_eq!(status, 200);
    let first = s.last_token_of("alice");
    let about = s.provider.introspect(&first).await;
    assert_eq!((&about["active"], &about["sub"]), (&json!(true), &json!("alice-gh")), "{about}");
    let stored = s.stored("alice");
    assert_eq!(stored.access_token, first);
    let rotated_from = stored.refresh_token.clone().unwrap();

    // Expired: two hundred concurrent requests wait on one refresh and all carry the one new token.
    until_expired(&stored).await;
    let calls: Vec<_> = (0..200).map(|_| s.tool_call("alice")).collect();
    for (status, answer) in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200, "{answer}");
    }
    let after: std::collections::HashSet<String> = {
        let seen = s.seen.lock().unwrap();
        seen.iter().rev().take(200).map(|s| s.headers["authorization"].to_str().unwrap().to_owned()).collect()
    };
    assert_eq!(after.len(), 1, "one refresh for all of them: {after:?}");
    let second = s.last_token_of("alice");
    assert_ne!(second, first);
    assert_eq!(s.provider.introspect(&second).await["active"], true);
    let stored = s.stored("alice");
    assert_ne!(stored.refresh_token.as_deref(), Some(rotated_from.as_str()), "the rotated refresh token is kept");

    // A second refresh spends the rotated token (the provider would refuse the first one, and revoke all).
    until_expired(&stored).await;
    assert_eq!(s.tool_call("alice").await.0, 200);
    let third = s.last_token_of("alice");
    assert_ne!(third, second);
    assert_eq!(s.provider.introspect(&third).await["active"], true);

    // A session opened by a client that takes URL elicitation remembers it.
    let (status, session, _) = s.call_in(&s.app, "alice", "github", None, initialize.clone()).await;
    let session = session.expect("the upstream's session, bound");
    assert_eq!(status, 200);

    // Revoked at the provider: the next refresh is refused, and the client is told to connect again.
    let stored = s.stored("alice");
    s.provider.revoke(stored.refresh_token.as_deref().unwrap()).await;
    until_expired(&stored).await;
    let (status, answer) = s.tool_call("alice").await;
    assert_eq!((status, code(&answer)), (200, "oauth_reconnect_required"), "{answer}");
    // In the session, a tool call gets the elicitation (its client said at initialize it takes them).
    let tool = json!({"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"whoami"}});
    let (status, _, answer) = s.call_in(&s.app, "alice", "github", Some(&session), tool).await;
    assert_eq!((status, answer["error"]["code"].as_i64()), (200, Some(-32042)), "{answer}");
    assert_eq!(answer["error"]["data"]["elicitations"][0]["mode"], "url");
    assert!(s.stored("alice").needs_reconnect.is_some());
    let before = s.seen.lock().unwrap().len();
    assert_eq!(s.tool_call("alice").await.0, 200);
    assert_eq!(s.seen.lock().unwrap().len(), before, "a refused connection reaches no upstream");

    // Each refresh counted, by upstream and result (no user in any series).
    let admin = s.app.admin_addr.unwrap();
    let ok = common::metric(admin, r#"mcp_proxy_oauth_refreshes_total{upstream="github",result="ok"}"#).await;
    assert_eq!(ok, Some(2.0), "two refreshes, each counted once however many requests waited");
    let refused = common::metric(admin, r#"mcp_proxy_oauth_refreshes_total{upstream="github",result="refused"}"#).await;
    assert_eq!(refused, Some(1.0));

    // Reconnect, and it works again.
    s.connect("alice", "alice-gh").await;
    assert_eq!(s.tool_call("alice").await.0, 200);
    assert_eq!(s.provider.introspect(&s.last_token_of("alice")).await["active"], true);

    // The audit trail says why each refused request was refused, and records the flow's steps.
    let audit = s.audit();
    let reasons: Vec<&str> = audit.iter().filter_map(|l| l["reason"].as_str()).collect();
    let steps = ["oauth_not_connected", "oauth_connect_confirm", "oauth_connect_started", "oauth_connected"];
    for reason in steps.into_iter().chain(["oauth_link_used"]) {
        assert!(reasons.contains(&reason), "{reason} in {reasons:?}");
    }
    assert!(reasons.contains(&"oauth_reconnect_required"));
    let text = std::fs::read_to_string(s.dir.path().join("audit-0.log")).unwrap();
    assert!(!text.contains(&first) && !text.contains("link="), "no token or link in the audit trail");
    s.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_never_get_each_others_token_and_a_flow_stays_in_its_browser() {
    // This one finds the provider by discovery (RFC 9728, then OpenID metadata), as the others do not.
    let s = Setup::start_full(&["alice", "bob"], None, 1, "", true).await;
    // A link made while alice had no connection connects only while she has none.
    let (_, answer) = s.tool_call("alice").await;
    let early = answer["error"]["data"]["connect_url"].as_str().unwrap().to_owned();
    let (_, answer) = s.tool_call("bob").await;
    let bob_early = answer["error"]["data"]["connect_url"].as_str().unwrap().to_owned();
    s.connect("alice", "alice-gh").await;
    s.connect("bob", "bob-gh").await;
    let (status, text) = press_connect(&early, None, true).await;
    assert_eq!(status, 409, "a leaked early link cannot replace the connection: {text}");

    let calls: Vec<_> = (0..30).map(|i| s.tool_call(if i % 2 == 0 { "alice" } else { "bob" })).collect();
    for (status, _) in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200);
    }
    let seen = s.seen.lock().unwrap().clone();
    let metadata = seen.iter().filter(|r| r.uri.path().starts_with("/.well-known/")).count();
    assert_eq!(metadata, 1, "the upstream's metadata was read once, and kept");
    let mut subjects = std::collections::HashMap::new();
    for request in seen.iter().filter(|r| !r.uri.path().starts_with("/.well-known/")) {
        let token = request.headers["authorization"].to_str().unwrap().strip_prefix("Bearer ").unwrap().to_owned();
        let user = request.headers["x-forwarded-user"].to_str().unwrap().to_owned();
        if !subjects.contains_key(&token) {
            let about = s.provider.introspect(&token).await;
            subjects.insert(token.clone(), about["sub"].as_str().unwrap().to_owned());
        }
        assert_eq!(subjects[&token], format!("{user}-gh"), "{user} got another account's token");
    }
    assert_eq!(subjects.len(), 2);

    // A flow finished by another browser (a code sent elsewhere) connects nothing.
    let (_, answer) = s.admin(Method::POST, "/admin/v1/users/bob/connections/github/link", Value::Null).await;
    let url = answer["connect_url"].as_str().unwrap().to_owned();
    let stolen = browse(json!({"url": url, "login": "mallory-gh", "steal": true})).await;
    let callback = stolen["callback_url"].as_str().unwrap();
    let replay = client().request(Request::get(callback).body(body("")).unwrap()).await.unwrap();
    assert_eq!(replay.status(), 403);
    let text = String::from_utf8_lossy(&replay.into_body().collect().await.unwrap().to_bytes()).into_owned();
    assert!(text.contains("Finish connecting in the browser"), "{text}");
    assert_eq!(s.stored("bob").account, "bob-gh", "bob's connection is untouched");

    // Another site's page cannot press the button for the person it sent there: a foreign Origin, or no
    // cookie of the link's page, and the link is not spent.
    let (_, answer) = s.admin(Method::POST, "/admin/v1/users/bob/connections/github/link", Value::Null).await;
    let late = answer["connect_url"].as_str().unwrap().to_owned();
    for (origin, cookie) in [(Some("http://evil.example"), true), (None, false), (Some("null"), true)] {
        let (status, text) = press_connect(&late, origin, cookie).await;
        assert_eq!(status, 403, "{origin:?} {cookie}: {text}");
    }
    assert_eq!(s.stored("bob").account, "bob-gh");

    // Admin API: list (never a token) and disconnect.
    let (status, listed) = s.admin(Method::GET, "/admin/v1/users/bob/connections", Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(
        (&listed["connections"][0]["upstream"], &listed["connections"][0]["account"]),
        (&json!("github"), &json!("bob-gh"))
    );
    assert!(!listed.to_string().contains(&s.stored("bob").access_token));
    let (status, _) = s.admin(Method::DELETE, "/admin/v1/users/bob/connections/github", Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(code(&s.tool_call("bob").await.1), "oauth_not_connected");
    assert_eq!(s.tool_call("alice").await.0, 200);
    // The disconnect voided every link made before it: those made for the connection it removed, and
    // those made before bob had one.
    for link in [&late, &bob_early] {
        let (status, text) = press_connect(link, None, true).await;
        assert_eq!(status, 409, "{text}");
    }
    let (status, listed) = s.admin(Method::GET, "/admin/v1/users/bob/connections", Value::Null).await;
    assert_eq!((status, listed), (200, json!({"connections": []})));
    let (status, _) = s.admin(Method::DELETE, "/admin/v1/users/bob/connections/github", Value::Null).await;
    assert_eq!(status, 404, "nothing left to disconnect");
    // The link a request gets now connects again.
    s.connect("bob", "bob-gh").await;
    assert_eq!(s.tool_call("bob").await.0, 200);
    assert_eq!(s.provider.introspect(&s.last_token_of("bob")).await["sub"], "bob-gh");
    let audit = s.audit();
    let reasons: Vec<&str> = audit.iter().filter_map(|l| l["reason"].as_str()).collect();
    for reason in ["oauth_link_superseded", "oauth_not_confirmed", "oauth_browser_mismatch"] {
        assert!(reasons.contains(&reason), "{reason} in {reasons:?}");
    }
    // An expired link and an expired sign-in fail cleanly (made here with the keys the proxy derives
    // from the master key).
    use mcp_tenant_proxy::oauth::link::{LINK_LABEL, Link, STATE_LABEL, State, seal_state, sign_link};
    let master = MasterKey::parse(&s.master).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let link = Link { user: "bob".into(), upstream: "github".into(), expires_at: now - 1, nonce: [7; 32], over: None };
    let token = sign_link(&master.derive(LINK_LABEL), &link);
    let (status, text) = common::get_once(s.app.proxy_addr, &format!("/oauth/connect?link={token}")).await;
    assert!(status == 410 && text.contains("Link expired"), "{status} {text}");
    let state = State {
        user: "bob".into(),
        upstream: "github".into(),
        expires_at: now - 1,
        nonce: [8; 32],
        verifier: "v".repeat(43),
        cookie: [9; 32],
        over: None,
    };
    let sealed = seal_state(&master.derive(STATE_LABEL), &state);
    let (status, text) = common::get_once(s.app.proxy_addr, &format!("/oauth/callback?code=c&state={sealed}")).await;
    assert!(status == 410 && text.contains("expired"), "{status} {text}");
    // The limits every request meets come first on the browser routes too: one authority.
    let mut twice = tokio::net::TcpStream::connect(s.app.proxy_addr).await.unwrap();
    let head = "GET /oauth/connect?link=x HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut twice, head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut twice, &mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("invalid_host"), "{answer}");
    // A confirmation form whose body never comes holds nothing for longer than any request body.
    let mut slow = tokio::net::TcpStream::connect(s.app.proxy_addr).await.unwrap();
    let head = "POST /oauth/connect HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nlink=";
    tokio::io::AsyncWriteExt::write_all(&mut slow, head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 64];
    let n = tokio::io::AsyncReadExt::read(&mut slow, &mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    // A static credential may not take the connection's reserved id.
    let (status, _) =
        s.admin(Method::PUT, "/admin/v1/users/bob/credentials/github/oauth", json!({"secret": "x"})).await;
    assert_eq!(status, 400);
    // Nor be deleted as one: that would take the disconnect marker, and with it the voiding of old links.
    let (status, answer) = s.admin(Method::DELETE, "/admin/v1/users/bob/credentials/github/oauth", Value::Null).await;
    assert_eq!(status, 400, "{answer}");
    let audit_file = s.dir.path().join("audit-0.log");
    s.app.shutdown().await;
    // Every line written by now.
    let audit = std::fs::read_to_string(audit_file).unwrap();
    for reason in ["oauth_link_expired", "oauth_state_expired", "body_read_timeout"] {
        assert!(audit.contains(&format!("\"reason\":\"{reason}\"")), "{reason} in the audit trail");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_token_endpoint_holds_up_only_its_own_connections_and_is_asked_once() {
    // A token endpoint that takes connections and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let (accepted_tx, accepted) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            held.push(socket);
            accepted_tx.send_replace(held.len());
        }
    });
    let extra = format!(
        r#"
[upstreams.slow]
url = "http://{{upstream}}/mcp"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
forward_user_header = "x-forwarded-user"
[upstreams.slow.oauth]
authorization_endpoint = "http://{hung_addr}/authorize"
token_endpoint = "http://{hung_addr}/token"
client_id = "mcp-proxy"
client_secret_file = "client.secret"
"#
    );
    let extra = format!("{extra}\n[identity]\nunknown_user = \"default\"\n");
    let s = Setup::start_with(&["alice"], None, 1, &extra).await;
    s.connect("alice", "alice-gh").await;
    // A caller naming a user nobody knows falls back to the key's user (unknown_user = "default"),
    // but never to that user's connected account, nor gets a link to connect one as them.
    let (status, key) =
        s.admin(Method::POST, "/admin/v1/keys", json!({"user": "alice", "kind": "enterprise", "act_as": ["*"]})).await;
    assert_eq!(status, 201, "{key}");
    let request = Request::post(format!("http://{}/mcp/github", s.app.proxy_addr))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("authorization", format!("Bearer {}", key["key"].as_str().unwrap()))
        .header("x-alloy-userid", "stranger")
        .body(body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"whoami"}}"#))
        .unwrap();
    let before = s.seen.lock().unwrap().len();
    let response = client().request(request).await.unwrap();
    let (status, answer) = (response.status().as_u16(), json(response).await);
    assert_eq!((status, code(&answer)), (403, "missing_credential"), "{answer}");
    assert!(!answer.to_string().contains("connect"), "no connect link for a fallback: {answer}");
    assert_eq!(s.seen.lock().unwrap().len(), before, "nothing reached the upstream");
    // alice's connection to `slow` has expired, and its provider hangs.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let expired = Tokens {
        access_token: "slow-access".into(),
        refresh_token: Some("slow-refresh".into()),
        expires_at: Some(now - 10),
        scope: String::new(),
        account: "alice-slow".into(),
        connected_at: now - 100,
        refreshed_at: None,
        needs_reconnect: None,
        grant: "g-slow".into(),
    };
    s.open_store().put_credential("alice", "slow", CONNECTION_ID, &expired.to_secret()).unwrap();
    // An admin write for alice reloads her into the request path's directory.
    assert_eq!(s.admin(Method::POST, "/admin/v1/keys", json!({"user": "alice", "kind": "standard"})).await.0, 201);

    let tool = json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"whoami"}});
    let finished = std::sync::atomic::AtomicBool::new(false);
    let slow = async {
        let calls = (0..5).map(|_| s.call_at(&s.app, "alice", "slow", tool.clone()));
        let answers = futures_util::future::join_all(calls).await;
        finished.store(true, std::sync::atomic::Ordering::SeqCst);
        answers
    };
    let meanwhile = async {
        // The refresh has reached the hung endpoint: from now on, the slow requests wait on it.
        accepted.clone().wait_for(|n| *n >= 1).await.unwrap();
        for _ in 0..10 {
            assert_eq!(s.tool_call("alice").await.0, 200, "github is not held up by slow's provider");
        }
        assert!(!finished.load(std::sync::atomic::Ordering::SeqCst), "the slow requests still wait");
    };
    let (answers, ()) = tokio::join!(slow, meanwhile);
    for (status, answer) in answers {
        assert_eq!((status, code(&answer)), (503, "oauth_refresh_unavailable"), "{answer}");
    }
    assert_eq!(*accepted.borrow(), 1, "five waiting requests, one refresh");
    // Just failed: the next request is refused at once, without asking the provider again.
    let (status, answer) = s.call_at(&s.app, "alice", "slow", tool).await;
    assert_eq!((status, code(&answer)), (503, "oauth_refresh_unavailable"));
    assert_eq!(*accepted.borrow(), 1, "no new refresh within the back-off");
    assert_eq!(s.stored("alice").account, "alice-gh");
    s.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgresql_spend_a_rotating_refresh_token_once() {
    let s = Setup::start_with(&["alice"], Some(TestDb::create()), 2, "").await;
    let (a, b) = (&s.app, &s.replicas[0]);
    s.connect("alice", "alice-gh").await;
    let tool = json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"whoami"}});
    // The other replica serves the connection made through the first.
    let mut served = false;
    for _ in 0..100 {
        if s.call_at(b, "alice", "github", tool.clone()).await.1["error"].is_null() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "replica b never saw the connection");

    for round in 0..2 {
        let stored = s.stored("alice");
        until_expired(&stored).await;
        let before = s.seen.lock().unwrap().len();
        // Both replicas find the token expired at once; one refreshes, the other waits for its answer.
        let calls: Vec<_> =
            (0..16).map(|i| s.call_at(if i % 2 == 0 { a } else { b }, "alice", "github", tool.clone())).collect();
        for (status, answer) in futures_util::future::join_all(calls).await {
            assert_eq!((status, answer["error"].clone()), (200, Value::Null), "round {round}: {answer}");
        }
        let tokens: std::collections::HashSet<String> = {
            let seen = s.seen.lock().unwrap();
            seen[before..].iter().map(|r| r.headers["authorization"].to_str().unwrap().to_owned()).collect()
        };
        assert_eq!(tokens.len(), 1, "round {round}: one refresh for both replicas: {tokens:?}");
        let now = s.stored("alice");
        assert_ne!(now.refresh_token, stored.refresh_token, "round {round}: rotated");
        assert_eq!(s.provider.introspect(now.refresh_token.as_deref().unwrap()).await["active"], true);
        let token = tokens.into_iter().next().unwrap();
        assert_eq!(s.provider.introspect(token.strip_prefix("Bearer ").unwrap()).await["active"], true);
    }
    for app in s.replicas {
        app.shutdown().await;
    }
    s.app.shutdown().await;
}

#[test]
fn bad_oauth_settings_are_refused_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("master.key"), MasterKey::generate().expose()).unwrap();
    std::fs::write(dir.path().join("client.secret"), CLIENT_SECRET).unwrap();
    let problems = |oauth: &str, upstream: &str, store: bool| {
        let store = if store { "[store]\npath = \"s.db\"\nmaster_key_file = \"master.key\"" } else { "" };
        let text = format!(
            "{store}\n{oauth}\n[upstreams.github]\nurl = \"http://127.0.0.1:9/mcp\"\n\
             inject = {{ header = \"authorization\", value = \"Bearer {{secret}}\" }}\n{upstream}\n\
             [upstreams.github.oauth]\nclient_id = \"c\"\nclient_secret_file = \"client.secret\"\ndiscover = true\n\
             issuer = \"https://auth.example.com\"\n"
        );
        match mcp_tenant_proxy::config::Config::from_toml(&text, dir.path()) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let oauth = "[oauth]\npublic_url = \"https://mcp.example.com\"";
    assert_eq!(problems(oauth, "", true), "", "a good one");
    assert!(problems(oauth, "", false).contains("needs a [store] with a master key"), "{}", problems(oauth, "", false));
    assert!(problems("", "", true).contains("needs an [oauth] section"));
    for (public_url, why) in [
        ("http://mcp.example.com", "plain http off loopback"),
        ("https://mcp.example.com/proxy", "a path"),
        ("https://mcp.example.com?x=1", "a query"),
    ] {
        let section = format!("[oauth]\npublic_url = \"{public_url}\"");
        assert!(problems(&section, "", true).contains("oauth.public_url"), "{why}: {}", problems(&section, "", true));
    }
    // The path goes into cookie attributes and form actions as it is.
    for path in ["/o;Domain=evil.example", "oauth", "/oauth/", "/a//b", "/o%2f", "/o\"x"] {
        let section = format!("{oauth}\npath = '{path}'");
        assert!(problems(&section, "", true).contains("oauth.path"), "{path}: {}", problems(&section, "", true));
    }
    // Neither may hide the other's paths.
    for (upstream_path, oauth_path) in [("/oauth/github", "/oauth"), ("/mcp", "/mcp/oauth"), ("/", "/oauth")] {
        let section = format!("{oauth}\npath = \"{oauth_path}\"");
        let upstream = format!("path = \"{upstream_path}\"");
        let found = problems(&section, &upstream, true);
        assert!(found.contains("must not contain one another"), "{upstream_path} {oauth_path}: {found}");
    }
    let ttl = format!("{oauth}\nlink_ttl = \"2d\"");
    assert!(problems(&ttl, "", true).contains("oauth.link_ttl"));
    // Endpoints: both, or discovery; not a mix.
    let text = |fields: &str| {
        format!(
            "[store]\npath = \"s.db\"\nmaster_key_file = \"master.key\"\n{oauth}\n[upstreams.github]\n\
             url = \"http://127.0.0.1:9/mcp\"\ninject = {{ header = \"authorization\", value = \"Bearer {{secret}}\" }}\n\
             [upstreams.github.oauth]\nclient_id = \"c\"\nclient_secret_file = \"client.secret\"\n{fields}\n"
        )
    };
    let check = |fields: &str| match mcp_tenant_proxy::config::Config::from_toml(&text(fields), dir.path()) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let fixed = "authorization_endpoint = \"https://a.example/auth\"\ntoken_endpoint = \"https://a.example/token\"";
    assert_eq!(check(fixed), "");
    assert!(check(&format!("{fixed}\ndiscover = true")).contains("or discover = true"));
    assert!(check("token_endpoint = \"https://a.example/token\"").contains("or discover = true"));
    assert!(check("").contains("or discover = true"));
    let plain = "authorization_endpoint = \"http://a.example/auth\"\ntoken_endpoint = \"https://a.example/token\"";
    assert!(check(plain).contains("authorization_endpoint: must be an https:// URL"), "{}", check(plain));
    let discover = "discover = true\nissuer = \"https://auth.example.com\"";
    assert_eq!(check(discover), "");
    assert!(check(&format!("{discover}\nscopes = [\"a b\"]")).contains("scopes"));
    assert!(check(&format!("{discover}\nresource = \"relative\"")).contains("resource"));
    // The upstream never picks the authorization server: discovery needs one configured.
    assert!(
        check("discover = true").contains("issuer: must be set with discover = true"),
        "{}",
        check("discover = true")
    );
    assert!(check(&format!("{fixed}\nissuer = \"https://a.example\"")).contains("goes with discover = true"));
    assert!(check("discover = true\nissuer = \"http://a.example\"").contains("issuer: must be an https:// URL"));
    // Discovery over a plain-http upstream off this host could be rewritten in transit.
    let remote = text(discover).replace("http://127.0.0.1:9/mcp", "http://mcp.internal/mcp");
    let found = match mcp_tenant_proxy::config::Config::from_toml(&remote, dir.path()) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    assert!(found.contains("discover: needs an https:// upstream url"), "{found}");
}
