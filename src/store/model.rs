//! The persistent store's interface: the [`Store`] trait, its records and its errors.
//!
//! [`super::sqlite::SqliteStore`] is the embedded implementation; [`super::postgres::PgStore`] the shared
//! one for several replicas. Nothing here is on the request path: the proxy reads an
//! in-memory [`Snapshot`] (built into a `Directory`) and writes go through the store, then update it.
//!
//! Times are Unix seconds (`i64`). Secrets (API keys, token URLs, credentials) are returned as
//! [`Secret`] and only ever once for keys and tokens; the store keeps their SHA-256 only.

use crate::policy::ratelimit::Limit;
use crate::secret::Secret;
use crate::store::{KeyKind, TokenMode};

/// Unix time in seconds.
pub type UnixTime = i64;

/// Longest user id the store accepts (the proxy's default `max_user_id_len`).
pub const MAX_USER_ID_LEN: usize = 128;
/// Longest upstream name, credential id or key id.
pub const MAX_NAME_LEN: usize = 128;
/// Largest page of [`Store::list_users`].
pub const MAX_PAGE: u32 = 1000;
/// Token URL lifetimes, in days.
pub const TOKEN_DAYS: std::ops::RangeInclusive<u32> = 1..=365;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{what} {id:?} already exists")]
    Conflict { what: &'static str, id: String },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(
        "no master key configured: credentials are only stored encrypted (set [store] master_key_env or master_key_file)"
    )]
    NoMasterKey,
    #[error("the master key {0}")]
    BadMasterKey(#[from] super::crypto::KeyError),
    #[error("the master key does not match the one this store was written with")]
    WrongMasterKey,
    #[error("the master key is version {version}, which was rotated out; use the current key")]
    RetiredMasterKey { version: u32 },
    #[error("credential {user}/{upstream}/{credential_id} does not decrypt (damaged or moved row)")]
    Undecryptable { user: String, upstream: String, credential_id: String },
    #[error("the database schema is version {found}; this binary knows up to {known} (a newer release wrote it)")]
    SchemaTooNew { found: u32, known: u32 },
    #[error("cannot create {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// The database cannot be reached now (connection refused or lost, timeout, server shutting down);
    /// the same call may succeed later. Never carries a password.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// PostgreSQL refused or failed a statement (the server's message and SQLSTATE; no parameters).
    #[error("database: {0}")]
    Postgres(String),
}

impl StoreError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> StoreError {
        StoreError::Invalid { field, reason: reason.into() }
    }
    pub(crate) fn not_found(what: &'static str, id: &str) -> StoreError {
        StoreError::NotFound { what, id: id.to_owned() }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A user's own rate limit: the config's default, none, or its own quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum UserLimit {
    #[default]
    Default,
    Unlimited,
    Quota(Limit),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub rate_limit: UserLimit,
    pub created_at: UnixTime,
}

#[derive(Clone, Debug)]
pub struct NewKey {
    /// `None`: the store picks a random id (`k_` and 16 hex digits).
    pub id: Option<String>,
    pub kind: KeyKind,
    pub user: String,
    /// Enterprise keys only: `*`, a user id, or a prefix ending in `*`.
    pub act_as: Vec<String>,
    pub expires_at: Option<UnixTime>,
    /// `None`: `[identity.user_token] mode` decides.
    pub user_token: Option<TokenMode>,
}

/// An API key as listed: never the key itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub kind: KeyKind,
    pub user: String,
    pub act_as: Vec<String>,
    /// The first 8 characters of the key, to recognise it.
    pub prefix: String,
    pub expires_at: Option<UnixTime>,
    pub created_at: UnixTime,
    pub last_used_at: Option<UnixTime>,
    pub revoked_at: Option<UnixTime>,
    pub user_token: Option<TokenMode>,
}

/// What [`Store::create_key`] returns: the key, this once, and its listing.
#[derive(Debug)]
pub struct CreatedKey {
    pub key: Secret,
    pub info: KeyInfo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Updated,
}

/// A credential as listed: ids and times only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialInfo {
    pub user: String,
    pub upstream: String,
    pub credential_id: String,
    pub key_version: u32,
    pub created_at: UnixTime,
    pub updated_at: UnixTime,
}

/// A decrypted credential, for the in-memory snapshot.
#[derive(Clone, Debug)]
pub struct CredentialSecret {
    pub user: String,
    pub upstream: String,
    pub credential_id: String,
    pub secret: Secret,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    /// A handle for listing and revoking (`t_` and 16 hex digits); not the token.
    pub id: String,
    pub user: String,
    pub upstream: String,
    pub expires_at: UnixTime,
    pub created_at: UnixTime,
    pub revoked_at: Option<UnixTime>,
}

#[derive(Debug)]
pub struct CreatedToken {
    /// The path segment of `/mcp/<upstream>/t/<token>`, this once.
    pub token: Secret,
    pub info: TokenInfo,
}

