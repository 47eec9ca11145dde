//! Per-user rate limits with `governor`'s fake clock: no sleeps, exact counts.

mod common;

use std::time::Duration;

use common::*;
use governor::clock::FakeRelativeClock;
use mcp_tenant_proxy::config::Config;
use mcp_tenant_proxy::policy::ratelimit::{LimitClock, LimitRequest, RateLimits};
use mcp_tenant_proxy::store::{UpstreamId, UserId};

fn as_user(user: &str) -> [(&'static str, String); 2] {
    [("authorization", format!("Bearer {ENTERPRISE_KEY}")), ("x-alloy-userid", user.to_owned())]
}

struct Limited {
    harness: Harness,
    clock: FakeRelativeClock,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
}

/// `extra` is TOML placed before the shared config; `upstream_fields` goes into `[upstreams.github]`.
async fn start(extra: &str, upstream_fields: &str) -> Limited {
    let (upstream, seen) = recording_upstream().await;
    let clock = FakeRelativeClock::default();
    let config = format!("{extra}\n{}", base_config(upstream, upstream_fields));
    let harness = Harness::start_with_clock(&config, LimitClock::Fake(clock.clone())).await;
    Limited { harness, clock, seen }
}

impl Limited {
    async fn call(&self, headers: &[(&'static str, String)]) -> http::Response<hyper::body::Incoming> {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        self.harness.send(mcp_post(&self.harness.url("/mcp/github"), &headers)).await
    }

    async fn statuses(&self, user: &str, n: usize) -> Vec<u16> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.call(&as_user(user)).await.status().as_u16());
        }
        out
    }

    fn upstream_calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

#[tokio::test]
async fn exact_quota_then_refill_over_time() {
    let t = start("rate_limit = { requests = 3, per = \"1m\" }", "").await;
    assert_eq!(t.statuses("alice", 4).await, [200, 200, 200, 429]);
    assert_eq!(t.upstream_calls(), 3, "a limited request never reaches the upstream");
    t.clock.advance(Duration::from_secs(19));
    assert_eq!(t.statuses("alice", 1).await, [429], "one request comes back every 20 s, not sooner");
    t.clock.advance(Duration::from_secs(1));
    assert_eq!(t.statuses("alice", 2).await, [200, 429]);
    t.clock.advance(Duration::from_secs(60));
    assert_eq!(t.statuses("alice", 4).await, [200, 200, 200, 429], "a full window restores the whole burst");
}

#[tokio::test]
async fn burst_is_separate_from_the_sustained_rate() {
    let t = start("rate_limit = { requests = 60, per = \"1m\", burst = 2 }", "").await;
    assert_eq!(t.statuses("bob", 3).await, [200, 200, 429]);
    t.clock.advance(Duration::from_secs(1));
    assert_eq!(t.statuses("bob", 2).await, [200, 429]);
}

#[tokio::test]
async fn one_users_exhaustion_leaves_others_untouched() {
    let t = start("rate_limit = { requests = 2, per = \"1h\" }", "").await;
    assert_eq!(t.statuses("alice", 5).await, [200, 200, 429, 429, 429]);
    assert_eq!(t.statuses("bob", 2).await, [200, 200]);
    assert_eq!(t.statuses("alice", 1).await, [429]);
}

#[tokio::test]
async fn per_user_overrides_and_unlimited() {
    let config = "rate_limit = { requests = 2, per = \"1h\" }";
    let (upstream, _) = recording_upstream().await;
    let shared = base_config(upstream, "")
        .replace("[[users]]\nid = \"alice\"", "[[users]]\nid = \"alice\"\nrate_limit = { requests = 4, per = \"1h\" }")
        .replace("[[users]]\nid = \"bob\"", "[[users]]\nid = \"bob\"\nrate_limit = \"unlimited\"");
    let clock = FakeRelativeClock::default();
    let harness = Harness::start_with_clock(&format!("{config}\n{shared}"), LimitClock::Fake(clock)).await;
    let t = Limited { harness, clock: FakeRelativeClock::default(), seen: Default::default() };
    assert_eq!(t.statuses("alice", 5).await, [200, 200, 200, 200, 429]);
    assert!(t.statuses("bob", 20).await.iter().all(|s| *s == 200));
    assert_eq!(t.statuses("tenant-a-dave", 3).await, [200, 200, 429], "the default applies to others");
}

#[tokio::test]
async fn the_upstream_level_and_the_key_level_apply_too() {
    let t = start("rate_limit = { requests = 100, per = \"1m\" }", "rate_limit = { requests = 2, per = \"1m\" }").await;
    assert_eq!(t.statuses("alice", 3).await, [200, 200, 429]);
    let response = t.call(&as_user("alice")).await;
    let message = json(response).await["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("user_upstream level"), "{message}");
    assert_eq!(t.statuses("bob", 2).await, [200, 200], "the upstream limit is per user");

    // The key level counts every user the key acts as.
    let (upstream, _) = recording_upstream().await;
    let clock = FakeRelativeClock::default();
    let config = base_config(upstream, "")
        .replace("act_as = [\"*\"]", "act_as = [\"*\"]\nrate_limit = { requests = 3, per = \"1m\" }");
    let harness = Harness::start_with_clock(&config, LimitClock::Fake(clock.clone())).await;
    let t = Limited { harness, clock, seen: Default::default() };
    assert_eq!(t.statuses("alice", 2).await, [200, 200]);
    assert_eq!(t.statuses("bob", 2).await, [200, 429]);
    // Other keys are not affected by this key's limit.
    let response = t.call(&[("authorization", format!("Bearer {BOB_KEY}"))]).await;
    assert_eq!(response.status(), 200);
    let mut harness = t.harness;
    let audit = harness.shutdown_and_read_audit().await;
    let limited: Vec<_> = audit.iter().filter(|l| l["reason"] == "rate_limited").collect();
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0]["rate_limit_level"], "key");
    assert_eq!(limited[0]["acting_user"], "bob");
    assert_eq!(limited[0]["status"], 429);
}

