//! The admin API over real HTTP: its writes serve the proxy's next request, with no restart.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use mcp_tenant_proxy::admin::api::{OPENAPI, ROUTES};
use mcp_tenant_proxy::app::App;
use mcp_tenant_proxy::config::Config;
use mcp_tenant_proxy::secret::Secret;
use mcp_tenant_proxy::store::SqliteStore;
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const CANARY: &str = "ghp_ADMIN_CANARY_5e4d3c2b1a09f8e7";

struct Files {
    dir: tempfile::TempDir,
    config: PathBuf,
}

/// A config file with `[store]` (and its master key) and `[admin] token_file`, next to `base_config`.
fn files(upstream: std::net::SocketAddr) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let master = mcp_tenant_proxy::store::crypto::MasterKey::generate();
    std::fs::write(dir.path().join("master.key"), format!("{}\n", master.expose())).unwrap();
    std::fs::write(dir.path().join("admin.token"), format!("{ADMIN_TOKEN}\n")).unwrap();
    let base = base_config(upstream, "").replacen(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"",
        1,
    );
    assert!(base.contains("token_file"), "base_config's [admin] table moved");
    let text = format!(
        "[store]\npath = \"store.db\"\nmaster_key_file = \"master.key\"\n[audit]\npath = \"audit.log\"\n{base}"
    );
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    Files { dir, config }
}

async fn start(config: &Path) -> App {
    App::start(Config::load(config, None).unwrap()).await.unwrap()
}

struct Client {
    http: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, TestBody>,
    admin: std::net::SocketAddr,
    proxy: std::net::SocketAddr,
}

impl Client {
    fn new(app: &App) -> Client {
        Client {
            http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
            admin: app.admin_addr.unwrap(),
            proxy: app.proxy_addr,
        }
    }

