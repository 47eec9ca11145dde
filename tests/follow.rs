//! `store::follow`: a change that fails to apply is not dropped (a review finding): a whole resync is
//! owed and retried until it succeeds.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mcp_tenant_proxy::secret::{Secret, sha256};
use mcp_tenant_proxy::store::follow::{CurrentSide, follow};
use mcp_tenant_proxy::store::live::{FileSide, Rendered};
use mcp_tenant_proxy::store::model::*;
use mcp_tenant_proxy::store::{KeyKind, LiveDirectory, SqliteStore, Store};

struct NoFile;
impl FileSide for NoFile {
    fn has_user(&self, _: &str) -> bool {
        false
    }
    fn has_key(&self, _: &[u8; 32], _: &str) -> bool {
        false
    }
    fn render(&self, _: &str, _: &str, _: &Secret) -> Rendered {
        Rendered::NotServed
    }
}

/// A store whose next `load_user` fails once, as a pool checkout timeout or a dropped connection would.
struct Flaky {
    inner: SqliteStore,
    fail_next: AtomicBool,
}

macro_rules! delegate {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(fn $name(&self, $($arg: $ty),*) -> $ret { self.inner.$name($($arg),*) })*
    };
}

impl Store for Flaky {
    delegate! {
        create_user(id: &str, rate_limit: UserLimit) -> StoreResult<User>;
        get_user(id: &str) -> StoreResult<User>;
        list_users(after: Option<&str>, limit: u32) -> StoreResult<Vec<User>>;
        set_user_limit(id: &str, rate_limit: UserLimit) -> StoreResult<User>;
        delete_user(id: &str) -> StoreResult<()>;
        create_key(new: NewKey) -> StoreResult<CreatedKey>;
        list_keys(user: Option<&str>) -> StoreResult<Vec<KeyInfo>>;
        revoke_key(id: &str) -> StoreResult<KeyInfo>;
        touch_keys(used: &[(String, UnixTime)]) -> StoreResult<()>;
        put_credential(user: &str, upstream: &str, credential_id: &str, secret: &Secret) -> StoreResult<PutOutcome>;
        swap_credential(user: &str, upstream: &str, credential_id: &str, expected: Option<&[u8; 32]>, secret: &Secret) -> StoreResult<bool>;
        delete_credential(user: &str, upstream: &str, credential_id: &str) -> StoreResult<()>;
        list_credentials(user: &str) -> StoreResult<Vec<CredentialInfo>>;
        credential_secrets(user: Option<&str>) -> StoreResult<Vec<CredentialSecret>>;
        rotate_master_key(old: &Secret, new: &Secret) -> StoreResult<u32>;
        create_token(user: &str, upstream: &str, days: u32) -> StoreResult<CreatedToken>;
        list_tokens(user: Option<&str>) -> StoreResult<Vec<TokenInfo>>;
        revoke_token(id: &str) -> StoreResult<TokenInfo>;
        lookup_token(sha256: &[u8; 32]) -> StoreResult<Option<TokenInfo>>;
        add_usage(deltas: &[UsageDelta]) -> StoreResult<()>;
        usage(user: Option<&str>) -> StoreResult<Vec<Usage>>;
        import_users(users: &[mcp_tenant_proxy::store::import::ImportUser]) -> StoreResult<Vec<CreatedKey>>;
        load_snapshot() -> StoreResult<Snapshot>;
        use_once(nonce: &[u8; 32], expires_at: UnixTime) -> StoreResult<bool>;
        take_lease(user: &str, upstream: &str, holder: &str, seconds: i64) -> StoreResult<bool>;
        drop_lease(user: &str, upstream: &str, holder: &str) -> StoreResult<()>;
        derive_key(label: &str) -> StoreResult<[u8; 32]>;
    }
    fn load_user(&self, id: &str) -> StoreResult<Option<UserSnapshot>> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable("PostgreSQL: timed out waiting for connection".into()));
        }
        self.inner.load_user(id)
    }
}

/// Polls `done` every 10 ms for at most 5 s: whether it became true.
async fn within_5s(done: impl Fn() -> bool) -> bool {
    let started = std::time::Instant::now();
    while !done() {
        if started.elapsed() > std::time::Duration::from_secs(5) {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    true
}

#[tokio::test]
async fn a_revocation_that_fails_to_apply_once_is_applied_by_the_owed_resync() {
    let dir = tempfile::tempdir().unwrap();
    let inner = SqliteStore::open(&dir.path().join("s.db"), None).unwrap();
    let store = Arc::new(Flaky { inner, fail_next: AtomicBool::new(false) });
    store.create_user("alice", UserLimit::Default).unwrap();
    let created = store
        .create_key(NewKey {
            id: None,
            kind: KeyKind::Standard,
            user: "alice".into(),
            act_as: vec![],
            expires_at: None,
            user_token: None,
        })
        .unwrap();
    let hash = sha256(created.key.expose().as_bytes());

    let live = Arc::new(LiveDirectory::default());
    let side: CurrentSide = Arc::new(|| Arc::new(NoFile) as Arc<dyn FileSide + Send + Sync>);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(follow(rx, store.clone() as Arc<dyn Store>, live.clone(), side));
    tx.send(Change::Resync).unwrap();
    assert!(within_5s(|| live.key_by_hash(&hash).is_some()).await, "alice's key is served");

    // The key is revoked (on another replica); this replica's re-read of alice fails once.
    store.revoke_key(&created.info.id).unwrap();
    store.fail_next.store(true, Ordering::SeqCst);
    tx.send(Change::User("alice".into())).unwrap();
    // Nothing else arrives (the LISTEN connection is healthy): the owed resync applies it anyway.
    assert!(within_5s(|| live.key_by_hash(&hash).is_none()).await, "the revoked key is still accepted");
    // And later changes flow as before.
    store.create_user("bob", UserLimit::Default).unwrap();
    tx.send(Change::User("bob".into())).unwrap();
    assert!(within_5s(|| live.user("bob").is_some()).await);
    task.abort();
}
