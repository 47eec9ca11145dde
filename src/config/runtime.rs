//! Validated runtime configuration ("parse, don't validate"): every check happens here, once, and every
//! problem is reported with its field path. The request path only reads these types.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue, Uri};

use super::oauth::{OAuthSettings, UpstreamOAuth};
use super::raw::{RawConfig, RawCredential, RawKey, RawLimit, RawRule, RawUpstream};
use crate::jwt::KeySet;
use crate::policy::mcp::Rule;
use crate::policy::ratelimit::Limit;
use crate::proxy::forward::UpstreamClient;
use crate::secret::{Secret, sha256};
use crate::store::connection::{CONNECTION_ID, Connection, Tokens};
use crate::store::live::{FileSide, Rendered};
use crate::store::{
    ApiKey, Credential, Directory, KeyKind, LiveDirectory, STORE_USER_BIT, TokenGrant, TokenMode, UpstreamId,
    UserLimit, UserPattern, UserRef, check_user_id,
};

pub struct Config {
    pub server: ServerSettings,
    pub admin_listen: Option<SocketAddr>,
    /// The admin API's bearer token (`[admin] token_env` / `token_file`); `None`: the admin API is off.
    pub admin_token: Option<Secret>,
    pub identity: IdentitySettings,
    pub audit_path: AuditPath,
    /// The config file's users, keys and credentials.
    pub directory: Directory,
    /// The store's, updated in place (shared by every config of the process: a reload keeps it).
    pub live: Arc<LiveDirectory>,
    /// Every file the config read besides itself (secrets, certificates): a change to one reloads it.
    pub files: Vec<PathBuf>,
    pub log_format: LogFormat,
    pub upstreams: Vec<Upstream>,
    /// The key binding MCP sessions to users; `None`: a random key of this process.
    pub session_secret: Option<Secret>,
    pub store: Option<StoreSettings>,
    /// Where rate-limit state lives (`[rate_limiter]`).
    pub rate_limiter: RateLimiterBackend,
    /// Where browsers reach the proxy to connect upstream accounts; set when an upstream uses OAuth.
    pub oauth: Option<OAuthSettings>,
}

/// How operational logs are written (`[log] format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line, with the request's id and trace id on every line of a request.
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }

    /// The `[log] format` of the config file at `path`, read before the logs start (the file is parsed
    /// whole later, and its problems reported then).
    pub fn of_file(path: &Path) -> Option<LogFormat> {
        #[derive(serde::Deserialize)]
        struct Only {
            log: Option<crate::config::raw::RawLog>,
        }
        let text = std::fs::read_to_string(path).ok()?;
        toml::from_str::<Only>(&text).ok()?.log?.format.as_deref().and_then(LogFormat::parse)
    }
}

/// Where rate-limit state lives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RateLimiterBackend {
    /// In this process (`governor`): each replica counts alone.
    #[default]
    Local,
    /// In Redis: every replica draws on one budget per user, key and upstream.
    Redis(RedisSettings),
}

/// `[rate_limiter] backend = "redis"`. `Debug` shows the password as `***`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisSettings {
    /// The server's URL, without credentials.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// The longest a request waits on Redis before [`RedisSettings::on_error`] applies.
    pub timeout: Duration,
    pub on_error: OnRedisError,
    pub key_prefix: String,
}

/// What a request gets while Redis cannot be reached (or answers later than the timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnRedisError {
    /// The replica's local limiter decides: limits hold per replica until Redis is back.
    FailOpen,
    /// Requests that a limit applies to are refused (503 `rate_limiter_unavailable`).
    FailClosed,
}

/// Where the store lives and the key its credentials are encrypted with.
pub struct StoreSettings {
    pub backend: StoreBackend,
    /// `None`: the store holds users and keys, and refuses credentials.
    pub master_key: Option<Secret>,
}

impl StoreSettings {
    /// Whether two configs name the same store with the same master key.
    fn same(a: Option<&StoreSettings>, b: Option<&StoreSettings>) -> bool {
        let key = |s: &StoreSettings| s.master_key.as_ref().map(|k| sha256(k.expose().as_bytes()));
        match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                let backend = match (&a.backend, &b.backend) {
                    (StoreBackend::Sqlite { path: x }, StoreBackend::Sqlite { path: y }) => x == y,
                    // The password counts: the pool opened at start would go on with the old one.
                    (StoreBackend::Postgres { config: x }, StoreBackend::Postgres { config: y }) => {
                        x.to_string() == y.to_string() && x.password_digest() == y.password_digest()
                    }
                    _ => false,
                };
                backend && key(a) == key(b)
            }
            _ => false,
        }
    }

    /// Opens (creating or migrating it) the store these settings name, with its master key.
    pub fn open(&self) -> crate::store::model::StoreResult<Arc<dyn crate::store::Store>> {
        let key = self.master_key.as_ref();
        Ok(match &self.backend {
            StoreBackend::Sqlite { path } => Arc::new(crate::store::SqliteStore::open(path, key)?),
            StoreBackend::Postgres { config } => Arc::new(crate::store::postgres::PgStore::open(config, key)?),
        })
    }
}

fn store_problem(e: crate::store::StoreError) -> ConfigError {
    ConfigError::Invalid(vec![Problem { path: "store".into(), message: e.to_string() }])
}

fn warn_not_served(skipped: Vec<String>) {
    for problem in skipped {
        tracing::warn!(%problem, "store entry not served");
    }
}

/// Which store: the embedded file, or a PostgreSQL database shared by replicas.
#[derive(Debug, Clone)]
pub enum StoreBackend {
    Sqlite {
        path: PathBuf,
    },
    /// The URL with the password applied (`Debug`/`Display` never show it).
    Postgres {
        config: crate::store::postgres::PgConfig,
    },
}

