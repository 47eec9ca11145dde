//! Who is calling and as whom: `store::check_user_id`, `policy::identity::requested_user`,
//! `policy::auth::authenticate`, `proxy::headers::check_path` and session unbinding (`policy::session`).
//!
//! Input: `data[0]` picks the user-id length bound; the rest is fields separated by NUL bytes. Each field's
//! first byte picks what it is (`% 5`: user header, `authorization`, `mcp-session-id`, path, session
//! tag test), the rest is its value; header fields may repeat.
//!
//! Properties (besides: no panic):
//! - `check_user_id` accepts exactly the non-empty ids of ASCII letters, digits and `._@:-` within the bound;
//! - `requested_user` returns such an id, equal to the only user header; it refuses only a repeated or
//!   malformed header;
//! - `authenticate` accepts exactly one `Authorization: Bearer <known key>` header, never an expired key;
//! - an accepted path, percent-decoded once, has no `.`/`..` segment, no empty inner segment, no `\` or NUL;
//! - a bound session id unbinds to itself for its (user, upstream) only; whatever `unbind` accepts was bound.

#![no_main]

use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use libfuzzer_sys::fuzz_target;
use mcp_tenant_proxy::config::UnknownUserPolicy;
use mcp_tenant_proxy::config::runtime::IdentitySettings;
use mcp_tenant_proxy::error::ProxyError;
use mcp_tenant_proxy::policy::auth::authenticate;
use mcp_tenant_proxy::policy::identity::requested_user;
use mcp_tenant_proxy::policy::session::{SESSION_HEADER, SessionBinder, unbind_request};
use mcp_tenant_proxy::proxy::headers::check_path;
use mcp_tenant_proxy::secret::{Secret, sha256};
use mcp_tenant_proxy::config::Config;
use mcp_tenant_proxy::store::{ApiKey, KeyKind, check_user_id};

const USER_HEADER: &str = "x-alloy-userid";
const LIVE_KEY: &[u8] = b"mtp_live_key_0123456789";
const EXPIRED_KEY: &[u8] = b"mtp_expired_key_0123456789";

static DIRECTORY: std::sync::LazyLock<Config> = std::sync::LazyLock::new(directory);

/// A config (no upstreams) whose file directory holds alice and her live and expired keys.
fn directory() -> Config {
    let mut config = Config::from_toml("", std::path::Path::new(".")).unwrap();
    let dir = &mut config.directory;
    dir.add_user("alice");
    let user = dir.user_ref("alice").unwrap();
    for (index, (token, expires_at)) in [(LIVE_KEY, None), (EXPIRED_KEY, Some(1))].into_iter().enumerate() {
        let key = ApiKey {
            index: index as u32,
            id: std::str::from_utf8(token).unwrap().into(),
            kind: KeyKind::Enterprise,
            user: user.clone(),
            act_as: vec![],
            rate_limit: None,
            expires_at,
            user_token: None,
        };
        assert!(dir.add_key(sha256(token), key));
    }
    config
}

fn grammar_ok(id: &str, max: usize) -> bool {
    !id.is_empty()
        && id.len() <= max
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b':' | b'-'))
}

fn check_ids(headers: &HeaderMap, max: usize) {
    let settings = IdentitySettings {
        user_header: HeaderName::from_static(USER_HEADER),
        unknown_user: UnknownUserPolicy::Reject,
        max_user_id_len: max,
        token_header: HeaderName::from_static("x-alloy-user-token"),
        user_token: None,
    };
    let values: Vec<&HeaderValue> = headers.get_all(USER_HEADER).iter().collect();
    for value in &values {
        if let Ok(s) = std::str::from_utf8(value.as_bytes()) {
            assert_eq!(check_user_id(s, max).is_ok(), grammar_ok(s, max), "check_user_id({s:?}, {max})");
        }
    }
    match requested_user(&settings, headers) {
        Ok(Some(name)) => {
            assert!(grammar_ok(name, max), "accepted user id {name:?} (bound {max})");
            assert_eq!(values.len(), 1);
            assert_eq!(values[0].as_bytes(), name.as_bytes());
        }
        Ok(None) => assert!(values.is_empty()),
        Err(ProxyError::InvalidUserId(_)) => {
            let well_formed =
                values.len() == 1 && std::str::from_utf8(values[0].as_bytes()).is_ok_and(|s| grammar_ok(s, max));
            assert!(!well_formed, "a well-formed user header {:?} was refused", values[0]);
        }
        Err(e) => panic!("requested_user: unexpected {e:?}"),
    }
}

fn bearer_of(value: &[u8]) -> Option<&[u8]> {
    if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = value[7..].trim_ascii();
    (!token.is_empty() && token.iter().all(u8::is_ascii_graphic)).then_some(token)
}

