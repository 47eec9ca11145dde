//! Three proxy processes (the real binary) share one PostgreSQL store and one Redis limiter, behind a
//! round-robin client: writes through any replica serve calls through every other within a second, a
//! per-user limit holds across all of them, sessions move between them, and an outage of either engine
//! behaves as configured.
//!
//! Needs `MCP_TEST_POSTGRES_URL` and `MCP_TEST_REDIS_URL` (run through `scripts/test`). The outage test
//! starts private servers of its own with `scripts/services`, so stopping them disturbs no other test.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Running as Replica;
use common::pg::TestDb;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "replicas-admin-token-0123456789";
const SESSION_KEY: &str = "replicas-session-key-0123456789abcdef0123";
/// How long a change may take to reach every replica (the issue's bound).
const PROPAGATION: Duration = Duration::from_secs(1);

fn redis_url() -> String {
    std::env::var("MCP_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("MCP_TEST_REDIS_URL is not set: run the tests with scripts/test (it starts PostgreSQL and Redis)")
    })
}

/// One replica: the binary on its own config file, killed when dropped.
/// What the replicas share: the store, the limiter and the files every config names.
struct Cluster {
    dir: tempfile::TempDir,
    db_url: String,
    redis: String,
    upstream: SocketAddr,
    /// A Redis key prefix of this test's own, so tests sharing the server never share buckets.
    prefix: String,
}

impl Cluster {
    fn new(db: &TestDb, redis: String, upstream: SocketAddr) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (db_url, password) = db.url_and_password();
        std::fs::write(dir.path().join("pg.password"), password.expose()).unwrap();
        let master = mcp_tenant_proxy::store::crypto::MasterKey::generate();
        std::fs::write(dir.path().join("master.key"), master.expose()).unwrap();
        std::fs::write(dir.path().join("admin.token"), ADMIN_TOKEN).unwrap();
        let prefix = format!("mtp-test-{}", hex::encode(rand::random::<[u8; 6]>()));
        Cluster { dir, db_url, redis, upstream, prefix }
    }

    fn config(&self, n: usize, on_error: &str) -> PathBuf {
        let d = self.dir.path();
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "1s"
[admin]
listen = "127.0.0.1:0"
token_file = "{d}/admin.token"
[audit]
path = "{d}/audit-{n}.log"
[store]
url = "{db}"
password_file = "{d}/pg.password"
master_key_file = "{d}/master.key"
[rate_limiter]
backend = "redis"
url = "{redis}"
on_error = "{on_error}"
key_prefix = "{prefix}"
[sessions]
secret = "{SESSION_KEY}"
[upstreams.github]
url = "http://{up}/mcp"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#,
            d = d.display(),
            db = self.db_url,
            redis = self.redis,
            prefix = self.prefix,
            up = self.upstream,
        );
        let path = d.join(format!("replica-{n}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start(&self, n: usize, on_error: &str) -> Replica {
        Replica::spawn(&self.config(n, on_error), &self.dir.path().join(format!("replica-{n}.log")))
    }
}