pub struct ServerSettings {
    pub listen: SocketAddr,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    /// Request-body bytes held in memory at once, over all requests and per API key.
    pub max_buffered_body_bytes: u64,
    pub max_buffered_body_bytes_per_key: u64,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub shutdown_grace: Duration,
    /// A connection with no request in flight for this long is closed (an open SSE stream is in flight).
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Open connections per client address at most; 0: no cap.
    pub max_connections_per_ip: usize,
    /// The listen backlog of the proxy and admin listeners.
    pub listen_backlog: u32,
    /// Origins whose requests are accepted (lowercase, no trailing slash). `None`: the proxy's own
    /// loopback origins (see `headers::own_origins`).
    pub allowed_origins: Option<Vec<String>>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

pub struct IdentitySettings {
    pub user_header: HeaderName,
    pub unknown_user: UnknownUserPolicy,
    pub max_user_id_len: usize,
    /// The user-token header: stripped from every request before the upstream, read only with
    /// `user_token` set.
    pub token_header: HeaderName,
    pub user_token: Option<UserTokenSettings>,
}

/// `[identity.user_token]`: what a JWT user token must satisfy, and where its keys are.
pub struct UserTokenSettings {
    /// The header's `typ` must be this (lowercase, with or without `application/`), when set.
    pub typ: Option<String>,
    pub claim: String,
    pub issuer: Arc<str>,
    pub audience: String,
    pub leeway: Duration,
    pub keys: TokenKeys,
    /// `jwks_url` only: an unknown key fetches the set again at most this often.
    pub min_refetch: Duration,
    /// `jwks_url` only: keys this old are fetched again (behind the requests, which go on with them).
    pub max_age: Duration,
    /// For keys that set no mode of their own.
    pub mode: TokenMode,
}

pub enum TokenKeys {
    /// `jwks_file`, read at load (and at every reload).
    File(Arc<KeySet>),
    /// `jwks_url`, fetched when needed (`policy::user_token`); `source` names the URL and its CA.
    Url { uri: Uri, client: Box<UpstreamClient>, source: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownUserPolicy {
    Reject,
    /// Act as the key's own user (audited as a fallback), as Alloy's platform does.
    Default,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditPath {
    Stdout,
    File(PathBuf),
}

pub struct Upstream {
    pub id: UpstreamId,
    pub name: Arc<str>,
    /// Public path prefix, e.g. `/mcp/github`.
    pub prefix: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// The upstream URL's path without a trailing slash (`""` for the root).
    pub base_path: String,
    pub inject_header: HeaderName,
    /// `inject.value`, e.g. `Bearer {secret}`; rendered per credential at load time.
    inject_template: String,
    pub forward_user_header: Option<HeaderName>,
    pub response_header_timeout: Duration,
    /// Per user, on this upstream.
    pub rate_limit: Option<Limit>,
    /// Which tools clients may call and see in `tools/list`; `None`: all.
    pub tools: Option<Arc<Rule>>,
    /// Which users may use this upstream; `None`: all.
    pub users: Option<Rule>,
    /// Per user, per tool.
    pub tool_limits: Vec<(Box<str>, Limit)>,
    pub client: UpstreamClient,
    /// Users connect their own account; its access token is the credential (`crate::oauth`).
    pub oauth: Option<Arc<UpstreamOAuth>>,
}

impl Upstream {
    /// The header value that carries `secret` to this upstream (`inject.value` with `{secret}` filled
    /// in), marked sensitive; `None` when the secret cannot go in a header.
    pub fn render_credential(&self, secret: &Secret) -> Option<HeaderValue> {
        let mut value = HeaderValue::from_str(&self.inject_template.replacen("{secret}", secret.expose(), 1)).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// The part of a public path that follows this upstream's prefix (the whole path for prefix `/`).
    pub fn rest_of<'a>(&self, path: &'a str) -> &'a str {
        if self.prefix == "/" { path } else { &path[self.prefix.len()..] }
    }
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        Self::from_toml(&text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses and validates. Relative file paths (secret files, TLS, CA) are resolved against `base_dir`.
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        Self::parse(text, base_dir, None)
    }

    /// Loads a new version of the running config: users keep the ids `self` gave them.
    pub fn reload_from_file(&self, path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        self.reload_from_toml(&text, path.parent().unwrap_or(Path::new(".")))
    }

    /// As [`Config::reload_from_file`], from text.
    pub fn reload_from_toml(&self, text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let mut next = Self::parse(text, base_dir, Some(&self.directory))?;
        next.live = self.live.clone();
        Ok(next)
    }

    fn parse(text: &str, base_dir: &Path, previous: Option<&Directory>) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        Builder { problems: Vec::new(), base_dir, previous }.build(raw)
    }

    /// Loads the config file and, when it has a `[store]`, brings the store's users, keys and
    /// credentials into the live directory (see [`Config::with_store`] and [`Config::refresh_store`]).
    /// `previous`: the running config, on reload.
    pub fn load(path: &Path, previous: Option<&Config>) -> Result<Config, ConfigError> {
        let Some(running) = previous else { return Config::from_file(path)?.with_store() };
        let config = running.reload_from_file(path)?;
        // The app opened its store once, at start (admin API, usage, the change listener): a reload that
        // pointed elsewhere would fill the directory from one store and write to another.
        if !StoreSettings::same(running.store.as_ref(), config.store.as_ref()) {
            let message =
                "changing [store] (its backend, path or URL, its password, or the master key) needs a restart";
            return Err(ConfigError::Invalid(vec![Problem { path: "store".into(), message: message.into() }]));
        }
        if let Some(store) = &config.store {
            config.refresh_store(&*store.open().map_err(store_problem)?)?;
        }
        Ok(config)
    }

    /// The files the config file at `path` names, as far as it can be read at all (a file that fails
    /// validation still names its secrets; one that is not TOML names none).
    pub fn files_named_by(path: &Path) -> Vec<PathBuf> {
        let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
        let Ok(raw) = toml::from_str::<RawConfig>(&text) else { return Vec::new() };
        let base = path.parent().unwrap_or(Path::new("."));
        raw.files().into_iter().map(|f| base.join(f)).collect()
    }

    /// Start-up: opens `[store]`, if any, and fills a new live directory from one snapshot of it (the
    /// same rules as [`Config::refresh_store`]).
    pub fn with_store(mut self) -> Result<Config, ConfigError> {
        let Some(settings) = &self.store else { return Ok(self) };
        let store = settings.open().map_err(store_problem)?;
        match LiveDirectory::load(&*store, &self, !self.shared_store()).map_err(store_problem)? {
            Err(problems) => Err(ConfigError::Invalid(problems.into_iter().map(Problem::from_line).collect())),
            Ok((live, skipped)) => {
                warn_not_served(skipped);
                self.live = Arc::new(live);
                Ok(self)
            }
        }
    }

    fn shared_store(&self) -> bool {
        matches!(self.store.as_ref().map(|s| &s.backend), Some(StoreBackend::Postgres { .. }))
    }

    /// Reloads every store user into the live directory, with this config's upstreams. The config file
    /// stays a read-only source next to the store: the same user or key declared in both is a conflict,
    /// reported (every one of them, with its path) and nothing changes.
    ///
    /// With a shared store (PostgreSQL) a conflict is skipped with a warning instead: another replica,
    /// with another config file, may have made the store user, and refusing would keep this replica
    /// from starting at all.
    pub fn refresh_store(&self, store: &dyn crate::store::Store) -> Result<(), ConfigError> {
        match self.live.refresh_all(store, self, !self.shared_store()).map_err(store_problem)? {
            Err(problems) => Err(ConfigError::Invalid(problems.into_iter().map(Problem::from_line).collect())),
            Ok(skipped) => {
                warn_not_served(skipped);
                Ok(())
            }
        }
    }

    /// The key whose SHA-256 is `sha256`: the config file's or the store's.
    pub fn key_by_hash(&self, sha256: &[u8; 32]) -> Option<Arc<ApiKey>> {
        self.directory.key_by_hash(sha256).cloned().or_else(|| self.live.key_by_hash(sha256))
    }

    /// The token URL whose SHA-256 is `sha256` (token URLs live in the store only).
    pub fn token_by_hash(&self, sha256: &[u8; 32]) -> Option<Arc<TokenGrant>> {
        self.live.token_by_hash(sha256)
    }

    /// A user of the config file or of the store.
    pub fn user(&self, name: &str) -> Option<UserRef> {
        self.directory.user_ref(name).or_else(|| self.live.user(name))
    }

    /// The user's credentials for `upstream`, from the side that holds the user.
    pub fn credentials(&self, user: &UserRef, upstream: &Upstream) -> Option<Arc<[Credential]>> {
        if user.id.0 & STORE_USER_BIT != 0 {
            self.live.credentials(&user.name, &upstream.name)
        } else {
            self.directory.credentials(user.id, upstream.id).cloned()
        }
    }

    /// The limit that applies to `user`: its own, or the config's default.
    pub fn user_limit(&self, user: &UserRef) -> Option<Limit> {
        match user.limit {
            UserLimit::Default => self.directory.default_user_limit(),
            UserLimit::Unlimited => None,
            UserLimit::Quota(limit) => Some(limit),
        }
    }

    /// Settings a reload cannot change (listeners and the audit sink are bound at start): their names.
    pub fn needs_restart(&self, next: &Config) -> Vec<&'static str> {
        let (a, b) = (&self.server, &next.server);
        [
            ("server.listen", a.listen != b.listen),
            // New certificates and client CAs are taken on reload; turning TLS on or off is not.
            ("server.tls", a.tls.is_some() != b.tls.is_some()),
            ("server.header_read_timeout", a.header_read_timeout != b.header_read_timeout),
            ("server.max_header_bytes", a.max_header_bytes != b.max_header_bytes),
            ("server.shutdown_grace", a.shutdown_grace != b.shutdown_grace),
            ("server.idle_timeout", a.idle_timeout != b.idle_timeout),
            ("server.max_connections", a.max_connections != b.max_connections),
            ("server.max_connections_per_ip", a.max_connections_per_ip != b.max_connections_per_ip),
            ("server.listen_backlog", a.listen_backlog != b.listen_backlog),
            ("admin.listen", self.admin_listen != next.admin_listen),
            ("audit.path", self.audit_path != next.audit_path),
            ("log.format", self.log_format != next.log_format),
            ("rate_limiter", self.rate_limiter != next.rate_limiter),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// The upstream serving `path`. Upstreams are sorted longest prefix first, and a prefix matches only
    /// at a segment boundary ("/mcp/git" does not serve "/mcp/github").
    pub fn upstream_by_path(&self, path: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| {
            path.strip_prefix(u.prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || u.prefix == "/")
        })
    }
}

#[derive(Debug)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    /// A `path: message` line, as the live directory reports what it could not take in.
    fn from_line(line: String) -> Problem {
        match line.split_once(": ") {
            Some((path, message)) => Problem { path: path.into(), message: message.into() },
            None => Problem { path: "store".into(), message: line },
        }
    }
}

impl FileSide for Config {
    fn has_user(&self, name: &str) -> bool {
        self.directory.user(name).is_some()
    }

