//! Per-user OAuth to upstreams: the proxy connects each user's own account of an upstream's provider
//! (authorization code with PKCE), keeps the tokens in the store as that user's credential for the
//! upstream, injects the access token, and refreshes it before it expires.
//!
//! - **Connect** (`<oauth.path>/connect?link=...`, then the provider, then `<oauth.path>/callback`): a
//!   signed, single-use link names (user, upstream); the flow's state is sealed and bound to a cookie of
//!   the browser that opened the link ([`link`]).
//! - **Request path** ([`Broker::credential`]): the connection is read from the live directory (no store
//!   call); missing or refused, the caller gets a connect link in a JSON-RPC error.
//! - **Refresh**: once per (user, upstream) at a time in this process (one task, every request waiting on
//!   it shares its answer), and across replicas under a lease in the store, so no two of them spend the
//!   same rotating refresh token. The task runs apart from the requests: a slow provider holds up only
//!   the requests of the users whose tokens have already expired.

pub mod link;
pub mod pages;
pub mod provider;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use http::{HeaderValue, Request, Response, StatusCode, header};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::config::oauth::{OAuthSettings, UpstreamOAuth};
use crate::config::{Config, Upstream};
use crate::error::{ConnectError, ProxyError};
use crate::proxy::body::ProxyBody;
use crate::secret::sha256;
use crate::store::connection::{CONNECTION_ID, Connection, Tokens};
use crate::store::model::UnixTime;
use crate::store::{STORE_USER_BIT, Store, StoreError, UserRef};
use link::{Link, Refused, State};
use pages::page;
use provider::{TokenError, query_param};

/// How long a browser has between opening a link and coming back from the provider.
const FLOW_TTL: i64 = 600;
/// A replica refreshing a connection holds it this long at most (the token call's timeout and margin).
const LEASE_SECS: i64 = 30;
/// How often a replica waiting on another's refresh looks at the store.
const LEASE_POLL: Duration = Duration::from_millis(200);
/// The cookie that ties a flow to the browser that opened the link.
const COOKIE: &str = "mtp_oauth_flow";

/// What a refresh ended in, shared by every request that waited on it.
#[derive(Clone, Debug)]
enum Refreshed {
    Ok(HeaderValue),
    /// The provider refused: the connection needs the user again.
    Reconnect,
    /// The provider or the store failed; the next request tries again.
    Unavailable,
}

type Flight = watch::Receiver<Option<Refreshed>>;

pub struct Broker {
    store: Arc<dyn Store>,
    link_key: [u8; 32],
    state_key: [u8; 32],
    /// This process, as the holder of refresh leases.
    holder: String,
    flights: DashMap<(Arc<str>, Arc<str>), Flight>,
}

/// What a browser route did, for the audit line: decision, reason, and whose flow it was.
pub struct BrowserOutcome {
    pub decision: &'static str,
    pub reason: &'static str,
    pub user: Option<String>,
    pub upstream: Option<Arc<str>>,
}

impl Broker {
    /// Derives the link and state keys from the store's master key (blocking: a store call).
    pub fn new(store: Arc<dyn Store>) -> Result<Broker, StoreError> {
        Ok(Broker {
            link_key: store.derive_key(link::LINK_LABEL)?,
            state_key: store.derive_key(link::STATE_LABEL)?,
            store,
            holder: format!("{:016x}", rand::random::<u64>()),
            flights: DashMap::new(),
        })
    }

    /// A connect link for (user, upstream), valid for `oauth.link_ttl`.
    pub fn connect_url(&self, settings: &OAuthSettings, user: &str, upstream: &str) -> String {
        let expires_at = now().saturating_add(settings.link_ttl.as_secs() as i64);
        let link = Link { user: user.into(), upstream: upstream.into(), expires_at, nonce: rand::random() };
        settings.connect_url(&link::sign_link(&self.link_key, &link))
    }

