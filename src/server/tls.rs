//! TLS settings from PEM files: the inbound listener's (rustls, ALPN for HTTP/2 and HTTP/1.1, optionally
//! requiring client certificates) and the certificates both sides read.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The listener's config. With `client_ca_file`, every client must present a certificate that chains to
/// one of its CAs (mutual TLS); the handshake of a client without one fails.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let (certs, key) = identity(cert_file, key_file, ("cert_file", "key_file"))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(path, "client_ca_file")? {
                roots.add(cert).map_err(|e| format!("client_ca_file {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| format!("client_ca_file {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder.with_single_cert(certs, key).map_err(|e| format!("certificate and key do not fit together: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A certificate chain and its private key (a server's, or a client's for mutual TLS); `fields` name
/// the two settings in errors.
pub fn identity(
    cert_file: &Path,
    key_file: &Path,
    fields: (&str, &str),
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let certs = certificates(cert_file, fields.0)?;
    // The error names the file, never its content.
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|e| format!("{} {}: {e}", fields.1, key_file.display()))?;
    Ok((certs, key))
}

/// The PEM certificates in `path` (at least one).
pub fn certificates(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{field} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{field} {}: no certificates found", path.display()));
    }
    Ok(certs)
}
