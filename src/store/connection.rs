//! A user's OAuth connection to an upstream as the store keeps it: the provider's token set, as JSON,
//! is the secret of the credential [`CONNECTION_ID`] of (user, upstream), so it is encrypted, rotated
//! with the master key, copied by `store migrate`, deleted with the user and announced to replicas
//! exactly like every other credential.

use std::fmt;

use http::HeaderValue;
use serde::{Deserialize, Serialize};

use super::model::UnixTime;
use crate::secret::Secret;

/// The credential id that holds a connection. Reserved: the admin API and the CLI refuse it for
/// credentials of their own, and a connection is never injected as a static credential.
pub const CONNECTION_ID: &str = "oauth";

/// The token set and what the user was told about it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tokens {
    pub access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// When the access token expires; `None`: the provider did not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<UnixTime>,
    /// The scopes granted (space-separated), as the provider reported them.
    #[serde(default)]
    pub scope: String,
    /// The provider's name for the account (e.g. its login), as shown on the success page.
    #[serde(default)]
    pub account: String,
    pub connected_at: UnixTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshed_at: Option<UnixTime>,
    /// Why the provider refused the last refresh: the user must connect again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs_reconnect: Option<String>,
    /// A random id of this grant: new at every connect and disconnect, kept by refreshes. A connect
    /// link names the grant it replaces (none for a first connect), so a link cannot replace a later
    /// connection, and a disconnect voids every link made before it.
    #[serde(default)]
    pub grant: String,
}

/// The `needs_reconnect` of a disconnected connection.
const DISCONNECTED: &str = "disconnected";

impl Tokens {
    /// What a disconnect leaves: no token, a new grant. A row rather than none, so that links made
    /// before (which name the grant they replace, or none) no longer match and only a new link connects.
    pub fn disconnected(now: UnixTime) -> Tokens {
        Tokens {
            access_token: String::new(),
            refresh_token: None,
            expires_at: None,
            scope: String::new(),
            account: String::new(),
            connected_at: now,
            refreshed_at: None,
            needs_reconnect: Some(DISCONNECTED.into()),
            grant: format!("{:032x}", rand::random::<u128>()),
        }
    }

    pub fn is_disconnected(&self) -> bool {
        self.access_token.is_empty() && self.needs_reconnect.as_deref() == Some(DISCONNECTED)
    }

    pub fn parse(secret: &Secret) -> Option<Tokens> {
        serde_json::from_str(secret.expose()).ok()
    }

    pub fn to_secret(&self) -> Secret {
        Secret::new(serde_json::to_string(self).expect("plain strings and integers serialize"))
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("access_token", &"***")
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "***"))
            .field("expires_at", &self.expires_at)
            .field("scope", &self.scope)
            .field("account", &self.account)
            .field("needs_reconnect", &self.needs_reconnect)
            .finish()
    }
}

/// A connection as the request path holds it: the tokens and the access token already rendered into
/// the header value the upstream expects (sensitive).
#[derive(Debug)]
pub struct Connection {
    pub tokens: Tokens,
    pub header_value: HeaderValue,
    /// SHA-256 of the stored secret: what a refresh swaps from (`Store::swap_credential`).
    pub digest: [u8; 32],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_hide_in_debug() {
        let tokens = Tokens {
            access_token: "at-secret".into(),
            refresh_token: Some("rt-secret".into()),
            expires_at: Some(100),
            scope: "repo".into(),
            account: "octocat".into(),
            connected_at: 1,
            refreshed_at: None,
            needs_reconnect: None,
            grant: "g1".into(),
        };
        assert_eq!(Tokens::parse(&tokens.to_secret()), Some(tokens.clone()));
        let debug = format!("{tokens:?}");
        assert!(!debug.contains("secret") && debug.contains("octocat"), "{debug}");
        assert_eq!(Tokens::parse(&Secret::new("ghp_static")), None, "a static credential is not a connection");
    }
}
