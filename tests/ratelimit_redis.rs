//! The Redis rate limiter against a real `redis-server`: the same decisions as the local limiter, one
//! budget shared by two proxies, keys that expire, and what happens while Redis is down or slow.
//!
//! The shared server's URL comes from `MCP_TEST_REDIS_URL` (`scripts/test` starts one). Tests that kill
//! or pause Redis start a private `redis-server` of their own. Each test writes under its own key
//! prefix, so tests run in parallel on one server. Redis reads its own clock, so these tests run on real
//! time: quotas are long enough not to refill during a test, except where refilling is the point.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mcp_tenant_proxy::config::Config;
use mcp_tenant_proxy::policy::ratelimit::{LimitRequest, RateLimits};
use mcp_tenant_proxy::policy::ratelimit_redis::{Names, RedisLimiter};
use prometheus_client::metrics::gauge::Gauge;

const UP: &str = "mcp_proxy_rate_limit_backend_up";

/// The shared test server. Missing is a failure, not a skip: a run without Redis would test nothing.
fn redis_url() -> String {
    std::env::var("MCP_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "MCP_TEST_REDIS_URL is not set: run the tests with scripts/test (it starts Redis and PostgreSQL and \
             exports it), or start a redis-server and export MCP_TEST_REDIS_URL=redis://127.0.0.1:<port>"
        )
    })
}

/// A key prefix no other test (or earlier run) uses.
fn prefix(test: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("t{}-{now}-{test}", std::process::id())
}

fn limiter_toml(url: &str, prefix: &str, on_error: &str) -> String {
    format!(
        "[rate_limiter]\nbackend = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\non_error = \"{on_error}\"\n"
    )
}

fn as_user(user: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {ENTERPRISE_KEY}")), ("x-alloy-userid", user.to_owned())]
}

/// A proxy on the Redis limiter. `top` is TOML before the shared config (e.g. the default
/// `rate_limit`); `upstream_fields` goes into `[upstreams.github]`; `edit` rewrites the shared config.
async fn proxy(limiter: &str, top: &str, upstream_fields: &str, edit: impl Fn(String) -> String) -> Harness {
    let (upstream, _) = recording_upstream().await;
    let config = format!("{top}\n{}\n{limiter}", edit(base_config(upstream, upstream_fields)));
    Harness::start(&config).await
}

