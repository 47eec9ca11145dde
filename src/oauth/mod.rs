//! Per-user OAuth to upstreams: the proxy connects each user's own account of an upstream's provider
//! (authorization code with PKCE), keeps the tokens in the store as that user's credential for the
//! upstream, injects the access token, and refreshes it before it expires.
//!
//! - **Connect** (`<oauth.path>/connect?link=...`, then the provider, then `<oauth.path>/callback`): a
//!   signed, single-use link names (user, upstream) and the grant it may replace; its page says whom the
//!   account would be connected to, and only its button (a same-origin POST) spends the link and starts
//!   the flow. The flow's state is sealed and bound to a cookie of the browser that pressed it ([`link`]).
//! - **Request path** ([`Broker::credential`]): the connection is read from the live directory (no store
//!   call); missing or refused, the caller gets a connect link in a JSON-RPC error.
//! - **Refresh**: once per (user, upstream) at a time in this process (one task, every request waiting on
//!   it shares its answer), and across replicas under a lease in the store, so no two of them spend the
//!   same rotating refresh token. The task runs apart from the requests: a slow provider holds up only
//!   the requests of the users whose tokens have already expired.

pub mod discovery;
pub mod link;
pub mod pages;
pub mod provider;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::config::oauth::{OAuthSettings, ProviderEndpoints, UpstreamOAuth};
use crate::config::{Config, Upstream};
use crate::error::{ConnectError, ProxyError};
use crate::proxy::body::ProxyBody;
use crate::secret::sha256;
use crate::store::connection::{CONNECTION_ID, Connection, Tokens};
use crate::store::model::UnixTime;
use crate::store::{STORE_USER_BIT, Store, StoreError, UserRef};
use link::{Link, Refused, State};
use pages::{form_page, page};
use provider::{TokenError, query_param};

/// How long a browser has between opening a link and coming back from the provider.
const FLOW_TTL: i64 = 600;
/// A replica refreshing a connection holds it this long at most (the token call's timeout and margin).
const LEASE_SECS: i64 = 30;
/// The lease's time left when the token call starts is at least the call's timeout and this: the
/// tokens it brings are stored before another replica may take the lease over.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// How often a replica waiting on another's refresh looks at the store.
const LEASE_POLL: Duration = Duration::from_millis(200);
/// Longest a request with an expired token waits for its refresh.
const REFRESH_WAIT: Duration = Duration::from_secs(15);
/// After a refresh failed (provider or store unreachable), this long: no new refresh of that
/// connection, and its requests with an expired token are refused at once.
const FAILURE_BACKOFF: Duration = Duration::from_secs(5);
/// The cookie that ties a flow to the browser that pressed Connect (`SameSite=Lax`: the provider's
/// redirect back is a top-level navigation).
const FLOW: Cookie = Cookie { name: "mtp_oauth_flow", route: "/callback", same_site: "Lax" };
/// The cookie the confirmation page sets and its form repeats (`SameSite=Strict`: another site's form
/// posted to the proxy has none).
const CONFIRM: Cookie = Cookie { name: "mtp_oauth_confirm", route: "/connect", same_site: "Strict" };

/// One of the flow's cookies. Over https its name takes the `__Host-` prefix, which browsers accept
/// only from this origin, Secure, for `Path=/` and without `Domain`: a sibling subdomain cannot plant
/// one (a planted flow cookie would let someone else's flow finish in the victim's browser). Over
/// plain http (loopback only) the prefix cannot be had; the cookie is scoped to its route instead.
struct Cookie {
    name: &'static str,
    route: &'static str,
    same_site: &'static str,
}

impl Cookie {
    fn name(&self, settings: &OAuthSettings) -> String {
        if settings.secure_cookie { format!("__Host-{}", self.name) } else { self.name.to_owned() }
    }

    /// `Set-Cookie` for `value`; `None` clears it.
    fn set(&self, settings: &OAuthSettings, value: Option<&str>) -> String {
        let (value, max_age) = value.map_or(("", 0), |v| (v, FLOW_TTL));
        let (name, same_site) = (self.name(settings), self.same_site);
        match settings.secure_cookie {
            true => format!("{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite={same_site}; Secure"),
            false => format!(
                "{name}={value}; Path={}{}; Max-Age={max_age}; HttpOnly; SameSite={same_site}",
                settings.path, self.route
            ),
        }
    }
}
/// Largest confirmation form read: a link and a cookie value.
const MAX_FORM_BYTES: usize = 4096;

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
type Key = (Arc<str>, Arc<str>);