#[tokio::test]
async fn refusals_and_successes_carry_honest_headers() {
    let t = start("rate_limit = { requests = 2, per = \"1m\" }", "").await;
    let first = t.call(&as_user("alice")).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["ratelimit-policy"], "\"user\";q=2;w=60");
    assert_eq!(first.headers()["ratelimit"], "\"user\";r=1;t=30");
    let second = t.call(&as_user("alice")).await;
    assert_eq!(second.headers()["ratelimit"], "\"user\";r=0;t=60");

    t.clock.advance(Duration::from_millis(500));
    let refused = t.call(&as_user("alice")).await;
    assert_eq!(refused.status(), 429);
    // 29.5 s to wait: whole seconds, rounded up.
    assert_eq!(refused.headers()["retry-after"], "30");
    assert_eq!(refused.headers()["ratelimit-policy"], "\"user\";q=2;w=60");
    assert_eq!(refused.headers()["ratelimit"], "\"user\";r=0;t=30");
    let answer = json(refused).await;
    assert_eq!(answer["jsonrpc"], "2.0");
    assert_eq!(answer["id"], "call-1");
    assert_eq!(answer["error"]["data"]["code"], "rate_limited");
    assert_eq!(answer["error"]["data"]["retry_after"], 30);

    // A non-JSON-RPC request gets the plain JSON error, with the same headers.
    let request = http::Request::get(t.harness.url("/mcp/github"))
        .header("authorization", format!("Bearer {ENTERPRISE_KEY}"))
        .header("x-alloy-userid", "alice")
        .body(body(""))
        .unwrap();
    let refused = t.harness.send(request).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "30");
    assert_eq!(json(refused).await["error"]["code"], "rate_limited");
}

