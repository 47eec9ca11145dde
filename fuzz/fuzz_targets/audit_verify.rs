//! `telemetry::audit::verify` on arbitrary bytes, with and without `allow_continuation`, and a round trip
//! through the writer's own chaining (`telemetry::audit::chain_line`).
//!
//! Properties:
//! - no panic; `Ok(n)` counts the lines; a break is reported at an existing line;
//! - a file that verifies from genesis also verifies as a continuation, with the same count; a break that
//!   is not about the first line's genesis is the same break either way;
//! - events built from the input (as `AuditSink::record` serializes them) and chained by `chain_line`
//!   verify, and an edit to any line but the last is reported as a mismatch on the next line. A piece
//!   that is a JSON-RPC body `inspect` accepts is recorded with its id, as the proxy records it: whatever
//!   the proxy can write, `verify` must accept.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_tenant_proxy::policy::mcp::inspect;
use mcp_tenant_proxy::telemetry::audit::{AuditEvent, AuditSink, Break, GENESIS, VerifyError, chain_line, verify};

fn lines_in(data: &[u8]) -> usize {
    let newlines = data.iter().filter(|&&b| b == b'\n').count();
    newlines + usize::from(data.last().is_some_and(|&b| b != b'\n'))
}

fn broken(result: &Result<usize, VerifyError>) -> Option<(usize, Break)> {
    match result {
        Ok(_) => None,
        Err(VerifyError::Broken { line, reason }) => Some((*line, reason.clone())),
        Err(VerifyError::Io(e)) => panic!("reading a slice failed: {e}"),
    }
}

fn check_arbitrary(data: &[u8]) {
    let lines = lines_in(data);
    let strict = verify(data, false);
    let continued = verify(data, true);
    for result in [&strict, &continued] {
        match result {
            Ok(n) => assert_eq!(*n, lines),
            Err(_) => {
                let (line, _) = broken(result).unwrap();
                assert!((1..=lines).contains(&line), "break at line {line} of {lines}");
            }
        }
    }
    match (broken(&strict), broken(&continued)) {
        (None, c) => assert_eq!(c, None, "verifies from genesis but not as a continuation"),
        (Some((1, Break::NotGenesis)), _) => {}
        (s, c) => assert_eq!(s, c, "the same break should be found either way"),
    }
}

fn event_for(piece: &str, i: usize) -> String {
    // A piece that is a JSON-RPC body the proxy accepts is recorded with its id, as the proxy records it.
    let rpc = inspect(piece.as_bytes()).ok();
    let jsonrpc_id = rpc.as_ref().and_then(|rpc| rpc.error_id());
    let event = AuditEvent {
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
        request_id: piece,
        method: "POST",
        path: piece,
        key_id: Some(piece),
        key_kind: Some("standard"),
        requested_user: (i % 2 == 0).then_some(piece),
        acting_user: Some(piece),
        user_proof: (i % 3 == 0).then_some("token"),
        token_issuer: (i % 3 == 0).then_some(piece),
        decision: "allow",
        reason: "ok",
        fallback: i % 3 == 0,
        upstream: Some(piece),
        mcp_method: Some(piece),
        jsonrpc_id,
        tool: Some(piece),
        prompt: None,
        resource: None,
        rate_limit_level: None,
        session: None,
        status: 200,
        latency_ms: i as f64 / 3.0,
    };
    AuditSink::line(&event)
}

fn check_round_trip(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let pieces: Vec<&str> = text.split('\u{1}').take(8).collect();
    let mut prev = GENESIS;
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let mut line = Vec::new();
        chain_line(&mut line, &mut prev, &event_for(piece, i));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "a chained event is one line");
        assert!(line.is_ascii(), "audit lines are ASCII, so no reader splits them elsewhere");
        lines.push(line);
    }
    let file = lines.concat();
    assert_eq!(verify(&file[..], false).unwrap(), lines.len(), "the writer's own chain does not verify");
    assert_eq!(verify(&file[..], true).unwrap(), lines.len());
    if lines.len() >= 2 {
        // Edit one line (still JSON, other bytes): the next line's `prev` no longer matches.
        let k = data.len() % (lines.len() - 1);
        let mut edited = lines.clone();
        let line = &mut edited[k];
        let close = line.len() - 2; // the final `}` before the newline
        line.insert(close, b' ');
        let result = verify(&edited.concat()[..], false);
        assert_eq!(broken(&result), Some((k + 2, Break::Mismatch { previous: k + 1 })), "edit of line {}", k + 1);
    }
}

fuzz_target!(|data: &[u8]| {
    check_arbitrary(data);
    check_round_trip(data);
});
