//! Rewrites of the upstream's answer: `tools/list` filtered to the tools a client may call.

use bytes::Bytes;
use http::{Response, header};
use http_body_util::BodyExt;

use super::body::{ProxyBody, full};
use super::sse::{self, EventRewrite};
use crate::policy::mcp::Rule;

/// The most of a JSON `tools/list` answer the proxy will hold to filter it.
const MAX_JSON_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Removes the tools `rule` does not permit from every `tools/list` result in the answer: a JSON body is
/// read (bounded) and rewritten; an event stream is rewritten event by event as it flows.
pub async fn filter_tools(response: Response<ProxyBody>, rule: Rule) -> Result<Response<ProxyBody>, String> {
    let content_type = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let (mut parts, body) = response.into_parts();
    match essence.as_str() {
        "application/json" => {
            let bytes = collect_bounded(body, MAX_JSON_ANSWER_BYTES).await?;
            let bytes = filter_tools_json(&bytes, &rule).map_or(bytes, Bytes::from);
            parts.headers.insert(header::CONTENT_LENGTH, bytes.len().into());
            Ok(Response::from_parts(parts, full(bytes)))
        }
        "text/event-stream" => {
            parts.headers.remove(header::CONTENT_LENGTH);
            let rewrite = move |raw: &[u8]| {
                let event = sse::parse(raw)?;
                let data = filter_tools_json(event.data.as_bytes(), &rule)?;
                Some(sse::render(event.kind, std::str::from_utf8(&data).ok()?))
            };
            Ok(Response::from_parts(parts, EventRewrite::new(body, rewrite).boxed()))
        }
        _ => Ok(Response::from_parts(parts, body)),
    }
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

/// The JSON with disallowed tools removed from each JSON-RPC response's `result.tools`, or `None` when
/// nothing was removed (or it is not JSON).
pub fn filter_tools_json(json: &[u8], rule: &Rule) -> Option<Vec<u8>> {
    let mut value: serde_json::Value = serde_json::from_slice(json).ok()?;
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
    changed.then(|| serde_json::to_vec(&value).expect("a JSON value serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_only_disallowed_tools() {
        let rule = Rule::Block(vec!["delete_*".into()]);
        let json =
            br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_repo"},{"name":"get"}]}}"#;
        let out: serde_json::Value = serde_json::from_slice(&filter_tools_json(json, &rule).unwrap()).unwrap();
        let names: Vec<_> =
            out["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["search", "get"]);
        assert_eq!(out["id"], 1);
        assert!(
            filter_tools_json(br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"}]}}"#, &rule).is_none()
        );
        assert!(filter_tools_json(b"not json", &rule).is_none());
        let batch = br#"[{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"delete_x"}]}},{"jsonrpc":"2.0","id":2,"result":{}}]"#;
        let out: serde_json::Value = serde_json::from_slice(&filter_tools_json(batch, &rule).unwrap()).unwrap();
        assert_eq!(out[0]["result"]["tools"], serde_json::json!([]));
    }
}
