//! `[oauth]` and `[upstreams.<name>.oauth]`, validated: where browsers reach the proxy, and each
//! upstream's OAuth client registration (`crate::oauth` runs the flows).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Uri;

use super::raw::{RawOAuth, RawUpstreamOAuth};
use super::runtime::{Builder, is_loopback};
use crate::proxy::forward::UpstreamClient;
use crate::secret::Secret;

/// Longest a connect link may stay valid: it is a bearer token for connecting an account.
const MAX_LINK_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug)]
pub struct OAuthSettings {
    /// Without a trailing slash, e.g. `https://mcp.example.com`.
    pub public_url: String,
    /// The proxy's own routes, e.g. `/oauth`: `<path>/connect` and `<path>/callback`.
    pub path: String,
    pub link_ttl: Duration,
    /// The cookie that binds a flow to the browser that started it is `Secure` over https.
    pub secure_cookie: bool,
}

impl OAuthSettings {
    /// The redirect URI registered with every provider.
    pub fn callback_url(&self) -> String {
        format!("{}{}/callback", self.public_url, self.path)
    }

    /// The page that starts connecting an account, for a signed link.
    pub fn connect_url(&self, link: &str) -> String {
        format!("{}{}/connect?link={link}", self.public_url, self.path)
    }
}

/// A provider's endpoints, as configured or discovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderEndpoints {
    pub authorization: Uri,
    pub token: Uri,
    /// The protected resource's identifier (RFC 9728 `resource`), sent as the RFC 8707 `resource`
    /// unless the config names one.
    pub resource: Option<String>,
}

/// Where an upstream's provider endpoints come from.
pub enum Endpoints {
    Fixed(Arc<ProviderEndpoints>),
    Discovered(Box<Discovery>),
}

/// From the metadata of the configured `issuer`, which the upstream's protected-resource metadata at
/// `metadata` must name (`crate::oauth::discovery`).
pub struct Discovery {
    pub metadata: Uri,
    /// The upstream's URL: what the metadata must be about.
    pub resource: String,
    pub issuer: Uri,
    /// The endpoints last found, and when: read without waiting (never held across an await).
    pub found: std::sync::RwLock<Option<(Instant, Arc<ProviderEndpoints>)>>,
    /// Held by the one caller fetching; when the last fetch failed.
    pub fetching: tokio::sync::Mutex<Option<Instant>>,
}

pub struct UpstreamOAuth {
    pub endpoints: Endpoints,
    pub client_id: String,
    pub client_secret: Secret,
    /// Space-separated, as sent.
    pub scope: String,
    pub resource: Option<String>,
    pub refresh_before: Duration,
    /// For the token endpoint.
    pub client: UpstreamClient,
}

impl std::fmt::Debug for UpstreamOAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoints = match &self.endpoints {
            Endpoints::Fixed(e) => format!("{} {}", e.authorization, e.token),
            Endpoints::Discovered(d) => format!("discovered from {} and {}", d.metadata, d.issuer),
        };
        f.debug_struct("UpstreamOAuth")
            .field("endpoints", &endpoints)
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// RFC 9728 3.1: `/.well-known/oauth-protected-resource` between the resource's host and its path.
pub fn resource_metadata_url(resource: &Uri) -> Uri {
    let path = resource.path().trim_end_matches('/');
    let scheme = resource.scheme_str().unwrap_or("https");
    let authority = resource.authority().map_or("", |a| a.as_str());
    format!("{scheme}://{authority}/.well-known/oauth-protected-resource{path}")
        .parse()
        .unwrap_or_else(|_| resource.clone())
}

