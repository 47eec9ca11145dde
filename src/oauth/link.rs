//! The two tokens of a connect flow, both made and read without a database round trip on the way out:
//!
//! - a **link** (`/connect?link=...`): (user, upstream, expiry, nonce), signed with HMAC-SHA256. Any
//!   replica holding the master key can check it; its nonce is spent in the store when it is opened,
//!   so it works once.
//! - a **state** (the OAuth `state` parameter): (user, upstream, expiry, nonce, PKCE verifier, digest of
//!   the browser cookie), sealed with AES-256-GCM, so the verifier never leaves the proxy readable and
//!   the callback needs no stored flow. Its nonce is spent at the callback.
//!
//! Both keys are derived from the store's master key (`Store::derive_key`), so replicas agree.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::store::model::UnixTime;

pub const LINK_LABEL: &str = "mcp-tenant-proxy oauth connect link v1";
pub const STATE_LABEL: &str = "mcp-tenant-proxy oauth flow state v1";

/// Longest link or state accepted: a user id and an upstream name of at most 128 bytes each, plus
/// fixed-size fields, fit in well under this.
const MAX_TOKEN_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    #[serde(rename = "u")]
    pub user: String,
    #[serde(rename = "s")]
    pub upstream: String,
    #[serde(rename = "e")]
    pub expires_at: UnixTime,
    #[serde(rename = "n", with = "hex32")]
    pub nonce: [u8; 32],
    /// The grant this link may replace ([`crate::store::connection::Tokens::grant`]); `None`: it only
    /// connects a user who has no connection.
    #[serde(rename = "g", default, skip_serializing_if = "Option::is_none")]
    pub over: Option<String>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    #[serde(rename = "u")]
    pub user: String,
    #[serde(rename = "s")]
    pub upstream: String,
    #[serde(rename = "e")]
    pub expires_at: UnixTime,
    #[serde(rename = "n", with = "hex32")]
    pub nonce: [u8; 32],
    /// The PKCE code verifier (RFC 7636: 43 characters of base64url).
    #[serde(rename = "v")]
    pub verifier: String,
    /// SHA-256 of the cookie set in the browser that opened the link.
    #[serde(rename = "c", with = "hex32")]
    pub cookie: [u8; 32],
    /// The link's `over`.
    #[serde(rename = "g", default, skip_serializing_if = "Option::is_none")]
    pub over: Option<String>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("user", &self.user).field("upstream", &self.upstream).finish_non_exhaustive()
    }
}

/// Why a link or state is refused; the page says which, the audit line records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    Expired,
}

type HmacSha256 = Hmac<Sha256>;

pub fn sign_link(key: &[u8; 32], link: &Link) -> String {
    let payload = B64.encode(serde_json::to_vec(link).expect("strings and integers serialize"));
    let tag = B64.encode(mac(key, payload.as_bytes()));
    format!("{payload}.{tag}")
}

pub fn open_link(key: &[u8; 32], token: &str, now: UnixTime) -> Result<Link, Refused> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Refused::Malformed);
    }
    let (payload, tag) = token.split_once('.').ok_or(Refused::Malformed)?;
    let tag = B64.decode(tag).map_err(|_| Refused::Malformed)?;
    let mut check = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    check.update(payload.as_bytes());
    check.verify_slice(&tag).map_err(|_| Refused::Malformed)?;
    let link: Link = serde_json::from_slice(&B64.decode(payload).map_err(|_| Refused::Malformed)?)
        .map_err(|_| Refused::Malformed)?;
    match link.expires_at >= now {
        true => Ok(link),
        false => Err(Refused::Expired),
    }
}

pub fn seal_state(key: &[u8; 32], state: &State) -> String {
    let cipher = Aes256Gcm::new_from_slice(key).expect("32-byte key");
    let nonce: [u8; 12] = rand::random();
    let plain = serde_json::to_vec(state).expect("strings and integers serialize");
    let sealed = cipher.encrypt(&Nonce::from(nonce), plain.as_slice()).expect("AES-GCM seals any length");
    B64.encode([&nonce[..], &sealed].concat())
}

