//! The pooled upstream client and the forwarding call.

use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::ProxyBody;
use super::headers::strip_hop_by_hop;
use crate::config::Upstream;
use crate::error::ProxyError;
use crate::telemetry::metrics::{Metrics, OpenStream};

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

/// The proxy's own calls (token endpoints, provider metadata, key sets; never a client's request):
/// `request` sent with `client`, its answer's status and body read whole, at most `max_bytes`, all
/// within `timeout`. The body's own failure (too long, cut, too slow) comes apart from the call's,
/// so a caller that only needs the status (a 404) is not failed by it. Errors are plain text.
pub async fn call_bounded(
    client: &UpstreamClient,
    request: Request<ProxyBody>,
    max_bytes: usize,
    timeout: Duration,
) -> Result<(http::StatusCode, Result<bytes::Bytes, String>), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let late = || format!("no answer within {timeout:?}");
    let response = tokio::time::timeout_at(deadline, client.request(request)).await.map_err(|_| late())?;
    let response = response.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), max_bytes).collect();
    let body = match tokio::time::timeout_at(deadline, body).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(late()),
    };
    Ok((status, body))
}

/// One pooled client per upstream: `http://` (HTTP/1.1, or HTTP/2 with prior knowledge) and `https://`
/// (rustls, HTTP/2 or HTTP/1.1 by ALPN; webpki roots plus `ca_file`; with `client_identity` (certificate
/// and key files) the proxy presents that certificate to the upstream: mutual TLS).
pub fn build_client(
    connect_timeout: Duration,
    http2_prior_knowledge: bool,
    ca_file: Option<&Path>,
    client_identity: Option<(&Path, &Path)>,
) -> Result<UpstreamClient, String> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = ca_file {
        for cert in crate::server::tls::certificates(path, "ca_file")? {
            roots.add(cert).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        }
    }
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots);
    let tls = match client_identity {
        None => tls.with_no_client_auth(),
        Some((cert, key)) => {
            let (certs, key) = crate::server::tls::identity(cert, key, ("client_cert_file", "client_key_file"))?;
            tls.with_client_auth_cert(certs, key)
                .map_err(|e| format!("client_cert_file and client_key_file do not fit together: {e}"))?
        }
    };

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .http2_only(http2_prior_knowledge)
        .build(connector))
}

/// Sends the rewritten request. Only the wait for the response head is timed: an SSE stream may stay
/// open for as long as the client keeps it. Returns the error detail for the log alongside the error.
/// The wait for a response head that arrives is `mcp_proxy_upstream_latency_seconds`.
pub async fn send(
    upstream: &Upstream,
    request: Request<ProxyBody>,
    metrics: &Metrics,
) -> Result<Response<Incoming>, (ProxyError, String)> {
    let started = Instant::now();
    match tokio::time::timeout(upstream.response_header_timeout, upstream.client.request(request)).await {
        Err(_) => Err((
            ProxyError::UpstreamTimeout,
            format!("no response head within {:?}", upstream.response_header_timeout),
        )),
        Ok(Err(e)) => Err((ProxyError::UpstreamUnavailable, error_chain(&e))),
        Ok(Ok(response)) => {
            metrics.observe_upstream_latency(&upstream.name, started.elapsed());
            Ok(response)
        }
    }
}

/// The upstream's answer as the client's: hop-by-hop headers dropped, body streamed frame by frame. The
/// body counts in `mcp_proxy_open_streams` until it is dropped: sent to the end, or the client went away.
pub fn into_client_response(response: Response<Incoming>, metrics: &Metrics) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    super::headers::strip_flow_set_cookies(&mut parts.headers);
    let body = Counted { inner: body, _open: metrics.stream_opened() };
    Response::from_parts(parts, body.map_err(Into::into).boxed())
}

/// A response body that is an open stream for as long as it lives.
struct Counted<B> {
    inner: B,
    _open: OpenStream,
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        out.push_str(": ");
        out.push_str(&err.to_string());
        source = err.source();
    }
    out
}
