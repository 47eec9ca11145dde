//! The provider's endpoints of an upstream with `discover = true`: the upstream's protected-resource
//! metadata (RFC 9728) must name the configured `issuer`, whose metadata (RFC 8414, or OpenID Connect
//! discovery) gives the endpoints. The issuer is configured, not taken from the upstream: whoever
//! picks it picks where the client secret, codes and refresh tokens go. Fetched when a flow or a refresh first needs them, kept for an
//! hour, and kept longer when a later fetch fails (a provider's metadata rarely moves; its outage
//! should not stop refreshes that would work).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Uri, header};
use serde_json::Value;

use crate::config::is_loopback;
use crate::config::oauth::{Endpoints, ProviderEndpoints, UpstreamOAuth};
use crate::proxy::forward::call_bounded;

/// How long discovered endpoints are used before they are fetched again.
const KEEP: Duration = Duration::from_secs(3600);
/// After a failed fetch, this long before the next try: callers meanwhile get the endpoints found
/// before, or the failure, at once.
const RETRY_AFTER: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BYTES: usize = 64 * 1024;

/// The endpoints to use now. Past their hour, one caller fetches them again while the others go on
/// with the endpoints found before (a slow metadata endpoint holds up only that one).
pub async fn endpoints(oauth: &UpstreamOAuth) -> Result<Arc<ProviderEndpoints>, String> {
    let discovery = match &oauth.endpoints {
        Endpoints::Fixed(endpoints) => return Ok(endpoints.clone()),
        Endpoints::Discovered(discovery) => discovery,
    };
    let fresh = || {
        let found = discovery.found.read().unwrap_or_else(|e| e.into_inner());
        match found.as_ref() {
            Some((at, endpoints)) if at.elapsed() < KEEP => Ok(endpoints.clone()),
            other => Err(other.map(|(_, endpoints)| endpoints.clone())),
        }
    };
    let stale = match fresh() {
        Ok(endpoints) => return Ok(endpoints),
        Err(stale) => stale,
    };
    let mut failed_at = match (discovery.fetching.try_lock(), &stale) {
        (Ok(fetching), _) => fetching,
        (Err(_), Some(stale)) => return Ok(stale.clone()),
        (Err(_), None) => discovery.fetching.lock().await,
    };
    // Another caller may have fetched them while this one waited.
    if let Ok(endpoints) = fresh() {
        return Ok(endpoints);
    }
    if failed_at.is_some_and(|failed| failed.elapsed() < RETRY_AFTER) {
        return stale.ok_or_else(|| "the provider's metadata could not be read just now".to_owned());
    }
    match discover(oauth, &discovery.metadata, &discovery.resource, &discovery.issuer).await {
        Ok(endpoints) => {
            let endpoints = Arc::new(endpoints);
            *discovery.found.write().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), endpoints.clone()));
            *failed_at = None;
            Ok(endpoints)
        }
        Err(why) => {
            *failed_at = Some(Instant::now());
            match stale {
                Some(stale) => {
                    tracing::warn!(error = %why, "oauth discovery failed; the endpoints found before are kept");
                    Ok(stale)
                }
                None => Err(why),
            }
        }
    }
}

async fn discover(
    oauth: &UpstreamOAuth,
    metadata: &Uri,
    resource: &str,
    issuer: &Uri,
) -> Result<ProviderEndpoints, String> {
    let document = fetch(oauth, metadata).await?.ok_or_else(|| format!("{metadata}: not found"))?;
    let resource = check_resource(&document, resource, issuer)?;
    for url in server_metadata_urls(issuer) {
        if let Some(document) = fetch(oauth, &url).await? {
            return check_server(&document, issuer, resource);
        }
    }
    Err(format!("no authorization server metadata for {issuer}"))
}

