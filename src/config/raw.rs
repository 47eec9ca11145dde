//! The config file as written: plain serde structs, every table `deny_unknown_fields` so a typo is an
//! error that names the field. [`super::runtime`] turns these into validated runtime types.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::secret::Secret;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub identity: RawIdentity,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    #[serde(default)]
    pub users: Vec<RawUser>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub credentials: Vec<RawCredential>,
    /// The default per-user limit; none means unlimited.
    pub rate_limit: Option<RawLimit>,
    /// Where rate-limit state lives: this process (default) or a Redis shared by every replica.
    pub rate_limiter: Option<RawRateLimiter>,
    pub sessions: Option<RawSessions>,
    pub store: Option<RawStore>,
    /// Where users' browsers reach the proxy to connect their upstream accounts (`[upstreams.*.oauth]`).
    pub oauth: Option<RawOAuth>,
    #[serde(default)]
    pub log: RawLog,
}

impl RawConfig {
    /// Every file this config reads besides itself (secrets, certificates, CAs), as written: the
    /// files a running proxy watches to reload when one changes.
    pub fn files(&self) -> Vec<&Path> {
        let mut files: Vec<&Path> = Vec::new();
        if let Some(tls) = &self.server.tls {
            files.extend([tls.cert_file.as_path(), tls.key_file.as_path()]);
            files.extend(tls.client_ca_file.as_deref());
        }
        files.extend(self.admin.token_file.as_deref());
        if let Some(t) = &self.identity.user_token {
            files.extend([&t.jwks_file, &t.jwks_ca_file].into_iter().filter_map(|f| f.as_deref()));
        }
        files.extend(self.keys.iter().filter_map(|k| k.secret_file.as_deref()));
        files.extend(self.credentials.iter().filter_map(|c| c.secret_file.as_deref()));
        for u in self.upstreams.values() {
            files
                .extend([&u.ca_file, &u.client_cert_file, &u.client_key_file].into_iter().filter_map(|f| f.as_deref()));
            if let Some(o) = &u.oauth {
                files.extend([&o.client_secret_file, &o.ca_file].into_iter().filter_map(|f| f.as_deref()));
            }
        }
        if let Some(st) = &self.store {
            files.extend([&st.password_file, &st.master_key_file].into_iter().filter_map(|f| f.as_deref()));
        }
        files.extend(self.rate_limiter.as_ref().and_then(|r| r.password_file.as_deref()));
        files.extend(self.sessions.as_ref().and_then(|s| s.secret_file.as_deref()));
        files
    }
}

/// Operational logs (stderr). The audit trail is separate (`[audit]`).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// "text" (default) or "json"; the `--log-format` flag and `MCP_PROXY_LOG_FORMAT` take precedence.
    pub format: Option<String>,
}

/// The store: users, keys, credentials and token URLs managed at run time. Exactly one of `path` (the
/// embedded SQLite file) and `url` (PostgreSQL, shared by replicas; its password from `password_env` or
/// `password_file`, or, not recommended, in the URL).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub path: Option<PathBuf>,
    pub url: Option<Secret>,
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    pub master_key_env: Option<String>,
    pub master_key_file: Option<PathBuf>,
}

/// `[rate_limiter]`: `backend = "local"` (the default) or `"redis"` with its connection settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimiter {
    pub backend: String,
    /// `redis://host:port/db` or `rediss://...` (TLS is not built in); no password in it.
    pub url: Option<String>,
    pub username: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The longest a request waits on Redis; default 50ms.
    pub timeout: Option<String>,
    /// `"fail_open"` (default: the local limiter decides) or `"fail_closed"` (503).
    pub on_error: Option<String>,
    /// Prefix of every key the proxy writes; default `mtp`. Deployments sharing one Redis differ here.
    pub key_prefix: Option<String>,
}

