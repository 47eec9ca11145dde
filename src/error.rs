//! The one error type of the request path, and the one table that turns it into a response.
//!
//! Every refusal the proxy makes is a [`ProxyError`]. [`ProxyError::describe`] is the table: HTTP status and
//! stable machine-readable code. The human message is the `Display` text. The response body is a JSON-RPC
//! error (with the request's `id`) when the request was an MCP JSON-RPC POST, so MCP clients show it to the
//! user, and a small JSON object otherwise.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::policy::ratelimit::{self, ceil_secs};
use crate::proxy::body::{ProxyBody, full};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProxyError {
    #[error("no route for this path")]
    RouteNotFound,
    #[error("the path has dot segments, encoded slashes or empty segments")]
    InvalidPath,
    #[error("the Host header is missing, repeated, not valid, or names another authority than the request")]
    InvalidHost,
    #[error("the request headers are larger than server.max_header_bytes allows")]
    HeadersTooLarge,
    #[error("the request body is larger than server.max_body_bytes allows")]
    BodyTooLarge,
    #[error("this API key has too many request bodies in flight: retry shortly")]
    KeyBodiesExhausted,
    #[error("the proxy holds too many request bodies: retry shortly")]
    ProxyBusy,
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("the request body could not be read")]
    BodyUnreadable,
    #[error("the Origin header is not allowed here")]
    OriginNotAllowed,
    #[error("an API key is required: send Authorization: Bearer <key>")]
    MissingApiKey,
    #[error("the API key is not valid")]
    InvalidApiKey,
    #[error("the {0} header appears more than once")]
    DuplicateHeader(&'static str),
    #[error("the user id is not valid: {0}")]
    InvalidUserId(&'static str),
    #[error("this API key requires a user token")]
    UserTokenRequired,
    #[error("{0}")]
    InvalidUserToken(crate::jwt::TokenError),
    #[error("the user header and the user token name different users")]
    UserTokenMismatch,
    #[error("the user token's issuer keys cannot be fetched: retry shortly")]
    UserTokenKeysUnavailable,
    #[error("too many invalid user tokens from this API key: retry shortly")]
    TooManyInvalidUserTokens,
    #[error("this API key requires a user token, and the proxy has no [identity.user_token] to check one")]
    UserTokensNotConfigured,
    #[error("this API key acts only as its own user and cannot name another")]
    UserOverrideForbidden,
    #[error("this API key may not act as that user")]
    UserNotPermitted,
    #[error("unknown user")]
    UnknownUser,
    #[error("the x-credential-id header is not valid")]
    InvalidCredentialId,
    #[error("the acting user has no credential for this upstream")]
    MissingCredential,
    #[error("the acting user has no credential with that id for this upstream")]
    UnknownCredential,
    #[error("the acting user has several credentials for this upstream: name one with x-credential-id")]
    AmbiguousCredential,
    #[error("rate limit exceeded at the {} level: retry in {} s", .0.level.as_str(), ceil_secs(.0.retry_after))]
    RateLimited(ratelimit::Refusal),
    #[error("the shared rate limiter cannot be reached: retry shortly")]
    RateLimiterUnavailable,
    #[error("the request body is not valid JSON")]
    ParseError,
    #[error("the request body is not a valid JSON-RPC 2.0 message")]
    InvalidRequest,
    #[error("the Mcp-Method or Mcp-Name header does not match the request body")]
    HeaderMismatch,
    #[error("this tool is not allowed on this server")]
    ToolNotAllowed,
    #[error("session not found: initialize a new session")]
    SessionNotFound,
    #[error("the upstream could not be reached")]
    UpstreamUnavailable,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("{}", .0)]
    OAuthConnect(Box<ConnectError>),
    #[error("the upstream's OAuth provider cannot refresh this user's token now: retry shortly")]
    OAuthRefreshUnavailable,
    #[error("the proxy failed to handle this request")]
    Internal,
}

/// The acting user has no usable OAuth connection to the upstream: the error carries a connect link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    pub url: String,
    pub upstream: String,
    /// The provider refused the last refresh (rather than: never connected).
    pub reconnect: bool,
    /// The client declared URL-mode elicitation: the error is MCP's -32042.
    pub elicit: bool,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reconnect {
            true => write!(f, "your {} account must be connected again: open {}", self.upstream, self.url),
            false => write!(f, "connect your {} account to use this server: open {}", self.upstream, self.url),
        }
    }
}

/// MCP's URLElicitationRequiredError (2025-11-25).
pub const JSONRPC_URL_ELICITATION_REQUIRED: i64 = -32042;

