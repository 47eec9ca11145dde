//! Real TLS on both sides: rustls inbound with ALPN (h2 and http/1.1), and https upstreams verified
//! against a configured CA.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use common::*;
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

struct Cert {
    cert_pem: String,
    key_pem: String,
}

fn self_signed() -> Cert {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    Cert { cert_pem: certified.cert.pem(), key_pem: certified.signing_key.serialize_pem() }
}

type TlsClient = Client<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, TestBody>;

/// A client trusting `cert_pem` that offers h2 and http/1.1 by ALPN, or only http/1.1.
fn client_trusting(cert_pem: &str, offer_h2: bool) -> TlsClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()).unwrap();
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only();
    let connector = if offer_h2 { builder.enable_all_versions().build() } else { builder.enable_http1().build() };
    Client::builder(TokioExecutor::new()).build(connector)
}

#[tokio::test]
async fn inbound_tls_negotiates_h2_and_http1_by_alpn() {
    let (upstream, seen) = recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed();
    std::fs::write(dir.path().join("cert.pem"), &cert.cert_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), &cert.key_pem).unwrap();
    let config = base_config(upstream, "").replacen(
        "[admin]",
        &format!(
            "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[admin]",
            dir.path().join("cert.pem").display(),
            dir.path().join("key.pem").display()
        ),
        1,
    );
    let harness = Harness::start(&config).await;
    let url = format!("https://localhost:{}/mcp/github", harness.addr.port());
    let headers = [("authorization", "Bearer ent-key-0001"), ("x-alloy-userid", "alice")];

    for (offer_h2, version) in [(true, Version::HTTP_2), (false, Version::HTTP_11)] {
        let client = client_trusting(&cert.cert_pem, offer_h2);
        let response = client.request(mcp_post(&url, &headers)).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|s| s.headers["x-forwarded-proto"] == "https" && s.headers["authorization"] == "Bearer cred-alice")
    );
}

/// An https upstream that records the HTTP version and headers of each request.
async fn tls_upstream(cert: &Cert) -> (std::net::SocketAddr, Arc<Mutex<Vec<(Version, http::HeaderMap)>>>) {
    tls_upstream_requiring(cert, None).await
}

/// As [`tls_upstream`]; with `client_ca`, only clients with a certificate that CA issued get through.
async fn tls_upstream_requiring(
    cert: &Cert,
    client_ca: Option<&str>,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<(Version, http::HeaderMap)>>>) {
    let certs = vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => builder.with_client_cert_verifier(verifier(pem)),
    };
    let mut config = builder.with_single_cert(certs, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else { return };
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    record.lock().unwrap().push((req.version(), req.headers().clone()));
                    async { Ok::<_, Infallible>(Response::new(body("{}"))) }
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn https_upstream_is_verified_against_ca_file_and_speaks_h2() {
    let cert = self_signed();
    let (upstream, seen) = tls_upstream(&cert).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &cert.cert_pem).unwrap();
    let trusted = base_config(upstream, &format!("ca_file = \"{}\"", dir.path().join("ca.pem").display()))
        .replace(&format!("http://{upstream}/mcp"), &format!("https://localhost:{}/mcp", upstream.port()));
    let harness = Harness::start(&trusted).await;
    let headers = [("authorization", "Bearer ent-key-0001"), ("x-alloy-userid", "bob")];
    let response = harness.send(mcp_post(&harness.url("/mcp/github"), &headers)).await;
    assert_eq!(response.status(), 200);
    let _ = response.into_body().collect().await;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, Version::HTTP_2, "ALPN should pick h2");
        assert_eq!(seen[0].1["authorization"], "Bearer cred-bob");
    }

    // Without the CA the self-signed upstream is not trusted: nothing is sent to it.
    let untrusted = base_config(upstream, "")
        .replace(&format!("http://{upstream}/mcp"), &format!("https://localhost:{}/mcp", upstream.port()));
    let harness = Harness::start(&untrusted).await;
    let response = harness.send(mcp_post(&harness.url("/mcp/github"), &headers)).await;
    assert_eq!(response.status(), 502);
    assert_eq!(json(response).await["error"]["data"]["code"], "upstream_unavailable");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

fn verifier(ca_pem: &str) -> Arc<dyn rustls::server::danger::ClientCertVerifier> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().unwrap()
}

/// A CA, and a client certificate it issued.
struct ClientPki {
    ca_pem: String,
    client: Cert,
}

fn client_pki() -> ClientPki {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "test client CA");
    let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["client.test".to_owned()]).unwrap();
    params.extended_key_usages.push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let cert = params.signed_by(&key, &ca).unwrap();
    ClientPki { ca_pem: ca.pem(), client: Cert { cert_pem: cert.pem(), key_pem: key.serialize_pem() } }
}

/// A client trusting `server_pem` that presents `client` (or no certificate), over HTTP/2 or HTTP/1.1.
fn client_with_identity(server_pem: &str, client: Option<&Cert>, h2: bool) -> TlsClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(server_pem.as_bytes()).unwrap()).unwrap();
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots);
    let tls = match client {
        None => tls.with_no_client_auth(),
        Some(c) => tls
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap()],
                rustls_pki_types::PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only();
    let connector = if h2 { builder.enable_http2().build() } else { builder.enable_http1().build() };
    Client::builder(TokioExecutor::new()).http2_only(h2).build(connector)
}

