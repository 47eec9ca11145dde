//! The store's users, keys, credentials and token URLs in memory, updated in place one user at a time.
//!
//! A write changes one user (see [`Change`](super::model::Change)); applying it re-reads that user
//! ([`Store::load_user`]) and replaces the user's entries, so its cost does not depend on how many users
//! there are. Whole reloads ([`LiveDirectory::refresh_all`]) happen at start, on SIGHUP and after a lost
//! connection to a shared store. Readers (the request path) take a shard's read lock for one lookup
//! and clone an `Arc`: they never wait on the store, and never hold a lock across an `.await`.
//!
//! A user keeps its [`UserId`] (and so its rate-limit buckets) for as long as it exists; a deleted user
//! that comes back gets a new one.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use http::HeaderValue;

use super::connection::Connection;
use super::model::{CredentialSecret, Snapshot, SnapshotKey, SnapshotToken, Store, StoreResult, User, UserSnapshot};
use super::{ApiKey, Credential, TokenGrant, UserId, UserPattern, UserRef};
use crate::secret::Secret;
use crate::sync::lock;

/// Set in the ids of store users, clear in those of config-file users: the two never collide, and a
/// lookup by id knows which side holds the user.
pub const STORE_USER_BIT: u32 = 1 << 31;

/// Per-user apply locks: two applies of one user never interleave (an older read could otherwise
/// overwrite a newer one); applies of different users rarely share a stripe.
const STRIPES: usize = 64;

/// What the directory needs of the config in force to take in a store user.
pub trait FileSide: Sync {
    /// The config file declares this user: the file wins, the store's user is not served.
    fn has_user(&self, name: &str) -> bool;
    /// The config file declares a key with this hash or id.
    fn has_key(&self, sha256: &[u8; 32], id: &str) -> bool;
    /// The header value that carries the credential `id`'s `secret` to `upstream`.
    fn render(&self, upstream: &str, id: &str, secret: &Secret) -> Rendered;
}

pub enum Rendered {
    /// The upstream's name (shared, not copied per user) and the header value.
    Value(Arc<str>, HeaderValue),
    /// The user's OAuth connection to an upstream that uses OAuth.
    Connection(Arc<str>, Arc<Connection>),
    /// This config serves no such upstream: the credential stays in the store, unused.
    NotServed,
    /// The secret cannot go in a header.
    Unsendable,
}

/// A new directory and what it skipped.
pub type Loaded = (LiveDirectory, Vec<String>);

/// One user's credentials for one upstream, by the upstream's name.
type UpstreamCredentials = (Arc<str>, Arc<[Credential]>);

#[derive(Debug)]
struct LiveUser {
    id: UserId,
    limit: super::UserLimit,
    /// The hashes of the user's keys and token URLs in the maps below, to remove them with the user.
    keys: Box<[[u8; 32]]>,
    tokens: Box<[[u8; 32]]>,
    /// By upstream name (a reload may renumber upstreams; names stay).
    credentials: Box<[UpstreamCredentials]>,
    connections: Box<[(Arc<str>, Arc<Connection>)]>,
}

#[derive(Debug)]
pub struct LiveDirectory {
    users: DashMap<Arc<str>, LiveUser>,
    keys: DashMap<[u8; 32], Arc<ApiKey>>,
    tokens: DashMap<[u8; 32], Arc<TokenGrant>>,
    next_id: AtomicU32,
    stripes: Box<[Mutex<()>]>,
    /// One whole reload at a time.
    reloading: Mutex<()>,
    /// While a whole reload runs: the users a single-user apply touched meanwhile, re-read once the
    /// reload is in (its snapshot may be older than what they applied).
    touched: Mutex<Option<HashSet<String>>>,
}

impl Default for LiveDirectory {
    fn default() -> Self {
        LiveDirectory::with_capacity(0, 0, 0)
    }
}

impl LiveDirectory {
    fn with_capacity(users: usize, keys: usize, tokens: usize) -> Self {
        LiveDirectory {
            users: DashMap::with_capacity(users),
            keys: DashMap::with_capacity(keys),
            tokens: DashMap::with_capacity(tokens),
            next_id: AtomicU32::new(STORE_USER_BIT),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            reloading: Mutex::new(()),
            touched: Mutex::new(None),
        }
    }

