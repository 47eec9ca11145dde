//! Proven identity: a user token (a JWT in `[identity.user_token] header`) names the acting user, and
//! its signature, issuer, audience and validity period prove it (`jwt`).
//!
//! Keys from `jwks_file` are read with the config. Keys from `jwks_url` are fetched when first needed,
//! again when a token names a key the set does not have (the issuer rotated its keys: at most once per
//! `jwks_min_refetch`, 10 s by default), and again when the set is older than `jwks_max_age` (5 min; so a key the issuer
//! withdrew stops working: this fetch runs behind the requests, which go on with the keys they have).
//! One fetch at a time; requests that cannot go on without it wait for it, within [`FETCH_TIMEOUT`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use http::{HeaderMap, Request, Uri};
use http_body_util::BodyExt;

use crate::config::runtime::{TokenKeys, UserTokenSettings};
use crate::error::ProxyError;
use crate::jwt::{self, Expect, KeySet, TokenError};
use crate::proxy::forward::UpstreamClient;
use crate::proxy::headers::single;
use crate::store::{ApiKey, TokenMode};

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed fetch, requests get `user_token_keys_unavailable` (or the keys fetched before) for
/// this long before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(2);
const MAX_KEY_SET_BYTES: usize = 256 * 1024;

/// The user token a request carries, when its key reads tokens: `Ok(None)` when it sent none (or its
/// key ignores them); refused when the key requires one and it is missing, or when it is sent twice.
pub fn presented<'h>(
    settings: Option<&UserTokenSettings>,
    header: &http::HeaderName,
    key: &ApiKey,
    headers: &'h HeaderMap,
) -> Result<Option<&'h str>, ProxyError> {
    let Some(settings) = settings else { return Ok(None) };
    let mode = key.user_token.unwrap_or(settings.mode);
    if mode == TokenMode::Ignored {
        return Ok(None);
    }
    let token = single(headers, header, "user token")?;
    match (token, mode) {
        (None, TokenMode::Required) => Err(ProxyError::UserTokenRequired),
        (None, _) => Ok(None),
        (Some(value), _) => value.to_str().map(Some).map_err(|_| ProxyError::InvalidUserToken(TokenError::Malformed)),
    }
}

/// The keys fetched from `jwks_url`, shared by every request and kept across reloads of the same URL.
#[derive(Default)]
pub struct UrlKeys(Arc<Inner>);

#[derive(Default)]
struct Inner {
    fetched: ArcSwapOption<Fetched>,
    /// One fetch at a time: held across the fetch on purpose, by the one doing it and by the requests
    /// that cannot go on without its keys (none yet, or a token's key not in them).
    fetching: Arc<tokio::sync::Mutex<()>>,
}

struct Fetched {
    uri: Uri,
    keys: Arc<KeySet>,
    /// When the last attempt was made, successful or not (failures are rate-limited too).
    tried: Instant,
    /// When `keys` were fetched.
    fetched: Option<Instant>,
}

