//! W3C trace context (<https://www.w3.org/TR/trace-context/>): a request keeps the client's
//! `traceparent` on its way to the upstream, or gets a new one, and its trace id goes into the audit
//! line and every log line of the request, so a call can be followed across services.
//!
//! The proxy records no spans of its own, so a valid `traceparent` is forwarded as it came (with its
//! `tracestate`), as the spec allows an intermediary that does not trace. An absent or invalid one
//! starts a new trace (flags `01`: the proxy records the call, in its audit trail); `tracestate` is
//! then dropped, since it belongs to the trace it came with.

use http::{HeaderMap, HeaderValue};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// The `traceparent` a request is forwarded with.
#[derive(Debug, Clone)]
pub struct TraceContext {
    header: HeaderValue,
    /// True when the proxy started this trace (the client's, if any, was absent or invalid).
    started: bool,
}

impl TraceContext {
    /// The client's `traceparent` when there is exactly one and it is valid, else a new trace.
    pub fn from_headers(headers: &HeaderMap) -> TraceContext {
        let mut values = headers.get_all(TRACEPARENT).iter();
        match (values.next(), values.next()) {
            (Some(value), None) if valid(value.as_bytes()) => TraceContext { header: value.clone(), started: false },
            _ => TraceContext::start(),
        }
    }

    pub fn start() -> TraceContext {
        let ids: [u8; 24] = rand::random();
        let mut text = *b"00-00000000000000000000000000000000-0000000000000000-01";
        // Lowercase hex into the two id fields; one allocation, the header's.
        let (trace_id, parent_id) = text[3..52].split_at_mut(32);
        hex::encode_to_slice(&ids[..16], trace_id).unwrap_or_default();
        hex::encode_to_slice(&ids[16..], &mut parent_id[1..]).unwrap_or_default();
        // Lowercase hex and dashes: always a valid header value.
        let header = HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static(""));
        TraceContext { header, started: true }
    }

    /// The 32 hex digits of the trace id.
    pub fn trace_id(&self) -> &str {
        // `valid` checked that a client's value has them there (hex, whatever follows in a later
        // version); a new one is built so.
        let id = self.header.as_bytes().get(3..35).unwrap_or_default();
        std::str::from_utf8(id).unwrap_or_default()
    }

    /// Sets the request's `traceparent` for the upstream (dropping `tracestate` of a trace that was
    /// not kept).
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.header.clone());
        if self.started {
            headers.remove(TRACESTATE);
        }
    }
}

/// `version-traceid-parentid-flags`, lowercase hex. Version `ff` is invalid; a later version than 00 may
/// add fields after a dash, which are kept.
fn valid(v: &[u8]) -> bool {
    let hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let zero = |s: &[u8]| s.iter().all(|&b| b == b'0');
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return false;
    }
    let (version, trace_id, parent_id, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..55]);
    let layout = match version {
        b"00" => v.len() == 55,
        _ => v.len() == 55 || v[55] == b'-',
    };
    layout
        && hex(version)
        && version != b"ff"
        && hex(trace_id)
        && !zero(trace_id)
        && hex(parent_id)
        && !zero(parent_id)
        && hex(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn context(values: &[&str]) -> TraceContext {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(TRACEPARENT, HeaderValue::from_str(v).unwrap());
        }
        TraceContext::from_headers(&headers)
    }

    #[test]
    fn a_valid_traceparent_is_kept_with_its_tracestate() {
        let trace = context(&[GOOD]);
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut headers = HeaderMap::new();
        headers.insert(TRACESTATE, HeaderValue::from_static("vendor=1"));
        trace.apply(&mut headers);
        assert_eq!(headers[TRACEPARENT], GOOD);
        assert_eq!(headers[TRACESTATE], "vendor=1");
        // A later version may carry more fields.
        let later = format!("cc{}-extra", &GOOD[2..]);
        assert_eq!(context(&[&later]).trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        // Even when a later field is not ASCII.
        let mut headers = HeaderMap::new();
        let odd = [format!("01{}-", &GOOD[2..]).into_bytes(), vec![0xe9]].concat();
        headers.insert(TRACEPARENT, HeaderValue::from_bytes(&odd).unwrap());
        let trace = TraceContext::from_headers(&headers);
        assert!(!trace.started);
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut out = HeaderMap::new();
        trace.apply(&mut out);
        assert_eq!(out[TRACEPARENT].as_bytes(), &odd[..], "forwarded as it came");
    }

    #[test]
    fn an_absent_or_invalid_traceparent_starts_a_new_trace() {
        let bad = [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero parent id
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // 00 has no more fields
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  // short
            "garbage",
        ];
        for value in bad {
            let trace = context(&[value]);
            assert!(trace.started, "{value}");
            assert_ne!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        }
        assert!(context(&[GOOD, GOOD]).started, "two traceparent headers are ambiguous");
        let new = context(&[]);
        assert!(new.started);
        assert!(valid(new.header.as_bytes()), "{:?}", new.header);
        assert_ne!(new.trace_id(), TraceContext::start().trace_id());
        let mut headers = HeaderMap::new();
        headers.insert(TRACESTATE, HeaderValue::from_static("vendor=1"));
        new.apply(&mut headers);
        assert!(headers.get(TRACESTATE).is_none(), "tracestate belongs to the trace it came with");
    }
}
