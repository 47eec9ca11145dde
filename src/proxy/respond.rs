//! Rewrites of the upstream's answer: `tools/list` filtered to the tools a client may call, session ids
//! bound to the user, and the legacy transport's `endpoint` event pointed at the proxy.

use bytes::Bytes;
use http::{Response, header};
use http_body_util::BodyExt;

use super::body::{ProxyBody, full};
use super::sse::{self, EventRewrite};
use std::sync::Arc;

use super::legacy::{self, Injected, LegacyStreams};
use crate::config::Upstream;
use crate::policy::mcp::Rule;
use crate::policy::session::{self, SESSION_HEADER, SessionBinder};

/// The most of a JSON `tools/list` answer the proxy will hold to filter it.
const MAX_JSON_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Removes the tools `rule` does not permit from every `tools/list` result in the answer: a JSON body is
/// read (bounded) and rewritten; an event stream is rewritten event by event as it flows.
/// Fails closed: an answer it cannot read (compressed, not JSON) is an error, and an event it cannot
/// read is dropped, never passed on unfiltered.
pub async fn filter_tools(response: Response<ProxyBody>, rule: Arc<Rule>) -> Result<Response<ProxyBody>, String> {
    check_identity_encoding(&response)?;
    let (mut parts, body) = response.into_parts();
    match content_type(&parts.headers).as_str() {
        "application/json" => {
            let bytes = collect_bounded(body, MAX_JSON_ANSWER_BYTES).await?;
            let filtered =
                filter_tools_json(&bytes, &rule).map_err(|NotJson| "a tools/list answer that is not JSON")?;
            let bytes = filtered.map_or(bytes, Bytes::from);
            parts.headers.insert(header::CONTENT_LENGTH, bytes.len().into());
            Ok(Response::from_parts(parts, full(bytes)))
        }
        "text/event-stream" => {
            parts.headers.remove(header::CONTENT_LENGTH);
            let rewrite = move |raw: &[u8]| filter_event(raw, &rule);
            Ok(Response::from_parts(parts, EventRewrite::new(body, rewrite).boxed()))
        }
        // 202 and empty answers carry no list; anything else cannot be checked.
        _ if parts.status == http::StatusCode::ACCEPTED || parts.status.is_client_error() => {
            Ok(Response::from_parts(parts, body))
        }
        other => Err(format!("a tools/list answer of type {other:?} cannot be filtered")),
    }
}

/// One event of a stream that may carry a `tools/list` result. Every event with data is read as JSON,
/// whatever its type: rewritten when tools were removed, kept otherwise. Data that is not JSON holds no
/// tool list a client could read; a message event with such data cannot be checked and is dropped,
/// never passed on unfiltered, while other types (the legacy `endpoint`) and comments pass.
pub fn filter_event(raw: &[u8], rule: &Rule) -> Option<Vec<u8>> {
    let event = sse::parse(raw);
    match filter_tools_json(event.data.as_deref()?.as_bytes(), rule) {
        Ok(None) => None,
        Ok(Some(json)) => Some(sse::render(event.kind.as_deref(), event.id.as_deref(), &json)),
        Err(NotJson) if event.is_message() => {
            tracing::warn!("dropped a server-sent event that could not be checked for blocked tools");
            Some(Vec::new())
        }
        Err(NotJson) => None,
    }
}

