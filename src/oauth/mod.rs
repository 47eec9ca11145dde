//! Per-user OAuth to upstreams: the proxy connects each user's own account of an upstream's provider
//! (authorization code with PKCE), keeps the tokens in the store as that user's credential for the
//! upstream, injects the access token, and refreshes it before it expires.
//!
//! - **Connect** ([`browser`]: `<oauth.path>/connect?link=...`, then the provider, then
//!   `<oauth.path>/callback`): a signed, single-use link names (user, upstream) and the grant it may
//!   replace; its page says whom the account would be connected to, and only its button (a same-origin
//!   POST) spends the link and starts the flow. The flow's state is sealed and bound to a cookie of the
//!   browser that pressed it ([`link`]).
//! - **Request path** ([`Broker::credential`]): the connection is read from the live directory (no store
//!   call); missing or refused, the caller gets a connect link in a JSON-RPC error.
//! - **Refresh**: once per (user, upstream) at a time in this process (one task, every request waiting on
//!   it shares its answer), and across replicas under a lease in the store, so no two of them spend the
//!   same rotating refresh token. The task runs apart from the requests: a slow provider holds up only
//!   the requests of the users whose tokens have already expired.

mod browser;
pub mod discovery;
pub mod link;
pub mod pages;
pub mod provider;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use http::HeaderValue;
use tokio::sync::watch;

use crate::config::oauth::{OAuthSettings, ProviderEndpoints, UpstreamOAuth};
use crate::config::{Config, Upstream};
use crate::error::{ConnectError, ProxyError};
use crate::secret::sha256;
use crate::store::connection::{CONNECTION_ID, Connection, Tokens};
use crate::store::model::UnixTime;
use crate::store::{STORE_USER_BIT, Store, StoreError, UserRef};
use crate::telemetry::metrics::Metrics;
pub use browser::BrowserOutcome;
use link::Link;
use provider::TokenError;

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
    metrics: Option<Arc<Metrics>>,
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
            metrics: None,
        })
    }

    /// Refreshes are counted in `metrics` (`mcp_proxy_oauth_refreshes_total`).
    pub fn counting_in(mut self, metrics: Arc<Metrics>) -> Broker {
        self.metrics = Some(metrics);
        self
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
                    let result = match answer {
                        Refreshed::Unavailable => {
                            broker.failed.insert(landing.key.clone(), Instant::now());
                            "unavailable"
                        }
                        Refreshed::Ok(_) | Refreshed::Reconnect => {
                            broker.failed.remove(&landing.key);
                            if matches!(answer, Refreshed::Ok(_)) { "ok" } else { "refused" }
                        }
                    };
                    if let Some(metrics) = &broker.metrics {
                        metrics.oauth_refreshed(upstream, result);
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

fn now() -> UnixTime {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

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
