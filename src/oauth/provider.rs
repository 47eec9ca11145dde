//! Calls to an upstream's OAuth token endpoint (RFC 6749 4.1.3 and 6, PKCE per RFC 7636, client
//! authentication `client_secret_basic`) and reading its answers.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Request, header};
use serde::Deserialize;

use crate::config::oauth::{ProviderEndpoints, UpstreamOAuth};
use crate::proxy::forward::call_bounded;
use crate::store::connection::Tokens;
use crate::store::model::UnixTime;

/// A token endpoint that takes longer is treated as down: the request that waits on it gets a 503.
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest token response read (a JWT access token plus an ID token fit many times over).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Why a token request did not give tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// The provider refused the grant (`invalid_grant`: revoked, expired or already spent): the user
    /// must connect again.
    Refused(String),
    /// Anything else (unreachable, timeout, 5xx, an answer that is not a token response): may pass.
    Failed(String),
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: Option<String>,
    #[serde(default, deserialize_with = "seconds")]
    expires_in: Option<i64>,
    refresh_token: Option<String>,
    scope: Option<String>,
    id_token: Option<String>,
}

/// `expires_in` as a number, or as a string of digits (some providers send that).
fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seconds {
        Number(i64),
        Text(String),
    }
    match Option::<Seconds>::deserialize(d)? {
        None => Ok(None),
        Some(Seconds::Number(n)) => Ok(Some(n)),
        Some(Seconds::Text(t)) => t.parse().map(Some).map_err(|_| serde::de::Error::custom("expires_in")),
    }
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
}

/// Exchanges an authorization code (with its PKCE verifier) for a new connection's tokens.
pub async fn exchange_code(
    oauth: &UpstreamOAuth,
    endpoints: &ProviderEndpoints,
    redirect_uri: &str,
    code: &str,
    verifier: &str,
    now: UnixTime,
) -> Result<Tokens, TokenError> {
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", redirect_uri),
        ("code_verifier", verifier),
    ];
    form.extend(resource(oauth, endpoints).map(|r| ("resource", r)));
    let answer = post(oauth, endpoints, &form).await?;
    let account = answer.id_token.as_deref().and_then(account_of).unwrap_or_default();
    Ok(Tokens {
        access_token: answer.access_token,
        refresh_token: answer.refresh_token,
        expires_at: answer.expires_in.map(|s| now.saturating_add(s.max(0))),
        scope: answer.scope.unwrap_or_else(|| oauth.scope.clone()),
        account,
        connected_at: now,
        refreshed_at: None,
        needs_reconnect: None,
        grant: format!("{:032x}", rand::random::<u128>()),
    })
}

/// Spends `old`'s refresh token for new tokens. A provider that rotates refresh tokens returns a new
/// one; one that does not keeps the old one valid, and it is kept.
pub async fn refresh(
    oauth: &UpstreamOAuth,
    endpoints: &ProviderEndpoints,
    old: &Tokens,
    now: UnixTime,
) -> Result<Tokens, TokenError> {
    let Some(refresh_token) = old.refresh_token.as_deref() else {
        return Err(TokenError::Refused("the provider gave no refresh token".into()));
    };
    let mut form = vec![("grant_type", "refresh_token"), ("refresh_token", refresh_token)];
    form.extend(resource(oauth, endpoints).map(|r| ("resource", r)));
    let answer = post(oauth, endpoints, &form).await?;
    Ok(Tokens {
        access_token: answer.access_token,
        refresh_token: answer.refresh_token.or_else(|| old.refresh_token.clone()),
        expires_at: answer.expires_in.map(|s| now.saturating_add(s.max(0))),
        scope: answer.scope.unwrap_or_else(|| old.scope.clone()),
        account: old.account.clone(),
        connected_at: old.connected_at,
        refreshed_at: Some(now),
        needs_reconnect: None,
        grant: old.grant.clone(),
    })
}

/// The RFC 8707 resource: the configured one, else the one the upstream's metadata names.
pub fn resource<'a>(oauth: &'a UpstreamOAuth, endpoints: &'a ProviderEndpoints) -> Option<&'a str> {
    oauth.resource.as_deref().or(endpoints.resource.as_deref())
}

