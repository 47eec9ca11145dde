//! What Kubernetes does to a running proxy: mounted Secrets change in place (a `..data` symlink swapped
//! to a new directory) and cert-manager rotates the TLS certificate. The binary notices, reloads, and
//! keeps what is open; a broken file keeps the running config and says so in a metric.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use http::{Request, StatusCode};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

struct Cert {
    der: Vec<u8>,
    cert_pem: String,
    key_pem: String,
}

fn self_signed() -> Cert {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    Cert { der: c.cert.der().to_vec(), cert_pem: c.cert.pem(), key_pem: c.signing_key.serialize_pem() }
}

/// Writes a mounted Secret's files the way the kubelet does: into a new directory, then one atomic
/// swap of the `..data` symlink that the visible names point through.
fn publish(dir: &Path, version: u32, files: &[(&str, &str)]) {
    let target = dir.join(format!("..v{version}"));
    std::fs::create_dir(&target).unwrap();
    for (name, content) in files {
        std::fs::write(target.join(name), content).unwrap();
        let visible = dir.join(name);
        if !visible.exists() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &visible).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&target, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

/// One TLS connection to the proxy (HTTP/1.1), and the certificate the proxy presented on it.
async fn connect(addr: std::net::SocketAddr, trusted: &[&Cert]) -> (SendRequest<TestBody>, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let presented = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    (send, presented)
}

async fn call(send: &mut SendRequest<TestBody>, key: &str) -> StatusCode {
    send.ready().await.unwrap();
    let request = mcp_post("/mcp/github", &[("authorization", &format!("Bearer {key}")), ("host", "localhost")]);
    let (mut parts, body) = request.into_parts();
    parts.uri = "/mcp/github".parse().unwrap();
    let response = send.send_request(Request::from_parts(parts, body)).await.unwrap();
    let status = response.status();
    let _ = http_body_util::BodyExt::collect(response.into_body()).await;
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_secrets_and_the_certificate_rotate_without_a_restart() {
    let (upstream, seen) = recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let (a, b) = (self_signed(), self_signed());
    publish(
        &secrets,
        1,
        &[("tls.crt", &a.cert_pem), ("tls.key", &a.key_pem), ("api-key", "key-one-0001\n"), ("cred", "cred-one\n")],
    );
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
[server.tls]
cert_file = "secrets/tls.crt"
key_file = "secrets/tls.key"
[admin]
listen = "127.0.0.1:0"
[audit]
path = "audit.log"
[[keys]]
id = "alice-key"
kind = "standard"
user = "alice"
secret_file = "secrets/api-key"
[[users]]
id = "alice"
[upstreams.github]
url = "http://{upstream}/mcp"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
[[credentials]]
user = "alice"
upstream = "github"
secret_file = "secrets/cred"
"#
        ),
    )
    .unwrap();
    let proxy = Running::spawn(&config, &dir.path().join("proxy.log"));

    let (mut old, presented) = connect(proxy.proxy, &[&a, &b]).await;
    assert_eq!(presented, a.der);
    assert_eq!(call(&mut old, "key-one-0001").await, StatusCode::OK);

    publish(
        &secrets,
        2,
        &[("tls.crt", &b.cert_pem), ("tls.key", &b.key_pem), ("api-key", "key-two-0002\n"), ("cred", "cred-two\n")],
    );
    wait_for_metric(proxy.admin, "mcp_proxy_config_reloads_total{result=\"ok\"}", 1.0).await;

    // New handshakes get the new certificate; the key and credential are the new ones.
    let (mut new, presented) = connect(proxy.proxy, &[&a, &b]).await;
    assert_eq!(presented, b.der, "a new handshake sees the new certificate");
    assert_eq!(call(&mut new, "key-two-0002").await, StatusCode::OK);
    assert_eq!(call(&mut new, "key-one-0001").await, StatusCode::UNAUTHORIZED, "the old key is gone");
    // The connection opened before the rotation goes on.
    assert_eq!(call(&mut old, "key-two-0002").await, StatusCode::OK, "an open connection keeps working");
    let creds: Vec<_> = seen.lock().unwrap().iter().map(|s| s.headers["authorization"].clone()).collect();
    assert_eq!(creds, ["Bearer cred-one", "Bearer cred-two", "Bearer cred-two"]);

    // A broken file: the running config stays, and the metric says the reload failed.
    publish(
        &secrets,
        3,
        &[("tls.crt", &b.cert_pem), ("tls.key", "not a key"), ("api-key", "key-two-0002\n"), ("cred", "cred-two\n")],
    );
    wait_for_metric(proxy.admin, "mcp_proxy_config_last_reload_ok", 0.0).await;
    assert_eq!(metric(proxy.admin, "mcp_proxy_config_reloads_total{result=\"error\"}").await, Some(1.0));
    let (mut after, presented) = connect(proxy.proxy, &[&a, &b]).await;
    assert_eq!(presented, b.der);
    assert_eq!(call(&mut after, "key-two-0002").await, StatusCode::OK, "the last good config serves");
    let log = std::fs::read_to_string(dir.path().join("proxy.log")).unwrap();
    assert!(log.contains("config not reloaded") && log.contains("key_file"), "{log}");

    // Fixed: it reloads again by itself.
    publish(
        &secrets,
        4,
        &[("tls.crt", &a.cert_pem), ("tls.key", &a.key_pem), ("api-key", "key-two-0002\n"), ("cred", "cred-two\n")],
    );
    wait_for_metric(proxy.admin, "mcp_proxy_config_last_reload_ok", 1.0).await;
    let (_, presented) = connect(proxy.proxy, &[&a, &b]).await;
    assert_eq!(presented, a.der);
}
