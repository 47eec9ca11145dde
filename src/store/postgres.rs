//! The shared store: PostgreSQL, for several replicas of the proxy.
//!
//! Client: the synchronous `postgres` crate (a blocking wrapper over `tokio-postgres`) pooled with
//! `r2d2_postgres`, because [`Store`] is a blocking trait (called from `spawn_blocking` and from the
//! offline CLI, which has no runtime); [`watch`] uses `tokio-postgres` itself, the same crate family,
//! for the long-lived `LISTEN` connection. The sync client runs its own small runtime per connection and
//! panics when driven from an async worker thread, so every call that reaches the database runs on a
//! scoped helper thread when it finds itself inside a Tokio runtime (see [`off_runtime`]).
//!
//! Semantics follow [`super::sqlite`]: the same validation and errors, keys and token URLs stored as
//! SHA-256, credentials as AES-256-GCM ciphertexts with the same associated data, one check value per
//! master key version (never the key). Times come from the store's [`Clock`], as in SQLite, OAuth lease
//! and nonce expiries included (not the server's `now()`): one time source per store, and tests move it.
//!
//! Schema changes are [`MIGRATIONS`], append only, applied under an advisory lock in one transaction
//! and recorded in `mcp_schema_migrations`; a database written by a newer release is refused.
//!
//! Propagation: every write that changes what the request path sees runs
//! `pg_notify('mcp_tenant_proxy', <user id>)` in its own transaction (PostgreSQL delivers it on commit
//! only); `*` means "reload everything" (master key rotation, bulk writes). [`watch`] turns those into
//! [`Change`]s.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use postgres::types::Type;
use postgres::{GenericClient, IsolationLevel, NoTls, Row};
use r2d2_postgres::PostgresConnectionManager;

use super::crypto::{MasterKey, RowAad};
use super::health::StoreHealth;
use super::model::*;
use super::sqlite::{
    Clock, check_name, check_upstream, check_user, count, kind_from_str, limit_columns, random_id, system_clock,
};
use super::{KeyKind, TokenMode, check_user_id};
use crate::policy::ratelimit::Limit;
use crate::secret::{Secret, sha256};

/// The channel every replica listens on.
pub const CHANNEL: &str = "mcp_tenant_proxy";
/// The payload that means "anything may have changed".
pub const RESYNC_ALL: &str = "*";
/// Connections per store (admin writes, snapshot loads, usage flushes).
pub const DEFAULT_POOL_SIZE: u32 = 8;
/// How long a call waits for a connection: an admin write with PostgreSQL down fails this fast.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Advisory lock keys (any constant unique to this program).
const MIGRATION_LOCK: i64 = 0x6d74_705f_6d69_6772; // "mtp_migr"
const MASTER_KEY_LOCK: i64 = 0x6d74_705f_6b65_7973; // "mtp_keys"

/// Schema migrations, in order; `mcp_schema_migrations` records those applied. Append only: never edit
/// a released entry. Identifiers use the "C" collation so ordering and paging match SQLite's (bytes).
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE master_keys (
    version     INTEGER PRIMARY KEY,
    check_value BYTEA NOT NULL UNIQUE CHECK (length(check_value) = 32),
    created_at  BIGINT NOT NULL,
    retired_at  BIGINT
);
CREATE TABLE users (
    id           TEXT COLLATE "C" PRIMARY KEY,
    rl_unlimited BOOLEAN NOT NULL DEFAULT false,
    rl_requests  BIGINT CHECK (rl_requests > 0),
    rl_per_ms    BIGINT CHECK (rl_per_ms > 0),
    rl_burst     BIGINT CHECK (rl_burst > 0),
    created_at   BIGINT NOT NULL,
    CHECK ((rl_requests IS NULL) = (rl_per_ms IS NULL) AND (rl_requests IS NULL) = (rl_burst IS NULL)),
    CHECK (NOT (rl_unlimited AND rl_requests IS NOT NULL))
);
CREATE TABLE api_keys (
    id           TEXT COLLATE "C" PRIMARY KEY,
    sha256       BYTEA NOT NULL UNIQUE CHECK (length(sha256) = 32),
    kind         TEXT NOT NULL CHECK (kind IN ('standard', 'enterprise')),
    user_id      TEXT COLLATE "C" NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    act_as       TEXT NOT NULL DEFAULT '[]',
    prefix       TEXT NOT NULL,
    expires_at   BIGINT,
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at   BIGINT
);
CREATE INDEX api_keys_user ON api_keys(user_id);
CREATE TABLE credentials (
    user_id       TEXT COLLATE "C" NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    upstream      TEXT COLLATE "C" NOT NULL,
    credential_id TEXT COLLATE "C" NOT NULL,
    nonce         BYTEA NOT NULL CHECK (length(nonce) = 12),
    ciphertext    BYTEA NOT NULL,
    key_version   INTEGER NOT NULL REFERENCES master_keys(version),
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (user_id, upstream, credential_id)
);
CREATE TABLE token_urls (
    sha256     BYTEA PRIMARY KEY CHECK (length(sha256) = 32),
    id         TEXT COLLATE "C" NOT NULL UNIQUE,
    user_id    TEXT COLLATE "C" NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    upstream   TEXT COLLATE "C" NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX token_urls_user ON token_urls(user_id);
CREATE TABLE usage (
    user_id   TEXT COLLATE "C" NOT NULL,
    upstream  TEXT COLLATE "C" NOT NULL,
    requests  BIGINT NOT NULL DEFAULT 0,
    denials   BIGINT NOT NULL DEFAULT 0,
    last_seen BIGINT NOT NULL,
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
    nonce      BYTEA PRIMARY KEY CHECK (length(nonce) = 32),
    expires_at BIGINT NOT NULL
);
CREATE INDEX oauth_once_expires ON oauth_once(expires_at);
-- OAuth: which replica may spend (user, upstream)'s rotating refresh token, until when. No foreign
-- key: config-file users have OAuth tokens too, and a lease expires by itself.
CREATE TABLE oauth_leases (
    user_id  TEXT COLLATE "C" NOT NULL,
    upstream TEXT COLLATE "C" NOT NULL,
    holder   TEXT COLLATE "C" NOT NULL,
    until    BIGINT NOT NULL,
    PRIMARY KEY (user_id, upstream)
);
"#,
];

const USER_COLS: &str = "id, rl_unlimited, rl_requests, rl_per_ms, rl_burst, created_at";
const KEY_COLS: &str =
    "id, kind, user_id, act_as, prefix, expires_at, created_at, last_used_at, revoked_at, user_token";
const TOKEN_COLS: &str = "id, user_id, upstream, expires_at, created_at, revoked_at";
const CRED_COLS: &str = "user_id, upstream, credential_id, key_version, created_at, updated_at";

/// Where the database is: a parsed `postgres://` URL, with the password (from the URL, or set from an
/// env var or file). `Debug` and `Display` show `user@host:port/dbname` only.
#[derive(Clone)]
pub struct PgConfig {
    config: Box<tokio_postgres::Config>,
    pool_size: u32,
}

