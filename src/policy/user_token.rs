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

use crate::config::runtime::{IdentitySettings, TokenKeys, UserTokenSettings};
use crate::error::ProxyError;
use crate::jwt::{self, Expect, KeySet, TokenError};
use crate::proxy::forward::{UpstreamClient, call_bounded};
use crate::proxy::headers::single;
use crate::store::{ApiKey, TokenMode, check_user_id};

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys that could not be fetched again for this long are no longer used (token requests get 503):
/// a key the issuer withdrew must not verify for ever while its key set cannot be reached.
const MAX_STALE: Duration = Duration::from_secs(24 * 3600);
/// After a failed fetch, requests get `user_token_keys_unavailable` (or the keys fetched before) for
/// this long before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(2);
const MAX_KEY_SET_BYTES: usize = 256 * 1024;

/// The user token a request carries, when its key reads tokens, with the settings to check it by:
/// `Ok(None)` when it sent none (or its key ignores them); refused when the key requires one and it is
/// missing, or when it is sent twice.
fn presented<'h, 's>(
    settings: Option<&'s UserTokenSettings>,
    header: &http::HeaderName,
    key: &ApiKey,
    headers: &'h HeaderMap,
) -> Result<Option<(&'h str, &'s UserTokenSettings)>, ProxyError> {
    let Some(settings) = settings else {
        // A store key may require tokens while the config reads none: fail closed, never let the
        // user header alone decide for it.
        return match key.user_token {
            Some(TokenMode::Required) => Err(ProxyError::UserTokensNotConfigured),
            _ => Ok(None),
        };
    };
    let mode = key.user_token.unwrap_or(settings.mode);
    if mode == TokenMode::Ignored {
        return Ok(None);
    }
    let token = single(headers, header, "user token")?;
    match (token, mode) {
        (None, TokenMode::Required) => Err(ProxyError::UserTokenRequired),
        (None, _) => Ok(None),
        (Some(value), _) => match value.to_str() {
            Ok(token) => Ok(Some((token, settings))),
            Err(_) => Err(ProxyError::InvalidUserToken(TokenError::Malformed)),
        },
    }
}

/// Failed token checks a key may cause per second. Past that its token requests are refused (429) for
/// the rest of the second without being checked: a token check is a signature verification (up to an
/// RSA-8192 one per key of the set), and refusals come before any rate limit.
const MAX_FAILURES_PER_SECOND: u32 = 50;

/// How long a token that verified is still checked while its key is over the failure cap.
const VERIFIED_KEPT: Duration = Duration::from_secs(300);
/// Most token digests remembered as verified (then the set starts over), and most keys' failure
/// counts kept before the finished ones are dropped.
const MAX_VERIFIED: usize = 10_000;

/// What the request path keeps for user tokens: the fetched keys and the failures per API key.
#[derive(Default)]
pub struct UserTokens {
    keys: UrlKeys,
    /// Per API key id: the start of its current one-second window and its failures in it.
    failures: dashmap::DashMap<Arc<str>, (Instant, u32)>,
    /// SHA-256 of tokens that verified, and when: one client of a shared key sending forged tokens
    /// does not get the key's other clients, whose tokens verified before, refused with it (theirs are
    /// still checked, every time).
    verified: dashmap::DashMap<[u8; 32], Instant>,
}

impl UserTokens {
    /// The user a request's token proves, where its key reads one, with the token's issuer: a valid
    /// user id, and the one the user header `named`, if it named one.
    pub async fn proven_user(
        &self,
        identity: &IdentitySettings,
        key: &ApiKey,
        headers: &HeaderMap,
        named: Option<&str>,
    ) -> Result<Option<(String, Arc<str>)>, ProxyError> {
        let Some((token, settings)) = presented(identity.user_token.as_ref(), &identity.token_header, key, headers)?
        else {
            return Ok(None);
        };
        let user = self.prove(settings, key, token).await?;
        if named.is_some_and(|named| named != user) {
            return Err(ProxyError::UserTokenMismatch);
        }
        check_user_id(&user, identity.max_user_id_len).map_err(ProxyError::InvalidUserId)?;
        Ok(Some((user, settings.issuer.clone())))
    }

    /// Verifies `token`, sent with `key`, and returns the user it names (not yet checked as a user id).
    async fn prove(&self, settings: &UserTokenSettings, key: &ApiKey, token: &str) -> Result<String, ProxyError> {
        let now = Instant::now();
        let in_window = |(start, _): &(Instant, u32)| now.duration_since(*start) < Duration::from_secs(1);
        let digest = crate::secret::sha256(token.as_bytes());
        if self.failures.get(&key.id).is_some_and(|f| in_window(&f) && f.1 >= MAX_FAILURES_PER_SECOND)
            && self.verified.get(&digest).is_none_or(|at| at.elapsed() >= VERIFIED_KEPT)
        {
            return Err(ProxyError::TooManyInvalidUserTokens);
        }
        let proven = self.keys.prove(settings, token).await;
        if proven.is_ok() {
            if self.verified.len() >= MAX_VERIFIED {
                self.verified.clear();
            }
            self.verified.insert(digest, now);
        }
        if matches!(proven, Err(ProxyError::InvalidUserToken(_))) {
            // One entry per key that failed lately: the ones whose second is over go when there are many.
            if self.failures.len() >= MAX_VERIFIED {
                self.failures.retain(|_, f| in_window(f));
            }
            let mut entry = self.failures.entry(key.id.clone()).or_insert((now, 0));
            if !in_window(&entry) {
                *entry = (now, 0);
            }
            entry.1 += 1;
        }
        proven
    }
}