    /// A new directory holding one store snapshot (start-up), its maps sized for the snapshot up front:
    /// grown step by step, a map of a million keys is rehashed some twenty times. `strict` and the
    /// result as in [`LiveDirectory::refresh_all`]. Blocking.
    pub fn load(store: &dyn Store, side: &dyn FileSide, strict: bool) -> StoreResult<Result<Loaded, Vec<String>>> {
        let started = std::time::Instant::now();
        let snapshot = store.load_snapshot()?;
        let live = LiveDirectory::with_capacity(snapshot.users.len(), snapshot.keys.len(), snapshot.tokens.len());
        Ok(live.take_whole(side, strict, snapshot, started).map(|skipped| (live, skipped)))
    }

    pub fn user(&self, name: &str) -> Option<UserRef> {
        let entry = self.users.get(name)?;
        Some(UserRef { id: entry.id, name: entry.key().clone(), limit: entry.limit })
    }

    pub fn key_by_hash(&self, sha256: &[u8; 32]) -> Option<Arc<ApiKey>> {
        self.keys.get(sha256).map(|key| key.clone())
    }

    pub fn token_by_hash(&self, sha256: &[u8; 32]) -> Option<Arc<TokenGrant>> {
        self.tokens.get(sha256).map(|grant| grant.clone())
    }

    /// The user's credentials for the upstream called `upstream`.
    pub fn credentials(&self, user: &str, upstream: &str) -> Option<Arc<[Credential]>> {
        let entry = self.users.get(user)?;
        entry.credentials.iter().find(|(name, _)| **name == *upstream).map(|(_, list)| list.clone())
    }

    /// The user's OAuth connection to the upstream called `upstream`.
    pub fn connection(&self, user: &str, upstream: &str) -> Option<Arc<Connection>> {
        let entry = self.users.get(user)?;
        entry.connections.iter().find(|(name, _)| **name == *upstream).map(|(_, c)| c.clone())
    }

    /// Store users being served.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Re-reads one user from the store and replaces its entries; returns what could not be taken in.
    /// Blocking (a store call): run it off the async threads.
    pub fn refresh_user(&self, store: &dyn Store, side: &dyn FileSide, name: &str) -> StoreResult<Vec<String>> {
        let _one_at_a_time = lock(&self.stripes[stripe(name)]);
        if let Some(touched) = lock(&self.touched).as_mut() {
            touched.insert(name.to_owned());
        }
        let snapshot = store.load_user(name)?;
        Ok(self.apply(side, name, snapshot.as_ref().map(UserRows::from)))
    }

    /// Reloads every user from one store snapshot: new and changed users are replaced, users the store
    /// no longer has are removed. With `strict`, any user or key that the config file also declares is
    /// an error and nothing changes (start and SIGHUP report them; a credential no header can carry is
    /// an error too, found while applying); otherwise they are skipped and returned (a resync must not
    /// stop serving). Blocking.
    pub fn refresh_all(
        &self,
        store: &dyn Store,
        side: &dyn FileSide,
        strict: bool,
    ) -> StoreResult<Result<Vec<String>, Vec<String>>> {
        // Single-user applies go on meanwhile (admin writes are not held up for the seconds a million
        // users take); the users they touch are re-read at the end, so this older snapshot never has
        // the last word over them.
        let _one_reload = lock(&self.reloading);
        *lock(&self.touched) = Some(HashSet::new());
        let result = self.reload_whole(store, side, strict);
        let touched = lock(&self.touched).take().unwrap_or_default();
        let mut result = result?;
        for name in touched {
            let problems = self.refresh_user(store, side, &name)?;
            match &mut result {
                Ok(skipped) | Err(skipped) => skipped.extend(problems),
            }
        }
        Ok(result)
    }

    fn reload_whole(
        &self,
        store: &dyn Store,
        side: &dyn FileSide,
        strict: bool,
    ) -> StoreResult<Result<Vec<String>, Vec<String>>> {
        let started = std::time::Instant::now();
        let snapshot = store.load_snapshot()?;
        Ok(self.take_whole(side, strict, snapshot, started))
    }

    fn take_whole(
        &self,
        side: &dyn FileSide,
        strict: bool,
        snapshot: Snapshot,
        started: std::time::Instant,
    ) -> Result<Vec<String>, Vec<String>> {
        let read = started.elapsed();
        if strict {
            let problems = conflicts(side, &snapshot);
            if !problems.is_empty() {
                return Err(problems);
            }
        }
        let skipped = self.replace_all(side, snapshot);
        // Without this, a start-up with a million users would hold the snapshot's hundreds of
        // megabytes (the rows read, since dropped) for the life of the process.
        crate::heap::release_freed();
        if strict && !skipped.is_empty() {
            return Err(skipped);
        }
        tracing::info!(
            users = self.users.len(),
            keys = self.keys.len(),
            read_ms = read.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "store snapshot loaded"
        );
        Ok(skipped)
    }