impl PgConfig {
    /// Parses a `postgres://` or `postgresql://` URL. Errors never repeat the URL (it may hold a
    /// password).
    pub fn parse(url: &str) -> Result<PgConfig, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("must be a postgres:// URL".into());
        }
        // tokio-postgres names the option at fault, never its value.
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e: tokio_postgres::Error| format!("is not a valid PostgreSQL URL ({e})"))?;
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            // Better refused here than a connection error at start.
            return Err("asks for sslmode=require, which this build does not support yet (connections are \
                        unencrypted: keep the database on a private network)"
                .into());
        }
        if config.get_user().is_none() {
            return Err("names no user (postgres://USER@HOST/DB)".into());
        }
        if config.get_hosts().is_empty() {
            return Err("names no host (postgres://USER@HOST/DB)".into());
        }
        if config.get_application_name().is_none() {
            config.application_name("mcp-tenant-proxy");
        }
        // A dead server or network is noticed in seconds, not at the kernel's TCP timeout.
        config.connect_timeout(CONNECT_TIMEOUT);
        config.keepalives(true).keepalives_idle(Duration::from_secs(5));
        config.keepalives_interval(Duration::from_secs(1)).keepalives_retries(3);
        #[cfg(target_os = "linux")]
        config.tcp_user_timeout(Duration::from_secs(5));
        Ok(PgConfig { config: Box::new(config), pool_size: DEFAULT_POOL_SIZE })
    }

    /// Sets the password (from `password_env` / `password_file`), replacing one in the URL.
    pub fn with_password(mut self, password: &Secret) -> PgConfig {
        self.config.password(password.expose().as_bytes());
        self
    }

    /// A digest of the password (to tell whether it changed without keeping a second copy).
    pub fn password_digest(&self) -> Option<[u8; 32]> {
        self.config.get_password().map(sha256)
    }

    pub fn has_password(&self) -> bool {
        self.config.get_password().is_some()
    }

    /// The same server and credentials, another database (tests, `store migrate`).
    pub fn with_dbname(mut self, dbname: &str) -> PgConfig {
        self.config.dbname(dbname);
        self
    }

    pub fn dbname(&self) -> Option<&str> {
        self.config.get_dbname()
    }

    pub fn with_pool_size(mut self, size: u32) -> PgConfig {
        self.pool_size = size.max(1);
        self
    }

    pub fn tokio_config(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl std::fmt::Display for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        write!(f, "postgres://{}@", c.get_user().unwrap_or(""))?;
        for (i, host) in c.get_hosts().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match host {
                tokio_postgres::config::Host::Tcp(h) => f.write_str(h)?,
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(p) => write!(f, "{}", p.display())?,
            }
            if let Some(port) = c.get_ports().get(i).or(c.get_ports().first()) {
                write!(f, ":{port}")?;
            }
        }
        write!(f, "/{}", c.get_dbname().unwrap_or(""))
    }
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgConfig({self}, password: {})", if self.has_password() { "***" } else { "none" })
    }
}

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// The PostgreSQL [`Store`].
pub struct PgStore {
    /// `None` only while dropping (see the `Drop` impl).
    pool: Option<Pool>,
    config: PgConfig,
    clock: Clock,
    /// Leases are dated by the database server's clock, which every replica shares: a replica whose own
    /// clock is ahead cannot see another's lease as expired (and spend the same refresh token).
    database_clock: bool,
    /// The master key and its version in this database.
    key: std::sync::RwLock<Option<(u32, MasterKey)>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Each pooled connection owns a small runtime, which must not be dropped on an async thread.
        if let Some(pool) = self.pool.take() {
            off_runtime(move || drop(pool));
        }
    }
}

/// Runs `f` here, or on a scoped helper thread when this thread is inside a Tokio runtime (the sync
/// client would panic there: it blocks on a runtime of its own). `spawn_blocking` threads count as
/// inside too, which costs one thread start per call there: tens of microseconds.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// Announces a change to `user` (or [`RESYNC_ALL`]) when the transaction commits. One round trip:
/// `execute_typed` needs no separate prepare.
fn announce(tx: &mut postgres::Transaction<'_>, user: &str) -> StoreResult<()> {
    tx.execute_typed("SELECT pg_notify($1, $2)", &[(&CHANNEL, Type::TEXT), (&user, Type::TEXT)])?;
    Ok(())
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> StoreError {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            // Connection exceptions, shutdown, too many connections: try again later.
            if code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "28P01" | "28000") {
                return StoreError::Unavailable(format!("PostgreSQL: {} ({code})", db.message()));
            }
            return StoreError::Postgres(format!("{} ({code})", db.message()));
        }
        let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
        if e.is_closed() || io || e.to_string().contains("timeout") || e.to_string().contains("connect") {
            return StoreError::Unavailable(format!("PostgreSQL: {e}"));
        }
        StoreError::Postgres(e.to_string())
    }
}

