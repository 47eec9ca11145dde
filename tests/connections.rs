//! Connections on real sockets: the idle timeout (HTTP/1 and HTTP/2; an open event stream is not idle),
//! `max_connections` recovering from idle connections, the per-address cap, the listen backlog, the
//! connections gauge, and shutdown (event streams end between events, POSTs finish, `/readyz` 503).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Bounds every wait, so a broken build fails instead of hanging.
const BOUND: Duration = Duration::from_secs(5);

fn with_server(upstream: SocketAddr, settings: &str) -> String {
    base_config(upstream, "").replacen("[server]\n", &format!("[server]\n{settings}\n"), 1)
}

/// An HTTP/2 (prior knowledge) connection to `addr`: its request sender, and its task, which ends when
/// the server closes the connection.
async fn h2_connection(
    addr: SocketAddr,
) -> (hyper::client::conn::http2::SendRequest<TestBody>, tokio::task::JoinHandle<hyper::Result<()>>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    (sender, tokio::spawn(connection))
}

/// One request on an open HTTP/2 connection, read to the end: its status.
async fn h2_get(sender: &mut hyper::client::conn::http2::SendRequest<TestBody>, addr: SocketAddr, path: &str) -> u16 {
    let request = Request::get(format!("http://{addr}{path}")).body(body("")).unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    response.into_body().collect().await.unwrap();
    status
}

/// A refused request on a keep-alive HTTP/1.1 connection; returns the connection, still open.
async fn h1_keep_alive(addr: SocketAddr) -> TcpStream {
    h1_keep_alive_from(addr, TcpStream::connect(addr).await.unwrap()).await
}

async fn h1_keep_alive_from(addr: SocketAddr, mut stream: TcpStream) -> TcpStream {
    stream.write_all(format!("GET /nowhere HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(BOUND, stream.read_exact(&mut head)).await.expect("an answer").unwrap();
    assert_eq!(&head, b"HTTP/1.1 404");
    stream
}

/// Reads until the server closes the connection; what it sent.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    tokio::time::timeout(BOUND, stream.read_to_end(&mut rest)).await.expect("the connection is still open").unwrap();
    rest
}

/// A client socket bound to `source` (another loopback address is another client).
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(addr).await.unwrap()
}