    fn has_key(&self, sha256: &[u8; 32], id: &str) -> bool {
        // Config files hold a handful of keys: a scan is fine.
        self.directory.key_by_hash(sha256).is_some() || self.directory.keys().any(|k| *k.id == *id)
    }

    fn render(&self, upstream: &str, id: &str, secret: &Secret) -> Rendered {
        let Some(upstream) = self.upstreams.iter().find(|u| *u.name == *upstream) else { return Rendered::NotServed };
        // An OAuth upstream takes the user's connection only; a connection goes nowhere else (its
        // refresh token must never reach an upstream as a static credential).
        match (upstream.oauth.is_some(), id == CONNECTION_ID) {
            (true, true) => {
                let Some(tokens) = Tokens::parse(secret) else { return Rendered::Unsendable };
                match upstream.render_credential(&Secret::new(tokens.access_token.as_str())) {
                    Some(header_value) => {
                        let digest = crate::secret::sha256(secret.expose().as_bytes());
                        Rendered::Connection(
                            upstream.name.clone(),
                            Arc::new(Connection { tokens, header_value, digest }),
                        )
                    }
                    None => Rendered::Unsendable,
                }
            }
            (false, false) => match upstream.render_credential(secret) {
                Some(value) => Rendered::Value(upstream.name.clone(), value),
                None => Rendered::Unsendable,
            },
            _ => Rendered::NotServed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}")]
    Syntax(String),
    #[error("{}", ProblemList(.0))]
    Invalid(Vec<Problem>),
}

/// A TOML error as position and message only: toml's own `Display` quotes the offending line, which may
/// hold a secret (a misspelt `secret = "..."` field, an unclosed quote).
fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or_else(String::new, |span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    ConfigError::Syntax(format!("{at}{}", e.message().trim_end()))
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}", p.path, p.message)?;
        }
        Ok(())
    }
}

pub(super) struct Builder<'a> {
    problems: Vec<Problem>,
    pub(super) base_dir: &'a Path,
    previous: Option<&'a Directory>,
}

// One length rule for config, store, admin API and CLI: a name the config accepts, the store can hold.
use crate::store::model::{MAX_NAME_LEN, MAX_USER_ID_LEN};