fn client() -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, TestBody> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn admin(replica: &Replica, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", replica.admin))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(common::body(body.map_or_else(String::new, |b| b.to_string())))
        .unwrap();
    let response = client().request(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// A `tools/call` through `replica` with `key`: the status.
async fn call(replica: &Replica, key: &str) -> StatusCode {
    let url = format!("http://{}/mcp/github", replica.proxy);
    let auth = format!("Bearer {key}");
    client().request(mcp_post(&url, &[("authorization", &auth)])).await.unwrap().status()
}

/// Repeats `call` until it answers `want`, for at most `PROPAGATION`; returns how long it took.
async fn until(replica: &Replica, key: &str, want: StatusCode) -> Duration {
    let started = Instant::now();
    loop {
        let got = call(replica, key).await;
        if got == want {
            return started.elapsed();
        }
        assert!(started.elapsed() < PROPAGATION, "{} still answers {got}, not {want}", replica.proxy);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Creates `user` with a key and a credential through `replica`; returns the key.
async fn provision(replica: &Replica, user: &str, limit: Option<Value>) -> String {
    let mut body = json!({ "id": user });
    if let Some(limit) = limit {
        body["rate_limit"] = limit;
    }
    let (status, created) = admin(replica, Method::POST, "/admin/v1/users", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let path = format!("/admin/v1/users/{user}/credentials/github/default");
    let (status, _) = admin(replica, Method::PUT, &path, Some(json!({ "secret": format!("cred-{user}") }))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, key) =
        admin(replica, Method::POST, "/admin/v1/keys", Some(json!({ "user": user, "kind": "standard" }))).await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    key["key"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_users_keys_revocations_and_one_rate_limit() {
    let (upstream, seen) = recording_upstream().await;
    let db = TestDb::create();
    let cluster = Cluster::new(&db, redis_url(), upstream);
    let replicas: Vec<Replica> = (1..=3).map(|n| cluster.start(n, "fail_closed")).collect();

    // Created on replica 1, served by replica 3 within a second (and by replica 2).
    let key = provision(&replicas[0], "alice", Some(json!({ "requests": 10, "per": "1m" }))).await;
    let took = until(&replicas[2], &key, StatusCode::OK).await;
    eprintln!("propagation to replica 3: {took:?}");
    until(&replicas[1], &key, StatusCode::OK).await;
    let injected: Vec<_> = seen.lock().unwrap().iter().map(|s| s.headers["authorization"].clone()).collect();
    assert!(injected.iter().all(|v| v == "Bearer cred-alice"), "{injected:?}");

    // 10 per minute across all three, not 10 each: round robin over 30 calls. (The calls above used
    // 2 of the 10.)
    let mut allowed = 2;
    for i in 0..30 {
        match call(&replicas[i % 3], &key).await {
            StatusCode::OK => allowed += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(allowed, 10, "one budget for the user across the replicas");

    // Revoked on replica 2: refused on 1 and 3 within a second.
    let bob = provision(&replicas[1], "bob", None).await;
    until(&replicas[0], &bob, StatusCode::OK).await;
    let (_, keys) = admin(&replicas[1], Method::GET, "/admin/v1/keys?user=bob", None).await;
    let id = keys["keys"][0]["id"].as_str().unwrap().to_owned();
    let (status, _) = admin(&replicas[1], Method::DELETE, &format!("/admin/v1/keys/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    until(&replicas[0], &bob, StatusCode::UNAUTHORIZED).await;
    until(&replicas[2], &bob, StatusCode::UNAUTHORIZED).await;

    // A deleted user is refused everywhere too.
    let (status, _) = admin(&replicas[2], Method::DELETE, "/admin/v1/users/alice", None).await;
    assert_eq!(status, StatusCode::OK);
    for replica in &replicas {
        until(replica, &key, StatusCode::UNAUTHORIZED).await;
    }

    // Each replica read its snapshot once, at start: its change listener was connected before the
    // snapshot was read, so no whole reload followed (at a million users, that is seconds of CPU).
    // Only a lost listener (a slow ping on a loaded machine) may cause one, and it says so first.
    for (n, replica) in replicas.into_iter().enumerate() {
        let log = replica.stop();
        let resync = log.find("store resync done");
        let lost = log.find("lost the PostgreSQL store");
        assert!(resync.is_none() || lost < resync, "replica {} reloaded everything after start:\n{log}", n + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opened_through_one_replica_is_used_through_another() {
    // The upstream hands out a session id on initialize and records which session later calls carry.
    let (upstream, seen) = recording_upstream_answering(|seen| {
        let mut response = http::Response::new(common::body(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#));
        if String::from_utf8_lossy(&seen.body).contains("\"initialize\"") {
            response.headers_mut().insert("mcp-session-id", "upstream-session-1".parse().unwrap());
        }
        response
    })
    .await;
    let db = TestDb::create();
    let cluster = Cluster::new(&db, redis_url(), upstream);
    let (a, b) = (cluster.start(1, "fail_open"), cluster.start(2, "fail_open"));
    let key = provision(&a, "carol", None).await;
    until(&b, &key, StatusCode::OK).await;

    let auth = format!("Bearer {key}");
    let initialize = Request::post(format!("http://{}/mcp/github", a.proxy))
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(common::body(r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#))
        .unwrap();
    let response = client().request(initialize).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let session = response.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    assert_ne!(session, "upstream-session-1", "clients see the proxy's bound id");

    // The same session through replica B: accepted, and the upstream gets its own id back.
    let url = format!("http://{}/mcp/github", b.proxy);
    let call = mcp_post(&url, &[("authorization", &auth), ("mcp-session-id", &session)]);
    assert_eq!(client().request(call).await.unwrap().status(), StatusCode::OK);
    let last = seen.lock().unwrap().last().unwrap().headers.get("mcp-session-id").cloned();
    assert_eq!(last.as_ref().map(|v| v.to_str().unwrap()), Some("upstream-session-1"));
}

/// Private PostgreSQL and Redis servers (`scripts/services`), stopped and started by the test.
struct Services {
    dir: String,
    postgres: String,
    redis: String,
}

impl Services {
    fn start() -> Services {
        let out = Command::new("bash").arg(script()).arg("start").output().unwrap();
        assert!(out.status.success(), "scripts/services start: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let var = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("{name} not in {text}"))
                .to_owned()
        };
        Services {
            dir: var("MCP_TEST_SERVICES_DIR"),
            postgres: var("MCP_TEST_POSTGRES_URL"),
            redis: var("MCP_TEST_REDIS_URL"),
        }
    }

    fn run(&self, what: &str) {
        let out = Command::new("bash").arg(script()).args([what, &self.dir]).output().unwrap();
        assert!(out.status.success(), "scripts/services {what}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).args(["stop", &self.dir]).output();
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/services")
}

async fn readyz(replica: &Replica) -> (StatusCode, Value) {
    let (status, body) = get_once(replica.admin, "/readyz").await;
    (StatusCode::from_u16(status).unwrap(), serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_of_postgres_and_redis_degrade_as_configured_and_recover_by_themselves() {
    let services = Services::start();
    let (upstream, _) = recording_upstream().await;
    let db = TestDb::create_on(&services.postgres);
    let cluster = Cluster::new(&db, services.redis.clone(), upstream);
    let open = cluster.start(1, "fail_open");
    let closed = cluster.start(2, "fail_closed");
    let key = provision(&open, "dana", Some(json!({ "requests": 1000, "per": "1m" }))).await;
    until(&closed, &key, StatusCode::OK).await;

    // PostgreSQL down: both replicas go on serving from their snapshot and stay ready, saying why;
    // writes fail cleanly with a stable code.
    services.run("pg-stop");
    for replica in [&open, &closed] {
        assert_eq!(call(replica, &key).await, StatusCode::OK);
    }
    let started = Instant::now();
    loop {
        let (status, body) = readyz(&open).await;
        assert_eq!(status, StatusCode::OK, "stays ready for traffic: {body}");
        if body["store"] == "unavailable" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "/readyz never reported the store: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = admin(&open, Method::POST, "/admin/v1/users", Some(json!({ "id": "erin" }))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("store_unavailable")));

    // Back: writes work again and reach the other replica (its listener reconnected and resynced).
    services.run("pg-start");
    let started = Instant::now();
    loop {
        let (status, _) = admin(&open, Method::POST, "/admin/v1/users", Some(json!({ "id": "erin" }))).await;
        if status == StatusCode::CREATED {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "writes never recovered: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let path = "/admin/v1/users/erin/credentials/github/default";
    let (status, _) = admin(&open, Method::PUT, path, Some(json!({ "secret": "cred-erin" }))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, created) =
        admin(&open, Method::POST, "/admin/v1/keys", Some(json!({ "user": "erin", "kind": "standard" }))).await;
    let erin = created["key"].as_str().unwrap().to_owned();
    let started = Instant::now();
    loop {
        let status = call(&closed, &erin).await;
        if status == StatusCode::OK {
            break;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let log = std::fs::read_to_string(cluster.dir.path().join("replica-2.log")).unwrap_or_default();
            panic!("the other replica never caught up ({status}); its log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Admin writes use the pool, which is back before this replica's listener has reconnected (it
    // retries with backoff, up to 2 s): /readyz says "ok" once the listener is back too.
    let started = Instant::now();
    while readyz(&open).await.1["store"] != "ok" {
        assert!(started.elapsed() < Duration::from_secs(5), "/readyz never reported the store back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Redis down: fail_open serves under its local limiter, fail_closed answers 503; both recover.
    services.run("redis-stop");
    assert_eq!(call(&open, &key).await, StatusCode::OK);
    let refused = client()
        .request(mcp_post(
            &format!("http://{}/mcp/github", closed.proxy),
            &[("authorization", &format!("Bearer {key}"))],
        ))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(json(refused).await.to_string().contains("rate_limiter_unavailable"));
    services.run("redis-start");
    let started = Instant::now();
    while call(&closed, &key).await != StatusCode::OK {
        assert!(started.elapsed() < Duration::from_secs(10), "fail_closed never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_metric(open.admin, "mcp_proxy_rate_limit_backend_up", 1.0).await;
}
