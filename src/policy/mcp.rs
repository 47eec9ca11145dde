//! Reading MCP JSON-RPC traffic: what policy needs (method, id, tool / prompt / resource) from a single
//! message or a batch, borrowed from the body rather than copied, and the checks that depend on it.

use std::borrow::Cow;

use http::HeaderMap;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ProxyError;
use crate::proxy::headers::single;

/// A JSON-RPC id as the proxy echoes it (in error answers and the audit trail): a string, a number or
/// `null`, and nothing else. A string is decoded and encoded again (ASCII only), so the id is always one
/// line of plain JSON whatever the client sent; a number keeps its token, and must be one that JSON
/// readers can hold (`1e400` overflows every `f64`: whoever reads the audit trail would fail on it).
#[derive(Debug, Clone)]
pub struct Id(Box<RawValue>);

impl Id {
    /// The id of a message, or `InvalidRequest` when it is not a string, number or `null`.
    fn parse(raw: &RawValue) -> Result<Id, ProxyError> {
        let text = raw.get();
        let canonical = match text.as_bytes().first() {
            Some(b'"') => {
                let decoded: String = serde_json::from_str(text).map_err(|_| ProxyError::InvalidRequest)?;
                crate::json::to_ascii_string(&decoded).map_err(|_| ProxyError::InvalidRequest)?
            }
            Some(b'-' | b'0'..=b'9') if serde_json::from_str::<serde_json::Number>(text).is_ok() => text.to_owned(),
            _ if text == "null" => text.to_owned(),
            _ => return Err(ProxyError::InvalidRequest),
        };
        RawValue::from_string(canonical).map(Id).map_err(|_| ProxyError::InvalidRequest)
    }

    pub fn as_raw(&self) -> &RawValue {
        &self.0
    }
}

impl serde::Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// The facts of one JSON-RPC message that policy and audit use.
#[derive(Debug, Default)]
pub struct Message {
    /// `None` for notifications.
    pub id: Option<Id>,
    /// `None` for responses (a client answering a server request).
    pub method: Option<Box<str>>,
    pub target: Option<Target>,
    /// An `initialize` whose client declares URL-mode elicitation (`capabilities.elicitation.url`).
    pub url_elicitation: bool,
}

/// What a request acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tool(Box<str>),
    Prompt(Box<str>),
    Resource(Box<str>),
}

impl Target {
    pub fn name(&self) -> &str {
        match self {
            Target::Tool(n) | Target::Prompt(n) | Target::Resource(n) => n,
        }
    }
}

/// A JSON-RPC POST body: one message, or a batch (protocol 2025-03-26).
#[derive(Debug)]
pub struct Rpc {
    pub messages: Vec<Message>,
    pub batch: bool,
}

impl Rpc {
    /// The id an error answer carries: the message's own, `null` for batches and notifications.
    pub fn error_id(&self) -> Option<&Id> {
        match (self.batch, self.messages.first()) {
            (false, Some(m)) => m.id.as_ref(),
            _ => None,
        }
    }

    /// The single message's method (`None` for batches).
    pub fn method(&self) -> Option<&str> {
        if self.batch { None } else { self.messages.first()?.method.as_deref() }
    }

    pub fn single(&self) -> Option<&Message> {
        if self.batch { None } else { self.messages.first() }
    }

    pub fn tool_calls(&self) -> impl Iterator<Item = &str> {
        self.messages.iter().filter_map(|m| match &m.target {
            Some(Target::Tool(name)) => Some(&**name),
            _ => None,
        })
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    jsonrpc: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    params: Option<WireParams<'a>>,
    #[serde(borrow)]
    result: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireParams<'a> {
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    uri: Option<Cow<'a, str>>,
    /// Read only for `initialize`, and leniently: a shape this proxy does not know is no reason to refuse.
    #[serde(borrow)]
    capabilities: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireCapabilities {
    elicitation: Option<WireElicitation>,
}

#[derive(Deserialize)]
struct WireElicitation {
    url: Option<serde::de::IgnoredAny>,
}

/// Parses a JSON-RPC POST body. Invalid JSON is `-32700`; JSON that is not JSON-RPC 2.0 is `-32600`.
pub fn inspect(body: &[u8]) -> Result<Rpc, ProxyError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).ok_or(ProxyError::ParseError)?;
    if *first == b'[' {
        let raw: Vec<&RawValue> = serde_json::from_slice(body).map_err(|_| ProxyError::ParseError)?;
        if raw.is_empty() {
            return Err(ProxyError::InvalidRequest);
        }
        let messages = raw.iter().map(|m| message(m.get().as_bytes())).collect::<Result<_, _>>()?;
        return Ok(Rpc { messages, batch: true });
    }
    // Syntax first, so that malformed JSON is a parse error even when it is also not JSON-RPC.
    let value: &RawValue = serde_json::from_slice(body).map_err(|_| ProxyError::ParseError)?;
    Ok(Rpc { messages: vec![message(value.get().as_bytes())?], batch: false })
}