/// Counters to add for one (user, upstream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageDelta {
    pub user: String,
    pub upstream: String,
    pub requests: u64,
    pub denials: u64,
    pub last_seen: UnixTime,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    pub user: String,
    pub upstream: String,
    pub requests: u64,
    pub denials: u64,
    pub last_seen: UnixTime,
}

/// An active (not revoked, not yet expired) key as the request path needs it.
#[derive(Clone, Debug)]
pub struct SnapshotKey {
    pub id: String,
    pub sha256: [u8; 32],
    pub kind: KeyKind,
    pub user: String,
    pub act_as: Vec<String>,
    /// The request path must still refuse the key after this time.
    pub expires_at: Option<UnixTime>,
    pub user_token: Option<TokenMode>,
}

/// An active token URL as the request path needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotToken {
    pub id: String,
    pub sha256: [u8; 32],
    pub user: String,
    pub upstream: String,
    pub expires_at: UnixTime,
}

/// Everything the request path needs, read in one transaction.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub users: Vec<User>,
    pub keys: Vec<SnapshotKey>,
    pub credentials: Vec<CredentialSecret>,
    pub tokens: Vec<SnapshotToken>,
    /// When it was read; `expires_at` values are relative to this.
    pub taken_at: UnixTime,
}

/// One user and what the request path needs of it, read in one transaction: the unit of an incremental
/// directory update (see [`Change`]).
#[derive(Debug)]
pub struct UserSnapshot {
    pub user: User,
    /// Active keys only, as in [`Snapshot::keys`].
    pub keys: Vec<SnapshotKey>,
    pub credentials: Vec<CredentialSecret>,
    /// Active token URLs only.
    pub tokens: Vec<SnapshotToken>,
    pub taken_at: UnixTime,
}

/// What a store tells the replicas that read it. Every write that changes what the request path sees
/// (a user, its limit, keys, credentials or token URLs) names the user it changed; usage and key
/// `last_used_at` do not. A reader applies a change by re-reading that user ([`Store::load_user`]), so
/// changes are idempotent and may arrive twice or out of order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Anything may have changed (start, or after a lost connection): reload the whole snapshot.
    Resync,
    User(String),
}

/// A master key version as stored: its check value, never the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawMasterKey {
    pub version: u32,
    pub check_value: Vec<u8>,
    pub created_at: UnixTime,
    pub retired_at: Option<UnixTime>,
}

/// A credential row as stored: the ciphertext, never the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawCredential {
    pub user: String,
    pub upstream: String,
    pub credential_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub key_version: u32,
    pub created_at: UnixTime,
    pub updated_at: UnixTime,
}

/// Whole rows of a store, as stored: what `store migrate` copies from one backend to another. Keys and tokens with their SHA-256.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawRows {
    pub master_keys: Vec<RawMasterKey>,
    pub users: Vec<User>,
    pub keys: Vec<(KeyInfo, Vec<u8>)>,
    pub credentials: Vec<RawCredential>,
    pub tokens: Vec<(TokenInfo, Vec<u8>)>,
    pub usage: Vec<Usage>,
}

/// Users, API keys, upstream credentials, token URLs and usage counters.
///
/// Calls block (the embedded backend does file I/O): call them from `spawn_blocking` in async code.
/// Every write is durable when it returns.
/// How long a spent nonce is kept past its expiry: a replica whose clock is behind the pruning one's by
/// less than this still sees the nonce as spent while it accepts its link.
pub const ONCE_KEPT_AFTER: UnixTime = 300;

pub trait Store: Send + Sync {
    /// `Conflict` when the id exists.
    fn create_user(&self, id: &str, rate_limit: UserLimit) -> StoreResult<User>;
    fn get_user(&self, id: &str) -> StoreResult<User>;
    /// Users by id, ascending, starting after `after`; at most `limit` (1..=[`MAX_PAGE`]).
    fn list_users(&self, after: Option<&str>, limit: u32) -> StoreResult<Vec<User>>;
    fn set_user_limit(&self, id: &str, rate_limit: UserLimit) -> StoreResult<User>;
    /// Deletes the user with its keys, token URLs, credentials and usage counters.
    fn delete_user(&self, id: &str) -> StoreResult<()>;

    /// Generates a key, stores its SHA-256 and prefix, and returns it this once.
    fn create_key(&self, new: NewKey) -> StoreResult<CreatedKey>;
    /// All keys (revoked and expired ones too), or one user's; ordered by id.
    fn list_keys(&self, user: Option<&str>) -> StoreResult<Vec<KeyInfo>>;
    /// Revoking a revoked key keeps its first revocation time.
    fn revoke_key(&self, id: &str) -> StoreResult<KeyInfo>;
    /// Records key use (from the request path's in-memory aggregation); unknown ids are ignored.
    fn touch_keys(&self, used: &[(String, UnixTime)]) -> StoreResult<()>;