impl ProxyError {
    /// The table: HTTP status, stable error code and JSON-RPC error code for every variant.
    pub fn describe(&self) -> (StatusCode, &'static str, i64) {
        use ProxyError::*;
        let (status, code) = match self {
            RouteNotFound => (StatusCode::NOT_FOUND, "route_not_found"),
            InvalidPath => (StatusCode::BAD_REQUEST, "invalid_path"),
            InvalidHost => (StatusCode::BAD_REQUEST, "invalid_host"),
            HeadersTooLarge => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large"),
            BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            KeyBodiesExhausted => (StatusCode::TOO_MANY_REQUESTS, "too_many_pending_bodies"),
            ProxyBusy => (StatusCode::SERVICE_UNAVAILABLE, "proxy_busy"),
            BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            BodyUnreadable => (StatusCode::BAD_REQUEST, "body_unreadable"),
            OriginNotAllowed => (StatusCode::FORBIDDEN, "origin_not_allowed"),
            MissingApiKey => (StatusCode::UNAUTHORIZED, "missing_api_key"),
            InvalidApiKey => (StatusCode::UNAUTHORIZED, "invalid_api_key"),
            DuplicateHeader(_) => (StatusCode::BAD_REQUEST, "duplicate_header"),
            InvalidUserId(_) => (StatusCode::BAD_REQUEST, "invalid_user_id"),
            UserTokenRequired => (StatusCode::UNAUTHORIZED, "user_token_required"),
            InvalidUserToken(_) => (StatusCode::UNAUTHORIZED, "invalid_user_token"),
            UserTokenMismatch => (StatusCode::BAD_REQUEST, "user_token_mismatch"),
            UserTokenKeysUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "user_token_keys_unavailable"),
            UserTokensNotConfigured => (StatusCode::SERVICE_UNAVAILABLE, "user_tokens_not_configured"),
            TooManyInvalidUserTokens => (StatusCode::TOO_MANY_REQUESTS, "too_many_invalid_user_tokens"),
            UserOverrideForbidden => (StatusCode::FORBIDDEN, "user_override_forbidden"),
            UserNotPermitted => (StatusCode::FORBIDDEN, "user_not_permitted"),
            UnknownUser => (StatusCode::FORBIDDEN, "unknown_user"),
            InvalidCredentialId => (StatusCode::BAD_REQUEST, "invalid_credential_id"),
            MissingCredential => (StatusCode::FORBIDDEN, "missing_credential"),
            UnknownCredential => (StatusCode::FORBIDDEN, "unknown_credential"),
            AmbiguousCredential => (StatusCode::BAD_REQUEST, "ambiguous_credential"),
            RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            RateLimiterUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "rate_limiter_unavailable"),
            ParseError => return (StatusCode::BAD_REQUEST, "parse_error", -32700),
            InvalidRequest => return (StatusCode::BAD_REQUEST, "invalid_request", -32600),
            HeaderMismatch => return (StatusCode::BAD_REQUEST, "header_mismatch", -32020),
            ToolNotAllowed => (StatusCode::FORBIDDEN, "tool_not_allowed"),
            SessionNotFound => (StatusCode::NOT_FOUND, "session_not_found"),
            UpstreamUnavailable => (StatusCode::BAD_GATEWAY, "upstream_unavailable"),
            UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            OAuthConnect(c) => {
                let code = if c.reconnect { "oauth_reconnect_required" } else { "oauth_not_connected" };
                let rpc = if c.elicit { JSONRPC_URL_ELICITATION_REQUIRED } else { JSONRPC_PROXY_ERROR };
                return (StatusCode::FORBIDDEN, code, rpc);
            }
            OAuthRefreshUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "oauth_refresh_unavailable"),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        };
        (status, code, JSONRPC_PROXY_ERROR)
    }

    pub fn code(&self) -> &'static str {
        self.describe().1
    }

    pub fn status(&self) -> StatusCode {
        self.describe().0
    }

    /// The response for this error. `jsonrpc_id` is `Some` when the request was an MCP JSON-RPC POST: the
    /// body is then a JSON-RPC error object carrying that id (`null` for a batch or an unreadable id).
    pub fn into_response(&self, jsonrpc_id: Option<&RawValue>) -> Response<ProxyBody> {
        let status = match (self, jsonrpc_id) {
            // An MCP client acts on a JSON-RPC error only in a successful HTTP answer: the connect link
            // must reach it as one (the spec's servers answer -32042 so too).
            (ProxyError::OAuthConnect(_), Some(_)) => StatusCode::OK,
            _ => self.status(),
        };
        let body = self.body(jsonrpc_id);
        let mut response = Response::new(full(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(
            self,
            ProxyError::KeyBodiesExhausted
                | ProxyError::ProxyBusy
                | ProxyError::RateLimiterUnavailable
                | ProxyError::TooManyInvalidUserTokens
                | ProxyError::OAuthRefreshUnavailable
        ) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ProxyError::RateLimited(refusal) = self {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(ceil_secs(refusal.retry_after)));
            let (policy, state) = ratelimit::refusal_headers(refusal);
            for (name, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
                if let Ok(value) = HeaderValue::try_from(value) {
                    headers.insert(name, value);
                }
            }
        }
        response
    }
}