impl UrlKeys {
    /// Verifies `token` and returns the user it names (not yet checked as a user id).
    pub async fn prove(&self, settings: &UserTokenSettings, token: &str) -> Result<String, ProxyError> {
        let expect = Expect {
            issuer: &settings.issuer,
            audience: &settings.audience,
            leeway: settings.leeway.as_secs(),
            now: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        let verified = match &settings.keys {
            TokenKeys::File(keys) => jwt::verify(token, keys, &expect),
            TokenKeys::Url { uri, client } => {
                let keys = self.current(uri, client, Want::Fresh(settings.max_age)).await?;
                match jwt::verify(token, &keys, &expect) {
                    // A stream of tokens with made-up `kid`s costs the issuer one fetch per interval.
                    Err(TokenError::UnknownKey) => {
                        let keys = self.current(uri, client, Want::Other(&keys, settings.min_refetch)).await?;
                        jwt::verify(token, &keys, &expect)
                    }
                    verified => verified,
                }
            }
        };
        let verified = verified.map_err(ProxyError::InvalidUserToken)?;
        // The configured claim; `sub` when the token has no such claim.
        let user = match verified.has(&settings.claim) {
            true => verified.claim(&settings.claim),
            false => verified.claim("sub"),
        };
        let user = user.ok_or(ProxyError::InvalidUserToken(TokenError::Claim("user")))?;
        Ok(user.to_owned())
    }

    /// The keys of `uri`, fetched first as `want` says.
    async fn current(&self, uri: &Uri, client: &UpstreamClient, want: Want<'_>) -> Result<Arc<KeySet>, ProxyError> {
        let inner = &self.0;
        let seen = inner.entry(uri);
        if let Some(f) = &seen
            && !f.wanted(want)
        {
            return f.keys();
        }
        // Keys that are only old are fetched again behind the requests, which go on with them: an
        // issuer that is slow or down never holds a request up while there are keys.
        if let (Some(f), Want::Fresh(max_age)) = (&seen, want)
            && f.fetched.is_some()
        {
            if let Ok(one) = inner.fetching.clone().try_lock_owned() {
                let (inner, uri, client) = (inner.clone(), uri.clone(), client.clone());
                tokio::spawn(async move {
                    let seen = inner.entry(&uri);
                    if seen.as_ref().is_none_or(|f| f.wanted(Want::Fresh(max_age))) {
                        inner.refetch(&uri, &client, seen).await;
                    }
                    drop(one);
                });
            }
            return f.keys();
        }
        let _one = inner.fetching.lock().await;
        // Another request may have fetched while this one waited.
        let seen = inner.entry(uri);
        if let Some(f) = &seen
            && !f.wanted(want)
        {
            return f.keys();
        }
        inner.refetch(uri, client, seen).await.keys()
    }
}

impl Inner {
    fn entry(&self, uri: &Uri) -> Option<Arc<Fetched>> {
        self.fetched.load_full().filter(|f| f.uri == *uri)
    }

    /// Fetches the set (the caller holds `fetching`) and records the try; a failed fetch withdraws
    /// nothing: the keys fetched before, `seen`, stay in use.
    async fn refetch(&self, uri: &Uri, client: &UpstreamClient, seen: Option<Arc<Fetched>>) -> Arc<Fetched> {
        let tried = Instant::now();
        let next = match fetch(uri, client).await {
            Ok(keys) => Fetched { uri: uri.clone(), keys: Arc::new(keys), tried, fetched: Some(tried) },
            Err(why) => {
                tracing::warn!(url = %uri, error = why, "user tokens: cannot fetch the issuer's keys");
                let (keys, fetched) = seen.map_or((Arc::default(), None), |p| (p.keys.clone(), p.fetched));
                Fetched { uri: uri.clone(), keys, tried, fetched }
            }
        };
        let next = Arc::new(next);
        self.fetched.store(Some(next.clone()));
        next
    }
}

/// When the keys at hand will not do.
#[derive(Clone, Copy)]
enum Want<'k> {
    /// Keys fetched less than this long ago (tries that failed are repeated after [`RETRY_AFTER`]).
    Fresh(Duration),
    /// Other keys than these, which lack a token's key, unless the last try is more recent than this.
    Other(&'k Arc<KeySet>, Duration),
}

impl Fetched {
    /// Whether `want` calls for a fetch now.
    fn wanted(&self, want: Want<'_>) -> bool {
        match want {
            Want::Fresh(max_age) => {
                let failed = self.fetched != Some(self.tried);
                self.fetched.is_none_or(|at| at.elapsed() >= max_age)
                    && (!failed || self.tried.elapsed() >= RETRY_AFTER)
            }
            // Fetched again since that token looked, or too recently.
            Want::Other(seen, min_refetch) => Arc::ptr_eq(seen, &self.keys) && self.tried.elapsed() >= min_refetch,
        }
    }

    fn keys(&self) -> Result<Arc<KeySet>, ProxyError> {
        match self.fetched {
            Some(_) => Ok(self.keys.clone()),
            None => Err(ProxyError::UserTokenKeysUnavailable),
        }
    }
}

async fn fetch(uri: &Uri, client: &UpstreamClient) -> Result<KeySet, String> {
    let request = Request::get(uri.clone())
        .header(http::header::ACCEPT, "application/json")
        .body(crate::proxy::body::empty())
        .map_err(|e| e.to_string())?;
    let fetched = async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let limited = http_body_util::Limited::new(response.into_body(), MAX_KEY_SET_BYTES);
        let body = limited.collect().await.map_err(|e| e.to_string())?.to_bytes();
        let keys = KeySet::parse(&body)?;
        match keys.keys.is_empty() {
            true => Err("the key set holds no RS256, ES256 or EdDSA signing key".into()),
            false => Ok(keys),
        }
    };
    tokio::time::timeout(FETCH_TIMEOUT, fetched).await.map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))?
}
