//! The audit trail: one JSON line per request, written by one task so lines never interleave.
//!
//! Records are handed over on a bounded channel and `record` waits when it is full: a slow sink slows
//! requests down rather than losing audit lines. Secrets never reach this module: it only sees ids.
//!
//! The trail is tamper-evident: the writer puts `"prev"`, the SHA-256 of the previous line's bytes, first in
//! every line, so editing, deleting or reordering a line breaks the chain at that point ([`verify`]). Only the
//! writer sees the lines in their final order, so only the writer hashes.
//!
//! A line is never dropped because the sink fails: the writer keeps it, counts the error, reports the sink
//! unhealthy ([`AuditHealth`], which `/readyz` reads) and retries with a growing delay. Meanwhile the channel
//! fills up and requests wait. Only at shutdown, once the grace period is over, does a failing writer give
//! up, and it logs how many lines it could not write.

use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::runtime::AuditPath;
use crate::secret::sha256;

#[derive(Serialize)]
pub struct AuditEvent<'a> {
    pub request_id: &'a str,
    /// The W3C trace id the request was forwarded with (the client's, or a new one).
    pub trace_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub key_id: Option<&'a str>,
    pub key_kind: Option<&'static str>,
    /// The user named in the user header or proven by a user token (only when well-formed).
    pub requested_user: Option<&'a str>,
    pub acting_user: Option<&'a str>,
    /// `token` when a verified user token proved the acting user (`[identity.user_token]`).
    pub user_proof: Option<&'static str>,
    /// The `iss` of that token.
    pub token_issuer: Option<&'a str>,
    /// `allow`, `deny` (refused by policy) or `error` (the upstream failed).
    pub decision: &'static str,
    /// `ok`, or the stable error code of the refusal.
    pub reason: &'static str,
    pub fallback: bool,
    pub upstream: Option<&'a str>,
    /// MCP facts of a JSON-RPC POST (single messages; a batch records none). Argument values are never
    /// recorded: they may hold personal data.
    pub mcp_method: Option<&'a str>,
    pub jsonrpc_id: Option<&'a crate::policy::mcp::Id>,
    pub tool: Option<&'a str>,
    pub prompt: Option<&'a str>,
    pub resource: Option<&'a str>,
    /// The rate-limit level that refused: `key`, `user` or `user_upstream`.
    pub rate_limit_level: Option<&'static str>,
    /// Fingerprint (truncated SHA-256) of the MCP session id: the id itself is a bearer secret.
    pub session: Option<&'a str>,
    pub status: u16,
    pub latency_ms: f64,
}

/// The `prev` of a chain's first line: 64 zeros.
pub const GENESIS: [u8; 32] = [0; 32];

/// The first retry after a failed write waits this long; each further one twice as long, up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Places in the audit queue: requests in progress plus lines waiting for the writer. Past that, new
/// requests wait for a place.
const CHANNEL: usize = 16384;
/// The writer takes what is queued, up to about this many bytes, into one write.
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// After the first line of a batch, the writer lets more gather for this long before it writes. Each write
/// is a hand-off to a blocking thread, which preempts the runtime's worker: with a write per request that
/// was nearly a third of the proxy's context switches under load. A batch per window bounds the hand-offs to a
/// few hundred a second. Answers never wait for their lines.
const GATHER: Duration = Duration::from_millis(2);

/// Whether the audit sink can be written, shared by the writer (which updates it) and `/readyz`.
#[derive(Debug)]
pub struct AuditHealth {
    write_errors: AtomicU64,
    healthy: AtomicBool,
    changed: Notify,
}

impl Default for AuditHealth {
    fn default() -> Self {
        Self { write_errors: AtomicU64::new(0), healthy: AtomicBool::new(true), changed: Notify::new() }
    }
}

impl AuditHealth {
    /// Failed writes or flushes since start (each retry that fails counts).
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    /// False from a failed write until the next successful one.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Resolves once `condition` holds; it is checked again at every change of this state.
    pub async fn wait_until(&self, condition: impl Fn(&AuditHealth) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a change between the check and the await is not missed.
            changed.as_mut().enable();
            if condition(self) {
                return;
            }
            changed.await;
        }
    }

    pub(crate) fn failed(&self) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        self.healthy.store(false, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Returns whether the sink was unhealthy until now.
    pub(crate) fn succeeded(&self) -> bool {
        let recovered = !self.healthy.swap(true, Ordering::SeqCst);
        if recovered {
            self.changed.notify_waiters();
        }
        recovered
    }
}