async fn call(h: &Harness, headers: &[(&'static str, String)]) -> http::Response<hyper::body::Incoming> {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    h.send(mcp_post(&h.url("/mcp/github"), &headers)).await
}

async fn statuses(h: &Harness, user: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(call(h, &as_user(user)).await.status().as_u16());
    }
    out
}

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn keys_under(url: &str, prefix: &str) -> Vec<String> {
    let mut conn = connection(url).await;
    let mut keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await.unwrap();
    keys.sort();
    keys
}

#[tokio::test]
async fn the_same_decisions_and_statuses_as_the_local_limiter() {
    let url = redis_url();
    let text = format!(
        "rate_limit = {{ requests = 3, per = \"1h\" }}\n\
         [[users]]\nid = \"alice\"\n[[users]]\nid = \"bob\"\nrate_limit = {{ requests = 5, per = \"1h\", burst = 2 }}\n\
         [[keys]]\nid = \"k\"\nkind = \"enterprise\"\nsecret = \"k-secret-0001\"\nuser = \"alice\"\nact_as = [\"*\"]\n\
         rate_limit = {{ requests = 4, per = \"1h\" }}\n\
         [upstreams.gh]\nurl = \"http://127.0.0.1:1/\"\ninject = {{ header = \"x\", value = \"{{secret}}\" }}\n\
         rate_limit = {{ requests = 5, per = \"1h\" }}\n{}",
        limiter_toml(&url, &prefix("same"), "fail_closed")
    );
    let config = Config::from_toml(&text, std::path::Path::new(".")).unwrap();
    let mcp_tenant_proxy::config::runtime::RateLimiterBackend::Redis(settings) = &config.rate_limiter else {
        panic!("the redis backend")
    };
    let local = std::sync::Arc::new(RateLimits::default());
    let plan = local.plan(&config);
    let redis =
        RedisLimiter::start(settings, std::sync::Arc::new(RateLimits::default()), Gauge::default()).await.unwrap();
    assert!(redis.is_up());
    let dir = &config.directory;
    let key = dir.keys().next().unwrap();
    // The key's 4 go to alice, alice, bob, alice; bob's burst of 2 and alice's 3 run out next; alice's
    // refused requests still count on the upstream level (5), which refuses her last one.
    let mut outcomes = Vec::new();
    for name in ["alice", "alice", "bob", "alice", "bob", "bob", "alice", "alice", "alice"] {
        let user = config.user(name).unwrap();
        let request = LimitRequest {
            key: key.index,
            user: user.id,
            user_limit: config.user_limit(&user),
            upstream: config.upstreams[0].id,
        };
        let names = Names { user: name, upstream: "gh", key: &key.id };
        let want = local.check(&plan, &request);
        let got = redis.check(&plan, &request, names).await;
        outcomes.push(want.as_ref().map_or_else(|r| r.level.as_str(), |_| "ok"));
        match (want, got) {
            (Ok(want), Ok(got)) => assert_eq!(got, want, "{name}"),
            (Err(want), Err(mcp_tenant_proxy::error::ProxyError::RateLimited(got))) => {
                assert_eq!((got.level, got.limit), (want.level, want.limit), "{name}");
                let skew = got.retry_after.abs_diff(want.retry_after);
                assert!(skew < Duration::from_millis(500), "{name}: {got:?} vs {want:?}");
            }
            (want, got) => panic!("{name}: local {want:?}, redis {got:?}"),
        }
    }
    assert_eq!(outcomes, ["ok", "ok", "ok", "ok", "key", "user", "user", "user", "user_upstream"]);
}

#[tokio::test]
async fn quota_burst_and_every_level_with_honest_headers() {
    let url = redis_url();
    let limiter = limiter_toml(&url, &prefix("levels"), "fail_closed");
    let h = proxy(&limiter, "rate_limit = { requests = 2, per = \"1m\" }", "", |c| c).await;
    let first = call(&h, &as_user("alice")).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["ratelimit-policy"], "\"user\";q=2;w=60");
    assert_eq!(first.headers()["ratelimit"], "\"user\";r=1;t=30");
    assert_eq!(call(&h, &as_user("alice")).await.headers()["ratelimit"], "\"user\";r=0;t=60");
    let refused = call(&h, &as_user("alice")).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "30");
    assert_eq!(refused.headers()["ratelimit-policy"], "\"user\";q=2;w=60");
    assert_eq!(refused.headers()["ratelimit"], "\"user\";r=0;t=30");
    let answer = json(refused).await;
    assert_eq!(
        (answer["id"].as_str(), answer["error"]["data"]["code"].as_str()),
        (Some("call-1"), Some("rate_limited"))
    );
    assert_eq!(statuses(&h, "bob", 3).await, [200, 200, 429], "one user's exhaustion leaves others untouched");

    // The upstream level and the per-tool level (after the body), most specific first.
    let upstream = "rate_limit = { requests = 2, per = \"1h\" }\n[upstreams.github.tool_limits]\n\
                    whoami = { requests = 1, per = \"1h\" }";
    let limiter = limiter_toml(&url, &prefix("upstream"), "fail_closed");
    let h = proxy(&limiter, "rate_limit = { requests = 100, per = \"1h\" }", upstream, |c| c).await;
    let ok = call(&h, &as_user("alice")).await;
    let policy = "\"user_upstream\";q=2;w=3600, \"user\";q=100;w=3600, \"tool\";q=1;w=3600";
    assert_eq!(ok.headers()["ratelimit-policy"], policy);
    assert_eq!(ok.headers()["ratelimit"], "\"user_upstream\";r=1;t=1800, \"user\";r=99;t=36, \"tool\";r=0;t=3600");
    // The tool level refuses once the body is read; the levels before it counted the request.
    let refused = json(call(&h, &as_user("alice")).await).await;
    assert!(refused["error"]["message"].as_str().unwrap().contains("tool level"), "{refused}");
    let refused = json(call(&h, &as_user("alice")).await).await;
    assert!(refused["error"]["message"].as_str().unwrap().contains("user_upstream level"), "{refused}");
    assert_eq!(statuses(&h, "bob", 2).await, [200, 429], "the upstream and tool levels are per user");

    // The key level counts every user the key acts as; refusals at the user level cost it nothing.
    let limiter = limiter_toml(&url, &prefix("key"), "fail_closed");
    let h = proxy(&limiter, "rate_limit = { requests = 1, per = \"1h\" }", "", |c| {
        c.replace("act_as = [\"*\"]", "act_as = [\"*\"]\nrate_limit = { requests = 3, per = \"1h\" }")
    })
    .await;
    assert_eq!(statuses(&h, "alice", 4).await, [200, 429, 429, 429]);
    assert_eq!(statuses(&h, "bob", 1).await, [200]);
    assert_eq!(statuses(&h, "tenant-a-dave", 1).await, [200]);
    let refused = call(&h, &as_user("carol")).await;
    assert_eq!(refused.headers()["ratelimit-policy"], "\"key\";q=3;w=3600");
    assert!(json(refused).await["error"]["message"].as_str().unwrap().contains("key level"));
    assert_eq!(call(&h, &[("authorization", format!("Bearer {BOB_KEY}"))]).await.status(), 429, "bob's own limit");

    // Burst and refill: 20 per 10 s is one request per 500 ms, in bursts of 2.
    let limiter = limiter_toml(&url, &prefix("burst"), "fail_closed");
    let h = proxy(&limiter, "rate_limit = { requests = 20, per = \"10s\", burst = 2 }", "", |c| c).await;
    assert_eq!(statuses(&h, "alice", 3).await, [200, 200, 429]);
    tokio::time::sleep(Duration::from_millis(500)).await; // time has to pass for the bucket to refill
    assert_eq!(statuses(&h, "alice", 2).await, [200, 429], "one request back after 500 ms");
}

