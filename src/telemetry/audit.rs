//! The audit trail: one JSON line per request, written by one task so lines never interleave.
//!
//! Records are handed over on a bounded channel and `record` waits when it is full: a slow sink slows
//! requests down rather than losing audit lines. Secrets never reach this module: it only sees ids.

use std::io;
use std::time::SystemTime;

use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::runtime::AuditPath;

#[derive(Serialize)]
pub struct AuditEvent<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub key_id: Option<&'a str>,
    pub key_kind: Option<&'static str>,
    /// The user named in the user header (only when well-formed).
    pub requested_user: Option<&'a str>,
    pub acting_user: Option<&'a str>,
    /// `allow`, `deny` (refused by policy) or `error` (the upstream failed).
    pub decision: &'static str,
    /// `ok`, or the stable error code of the refusal.
    pub reason: &'static str,
    pub fallback: bool,
    pub upstream: Option<&'a str>,
    /// MCP facts of a JSON-RPC POST (single messages; a batch records none). Argument values are never
    /// recorded: they may hold personal data.
    pub mcp_method: Option<&'a str>,
    pub jsonrpc_id: Option<&'a serde_json::value::RawValue>,
    pub tool: Option<&'a str>,
    pub prompt: Option<&'a str>,
    pub resource: Option<&'a str>,
    /// The rate-limit level that refused: `key`, `user` or `user_upstream`.
    pub rate_limit_level: Option<&'static str>,
    pub status: u16,
    pub latency_ms: f64,
}

#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<String>,
}

impl AuditSink {
    /// Opens the sink and starts its writer. The writer ends, after flushing, when every sink is dropped.
    pub async fn open(path: &AuditPath) -> io::Result<(AuditSink, JoinHandle<()>)> {
        let out: Box<dyn AsyncWrite + Send + Unpin> = match path {
            AuditPath::Stdout => Box::new(tokio::io::stdout()),
            AuditPath::File(path) => {
                Box::new(tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?)
            }
        };
        let (tx, rx) = mpsc::channel(4096);
        Ok((AuditSink { tx }, tokio::spawn(write_lines(rx, out))))
    }

    pub async fn record(&self, event: &AuditEvent<'_>) {
        #[derive(Serialize)]
        struct Line<'a> {
            #[serde(serialize_with = "display")]
            time: humantime::Rfc3339Timestamp,
            #[serde(flatten)]
            event: &'a AuditEvent<'a>,
        }
        let line = Line { time: humantime::format_rfc3339_millis(SystemTime::now()), event };
        let mut text = serde_json::to_string(&line).expect("audit events serialize");
        text.push('\n');
        if self.tx.send(text).await.is_err() {
            tracing::error!("audit writer has stopped; audit line lost");
        }
    }
}

fn display<S: serde::Serializer>(value: &impl std::fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

async fn write_lines(mut rx: mpsc::Receiver<String>, out: Box<dyn AsyncWrite + Send + Unpin>) {
    let mut out = BufWriter::new(out);
    while let Some(line) = rx.recv().await {
        let mut result = out.write_all(line.as_bytes()).await;
        // Drain what is already queued before flushing: one write syscall for a burst of requests.
        while result.is_ok() {
            match rx.try_recv() {
                Ok(line) => result = out.write_all(line.as_bytes()).await,
                Err(_) => break,
            }
        }
        if let Err(e) = result.and(out.flush().await) {
            tracing::error!(error = %e, "cannot write the audit trail");
        }
    }
}