    /// Replaces everything with `snapshot` (see [`LiveDirectory::refresh_all`]), each user under its
    /// stripe. Public for benchmarks.
    pub fn replace_all(&self, side: &dyn FileSide, snapshot: Snapshot) -> Vec<String> {
        let Snapshot { mut users, mut keys, mut credentials, mut tokens, taken_at: _ } = snapshot;
        // With users and rows sorted by user (the stores read them so: these sorts find them sorted),
        // each user's rows are a run in each list, borrowed where they lie: no per-user copy of a
        // million rows, and no map of a million names on the way.
        users.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        keys.sort_unstable_by(|a, b| a.user.cmp(&b.user));
        credentials.sort_unstable_by(|a, b| a.user.cmp(&b.user));
        tokens.sort_unstable_by(|a, b| a.user.cmp(&b.user));
        if !self.users.is_empty() {
            let present: std::collections::HashSet<&str> = users.iter().map(|u| u.id.as_str()).collect();
            let gone: Vec<Arc<str>> =
                self.users.iter().filter(|u| !present.contains(&**u.key())).map(|u| u.key().clone()).collect();
            drop(present);
            for name in gone {
                let _user = lock(&self.stripes[stripe(&name)]);
                self.remove(&name);
            }
        }
        // Users are independent and the maps concurrent: a start-up with a million users uses every core.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        let chunk = users.len().div_ceil(workers).max(1);
        let (keys, credentials, tokens) = (&keys[..], &credentials[..], &tokens[..]);
        std::thread::scope(|scope| {
            let handles: Vec<_> = users
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        let mut problems = Vec::new();
                        let (mut k, mut c, mut t) = (0, 0, 0);
                        for user in part {
                            let rows = UserRows {
                                user,
                                keys: run_of(keys, &mut k, &user.id, |r| &r.user),
                                credentials: run_of(credentials, &mut c, &user.id, |r| &r.user),
                                tokens: run_of(tokens, &mut t, &user.id, |r| &r.user),
                            };
                            let _user = lock(&self.stripes[stripe(&user.id)]);
                            problems.extend(self.apply(side, &user.id, Some(rows)));
                        }
                        problems
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect()
        })
    }

    /// Replaces the user's entries with `snapshot` (`None`: the user is gone). The caller holds the
    /// user's stripe (see [`LiveDirectory::refresh_user`]). Public for benchmarks.
    pub fn apply(&self, side: &dyn FileSide, name: &str, snapshot: Option<UserRows<'_>>) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(snapshot) = snapshot else {
            self.remove(name);
            return problems;
        };
        if side.has_user(name) {
            problems.push(format!("store.users.{name}: also declared in the config file"));
            self.remove(name);
            return problems;
        }
        let existing = self.users.get(name).map(|u| (u.id, u.key().clone()));
        let known = existing.is_some();
        let (id, name) = match existing {
            Some(existing) => existing,
            None => match self.next_id.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |id| id.checked_add(1)) {
                Ok(id) => (UserId(id), Arc::from(name)),
                Err(_) => {
                    problems.push(format!("store.users.{name}: no user ids left in this process; restart it"));
                    return problems;
                }
            },
        };
        let user = UserRef { id, name: name.clone(), limit: snapshot.user.rate_limit };
        let mut keys = Vec::with_capacity(snapshot.keys.len());
        for key in snapshot.keys {
            if side.has_key(&key.sha256, &key.id) {
                problems.push(format!("store.keys.{}: also declared in the config file", key.id));
                continue;
            }
            let entry = ApiKey {
                index: u32::MAX,
                id: key.id.as_str().into(),
                kind: key.kind,
                user: user.clone(),
                act_as: key.act_as.iter().map(|p| UserPattern::parse(p)).collect(),
                rate_limit: None,
                expires_at: key.expires_at,
                user_token: key.user_token,
            };
            self.keys.insert(key.sha256, Arc::new(entry));
            keys.push(key.sha256);
        }
        let mut tokens = Vec::with_capacity(snapshot.tokens.len());
        for token in snapshot.tokens {
            let grant = TokenGrant::new(&token.id, user.clone(), &token.upstream, token.expires_at);
            self.tokens.insert(token.sha256, Arc::new(grant));
            tokens.push(token.sha256);
        }
        let mut credentials: Vec<(Arc<str>, Vec<Credential>)> = Vec::new();
        let mut connections = Vec::new();
        for cred in snapshot.credentials {
            let (upstream, header_value) = match side.render(&cred.upstream, &cred.credential_id, &cred.secret) {
                Rendered::Value(upstream, value) => (upstream, value),
                Rendered::Connection(upstream, connection) => {
                    connections.push((upstream, connection));
                    continue;
                }
                Rendered::NotServed => continue,
                Rendered::Unsendable => {
                    problems.push(format!(
                        "store.credentials.{}/{}/{}: the secret cannot be sent in a header",
                        cred.user, cred.upstream, cred.credential_id
                    ));
                    continue;
                }
            };
            let credential = Credential { id: cred.credential_id.as_str().into(), header_value };
            match credentials.iter_mut().find(|(upstream, _)| **upstream == *cred.upstream) {
                Some((_, list)) => list.push(credential),
                None => credentials.push((upstream, vec![credential])),
            }
        }
        // Only a user seen before has old entries to compare with.
        let (new_keys, new_tokens) = if known { (keys.clone(), tokens.clone()) } else { Default::default() };
        let entry = LiveUser {
            id,
            limit: snapshot.user.rate_limit,
            keys: keys.into(),
            tokens: tokens.into(),
            credentials: credentials.into_iter().map(|(upstream, list)| (upstream, list.into())).collect(),
            connections: connections.into(),
        };
        // The new entries are in before the old ones go, so a key that stays never blinks out.
        if let Some(old) = self.users.insert(name.clone(), entry) {
            for hash in old.keys.iter().filter(|h| !new_keys.contains(h)) {
                self.keys.remove_if(hash, |_, key| key.user.name == name);
            }
            for hash in old.tokens.iter().filter(|h| !new_tokens.contains(h)) {
                self.tokens.remove_if(hash, |_, grant| grant.key.user.name == name);
            }
        }
        problems
    }

    fn remove(&self, name: &str) {
        let Some((name, old)) = self.users.remove(name) else { return };
        for hash in &old.keys {
            self.keys.remove_if(hash, |_, key| key.user.name == name);
        }
        for hash in &old.tokens {
            self.tokens.remove_if(hash, |_, grant| grant.key.user.name == name);
        }
    }
}