fn sqlstate(e: &postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

const UNIQUE_VIOLATION: &str = "23505";
const FOREIGN_KEY_VIOLATION: &str = "23503";

fn corrupt(what: &str) -> StoreError {
    StoreError::Postgres(format!("unexpected row: {what}"))
}

impl PgStore {
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
        let guard = self.key_guard();
        let Some((version, key)) = guard.as_ref() else { return Err(StoreError::NoMasterKey) };
        let aad = RowAad { user, upstream, credential_id };
        let (nonce, ciphertext) = key.encrypt(&aad, secret.expose().as_bytes());
        let version = *version;
        self.write(Some(user), |tx| {
            // Shared with other writers, exclusive with a rotation: no row is written under a key that a
            // concurrent rotation is retiring.
            tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&MASTER_KEY_LOCK])?;
            if current_version(tx)? != Some(version) {
                return Err(StoreError::RetiredMasterKey { version });
            }
            if let Some(expected) = expected {
                // The user's row locked first: two swaps of one user's credential (a row that may not
                // exist yet) queue here, and the second reads what the first wrote.
                if tx.query_opt("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", &[&user])?.is_none() {
                    return Err(StoreError::not_found("user", user));
                }
                // The row locked too: a delete committing between this read and the write below
                // would let the write insert the row again (READ COMMITTED), undoing a disconnect.
                let row = tx.query_opt(
                    "SELECT key_version, nonce, ciphertext FROM credentials
                     WHERE user_id = $1 AND upstream = $2 AND credential_id = $3 FOR UPDATE",
                    &[&user, &upstream, &credential_id],
                )?;
                let digest = match row {
                    None => None,
                    Some(row) => Some(
                        (row.get::<_, i32>(0) as u32 == version)
                            .then(|| key.decrypt(&aad, row.get(1), row.get(2)))
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
            } else {
                require_user(tx, user)?;
            }
            // xmax = 0 only for a row this statement inserted.
            let inserted: bool = tx
                .query_one(
                    "INSERT INTO credentials
                         (user_id, upstream, credential_id, nonce, ciphertext, key_version, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
                     ON CONFLICT (user_id, upstream, credential_id) DO UPDATE SET
                         nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext,
                         key_version = EXCLUDED.key_version, updated_at = EXCLUDED.updated_at
                     RETURNING (xmax = 0)",
                    &[&user, &upstream, &credential_id, &&nonce[..], &ciphertext, &(version as i32), &now],
                )
                .map_err(|e| match sqlstate(&e) {
                    Some(FOREIGN_KEY_VIOLATION) => StoreError::not_found("user", user),
                    _ => e.into(),
                })?
                .get(0);
            Ok(Some(if inserted { PutOutcome::Created } else { PutOutcome::Updated }))
        })
    }

    /// Connects, applies migrations and registers the master key (the first key given to a database
    /// becomes version 1), as [`super::SqliteStore::open`] does for a file.
    pub fn open(config: &PgConfig, master_key: Option<&Secret>) -> StoreResult<PgStore> {
        Ok(PgStore::open_with_clock(config, master_key, system_clock())?.leases_by_server_clock())
    }

    /// Refresh leases dated by the database server's clock rather than this store's (`open` does so).
    pub fn leases_by_server_clock(mut self) -> PgStore {
        self.database_clock = true;
        self
    }

    /// With `clock` for every time, refresh leases' too, unless [`PgStore::leases_by_server_clock`].
    pub fn open_with_clock(config: &PgConfig, master_key: Option<&Secret>, clock: Clock) -> StoreResult<PgStore> {
        let key = master_key.map(MasterKey::parse).transpose()?;
        let manager = PostgresConnectionManager::new(postgres::Config::from((*config.config).clone()), NoTls);
        let pool = r2d2::Pool::builder()
            .max_size(config.pool_size)
            .min_idle(Some(1))
            .connection_timeout(CONNECT_TIMEOUT)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(manager);
        let store = PgStore {
            pool: Some(pool),
            config: config.clone(),
            clock,
            database_clock: false,
            key: std::sync::RwLock::new(None),
        };
        let now = store.now();
        let version = store.with_client(|c| {
            migrate(c)?;
            key.as_ref().map(|key| register_key(c, key, now)).transpose()
        })?;
        *store.key.write().unwrap_or_else(|e| e.into_inner()) = version.zip(key);
        Ok(store)
    }

    pub fn config(&self) -> &PgConfig {
        &self.config
    }

    /// The current master key version, if a key is set.
    pub fn key_version(&self) -> Option<u32> {
        self.key_guard().as_ref().map(|(v, _)| *v)
    }

    fn key_guard(&self) -> std::sync::RwLockReadGuard<'_, Option<(u32, MasterKey)>> {
        self.key.read().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> UnixTime {
        (self.clock)()
    }

    /// Runs `f` with a pooled connection, off any async thread.
    fn with_client<T: Send>(&self, f: impl FnOnce(&mut postgres::Client) -> StoreResult<T> + Send) -> StoreResult<T> {
        let pool = self.pool.as_ref().expect("pool is only taken in drop");
        off_runtime(|| {
            let mut conn = pool.get().map_err(|e| StoreError::Unavailable(format!("PostgreSQL: {e}")))?;
            f(&mut conn)
        })
    }

    /// Runs `f` in one read-committed transaction that also notifies `notify` (a user id, or `*`).
    fn write<T: Send>(
        &self,
        notify: Option<&str>,
        f: impl FnOnce(&mut postgres::Transaction<'_>) -> StoreResult<T> + Send,
    ) -> StoreResult<T> {
        self.with_client(|c| {
            let mut tx = c.transaction()?;
            let out = f(&mut tx)?;
            if let Some(user) = notify {
                announce(&mut tx, user)?;
            }
            tx.commit()?;
            Ok(out)
        })
    }

    /// Runs `f` in one repeatable-read, read-only transaction: a consistent view of the database.
    fn read<T: Send>(&self, f: impl FnOnce(&mut postgres::Transaction<'_>) -> StoreResult<T> + Send) -> StoreResult<T> {
        self.with_client(|c| {
            let mut tx =
                c.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start()?;
            let out = f(&mut tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// The number of rows in each table (`store migrate` verifies a copy with it).
    pub fn table_counts(&self) -> StoreResult<BTreeMap<&'static str, i64>> {
        self.read(|tx| {
            let mut out = BTreeMap::new();
            for table in TABLES {
                let n: i64 = tx.query_one(&format!("SELECT count(*) FROM {table}"), &[])?.get(0);
                out.insert(table, n);
            }
            Ok(out)
        })
    }

    /// Copies whole rows into an empty database, in one transaction, and notifies `*` on commit.
    /// Refuses a database that already holds users, keys, credentials, tokens or usage.
    pub fn import_rows(&self, rows: &RawRows) -> StoreResult<()> {
        self.write(Some(RESYNC_ALL), |tx| {
            for table in TABLES.iter().filter(|t| **t != "master_keys") {
                let any: bool = tx.query_one(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), &[])?.get(0);
                if any {
                    return Err(StoreError::invalid(
                        "to",
                        format!("the target database is not empty ({table} has rows)"),
                    ));
                }
            }
            let known: Vec<(i32, Vec<u8>)> = tx
                .query("SELECT version, check_value FROM master_keys ORDER BY version", &[])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            for mk in &rows.master_keys {
                match known.iter().find(|(v, _)| *v as u32 == mk.version) {
                    Some((_, check)) if check[..] == mk.check_value[..] => {}
                    Some(_) => return Err(StoreError::WrongMasterKey),
                    None => {
                        tx.execute(
                            "INSERT INTO master_keys (version, check_value, created_at, retired_at)
                             VALUES ($1, $2, $3, $4)",
                            &[&(mk.version as i32), &&mk.check_value[..], &mk.created_at, &mk.retired_at],
                        )?;
                    }
                }
            }
            if !known.is_empty() && known.len() > rows.master_keys.len() {
                return Err(StoreError::invalid("to", "the target database has master keys the source does not"));
            }
            copy_rows(tx, rows)?;
            Ok(())
        })
    }

    /// Every row of every table, ciphertexts as stored (for `store migrate` checks and tests).
    pub fn export_rows(&self) -> StoreResult<RawRows> {
        self.read(|tx| {
            let mut rows = RawRows::default();
            for r in
                tx.query("SELECT version, check_value, created_at, retired_at FROM master_keys ORDER BY version", &[])?
            {
                rows.master_keys.push(RawMasterKey {
                    version: r.get::<_, i32>(0) as u32,
                    check_value: r.get(1),
                    created_at: r.get(2),
                    retired_at: r.get(3),
                });
            }
            for r in tx.query(&format!("SELECT {USER_COLS} FROM users ORDER BY id"), &[])? {
                rows.users.push(user_from_row(&r)?);
            }
            for r in tx.query(&format!("SELECT {KEY_COLS}, sha256 FROM api_keys ORDER BY id"), &[])? {
                rows.keys.push((key_from_row(&r)?, r.get(10)));
            }
            for r in tx.query(
                "SELECT user_id, upstream, credential_id, nonce, ciphertext, key_version, created_at, updated_at
                 FROM credentials ORDER BY user_id, upstream, credential_id",
                &[],
            )? {
                rows.credentials.push(RawCredential {
                    user: r.get(0),
                    upstream: r.get(1),
                    credential_id: r.get(2),
                    nonce: r.get(3),
                    ciphertext: r.get(4),
                    key_version: r.get::<_, i32>(5) as u32,
                    created_at: r.get(6),
                    updated_at: r.get(7),
                });
            }
            for r in tx.query(&format!("SELECT {TOKEN_COLS}, sha256 FROM token_urls ORDER BY id"), &[])? {
                rows.tokens.push((token_from_row(&r), r.get(6)));
            }
            for r in tx.query(
                "SELECT user_id, upstream, requests, denials, last_seen FROM usage ORDER BY user_id, upstream",
                &[],
            )? {
                rows.usage.push(usage_from_row(&r));
            }
            Ok(rows)
        })
    }
}

/// The tables of the schema, in the order a copy fills them. Not the OAuth nonces and leases
/// (`oauth_once`, `oauth_leases`): they last minutes and are not worth copying.
pub const TABLES: [&str; 6] = ["master_keys", "users", "api_keys", "credentials", "token_urls", "usage"];

/// Multi-row inserts from arrays (`unnest`), a few thousand rows per statement.
fn copy_rows(tx: &mut postgres::Transaction<'_>, rows: &RawRows) -> StoreResult<()> {
    const CHUNK: usize = 5000;
    for chunk in rows.users.chunks(CHUNK) {
        let mut limits = Vec::with_capacity(chunk.len());
        for u in chunk {
            limits.push(limit_columns(u.rate_limit)?);
        }
        tx.execute(
            "INSERT INTO users (id, rl_unlimited, rl_requests, rl_per_ms, rl_burst, created_at)
             SELECT * FROM unnest($1::text[], $2::bool[], $3::int8[], $4::int8[], $5::int8[], $6::int8[])",
            &[
                &chunk.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(),
                &limits.iter().map(|l| l.0).collect::<Vec<_>>(),
                &limits.iter().map(|l| l.1).collect::<Vec<_>>(),
                &limits.iter().map(|l| l.2).collect::<Vec<_>>(),
                &limits.iter().map(|l| l.3).collect::<Vec<_>>(),
                &chunk.iter().map(|u| u.created_at).collect::<Vec<_>>(),
            ],
        )?;
    }
    for chunk in rows.keys.chunks(CHUNK) {
        let act_as: Vec<String> =
            chunk.iter().map(|(k, _)| serde_json::to_string(&k.act_as).expect("strings serialize")).collect();
        let col = |f: fn(&KeyInfo) -> Option<i64>| chunk.iter().map(|(k, _)| f(k)).collect::<Vec<_>>();
        tx.execute(
            "INSERT INTO api_keys (id, sha256, kind, user_id, act_as, prefix, expires_at, created_at, last_used_at, revoked_at,
                                   user_token)
             SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::text[], $6::text[],
                                  $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::text[])",
            &[
                &chunk.iter().map(|(k, _)| k.id.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|(_, h)| h.as_slice()).collect::<Vec<_>>(),
                &chunk.iter().map(|(k, _)| k.kind.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|(k, _)| k.user.as_str()).collect::<Vec<_>>(),
                &act_as,
                &chunk.iter().map(|(k, _)| k.prefix.as_str()).collect::<Vec<_>>(),
                &col(|k| k.expires_at),
                &col(|k| Some(k.created_at)),
                &col(|k| k.last_used_at),
                &col(|k| k.revoked_at),
                &chunk.iter().map(|(k, _)| k.user_token.map(TokenMode::as_str)).collect::<Vec<_>>(),
            ],
        )?;
    }
    for chunk in rows.credentials.chunks(CHUNK) {
        tx.execute(
            "INSERT INTO credentials (user_id, upstream, credential_id, nonce, ciphertext, key_version, created_at, updated_at)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bytea[], $6::int4[],
                                  $7::int8[], $8::int8[])",
            &[
                &chunk.iter().map(|c| c.user.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|c| c.upstream.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|c| c.credential_id.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|c| c.nonce.as_slice()).collect::<Vec<_>>(),
                &chunk.iter().map(|c| c.ciphertext.as_slice()).collect::<Vec<_>>(),
                &chunk.iter().map(|c| c.key_version as i32).collect::<Vec<_>>(),
                &chunk.iter().map(|c| c.created_at).collect::<Vec<_>>(),
                &chunk.iter().map(|c| c.updated_at).collect::<Vec<_>>(),
            ],
        )?;
    }
    for chunk in rows.tokens.chunks(CHUNK) {
        tx.execute(
            "INSERT INTO token_urls (sha256, id, user_id, upstream, expires_at, created_at, revoked_at)
             SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[])",
            &[
                &chunk.iter().map(|(_, h)| h.as_slice()).collect::<Vec<_>>(),
                &chunk.iter().map(|(t, _)| t.id.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|(t, _)| t.user.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|(t, _)| t.upstream.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|(t, _)| t.expires_at).collect::<Vec<_>>(),
                &chunk.iter().map(|(t, _)| t.created_at).collect::<Vec<_>>(),
                &chunk.iter().map(|(t, _)| t.revoked_at).collect::<Vec<_>>(),
            ],
        )?;
    }
    for chunk in rows.usage.chunks(CHUNK) {
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO usage (user_id, upstream, requests, denials, last_seen)
             SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[])",
            &[
                &chunk.iter().map(|u| u.user.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|u| u.upstream.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|u| as_i64(u.requests)).collect::<Vec<_>>(),
                &chunk.iter().map(|u| as_i64(u.denials)).collect::<Vec<_>>(),
                &chunk.iter().map(|u| u.last_seen).collect::<Vec<_>>(),
            ],
        )?;
    }
    Ok(())
}

