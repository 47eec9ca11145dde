//! The legacy HTTP+SSE transport (2024-11-05) sends every answer on the client's GET stream; the message
//! POST itself only gets `202 Accepted`. So when the proxy refuses a message POST that belongs to a live
//! stream (a blocked tool, a rate limit), the JSON-RPC error is delivered on that stream and the POST is
//! answered 202, as the server would: SDK clients then show the error instead of waiting for an answer.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::sync::mpsc;

use super::body::BoxError;
use crate::sync::lock;

/// Live legacy streams by (upstream, upstream session id).
#[derive(Default)]
pub struct LegacyStreams {
    streams: Mutex<HashMap<String, mpsc::Sender<Bytes>>>,
}

fn key(upstream: &str, session: &str) -> String {
    format!("{upstream}\0{session}")
}

impl LegacyStreams {
    /// Queues `event` on the stream of that session; false when there is no such stream (or it is full).
    pub fn deliver(&self, upstream: &str, session: &str, event: Bytes) -> bool {
        let streams = lock(&self.streams);
        streams.get(&key(upstream, session)).is_some_and(|tx| tx.try_send(event).is_ok())
    }

    pub fn len(&self) -> usize {
        lock(&self.streams).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A stream's entry in [`LegacyStreams`], removed when the stream's body is dropped.
pub struct Registration {
    streams: Arc<LegacyStreams>,
    tx: mpsc::Sender<Bytes>,
    key: Mutex<Option<String>>,
}

impl Registration {
    /// Makes the stream reachable for `session` (called once its `endpoint` event names the session).
    pub fn register(&self, upstream: &str, session: &str) {
        let key = key(upstream, session);
        let mut mine = lock(&self.key);
        let mut streams = lock(&self.streams.streams);
        if let Some(old) = mine.take() {
            self.remove_if_mine(&mut streams, &old);
        }
        streams.insert(key.clone(), self.tx.clone());
        *mine = Some(key);
    }

    /// Removes `key` only while it still points at this stream: a newer stream of the same session
    /// keeps its entry.
    fn remove_if_mine(&self, streams: &mut HashMap<String, mpsc::Sender<Bytes>>, key: &str) {
        if streams.get(key).is_some_and(|tx| tx.same_channel(&self.tx)) {
            streams.remove(key);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(key) = lock(&self.key).take() {
            let mut streams = lock(&self.streams.streams);
            self.remove_if_mine(&mut streams, &key);
        }
    }
}

/// A stream's registration (not yet registered under a session) and the receiving end of its queue,
/// for [`Injected::new`].
pub fn registration(streams: &Arc<LegacyStreams>) -> (Arc<Registration>, mpsc::Receiver<Bytes>) {
    let (tx, rx) = mpsc::channel(16);
    (Arc::new(Registration { streams: streams.clone(), tx, key: Mutex::new(None) }), rx)
}

/// A GET stream's body with the events queued through its [`Registration`] sent between its own.
/// `inner` must yield whole events (an [`super::sse::EventRewrite`] does), so an injected event never
/// splits one.
pub struct Injected<B> {
    inner: B,
    rx: mpsc::Receiver<Bytes>,
    _registration: Arc<Registration>,
}

impl<B> Injected<B> {
    pub fn new(inner: B, rx: mpsc::Receiver<Bytes>, registration: Arc<Registration>) -> Self {
        Injected { inner, rx, _registration: registration }
    }
}

impl<B> Body for Injected<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(Some(event)) = self.rx.poll_recv(cx) {
            return Poll::Ready(Some(Ok(Frame::data(event))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }
}