#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<String>,
}

/// The writer task, to be ended with [`AuditWriter::finish`].
pub struct AuditWriter {
    task: JoinHandle<usize>,
    give_up: oneshot::Sender<()>,
}

type Out = Box<dyn Write + Send>;

impl AuditSink {
    /// Opens the sink and starts its writer. The writer ends, after writing every queued line, when every
    /// sink is dropped. A file is appended to, continuing the chain from its last line; stdout starts a new
    /// chain.
    pub async fn open(path: &AuditPath) -> io::Result<(AuditSink, Arc<AuditHealth>, AuditWriter)> {
        match path {
            AuditPath::Stdout => Ok(Self::start(Box::new(io::stdout()), Continue::default(), CHANNEL)),
            AuditPath::File(path) => {
                let path = path.clone();
                let (file, from) = tokio::task::spawn_blocking(move || open_file(&path))
                    .await
                    .map_err(|e| io::Error::other(format!("opening the audit file: {e}")))??;
                Ok(Self::start(Box::new(file), from, CHANNEL))
            }
        }
    }

    fn start(out: Out, from: Continue, capacity: usize) -> (AuditSink, Arc<AuditHealth>, AuditWriter) {
        let (tx, rx) = mpsc::channel(capacity);
        let (give_up, give_up_rx) = oneshot::channel();
        let health = Arc::new(AuditHealth::default());
        let task = tokio::spawn(write_lines(rx, out, from, health.clone(), give_up_rx));
        (AuditSink { tx }, health, AuditWriter { task, give_up })
    }

    /// The line for `event`, without `prev` and the newline (the writer adds both, in the order the lines
    /// reach the sink). Every field is serialized here, and every character outside ASCII is written as
    /// a `\u` escape, so one record is one line for any reader, whatever a client put in a field (even
    /// one that also splits lines at U+2028 or U+0085).
    pub fn line(event: &AuditEvent<'_>) -> String {
        #[derive(Serialize)]
        struct Line<'a> {
            #[serde(serialize_with = "display")]
            time: humantime::Rfc3339Timestamp,
            #[serde(flatten)]
            event: &'a AuditEvent<'a>,
        }
        let line = Line { time: humantime::format_rfc3339_millis(SystemTime::now()), event };
        // Plain fields with string keys: serializing cannot fail.
        crate::json::to_ascii_string(&line).unwrap_or_default()
    }

    /// A place in the queue for one line, once there is room. Taken when a request starts, so that its
    /// line can be queued when it ends without waiting, even from a `Drop` (the client went away): the
    /// queue thus bounds the requests in progress plus the lines waiting for the sink, and a slow sink
    /// holds new requests back before any work is done for them. `None` once the writer has stopped
    /// (the caller logs the lost line, with its request's ids).
    pub async fn reserve(&self) -> Option<mpsc::OwnedPermit<String>> {
        self.tx.clone().reserve_owned().await.ok()
    }
}

impl AuditWriter {
    /// Waits until the writer has written every queued line and ended (it ends once every [`AuditSink`] is
    /// dropped). If it is still at work after `grace`, it is told to give up at its next failed write; a
    /// sink that works is still drained. Returns the number of lines that could not be written (the writer
    /// logs them as an error).
    pub async fn finish(mut self, grace: Duration) -> usize {
        let ended = match tokio::time::timeout(grace, &mut self.task).await {
            Ok(ended) => ended,
            Err(_) => {
                let _ = self.give_up.send(());
                self.task.await
            }
        };
        ended.unwrap_or_else(|e| {
            tracing::error!(error = %e, "the audit writer failed");
            0
        })
    }
}

fn display<S: serde::Serializer>(value: &impl std::fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

/// Where a new writer's chain starts.
#[derive(Default)]
struct Continue {
    /// The hash of the sink's last line ([`GENESIS`] for a new or empty file).
    prev: Option<[u8; 32]>,
    /// The file does not end with a newline (a line was cut short): end it before the first new line, so
    /// the fragment stays a line of its own and `verify` reports it.
    torn: bool,
}

/// Opens (or creates) the audit file for appending and finds the hash of its last line.
fn open_file(path: &Path) -> io::Result<(std::fs::File, Continue)> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).read(true).open(path)?;
    // A pipe or a device (`/dev/stdout`, a FIFO to a log shipper) cannot be read back: a new chain.
    if !file.metadata()?.is_file() {
        return Ok((file, Continue::default()));
    }
    let from = last_line(&mut file)?;
    Ok((file, from))
}