/// Imports up to this many users notify each of them; bigger batches notify `*`.
const IMPORT_NOTIFY_EACH: usize = 1000;

/// Names the row a unique violation of an import is about (from the server's detail: `Key (id)=(x)`).
fn import_conflict(e: postgres::Error) -> StoreError {
    let Some(db) = e.as_db_error().filter(|db| db.code().code() == UNIQUE_VIOLATION) else { return e.into() };
    let what = match db.constraint() {
        Some("users_pkey") => "user",
        Some("credentials_pkey") => "credential",
        _ => "key",
    };
    let id = db
        .detail()
        .and_then(|d| Some(d.split_once(")=(")?.1.rsplit_once(") already exists")?.0.replace(", ", "/")))
        .unwrap_or_default();
    StoreError::Conflict { what, id }
}

/// The rows of an import batch, a few thousand per statement.
fn insert_prepared(
    tx: &mut postgres::Transaction<'_>,
    p: &super::import::Prepared,
    version: Option<u32>,
) -> Result<(), postgres::Error> {
    const CHUNK: usize = 10_000;
    let now = p.now;
    for chunk in p.users.chunks(CHUNK) {
        tx.execute(
            "INSERT INTO users (id, rl_unlimited, rl_requests, rl_per_ms, rl_burst, created_at)
             SELECT u.*, $6 FROM unnest($1::text[], $2::bool[], $3::int8[], $4::int8[], $5::int8[]) AS u",
            &[
                &chunk.iter().map(|u| u.0.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|u| u.1.0).collect::<Vec<_>>(),
                &chunk.iter().map(|u| u.1.1).collect::<Vec<_>>(),
                &chunk.iter().map(|u| u.1.2).collect::<Vec<_>>(),
                &chunk.iter().map(|u| u.1.3).collect::<Vec<_>>(),
                &now,
            ],
        )?;
    }
    for chunk in p.keys.chunks(CHUNK) {
        tx.execute(
            "INSERT INTO api_keys (id, sha256, kind, user_id, act_as, prefix, expires_at, user_token, created_at)
             SELECT k.*, $9 FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::text[], $6::text[],
                                        $7::int8[], $8::text[]) AS k",
            &[
                &chunk.iter().map(|k| k.created.info.id.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|k| &k.sha256[..]).collect::<Vec<_>>(),
                &chunk.iter().map(|k| k.created.info.kind.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|k| k.created.info.user.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|k| k.act_as.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|k| k.created.info.prefix.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|k| k.created.info.expires_at).collect::<Vec<_>>(),
                &chunk.iter().map(|k| k.created.info.user_token.map(TokenMode::as_str)).collect::<Vec<_>>(),
                &now,
            ],
        )?;
    }
    let version = version.map(|v| v as i32);
    for chunk in p.credentials.chunks(CHUNK) {
        tx.execute(
            "INSERT INTO credentials
                 (user_id, upstream, credential_id, nonce, ciphertext, key_version, created_at, updated_at)
             SELECT c.*, $6, $7, $7 FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bytea[]) AS c",
            &[
                &chunk.iter().map(|c| c.user.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|c| c.upstream.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|c| c.credential_id.as_str()).collect::<Vec<_>>(),
                &chunk.iter().map(|c| &c.nonce[..]).collect::<Vec<_>>(),
                &chunk.iter().map(|c| c.ciphertext.as_slice()).collect::<Vec<_>>(),
                &version,
                &now,
            ],
        )?;
    }
    Ok(())
}

fn migrate(client: &mut postgres::Client) -> StoreResult<()> {
    let known = MIGRATIONS.len() as u32;
    let mut tx = client.transaction()?;
    // Replicas starting together: one migrates, the others wait here and then find nothing to do.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS mcp_schema_migrations (
             version    INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )?;
    let applied: i32 = tx.query_one("SELECT COALESCE(max(version), 0) FROM mcp_schema_migrations", &[])?.get(0);
    let applied = applied as u32;
    if applied > known {
        return Err(StoreError::SchemaTooNew { found: applied, known });
    }
    for (i, script) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        tx.batch_execute(script)?;
        tx.execute("INSERT INTO mcp_schema_migrations (version) VALUES ($1)", &[&(i as i32 + 1)])?;
    }
    tx.commit()?;
    Ok(())
}

/// (version, check value, retired_at) of a master key this database has seen.
type KeyRow = (u32, Vec<u8>, Option<UnixTime>);

fn key_versions(c: &mut impl GenericClient) -> StoreResult<Vec<KeyRow>> {
    Ok(c.query("SELECT version, check_value, retired_at FROM master_keys ORDER BY version", &[])?
        .iter()
        .map(|r| (r.get::<_, i32>(0) as u32, r.get(1), r.get(2)))
        .collect())
}

/// Finds the version of `key` in this database, or makes it version 1 of a database without a key.
fn register_key(client: &mut postgres::Client, key: &MasterKey, now: UnixTime) -> StoreResult<u32> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MASTER_KEY_LOCK])?;
    let known = key_versions(&mut tx)?;
    if let Some((version, _, retired)) = known.iter().find(|(_, check, _)| check[..] == key.check_value()) {
        return match retired {
            Some(_) => Err(StoreError::RetiredMasterKey { version: *version }),
            None => Ok(*version),
        };
    }
    if !known.is_empty() {
        return Err(StoreError::WrongMasterKey);
    }
    tx.execute(
        "INSERT INTO master_keys (version, check_value, created_at) VALUES (1, $1, $2)",
        &[&&key.check_value()[..], &now],
    )?;
    tx.commit()?;
    Ok(1)
}

fn current_version(c: &mut impl GenericClient) -> StoreResult<Option<u32>> {
    Ok(c.query_opt("SELECT version FROM master_keys WHERE retired_at IS NULL ORDER BY version DESC LIMIT 1", &[])?
        .map(|r| r.get::<_, i32>(0) as u32))
}

fn user_exists(c: &mut impl GenericClient, id: &str) -> StoreResult<bool> {
    Ok(c.query_opt("SELECT 1 FROM users WHERE id = $1", &[&id])?.is_some())
}

fn require_user(c: &mut impl GenericClient, id: &str) -> StoreResult<()> {
    if user_exists(c, id)? { Ok(()) } else { Err(StoreError::not_found("user", id)) }
}

fn positive(v: Option<i64>) -> StoreResult<Option<NonZeroU32>> {
    match v {
        None => Ok(None),
        Some(v) => {
            u32::try_from(v).ok().and_then(NonZeroU32::new).map(Some).ok_or_else(|| corrupt("not a positive count"))
        }
    }
}