/// The key that binds MCP sessions to users: one of the three, shared by every replica.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSessions {
    pub secret: Option<Secret>,
    pub secret_env: Option<String>,
    pub secret_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    pub max_buffered_body_bytes: u64,
    pub max_buffered_body_bytes_per_key: u64,
    pub header_read_timeout: String,
    pub body_read_timeout: String,
    pub shutdown_grace: String,
    pub idle_timeout: String,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub listen_backlog: u32,
    pub allowed_origins: Option<Vec<String>>,
    pub tls: Option<RawTls>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_header_bytes: 8192,
            max_body_bytes: 10 * 1024 * 1024,
            max_buffered_body_bytes: 256 * 1024 * 1024,
            max_buffered_body_bytes_per_key: 64 * 1024 * 1024,
            header_read_timeout: "10s".into(),
            body_read_timeout: "30s".into(),
            shutdown_grace: "30s".into(),
            idle_timeout: "60s".into(),
            max_connections: 10_000,
            // Off: behind an ingress or a service mesh every connection comes from the same few addresses.
            max_connections_per_ip: 0,
            // nginx's default; the kernel caps it at net.core.somaxconn.
            listen_backlog: 4096,
            allowed_origins: None,
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// PEM CA certificates: clients must present a certificate they issued (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// `""` turns the admin listener off.
    pub listen: String,
    /// The admin API's bearer token, from this environment variable (one of the two; none: API off).
    pub token_env: Option<String>,
    /// The admin API's bearer token, from this file.
    pub token_file: Option<PathBuf>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9090".into(), token_env: None, token_file: None }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIdentity {
    pub user_header: String,
    pub unknown_user: String,
    pub max_user_id_len: usize,
    pub user_token: Option<RawUserToken>,
}

impl Default for RawIdentity {
    fn default() -> Self {
        Self {
            user_header: "x-alloy-userid".into(),
            unknown_user: "reject".into(),
            max_user_id_len: 128,
            user_token: None,
        }
    }
}

/// `[identity.user_token]`: JWT user tokens that prove which user a request acts as.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUserToken {
    #[serde(default = "default_token_header")]
    pub header: String,
    /// The claim naming the user (`sub`, say).
    #[serde(default = "default_token_claim")]
    pub claim: String,
    /// The `typ` the token's header must have (`at+jwt`, say); unset: any.
    pub typ: Option<String>,
    pub issuer: String,
    pub audience: String,
    pub jwks_url: Option<String>,
    pub jwks_file: Option<PathBuf>,
    /// Extra PEM CA certificates trusted for an `https://` `jwks_url`, besides the webpki roots.
    pub jwks_ca_file: Option<PathBuf>,
    #[serde(default = "default_token_leeway")]
    pub leeway: String,
    /// A token whose key is not in the fetched set fetches it again at most this often.
    #[serde(default = "default_min_refetch")]
    pub jwks_min_refetch: String,
    /// Fetched keys are fetched again once they are this old.
    #[serde(default = "default_max_age")]
    pub jwks_max_age: String,
    /// For keys that set no `user_token` of their own: `required`, `allowed` or `ignored`.
    #[serde(default = "default_token_mode")]
    pub mode: String,
}

pub const DEFAULT_TOKEN_HEADER: &str = "x-alloy-user-token";