    /// An admin API call with the right token.
    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.admin_as(Some(ADMIN_TOKEN), method, path, body).await
    }

    async fn admin_as(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut builder = Request::builder().method(method).uri(format!("http://{}{path}", self.admin));
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let body = body.map_or_else(String::new, |b| b.to_string());
        let response = self.http.request(builder.body(common::body(body)).unwrap()).await.unwrap();
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
        }
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// A `tools/call` through the proxy on `path` with `key`, if any: the status.
    async fn call(&self, path: &str, key: Option<&str>) -> StatusCode {
        let auth = key.map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let url = format!("http://{}{path}", self.proxy);
        self.http.request(mcp_post(&url, &headers)).await.unwrap().status()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn the_admin_api_manages_users_keys_credentials_and_tokens_live() {
    let (upstream, seen) = recording_upstream().await;
    let files = files(upstream);
    let app = start(&files.config).await;
    let c = Client::new(&app);

    // Authentication: the document is public, everything else needs the token.
    let (status, doc) = c.admin_as(None, Method::GET, "/admin/v1/openapi.json", None).await;
    assert_eq!((status, doc["openapi"].as_str()), (StatusCode::OK, Some("3.1.0")));
    for token in [None, Some("wrong-token"), Some("")] {
        let (status, body) = c.admin_as(token, Method::GET, "/admin/v1/users", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(body["error"]["code"], "unauthorized");
        let (status, _) = c.admin_as(token, Method::GET, "/admin/v1/nothing-here", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "routes are not told apart before authentication");
    }
    assert_eq!(c.admin(Method::GET, "/admin/v1/nothing-here", None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(c.admin(Method::PUT, "/admin/v1/users", None).await.0, StatusCode::METHOD_NOT_ALLOWED);

    // Users: create, duplicate, a config-file user, validation.
    let (status, user) = c.admin(Method::POST, "/admin/v1/users", Some(json!({ "id": "erin" }))).await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    assert_eq!(user["rate_limit"], "default");
    let (status, body) = c.admin(Method::POST, "/admin/v1/users", Some(json!({ "id": "erin" }))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")));
    assert_eq!(c.admin(Method::POST, "/admin/v1/users", Some(json!({ "id": "alice" }))).await.0, StatusCode::CONFLICT);
    for (body, field) in [
        (json!({ "id": "bad id!" }), "id"),
        (json!({ "id": "frank", "admin": true }), "admin"),
        (json!({}), "id"),
        (json!({ "id": "frank", "rate_limit": { "requests": 0, "per": "1m" } }), "rate_limit.requests"),
        (json!({ "id": "frank", "rate_limit": "sometimes" }), "rate_limit"),
        // Longer than the limiter can count: refused, and the writes below still work (it used to panic
        // inside the limiter registry's lock and hang every later write).
        (json!({ "id": "frank", "rate_limit": { "requests": 1, "per": "600y" } }), "rate_limit"),
        (json!({ "id": "frank", "rate_limit": { "requests": 1, "per": "9y", "burst": 2 } }), "rate_limit"),
    ] {
        let (status, answer) = c.admin(Method::POST, "/admin/v1/users", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer["error"]["field"], field, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_request");
    }
    let huge = json!({ "id": "x".repeat(100 * 1024) });
    assert_eq!(c.admin(Method::POST, "/admin/v1/users", Some(huge)).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(c.admin(Method::GET, "/admin/v1/users/nobody", None).await.0, StatusCode::NOT_FOUND);
    let (status, user) = c
        .admin(
            Method::PATCH,
            "/admin/v1/users/erin",
            Some(json!({ "rate_limit": { "requests": 100, "per": "1m", "burst": 10 } })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(user["rate_limit"], json!({ "requests": 100, "per": "1m", "burst": 10 }));
    c.admin(Method::POST, "/admin/v1/users", Some(json!({ "id": "gina" }))).await;
    let (_, page) = c.admin(Method::GET, "/admin/v1/users?limit=1", None).await;
    assert_eq!(page["users"][0]["id"], "erin");
    assert_eq!(page["next_after"], "erin");
    let (_, page) = c.admin(Method::GET, "/admin/v1/users?after=erin&limit=1", None).await;
    assert_eq!(page["users"][0]["id"], "gina");
    assert_eq!(c.admin(Method::GET, "/admin/v1/users?limit=0", None).await.1["error"]["field"], "limit");

    // A credential (twice: idempotent) and a key, then a call through the proxy at once.
    let cred_path = "/admin/v1/users/erin/credentials/github/default";
    let (status, _) = c.admin(Method::PUT, cred_path, Some(json!({ "secret": CANARY }))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = c.admin(Method::PUT, cred_path, Some(json!({ "secret": CANARY }))).await;
    assert_eq!((status, body["outcome"].as_str()), (StatusCode::OK, Some("updated")));
    let (_, creds) = c.admin(Method::GET, "/admin/v1/users/erin/credentials", None).await;
    assert_eq!(creds["credentials"].as_array().unwrap().len(), 1);
    assert!(!creds.to_string().contains(CANARY), "credentials are write-only");
    let nobody = "/admin/v1/users/nobody/credentials/github/default";
    assert_eq!(c.admin(Method::PUT, nobody, Some(json!({ "secret": "x" }))).await.0, StatusCode::NOT_FOUND);
    let file_user = "/admin/v1/users/alice/credentials/github/other";
    let (status, _) = c.admin(Method::PUT, file_user, Some(json!({ "secret": "x" }))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "config-file users are not managed here");
    let no_user = c.admin(Method::POST, "/admin/v1/keys", Some(json!({ "user": "nobody", "kind": "standard" })));
    assert_eq!(no_user.await.0, StatusCode::NOT_FOUND);
    let bad_secret = c.admin(Method::PUT, cred_path, Some(json!({ "secret": "a\nb" }))).await;
    assert_eq!(bad_secret.1["error"]["field"], "secret");

    let (status, key) =
        c.admin(Method::POST, "/admin/v1/keys", Some(json!({ "user": "erin", "kind": "standard" }))).await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let erin_key = key["key"].as_str().unwrap().to_owned();
    let bad_kind = c.admin(Method::POST, "/admin/v1/keys", Some(json!({ "user": "erin", "kind": "root" }))).await;
    assert_eq!(bad_kind.1["error"]["field"], "kind");
    let (_, keys) = c.admin(Method::GET, "/admin/v1/keys?user=erin", None).await;
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    assert!(!keys.to_string().contains(&erin_key), "the key is shown once only");

    assert_eq!(c.call("/mcp/github", Some(&erin_key)).await, StatusCode::OK);
    assert_eq!(seen.lock().unwrap().last().unwrap().headers["authorization"], format!("Bearer {CANARY}"));
    assert_eq!(c.call("/mcp/github", Some(ALICE_KEY)).await, StatusCode::OK, "the config file's users still work");

    // Token URLs.
    let bad_days =
        c.admin(Method::POST, "/admin/v1/tokens", Some(json!({ "user": "erin", "upstream": "github", "days": 0 })));
    assert_eq!(bad_days.await.1["error"]["field"], "days");
    let (status, token) = c
        .admin(Method::POST, "/admin/v1/tokens", Some(json!({ "user": "erin", "upstream": "github", "days": 7 })))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    let token_path = token["path"].as_str().unwrap().to_owned();
    assert!(token_path.starts_with("/mcp/github/t/"), "{token_path}");
    assert_eq!(c.call(&token_path, None).await, StatusCode::OK);
    assert_eq!(seen.lock().unwrap().last().unwrap().headers["authorization"], format!("Bearer {CANARY}"));
    let (_, tokens) = c.admin(Method::GET, "/admin/v1/tokens?user=erin", None).await;
    assert_eq!(tokens["tokens"].as_array().unwrap().len(), 1);
    let (status, _) =
        c.admin(Method::DELETE, &format!("/admin/v1/tokens/{}", token["id"].as_str().unwrap()), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(c.call(&token_path, None).await, StatusCode::UNAUTHORIZED);
    let (status, usage) = c.admin(Method::GET, "/admin/v1/usage?user=erin", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(usage["usage"].is_array());
    assert_eq!(c.admin(Method::GET, "/admin/v1/usage?who=erin", None).await.1["error"]["field"], "who");

    // Restart on the same files: everything persists.
    app.shutdown().await;
    let app = start(&files.config).await;
    let c = Client::new(&app);
    assert_eq!(c.admin(Method::GET, "/admin/v1/users/erin", None).await.0, StatusCode::OK);
    assert_eq!(c.call("/mcp/github", Some(&erin_key)).await, StatusCode::OK);
    assert_eq!(seen.lock().unwrap().last().unwrap().headers["authorization"], format!("Bearer {CANARY}"));
    assert_eq!(c.call(&token_path, None).await, StatusCode::UNAUTHORIZED, "a revoked token stays revoked");

    // Deleting the user refuses its key on the next call.
    assert_eq!(c.admin(Method::DELETE, "/admin/v1/users/erin", None).await.0, StatusCode::OK);
    assert_eq!(c.call("/mcp/github", Some(&erin_key)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(c.admin(Method::DELETE, "/admin/v1/users/erin", None).await.0, StatusCode::NOT_FOUND);
    app.shutdown().await;

    // The credential never reached the database file (or its WAL) in plaintext.
    let db = files.dir.path().join("store.db");
    let master = Secret::new(std::fs::read_to_string(files.dir.path().join("master.key")).unwrap().trim());
    SqliteStore::open(&db, Some(&master)).unwrap().checkpoint().unwrap();
    for path in [db.clone(), PathBuf::from(format!("{}-wal", db.display()))] {
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(!contains(&bytes, CANARY.as_bytes()), "{} holds the credential in plaintext", path.display());
    }
    let audit = std::fs::read_to_string(files.dir.path().join("audit.log")).unwrap();
    assert!(!audit.contains(CANARY) && !audit.contains(&erin_key));
}

#[tokio::test]
async fn without_a_token_the_admin_api_is_off_and_health_stays_on() {
    let (upstream, _) = recording_upstream().await;
    let h = Harness::start(&base_config(upstream, "")).await;
    for path in ["/admin/v1/users", "/admin/v1/openapi.json"] {
        let request = Request::get(format!("http://{}{path}", h.admin))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(body(""))
            .unwrap();
        assert_eq!(h.send(request).await.status(), StatusCode::NOT_FOUND, "{path}");
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let request = Request::get(format!("http://{}{path}", h.admin)).body(body("")).unwrap();
        assert_eq!(h.send(request).await.status(), StatusCode::OK, "{path}");
    }
}

#[test]
fn a_short_or_missing_admin_token_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("short.token"), "short\n").unwrap();
    let base = base_config("127.0.0.1:1".parse().unwrap(), "");
    for (setting, expected) in [
        ("token_file = \"short.token\"", "at least 16 bytes"),
        ("token_env = \"MCP_PROXY_TEST_UNSET_ADMIN_TOKEN\"", "is not set"),
    ] {
        let text = base.replacen("[admin]\n", &format!("[admin]\n{setting}\n"), 1);
        let err = Config::from_toml(&text, dir.path()).err().expect("invalid").to_string();
        assert!(err.contains(expected), "{err}");
    }
}

#[test]
fn the_openapi_document_and_the_route_table_agree() {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            if ["get", "put", "post", "delete", "patch", "head", "options", "trace"].contains(&method.as_str()) {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let served: BTreeSet<(String, String)> =
        ROUTES.iter().map(|(m, p, _)| ((*m).to_owned(), (*p).to_owned())).collect();
    assert_eq!(served.len(), ROUTES.len(), "a route is listed twice");
    assert_eq!(documented, served);
}

#[tokio::test]
async fn concurrent_writes_all_take_effect() {
    let (upstream, _) = recording_upstream().await;
    let files = files(upstream);
    let app = start(&files.config).await;
    let c = std::sync::Arc::new(Client::new(&app));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let user = format!("user-{i}");
            let (status, _) = c.admin(Method::POST, "/admin/v1/users", Some(json!({ "id": user }))).await;
            assert_eq!(status, StatusCode::CREATED);
            let path = format!("/admin/v1/users/{user}/credentials/github/default");
            let (status, _) = c.admin(Method::PUT, &path, Some(json!({ "secret": format!("cred-{i}") }))).await;
            assert_eq!(status, StatusCode::CREATED);
            let (_, key) =
                c.admin(Method::POST, "/admin/v1/keys", Some(json!({ "user": user, "kind": "standard" }))).await;
            key["key"].as_str().unwrap().to_owned()
        }));
    }
    let mut keys = Vec::new();
    for task in tasks {
        keys.push(task.await.unwrap());
    }
    // Every write is in the config in force, whichever rebuild finished last.
    for key in &keys {
        assert_eq!(c.call("/mcp/github", Some(key)).await, StatusCode::OK);
    }
    let (_, page) = c.admin(Method::GET, "/admin/v1/users", None).await;
    assert_eq!(page["users"].as_array().unwrap().len(), 8);
    drop(c);
    app.shutdown().await;
}

/// The crash test of issue 5, on the real binary: admin writes stream in, the proxy is SIGKILLed in the
/// middle, and every write it acknowledged is in the store, which passes `PRAGMA integrity_check`.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_stream_of_admin_writes_loses_no_acknowledged_write() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    let (upstream, _) = recording_upstream().await;
    let files = files(upstream);
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcp-tenant-proxy"))
        .args(["run", "--config"])
        .arg(&files.config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let admin = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        loop {
            let line = lines.next().expect("exited before listening").unwrap();
            if let Some(rest) = line.split("admin_addr=Some(").nth(1) {
                return rest.split(')').next().unwrap().to_owned();
            }
        }
    })
    .await
    .unwrap();

    let http =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<TestBody>();
    let create = |n: usize| {
        let request = Request::post(format!("http://{admin}/admin/v1/users"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("content-type", "application/json")
            .body(body(json!({ "id": format!("crash-{n}") }).to_string()))
            .unwrap();
        http.request(request)
    };
    // Two writers at once, so the kill lands while writes are in flight.
    let mut acknowledged = Vec::new();
    let mut n = 0;
    while acknowledged.len() < 60 {
        let (a, b) = tokio::join!(create(n), create(n + 1));
        for (i, response) in [(n, a), (n + 1, b)] {
            if response.unwrap().status() == StatusCode::CREATED {
                acknowledged.push(i);
            }
        }
        n += 2;
    }
    let in_flight = (tokio::spawn(create(n)), tokio::spawn(create(n + 1)));
    child.kill().unwrap(); // SIGKILL
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    for (i, task) in [(n, in_flight.0), (n + 1, in_flight.1)] {
        if let Ok(Ok(response)) = task.await
            && response.status() == StatusCode::CREATED
        {
            acknowledged.push(i);
        }
    }

    let master = Secret::new(std::fs::read_to_string(files.dir.path().join("master.key")).unwrap().trim());
    let store = SqliteStore::open(&files.dir.path().join("store.db"), Some(&master)).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    let users: BTreeSet<String> =
        mcp_tenant_proxy::store::Store::load_snapshot(&store).unwrap().users.into_iter().map(|u| u.id).collect();
    for i in &acknowledged {
        assert!(users.contains(&format!("crash-{i}")), "acknowledged crash-{i} was lost");
    }
}