fn user_from_row(r: &Row) -> StoreResult<User> {
    let unlimited: bool = r.get(1);
    let per_ms: Option<i64> = r.get(3);
    let rate_limit = match (unlimited, positive(r.get(2))?, per_ms, positive(r.get(4))?) {
        (true, None, None, None) => UserLimit::Unlimited,
        (false, None, None, None) => UserLimit::Default,
        (false, Some(requests), Some(per_ms), Some(burst)) if per_ms > 0 => {
            let per = Duration::from_millis(per_ms as u64);
            UserLimit::Quota(Limit::new(requests, per, Some(burst)).map_err(|_| corrupt("rate limit out of range"))?)
        }
        _ => return Err(corrupt("inconsistent rate-limit columns")),
    };
    Ok(User { id: r.get(0), rate_limit, created_at: r.get(5) })
}

fn kind(s: &str) -> StoreResult<KeyKind> {
    kind_from_str(1, s).map_err(|_| corrupt("unknown key kind"))
}

fn act_as(json: &str) -> StoreResult<Vec<String>> {
    serde_json::from_str(json).map_err(|_| corrupt("act_as is not a JSON list of strings"))
}

fn key_from_row(r: &Row) -> StoreResult<KeyInfo> {
    Ok(KeyInfo {
        id: r.get(0),
        kind: kind(r.get(1))?,
        user: r.get(2),
        act_as: act_as(r.get(3))?,
        prefix: r.get(4),
        expires_at: r.get(5),
        created_at: r.get(6),
        last_used_at: r.get(7),
        revoked_at: r.get(8),
        user_token: token_mode(r.get(9))?,
    })
}

fn token_mode(mode: Option<&str>) -> StoreResult<Option<TokenMode>> {
    mode.map(|m| TokenMode::parse(m).map_err(|_| corrupt("unknown user_token mode"))).transpose()
}

fn token_from_row(r: &Row) -> TokenInfo {
    TokenInfo {
        id: r.get(0),
        user: r.get(1),
        upstream: r.get(2),
        expires_at: r.get(3),
        created_at: r.get(4),
        revoked_at: r.get(5),
    }
}

fn credential_from_row(r: &Row) -> CredentialInfo {
    CredentialInfo {
        user: r.get(0),
        upstream: r.get(1),
        credential_id: r.get(2),
        key_version: r.get::<_, i32>(3) as u32,
        created_at: r.get(4),
        updated_at: r.get(5),
    }
}

fn usage_from_row(r: &Row) -> Usage {
    Usage {
        user: r.get(0),
        upstream: r.get(1),
        requests: count(r.get(2)),
        denials: count(r.get(3)),
        last_seen: r.get(4),
    }
}

fn hash32(bytes: Vec<u8>) -> StoreResult<[u8; 32]> {
    bytes.try_into().map_err(|_| corrupt("a hash is not 32 bytes"))
}

/// Rows fetched per round trip when reading whole tables: one runtime entry per batch, not per row,
/// and never a million rows in memory at once.
const BATCH_ROWS: i32 = 10_000;

/// Runs `f` on each row. A whole table (no `user`) is read through a portal in batches; one user's
/// rows come in one round trip (`query_typed`: no separate prepare). `params`: `user` (text) first.
fn for_each_row(
    tx: &mut postgres::Transaction<'_>,
    sql: &str,
    user: Option<&str>,
    params: &[(&(dyn postgres::types::ToSql + Sync), Type)],
    mut f: impl FnMut(&Row) -> StoreResult<()>,
) -> StoreResult<()> {
    let mut all: Vec<(&(dyn postgres::types::ToSql + Sync), Type)> = vec![(&user, Type::TEXT)];
    all.extend(params.iter().cloned());
    if user.is_some() {
        return tx.query_typed(sql, &all)?.iter().try_for_each(f);
    }
    let plain: Vec<_> = all.iter().map(|(value, _)| *value).collect();
    let portal = tx.bind(sql, &plain)?;
    loop {
        let rows = tx.query_portal(&portal, BATCH_ROWS)?;
        rows.iter().try_for_each(&mut f)?;
        if rows.len() < BATCH_ROWS as usize {
            return Ok(());
        }
    }
}

/// Decrypts the credentials (all, or one user's) with the key of version `version`.
fn decrypt_credentials(
    tx: &mut postgres::Transaction<'_>,
    version: u32,
    key: &MasterKey,
    user: Option<&str>,
) -> StoreResult<Vec<CredentialSecret>> {
    let mut out = Vec::new();
    let mut failed = None;
    for_each_row(
        tx,
        "SELECT user_id, upstream, credential_id, key_version, nonce, ciphertext FROM credentials
         WHERE ($1::text IS NULL OR user_id = $1) ORDER BY user_id, upstream, credential_id",
        user,
        &[],
        |r| {
            if failed.is_some() {
                return Ok(());
            }
            let (user, upstream, credential_id): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let row_version = r.get::<_, i32>(3) as u32;
            let aad = RowAad { user: &user, upstream: &upstream, credential_id: &credential_id };
            let plain = (row_version == version)
                .then(|| key.decrypt(&aad, r.get(4), r.get(5)))
                .flatten()
                .and_then(|bytes| String::from_utf8(bytes).ok());
            match plain {
                Some(plain) => out.push(CredentialSecret { user, upstream, credential_id, secret: Secret::new(plain) }),
                None => failed = Some((user, upstream, credential_id)),
            }
            Ok(())
        },
    )?;
    if let Some((user, upstream, credential_id)) = failed {
        return Err(match current_version(tx)? {
            Some(current) if current != version => StoreError::RetiredMasterKey { version },
            _ => StoreError::Undecryptable { user, upstream, credential_id },
        });
    }
    Ok(out)
}

/// Users with their active keys, active token URLs and decrypted credentials: all, or one user's.
fn read_snapshot(
    tx: &mut postgres::Transaction<'_>,
    key: Option<&(u32, MasterKey)>,
    user: Option<&str>,
    now: UnixTime,
) -> StoreResult<Snapshot> {
    let mut users = Vec::new();
    for_each_row(
        tx,
        &format!("SELECT {USER_COLS} FROM users WHERE ($1::text IS NULL OR id = $1) ORDER BY id"),
        user,
        &[],
        |r| {
            users.push(user_from_row(r)?);
            Ok(())
        },
    )?;
    let mut keys = Vec::new();
    for_each_row(
        tx,
        "SELECT id, sha256, kind, user_id, act_as, expires_at, user_token FROM api_keys
         WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2) AND ($1::text IS NULL OR user_id = $1)
         ORDER BY user_id, id",
        user,
        &[(&now, Type::INT8)],
        |r| {
            keys.push(SnapshotKey {
                id: r.get(0),
                sha256: hash32(r.get(1))?,
                kind: kind(r.get(2))?,
                user: r.get(3),
                act_as: act_as(r.get(4))?,
                expires_at: r.get(5),
                user_token: token_mode(r.get(6))?,
            });
            Ok(())
        },
    )?;
    let mut tokens = Vec::new();
    for_each_row(
        tx,
        "SELECT id, sha256, user_id, upstream, expires_at FROM token_urls
         WHERE revoked_at IS NULL AND expires_at > $2 AND ($1::text IS NULL OR user_id = $1) ORDER BY user_id, id",
        user,
        &[(&now, Type::INT8)],
        |r| {
            tokens.push(SnapshotToken {
                id: r.get(0),
                sha256: hash32(r.get(1))?,
                user: r.get(2),
                upstream: r.get(3),
                expires_at: r.get(4),
            });
            Ok(())
        },
    )?;
    let credentials = match key {
        Some((version, key)) => decrypt_credentials(tx, *version, key, user)?,
        None => {
            let any: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM credentials WHERE ($1::text IS NULL OR user_id = $1))",
                    &[&user],
                )?
                .get(0);
            if any {
                return Err(StoreError::NoMasterKey);
            }
            Vec::new()
        }
    };
    Ok(Snapshot { users, keys, credentials, tokens, taken_at: now })
}

