//! The admin API: JSON over HTTP under `/admin/v1/` on the admin listener.
//!
//! On when the config has both `[admin] token_env|token_file` and `[store]`; otherwise every `/admin/v1/`
//! path answers 404.
//! Every route except the OpenAPI document needs `Authorization: Bearer <admin token>` (compared in
//! constant time, as SHA-256 digests so the length does not leak either).
//!
//! Store calls block and run on the blocking pool. After each successful write the user it changed is
//! re-read from the store into the live directory (`LiveDirectory::refresh_user`), so the change serves
//! the next request; the cost is one user's, however many users there are.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::policy::ratelimit::Limit;
use crate::proxy::Proxy;
use crate::proxy::body::{ProxyBody, full};
use crate::secret::{Secret, sha256};
use crate::store::connection::{CONNECTION_ID, Tokens};
use crate::store::json::{connection_json, cred_json, key_json, token_json, user_json};
use crate::store::model::{MAX_PAGE, NewKey, PutOutcome, UserLimit};
use crate::store::{KeyKind, Store, StoreError, TokenMode};

/// The API's path prefix.
pub const PREFIX: &str = "/admin/v1/";
/// The OpenAPI 3 document describing every route in [`ROUTES`].
pub const OPENAPI: &str = include_str!("openapi.json");
/// Largest request body the API reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What a route does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    OpenApi,
    CreateUser,
    ListUsers,
    GetUser,
    UpdateUser,
    DeleteUser,
    CreateKey,
    ListKeys,
    RevokeKey,
    ListCredentials,
    PutCredential,
    DeleteCredential,
    ListConnections,
    ConnectLink,
    Disconnect,
    CreateToken,
    ListTokens,
    RevokeToken,
    Usage,
}

/// The one route table: the router matches it and the OpenAPI test compares the document with it.
/// `{name}` matches one non-empty path segment.
pub const ROUTES: &[(&str, &str, Op)] = &[
    ("GET", "/admin/v1/openapi.json", Op::OpenApi),
    ("POST", "/admin/v1/users", Op::CreateUser),
    ("GET", "/admin/v1/users", Op::ListUsers),
    ("GET", "/admin/v1/users/{id}", Op::GetUser),
    ("PATCH", "/admin/v1/users/{id}", Op::UpdateUser),
    ("DELETE", "/admin/v1/users/{id}", Op::DeleteUser),
    ("GET", "/admin/v1/users/{id}/credentials", Op::ListCredentials),
    ("PUT", "/admin/v1/users/{id}/credentials/{upstream}/{credential_id}", Op::PutCredential),
    ("DELETE", "/admin/v1/users/{id}/credentials/{upstream}/{credential_id}", Op::DeleteCredential),
    ("GET", "/admin/v1/users/{id}/connections", Op::ListConnections),
    ("POST", "/admin/v1/users/{id}/connections/{upstream}/link", Op::ConnectLink),
    ("DELETE", "/admin/v1/users/{id}/connections/{upstream}", Op::Disconnect),
    ("POST", "/admin/v1/keys", Op::CreateKey),
    ("GET", "/admin/v1/keys", Op::ListKeys),
    ("DELETE", "/admin/v1/keys/{id}", Op::RevokeKey),
    ("POST", "/admin/v1/tokens", Op::CreateToken),
    ("GET", "/admin/v1/tokens", Op::ListTokens),
    ("DELETE", "/admin/v1/tokens/{id}", Op::RevokeToken),
    ("GET", "/admin/v1/usage", Op::Usage),
];

enum Matched {
    Route(Op, Vec<String>),
    /// The path exists, not with this method.
    WrongMethod,
    None,
}

fn route(method: &Method, path: &str) -> Matched {
    let segments: Vec<&str> = path.split('/').collect();
    let mut wrong_method = false;
    for (m, template, op) in ROUTES {
        let parts: Vec<&str> = template.split('/').collect();
        if parts.len() != segments.len() {
            continue;
        }
        let mut params = Vec::new();
        let matches = parts.iter().zip(&segments).all(|(part, seg)| {
            if part.starts_with('{') {
                params.push((*seg).to_owned());
                !seg.is_empty()
            } else {
                part == seg
            }
        });
        if matches {
            if method.as_str() == *m {
                return Matched::Route(*op, params);
            }
            wrong_method = true;
        }
    }
    if wrong_method { Matched::WrongMethod } else { Matched::None }
}

