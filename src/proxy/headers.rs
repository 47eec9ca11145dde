//! Header checks at the edge and the request rewrite before forwarding.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};

use crate::config::Upstream;
use crate::error::ProxyError;

/// Client header naming which of the acting user's credentials to use.
pub const CREDENTIAL_ID: &str = "x-credential-id";

/// Headers that describe one hop and must not be forwarded (RFC 9110 7.6.1), besides those named in
/// `Connection` and every `Proxy-*` header.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Total size of the request's header fields, counted as on the wire (`name: value\r\n`).
pub fn check_size(headers: &HeaderMap, max_bytes: usize) -> Result<(), ProxyError> {
    let total: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    if total > max_bytes {
        return Err(ProxyError::HeadersTooLarge);
    }
    Ok(())
}

/// The header's only value; two values of a header that decides identity are ambiguous and refused.
pub fn single<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
    label: &'static str,
) -> Result<Option<&'a HeaderValue>, ProxyError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(ProxyError::DuplicateHeader(label));
    }
    Ok(first)
}

/// The spec's DNS-rebinding rule at the edge: a request without `Origin` passes; one with an `Origin`
/// passes only if it is in `allowed` (the configured list, or the proxy's own loopback origins). The
/// client's `Host` is never the reference: in a rebinding attack it names the attacker's domain too.
pub fn check_origin(parts: &Parts, allowed: &[String]) -> Result<(), ProxyError> {
    let Some(origin) = single(&parts.headers, &header::ORIGIN, "origin")? else {
        return Ok(());
    };
    let origin = origin.to_str().map_err(|_| ProxyError::OriginNotAllowed)?.trim_end_matches('/');
    if allowed.iter().any(|o| o.eq_ignore_ascii_case(origin)) { Ok(()) } else { Err(ProxyError::OriginNotAllowed) }
}

/// The proxy's own origins, allowed when no `allowed_origins` are configured: the loopback names at the
/// port it listens on, and its listen address when that is a specific one.
pub fn own_origins(listen: SocketAddr, tls: bool) -> Vec<String> {
    let scheme = if tls { "https" } else { "http" };
    let port = listen.port();
    let mut own: Vec<String> =
        ["localhost", "127.0.0.1", "[::1]"].iter().map(|host| format!("{scheme}://{host}:{port}")).collect();
    if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
        own.push(format!("{scheme}://{listen}"));
    }
    own
}

/// Refuses paths that could mean something else once the upstream normalizes them: `.` and `..`
/// segments (also percent-encoded), encoded slashes and backslashes, NUL, and empty segments (`//`;
/// a trailing slash is fine).
pub fn check_path(path: &str) -> Result<(), ProxyError> {
    let bytes = path.as_bytes();
    let encoded = |needle: &[u8]| bytes.windows(3).any(|w| w.eq_ignore_ascii_case(needle));
    if path.contains('\\') || encoded(b"%2f") || encoded(b"%5c") || encoded(b"%00") {
        return Err(ProxyError::InvalidPath);
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        if (segment.is_empty() && i != last) || is_dot_segment(segment) {
            return Err(ProxyError::InvalidPath);
        }
    }
    Ok(())
}

/// `.` or `..`, each dot possibly written `%2e`.
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[..3].eq_ignore_ascii_case(b"%2e") {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    (1..=2).contains(&dots)
}

/// RFC 9112 section 3.2: an HTTP/1.1 request has exactly one valid `Host` (none is only allowed before
/// 1.1, two never); RFC 9113 section 8.3.1: an HTTP/2 `Host` must name the same authority as
/// `:authority`. Otherwise the proxy and the upstream could disagree on what was addressed.
pub fn check_host(parts: &Parts) -> Result<(), ProxyError> {
    // Userinfo has no place in an authority a request addresses (RFC 9110 section 4.2.4), in `Host` or
    // in the target.
    if parts.uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(ProxyError::InvalidHost);
    }
    let host = single(&parts.headers, &header::HOST, "host").map_err(|_| ProxyError::InvalidHost)?;
    let Some(host) = host else {
        return match parts.version {
            http::Version::HTTP_09 | http::Version::HTTP_10 | http::Version::HTTP_2 | http::Version::HTTP_3 => Ok(()),
            _ => Err(ProxyError::InvalidHost),
        };
    };
    let authority = http::uri::Authority::try_from(host.as_bytes()).map_err(|_| ProxyError::InvalidHost)?;
    if authority.as_str().contains('@') {
        return Err(ProxyError::InvalidHost);
    }
    let h2 = matches!(parts.version, http::Version::HTTP_2 | http::Version::HTTP_3);
    match parts.uri.authority() {
        Some(target) if h2 && !target.as_str().eq_ignore_ascii_case(authority.as_str()) => Err(ProxyError::InvalidHost),
        _ => Ok(()),
    }
}

