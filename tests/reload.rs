//! Config reload: atomic swap, users keep their ids and rate-limit buckets, bad configs are refused.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use governor::clock::FakeRelativeClock;
use mcp_tenant_proxy::policy::ratelimit::LimitClock;

fn config(upstream: std::net::SocketAddr, users: &str, extra_creds: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[[keys]]
id = "ent"
kind = "enterprise"
secret = "{ENTERPRISE_KEY}"
user = "svc"
act_as = ["*"]
{users}
[upstreams.github]
url = "http://{upstream}/mcp"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
[[credentials]]
user = "alice"
upstream = "github"
secret = "cred-alice"
[[credentials]]
user = "bob"
upstream = "github"
secret = "cred-bob"
{extra_creds}
"#
    )
}

#[tokio::test]
async fn reload_keeps_unchanged_buckets_and_applies_everything_else() {
    let (upstream, seen) = recording_upstream().await;
    let before = config(
        upstream,
        "[[users]]\nid = \"alice\"\nrate_limit = { requests = 3, per = \"1h\" }\n[[users]]\nid = \"bob\"\nrate_limit = { requests = 3, per = \"1h\" }\n[[users]]\nid = \"carol\"",
        "[[credentials]]\nuser = \"carol\"\nupstream = \"github\"\nsecret = \"cred-carol\"",
    );
    let mut harness = Harness::start_with_clock(&before, LimitClock::Fake(FakeRelativeClock::default())).await;
    let call = |user: &'static str| {
        let url = harness.url("/mcp/github");
        let client = harness.client.clone();
        async move {
            let headers = [("authorization", "Bearer ent-key-0001"), ("x-alloy-userid", user)];
            client.request(mcp_post(&url, &headers)).await.unwrap().status().as_u16()
        }
    };
    assert_eq!([call("alice").await, call("alice").await], [200, 200]);
    assert_eq!([call("bob").await, call("bob").await, call("bob").await, call("bob").await], [200, 200, 200, 429]);
    assert_eq!(call("carol").await, 200);

    // A new user listed first (so every position shifts), alice unchanged, bob with a new quota, carol gone.
    let after = config(
        upstream,
        "[[users]]\nid = \"zara\"\n[[users]]\nid = \"alice\"\nrate_limit = { requests = 3, per = \"1h\" }\n[[users]]\nid = \"bob\"\nrate_limit = { requests = 5, per = \"1h\" }",
        "[[credentials]]\nuser = \"zara\"\nupstream = \"github\"\nsecret = \"cred-zara\"",
    );
    let app = harness.app.as_ref().unwrap();
    let next = app.config().reload_from_toml(&after, std::path::Path::new(".")).unwrap();
    // The harness wrote its audit trail to a file; this text leaves [audit] out, which a reload cannot apply.
    assert_eq!(app.reload(next), ["audit.path"]);

    assert_eq!([call("alice").await, call("alice").await], [200, 429], "alice's bucket carried over");
    let bob: Vec<u16> = futures_statuses(&call, "bob", 6).await;
    assert_eq!(bob, [200, 200, 200, 200, 200, 429], "bob's new quota starts a fresh bucket");
    assert_eq!(call("carol").await, 403, "a removed user no longer exists");
    assert_eq!(call("zara").await, 200);
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.headers["authorization"], "Bearer cred-zara");

    // A broken config is refused whole; the running one stays.
    let app = harness.app.as_ref().unwrap();
    assert!(app.config().reload_from_toml("[server]\nlisten = \"nope\"\n", std::path::Path::new(".")).is_err());
    assert_eq!(call("zara").await, 200);
    let audit = harness.shutdown_and_read_audit().await;
    assert_eq!(audit.iter().filter(|l| l["reason"] == "unknown_user").count(), 1);
}

async fn futures_statuses<F, Fut>(call: &F, user: &'static str, n: usize) -> Vec<u16>
where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(call(user).await);
    }
    out
}

#[tokio::test]
async fn sighup_reloads_the_config_file_of_the_running_binary() {
    let (upstream, seen) = recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config(upstream, "[[users]]\nid = \"alice\"\n[[users]]\nid = \"bob\"", "")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcp-tenant-proxy"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let wait_for = |stderr: &mut BufReader<std::process::ChildStderr>, needle: &str| -> String {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "exited before logging {needle:?}");
            if line.contains(needle) {
                return line.clone();
            }
        }
    };
    let line = wait_for(&mut stderr, "proxy_addr=");
    let addr = line.split("proxy_addr=").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<TestBody>();
    let url = format!("http://{addr}/mcp/github");
    let headers = [("authorization", "Bearer ent-key-0001"), ("x-alloy-userid", "alice")];
    assert_eq!(client.request(mcp_post(&url, &headers)).await.unwrap().status(), 200);

    // Rotate alice's credential in the file, then SIGHUP.
    std::fs::write(
        &path,
        config(upstream, "[[users]]\nid = \"alice\"\n[[users]]\nid = \"bob\"", "")
            .replace("cred-alice", "cred-alice-rotated"),
    )
    .unwrap();
    assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    let mut stderr = tokio::task::spawn_blocking(move || {
        wait_for(&mut stderr, "config reloaded");
        stderr
    })
    .await
    .unwrap();
    assert_eq!(client.request(mcp_post(&url, &headers)).await.unwrap().status(), 200);
    assert_eq!(seen.lock().unwrap().last().unwrap().headers["authorization"], "Bearer cred-alice-rotated");

    // A broken file is refused and the proxy keeps serving with the last good config.
    std::fs::write(&path, "[server]\nlisten = 5\n").unwrap();
    assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    tokio::task::spawn_blocking(move || wait_for(&mut stderr, "config not reloaded")).await.unwrap();
    assert_eq!(client.request(mcp_post(&url, &headers)).await.unwrap().status(), 200);
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_deleted_user_who_comes_back_starts_with_fresh_limits() {
    let (upstream, _) = recording_upstream().await;
    let users = "[[users]]\nid = \"alice\"\nrate_limit = { requests = 2, per = \"1h\" }\n[[users]]\nid = \"bob\"";
    let with_alice = config(upstream, users, "");
    let harness = Harness::start_with_clock(&with_alice, LimitClock::Fake(FakeRelativeClock::default())).await;
    let call = || {
        let headers = [("authorization", "Bearer ent-key-0001"), ("x-alloy-userid", "alice")];
        harness.send(mcp_post(&harness.url("/mcp/github"), &headers))
    };
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(call().await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
    let app = harness.app.as_ref().unwrap();
    let without = config(upstream, "[[users]]\nid = \"bob\"", "")
        .replace("[[credentials]]\nuser = \"alice\"\nupstream = \"github\"\nsecret = \"cred-alice\"\n", "");
    app.reload(app.config().reload_from_toml(&without, std::path::Path::new(".")).unwrap());
    assert_eq!(call().await.status(), 403, "deleted");
    app.reload(app.config().reload_from_toml(&with_alice, std::path::Path::new(".")).unwrap());
    assert_eq!(call().await.status(), 200, "re-created: her old, exhausted bucket is not hers any more");
}