/// The admin API's state: the store opened at start, the proxy whose config it updates.
pub struct AdminApi {
    store: Arc<dyn Store>,
    proxy: Arc<Proxy>,
}

/// An API error: status, stable code, message and, for 400, the field.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), field: None }
    }

    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ApiError {
        let field = field.into();
        let reason = reason.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: format!("{field}: {reason}"),
            field: Some(field),
        }
    }

    fn response(&self) -> Response<ProxyBody> {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(field) = &self.field {
            error["field"] = json!(field);
        }
        let mut response = json_response(self.status, &json!({ "error": error }));
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound { .. } => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            StoreError::Conflict { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            StoreError::Invalid { field, reason } => ApiError::invalid(field, reason),
            StoreError::NoMasterKey => ApiError::new(StatusCode::CONFLICT, "no_master_key", e.to_string()),
            // The same call may succeed once the store is back.
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "admin API: the store is unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store cannot be reached; try again later",
                )
            }
            other => {
                tracing::error!(error = %other, "admin API: store failure");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store_error", "the store failed; see the proxy log")
            }
        }
    }
}

type ApiResult = Result<(StatusCode, Value), ApiError>;

fn json_response(status: StatusCode, value: &Value) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The answer for `/admin/v1/...` while the API is off.
pub fn off() -> Response<ProxyBody> {
    ApiError::new(StatusCode::NOT_FOUND, "route_not_found", "no route for this path").response()
}

impl AdminApi {
    pub fn new(store: Arc<dyn Store>, proxy: Arc<Proxy>) -> AdminApi {
        AdminApi { store, proxy }
    }