impl Builder<'_> {
    pub(super) fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem { path: path.into(), message: message.into() });
    }

    fn build(mut self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.server(&raw);
        let log_format = match raw.log.format.as_deref().map(LogFormat::parse) {
            None => Some(LogFormat::default()),
            Some(Some(format)) => Some(format),
            Some(None) => {
                self.problem("log.format", "must be \"text\" or \"json\"");
                None
            }
        };
        let admin_listen = match raw.admin.listen.as_str() {
            "" => None,
            s => self.socket_addr("admin.listen", s),
        };
        let admin_token = match (&raw.admin.token_env, &raw.admin.token_file) {
            (None, None) => Some(None),
            (env, file) => match self.secret("admin", None, env.as_deref(), file.as_deref(), None) {
                // It guards every user and credential: a short one could be guessed.
                Some(token) if token.expose().len() < 16 => {
                    self.problem("admin", "the admin token must be at least 16 bytes (e.g. openssl rand -hex 32)");
                    None
                }
                token => token.map(Some),
            },
        };
        let identity = self.identity(&raw);
        let audit_path = match raw.audit.path.as_str() {
            "-" => AuditPath::Stdout,
            "" => {
                self.problem("audit.path", "must be \"-\" (stdout) or a file path");
                AuditPath::Stdout
            }
            p => AuditPath::File(self.base_dir.join(p)),
        };
        let upstreams = self.upstreams(&raw.upstreams);
        let session_secret = match &raw.sessions {
            None => Some(None),
            Some(s) => match self.secret(
                "sessions",
                s.secret.as_ref(),
                s.secret_env.as_deref(),
                s.secret_file.as_deref(),
                None,
            ) {
                // The key guards every session binding; a short one could be guessed offline from one id.
                Some(key) if key.expose().len() < 32 => {
                    self.problem("sessions", "the session key must be at least 32 bytes (e.g. openssl rand -hex 32)");
                    None
                }
                key => key.map(Some),
            },
        };
        let store = raw.store.as_ref().and_then(|st| {
            let master_key = match (&st.master_key_env, &st.master_key_file) {
                (None, None) => None,
                (env, file) => self.secret("store", None, env.as_deref(), file.as_deref(), None),
            };
            let backend = self.store_backend(st)?;
            Some(StoreSettings { backend, master_key })
        });
        let max_len = identity.as_ref().map_or(128, |i| i.max_user_id_len);
        let directory = self.directory(&raw, &upstreams, max_len);
        // `None` only after a problem was reported: then no `Config` is built.
        let rate_limiter = self.rate_limiter(raw.rate_limiter.as_ref()).unwrap_or_default();
        let oauth = self.oauth_needs(&raw, &upstreams, store.as_ref());

        match (self.problems.is_empty(), server, identity, session_secret, admin_token) {
            (true, Some(server), Some(identity), Some(session_secret), Some(admin_token)) => Ok(Config {
                files: raw.files().into_iter().map(|f| self.base_dir.join(f)).collect(),
                log_format: log_format.unwrap_or_default(),
                server,
                admin_listen,
                admin_token,
                identity,
                audit_path,
                directory,
                live: Arc::default(),
                upstreams,
                session_secret,
                store,
                rate_limiter,
                oauth,
            }),
            _ => Err(ConfigError::Invalid(self.problems)),
        }
    }

    /// `[oauth]` with the upstreams that use it: connections live in the store, encrypted, so both are
    /// needed; the proxy's own routes must not shadow an upstream's.
    fn oauth_needs(
        &mut self,
        raw: &RawConfig,
        upstreams: &[Upstream],
        store: Option<&StoreSettings>,
    ) -> Option<OAuthSettings> {
        let users = upstreams.iter().filter(|u| u.oauth.is_some()).map(|u| u.name.clone()).collect::<Vec<_>>();
        let settings = raw.oauth.as_ref().and_then(|o| self.oauth(o));
        if let Some(first) = users.first() {
            if raw.oauth.is_none() {
                self.problem(format!("upstreams.{first}.oauth"), "needs an [oauth] section (public_url)");
            }
            if store.is_none_or(|st| st.master_key.is_none()) {
                self.problem(format!("upstreams.{first}.oauth"), "needs a [store] with a master key");
            }
        }
        if let Some(settings) = &settings {
            // Either under the other: the connect routes come first, and would hide the upstream's paths.
            let under = |inner: &str, outer: &str| {
                inner == outer || outer == "/" || inner.strip_prefix(outer).is_some_and(|rest| rest.starts_with('/'))
            };
            for upstream in
                upstreams.iter().filter(|u| under(&u.prefix, &settings.path) || under(&settings.path, &u.prefix))
            {
                self.problem(
                    format!("upstreams.{}.path", upstream.name),
                    format!("{} and oauth.path {} must not contain one another", upstream.prefix, settings.path),
                );
            }
        }
        settings
    }

    fn store_backend(&mut self, st: &crate::config::raw::RawStore) -> Option<StoreBackend> {
        use crate::store::postgres::PgConfig;
        match (&st.path, &st.url) {
            (Some(path), None) => {
                if st.password_env.is_some() || st.password_file.is_some() {
                    self.problem("store", "password_env and password_file go with url, not path");
                    return None;
                }
                Some(StoreBackend::Sqlite { path: self.base_dir.join(path) })
            }
            (None, Some(url)) => {
                // The URL is a `Secret`: it may hold a password, and no message repeats it.
                let config = match PgConfig::parse(url.expose()) {
                    Ok(config) => config,
                    Err(why) => {
                        self.problem("store.url", why);
                        return None;
                    }
                };
                let config = match (&st.password_env, &st.password_file) {
                    (None, None) => config,
                    (env, file) => {
                        let password = self.secret("store.password", None, env.as_deref(), file.as_deref(), None)?;
                        config.with_password(&password)
                    }
                };
                Some(StoreBackend::Postgres { config })
            }
            _ => {
                self.problem("store", "set exactly one of path (SQLite) and url (PostgreSQL)");
                None
            }
        }
    }

    fn server(&mut self, raw: &RawConfig) -> Option<ServerSettings> {
        let s = &raw.server;
        let listen = self.socket_addr("server.listen", &s.listen);
        if s.max_header_bytes < 1024 {
            self.problem("server.max_header_bytes", "must be at least 1024");
        }
        if s.max_connections == 0 {
            self.problem("server.max_connections", "must be at least 1");
        }
        if s.max_body_bytes == 0 {
            self.problem("server.max_body_bytes", "must be greater than 0");
        }
        if s.max_buffered_body_bytes_per_key < s.max_body_bytes {
            self.problem("server.max_buffered_body_bytes_per_key", "must be at least server.max_body_bytes");
        }
        if s.max_buffered_body_bytes < s.max_buffered_body_bytes_per_key {
            self.problem("server.max_buffered_body_bytes", "must be at least server.max_buffered_body_bytes_per_key");
        }
        let header_read_timeout = self.duration("server.header_read_timeout", &s.header_read_timeout);
        // Zero would close every connection at once, and make the closing wait of a connection a busy loop.
        if header_read_timeout == Some(Duration::ZERO) {
            self.problem("server.header_read_timeout", "must be greater than 0");
        }
        let body_read_timeout = self.duration("server.body_read_timeout", &s.body_read_timeout);
        let shutdown_grace = self.duration("server.shutdown_grace", &s.shutdown_grace);
        let idle_timeout = self.duration("server.idle_timeout", &s.idle_timeout);
        if idle_timeout == Some(Duration::ZERO) {
            self.problem("server.idle_timeout", "must be greater than 0");
        }
        if !(1..=65535).contains(&s.listen_backlog) {
            self.problem("server.listen_backlog", "must be between 1 and 65535");
        }
        let allowed_origins = s.allowed_origins.as_ref().map(|list| {
            list.iter()
                .enumerate()
                .filter_map(|(i, origin)| {
                    let normalized = origin.trim_end_matches('/').to_ascii_lowercase();
                    let ok = normalized == "null"
                        || (normalized.starts_with("http://") || normalized.starts_with("https://"))
                            && normalized.parse::<Uri>().is_ok_and(|u| u.path() == "/");
                    if !ok {
                        self.problem(
                            format!("server.allowed_origins[{i}]"),
                            "must be an origin such as https://app.example.com[:port]",
                        );
                    }
                    ok.then_some(normalized)
                })
                .collect()
        });
        let tls = s.tls.as_ref().and_then(|tls| {
            let cert = self.base_dir.join(&tls.cert_file);
            let key = self.base_dir.join(&tls.key_file);
            let client_ca = tls.client_ca_file.as_ref().map(|p| self.base_dir.join(p));
            crate::server::tls::server_config(&cert, &key, client_ca.as_deref())
                .map_err(|e| self.problem("server.tls", e))
                .ok()
        });
        Some(ServerSettings {
            listen: listen?,
            max_header_bytes: s.max_header_bytes,
            max_body_bytes: s.max_body_bytes,
            max_buffered_body_bytes: s.max_buffered_body_bytes,
            max_buffered_body_bytes_per_key: s.max_buffered_body_bytes_per_key,
            header_read_timeout: header_read_timeout?,
            body_read_timeout: body_read_timeout?,
            shutdown_grace: shutdown_grace?,
            idle_timeout: idle_timeout?,
            max_connections: s.max_connections,
            max_connections_per_ip: s.max_connections_per_ip,
            listen_backlog: s.listen_backlog,
            allowed_origins,
            tls,
        })
    }

    fn identity(&mut self, raw: &RawConfig) -> Option<IdentitySettings> {
        let i = &raw.identity;
        let user_header = self.header_name("identity.user_header", &i.user_header);
        let unknown_user = match i.unknown_user.as_str() {
            "reject" => Some(UnknownUserPolicy::Reject),
            "default" => Some(UnknownUserPolicy::Default),
            _ => {
                self.problem("identity.unknown_user", "must be \"reject\" or \"default\"");
                None
            }
        };
        if !(1..=MAX_USER_ID_LEN).contains(&i.max_user_id_len) {
            self.problem("identity.max_user_id_len", format!("must be between 1 and {MAX_USER_ID_LEN}"));
        }
        let (token_header, user_token) = match &i.user_token {
            None => (Some(HeaderName::from_static(super::raw::DEFAULT_TOKEN_HEADER)), None),
            Some(t) => (self.header_name("identity.user_token.header", &t.header), self.user_token(t)),
        };
        if token_header.as_ref().is_some_and(|h| user_header.as_ref() == Some(h)) {
            self.problem("identity.user_token.header", "must differ from identity.user_header");
        }
        Some(IdentitySettings {
            user_header: user_header?,
            unknown_user: unknown_user?,
            max_user_id_len: i.max_user_id_len.clamp(1, MAX_USER_ID_LEN),
            token_header: token_header?,
            user_token: match &i.user_token {
                None => None,
                Some(_) => Some(user_token?),
            },
        })
    }

    fn header_name(&mut self, path: &str, name: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(name) if is_reserved_header(&name) => {
                self.problem(path, "cannot be a header the proxy itself uses");
                None
            }
            Ok(name) => Some(name),
            Err(_) => {
                self.problem(path, "is not a valid header name");
                None
            }
        }
    }

    fn user_token(&mut self, t: &super::raw::RawUserToken) -> Option<UserTokenSettings> {
        let path = "identity.user_token";
        for (field, value) in [("issuer", &t.issuer), ("audience", &t.audience), ("claim", &t.claim)] {
            if value.trim().is_empty() {
                self.problem(format!("{path}.{field}"), "must not be empty");
            }
        }
        let mode = TokenMode::parse(&t.mode).map_err(|why| self.problem(format!("{path}.mode"), why)).ok();
        let leeway = self.duration(&format!("{path}.leeway"), &t.leeway);
        if leeway.is_some_and(|l| l > Duration::from_secs(600)) {
            self.problem(format!("{path}.leeway"), "must be at most 10m");
        }
        let min_refetch = self.duration(&format!("{path}.jwks_min_refetch"), &t.jwks_min_refetch);
        let max_age = self.duration(&format!("{path}.jwks_max_age"), &t.jwks_max_age);
        let keys = match (&t.jwks_url, &t.jwks_file) {
            (Some(_), Some(_)) | (None, None) => {
                self.problem(path, "set exactly one of jwks_url and jwks_file");
                None
            }
            (None, Some(file)) => {
                if t.jwks_ca_file.is_some() {
                    self.problem(format!("{path}.jwks_ca_file"), "is only used with jwks_url");
                }
                let file = self.base_dir.join(file);
                let keys = std::fs::read(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))
                    .and_then(|json| KeySet::parse(&json));
                match keys {
                    Ok(keys) if keys.keys.is_empty() => {
                        self.problem(format!("{path}.jwks_file"), "holds no RS256, ES256 or EdDSA signing key");
                        None
                    }
                    Ok(keys) => Some(TokenKeys::File(Arc::new(keys))),
                    Err(e) => {
                        self.problem(format!("{path}.jwks_file"), e);
                        None
                    }
                }
            }
            (Some(url), None) => match url.parse::<Uri>() {
                // Whoever can change the key set can forge any user: plain http only to this host.
                Ok(uri)
                    if uri.scheme_str() == Some("https") || (uri.scheme_str() == Some("http") && is_loopback(&uri)) =>
                {
                    let ca_file = t.jwks_ca_file.as_ref().map(|p| self.base_dir.join(p));
                    match crate::proxy::forward::build_client(Duration::from_secs(5), false, ca_file.as_deref(), None) {
                        Ok(client) => {
                            // The same URL and CA across a reload keep their fetched keys; keys fetched
                            // under another CA are not reused.
                            let ca = ca_file.as_deref().and_then(|f| std::fs::read(f).ok()).unwrap_or_default();
                            let digest = sha256(&[url.as_bytes(), b"\0", &ca].concat());
                            let source = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
                            Some(TokenKeys::Url { uri, client: Box::new(client), source })
                        }
                        Err(e) => {
                            self.problem(format!("{path}.jwks_ca_file"), e);
                            None
                        }
                    }
                }
                _ => {
                    self.problem(
                        format!("{path}.jwks_url"),
                        "must be an https:// URL (http:// only on a loopback address)",
                    );
                    None
                }
            },
        };
        // Compared as the token's is: lowercase, without `application/`.
        let typ = t.typ.as_deref().map(|typ| {
            let typ = typ.trim().to_ascii_lowercase();
            typ.strip_prefix("application/").map(str::to_owned).unwrap_or(typ)
        });
        Some(UserTokenSettings {
            typ,
            claim: t.claim.clone(),
            issuer: t.issuer.as_str().into(),
            audience: t.audience.clone(),
            leeway: leeway?,
            keys: keys?,
            min_refetch: min_refetch?,
            max_age: max_age?,
            mode: mode?,
        })
    }

    fn upstreams(&mut self, raw: &BTreeMap<String, RawUpstream>) -> Vec<Upstream> {
        let mut upstreams: Vec<Upstream> = Vec::new();
        for (index, (name, u)) in raw.iter().enumerate() {
            let path = format!("upstreams.{name}");
            if let Err(why) = crate::store::check_upstream_name(name) {
                self.problem(&path, format!("upstream name {why}"));
                continue;
            }
            let prefix = u.path.clone().unwrap_or_else(|| format!("/mcp/{name}"));
            if !prefix.starts_with('/') || (prefix.len() > 1 && prefix.ends_with('/')) || prefix.contains(['?', '#']) {
                self.problem(format!("{path}.path"), "must start with / and not end with /");
            }
            if let Some(other) = upstreams.iter().find(|o| o.prefix == prefix) {
                self.problem(format!("{path}.path"), format!("{prefix} is already served by upstream {}", other.name));
            }
            if let Some(upstream) = self.upstream(&path, index, name, prefix, u) {
                upstreams.push(upstream);
            }
        }
        // Longest prefix first, so `upstream_by_path` picks the most specific route.
        upstreams.sort_by_key(|u| std::cmp::Reverse(u.prefix.len()));
        upstreams
    }

    fn upstream(&mut self, path: &str, index: usize, name: &str, prefix: String, u: &RawUpstream) -> Option<Upstream> {
        let url: Option<Uri> = u.url.parse().ok().filter(|url: &Uri| {
            matches!(url.scheme_str(), Some("http" | "https")) && url.authority().is_some() && url.query().is_none()
        });
        if url.is_none() {
            self.problem(format!("{path}.url"), "must be an absolute http:// or https:// URL without a query");
        }
        // `authorization` is the usual target; every other header the proxy sets itself is off limits.
        let inject_header = HeaderName::from_bytes(u.inject.header.as_bytes())
            .ok()
            .filter(|h| *h == http::header::AUTHORIZATION || !is_reserved_header(h));
        if inject_header.is_none() {
            self.problem(format!("{path}.inject.header"), "is not a valid header name, or one the proxy sets itself");
        }
        if u.forward_user_header.as_deref().is_some_and(|f| f.eq_ignore_ascii_case(&u.inject.header)) {
            self.problem(format!("{path}.forward_user_header"), "must differ from inject.header");
        }
        if u.inject.value.matches("{secret}").count() != 1 {
            self.problem(format!("{path}.inject.value"), "must contain {secret} exactly once");
        }
        let forward_user_header = match &u.forward_user_header {
            None => Some(None),
            Some(h) => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(name) if !is_reserved_header(&name) => Some(Some(name)),
                _ => {
                    self.problem(format!("{path}.forward_user_header"), "is not a usable header name");
                    None
                }
            },
        };
        let connect_timeout =
            self.duration(&format!("{path}.connect_timeout"), u.connect_timeout.as_deref().unwrap_or("5s"));
        let response_header_timeout = self.duration(
            &format!("{path}.response_header_timeout"),
            u.response_header_timeout.as_deref().unwrap_or("60s"),
        );
        let ca_file = u.ca_file.as_ref().map(|p| self.base_dir.join(p));
        let rate_limit = self.limit(&format!("{path}.rate_limit"), u.rate_limit.as_ref());
        let restrictions = u.restrictions.as_ref();
        let tools = self.rule(&format!("{path}.restrictions.tools"), restrictions.and_then(|r| r.tools.as_ref()));
        let users = self.rule(&format!("{path}.restrictions.users"), restrictions.and_then(|r| r.users.as_ref()));
        let tool_limits: Option<Vec<_>> = u
            .tool_limits
            .iter()
            .map(|(tool, raw)| {
                let limit = self.limit(&format!("{path}.tool_limits.{tool}"), Some(raw))?;
                Some(limit.map(|l| (Box::from(tool.as_str()), l)))
            })
            .collect::<Option<Vec<_>>>()
            .map(|l| l.into_iter().flatten().collect());
        let oauth = match &u.oauth {
            None => Some(None),
            Some(raw) => url.as_ref().and_then(|url| self.upstream_oauth(path, url, raw)).map(Some),
        };
        let url = url?;
        let is_https = url.scheme_str() == Some("https");
        if u.http2_prior_knowledge && is_https {
            self.problem(
                format!("{path}.http2_prior_knowledge"),
                "is for http:// upstreams; https negotiates HTTP/2 by ALPN",
            );
        }
        if ca_file.is_some() && !is_https {
            self.problem(format!("{path}.ca_file"), "is only used by https:// upstreams");
        }
        let client_identity = match (&u.client_cert_file, &u.client_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((self.base_dir.join(cert), self.base_dir.join(key))),
            _ => {
                self.problem(format!("{path}.client_cert_file"), "client_cert_file and client_key_file go together");
                None
            }
        };
        if client_identity.is_some() && !is_https {
            self.problem(format!("{path}.client_cert_file"), "is only used by https:// upstreams");
        }
        let identity = client_identity.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path()));
        let client = crate::proxy::forward::build_client(
            connect_timeout?,
            u.http2_prior_knowledge,
            ca_file.as_deref(),
            identity,
        )
        .map_err(|e| {
            // The message starts with the setting it is about.
            let field = ["ca_file", "client_cert_file", "client_key_file"]
                .into_iter()
                .find(|field| e.starts_with(field))
                .unwrap_or("client_cert_file");
            self.problem(format!("{path}.{field}"), e)
        })
        .ok()?;
        let authority = url.authority()?.clone();
        Some(Upstream {
            id: UpstreamId(u16::try_from(index).ok()?),
            name: name.into(),
            prefix,
            scheme: url.scheme()?.clone(),
            authority,
            base_path: url.path().trim_end_matches('/').to_owned(),
            inject_header: inject_header?,
            inject_template: u.inject.value.clone(),
            forward_user_header: forward_user_header?,
            response_header_timeout: response_header_timeout?,
            rate_limit: rate_limit?,
            tools: tools?.map(Arc::new),
            users: users?,
            tool_limits: tool_limits?,
            client,
            oauth: oauth?,
        })
    }

    fn directory(&mut self, raw: &RawConfig, upstreams: &[Upstream], max_len: usize) -> Directory {
        let mut dir = self.previous.map_or_else(Directory::default, Directory::continuing);
        if let Some(limit) = self.limit("rate_limit", raw.rate_limit.as_ref()) {
            dir.set_default_user_limit(limit);
        }
        for (i, user) in raw.users.iter().enumerate() {
            let path = format!("users[{i}].id");
            let limit = self.limit(&format!("users[{i}].rate_limit"), user.rate_limit.as_ref());
            if let Err(why) = check_user_id(&user.id, max_len) {
                self.problem(path, why);
            } else if dir.user(&user.id).is_some() {
                self.problem(path, format!("user {} is listed twice", user.id));
            } else {
                let id = dir.add_user(&user.id);
                if let (Some(limit), Some(_)) = (limit, &user.rate_limit) {
                    dir.set_user_limit(id, limit.map_or(UserLimit::Unlimited, UserLimit::Quota));
                }
            }
        }
        let mut key_ids = std::collections::HashSet::new();
        for (i, key) in raw.keys.iter().enumerate() {
            if !key_ids.insert(key.id.as_str()) {
                self.problem(format!("keys[{i}].id"), format!("key id {} is used twice", key.id));
            }
            // A mode with no tokens to read would leave the user header alone to decide: fail closed.
            if key.user_token.is_some() && raw.identity.user_token.is_none() {
                self.problem(format!("keys[{i}].user_token"), "needs an [identity.user_token] section");
            }
            self.key(&mut dir, i, key, max_len);
        }
        for (i, cred) in raw.credentials.iter().enumerate() {
            self.credential(&mut dir, i, cred, upstreams, &raw.upstreams);
        }
        dir
    }

    fn key(&mut self, dir: &mut Directory, i: usize, key: &RawKey, max_len: usize) {
        let path = format!("keys[{i}]");
        if let Err(why) = check_user_id(&key.id, MAX_NAME_LEN) {
            self.problem(
                format!("{path}.id"),
                format!("key ids use the user-id characters, 1 to {MAX_NAME_LEN}: {why}"),
            );
        }
        let kind = match key.kind.as_str() {
            "standard" => Some(KeyKind::Standard),
            "enterprise" => Some(KeyKind::Enterprise),
            _ => {
                self.problem(format!("{path}.kind"), "must be \"standard\" or \"enterprise\"");
                None
            }
        };
        if let Err(why) = check_user_id(&key.user, max_len) {
            self.problem(format!("{path}.user"), why);
        }
        if kind == Some(KeyKind::Standard) && !key.act_as.is_empty() {
            self.problem(
                format!("{path}.act_as"),
                "standard keys act as their own user only; use kind = \"enterprise\"",
            );
        }
        for (j, pattern) in key.act_as.iter().enumerate() {
            let literal = pattern.strip_suffix('*').unwrap_or(pattern);
            if pattern != "*" && check_user_id(literal, max_len).is_err() {
                self.problem(format!("{path}.act_as[{j}]"), "must be \"*\", a user id, or a prefix ending in *");
            }
        }
        let hash = match (
            &key.sha256,
            self.secret(
                &path,
                key.secret.as_ref(),
                key.secret_env.as_deref(),
                key.secret_file.as_deref(),
                Some(key.sha256.is_some()),
            ),
        ) {
            (Some(hex_digest), _) => {
                let mut digest = [0u8; 32];
                match hex::decode_to_slice(hex_digest.trim(), &mut digest) {
                    Ok(()) => Some(digest),
                    Err(_) => {
                        self.problem(format!("{path}.sha256"), "must be 64 hex digits");
                        None
                    }
                }
            }
            (None, Some(secret)) => Some(sha256(secret.expose().as_bytes())),
            (None, None) => None,
        };
        let rate_limit = self.limit(&format!("{path}.rate_limit"), key.rate_limit.as_ref());
        let (Some(kind), Some(hash), Some(rate_limit)) = (kind, hash, rate_limit) else { return };
        dir.add_user(&key.user);
        let Some(user) = dir.user_ref(&key.user) else { return };
        let act_as = key.act_as.iter().map(|p| UserPattern::parse(p)).collect();
        let user_token = match key.user_token.as_deref().map(TokenMode::parse).transpose() {
            Ok(mode) => mode,
            Err(why) => return self.problem(format!("{path}.user_token"), why),
        };
        let id = key.id.as_str().into();
        let key = ApiKey { index: 0, id, kind, user, act_as, rate_limit, expires_at: None, user_token };
        if !dir.add_key(hash, key) {
            self.problem(path, "the same key value is configured twice");
        }
    }

    fn credential(
        &mut self,
        dir: &mut Directory,
        i: usize,
        cred: &RawCredential,
        upstreams: &[Upstream],
        declared_upstreams: &BTreeMap<String, RawUpstream>,
    ) {
        let path = format!("credentials[{i}]");
        let user = dir.user(&cred.user);
        if user.is_none() {
            self.problem(
                format!("{path}.user"),
                format!("unknown user {:?}: list it in [[users]] or as a key's user", cred.user),
            );
        }
        // An upstream that is declared but invalid has its own problem reported; don't add a second one.
        let upstream = upstreams.iter().find(|u| *u.name == *cred.upstream);
        if !declared_upstreams.contains_key(&cred.upstream) {
            self.problem(format!("{path}.upstream"), format!("unknown upstream {:?}", cred.upstream));
        }
        if check_user_id(&cred.id, MAX_NAME_LEN).is_err() {
            self.problem(
                format!("{path}.id"),
                format!("credential ids use the user-id characters, 1 to {MAX_NAME_LEN}"),
            );
        }
        let secret =
            self.secret(&path, cred.secret.as_ref(), cred.secret_env.as_deref(), cred.secret_file.as_deref(), None);
        let (Some(user), Some(upstream), Some(secret)) = (user, upstream, secret) else { return };
        let Some(header_value) = upstream.render_credential(&secret) else {
            self.problem(path, "the secret contains characters that cannot be sent in a header");
            return;
        };
        if !dir.add_credential(user, upstream.id, Credential { id: cred.id.as_str().into(), header_value }) {
            self.problem(
                format!("{path}.id"),
                format!("user {} already has credential {:?} for {}", cred.user, cred.id, cred.upstream),
            );
        }
    }

    /// Resolves `secret` / `secret_env` / `secret_file`: exactly one must be set, or none when an API key
    /// gives its `sha256` (`sha256` is `None` for credentials, which have no such field).
    pub(super) fn secret(
        &mut self,
        path: &str,
        inline: Option<&Secret>,
        env: Option<&str>,
        file: Option<&Path>,
        sha256: Option<bool>,
    ) -> Option<Secret> {
        let has_hash = sha256 == Some(true);
        let sources = usize::from(inline.is_some())
            + usize::from(env.is_some())
            + usize::from(file.is_some())
            + usize::from(has_hash);
        if sources != 1 {
            let what = if sha256.is_some() {
                "sha256, secret, secret_env or secret_file"
            } else {
                "secret, secret_env or secret_file"
            };
            self.problem(path, format!("set exactly one of {what}"));
            return None;
        }
        let secret = if let Some(s) = inline {
            s.clone()
        } else if let Some(name) = env {
            match std::env::var(name) {
                Ok(v) => Secret::new(v.trim()),
                Err(_) => {
                    self.problem(format!("{path}.secret_env"), format!("environment variable {name} is not set"));
                    return None;
                }
            }
        } else {
            let file = self.base_dir.join(file?);
            match std::fs::read_to_string(&file) {
                // Kubernetes Secret mounts and `echo > file` leave a trailing newline.
                Ok(v) => Secret::new(v.trim()),
                Err(e) => {
                    self.problem(format!("{path}.secret_file"), format!("cannot read {}: {e}", file.display()));
                    return None;
                }
            }
        };
        if secret.expose().is_empty() {
            self.problem(path, "the secret is empty");
            return None;
        }
        Some(secret)
    }

    fn socket_addr(&mut self, path: &str, value: &str) -> Option<SocketAddr> {
        value
            .parse()
            .map_err(|_| self.problem(path, format!("{value:?} is not an address such as 127.0.0.1:8080")))
            .ok()
    }

    /// `Some(None)` for no rule, `None` after reporting a problem.
    fn rule(&mut self, path: &str, raw: Option<&RawRule>) -> Option<Option<Rule>> {
        let Some(raw) = raw else { return Some(None) };
        match (&raw.allow, &raw.block) {
            (Some(list), None) => Some(Some(Rule::Allow(list.clone()))),
            (None, Some(list)) => Some(Some(Rule::Block(list.clone()))),
            _ => {
                self.problem(path, "set exactly one of allow or block");
                None
            }
        }
    }

    /// `Some(None)` for no limit (absent or "unlimited"), `None` after reporting a problem.
    fn limit(&mut self, path: &str, raw: Option<&RawLimit>) -> Option<Option<Limit>> {
        let Some(RawLimit::Quota(q)) = raw else { return Some(None) };
        let per = self.duration(&format!("{path}.per"), &q.per)?;
        let Some(requests) = std::num::NonZeroU32::new(q.requests) else {
            self.problem(
                format!("{path}.requests"),
                "must be at least 1 (use rate_limit = \"unlimited\" for no limit)",
            );
            return None;
        };
        let burst = match q.burst.map(std::num::NonZeroU32::new) {
            None => None,
            Some(Some(burst)) => Some(burst),
            Some(None) => {
                self.problem(format!("{path}.burst"), "must be at least 1");
                return None;
            }
        };
        match Limit::new(requests, per, burst) {
            Ok(limit) => Some(Some(limit)),
            Err(why) => {
                self.problem(path, why);
                None
            }
        }
    }

    /// `[rate_limiter]`. The URL is never echoed in a problem: it may hold a password.
    fn rate_limiter(&mut self, raw: Option<&super::raw::RawRateLimiter>) -> Option<RateLimiterBackend> {
        let Some(raw) = raw else { return Some(RateLimiterBackend::Local) };
        let redis_only = [
            ("url", raw.url.is_some()),
            ("username", raw.username.is_some()),
            ("password_env", raw.password_env.is_some()),
            ("password_file", raw.password_file.is_some()),
            ("timeout", raw.timeout.is_some()),
            ("on_error", raw.on_error.is_some()),
            ("key_prefix", raw.key_prefix.is_some()),
        ];
        match raw.backend.as_str() {
            "local" => {
                for (field, _) in redis_only.iter().filter(|(_, set)| *set) {
                    self.problem(format!("rate_limiter.{field}"), "applies to backend = \"redis\" only");
                }
                return Some(RateLimiterBackend::Local);
            }
            "redis" => {}
            _ => {
                self.problem("rate_limiter.backend", "must be \"local\" or \"redis\"");
                return None;
            }
        }
        let url = match raw.url.as_deref() {
            None => {
                self.problem("rate_limiter.url", "is required with backend = \"redis\" (redis://host:port/db)");
                None
            }
            Some(url) if url.starts_with("rediss:") || url.starts_with("valkeys:") => {
                self.problem("rate_limiter.url", "TLS to Redis is not built in: use redis:// on a private network");
                None
            }
            Some(url) => match redis::IntoConnectionInfo::into_connection_info(url) {
                Err(_) => {
                    self.problem("rate_limiter.url", "is not a Redis URL such as redis://10.0.0.5:6379/0");
                    None
                }
                Ok(info)
                    if info.redis_settings().password().is_some() || info.redis_settings().username().is_some() =>
                {
                    self.problem(
                        "rate_limiter.url",
                        "must not contain credentials: set username, and password_env or password_file",
                    );
                    None
                }
                Ok(_) => Some(url.to_owned()),
            },
        };
        let password = match (&raw.password_env, &raw.password_file) {
            (None, None) => Some(None),
            (Some(_), Some(_)) => {
                self.problem("rate_limiter", "set at most one of password_env or password_file");
                None
            }
            (Some(name), None) => match std::env::var(name) {
                Ok(v) => Some(Some(Secret::new(v.trim()))),
                Err(_) => {
                    self.problem("rate_limiter.password_env", format!("environment variable {name} is not set"));
                    None
                }
            },
            (None, Some(file)) => {
                let file = self.base_dir.join(file);
                match std::fs::read_to_string(&file) {
                    // Kubernetes Secret mounts and `echo > file` leave a trailing newline.
                    Ok(v) => Some(Some(Secret::new(v.trim()))),
                    Err(e) => {
                        self.problem("rate_limiter.password_file", format!("cannot read {}: {e}", file.display()));
                        None
                    }
                }
            }
        };
        let timeout = self.duration("rate_limiter.timeout", raw.timeout.as_deref().unwrap_or("50ms"));
        if timeout.is_some_and(|t| t.is_zero() || t > Duration::from_secs(10)) {
            self.problem("rate_limiter.timeout", "must be more than 0 and at most 10s (the request waits this long)");
        }
        let on_error = match raw.on_error.as_deref().unwrap_or("fail_open") {
            "fail_open" => Some(OnRedisError::FailOpen),
            "fail_closed" => Some(OnRedisError::FailClosed),
            _ => {
                self.problem("rate_limiter.on_error", "must be \"fail_open\" or \"fail_closed\"");
                None
            }
        };
        let key_prefix = raw.key_prefix.clone().unwrap_or_else(|| "mtp".into());
        if key_prefix.is_empty()
            || key_prefix.len() > 64
            || !key_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            self.problem("rate_limiter.key_prefix", "must be 1 to 64 ASCII letters, digits or -_.:");
        }
        Some(RateLimiterBackend::Redis(RedisSettings {
            url: url?,
            username: raw.username.clone(),
            password: password?,
            timeout: timeout?,
            on_error: on_error?,
            key_prefix,
        }))
    }

    pub(super) fn duration(&mut self, path: &str, value: &str) -> Option<Duration> {
        humantime::parse_duration(value)
            .map_err(|_| self.problem(path, format!("{value:?} is not a duration such as \"30s\" or \"1m\"")))
            .ok()
    }
}

/// A URL whose host is `localhost` or a loopback address.
pub fn is_loopback(uri: &Uri) -> bool {
    match uri.host() {
        Some("localhost") => true,
        Some(host) => host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// Headers the proxy sets or strips itself; config may not repurpose them.
fn is_reserved_header(name: &HeaderName) -> bool {
    use http::header::*;
    [AUTHORIZATION, HOST, ORIGIN, CONTENT_LENGTH, CONTENT_TYPE, CONNECTION, TRANSFER_ENCODING, TE, TRAILER, UPGRADE]
        .contains(name)
        || name.as_str() == crate::proxy::headers::CREDENTIAL_ID
        || ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "mcp-session-id"]
            .contains(&name.as_str())
        || name.as_str().starts_with("proxy-")
}
