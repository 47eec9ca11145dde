//! The embedded SQLite store: every operation, encryption at rest, rotation, concurrency and the
//! SIGKILL crash test (the test binary re-runs itself as the writer).

use std::io::{BufRead, BufReader, Write};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use mcp_tenant_proxy::policy::ratelimit::Limit;
use mcp_tenant_proxy::secret::{Secret, sha256};
use mcp_tenant_proxy::store::crypto::{MasterKey, RowAad};
use mcp_tenant_proxy::store::model::*;
use mcp_tenant_proxy::store::sqlite::{Clock, MIGRATIONS};
use mcp_tenant_proxy::store::{KeyKind, SqliteStore};

const T0: i64 = 1_800_000_000;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    now: Arc<AtomicI64>,
    master: Secret,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("store.db");
        Fixture { _dir: dir, path, now: Arc::new(AtomicI64::new(T0)), master: MasterKey::generate() }
    }

    fn clock(&self) -> Clock {
        let now = self.now.clone();
        Arc::new(move || now.load(Ordering::SeqCst))
    }

    fn open(&self) -> SqliteStore {
        SqliteStore::open_with_clock(&self.path, Some(&self.master), self.clock()).unwrap()
    }

    fn open_with(&self, key: Option<&Secret>) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with_clock(&self.path, key, self.clock())
    }

    fn advance(&self, seconds: i64) {
        self.now.fetch_add(seconds, Ordering::SeqCst);
    }

    fn raw(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(&self.path).unwrap()
    }
}

fn quota(requests: u32, per_ms: u64, burst: u32) -> Limit {
    Limit {
        requests: NonZeroU32::new(requests).unwrap(),
        per: Duration::from_millis(per_ms),
        burst: NonZeroU32::new(burst).unwrap(),
    }
}

fn standard(user: &str) -> NewKey {
    NewKey { id: None, kind: KeyKind::Standard, user: user.into(), act_as: vec![], expires_at: None }
}

