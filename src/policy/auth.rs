//! Authentication: `Authorization: Bearer <key>`, looked up by the key's SHA-256.

use http::{HeaderMap, header};

use crate::error::ProxyError;
use crate::proxy::headers::single;
use crate::secret::sha256;
use crate::store::{ApiKey, Directory};

pub fn authenticate<'a>(directory: &'a Directory, headers: &HeaderMap) -> Result<&'a ApiKey, ProxyError> {
    let value = single(headers, &header::AUTHORIZATION, "authorization")?.ok_or(ProxyError::MissingApiKey)?;
    let token = bearer_token(value.as_bytes()).ok_or(ProxyError::InvalidApiKey)?;
    directory.key_by_hash(&sha256(token)).ok_or(ProxyError::InvalidApiKey)
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
    fn bearer_parsing() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearerabc"), None);
        assert_eq!(bearer_token(b"Bearer a b"), None);
    }
}