/// The run of `rows` (sorted by user) that belongs to `user`, from `*at` on; rows of users before it
/// are skipped (a store's foreign keys leave none, but a row never lands on the wrong user). Leaves
/// `*at` after the run.
fn run_of<'a, T>(rows: &'a [T], at: &mut usize, user: &str, of: impl Fn(&T) -> &str) -> &'a [T] {
    // Runs are short (a user has a key or two): a linear walk beats a binary search per user.
    let mut start = *at;
    while start < rows.len() && of(&rows[start]) < user {
        start += 1;
    }
    let mut end = start;
    while end < rows.len() && of(&rows[end]) == user {
        end += 1;
    }
    *at = end;
    &rows[start..end]
}

/// One user's rows of a snapshot, borrowed.
pub struct UserRows<'a> {
    pub user: &'a User,
    pub keys: &'a [SnapshotKey],
    pub credentials: &'a [CredentialSecret],
    pub tokens: &'a [SnapshotToken],
}

impl<'a> From<&'a UserSnapshot> for UserRows<'a> {
    fn from(s: &'a UserSnapshot) -> Self {
        UserRows { user: &s.user, keys: &s.keys, credentials: &s.credentials, tokens: &s.tokens }
    }
}

fn stripe(name: &str) -> usize {
    use std::hash::{BuildHasher, RandomState};
    // Fixed per process; only spreads users over the stripes.
    static SEED: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    SEED.get_or_init(RandomState::new).hash_one(name) as usize % STRIPES
}

