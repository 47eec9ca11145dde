//! Event-by-event rewriting of a `text/event-stream` body.
//!
//! Bytes are held only until the event they belong to is complete (a blank line ends an event), then
//! passed on, rewritten if the rewrite function says so. A stream is never buffered whole, and events
//! that are not rewritten go out as the very bytes that came in.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};

use super::body::BoxError;

/// The most an event may grow to while it is held; a larger one fails the stream rather than being
/// passed on unchecked.
pub const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// One event as an EventSource client reads it (WHATWG HTML, "server-sent events"): its `event:` type,
/// its `id:`, and its `data:` lines joined by `\n`. The bytes are decoded as UTF-8 with replacement
/// characters, as clients decode them, so what the proxy checks is what the client will see.
#[derive(Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: Option<String>,
    pub id: Option<String>,
    /// `None` when the event has no `data:` line: a client dispatches nothing for it.
    pub data: Option<String>,
}

impl Event {
    /// Whether a client hands this event to its JSON-RPC layer: MCP messages are events of the default
    /// type, `message`, which an absent or empty `event:` also means. (The SDKs ignore other types,
    /// except the legacy transport's `endpoint`.)
    pub fn is_message(&self) -> bool {
        self.data.is_some() && self.kind.as_deref().is_none_or(|k| k.is_empty() || k == "message")
    }
}

/// Parses one event; `raw` is the event, blank-line terminator included (or whatever is left at the end
/// of a stream). Every field is read as a client reads it: lines end with CRLF, LF or CR, the field name
/// is up to the first `:`, one space after it is dropped, and a line without `:` is a field with an
/// empty value.
pub fn parse(raw: &[u8]) -> Event {
    let text = String::from_utf8_lossy(raw);
    let mut event = Event { kind: None, id: None, data: None };
    for line in text.split(['\n', '\r']).filter(|l| !l.is_empty()) {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event.kind = Some(value.to_owned()),
            "id" if !value.contains('\0') => event.id = Some(value.to_owned()),
            "data" => match &mut event.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => event.data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
    event
}

/// Serializes an event with the given type, id and data (multi-line data becomes several `data:` lines).
pub fn render(kind: Option<&str>, id: Option<&str>, data: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 32);
    for (field, value) in [("event: ", kind), ("id: ", id)] {
        if let Some(value) = value {
            out.extend_from_slice(field.as_bytes());
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        }
    }
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// The UTF-8 byte order mark, which a client skips at the very start of a stream.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// End of the first complete event in `buf` (just past the blank line that ends it), if there is one.
/// Lines end with CRLF, LF or CR (the SSE grammar); a CR at the very end of `buf` may be the first half
/// of a CRLF, so the answer waits for the next byte.
fn event_end(buf: &[u8]) -> Option<usize> {
    scan(buf, Resume::default()).ok()
}

/// Where a scan that found no complete event stopped, to go on from there when more bytes arrive: an
/// event that arrives in many small frames, even one long line, is scanned once, not once per frame.
#[derive(Clone, Copy)]
struct Resume {
    at: usize,
    /// Whether the line `at` is in has no byte yet (a line end there would end the event).
    line_empty: bool,
}

impl Default for Resume {
    fn default() -> Self {
        Resume { at: 0, line_empty: true }
    }
}

/// As [`event_end`], resuming where an earlier scan of the same event stopped.
fn scan(buf: &[u8], from: Resume) -> Result<usize, Resume> {
    let mut line_empty = from.line_empty;
    let mut i = from.at;
    while i < buf.len() {
        let terminator = match buf[i] {
            b'\n' => 1,
            b'\r' => match buf.get(i + 1) {
                Some(b'\n') => 2,
                Some(_) => 1,
                None => return Err(Resume { at: i, line_empty }),
            },
            _ => {
                line_empty = false;
                i += 1;
                continue;
            }
        };
        i += terminator;
        if line_empty {
            return Ok(i);
        }
        line_empty = true;
    }
    Err(Resume { at: i, line_empty })
}

/// A body that passes `inner`'s events through `rewrite`: `Some(bytes)` replaces the event, `None`
/// keeps it as it came.
pub struct EventRewrite<B, F> {
    inner: B,
    buf: BytesMut,
    /// Where the next scan of `buf` goes on (no event ends before it).
    scanned: Resume,
    rewrite: F,
    /// No byte has been passed on yet: a leading BOM may still be on its way.
    at_start: bool,
    ended: bool,
}

impl<B, F> EventRewrite<B, F> {
    pub fn new(inner: B, rewrite: F) -> Self {
        EventRewrite { inner, buf: BytesMut::new(), scanned: Resume::default(), rewrite, at_start: true, ended: false }
    }
}

impl<B, F> EventRewrite<B, F>
where
    F: FnMut(&[u8]) -> Option<Vec<u8>>,
{
    /// Takes every complete event out of the buffer, rewritten where asked.
    fn complete_events(&mut self) -> Option<Bytes> {
        // A client skips one BOM at the start of the stream and reads the first event after it. The
        // proxy drops every BOM there: had it dropped one and passed on a second, the client would skip
        // that one too and read a field the proxy had taken for another (`\u{FEFF}data`, then `data`).
        // What goes on starts with no BOM, so the client reads it exactly as it was checked.
        if self.at_start {
            loop {
                if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) && !self.ended {
                    return None;
                }
                if !self.buf.starts_with(BOM) {
                    break;
                }
                let _ = self.buf.split_to(BOM.len());
            }
            self.at_start = false;
        }
        let first = match scan(&self.buf, self.scanned) {
            Ok(len) => len,
            Err(resume) => {
                self.scanned = resume;
                return None;
            }
        };
        let mut end = 0;
        let mut out: Option<BytesMut> = None;
        let mut next = Some(first);
        while let Some(len) = next {
            let event = &self.buf[end..end + len];
            match (self.rewrite)(event) {
                Some(new) => out.get_or_insert_with(|| BytesMut::from(&self.buf[..end])).extend_from_slice(&new),
                None => {
                    if let Some(out) = &mut out {
                        out.extend_from_slice(event);
                    }
                }
            }
            end += len;
            next = event_end(&self.buf[end..]);
        }
        self.scanned = Resume::default();
        let taken = self.buf.split_to(end).freeze();
        Some(out.map_or(taken, BytesMut::freeze))
    }
}