    /// The header value carrying `user`'s access token to `upstream`: the connection's as it is, or
    /// refreshed first when it expires within `refresh_before` (waiting only once it has expired).
    /// `elicit`: the client takes URL-mode elicitation (-32042) for the connect link.
    pub async fn credential(
        self: &Arc<Self>,
        config: &Arc<Config>,
        user: &UserRef,
        upstream: &Upstream,
        oauth: &Arc<UpstreamOAuth>,
        elicit: bool,
    ) -> Result<HeaderValue, ProxyError> {
        // Connections live in the store: a config-file user has none, and cannot connect one.
        if user.id.0 & STORE_USER_BIT == 0 {
            return Err(ProxyError::MissingCredential);
        }
        let connect = |reconnect| self.connect_error(config, &user.name, &upstream.name, reconnect, elicit);
        let Some(connection) = config.live.connection(&user.name, &upstream.name) else {
            return Err(connect(false));
        };
        if connection.tokens.needs_reconnect.is_some() {
            return Err(connect(true));
        }
        let now = now();
        let Some(expires_at) = connection.tokens.expires_at else { return Ok(connection.header_value.clone()) };
        if now.saturating_add(oauth.refresh_before.as_secs() as i64) < expires_at {
            return Ok(connection.header_value.clone());
        }
        let mut flight = self.flight(config, user.name.clone(), upstream.name.clone(), oauth, connection.clone());
        // Not yet expired: this request goes on with the current token; the refresh runs behind it.
        if now < expires_at {
            return Ok(connection.header_value.clone());
        }
        let answer = flight.wait_for(Option::is_some).await.map(|a| a.clone()).ok().flatten();
        match answer {
            Some(Refreshed::Ok(value)) => Ok(value),
            Some(Refreshed::Reconnect) => Err(connect(true)),
            Some(Refreshed::Unavailable) | None => Err(ProxyError::OAuthRefreshUnavailable),
        }
    }

    fn connect_error(&self, config: &Config, user: &str, upstream: &str, reconnect: bool, elicit: bool) -> ProxyError {
        let Some(settings) = &config.oauth else { return ProxyError::MissingCredential };
        let url = self.connect_url(settings, user, upstream);
        ProxyError::OAuthConnect(Box::new(ConnectError { url, upstream: upstream.into(), reconnect, elicit }))
    }

    /// The refresh of (user, upstream) in flight, or a new one.
    fn flight(
        self: &Arc<Self>,
        config: &Arc<Config>,
        user: Arc<str>,
        upstream: Arc<str>,
        oauth: &Arc<UpstreamOAuth>,
        spent: Arc<Connection>,
    ) -> Flight {
        use dashmap::mapref::entry::Entry;
        let key = (user, upstream);
        match self.flights.entry(key.clone()) {
            Entry::Occupied(flight) => flight.get().clone(),
            Entry::Vacant(slot) => {
                let (done, flight) = watch::channel(None);
                slot.insert(flight.clone());
                let (broker, config, oauth) = (self.clone(), config.clone(), oauth.clone());
                tokio::spawn(async move {
                    let answer = broker.refresh(&config, &key.0, &key.1, &oauth, &spent.tokens).await;
                    // Out of the map first: a request from now on sees the refreshed connection itself.
                    broker.flights.remove(&key);
                    let _ = done.send(Some(answer));
                });
                flight
            }
        }
    }

    /// Refreshes under the store's lease; another replica holding it refreshes for both.
    async fn refresh(
        &self,
        config: &Arc<Config>,
        user: &str,
        upstream: &str,
        oauth: &UpstreamOAuth,
        spent: &Tokens,
    ) -> Refreshed {
        let (u, s, holder) = (user.to_owned(), upstream.to_owned(), self.holder.clone());
        let until = now() + LEASE_SECS;
        let leased = self.blocking(move |store| store.take_lease(&u, &s, &holder, until)).await;
        let outcome = match leased {
            Err(e) => {
                tracing::warn!(user, upstream, error = %e, "oauth refresh: the store cannot be reached");
                return Refreshed::Unavailable;
            }
            Ok(false) => self.await_other_replica(config, user, upstream, spent).await,
            Ok(true) => self.refresh_leased(config, user, upstream, oauth, spent).await,
        };
        let (u, s, holder) = (user.to_owned(), upstream.to_owned(), self.holder.clone());
        if let Err(e) = self.blocking(move |store| store.drop_lease(&u, &s, &holder)).await {
            tracing::warn!(user, upstream, error = %e, "oauth refresh: lease not released; it expires by itself");
        }
        outcome
    }