fn content_type(headers: &http::HeaderMap) -> String {
    let value = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    value.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// The proxy asks upstreams for uncompressed answers; one that compresses anyway cannot be rewritten.
/// Every `Content-Encoding` field and every coding in it counts (a client applies them all).
fn check_identity_encoding(response: &Response<ProxyBody>) -> Result<(), String> {
    for value in response.headers().get_all(header::CONTENT_ENCODING) {
        let codings = value.to_str().map_err(|_| "an unreadable Content-Encoding".to_owned())?;
        if let Some(coding) = codings.split(',').map(str::trim).find(|c| !c.eq_ignore_ascii_case("identity")) {
            return Err(format!("the upstream sent a {coding}-encoded answer the proxy must read"));
        }
    }
    Ok(())
}

/// What of the request shapes the answer's session binding.
#[derive(Clone, Copy)]
pub struct Asked {
    /// A GET: its event stream may be the legacy transport's.
    pub get: bool,
    /// The client declared URL-mode elicitation (on this initialize, or in its session).
    pub url_elicitation: bool,
}

/// Binds the session the upstream hands out (`Mcp-Session-Id`) to the acting user and upstream, and, on
/// event streams opened by GET (the legacy HTTP+SSE transport), rewrites the `endpoint` event: its URI
/// moves under the proxy's path and its session parameter is bound the same way. Returns the session's
/// fingerprint, if one was handed out.
pub fn bind_sessions(
    response: &mut Response<ProxyBody>,
    binder: &Arc<SessionBinder>,
    user: &Arc<str>,
    upstream: &Upstream,
    public_prefix: &str,
    asked: Asked,
    streams: &Arc<LegacyStreams>,
) -> Result<Option<String>, String> {
    let mut handed_out = None;
    if let Some(session) = response.headers().get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
        handed_out = Some(session::fingerprint(session));
        let bound = binder.bind_declaring(user, &upstream.name, session, asked.url_elicitation);
        if let Ok(value) = http::HeaderValue::from_str(&bound) {
            response.headers_mut().insert(SESSION_HEADER, value);
        }
    }
    let is_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
    if asked.get && is_stream {
        check_identity_encoding(response)?;
        let (binder, user, name) = (binder.clone(), user.clone(), upstream.name.clone());
        let (prefix, base_path) = (public_prefix.to_owned(), upstream.base_path.clone());
        let tools = upstream.tools.clone();
        let body = std::mem::replace(response.body_mut(), super::body::empty());
        let (registration, injected) = legacy::registration(streams);
        let registered = registration.clone();
        let rewrite = move |raw: &[u8]| {
            // The legacy transport's `endpoint` event (its type is plain text, no escapes to hide it).
            if raw.windows(8).any(|w| w == b"endpoint") {
                let event = sse::parse(raw);
                if let (Some("endpoint"), Some(data)) = (event.kind.as_deref(), &event.data) {
                    let bind = |s: &str| binder.bind(&user, &name, s);
                    let (uri, session) = public_endpoint(data, &prefix, &base_path, bind)?;
                    if let Some(session) = session {
                        registered.register(&name, &session);
                    }
                    return Some(sse::render(event.kind.as_deref(), event.id.as_deref(), &uri));
                }
            }
            // Answers on the stream (the legacy transport's, or a GET stream's): with a tool rule, every
            // message is read, so tools/list results are filtered however their JSON is spelled.
            filter_event(raw, tools.as_deref()?)
        };
        // One pass over the stream: the rewrite yields whole events, and the proxy's own (refusals of this
        // session's message POSTs) go out between them.
        *response.body_mut() = Injected::new(EventRewrite::new(body, rewrite), injected, registration).boxed();
        response.headers_mut().remove(header::CONTENT_LENGTH);
    }
    Ok(handed_out)
}

/// The legacy transport's endpoint URI as the client must use it: under the proxy's `prefix` instead of
/// the upstream's `base_path`, with its session parameter bound. Absolute URIs become paths: the client
/// talks to the proxy, never to the upstream directly.
/// Also returns the upstream's session id found in it.
fn public_endpoint(
    data: &str,
    prefix: &str,
    base_path: &str,
    bind: impl FnOnce(&str) -> String,
) -> Option<(String, Option<String>)> {
    let uri: http::Uri = data.trim().parse().ok()?;
    let path = uri.path();
    let rest = match path.strip_prefix(base_path) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ => {
            tracing::warn!(
                endpoint = path,
                "the legacy endpoint lies outside the upstream's URL path; point url at the server root"
            );
            return None;
        }
    };
    let mut out = if prefix == "/" { String::new() } else { prefix.to_owned() };
    out.push_str(if rest.is_empty() { "/" } else { rest });
    let mut session = None;
    if let Some(query) = uri.query() {
        let query = match session::map_query_session(query, |v| Some(bind(v))) {
            Ok(Some((query, id))) => {
                session = Some(id);
                query
            }
            _ => query.to_owned(),
        };
        out.push('?');
        out.push_str(&query);
    }
    Some((out, session))
}

