//! The store suite: every case runs against both backends, the embedded SQLite file (`sqlite::`) and
//! PostgreSQL (`pg::`; each test in a fresh database of its own, dropped at the end, so tests run in
//! parallel). Plus what only one backend has: SQLite's file bytes, WAL and the SIGKILL crash test;
//! PostgreSQL's notifications ([`watch`]) and its unavailability.
//!
//! PostgreSQL comes from `MCP_TEST_POSTGRES_URL` (a role that may CREATE DATABASE); `scripts/test` starts
//! a server and sets it. Without it the PostgreSQL tests fail, they do not skip.

use std::io::{BufRead, BufReader, Write};
use std::num::NonZeroU32;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use mcp_tenant_proxy::policy::ratelimit::Limit;
use mcp_tenant_proxy::secret::{Secret, sha256};
use mcp_tenant_proxy::store::crypto::{MasterKey, RowAad};
use mcp_tenant_proxy::store::health::StoreHealth;
use mcp_tenant_proxy::store::import::{ImportCredential, ImportKey, ImportUser};
use mcp_tenant_proxy::store::model::*;
use mcp_tenant_proxy::store::postgres::{PgConfig, PgStore, watch};
use mcp_tenant_proxy::store::sqlite::{Clock, MIGRATIONS};
use mcp_tenant_proxy::store::{KeyKind, SqliteStore, TokenMode};

const T0: i64 = 1_800_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

#[path = "common/pg.rs"]
mod pg_db;
use pg_db::{TestDb, connect};

/// Either store, used through the trait.
enum AnyStore {
    Sqlite(SqliteStore),
    Pg(PgStore),
}

impl Deref for AnyStore {
    type Target = dyn Store;
    fn deref(&self) -> &(dyn Store + 'static) {
        match self {
            AnyStore::Sqlite(s) => s,
            AnyStore::Pg(s) => s,
        }
    }
}

impl AnyStore {
    fn key_version(&self) -> Option<u32> {
        match self {
            AnyStore::Sqlite(s) => s.key_version(),
            AnyStore::Pg(s) => s.key_version(),
        }
    }

    fn sqlite(&self) -> &SqliteStore {
        match self {
            AnyStore::Sqlite(s) => s,
            AnyStore::Pg(_) => panic!("a SQLite-only check"),
        }
    }
}

/// (user, upstream, credential id, nonce, ciphertext, key version) as stored.
type RawCredential = (String, String, String, Vec<u8>, Vec<u8>, u32);

struct Fixture {
    backend: Backend,
    _dir: tempfile::TempDir,
    path: PathBuf,
    db: Option<TestDb>,
    now: Arc<AtomicI64>,
    master: Secret,
}

impl Fixture {
    fn new(backend: Backend) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("store.db");
        let db = (backend == Backend::Postgres).then(TestDb::create);
        Fixture { backend, _dir: dir, path, db, now: Arc::new(AtomicI64::new(T0)), master: MasterKey::generate() }
    }

    fn clock(&self) -> Clock {
        let now = self.now.clone();
        Arc::new(move || now.load(Ordering::SeqCst))
    }

    fn open(&self) -> AnyStore {
        self.open_with(Some(&self.master)).unwrap()
    }

    fn open_with(&self, key: Option<&Secret>) -> Result<AnyStore, StoreError> {
        Ok(match &self.db {
            None => AnyStore::Sqlite(SqliteStore::open_with_clock(&self.path, key, self.clock())?),
            Some(db) => AnyStore::Pg(PgStore::open_with_clock(&db.config, key, self.clock())?),
        })
    }

    fn pg(&self) -> &TestDb {
        self.db.as_ref().expect("a PostgreSQL fixture")
    }

    fn advance(&self, seconds: i64) {
        self.now.fetch_add(seconds, Ordering::SeqCst);
    }

    fn raw(&self) -> rusqlite::Connection {
        assert_eq!(self.backend, Backend::Sqlite);
        rusqlite::Connection::open(&self.path).unwrap()
    }

    /// Runs SQL that both dialects read alike, outside the store.
    fn exec(&self, sql: &str) {
        match &self.db {
            None => {
                self.raw().execute_batch(sql).unwrap();
            }
            Some(db) => connect(&db.config).batch_execute(sql).unwrap(),
        }
    }

    /// The one integer a query returns.
    fn count(&self, sql: &str) -> i64 {
        match &self.db {
            None => self.raw().query_row(sql, [], |r| r.get(0)).unwrap(),
            Some(db) => connect(&db.config).query_one(sql, &[]).unwrap().get(0),
        }
    }

    /// The one blob a query returns.
    fn bytes(&self, sql: &str) -> Vec<u8> {
        match &self.db {
            None => self.raw().query_row(sql, [], |r| r.get(0)).unwrap(),
            Some(db) => connect(&db.config).query_one(sql, &[]).unwrap().get(0),
        }
    }

    fn raw_credentials(&self) -> Vec<RawCredential> {
        let sql = "SELECT user_id, upstream, credential_id, nonce, ciphertext, key_version FROM credentials";
        match &self.db {
            None => {
                let raw = self.raw();
                let mut stmt = raw.prepare(sql).unwrap();
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap()
            }
            Some(db) => connect(&db.config)
                .query(sql, &[])
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get::<_, i32>(5) as u32))
                .collect(),
        }
    }
}

/// Each listed case, once per backend: `sqlite::<case>` and `pg::<case>`.
macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $case() { super::$case(super::Backend::Sqlite) } )*
        }
        mod pg {
            $( #[test] fn $case() { super::$case(super::Backend::Postgres) } )*
        }
    };
}

both_backends!(
    users_create_get_list_update_delete,
    deleting_a_user_removes_its_keys_tokens_credentials_and_usage,
    keys_are_returned_once_stored_hashed_listed_and_revoked,
    credentials_need_a_master_key_and_list_without_secrets,
    the_stored_rows_never_contain_a_secret_in_plaintext,
    rotation_reencrypts_every_row_under_the_new_key,
    a_ciphertext_moved_to_another_row_does_not_decrypt,
    token_urls_expire_and_revoke,
    usage_batches_add_up,
    migrations_are_recorded_and_a_newer_schema_is_refused,
    concurrent_writers_from_several_threads_and_connections,
    load_user_reads_one_user_as_the_request_path_needs_it,
    import_users_is_all_or_nothing_and_returns_each_key_once,
    oauth_nonces_are_used_once_and_expired_ones_pruned,
    oauth_leases_are_exclusive_reentrant_and_expire,
    derived_keys_follow_the_master_key,
    postgresql_dates_leases_by_the_servers_clock,
    replicas_racing_for_a_lease_or_a_nonce_win_once,
    swapped_credentials_are_written_only_over_the_expected_value,
    replicas_swapping_one_credential_from_the_same_value_win_once,
    a_swap_racing_a_delete_never_brings_the_credential_back,
    a_version_2_store_upgrades_to_the_oauth_tables,
);

