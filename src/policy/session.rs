//! Binding MCP sessions to the user and upstream that created them.
//!
//! The upstream's session id never reaches the client as it is: the client gets
//! `<upstream id>.<tag>`, where the tag is an HMAC over (user, upstream, upstream id). Every request that
//! presents a session is checked against the acting user and stripped back to the upstream's id; another
//! user presenting it gets 404, the spec's "session not found", and the upstream never sees the attempt.
//! Stateless: nothing is stored, so bindings survive restarts and work across replicas that share the key.

use hmac::{Hmac, KeyInit, Mac};
use http::HeaderValue;
use http::request::Parts;
use sha2::Sha256;

use crate::error::ProxyError;
use crate::proxy::headers::single;
use crate::secret::Secret;

pub const SESSION_HEADER: &str = "mcp-session-id";

type HmacSha256 = Hmac<Sha256>;

/// Hex characters of the tag: 128 bits of the HMAC.
const TAG_LEN: usize = 32;

pub struct SessionBinder {
    key: Vec<u8>,
}

impl std::fmt::Debug for SessionBinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionBinder(***)")
    }
}

impl SessionBinder {
    pub fn new(secret: &Secret) -> Self {
        SessionBinder { key: secret.expose().as_bytes().to_vec() }
    }

    /// A key of this process only: sessions then end with the process.
    pub fn random() -> Self {
        SessionBinder { key: rand::random::<[u8; 32]>().to_vec() }
    }

    fn mac(&self, user: &str, upstream: &str, session: &str, url_elicitation: bool) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        // Lengths first, so that no two (user, upstream, session) triples feed the same bytes; the
        // flag as a fourth part only when set, so ids bound before it existed still verify.
        let flag = url_elicitation.then_some(URL_ELICITATION);
        for part in [user, upstream, session].into_iter().chain(flag) {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }

    /// The id the client gets for the upstream's `session`.
    pub fn bind(&self, user: &str, upstream: &str, session: &str) -> String {
        self.bind_declaring(user, upstream, session, false)
    }

    /// As `bind`, also carrying (under the tag) that the client declared URL-mode elicitation at
    /// `initialize`, so the session's later requests may be answered with -32042: `<session>.u<tag>`.
    pub fn bind_declaring(&self, user: &str, upstream: &str, session: &str, url_elicitation: bool) -> String {
        let tag = self.mac(user, upstream, session, url_elicitation).finalize().into_bytes();
        let mark = if url_elicitation { "u" } else { "" };
        format!("{session}.{mark}{}", &hex::encode(tag)[..TAG_LEN])
    }

    /// The upstream's session id inside `presented`, if it was bound to this user and upstream.
    pub fn unbind<'a>(&self, user: &str, upstream: &str, presented: &'a str) -> Option<&'a str> {
        self.unbind_declared(user, upstream, presented).map(|(session, _)| session)
    }

    /// As `unbind`, with whether the session's client declared URL-mode elicitation.
    pub fn unbind_declared<'a>(&self, user: &str, upstream: &str, presented: &'a str) -> Option<(&'a str, bool)> {
        let (session, tag) = presented.rsplit_once('.')?;
        let (tag, url_elicitation) = match tag.strip_prefix('u') {
            Some(tag) => (tag, true),
            None => (tag, false),
        };
        let tag = hex::decode(tag).ok().filter(|t| t.len() == TAG_LEN / 2)?;
        // Constant-time comparison of the truncated tag.
        self.mac(user, upstream, session, url_elicitation).verify_truncated_left(&tag).ok()?;
        Some((session, url_elicitation))
    }
}

/// The fourth part of a session's MAC when its client declared URL-mode elicitation.
const URL_ELICITATION: &str = "url-elicitation";

/// The query parameters that carry the legacy (2024-11-05) transport's session id: the Python SDK's
/// and the TypeScript SDK's spelling.
const SESSION_PARAMS: [&str; 2] = ["session_id", "sessionId"];

/// Replaces the value of the legacy session parameter in `query` by `map(value)`. `Ok(None)` when the
/// query has no such parameter; `SessionNotFound` when `map` refuses the value. Otherwise the new query and
/// the value it replaced.
pub fn map_query_session(
    query: &str,
    map: impl FnOnce(&str) -> Option<String>,
) -> Result<Option<(String, String)>, ProxyError> {
    let mut map = Some(map);
    let mut found = None;
    let mut out = String::with_capacity(query.len() + TAG_LEN + 1);
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        // Servers decode parameter names: a spelling that decodes to a session parameter but is not one
        // of the exact names below would reach the upstream unchecked.
        if !SESSION_PARAMS.contains(&name)
            && SESSION_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(&percent_decode(name)))
        {
            return Err(ProxyError::SessionNotFound);
        }
        match pair.split_once('=') {
            Some((name, value)) if SESSION_PARAMS.contains(&name) && found.is_none() => {
                let mapped = (map.take().expect("used once"))(value).ok_or(ProxyError::SessionNotFound)?;
                out.push_str(name);
                out.push('=');
                out.push_str(&mapped);
                found = Some(value.to_owned());
            }
            // Two session ids: ambiguous.
            Some((name, _)) if SESSION_PARAMS.contains(&name) => return Err(ProxyError::SessionNotFound),
            None if SESSION_PARAMS.contains(&pair) => return Err(ProxyError::SessionNotFound),
            _ => out.push_str(pair),
        }
    }
    Ok(found.map(|value| (out, value)))
}

