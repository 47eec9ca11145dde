//! Event streams end at shutdown.
//!
//! A GET event stream (MCP's server-to-client channel) stays open for as long as the client likes: waiting
//! for it would spend the whole `shutdown_grace` and then cut it anywhere. MCP clients reconnect when it
//! ends, so at shutdown it ends cleanly between two events (a client never sees half of one). Answers to
//! POSTs, event streams or not, are left to finish.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderMap, Method, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::proxy::body::{BoxError, ProxyBody};

/// Whether the answer to a `method` request with these headers is a stream that ends at shutdown.
pub fn ends_at_shutdown(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::GET
        && headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().to_ascii_lowercase().starts_with("text/event-stream"))
}

/// `body`, ended at the first event boundary once `shutdown` is cancelled.
pub fn end_at_shutdown(body: ProxyBody, shutdown: CancellationToken) -> ProxyBody {
    EndAtShutdown { inner: body, shutdown: Box::pin(shutdown.cancelled_owned()), draining: false, tail: Vec::new() }
        .boxed()
}

struct EndAtShutdown {
    inner: ProxyBody,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    draining: bool,
    /// The last bytes sent (at most 4: enough to see whether they end an event).
    tail: Vec<u8>,
}

impl Body for EndAtShutdown {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if !this.draining && this.shutdown.as_mut().poll(cx).is_ready() {
            this.draining = true;
        }
        if this.draining && ends_an_event(&this.tail) {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()).and_then(Frame::data_ref) {
            this.tail.extend_from_slice(&data[data.len().saturating_sub(4)..]);
            let excess = this.tail.len().saturating_sub(4);
            this.tail.drain(..excess);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    /// Unknown: the body may end before the upstream's does.
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Whether a stream whose bytes so far end with `tail` is between events: nothing was sent yet, or the last
/// line terminator (CRLF, LF or CR) ends an empty line.
fn ends_an_event(tail: &[u8]) -> bool {
    if tail.is_empty() {
        return true;
    }
    let line = tail.strip_suffix(b"\r\n").or_else(|| tail.strip_suffix(b"\n")).or_else(|| tail.strip_suffix(b"\r"));
    matches!(line.and_then(<[u8]>::last), Some(b'\n' | b'\r'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_cut_mid_event_ends_after_the_event() {
        let (mut tx, channel) = http_body_util::channel::Channel::<Bytes, BoxError>::new(4);
        let shutdown = CancellationToken::new();
        let mut body = end_at_shutdown(channel.boxed(), shutdown.clone());
        tx.send_data(Bytes::from_static(b"data: a\n\ndata: b")).await.unwrap();
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "data: a\n\ndata: b");
        shutdown.cancel();
        tx.send_data(Bytes::from_static(b"\n\n")).await.unwrap();
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "\n\n");
        // The event is complete: the body ends although the source is still open.
        assert!(body.frame().await.is_none());
        drop(tx);
    }

    #[test]
    fn event_boundaries() {
        for tail in [&b""[..], b"a\n\n", b"\r\n\r\n", b"a\r\r", b"\n\r\n", b"a\n\r"] {
            assert!(ends_an_event(tail), "{tail:?}");
        }
        for tail in [&b"data"[..], b"ta\n", b"a\r\n", b"a\n:"] {
            assert!(!ends_an_event(tail), "{tail:?}");
        }
    }
}