#[tokio::test]
async fn two_proxies_share_one_budget_in_keys_that_expire() {
    let url = redis_url();
    let prefix = prefix("shared");
    let limiter = limiter_toml(&url, &prefix, "fail_closed");
    let top = "rate_limit = { requests = 10, per = \"1m\" }";
    let (a, b) = (proxy(&limiter, top, "", |c| c).await, proxy(&limiter, top, "", |c| c).await);
    let mut allowed = 0;
    for i in 0..30 {
        let h = if i % 2 == 0 { &a } else { &b };
        allowed += usize::from(call(h, &as_user("alice")).await.status() == 200);
    }
    assert_eq!(allowed, 10, "10 per minute across both proxies, not 10 each");
    // Keys are stable names (the user's, the quota's), not per-process ids.
    let keys = keys_under(&url, &prefix).await;
    let key = format!("{prefix}:u:10/60000000000/10:alice");
    assert_eq!(keys, [key.as_str()]);
    let mut conn = connection(&url).await;
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
    assert!((50_000..=60_000).contains(&ttl), "expires when the bucket is full again (60 s): {ttl} ms");

    // A bucket that refills quickly is gone from Redis once full.
    let prefix = format!("{prefix}-fast");
    let limiter = limiter_toml(&url, &prefix, "fail_closed");
    let h = proxy(&limiter, "rate_limit = { requests = 10, per = \"1s\" }", "", |c| c).await;
    assert_eq!(statuses(&h, "bob", 3).await, [200, 200, 200]);
    let key = format!("{prefix}:u:10/1000000000/10:bob");
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
    assert!((1..=300).contains(&ttl), "three requests of 100 ms: {ttl} ms");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !keys_under(&url, &prefix).await.is_empty() {
        assert!(Instant::now() < deadline, "the key did not expire");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_flushed_script_cache_is_reloaded() {
    let mut redis = PrivateRedis::start();
    let limiter = limiter_toml(&redis.url(), &prefix("noscript"), "fail_closed");
    let h = proxy(&limiter, "rate_limit = { requests = 3, per = \"1h\" }", "", |c| c).await;
    assert_eq!(statuses(&h, "alice", 1).await, [200]);
    let mut conn = connection(&redis.url()).await;
    let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut conn).await.unwrap();
    assert_eq!(statuses(&h, "alice", 3).await, [200, 200, 429], "EVALSHA's NOSCRIPT falls back to EVAL");
    assert_eq!(metric(h.admin, UP).await, Some(1.0));
    redis.kill();
}

#[tokio::test]
async fn fail_open_decides_locally_while_redis_is_down_and_shares_again_when_it_is_back() {
    let mut redis = PrivateRedis::start();
    let limiter = limiter_toml(&redis.url(), &prefix("open"), "fail_open");
    let top = "rate_limit = { requests = 3, per = \"1h\" }";
    let (a, b) = (proxy(&limiter, top, "", |c| c).await, proxy(&limiter, top, "", |c| c).await);
    assert_eq!(metric(a.admin, UP).await, Some(1.0));
    assert_eq!(statuses(&a, "alice", 1).await, [200]);
    assert_eq!(statuses(&b, "alice", 1).await, [200]);

    redis.kill();
    // Each replica now counts alone, from a full local bucket: 3 more on each.
    assert_eq!(statuses(&a, "alice", 4).await, [200, 200, 200, 429]);
    assert_eq!(metric(a.admin, UP).await, Some(0.0));
    assert_eq!(statuses(&b, "alice", 4).await, [200, 200, 200, 429]);
    assert_eq!(metric(b.admin, UP).await, Some(0.0));

    // Back (empty: it keeps nothing on disk): both replicas reconnect by themselves and share again.
    let redis = PrivateRedis::start_on(redis.port);
    wait_for_metric(a.admin, UP, 1.0).await;
    wait_for_metric(b.admin, UP, 1.0).await;
    assert_eq!(statuses(&a, "alice", 2).await, [200, 200]);
    assert_eq!(statuses(&b, "alice", 2).await, [200, 429], "one budget again");
    drop(redis);
}

#[tokio::test]
async fn fail_closed_refuses_limited_requests_with_503_while_redis_is_down() {
    let mut redis = PrivateRedis::start();
    let limiter = limiter_toml(&redis.url(), &prefix("closed"), "fail_closed");
    let h = proxy(&limiter, "rate_limit = { requests = 3, per = \"1h\" }", "", |c| {
        c.replace("[[users]]\nid = \"bob\"", "[[users]]\nid = \"bob\"\nrate_limit = \"unlimited\"")
    })
    .await;
    assert_eq!(statuses(&h, "alice", 1).await, [200]);
    redis.kill();
    let refused = call(&h, &as_user("alice")).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let answer = json(refused).await;
    assert_eq!(answer["id"], "call-1");
    assert_eq!(answer["error"]["data"]["code"], "rate_limiter_unavailable");
    assert_eq!(metric(h.admin, UP).await, Some(0.0));
    assert_eq!(statuses(&h, "alice", 2).await, [503, 503]);
    assert_eq!(statuses(&h, "bob", 2).await, [200, 200], "no limit applies to bob: Redis is not needed");

    let _redis = PrivateRedis::start_on(redis.port);
    wait_for_metric(h.admin, UP, 1.0).await;
    assert_eq!(statuses(&h, "alice", 4).await, [200, 200, 200, 429], "a fresh Redis: a fresh budget");
    let mut h = h;
    let audit = h.shutdown_and_read_audit().await;
    let unavailable: Vec<_> = audit.iter().filter(|l| l["reason"] == "rate_limiter_unavailable").collect();
    assert_eq!(unavailable.len(), 3);
    assert!(unavailable.iter().all(|l| l["decision"] == "error" && l["status"] == 503));
}

#[tokio::test]
async fn a_slow_redis_costs_a_request_at_most_the_timeout() {
    let redis = PrivateRedis::start();
    let limiter = limiter_toml(&redis.url(), &prefix("slow"), "fail_open") + "timeout = \"50ms\"\n";
    let h = proxy(&limiter, "rate_limit = { requests = 100, per = \"1h\" }", "", |c| c).await;
    assert_eq!(statuses(&h, "alice", 1).await, [200]);
    // Redis stops answering every client for 2 s.
    let mut conn = connection(&redis.url()).await;
    let () = redis::cmd("CLIENT").arg("PAUSE").arg(2000).arg("ALL").query_async(&mut conn).await.unwrap();
    let started = Instant::now();
    assert_eq!(statuses(&h, "alice", 1).await, [200], "fail_open: the local limiter decided");
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(500), "the request waited {waited:?} on a paused Redis");
    assert_eq!(metric(h.admin, UP).await, Some(0.0));
    let started = Instant::now();
    assert_eq!(statuses(&h, "alice", 5).await, [200; 5]);
    assert!(started.elapsed() < Duration::from_millis(500), "while down, requests do not try Redis at all");
    wait_for_metric(h.admin, UP, 1.0).await;
}