fn validate_new_key(new: &NewKey, now: UnixTime) -> StoreResult<()> {
    check_user("user", &new.user)?;
    if let Some(id) = &new.id {
        check_name("id", id)?;
    }
    if new.kind == KeyKind::Standard && !new.act_as.is_empty() {
        return Err(StoreError::invalid("act_as", "standard keys act as their own user only; use an enterprise key"));
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
    if let Some(expires_at) = new.expires_at
        && expires_at <= now
    {
        return Err(StoreError::invalid("expires_at", "must be in the future"));
    }
    Ok(())
}

impl Store for PgStore {
    fn create_user(&self, id: &str, rate_limit: UserLimit) -> StoreResult<User> {
        check_user("id", id)?;
        let (unlimited, requests, per_ms, burst) = limit_columns(rate_limit)?;
        let now = self.now();
        self.write(Some(id), |tx| {
            match tx.execute_typed(
                "INSERT INTO users (id, rl_unlimited, rl_requests, rl_per_ms, rl_burst, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    (&id, Type::TEXT),
                    (&unlimited, Type::BOOL),
                    (&requests, Type::INT8),
                    (&per_ms, Type::INT8),
                    (&burst, Type::INT8),
                    (&now, Type::INT8),
                ],
            ) {
                Ok(_) => Ok(User { id: id.to_owned(), rate_limit, created_at: now }),
                Err(e) if sqlstate(&e) == Some(UNIQUE_VIOLATION) => {
                    Err(StoreError::Conflict { what: "user", id: id.to_owned() })
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    fn get_user(&self, id: &str) -> StoreResult<User> {
        check_user("id", id)?;
        self.with_client(|c| match c.query_opt(&format!("SELECT {USER_COLS} FROM users WHERE id = $1"), &[&id])? {
            Some(r) => user_from_row(&r),
            None => Err(StoreError::not_found("user", id)),
        })
    }

    fn list_users(&self, after: Option<&str>, limit: u32) -> StoreResult<Vec<User>> {
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(StoreError::invalid("limit", format!("must be 1 to {MAX_PAGE}")));
        }
        if let Some(after) = after {
            check_user("after", after)?;
        }
        self.with_client(|c| {
            c.query(
                &format!("SELECT {USER_COLS} FROM users WHERE ($1::text IS NULL OR id > $1) ORDER BY id LIMIT $2"),
                &[&after, &i64::from(limit)],
            )?
            .iter()
            .map(user_from_row)
            .collect()
        })
    }

    fn set_user_limit(&self, id: &str, rate_limit: UserLimit) -> StoreResult<User> {
        check_user("id", id)?;
        let (unlimited, requests, per_ms, burst) = limit_columns(rate_limit)?;
        self.write(Some(id), |tx| {
            let row = tx.query_opt(
                &format!(
                    "UPDATE users SET rl_unlimited = $2, rl_requests = $3, rl_per_ms = $4, rl_burst = $5
                     WHERE id = $1 RETURNING {USER_COLS}"
                ),
                &[&id, &unlimited, &requests, &per_ms, &burst],
            )?;
            match row {
                Some(r) => user_from_row(&r),
                None => Err(StoreError::not_found("user", id)),
            }
        })
    }

    fn delete_user(&self, id: &str) -> StoreResult<()> {
        check_user("id", id)?;
        self.write(Some(id), |tx| {
            // Keys, token URLs and credentials go by ON DELETE CASCADE; usage has no foreign key.
            if tx.execute("DELETE FROM users WHERE id = $1", &[&id])? == 0 {
                return Err(StoreError::not_found("user", id));
            }
            tx.execute("DELETE FROM usage WHERE user_id = $1", &[&id])?;
            Ok(())
        })
    }

    fn create_key(&self, new: NewKey) -> StoreResult<CreatedKey> {
        let now = self.now();
        validate_new_key(&new, now)?;
        let key = format!("mtp_{}", hex::encode(rand::random::<[u8; 32]>()));
        let info = KeyInfo {
            id: new.id.unwrap_or_else(|| random_id("k_")),
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
        let hash = sha256(key.as_bytes());
        self.write(Some(&info.user), |tx| {
            match tx.execute(
                "INSERT INTO api_keys (id, sha256, kind, user_id, act_as, prefix, expires_at, created_at, user_token)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &info.id,
                    &&hash[..],
                    &info.kind.as_str(),
                    &info.user,
                    &act_as,
                    &info.prefix,
                    &info.expires_at,
                    &now,
                    &info.user_token.map(TokenMode::as_str),
                ],
            ) {
                Ok(_) => Ok(()),
                Err(e) if sqlstate(&e) == Some(FOREIGN_KEY_VIOLATION) => Err(StoreError::not_found("user", &info.user)),
                Err(e) if sqlstate(&e) == Some(UNIQUE_VIOLATION) => {
                    Err(StoreError::Conflict { what: "key", id: info.id.clone() })
                }
                Err(e) => Err(e.into()),
            }
        })?;
        Ok(CreatedKey { key: Secret::new(key), info })
    }

    fn list_keys(&self, user: Option<&str>) -> StoreResult<Vec<KeyInfo>> {
        if let Some(user) = user {
            check_user("user", user)?;
        }
        self.read(|tx| {
            if let Some(user) = user {
                require_user(tx, user)?;
            }
            tx.query(
                &format!("SELECT {KEY_COLS} FROM api_keys WHERE ($1::text IS NULL OR user_id = $1) ORDER BY id"),
                &[&user],
            )?
            .iter()
            .map(key_from_row)
            .collect()
        })
    }

    fn revoke_key(&self, id: &str) -> StoreResult<KeyInfo> {
        check_name("id", id)?;
        let now = self.now();
        // The user to notify is only known from the row: notify inside the transaction, after the update.
        self.write(None, |tx| {
            let row = tx.query_opt(
                &format!(
                    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1 RETURNING {KEY_COLS}"
                ),
                &[&id, &now],
            )?;
            let key = key_from_row(&row.ok_or_else(|| StoreError::not_found("key", id))?)?;
            announce(tx, &key.user)?;
            Ok(key)
        })
    }

    fn touch_keys(&self, used: &[(String, UnixTime)]) -> StoreResult<()> {
        if used.is_empty() {
            return Ok(());
        }
        // One row per key (an UPDATE ... FROM applies only one match per row), in id order.
        let mut latest: BTreeMap<&str, UnixTime> = BTreeMap::new();
        for (id, at) in used {
            let e = latest.entry(id).or_insert(*at);
            *e = (*e).max(*at);
        }
        let ids: Vec<&str> = latest.keys().copied().collect();
        let ats: Vec<i64> = latest.values().copied().collect();
        self.write(None, |tx| {
            tx.execute(
                "UPDATE api_keys AS k SET last_used_at = GREATEST(COALESCE(k.last_used_at, u.at), u.at)
                 FROM unnest($1::text[], $2::int8[]) AS u(id, at) WHERE k.id = u.id",
                &[&ids, &ats],
            )?;
            Ok(())
        })
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
        self.write(Some(user), |tx| {
            let deleted = tx.execute(
                "DELETE FROM credentials WHERE user_id = $1 AND upstream = $2 AND credential_id = $3",
                &[&user, &upstream, &credential_id],
            )?;
            if deleted == 0 {
                return Err(StoreError::not_found("credential", &format!("{user}/{upstream}/{credential_id}")));
            }
            Ok(())
        })
    }

    fn list_credentials(&self, user: &str) -> StoreResult<Vec<CredentialInfo>> {
        check_user("user", user)?;
        self.read(|tx| {
            require_user(tx, user)?;
            Ok(tx
                .query(
                    &format!("SELECT {CRED_COLS} FROM credentials WHERE user_id = $1 ORDER BY upstream, credential_id"),
                    &[&user],
                )?
                .iter()
                .map(credential_from_row)
                .collect())
        })
    }

    fn credential_secrets(&self, user: Option<&str>) -> StoreResult<Vec<CredentialSecret>> {
        if let Some(user) = user {
            check_user("user", user)?;
        }
        let guard = self.key_guard();
        let Some((version, key)) = guard.as_ref() else { return Err(StoreError::NoMasterKey) };
        self.read(|tx| decrypt_credentials(tx, *version, key, user))
    }

    fn rotate_master_key(&self, old: &Secret, new: &Secret) -> StoreResult<u32> {
        let old = MasterKey::parse(old)?;
        let new = MasterKey::parse(new)?;
        if old.check_value() == new.check_value() {
            return Err(StoreError::invalid("new", "is the old key"));
        }
        let now = self.now();
        // Held for the whole rotation: this store's own writers wait for the new key.
        let mut guard = self.key.write().unwrap_or_else(|e| e.into_inner());
        let next = self.write(Some(RESYNC_ALL), |tx| {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MASTER_KEY_LOCK])?;
            let known = key_versions(tx)?;
            let version = match known.iter().find(|(_, check, _)| check[..] == old.check_value()) {
                Some((version, _, None)) => *version,
                Some((version, _, Some(_))) => return Err(StoreError::RetiredMasterKey { version: *version }),
                None => return Err(StoreError::WrongMasterKey),
            };
            if known.iter().any(|(_, check, _)| check[..] == new.check_value()) {
                return Err(StoreError::invalid("new", "was a master key of this store before; use a fresh key"));
            }
            let next = version + 1;
            tx.execute("UPDATE master_keys SET retired_at = $2 WHERE version = $1", &[&(version as i32), &now])?;
            tx.execute(
                "INSERT INTO master_keys (version, check_value, created_at) VALUES ($1, $2, $3)",
                &[&(next as i32), &&new.check_value()[..], &now],
            )?;
            let rows = decrypt_credentials(tx, version, &old, None)?;
            const CHUNK: usize = 5000;
            for chunk in rows.chunks(CHUNK) {
                let mut nonces = Vec::with_capacity(chunk.len());
                let mut cts = Vec::with_capacity(chunk.len());
                for row in chunk {
                    let aad = RowAad { user: &row.user, upstream: &row.upstream, credential_id: &row.credential_id };
                    let (nonce, ct) = new.encrypt(&aad, row.secret.expose().as_bytes());
                    nonces.push(nonce.to_vec());
                    cts.push(ct);
                }
                let users: Vec<&str> = chunk.iter().map(|r| r.user.as_str()).collect();
                let upstreams: Vec<&str> = chunk.iter().map(|r| r.upstream.as_str()).collect();
                let ids: Vec<&str> = chunk.iter().map(|r| r.credential_id.as_str()).collect();
                tx.execute(
                    "UPDATE credentials AS c SET nonce = n.nonce, ciphertext = n.ct, key_version = $6
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bytea[])
                          AS n(user_id, upstream, credential_id, nonce, ct)
                     WHERE c.user_id = n.user_id AND c.upstream = n.upstream AND c.credential_id = n.credential_id",
                    &[&users, &upstreams, &ids, &nonces, &cts, &(next as i32)],
                )?;
            }
            Ok(next)
        })?;
        *guard = Some((next, new));
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
        let hash = sha256(token.as_bytes());
        self.write(Some(user), |tx| {
            tx.execute(
                "INSERT INTO token_urls (sha256, id, user_id, upstream, expires_at, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&&hash[..], &info.id, &info.user, &info.upstream, &info.expires_at, &now],
            )
            .map_err(|e| match sqlstate(&e) {
                Some(FOREIGN_KEY_VIOLATION) => StoreError::not_found("user", user),
                _ => e.into(),
            })?;
            Ok(())
        })?;
        Ok(CreatedToken { token: Secret::new(token), info })
    }

    fn list_tokens(&self, user: Option<&str>) -> StoreResult<Vec<TokenInfo>> {
        if let Some(user) = user {
            check_user("user", user)?;
        }
        self.read(|tx| {
            if let Some(user) = user {
                require_user(tx, user)?;
            }
            Ok(tx
                .query(
                    &format!(
                        "SELECT {TOKEN_COLS} FROM token_urls WHERE ($1::text IS NULL OR user_id = $1)
                         ORDER BY created_at, id"
                    ),
                    &[&user],
                )?
                .iter()
                .map(token_from_row)
                .collect())
        })
    }

    fn revoke_token(&self, id: &str) -> StoreResult<TokenInfo> {
        check_name("id", id)?;
        let now = self.now();
        self.write(None, |tx| {
            let row = tx.query_opt(
                &format!(
                    "UPDATE token_urls SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1 RETURNING {TOKEN_COLS}"
                ),
                &[&id, &now],
            )?;
            let token = token_from_row(&row.ok_or_else(|| StoreError::not_found("token", id))?);
            announce(tx, &token.user)?;
            Ok(token)
        })
    }

    fn lookup_token(&self, hash: &[u8; 32]) -> StoreResult<Option<TokenInfo>> {
        let now = self.now();
        self.with_client(|c| {
            Ok(c.query_opt(
                &format!(
                    "SELECT {TOKEN_COLS} FROM token_urls WHERE sha256 = $1 AND revoked_at IS NULL AND expires_at > $2"
                ),
                &[&&hash[..], &now],
            )?
            .map(|r| token_from_row(&r)))
        })
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
        // One row per (user, upstream) (ON CONFLICT may touch a row once per statement), sorted so that
        // replicas flushing together lock rows in the same order and never deadlock.
        let mut merged: BTreeMap<(&str, &str), (u64, u64, UnixTime)> = BTreeMap::new();
        for d in deltas.iter().filter(valid) {
            let e = merged.entry((&d.user, &d.upstream)).or_insert((0, 0, d.last_seen));
            e.0 = e.0.saturating_add(d.requests);
            e.1 = e.1.saturating_add(d.denials);
            e.2 = e.2.max(d.last_seen);
        }
        if merged.is_empty() {
            return Ok(());
        }
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let users: Vec<&str> = merged.keys().map(|k| k.0).collect();
        let upstreams: Vec<&str> = merged.keys().map(|k| k.1).collect();
        let requests: Vec<i64> = merged.values().map(|v| as_i64(v.0)).collect();
        let denials: Vec<i64> = merged.values().map(|v| as_i64(v.1)).collect();
        let seen: Vec<i64> = merged.values().map(|v| v.2).collect();
        self.write(None, |tx| {
            // Increments, never overwrites: every replica's counts add up.
            tx.execute(
                "INSERT INTO usage (user_id, upstream, requests, denials, last_seen)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[])
                 ON CONFLICT (user_id, upstream) DO UPDATE SET
                     requests = LEAST(usage.requests::numeric + EXCLUDED.requests, 9223372036854775807)::int8,
                     denials = LEAST(usage.denials::numeric + EXCLUDED.denials, 9223372036854775807)::int8,
                     last_seen = GREATEST(usage.last_seen, EXCLUDED.last_seen)",
                &[&users, &upstreams, &requests, &denials, &seen],
            )?;
            Ok(())
        })
    }

    fn usage(&self, user: Option<&str>) -> StoreResult<Vec<Usage>> {
        if let Some(user) = user {
            check_user("user", user)?;
        }
        self.with_client(|c| {
            Ok(c.query(
                "SELECT user_id, upstream, requests, denials, last_seen FROM usage
                 WHERE ($1::text IS NULL OR user_id = $1) ORDER BY user_id, upstream",
                &[&user],
            )?
            .iter()
            .map(usage_from_row)
            .collect())
        })
    }

    fn import_users(&self, users: &[super::import::ImportUser]) -> StoreResult<Vec<CreatedKey>> {
        let now = self.now();
        let guard = self.key_guard();
        let version = guard.as_ref().map(|(v, _)| *v);
        let prepared = super::import::prepare(users, guard.as_ref().map(|(_, k)| k), now)?;
        // Replicas re-read each user of a small batch; a big one is cheaper as one resync.
        let notify: Vec<&str> = match prepared.users.len() {
            0 => return Ok(Vec::new()),
            n if n <= IMPORT_NOTIFY_EACH => prepared.users.iter().map(|(id, _)| id.as_str()).collect(),
            _ => vec![RESYNC_ALL],
        };
        self.write(None, |tx| {
            if !prepared.credentials.is_empty() {
                tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&MASTER_KEY_LOCK])?;
                if current_version(tx)? != version {
                    return Err(StoreError::RetiredMasterKey { version: version.unwrap_or(0) });
                }
            }
            insert_prepared(tx, &prepared, version).map_err(import_conflict)?;
            tx.execute("SELECT pg_notify($1, u) FROM unnest($2::text[]) AS u", &[&CHANNEL, &notify])?;
            Ok(())
        })?;
        Ok(prepared.keys.into_iter().map(|k| k.created).collect())
    }

    fn load_snapshot(&self) -> StoreResult<Snapshot> {
        let now = self.now();
        let guard = self.key_guard();
        self.read(|tx| read_snapshot(tx, guard.as_ref(), None, now))
    }

    fn load_user(&self, id: &str) -> StoreResult<Option<UserSnapshot>> {
        check_user("id", id)?;
        let now = self.now();
        let guard = self.key_guard();
        let Snapshot { mut users, keys, credentials, tokens, taken_at } =
            self.read(|tx| read_snapshot(tx, guard.as_ref(), Some(id), now))?;
        Ok(users.pop().map(|user| UserSnapshot { user, keys, credentials, tokens, taken_at }))
    }

    // No notifications below: the request path does not read these tables.

    fn use_once(&self, nonce: &[u8; 32], expires_at: UnixTime) -> StoreResult<bool> {
        let now = self.now();
        self.write(None, |tx| {
            // SKIP LOCKED: replicas pruning at the same moment skip each other's rows instead of waiting
            // on (or deadlocking with) each other; a skipped row goes with a later call.
            tx.execute(
                "DELETE FROM oauth_once WHERE nonce IN
                     (SELECT nonce FROM oauth_once WHERE expires_at < $1 FOR UPDATE SKIP LOCKED)",
                &[&(now - ONCE_KEPT_AFTER)],
            )?;
            // A replica inserting the same nonce concurrently makes this wait for its commit, then
            // conflict: exactly one of them inserts.
            let inserted = tx.execute(
                "INSERT INTO oauth_once (nonce, expires_at) VALUES ($1, $2) ON CONFLICT (nonce) DO NOTHING",
                &[&&nonce[..], &expires_at],
            )?;
            Ok(inserted == 1)
        })
    }

    fn take_lease(&self, user: &str, upstream: &str, holder: &str, seconds: i64) -> StoreResult<bool> {
        check_user("user", user)?;
        check_upstream(upstream)?;
        check_name("holder", holder)?;
        // NULL: the server's clock.
        let now = (!self.database_clock).then(|| self.now());
        self.with_client(|c| {
            // One statement: ON CONFLICT locks the existing row and evaluates the WHERE on its latest
            // version, so of replicas racing, one updates (or inserts) and the others see its lease.
            // The new lease's until is now + seconds, so `excluded.until - seconds` is now.
            let taken = c.execute(
                "INSERT INTO oauth_leases (user_id, upstream, holder, until)
                 VALUES ($1, $2, $3, COALESCE($5::bigint, floor(extract(epoch FROM now()))::bigint) + $4)
                 ON CONFLICT (user_id, upstream) DO UPDATE SET holder = excluded.holder, until = excluded.until
                 WHERE oauth_leases.until < excluded.until - $4 OR oauth_leases.holder = excluded.holder",
                &[&user, &upstream, &holder, &seconds, &now],
            )?;
            Ok(taken == 1)
        })
    }

    fn drop_lease(&self, user: &str, upstream: &str, holder: &str) -> StoreResult<()> {
        check_user("user", user)?;
        check_upstream(upstream)?;
        check_name("holder", holder)?;
        self.with_client(|c| {
            c.execute(
                "DELETE FROM oauth_leases WHERE user_id = $1 AND upstream = $2 AND holder = $3",
                &[&user, &upstream, &holder],
            )?;
            Ok(())
        })
    }

    fn derive_key(&self, label: &str) -> StoreResult<[u8; 32]> {
        self.key_guard().as_ref().map(|(_, key)| key.derive(label)).ok_or(StoreError::NoMasterKey)
    }
}