/// The authority the client addressed: the request target's when it has one (absolute-form, or HTTP/2's
/// `:authority`), which wins over `Host` (RFC 9112 section 3.2.2); else `Host`.
fn request_host(parts: &Parts) -> Option<&str> {
    match parts.uri.authority() {
        Some(authority) => Some(authority.as_str()),
        None => parts.headers.get(header::HOST)?.to_str().ok(),
    }
}

/// What the rewrite needs besides the request and the upstream.
pub struct Rewrite<'a> {
    pub user_header: &'a HeaderName,
    /// The user token is the user's own proof of identity: it never reaches the upstream.
    pub token_header: &'a HeaderName,
    pub credential: &'a HeaderValue,
    pub acting_user: &'a str,
    pub peer: SocketAddr,
    pub tls: bool,
    pub request_id: &'a str,
    pub trace: &'a crate::telemetry::trace::TraceContext,
}

/// Turns the client's request into the upstream's: new URI, client secrets and hop-by-hop headers
/// removed, the acting user's credential injected. Removal happens before insertion so no client-sent
/// copy of an injected header survives.
pub fn rewrite_request(parts: &mut Parts, upstream: &Upstream, rw: &Rewrite<'_>) -> Result<(), ProxyError> {
    let original_host = request_host(parts).and_then(|h| HeaderValue::from_str(h).ok());
    parts.uri = upstream_uri(upstream, upstream.rest_of(parts.uri.path()), parts.uri.query())?;
    parts.version = http::Version::HTTP_11; // the pooled client picks h1 or h2 per connection

    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    for name in [header::AUTHORIZATION, header::HOST, header::ORIGIN] {
        headers.remove(name);
    }
    headers.remove(rw.user_header);
    headers.remove(rw.token_header);
    headers.remove(CREDENTIAL_ID);
    strip_flow_cookies(headers);
    if let Some(name) = &upstream.forward_user_header {
        headers.remove(name);
        // A resolved user id is ASCII from a fixed set, always a valid header value.
        if let Ok(value) = HeaderValue::from_str(rw.acting_user) {
            headers.insert(name, value);
        }
    }
    headers.insert(&upstream.inject_header, rw.credential.clone());
    // Answers are read (tools/list filtering, session binding, the legacy endpoint): ask for them
    // uncompressed. Between a sidecar and its server compression buys nothing.
    headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));

    append_forwarded_for(headers, rw.peer);
    let proto = if rw.tls { "https" } else { "http" };
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    match original_host {
        Some(host) => headers.insert("x-forwarded-host", host),
        None => headers.remove("x-forwarded-host"),
    };
    if let Ok(id) = HeaderValue::from_str(rw.request_id) {
        headers.insert("x-request-id", id);
    }
    rw.trace.apply(headers);
    Ok(())
}

/// The proxy's own cookies (the OAuth connect flow's: `mtp_oauth_*`, over https `__Host-mtp_oauth_*`,
/// sent by a browser to every path of the origin) are the proxy's, not the upstream's: removed from
/// `Cookie`, and the header with them when nothing else is left.
fn strip_flow_cookies(headers: &mut HeaderMap) {
    const OURS: &[u8] = b"mtp_oauth_";
    if !headers.get_all(header::COOKIE).iter().any(|v| v.as_bytes().windows(OURS.len()).any(|w| w == OURS)) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| String::from_utf8_lossy(v.as_bytes()).split(';').map(|p| p.trim().to_owned()).collect::<Vec<_>>())
        .filter(|pair| {
            let name = pair.split_once('=').map_or(pair.as_str(), |(n, _)| n).trim();
            !name.trim_start_matches("__Host-").starts_with("mtp_oauth_") && !pair.is_empty()
        })
        .collect();
    headers.remove(header::COOKIE);
    if let Ok(value) = HeaderValue::from_str(&kept.join("; "))
        && !kept.is_empty()
    {
        headers.insert(header::COOKIE, value);
    }
}

/// An upstream is served on the proxy's origin, so a `Set-Cookie` of the flow's names from it would be
/// the proxy's cookie in the browser (a planted flow cookie lets someone else's flow finish there):
/// such answers lose those `Set-Cookie`s.
pub fn strip_flow_set_cookies(headers: &mut HeaderMap) {
    let ours = |v: &HeaderValue| {
        let name = v.as_bytes().split(|b| *b == b'=').next().unwrap_or_default();
        let name = String::from_utf8_lossy(name);
        let name = name.trim();
        let name = name.strip_prefix("__Host-").or_else(|| name.strip_prefix("__Secure-")).unwrap_or(name);
        name.starts_with("mtp_oauth_")
    };
    if !headers.get_all(header::SET_COOKIE).iter().any(ours) {
        return;
    }
    let kept: Vec<HeaderValue> = headers.get_all(header::SET_COOKIE).iter().filter(|v| !ours(v)).cloned().collect();
    headers.remove(header::SET_COOKIE);
    for value in kept {
        headers.append(header::SET_COOKIE, value);
    }
}

