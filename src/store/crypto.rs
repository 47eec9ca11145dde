//! Encryption at rest for upstream credentials: AES-256-GCM under a master key.
//!
//! Each row gets a fresh random 96-bit nonce. The associated data binds a ciphertext to its row
//! (user, upstream, credential id), so a ciphertext copied into another row does not decrypt. The
//! master key itself is never stored: the store keeps a check value (SHA-256 of a label and the key)
//! per key version, to tell "wrong key" apart from "damaged row" at open time.
//!
//! The master key also derives other keys ([`MasterKey::derive`]), so replicas that share it share
//! those too without another secret to distribute.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secret::Secret;

/// Nonce length for AES-GCM (96 bits).
pub const NONCE_LEN: usize = 12;

/// A parsed master key: 32 bytes, given as standard base64 (`openssl rand -base64 32`).
pub struct MasterKey {
    cipher: Aes256Gcm,
    check: [u8; 32],
    /// HMAC-SHA256 keyed with the key bytes, for [`MasterKey::derive`] (cloned per use, so the bytes
    /// themselves are not kept).
    deriver: Hmac<Sha256>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

/// Why a master key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("is not valid base64")]
    Base64,
    #[error("must decode to exactly 32 bytes, not {0}")]
    Length(usize),
}

impl MasterKey {
    /// Parses a base64 master key. Surrounding whitespace (a trailing newline of a key file) is ignored.
    pub fn parse(secret: &Secret) -> Result<MasterKey, KeyError> {
        let text = secret.expose().trim();
        let bytes = base64::engine::general_purpose::STANDARD.decode(text).map_err(|_| KeyError::Base64)?;
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError::Length(bytes.len()))?;
        Ok(MasterKey::from_bytes(&key))
    }

    pub fn from_bytes(key: &[u8; 32]) -> MasterKey {
        let cipher = Aes256Gcm::new_from_slice(key).expect("32-byte key");
        let mut labelled = b"mcp-tenant-proxy master key check v1\0".to_vec();
        labelled.extend_from_slice(key);
        let deriver = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
        MasterKey { cipher, check: crate::secret::sha256(&labelled), deriver }
    }

    /// A new random master key, base64-encoded (what `[store] master_key_file` should contain).
    pub fn generate() -> Secret {
        let key: [u8; 32] = rand::random();
        Secret::new(base64::engine::general_purpose::STANDARD.encode(key))
    }

    /// Identifies the key without revealing it: SHA-256 over a fixed label and the 32 key bytes.
    pub fn check_value(&self) -> [u8; 32] {
        self.check
    }

    /// A key for another purpose, named by `label`: HMAC-SHA256 over `label`, keyed with the 32 key
    /// bytes. The same master key and label give the same key on every replica; different labels give
    /// unrelated keys, and none of them reveals the master key or its check value.
    pub fn derive(&self, label: &str) -> [u8; 32] {
        let mut mac = self.deriver.clone();
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Encrypts `plaintext` for the row `aad`; returns (nonce, ciphertext with the 16-byte tag).
    pub fn encrypt(&self, aad: &RowAad<'_>, plaintext: &[u8]) -> ([u8; NONCE_LEN], Vec<u8>) {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let nonce = Nonce::from(nonce_bytes);
        let aad = aad.encode();
        let ciphertext = self
            .cipher
            .encrypt(&nonce, Payload { msg: plaintext, aad: &aad })
            .expect("AES-GCM encryption of a bounded message cannot fail");
        (nonce_bytes, ciphertext)
    }

    /// Decrypts a row; `None` when the key, the nonce, the ciphertext or the row identity is wrong.
    pub fn decrypt(&self, aad: &RowAad<'_>, nonce: &[u8], ciphertext: &[u8]) -> Option<Vec<u8>> {
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        let aad = aad.encode();
        self.cipher.decrypt(&Nonce::from(nonce), Payload { msg: ciphertext, aad: &aad }).ok()
    }
}