fn quota(requests: u32, per_ms: u64, burst: u32) -> Limit {
    Limit {
        requests: NonZeroU32::new(requests).unwrap(),
        per: Duration::from_millis(per_ms),
        burst: NonZeroU32::new(burst).unwrap(),
    }
}

fn standard(user: &str) -> NewKey {
    NewKey { id: None, kind: KeyKind::Standard, user: user.into(), act_as: vec![], expires_at: None, user_token: None }
}

fn secret_of(store: &AnyStore, user: &str, upstream: &str, id: &str) -> Option<String> {
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

fn users_create_get_list_update_delete(b: Backend) {
    let f = Fixture::new(b);
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

fn deleting_a_user_removes_its_keys_tokens_credentials_and_usage(b: Backend) {
    let f = Fixture::new(b);
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
    for table in ["api_keys", "token_urls", "credentials", "usage"] {
        assert_eq!(f.count(&format!("SELECT count(*) FROM {table} WHERE user_id = 'alice'")), 0, "{table}");
    }
    assert!(matches!(store.list_keys(Some("alice")), Err(StoreError::NotFound { .. })));
    assert!(matches!(store.list_credentials("alice"), Err(StoreError::NotFound { .. })));
}

fn keys_are_returned_once_stored_hashed_listed_and_revoked(b: Backend) {
    let f = Fixture::new(b);
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
    let stored = f.bytes(&format!("SELECT sha256 FROM api_keys WHERE id = '{}'", created.info.id));
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
            user_token: Some(TokenMode::Required),
        })
        .unwrap();
    assert_eq!(ent.info.act_as, ["tenant-a-*", "bob", "*"]);
    assert_ne!(ent.key.expose(), created.key.expose());
    let snap = store.load_snapshot().unwrap();
    let snap_ent = snap.keys.iter().find(|k| k.id == "ops-ci").unwrap();
    assert_eq!(snap_ent.act_as, ["tenant-a-*", "bob", "*"]);
    assert_eq!(snap_ent.expires_at, Some(T0 + 10));
    assert_eq!((snap_ent.user_token, ent.info.user_token), (Some(TokenMode::Required), Some(TokenMode::Required)));
    assert_eq!(store.list_keys(Some("ops")).unwrap()[0].user_token, Some(TokenMode::Required));
    assert_eq!(snap.keys.iter().find(|k| k.id != "ops-ci").unwrap().user_token, None, "unset: the config's mode");
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

fn credentials_need_a_master_key_and_list_without_secrets(b: Backend) {
    let f = Fixture::new(b);
    // No master key: users work, credentials are refused both ways, never stored in the clear.
    let keyless = f.open_with(None).unwrap();
    keyless.create_user("alice", UserLimit::Default).unwrap();
    assert!(matches!(
        keyless.put_credential("alice", "github", "default", &Secret::new("ghp_x")),
        Err(StoreError::NoMasterKey)
    ));
    assert!(matches!(keyless.credential_secrets(None), Err(StoreError::NoMasterKey)));
    assert!(keyless.load_snapshot().unwrap().credentials.is_empty(), "no credentials, no key needed");
    assert_eq!(f.count("SELECT count(*) FROM credentials"), 0);
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

fn the_stored_rows_never_contain_a_secret_in_plaintext(b: Backend) {
    let f = Fixture::new(b);
    let store = f.open();
    let canary = "ghp_CANARY_5e4d3c2b1a0f9e8d7c6b";
    store.create_user("canary-user-9b1c", UserLimit::Default).unwrap();
    store.put_credential("canary-user-9b1c", "github", "default", &Secret::new(canary)).unwrap();
    let key = store.create_key(standard("canary-user-9b1c")).unwrap().key;
    let token = store.create_token("canary-user-9b1c", "github", 30).unwrap().token;
    // Every column of every row, as text (blobs as hex): the search works on the user id.
    let dump: String = ["users", "api_keys", "credentials", "token_urls", "master_keys"]
        .iter()
        .map(|table| match b {
            Backend::Sqlite => {
                let raw = f.raw();
                let mut stmt = raw.prepare(&format!("SELECT * FROM {table}")).unwrap();
                let n = stmt.column_count();
                let rows = stmt
                    .query_map([], |r| {
                        (0..n)
                            .map(|i| {
                                Ok(match r.get_ref(i)? {
                                    rusqlite::types::ValueRef::Blob(b) => {
                                        format!("{} {}", hex::encode(b), String::from_utf8_lossy(b))
                                    }
                                    rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                                    other => format!("{other:?}"),
                                })
                            })
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .unwrap();
                rows.map(|r| r.unwrap().join("|")).collect::<Vec<_>>().join("\n")
            }
            Backend::Postgres => connect(&f.pg().config)
                .query(&format!("SELECT t::text, encode(convert_to(t::text, 'UTF8'), 'escape') FROM {table} t"), &[])
                .unwrap()
                .iter()
                .map(|r| format!("{}|{}", r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>()
                .join("\n"),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(dump.contains("canary-user-9b1c"), "the dump holds the rows");
    assert!(!dump.contains(canary), "credential in plaintext");
    assert!(!dump.contains(&hex::encode(canary)), "credential in plaintext (hex)");
    assert!(!dump.contains(key.expose()), "API key in plaintext");
    assert!(!dump.contains(token.expose()), "token URL in plaintext");
    assert!(!dump.contains(&f.master.expose()[..20]), "the master key is stored");
    let master = hex::encode(base64_decode(f.master.expose()));
    assert!(!dump.contains(&master), "the master key is stored (hex)");
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text.trim()).unwrap()
}

#[test]
fn the_database_files_never_contain_a_credential_in_plaintext() {
    let f = Fixture::new(Backend::Sqlite);
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
    store.sqlite().checkpoint().unwrap();
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

fn rotation_reencrypts_every_row_under_the_new_key(b: Backend) {
    let f = Fixture::new(b);
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
    let rows = f.raw_credentials();
    assert_eq!(rows.len(), 4);
    for (user, upstream, id, nonce, ct, version) in &rows {
        let aad = RowAad { user, upstream, credential_id: id };
        assert_eq!(*version, 2);
        assert!(old_key.decrypt(&aad, nonce, ct).is_none(), "old key still opens {user}/{upstream}");
        assert!(new_key.decrypt(&aad, nonce, ct).is_some(), "new key cannot open {user}/{upstream}");
    }
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

fn a_ciphertext_moved_to_another_row_does_not_decrypt(b: Backend) {
    let f = Fixture::new(b);
    let store = f.open();
    for user in ["alice", "mallory"] {
        store.create_user(user, UserLimit::Default).unwrap();
        store.put_credential(user, "github", "default", &Secret::new(format!("ghp_{user}"))).unwrap();
    }
    // Someone with write access to the file copies alice's ciphertext into mallory's row.
    f.exec(
        "UPDATE credentials SET (nonce, ciphertext) =
             (SELECT nonce, ciphertext FROM credentials WHERE user_id = 'alice')
         WHERE user_id = 'mallory'",
    );
    match store.credential_secrets(Some("mallory")) {
        Err(StoreError::Undecryptable { user, upstream, credential_id }) => {
            assert_eq!((user.as_str(), upstream.as_str(), credential_id.as_str()), ("mallory", "github", "default"));
        }
        other => panic!("moved ciphertext: {other:?}"),
    }
    assert!(matches!(store.load_snapshot(), Err(StoreError::Undecryptable { .. })));
    assert_eq!(secret_of(&store, "alice", "github", "default").as_deref(), Some("ghp_alice"));
}

fn token_urls_expire_and_revoke(b: Backend) {
    let f = Fixture::new(b);
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

fn usage_batches_add_up(b: Backend) {
    let f = Fixture::new(b);
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
    let f = Fixture::new(Backend::Sqlite);
    assert!(!f.path.exists());
    let store = f.open();
    assert!(f.path.exists(), "created on first open, directory included");
    assert_eq!(store.sqlite().integrity_check().unwrap(), "ok");
    let raw = f.raw();
    let mode: String = raw.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&f.path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}

fn migrations_are_recorded_and_a_newer_schema_is_refused(b: Backend) {
    let f = Fixture::new(b);
    let (applied, known, newer) = match b {
        Backend::Sqlite => ("PRAGMA user_version", MIGRATIONS.len(), "PRAGMA user_version = 99"),
        Backend::Postgres => (
            "SELECT max(version)::int8 FROM mcp_schema_migrations",
            mcp_tenant_proxy::store::postgres::MIGRATIONS.len(),
            "INSERT INTO mcp_schema_migrations (version) VALUES (99)",
        ),
    };
    let store = f.open();
    assert_eq!(f.count(applied) as usize, known);
    drop(store);
    // A second open does not re-run migrations (they would fail: the tables exist).
    let store = f.open();
    store.create_user("alice", UserLimit::Default).unwrap();
    drop(store);
    assert_eq!(f.count(applied) as usize, known);
    if b == Backend::Postgres {
        // Replicas starting together: one migrates, the others find it done.
        let db = TestDb::create();
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let config = db.config.clone();
                std::thread::spawn(move || PgStore::open(&config, None).map(drop))
            })
            .collect();
        for o in opened {
            o.join().unwrap().unwrap();
        }
        assert_eq!(connect(&db.config).query_one(applied, &[]).unwrap().get::<_, i64>(0) as usize, known);
    }
    // A store from a newer release is refused rather than misread.
    f.exec(newer);
    assert!(matches!(f.open_with(None), Err(StoreError::SchemaTooNew { found: 99, .. })));
}

fn concurrent_writers_from_several_threads_and_connections(b: Backend) {
    let f = Fixture::new(b);
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
    if b == Backend::Sqlite {
        assert_eq!(shared.sqlite().integrity_check().unwrap(), "ok");
    }
}

const WRITER_ENV: &str = "MTP_STORE_CRASH_WRITER";
const WRITER_KEY_ENV: &str = "MTP_STORE_CRASH_KEY";

/// The writer half of the crash test: a no-op unless the crash test started this binary as its child.
/// Writes forever, printing `ack <n>` after write n has returned (committed).
#[test]
fn crash_writer_child() {
    let Ok(target) = std::env::var(WRITER_ENV) else { return };
    let key = Secret::new(std::env::var(WRITER_KEY_ENV).unwrap());
    let store = match target.strip_prefix("pg:") {
        // The database's name; the server is the one MCP_TEST_POSTGRES_URL names.
        Some(db) => {
            let config = PgConfig::parse(&pg_db::postgres_url()).unwrap().with_dbname(db);
            AnyStore::Pg(PgStore::open(&config, Some(&key)).unwrap())
        }
        None => AnyStore::Sqlite(SqliteStore::open(Path::new(&target), Some(&key)).unwrap()),
    };
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
    sigkill_a_writer(Backend::Sqlite);
}

#[cfg(unix)]
#[test]
fn pg_sigkill_during_a_stream_of_writes_loses_no_acknowledged_write() {
    sigkill_a_writer(Backend::Postgres);
}

#[cfg(unix)]
fn sigkill_a_writer(b: Backend) {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    let f = Fixture::new(b);
    drop(f.open()); // create the store and register the key
    let target = match &f.db {
        None => f.path.display().to_string(),
        Some(db) => format!("pg:{}", db.name),
    };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_writer_child", "--nocapture", "--test-threads=1"])
        .env(WRITER_ENV, target)
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
    if b == Backend::Sqlite {
        assert_eq!(store.sqlite().integrity_check().unwrap(), "ok");
        let fk: Vec<String> = {
            let raw = f.raw();
            let mut stmt = raw.prepare("PRAGMA foreign_key_check").unwrap();
            stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
        };
        assert!(fk.is_empty(), "foreign key violations: {fk:?}");
    }
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

fn load_user_reads_one_user_as_the_request_path_needs_it(b: Backend) {
    let f = Fixture::new(b);
    let store = f.open();
    assert!(store.load_user("nobody").unwrap().is_none(), "an absent user is None, not an error");
    assert!(matches!(store.load_user("bad user"), Err(StoreError::Invalid { field: "id", .. })));
    let limit = UserLimit::Quota(quota(10, 60_000, 2));
    for user in ["alice", "bob"] {
        store.create_user(user, limit).unwrap();
        store.put_credential(user, "github", "default", &Secret::new(format!("ghp_{user}"))).unwrap();
    }
    store.put_credential("alice", "slack", "work", &Secret::new("xoxb-alice")).unwrap();
    let live = store.create_key(standard("alice")).unwrap();
    let revoked = store.create_key(standard("alice")).unwrap();
    store.revoke_key(&revoked.info.id).unwrap();
    let expiring = store.create_key(NewKey { expires_at: Some(T0 + 10), ..standard("alice") }).unwrap();
    let bobs = store.create_key(standard("bob")).unwrap();
    let token = store.create_token("alice", "github", 1).unwrap();
    let gone = store.create_token("alice", "github", 30).unwrap();
    store.revoke_token(&gone.info.id).unwrap();

    let alice = store.load_user("alice").unwrap().expect("alice exists");
    assert_eq!(alice.user.id, "alice");
    assert_eq!(alice.user.rate_limit, limit);
    assert_eq!(alice.taken_at, T0);
    let mut ids: Vec<_> = alice.keys.iter().map(|k| k.id.as_str()).collect();
    ids.sort();
    let mut expected = vec![live.info.id.as_str(), expiring.info.id.as_str()];
    expected.sort();
    assert_eq!(ids, expected, "revoked keys are left out, other users' keys too");
    let k = alice.keys.iter().find(|k| k.id == live.info.id).unwrap();
    assert_eq!(k.sha256, sha256(live.key.expose().as_bytes()));
    assert!(alice.keys.iter().all(|k| k.id != bobs.info.id));
    let creds: Vec<_> =
        alice.credentials.iter().map(|c| (c.upstream.as_str(), c.credential_id.as_str(), c.secret.expose())).collect();
    assert_eq!(creds, [("github", "default", "ghp_alice"), ("slack", "work", "xoxb-alice")], "decrypted, alice's only");
    assert_eq!(alice.tokens.len(), 1, "revoked tokens are left out");
    assert_eq!(alice.tokens[0].sha256, sha256(token.token.expose().as_bytes()));

    // Expiry is judged at the store's clock.
    f.advance(10);
    let alice = store.load_user("alice").unwrap().unwrap();
    assert_eq!(alice.keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), [live.info.id.as_str()]);
    assert_eq!(alice.taken_at, T0 + 10);
    f.advance(86_400);
    assert!(store.load_user("alice").unwrap().unwrap().tokens.is_empty(), "expired tokens are left out");

    store.delete_user("alice").unwrap();
    assert!(store.load_user("alice").unwrap().is_none(), "a deleted user is None");
    assert_eq!(store.load_user("bob").unwrap().unwrap().credentials[0].secret.expose(), "ghp_bob");
    // Without the master key, a user with credentials cannot be loaded; one without can.
    drop(store);
    let keyless = f.open_with(None).unwrap();
    assert!(matches!(keyless.load_user("bob"), Err(StoreError::NoMasterKey)));
    keyless.create_user("carol", UserLimit::Default).unwrap();
    assert!(keyless.load_user("carol").unwrap().unwrap().credentials.is_empty());
}

/// The next change `watch` reports, within `within`.
async fn next_change(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Change>, within: Duration) -> Change {
    tokio::time::timeout(within, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no change reported within {within:?}"))
        .expect("watch ended")
}

/// Runs a store call on the blocking pool, as the admin API does.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn pg_watch_reports_every_write_that_the_request_path_sees_and_resyncs_after_a_lost_connection() {
    // The fixture creates and drops its database with the sync client: outside the runtime.
    let f = Fixture::new(Backend::Postgres);
    runtime().block_on(watch_scenario(&f));
}

async fn watch_scenario(f: &Fixture) {
    let store = Arc::new(f.open());
    let health = Arc::new(StoreHealth::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(watch(f.pg().config.clone(), tx, health.clone(), None));
    assert_eq!(next_change(&mut rx, Duration::from_secs(5)).await, Change::Resync, "a resync comes first");
    assert!(health.is_up());

    // Each write, seen within a second, as the user it changed.
    let s = store.clone();
    let key = blocking(move || {
        s.create_user("alice", UserLimit::Default).unwrap();
        s.create_key(standard("alice")).unwrap()
    })
    .await;
    let started = Instant::now();
    assert_eq!(next_change(&mut rx, Duration::from_secs(1)).await, Change::User("alice".into()));
    assert_eq!(next_change(&mut rx, Duration::from_secs(1)).await, Change::User("alice".into()));
    assert!(started.elapsed() < Duration::from_secs(1));
    type Write = Box<dyn FnOnce(&AnyStore) + Send>;
    let id = key.info.id.clone();
    let writes: Vec<(&str, Write)> = vec![
        ("limit", Box::new(|s| drop(s.set_user_limit("alice", UserLimit::Unlimited).unwrap()))),
        (
            "credential",
            Box::new(|s| {
                assert_eq!(
                    s.put_credential("alice", "github", "default", &Secret::new("x")).unwrap(),
                    PutOutcome::Created
                )
            }),
        ),
        ("credential delete", Box::new(|s| s.delete_credential("alice", "github", "default").unwrap())),
        ("token", Box::new(|s| drop(s.create_token("alice", "github", 1).unwrap()))),
        (
            "token revoke",
            Box::new(|s| {
                let t = s.list_tokens(Some("alice")).unwrap().remove(0);
                drop(s.revoke_token(&t.id).unwrap())
            }),
        ),
        ("key revoke", Box::new(move |s| drop(s.revoke_key(&id).unwrap()))),
        ("delete", Box::new(|s| s.delete_user("alice").unwrap())),
    ];
    for (what, write) in writes {
        // Usage, key use and a refused write tell nobody anything.
        let s = store.clone();
        blocking(move || {
            s.add_usage(&[UsageDelta {
                user: "alice".into(),
                upstream: "github".into(),
                requests: 1,
                denials: 0,
                last_seen: T0,
            }])
            .unwrap();
            s.touch_keys(&[("nope".into(), T0)]).unwrap();
            assert!(matches!(s.create_user("bad user", UserLimit::Default), Err(StoreError::Invalid { .. })));
            write(&s);
        })
        .await;
        assert_eq!(next_change(&mut rx, Duration::from_secs(1)).await, Change::User("alice".into()), "{what}");
    }
    // A write that fails inside its transaction notifies nobody (delivery is on commit only).
    let s = store.clone();
    blocking(move || {
        s.create_user("bob", UserLimit::Default).unwrap();
        assert!(matches!(s.create_user("bob", UserLimit::Default), Err(StoreError::Conflict { .. })));
        s.create_user("carol", UserLimit::Default).unwrap();
    })
    .await;
    assert_eq!(next_change(&mut rx, Duration::from_secs(1)).await, Change::User("bob".into()));
    assert_eq!(next_change(&mut rx, Duration::from_secs(1)).await, Change::User("carol".into()));
    // A master key rotation changes every credential: resync.
    let (s, old) = (store.clone(), f.master.clone());
    blocking(move || s.rotate_master_key(&old, &MasterKey::generate()).unwrap()).await;
    assert_eq!(next_change(&mut rx, Duration::from_secs(1)).await, Change::Resync);

    // The server ends the listening connection: watch reconnects and resyncs; later writes arrive again.
    let db = f.pg().name.clone();
    let admin = f.pg().admin.clone();
    let killed = blocking(move || {
        connect(&admin)
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = $1 AND application_name = 'mcp-tenant-proxy-listen'",
                &[&db],
            )
            .unwrap()
            .get::<_, i64>(0)
    })
    .await;
    assert_eq!(killed, 1, "one listening connection");
    // Written while no one listens: only the resync covers it.
    let s = store.clone();
    blocking(move || drop(s.create_user("dave", UserLimit::Default).unwrap())).await;
    let mut seen = Vec::new();
    loop {
        let change = next_change(&mut rx, Duration::from_secs(5)).await;
        let done = change == Change::Resync;
        seen.push(change);
        if done {
            break;
        }
    }
    assert!(seen.len() <= 2, "at most dave's change before the resync: {seen:?}");
    assert!(health.is_up());
    let s = store.clone();
    blocking(move || drop(s.create_user("erin", UserLimit::Default).unwrap())).await;
    assert_eq!(next_change(&mut rx, Duration::from_secs(1)).await, Change::User("erin".into()));

    // The receiver gone, watch ends.
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), watcher).await.expect("watch ends with its receiver").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_watch_marks_the_store_down_while_the_server_is_unreachable() {
    // A port nothing listens on: watch keeps trying, health stays down, nothing is reported.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = PgConfig::parse(&format!("postgres://mcp:hunter2-pw@127.0.0.1:{port}/x")).unwrap();
    let health = Arc::new(StoreHealth::new(true));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(watch(config, tx, health.clone(), None));
    assert!(tokio::time::timeout(Duration::from_millis(1500), rx.recv()).await.is_err(), "no change without a server");
    assert!(!health.is_up());
    watcher.abort();
}

#[test]
fn pg_unreachable_fails_fast_with_unavailable_and_never_shows_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = PgConfig::parse(&format!("postgres://mcp:hunter2-pw@127.0.0.1:{port}/x")).unwrap();
    let started = Instant::now();
    let e = PgStore::open(&config, None).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert!(!e.to_string().contains("hunter2") && !format!("{e:?}").contains("hunter2"), "{e}");

    // The right server, the wrong password: refused, and the password is not in the message.
    let db = TestDb::create();
    let wrong = db.config.clone().with_password(&Secret::new("hunter2-wrong"));
    let e = PgStore::open(&wrong, None).unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert!(!e.to_string().contains("hunter2") && !format!("{e:?}").contains("hunter2"), "{e}");
    assert!(!format!("{wrong:?}").contains("hunter2"));

    // The server goes away under an open store: calls fail fast and cleanly, then work again.
    let store = PgStore::open(&db.config, None).unwrap();
    store.create_user("alice", UserLimit::Default).unwrap();
    connect(&db.admin)
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db.name],
        )
        .unwrap();
    // The pool notices the dead connections and opens new ones.
    assert_eq!(store.get_user("alice").unwrap().id, "alice");
    store.create_user("bob", UserLimit::Default).unwrap();
}

#[test]
fn pg_replicas_share_one_database_and_their_usage_adds_up() {
    let f = Fixture::new(Backend::Postgres);
    let replicas: Vec<_> = (0..3).map(|_| Arc::new(f.open())).collect();
    replicas[0].create_user("alice", UserLimit::Default).unwrap();
    assert_eq!(replicas[2].get_user("alice").unwrap().id, "alice", "written on one, read on another");
    replicas[1].put_credential("alice", "github", "default", &Secret::new("ghp_shared")).unwrap();
    assert_eq!(secret_of(&replicas[2], "alice", "github", "default").as_deref(), Some("ghp_shared"));
    let threads: Vec<_> = replicas
        .iter()
        .cloned()
        .map(|r| {
            std::thread::spawn(move || {
                for i in 0..50 {
                    let batch = [
                        UsageDelta {
                            user: "alice".into(),
                            upstream: "github".into(),
                            requests: 2,
                            denials: 1,
                            last_seen: T0 + i,
                        },
                        UsageDelta {
                            user: "bob".into(),
                            upstream: "github".into(),
                            requests: 1,
                            denials: 0,
                            last_seen: T0,
                        },
                        UsageDelta {
                            user: "alice".into(),
                            upstream: "github".into(),
                            requests: 1,
                            denials: 0,
                            last_seen: T0,
                        },
                    ];
                    r.add_usage(&batch).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let usage = replicas[0].usage(None).unwrap();
    assert_eq!(
        usage,
        vec![
            Usage {
                user: "alice".into(),
                upstream: "github".into(),
                requests: 3 * 50 * 3,
                denials: 50 * 3,
                last_seen: T0 + 49
            },
            Usage { user: "bob".into(), upstream: "github".into(), requests: 50 * 3, denials: 0, last_seen: T0 },
        ]
    );
}

fn import_user(id: &str, keys: usize, credentials: &[(&str, &str)]) -> ImportUser {
    ImportUser {
        id: id.into(),
        rate_limit: UserLimit::Default,
        keys: (0..keys)
            .map(|_| ImportKey {
                id: None,
                kind: KeyKind::Standard,
                act_as: vec![],
                expires_at: None,
                user_token: None,
            })
            .collect(),
        credentials: credentials
            .iter()
            .map(|(upstream, secret)| ImportCredential {
                upstream: (*upstream).into(),
                credential_id: "default".into(),
                secret: Secret::new(*secret),
            })
            .collect(),
    }
}

fn import_users_is_all_or_nothing_and_returns_each_key_once(b: Backend) {
    let f = Fixture::new(b);
    let store = f.open();
    assert!(store.import_users(&[]).unwrap().is_empty());
    let limit = UserLimit::Quota(quota(5, 1000, 5));
    let mut ops = import_user("ops", 0, &[]);
    ops.keys.push(ImportKey {
        id: Some("ops-key".into()),
        kind: KeyKind::Enterprise,
        act_as: vec!["tenant-*".into()],
        expires_at: Some(T0 + 100),
        user_token: Some(TokenMode::Required),
    });
    let batch = vec![
        ImportUser {
            rate_limit: limit,
            ..import_user("alice", 2, &[("github", "ghp_alice"), ("slack", "xoxb-alice")])
        },
        import_user("bob", 1, &[("github", "ghp_bob")]),
        import_user("carol", 0, &[]),
        ops,
    ];
    let created = store.import_users(&batch).unwrap();
    assert_eq!(created.iter().map(|k| k.info.user.as_str()).collect::<Vec<_>>(), ["alice", "alice", "bob", "ops"]);
    assert_eq!(created[3].info.id, "ops-key");
    assert_eq!(created[3].info.act_as, ["tenant-*"]);
    assert_eq!(created[3].info.user_token, Some(TokenMode::Required));
    assert!(created.iter().all(|k| k.key.expose().starts_with("mtp_") && k.info.created_at == T0));
    assert_eq!(store.get_user("alice").unwrap().rate_limit, limit);
    assert_eq!(store.list_users(None, 10).unwrap().len(), 4);
    let snap = store.load_snapshot().unwrap();
    for k in &created {
        let found = snap.keys.iter().find(|s| s.id == k.info.id).expect("imported key in the snapshot");
        assert_eq!(found.sha256, sha256(k.key.expose().as_bytes()), "stored as the hash of the key returned");
        assert_eq!(found.user_token, k.info.user_token);
    }
    assert_eq!(secret_of(&store, "alice", "slack", "default").as_deref(), Some("xoxb-alice"));
    assert_eq!(store.load_user("bob").unwrap().unwrap().credentials[0].secret.expose(), "ghp_bob");
    assert_eq!(store.list_credentials("alice").unwrap()[0].key_version, 1);

    // All or nothing: one existing user refuses the batch, and nobody of it is created.
    let refused = |batch: Vec<ImportUser>| store.import_users(&batch).unwrap_err();
    let before = store.list_users(None, 100).unwrap().len();
    match refused(vec![import_user("dave", 1, &[("github", "x")]), import_user("bob", 0, &[])]) {
        StoreError::Conflict { what: "user", id } => assert_eq!(id, "bob"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        refused(vec![import_user("erin", 0, &[]), import_user("erin", 0, &[])]),
        StoreError::Conflict { .. }
    ));
    let mut twice = import_user("frank", 0, &[("github", "a"), ("github", "b")]);
    assert!(matches!(refused(vec![twice.clone()]), StoreError::Conflict { what: "credential", .. }));
    twice.credentials.pop();
    twice.keys.push(ImportKey {
        id: Some("ops-key".into()),
        kind: KeyKind::Standard,
        act_as: vec![],
        expires_at: None,
        user_token: None,
    });
    assert!(matches!(refused(vec![twice]), StoreError::Conflict { what: "key", .. }));
    for (user, field) in [
        (import_user("bad user", 0, &[]), "id"),
        (import_user("gina", 0, &[("git hub", "x")]), "upstream"),
        (import_user("gina", 0, &[("github", "")]), "secret"),
        (
            ImportUser {
                keys: vec![ImportKey {
                    id: None,
                    kind: KeyKind::Standard,
                    act_as: vec!["x".into()],
                    expires_at: None,
                    user_token: None,
                }],
                ..import_user("gina", 0, &[])
            },
            "act_as",
        ),
    ] {
        match refused(vec![import_user("hank", 0, &[]), user]) {
            StoreError::Invalid { field: got, .. } => assert_eq!(got, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    assert_eq!(store.list_users(None, 100).unwrap().len(), before, "refused batches left nothing behind");
    assert!(matches!(store.get_user("dave"), Err(StoreError::NotFound { .. })));
    drop(store);
    // Credentials need the master key; users and keys alone do not.
    let keyless = f.open_with(None).unwrap();
    assert!(matches!(
        keyless.import_users(&[import_user("ivan", 0, &[("github", "x")])]),
        Err(StoreError::NoMasterKey)
    ));
    assert_eq!(keyless.import_users(&[import_user("ivan", 1, &[])]).unwrap().len(), 1);
}

#[test]
fn pg_imports_notify_each_user_of_a_small_batch_and_resync_for_a_big_one() {
    let f = Fixture::new(Backend::Postgres);
    let store = f.open();
    runtime().block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = tokio::spawn(watch(f.pg().config.clone(), tx, Arc::new(StoreHealth::default()), None));
        assert_eq!(next_change(&mut rx, Duration::from_secs(5)).await, Change::Resync);
        std::thread::scope(|s| {
            s.spawn(|| store.import_users(&[import_user("a", 1, &[]), import_user("b", 0, &[])]).unwrap());
        });
        assert_eq!(next_change(&mut rx, Duration::from_secs(1)).await, Change::User("a".into()));
        assert_eq!(next_change(&mut rx, Duration::from_secs(1)).await, Change::User("b".into()));
        let big: Vec<_> = (0..1001).map(|i| import_user(&format!("u{i}"), 1, &[("github", "x")])).collect();
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(store.import_users(&big).unwrap().len(), 1001));
        });
        assert_eq!(next_change(&mut rx, Duration::from_secs(1)).await, Change::Resync);
        assert!(tokio::time::timeout(Duration::from_millis(200), rx.recv()).await.is_err(), "one resync only");
        watcher.abort();
    });
}

/// Sends SIGCONT to a stopped process when dropped, whatever the test did meanwhile.
struct Stopped(i32);

impl Stopped {
    fn stop(pid: i32) -> Stopped {
        let status = std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap();
        assert!(status.success(), "cannot stop the server process {pid}");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

#[test]
fn pg_watch_notices_a_server_that_stops_answering_within_seconds() {
    let f = Fixture::new(Backend::Postgres);
    runtime().block_on(async {
        let health = Arc::new(StoreHealth::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = tokio::spawn(watch(f.pg().config.clone(), tx, health.clone(), None));
        assert_eq!(next_change(&mut rx, Duration::from_secs(5)).await, Change::Resync);
        let (admin, db) = (f.pg().admin.clone(), f.pg().name.clone());
        let pid: i32 = blocking(move || {
            connect(&admin)
                .query_one(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = 'mcp-tenant-proxy-listen'",
                    &[&db],
                )
                .unwrap()
                .get(0)
        })
        .await;
        // The backend serving the listener hangs (no answer, no reset): like a server or network gone quiet.
        let stopped = Stopped::stop(pid);
        let started = Instant::now();
        let mut every = tokio::time::interval(Duration::from_millis(20));
        while health.is_up() {
            assert!(started.elapsed() < Duration::from_secs(4), "still up after {:?}", started.elapsed());
            every.tick().await;
        }
        assert!(started.elapsed() <= Duration::from_millis(2500), "noticed after {:?}", started.elapsed());
        drop(stopped);
        // A fresh connection, and a resync for whatever was missed.
        assert_eq!(next_change(&mut rx, Duration::from_secs(5)).await, Change::Resync);
        assert!(health.is_up());
        watcher.abort();
    });
}

fn oauth_nonces_are_used_once_and_expired_ones_pruned(b: Backend) {
    let f = Fixture::new(b);
    // No master key needed.
    let store = f.open_with(None).unwrap();
    let (link, state) = ([1u8; 32], [2u8; 32]);
    assert!(store.use_once(&link, T0 + 600).unwrap());
    assert!(!store.use_once(&link, T0 + 600).unwrap(), "a replay is refused");
    assert!(!store.use_once(&link, T0 + 900).unwrap(), "whatever expiry the replay claims");
    assert!(store.use_once(&state, T0 + 60).unwrap());
    let replica = f.open_with(None).unwrap();
    assert!(!replica.use_once(&state, T0 + 60).unwrap(), "used on another replica (or process)");
    assert_eq!(f.count("SELECT count(*) FROM oauth_once"), 2);

    // Kept through its last second and ONCE_KEPT_AFTER more (replicas' clocks differ); the first use
    // after that prunes it, and only it.
    f.advance(60 + ONCE_KEPT_AFTER);
    assert!(!store.use_once(&state, T0 + 60).unwrap());
    f.advance(1);
    assert!(store.use_once(&[3; 32], T0 + 1000).unwrap());
    assert_eq!(f.count(&format!("SELECT count(*) FROM oauth_once WHERE expires_at < {}", T0 + 61)), 0);
    assert_eq!(f.count("SELECT count(*) FROM oauth_once"), 2, "the link's and the new nonce's rows");
    assert!(!store.use_once(&link, T0 + 600).unwrap(), "the link is still kept until it expires");
    // Pruned, an expired nonce is new again: callers refuse expired links and states themselves.
    assert!(store.use_once(&state, T0 + 60).unwrap());

    f.advance(1000);
    assert!(store.use_once(&[4; 32], T0 + 3000).unwrap());
    assert_eq!(f.count("SELECT count(*) FROM oauth_once"), 1, "every expired row is gone");
}

fn oauth_leases_are_exclusive_reentrant_and_expire(b: Backend) {
    let f = Fixture::new(b);
    let store = f.open_with(None).unwrap();
    // Leases run for seconds from the store's now: `until` is where this one should end.
    let lease = |holder: &str, until: i64| {
        store.take_lease("alice", "github", holder, until - f.now.load(Ordering::SeqCst)).unwrap()
    };
    assert!(lease("replica-1", T0 + 30), "nobody held it");
    assert!(!lease("replica-2", T0 + 30), "replica-1 holds it");
    assert!(lease("replica-1", T0 + 60), "re-entrant: its holder takes it again (until later)");
    // Each (user, upstream) is a lease of its own.
    assert!(store.take_lease("bob", "github", "replica-2", 30).unwrap());
    assert!(store.take_lease("alice", "slack", "replica-2", 30).unwrap());

    // Another holder's drop does nothing; neither does a drop of a lease nobody holds.
    store.drop_lease("alice", "github", "replica-2").unwrap();
    store.drop_lease("carol", "github", "replica-2").unwrap();
    assert!(!lease("replica-2", T0 + 90));

    // Held through its last second, taken over after it.
    f.advance(60);
    assert!(!lease("replica-2", T0 + 90));
    f.advance(1);
    assert!(lease("replica-2", T0 + 90), "expired: another holder takes over");
    assert!(!lease("replica-1", T0 + 120), "the old holder lost it");

    // The holder's drop ends it at once.
    store.drop_lease("alice", "github", "replica-2").unwrap();
    assert!(lease("replica-1", T0 + 120));
    assert_eq!(f.count("SELECT count(*) FROM oauth_leases"), 3);

    for (user, upstream, holder, field) in [
        ("bad user", "github", "replica-1", "user"),
        ("alice", "a/b", "replica-1", "upstream"),
        ("alice", "github", "", "holder"),
        ("alice", "github", "new\nline", "holder"),
    ] {
        let take = store.take_lease(user, upstream, holder, 200);
        assert!(matches!(take, Err(StoreError::Invalid { field: got, .. }) if got == field), "{take:?}");
        let drop = store.drop_lease(user, upstream, holder);
        assert!(matches!(drop, Err(StoreError::Invalid { field: got, .. }) if got == field), "{drop:?}");
    }
}

fn postgresql_dates_leases_by_the_servers_clock(b: Backend) {
    if b != Backend::Postgres {
        return;
    }
    let f = Fixture::new(b);
    // Two replicas whose own clocks say T0, weeks after the server's, dating leases as the proxy does.
    let replica = || PgStore::open_with_clock(&f.pg().config, None, f.clock()).unwrap().leases_by_server_clock();
    let (first, second) = (replica(), replica());
    assert!(first.take_lease("alice", "github", "replica-1", 30).unwrap());
    let until = f.count("SELECT until FROM oauth_leases");
    let server_now = f.count("SELECT floor(extract(epoch FROM now()))::bigint");
    assert!((server_now + 29..=server_now + 30).contains(&until), "until {until}, server now {server_now}");
    assert!(!second.take_lease("alice", "github", "replica-2", 30).unwrap(), "held by the server's clock");
    // Dated by its own clock, a replica that far ahead would take it over (and spend the same token).
    let own_clock = f.open_with(None).unwrap();
    assert!(own_clock.take_lease("alice", "github", "replica-3", 30).unwrap());
}

fn derived_keys_follow_the_master_key(b: Backend) {
    let f = Fixture::new(b);
    let store = f.open();
    let connect = store.derive_key("oauth connect v1").unwrap();
    assert_eq!(store.derive_key("oauth connect v1").unwrap(), connect, "stable");
    assert_ne!(store.derive_key("oauth state v1").unwrap(), connect, "one key per label");
    assert_eq!(connect, MasterKey::parse(&f.master).unwrap().derive("oauth connect v1"));
    let replica = f.open();
    assert_eq!(replica.derive_key("oauth connect v1").unwrap(), connect, "replicas sharing a master key agree");
    drop(replica);
    let elsewhere = Fixture::new(b);
    assert_ne!(elsewhere.open().derive_key("oauth connect v1").unwrap(), connect, "another master key");

    let keyless = f.open_with(None).unwrap();
    assert!(matches!(keyless.derive_key("oauth connect v1"), Err(StoreError::NoMasterKey)));
    drop(keyless);

    // Derived from the current key: a rotation changes it.
    let new = MasterKey::generate();
    store.rotate_master_key(&f.master, &new).unwrap();
    let rotated = store.derive_key("oauth connect v1").unwrap();
    assert_ne!(rotated, connect);
    assert_eq!(rotated, MasterKey::parse(&new).unwrap().derive("oauth connect v1"));
}

fn replicas_racing_for_a_lease_or_a_nonce_win_once(b: Backend) {
    const REPLICAS: usize = 8;
    const ROUNDS: usize = 20;
    let f = Fixture::new(b);
    let barrier = Arc::new(std::sync::Barrier::new(REPLICAS));
    let threads: Vec<_> = (0..REPLICAS)
        .map(|r| {
            // A store (pool, or file connection) each, as replicas have.
            let store = f.open_with(None).unwrap();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let holder = format!("replica-{r}");
                (0..ROUNDS)
                    .map(|round| {
                        barrier.wait();
                        let leased = store.take_lease("alice", &format!("up{round}"), &holder, 60).unwrap();
                        barrier.wait();
                        let used = store.use_once(&[round as u8; 32], T0 + 60).unwrap();
                        (leased, used)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    // won[replica][round]
    let won: Vec<Vec<(bool, bool)>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let store = f.open_with(None).unwrap();
    for round in 0..ROUNDS {
        let holders: Vec<usize> = won.iter().enumerate().filter(|(_, w)| w[round].0).map(|(r, _)| r).collect();
        assert_eq!(holders.len(), 1, "round {round}: lease taken by {holders:?}");
        let upstream = format!("up{round}");
        for r in 0..REPLICAS {
            let again = store.take_lease("alice", &upstream, &format!("replica-{r}"), 60).unwrap();
            assert_eq!(again, r == holders[0], "round {round}: replica-{r}");
        }
        let used = won.iter().filter(|w| w[round].1).count();
        assert_eq!(used, 1, "round {round}: the nonce was used {used} times");
    }
}

fn swapped_credentials_are_written_only_over_the_expected_value(b: Backend) {
    let f = Fixture::new(b);
    let store = f.open();
    store.create_user("alice", UserLimit::Default).unwrap();
    let swap = |expected: Option<&str>, new: &str| {
        let digest = expected.map(|e| sha256(e.as_bytes()));
        store.swap_credential("alice", "github", "oauth", digest.as_ref(), &Secret::new(new)).unwrap()
    };
    let value = || store.credential_secrets(Some("alice")).unwrap().pop().map(|c| c.secret.expose().to_owned());
    assert!(!swap(Some("v0"), "v1"), "nothing stored: a swap from a value writes nothing");
    assert_eq!(value(), None);
    assert!(swap(None, "v1"), "from none");
    assert!(!swap(None, "v1b"), "one exists now: a second swap from none loses");
    assert!(!swap(Some("v0"), "v2"), "from another value");
    assert_eq!(value().as_deref(), Some("v1"));
    assert!(swap(Some("v1"), "v2"));
    assert_eq!(value().as_deref(), Some("v2"));
    // A deleted credential is not written back by a swap that started before the delete.
    store.delete_credential("alice", "github", "oauth").unwrap();
    assert!(!swap(Some("v2"), "v3"));
    assert_eq!(value(), None);
    let missing = store.swap_credential("bob", "github", "oauth", None, &Secret::new("v1"));
    assert!(matches!(missing, Err(StoreError::NotFound { what: "user", .. })), "{missing:?}");
    let empty = store.swap_credential("alice", "github", "oauth", None, &Secret::new(""));
    assert!(matches!(empty, Err(StoreError::Invalid { field: "secret", .. })), "{empty:?}");
    let keyless = f.open_with(None).unwrap();
    assert!(matches!(
        keyless.swap_credential("alice", "github", "oauth", None, &Secret::new("v1")),
        Err(StoreError::NoMasterKey)
    ));
}

fn replicas_swapping_one_credential_from_the_same_value_win_once(b: Backend) {
    const REPLICAS: usize = 8;
    const ROUNDS: usize = 10;
    let f = Fixture::new(b);
    f.open().create_user("alice", UserLimit::Default).unwrap();
    let barrier = Arc::new(std::sync::Barrier::new(REPLICAS));
    let threads: Vec<_> = (0..REPLICAS)
        .map(|r| {
            let store = f.open();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                // Round 0 swaps from none (two first connects), the others from the previous winner's value.
                let mut wins = Vec::new();
                for round in 0..ROUNDS {
                    barrier.wait();
                    let current = store.credential_secrets(Some("alice")).unwrap().pop();
                    let expected = current.map(|c| sha256(c.secret.expose().as_bytes()));
                    barrier.wait();
                    let new = Secret::new(format!("round{round}-replica{r}"));
                    wins.push(store.swap_credential("alice", "github", "oauth", expected.as_ref(), &new).unwrap());
                }
                wins
            })
        })
        .collect();
    let won: Vec<Vec<bool>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut last = 0;
    for round in 0..ROUNDS {
        let winners: Vec<usize> = won.iter().enumerate().filter(|(_, w)| w[round]).map(|(r, _)| r).collect();
        assert_eq!(winners.len(), 1, "round {round}: swapped by {winners:?}");
        last = winners[0];
    }
    let stored = f.open().credential_secrets(Some("alice")).unwrap().pop().unwrap();
    assert_eq!(stored.secret.expose(), format!("round{}-replica{last}", ROUNDS - 1));
}

fn a_swap_racing_a_delete_never_brings_the_credential_back(b: Backend) {
    let f = Fixture::new(b);
    f.open().create_user("alice", UserLimit::Default).unwrap();
    let (swapper, deleter) = (f.open(), f.open());
    let v0 = Secret::new("v0");
    for round in 0..30 {
        swapper.put_credential("alice", "github", "oauth", &v0).unwrap();
        let barrier = std::sync::Barrier::new(2);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                barrier.wait();
                let digest = sha256(b"v0");
                swapper.swap_credential("alice", "github", "oauth", Some(&digest), &Secret::new("v1")).unwrap();
            });
            scope.spawn(|| {
                barrier.wait();
                deleter.delete_credential("alice", "github", "oauth").unwrap();
            });
        });
        // Whichever went first, the delete is the last word: a refresh never undoes a disconnect.
        assert!(swapper.credential_secrets(Some("alice")).unwrap().is_empty(), "round {round}: brought back");
    }
    if b == Backend::Postgres {
        // The narrow case, made wide: the delete is in flight (uncommitted) when the swap reads.
        swapper.put_credential("alice", "github", "oauth", &v0).unwrap();
        let mut deleting = connect(&f.pg().config);
        let mut tx = deleting.transaction().unwrap();
        tx.execute("DELETE FROM credentials WHERE user_id = 'alice' AND credential_id = 'oauth'", &[]).unwrap();
        std::thread::scope(|scope| {
            let swap = scope.spawn(|| {
                let digest = sha256(b"v0");
                swapper.swap_credential("alice", "github", "oauth", Some(&digest), &Secret::new("v1")).unwrap()
            });
            // Until the swap waits on the delete's lock.
            while f.count("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'") == 0 {
                std::thread::yield_now();
            }
            tx.commit().unwrap();
            assert!(!swap.join().unwrap(), "the swap saw the delete");
        });
        assert!(swapper.credential_secrets(Some("alice")).unwrap().is_empty(), "brought back after the delete");
    }
}

fn a_version_2_store_upgrades_to_the_oauth_tables(b: Backend) {
    let f = Fixture::new(b);
    // A store as the previous release left it: migrations 1 and 2, with a user and a key.
    let applied = match b {
        Backend::Sqlite => {
            std::fs::create_dir_all(f.path.parent().unwrap()).unwrap();
            let raw = f.raw();
            for script in &MIGRATIONS[..2] {
                raw.execute_batch(script).unwrap();
            }
            raw.pragma_update(None, "user_version", 2).unwrap();
            "PRAGMA user_version"
        }
        Backend::Postgres => {
            let mut raw = connect(&f.pg().config);
            for script in &mcp_tenant_proxy::store::postgres::MIGRATIONS[..2] {
                raw.batch_execute(script).unwrap();
            }
            raw.batch_execute(
                "CREATE TABLE mcp_schema_migrations (
                     version    INTEGER PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 );
                 INSERT INTO mcp_schema_migrations (version) VALUES (1), (2);",
            )
            .unwrap();
            "SELECT max(version)::int8 FROM mcp_schema_migrations"
        }
    };
    f.exec(&format!(
        "INSERT INTO users (id, created_at) VALUES ('alice', {T0});
         INSERT INTO api_keys (id, sha256, kind, user_id, prefix, created_at, user_token)
         VALUES ('k1', {}, 'standard', 'alice', 'mtp_0000', {T0}, 'required');",
        match b {
            Backend::Sqlite => format!("X'{}'", "ab".repeat(32)),
            Backend::Postgres => format!("'\\x{}'", "ab".repeat(32)),
        }
    ));
    assert_eq!(f.count(applied), 2);

    let store = f.open();
    assert_eq!(f.count(applied), 3);
    assert_eq!(store.get_user("alice").unwrap().id, "alice", "rows survive the upgrade");
    assert_eq!(store.list_keys(Some("alice")).unwrap()[0].user_token, Some(TokenMode::Required));
    assert!(store.use_once(&[7; 32], T0 + 60).unwrap());
    assert!(!store.use_once(&[7; 32], T0 + 60).unwrap());
    assert!(store.take_lease("alice", "github", "replica-1", 60).unwrap());
    assert!(!store.take_lease("alice", "github", "replica-2", 60).unwrap());
    // The new tables' constraints hold.
    match b {
        Backend::Sqlite => {
            assert!(f.raw().execute("INSERT INTO oauth_once (nonce, expires_at) VALUES (X'00', 0)", []).is_err());
        }
        Backend::Postgres => {
            let short = connect(&f.pg().config).batch_execute("INSERT INTO oauth_once VALUES ('\\x00', 0)");
            assert!(short.is_err(), "a nonce of 1 byte");
        }
    }
}
