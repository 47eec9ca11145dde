//! The accept loop: plain TCP or TLS, HTTP/1.1 and HTTP/2 (h2c prior knowledge, or ALPN over TLS), with
//! a header-read timeout against slowloris, a bound on header bytes, caps on open connections (in all and
//! per client address) and an idle timeout ([`conn`]). On shutdown it stops accepting, ends event streams
//! ([`drain`]), lets in-flight requests finish within the grace period, then drops what is left.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::conn::{self, Requests, Timing, Tracked};
use super::drain;
use crate::proxy::Peer;
use crate::proxy::body::ProxyBody;

pub struct ListenerSettings {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    /// Read at each accept: a reload swaps in a new certificate (or client CA) for new handshakes, and
    /// connections already open go on with the one they began with.
    pub tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    /// 0: no cap per client address.
    pub max_connections_per_ip: usize,
    /// Set to the number of connections this listener holds (`mcp_proxy_connections`).
    pub connections: Gauge,
    /// The connections past their first bytes (or TLS handshake), which hold hyper's buffers: what the
    /// heap trim watches. A silent connection holds next to nothing, so opening many cannot force a trim.
    pub speaking: Gauge,
}

pub async fn serve<H, F>(listener: TcpListener, settings: ListenerSettings, handler: H, shutdown: CancellationToken)
where
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
        // What a client may send before the proxy reads it: bodies wait until their caller is judged, and
        // the windows bound what waits in h2's buffers meanwhile (hyper's default is 1 MiB a connection).
        // MCP bodies are small; 64 KiB is the protocol's own default per stream.
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(256 * 1024)
        // Pings find dead peers; they do not keep a connection from being idle (see `conn`).
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builders = Arc::new(Builders::new(builder));
    let tls = settings.tls;
    let timing = Timing {
        first_request: settings.header_read_timeout,
        closing: settings.header_read_timeout,
        idle: settings.idle_timeout,
    };
    let per_ip = (settings.max_connections_per_ip > 0).then(|| Arc::new(PerIp::new(settings.max_connections_per_ip)));
    let (gauge, speaking) = (settings.connections, settings.speaking);
    // Every connection task, reaped as soon as it ends: its count is the number of open connections.
    let mut connections = JoinSet::new();

    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next() => {
                gauge.set(connections.len() as i64);
                continue;
            }
            // At most `max_connections` at once: past that, new connections wait in the listen backlog.
            accepted = listener.accept(), if connections.len() < settings.max_connections => accepted,
        };
        let (stream, addr) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Usually EMFILE: back off briefly instead of spinning on the error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip_slot = match &per_ip {
            None => None,
            Some(per_ip) => match per_ip.admit(client_group(addr.ip())) {
                Some(slot) => Some(slot),
                None => {
                    tracing::debug!(%addr, "closed a connection past max_connections_per_ip");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let peer = Peer { addr, tls: tls.is_some() };
        let requests = Requests::default();
        let service = {
            let (handler, requests, shutdown) = (handler.clone(), requests.clone(), shutdown.clone());
            service_fn(move |request: Request<Incoming>| {
                let in_flight = requests.begin();
                let (handler, shutdown) = (handler.clone(), shutdown.clone());
                async move {
                    let method = request.method().clone();
                    let mut response = handler(request, peer).await;
                    if drain::ends_at_shutdown(&method, response.headers()) {
                        response = response.map(|body| drain::end_at_shutdown(body, shutdown));
                    }
                    Ok::<_, Infallible>(response.map(|body| Tracked::new(body, in_flight)))
                }
            })
        };
        let (builders, shutdown, speaking) = (builders.clone(), shutdown.clone(), speaking.clone());
        let tls = tls.as_ref().map(|tls| TlsAcceptor::from(tls.load_full()));
        let (first_request, tls_on) = (settings.header_read_timeout, tls.is_some());
        connections.spawn(async move {
            let _ip_slot = ip_slot;
            // Until the client has said which protocol it speaks (its first bytes, or its TLS handshake),
            // header_read_timeout or a shutdown ends the connection; from then on, `conn::drive` does,
            // with what is left of that period for the first request.
            let accepted = tokio::time::Instant::now();
            let opened = async {
                match tls {
                    None => {
                        let mut first = [0u8; H2_PREFACE.len()];
                        let n = stream.peek(&mut first).await?;
                        Ok::<_, std::io::Error>((builders.plain(&first[..n]), Io::Plain(stream)))
                    }
                    Some(acceptor) => {
                        let stream = acceptor.accept(stream).await?;
                        let builder = builders.negotiated(stream.get_ref().1.alpn_protocol());
                        Ok((builder, Io::Tls(Box::new(stream))))
                    }
                }
            };
            let opened = tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                opened = tokio::time::timeout(first_request, opened) => opened,
            };
            let timing = Timing { first_request: first_request.saturating_sub(accepted.elapsed()), ..timing };
            match opened {
                Ok(Ok((builder, Io::Plain(stream)))) => {
                    let _speaking = Speaking::new(&speaking);
                    let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    conn::drive(conn, requests, timing, shutdown).await;
                }
                Ok(Ok((builder, Io::Tls(stream)))) => {
                    let _speaking = Speaking::new(&speaking);
                    let conn = builder.serve_connection(TokioIo::new(*stream), service).into_owned();
                    conn::drive(conn, requests, timing, shutdown).await;
                }
                Ok(Err(e)) if tls_on => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "connection failed before its first request"),
                Err(_) => tracing::debug!(%addr, "no first bytes (or TLS handshake) within header_read_timeout"),
            }
        });
        gauge.set(connections.len() as i64);
    }

    // Every connection saw the cancellation too and is closing gracefully.
    drop(listener);
    let drained = tokio::time::timeout(settings.shutdown_grace, async {
        while connections.join_next().await.is_some() {
            gauge.set(connections.len() as i64);
        }
    });
    if drained.await.is_err() {
        tracing::warn!(grace = ?settings.shutdown_grace, "shutdown grace period over; closing remaining connections");
    }
    connections.shutdown().await;
    gauge.set(0);
}

