//! Proven identity: a user token (a JWT in `[identity.user_token] header`) names the acting user, and
//! its signature, issuer, audience and validity period prove it (`jwt`).
//!
//! Keys from `jwks_file` are read with the config. Keys from `jwks_url` are fetched when first needed,
//! again when a token names a key the set does not have (the issuer rotated its keys: at most once per
//! `jwks_min_refetch`, 10 s by default), and again when the set is older than [`MAX_KEYS_AGE`] (so a key the issuer
//! withdrew stops working). One fetch at a time: requests that need it wait for that one, within
//! [`FETCH_TIMEOUT`]; other requests go on with the keys they have.

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

/// Keys are fetched again once they are this old.
const MAX_KEYS_AGE: Duration = Duration::from_secs(300);
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
pub struct UrlKeys {
    fetched: ArcSwapOption<Fetched>,
    /// One fetch at a time: held across the fetch on purpose, by the requests that need new keys only.
    fetching: tokio::sync::Mutex<()>,
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
                let keys = self.current(uri, client, None).await?;
                match jwt::verify(token, &keys, &expect) {
                    // A stream of tokens with made-up `kid`s costs the issuer one fetch per interval.
                    Err(TokenError::UnknownKey) => {
                        let keys = self.current(uri, client, Some((&keys, settings.min_refetch))).await?;
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

    /// The keys of `uri`. They are fetched when there are none yet or they are older than
    /// [`MAX_KEYS_AGE`] (not twice within [`RETRY_AFTER`] when fetching fails), or when `stale` (the set
    /// a token's key was not found in, and the least time between such fetches) is still the current set.
    async fn current(
        &self,
        uri: &Uri,
        client: &UpstreamClient,
        stale: Option<(&Arc<KeySet>, Duration)>,
    ) -> Result<Arc<KeySet>, ProxyError> {
        let entry = || self.fetched.load_full().filter(|f| f.uri == *uri);
        if let Some(f) = entry()
            && !f.wanted(stale)
        {
            return f.keys();
        }
        let _one = self.fetching.lock().await;
        // Another request may have fetched while this one waited.
        let seen = entry();
        if let Some(f) = &seen
            && !f.wanted(stale)
        {
            return f.keys();
        }
        let tried = Instant::now();
        let next = match fetch(uri, client).await {
            Ok(keys) => Fetched { uri: uri.clone(), keys: Arc::new(keys), tried, fetched: Some(tried) },
            Err(why) => {
                tracing::warn!(url = %uri, error = why, "user tokens: cannot fetch the issuer's keys");
                // A failed fetch withdraws nothing: the keys fetched before stay in use.
                let (keys, fetched) = seen.map_or((Arc::default(), None), |p| (p.keys.clone(), p.fetched));
                Fetched { uri: uri.clone(), keys, tried, fetched }
            }
        };
        let next = Arc::new(next);
        self.fetched.store(Some(next.clone()));
        next.keys()
    }
}

impl Fetched {
    fn wanted(&self, stale: Option<(&Arc<KeySet>, Duration)>) -> bool {
        match stale {
            // Fetched again since that token looked, or too recently.
            Some((seen, min_refetch)) => Arc::ptr_eq(seen, &self.keys) && self.tried.elapsed() >= min_refetch,
            None => self.fetched.is_none_or(|at| at.elapsed() >= MAX_KEYS_AGE) && self.tried.elapsed() >= RETRY_AFTER,
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
