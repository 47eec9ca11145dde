//! Authentication: `Authorization: Bearer <key>`, looked up by the key's SHA-256.

use std::sync::Arc;

use http::{HeaderMap, header};

use crate::config::Config;
use crate::error::ProxyError;
use crate::proxy::headers::single;
use crate::secret::sha256;
use crate::store::ApiKey;

pub fn authenticate(config: &Config, headers: &HeaderMap) -> Result<Arc<ApiKey>, ProxyError> {
    let value = single(headers, &header::AUTHORIZATION, "authorization")?.ok_or(ProxyError::MissingApiKey)?;
    let token = bearer_token(value.as_bytes()).ok_or(ProxyError::InvalidApiKey)?;
    let key = config.key_by_hash(&sha256(token)).ok_or(ProxyError::InvalidApiKey)?;
    if key.expires_at.is_some_and(|at| at <= unix_now()) {
        return Err(ProxyError::InvalidApiKey);
    }
    Ok(key)
}

/// A token URL (`/mcp/<upstream>/t/<token>`): it authenticates as its user, on its upstream only.
/// Unknown, expired and revoked tokens, and tokens of another upstream, are all 401.
pub fn authenticate_token(config: &Config, token: &str, upstream: &str) -> Result<Arc<ApiKey>, ProxyError> {
    let grant = config.token_by_hash(&sha256(token.as_bytes())).ok_or(ProxyError::InvalidApiKey)?;
    let live = grant.key.expires_at.is_none_or(|at| at > unix_now());
    if *grant.upstream != *upstream || !live {
        return Err(ProxyError::InvalidApiKey);
    }
    Ok(grant.key.clone())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// The token of a `Bearer` credential (scheme case-insensitive, RFC 9110 11.1).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty() && token.iter().all(|b| b.is_ascii_graphic())).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_key_is_refused_even_while_it_is_in_the_directory() {
        use crate::store::{ApiKey, KeyKind};
        let mut config = Config::from_toml("", std::path::Path::new(".")).unwrap();
        let dir = &mut config.directory;
        dir.add_user("dana");
        let user = dir.user_ref("dana").unwrap();
        for (token, expires_at) in [("old", Some(1)), ("current", Some(i64::MAX)), ("forever", None)] {
            let key = ApiKey {
                index: 0,
                id: token.into(),
                kind: KeyKind::Standard,
                user: user.clone(),
                act_as: vec![],
                rate_limit: None,
                expires_at,
                user_token: None,
            };
            dir.add_key(sha256(token.as_bytes()), key);
        }
        let headers = |token: &str| -> HeaderMap {
            [(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap())].into_iter().collect()
        };
        assert_eq!(authenticate(&config, &headers("old")).unwrap_err(), ProxyError::InvalidApiKey);
        assert_eq!(&*authenticate(&config, &headers("current")).unwrap().id, "current");
        assert_eq!(&*authenticate(&config, &headers("forever")).unwrap().id, "forever");
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearerabc"), None);
        assert_eq!(bearer_token(b"Bearer a b"), None);
    }
}