#[tokio::test]
async fn an_idle_http2_connection_gets_a_goaway_after_idle_timeout() {
    let (upstream, _) = recording_upstream().await;
    let harness = Harness::start(&with_server(upstream, "idle_timeout = \"200ms\"")).await;
    let (mut sender, connection) = h2_connection(harness.addr).await;
    // One refused request (no key), the kind that used to hold a connection slot for ever.
    assert_eq!(h2_get(&mut sender, harness.addr, "/mcp/github").await, 401);
    let idle_since = Instant::now();
    // hyper's keep-alive pings do not count: the server sends a GOAWAY, and the client's connection ends
    // cleanly (a dropped socket would end it with an error).
    let ended = tokio::time::timeout(BOUND, connection).await.expect("the idle connection is still open");
    ended.unwrap().expect("a graceful close");
    assert!(idle_since.elapsed() >= Duration::from_millis(100), "closed before it was idle for idle_timeout");
    assert!(sender.is_closed());
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed() {
    let (upstream, _) = recording_upstream().await;
    let harness = Harness::start(&with_server(upstream, "idle_timeout = \"200ms\"")).await;
    let mut stream = h1_keep_alive(harness.addr).await;
    let rest = String::from_utf8(read_until_closed(&mut stream).await).unwrap();
    // The rest of the 404 and then the close: no other answer.
    assert_eq!(rest.matches("HTTP/1.1").count(), 0, "{rest}");
}

#[tokio::test]
async fn an_open_event_stream_keeps_its_connection_past_idle_timeout() {
    let mut upstream = sse_upstream().await;
    let harness = Harness::start(&with_server(upstream.addr, "idle_timeout = \"200ms\"")).await;
    let (mut sender, connection) = h2_connection(harness.addr).await;
    let response = sender.send_request(stream_request(&harness.url("/mcp/github"))).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.into_body();
    let (mut events, _dropped) = upstream.streams.recv().await.unwrap();
    events.send_data(Bytes::from_static(b"data: one\n\n")).await.unwrap();
    assert_eq!(stream.frame().await.unwrap().unwrap().into_data().unwrap(), "data: one\n\n");

    // Another connection goes idle after this point and is closed: idle_timeout has passed.
    let mut idle = h1_keep_alive(harness.addr).await;
    read_until_closed(&mut idle).await;

    // The stream's connection got no GOAWAY: it still takes new requests, and the stream still flows.
    assert_eq!(h2_get(&mut sender, harness.addr, "/nowhere").await, 404);
    events.send_data(Bytes::from_static(b"data: two\n\n")).await.unwrap();
    assert_eq!(stream.frame().await.unwrap().unwrap().into_data().unwrap(), "data: two\n\n");
    assert!(!connection.is_finished());
}

#[tokio::test]
async fn idle_connections_that_fill_max_connections_are_closed_and_new_clients_get_in() {
    let (upstream, _) = recording_upstream().await;
    let harness = Harness::start(&with_server(upstream, "max_connections = 2\nidle_timeout = \"200ms\"")).await;
    let (mut first, first_connection) = h2_connection(harness.addr).await;
    assert_eq!(h2_get(&mut first, harness.addr, "/mcp/github").await, 401);
    let _second = h1_keep_alive(harness.addr).await;

    // Both slots are taken by idle connections; a third client is served once they are closed.
    let (status, _) = tokio::time::timeout(BOUND, get_once(harness.addr, "/nowhere")).await.expect("locked out");
    assert_eq!(status, 404);
    tokio::time::timeout(BOUND, first_connection).await.expect("the idle HTTP/2 connection is still open").ok();
}

#[tokio::test]
async fn a_client_that_takes_nothing_does_not_keep_its_connection() {
    let (upstream, _) = recording_upstream().await;
    let settings = "max_connections = 1\nidle_timeout = \"200ms\"\nheader_read_timeout = \"200ms\"";
    let harness = Harness::start(&with_server(upstream, settings)).await;
    // An HTTP/2 client whose window stays at zero: the proxy can send the 401's head but never its body,
    // so the request never ends. It still answers pings.
    let tcp = TcpStream::connect(harness.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(0)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let request = Request::get(harness.url("/mcp/github")).body(body("")).unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 401);
    // It is closed like an idle connection, and its slot goes to the next client.
    tokio::time::timeout(BOUND, connection).await.expect("the stalled connection is still open").ok();
    let (status, _) = tokio::time::timeout(BOUND, get_once(harness.addr, "/nowhere")).await.expect("locked out");
    assert_eq!(status, 404);
    drop(response);
}

#[tokio::test]
async fn max_connections_per_ip_refuses_the_extra_connection_of_one_address_only() {
    let (upstream, _) = recording_upstream().await;
    let harness = Harness::start(&with_server(upstream, "max_connections_per_ip = 2")).await;
    let gauge = r#"mcp_proxy_connections{listener="proxy"}"#;
    let first = h1_keep_alive(harness.addr).await;
    let _second = h1_keep_alive(harness.addr).await;

    // A third from 127.0.0.1 is closed unanswered; 127.0.0.2 is another client and gets in.
    let mut third = connect_from([127, 0, 0, 1], harness.addr).await;
    third.write_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap_or(());
    let mut answer = Vec::new();
    let read = tokio::time::timeout(BOUND, third.read_to_end(&mut answer)).await.expect("the extra connection is open");
    assert!(read.is_err() || answer.is_empty(), "served past the cap: {}", String::from_utf8_lossy(&answer));
    let _other = h1_keep_alive_from(harness.addr, connect_from([127, 0, 0, 2], harness.addr).await).await;
    wait_for_metric(harness.admin, gauge, 3.0).await;

    // A closed connection gives its place back.
    drop(first);
    wait_for_metric(harness.admin, gauge, 2.0).await;
    h1_keep_alive_from(harness.addr, connect_from([127, 0, 0, 1], harness.addr).await).await;
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_listen_backlog_is_applied_to_both_listeners() {
    let (upstream, _) = recording_upstream().await;
    let harness = Harness::start(&with_server(upstream, "listen_backlog = 777")).await;
    // For a listening socket, `ss` shows the backlog in the Send-Q column (the std default is 128).
    let out = std::process::Command::new("ss").args(["-ltnH"]).output().expect("ss (iproute2) is installed");
    let out = String::from_utf8(out.stdout).unwrap();
    for addr in [harness.addr, harness.admin] {
        let line = out
            .lines()
            .find(|line| line.split_whitespace().nth(3) == Some(addr.to_string().as_str()))
            .unwrap_or_else(|| panic!("{addr} not listening:\n{out}"));
        assert_eq!(line.split_whitespace().nth(2), Some("777"), "{line}");
    }
}

#[tokio::test]
async fn the_connections_gauge_drops_as_clients_leave_without_a_new_accept() {
    let (upstream, _) = recording_upstream().await;
    let harness = Harness::start(&base_config(upstream, "")).await;
    let gauge = r#"mcp_proxy_connections{listener="proxy"}"#;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(h1_keep_alive(harness.addr).await);
    }
    wait_for_metric(harness.admin, gauge, 5.0).await;
    // Scrapes go to the admin listener: the proxy listener accepts nothing more, and still lets go of
    // every finished connection.
    drop(clients);
    wait_for_metric(harness.admin, gauge, 0.0).await;
}

#[tokio::test]
async fn shutdown_ends_event_streams_between_events_lets_posts_finish_and_keeps_readyz_503() {
    let mut upstream = streams_and_slow_posts().await;
    let mut harness = Harness::start(&base_config(upstream.addr, "")).await;
    let (proxy, admin) = (harness.addr, harness.admin);
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(stream_request(&harness.url("/mcp/github"))).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.into_body();
    let (mut events, upstream_stream_dropped) = upstream.streams.recv().await.unwrap();
    events.send_data(Bytes::from_static(b"data: one\n\n")).await.unwrap();
    assert_eq!(stream.frame().await.unwrap().unwrap().into_data().unwrap(), "data: one\n\n");
    // Half of the next event is on its way: the proxy holds it until it is complete, the client never
    // sees half an event.
    events.send_data(Bytes::from_static(b"data: tw")).await.unwrap();
    let post = tokio::spawn(
        harness.client.request(mcp_post(&harness.url("/mcp/github"), &[("authorization", "Bearer alice-key-0001")])),
    );
    let release = upstream.posts.recv().await.unwrap();

    let shutdown = tokio::spawn(harness.app.take().unwrap().shutdown());
    // Not ready, and the admin listener still answers so probes can tell.
    let deadline = Instant::now() + BOUND;
    while get_once(admin, "/readyz").await.0 != 503 {
        assert!(Instant::now() < deadline, "/readyz never answered 503");
    }
    // The stream ends cleanly after the last whole event, without waiting for the upstream, and the
    // upstream's stream is dropped.
    let end = tokio::time::timeout(BOUND, stream.frame()).await.expect("the stream did not end at shutdown");
    assert!(end.is_none(), "{end:?}");
    tokio::time::timeout(BOUND, upstream_stream_dropped).await.expect("upstream stream still open").ok();

    // The POST is still in flight, so the drain goes on and /readyz still says 503. Then it is answered.
    assert_eq!(get_once(admin, "/readyz").await.0, 503);
    release.send(()).unwrap();
    let answer = tokio::time::timeout(BOUND, post).await.expect("the POST got no answer").unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.into_body().collect().await.unwrap().to_bytes(), SLOW_ANSWER);
    tokio::time::timeout(BOUND, shutdown).await.expect("shutdown ends").unwrap();
    assert!(TcpStream::connect(admin).await.is_err(), "the admin listener outlived the shutdown");
}