    pub async fn handle(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let config = self.proxy.config();
        let Some(token) = config.admin_token.as_ref() else { return off() };
        let path = request.uri().path().to_owned();
        let matched = route(request.method(), &path);
        if let Matched::Route(Op::OpenApi, _) = matched {
            let mut response = Response::new(full(Bytes::from_static(OPENAPI.as_bytes())));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return response;
        }
        // Authenticate before telling routes apart, so an unauthenticated caller learns nothing.
        if !authorized(&request, token) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid admin token is required")
                .response();
        }
        drop(config);
        let (op, params) = match matched {
            Matched::Route(op, params) => (op, params),
            Matched::WrongMethod => {
                return ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed")
                    .response();
            }
            Matched::None => return off(),
        };
        match self.run(op, params, request).await {
            Ok((status, value)) => json_response(status, &value),
            Err(e) => e.response(),
        }
    }

    async fn run(&self, op: Op, params: Vec<String>, request: Request<Incoming>) -> ApiResult {
        let query = parse_query(request.uri().query().unwrap_or(""))?;
        let param = |i: usize| params.get(i).cloned().unwrap_or_default();
        match op {
            Op::OpenApi => unreachable!("served before authentication"),
            Op::CreateUser => {
                let body: CreateUser = read_json(request).await?;
                let limit = body.rate_limit.map(RateLimitBody::into_limit).transpose()?.unwrap_or_default();
                if self.proxy.config().directory.user(&body.id).is_some() {
                    // A store user is refused by the store itself; this is a config-file user.
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "conflict",
                        format!("user {:?} already exists", body.id),
                    ));
                }
                let user = self.blocking(move |s| s.create_user(&body.id, limit)).await?;
                self.apply(&user.id).await?;
                Ok((StatusCode::CREATED, user_json(&user)))
            }
            Op::ListUsers => {
                let after = query.get("after");
                let limit = match query.get("limit") {
                    None => 100,
                    Some(l) => l
                        .parse::<u32>()
                        .ok()
                        .filter(|l| (1..=MAX_PAGE).contains(l))
                        .ok_or_else(|| ApiError::invalid("limit", format!("must be 1 to {MAX_PAGE}")))?,
                };
                query.only(&["after", "limit"])?;
                let users = self.blocking(move |s| s.list_users(after.as_deref(), limit)).await?;
                let next = (users.len() == limit as usize).then(|| users.last().map(|u| u.id.clone())).flatten();
                Ok((
                    StatusCode::OK,
                    json!({ "users": users.iter().map(user_json).collect::<Vec<_>>(), "next_after": next }),
                ))
            }
            Op::GetUser => {
                let id = param(0);
                let user = self.blocking(move |s| s.get_user(&id)).await?;
                Ok((StatusCode::OK, user_json(&user)))
            }
            Op::UpdateUser => {
                let id = param(0);
                let body: UpdateUser = read_json(request).await?;
                let limit = body.rate_limit.into_limit()?;
                let user = self.blocking(move |s| s.set_user_limit(&id, limit)).await?;
                self.apply(&user.id).await?;
                Ok((StatusCode::OK, user_json(&user)))
            }
            Op::DeleteUser => {
                let id = param(0);
                let deleted = id.clone();
                self.blocking(move |s| s.delete_user(&id)).await?;
                self.apply(&deleted).await?;
                Ok((StatusCode::OK, json!({ "deleted": deleted })))
            }
            Op::CreateKey => {
                let body: CreateKey = read_json(request).await?;
                let kind = match body.kind.as_str() {
                    "standard" => KeyKind::Standard,
                    "enterprise" => KeyKind::Enterprise,
                    _ => return Err(ApiError::invalid("kind", "must be \"standard\" or \"enterprise\"")),
                };
                let expires_at = match body.expires_in_days {
                    None => None,
                    Some(days @ 1..=36_500) => Some(now() + i64::from(days) * 86_400),
                    Some(_) => return Err(ApiError::invalid("expires_in_days", "must be 1 to 36500")),
                };
                let user_token = body.user_token.as_deref().map(TokenMode::parse).transpose();
                let user_token = user_token.map_err(|why| ApiError::invalid("user_token", why))?;
                // Without the section no token can be checked: `required` would refuse every request.
                if user_token.is_some() && self.proxy.config().identity.user_token.is_none() {
                    return Err(ApiError::invalid(
                        "user_token",
                        "needs an [identity.user_token] section in the config",
                    ));
                }
                let new = NewKey { id: None, kind, user: body.user, act_as: body.act_as, expires_at, user_token };
                let created = self.blocking(move |s| s.create_key(new)).await?;
                self.apply(&created.info.user).await?;
                let mut value = key_json(&created.info);
                value["key"] = json!(created.key.expose());
                Ok((StatusCode::CREATED, value))
            }
            Op::ListKeys => {
                let user = query.get("user");
                query.only(&["user"])?;
                let keys = self.blocking(move |s| s.list_keys(user.as_deref())).await?;
                Ok((StatusCode::OK, json!({ "keys": keys.iter().map(key_json).collect::<Vec<_>>() })))
            }
            Op::RevokeKey => {
                let id = param(0);
                let info = self.blocking(move |s| s.revoke_key(&id)).await?;
                self.apply(&info.user).await?;
                Ok((StatusCode::OK, key_json(&info)))
            }
            Op::ListCredentials => {
                let id = param(0);
                let creds = self
                    .blocking(move |s| {
                        s.get_user(&id)?;
                        s.list_credentials(&id)
                    })
                    .await?;
                Ok((StatusCode::OK, json!({ "credentials": creds.iter().map(cred_json).collect::<Vec<_>>() })))
            }
            Op::PutCredential => {
                let (user, upstream, cred) = (param(0), param(1), param(2));
                if cred == CONNECTION_ID {
                    return Err(ApiError::invalid("credential_id", "\"oauth\" is reserved for OAuth connections"));
                }
                let body: PutCredential = read_json(request).await?;
                // The secret goes into a header: refuse what no header can carry before storing it.
                if body.secret.is_empty() {
                    return Err(ApiError::invalid("secret", "must not be empty"));
                }
                if HeaderValue::from_str(&body.secret).is_err() {
                    return Err(ApiError::invalid("secret", "contains characters that cannot be sent in a header"));
                }
                let secret = Secret::new(body.secret);
                let outcome = self.blocking(move |s| s.put_credential(&user, &upstream, &cred, &secret)).await?;
                self.apply(&param(0)).await?;
                let (status, outcome) = match outcome {
                    PutOutcome::Created => (StatusCode::CREATED, "created"),
                    PutOutcome::Updated => (StatusCode::OK, "updated"),
                };
                let (user, upstream, cred) = (param(0), param(1), param(2));
                Ok((status, json!({ "user": user, "upstream": upstream, "credential_id": cred, "outcome": outcome })))
            }
            Op::DeleteCredential => {
                let (user, upstream, cred) = (param(0), param(1), param(2));
                if cred == CONNECTION_ID {
                    // A deleted connection would let links made before it connect again.
                    return Err(ApiError::invalid(
                        "credential_id",
                        "\"oauth\" is an OAuth connection: DELETE /admin/v1/users/{id}/connections/{upstream}",
                    ));
                }
                self.blocking(move |s| s.delete_credential(&user, &upstream, &cred)).await?;
                self.apply(&param(0)).await?;
                let (user, upstream, cred) = (param(0), param(1), param(2));
                Ok((
                    StatusCode::OK,
                    json!({ "deleted": { "user": user, "upstream": upstream, "credential_id": cred } }),
                ))
            }
            Op::ListConnections => {
                let id = param(0);
                let secrets = self
                    .blocking(move |s| {
                        s.get_user(&id)?;
                        s.credential_secrets(Some(&id))
                    })
                    .await?;
                let connections: Vec<Value> = secrets
                    .iter()
                    .filter(|c| c.credential_id == CONNECTION_ID)
                    .filter_map(|c| Some((c.upstream.as_str(), Tokens::parse(&c.secret)?)))
                    .filter(|(_, t)| !t.is_disconnected())
                    .map(|(upstream, t)| connection_json(upstream, &t))
                    .collect();
                Ok((StatusCode::OK, json!({ "connections": connections })))
            }
            Op::ConnectLink => {
                let (user, upstream) = (param(0), param(1));
                let config = self.proxy.config();
                let (Some(settings), Some(broker)) = (&config.oauth, self.proxy.oauth()) else {
                    return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no upstream uses OAuth"));
                };
                if !config.upstreams.iter().any(|u| *u.name == *upstream && u.oauth.is_some()) {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        format!("upstream {upstream:?} does not use OAuth"),
                    ));
                }
                let (id, name) = (user.clone(), upstream.clone());
                // The link may replace the connection there is now, and no later one.
                let current = self
                    .blocking(move |s| {
                        s.get_user(&id)?;
                        crate::oauth::stored_connection(s, &id, &name)
                    })
                    .await?;
                let over = current.map(|(tokens, _)| tokens.grant);
                let url = broker.connect_url(settings, &user, &upstream, over.as_deref());
                let ttl = settings.link_ttl.as_secs();
                Ok((
                    StatusCode::CREATED,
                    json!({ "user": user, "upstream": upstream, "connect_url": url, "expires_in": ttl }),
                ))
            }
            Op::Disconnect => {
                let (user, upstream) = (param(0), param(1));
                self.blocking(move |s| crate::oauth::disconnect(s, &user, &upstream)).await?;
                self.apply(&param(0)).await?;
                Ok((StatusCode::OK, json!({ "deleted": { "user": param(0), "upstream": param(1) } })))
            }
            Op::CreateToken => {
                let body: CreateToken = read_json(request).await?;
                let created = self.blocking(move |s| s.create_token(&body.user, &body.upstream, body.days)).await?;
                self.apply(&created.info.user).await?;
                let config = self.proxy.config();
                let prefix = config
                    .upstreams
                    .iter()
                    .find(|u| *u.name == *created.info.upstream)
                    .map_or_else(|| format!("/mcp/{}", created.info.upstream), |u| u.prefix.clone());
                let mut value = token_json(&created.info);
                value["token"] = json!(created.token.expose());
                value["path"] = json!(format!("{}/t/{}", prefix.trim_end_matches('/'), created.token.expose()));
                Ok((StatusCode::CREATED, value))
            }
            Op::ListTokens => {
                let user = query.get("user");
                query.only(&["user"])?;
                let tokens = self.blocking(move |s| s.list_tokens(user.as_deref())).await?;
                Ok((StatusCode::OK, json!({ "tokens": tokens.iter().map(token_json).collect::<Vec<_>>() })))
            }
            Op::RevokeToken => {
                let id = param(0);
                let info = self.blocking(move |s| s.revoke_token(&id)).await?;
                self.apply(&info.user).await?;
                Ok((StatusCode::OK, token_json(&info)))
            }
            Op::Usage => {
                let user = query.get("user");
                query.only(&["user"])?;
                let rows = self.blocking(move |s| s.usage(user.as_deref())).await?;
                let rows: Vec<Value> = rows
                    .iter()
                    .map(|u| {
                        json!({
                            "user": u.user, "upstream": u.upstream, "requests": u.requests,
                            "denials": u.denials, "last_seen": u.last_seen,
                        })
                    })
                    .collect();
                Ok((StatusCode::OK, json!({ "usage": rows })))
            }
        }
    }

    /// Runs a store call on the blocking pool.
    async fn blocking<T, F>(&self, call: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || call(&*store))
            .await
            .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the store call panicked"))?
            .map_err(ApiError::from)
    }

    /// Brings the running proxy up to date with a write to `user`: the user is re-read from the store
    /// and its entries replaced in the live directory (the cost of one user, however many there are).
    async fn apply(&self, user: &str) -> Result<(), ApiError> {
        let (store, config, user) = (self.store.clone(), self.proxy.config(), user.to_owned());
        let applied = tokio::task::spawn_blocking(move || {
            let problems = config.live.refresh_user(&*store, &*config, &user)?;
            for problem in problems {
                tracing::warn!(%problem, "admin API: part of the write is not served");
            }
            Ok::<_, StoreError>(())
        })
        .await;
        match applied {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "admin API: the write is stored, but not yet served");
                Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "reload_failed",
                    format!("stored, but not yet served: {e}"),
                ))
            }
            Err(_) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the reload panicked")),
        }
    }
}

