//! The connect flow's browser routes: `<oauth.path>/connect` (GET: the link's page, which names the
//! proxy user the account will act for and spends nothing; POST: its Connect button, which spends the
//! link and sends the browser to the provider) and `<oauth.path>/callback` (the provider's answer,
//! finished only in the browser that pressed the button, stored over the grant the link named).

use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use super::link::{self, Refused, State};
use super::pages::{form_page, page};
use super::provider::{self, TokenError, query_param};
use super::{Broker, FLOW_TTL, discovery, now};
use crate::config::oauth::{OAuthSettings, ProviderEndpoints, UpstreamOAuth};
use crate::config::{Config, Upstream};
use crate::proxy::body::ProxyBody;
use crate::secret::sha256;
use crate::store::StoreError;
use crate::store::model::UnixTime;

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

/// What a browser route did, for the audit line: decision, reason, and whose flow it was.
pub struct BrowserOutcome {
    pub decision: &'static str,
    pub reason: &'static str,
    pub user: Option<String>,
    pub upstream: Option<Arc<str>>,
}

impl Broker {
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
            Err(why) => return refused(outcome, why, LINK_REFUSED),
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
        config: &Arc<Config>,
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
            Err(why) => return refused(outcome, why, LINK_REFUSED),
        };
        outcome.user = Some(link.user.clone());
        let used = ("oauth_link_used", "Link already used", "Ask for a new link to connect your account.");
        let (_, oauth, endpoints) =
            match self.spend(config, outcome, &link.upstream, link.nonce, link.expires_at, used).await {
                Ok(spent) => spent,
                Err(page) => return page,
            };
        // After the nonce: a link used once says so, whatever happened since.
        match self.stored(&link.user, &link.upstream).await {
            Ok(current) if current.as_ref().map(|(t, _)| t.grant.as_str()) == link.over.as_deref() => {}
            Ok(_) => return self.superseded(config, outcome, &link.user, &link.upstream).await,
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

    /// The link names a grant the store no longer holds. The request path may be what made it so (a
    /// write it has not seen yet: a callback whose client left before the tokens were served), so the
    /// user is read again, and the next request's link is right.
    async fn superseded(
        &self,
        config: &Arc<Config>,
        outcome: &mut BrowserOutcome,
        user: &str,
        upstream: &str,
    ) -> Response<ProxyBody> {
        self.apply(config, user, upstream).await;
        outcome.reason = "oauth_link_superseded";
        page(
            StatusCode::CONFLICT,
            "Link out of date",
            "The account was connected or disconnected since this link was made: ask for a new link.",
        )
    }

    /// What a link (at connect) and a flow state (at callback) go through before their step: their
    /// upstream still uses OAuth, its provider's endpoints are known, and then (so a failure before
    /// leaves them usable) their nonce is spent, once on any replica. `used`: the reason, title and
    /// text when it was spent before. Otherwise the page to answer with.
    async fn spend<'c>(
        &self,
        config: &'c Config,
        outcome: &mut BrowserOutcome,
        upstream: &str,
        nonce: [u8; 32],
        expires_at: UnixTime,
        used: (&'static str, &str, &str),
    ) -> Result<(&'c Upstream, &'c Arc<UpstreamOAuth>, Arc<ProviderEndpoints>), Response<ProxyBody>> {
        let Some((upstream, oauth)) = oauth_upstream(config, upstream) else {
            outcome.reason = "oauth_unknown_upstream";
            return Err(page(StatusCode::NOT_FOUND, "Not available", "This server no longer connects accounts."));
        };
        outcome.upstream = Some(upstream.name.clone());
        let endpoints =
            discovery::endpoints(oauth).await.map_err(|why| discovery_failed(outcome, &upstream.name, &why))?;
        match self.blocking(move |store| store.use_once(&nonce, expires_at)).await {
            Ok(true) => Ok((upstream, oauth, endpoints)),
            Ok(false) => {
                outcome.reason = used.0;
                Err(page(StatusCode::GONE, used.1, used.2))
            }
            Err(e) => {
                tracing::warn!(error = %e, "oauth: the store cannot be reached to spend a link or sign-in");
                Err(store_unavailable(outcome))
            }
        }
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
            Err(why) => return refused(outcome, why, STATE_REFUSED),
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
        let used = ("oauth_state_used", "Already finished", "This sign-in was already used.");
        let (upstream, oauth, endpoints) =
            match self.spend(config, outcome, &state.upstream, state.nonce, state.expires_at, used).await {
                Ok(spent) => spent,
                Err(page) => return page,
            };
        let Some(code) = query_param(query, "code") else {
            outcome.reason = "oauth_provider_refused";
            return page(StatusCode::FORBIDDEN, "Not connected", "The provider did not grant access.");
        };
        // Checked before the code is spent, and again (atomically) when the tokens are stored.
        match self.stored(&state.user, &upstream.name).await {
            Ok(current) if current.as_ref().map(|(t, _)| t.grant.as_str()) == state.over.as_deref() => {}
            Ok(_) => return self.superseded(config, outcome, &state.user, &upstream.name).await,
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
            Ok(false) => return self.superseded(config, outcome, &state.user, &upstream.name).await,
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

/// The audit reasons of a refused link, and of a refused flow state: (expired, malformed).
const LINK_REFUSED: (&str, &str) = ("oauth_link_expired", "oauth_link_invalid");
const STATE_REFUSED: (&str, &str) = ("oauth_state_expired", "oauth_state_invalid");

fn refused(outcome: &mut BrowserOutcome, why: Refused, reasons: (&'static str, &'static str)) -> Response<ProxyBody> {
    match why {
        Refused::Expired => {
            outcome.reason = reasons.0;
            page(StatusCode::GONE, "Link expired", "Ask for a new link to connect your account.")
        }
        Refused::Malformed => {
            outcome.reason = reasons.1;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
}
