//! Who exists and what they hold: users, API keys (as SHA-256 hashes) and upstream credentials.
//!
//! The config file's part ([`Directory`]) is built at each load and read-only afterwards; the store's part
//! ([`LiveDirectory`]) is updated in place, one user at a time. The request path only does hash-map
//! lookups. Users are interned to a small [`UserId`] so per-user state elsewhere (limiters) can key on
//! a `u32`.

pub mod connection;
pub mod crypto;
pub mod follow;
pub mod health;
pub mod import;
pub mod json;
pub mod live;
pub mod model;
pub mod postgres;
pub mod sqlite;

pub use live::{LiveDirectory, STORE_USER_BIT};
pub use model::{Store, StoreError, UserLimit};
pub use sqlite::SqliteStore;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use http::HeaderValue;

use crate::policy::ratelimit::Limit;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamId(pub u16);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// Acts as its own user only.
    Standard,
    /// May act as the users its `act_as` patterns allow, named in the user header.
    Enterprise,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Standard => "standard",
            KeyKind::Enterprise => "enterprise",
        }
    }
}

/// Whether a key's requests prove their user with a user token (`[identity.user_token]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenMode {
    /// Every request carries a valid token, which names the acting user.
    Required,
    /// A token, when sent, is checked and names the acting user; without one the user header does.
    Allowed,
    /// Tokens are not read (they are still stripped before the upstream).
    Ignored,
}

impl TokenMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenMode::Required => "required",
            TokenMode::Allowed => "allowed",
            TokenMode::Ignored => "ignored",
        }
    }

    /// The error says what is accepted, for the caller to put next to the field it read.
    pub fn parse(mode: &str) -> Result<TokenMode, &'static str> {
        match mode {
            "required" => Ok(TokenMode::Required),
            "allowed" => Ok(TokenMode::Allowed),
            "ignored" => Ok(TokenMode::Ignored),
            _ => Err("must be \"required\", \"allowed\" or \"ignored\""),
        }
    }
}

/// One entry of a key's `act_as` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserPattern {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
}

impl UserPattern {
    pub fn parse(pattern: &str) -> Self {
        match pattern {
            "*" => UserPattern::Any,
            _ => match pattern.strip_suffix('*') {
                Some(prefix) => UserPattern::Prefix(prefix.into()),
                None => UserPattern::Exact(pattern.into()),
            },
        }
    }

    pub fn matches(&self, user: &str) -> bool {
        match self {
            UserPattern::Any => true,
            UserPattern::Exact(id) => **id == *user,
            UserPattern::Prefix(prefix) => user.starts_with(&**prefix),
        }
    }
}

/// A user as the request path sees it: its interned id, its name, and its own rate limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRef {
    pub id: UserId,
    pub name: Arc<str>,
    pub limit: UserLimit,
}

#[derive(Debug)]
pub struct ApiKey {
    /// Position in the config, for per-key state such as the key-level rate limiter (`u32::MAX`: none,
    /// as for store keys, which have no key-level limit).
    pub index: u32,
    pub id: Arc<str>,
    pub kind: KeyKind,
    /// The key's own user (a store key's entry is rebuilt whenever its user changes).
    pub user: UserRef,
    pub act_as: Vec<UserPattern>,
    pub rate_limit: Option<Limit>,
    /// Unix seconds after which the key is refused (keys made through the store may expire).
    pub expires_at: Option<i64>,
    /// `None`: `[identity.user_token] mode` decides (store keys and token URLs have no mode of their own).
    pub user_token: Option<TokenMode>,
}

impl ApiKey {
    pub fn may_act_as(&self, user: &str) -> bool {
        self.act_as.iter().any(|pattern| pattern.matches(user))
    }
}

/// A user's credential for one upstream, already rendered into the header value the upstream expects
/// (marked sensitive, so hyper's and our `Debug` hide it).
#[derive(Clone)]
pub struct Credential {
    pub id: Box<str>,
    pub header_value: HeaderValue,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential").field("id", &self.id).field("header_value", &"***").finish()
    }
}

/// What a token URL grants: acting as `key.user` on `upstream` until `expires_at`. `key` is a standard
/// key that exists only inside the token, so the rest of the pipeline treats it like any other.
#[derive(Debug)]
pub struct TokenGrant {
    pub key: Arc<ApiKey>,
    pub upstream: Arc<str>,
}

