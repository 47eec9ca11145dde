//! The embedded store: one SQLite file (bundled SQLite, nothing to install).
//!
//! Durability: WAL with `synchronous=FULL`, so a write is on disk (the WAL is fsynced at commit) before
//! the call returns; a crash or power loss loses no acknowledged write. Every write that touches more
//! than one row runs in one `BEGIN IMMEDIATE` transaction (the write lock is taken up front, so two
//! writers never deadlock on a lock upgrade; a waiting writer retries for up to 10 s).
//!
//! Schema changes are [`MIGRATIONS`]: ordered SQL scripts, each applied in its own transaction, with the
//! number applied kept in `PRAGMA user_version`. A file written by a newer release is refused.
//!
//! Credentials are stored as AES-256-GCM ciphertexts ([`super::crypto`]); the `master_keys` table holds
//! one check value per key version (never the key), so opening with the wrong key fails at once.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::Type;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior, params};

use super::crypto::{MasterKey, RowAad};
use super::model::*;
use super::{KeyKind, TokenMode, check_upstream_name, check_user_id};
use crate::policy::ratelimit::Limit;
use crate::secret::{Secret, sha256};

/// The time source: Unix seconds. Tests pass a fake one to move past expiries.
pub type Clock = Arc<dyn Fn() -> UnixTime + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64))
}

/// Schema migrations, in order; `PRAGMA user_version` counts those applied. Append only: never edit
/// a released entry.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE master_keys (
    version     INTEGER PRIMARY KEY NOT NULL,
    check_value BLOB NOT NULL UNIQUE CHECK (length(check_value) = 32),
    created_at  INTEGER NOT NULL,
    retired_at  INTEGER
);
CREATE TABLE users (
    id           TEXT PRIMARY KEY NOT NULL,
    rl_unlimited INTEGER NOT NULL DEFAULT 0 CHECK (rl_unlimited IN (0, 1)),
    rl_requests  INTEGER CHECK (rl_requests > 0),
    rl_per_ms    INTEGER CHECK (rl_per_ms > 0),
    rl_burst     INTEGER CHECK (rl_burst > 0),
    created_at   INTEGER NOT NULL,
    CHECK ((rl_requests IS NULL) = (rl_per_ms IS NULL) AND (rl_requests IS NULL) = (rl_burst IS NULL)),
    CHECK (NOT (rl_unlimited = 1 AND rl_requests IS NOT NULL))
);
CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY NOT NULL,
    sha256       BLOB NOT NULL UNIQUE CHECK (length(sha256) = 32),
    kind         TEXT NOT NULL CHECK (kind IN ('standard', 'enterprise')),
    user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    act_as       TEXT NOT NULL DEFAULT '[]',
    prefix       TEXT NOT NULL,
    expires_at   INTEGER,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
);
CREATE INDEX api_keys_user ON api_keys(user_id);
CREATE TABLE credentials (
    user_id       TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    upstream      TEXT NOT NULL,
    credential_id TEXT NOT NULL,
    nonce         BLOB NOT NULL CHECK (length(nonce) = 12),
    ciphertext    BLOB NOT NULL,
    key_version   INTEGER NOT NULL REFERENCES master_keys(version),
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (user_id, upstream, credential_id)
);
CREATE TABLE token_urls (
    sha256     BLOB PRIMARY KEY NOT NULL CHECK (length(sha256) = 32),
    id         TEXT NOT NULL UNIQUE,
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    upstream   TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX token_urls_user ON token_urls(user_id);
CREATE TABLE usage (
    user_id   TEXT NOT NULL,
    upstream  TEXT NOT NULL,
    requests  INTEGER NOT NULL DEFAULT 0,
    denials   INTEGER NOT NULL DEFAULT 0,
    last_seen INTEGER NOT NULL,
    PRIMARY KEY (user_id, upstream)
);
"#,
    r#"
-- Whether the key's requests prove their user with a user token; NULL: [identity.user_token] mode.
ALTER TABLE api_keys ADD COLUMN user_token TEXT CHECK (user_token IN ('required', 'allowed', 'ignored'));
"#,
    r#"
-- OAuth: nonces of connect links and flow states already used, kept until they expire (then pruned).
CREATE TABLE oauth_once (
    nonce      BLOB PRIMARY KEY NOT NULL CHECK (length(nonce) = 32),
    expires_at INTEGER NOT NULL
);
CREATE INDEX oauth_once_expires ON oauth_once(expires_at);
-- OAuth: which replica may spend (user, upstream)'s rotating refresh token, until when. No foreign
-- key: config-file users have OAuth tokens too, and a lease expires by itself.
CREATE TABLE oauth_leases (
    user_id  TEXT NOT NULL,
    upstream TEXT NOT NULL,
    holder   TEXT NOT NULL,
    until    INTEGER NOT NULL,
    PRIMARY KEY (user_id, upstream)
);
"#,
];

const USER_COLS: &str = "id, rl_unlimited, rl_requests, rl_per_ms, rl_burst, created_at";
const KEY_COLS: &str =
    "id, kind, user_id, act_as, prefix, expires_at, created_at, last_used_at, revoked_at, user_token";
const TOKEN_COLS: &str = "id, user_id, upstream, expires_at, created_at, revoked_at";
const CRED_COLS: &str = "user_id, upstream, credential_id, key_version, created_at, updated_at";

/// The SQLite [`Store`].
pub struct SqliteStore {
    path: PathBuf,
    clock: Clock,
    inner: Mutex<Inner>,
}