fn message(json: &[u8]) -> Result<Message, ProxyError> {
    let wire: Wire<'_> = serde_json::from_slice(json).map_err(|_| ProxyError::InvalidRequest)?;
    if wire.jsonrpc.as_deref() != Some("2.0") {
        return Err(ProxyError::InvalidRequest);
    }
    let is_response = wire.method.is_none() && wire.id.is_some() && (wire.result.is_some() ^ wire.error.is_some());
    if wire.method.is_none() && !is_response {
        return Err(ProxyError::InvalidRequest);
    }
    let name = |p: &Option<WireParams<'_>>| p.as_ref().and_then(|p| p.name.as_deref()).map(Box::from);
    let target = match wire.method.as_deref() {
        Some("tools/call") => name(&wire.params).map(Target::Tool),
        Some("prompts/get") => name(&wire.params).map(Target::Prompt),
        Some("resources/read") => {
            wire.params.as_ref().and_then(|p| p.uri.as_deref()).map(|u| Target::Resource(u.into()))
        }
        _ => None,
    };
    if wire.method.as_deref() == Some("tools/call") && target.is_none() {
        return Err(ProxyError::InvalidRequest); // a tool call must name its tool: policy depends on it
    }
    let url_elicitation = wire.method.as_deref() == Some("initialize")
        && wire.params.as_ref().and_then(|p| p.capabilities).is_some_and(|c| {
            serde_json::from_str::<WireCapabilities>(c.get())
                .is_ok_and(|c| c.elicitation.is_some_and(|e| e.url.is_some()))
        });
    let id = wire.id.map(Id::parse).transpose()?;
    Ok(Message { id, method: wire.method.map(|m| m.into()), target, url_elicitation })
}

/// Protocol 2026-07-28 mirrors the method and name in `Mcp-Method` and `Mcp-Name`. The proxy enforces
/// policy on the body, so a mirror that disagrees with it is refused (-32020) rather than trusted.
pub fn check_mirrored_headers(headers: &HeaderMap, rpc: &Rpc) -> Result<(), ProxyError> {
    let mismatch = |_| ProxyError::HeaderMismatch;
    let method_header =
        single(headers, &http::HeaderName::from_static("mcp-method"), "mcp-method").map_err(mismatch)?;
    let name_header = single(headers, &http::HeaderName::from_static("mcp-name"), "mcp-name").map_err(mismatch)?;
    if method_header.is_none() && name_header.is_none() {
        return Ok(());
    }
    let message = rpc.single().ok_or(ProxyError::HeaderMismatch)?;
    if let Some(method) = method_header
        && Some(method.as_bytes()) != message.method.as_deref().map(str::as_bytes)
    {
        return Err(ProxyError::HeaderMismatch);
    }
    let body_name = message.target.as_ref().map(Target::name);
    match (name_header, body_name) {
        (Some(h), Some(b)) if h.as_bytes() == b.as_bytes() => Ok(()),
        (None, None) => Ok(()),
        // The method names a target but the header is missing, or the other way round.
        _ => Err(ProxyError::HeaderMismatch),
    }
}

/// A `*`-glob over tool and user names: `*` matches any run of characters, everything else itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

/// An allow or block list of `*`-globs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    Allow(Vec<String>),
    Block(Vec<String>),
}