fn check_auth(directory: &Config, headers: &HeaderMap) {
    let values: Vec<&HeaderValue> = headers.get_all(http::header::AUTHORIZATION).iter().collect();
    let result = authenticate(directory, headers);
    let expected_live = values.len() == 1 && bearer_of(values[0].as_bytes()) == Some(LIVE_KEY);
    match result {
        Ok(key) => {
            assert!(expected_live, "authenticated {:?} from {values:?}", key.id);
            assert_eq!(&*key.id, std::str::from_utf8(LIVE_KEY).unwrap());
        }
        Err(e) => {
            assert!(!expected_live, "the live key was refused: {e:?} from {values:?}");
            let code = e.code();
            assert!(matches!(code, "missing_api_key" | "invalid_api_key" | "duplicate_header"), "{code}");
        }
    }
}

fn percent_decode_once(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(hex) = b.get(i + 1..i + 3)
            && hex.iter().all(u8::is_ascii_hexdigit)
            && let Ok(byte) = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn check_paths(path: &str) {
    if check_path(path).is_err() || !path.starts_with('/') {
        return;
    }
    let decoded = percent_decode_once(path);
    assert!(!decoded.contains(&b'\\') && !decoded.contains(&0), "accepted {path:?}");
    let segments: Vec<&[u8]> = decoded.split(|&b| b == b'/').skip(1).collect();
    for (i, segment) in segments.iter().enumerate() {
        assert!(*segment != b"." && *segment != b"..", "accepted a dot segment: {path:?}");
        assert!(!segment.is_empty() || i + 1 == segments.len(), "accepted an empty segment: {path:?}");
    }
}

fn check_sessions(binder: &SessionBinder, value: &[u8]) {
    let Ok(text) = std::str::from_utf8(value) else { return };
    // Split into (user, upstream, session) at the first two `|`.
    let mut parts = text.splitn(3, '|');
    let (user, upstream, session) =
        (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let bound = binder.bind(user, upstream, session);
    assert_eq!(binder.unbind(user, upstream, &bound), Some(session), "round trip");
    if user != "mallory" {
        assert_eq!(binder.unbind("mallory", upstream, &bound), None, "another user's session accepted");
    }
    // Whatever is accepted as presented was bound for this user and upstream (the tag's hex in any case).
    if let Some(s) = binder.unbind(user, upstream, session) {
        let expected = binder.bind(user, upstream, s);
        assert!(session.eq_ignore_ascii_case(&expected) && session.starts_with(s), "{session:?} unbound to {s:?}");
    }
}

fn check_unbind_request(binder: &SessionBinder, headers: &HeaderMap, path: Option<&str>) {
    let mut builder = Request::builder().uri(path.unwrap_or("/mcp/gh"));
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    let Ok(request) = builder.body(()) else { return };
    let (mut parts, ()): (Parts, ()) = request.into_parts();
    let presented_header = parts.headers.get(SESSION_HEADER).cloned();
    if let Ok(presented) = unbind_request(&mut parts, binder, "alice", "gh")
        && let Some(presented_header) = presented_header
    {
        // The upstream gets the session that was bound to alice on gh, and nothing else.
        let forwarded = parts.headers.get(SESSION_HEADER).expect("the session header is kept, unbound");
        let forwarded = forwarded.to_str().expect("an unbound session is a str");
        let rebound = binder.bind("alice", "gh", forwarded);
        assert!(rebound.as_bytes().eq_ignore_ascii_case(presented_header.as_bytes()), "{presented_header:?}");
        assert!(presented.fingerprint.is_some());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&bound, fields)) = data.split_first() else { return };
    let max = match bound % 4 {
        0 => 128,
        1 => 1,
        2 => 16,
        _ => usize::from(bound),
    };
    let mut headers = HeaderMap::new();
    let mut path = None;
    let binder = SessionBinder::new(&Secret::new("fuzz session key"));
    for field in fields.split(|&b| b == 0) {
        let Some((&which, value)) = field.split_first() else { continue };
        let name = match which % 5 {
            0 => USER_HEADER,
            1 => "authorization",
            2 => SESSION_HEADER,
            3 => {
                if let Ok(p) = std::str::from_utf8(value) {
                    check_paths(p);
                    path = Some(p);
                }
                continue;
            }
            _ => {
                check_sessions(&binder, value);
                continue;
            }
        };
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(HeaderName::from_static(name), value);
        }
    }
    check_ids(&headers, max);
    check_auth(&DIRECTORY, &headers);
    check_unbind_request(&binder, &headers, path);
});