    async fn refresh_leased(
        &self,
        config: &Arc<Config>,
        user: &str,
        upstream: &str,
        oauth: &UpstreamOAuth,
        spent: &Tokens,
    ) -> Refreshed {
        // Another replica may have refreshed between this one's snapshot and the lease.
        match self.stored(user, upstream).await {
            Ok(Some(stored)) if stored != *spent => return self.apply(config, user, upstream).await,
            Ok(Some(_)) => {}
            Ok(None) => return Refreshed::Reconnect,
            Err(()) => return Refreshed::Unavailable,
        }
        let tokens = match provider::refresh(oauth, spent, now()).await {
            Ok(tokens) => tokens,
            Err(TokenError::Refused(why)) => {
                tracing::info!(user, upstream, reason = %why, "oauth refresh refused: the user must connect again");
                Tokens { needs_reconnect: Some(why), ..spent.clone() }
            }
            Err(TokenError::Failed(why)) => {
                tracing::warn!(user, upstream, error = %why, "oauth refresh failed");
                return Refreshed::Unavailable;
            }
        };
        if self.put(user, upstream, &tokens).await.is_err() {
            // Spent at the provider but not stored: with rotation, the user must connect again.
            return Refreshed::Unavailable;
        }
        self.apply(config, user, upstream).await
    }