impl TokenGrant {
    pub fn new(id: &str, user: UserRef, upstream: &str, expires_at: i64) -> TokenGrant {
        let key = ApiKey {
            // Past every key's index: a token has no key-level limiter of its own.
            index: u32::MAX,
            id: id.into(),
            kind: KeyKind::Standard,
            user,
            act_as: Vec::new(),
            rate_limit: None,
            expires_at: Some(expires_at),
            user_token: None,
        };
        TokenGrant { key: Arc::new(key), upstream: upstream.into() }
    }
}

/// The users, keys and credentials the config file declares. Built at each load and read-only
/// afterwards; the store's live next to it in a [`LiveDirectory`], updated in place.
#[derive(Debug, Default)]
pub struct Directory {
    /// The interner: carried over on reload, so a user keeps its id (and with it its rate-limit
    /// buckets) for the life of the process. File users' ids are below [`STORE_USER_BIT`].
    user_ids: HashMap<Arc<str>, UserId>,
    user_names: Vec<Arc<str>>,
    /// By `UserId`: whether the user exists in this config (a removed user keeps its id, not its access).
    present: Vec<bool>,
    keys: HashMap<[u8; 32], Arc<ApiKey>>,
    credentials: HashMap<(UserId, UpstreamId), Arc<[Credential]>>,
    default_user_limit: Option<Limit>,
    /// Users whose limit differs from the default.
    user_limits: HashMap<UserId, UserLimit>,
}

impl Directory {
    /// An empty directory for a reloaded config that keeps the user ids `previous` handed out to its
    /// users. A user `previous` no longer had (deleted) is forgotten: if it comes back it gets a new id,
    /// so nothing of its old per-user state (rate-limit buckets) is ever used again; the old state is
    /// evicted on schedule.
    pub fn continuing(previous: &Directory) -> Directory {
        let user_ids = previous
            .user_ids
            .iter()
            .filter(|(_, id)| previous.present[id.0 as usize])
            .map(|(name, id)| (name.clone(), *id))
            .collect();
        Directory {
            user_ids,
            user_names: previous.user_names.clone(),
            present: vec![false; previous.user_names.len()],
            ..Directory::default()
        }
    }

    /// Adds a user if it is new; returns its id either way.
    pub fn add_user(&mut self, name: &str) -> UserId {
        if let Some(&id) = self.user_ids.get(name) {
            self.present[id.0 as usize] = true;
            return id;
        }
        let id = u32::try_from(self.user_names.len()).ok().filter(|id| id & STORE_USER_BIT == 0);
        let id = UserId(id.expect("fewer than 2^31 users in a config file"));
        let name: Arc<str> = name.into();
        self.user_names.push(name.clone());
        self.user_ids.insert(name, id);
        self.present.push(true);
        id
    }

    /// Returns false when a key with the same hash is already present. Sets the key's `index`.
    pub fn add_key(&mut self, sha256: [u8; 32], mut key: ApiKey) -> bool {
        if self.keys.contains_key(&sha256) {
            return false;
        }
        key.index = u32::try_from(self.keys.len()).expect("fewer than 2^32 keys");
        self.keys.insert(sha256, Arc::new(key));
        true
    }

    pub fn keys(&self) -> impl Iterator<Item = &ApiKey> {
        self.keys.values().map(|key| &**key)
    }

    pub fn set_default_user_limit(&mut self, limit: Option<Limit>) {
        self.default_user_limit = limit;
    }

    /// The limit of users without one of their own.
    pub fn default_user_limit(&self) -> Option<Limit> {
        self.default_user_limit
    }

    pub fn set_user_limit(&mut self, user: UserId, limit: UserLimit) {
        self.user_limits.insert(user, limit);
    }

    /// Returns false when the user already has a credential with that id for that upstream.
    pub fn add_credential(&mut self, user: UserId, upstream: UpstreamId, credential: Credential) -> bool {
        let list = self.credentials.entry((user, upstream)).or_insert_with(|| Arc::from([]));
        if list.iter().any(|c| c.id == credential.id) {
            return false;
        }
        *list = list.iter().cloned().chain([credential]).collect();
        true
    }

