//! One connection's life: its requests in flight, the idle timer and the graceful close.
//!
//! hyper's own timers do not end idle connections: HTTP/2 keep-alive pings keep one with no requests open
//! for ever, and an HTTP/1 keep-alive connection waits for its next request as long as the client likes. A
//! few such connections would fill `max_connections`. So each connection is driven here: a request is in
//! flight from the moment hyper hands it to the service until its response body is finished or dropped
//! (an open SSE stream is in flight; pings are no requests), and a connection with nothing in flight for
//! its idle period is closed gracefully (GOAWAY for HTTP/2, a close for HTTP/1).
//!
//! A request whose answer waits on the client counts as idle too: a client that takes nothing (an HTTP/2
//! window left at zero, an HTTP/1 socket never read) would otherwise keep its requests in flight, and its
//! connection open, for ever. An answer waits on the client from the moment it is handed to hyper, and
//! again after each frame, until hyper asks for more; an SSE stream waiting for its next event waits on
//! the upstream, and is busy. A connection whose every request waits on the client, with no progress for
//! an idle period, is closed like an idle one (nginx's `send_timeout`).

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;
use tokio_util::sync::CancellationToken;

/// The idle periods of a connection.
#[derive(Clone, Copy)]
pub struct Timing {
    /// Before the first request (a client that connects and sends nothing): what is left of
    /// `header_read_timeout` since the connect.
    pub first_request: Duration,
    /// For the client's part of a graceful close: `header_read_timeout`.
    pub closing: Duration,
    /// After a request, until the next one begins: `idle_timeout`.
    pub idle: Duration,
}

/// How the answers in flight are doing. Atomics: they change with every request and every frame, and
/// nobody needs waking for that; `idle` looks at them once a period.
#[derive(Default)]
struct Progress {
    in_flight: AtomicUsize,
    /// Requests begun or ended since the connection opened: unchanged over a period means none did.
    changes: AtomicU64,
    /// Answers handed to hyper (or that gave it a frame) that it has not asked for more of since.
    waiting_on_client: AtomicUsize,
    /// Polls of any answer's body: unchanged over a period means nothing moved.
    polls: AtomicU64,
}

/// The requests in flight on one connection, shared by its service and its response bodies.
#[derive(Clone, Default)]
pub struct Requests(Arc<Progress>);

impl Requests {
    /// Counts a request as in flight until the returned guard is dropped.
    pub fn begin(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        self.0.changes.fetch_add(1, Ordering::Relaxed);
        InFlight(self.0.clone())
    }
}

/// One request in flight.
pub struct InFlight(Arc<Progress>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.changes.fetch_add(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight until it is finished or dropped, and tells whether
/// it waits on the client.
pub struct Tracked<B> {
    inner: B,
    request: Option<InFlight>,
    waiting_on_client: bool,
}

impl<B> Tracked<B> {
    /// The answer is handed to hyper: until hyper polls it, it waits on the client (for its window).
    pub fn new(inner: B, request: InFlight) -> Self {
        request.0.waiting_on_client.fetch_add(1, Ordering::Relaxed);
        Tracked { inner, request: Some(request), waiting_on_client: true }
    }

    fn set_waiting(&mut self, waiting: bool) {
        if let Some(request) = &self.request
            && waiting != self.waiting_on_client
        {
            match waiting {
                true => request.0.waiting_on_client.fetch_add(1, Ordering::Relaxed),
                false => request.0.waiting_on_client.fetch_sub(1, Ordering::Relaxed),
            };
            self.waiting_on_client = waiting;
        }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.set_waiting(false);
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.set_waiting(false);
        if let Some(request) = &self.request {
            request.0.polls.fetch_add(1, Ordering::Relaxed);
        }
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.request = None,
            // Until hyper asks for the next frame, the client has this one to take.
            Some(_) => self.set_waiting(true),
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
        let mut closing = false;
        loop {
            let period = move |started: bool| match (closing, started) {
                (true, _) => timing.closing,
                (false, true) => timing.idle,
                (false, false) => timing.first_request,
            };
            tokio::select! {
                _ = conn.as_mut() => return,
                () = shutdown.cancelled(), if !closing => {}
                started = idle(&requests, period) => if closing || !started {
                    tracing::debug!(started, "dropped a connection that stayed idle");
                    return;
                },
            }
            conn.as_mut().graceful_shutdown();
            closing = true;
        }
    }
}

/// Resolves once the connection has been idle for `period(started)`, where `started` tells whether a
/// request was ever made on it; returns `started`. Idle: nothing in flight, or every request in flight
/// waiting on the client with no progress at all for the period. Checked once a period (or, before the
/// first request, once the shorter of the two periods) rather than woken by every request: a timer reset
/// per request cost more than the check. A connection is thus closed between one and two periods after
/// it went idle.
async fn idle(requests: &Requests, period: impl Fn(bool) -> Duration) -> bool {
    let load = &requests.0;
    let mut seen = (load.changes.load(Ordering::Relaxed), load.polls.load(Ordering::Relaxed));
    let mut quiet = Duration::ZERO;
    loop {
        let started = seen.0 > 0;
        let base = if started { period(true) } else { period(false).min(period(true)) };
        // The last step takes only what is left of the period, so the bound is exact when nothing happens.
        let step = base.min(period(started) - quiet);
        tokio::time::sleep(step).await;
        let now = (load.changes.load(Ordering::Relaxed), load.polls.load(Ordering::Relaxed));
        if now.0 != seen.0 {
            // A request began or ended: start over.
            (seen, quiet) = (now, Duration::ZERO);
            continue;
        }
        quiet += step;
        if quiet < period(started) {
            continue;
        }
        let in_flight = load.in_flight.load(Ordering::Relaxed);
        if in_flight == 0 {
            return started;
        }
        if now.1 == seen.1 && load.waiting_on_client.load(Ordering::Relaxed) >= in_flight {
            tracing::debug!(in_flight, "closing a connection whose client takes nothing");
            return started;
        }
        (seen, quiet) = (now, Duration::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    const FIRST: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(3);

    fn period(started: bool) -> Duration {
        if started { IDLE } else { FIRST }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_is_idle_after_exactly_the_first_request_period() {
        // Checked in idle-period steps (3 s), but the last step takes only what is left of the 10 s.
        let started = Instant::now();
        assert!(!idle(&Requests::default(), period).await);
        assert_eq!(started.elapsed(), FIRST);
    }

    #[tokio::test(start_paused = true)]
    async fn after_its_last_request_a_connection_is_idle_within_one_to_two_idle_periods() {
        let requests = Requests::default();
        let check = tokio::spawn({
            let requests = requests.clone();
            async move { idle(&requests, period).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ended = {
            let _request = requests.begin();
            tokio::time::sleep(Duration::from_secs(5)).await; // in flight across several checks
            Instant::now()
        };
        assert!(check.await.unwrap());
        let after = ended.elapsed();
        assert!(after >= IDLE && after <= 2 * IDLE, "idle {after:?} after the last request");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_flight_that_moves_keeps_the_connection() {
        let requests = Requests::default();
        let _request = requests.begin();
        // Handed to hyper and not asked for more since: it would count as stalled if nothing moved.
        requests.0.waiting_on_client.fetch_add(1, Ordering::Relaxed);
        let moving = async {
            loop {
                requests.0.polls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        tokio::select! {
            _ = idle(&requests, period) => panic!("closed a connection whose answer moves"),
            () = moving => unreachable!(),
            () = tokio::time::sleep(10 * IDLE) => {}
        }
    }
}