fn upstream_uri(upstream: &Upstream, rest: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
    let mut path = String::with_capacity(upstream.base_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1);
    path.push_str(&upstream.base_path);
    path.push_str(rest);
    if path.is_empty() {
        path.push('/');
    }
    if let Some(q) = query {
        path.push('?');
        path.push_str(q);
    }
    let path_and_query = PathAndQuery::try_from(path).map_err(|_| ProxyError::RouteNotFound)?;
    Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| ProxyError::RouteNotFound)
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_string();
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip,
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", value);
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header names and every `Proxy-*`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if headers.keys().any(|k| k.as_str().starts_with("proxy-")) {
        let proxy: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().starts_with("proxy-")).cloned().collect();
        for name in proxy {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().uri("/mcp/github");
        for (n, v) in headers {
            builder = builder.header(*n, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_connect_flows_cookies_stay_with_the_proxy() {
        let strip = |cookies: &[&str]| {
            let mut headers = HeaderMap::new();
            for c in cookies {
                headers.append(header::COOKIE, HeaderValue::from_str(c).unwrap());
            }
            strip_flow_cookies(&mut headers);
            headers.get_all(header::COOKIE).iter().map(|v| v.to_str().unwrap().to_owned()).collect::<Vec<_>>()
        };
        assert_eq!(strip(&["a=1; __Host-mtp_oauth_flow=x; b=2"]), ["a=1; b=2"]);
        assert_eq!(strip(&["mtp_oauth_confirm=y", "theirs=3"]), ["theirs=3"]);
        assert!(strip(&["__Host-mtp_oauth_confirm=y; mtp_oauth_flow=z"]).is_empty(), "nothing left: no header");
        assert_eq!(strip(&["a=1; b=2"]), ["a=1; b=2"], "untouched without ours");
        assert_eq!(strip(&["x=mtp_oauth_flow"]), ["x=mtp_oauth_flow"], "a value that looks like ours is theirs");
    }

    #[test]
    fn an_upstream_cannot_set_the_connect_flows_cookies() {
        let mut headers = HeaderMap::new();
        for c in [
            "theirs=1; Path=/",
            "__Host-mtp_oauth_flow=v; Path=/; Secure",
            " mtp_oauth_confirm=x",
            "__Secure-mtp_oauth_flow=y",
        ] {
            headers.append(header::SET_COOKIE, HeaderValue::from_str(c).unwrap());
        }
        strip_flow_set_cookies(&mut headers);
        let left: Vec<_> = headers.get_all(header::SET_COOKIE).iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(left, ["theirs=1; Path=/"]);
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut p = parts(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic abc"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut p.headers);
        let names: Vec<_> = p.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep"]);
    }

    #[test]
    fn origin_rules() {
        let allowed = vec!["http://localhost:8080".to_owned(), "https://app.example.com".to_owned()];
        let check =
            |origin: &'static str| check_origin(&parts(&[("host", "evil.example"), ("origin", origin)]), &allowed);
        assert_eq!(check("http://localhost:8080"), Ok(()));
        assert_eq!(check("HTTPS://APP.EXAMPLE.COM/"), Ok(()));
        // A rebinding page has Host and Origin agree on the attacker's name: still refused.
        assert_eq!(check("http://evil.example"), Err(ProxyError::OriginNotAllowed));
        assert_eq!(check("null"), Err(ProxyError::OriginNotAllowed));
        assert_eq!(check_origin(&parts(&[("host", "x")]), &allowed), Ok(()));
        let two = parts(&[("origin", "http://localhost:8080"), ("origin", "http://b")]);
        assert_eq!(check_origin(&two, &allowed), Err(ProxyError::DuplicateHeader("origin")));
    }

    #[test]
    fn paths_that_could_escape_the_route_are_refused() {
        for ok in ["/mcp/github", "/mcp/github/", "/mcp/github/messages/", "/mcp/github/a.b/..c/.d", "/"] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "/mcp/github/../admin",
            "/mcp/github/./x",
            "/mcp/github/%2e%2e/admin",
            "/mcp/github/.%2E/admin",
            "/mcp/github/%2E",
            "/mcp/github/..",
            "/mcp//github",
            "/mcp/github/a%2fb",
            "/mcp/github/a%5Cb",
            "/mcp/github/a\\b",
            "/mcp/github/a%00",
        ] {
            assert_eq!(check_path(bad), Err(ProxyError::InvalidPath), "{bad}");
        }
    }

    #[test]
    fn header_size_counts_names_and_values() {
        let p = parts(&[("x-a", "12345")]);
        assert_eq!(check_size(&p.headers, 12), Ok(()));
        assert_eq!(check_size(&p.headers, 11), Err(ProxyError::HeadersTooLarge));
    }
}