/// What a strict reload refuses before it changes anything: users and keys the config file declares
/// too. (Credentials are rendered once, while they are applied: one that no header can carry is skipped
/// then and reported, and a strict reload is refused after the rest was taken in. The store refuses
/// such secrets when they are written; only a changed `inject.value` can make one.)
fn conflicts(side: &dyn FileSide, snapshot: &Snapshot) -> Vec<String> {
    let mut problems = Vec::new();
    for user in &snapshot.users {
        if side.has_user(&user.id) {
            problems.push(format!("store.users.{}: also declared in the config file", user.id));
        }
    }
    for key in &snapshot.keys {
        if side.has_key(&key.sha256, &key.id) {
            problems.push(format!("store.keys.{}: also declared in the config file", key.id));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::model::{NewKey, UserLimit};
    use crate::store::{KeyKind, SqliteStore};

    /// A config file that declares `carol` and serves upstream `gh`.
    struct File;

    impl FileSide for File {
        fn has_user(&self, name: &str) -> bool {
            name == "carol"
        }
        fn has_key(&self, _: &[u8; 32], id: &str) -> bool {
            id == "file-key"
        }
        fn render(&self, upstream: &str, _: &str, secret: &Secret) -> Rendered {
            match upstream {
                "gh" => {
                    Rendered::Value("gh".into(), HeaderValue::from_str(&format!("Bearer {}", secret.expose())).unwrap())
                }
                _ => Rendered::NotServed,
            }
        }
    }

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let key = Secret::new(base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]));
        let store = SqliteStore::open(&dir.path().join("store.db"), Some(&key)).unwrap();
        (dir, store)
    }

    fn new_key(user: &str) -> NewKey {
        NewKey {
            id: None,
            kind: KeyKind::Standard,
            user: user.into(),
            act_as: vec![],
            expires_at: None,
            user_token: None,
        }
    }

    #[test]
    fn a_user_is_applied_changed_and_removed_in_place() {
        let (_dir, store) = store();
        let live = LiveDirectory::default();
        store.create_user("alice", UserLimit::Default).unwrap();
        let key = store.create_key(new_key("alice")).unwrap();
        store.put_credential("alice", "gh", "default", &Secret::new(String::from("ghp_alice"))).unwrap();
        store.put_credential("alice", "other", "default", &Secret::new(String::from("unused"))).unwrap();
        assert!(live.refresh_user(&store, &File, "alice").unwrap().is_empty());
        let hash = crate::secret::sha256(key.key.expose().as_bytes());
        let alice = live.user("alice").unwrap();
        assert!(alice.id.0 & STORE_USER_BIT != 0);
        assert_eq!(live.key_by_hash(&hash).unwrap().user, alice);
        assert_eq!(live.credentials("alice", "gh").unwrap()[0].header_value, "Bearer ghp_alice");
        assert!(live.credentials("alice", "other").is_none(), "an upstream the config does not serve");

        // A revoked key goes; the user keeps its id (and so its rate-limit buckets).
        store.revoke_key(&key.info.id).unwrap();
        store.set_user_limit("alice", UserLimit::Unlimited).unwrap();
        live.refresh_user(&store, &File, "alice").unwrap();
        assert!(live.key_by_hash(&hash).is_none());
        assert_eq!(live.user("alice").unwrap(), UserRef { limit: UserLimit::Unlimited, ..alice.clone() });

        // A deleted user is gone with everything it had; back again, it is a new user.
        let second = store.create_key(new_key("alice")).unwrap();
        live.refresh_user(&store, &File, "alice").unwrap();
        let second_hash = crate::secret::sha256(second.key.expose().as_bytes());
        assert!(live.key_by_hash(&second_hash).is_some());
        store.delete_user("alice").unwrap();
        live.refresh_user(&store, &File, "alice").unwrap();
        assert!(live.user("alice").is_none() && live.key_by_hash(&second_hash).is_none());
        assert!(live.credentials("alice", "gh").is_none());
        store.create_user("alice", UserLimit::Default).unwrap();
        live.refresh_user(&store, &File, "alice").unwrap();
        assert_ne!(live.user("alice").unwrap().id, alice.id);
    }

    #[test]
    fn a_whole_refresh_adds_and_removes_and_a_strict_one_refuses_conflicts() {
        let (_dir, store) = store();
        let live = LiveDirectory::default();
        for user in ["alice", "bob"] {
            store.create_user(user, UserLimit::Default).unwrap();
        }
        live.refresh_all(&store, &File, true).unwrap().unwrap();
        let bob = live.user("bob").unwrap();
        store.delete_user("alice").unwrap();
        store.create_user("dave", UserLimit::Default).unwrap();
        live.refresh_all(&store, &File, true).unwrap().unwrap();
        assert!(live.user("alice").is_none());
        assert_eq!(live.user("bob").unwrap().id, bob.id);
        assert!(live.user("dave").is_some());
        assert_eq!(live.user_count(), 2);

        // carol is the config file's: a strict refresh changes nothing, a lenient one skips her.
        store.create_user("carol", UserLimit::Default).unwrap();
        store.delete_user("dave").unwrap();
        let refused = live.refresh_all(&store, &File, true).unwrap().unwrap_err();
        assert_eq!(refused, ["store.users.carol: also declared in the config file"]);
        assert!(live.user("dave").is_some(), "nothing changed");
        let skipped = live.refresh_all(&store, &File, false).unwrap().unwrap();
        assert_eq!(skipped, ["store.users.carol: also declared in the config file"]);
        assert!(live.user("carol").is_none() && live.user("dave").is_none());
    }
}