/// Reads backwards from the end to the last line and hashes it.
fn last_line(file: &mut (impl Read + Seek)) -> io::Result<Continue> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(Continue::default());
    }
    let mut last = [0u8];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    let torn = last[0] != b'\n';
    let end = if torn { len } else { len - 1 };
    let mut start = 0;
    let mut pos = end;
    let mut chunk = vec![0u8; 8192];
    while pos > 0 {
        let n = pos.min(chunk.len() as u64) as usize;
        pos -= n as u64;
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut chunk[..n])?;
        if let Some(i) = chunk[..n].iter().rposition(|&b| b == b'\n') {
            start = pos + i as u64 + 1;
            break;
        }
    }
    let mut line = vec![0u8; (end - start) as usize];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut line)?;
    Ok(Continue { prev: Some(sha256(&line)), torn })
}

/// Appends `event` (a JSON object without `prev`) to `out` as one line, with `"prev":"<hex of prev>"` as
/// its first field, and moves `prev` on to the new line's hash. Byte-level: the event is not parsed again.
pub fn chain_line(out: &mut Vec<u8>, prev: &mut [u8; 32], event: &str) {
    let fields = event.strip_prefix('{').expect("an audit event is a JSON object");
    let start = out.len();
    let mut hex = [0u8; 64];
    hex::encode_to_slice(*prev, &mut hex).expect("64 hex digits for 32 bytes");
    out.extend_from_slice(b"{\"prev\":\"");
    out.extend_from_slice(&hex);
    out.push(b'"');
    if !fields.starts_with('}') {
        out.push(b',');
    }
    out.extend_from_slice(fields.as_bytes());
    *prev = sha256(&out[start..]);
    out.push(b'\n');
}