/// The keys fetched from `jwks_url`, shared by every request and kept across reloads of the same URL
/// and CA.
#[derive(Default)]
struct UrlKeys(Arc<Inner>);

#[derive(Default)]
struct Inner {
    fetched: ArcSwapOption<Fetched>,
    /// One fetch at a time: held across the fetch on purpose, by the one doing it and by the requests
    /// that cannot go on without its keys (none yet, or a token's key not in them).
    fetching: Arc<tokio::sync::Mutex<()>>,
}

/// Where keys come from: `source` names the URL and the CA that checks it, so keys fetched under
/// another (after a reload) are never used under this one.
struct KeySource<'a> {
    uri: &'a Uri,
    client: &'a UpstreamClient,
    source: u64,
}

struct Fetched {
    source: u64,
    keys: Arc<KeySet>,
    /// When the last attempt was made, successful or not (failures are rate-limited too).
    tried: Instant,
    /// When `keys` were fetched.
    fetched: Option<Instant>,
}

impl UrlKeys {
    async fn prove(&self, settings: &UserTokenSettings, token: &str) -> Result<String, ProxyError> {
        let expect = Expect {
            typ: settings.typ.as_deref(),
            issuer: &settings.issuer,
            audience: &settings.audience,
            leeway: settings.leeway.as_secs(),
            now: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        let verified = match &settings.keys {
            TokenKeys::File(keys) => jwt::verify(token, keys, &expect),
            TokenKeys::Url { uri, client, source } => {
                let from = KeySource { uri, client, source: *source };
                let keys = self.current(&from, Want::Fresh(settings.max_age)).await?;
                match jwt::verify(token, &keys, &expect) {
                    // A stream of tokens with made-up `kid`s costs the issuer one fetch per interval.
                    Err(TokenError::UnknownKey) => {
                        let keys = self.current(&from, Want::Other(&keys, settings.min_refetch)).await?;
                        jwt::verify(token, &keys, &expect)
                    }
                    verified => verified,
                }
            }
        };
        let verified = verified.map_err(ProxyError::InvalidUserToken)?;
        // The configured claim only: falling back to another (`sub`) would read ids of another namespace.
        let user = verified.claim(&settings.claim).ok_or(ProxyError::InvalidUserToken(TokenError::Claim("user")))?;
        Ok(user.to_owned())
    }

    /// The keys of `from`, fetched first as `want` says.
    async fn current(&self, from: &KeySource<'_>, want: Want<'_>) -> Result<Arc<KeySet>, ProxyError> {
        let inner = &self.0;
        let seen = inner.entry(from.source);
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
                let (inner, uri, client, source) = (inner.clone(), from.uri.clone(), from.client.clone(), from.source);
                tokio::spawn(async move {
                    // Skipped when a later config's keys took the place meanwhile.
                    let seen = inner.entry(source);
                    if seen.as_ref().is_some_and(|f| f.wanted(Want::Fresh(max_age))) {
                        inner.refetch(&KeySource { uri: &uri, client: &client, source }, seen).await;
                    }
                    drop(one);
                });
            }
            return f.keys();
        }
        let _one = inner.fetching.lock().await;
        // Another request may have fetched while this one waited.
        let seen = inner.entry(from.source);
        if let Some(f) = &seen
            && !f.wanted(want)
        {
            return f.keys();
        }
        inner.refetch(from, seen).await.keys()
    }
}

impl Inner {
    fn entry(&self, source: u64) -> Option<Arc<Fetched>> {
        self.fetched.load_full().filter(|f| f.source == source)
    }

    /// Fetches the set (the caller holds `fetching`) and records the try; a failed fetch withdraws
    /// nothing: the keys fetched before, `seen`, stay in use.
    async fn refetch(&self, from: &KeySource<'_>, seen: Option<Arc<Fetched>>) -> Arc<Fetched> {
        let (tried, source) = (Instant::now(), from.source);
        let next = match fetch(from.uri, from.client).await {
            Ok(keys) => Fetched { source, keys: Arc::new(keys), tried, fetched: Some(tried) },
            Err(why) => {
                // Host and path only: a query or userinfo in the URL may hold a secret.
                let (host, path) = (from.uri.host().unwrap_or(""), from.uri.path());
                tracing::warn!(host, path, error = why, "user tokens: cannot fetch the issuer's keys");
                let (keys, fetched) = seen.map_or((Arc::default(), None), |p| (p.keys.clone(), p.fetched));
                Fetched { source, keys, tried, fetched }
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
            Some(at) if at.elapsed() < MAX_STALE => Ok(self.keys.clone()),
            _ => Err(ProxyError::UserTokenKeysUnavailable),
        }
    }
}

async fn fetch(uri: &Uri, client: &UpstreamClient) -> Result<KeySet, String> {
    let request = Request::get(uri.clone())
        .header(http::header::ACCEPT, "application/json")
        .body(crate::proxy::body::empty())
        .map_err(|e| e.to_string())?;
    let (status, body) = call_bounded(client, request, MAX_KEY_SET_BYTES, FETCH_TIMEOUT).await?;
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    let keys = KeySet::parse(&body?)?;
    match keys.keys.is_empty() {
        true => Err("the key set holds no RS256, ES256 or EdDSA signing key".into()),
        false => Ok(keys),
    }
}
