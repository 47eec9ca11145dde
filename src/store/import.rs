//! Bulk import: many users, each with its limit, keys to generate and credentials, in one transaction
//! per batch ([`super::model::Store::import_users`]). Validation, key generation and encryption are the
//! same for both backends and happen here, before the transaction; the backends only insert rows.

use super::crypto::{MasterKey, RowAad};
use super::model::*;
use super::sqlite::{LimitColumns, check_name, check_upstream, check_user, limit_columns, random_id};
use super::{KeyKind, TokenMode, check_user_id};
use crate::secret::{Secret, sha256};

/// One user to create, with the keys to generate for it and its credentials.
#[derive(Clone, Debug)]
pub struct ImportUser {
    pub id: String,
    pub rate_limit: UserLimit,
    pub keys: Vec<ImportKey>,
    pub credentials: Vec<ImportCredential>,
}

/// A key to generate (returned once, in the answer of the import).
#[derive(Clone, Debug)]
pub struct ImportKey {
    /// `None`: a random `k_...` id.
    pub id: Option<String>,
    pub kind: KeyKind,
    pub act_as: Vec<String>,
    pub expires_at: Option<UnixTime>,
    pub user_token: Option<TokenMode>,
}

#[derive(Clone, Debug)]
pub struct ImportCredential {
    pub upstream: String,
    pub credential_id: String,
    pub secret: Secret,
}

/// The rows of one batch, validated, keys generated and hashed, credentials encrypted.
pub(super) struct Prepared {
    pub users: Vec<(String, LimitColumns)>,
    pub keys: Vec<PreparedKey>,
    pub credentials: Vec<PreparedCredential>,
    pub now: UnixTime,
}

pub(super) struct PreparedKey {
    pub created: CreatedKey,
    pub sha256: [u8; 32],
    /// `act_as` as the JSON text both schemas store.
    pub act_as: String,
}

pub(super) struct PreparedCredential {
    pub user: String,
    pub upstream: String,
    pub credential_id: String,
    pub nonce: [u8; 12],
    pub ciphertext: Vec<u8>,
}

pub(super) fn validate_key(
    kind: KeyKind,
    act_as: &[String],
    expires_at: Option<UnixTime>,
    now: UnixTime,
) -> StoreResult<()> {
    if kind == KeyKind::Standard && !act_as.is_empty() {
        return Err(StoreError::invalid("act_as", "standard keys act as their own user only; use an enterprise key"));
    }
    for pattern in act_as {
        let literal = pattern.strip_suffix('*').unwrap_or(pattern);
        if pattern != "*" && check_user_id(literal, MAX_USER_ID_LEN).is_err() {
            return Err(StoreError::invalid(
                "act_as",
                format!("{pattern:?}: use *, a user id, or a prefix ending in *"),
            ));
        }
    }
    if let Some(expires_at) = expires_at
        && expires_at <= now
    {
        return Err(StoreError::invalid("expires_at", "must be in the future"));
    }
    Ok(())
}

/// Validates the batch (the same rules as the one-row calls; a user twice in one batch is a
/// `Conflict`), generates the keys and encrypts the credentials under `key` (version `version`).
pub(super) fn prepare(users: &[ImportUser], key: Option<&MasterKey>, now: UnixTime) -> StoreResult<Prepared> {
    let mut seen = std::collections::HashSet::with_capacity(users.len());
    let mut out = Prepared {
        users: Vec::with_capacity(users.len()),
        keys: Vec::with_capacity(users.len()),
        credentials: Vec::with_capacity(users.len()),
        now,
    };
    for u in users {
        check_user("id", &u.id)?;
        if !seen.insert(u.id.as_str()) {
            return Err(StoreError::Conflict { what: "user", id: u.id.clone() });
        }
        out.users.push((u.id.clone(), limit_columns(u.rate_limit)?));
        for k in &u.keys {
            if let Some(id) = &k.id {
                check_name("id", id)?;
            }
            validate_key(k.kind, &k.act_as, k.expires_at, now)?;
            let secret = format!("mtp_{}", hex::encode(rand::random::<[u8; 32]>()));
            let info = KeyInfo {
                id: k.id.clone().unwrap_or_else(|| random_id("k_")),
                kind: k.kind,
                user: u.id.clone(),
                act_as: k.act_as.clone(),
                prefix: secret[..8].to_owned(),
                expires_at: k.expires_at,
                created_at: now,
                last_used_at: None,
                revoked_at: None,
                user_token: k.user_token,
            };
            out.keys.push(PreparedKey {
                sha256: sha256(secret.as_bytes()),
                act_as: serde_json::to_string(&info.act_as).expect("a list of strings serializes"),
                created: CreatedKey { key: Secret::new(secret), info },
            });
        }
        for c in &u.credentials {
            check_upstream(&c.upstream)?;
            check_name("credential_id", &c.credential_id)?;
            if c.secret.expose().is_empty() {
                return Err(StoreError::invalid("secret", "empty"));
            }
            let Some(key) = key else { return Err(StoreError::NoMasterKey) };
            let aad = RowAad { user: &u.id, upstream: &c.upstream, credential_id: &c.credential_id };
            let (nonce, ciphertext) = key.encrypt(&aad, c.secret.expose().as_bytes());
            out.credentials.push(PreparedCredential {
                user: u.id.clone(),
                upstream: c.upstream.clone(),
                credential_id: c.credential_id.clone(),
                nonce,
                ciphertext,
            });
        }
    }
    Ok(out)
}