#[tokio::test]
async fn with_client_ca_file_only_clients_with_a_certificate_it_issued_are_served() {
    let (upstream, seen) = recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let (server, pki, stranger) = (self_signed(), client_pki(), client_pki());
    let file = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    };
    let tls = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n[admin]",
        file("cert.pem", &server.cert_pem),
        file("key.pem", &server.key_pem),
        file("client-ca.pem", &pki.ca_pem)
    );
    let harness = Harness::start(&base_config(upstream, "").replacen("[admin]", &tls, 1)).await;
    let url = format!("https://localhost:{}/mcp/github", harness.addr.port());
    let headers = [("authorization", "Bearer ent-key-0001"), ("x-alloy-userid", "alice")];

    let response =
        client_with_identity(&server.cert_pem, Some(&pki.client), false).request(mcp_post(&url, &headers)).await;
    assert_eq!(response.unwrap().status(), 200, "a certificate from the CA is served");
    for (who, client) in [("no certificate", None), ("another CA's certificate", Some(&stranger.client))] {
        let response = client_with_identity(&server.cert_pem, client, false).request(mcp_post(&url, &headers)).await;
        assert!(response.is_err(), "{who}: refused in the handshake, got {response:?}");
    }
    assert_eq!(seen.lock().unwrap().len(), 1, "refused clients never reach the upstream");
}

#[tokio::test]
async fn the_proxy_presents_its_client_certificate_to_an_https_upstream() {
    let (server, pki) = (self_signed(), client_pki());
    let (upstream, seen) = tls_upstream_requiring(&server, Some(&pki.ca_pem)).await;
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in
        [("ca.pem", &server.cert_pem), ("client.pem", &pki.client.cert_pem), ("client.key", &pki.client.key_pem)]
    {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    let https = |fields: &str| {
        base_config(upstream, fields)
            .replace(&format!("http://{upstream}/mcp"), &format!("https://localhost:{}/mcp", upstream.port()))
    };
    let d = dir.path().display();
    let with_cert = https(&format!(
        "ca_file = \"{d}/ca.pem\"\nclient_cert_file = \"{d}/client.pem\"\nclient_key_file = \"{d}/client.key\""
    ));
    let headers = [("authorization", "Bearer ent-key-0001"), ("x-alloy-userid", "bob")];
    let harness = Harness::start(&with_cert).await;
    let response = harness.send(mcp_post(&harness.url("/mcp/github"), &headers)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(seen.lock().unwrap().len(), 1);

    // Without it the upstream refuses the handshake: a clean 502, nothing delivered.
    let harness = Harness::start(&https(&format!("ca_file = \"{d}/ca.pem\""))).await;
    let response = harness.send(mcp_post(&harness.url("/mcp/github"), &headers)).await;
    assert_eq!(response.status(), 502);
    assert_eq!(seen.lock().unwrap().len(), 1);

    // Half a pair, or a pair for an http:// upstream, is a config error naming the field.
    let half = https(&format!("ca_file = \"{d}/ca.pem\"\nclient_cert_file = \"{d}/client.pem\""));
    let error =
        mcp_tenant_proxy::config::Config::from_toml(&half, std::path::Path::new(".")).err().unwrap().to_string();
    assert!(error.contains("upstreams.github.client_cert_file"), "{error}");
    let plain =
        base_config(upstream, &format!("client_cert_file = \"{d}/client.pem\"\nclient_key_file = \"{d}/client.key\""));
    let error =
        mcp_tenant_proxy::config::Config::from_toml(&plain, std::path::Path::new(".")).err().unwrap().to_string();
    assert!(error.contains("only used by https"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_holds_on_h2_and_a_reloaded_client_ca_applies_to_new_handshakes() {
    let (upstream, seen) = recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let server = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let server_pem = server.cert.pem();
    let (pki1, pki2) = (client_pki(), client_pki());
    let (ca1, client1, ca2, client2) = (&pki1.ca_pem, &pki1.client, &pki2.ca_pem, &pki2.client);
    std::fs::write(dir.path().join("cert.pem"), &server_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), server.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca1).unwrap();
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
        assert_eq!(status(client_with_identity(&server_pem, Some(client1), h2)).await.unwrap().0, 200, "h2={h2}");
        assert!(status(client_with_identity(&server_pem, None, h2)).await.is_err(), "h2={h2}: no certificate");
        assert!(status(client_with_identity(&server_pem, Some(client2), h2)).await.is_err(), "h2={h2}: other CA");
    }
    let h2 = status(client_with_identity(&server_pem, Some(client1), true)).await.unwrap();
    assert_eq!(h2.1, http::Version::HTTP_2);

    // The CA file is replaced and the app reloads: CA 2's client gets in, CA 1's does not.
    std::fs::write(dir.path().join("ca.pem"), ca2).unwrap();
    let app = harness.app.as_ref().unwrap();
    let next = mcp_tenant_proxy::config::Config::from_toml(&text, std::path::Path::new(".")).unwrap();
    let restart = app.reload(next);
    assert!(!restart.contains(&"server.tls"), "{restart:?}");
    for h2 in [true, false] {
        assert_eq!(status(client_with_identity(&server_pem, Some(client2), h2)).await.unwrap().0, 200, "h2={h2}");
        assert!(
            status(client_with_identity(&server_pem, Some(client1), h2)).await.is_err(),
            "h2={h2}: old CA after reload"
        );
        assert!(status(client_with_identity(&server_pem, None, h2)).await.is_err(), "h2={h2}: none after reload");
    }
    assert_eq!(seen.lock().unwrap().len(), 5, "refused handshakes never reach the upstream");
}