async fn post(
    oauth: &UpstreamOAuth,
    endpoints: &ProviderEndpoints,
    form: &[(&str, &str)],
) -> Result<TokenResponse, TokenError> {
    let failed = |e: String| TokenError::Failed(e);
    let body: String = form.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&");
    // RFC 6749 2.3.1: the id and secret are form-encoded before they are joined.
    let basic = format!("{}:{}", encode(&oauth.client_id), encode(oauth.client_secret.expose()));
    let mut authorization =
        HeaderValue::try_from(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(basic)))
            .map_err(|_| failed("the client credentials cannot go in a header".into()))?;
    authorization.set_sensitive(true);
    let request = Request::post(endpoints.token.clone())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "application/json")
        .header(header::AUTHORIZATION, authorization)
        .body(crate::proxy::body::full(Bytes::from(body)))
        .map_err(|e| failed(e.to_string()))?;
    let (status, body) = call_bounded(&oauth.client, request, MAX_RESPONSE_BYTES, TOKEN_TIMEOUT)
        .await
        .map_err(|e| failed(format!("token endpoint: {e}")))?;
    let body = body.map_err(|e| failed(format!("token endpoint: {e}")))?;
    if status.is_success() {
        let answer: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| failed("the token endpoint's answer is not a token response".into()))?;
        // RFC 6750's b64token characters: it goes into a header as it is.
        let token_chars = |b: u8| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b);
        if answer.access_token.is_empty() || !answer.access_token.bytes().all(token_chars) {
            return Err(failed("the token endpoint's access token is empty or not a bearer token".into()));
        }
        if answer.token_type.as_deref().is_some_and(|t| !t.eq_ignore_ascii_case("bearer")) {
            return Err(failed("the token endpoint issued a token that is not a bearer token".into()));
        }
        return Ok(answer);
    }
    let error = serde_json::from_slice::<ErrorResponse>(&body).map(|e| e.error).unwrap_or_default();
    // Only the error code goes on (it is a fixed ASCII word per RFC 6749 5.2), never the body.
    let error: String = error.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(64).collect();
    match (status.as_u16(), error.as_str()) {
        (400 | 401, "invalid_grant") => Err(TokenError::Refused(error)),
        _ => Err(failed(format!("token endpoint: status {status} {error}"))),
    }
}

/// The account an ID token names, as a person would recognise it. Not verified: it came straight from
/// the token endpoint over the connection the proxy opened (OpenID Connect Core 3.1.3.7), and it is only
/// shown, never trusted for a decision.
fn account_of(id_token: &str) -> Option<String> {
    let payload = id_token.split('.').nth(1)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    ["preferred_username", "email", "sub"]
        .iter()
        .find_map(|c| claims.get(c).and_then(|v| v.as_str()))
        .map(|s| s.chars().filter(|c| !c.is_control()).take(256).collect())
}

/// `application/x-www-form-urlencoded` for one name or value (and RFC 3986 unreserved characters kept,
/// so it also serves for query strings).
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Decodes one `application/x-www-form-urlencoded` value; `None` when it is not UTF-8.
pub fn decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The value of `name` in a query string; `None` when it is absent, repeated or not decodable.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    let mut found = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if decode(key).as_deref() == Some(name) {
            if found.is_some() {
                return None;
            }
            found = Some(decode(value)?);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_round_trips() {
        for s in ["plain", "a b&c=d", "ünï", "%41", "x+y"] {
            assert_eq!(decode(&encode(s)).as_deref(), Some(s));
        }
        assert_eq!(decode("a+b%20c"), Some("a b c".into()));
        assert_eq!(decode("%4"), None);
        assert_eq!(decode("%zz"), None);
        assert_eq!(decode("%ff"), None, "not UTF-8");
        assert_eq!(query_param("code=abc&state=x%2By", "state"), Some("x+y".into()));
        assert_eq!(query_param("code=a&code=b", "code"), None, "repeated");
        assert_eq!(query_param("other=1", "code"), None);
    }

    #[test]
    fn the_account_comes_from_the_id_token() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"sub":"42","email":"a@b.c"}"#);
        assert_eq!(account_of(&format!("h.{claims}.s")), Some("a@b.c".into()));
        assert_eq!(account_of("not a jwt"), None);
    }

    #[test]
    fn expires_in_is_a_number_or_a_string_of_digits() {
        let read = |json: &str| serde_json::from_str::<TokenResponse>(json).ok().map(|r| r.expires_in);
        assert_eq!(read(r#"{"access_token":"a","expires_in":3600}"#), Some(Some(3600)));
        assert_eq!(read(r#"{"access_token":"a","expires_in":"3600"}"#), Some(Some(3600)));
        assert_eq!(read(r#"{"access_token":"a","expires_in":null}"#), Some(None));
        assert_eq!(read(r#"{"access_token":"a"}"#), Some(None));
        assert_eq!(read(r#"{"access_token":"a","expires_in":"soon"}"#), None);
        assert_eq!(read(r#"{"access_token":"a","expires_in":1.5}"#), None);
    }
}