async fn write_lines(
    mut rx: mpsc::Receiver<String>,
    mut out: Out,
    from: Continue,
    health: Arc<AuditHealth>,
    give_up: oneshot::Receiver<()>,
) -> usize {
    let mut prev = from.prev.unwrap_or(GENESIS);
    let mut pending = if from.torn { vec![b'\n'] } else { Vec::new() };
    let mut give_up = Some(give_up);
    while let Some(event) = rx.recv().await {
        chain_line(&mut pending, &mut prev, &event);
        // Take what is queued, and when that is not a full batch, what queues within the window too: one
        // hand-off and one write syscall for a burst of requests. A backlog drains without waiting.
        take_queued(&mut rx, &mut pending, &mut prev);
        if pending.len() < MAX_BATCH_BYTES {
            tokio::time::sleep(GATHER).await;
            take_queued(&mut rx, &mut pending, &mut prev);
        }
        // Until the batch is written, nothing new is taken: the channel fills and `record` waits.
        let mut delay = RETRY_FIRST;
        loop {
            let result;
            (out, pending, result) = write_out(out, pending).await;
            match result {
                Ok(()) => {
                    if health.succeeded() {
                        tracing::info!("the audit trail is writable again");
                    }
                    break;
                }
                Err(e) => {
                    health.failed();
                    let unwritten = lines_in(&pending);
                    tracing::error!(error = %e, unwritten, retry_in = ?delay, "cannot write the audit trail; requests wait until it can be written");
                    if back_off(delay, &mut give_up).await {
                        rx.close();
                        let mut lost = unwritten;
                        while rx.try_recv().is_ok() {
                            lost += 1;
                        }
                        tracing::error!(lost, "shutting down with the audit trail still failing: audit lines lost");
                        return lost;
                    }
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }
    0
}

/// Chains queued lines onto `pending` until it holds a batch or the queue is empty.
fn take_queued(rx: &mut mpsc::Receiver<String>, pending: &mut Vec<u8>, prev: &mut [u8; 32]) {
    while pending.len() < MAX_BATCH_BYTES {
        match rx.try_recv() {
            Ok(event) => chain_line(pending, prev, &event),
            Err(_) => break,
        }
    }
}

/// Lines not yet completely written (the start of the first one may already be in the sink).
fn lines_in(pending: &[u8]) -> usize {
    pending.iter().filter(|&&b| b == b'\n').count()
}

/// Sleeps `delay`; true if told to give up meanwhile (or before).
async fn back_off(delay: Duration, give_up: &mut Option<oneshot::Receiver<()>>) -> bool {
    let Some(signal) = give_up else {
        tokio::time::sleep(delay).await;
        return false;
    };
    let told = tokio::select! {
        _ = tokio::time::sleep(delay) => return false,
        sent = signal => sent.is_ok(),
    };
    if !told {
        // The `AuditWriter` was dropped without `finish`: nobody will ever say stop, so keep trying.
        *give_up = None;
        tokio::time::sleep(delay).await;
    }
    told
}

/// Writes `pending` on a blocking thread and returns what is left of it: exactly the bytes the sink did not
/// take, so a retry neither repeats nor skips a byte (a partial write continues where it stopped).
async fn write_out(mut out: Out, mut pending: Vec<u8>) -> (Out, Vec<u8>, io::Result<()>) {
    tokio::task::spawn_blocking(move || {
        let mut written = 0;
        let mut result = Ok(());
        while written < pending.len() {
            match out.write(&pending[written..]) {
                Ok(0) => {
                    result = Err(io::ErrorKind::WriteZero.into());
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        pending.drain(..written);
        if result.is_ok() {
            result = out.flush();
        }
        (out, pending, result)
    })
    .await
    .expect("audit writes do not panic")
}

/// Why [`verify`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Break {
    NotJson,
    NoPrev,
    BadPrev,
    /// The first line does not start a chain (without `allow_continuation`).
    NotGenesis,
    /// `prev` is not the hash of line `previous`.
    Mismatch {
        previous: usize,
    },
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Break::NotJson => f.write_str("not a JSON object"),
            Break::NoPrev => f.write_str("no \"prev\" field"),
            Break::BadPrev => f.write_str("\"prev\" is not 64 lowercase hex digits"),
            Break::NotGenesis => f.write_str(
                "the first line's prev is not 64 zeros: lines before it are missing \
                 (for a rotated or truncated file, use --allow-continuation)",
            ),
            Break::Mismatch { previous } => write!(
                f,
                "prev is not the SHA-256 of line {previous}: line {previous} was edited, \
                 or lines were deleted or reordered here"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// `line` is 1-based.
    #[error("broken at line {line}: {reason}")]
    Broken { line: usize, reason: Break },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Checks an audit trail's hash chain and returns its number of lines, or the first line where it breaks.
/// A file normally starts a chain (first `prev` = [`GENESIS`]); with `allow_continuation` its first line may
/// continue a chain whose start is elsewhere (a rotated or truncated file).
///
/// An edited line shows as a mismatch on the line after it; a deleted or moved line as a mismatch where the
/// gap is. The last line is covered only once another line follows it.
pub fn verify(mut reader: impl BufRead, allow_continuation: bool) -> Result<usize, VerifyError> {
    let mut line = Vec::new();
    let mut count = 0;
    let mut expected = if allow_continuation { None } else { Some(GENESIS) };
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(count);
        }
        count += 1;
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        let broken = |reason| VerifyError::Broken { line: count, reason };
        let prev = prev_of(&line).map_err(broken)?;
        match expected {
            Some(expected) if prev != expected => {
                return Err(broken(if count == 1 {
                    Break::NotGenesis
                } else {
                    Break::Mismatch { previous: count - 1 }
                }));
            }
            _ => {}
        }
        expected = Some(sha256(&line));
    }
}

fn prev_of(line: &[u8]) -> Result<[u8; 32], Break> {
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(line).map_err(|_| Break::NotJson)?;
    let prev = object.get("prev").ok_or(Break::NoPrev)?;
    let hex =
        prev.as_str().filter(|s| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).ok_or(Break::BadPrev)?;
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex, &mut bytes).map_err(|_| Break::BadPrev)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A trail of `n` lines as the writer would chain them from the start of a file.
    fn trail(n: usize) -> Vec<Vec<u8>> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|i| {
                let mut line = Vec::new();
                chain_line(&mut line, &mut prev, &format!(r#"{{"request_id":"r{i}","status":200}}"#));
                line
            })
            .collect()
    }

    fn check(lines: &[Vec<u8>], allow_continuation: bool) -> Result<usize, (usize, Break)> {
        verify(&lines.concat()[..], allow_continuation).map_err(|e| match e {
            VerifyError::Broken { line, reason } => (line, reason),
            VerifyError::Io(e) => panic!("{e}"),
        })
    }

    #[test]
    fn prev_is_the_first_field_and_the_hash_of_the_previous_line() {
        let lines = trail(2);
        let zeros = "0".repeat(64);
        assert_eq!(lines[0], format!("{{\"prev\":\"{zeros}\",\"request_id\":\"r1\",\"status\":200}}\n").into_bytes());
        let first = &lines[0][..lines[0].len() - 1];
        let expected = format!("{{\"prev\":\"{}\",", hex::encode(sha256(first)));
        assert!(lines[1].starts_with(expected.as_bytes()), "{}", String::from_utf8_lossy(&lines[1]));
        // The rest of the event is untouched, and `{}` gets no dangling comma.
        let (mut out, mut prev) = (Vec::new(), GENESIS);
        chain_line(&mut out, &mut prev, "{}");
        assert_eq!(out, format!("{{\"prev\":\"{zeros}\"}}\n").into_bytes());
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(check(&trail(5), false), Ok(5));
        assert_eq!(check(&[], false), Ok(0));
        // The last line without its newline still counts.
        let mut bytes = trail(3).concat();
        bytes.pop();
        assert_eq!(verify(&bytes[..], false).unwrap(), 3);
    }

    #[test]
    fn an_edited_line_breaks_the_chain_at_its_successor() {
        let mut lines = trail(5);
        let text = String::from_utf8(lines[2].clone()).unwrap().replace("\"status\":200", "\"status\":201");
        lines[2] = text.into_bytes();
        assert_eq!(check(&lines, false), Err((4, Break::Mismatch { previous: 3 })));
        // Editing `prev` itself shows on the edited line.
        let mut lines = trail(5);
        lines[1][10] = if lines[1][10] == b'a' { b'b' } else { b'a' };
        assert_eq!(check(&lines, false), Err((2, Break::Mismatch { previous: 1 })));
    }

    #[test]
    fn a_deleted_line_breaks_the_chain_where_it_was() {
        let mut lines = trail(5);
        lines.remove(2);
        assert_eq!(check(&lines, false), Err((3, Break::Mismatch { previous: 2 })));
        let mut lines = trail(5);
        lines.remove(0);
        assert_eq!(check(&lines, false), Err((1, Break::NotGenesis)));
    }

    #[test]
    fn reordered_lines_break_the_chain_at_the_first_moved_line() {
        let mut lines = trail(5);
        lines.swap(1, 2);
        assert_eq!(check(&lines, false), Err((2, Break::Mismatch { previous: 1 })));
        let mut lines = trail(5);
        lines.swap(3, 4);
        assert_eq!(check(&lines, false), Err((4, Break::Mismatch { previous: 3 })));
    }

    #[test]
    fn lines_that_are_not_chained_json_are_reported() {
        let mut lines = trail(4);
        lines[2] = b"garbage\n".to_vec();
        assert_eq!(check(&lines, false), Err((3, Break::NotJson)));
        lines[2] = b"\n".to_vec();
        assert_eq!(check(&lines, false), Err((3, Break::NotJson)));
        lines[2] = b"[1,2]\n".to_vec();
        assert_eq!(check(&lines, false), Err((3, Break::NotJson)));
        lines[2] = b"{\"status\":200}\n".to_vec();
        assert_eq!(check(&lines, false), Err((3, Break::NoPrev)));
        lines[2] = format!("{{\"prev\":\"{}\"}}\n", "A".repeat(64)).into_bytes();
        assert_eq!(check(&lines, false), Err((3, Break::BadPrev)));
        lines[2] = b"{\"prev\":\"00\"}\n".to_vec();
        assert_eq!(check(&lines, false), Err((3, Break::BadPrev)));
        // Not UTF-8: a broken line, not an unreadable file.
        lines[2] = b"{\"prev\":\"\xff\"}\n".to_vec();
        assert_eq!(check(&lines, false), Err((3, Break::NotJson)));
    }

    #[test]
    fn a_continued_file_verifies_only_when_allowed() {
        let lines = trail(6);
        let rotated = &lines[2..];
        assert_eq!(check(rotated, false), Err((1, Break::NotGenesis)));
        assert_eq!(check(rotated, true), Ok(4));
        // The flag only relaxes the first line.
        let mut rotated = rotated.to_vec();
        rotated.remove(2);
        assert_eq!(check(&rotated, true), Err((3, Break::Mismatch { previous: 2 })));
        let message = VerifyError::Broken { line: 1, reason: Break::NotGenesis }.to_string();
        assert!(message.starts_with("broken at line 1: ") && message.contains("--allow-continuation"), "{message}");
    }

    #[test]
    fn the_last_line_is_found_however_long_it_is() {
        let hash = |bytes: &[u8]| last_line(&mut io::Cursor::new(bytes.to_vec())).unwrap();
        let long = "x".repeat(20_000);
        for (file, last, torn) in [
            (format!("a\n{long}\n"), long.as_str(), false),
            (format!("{long}\n"), long.as_str(), false),
            (format!("a\nb\n{long}"), long.as_str(), true),
            ("a\nb\n".to_owned(), "b", false),
            ("only".to_owned(), "only", true),
        ] {
            let found = hash(file.as_bytes());
            assert_eq!((found.prev, found.torn), (Some(sha256(last.as_bytes())), torn), "{:.20}", file);
        }
        assert_eq!(hash(b"").prev, None);
    }

    async fn send(sink: &AuditSink, text: &str) {
        sink.tx.send(text.to_owned()).await.unwrap();
    }

    #[tokio::test]
    async fn a_restarted_writer_continues_the_chain_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = AuditPath::File(dir.path().join("audit.log"));
        for run in 0..2 {
            let (sink, health, writer) = AuditSink::open(&path).await.unwrap();
            send(&sink, &format!(r#"{{"run":{run},"n":1}}"#)).await;
            send(&sink, &format!(r#"{{"run":{run},"n":2}}"#)).await;
            drop(sink);
            assert_eq!(writer.finish(Duration::from_secs(10)).await, 0);
            assert_eq!(health.write_errors(), 0);
        }
        let bytes = std::fs::read(dir.path().join("audit.log")).unwrap();
        assert_eq!(verify(&bytes[..], false).unwrap(), 4);
        let third: serde_json::Value = serde_json::from_slice(bytes.split(|&b| b == b'\n').nth(2).unwrap()).unwrap();
        assert_eq!((third["run"].as_u64(), third["n"].as_u64()), (Some(1), Some(1)));
    }

    #[tokio::test]
    async fn a_line_cut_short_before_a_restart_stays_visible() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.log");
        let lines = trail(2);
        std::fs::write(&file, [lines.concat(), b"{\"prev\":\"00".to_vec()].concat()).unwrap();
        let (sink, _, writer) = AuditSink::open(&AuditPath::File(file.clone())).await.unwrap();
        send(&sink, r#"{"n":3}"#).await;
        drop(sink);
        writer.finish(Duration::from_secs(10)).await;
        let bytes = std::fs::read(&file).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        let all: Vec<&str> = text.lines().collect();
        assert_eq!(all.len(), 4, "{text}");
        assert_eq!(all[2], "{\"prev\":\"00");
        // The new line chains from the fragment, and verify names the fragment.
        assert!(all[3].starts_with(&format!("{{\"prev\":\"{}\"", hex::encode(sha256(all[2].as_bytes())))));
        assert!(matches!(verify(&bytes[..], false), Err(VerifyError::Broken { line: 3, reason: Break::NotJson })));
    }

    /// A sink that fails (after taking a few bytes of the first failing write) until `working` is set.
    struct Flaky {
        data: Arc<Mutex<Vec<u8>>>,
        working: Arc<AtomicBool>,
        partial: usize,
        failures: Arc<AtomicU64>,
        failed: mpsc::UnboundedSender<()>,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.working.load(Ordering::SeqCst) {
                self.data.lock().unwrap().extend_from_slice(buf);
                return Ok(buf.len());
            }
            if self.partial > 0 {
                let n = self.partial.min(buf.len());
                self.partial -= n;
                self.data.lock().unwrap().extend_from_slice(&buf[..n]);
                return Ok(n);
            }
            self.failures.fetch_add(1, Ordering::SeqCst);
            let _ = self.failed.send(());
            Err(io::Error::from_raw_os_error(28)) // ENOSPC
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_failing_sink_keeps_its_lines_holds_back_new_ones_and_recovers() {
        let data = Arc::new(Mutex::new(Vec::new()));
        let working = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let (failed, mut failed_rx) = mpsc::unbounded_channel();
        let flaky =
            Flaky { data: data.clone(), working: working.clone(), partial: 7, failures: failures.clone(), failed };
        let (sink, health, writer) = AuditSink::start(Box::new(flaky), Continue::default(), 1);

        send(&sink, r#"{"n":1}"#).await;
        failed_rx.recv().await.unwrap();
        // A second attempt means the first failure has been accounted for.
        failed_rx.recv().await.unwrap();
        assert!(!health.is_healthy());
        assert!(health.write_errors() >= 1);
        // The writer takes nothing new while its line is not written: the channel (1 line) fills up and the
        // next `record` would wait.
        send(&sink, r#"{"n":2}"#).await;
        assert!(matches!(sink.tx.try_send(r#"{"n":3}"#.into()), Err(mpsc::error::TrySendError::Full(_))));

        working.store(true, Ordering::SeqCst);
        health.wait_until(AuditHealth::is_healthy).await;
        send(&sink, r#"{"n":3}"#).await;
        drop(sink);
        assert_eq!(writer.finish(Duration::from_secs(10)).await, 0);
        assert!(health.is_healthy());
        assert_eq!(health.write_errors(), failures.load(Ordering::SeqCst));

        // Nothing lost, nothing repeated: the partial write was continued, not started over.
        let data = data.lock().unwrap();
        assert_eq!(verify(&data[..], false).unwrap(), 3, "{}", String::from_utf8_lossy(&data));
        let ns: Vec<u64> = data
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice::<serde_json::Value>(l).unwrap()["n"].as_u64().unwrap())
            .collect();
        assert_eq!(ns, [1, 2, 3]);
    }

    #[tokio::test]
    async fn at_shutdown_a_writer_that_cannot_write_gives_up_and_counts_what_it_lost() {
        let (failed, _failed_rx) = mpsc::unbounded_channel();
        let flaky =
            Flaky { data: Arc::default(), working: Arc::default(), partial: 0, failures: Arc::default(), failed };
        let (sink, health, writer) = AuditSink::start(Box::new(flaky), Continue::default(), 8);
        for n in 0..3 {
            send(&sink, &format!(r#"{{"n":{n}}}"#)).await;
        }
        drop(sink);
        // With no grace left, the writer stops at its next failure: the batch (1-3 lines) plus what it had not
        // taken yet.
        assert_eq!(writer.finish(Duration::ZERO).await, 3);
        assert!(!health.is_healthy());
        assert!(health.write_errors() >= 1);
    }

    /// A sink that takes everything and counts its writes.
    struct Counting(Arc<AtomicU64>);

    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn lines_that_arrive_one_by_one_within_the_gathering_window_go_out_in_one_write() {
        let writes = Arc::new(AtomicU64::new(0));
        let (sink, _, writer) = AuditSink::start(Box::new(Counting(writes.clone())), Continue::default(), 64);
        // Each line is queued after the writer has had its turn (a request at a time, as at low load):
        // without the window, every line was a write and a hand-off to a blocking thread of its own.
        for n in 0..50 {
            send(&sink, &format!(r#"{{"n":{n}}}"#)).await;
            tokio::task::yield_now().await;
        }
        drop(sink);
        assert_eq!(writer.finish(Duration::from_secs(10)).await, 0);
        assert!(writes.load(Ordering::SeqCst) <= 2, "{} writes", writes.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_drains_without_waiting_for_the_window() {
        let writes = Arc::new(AtomicU64::new(0));
        let (sink, _, writer) = AuditSink::start(Box::new(Counting(writes.clone())), Continue::default(), 4096);
        // About ten full batches queued before the writer runs, as after a sink recovers.
        let line = format!(r#"{{"pad":"{}"}}"#, "x".repeat(500));
        for _ in 0..4096 {
            sink.tx.try_send(line.clone()).unwrap(); // never yields: the writer has not run yet
        }
        drop(sink);
        let started = tokio::time::Instant::now();
        // Time stands still but for the writer's own sleeps: only the last, partial batch waits.
        assert_eq!(writer.task.await.unwrap(), 0);
        assert!(writes.load(Ordering::SeqCst) >= 10);
        assert!(started.elapsed() <= GATHER, "waited {:?}", started.elapsed());
    }
}