/// `%XX` escapes and `+` decoded; anything malformed is kept as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The session a request presented, once checked.
#[derive(Debug, Default)]
pub struct Presented {
    /// For the audit trail.
    pub fingerprint: Option<String>,
    /// The upstream's session id, when it came as the legacy transport's query parameter.
    pub legacy: Option<String>,
    /// The session's client declared URL-mode elicitation at `initialize`.
    pub url_elicitation: bool,
}

/// Checks the session a request presents (the `Mcp-Session-Id` header, or the legacy transport's query
/// parameter) against the acting user and upstream, and puts the upstream's own id in its place.
pub fn unbind_request(
    parts: &mut Parts,
    binder: &SessionBinder,
    user: &str,
    upstream: &str,
) -> Result<Presented, ProxyError> {
    let name = http::HeaderName::from_static(SESSION_HEADER);
    let mut presented_session = Presented::default();
    if let Some(presented) = single(&parts.headers, &name, SESSION_HEADER).map_err(|_| ProxyError::SessionNotFound)? {
        let presented = presented.to_str().map_err(|_| ProxyError::SessionNotFound)?;
        let (session, url_elicitation) =
            binder.unbind_declared(user, upstream, presented).ok_or(ProxyError::SessionNotFound)?;
        presented_session.fingerprint = Some(fingerprint(session));
        presented_session.url_elicitation = url_elicitation;
        let value = HeaderValue::from_str(session).map_err(|_| ProxyError::SessionNotFound)?;
        parts.headers.insert(name, value);
    }
    if let Some(query) = parts.uri.query() {
        let mapped = map_query_session(query, |v| binder.unbind(user, upstream, v).map(str::to_owned))?;
        if let Some((query, bound)) = mapped {
            let session = binder.unbind(user, upstream, &bound).ok_or(ProxyError::SessionNotFound)?;
            presented_session.fingerprint.get_or_insert_with(|| fingerprint(session));
            presented_session.legacy = Some(session.to_owned());
            let path_and_query = format!("{}?{query}", parts.uri.path());
            parts.uri = http::Uri::try_from(path_and_query).map_err(|_| ProxyError::SessionNotFound)?;
        }
    }
    Ok(presented_session)
}

/// A short, stable fingerprint of a session id for the audit trail (the id itself is a bearer secret).
pub fn fingerprint(session: &str) -> String {
    hex::encode(&crate::secret::sha256(session.as_bytes())[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_query_parameters() {
        let upper = |v: &str| Some(v.to_uppercase());
        assert_eq!(
            map_query_session("a=1&session_id=ab&b=2", upper),
            Ok(Some(("a=1&session_id=AB&b=2".into(), "ab".into())))
        );
        assert_eq!(map_query_session("sessionId=x", upper), Ok(Some(("sessionId=X".into(), "x".into()))));
        assert_eq!(map_query_session("a=1", upper), Ok(None));
        assert_eq!(map_query_session("session_id=x", |_| None), Err(ProxyError::SessionNotFound));
        assert_eq!(map_query_session("session_id=x&sessionId=y", upper), Err(ProxyError::SessionNotFound));
        // Spellings a server would decode into a session parameter are refused, not passed on unchecked.
        for query in
            ["session%5Fid=x", "session%49d=x", "SESSION_ID=x", "a=1&session_id=x&session%5fid=y", "session_id"]
        {
            assert_eq!(map_query_session(query, upper), Err(ProxyError::SessionNotFound), "{query}");
        }
        assert_eq!(percent_decode("a%5Fb%2"), "a_b%2");
    }

    #[test]
    fn a_session_is_usable_only_by_its_user_on_its_upstream() {
        let binder = SessionBinder::new(&Secret::new("k"));
        let bound = binder.bind("alice", "github", "abc.123");
        assert!(bound.starts_with("abc.123."));
        assert_eq!(binder.unbind("alice", "github", &bound), Some("abc.123"));
        assert_eq!(binder.unbind("bob", "github", &bound), None);
        assert_eq!(binder.unbind("alice", "gitlab", &bound), None);
        assert_eq!(binder.unbind("alice", "github", "abc.123"), None, "an unbound id is refused");
        assert_eq!(binder.unbind("alice", "github", &bound.replace("abc", "abd")), None);
        let mut tampered = bound.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == '0' { '1' } else { '0' });
        assert_eq!(binder.unbind("alice", "github", &tampered), None);
        // Another process with the same key accepts it (restarts, replicas); another key does not.
        assert_eq!(SessionBinder::new(&Secret::new("k")).unbind("alice", "github", &bound), Some("abc.123"));
        assert_eq!(SessionBinder::new(&Secret::new("other")).unbind("alice", "github", &bound), None);
        // Field boundaries matter: ("ab", "c") and ("a", "bc") do not collide.
        assert_ne!(binder.bind("ab", "c", "s"), binder.bind("a", "bc", "s"));
        // The elicitation flag rides under the tag: it cannot be added to, or taken off, an id.
        let declaring = binder.bind_declaring("alice", "github", "abc.123", true);
        assert_eq!(binder.unbind_declared("alice", "github", &declaring), Some(("abc.123", true)));
        assert_eq!(binder.unbind_declared("alice", "github", &bound), Some(("abc.123", false)));
        let (session, tag) = bound.rsplit_once('.').unwrap();
        assert_eq!(binder.unbind_declared("alice", "github", &format!("{session}.u{tag}")), None, "flag added");
        assert_eq!(binder.unbind_declared("alice", "github", &declaring.replace(".u", ".")), None, "flag removed");
        assert_eq!(binder.unbind_declared("bob", "github", &declaring), None);
        assert!(!format!("{binder:?}").contains('k'));
    }
}