fn secret_of(store: &SqliteStore, user: &str, upstream: &str, id: &str) -> Option<String> {
    store
        .credential_secrets(Some(user))
        .unwrap()
        .into_iter()
        .find(|c| c.upstream == upstream && c.credential_id == id)
        .map(|c| c.secret.expose().to_owned())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn read_or_empty(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

#[test]
fn users_create_get_list_update_delete() {
    let f = Fixture::new();
    let store = f.open();
    for id in ["carol", "alice", "dave", "bob", "erin"] {
        store.create_user(id, UserLimit::Default).unwrap();
    }
    assert!(matches!(store.create_user("alice", UserLimit::Default), Err(StoreError::Conflict { what: "user", .. })));
    for bad in ["", "al ice", "alice/x", "ålice", &"a".repeat(129)] {
        assert!(
            matches!(store.create_user(bad, UserLimit::Default), Err(StoreError::Invalid { field: "id", .. })),
            "{bad:?} accepted"
        );
    }
    store.create_user(&"a".repeat(128), UserLimit::Default).unwrap();
    store.delete_user(&"a".repeat(128)).unwrap();

    let alice = store.get_user("alice").unwrap();
    assert_eq!(alice, User { id: "alice".into(), rate_limit: UserLimit::Default, created_at: T0 });
    assert!(matches!(store.get_user("zed"), Err(StoreError::NotFound { what: "user", .. })));

    let ids = |users: Vec<User>| users.into_iter().map(|u| u.id).collect::<Vec<_>>();
    assert_eq!(ids(store.list_users(None, 2).unwrap()), ["alice", "bob"]);
    assert_eq!(ids(store.list_users(Some("bob"), 2).unwrap()), ["carol", "dave"]);
    assert_eq!(ids(store.list_users(Some("dave"), 2).unwrap()), ["erin"]);
    assert!(store.list_users(Some("erin"), 2).unwrap().is_empty());
    assert_eq!(store.list_users(None, MAX_PAGE).unwrap().len(), 5);
    for bad in [0, MAX_PAGE + 1] {
        assert!(matches!(store.list_users(None, bad), Err(StoreError::Invalid { field: "limit", .. })));
    }

    let limit = UserLimit::Quota(quota(100, 60_000, 20));
    assert_eq!(store.set_user_limit("bob", limit).unwrap().rate_limit, limit);
    assert_eq!(store.get_user("bob").unwrap().rate_limit, limit);
    store.set_user_limit("bob", UserLimit::Unlimited).unwrap();
    assert_eq!(store.get_user("bob").unwrap().rate_limit, UserLimit::Unlimited);
    store.set_user_limit("bob", UserLimit::Default).unwrap();
    assert_eq!(store.get_user("bob").unwrap().rate_limit, UserLimit::Default);
    assert!(matches!(store.set_user_limit("zed", limit), Err(StoreError::NotFound { .. })));
    let sub_ms = Limit { per: Duration::from_micros(1500), ..quota(1, 1, 1) };
    assert!(matches!(
        store.set_user_limit("bob", UserLimit::Quota(sub_ms)),
        Err(StoreError::Invalid { field: "rate_limit.per", .. })
    ));
    store.create_user("frank", UserLimit::Quota(quota(5, 1000, 5))).unwrap();

    store.delete_user("carol").unwrap();
    assert!(matches!(store.get_user("carol"), Err(StoreError::NotFound { .. })));
    assert!(matches!(store.delete_user("carol"), Err(StoreError::NotFound { .. })));

    // Everything persists across a reopen.
    drop(store);
    let store = f.open();
    assert_eq!(ids(store.list_users(None, 10).unwrap()), ["alice", "bob", "dave", "erin", "frank"]);
    assert_eq!(store.get_user("frank").unwrap().rate_limit, UserLimit::Quota(quota(5, 1000, 5)));
}

#[test]
fn deleting_a_user_removes_its_keys_tokens_credentials_and_usage() {
    let f = Fixture::new();
    let store = f.open();
    for user in ["alice", "bob"] {
        store.create_user(user, UserLimit::Default).unwrap();
        store.create_key(standard(user)).unwrap();
        store.put_credential(user, "github", "default", &Secret::new(format!("ghp_{user}"))).unwrap();
        store
            .add_usage(&[UsageDelta {
                user: user.into(),
                upstream: "github".into(),
                requests: 3,
                denials: 1,
                last_seen: T0,
            }])
            .unwrap();
    }
    let token = store.create_token("alice", "github", 7).unwrap();
    store.create_token("bob", "github", 7).unwrap();

    store.delete_user("alice").unwrap();

    assert!(store.list_keys(None).unwrap().iter().all(|k| k.user == "bob"));
    assert_eq!(store.list_keys(None).unwrap().len(), 1);
    assert!(store.list_tokens(None).unwrap().iter().all(|t| t.user == "bob"));
    assert_eq!(store.list_tokens(None).unwrap().len(), 1);
    assert!(store.lookup_token(&sha256(token.token.expose().as_bytes())).unwrap().is_none());
    let secrets = store.credential_secrets(None).unwrap();
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0].user, "bob");
    assert_eq!(store.usage(None).unwrap().iter().map(|u| u.user.as_str()).collect::<Vec<_>>(), ["bob"]);
    let snap = store.load_snapshot().unwrap();
    assert_eq!(snap.users.len(), 1);
    assert!(snap.keys.iter().all(|k| k.user == "bob"));
    assert!(snap.tokens.iter().all(|t| t.user == "bob"));
    // The rows are gone from the file, not just hidden.
    let raw = f.raw();
    for table in ["api_keys", "token_urls", "credentials", "usage"] {
        let n: i64 =
            raw.query_row(&format!("SELECT count(*) FROM {table} WHERE user_id = 'alice'"), [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0, "{table}");
    }
    assert!(matches!(store.list_keys(Some("alice")), Err(StoreError::NotFound { .. })));
    assert!(matches!(store.list_credentials("alice"), Err(StoreError::NotFound { .. })));
}

#[test]
fn keys_are_returned_once_stored_hashed_listed_and_revoked() {
    let f = Fixture::new();
    let store = f.open();
    store.create_user("alice", UserLimit::Default).unwrap();
    store.create_user("ops", UserLimit::Default).unwrap();

    let created = store.create_key(standard("alice")).unwrap();
    let key = created.key.expose().to_owned();
    assert!(key.starts_with("mtp_") && key.len() == 68, "{key}");
    assert_eq!(created.info.prefix, key[..8]);
    assert!(created.info.id.starts_with("k_"));
    assert_eq!(format!("{:?}", created.key), "***");

    let listed = store.list_keys(Some("alice")).unwrap();
    assert_eq!(listed, vec![created.info.clone()]);
    assert!(!format!("{listed:?}").contains(&key[8..]));
    let stored: Vec<u8> =
        f.raw().query_row("SELECT sha256 FROM api_keys WHERE id = ?1", [&created.info.id], |r| r.get(0)).unwrap();
    assert_eq!(stored, sha256(key.as_bytes()));
    let snap = store.load_snapshot().unwrap();
    assert_eq!(snap.keys.len(), 1);
    assert_eq!(snap.keys[0].sha256, sha256(key.as_bytes()));
    assert_eq!(snap.keys[0].kind, KeyKind::Standard);

    // Enterprise keys with act_as, an explicit id and an expiry.
    let ent = store
        .create_key(NewKey {
            id: Some("ops-ci".into()),
            kind: KeyKind::Enterprise,
            user: "ops".into(),
            act_as: vec!["tenant-a-*".into(), "bob".into(), "*".into()],
            expires_at: Some(T0 + 10),
        })
        .unwrap();
    assert_eq!(ent.info.act_as, ["tenant-a-*", "bob", "*"]);
    assert_ne!(ent.key.expose(), created.key.expose());
    let snap = store.load_snapshot().unwrap();
    let snap_ent = snap.keys.iter().find(|k| k.id == "ops-ci").unwrap();
    assert_eq!(snap_ent.act_as, ["tenant-a-*", "bob", "*"]);
    assert_eq!(snap_ent.expires_at, Some(T0 + 10));
    f.advance(10);
    assert!(store.load_snapshot().unwrap().keys.iter().all(|k| k.id != "ops-ci"), "expired key in snapshot");
    assert_eq!(store.list_keys(Some("ops")).unwrap().len(), 1, "expired keys stay listed");

    let refused = [
        (NewKey { act_as: vec!["bob".into()], ..standard("alice") }, "act_as"),
        (NewKey { kind: KeyKind::Enterprise, act_as: vec!["bo b".into()], ..standard("ops") }, "act_as"),
        (NewKey { expires_at: Some(T0), ..standard("alice") }, "expires_at"),
        (NewKey { id: Some("bad id".into()), ..standard("alice") }, "id"),
        (standard("bad user"), "user"),
    ];
    for (new, field) in refused {
        match store.create_key(new) {
            Err(StoreError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    assert!(matches!(store.create_key(standard("nobody")), Err(StoreError::NotFound { what: "user", .. })));
    assert!(matches!(
        store.create_key(NewKey { id: Some("ops-ci".into()), ..standard("alice") }),
        Err(StoreError::Conflict { what: "key", .. })
    ));

    store.touch_keys(&[(created.info.id.clone(), T0 + 5), ("no-such-key".into(), T0)]).unwrap();
    store.touch_keys(&[(created.info.id.clone(), T0 + 3)]).unwrap();
    assert_eq!(store.list_keys(Some("alice")).unwrap()[0].last_used_at, Some(T0 + 5), "last use only moves forward");

    let revoked = store.revoke_key(&created.info.id).unwrap();
    assert_eq!(revoked.revoked_at, Some(T0 + 10));
    f.advance(5);
    assert_eq!(store.revoke_key(&created.info.id).unwrap().revoked_at, Some(T0 + 10), "first revocation kept");
    assert!(store.load_snapshot().unwrap().keys.is_empty());
    assert!(matches!(store.revoke_key("k_nope"), Err(StoreError::NotFound { what: "key", .. })));
}

#[test]
fn credentials_need_a_master_key_and_list_without_secrets() {
    let f = Fixture::new();
    // No master key: users work, credentials are refused both ways, never stored in the clear.
    let keyless = f.open_with(None).unwrap();
    keyless.create_user("alice", UserLimit::Default).unwrap();
    assert!(matches!(
        keyless.put_credential("alice", "github", "default", &Secret::new("ghp_x")),
        Err(StoreError::NoMasterKey)
    ));
    assert!(matches!(keyless.credential_secrets(None), Err(StoreError::NoMasterKey)));
    assert!(keyless.load_snapshot().unwrap().credentials.is_empty(), "no credentials, no key needed");
    let n: i64 = f.raw().query_row("SELECT count(*) FROM credentials", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 0);
    drop(keyless);

    let store = f.open();
    assert_eq!(store.key_version(), Some(1));
    let put = |id: &str, value: &str| store.put_credential("alice", "github", id, &Secret::new(value));
    assert_eq!(put("default", "ghp_one").unwrap(), PutOutcome::Created);
    f.advance(60);
    assert_eq!(put("default", "ghp_two").unwrap(), PutOutcome::Updated);
    assert_eq!(put("default", "ghp_two").unwrap(), PutOutcome::Updated, "PUT is idempotent");
    assert_eq!(put("work", "ghp_work").unwrap(), PutOutcome::Created);
    store.put_credential("alice", "slack", "default", &Secret::new("xoxb-1")).unwrap();

    let listed = store.list_credentials("alice").unwrap();
    assert_eq!(
        listed.iter().map(|c| (c.upstream.as_str(), c.credential_id.as_str())).collect::<Vec<_>>(),
        [("github", "default"), ("github", "work"), ("slack", "default")]
    );
    assert_eq!((listed[0].created_at, listed[0].updated_at, listed[0].key_version), (T0, T0 + 60, 1));
    assert!(!format!("{listed:?}").contains("ghp_"));
    assert_eq!(secret_of(&store, "alice", "github", "default").as_deref(), Some("ghp_two"));
    assert_eq!(secret_of(&store, "alice", "github", "work").as_deref(), Some("ghp_work"));
    assert_eq!(store.load_snapshot().unwrap().credentials.len(), 3);

    store.delete_credential("alice", "github", "work").unwrap();
    assert!(matches!(
        store.delete_credential("alice", "github", "work"),
        Err(StoreError::NotFound { what: "credential", .. })
    ));
    assert_eq!(secret_of(&store, "alice", "github", "work"), None);

    let refused = [
        (store.put_credential("nobody", "github", "default", &Secret::new("x")), "user?"),
        (store.put_credential("alice", "git hub", "default", &Secret::new("x")), "upstream"),
        (store.put_credential("alice", "github", "de/fault", &Secret::new("x")), "credential_id"),
        (store.put_credential("alice", "github", "default", &Secret::new("")), "secret"),
    ];
    for (result, field) in refused {
        match result {
            Err(StoreError::NotFound { what: "user", .. }) if field == "user?" => {}
            Err(StoreError::Invalid { field: f, .. }) if f == field => {}
            other => panic!("{field}: {other:?}"),
        }
    }
    drop(store);

    // Reopening: without a key the snapshot cannot be built; with another key the file is refused.
    let keyless = f.open_with(None).unwrap();
    assert!(matches!(keyless.load_snapshot(), Err(StoreError::NoMasterKey)));
    assert!(matches!(f.open_with(Some(&MasterKey::generate())), Err(StoreError::WrongMasterKey)));
    assert!(matches!(f.open_with(Some(&Secret::new("c2hvcnQ="))), Err(StoreError::BadMasterKey(_))));
    let store = f.open();
    assert_eq!(secret_of(&store, "alice", "slack", "default").as_deref(), Some("xoxb-1"));
}

#[test]
fn the_database_files_never_contain_a_credential_in_plaintext() {
    let f = Fixture::new();
    let store = f.open();
    let canary = "ghp_CANARY_0f9e8d7c6b5a4f3e2d1c0b9a";
    store.create_user("canary-user-7f3a", UserLimit::Default).unwrap();
    store.put_credential("canary-user-7f3a", "github", "default", &Secret::new(canary)).unwrap();
    let key = store.create_key(standard("canary-user-7f3a")).unwrap().key;
    let token = store.create_token("canary-user-7f3a", "github", 30).unwrap().token;

    let wal = PathBuf::from(format!("{}-wal", f.path.display()));
    let db = read_or_empty(&f.path);
    let wal_bytes = read_or_empty(&wal);
    // The search works: the user id (stored in the clear) is in the written pages.
    assert!(contains(&db, b"canary-user-7f3a") || contains(&wal_bytes, b"canary-user-7f3a"));
    for bytes in [&db, &wal_bytes] {
        assert!(!contains(bytes, canary.as_bytes()), "credential in plaintext before checkpoint");
        assert!(!contains(bytes, key.expose().as_bytes()), "API key in plaintext");
        assert!(!contains(bytes, token.expose().as_bytes()), "token URL in plaintext");
    }

    // Update it (the old ciphertext may linger in free pages: still no plaintext), then checkpoint.
    store.put_credential("canary-user-7f3a", "github", "default", &Secret::new(format!("{canary}-v2"))).unwrap();
    store.checkpoint().unwrap();
    let db = read_or_empty(&f.path);
    assert!(contains(&db, b"canary-user-7f3a"), "checkpointed pages are in the database file");
    let wal_bytes = read_or_empty(&wal);
    for bytes in [&db, &wal_bytes] {
        assert!(!contains(bytes, canary.as_bytes()), "credential in plaintext after checkpoint");
        assert!(!contains(bytes, key.expose().as_bytes()));
        assert!(!contains(bytes, token.expose().as_bytes()));
    }
    assert_eq!(secret_of(&store, "canary-user-7f3a", "github", "default"), Some(format!("{canary}-v2")));
}

#[test]
fn rotation_reencrypts_every_row_under_the_new_key() {
    let f = Fixture::new();
    let store = f.open();
    let values = [("alice", "github", "ghp_a"), ("alice", "slack", "xoxb-a"), ("bob", "github", "ghp_b")];
    for (user, upstream, value) in values {
        let _ = store.create_user(user, UserLimit::Default);
        store.put_credential(user, upstream, "default", &Secret::new(value)).unwrap();
    }
    let new = MasterKey::generate();
    assert!(matches!(store.rotate_master_key(&MasterKey::generate(), &new), Err(StoreError::WrongMasterKey)));
    assert!(matches!(store.rotate_master_key(&f.master, &f.master), Err(StoreError::Invalid { field: "new", .. })));

    f.advance(100);
    assert_eq!(store.rotate_master_key(&f.master, &new).unwrap(), 2);
    assert_eq!(store.key_version(), Some(2));
    assert!(store.list_credentials("alice").unwrap().iter().all(|c| c.key_version == 2));
    for (user, upstream, value) in values {
        assert_eq!(secret_of(&store, user, upstream, "default").as_deref(), Some(value));
    }
    // Writes after the rotation use the new key too.
    store.put_credential("bob", "slack", "default", &Secret::new("xoxb-b")).unwrap();

    // On disk: every row opens with the new key and none with the old one.
    let old_key = MasterKey::parse(&f.master).unwrap();
    let new_key = MasterKey::parse(&new).unwrap();
    let raw = f.raw();
    let mut stmt = raw
        .prepare("SELECT user_id, upstream, credential_id, nonce, ciphertext, key_version FROM credentials")
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, u32>(5)?,
            ))
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(rows.len(), 4);
    for (user, upstream, id, nonce, ct, version) in &rows {
        let aad = RowAad { user, upstream, credential_id: id };
        assert_eq!(*version, 2);
        assert!(old_key.decrypt(&aad, nonce, ct).is_none(), "old key still opens {user}/{upstream}");
        assert!(new_key.decrypt(&aad, nonce, ct).is_some(), "new key cannot open {user}/{upstream}");
    }
    drop(stmt);
    drop(raw);
    drop(store);

    assert!(matches!(f.open_with(Some(&f.master)), Err(StoreError::RetiredMasterKey { version: 1 })));
    let reopened = f.open_with(Some(&new)).unwrap();
    assert_eq!(reopened.key_version(), Some(2));
    assert_eq!(reopened.load_snapshot().unwrap().credentials.len(), 4);
    assert!(matches!(reopened.rotate_master_key(&new, &f.master), Err(StoreError::Invalid { field: "new", .. })));
    let third = MasterKey::generate();
    assert_eq!(reopened.rotate_master_key(&new, &third).unwrap(), 3);
    assert_eq!(secret_of(&reopened, "bob", "slack", "default").as_deref(), Some("xoxb-b"));
}

#[test]
fn a_ciphertext_moved_to_another_row_does_not_decrypt() {
    let f = Fixture::new();
    let store = f.open();
    for user in ["alice", "mallory"] {
        store.create_user(user, UserLimit::Default).unwrap();
        store.put_credential(user, "github", "default", &Secret::new(format!("ghp_{user}"))).unwrap();
    }
    // Someone with write access to the file copies alice's ciphertext into mallory's row.
    f.raw()
        .execute(
            "UPDATE credentials SET (nonce, ciphertext) =
                 (SELECT nonce, ciphertext FROM credentials WHERE user_id = 'alice')
             WHERE user_id = 'mallory'",
            [],
        )
        .unwrap();
    match store.credential_secrets(Some("mallory")) {
        Err(StoreError::Undecryptable { user, upstream, credential_id }) => {
            assert_eq!((user.as_str(), upstream.as_str(), credential_id.as_str()), ("mallory", "github", "default"));
        }
        other => panic!("moved ciphertext: {other:?}"),
    }
    assert!(matches!(store.load_snapshot(), Err(StoreError::Undecryptable { .. })));
    assert_eq!(secret_of(&store, "alice", "github", "default").as_deref(), Some("ghp_alice"));
}

#[test]
fn token_urls_expire_and_revoke() {
    let f = Fixture::new();
    let store = f.open();
    store.create_user("alice", UserLimit::Default).unwrap();
    for days in [0, 366] {
        assert!(matches!(store.create_token("alice", "github", days), Err(StoreError::Invalid { field: "days", .. })));
    }
    assert!(matches!(store.create_token("nobody", "github", 1), Err(StoreError::NotFound { what: "user", .. })));
    assert!(matches!(store.create_token("alice", "git/hub", 1), Err(StoreError::Invalid { field: "upstream", .. })));

    let month = store.create_token("alice", "github", 30).unwrap();
    assert!(month.token.expose().starts_with("mtpt_"));
    assert_eq!(month.info.expires_at, T0 + 30 * 86_400);
    let year = store.create_token("alice", "slack", 365).unwrap();
    let hash = |t: &CreatedToken| sha256(t.token.expose().as_bytes());

    assert_eq!(store.lookup_token(&hash(&month)).unwrap(), Some(month.info.clone()));
    assert!(store.lookup_token(&sha256(b"mtpt_guess")).unwrap().is_none());
    let mut listed = store.list_tokens(Some("alice")).unwrap();
    let mut expected = vec![month.info.clone(), year.info.clone()];
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(listed, expected);
    let snap = store.load_snapshot().unwrap();
    assert_eq!(snap.tokens.len(), 2);
    assert!(snap.tokens.iter().any(|t| t.sha256 == hash(&month) && t.upstream == "github"));

    // Expiry: valid one second before, refused at the instant.
    f.advance(30 * 86_400 - 1);
    assert!(store.lookup_token(&hash(&month)).unwrap().is_some());
    f.advance(1);
    assert!(store.lookup_token(&hash(&month)).unwrap().is_none());
    assert!(store.load_snapshot().unwrap().tokens.iter().all(|t| t.id != month.info.id));

    let revoked = store.revoke_token(&year.info.id).unwrap();
    assert_eq!(revoked.revoked_at, Some(T0 + 30 * 86_400));
    assert!(store.lookup_token(&hash(&year)).unwrap().is_none());
    assert!(store.load_snapshot().unwrap().tokens.is_empty());
    assert!(matches!(store.revoke_token("t_nope"), Err(StoreError::NotFound { what: "token", .. })));
    assert_eq!(store.list_tokens(None).unwrap().len(), 2, "revoked and expired tokens stay listed");
}

#[test]
fn usage_batches_add_up() {
    let f = Fixture::new();
    let store = f.open();
    let delta = |user: &str, upstream: &str, requests, denials, last_seen| UsageDelta {
        user: user.into(),
        upstream: upstream.into(),
        requests,
        denials,
        last_seen,
    };
    store.add_usage(&[delta("alice", "github", 10, 1, T0), delta("bob", "github", 1, 0, T0)]).unwrap();
    store.add_usage(&[delta("alice", "github", 5, 2, T0 + 9), delta("alice", "slack", 7, 0, T0 + 3)]).unwrap();
    store.add_usage(&[delta("alice", "github", 1, 0, T0 + 4)]).unwrap();
    assert_eq!(
        store.usage(Some("alice")).unwrap(),
        vec![
            Usage { user: "alice".into(), upstream: "github".into(), requests: 16, denials: 3, last_seen: T0 + 9 },
            Usage { user: "alice".into(), upstream: "slack".into(), requests: 7, denials: 0, last_seen: T0 + 3 },
        ]
    );
    assert_eq!(store.usage(None).unwrap().len(), 3);
    // A row the store cannot hold is dropped, and the rest of the batch is still written: one bad name
    // must never hold back everyone's usage.
    let long = "u".repeat(129);
    let batch =
        [delta("alice", "github", 1, 0, T0), delta("bad user", "github", 1, 0, T0), delta(&long, "github", 1, 0, T0)];
    store.add_usage(&batch).unwrap();
    assert_eq!(store.usage(Some("alice")).unwrap()[0].requests, 17);
    assert_eq!(store.usage(None).unwrap().len(), 3, "the bad rows were not written");
}

#[test]
fn the_file_is_created_with_wal_migrations_and_private_mode() {
    let f = Fixture::new();
    assert!(!f.path.exists());
    let store = f.open();
    assert!(f.path.exists(), "created on first open, directory included");
    assert_eq!(store.integrity_check().unwrap(), "ok");
    let raw = f.raw();
    let mode: String = raw.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    let version: u32 = raw.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version as usize, MIGRATIONS.len());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&f.path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    drop(store);
    // A second open does not re-run migrations (they would fail: the tables exist).
    f.open();
    // A file from a newer release is refused rather than misread.
    raw.pragma_update(None, "user_version", 99).unwrap();
    assert!(matches!(f.open_with(None), Err(StoreError::SchemaTooNew { found: 99, .. })));
}

#[test]
fn concurrent_writers_from_several_threads_and_connections() {
    let f = Fixture::new();
    let shared = Arc::new(f.open());
    let threads: Vec<_> = (0..6)
        .map(|t| {
            // Half the threads share one store (one connection), half open their own.
            let store = if t % 2 == 0 { shared.clone() } else { Arc::new(f.open()) };
            std::thread::spawn(move || {
                let mut won = 0;
                for i in 0..15 {
                    let user = format!("t{t}-u{i}");
                    store.create_user(&user, UserLimit::Default).unwrap();
                    store.put_credential(&user, "github", "default", &Secret::new(format!("ghp_{user}"))).unwrap();
                    store.create_key(standard(&user)).unwrap();
                    store
                        .add_usage(&[UsageDelta {
                            user: "hot".into(),
                            upstream: "github".into(),
                            requests: 1,
                            denials: 0,
                            last_seen: T0,
                        }])
                        .unwrap();
                    match store.create_user(&format!("contested-{i}"), UserLimit::Default) {
                        Ok(_) => won += 1,
                        Err(StoreError::Conflict { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                won
            })
        })
        .collect();
    let won: i32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(won, 15, "each contested id is created exactly once");
    let snap = shared.load_snapshot().unwrap();
    assert_eq!(snap.users.len(), 6 * 15 + 15);
    assert_eq!(snap.keys.len(), 6 * 15);
    assert_eq!(snap.credentials.len(), 6 * 15);
    assert!(snap.credentials.iter().all(|c| c.secret.expose() == format!("ghp_{}", c.user)));
    assert_eq!(shared.usage(Some("hot")).unwrap()[0].requests, 6 * 15);
    assert_eq!(shared.integrity_check().unwrap(), "ok");
}

const WRITER_ENV: &str = "MTP_STORE_CRASH_WRITER";
const WRITER_KEY_ENV: &str = "MTP_STORE_CRASH_KEY";

/// The writer half of the crash test: a no-op unless the crash test started this binary as its child.
/// Writes forever, printing `ack <n>` after write n has returned (committed).
#[test]
fn crash_writer_child() {
    let Ok(path) = std::env::var(WRITER_ENV) else { return };
    let key = Secret::new(std::env::var(WRITER_KEY_ENV).unwrap());
    let store = SqliteStore::open(Path::new(&path), Some(&key)).unwrap();
    let mut out = std::io::stdout();
    for n in 0..1_000_000u32 {
        let user = format!("crash-{n}");
        store.create_user(&user, UserLimit::Default).unwrap();
        store.put_credential(&user, "github", "default", &Secret::new(format!("ghp_crash_{n}"))).unwrap();
        if n % 3 == 0 {
            store.create_key(NewKey { id: Some(format!("key-{n}")), ..standard(&user) }).unwrap();
        }
        // The parent is gone (closed pipe): stop.
        if writeln!(out, "ack {n}").and_then(|()| out.flush()).is_err() {
            return;
        }
    }
}

#[cfg(unix)]
#[test]
fn sigkill_during_a_stream_of_writes_loses_no_acknowledged_write() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    let f = Fixture::new();
    drop(f.open()); // create the file and register the key
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_writer_child", "--nocapture", "--test-threads=1"])
        .env(WRITER_ENV, &f.path)
        .env(WRITER_KEY_ENV, f.master.expose())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = Vec::new();
    // libtest may print "test crash_writer_child ... " on the same line as the first ack.
    let ack = |line: String| line.find("ack ").map(|i| line[i + 4..].trim().parse::<u32>().unwrap());
    while acked.len() < 150 {
        let line = lines.next().expect("the writer ended before it was killed").unwrap();
        acked.extend(ack(line));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "killed mid-stream, not finished: {status:?}");
    // Acknowledgements already in the pipe were acknowledged too.
    acked.extend(lines.map_while(Result::ok).filter_map(ack));
    assert_eq!(acked[0], 0, "every ack was seen");
    assert!(acked.windows(2).all(|w| w[1] == w[0] + 1), "acks in order");

    let store = f.open();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    let fk: Vec<String> = {
        let raw = f.raw();
        let mut stmt = raw.prepare("PRAGMA foreign_key_check").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    };
    assert!(fk.is_empty(), "foreign key violations: {fk:?}");
    let snap = store.load_snapshot().unwrap();
    let users: std::collections::HashSet<_> = snap.users.iter().map(|u| u.id.as_str()).collect();
    let secrets: std::collections::HashMap<_, _> =
        snap.credentials.iter().map(|c| (c.user.as_str(), c.secret.expose())).collect();
    let keys: std::collections::HashSet<_> = snap.keys.iter().map(|k| k.id.as_str()).collect();
    for n in &acked {
        let user = format!("crash-{n}");
        assert!(users.contains(user.as_str()), "acknowledged user {user} lost");
        assert_eq!(secrets.get(user.as_str()).copied(), Some(format!("ghp_crash_{n}").as_str()), "{user}'s credential");
        if n % 3 == 0 {
            assert!(keys.contains(format!("key-{n}").as_str()), "acknowledged key-{n} lost");
        }
    }
    // At most the write in flight is there without its acknowledgement.
    assert!(users.len() <= acked.len() + 1, "{} users, {} acked", users.len(), acked.len());
}