impl ProxyError {
    /// The error body: a JSON-RPC error object carrying `jsonrpc_id`, or the plain JSON error. The id is
    /// written as it is (it was checked to be a string, number or `null`), never converted to a
    /// `serde_json::Value`: a valid id such as `1e400` has no `Value`.
    pub fn body(&self, jsonrpc_id: Option<&RawValue>) -> String {
        #[derive(Serialize)]
        struct RpcError<'a> {
            jsonrpc: &'static str,
            id: &'a RawValue,
            error: ErrorObject<'a>,
        }
        #[derive(Serialize)]
        struct ErrorObject<'a> {
            code: i64,
            message: &'a str,
            data: Data<'a>,
        }
        #[derive(Serialize)]
        struct Data<'a> {
            code: &'static str,
            status: u16,
            retry_after: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            connect_url: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            elicitations: Option<[Elicitation<'a>; 1]>,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Elicitation<'a> {
            mode: &'static str,
            elicitation_id: String,
            url: &'a str,
            message: &'a str,
        }
        #[derive(Serialize)]
        struct Plain<'a> {
            error: PlainError<'a>,
        }
        #[derive(Serialize)]
        struct PlainError<'a> {
            code: &'static str,
            message: &'a str,
            retry_after: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            connect_url: Option<&'a str>,
        }
        let (status, code, jsonrpc_code) = self.describe();
        let message = self.to_string();
        let retry_after = match self {
            ProxyError::RateLimited(refusal) => Some(ceil_secs(refusal.retry_after)),
            _ => None,
        };
        let connect = match self {
            ProxyError::OAuthConnect(c) => Some(c),
            _ => None,
        };
        let connect_url = connect.map(|c| c.url.as_str());
        let elicitations = connect.filter(|c| c.elicit).map(|c| {
            let elicitation_id = hex::encode(rand::random::<[u8; 16]>());
            [Elicitation { mode: "url", elicitation_id, url: &c.url, message: &message }]
        });
        let written = match jsonrpc_id {
            Some(id) => serde_json::to_string(&RpcError {
                jsonrpc: "2.0",
                id,
                error: ErrorObject {
                    code: jsonrpc_code,
                    message: &message,
                    data: Data { code, status: status.as_u16(), retry_after, connect_url, elicitations },
                },
            }),
            None => serde_json::to_string(&Plain {
                error: PlainError { code, message: &message, retry_after, connect_url },
            }),
        };
        // Serializing these plain structs cannot fail; should it ever, the answer is still JSON.
        written.unwrap_or_else(|_| format!(r#"{{"error":{{"code":"{code}"}}}}"#))
    }
}

