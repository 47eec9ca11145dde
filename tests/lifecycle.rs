//! The process around the pipeline: slow clients, and SIGTERM on the real binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let (upstream, seen) = recording_upstream().await;
    let config = base_config(upstream, "").replacen("[server]\n", "[server]\nheader_read_timeout = \"300ms\"\n", 1);
    let harness = Harness::start(&config).await;
    let mut stream = tokio::net::TcpStream::connect(harness.addr).await.unwrap();
    stream
        .write_all(b"POST /mcp/github HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-key-0001\r\n")
        .await
        .unwrap();
    // The headers never end: the proxy must close the connection by itself (the 10 s bound only keeps
    // a broken build from hanging the suite).
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection still open long after header_read_timeout");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn sigterm_stops_the_binary_cleanly_and_flushes_the_audit_trail() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let config = dir.path().join("proxy.toml");
    // Port 0 everywhere; the binary logs the bound addresses, which is how this test finds them.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[audit]\npath = \"{}\"\n[[keys]]\nid = \"k\"\nkind = \"standard\"\nsecret = \"s\"\nuser = \"alice\"\n",
            audit.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcp-tenant-proxy"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "exited before listening");
        if let Some(rest) = line.split("proxy_addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    // One request, so the audit trail has a line to flush.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(&mut stream, b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut stream, &mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    let trail = std::fs::read_to_string(&audit).unwrap();
    assert_eq!(trail.lines().count(), 1);
    assert!(trail.contains("\"reason\":\"route_not_found\""));
    assert!(std::net::TcpStream::connect(&addr).is_err(), "still listening after exit");
}

#[tokio::test]
async fn connections_that_never_start_a_request_are_closed() {
    let (upstream, _) = recording_upstream().await;
    let config = base_config(upstream, "").replacen("[server]\n", "[server]\nheader_read_timeout = \"300ms\"\n", 1);
    let harness = Harness::start(&config).await;
    // Nothing at all, and half an HTTP/2 preface: hyper is still deciding which protocol it is.
    for opening in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let mut stream = tokio::net::TcpStream::connect(harness.addr).await.unwrap();
        stream.write_all(opening).await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "{opening:?}: connection still open long after the deadline");
    }
}

#[tokio::test]
async fn max_connections_holds_new_connections_back() {
    let (upstream, _) = recording_upstream().await;
    let config = base_config(upstream, "").replacen("[server]\n", "[server]\nmax_connections = 1\n", 1);
    let harness = Harness::start(&config).await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut first = tokio::net::TcpStream::connect(harness.addr).await.unwrap();
    first.write_all(request).await.unwrap();
    let mut buf = [0u8; 12];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 404");

    // The second connection is accepted by the kernel but not served while the first stays open.
    let mut second = tokio::net::TcpStream::connect(harness.addr).await.unwrap();
    second.write_all(request).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(300), second.read_exact(&mut buf)).await;
    assert!(early.is_err(), "served a connection beyond max_connections");
    drop(first);
    tokio::time::timeout(Duration::from_secs(10), second.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"HTTP/1.1 404");
}

/// A running binary, killed if the test ends before it exits.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary on `config`, and the proxy and admin addresses it logged (it listens on port 0).
fn spawn_binary(config: &std::path::Path) -> (Running, String, String) {
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_mcp-tenant-proxy"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "exited before listening");
        let field = |name: &str| Some(line.split(name).nth(1)?.split_whitespace().next()?.to_owned());
        if let (Some(proxy), Some(admin)) = (field("proxy_addr="), field("admin_addr=Some(")) {
            // The rest of the log goes on being read, so the child never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
            return (child, proxy, admin.trim_end_matches(')').to_owned());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_an_open_event_stream_at_once_and_answers_the_in_flight_post() {
    let mut upstream = streams_and_slow_posts().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    // shutdown_grace keeps its 30 s default: the exit must come long before it.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[audit]\npath = \"{audit}\"\n\
             [[keys]]\nid = \"k\"\nkind = \"standard\"\nsecret = \"{ALICE_KEY}\"\nuser = \"alice\"\n\
             [upstreams.github]\nurl = \"http://{addr}/mcp\"\ninject = {{ header = \"authorization\", value = \"Bearer {{secret}}\" }}\n\
             [[credentials]]\nuser = \"alice\"\nupstream = \"github\"\nsecret = \"cred-alice\"\n",
            audit = dir.path().join("audit.log").display(),
            addr = upstream.addr,
        ),
    )
    .unwrap();
    let (mut child, proxy, admin) = tokio::task::spawn_blocking(move || spawn_binary(&config)).await.unwrap();
    let (proxy, admin): (std::net::SocketAddr, std::net::SocketAddr) = (proxy.parse().unwrap(), admin.parse().unwrap());
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();

    let response = client.request(stream_request(&format!("http://{proxy}/mcp/github"))).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.into_body();
    let (mut events, _dropped) = upstream.streams.recv().await.unwrap();
    events.send_data(bytes::Bytes::from_static(b"data: one\n\n")).await.unwrap();
    assert_eq!(stream.frame().await.unwrap().unwrap().into_data().unwrap(), "data: one\n\n");
    let post = tokio::spawn(client.request(mcp_post(
        &format!("http://{proxy}/mcp/github"),
        &[("authorization", &format!("Bearer {ALICE_KEY}"))],
    )));
    let release = upstream.posts.recv().await.unwrap();
    assert_eq!(get_once(admin, "/readyz").await.0, 200);

    let sigterm = Instant::now();
    let status = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    // The stream ends cleanly (no error, no half event) right away, not after shutdown_grace.
    let end = tokio::time::timeout(Duration::from_secs(10), stream.frame()).await.expect("the stream is still open");
    assert!(end.is_none(), "{end:?}");
    // The drain goes on for the POST: the admin listener still answers, not ready.
    assert_eq!(get_once(admin, "/readyz").await.0, 503);
    release.send(()).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), post).await.expect("no answer").unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.into_body().collect().await.unwrap().to_bytes(), SLOW_ANSWER);

    let exit = tokio::task::spawn_blocking(move || child.0.wait().unwrap()).await.unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    assert!(sigterm.elapsed() < Duration::from_secs(10), "took {:?} after SIGTERM", sigterm.elapsed());
}