    /// Encrypts and upserts; putting the same value twice leaves one row. `NoMasterKey` without a key.
    fn put_credential(
        &self,
        user: &str,
        upstream: &str,
        credential_id: &str,
        secret: &Secret,
    ) -> StoreResult<PutOutcome>;
    /// Puts `secret` only if the credential's decrypted value has the SHA-256 `expected` now (`None`:
    /// only if there is none): true when it did, false (nothing written) when the value is another. One
    /// transaction that reads and writes under a lock, so of writers swapping from the same value,
    /// exactly one wins, and a deleted credential is not written back (an OAuth refresh finishing
    /// after a disconnect, or after another replica's refresh, stores nothing).
    fn swap_credential(
        &self,
        user: &str,
        upstream: &str,
        credential_id: &str,
        expected: Option<&[u8; 32]>,
        secret: &Secret,
    ) -> StoreResult<bool>;
    fn delete_credential(&self, user: &str, upstream: &str, credential_id: &str) -> StoreResult<()>;
    /// Ids and times of one user's credentials (no secrets).
    fn list_credentials(&self, user: &str) -> StoreResult<Vec<CredentialInfo>>;
    /// Decrypted credentials, all or one user's. `NoMasterKey` without a key.
    fn credential_secrets(&self, user: Option<&str>) -> StoreResult<Vec<CredentialSecret>>;
    /// Re-encrypts every credential under `new` in one transaction; returns the new key version.
    fn rotate_master_key(&self, old: &Secret, new: &Secret) -> StoreResult<u32>;

    /// A token URL for (user, upstream), valid for `days` ([`TOKEN_DAYS`]); returned this once.
    fn create_token(&self, user: &str, upstream: &str, days: u32) -> StoreResult<CreatedToken>;
    fn list_tokens(&self, user: Option<&str>) -> StoreResult<Vec<TokenInfo>>;
    fn revoke_token(&self, id: &str) -> StoreResult<TokenInfo>;
    /// The token with this SHA-256 if it is neither revoked nor expired.
    fn lookup_token(&self, sha256: &[u8; 32]) -> StoreResult<Option<TokenInfo>>;

    /// Adds the counters, all in one transaction.
    fn add_usage(&self, deltas: &[UsageDelta]) -> StoreResult<()>;
    fn usage(&self, user: Option<&str>) -> StoreResult<Vec<Usage>>;

    /// Creates the users with their limits, generated keys and credentials, all in one transaction (all
    /// or nothing: `Conflict` when a user, key or credential exists or repeats; the same validation as
    /// the one-row calls). Returns the generated keys, this once, in order. Call it with batches of
    /// thousands of users: one round of statements per table per batch, not per row.
    fn import_users(&self, users: &[super::import::ImportUser]) -> StoreResult<Vec<CreatedKey>>;

    /// Everything the request path needs. `NoMasterKey` if credentials exist and no key is set.
    fn load_snapshot(&self) -> StoreResult<Snapshot>;
    /// What the request path needs of one user; `None` when the user does not exist (deleted).
    fn load_user(&self, id: &str) -> StoreResult<Option<UserSnapshot>>;

    // OAuth flows. "Now" below is the store's clock (the one that dates every other row), so replicas'
    // clocks must agree to well within a lease or a link's lifetime.

    /// Records a single-use value (an OAuth connect link's or flow state's nonce), kept until
    /// `expires_at`: true the first time, false when it was already used, on any replica sharing the
    /// store. The same transaction deletes the entries that expired [`ONCE_KEPT_AFTER`] before now, so
    /// the table stays small; a nonce past that may be accepted again, and callers refuse expired links
    /// and states themselves (by their own clocks, which the margin covers).
    fn use_once(&self, nonce: &[u8; 32], expires_at: UnixTime) -> StoreResult<bool>;
    /// Takes the lease on (user, upstream) for `holder` for `seconds` from now: true when there was
    /// none, it had expired (its end is before now) or `holder` already held it (then it runs from now).
    /// One atomic statement, so of replicas racing for it exactly one wins: the lease is how only one of
    /// them spends a rotating OAuth refresh token. PostgreSQL dates leases by the server's clock.
    fn take_lease(&self, user: &str, upstream: &str, holder: &str, seconds: i64) -> StoreResult<bool>;
    /// Ends the lease on (user, upstream) if `holder` holds it; else (another holder, none) does nothing.
    fn drop_lease(&self, user: &str, upstream: &str, holder: &str) -> StoreResult<()>;
    /// A 32-byte key for `label`, derived from the current master key ([`super::crypto::MasterKey::derive`]):
    /// replicas sharing a master key derive the same one, without another secret to distribute (OAuth
    /// connect links are signed, flow states encrypted with such keys). A rotation changes it, so
    /// links and states made before one stop verifying. `NoMasterKey` without a key.
    fn derive_key(&self, label: &str) -> StoreResult<[u8; 32]>;
}