fn authorized(request: &Request<Incoming>, token: &Secret) -> bool {
    let Some(presented) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    bool::from(sha256(presented.trim().as_bytes()).ct_eq(&sha256(token.expose().as_bytes())))
}

async fn read_json<T: DeserializeOwned>(request: Request<Incoming>) -> Result<T, ApiError> {
    let bytes = match Limited::new(request.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body exceeds {MAX_BODY_BYTES} bytes"),
            ));
        }
        Err(_) => return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_body", "the body could not be read")),
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        // serde names an unknown or missing field in its message; report it as the field.
        let message = e.to_string();
        let field = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|p| message.split(p).nth(1).and_then(|rest| rest.split('`').next()))
            .unwrap_or("body")
            .to_owned();
        ApiError::invalid(field, message)
    })
}

/// Query parameters, percent-decoded; each may appear once.
struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, name: &str) -> Option<String> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self.0.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            Some((k, _)) => Err(ApiError::invalid(k.clone(), "unknown query parameter")),
            None => Ok(()),
        }
    }
}

fn parse_query(query: &str) -> Result<Query, ApiError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k)?, percent_decode(v)?);
        if pairs.iter().any(|(seen, _)| *seen == k) {
            return Err(ApiError::invalid(k, "given twice"));
        }
        pairs.push((k, v));
    }
    Ok(Query(pairs))
}

fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bad = || ApiError::invalid("query", "bad percent-encoding");
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUser {
    id: String,
    rate_limit: Option<RateLimitBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateUser {
    rate_limit: RateLimitBody,
}

/// `"default"`, `"unlimited"` or `{requests, per, burst?}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RateLimitBody {
    Word(String),
    Quota(QuotaBody),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaBody {
    requests: u32,
    per: String,
    burst: Option<u32>,
}

impl RateLimitBody {
    fn into_limit(self) -> Result<UserLimit, ApiError> {
        match self {
            RateLimitBody::Word(w) if w == "default" => Ok(UserLimit::Default),
            RateLimitBody::Word(w) if w == "unlimited" => Ok(UserLimit::Unlimited),
            RateLimitBody::Word(_) => {
                Err(ApiError::invalid("rate_limit", "must be \"default\", \"unlimited\" or {requests, per, burst}"))
            }
            RateLimitBody::Quota(q) => {
                let requests = std::num::NonZeroU32::new(q.requests)
                    .ok_or_else(|| ApiError::invalid("rate_limit.requests", "must be at least 1"))?;
                let per = humantime::parse_duration(&q.per)
                    .map_err(|_| ApiError::invalid("rate_limit.per", "is not a duration such as \"1m\""))?;
                let burst = match q.burst {
                    None => None,
                    Some(b) => Some(
                        std::num::NonZeroU32::new(b)
                            .ok_or_else(|| ApiError::invalid("rate_limit.burst", "must be at least 1"))?,
                    ),
                };
                Limit::new(requests, per, burst)
                    .map(UserLimit::Quota)
                    .map_err(|why| ApiError::invalid("rate_limit", why))
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    user: String,
    kind: String,
    #[serde(default)]
    act_as: Vec<String>,
    expires_in_days: Option<u32>,
    user_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutCredential {
    secret: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    user: String,
    upstream: String,
    days: u32,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_matches_the_table() {
        assert!(matches!(route(&Method::GET, "/admin/v1/users/bob"), Matched::Route(Op::GetUser, p) if p == ["bob"]));
        assert!(matches!(route(&Method::PUT, "/admin/v1/users/bob"), Matched::WrongMethod));
        assert!(matches!(route(&Method::GET, "/admin/v1/users/"), Matched::None));
        assert!(matches!(
            route(&Method::PUT, "/admin/v1/users/a/credentials/github/default"),
            Matched::Route(Op::PutCredential, p) if p == ["a", "github", "default"]
        ));
    }
}