/// Shortest and longest wait before reconnecting the notification listener.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
/// How often the listener checks that the server still answers, and how long it waits for the answer.
const PING_EVERY: Duration = Duration::from_secs(1);
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// Tells `sender` what changed in the database, forever (until the receiver is dropped): connects,
/// `LISTEN`s, sends [`Change::Resync`] (after `LISTEN` is active, so no change in between is lost),
/// then one [`Change::User`] per notification (`*` as `Resync`). A lost connection (or a server that
/// stops answering for about two seconds) marks `health` down and is retried with backoff (100 ms
/// doubling to 2 s); every reconnect starts with a `Resync`, since notifications sent meanwhile are lost.
///
/// `first`: a connection that was listening before the caller read its snapshot (start-up). It needs
/// no `Resync`: every change since is queued in it.
pub async fn watch(
    config: PgConfig,
    sender: tokio::sync::mpsc::UnboundedSender<Change>,
    health: Arc<StoreHealth>,
    mut first: Option<Listening>,
) {
    let mut backoff = BACKOFF.0;
    loop {
        let why = match listen(&config, &sender, &health, &mut backoff, first.take()).await {
            Ok(()) => return,
            Err(why) => why,
        };
        if health.set(false) {
            tracing::warn!(
                store = %config,
                error = %why,
                "lost the PostgreSQL store: serving from the last snapshot, writes fail, reconnecting"
            );
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = sender.closed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// Aborts the connection task when the listener gives up on it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connection that `LISTEN`s on [`CHANNEL`]; notifications queue in it until [`watch`] takes them.
pub struct Listening {
    client: tokio_postgres::Client,
    notified: tokio::sync::mpsc::UnboundedReceiver<Result<String, String>>,
    _driver: AbortOnDrop,
}

impl Listening {
    pub async fn connect(config: &PgConfig) -> Result<Listening, String> {
        // Its own application name, so operators (and tests) can tell the listener from pooled connections.
        let mut listener = (*config.config).clone();
        let name = format!("{}-listen", listener.get_application_name().unwrap_or("mcp-tenant-proxy"));
        listener.application_name(name);
        let connect = listener.connect(tokio_postgres::NoTls);
        let (client, mut connection) = match tokio::time::timeout(CONNECT_TIMEOUT * 2, connect).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(StoreError::from(e).to_string()),
            Err(_) => return Err("connection timed out".into()),
        };
        let (notes, notified) = tokio::sync::mpsc::unbounded_channel::<Result<String, String>>();
        let driver = AbortOnDrop(tokio::spawn(async move {
            loop {
                let message = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
                let note = match message {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => Ok(n.payload().to_owned()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => Err(StoreError::from(e).to_string()),
                    None => Err("the server closed the connection".to_owned()),
                };
                let end = note.is_err();
                if notes.send(note).is_err() || end {
                    return;
                }
            }
        }));
        let listening = Listening { client, notified, _driver: driver };
        // CHANNEL is a plain identifier (LISTEN takes no parameters).
        listening.ask(&format!("LISTEN {CHANNEL}"), PING_TIMEOUT * 2).await?;
        Ok(listening)
    }

    async fn ask(&self, sql: &str, within: Duration) -> Result<(), String> {
        match tokio::time::timeout(within, self.client.batch_execute(sql)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::from(e).to_string()),
            Err(_) => Err(format!("the server did not answer within {} s", within.as_secs())),
        }
    }
}

/// One connection's life: `Ok` when the receiver is gone, `Err` with the reason the connection ended.
async fn listen(
    config: &PgConfig,
    sender: &tokio::sync::mpsc::UnboundedSender<Change>,
    health: &StoreHealth,
    backoff: &mut Duration,
    first: Option<Listening>,
) -> Result<(), String> {
    let resync = first.is_none();
    let mut listening = match first {
        Some(listening) => listening,
        None => Listening::connect(config).await?,
    };
    if health.set(true) {
        tracing::info!(store = %config, "PostgreSQL store reachable again: resyncing");
    }
    *backoff = BACKOFF.0;
    if resync && sender.send(Change::Resync).is_err() {
        return Ok(());
    }
    let mut every = tokio::time::interval(PING_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        tokio::select! {
            note = listening.notified.recv() => {
                let payload = note.unwrap_or_else(|| Err("the connection task ended".into()))?;
                let change = if payload == RESYNC_ALL { Change::Resync } else { Change::User(payload) };
                if sender.send(change).is_err() {
                    return Ok(());
                }
            }
            _ = every.tick() => listening.ask("SELECT 1", PING_TIMEOUT).await?,
            () = sender.closed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_display_and_errors_never_show_the_password() {
        let config = PgConfig::parse("postgres://mcp:hunter2-secret@db.example:6543/proxy").unwrap();
        assert!(config.has_password());
        assert_eq!(config.to_string(), "postgres://mcp@db.example:6543/proxy");
        assert_eq!(format!("{config:?}"), "PgConfig(postgres://mcp@db.example:6543/proxy, password: ***)");
        let config = PgConfig::parse("postgresql://mcp@db.example/proxy").unwrap();
        assert!(!config.has_password());
        let with = config.with_password(&Secret::new("hunter2-secret"));
        assert!(with.has_password());
        assert!(!format!("{with:?}").contains("hunter2"));
        assert!(PgConfig::parse("postgres://mcp@db/x?sslmode=require").unwrap_err().contains("sslmode=require"));
        for bad in [
            "mysql://mcp:hunter2-secret@db/x",
            "postgres://mcp:hunter2-secret@db:notaport/x",
            "postgres://mcp:hunter2-secret@db/x?sslmode=hunter2-secret",
            "postgres://:hunter2-secret@/x",
        ] {
            let e = PgConfig::parse(bad).unwrap_err();
            assert!(!e.contains("hunter2"), "{bad}: {e}");
        }
    }
}