struct Inner {
    conn: Connection,
    /// The master key and its version in this file.
    key: Option<(u32, MasterKey)>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// `put_credential`, or with `expected`, `swap_credential` (`None` back: the value was another).
    fn write_credential(
        &self,
        user: &str,
        upstream: &str,
        credential_id: &str,
        expected: Option<Option<&[u8; 32]>>,
        secret: &Secret,
    ) -> StoreResult<Option<PutOutcome>> {
        check_user("user", user)?;
        check_upstream(upstream)?;
        check_name("credential_id", credential_id)?;
        if secret.expose().is_empty() {
            return Err(StoreError::invalid("secret", "empty"));
        }
        let now = self.now();
        let mut inner = self.lock();
        let Inner { conn, key } = &mut *inner;
        let Some((version, key)) = key.as_ref() else { return Err(StoreError::NoMasterKey) };
        // IMMEDIATE: the write lock from the first read on, so no other process writes in between.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another process may have rotated the key since this one opened the file.
        if current_version(&tx)? != Some(*version) {
            return Err(StoreError::RetiredMasterKey { version: *version });
        }
        require_user(&tx, user)?;
        let aad = RowAad { user, upstream, credential_id };
        let current = tx
            .query_row(
                "SELECT key_version, nonce, ciphertext FROM credentials
                 WHERE user_id = ?1 AND upstream = ?2 AND credential_id = ?3",
                [user, upstream, credential_id],
                |r| Ok((r.get::<_, u32>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, Vec<u8>>(2)?)),
            )
            .optional()?;
        if let Some(expected) = expected {
            let digest = match &current {
                None => None,
                Some((row_version, nonce, ciphertext)) => Some(
                    (row_version == version)
                        .then(|| key.decrypt(&aad, nonce, ciphertext))
                        .flatten()
                        .map(|plain| sha256(&plain))
                        .ok_or_else(|| StoreError::Undecryptable {
                            user: user.into(),
                            upstream: upstream.into(),
                            credential_id: credential_id.into(),
                        })?,
                ),
            };
            if digest.as_ref() != expected {
                return Ok(None);
            }
        }
        let (nonce, ciphertext) = key.encrypt(&aad, secret.expose().as_bytes());
        tx.execute(
            "INSERT INTO credentials
                 (user_id, upstream, credential_id, nonce, ciphertext, key_version, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)
             ON CONFLICT (user_id, upstream, credential_id) DO UPDATE SET
                 nonce = excluded.nonce, ciphertext = excluded.ciphertext,
                 key_version = excluded.key_version, updated_at = excluded.updated_at",
            params![user, upstream, credential_id, nonce, ciphertext, version, now],
        )?;
        tx.commit()?;
        Ok(Some(if current.is_some() { PutOutcome::Updated } else { PutOutcome::Created }))
    }

    /// Opens (creating it, and its directory, on first use) the store file. Without a master key every
    /// operation except those on credentials works; with one, the key must be the file's current key
    /// (the first key given to a file becomes version 1).
    pub fn open(path: &Path, master_key: Option<&Secret>) -> StoreResult<SqliteStore> {
        SqliteStore::open_with_clock(path, master_key, system_clock())
    }