/// JSON-RPC error code for refusals by the proxy (implementation-defined server-error range), except the
/// protocol errors that JSON-RPC and MCP define (-32700, -32600, -32020); `error.data.code` carries the
/// stable proxy code that tells them apart.
pub const JSONRPC_PROXY_ERROR: i64 = -32001;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn refusal() -> ratelimit::Refusal {
        let limit = ratelimit::Limit::new(10.try_into().unwrap(), std::time::Duration::from_secs(60), None).unwrap();
        ratelimit::Refusal { level: ratelimit::Level::User, limit, retry_after: std::time::Duration::from_millis(5200) }
    }

    #[tokio::test]
    async fn rate_limited_answers_carry_retry_after_and_ratelimit_headers() {
        let id = RawValue::from_string("3".into()).unwrap();
        let response = ProxyError::RateLimited(refusal()).into_response(Some(&id));
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "6");
        assert_eq!(response.headers()["ratelimit-policy"], "\"user\";q=10;w=60");
        assert_eq!(response.headers()["ratelimit"], "\"user\";r=0;t=6");
        let body = body_json(response).await;
        assert_eq!(body["id"], 3);
        assert_eq!(body["error"]["data"]["code"], "rate_limited");
        assert_eq!(body["error"]["data"]["retry_after"], 6);
    }

    #[test]
    fn table_maps_every_variant_to_status_and_code() {
        use ProxyError::*;
        let table = [
            (RouteNotFound, 404, "route_not_found", JSONRPC_PROXY_ERROR),
            (InvalidPath, 400, "invalid_path", JSONRPC_PROXY_ERROR),
            (InvalidHost, 400, "invalid_host", JSONRPC_PROXY_ERROR),
            (HeadersTooLarge, 431, "headers_too_large", JSONRPC_PROXY_ERROR),
            (BodyTooLarge, 413, "body_too_large", JSONRPC_PROXY_ERROR),
            (KeyBodiesExhausted, 429, "too_many_pending_bodies", JSONRPC_PROXY_ERROR),
            (ProxyBusy, 503, "proxy_busy", JSONRPC_PROXY_ERROR),
            (BodyTimeout, 408, "body_timeout", JSONRPC_PROXY_ERROR),
            (BodyUnreadable, 400, "body_unreadable", JSONRPC_PROXY_ERROR),
            (OriginNotAllowed, 403, "origin_not_allowed", JSONRPC_PROXY_ERROR),
            (MissingApiKey, 401, "missing_api_key", JSONRPC_PROXY_ERROR),
            (InvalidApiKey, 401, "invalid_api_key", JSONRPC_PROXY_ERROR),
            (DuplicateHeader("authorization"), 400, "duplicate_header", JSONRPC_PROXY_ERROR),
            (InvalidUserId("empty"), 400, "invalid_user_id", JSONRPC_PROXY_ERROR),
            (UserOverrideForbidden, 403, "user_override_forbidden", JSONRPC_PROXY_ERROR),
            (UserNotPermitted, 403, "user_not_permitted", JSONRPC_PROXY_ERROR),
            (UnknownUser, 403, "unknown_user", JSONRPC_PROXY_ERROR),
            (InvalidCredentialId, 400, "invalid_credential_id", JSONRPC_PROXY_ERROR),
            (MissingCredential, 403, "missing_credential", JSONRPC_PROXY_ERROR),
            (UnknownCredential, 403, "unknown_credential", JSONRPC_PROXY_ERROR),
            (AmbiguousCredential, 400, "ambiguous_credential", JSONRPC_PROXY_ERROR),
            (RateLimited(refusal()), 429, "rate_limited", JSONRPC_PROXY_ERROR),
            (RateLimiterUnavailable, 503, "rate_limiter_unavailable", JSONRPC_PROXY_ERROR),
            (ParseError, 400, "parse_error", -32700),
            (InvalidRequest, 400, "invalid_request", -32600),
            (HeaderMismatch, 400, "header_mismatch", -32020),
            (ToolNotAllowed, 403, "tool_not_allowed", JSONRPC_PROXY_ERROR),
            (SessionNotFound, 404, "session_not_found", JSONRPC_PROXY_ERROR),
            (UpstreamUnavailable, 502, "upstream_unavailable", JSONRPC_PROXY_ERROR),
            (UpstreamTimeout, 504, "upstream_timeout", JSONRPC_PROXY_ERROR),
            (Internal, 500, "internal_error", JSONRPC_PROXY_ERROR),
        ];
        let mut codes = std::collections::HashSet::new();
        for (err, status, code, jsonrpc) in table {
            assert_eq!(err.describe(), (StatusCode::from_u16(status).unwrap(), code, jsonrpc), "{err:?}");
            assert!(codes.insert(code), "code {code} used twice");
            assert!(!err.to_string().is_empty());
        }
    }

    async fn body_json(response: Response<ProxyBody>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn jsonrpc_requests_get_a_jsonrpc_error_with_their_id() {
        let id = RawValue::from_string("\"req-7\"".into()).unwrap();
        let response = ProxyError::UnknownUser.into_response(Some(&id));
        assert_eq!(response.status(), 403);
        let body = body_json(response).await;
        assert_eq!(body["jsonrpc"], "2.0");
        assert_eq!(body["id"], "req-7");
        assert_eq!(body["error"]["code"], JSONRPC_PROXY_ERROR);
        assert_eq!(body["error"]["data"]["code"], "unknown_user");
    }

    #[tokio::test]
    async fn other_requests_get_a_small_json_error_and_401_asks_for_bearer() {
        let response = ProxyError::InvalidApiKey.into_response(None);
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let body = body_json(response).await;
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }
}