    async fn await_other_replica(&self, config: &Arc<Config>, user: &str, upstream: &str, spent: &Tokens) -> Refreshed {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(LEASE_SECS as u64);
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(LEASE_POLL).await;
            match self.stored(user, upstream).await {
                Ok(Some(stored)) if stored != *spent => return self.apply(config, user, upstream).await,
                Ok(Some(_)) => {}
                Ok(None) => return Refreshed::Reconnect,
                Err(()) => return Refreshed::Unavailable,
            }
        }
        Refreshed::Unavailable
    }

    /// The connection's tokens as stored now.
    async fn stored(&self, user: &str, upstream: &str) -> Result<Option<Tokens>, ()> {
        let (u, s) = (user.to_owned(), upstream.to_owned());
        let secrets = self.blocking(move |store| store.credential_secrets(Some(&u))).await.map_err(|e| {
            tracing::warn!(user, upstream, error = %e, "oauth: the store cannot be read");
        })?;
        let stored = secrets.into_iter().find(|c| c.upstream == s && c.credential_id == CONNECTION_ID);
        Ok(stored.and_then(|c| Tokens::parse(&c.secret)))
    }

    async fn put(&self, user: &str, upstream: &str, tokens: &Tokens) -> Result<(), StoreError> {
        let (u, s, secret) = (user.to_owned(), upstream.to_owned(), tokens.to_secret());
        let put = self.blocking(move |store| store.put_credential(&u, &s, CONNECTION_ID, &secret)).await;
        put.map(|_| ()).inspect_err(|e| tracing::error!(user, upstream, error = %e, "oauth: tokens not stored"))
    }

    /// Re-reads the user into the live directory and answers with what the request path now sees.
    async fn apply(&self, config: &Arc<Config>, user: &str, upstream: &str) -> Refreshed {
        let (store, live_config, u) = (self.store.clone(), config.clone(), user.to_owned());
        let applied =
            tokio::task::spawn_blocking(move || live_config.live.refresh_user(&*store, &*live_config, &u)).await;
        if !matches!(applied, Ok(Ok(_))) {
            tracing::error!(user, upstream, "oauth: the refreshed connection is stored but not yet served");
            return Refreshed::Unavailable;
        }
        match config.live.connection(user, upstream) {
            Some(c) if c.tokens.needs_reconnect.is_none() => Refreshed::Ok(c.header_value.clone()),
            _ => Refreshed::Reconnect,
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || call(&*store))
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the store call panicked".into())))
    }

    /// Whether `path` is one of the browser routes.
    pub fn is_route(settings: &OAuthSettings, path: &str) -> bool {
        path.strip_prefix(settings.path.as_str()).is_some_and(|rest| rest == "/connect" || rest == "/callback")
    }

    /// `<path>/connect` and `<path>/callback`, for a browser.
    pub async fn browse<B>(&self, config: &Arc<Config>, request: Request<B>) -> (Response<ProxyBody>, BrowserOutcome) {
        let settings = config.oauth.as_ref().expect("routes only exist with [oauth]");
        let mut outcome = BrowserOutcome { decision: "deny", reason: "", user: None, upstream: None };
        let response = match request.method() == http::Method::GET {
            false => {
                outcome.reason = "method_not_allowed";
                page(StatusCode::METHOD_NOT_ALLOWED, "Not allowed", "Open the link in a browser.")
            }
            true if request.uri().path().ends_with("/connect") => {
                self.connect(config, settings, &request, &mut outcome).await
            }
            true => self.callback(config, settings, &request, &mut outcome).await,
        };
        (response, outcome)
    }

    async fn connect<B>(
        &self,
        config: &Config,
        settings: &OAuthSettings,
        request: &Request<B>,
        outcome: &mut BrowserOutcome,
    ) -> Response<ProxyBody> {
        let now = now();
        let token = query_param(request.uri().query().unwrap_or(""), "link").unwrap_or_default();
        let link = match link::open_link(&self.link_key, &token, now) {
            Ok(link) => link,
            Err(why) => return refused(outcome, why, "link"),
        };
        outcome.user = Some(link.user.clone());
        let Some((upstream, oauth)) = oauth_upstream(config, &link.upstream) else {
            outcome.reason = "oauth_unknown_upstream";
            return page(StatusCode::NOT_FOUND, "Not available", "This server no longer connects accounts.");
        };
        outcome.upstream = Some(upstream.name.clone());
        let nonce = link.nonce;
        match self.blocking(move |store| store.use_once(&nonce, link.expires_at)).await {
            Ok(true) => {}
            Ok(false) => {
                outcome.reason = "oauth_link_used";
                return page(StatusCode::GONE, "Link already used", "Ask for a new link to connect your account.");
            }
            Err(e) => {
                tracing::warn!(error = %e, "oauth connect: the store cannot be reached");
                outcome.reason = "oauth_store_unavailable";
                return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", "The proxy cannot record this link now.");
            }
        }
        let (verifier, challenge) = link::pkce();
        let cookie = link::random_token();
        let state = State {
            user: link.user,
            upstream: link.upstream,
            expires_at: now + FLOW_TTL,
            nonce: rand::random(),
            verifier,
            cookie: sha256(cookie.as_bytes()),
        };
        let mut query = vec![
            ("response_type", "code".to_owned()),
            ("client_id", oauth.client_id.clone()),
            ("redirect_uri", settings.callback_url()),
            ("state", link::seal_state(&self.state_key, &state)),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256".to_owned()),
        ];
        if !oauth.scope.is_empty() {
            query.push(("scope", oauth.scope.clone()));
        }
        query.extend(oauth.resource.clone().map(|r| ("resource", r)));
        let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", provider::encode(v))).collect();
        let endpoint = oauth.authorization_endpoint.to_string();
        let separator = if endpoint.contains('?') { '&' } else { '?' };
        let location = format!("{endpoint}{separator}{}", query.join("&"));
        let mut response = page(StatusCode::SEE_OTHER, "Connecting", "Continue at your account's provider.");
        let secure = if settings.secure_cookie { "; Secure" } else { "" };
        let set_cookie = format!(
            "{COOKIE}={cookie}; Path={}/callback; Max-Age={FLOW_TTL}; HttpOnly; SameSite=Lax{secure}",
            settings.path
        );
        match (HeaderValue::try_from(location), HeaderValue::try_from(set_cookie)) {
            (Ok(location), Ok(cookie)) => {
                response.headers_mut().insert(header::LOCATION, location);
                response.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            _ => {
                return page(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Not available",
                    "The provider's address is not usable.",
                );
            }
        }
        outcome.decision = "allow";
        outcome.reason = "oauth_connect_started";
        response
    }

    async fn callback<B>(
        &self,
        config: &Arc<Config>,
        settings: &OAuthSettings,
        request: &Request<B>,
        outcome: &mut BrowserOutcome,
    ) -> Response<ProxyBody> {
        let now = now();
        let query = request.uri().query().unwrap_or("");
        let state = query_param(query, "state").unwrap_or_default();
        let state = match link::open_state(&self.state_key, &state, now) {
            Ok(state) => state,
            Err(why) => return refused(outcome, why, "state"),
        };
        outcome.user = Some(state.user.clone());
        // The browser that opened the link, and no other, finishes it: a code sent to someone else's
        // browser (a phished authorization) connects nothing.
        let presented = flow_cookie(request).map(|c| sha256(c.as_bytes())).unwrap_or_default();
        if !bool::from(presented.ct_eq(&state.cookie)) {
            outcome.reason = "oauth_browser_mismatch";
            return page(
                StatusCode::FORBIDDEN,
                "Not connected",
                "Finish connecting in the browser where you opened the link.",
            );
        }
        let Some((upstream, oauth)) = oauth_upstream(config, &state.upstream) else {
            outcome.reason = "oauth_unknown_upstream";
            return page(StatusCode::NOT_FOUND, "Not available", "This server no longer connects accounts.");
        };
        outcome.upstream = Some(upstream.name.clone());
        let nonce = state.nonce;
        match self.blocking(move |store| store.use_once(&nonce, state.expires_at)).await {
            Ok(true) => {}
            Ok(false) => {
                outcome.reason = "oauth_state_used";
                return page(StatusCode::GONE, "Already finished", "This sign-in was already used.");
            }
            Err(e) => {
                tracing::warn!(error = %e, "oauth callback: the store cannot be reached");
                outcome.reason = "oauth_store_unavailable";
                return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", "The proxy cannot record this sign-in now.");
            }
        }
        let Some(code) = query_param(query, "code") else {
            outcome.reason = "oauth_provider_refused";
            return page(StatusCode::FORBIDDEN, "Not connected", "The provider did not grant access.");
        };
        let tokens = match provider::exchange_code(oauth, &settings.callback_url(), &code, &state.verifier, now).await {
            Ok(tokens) => tokens,
            Err(TokenError::Refused(_)) => {
                outcome.reason = "oauth_code_refused";
                return page(StatusCode::FORBIDDEN, "Not connected", "The provider refused the sign-in: try again.");
            }
            Err(TokenError::Failed(why)) => {
                tracing::warn!(upstream = %upstream.name, error = %why, "oauth callback: code exchange failed");
                outcome.reason = "oauth_exchange_failed";
                return page(StatusCode::BAD_GATEWAY, "Not connected", "The provider could not be reached: try again.");
            }
        };
        if let Err(e) = self.put(&state.user, &upstream.name, &tokens).await {
            outcome.reason = "oauth_store_unavailable";
            let text = match e {
                StoreError::NotFound { .. } => "This user does not exist any more.",
                _ => "The account could not be saved: try again.",
            };
            return page(StatusCode::SERVICE_UNAVAILABLE, "Not connected", text);
        }
        // The request path sees the connection from the next request on.
        self.apply(config, &state.user, &upstream.name).await;
        outcome.decision = "allow";
        outcome.reason = "oauth_connected";
        let account = if tokens.account.is_empty() { "your account".to_owned() } else { tokens.account.clone() };
        let mut response = page(
            StatusCode::OK,
            "Account connected",
            &format!("Connected {account} to {} for {}. You can close this window.", upstream.name, state.user),
        );
        let clear = format!("{COOKIE}=; Path={}/callback; Max-Age=0; HttpOnly; SameSite=Lax", settings.path);
        if let Ok(clear) = HeaderValue::try_from(clear) {
            response.headers_mut().insert(header::SET_COOKIE, clear);
        }
        response
    }
}