    pub fn open_with_clock(path: &Path, master_key: Option<&Secret>, clock: Clock) -> StoreResult<SqliteStore> {
        let key = master_key.map(MasterKey::parse).transpose()?;
        let io = |source| StoreError::Io { path: path.display().to_string(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let fresh = !path.exists();
        let mut conn = Connection::open(path)?;
        #[cfg(unix)]
        if fresh {
            // Hashes and ciphertexts only, but still nobody else's business. SQLite gives the -wal and
            // -shm files the database file's mode.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        #[cfg(not(unix))]
        let _ = fresh;
        conn.busy_timeout(Duration::from_secs(10))?;
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::invalid("path", format!("the file cannot use WAL (journal mode {mode})")));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        let now = clock();
        let key = match key {
            Some(key) => Some((register_key(&mut conn, &key, now)?, key)),
            None => None,
        };
        Ok(SqliteStore { path: path.to_owned(), clock, inner: Mutex::new(Inner { conn, key }) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current master key version, if a key is set.
    pub fn key_version(&self) -> Option<u32> {
        self.lock().key.as_ref().map(|(v, _)| *v)
    }

    /// Copies the WAL into the database file and truncates the WAL (backups, tests).
    pub fn checkpoint(&self) -> StoreResult<()> {
        let inner = self.lock();
        let busy: i64 = inner.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy != 0 {
            return Err(StoreError::invalid("checkpoint", "another connection is reading; try again"));
        }
        Ok(())
    }

    /// `PRAGMA integrity_check`: "ok" for a sound file.
    pub fn integrity_check(&self) -> StoreResult<String> {
        let inner = self.lock();
        let mut stmt = inner.conn.prepare("PRAGMA integrity_check")?;
        let lines = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
        Ok(lines.join("\n"))
    }

    /// Every row of every table in one read transaction, ciphertexts and hashes as stored, each table
    /// in primary-key order (`store migrate`).
    pub fn export_rows(&self) -> StoreResult<RawRows> {
        let mut inner = self.lock();
        let tx = inner.conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let mut rows = RawRows::default();
        {
            let mut stmt =
                tx.prepare("SELECT version, check_value, created_at, retired_at FROM master_keys ORDER BY version")?;
            rows.master_keys = stmt
                .query_map([], |r| {
                    Ok(RawMasterKey {
                        version: r.get(0)?,
                        check_value: r.get(1)?,
                        created_at: r.get(2)?,
                        retired_at: r.get(3)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let mut stmt = tx.prepare(&format!("SELECT {USER_COLS} FROM users ORDER BY id"))?;
            rows.users = stmt.query_map([], user_from_row)?.collect::<Result<_, _>>()?;
            let mut stmt = tx.prepare(&format!("SELECT {KEY_COLS}, sha256 FROM api_keys ORDER BY id"))?;
            rows.keys = stmt.query_map([], |r| Ok((key_from_row(r)?, r.get(10)?)))?.collect::<Result<_, _>>()?;
            let mut stmt = tx.prepare(
                "SELECT user_id, upstream, credential_id, nonce, ciphertext, key_version, created_at, updated_at
                 FROM credentials ORDER BY user_id, upstream, credential_id",
            )?;
            rows.credentials = stmt
                .query_map([], |r| {
                    Ok(RawCredential {
                        user: r.get(0)?,
                        upstream: r.get(1)?,
                        credential_id: r.get(2)?,
                        nonce: r.get(3)?,
                        ciphertext: r.get(4)?,
                        key_version: r.get(5)?,
                        created_at: r.get(6)?,
                        updated_at: r.get(7)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let mut stmt = tx.prepare(&format!("SELECT {TOKEN_COLS}, sha256 FROM token_urls ORDER BY id"))?;
            rows.tokens = stmt.query_map([], |r| Ok((token_from_row(r)?, r.get(6)?)))?.collect::<Result<_, _>>()?;
            let mut stmt = tx.prepare(
                "SELECT user_id, upstream, requests, denials, last_seen FROM usage ORDER BY user_id, upstream",
            )?;
            rows.usage = stmt
                .query_map([], |r| {
                    Ok(Usage {
                        user: r.get(0)?,
                        upstream: r.get(1)?,
                        requests: count(r.get(2)?),
                        denials: count(r.get(3)?),
                        last_seen: r.get(4)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
        }
        tx.commit()?;
        Ok(rows)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock rolled its transaction back (dropping a `Transaction` does).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> UnixTime {
        (self.clock)()
    }
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let known = MIGRATIONS.len() as u32;
    loop {
        let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > known {
            return Err(StoreError::SchemaTooNew { found: version, known });
        }
        if version == known {
            return Ok(());
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another process may have migrated while this one waited for the lock.
        let current: u32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if current == version {
            tx.execute_batch(MIGRATIONS[version as usize])?;
            tx.pragma_update(None, "user_version", version + 1)?;
            tx.commit()?;
        }
    }
}

/// Finds the version of `key` in this file, or makes it version 1 of a file that has no key yet.
fn register_key(conn: &mut Connection, key: &MasterKey, now: UnixTime) -> StoreResult<u32> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let known = key_versions(&tx)?;
    if let Some(&(version, _, retired)) = known.iter().find(|(_, check, _)| *check == key.check_value()) {
        return match retired {
            Some(_) => Err(StoreError::RetiredMasterKey { version }),
            None => Ok(version),
        };
    }
    if !known.is_empty() {
        return Err(StoreError::WrongMasterKey);
    }
    tx.execute(
        "INSERT INTO master_keys (version, check_value, created_at) VALUES (1, ?1, ?2)",
        params![key.check_value(), now],
    )?;
    tx.commit()?;
    Ok(1)
}

/// (version, check value, retired_at) of a master key this file has seen.
type KeyRow = (u32, [u8; 32], Option<UnixTime>);

/// Every master key this file has seen, oldest first.
fn key_versions(conn: &Connection) -> StoreResult<Vec<KeyRow>> {
    let mut stmt = conn.prepare("SELECT version, check_value, retired_at FROM master_keys ORDER BY version")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
}

fn conversion(col: usize, ty: Type, why: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, ty, why.to_owned().into())
}

pub(super) fn check_user(field: &'static str, id: &str) -> StoreResult<()> {
    check_user_id(id, MAX_USER_ID_LEN).map_err(|why| StoreError::invalid(field, why))
}

pub(super) fn check_upstream(name: &str) -> StoreResult<()> {
    check_upstream_name(name).map_err(|why| StoreError::invalid("upstream", why))
}

pub(super) fn check_name(field: &'static str, name: &str) -> StoreResult<()> {
    check_user_id(name, MAX_NAME_LEN).map_err(|why| StoreError::invalid(field, why))
}

/// `cond` when the optional parameter `?n` is given, else a condition that holds. SQLite plans
/// `?1 IS NULL OR user_id = ?1` as a scan of the whole table even when `?1` is bound, so the one-user
/// and all-users cases get SQL of their own (and the one-user case its index). (PostgreSQL plans an
/// unnamed statement with its parameters' values and needs no such help.)
fn only_if(given: bool, cond: &str, n: u8) -> String {
    if given { cond.to_owned() } else { format!("?{n} IS NULL") }
}

pub(super) fn random_id(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(rand::random::<[u8; 8]>()))
}

fn user_exists(conn: &Connection, id: &str) -> StoreResult<bool> {
    Ok(conn.query_row("SELECT 1 FROM users WHERE id = ?1", [id], |_| Ok(())).optional()?.is_some())
}

fn require_user(conn: &Connection, id: &str) -> StoreResult<()> {
    if user_exists(conn, id)? { Ok(()) } else { Err(StoreError::not_found("user", id)) }
}

/// The (rl_unlimited, rl_requests, rl_per_ms, rl_burst) columns of a user.
pub(super) type LimitColumns = (bool, Option<i64>, Option<i64>, Option<i64>);

pub(super) fn limit_columns(limit: UserLimit) -> StoreResult<LimitColumns> {
    Ok(match limit {
        UserLimit::Default => (false, None, None, None),
        UserLimit::Unlimited => (true, None, None, None),
        UserLimit::Quota(l) => {
            if l.per.subsec_nanos() % 1_000_000 != 0 || l.per.is_zero() {
                return Err(StoreError::invalid("rate_limit.per", "must be a whole number of milliseconds"));
            }
            if let Err(why) = Limit::new(l.requests, l.per, Some(l.burst)) {
                return Err(StoreError::invalid("rate_limit", why));
            }
            let per_ms =
                i64::try_from(l.per.as_millis()).map_err(|_| StoreError::invalid("rate_limit.per", "too long"))?;
            (false, Some(l.requests.get().into()), Some(per_ms), Some(l.burst.get().into()))
        }
    })
}

fn positive(r: &Row<'_>, col: usize) -> rusqlite::Result<Option<NonZeroU32>> {
    match r.get::<_, Option<i64>>(col)? {
        None => Ok(None),
        Some(v) => u32::try_from(v)
            .ok()
            .and_then(NonZeroU32::new)
            .map(Some)
            .ok_or_else(|| conversion(col, Type::Integer, "not a positive 32-bit count")),
    }
}

fn user_from_row(r: &Row<'_>) -> rusqlite::Result<User> {
    let unlimited: bool = r.get(1)?;
    let per_ms: Option<i64> = r.get(3)?;
    let rate_limit = match (unlimited, positive(r, 2)?, per_ms, positive(r, 4)?) {
        (true, None, None, None) => UserLimit::Unlimited,
        (false, None, None, None) => UserLimit::Default,
        (false, Some(requests), Some(per_ms), Some(burst)) if per_ms > 0 => {
            let per = Duration::from_millis(per_ms as u64);
            UserLimit::Quota(Limit::new(requests, per, Some(burst)).map_err(|why| conversion(3, Type::Integer, why))?)
        }
        _ => return Err(conversion(1, Type::Integer, "inconsistent rate-limit columns")),
    };
    Ok(User { id: r.get(0)?, rate_limit, created_at: r.get(5)? })
}

pub(super) fn kind_from_str(col: usize, kind: &str) -> rusqlite::Result<KeyKind> {
    match kind {
        "standard" => Ok(KeyKind::Standard),
        "enterprise" => Ok(KeyKind::Enterprise),
        _ => Err(conversion(col, Type::Text, "unknown key kind")),
    }
}

fn act_as_from_json(col: usize, json: &str) -> rusqlite::Result<Vec<String>> {
    serde_json::from_str(json).map_err(|_| conversion(col, Type::Text, "act_as is not a JSON list of strings"))
}

fn key_from_row(r: &Row<'_>) -> rusqlite::Result<KeyInfo> {
    Ok(KeyInfo {
        id: r.get(0)?,
        kind: kind_from_str(1, &r.get::<_, String>(1)?)?,
        user: r.get(2)?,
        act_as: act_as_from_json(3, &r.get::<_, String>(3)?)?,
        prefix: r.get(4)?,
        expires_at: r.get(5)?,
        created_at: r.get(6)?,
        last_used_at: r.get(7)?,
        revoked_at: r.get(8)?,
        user_token: token_mode_from_str(9, r.get::<_, Option<String>>(9)?)?,
    })
}

fn token_mode_from_str(col: usize, mode: Option<String>) -> rusqlite::Result<Option<TokenMode>> {
    mode.map(|m| TokenMode::parse(&m).map_err(|_| conversion(col, Type::Text, "unknown user_token mode"))).transpose()
}

fn token_from_row(r: &Row<'_>) -> rusqlite::Result<TokenInfo> {
    Ok(TokenInfo {
        id: r.get(0)?,
        user: r.get(1)?,
        upstream: r.get(2)?,
        expires_at: r.get(3)?,
        created_at: r.get(4)?,
        revoked_at: r.get(5)?,
    })
}

fn credential_from_row(r: &Row<'_>) -> rusqlite::Result<CredentialInfo> {
    Ok(CredentialInfo {
        user: r.get(0)?,
        upstream: r.get(1)?,
        credential_id: r.get(2)?,
        key_version: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
    })
}

pub(super) fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Decrypts the credentials (all, or one user's) with the key of version `version`.
fn decrypt_credentials(
    conn: &Connection,
    version: u32,
    key: &MasterKey,
    user: Option<&str>,
) -> StoreResult<Vec<CredentialSecret>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT user_id, upstream, credential_id, key_version, nonce, ciphertext FROM credentials
         WHERE {} ORDER BY user_id, upstream, credential_id",
        only_if(user.is_some(), "user_id = ?1", 1)
    ))?;
    let rows = stmt.query_map([user], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, u32>(3)?,
            r.get::<_, Vec<u8>>(4)?,
            r.get::<_, Vec<u8>>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (user, upstream, credential_id, row_version, nonce, ciphertext) = row?;
        let aad = RowAad { user: &user, upstream: &upstream, credential_id: &credential_id };
        let plain = (row_version == version)
            .then(|| key.decrypt(&aad, &nonce, &ciphertext))
            .flatten()
            .and_then(|bytes| String::from_utf8(bytes).ok());
        let Some(plain) = plain else {
            return Err(match current_version(conn)? {
                Some(current) if current != version => StoreError::RetiredMasterKey { version },
                _ => StoreError::Undecryptable { user, upstream, credential_id },
            });
        };
        out.push(CredentialSecret { user, upstream, credential_id, secret: Secret::new(plain) });
    }
    Ok(out)
}

/// The version of the file's current master key.
fn current_version(conn: &Connection) -> StoreResult<Option<u32>> {
    Ok(conn
        .query_row("SELECT version FROM master_keys WHERE retired_at IS NULL ORDER BY version DESC LIMIT 1", [], |r| {
            r.get(0)
        })
        .optional()?)
}

impl Store for SqliteStore {
    fn create_user(&self, id: &str, rate_limit: UserLimit) -> StoreResult<User> {
        check_user("id", id)?;
        let (unlimited, requests, per_ms, burst) = limit_columns(rate_limit)?;
        let now = self.now();
        let inner = self.lock();
        match inner.conn.execute(
            "INSERT INTO users (id, rl_unlimited, rl_requests, rl_per_ms, rl_burst, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, unlimited, requests, per_ms, burst, now],
        ) {
            Ok(_) => Ok(User { id: id.to_owned(), rate_limit, created_at: now }),
            Err(e) if is_constraint(&e) => Err(StoreError::Conflict { what: "user", id: id.to_owned() }),
            Err(e) => Err(e.into()),
        }
    }

    fn get_user(&self, id: &str) -> StoreResult<User> {
        check_user("id", id)?;
        let inner = self.lock();
        inner
            .conn
            .query_row(&format!("SELECT {USER_COLS} FROM users WHERE id = ?1"), [id], user_from_row)
            .optional()?
            .ok_or_else(|| StoreError::not_found("user", id))
    }

    fn list_users(&self, after: Option<&str>, limit: u32) -> StoreResult<Vec<User>> {
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(StoreError::invalid("limit", format!("must be 1 to {MAX_PAGE}")));
        }
        if let Some(after) = after {
            check_user("after", after)?;
        }
        let inner = self.lock();
        let mut stmt = inner.conn.prepare(&format!(
            "SELECT {USER_COLS} FROM users WHERE {} ORDER BY id LIMIT ?2",
            only_if(after.is_some(), "id > ?1", 1)
        ))?;
        let users = stmt.query_map(params![after, limit], user_from_row)?.collect::<Result<_, _>>()?;
        Ok(users)
    }

    fn set_user_limit(&self, id: &str, rate_limit: UserLimit) -> StoreResult<User> {
        check_user("id", id)?;
        let (unlimited, requests, per_ms, burst) = limit_columns(rate_limit)?;
        let mut inner = self.lock();
        let tx = inner.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE users SET rl_unlimited = ?2, rl_requests = ?3, rl_per_ms = ?4, rl_burst = ?5 WHERE id = ?1",
            params![id, unlimited, requests, per_ms, burst],
        )?;
        if changed == 0 {
            return Err(StoreError::not_found("user", id));
        }
        let user = tx.query_row(&format!("SELECT {USER_COLS} FROM users WHERE id = ?1"), [id], user_from_row)?;
        tx.commit()?;
        Ok(user)
    }

    fn delete_user(&self, id: &str) -> StoreResult<()> {
        check_user("id", id)?;
        let mut inner = self.lock();
        let tx = inner.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Keys, token URLs and credentials go by ON DELETE CASCADE; usage has no foreign key (config
        // users have counters too), so it goes here.
        if tx.execute("DELETE FROM users WHERE id = ?1", [id])? == 0 {
            return Err(StoreError::not_found("user", id));
        }
        tx.execute("DELETE FROM usage WHERE user_id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    fn create_key(&self, new: NewKey) -> StoreResult<CreatedKey> {
        check_user("user", &new.user)?;
        let id = match new.id {
            Some(id) => {
                check_name("id", &id)?;
                id
            }
            None => random_id("k_"),
        };
        match new.kind {
            KeyKind::Standard if !new.act_as.is_empty() => {
                return Err(StoreError::invalid(
                    "act_as",
                    "standard keys act as their own user only; use an enterprise key",
                ));
            }
            _ => {}
        }
        for pattern in &new.act_as {
            let literal = pattern.strip_suffix('*').unwrap_or(pattern);
            if pattern != "*" && check_user_id(literal, MAX_USER_ID_LEN).is_err() {
                return Err(StoreError::invalid(
                    "act_as",
                    format!("{pattern:?}: use *, a user id, or a prefix ending in *"),
                ));
            }
        }
        let now = self.now();
        if let Some(expires_at) = new.expires_at
            && expires_at <= now
        {
            return Err(StoreError::invalid("expires_at", "must be in the future"));
        }
        let key = format!("mtp_{}", hex::encode(rand::random::<[u8; 32]>()));
        let info = KeyInfo {
            id,
            kind: new.kind,
            user: new.user,
            act_as: new.act_as,
            prefix: key[..8].to_owned(),
            expires_at: new.expires_at,
            created_at: now,
            last_used_at: None,
            revoked_at: None,
            user_token: new.user_token,
        };
        let act_as = serde_json::to_string(&info.act_as).expect("a list of strings serializes");
        let mut inner = self.lock();
        let tx = inner.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        require_user(&tx, &info.user)?;
        match tx.execute(
            "INSERT INTO api_keys (id, sha256, kind, user_id, act_as, prefix, expires_at, created_at, user_token)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                info.id,
                sha256(key.as_bytes()),
                info.kind.as_str(),
                info.user,
                act_as,
                info.prefix,
                info.expires_at,
                now,
                info.user_token.map(TokenMode::as_str)
            ],
        ) {
            Ok(_) => {}
            Err(e) if is_constraint(&e) => return Err(StoreError::Conflict { what: "key", id: info.id }),
            Err(e) => return Err(e.into()),
        }
        tx.commit()?;
        Ok(CreatedKey { key: Secret::new(key), info })
    }

    fn list_keys(&self, user: Option<&str>) -> StoreResult<Vec<KeyInfo>> {
        let inner = self.lock();
        if let Some(user) = user {
            check_user("user", user)?;
            require_user(&inner.conn, user)?;
        }
        let mut stmt = inner.conn.prepare(&format!(
            "SELECT {KEY_COLS} FROM api_keys WHERE {} ORDER BY id",
            only_if(user.is_some(), "user_id = ?1", 1)
        ))?;
        let keys = stmt.query_map([user], key_from_row)?.collect::<Result<_, _>>()?;
        Ok(keys)
    }

    fn revoke_key(&self, id: &str) -> StoreResult<KeyInfo> {
        check_name("id", id)?;
        let now = self.now();
        let mut inner = self.lock();
        let tx = inner.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if tx.execute("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1", params![id, now])? == 0
        {
            return Err(StoreError::not_found("key", id));
        }
        let key = tx.query_row(&format!("SELECT {KEY_COLS} FROM api_keys WHERE id = ?1"), [id], key_from_row)?;
        tx.commit()?;
        Ok(key)
    }

    fn touch_keys(&self, used: &[(String, UnixTime)]) -> StoreResult<()> {
        let mut inner = self.lock();
        let tx = inner.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt =
                tx.prepare("UPDATE api_keys SET last_used_at = max(COALESCE(last_used_at, ?2), ?2) WHERE id = ?1")?;
            for (id, at) in used {
                stmt.execute(params![id, at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn put_credential(
        &self,
        user: &str,
        upstream: &str,
        credential_id: &str,
        secret: &Secret,
    ) -> StoreResult<PutOutcome> {
        self.write_credential(user, upstream, credential_id, None, secret).map(|put| put.expect("unconditional"))
    }

    fn swap_credential(
        &self,
        user: &str,
        upstream: &str,
        credential_id: &str,
        expected: Option<&[u8; 32]>,
        secret: &Secret,
    ) -> StoreResult<bool> {
        self.write_credential(user, upstream, credential_id, Some(expected), secret).map(|put| put.is_some())
    }

    fn delete_credential(&self, user: &str, upstream: &str, credential_id: &str) -> StoreResult<()> {
        check_user("user", user)?;
        check_upstream(upstream)?;
        check_name("credential_id", credential_id)?;
        let inner = self.lock();
        let deleted = inner.conn.execute(
            "DELETE FROM credentials WHERE user_id = ?1 AND upstream = ?2 AND credential_id = ?3",
            [user, upstream, credential_id],
        )?;
        if deleted == 0 {
            return Err(StoreError::not_found("credential", &format!("{user}/{upstream}/{credential_id}")));
        }
        Ok(())
    }

    fn list_credentials(&self, user: &str) -> StoreResult<Vec<CredentialInfo>> {
        check_user("user", user)?;
        let inner = self.lock();
        require_user(&inner.conn, user)?;
        let mut stmt = inner.conn.prepare(&format!(
            "SELECT {CRED_COLS} FROM credentials WHERE user_id = ?1 ORDER BY upstream, credential_id"
        ))?;
        let creds = stmt.query_map([user], credential_from_row)?.collect::<Result<_, _>>()?;
        Ok(creds)
    }

    fn credential_secrets(&self, user: Option<&str>) -> StoreResult<Vec<CredentialSecret>> {
        if let Some(user) = user {
            check_user("user", user)?;
        }
        let inner = self.lock();
        let Some((version, key)) = inner.key.as_ref() else { return Err(StoreError::NoMasterKey) };
        decrypt_credentials(&inner.conn, *version, key, user)
    }

    fn rotate_master_key(&self, old: &Secret, new: &Secret) -> StoreResult<u32> {
        let old = MasterKey::parse(old)?;
        let new = MasterKey::parse(new)?;
        if old.check_value() == new.check_value() {
            return Err(StoreError::invalid("new", "is the old key"));
        }
        let now = self.now();
        let mut inner = self.lock();
        let tx = inner.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let known = key_versions(&tx)?;
        let version = match known.iter().find(|(_, check, _)| *check == old.check_value()) {
            Some(&(version, _, None)) => version,
            Some(&(version, _, Some(_))) => return Err(StoreError::RetiredMasterKey { version }),
            None => return Err(StoreError::WrongMasterKey),
        };
        if known.iter().any(|(_, check, _)| *check == new.check_value()) {
            return Err(StoreError::invalid("new", "was a master key of this store before; use a fresh key"));
        }
        let next = version + 1;
        tx.execute("UPDATE master_keys SET retired_at = ?2 WHERE version = ?1", params![version, now])?;
        tx.execute(
            "INSERT INTO master_keys (version, check_value, created_at) VALUES (?1, ?2, ?3)",
            params![next, new.check_value(), now],
        )?;
        let rows = decrypt_credentials(&tx, version, &old, None)?;
        {
            let mut update = tx.prepare(
                "UPDATE credentials SET nonce = ?4, ciphertext = ?5, key_version = ?6
                 WHERE user_id = ?1 AND upstream = ?2 AND credential_id = ?3",
            )?;
            for row in &rows {
                let aad = RowAad { user: &row.user, upstream: &row.upstream, credential_id: &row.credential_id };
                let (nonce, ciphertext) = new.encrypt(&aad, row.secret.expose().as_bytes());
                update.execute(params![row.user, row.upstream, row.credential_id, nonce, ciphertext, next])?;
            }
        }
        tx.commit()?;
        inner.key = Some((next, new));
        Ok(next)
    }

    fn create_token(&self, user: &str, upstream: &str, days: u32) -> StoreResult<CreatedToken> {
        check_user("user", user)?;
        check_upstream(upstream)?;
        if !TOKEN_DAYS.contains(&days) {
            return Err(StoreError::invalid("days", format!("must be {} to {}", TOKEN_DAYS.start(), TOKEN_DAYS.end())));
        }
        let now = self.now();
        let token = format!("mtpt_{}", hex::encode(rand::random::<[u8; 32]>()));
        let info = TokenInfo {
            id: random_id("t_"),
            user: user.to_owned(),
            upstream: upstream.to_owned(),
            expires_at: now + i64::from(days) * 86_400,
            created_at: now,
            revoked_at: None,
        };
        let mut inner = self.lock();
        let tx = inner.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        require_user(&tx, user)?;
        tx.execute(
            "INSERT INTO token_urls (sha256, id, user_id, upstream, expires_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![sha256(token.as_bytes()), info.id, info.user, info.upstream, info.expires_at, now],
        )?;
        tx.commit()?;
        Ok(CreatedToken { token: Secret::new(token), info })
    }

    fn list_tokens(&self, user: Option<&str>) -> StoreResult<Vec<TokenInfo>> {
        let inner = self.lock();
        if let Some(user) = user {
            check_user("user", user)?;
            require_user(&inner.conn, user)?;
        }
        let mut stmt = inner.conn.prepare(&format!(
            "SELECT {TOKEN_COLS} FROM token_urls WHERE {} ORDER BY created_at, id",
            only_if(user.is_some(), "user_id = ?1", 1)
        ))?;
        let tokens = stmt.query_map([user], token_from_row)?.collect::<Result<_, _>>()?;
        Ok(tokens)
    }

    fn revoke_token(&self, id: &str) -> StoreResult<TokenInfo> {
        check_name("id", id)?;
        let now = self.now();
        let mut inner = self.lock();
        let tx = inner.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if tx.execute("UPDATE token_urls SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1", params![id, now])?
            == 0
        {
            return Err(StoreError::not_found("token", id));
        }
        let token =
            tx.query_row(&format!("SELECT {TOKEN_COLS} FROM token_urls WHERE id = ?1"), [id], token_from_row)?;
        tx.commit()?;
        Ok(token)
    }

    fn lookup_token(&self, hash: &[u8; 32]) -> StoreResult<Option<TokenInfo>> {
        let now = self.now();
        let inner = self.lock();
        Ok(inner
            .conn
            .query_row(
                &format!(
                    "SELECT {TOKEN_COLS} FROM token_urls
                     WHERE sha256 = ?1 AND revoked_at IS NULL AND expires_at > ?2"
                ),
                params![hash, now],
                token_from_row,
            )
            .optional()?)
    }

    fn add_usage(&self, deltas: &[UsageDelta]) -> StoreResult<()> {
        // A row the store cannot hold is dropped with a warning: it must not hold back everyone else's.
        let valid = |d: &&UsageDelta| match check_user("user", &d.user).and_then(|()| check_upstream(&d.upstream)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "usage row dropped: the store cannot hold its user or upstream name");
                false
            }
        };
        let deltas: Vec<&UsageDelta> = deltas.iter().filter(valid).collect();
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut inner = self.lock();
        let tx = inner.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO usage (user_id, upstream, requests, denials, last_seen) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (user_id, upstream) DO UPDATE SET
                     requests = requests + excluded.requests, denials = denials + excluded.denials,
                     last_seen = max(last_seen, excluded.last_seen)",
            )?;
            for d in deltas {
                let (requests, denials) = (as_i64(d.requests), as_i64(d.denials));
                stmt.execute(params![d.user, d.upstream, requests, denials, d.last_seen])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn usage(&self, user: Option<&str>) -> StoreResult<Vec<Usage>> {
        if let Some(user) = user {
            check_user("user", user)?;
        }
        let inner = self.lock();
        let mut stmt = inner.conn.prepare(&format!(
            "SELECT user_id, upstream, requests, denials, last_seen FROM usage
             WHERE {} ORDER BY user_id, upstream",
            only_if(user.is_some(), "user_id = ?1", 1)
        ))?;
        let rows = stmt.query_map([user], |r| {
            Ok(Usage {
                user: r.get(0)?,
                upstream: r.get(1)?,
                requests: count(r.get(2)?),
                denials: count(r.get(3)?),
                last_seen: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn import_users(&self, users: &[super::import::ImportUser]) -> StoreResult<Vec<CreatedKey>> {
        let now = self.now();
        let mut inner = self.lock();
        let Inner { conn, key } = &mut *inner;
        let prepared = super::import::prepare(users, key.as_ref().map(|(_, k)| k), now)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version = key.as_ref().map(|(v, _)| *v);
        if !prepared.credentials.is_empty() && current_version(&tx)? != version {
            return Err(StoreError::RetiredMasterKey { version: version.unwrap_or(0) });
        }
        fn conflict<'a>(what: &'static str, id: &'a str) -> impl FnOnce(rusqlite::Error) -> StoreError + 'a {
            move |e| if is_constraint(&e) { StoreError::Conflict { what, id: id.to_owned() } } else { e.into() }
        }
        {
            let mut insert = tx.prepare(
                "INSERT INTO users (id, rl_unlimited, rl_requests, rl_per_ms, rl_burst, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (id, (unlimited, requests, per_ms, burst)) in &prepared.users {
                insert.execute(params![id, unlimited, requests, per_ms, burst, now]).map_err(conflict("user", id))?;
            }
            let mut insert = tx.prepare(
                "INSERT INTO api_keys (id, sha256, kind, user_id, act_as, prefix, expires_at, created_at, user_token)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for k in &prepared.keys {
                let info = &k.created.info;
                insert
                    .execute(params![
                        info.id,
                        k.sha256,
                        info.kind.as_str(),
                        info.user,
                        k.act_as,
                        info.prefix,
                        info.expires_at,
                        now,
                        info.user_token.map(TokenMode::as_str)
                    ])
                    .map_err(conflict("key", &info.id))?;
            }
            let mut insert = tx.prepare(
                "INSERT INTO credentials
                     (user_id, upstream, credential_id, nonce, ciphertext, key_version, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
            )?;
            for c in &prepared.credentials {
                let id = format!("{}/{}/{}", c.user, c.upstream, c.credential_id);
                insert
                    .execute(params![c.user, c.upstream, c.credential_id, c.nonce, c.ciphertext, version, now])
                    .map_err(conflict("credential", &id))?;
            }
        }
        tx.commit()?;
        Ok(prepared.keys.into_iter().map(|k| k.created).collect())
    }

    fn load_snapshot(&self) -> StoreResult<Snapshot> {
        let now = self.now();
        let mut inner = self.lock();
        let Inner { conn, key } = &mut *inner;
        // One read transaction: a consistent view even while other processes write.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let snapshot = read_snapshot(&tx, key.as_ref(), None, now)?;
        tx.commit()?;
        Ok(snapshot)
    }

    fn load_user(&self, id: &str) -> StoreResult<Option<UserSnapshot>> {
        check_user("id", id)?;
        let now = self.now();
        let mut inner = self.lock();
        let Inner { conn, key } = &mut *inner;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let Snapshot { mut users, keys, credentials, tokens, taken_at } =
            read_snapshot(&tx, key.as_ref(), Some(id), now)?;
        tx.commit()?;
        Ok(users.pop().map(|user| UserSnapshot { user, keys, credentials, tokens, taken_at }))
    }

    fn use_once(&self, nonce: &[u8; 32], expires_at: UnixTime) -> StoreResult<bool> {
        let now = self.now();
        let mut inner = self.lock();
        // IMMEDIATE: another process using the same nonce waits for this one's commit.
        let tx = inner.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM oauth_once WHERE expires_at < ?1", [now - ONCE_KEPT_AFTER])?;
        let inserted = tx.execute(
            "INSERT INTO oauth_once (nonce, expires_at) VALUES (?1, ?2) ON CONFLICT (nonce) DO NOTHING",
            params![nonce, expires_at],
        )?;
        tx.commit()?;
        Ok(inserted == 1)
    }

    fn take_lease(&self, user: &str, upstream: &str, holder: &str, seconds: i64) -> StoreResult<bool> {
        check_user("user", user)?;
        check_upstream(upstream)?;
        check_name("holder", holder)?;
        let now = self.now();
        let until = now.saturating_add(seconds);
        let inner = self.lock();
        // One statement: the upsert's WHERE decides, so no other writer gets in between.
        let taken = inner.conn.execute(
            "INSERT INTO oauth_leases (user_id, upstream, holder, until) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (user_id, upstream) DO UPDATE SET holder = excluded.holder, until = excluded.until
             WHERE oauth_leases.until < ?5 OR oauth_leases.holder = excluded.holder",
            params![user, upstream, holder, until, now],
        )?;
        Ok(taken == 1)
    }

    fn drop_lease(&self, user: &str, upstream: &str, holder: &str) -> StoreResult<()> {
        check_user("user", user)?;
        check_upstream(upstream)?;
        check_name("holder", holder)?;
        let inner = self.lock();
        inner.conn.execute(
            "DELETE FROM oauth_leases WHERE user_id = ?1 AND upstream = ?2 AND holder = ?3",
            [user, upstream, holder],
        )?;
        Ok(())
    }

    fn derive_key(&self, label: &str) -> StoreResult<[u8; 32]> {
        let inner = self.lock();
        inner.key.as_ref().map(|(_, key)| key.derive(label)).ok_or(StoreError::NoMasterKey)
    }
}

/// Users with their active keys, active token URLs and decrypted credentials: all, or one user's.
fn read_snapshot(
    conn: &Connection,
    key: Option<&(u32, MasterKey)>,
    user: Option<&str>,
    now: UnixTime,
) -> StoreResult<Snapshot> {
    let users = {
        let mut stmt = conn.prepare(&format!(
            "SELECT {USER_COLS} FROM users WHERE {} ORDER BY id",
            only_if(user.is_some(), "id = ?1", 1)
        ))?;
        stmt.query_map([user], user_from_row)?.collect::<Result<Vec<_>, _>>()?
    };
    let keys = {
        let mut stmt = conn.prepare(&format!(
            "SELECT id, sha256, kind, user_id, act_as, expires_at, user_token FROM api_keys
             WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?1) AND {}
             ORDER BY user_id, id",
            only_if(user.is_some(), "user_id = ?2", 2)
        ))?;
        stmt.query_map(params![now, user], |r| {
            Ok(SnapshotKey {
                id: r.get(0)?,
                sha256: r.get(1)?,
                kind: kind_from_str(2, &r.get::<_, String>(2)?)?,
                user: r.get(3)?,
                act_as: act_as_from_json(4, &r.get::<_, String>(4)?)?,
                expires_at: r.get(5)?,
                user_token: token_mode_from_str(6, r.get(6)?)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?
    };
    let tokens = {
        let mut stmt = conn.prepare(&format!(
            "SELECT id, sha256, user_id, upstream, expires_at FROM token_urls
             WHERE revoked_at IS NULL AND expires_at > ?1 AND {} ORDER BY user_id, id",
            only_if(user.is_some(), "user_id = ?2", 2)
        ))?;
        stmt.query_map(params![now, user], |r| {
            Ok(SnapshotToken {
                id: r.get(0)?,
                sha256: r.get(1)?,
                user: r.get(2)?,
                upstream: r.get(3)?,
                expires_at: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?
    };
    let credentials = match key {
        Some((version, key)) => decrypt_credentials(conn, *version, key, user)?,
        None => {
            let any: bool = conn.query_row(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM credentials WHERE {})",
                    only_if(user.is_some(), "user_id = ?1", 1)
                ),
                [user],
                |r| r.get(0),
            )?;
            if any {
                return Err(StoreError::NoMasterKey);
            }
            Vec::new()
        }
    };
    Ok(Snapshot { users, keys, credentials, tokens, taken_at: now })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_columns_round_trip_through_a_row() {
        let conn = Connection::open_in_memory().unwrap();
        let mut conn = conn;
        migrate(&mut conn).unwrap();
        let quota = Limit {
            requests: NonZeroU32::new(100).unwrap(),
            per: Duration::from_secs(60),
            burst: NonZeroU32::new(10).unwrap(),
        };
        for (i, limit) in [UserLimit::Default, UserLimit::Unlimited, UserLimit::Quota(quota)].into_iter().enumerate() {
            let (unlimited, requests, per_ms, burst) = limit_columns(limit).unwrap();
            let id = format!("u{i}");
            conn.execute(
                "INSERT INTO users (id, rl_unlimited, rl_requests, rl_per_ms, rl_burst, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0)",
                params![id, unlimited, requests, per_ms, burst],
            )
            .unwrap();
            let user = conn.query_row(&format!("SELECT {USER_COLS} FROM users WHERE id = ?1"), [&id], user_from_row);
            assert_eq!(user.unwrap().rate_limit, limit);
        }
        // The CHECK constraints refuse half-set limits written by hand.
        let half = conn.execute("INSERT INTO users (id, rl_requests, created_at) VALUES ('h', 5, 0)", []);
        assert!(half.is_err_and(|e| is_constraint(&e)));
    }

    #[test]
    fn migrations_are_applied_once() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
    }

    #[test]
    fn upstream_names_follow_the_config_rules() {
        for ok in ["github", "my-server_2"] {
            assert!(check_upstream(ok).is_ok(), "{ok}");
        }
        for bad in ["", "git hub", "a/b", "a.b", &"a".repeat(MAX_NAME_LEN + 1)] {
            assert!(check_upstream(bad).is_err(), "{bad:?}");
        }
    }
}