#[test]
fn config_is_checked_and_never_echoes_the_url() {
    let parse = |table: &str| {
        let text = format!(
            "[rate_limiter]\n{table}\n[upstreams.gh]\nurl = \"http://127.0.0.1:1/\"\ninject = {{ header = \"x\", value = \"{{secret}}\" }}\n"
        );
        Config::from_toml(&text, std::path::Path::new("."))
    };
    let problems = |table: &str| parse(table).err().map(|e| e.to_string()).unwrap_or_default();
    let local = parse("backend = \"local\"").unwrap();
    assert_eq!(local.rate_limiter, mcp_tenant_proxy::config::runtime::RateLimiterBackend::Local);
    assert!(problems("backend = \"memcached\"").contains("rate_limiter.backend: must be"));
    assert!(
        problems("backend = \"local\"\nurl = \"redis://h\"")
            .contains("rate_limiter.url: applies to backend = \"redis\" only")
    );
    assert!(problems("backend = \"redis\"").contains("rate_limiter.url: is required"));
    let leaked = problems("backend = \"redis\"\nurl = \"redis://:hunter2-pass@10.0.0.5:6379/0\"");
    assert!(leaked.contains("must not contain credentials"), "{leaked}");
    assert!(!leaked.contains("hunter2"), "{leaked}");
    assert!(!problems("backend = \"redis\"\nurl = \"not a url hunter2\"").contains("hunter2"));
    assert!(problems("backend = \"redis\"\nurl = \"rediss://h:6379\"").contains("TLS"));
    assert!(problems("backend = \"redis\"\nurl = \"redis://h\"\ntimeout = \"0s\"").contains("rate_limiter.timeout"));
    assert!(
        problems("backend = \"redis\"\nurl = \"redis://h\"\non_error = \"maybe\"").contains("rate_limiter.on_error")
    );
    assert!(
        problems("backend = \"redis\"\nurl = \"redis://h\"\nkey_prefix = \"a b\"").contains("rate_limiter.key_prefix")
    );
    assert!(
        problems("backend = \"redis\"\nurl = \"redis://h\"\npassword_env = \"MCP_TEST_UNSET_VAR\"")
            .contains("is not set")
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("redis-password");
    std::fs::write(&file, "hunter2-pass\n").unwrap();
    let table = format!(
        "backend = \"redis\"\nurl = \"redis://h\"\nusername = \"proxy\"\npassword_file = \"{}\"",
        file.display()
    );
    let config = parse(&table).unwrap();
    let mcp_tenant_proxy::config::runtime::RateLimiterBackend::Redis(settings) = &config.rate_limiter else { panic!() };
    assert_eq!(settings.password.as_ref().map(|p| p.expose()), Some("hunter2-pass"));
    assert_eq!((settings.timeout, settings.key_prefix.as_str()), (Duration::from_millis(50), "mtp"));
    assert_eq!(settings.on_error, mcp_tenant_proxy::config::runtime::OnRedisError::FailOpen, "the default");
    assert!(!format!("{settings:?}").contains("hunter2"), "Debug hides the password");
    assert_eq!(local.needs_restart(&config), ["rate_limiter"], "the backend is chosen at start");
}

/// A `redis-server` of this test alone (on loopback, no persistence), to kill and restart.
struct PrivateRedis {
    child: Option<Child>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        PrivateRedis::start_on(port)
    }

    fn start_on(port: u16) -> PrivateRedis {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): run the tests with scripts/test, or install redis-server")
            });
        let redis = PrivateRedis { child: Some(child), port, _dir: dir };
        redis.wait_for_pong();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// PING until PONG: 10 s at most.
    fn wait_for_pong(&self) {
        use std::io::{Read, Write};
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pong = std::net::TcpStream::connect(addr).ok().and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
                s.write_all(b"PING\r\n").ok()?;
                let mut buf = [0u8; 7];
                s.read_exact(&mut buf).ok()?;
                (&buf == b"+PONG\r\n").then_some(())
            });
            if pong.is_some() {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server on port {} did not answer PING", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A review finding: one batch of many calls to a limited tool made one huge script call, which ran
/// past the timeout and marked Redis down for every request of the replica. A batch that calls a tool
/// more often than its burst is refused before anything is counted, locally and in Redis alike.
#[tokio::test]
async fn a_batch_of_more_limited_calls_than_the_burst_is_refused_without_a_round_trip() {
    let url = redis_url();
    let prefix = prefix("batch");
    let tool_limit = "[upstreams.github.tool_limits]\nwhoami = { requests = 1000, per = \"1h\" }";
    let h = proxy(&limiter_toml(&url, &prefix, "fail_closed"), "", tool_limit, |c| c).await;
    let item = r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"whoami"}}"#;
    let batch = format!("[{}]", vec![item; 20_000].join(","));
    let request = http::Request::post(h.url("/mcp/github"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("authorization", format!("Bearer {ENTERPRISE_KEY}"))
        .header("x-alloy-userid", "alice")
        .body(body(batch))
        .unwrap();
    assert_eq!(h.send(request).await.status(), 429, "20,000 calls of a tool whose burst is 1,000");
    // Nothing was counted for alice, and Redis is still up for everyone.
    assert!(keys_under(&url, &format!("{prefix}:t:")).await.is_empty());
    assert_eq!(statuses(&h, "bob", 1).await, [200]);
    assert_eq!(statuses(&h, "alice", 1).await, [200]);
}