/// Reads a body whole, refusing more than `max` bytes. (Written out rather than `Limited::collect`, whose
/// error conversion trips the compiler's `Send` check when awaited inside the request future.)
async fn collect_bounded(mut body: ProxyBody, max: usize) -> Result<Bytes, String> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() {
            if buf.len() + data.len() > max {
                return Err(format!("answer larger than {max} bytes"));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// An answer that should hold a tool list but is not JSON.
#[derive(Debug, PartialEq, Eq)]
pub struct NotJson;

/// The JSON with disallowed tools removed from each JSON-RPC response's `result.tools`; `Ok(None)` when
/// nothing was removed, `Err` when it is not JSON.
pub fn filter_tools_json(json: &[u8], rule: &Rule) -> Result<Option<String>, NotJson> {
    let mut value: serde_json::Value = serde_json::from_slice(json).map_err(|_| NotJson)?;
    let mut changed = false;
    let mut filter = |message: &mut serde_json::Value| {
        if let Some(tools) = message.pointer_mut("/result/tools").and_then(|t| t.as_array_mut()) {
            let before = tools.len();
            tools.retain(|tool| tool.get("name").and_then(|n| n.as_str()).is_some_and(|name| rule.permits(name)));
            changed |= tools.len() != before;
        }
    };
    match &mut value {
        serde_json::Value::Array(batch) => batch.iter_mut().for_each(&mut filter),
        message => filter(message),
    }
    // A `Value` read from JSON always serializes (its map keys are strings).
    Ok(changed.then(|| value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_endpoints_move_under_the_proxy_path_with_bound_sessions() {
        let bind = |s: &str| format!("{s}.tag");
        let uri = |data, prefix, base| public_endpoint(data, prefix, base, bind);
        assert_eq!(
            uri("/messages/?session_id=abc", "/mcp/legacy", ""),
            Some(("/mcp/legacy/messages/?session_id=abc.tag".into(), Some("abc".into())))
        );
        assert_eq!(
            uri("http://127.0.0.1:3001/api/message?sessionId=u1&x=1", "/mcp/ts", "/api"),
            Some(("/mcp/ts/message?sessionId=u1.tag&x=1".into(), Some("u1".into())))
        );
        assert_eq!(uri("/elsewhere/messages", "/mcp/ts", "/api"), None);
        assert_eq!(uri("/messages", "/", ""), Some(("/messages".into(), None)));
    }

    /// The tool names in the event `raw`, by the same reading (used to check what leaves).
    fn tool_names(raw: &[u8]) -> Vec<String> {
        let event = sse::parse(raw);
        let Some(data) = event.data else { return vec![] };
        let value: serde_json::Value = serde_json::from_str(&data).unwrap();
        value["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().into()).collect()
    }

    #[test]
    fn events_are_read_as_clients_read_them_and_fail_closed() {
        let rule = Rule::Block(vec!["delete_*".into()]);
        let list = |tools: &str| format!(r#"{{"jsonrpc":"2.0","id":1,"result":{{"tools":[{tools}]}}}}"#);
        // A byte that is not UTF-8 does not hide the event: it is decoded as the client decodes it.
        let raw = [&b"data: "[..], list(r#"{"name":"delete_?"},{"name":"ok"}"#).as_bytes(), b"\n\n"].concat();
        let raw: Vec<u8> = raw.iter().map(|&b| if b == b'?' { 0xff } else { b }).collect();
        let out = filter_event(&raw, &rule).unwrap();
        assert_eq!(tool_names(&out), ["ok"]);
        // A key spelled with escapes is the same key.
        let escaped = br#"data: {"jsonrpc":"2.0","id":1,"result":{"t\u006fols":[{"name":"delete_repo"}]}}"#;
        let out = filter_event(&[&escaped[..], b"\n\n"].concat(), &rule).unwrap();
        assert_eq!(tool_names(&out), Vec::<String>::new());
        // Unreadable message data is dropped; other event types and comments pass untouched.
        assert_eq!(filter_event(b"data: {not json\n\n", &rule), Some(vec![]));
        assert_eq!(filter_event(b"event: endpoint\ndata: /tools/messages?x=1\n\n", &rule), None);
        // JSON in an event of any type is filtered: a client might read it as a message.
        let other = format!("event: other\ndata: {}\n\n", list(r#"{"name":"delete_x"},{"name":"ok"}"#));
        assert_eq!(tool_names(&filter_event(other.as_bytes(), &rule).unwrap()), ["ok"]);
        assert_eq!(filter_event(b": keep-alive\n\n", &rule), None);
        // The event id survives a rewrite, so a client can still resume after it.
        let out = filter_event(format!("id: 42\ndata: {}\n\n", list(r#"{"name":"delete_x"}"#)).as_bytes(), &rule);
        assert!(String::from_utf8(out.unwrap()).unwrap().starts_with("id: 42\n"));
    }

    #[test]
    fn removes_only_disallowed_tools() {
        let rule = Rule::Block(vec!["delete_*".into()]);
        let json =
            br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_repo"},{"name":"get"}]}}"#;
        let out: serde_json::Value = serde_json::from_str(&filter_tools_json(json, &rule).unwrap().unwrap()).unwrap();
        let names: Vec<_> =
            out["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["search", "get"]);
        assert_eq!(out["id"], 1);
        let kept = br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"}]}}"#;
        assert_eq!(filter_tools_json(kept, &rule), Ok(None));
        assert_eq!(filter_tools_json(b"not json", &rule), Err(NotJson));
        assert_eq!(filter_tools_json(b"\xef\xbb\xbf{}", &rule), Err(NotJson), "a BOM is not JSON: refused, not passed");
        let batch = br#"[{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"delete_x"}]}},{"jsonrpc":"2.0","id":2,"result":{}}]"#;
        let out: serde_json::Value = serde_json::from_str(&filter_tools_json(batch, &rule).unwrap().unwrap()).unwrap();
        assert_eq!(out[0]["result"]["tools"], serde_json::json!([]));
    }
}