pub struct Broker {
    store: Arc<dyn Store>,
    link_key: [u8; 32],
    state_key: [u8; 32],
    /// This process, as the holder of refresh leases.
    holder: String,
    flights: DashMap<Key, Flight>,
    /// When each connection's last refresh failed, for [`FAILURE_BACKOFF`].
    failed: DashMap<Key, Instant>,
}

/// What a browser route did, for the audit line: decision, reason, and whose flow it was.
pub struct BrowserOutcome {
    pub decision: &'static str,
    pub reason: &'static str,
    pub user: Option<String>,
    pub upstream: Option<Arc<str>>,
}

/// A connection as stored now, with the SHA-256 of its secret (what a swap is made from); `None`
/// when there is none. Blocking: a store call.
pub fn stored_connection(
    store: &dyn Store,
    user: &str,
    upstream: &str,
) -> Result<Option<(Tokens, [u8; 32])>, StoreError> {
    let secrets = store.credential_secrets(Some(user))?;
    let stored = secrets.into_iter().find(|c| c.upstream == upstream && c.credential_id == CONNECTION_ID);
    Ok(stored.and_then(|c| Some((Tokens::parse(&c.secret)?, sha256(c.secret.expose().as_bytes())))))
}

/// Disconnects (user, upstream): its tokens replaced by a disconnected marker with a new grant
/// ([`Tokens::disconnected`]). `NotFound` when it has no connection. Blocking: store calls.
pub fn disconnect(store: &dyn Store, user: &str, upstream: &str) -> Result<(), StoreError> {
    match stored_connection(store, user, upstream)? {
        Some((tokens, _)) if !tokens.is_disconnected() => {
            let now = now();
            store.put_credential(user, upstream, CONNECTION_ID, &Tokens::disconnected(now).to_secret()).map(|_| ())
        }
        _ => Err(StoreError::NotFound { what: "connection", id: format!("{user}/{upstream}") }),
    }
}

/// Removes a flight from the map when its task ends, also by a panic (its waiters then see the
/// sender gone and answer 503).
struct Landing {
    broker: Arc<Broker>,
    key: Key,
}

