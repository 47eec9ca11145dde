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
    let certs = vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).unwrap();
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