fn oauth_upstream<'a>(config: &'a Config, name: &str) -> Option<(&'a Upstream, &'a Arc<UpstreamOAuth>)> {
    let upstream = config.upstreams.iter().find(|u| *u.name == *name)?;
    Some((upstream, upstream.oauth.as_ref()?))
}

fn refused(outcome: &mut BrowserOutcome, why: Refused, what: &str) -> Response<ProxyBody> {
    match why {
        Refused::Expired => {
            outcome.reason = if what == "link" { "oauth_link_expired" } else { "oauth_state_expired" };
            page(StatusCode::GONE, "Link expired", "Ask for a new link to connect your account.")
        }
        Refused::Malformed => {
            outcome.reason = if what == "link" { "oauth_link_invalid" } else { "oauth_state_invalid" };
            page(StatusCode::BAD_REQUEST, "Link not valid", "This link is not valid: ask for a new one.")
        }
    }
}

/// The flow cookie, when exactly one is sent.
fn flow_cookie<B>(request: &Request<B>) -> Option<String> {
    let mut found = None;
    for value in request.headers().get_all(header::COOKIE) {
        for pair in value.to_str().ok()?.split(';') {
            if let Some((name, value)) = pair.trim().split_once('=')
                && name == COOKIE
            {
                if found.is_some() {
                    return None;
                }
                found = Some(value.to_owned());
            }
        }
    }
    found
}

fn now() -> UnixTime {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}