#[tokio::test]
async fn header_read_timeout_counts_from_the_connect_not_from_the_first_byte() {
    let (upstream, _) = recording_upstream().await;
    let harness = Harness::start(&with_server(upstream, "header_read_timeout = \"2s\"")).await;
    let connected = Instant::now();
    let (mut read, mut write) = TcpStream::connect(harness.addr).await.unwrap().into_split();
    // Silent for most of the period, then a request head trickled a header at a time, never finished.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let trickle = async {
        write.write_all(b"GET /mcp/github HTTP/1.1\r\nHost: proxy\r\n").await?;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            write.write_all(b"X-Slow: 1\r\n").await?;
        }
    };
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            _ = read.read_to_end(&mut rest) => {}
            Err::<(), std::io::Error>(_) = trickle => {}
        }
    });
    closed.await.expect("the trickling connection is still open");
    let held = connected.elapsed();
    // 2 s from the connect; the first byte's arrival (1.5 s) must not start a new period.
    assert!(held < Duration::from_millis(3000), "held for {held:?}");
    assert!(held >= Duration::from_millis(1900), "closed after {held:?}, before header_read_timeout");
}

/// Writes through to a TCP stream, except its first `skip` bytes, which the test has sent already.
struct SentAlready {
    tcp: TcpStream,
    skip: usize,
}

impl tokio::io::AsyncRead for SentAlready {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SentAlready {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            self.skip -= n;
            return std::task::Poll::Ready(Ok(n));
        }
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_plaintext_http2_client_whose_preface_arrives_in_pieces_is_served_as_http2() {
    let (upstream, _) = recording_upstream().await;
    let harness = Harness::start(&base_config(upstream, "")).await;
    let mut tcp = TcpStream::connect(harness.addr).await.unwrap();
    // The first 16 bytes of the 24-byte preface alone, then the client's own pause: the proxy sees a
    // part of the preface first, which it can only hand to a detection that reads on.
    let piece = b"PRI * HTTP/2.0\r\n";
    tcp.write_all(piece).await.unwrap();
    // Accepted (its task spawned, and so peeking), then a pause longer than that takes.
    wait_for_metric(harness.admin, r#"mcp_proxy_connections{listener="proxy"}"#, 1.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let io = SentAlready { tcp, skip: piece.len() };
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.unwrap();
    tokio::spawn(connection);
    let status =
        tokio::time::timeout(BOUND, h2_get(&mut sender, harness.addr, "/mcp/github")).await.expect("an answer");
    assert_eq!(status, 401, "an HTTP/2 answer (no key)");
}