impl Rule {
    pub fn permits(&self, name: &str) -> bool {
        match self {
            Rule::Allow(list) => list.iter().any(|p| glob_match(p, name)),
            Rule::Block(list) => !list.iter().any(|p| glob_match(p, name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspects_single_messages_batches_and_responses() {
        let rpc = inspect(
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search","arguments":{"q":"x"}}}"#,
        )
        .unwrap();
        assert_eq!(rpc.error_id().unwrap().as_raw().get(), "7");
        assert_eq!(rpc.method(), Some("tools/call"));
        assert_eq!(rpc.tool_calls().collect::<Vec<_>>(), ["search"]);

        let rpc =
            inspect(br#"{"jsonrpc":"2.0","id":"r","method":"resources/read","params":{"uri":"file:///a"}}"#).unwrap();
        assert_eq!(rpc.single().unwrap().target, Some(Target::Resource("file:///a".into())));
        let rpc = inspect(br#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"p"}}"#).unwrap();
        assert_eq!(rpc.single().unwrap().target, Some(Target::Prompt("p".into())));

        let batch = inspect(
            br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}},
                {"jsonrpc":"2.0","method":"notifications/initialized"},
                {"jsonrpc":"2.0","id":9,"result":{}}]"#,
        )
        .unwrap();
        assert!(batch.batch);
        assert!(batch.error_id().is_none());
        assert_eq!(batch.messages.len(), 3);
        assert_eq!(batch.tool_calls().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn ids_are_strings_numbers_or_null_and_are_echoed_as_one_line_of_plain_json() {
        let id = |json: &str| {
            let body = format!(r#"{{"jsonrpc":"2.0","id":{json},"method":"ping"}}"#);
            inspect(body.as_bytes()).map(|rpc| rpc.error_id().map(|id| id.as_raw().get().to_owned()))
        };
        assert_eq!(id("7"), Ok(Some("7".into())));
        assert_eq!(id("1e300"), Ok(Some("1e300".into())));
        assert_eq!(id("-0.5E+3"), Ok(Some("-0.5E+3".into())));
        assert_eq!(id(r#""a\u0062\n""#), Ok(Some(r#""ab\n""#.into())), "re-encoded, never raw");
        assert_eq!(id("null"), Ok(None));
        for bad in ["[1]", "[\n1]", "{}", "true", r#""\ud800""#, "1e400", "-1e999", &"[".repeat(200)] {
            assert!(id(bad).is_err(), "{bad} accepted as an id");
        }
        // A client's response to a server request carries an id of the same kinds.
        assert_eq!(inspect(br#"{"jsonrpc":"2.0","id":[2],"result":{}}"#).unwrap_err(), ProxyError::InvalidRequest);
    }

    #[test]
    fn rejects_what_is_not_json_rpc() {
        assert_eq!(inspect(b"{not json").unwrap_err(), ProxyError::ParseError);
        assert_eq!(inspect(b"").unwrap_err(), ProxyError::ParseError);
        assert_eq!(inspect(b"[1,").unwrap_err(), ProxyError::ParseError);
        for invalid in [
            &br#"{"id":1,"method":"ping"}"#[..],
            br#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
            br#"{"jsonrpc":"2.0","id":1}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":5}"#,
            br#"[]"#,
            br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}, 3]"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#,
            br#""a string""#,
        ] {
            assert_eq!(
                inspect(invalid).unwrap_err(),
                ProxyError::InvalidRequest,
                "{}",
                String::from_utf8_lossy(invalid)
            );
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(n, v)| (http::HeaderName::from_static(n), http::HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn mirrored_headers_must_agree_with_the_body() {
        let call = inspect(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}}"#).unwrap();
        let ok = |h: &[(&'static str, &'static str)]| check_mirrored_headers(&headers(h), &call);
        assert_eq!(ok(&[]), Ok(()));
        assert_eq!(ok(&[("mcp-method", "tools/call"), ("mcp-name", "search")]), Ok(()));
        assert_eq!(ok(&[("mcp-method", "tools/call"), ("mcp-name", "delete")]), Err(ProxyError::HeaderMismatch));
        assert_eq!(ok(&[("mcp-method", "tools/list"), ("mcp-name", "search")]), Err(ProxyError::HeaderMismatch));
        assert_eq!(ok(&[("mcp-method", "tools/call")]), Err(ProxyError::HeaderMismatch));
        assert_eq!(ok(&[("mcp-name", "delete")]), Err(ProxyError::HeaderMismatch));
        let list = inspect(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).unwrap();
        assert_eq!(check_mirrored_headers(&headers(&[("mcp-method", "tools/list")]), &list), Ok(()));
        assert_eq!(
            check_mirrored_headers(&headers(&[("mcp-method", "tools/list"), ("mcp-name", "x")]), &list),
            Err(ProxyError::HeaderMismatch)
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("delete_*", "delete_repo"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*_repo", "delete_repo"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(!glob_match("delete_*", "undelete_repo"));
        assert!(glob_match("search", "search"));
        assert!(!glob_match("search", "search2"));
        assert!(Rule::Block(vec!["delete_*".into()]).permits("search"));
        assert!(!Rule::Block(vec!["delete_*".into()]).permits("delete_x"));
        assert!(Rule::Allow(vec!["get_*".into(), "search".into()]).permits("get_issue"));
        assert!(!Rule::Allow(vec!["get_*".into()]).permits("create_issue"));
    }
}
