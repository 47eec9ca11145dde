//! The edges of reloading a running proxy (found by an attacker review): a secret that arrives after
//! the config naming it, a file changed while a reload is loading, SIGTERM during a slow reload, a
//! changed store password.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

fn plain() -> Client<hyper_util::client::legacy::connect::HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn call(proxy: std::net::SocketAddr, key: &str) -> StatusCode {
    let url = format!("http://{proxy}/mcp/github");
    plain().request(mcp_post(&url, &[("authorization", &format!("Bearer {key}"))])).await.unwrap().status()
}

/// Polls `call` until it answers `want` or `within` passes.
async fn eventually(proxy: std::net::SocketAddr, key: &str, want: StatusCode, within: Duration) -> StatusCode {
    let deadline = Instant::now() + within;
    loop {
        let got = call(proxy, key).await;
        if got == want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn config(upstream: std::net::SocketAddr, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[audit]
path = "audit.log"
{extra}
[[keys]]
id = "alice-key"
kind = "standard"
user = "alice"
secret_file = "api-key"
[[users]]
id = "alice"
[[users]]
id = "bob"
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
"#
    )
}

/// Kubernetes projects a ConfigMap and a Secret on separate volumes, updated at different times: the
/// config that names a new secret file can arrive before the file. That reload fails (rightly), and the
/// file's arrival later reloads, though no config in force names it yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_named_only_by_a_config_that_failed_to_load_is_watched_too() {
    let (upstream, _seen) = recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api-key"), "key-one-0001\n").unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config(upstream, "")).unwrap();
    let proxy = Running::spawn(&path, &dir.path().join("proxy.log"));
    assert_eq!(call(proxy.proxy, "key-one-0001").await, StatusCode::OK);

    let bob = "[[keys]]\nid = \"bob-key\"\nkind = \"standard\"\nuser = \"bob\"\nsecret_file = \"bob-key\"\n";
    std::fs::write(&path, config(upstream, "") + bob).unwrap();
    wait_for_metric(proxy.admin, "mcp_proxy_config_last_reload_ok", 0.0).await;
    // The Secret volume catches up.
    std::fs::write(dir.path().join("bob-key"), "key-bob-0002\n").unwrap();
    let got = eventually(proxy.proxy, "key-bob-0002", StatusCode::OK, Duration::from_secs(8)).await;
    assert_eq!(got, StatusCode::OK, "bob's key file appeared 8 s ago and was never loaded");
}

/// A file that changes while a reload is being built (a big store takes seconds; here the reload waits
/// on a write lock held on the SQLite store) is reloaded after it, not taken as already loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_a_reload_is_loading_is_not_lost() {
    let (upstream, _seen) = recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api-key"), "key-one-0001\n").unwrap();
    std::fs::write(dir.path().join("master.key"), format!("{}\n", "A".repeat(43) + "=")).unwrap();
    let store = "[store]\npath = \"store.db\"\nmaster_key_file = \"master.key\"\n";
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config(upstream, store)).unwrap();
    let log = dir.path().join("proxy.log");
    let proxy = Running::spawn(&path, &log);
    assert_eq!(call(proxy.proxy, "key-one-0001").await, StatusCode::OK);

    // Hold the store's write lock, and start a reload that waits on it.
    let db = rusqlite::Connection::open(dir.path().join("store.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    signal(&proxy, "-HUP");
    logged(&log, "reloading the config").await;
    // The key is rotated while that reload waits (it read the old key already).
    std::fs::write(dir.path().join("api-key"), "key-two-0002\n").unwrap();
    db.execute_batch("COMMIT").unwrap();
    let got = eventually(proxy.proxy, "key-two-0002", StatusCode::OK, Duration::from_secs(10)).await;
    let log = proxy.stop();
    assert_eq!(got, StatusCode::OK, "the rotated key was never loaded; log:\n{log}");
}

fn signal(proxy: &Running, which: &str) {
    let pid = proxy.child.id().to_string();
    assert!(std::process::Command::new("kill").args([which, &pid]).status().unwrap().success());
}

/// Waits (10 s at most) until the proxy's log has a line containing `text`.
async fn logged(log: &Path, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(log).unwrap_or_default().contains(text) {
        assert!(Instant::now() < deadline, "never logged {text:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A rotated store password is refused until a restart: the store opened at start (admin API, usage
/// flusher, change listener) would go on with the old one, so a reload that said "ok" would be a lie.
#[test]
fn a_changed_store_password_is_refused_until_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let write = |password: &str| {
        std::fs::write(dir.path().join("pg-password"), password).unwrap();
        let text = "[server]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"postgres://proxy@127.0.0.1:9/proxy\"\npassword_file = \"pg-password\"\n";
        std::fs::write(dir.path().join("proxy.toml"), text).unwrap();
        mcp_tenant_proxy::config::Config::from_file(&dir.path().join("proxy.toml")).unwrap()
    };
    let running = write("old-password");
    write("new-password");
    let refused = mcp_tenant_proxy::config::Config::load(&dir.path().join("proxy.toml"), Some(&running));
    let error = refused.err().expect("refused").to_string();
    assert!(error.contains("needs a restart") && error.contains("password"), "{error}");
    assert!(!error.contains("new-password") && !error.contains("old-password"), "{error}");
}

/// SIGTERM is not held up by a reload that hangs (here on reading a secret file that is a FIFO nobody
/// writes; in production, a store that does not answer): the pod's grace period would run out, with
/// audit lines unwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_not_held_up_by_a_reload_in_progress() {
    let (upstream, _seen) = recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api-key"), "key-one-0001\n").unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config(upstream, "")).unwrap();
    let log = dir.path().join("proxy.log");
    let mut proxy = Running::spawn(&path, &log);
    assert_eq!(call(proxy.proxy, "key-one-0001").await, StatusCode::OK);
    assert!(std::process::Command::new("mkfifo").arg(dir.path().join("hangs")).status().unwrap().success());
    let bob = "[[keys]]\nid = \"bob-key\"\nkind = \"standard\"\nuser = \"bob\"\nsecret_file = \"hangs\"\n";
    std::fs::write(&path, config(upstream, "") + bob).unwrap();
    signal(&proxy, "-HUP");
    logged(&log, "reloading the config").await;
    signal(&proxy, "-TERM");
    let sent = Instant::now();
    let exited = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break Some((status, sent.elapsed()));
        }
        if sent.elapsed() > Duration::from_secs(5) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let log = proxy.stop();
    let (status, took) = exited.unwrap_or_else(|| panic!("still running 5 s after SIGTERM; log:\n{log}"));
    assert!(status.success() && took < Duration::from_secs(3), "{status} after {took:?}; log:\n{log}");
}