/// `Ok(None)` for a 404 (the next well-known location may have it).
async fn fetch(oauth: &UpstreamOAuth, url: &Uri) -> Result<Option<Value>, String> {
    let request = Request::get(url.clone())
        .header(header::ACCEPT, "application/json")
        .body(crate::proxy::body::empty())
        .map_err(|e| e.to_string())?;
    let (status, body) =
        call_bounded(&oauth.client, request, MAX_BYTES, TIMEOUT).await.map_err(|e| format!("{url}: {e}"))?;
    match status {
        http::StatusCode::NOT_FOUND => Ok(None),
        status if !status.is_success() => Err(format!("{url}: status {status}")),
        _ => serde_json::from_slice(&body.map_err(|e| format!("{url}: {e}"))?)
            .map(Some)
            .map_err(|_| format!("{url}: not JSON")),
    }
}

/// RFC 8414 3.1 (the well-known part between host and path), then OpenID Connect's two spellings.
pub fn server_metadata_urls(issuer: &Uri) -> Vec<Uri> {
    let scheme = issuer.scheme_str().unwrap_or("https");
    let authority = issuer.authority().map_or("", |a| a.as_str());
    let path = issuer.path().trim_end_matches('/');
    let mut urls = vec![
        format!("{scheme}://{authority}/.well-known/oauth-authorization-server{path}"),
        format!("{scheme}://{authority}/.well-known/openid-configuration{path}"),
    ];
    if !path.is_empty() {
        urls.push(format!("{scheme}://{authority}{path}/.well-known/openid-configuration"));
    }
    urls.into_iter().filter_map(|u| u.parse().ok()).collect()
}

/// The protected-resource metadata, checked: it must be about `expected` (RFC 9728 3.3, else a server
/// could send clients to another resource's authorization server) and name the configured `issuer`
/// among its authorization servers. Returns its resource identifier.
pub fn check_resource(document: &Value, expected: &str, issuer: &Uri) -> Result<String, String> {
    let resource = document["resource"].as_str().ok_or("the resource metadata has no resource")?;
    if resource.trim_end_matches('/') != expected.trim_end_matches('/') {
        return Err(format!("the resource metadata is about {resource:?}, not {expected:?}"));
    }
    let servers = document["authorization_servers"].as_array().ok_or("the resource metadata names no server")?;
    if !servers.iter().filter_map(Value::as_str).any(|s| same_url(s, issuer)) {
        return Err(format!("the resource metadata does not name the configured issuer {issuer}"));
    }
    Ok(resource.to_owned())
}

/// The authorization server's metadata, checked: its `issuer` is the configured one (RFC 8414 3.3),
/// both endpoints are https (or loopback http when the issuer itself is), and it does PKCE with S256
/// (without that, no flow is started).
pub fn check_server(document: &Value, issuer: &Uri, resource: String) -> Result<ProviderEndpoints, String> {
    let said = document["issuer"].as_str().unwrap_or_default();
    if !same_url(said, issuer) {
        return Err(format!("the metadata of {issuer} says its issuer is {said:?}"));
    }
    let http_allowed = issuer.scheme_str() == Some("http");
    let endpoint = |name: &str| {
        document[name]
            .as_str()
            .and_then(|url| usable(url, http_allowed))
            .ok_or_else(|| format!("{issuer}: {name} missing or not usable"))
    };
    let s256 = document["code_challenge_methods_supported"]
        .as_array()
        .is_some_and(|methods| methods.iter().any(|m| m == "S256"));
    if !s256 {
        return Err(format!("{issuer} does not say it supports PKCE with S256"));
    }
    Ok(ProviderEndpoints {
        authorization: endpoint("authorization_endpoint")?,
        token: endpoint("token_endpoint")?,
        resource: Some(resource),
    })
}

/// Whether `url` names `issuer` (a trailing slash aside).
fn same_url(url: &str, issuer: &Uri) -> bool {
    url.trim_end_matches('/') == issuer.to_string().trim_end_matches('/')
}

