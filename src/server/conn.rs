//! One connection's life: its requests in flight, the idle timer and the graceful close.
//!
//! hyper's own timers do not end idle connections: HTTP/2 keep-alive pings keep one with no requests open
//! for ever, and an HTTP/1 keep-alive connection waits for its next request as long as the client likes. A
//! few such connections would fill `max_connections`. So each connection is driven here: a request is in
//! flight from the moment hyper hands it to the service until its response body is finished or dropped
//! (an open SSE stream is in flight; pings are no requests), and a connection with nothing in flight for
//! its idle period is closed gracefully (GOAWAY for HTTP/2, a close for HTTP/1).

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The idle periods of a connection.
#[derive(Clone, Copy)]
pub struct Timing {
    /// Before the first request (a client that connects and sends nothing), and for the client's part of
    /// a graceful close: `header_read_timeout`.
    pub first_request: Duration,
    /// After a request, until the next one begins: `idle_timeout`.
    pub idle: Duration,
}

#[derive(Default)]
struct Load {
    in_flight: usize,
    started: bool,
}

/// The requests in flight on one connection, shared by its service and its response bodies.
#[derive(Clone, Default)]
pub struct Requests(Arc<watch::Sender<Load>>);

impl Requests {
    /// Counts a request as in flight until the returned guard is dropped.
    pub fn begin(&self) -> InFlight {
        self.0.send_modify(|load| {
            load.in_flight += 1;
            load.started = true;
        });
        InFlight(self.0.clone())
    }
}

/// One request in flight.
pub struct InFlight(Arc<watch::Sender<Load>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|load| load.in_flight -= 1);
    }
}

/// A response body that keeps its request in flight until it is finished or dropped.
pub struct Tracked<B> {
    inner: B,
    request: Option<InFlight>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, request: InFlight) -> Self {
        Tracked { inner, request: Some(request) }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if frame.is_none() {
            self.request = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `conn` until it ends. With nothing in flight for the idle period it is closed gracefully, and so
/// it is when `shutdown` is cancelled (in-flight requests finish; the caller bounds that wait). A
/// connection that never started a request, or still has not closed one `first_request` period after
/// its graceful close (a client that does not answer the GOAWAY's ping), is dropped.
#[allow(clippy::manual_async_fn)] // the explicit `Send`, see below
pub fn drive<C>(
    conn: C,
    requests: Requests,
    timing: Timing,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send
where
    C: GracefulConnection + Send,
{
    // Spelled out as `impl Future + Send` so the compiler proves `Send` here, for any `C`: inferred at the
    // spawn site instead, it trips over the higher-ranked `Into<BoxError>` bounds of the connection.
    async move {
        let mut conn = pin!(conn);
        let mut load = requests.0.subscribe();
        let mut closing = false;
        loop {
            let period = move |started: bool| if started && !closing { timing.idle } else { timing.first_request };
            tokio::select! {
                _ = conn.as_mut() => return,
                () = shutdown.cancelled(), if !closing => {}
                started = idle(&mut load, period) => if closing || !started {
                    tracing::debug!(started, "dropped a connection that stayed idle");
                    return;
                },
            }
            conn.as_mut().graceful_shutdown();
            closing = true;
        }
    }
}

/// Resolves once nothing has been in flight for `period(started)`, where `started` tells whether a request
/// was ever made on the connection; returns `started`.
async fn idle(load: &mut watch::Receiver<Load>, period: impl Fn(bool) -> Duration) -> bool {
    loop {
        // The sender lives as long as the connection's service: these fail only once it is gone.
        let Ok(started) = load.wait_for(|load| load.in_flight == 0).await.map(|l| l.started) else { return false };
        if tokio::time::timeout(period(started), load.changed()).await.is_err() {
            return started;
        }
    }
}
