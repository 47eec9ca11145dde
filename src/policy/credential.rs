//! Which of the acting user's credentials for the upstream is injected.

use http::{HeaderMap, HeaderName};

use crate::error::ProxyError;
use crate::proxy::headers::{CREDENTIAL_ID, single};
use crate::store::{Credential, check_user_id};

/// `x-credential-id` picks one by id; without it, the one called `default`, or the only one.
pub fn select<'a>(credentials: &'a [Credential], headers: &HeaderMap) -> Result<&'a Credential, ProxyError> {
    let requested = single(headers, &HeaderName::from_static(CREDENTIAL_ID), CREDENTIAL_ID)?;
    if credentials.is_empty() {
        return Err(ProxyError::MissingCredential);
    }
    match requested {
        Some(value) => {
            let id = value
                .to_str()
                .ok()
                .filter(|id| check_user_id(id, 128).is_ok())
                .ok_or(ProxyError::InvalidCredentialId)?;
            credentials.iter().find(|c| &*c.id == id).ok_or(ProxyError::UnknownCredential)
        }
        None => match credentials.iter().find(|c| &*c.id == "default") {
            Some(c) => Ok(c),
            None if credentials.len() == 1 => Ok(&credentials[0]),
            None => Err(ProxyError::AmbiguousCredential),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cred(id: &str) -> Credential {
        Credential { id: id.into(), header_value: HeaderValue::from_str(&format!("Bearer {id}")).unwrap() }
    }

    fn headers(id: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(id) = id {
            h.insert(CREDENTIAL_ID, HeaderValue::from_str(id).unwrap());
        }
        h
    }

    #[test]
    fn selection_rules() {
        let only = [cred("work")];
        let two = [cred("work"), cred("default")];
        let ambiguous = [cred("work"), cred("home")];
        assert_eq!(&*select(&only, &headers(None)).unwrap().id, "work");
        assert_eq!(&*select(&two, &headers(None)).unwrap().id, "default");
        assert_eq!(&*select(&two, &headers(Some("work"))).unwrap().id, "work");
        assert_eq!(select(&two, &headers(Some("nope"))).unwrap_err(), ProxyError::UnknownCredential);
        assert_eq!(select(&two, &headers(Some("bad id"))).unwrap_err(), ProxyError::InvalidCredentialId);
        assert_eq!(select(&ambiguous, &headers(None)).unwrap_err(), ProxyError::AmbiguousCredential);
        assert_eq!(select(&[], &headers(None)).unwrap_err(), ProxyError::MissingCredential);
        assert_eq!(select(&[], &headers(Some("work"))).unwrap_err(), ProxyError::MissingCredential);
    }
}