/// An https URL, or (when `http_allowed`, for an issuer on loopback) http to a loopback address.
fn usable(url: &str, http_allowed: bool) -> Option<Uri> {
    let uri: Uri = url.parse().ok()?;
    let http = http_allowed && uri.scheme_str() == Some("http") && is_loopback(&uri);
    (uri.authority().is_some() && (uri.scheme_str() == Some("https") || http)).then_some(uri)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::oauth::resource_metadata_url;

    #[test]
    fn well_known_locations() {
        let prm = |u: &str| resource_metadata_url(&u.parse().unwrap()).to_string();
        assert_eq!(
            prm("https://mcp.example.com/mcp"),
            "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
        );
        assert_eq!(prm("https://mcp.example.com"), "https://mcp.example.com/.well-known/oauth-protected-resource");
        let as_urls =
            |u: &str| server_metadata_urls(&u.parse().unwrap()).iter().map(Uri::to_string).collect::<Vec<_>>();
        assert_eq!(
            as_urls("https://auth.example.com"),
            [
                "https://auth.example.com/.well-known/oauth-authorization-server",
                "https://auth.example.com/.well-known/openid-configuration"
            ]
        );
        assert_eq!(
            as_urls("https://auth.example.com/tenant1"),
            [
                "https://auth.example.com/.well-known/oauth-authorization-server/tenant1",
                "https://auth.example.com/.well-known/openid-configuration/tenant1",
                "https://auth.example.com/tenant1/.well-known/openid-configuration"
            ]
        );
    }

    #[test]
    fn resource_metadata_must_be_about_the_upstream_and_name_the_configured_issuer() {
        let issuer: Uri = "https://auth.example.com".parse().unwrap();
        let doc =
            json!({"resource": "https://mcp.example.com/mcp", "authorization_servers": ["https://auth.example.com/"]});
        assert_eq!(
            check_resource(&doc, "https://mcp.example.com/mcp", &issuer).unwrap(),
            "https://mcp.example.com/mcp"
        );
        assert!(check_resource(&doc, "https://other.example.com/mcp", &issuer).is_err(), "another resource's metadata");
        let other: Uri = "https://evil.example".parse().unwrap();
        assert!(check_resource(&doc, "https://mcp.example.com/mcp", &other).is_err(), "the upstream picks no server");
        let none = json!({"resource": "https://mcp.example.com/mcp"});
        assert!(check_resource(&none, "https://mcp.example.com/mcp", &issuer).is_err());
    }

    #[test]
    fn server_metadata_must_be_the_issuers_and_do_s256() {
        let issuer: Uri = "https://auth.example.com".parse().unwrap();
        let doc = json!({
            "issuer": "https://auth.example.com",
            "authorization_endpoint": "https://auth.example.com/authorize",
            "token_endpoint": "https://auth.example.com/token",
            "code_challenge_methods_supported": ["plain", "S256"],
        });
        let found = check_server(&doc, &issuer, "r".into()).unwrap();
        assert_eq!(found.token.to_string(), "https://auth.example.com/token");
        assert_eq!(found.resource.as_deref(), Some("r"));
        let evil: Uri = "https://evil.example.com".parse().unwrap();
        assert!(check_server(&doc, &evil, "r".into()).is_err(), "another issuer's metadata");
        let mut no_pkce = doc.clone();
        no_pkce["code_challenge_methods_supported"] = json!(["plain"]);
        assert!(check_server(&no_pkce, &issuer, "r".into()).is_err());
        no_pkce.as_object_mut().unwrap().remove("code_challenge_methods_supported");
        assert!(check_server(&no_pkce, &issuer, "r".into()).is_err(), "silence is not S256");
        for bad in ["http://auth.example.com/token", "http://127.0.0.1:9/token"] {
            let mut doc = doc.clone();
            doc["token_endpoint"] = json!(bad);
            assert!(check_server(&doc, &issuer, "r".into()).is_err(), "{bad} from an https issuer");
        }
        // A loopback issuer (tests, a provider beside the proxy) may name loopback http endpoints.
        let local: Uri = "http://127.0.0.1:9".parse().unwrap();
        let mut doc = doc.clone();
        doc["issuer"] = json!("http://127.0.0.1:9");
        doc["token_endpoint"] = json!("http://127.0.0.1:9/token");
        assert!(check_server(&doc, &local, "r".into()).is_ok());
    }
}