impl<B, F> Body for EventRewrite<B, F>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
    F: FnMut(&[u8]) -> Option<Vec<u8>> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(events) = this.complete_events() {
                return Poll::Ready(Some(Ok(Frame::data(events))));
            }
            // What is left is one unfinished event: bounded, however its frames are cut.
            if this.buf.len() > MAX_EVENT_BYTES {
                return Poll::Ready(Some(Err("server-sent event larger than 8 MiB".into())));
            }
            if this.ended {
                // What is left has no blank line after it, but a client may still dispatch it (a CR at the
                // very end ends a line): it goes through the rewrite like any event.
                let rest = this.buf.split().freeze();
                if rest.is_empty() {
                    return Poll::Ready(None);
                }
                let rest = (this.rewrite)(&rest).map_or(rest, Bytes::from);
                return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.ended = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.buf.extend_from_slice(&data),
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;

    /// A body that yields the given chunks, one frame each.
    struct Chunks(VecDeque<&'static [u8]>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(Bytes::from_static(c)))))
        }
    }

    fn chunks(parts: &[&'static str]) -> Chunks {
        Chunks(parts.iter().map(|p| p.as_bytes()).collect())
    }

    #[tokio::test]
    async fn events_split_across_chunks_are_rewritten_whole_and_others_pass_untouched() {
        let body =
            chunks(&["event: message\ndata: keep\n\nevent: mess", "age\ndata: swap\n", "\n: comment\n\ndata: tail"]);
        let rewrite = |raw: &[u8]| {
            let event = parse(raw);
            (event.data.as_deref() == Some("swap")).then(|| render(event.kind.as_deref(), None, "swapped"))
        };
        let out = EventRewrite::new(body, rewrite).collect().await.unwrap().to_bytes();
        assert_eq!(out, "event: message\ndata: keep\n\nevent: message\ndata: swapped\n\n: comment\n\ndata: tail");
    }

    #[test]
    fn parsing_and_line_endings() {
        assert_eq!(event_end(b"data: a\r\n\r\nrest"), Some(11));
        assert_eq!(event_end(b"data: a\n\nrest"), Some(9));
        assert_eq!(event_end(b"data: a\r\rrest"), Some(9));
        assert_eq!(event_end(b"data: a\n\r\nrest"), Some(10));
        assert_eq!(event_end(b"data: a\r\n\rxrest"), Some(10));
        assert_eq!(event_end(b"data: a\n\rx"), Some(9));
        assert_eq!(event_end(b"data: a\n\r"), None, "CR at the end may be half of a CRLF");
        assert_eq!(event_end(b"data: a\r\ndata: b"), None);
        let e = parse(b"event: endpoint\r\nid: 7\r\ndata: /messages?x=1\r\n\r\n");
        assert_eq!(
            e,
            Event { kind: Some("endpoint".into()), id: Some("7".into()), data: Some("/messages?x=1".into()) }
        );
        assert!(!e.is_message());
        let e = parse(b"data: {\"a\":\ndata: 1}\n\n");
        assert_eq!(e.data.as_deref(), Some("{\"a\":\n1}"));
        assert!(e.is_message());
        assert_eq!(parse(b": keepalive\n\n").data, None);
        assert_eq!(parse(b"data\n\n").data.as_deref(), Some(""), "a line without a colon is a field");
        assert!(parse(b"event:\ndata: x\n\n").is_message(), "an empty type is the default type");
        assert!(!parse(b"event: other\ndata: x\n\n").is_message());
        assert_eq!(parse(b"data: a\xffb\n\n").data.as_deref(), Some("a\u{fffd}b"), "decoded as clients do");
    }

    #[tokio::test]
    async fn events_cut_into_single_bytes_come_out_as_from_one_frame() {
        let stream: &'static [u8] = b"data: a\r\n\r\ndata: swap\r\rdata: long line\ndata: x\n\r\nevent: e\r\n\n";
        let rewrite = |raw: &[u8]| {
            let event = parse(raw);
            (event.data.as_deref() == Some("swap")).then(|| render(None, None, "swapped"))
        };
        let whole = EventRewrite::new(Chunks([stream].into()), rewrite).collect().await.unwrap().to_bytes();
        let bytes = Chunks(stream.chunks(1).collect());
        let cut = EventRewrite::new(bytes, rewrite).collect().await.unwrap().to_bytes();
        assert_eq!(cut, whole);
        assert_eq!(&whole[..], b"data: a\r\n\r\ndata: swapped\n\ndata: long line\ndata: x\n\r\nevent: e\r\n\n");
    }

    #[tokio::test]
    async fn a_leading_bom_is_dropped_and_a_last_unterminated_event_is_rewritten_too() {
        let rewrite = |raw: &[u8]| {
            let event = parse(raw);
            (event.data.as_deref() == Some("swap")).then(|| render(None, None, "swapped"))
        };
        let body = Chunks([&b"\xef\xbb"[..], b"\xbfdata: swap\n\n", b"data: keep\n\ndata: swap\n\r"].into());
        let out = EventRewrite::new(body, rewrite).collect().await.unwrap().to_bytes();
        assert_eq!(out, "data: swapped\n\ndata: keep\n\ndata: swapped\n\n");
        // Two BOMs: a client would skip the one passed on, so none is, and the event is checked as data.
        let body = Chunks([&b"\xef\xbb\xbf\xef"[..], b"\xbb\xbfdata: swap\n\n"].into());
        let out = EventRewrite::new(body, rewrite).collect().await.unwrap().to_bytes();
        assert_eq!(out, "data: swapped\n\n");
    }
}