/// One builder per way a connection says its protocol. When it is known before hyper reads a byte, hyper
/// reads the first request into its own buffer from the start: hyper-util's detection instead reads the
/// first 24 bytes and hands them back, and hyper's 8 KiB read buffer then doubles to take them and what
/// follows (16 KiB a connection, for its whole life).
struct Builders {
    h1: auto::Builder<TokioExecutor>,
    h2: auto::Builder<TokioExecutor>,
    /// TLS without ALPN, or a plaintext client whose first bytes are only part of the HTTP/2 preface
    /// (clients send it whole): hyper-util's detection reads on until it can tell.
    detect: auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new(builder: auto::Builder<TokioExecutor>) -> Builders {
        Builders { h1: builder.clone().http1_only(), h2: builder.clone().http2_only(), detect: builder }
    }

    /// For a plaintext client, from its first bytes: the HTTP/2 preface, anything else (or nothing: the
    /// client closed, for hyper to see), or part of the preface, left to hyper-util's detection.
    fn plain(&self, first: &[u8]) -> &auto::Builder<TokioExecutor> {
        if first.is_empty() || !H2_PREFACE.starts_with(first) {
            &self.h1
        } else if first.len() == H2_PREFACE.len() {
            &self.h2
        } else {
            &self.detect
        }
    }

    fn negotiated(&self, alpn: Option<&[u8]>) -> &auto::Builder<TokioExecutor> {
        match alpn {
            Some(b"h2") => &self.h2,
            Some(_) => &self.h1,
            None => &self.detect,
        }
    }
}

enum Io {
    Plain(TcpStream),
    /// Boxed: rustls's connection state is over a kilobyte, and a connection's task is as large as its
    /// largest state, so inline it would grow every plaintext connection too.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One connection counted in [`ListenerSettings::speaking`]; dropping it (also when its task panics)
/// counts it out.
struct Speaking(Gauge);

impl Speaking {
    fn new(gauge: &Gauge) -> Speaking {
        gauge.inc();
        Speaking(gauge.clone())
    }
}

impl Drop for Speaking {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The HTTP/2 connection preface (RFC 9113, 3.4): how a plaintext client says it speaks HTTP/2.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The address that `max_connections_per_ip` counts for a peer: its IPv4 address, or the /64 of an
/// IPv6 one (one client usually holds a whole /64, and could otherwise pick a new address per connection).
fn client_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// Open connections per client address, capped.
struct PerIp {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    fn new(max: usize) -> Self {
        PerIp { max, open: Mutex::default() }
    }

    /// A place for one more connection from `ip`, or `None` when it has `max` open already.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(IpSlot { per_ip: self.clone(), ip })
    }
}

/// One open connection from `ip`; dropping it (also when its task panics) frees the place.
struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.per_ip.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Binds a listener with the given listen backlog (the std default of 128 overflows under bursts, and
/// each overflowed SYN costs its client a one-second retry), naming the address in the error.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let bound = || {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        // A restarted proxy can bind again while the old process's connections are in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    };
    bound().map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Waits (yielding, up to 10 s) until `gauge` reads `want`.
    async fn until(gauge: &Gauge, want: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while gauge.get() != want {
            assert!(tokio::time::Instant::now() < deadline, "gauge at {}, not {want}", gauge.get());
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn only_connections_that_have_spoken_count_for_the_heap_trim() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let (connections, speaking) = (Gauge::default(), Gauge::default());
        let settings = ListenerSettings {
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            max_header_bytes: 8192,
            tls: None,
            shutdown_grace: Duration::from_secs(1),
            max_connections: 64,
            max_connections_per_ip: 0,
            connections: connections.clone(),
            speaking: speaking.clone(),
        };
        let handler = |_request, _peer| async { Response::new(crate::proxy::body::full("ok".into())) };
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(serve(listener, settings, handler, shutdown.clone()));

        let mut silent = Vec::new();
        for _ in 0..3 {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        until(&connections, 3).await;
        assert_eq!(speaking.get(), 0, "a silent connection does not count");
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut answer = [0u8; 12];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
        assert_eq!((connections.get(), speaking.get()), (4, 1));
        drop(client);
        until(&speaking, 0).await;
        drop(silent);
        until(&connections, 0).await;
        shutdown.cancel();
        served.await.unwrap();
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let group = |s: &str| client_group(s.parse().unwrap()).to_string();
        assert_eq!(group("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(group("2001:db8:1:2:ffff::9"), "2001:db8:1:2::");
        assert_eq!(group("::ffff:10.1.2.3"), "10.1.2.3");
        assert_eq!(group("127.0.0.2"), "127.0.0.2");
    }
}