impl Builder<'_> {
    pub(super) fn oauth(&mut self, raw: &RawOAuth) -> Option<OAuthSettings> {
        let public_url = raw.public_url.trim_end_matches('/');
        // An origin only: the routes are at `path` of the requests the proxy itself receives.
        let uri = public_url
            .parse::<Uri>()
            .ok()
            .filter(|u| u.authority().is_some() && u.query().is_none() && matches!(u.path(), "" | "/"));
        let https = uri.as_ref().is_some_and(|u| u.scheme_str() == Some("https"));
        let http_loopback = uri.as_ref().is_some_and(|u| u.scheme_str() == Some("http") && is_loopback(u));
        if !(https || http_loopback) {
            // The callback carries authorization codes and the flow cookie: plain http only to this host.
            self.problem(
                "oauth.public_url",
                "must be an https:// origin without a path (http:// only on a loopback address)",
            );
        }
        let path = raw.path.as_str();
        // It goes into cookies' Path attributes and pages' form actions as it is.
        let path_bytes = |b: u8| b.is_ascii_alphanumeric() || b"/._-".contains(&b);
        if !path.starts_with('/')
            || path.len() < 2
            || path.ends_with('/')
            || path.contains("//")
            || !path.bytes().all(path_bytes)
        {
            self.problem("oauth.path", "must start with / and not end with /, of letters, digits and / . _ -");
        }
        let link_ttl = self.duration("oauth.link_ttl", &raw.link_ttl);
        if link_ttl.is_some_and(|t| t.is_zero() || t > MAX_LINK_TTL) {
            self.problem("oauth.link_ttl", "must be more than 0 and at most 24h");
        }
        Some(OAuthSettings {
            public_url: public_url.to_owned(),
            path: path.to_owned(),
            link_ttl: link_ttl?,
            secure_cookie: https,
        })
    }

    pub(super) fn upstream_oauth(
        &mut self,
        path: &str,
        upstream_url: &Uri,
        raw: &RawUpstreamOAuth,
    ) -> Option<Arc<UpstreamOAuth>> {
        let path = format!("{path}.oauth");
        let mut endpoint = |field: &str, value: &str| {
            let uri = value.parse::<Uri>().ok().filter(|u| {
                u.authority().is_some()
                    && (u.scheme_str() == Some("https") || (u.scheme_str() == Some("http") && is_loopback(u)))
            });
            if uri.is_none() {
                self.problem(format!("{path}.{field}"), "must be an https:// URL (http:// only on a loopback address)");
            }
            uri
        };
        let endpoints = match (&raw.authorization_endpoint, &raw.token_endpoint, raw.discover) {
            (Some(authorization), Some(token), false) => {
                let authorization = endpoint("authorization_endpoint", authorization);
                let token = endpoint("token_endpoint", token);
                Some(Endpoints::Fixed(Arc::new(ProviderEndpoints {
                    authorization: authorization?,
                    token: token?,
                    resource: None,
                })))
            }
            (None, None, true) => {
                let issuer = raw.issuer.as_deref().and_then(|issuer| endpoint("issuer", issuer));
                if raw.issuer.is_none() {
                    self.problem(format!("{path}.issuer"), "must be set with discover = true");
                }
                // The metadata must name the issuer: never read in clear text from off this host.
                let secure = upstream_url.scheme_str() == Some("https") || is_loopback(upstream_url);
                if !secure {
                    self.problem(
                        format!("{path}.discover"),
                        "needs an https:// upstream url (http:// only on loopback)",
                    );
                }
                issuer.filter(|_| secure).map(|issuer| {
                    Endpoints::Discovered(Box::new(Discovery {
                        metadata: resource_metadata_url(upstream_url),
                        resource: upstream_url.to_string(),
                        issuer,
                        found: std::sync::RwLock::new(None),
                        fetching: tokio::sync::Mutex::new(None),
                    }))
                })
            }
            _ => {
                self.problem(&path, "set authorization_endpoint and token_endpoint, or discover = true");
                None
            }
        };
        if raw.issuer.is_some() && !raw.discover {
            self.problem(format!("{path}.issuer"), "goes with discover = true");
        }
        if raw.client_id.is_empty() || raw.client_id.chars().any(char::is_control) {
            self.problem(format!("{path}.client_id"), "must be set");
        }
        let client_secret = match (&raw.client_secret_env, &raw.client_secret_file) {
            (None, None) => {
                self.problem(&path, "set one of client_secret_env and client_secret_file");
                None
            }
            (env, file) => self.secret(&path, None, env.as_deref(), file.as_deref(), None),
        };
        // A scope token is printable ASCII without spaces, quotes or backslashes (RFC 6749 3.3).
        let bad_scope =
            |s: &String| s.is_empty() || !s.bytes().all(|b| b == b'!' || (b'#'..=b'~').contains(&b) && b != b'\\');
        if raw.scopes.iter().any(bad_scope) {
            self.problem(format!("{path}.scopes"), "each scope must be printable ASCII without spaces, \" or \\");
        }
        if let Some(resource) = &raw.resource
            && resource.parse::<Uri>().ok().is_none_or(|u| u.scheme().is_none() || u.authority().is_none())
        {
            self.problem(format!("{path}.resource"), "must be an absolute URI (RFC 8707)");
        }
        let refresh_before = self.duration(&format!("{path}.refresh_before"), &raw.refresh_before);
        let ca_file = raw.ca_file.as_ref().map(|p| self.base_dir.join(p));
        let client = crate::proxy::forward::build_client(Duration::from_secs(5), false, ca_file.as_deref(), None)
            .map_err(|e| self.problem(format!("{path}.ca_file"), e))
            .ok();
        Some(Arc::new(UpstreamOAuth {
            endpoints: endpoints?,
            client_id: raw.client_id.clone(),
            client_secret: client_secret?,
            scope: raw.scopes.join(" "),
            resource: raw.resource.clone(),
            refresh_before: refresh_before?,
            client: client?,
        }))
    }
}
