//! The accept loop: plain TCP or TLS, HTTP/1.1 and HTTP/2 (h2c prior knowledge, or ALPN over TLS), with
//! a header-read timeout against slowloris and a bound on header bytes. On shutdown it stops accepting,
//! lets in-flight requests finish within the grace period, then drops what is left.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::proxy::Peer;
use crate::proxy::body::ProxyBody;

pub struct ListenerSettings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
}

pub async fn serve<H, F>(
    listener: TcpListener,
    settings: ListenerSettings,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>, Peer) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        // hyper answers 431 itself past this; the pipeline applies the exact limit.
        .max_buf_size(settings.max_header_bytes.max(8192) + 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let tls = settings.tls.map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();

    // At most `max_connections` at once: past that, new connections wait in the kernel's backlog.
    let slots = Arc::new(Semaphore::new(settings.max_connections));

    loop {
        while connections.try_join_next().is_some() {}
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            _ = shutdown.changed() => break,
        };
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let peer = Peer { addr, tls: tls.is_some() };
        let handler = handler.clone();
        let started = Arc::new(AtomicBool::new(false));
        let first_request = started.clone();
        let service = service_fn(move |request| {
            first_request.store(true, Ordering::Relaxed);
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(request, peer).await) }
        });
        let deadline = settings.header_read_timeout;
        match &tls {
            None => {
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
                connections.spawn(async move {
                    tokio::select! {
                        _ = conn => {}
                        _ = no_request_within(deadline, &started) => {}
                    }
                    drop(slot);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let timeout = settings.header_read_timeout;
                connections.spawn(async move {
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let conn =
                                watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
                            tokio::select! {
                                _ = conn => {}
                                _ = no_request_within(deadline, &started) => {}
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                    drop(slot);
                });
            }
        }
    }

    drop(listener);
    if tokio::time::timeout(settings.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(grace = ?settings.shutdown_grace, "shutdown grace period over; closing remaining connections");
    }
    connections.shutdown().await;
}

/// Resolves when `deadline` has passed and no request has begun on the connection, which is then closed.
/// hyper's header-read timeout starts only once it knows the protocol, and telling HTTP/1 from HTTP/2
/// waits for the first bytes: a client that sends nothing, or half an HTTP/2 preface, would otherwise
/// hold the socket forever.
async fn no_request_within(deadline: Duration, started: &AtomicBool) {
    tokio::time::sleep(deadline).await;
    if started.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
    tracing::debug!("closed a connection that sent no request in time");
}

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}