impl Drop for Landing {
    fn drop(&mut self) {
        self.broker.flights.remove(&self.key);
    }
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
            failed: DashMap::new(),
        })
    }

    /// A connect link for (user, upstream), valid for `oauth.link_ttl`, that may replace the grant
    /// `over` (`None`: only while the user has no connection).
    pub fn connect_url(&self, settings: &OAuthSettings, user: &str, upstream: &str, over: Option<&str>) -> String {
        let expires_at = now().saturating_add(settings.link_ttl.as_secs() as i64);
        let link = Link {
            user: user.into(),
            upstream: upstream.into(),
            expires_at,
            nonce: rand::random(),
            over: over.map(str::to_owned),
        };
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
        let connect = |over: Option<&str>, reconnect| {
            self.connect_error(config, &user.name, &upstream.name, over, reconnect, elicit)
        };
        let Some(connection) = config.live.connection(&user.name, &upstream.name) else {
            return Err(connect(None, false));
        };
        if connection.tokens.needs_reconnect.is_some() {
            let reconnect = !connection.tokens.is_disconnected();
            return Err(connect(Some(&connection.tokens.grant), reconnect));
        }
        let now = now();
        let Some(expires_at) = connection.tokens.expires_at else { return Ok(connection.header_value.clone()) };
        if now.saturating_add(refresh_window(oauth, &connection.tokens)) < expires_at {
            return Ok(connection.header_value.clone());
        }
        let key = (user.name.clone(), upstream.name.clone());
        let backing_off = self.failed.get(&key).is_some_and(|at| at.elapsed() < FAILURE_BACKOFF);
        // Not yet expired: this request goes on with the current token; the refresh runs behind it.
        if now < expires_at {
            if !backing_off {
                self.flight(config, key, oauth, connection.clone());
            }
            return Ok(connection.header_value.clone());
        }
        if backing_off {
            return Err(ProxyError::OAuthRefreshUnavailable);
        }
        let mut flight = self.flight(config, key, oauth, connection.clone());
        let answer = tokio::time::timeout(REFRESH_WAIT, flight.wait_for(Option::is_some)).await;
        match answer.ok().and_then(|a| a.ok().and_then(|a| a.clone())) {
            Some(Refreshed::Ok(value)) => Ok(value),
            // What is stored now names the grant a link may replace (a disconnect meanwhile left its marker).
            Some(Refreshed::Reconnect) => match config.live.connection(&user.name, &upstream.name) {
                Some(now) => Err(connect(Some(&now.tokens.grant), !now.tokens.is_disconnected())),
                None => Err(connect(None, false)),
            },
            Some(Refreshed::Unavailable) | None => Err(ProxyError::OAuthRefreshUnavailable),
        }
    }

    fn connect_error(
        &self,
        config: &Config,
        user: &str,
        upstream: &str,
        over: Option<&str>,
        reconnect: bool,
        elicit: bool,
    ) -> ProxyError {
        let Some(settings) = &config.oauth else { return ProxyError::MissingCredential };
        let url = self.connect_url(settings, user, upstream, over);
        ProxyError::OAuthConnect(Box::new(ConnectError { url, upstream: upstream.into(), reconnect, elicit }))
    }

    /// The refresh of (user, upstream) in flight, or a new one.
    fn flight(
        self: &Arc<Self>,
        config: &Arc<Config>,
        key: Key,
        oauth: &Arc<UpstreamOAuth>,
        spent: Arc<Connection>,
    ) -> Flight {
        use dashmap::mapref::entry::Entry;
        match self.flights.entry(key.clone()) {
            Entry::Occupied(flight) => flight.get().clone(),
            Entry::Vacant(slot) => {
                let (done, flight) = watch::channel(None);
                slot.insert(flight.clone());
                let (broker, config, oauth) = (self.clone(), config.clone(), oauth.clone());
                tokio::spawn(async move {
                    let landing = Landing { broker, key };
                    let (broker, (user, upstream)) = (&landing.broker, &landing.key);
                    let answer = broker.refresh(&config, user, upstream, &oauth, &spent).await;
                    match answer {
                        Refreshed::Unavailable => {
                            broker.failed.insert(landing.key.clone(), Instant::now());
                        }
                        _ => {
                            broker.failed.remove(&landing.key);
                        }
                    }
                    // Out of the map first: a request from now on sees the refreshed connection itself.
                    drop(landing);
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
        spent: &Connection,
    ) -> Refreshed {
        // Before the lease: a slow discovery must not eat the time the lease gives the token call.
        let endpoints = match discovery::endpoints(oauth).await {
            Ok(endpoints) => endpoints,
            Err(why) => {
                tracing::warn!(user, upstream, error = %why, "oauth refresh: the provider's endpoints are unknown");
                return Refreshed::Unavailable;
            }
        };
        let (u, s, holder) = (user.to_owned(), upstream.to_owned(), self.holder.clone());
        // Counted from before the call: the lease may run from any moment within it.
        let leased_at = Instant::now();
        let leased = self.blocking(move |store| store.take_lease(&u, &s, &holder, LEASE_SECS)).await;
        let outcome = match leased {
            Err(e) => {
                tracing::warn!(user, upstream, error = %e, "oauth refresh: the store cannot be reached");
                return Refreshed::Unavailable;
            }
            Ok(false) => self.await_other_replica(config, user, upstream, spent).await,
            Ok(true) => self.refresh_leased(config, (user, upstream), oauth, &endpoints, spent, leased_at).await,
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
        (user, upstream): (&str, &str),
        oauth: &UpstreamOAuth,
        endpoints: &ProviderEndpoints,
        spent: &Connection,
        leased_at: Instant,
    ) -> Refreshed {
        // Another replica may have refreshed between this one's snapshot and the lease.
        match self.stored(user, upstream).await {
            Ok(Some((_, digest))) if digest != spent.digest => return self.apply(config, user, upstream).await,
            Ok(Some(_)) => {}
            Ok(None) => return Refreshed::Reconnect,
            Err(()) => return Refreshed::Unavailable,
        }
        // The store was slow: too little of the lease is left to spend the refresh token and store
        // what it brings before another replica may take over and spend it too.
        if leased_at.elapsed() + provider::TOKEN_TIMEOUT + LEASE_MARGIN > Duration::from_secs(LEASE_SECS as u64) {
            tracing::warn!(
                user,
                upstream,
                "oauth refresh: the store was too slow; not refreshing under a lease this short"
            );
            return Refreshed::Unavailable;
        }
        let tokens = match provider::refresh(oauth, endpoints, &spent.tokens, now()).await {
            Ok(tokens) => tokens,
            Err(TokenError::Refused(why)) => {
                tracing::info!(user, upstream, reason = %why, "oauth refresh refused: the user must connect again");
                Tokens { needs_reconnect: Some(why), ..spent.tokens.clone() }
            }
            Err(TokenError::Failed(why)) => {
                tracing::warn!(user, upstream, error = %why, "oauth refresh failed");
                return Refreshed::Unavailable;
            }
        };
        // From the spent value only: a disconnect or a new connection meanwhile is not overwritten
        // (those tokens are dropped; what is stored now is what the request path gets).
        let (u, s, digest, secret) = (user.to_owned(), upstream.to_owned(), spent.digest, tokens.to_secret());
        let swap = move |store: &dyn Store| store.swap_credential(&u, &s, CONNECTION_ID, Some(&digest), &secret);
        if let Err(e) = self.blocking(swap).await {
            // Spent at the provider but not stored: with rotation, the user must connect again.
            tracing::error!(user, upstream, error = %e, "oauth: refreshed tokens not stored");
            return Refreshed::Unavailable;
        }
        self.apply(config, user, upstream).await
    }

    async fn await_other_replica(
        &self,
        config: &Arc<Config>,
        user: &str,
        upstream: &str,
        spent: &Connection,
    ) -> Refreshed {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(LEASE_SECS as u64);
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(LEASE_POLL).await;
            match self.stored(user, upstream).await {
                Ok(Some((_, digest))) if digest != spent.digest => return self.apply(config, user, upstream).await,
                Ok(Some(_)) => {}
                Ok(None) => return Refreshed::Reconnect,
                Err(()) => return Refreshed::Unavailable,
            }
        }
        Refreshed::Unavailable
    }

    /// The connection as stored now.
    async fn stored(&self, user: &str, upstream: &str) -> Result<Option<(Tokens, [u8; 32])>, ()> {
        let (u, s) = (user.to_owned(), upstream.to_owned());
        self.blocking(move |store| stored_connection(store, &u, &s)).await.map_err(|e| {
            tracing::warn!(user, upstream, error = %e, "oauth: the store cannot be read");
        })
    }

    /// Stores a new connection over the grant `over` (`None`: over none): false when the stored
    /// connection is another grant by now. A refresh of `over` meanwhile is replaced all the same.
    async fn replace(
        &self,
        user: &str,
        upstream: &str,
        over: Option<&str>,
        tokens: &Tokens,
    ) -> Result<bool, StoreError> {
        let (u, s, over, secret) = (user.to_owned(), upstream.to_owned(), over.map(str::to_owned), tokens.to_secret());
        self.blocking(move |store| {
            // A few tries: each lost swap is a refresh of the same grant, which is rare.
            for _ in 0..3 {
                let current = stored_connection(store, &u, &s)?;
                if current.as_ref().map(|(t, _)| t.grant.as_str()) != over.as_deref() {
                    return Ok(false);
                }
                let digest = current.map(|(_, d)| d);
                if store.swap_credential(&u, &s, CONNECTION_ID, digest.as_ref(), &secret)? {
                    return Ok(true);
                }
            }
            Err(StoreError::Unavailable("the connection kept changing".into()))
        })
        .await
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

    /// `<path>/connect` (GET: the confirmation page; POST: its form, which starts the flow) and
    /// `<path>/callback`, for a browser.
    pub async fn browse(
        &self,
        config: &Arc<Config>,
        request: Request<Incoming>,
    ) -> (Response<ProxyBody>, BrowserOutcome) {
        let settings = config.oauth.as_ref().expect("routes only exist with [oauth]");
        let mut outcome = BrowserOutcome { decision: "deny", reason: "", user: None, upstream: None };
        let connect = request.uri().path().ends_with("/connect");
        let response = match (request.method(), connect) {
            (&http::Method::GET, true) => self.confirm(config, settings, &request, &mut outcome),
            (&http::Method::POST, true) => self.connect(config, settings, request, &mut outcome).await,
            (&http::Method::GET, false) => self.callback(config, settings, &request, &mut outcome).await,
            _ => {
                outcome.reason = "method_not_allowed";
                page(StatusCode::METHOD_NOT_ALLOWED, "Not allowed", "Open the link in a browser.")
            }
        };
        (response, outcome)
    }

    /// The link's page: whose account it connects, for which proxy user, and a button. Nothing is
    /// spent: a mail scanner opening the link leaves it usable, and a person sent someone else's link
    /// sees whom it would connect their account to before anything happens.
    fn confirm<B>(
        &self,
        config: &Config,
        settings: &OAuthSettings,
        request: &Request<B>,
        outcome: &mut BrowserOutcome,
    ) -> Response<ProxyBody> {
        let token = query_param(request.uri().query().unwrap_or(""), "link").unwrap_or_default();
        let link = match link::open_link(&self.link_key, &token, now()) {
            Ok(link) => link,
            Err(why) => return refused(outcome, why, "link"),
        };
        outcome.user = Some(link.user.clone());
        let Some((upstream, _)) = oauth_upstream(config, &link.upstream) else {
            outcome.reason = "oauth_unknown_upstream";
            return page(StatusCode::NOT_FOUND, "Not available", "This server no longer connects accounts.");
        };
        outcome.upstream = Some(upstream.name.clone());
        let confirm = link::random_token();
        let text = format!(
            "This connects your {} account to the proxy user \"{}\": requests made as \"{}\" will act with \
             your account. Continue only if you are {} or asked for this link.",
            upstream.name, link.user, link.user, link.user
        );
        let action = format!("{}/connect", settings.path);
        let mut response =
            form_page("Connect your account", &text, &action, &[("link", &token), ("confirm", &confirm)], "Connect");
        if let Ok(cookie) = HeaderValue::try_from(CONFIRM.set(settings, Some(&confirm))) {
            response.headers_mut().insert(header::SET_COOKIE, cookie);
        }
        outcome.decision = "allow";
        outcome.reason = "oauth_connect_confirm";
        response
    }

    /// The confirmation form, posted: spends the link and sends the browser to the provider.
    async fn connect(
        &self,
        config: &Config,
        settings: &OAuthSettings,
        request: Request<Incoming>,
        outcome: &mut BrowserOutcome,
    ) -> Response<ProxyBody> {
        let now = now();
        // Another site's page posting here: its Origin says so, and it cannot have the Strict cookie.
        let own_origin =
            request.headers().get(header::ORIGIN).is_none_or(|o| o.as_bytes() == settings.public_url.as_bytes());
        let cookie = named_cookie(&request, &CONFIRM.name(settings));
        // Bounded in time as every request body is: a body that never comes holds nothing for long.
        let read = http_body_util::Limited::new(request.into_body(), MAX_FORM_BYTES).collect();
        let form = match tokio::time::timeout(config.server.body_read_timeout, read).await {
            Ok(Ok(body)) => String::from_utf8(body.to_bytes().to_vec()).unwrap_or_default(),
            Ok(Err(_)) => String::new(),
            Err(_) => {
                outcome.reason = "body_read_timeout";
                return page(StatusCode::REQUEST_TIMEOUT, "Too slow", "Open the link again and press Connect.");
            }
        };
        let confirmed = query_param(&form, "confirm");
        let same = matches!((&cookie, &confirmed), (Some(c), Some(f)) if bool::from(c.as_bytes().ct_eq(f.as_bytes())));
        if !own_origin || !same {
            outcome.reason = "oauth_not_confirmed";
            return page(StatusCode::FORBIDDEN, "Not connected", "Open the link again and press Connect on its page.");
        }
        let token = query_param(&form, "link").unwrap_or_default();
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
        // Before the link is spent: a provider that cannot be found now leaves it usable.
        let endpoints = match discovery::endpoints(oauth).await {
            Ok(endpoints) => endpoints,
            Err(why) => return discovery_failed(outcome, &upstream.name, &why),
        };
        let nonce = link.nonce;
        match self.blocking(move |store| store.use_once(&nonce, link.expires_at)).await {
            Ok(true) => {}
            Ok(false) => {
                outcome.reason = "oauth_link_used";
                return page(StatusCode::GONE, "Link already used", "Ask for a new link to connect your account.");
            }
            Err(e) => {
                tracing::warn!(error = %e, "oauth connect: the store cannot be reached");
                return store_unavailable(outcome);
            }
        }
        // After the nonce: a link used once says so, whatever happened since.
        match self.stored(&link.user, &link.upstream).await {
            Ok(current) if current.as_ref().map(|(t, _)| t.grant.as_str()) == link.over.as_deref() => {}
            Ok(_) => return superseded(outcome),
            Err(()) => return store_unavailable(outcome),
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
            over: link.over,
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
        query.extend(provider::resource(oauth, &endpoints).map(|r| ("resource", r.to_owned())));
        let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", provider::encode(v))).collect();
        let endpoint = endpoints.authorization.to_string();
        let separator = if endpoint.contains('?') { '&' } else { '?' };
        let location = format!("{endpoint}{separator}{}", query.join("&"));
        let mut response = page(StatusCode::SEE_OTHER, "Connecting", "Continue at your account's provider.");
        let (set_cookie, clear) = (FLOW.set(settings, Some(&cookie)), CONFIRM.set(settings, None));
        match (HeaderValue::try_from(location), HeaderValue::try_from(set_cookie), HeaderValue::try_from(clear)) {
            (Ok(location), Ok(cookie), Ok(clear)) => {
                response.headers_mut().insert(header::LOCATION, location);
                response.headers_mut().append(header::SET_COOKIE, cookie);
                response.headers_mut().append(header::SET_COOKIE, clear);
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
        let presented = named_cookie(request, &FLOW.name(settings)).map(|c| sha256(c.as_bytes())).unwrap_or_default();
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
        // Before the state is spent: a provider that cannot be found now leaves the sign-in usable.
        let endpoints = match discovery::endpoints(oauth).await {
            Ok(endpoints) => endpoints,
            Err(why) => return discovery_failed(outcome, &upstream.name, &why),
        };
        let nonce = state.nonce;
        match self.blocking(move |store| store.use_once(&nonce, state.expires_at)).await {
            Ok(true) => {}
            Ok(false) => {
                outcome.reason = "oauth_state_used";
                return page(StatusCode::GONE, "Already finished", "This sign-in was already used.");
            }
            Err(e) => {
                tracing::warn!(error = %e, "oauth callback: the store cannot be reached");
                return store_unavailable(outcome);
            }
        }
        let Some(code) = query_param(query, "code") else {
            outcome.reason = "oauth_provider_refused";
            return page(StatusCode::FORBIDDEN, "Not connected", "The provider did not grant access.");
        };
        // Checked before the code is spent, and again (atomically) when the tokens are stored.
        match self.stored(&state.user, &upstream.name).await {
            Ok(current) if current.as_ref().map(|(t, _)| t.grant.as_str()) == state.over.as_deref() => {}
            Ok(_) => return superseded(outcome),
            Err(()) => return store_unavailable(outcome),
        }
        let redirect = settings.callback_url();
        let tokens = match provider::exchange_code(oauth, &endpoints, &redirect, &code, &state.verifier, now).await {
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
        match self.replace(&state.user, &upstream.name, state.over.as_deref(), &tokens).await {
            Ok(true) => {}
            Ok(false) => return superseded(outcome),
            Err(e) => {
                tracing::error!(user = %state.user, upstream = %upstream.name, error = %e, "oauth: tokens not stored");
                outcome.reason = "oauth_store_unavailable";
                let text = match e {
                    StoreError::NotFound { .. } => "This user does not exist any more.",
                    _ => "The account could not be saved: try again.",
                };
                return page(StatusCode::SERVICE_UNAVAILABLE, "Not connected", text);
            }
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
        if let Ok(clear) = HeaderValue::try_from(FLOW.set(settings, None)) {
            response.headers_mut().insert(header::SET_COOKIE, clear);
        }
        response
    }
}

/// How long before expiry a token is refreshed: `refresh_before`, but at most half its lifetime, so a
/// provider issuing tokens shorter than `refresh_before` does not get a refresh per request.
fn refresh_window(oauth: &UpstreamOAuth, tokens: &Tokens) -> i64 {
    window(oauth.refresh_before.as_secs() as i64, tokens)
}

fn window(before: i64, tokens: &Tokens) -> i64 {
    let Some(expires_at) = tokens.expires_at else { return before };
    let issued = tokens.refreshed_at.unwrap_or(tokens.connected_at);
    before.min(expires_at.saturating_sub(issued).max(0) / 2)
}

fn superseded(outcome: &mut BrowserOutcome) -> Response<ProxyBody> {
    outcome.reason = "oauth_link_superseded";
    page(
        StatusCode::CONFLICT,
        "Link out of date",
        "The account was connected or disconnected since this link was made: ask for a new link.",
    )
}

fn discovery_failed(outcome: &mut BrowserOutcome, upstream: &str, why: &str) -> Response<ProxyBody> {
    tracing::warn!(upstream, error = %why, "oauth: the provider's endpoints could not be discovered");
    outcome.reason = "oauth_discovery_failed";
    page(StatusCode::BAD_GATEWAY, "Not available", "The account's provider cannot be found now: try again later.")
}

fn store_unavailable(outcome: &mut BrowserOutcome) -> Response<ProxyBody> {
    outcome.reason = "oauth_store_unavailable";
    page(StatusCode::SERVICE_UNAVAILABLE, "Try again", "The proxy cannot record this now.")
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

/// The cookie `name`, when exactly one is sent.
fn named_cookie<B>(request: &Request<B>, name: &str) -> Option<String> {
    let mut found = None;
    for value in request.headers().get_all(header::COOKIE) {
        for pair in value.to_str().ok()?.split(';') {
            if let Some((key, value)) = pair.trim().split_once('=')
                && key == name
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(https: bool) -> OAuthSettings {
        let public_url = if https { "https://mcp.example.com" } else { "http://127.0.0.1:8080" };
        OAuthSettings {
            public_url: public_url.into(),
            path: "/oauth".into(),
            link_ttl: Duration::from_secs(900),
            secure_cookie: https,
        }
    }

    #[test]
    fn cookies_are_host_only_over_https_and_scoped_to_their_route_over_loopback_http() {
        let https = settings(true);
        assert_eq!(
            FLOW.set(&https, Some("v")),
            "__Host-mtp_oauth_flow=v; Path=/; Max-Age=600; HttpOnly; SameSite=Lax; Secure"
        );
        assert_eq!(CONFIRM.name(&https), "__Host-mtp_oauth_confirm");
        assert!(
            CONFIRM.set(&https, None).contains("Max-Age=0") && CONFIRM.set(&https, None).contains("SameSite=Strict")
        );
        let http = settings(false);
        assert_eq!(
            FLOW.set(&http, Some("v")),
            "mtp_oauth_flow=v; Path=/oauth/callback; Max-Age=600; HttpOnly; SameSite=Lax"
        );
        assert_eq!(
            CONFIRM.set(&http, None),
            "mtp_oauth_confirm=; Path=/oauth/connect; Max-Age=0; HttpOnly; SameSite=Strict"
        );
    }

    #[test]
    fn the_refresh_window_is_at_most_half_a_tokens_life() {
        let tokens = |issued: i64, expires_at: Option<i64>| Tokens {
            access_token: "a".into(),
            refresh_token: None,
            expires_at,
            scope: String::new(),
            account: String::new(),
            connected_at: issued,
            refreshed_at: None,
            needs_reconnect: None,
            grant: String::new(),
        };
        assert_eq!(window(60, &tokens(1000, Some(1010))), 5, "a 10 s token: 5 s before, not on every request");
        assert_eq!(window(60, &tokens(1000, Some(4600))), 60);
        assert_eq!(window(60, &tokens(1000, None)), 60);
        assert_eq!(window(60, &tokens(1000, Some(900))), 0, "issued expired");
    }
}