pub fn open_state(key: &[u8; 32], token: &str, now: UnixTime) -> Result<State, Refused> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Refused::Malformed);
    }
    let bytes = B64.decode(token).map_err(|_| Refused::Malformed)?;
    if bytes.len() < 12 {
        return Err(Refused::Malformed);
    }
    let (nonce, sealed) = bytes.split_at(12);
    let nonce: [u8; 12] = nonce.try_into().expect("12 bytes");
    let cipher = Aes256Gcm::new_from_slice(key).expect("32-byte key");
    let plain = cipher.decrypt(&Nonce::from(nonce), sealed).map_err(|_| Refused::Malformed)?;
    let state: State = serde_json::from_slice(&plain).map_err(|_| Refused::Malformed)?;
    match state.expires_at >= now {
        true => Ok(state),
        false => Err(Refused::Expired),
    }
}

/// A PKCE verifier and its S256 challenge (RFC 7636 4.1, 4.2).
pub fn pkce() -> (String, String) {
    let verifier = B64.encode(rand::random::<[u8; 32]>());
    let challenge = B64.encode(crate::secret::sha256(verifier.as_bytes()));
    (verifier, challenge)
}

/// A random value for a cookie or a nonce, base64url.
pub fn random_token() -> String {
    B64.encode(rand::random::<[u8; 32]>())
}

fn mac(key: &[u8; 32], bytes: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(bytes);
    mac.finalize().into_bytes().into()
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(expires_at: UnixTime) -> Link {
        Link { user: "alice".into(), upstream: "gh".into(), expires_at, nonce: [7; 32], over: Some("g1".into()) }
    }

    #[test]
    fn links_open_only_with_their_key_untouched_and_in_time() {
        let key = [1u8; 32];
        let token = sign_link(&key, &link(100));
        assert_eq!(open_link(&key, &token, 100), Ok(link(100)));
        assert_eq!(open_link(&key, &token, 101), Err(Refused::Expired));
        assert_eq!(open_link(&[2u8; 32], &token, 100), Err(Refused::Malformed), "another key");
        // Another user under the same tag.
        let (_, tag) = token.split_once('.').unwrap();
        let mut bob = link(100);
        bob.user = "bob".into();
        let forged = format!("{}.{tag}", sign_link(&key, &bob).split_once('.').unwrap().0);
        assert_eq!(open_link(&key, &forged, 100), Err(Refused::Malformed));
        for junk in ["", ".", "a.b", "..", &"x".repeat(5000)] {
            assert_eq!(open_link(&key, junk, 0), Err(Refused::Malformed), "{junk:?}");
        }
    }

    #[test]
    fn states_are_sealed() {
        let key = [3u8; 32];
        let (verifier, challenge) = pkce();
        assert_eq!(verifier.len(), 43);
        assert_ne!(verifier, challenge);
        let state = State {
            user: "alice".into(),
            upstream: "gh".into(),
            expires_at: 50,
            nonce: [9; 32],
            verifier: verifier.clone(),
            cookie: [4; 32],
            over: None,
        };
        let sealed = seal_state(&key, &state);
        assert!(!sealed.contains(&verifier) && !sealed.contains("alice"));
        assert_eq!(open_state(&key, &sealed, 50).unwrap(), state);
        assert_eq!(open_state(&key, &sealed, 51).unwrap_err(), Refused::Expired);
        assert_eq!(open_state(&[5u8; 32], &sealed, 0).unwrap_err(), Refused::Malformed);
        let mut bytes = B64.decode(&sealed).unwrap();
        bytes[20] ^= 1;
        assert_eq!(open_state(&key, &B64.encode(bytes), 0).unwrap_err(), Refused::Malformed);
    }
}