    pub fn user(&self, name: &str) -> Option<UserId> {
        self.user_ids.get(name).copied().filter(|id| self.present[id.0 as usize])
    }

    /// The user with its name and limit, if the config file declares it.
    pub fn user_ref(&self, name: &str) -> Option<UserRef> {
        let (name, &id) = self.user_ids.get_key_value(name).filter(|(_, id)| self.present[id.0 as usize])?;
        Some(UserRef { id, name: name.clone(), limit: self.user_limits.get(&id).copied().unwrap_or_default() })
    }

    pub fn user_name(&self, id: UserId) -> &Arc<str> {
        &self.user_names[id.0 as usize]
    }

    /// Users in this config.
    pub fn user_count(&self) -> usize {
        self.present.iter().filter(|p| **p).count()
    }

    /// Looks a key up by the SHA-256 of what the client presented. Comparing digests rather than keys
    /// means any timing difference of the lookup depends on the digest only, which tells an attacker
    /// nothing about a stored key's bytes.
    pub fn key_by_hash(&self, sha256: &[u8; 32]) -> Option<&Arc<ApiKey>> {
        self.keys.get(sha256)
    }

    pub fn credentials(&self, user: UserId, upstream: UpstreamId) -> Option<&Arc<[Credential]>> {
        self.credentials.get(&(user, upstream))
    }
}

/// The upstream-name grammar shared by config, store, admin API and CLI: ASCII letters, digits, `-` and
/// `_`, 1 to [`model::MAX_NAME_LEN`] bytes.
pub fn check_upstream_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > model::MAX_NAME_LEN {
        return Err("must be 1 to 128 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err("only ASCII letters, digits, - and _ are allowed");
    }
    Ok(())
}

/// The user-id grammar shared by the user header, config and (later) the admin API: ASCII letters,
/// digits and `._@:-`, non-empty, at most `max_len` bytes.
pub fn check_user_id(id: &str, max_len: usize) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("empty");
    }
    if id.len() > max_len {
        return Err("too long");
    }
    if !id.bytes().all(is_user_id_byte) {
        return Err("only ASCII letters, digits and . _ @ : - are allowed");
    }
    Ok(())
}

fn is_user_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b':' | b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_keep_ids_of_present_users_and_forget_deleted_ones() {
        let mut first = Directory::default();
        let (alice, bob) = (first.add_user("alice"), first.add_user("bob"));
        // Reload without bob: alice keeps her id, bob is gone.
        let mut second = Directory::continuing(&first);
        assert_eq!(second.add_user("alice"), alice);
        assert_eq!(second.user("bob"), None);
        // Bob comes back: a new id, so none of his old state applies.
        let mut third = Directory::continuing(&second);
        assert_eq!(third.add_user("alice"), alice);
        let bob_again = third.add_user("bob");
        assert_ne!(bob_again, bob);
        assert_eq!(third.user_name(bob_again).as_ref(), "bob");
    }

    #[test]
    fn user_id_grammar() {
        for ok in ["alice", "a", "tenant-a.bob_1@example.com", "svc:42"] {
            assert_eq!(check_user_id(ok, 128), Ok(()), "{ok}");
        }
        for bad in ["", " alice", "alice ", "al ice", "alice,bob", "alïce", "a\r\nb", "a\0", "a/b", "*"] {
            assert!(check_user_id(bad, 128).is_err(), "{bad:?} accepted");
        }
        assert_eq!(check_user_id(&"a".repeat(129), 128), Err("too long"));
        assert_eq!(check_user_id(&"a".repeat(128), 128), Ok(()));
    }

    #[test]
    fn patterns() {
        assert!(UserPattern::parse("*").matches("anyone"));
        assert!(UserPattern::parse("tenant-a-*").matches("tenant-a-bob"));
        assert!(!UserPattern::parse("tenant-a-*").matches("tenant-b-bob"));
        assert!(UserPattern::parse("alice").matches("alice"));
        assert!(!UserPattern::parse("alice").matches("alice2"));
    }

    #[test]
    fn credential_debug_hides_the_value() {
        let mut value = HeaderValue::from_static("Bearer ghp_secret");
        value.set_sensitive(true);
        let c = Credential { id: "default".into(), header_value: value };
        assert!(!format!("{c:?}").contains("ghp_secret"));
    }
}
