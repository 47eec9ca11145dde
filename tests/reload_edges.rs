//! The edges of reloading a running proxy (found by an attacker review): a secret that arrives after
//! the config naming it, a file changed while a reload is loading, SIGTERM during a slow reload, a
//! changed store password, and mutual TLS over HTTP/2 with a client CA swapped by a reload.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use http::{HeaderMap, HeaderValue, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mcp_tenant_proxy::config::watch::FileWatch;
use mcp_tenant_proxy::telemetry::trace::TraceContext;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

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

/// A rewrite in place that keeps the size, with the mtime put back (`cp -p`, `tar x`, `rsync -t
/// --inplace`), is noticed: the ctime, which user space cannot set, changed. (The pause lets the
/// kernel's coarse clock, which stamps ctime, move on.)
#[test]
fn a_same_size_rewrite_with_the_same_mtime_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api-key");
    std::fs::write(&file, "key-one-0001").unwrap();
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    let mut watch = FileWatch::new(vec![file.clone()]);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&file, "key-two-0002").unwrap();
    std::fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
    let reported = (0..3).any(|_| watch.poll());
    assert!(reported, "new content, same inode/len/mtime: the change is missed");
}

/// A traceparent of a later version may carry more fields, with bytes >= 0x80 (valid in a header
/// value): it is forwarded as it came, and the audit line and log span still get its trace id.
#[test]
fn a_forwarded_future_version_traceparent_keeps_its_trace_id() {
    let mut headers = HeaderMap::new();
    let value = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-\xe9t\xe9";
    headers.insert("traceparent", HeaderValue::from_bytes(value).unwrap());
    let trace = TraceContext::from_headers(&headers);
    let mut out = HeaderMap::new();
    trace.apply(&mut out);
    assert_eq!(out["traceparent"].as_bytes(), value, "forwarded as it came");
    assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736", "the audit line's trace id");
}

// ---- mutual TLS over HTTP/2, and a client CA swapped by a reload ----

struct Cert {
    cert_pem: String,
    key_pem: String,
}

fn ca_and_client() -> (String, Cert) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "test client CA");
    let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["client.test".to_owned()]).unwrap();
    params.extended_key_usages.push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let cert = params.signed_by(&key, &ca).unwrap();
    (ca.pem(), Cert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

type TlsClient = Client<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, TestBody>;

fn client(server_pem: &str, identity: Option<&Cert>, h2: bool) -> TlsClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(server_pem.as_bytes()).unwrap()).unwrap();
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots);
    let tls = match identity {
        None => tls.with_no_client_auth(),
        Some(c) => tls
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap()],
                rustls_pki_types::PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let b = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only();
    let connector = if h2 { b.enable_http2().build() } else { b.enable_http1().build() };
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(h2);
    builder.build(connector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_holds_on_h2_and_a_reloaded_client_ca_applies_to_new_handshakes() {
    let (upstream, seen) = recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let server = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let server_pem = server.cert.pem();
    let (ca1, client1) = ca_and_client();
    let (ca2, client2) = ca_and_client();
    std::fs::write(dir.path().join("cert.pem"), &server_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), server.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca1).unwrap();
    let d = dir.path().display();
    let tls = format!(
        "[server.tls]\ncert_file = \"{d}/cert.pem\"\nkey_file = \"{d}/key.pem\"\nclient_ca_file = \"{d}/ca.pem\"\n[admin]"
    );
    let text = base_config(upstream, "").replacen("[admin]", &tls, 1);
    let harness = Harness::start(&text).await;
    let url = format!("https://localhost:{}/mcp/github", harness.addr.port());
    let headers = [("authorization", "Bearer ent-key-0001"), ("x-alloy-userid", "alice")];
    let status = |c: TlsClient| {
        let request = mcp_post(&url, &headers);
        async move { c.request(request).await.map(|r| (r.status(), r.version())).map_err(|e| format!("{e:?}")) }
    };
    for h2 in [true, false] {
        assert_eq!(status(client(&server_pem, Some(&client1), h2)).await.unwrap().0, 200, "h2={h2}");
        assert!(status(client(&server_pem, None, h2)).await.is_err(), "h2={h2}: no certificate");
        assert!(status(client(&server_pem, Some(&client2), h2)).await.is_err(), "h2={h2}: other CA");
    }
    let h2 = status(client(&server_pem, Some(&client1), true)).await.unwrap();
    assert_eq!(h2.1, http::Version::HTTP_2);

    // The CA file is replaced and the app reloads: CA 2's client gets in, CA 1's does not.
    std::fs::write(dir.path().join("ca.pem"), &ca2).unwrap();
    let app = harness.app.as_ref().unwrap();
    let next = mcp_tenant_proxy::config::Config::from_toml(&text, Path::new(".")).unwrap();
    let restart = app.reload(next);
    assert!(!restart.contains(&"server.tls"), "{restart:?}");
    for h2 in [true, false] {
        assert_eq!(status(client(&server_pem, Some(&client2), h2)).await.unwrap().0, 200, "h2={h2}");
        assert!(status(client(&server_pem, Some(&client1), h2)).await.is_err(), "h2={h2}: old CA after reload");
        assert!(status(client(&server_pem, None, h2)).await.is_err(), "h2={h2}: none after reload");
    }
    assert_eq!(seen.lock().unwrap().len(), 5, "refused handshakes never reach the upstream");
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