fn default_token_header() -> String {
    DEFAULT_TOKEN_HEADER.into()
}
fn default_token_claim() -> String {
    "userId".into()
}
fn default_token_leeway() -> String {
    "60s".into()
}
fn default_min_refetch() -> String {
    "10s".into()
}
fn default_max_age() -> String {
    "5m".into()
}
fn default_token_mode() -> String {
    "allowed".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudit {
    pub path: String,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self { path: "-".into() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: String,
    pub kind: String,
    pub user: String,
    #[serde(default)]
    pub act_as: Vec<String>,
    pub sha256: Option<String>,
    pub secret: Option<Secret>,
    pub secret_env: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub rate_limit: Option<RawLimit>,
    /// `required`, `allowed` or `ignored`; unset: `[identity.user_token] mode`.
    pub user_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    pub id: String,
    pub rate_limit: Option<RawLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: String,
    /// Public path prefix; default `/mcp/<name>`.
    pub path: Option<String>,
    pub inject: RawInject,
    pub forward_user_header: Option<String>,
    pub connect_timeout: Option<String>,
    pub response_header_timeout: Option<String>,
    /// Speak HTTP/2 without TLS (prior knowledge) to an `http://` upstream.
    #[serde(default)]
    pub http2_prior_knowledge: bool,
    /// Extra PEM CA certificates trusted for an `https://` upstream, besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// The certificate (PEM chain) and key the proxy presents to an `https://` upstream (mutual TLS).
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// Per user, on this upstream only.
    pub rate_limit: Option<RawLimit>,
    pub restrictions: Option<RawRestrictions>,
    /// Per user, per tool: `"create_issue" = { requests = 10, per = "1m" }`.
    #[serde(default)]
    pub tool_limits: BTreeMap<String, RawLimit>,
    /// Each user connects an account of the upstream's OAuth provider; its access token is the credential.
    pub oauth: Option<RawUpstreamOAuth>,
}

/// `[oauth]`: the proxy's address as users' browsers reach it. The provider redirects to
/// `<public_url><path>/callback`, which must be registered with it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth {
    pub public_url: String,
    #[serde(default = "default_oauth_path")]
    pub path: String,
    /// How long a connect link stays valid.
    #[serde(default = "default_link_ttl")]
    pub link_ttl: String,
}

fn default_oauth_path() -> String {
    "/oauth".into()
}

fn default_link_ttl() -> String {
    "15m".into()
}

/// `[upstreams.<name>.oauth]`: the upstream's OAuth client registration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamOAuth {
    /// Both, or neither with `discover = true`.
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: Option<String>,
    /// The endpoints from the upstream's RFC 9728 protected-resource metadata and its authorization
    /// server's RFC 8414 (or OpenID) metadata, fetched when first needed and kept for an hour.
    #[serde(default)]
    pub discover: bool,
    /// With `discover`: the authorization server trusted for this upstream. The upstream's metadata
    /// must name it; its own metadata gives the endpoints (an upstream never picks where the client
    /// secret and codes go).
    pub issuer: Option<String>,
    pub client_id: String,
    pub client_secret_env: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// RFC 8707 resource indicator sent with every authorization and token request.
    pub resource: Option<String>,
    /// Tokens are refreshed once they expire within this long.
    #[serde(default = "default_refresh_before")]
    pub refresh_before: String,
    /// Extra PEM CA certificates trusted for an `https://` token endpoint.
    pub ca_file: Option<PathBuf>,
}

fn default_refresh_before() -> String {
    "60s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestrictions {
    pub tools: Option<RawRule>,
    pub users: Option<RawRule>,
}

/// `{ allow = [...] }` or `{ block = [...] }`, with `*` globs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub allow: Option<Vec<String>>,
    pub block: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInject {
    pub header: String,
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub user: String,
    pub upstream: String,
    #[serde(default = "default_credential_id")]
    pub id: String,
    pub secret: Option<Secret>,
    pub secret_env: Option<String>,
    pub secret_file: Option<PathBuf>,
}

fn default_credential_id() -> String {
    "default".into()
}

/// `rate_limit = "unlimited"` or `rate_limit = { requests = 100, per = "1m", burst = 100 }`.
#[derive(Debug)]
pub enum RawLimit {
    Unlimited,
    Quota(RawQuota),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    pub requests: u32,
    pub per: String,
    pub burst: Option<u32>,
}

impl<'de> Deserialize<'de> for RawLimit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Unexpected, Visitor};

        struct LimitVisitor;
        impl<'de> Visitor<'de> for LimitVisitor {
            type Value = RawLimit;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"unlimited\" or a table { requests, per, burst }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawLimit, E> {
                match v {
                    "unlimited" => Ok(RawLimit::Unlimited),
                    _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawLimit, A::Error> {
                RawQuota::deserialize(de::value::MapAccessDeserializer::new(map)).map(RawLimit::Quota)
            }
        }
        deserializer.deserialize_any(LimitVisitor)
    }
}