#[tokio::test]
async fn bad_keys_and_unknown_users_create_no_limiter_state() {
    let t = start("rate_limit = { requests = 2, per = \"1m\" }", "rate_limit = { requests = 2, per = \"1m\" }").await;
    let limits = t.harness.app.as_ref().unwrap().rate_limits().clone();
    for headers in [
        vec![("authorization", "Bearer wrong-key".to_owned())],
        vec![("authorization", format!("Bearer {ENTERPRISE_KEY}")), ("x-alloy-userid", "nobody-known".to_owned())],
        vec![("authorization", format!("Bearer {ENTERPRISE_KEY}")), ("x-alloy-userid", "bad id".to_owned())],
        vec![("authorization", format!("Bearer {BOB_KEY}")), ("x-alloy-userid", "alice".to_owned())],
        vec![("authorization", format!("Bearer {TENANT_KEY}")), ("x-alloy-userid", "tenant-b-erin".to_owned())],
    ] {
        let response = t.call(&headers).await;
        assert!(response.status().is_client_error());
        assert_eq!(limits.tracked(), 0, "{headers:?} created limiter state");
    }
    assert_eq!(t.statuses("alice", 1).await, [200]);
    assert_eq!(limits.tracked(), 2, "one entry at the user level and one at the upstream level");
}

#[tokio::test]
async fn idle_users_are_evicted_and_active_ones_kept() {
    let t = start("rate_limit = { requests = 10, per = \"10s\" }", "").await;
    let limits = t.harness.app.as_ref().unwrap().rate_limits().clone();
    t.statuses("alice", 3).await;
    t.statuses("bob", 3).await;
    assert_eq!(limits.tracked(), 2);
    limits.evict();
    assert_eq!(limits.tracked(), 2, "users whose buckets are not full yet keep their state");
    t.clock.advance(Duration::from_secs(2));
    t.statuses("bob", 3).await;
    t.clock.advance(Duration::from_secs(2));
    limits.evict();
    assert_eq!(limits.tracked(), 1, "alice is full again and forgotten; bob is still being refilled");
    t.clock.advance(Duration::from_secs(10));
    limits.evict();
    assert_eq!(limits.tracked(), 0);
}

#[test]
fn a_reload_keeps_buckets_of_unchanged_quotas() {
    let clock = FakeRelativeClock::default();
    let limits = RateLimits::with_clock(LimitClock::Fake(clock));
    let config = |upstream_quota: u32| {
        let text = format!(
            "rate_limit = {{ requests = 3, per = \"1h\" }}\n[[users]]\nid = \"alice\"\n[upstreams.gh]\nurl = \"http://127.0.0.1:1/\"\ninject = {{ header = \"x\", value = \"{{secret}}\" }}\nrate_limit = {{ requests = {upstream_quota}, per = \"1h\" }}\n"
        );
        Config::from_toml(&text, std::path::Path::new(".")).unwrap()
    };
    let alice = config(5).user("alice").unwrap();
    let user_limit = config(5).user_limit(&alice);
    let request = LimitRequest { key: 0, user: UserId(0), user_limit, upstream: UpstreamId(0) };
    let first = limits.plan(&config(5));
    for _ in 0..2 {
        limits.check(&first, &request).unwrap();
    }
    // Same user quota, new upstream quota: the user bucket carries over, the upstream one starts fresh.
    let second = limits.plan(&config(4));
    let statuses = limits.check(&second, &request).unwrap();
    let remaining: Vec<_> = statuses.iter().map(|s| (s.level.as_str(), s.remaining)).collect();
    assert_eq!(remaining, [("user_upstream", 3), ("user", 0)]);
    let refusal = limits.check(&second, &request).unwrap_err();
    assert_eq!(refusal.level.as_str(), "user");
}

#[tokio::test]
async fn requests_refused_for_one_user_do_not_use_up_the_keys_shared_quota() {
    let (upstream, _) = recording_upstream().await;
    let config = format!(
        "rate_limit = {{ requests = 1, per = \"1h\" }}\n{}",
        base_config(upstream, "")
            .replace("act_as = [\"*\"]", "act_as = [\"*\"]\nrate_limit = { requests = 3, per = \"1h\" }")
    );
    let harness = Harness::start_with_clock(&config, LimitClock::Fake(FakeRelativeClock::default())).await;
    let t = Limited { harness, clock: FakeRelativeClock::default(), seen: Default::default() };
    assert_eq!(t.statuses("alice", 5).await, [200, 429, 429, 429, 429]);
    assert_eq!(t.statuses("bob", 1).await, [200], "alice's refused requests cost the key nothing");
    assert_eq!(t.statuses("tenant-a-dave", 1).await, [200]);
    assert_eq!(t.statuses("carol", 1).await, [429], "the key's 3 are used: alice, bob, dave");
}
