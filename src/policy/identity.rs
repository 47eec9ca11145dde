//! Identity: which user a request acts as.
//!
//! A standard key acts as its own user. An enterprise key may name another user in the user header,
//! within its `act_as` patterns. A malformed header is refused, never "cleaned" into another user id.
//! `act_as` is checked before existence, so a key cannot probe which users outside its reach exist.

use http::HeaderMap;

use crate::config::Config;
use crate::config::UnknownUserPolicy;
use crate::config::runtime::IdentitySettings;
use crate::error::ProxyError;
use crate::proxy::headers::single;
use crate::store::{ApiKey, KeyKind, UserRef, check_user_id};

#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: UserRef,
    /// The unknown user was replaced by the key's own user (`unknown_user = "default"`).
    pub fallback: bool,
}

/// The user named in the user header, once it is well-formed. Kept for the audit line.
pub fn requested_user<'h>(settings: &IdentitySettings, headers: &'h HeaderMap) -> Result<Option<&'h str>, ProxyError> {
    let Some(value) = single(headers, &settings.user_header, "user")
        .map_err(|_| ProxyError::InvalidUserId("the header appears more than once"))?
    else {
        return Ok(None);
    };
    let name = value
        .to_str()
        .map_err(|_| ProxyError::InvalidUserId("only ASCII letters, digits and . _ @ : - are allowed"))?;
    check_user_id(name, settings.max_user_id_len).map_err(ProxyError::InvalidUserId)?;
    Ok(Some(name))
}

/// `proven`: a user token named `requested`. An unknown proven user is refused whatever
/// `unknown_user` says: acting as the key's own user instead would turn any account the issuer has
/// into the key's (often broad) identity.
pub fn resolve(
    settings: &IdentitySettings,
    config: &Config,
    key: &ApiKey,
    requested: Option<&str>,
    proven: bool,
) -> Result<Identity, ProxyError> {
    let own = || Identity { user: key.user.clone(), fallback: false };
    let Some(name) = requested else { return Ok(own()) };
    if *key.user.name == *name {
        return Ok(own());
    }
    if key.kind == KeyKind::Standard {
        return Err(ProxyError::UserOverrideForbidden);
    }
    if !key.may_act_as(name) {
        return Err(ProxyError::UserNotPermitted);
    }
    match (config.user(name), settings.unknown_user) {
        (Some(user), _) => Ok(Identity { user, fallback: false }),
        (None, _) if proven => Err(ProxyError::UnknownUser),
        (None, UnknownUserPolicy::Reject) => Err(ProxyError::UnknownUser),
        (None, UnknownUserPolicy::Default) => Ok(Identity { user: key.user.clone(), fallback: true }),
    }
}