/// The identity of a credential row, authenticated along with its ciphertext.
#[derive(Clone, Copy, Debug)]
pub struct RowAad<'a> {
    pub user: &'a str,
    pub upstream: &'a str,
    pub credential_id: &'a str,
}

impl RowAad<'_> {
    /// Length-prefixed fields, so ("ab", "c") and ("a", "bc") never encode alike.
    fn encode(&self) -> Vec<u8> {
        let mut out = b"mcp-tenant-proxy credential v1".to_vec();
        for field in [self.user, self.upstream, self.credential_id] {
            out.extend_from_slice(&u32::try_from(field.len()).expect("short field").to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROW: RowAad<'static> = RowAad { user: "alice", upstream: "github", credential_id: "default" };

    #[test]
    fn round_trip_and_fresh_nonces() {
        let key = MasterKey::parse(&MasterKey::generate()).unwrap();
        let (n1, c1) = key.encrypt(&ROW, b"ghp_secret");
        let (n2, c2) = key.encrypt(&ROW, b"ghp_secret");
        assert_ne!(n1, n2, "nonces must not repeat");
        assert_ne!(c1, c2);
        assert_eq!(c1.len(), b"ghp_secret".len() + 16);
        assert_eq!(key.decrypt(&ROW, &n1, &c1).unwrap(), b"ghp_secret");
        assert_eq!(key.decrypt(&ROW, &n2, &c2).unwrap(), b"ghp_secret");
    }

    #[test]
    fn wrong_key_row_or_bytes_do_not_decrypt() {
        let key = MasterKey::parse(&MasterKey::generate()).unwrap();
        let other = MasterKey::parse(&MasterKey::generate()).unwrap();
        let (nonce, ct) = key.encrypt(&ROW, b"ghp_secret");
        assert!(other.decrypt(&ROW, &nonce, &ct).is_none());
        for moved in [
            RowAad { user: "bob", ..ROW },
            RowAad { upstream: "slack", ..ROW },
            RowAad { credential_id: "work", ..ROW },
            // Same bytes, different field boundaries.
            RowAad { user: "aliceg", upstream: "ithub", ..ROW },
        ] {
            assert!(key.decrypt(&moved, &nonce, &ct).is_none(), "{moved:?}");
        }
        let mut tampered = ct.clone();
        tampered[0] ^= 1;
        assert!(key.decrypt(&ROW, &nonce, &tampered).is_none());
        assert!(key.decrypt(&ROW, &nonce[..11], &ct).is_none());
    }

    #[test]
    fn parse_rejects_bad_keys() {
        assert_eq!(MasterKey::parse(&Secret::new("not base64!")).unwrap_err(), KeyError::Base64);
        assert_eq!(MasterKey::parse(&Secret::new("c2hvcnQ=")).unwrap_err(), KeyError::Length(5));
        let with_newline = Secret::new(format!("{}\n", MasterKey::generate().expose()));
        assert!(MasterKey::parse(&with_newline).is_ok());
    }

    #[test]
    fn check_value_identifies_the_key() {
        let secret = MasterKey::generate();
        let a = MasterKey::parse(&secret).unwrap();
        let b = MasterKey::parse(&secret).unwrap();
        let c = MasterKey::parse(&MasterKey::generate()).unwrap();
        assert_eq!(a.check_value(), b.check_value());
        assert_ne!(a.check_value(), c.check_value());
        assert_eq!(format!("{a:?}"), "MasterKey(***)");
    }

    #[test]
    fn derive_is_hmac_sha256_of_the_label() {
        let bytes: [u8; 32] = rand::random();
        let key = MasterKey::from_bytes(&bytes);
        let mut mac = Hmac::<Sha256>::new_from_slice(&bytes).unwrap();
        mac.update(b"oauth connect v1");
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(key.derive("oauth connect v1"), expected);
        assert_eq!(key.derive("oauth connect v1"), MasterKey::from_bytes(&bytes).derive("oauth connect v1"));
        assert_ne!(key.derive("oauth connect v1"), key.derive("oauth state v1"));
        assert_ne!(key.derive(""), key.check_value());
    }
}
