//! The request pipeline. [`Proxy::handle`] runs the steps in order; each step is a plain function in
//! its own module, and [`RequestCtx`] carries what they learn to the audit line at the end.

pub mod body;
pub mod forward;
pub mod headers;
pub mod legacy;
pub mod respond;
pub mod sse;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;

use crate::config::Config;
use crate::error::ProxyError;
use crate::oauth::Broker;
use crate::policy::mcp::{self, Rpc, Target};
use crate::policy::ratelimit::{self, Level, LimitPlan, LimitRequest, RateLimits};
use crate::policy::ratelimit_redis::{Names, RedisLimiter};
use crate::policy::session::{self, SessionBinder};
use crate::policy::user_token::UserTokens;
use crate::policy::{auth, credential, identity};
use crate::store::{KeyKind, UserRef};
use crate::telemetry::audit::{AuditEvent, AuditSink};
use crate::telemetry::metrics::{self, Metrics};
use crate::telemetry::trace::TraceContext;
use crate::telemetry::usage::UsageCounters;
use body::{BodyBudget, BudgetLimits, ProxyBody};
use legacy::LegacyStreams;
use serde_json::value::RawValue;

/// Where a connection comes from.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: bool,
}

/// What the steps learn about one request, for the audit line and the error answer.
#[derive(Default)]
struct RequestCtx {
    upstream: Option<Arc<str>>,
    key_id: Option<Arc<str>>,
    key_kind: Option<KeyKind>,
    requested_user: Option<String>,
    acting_user: Option<Arc<str>>,
    fallback: bool,
    /// The rate-limit level that refused the request.
    limited_at: Option<Level>,
    /// Fingerprint of the MCP session the request belongs to.
    session: Option<String>,
    /// The upstream's session id of a legacy-transport message POST.
    legacy_session: Option<String>,
    /// The request's session was made by a client that declared URL-mode elicitation.
    url_elicitation: bool,
    method: http::Method,
    /// An `application/json` POST: refusals answer with a JSON-RPC error.
    json_post: bool,
    /// The JSON-RPC messages of the body, once read.
    rpc: Option<Rpc>,
    /// The issuer of the user token that proved the acting user.
    token_issuer: Option<Arc<str>>,
    /// A browser route of the OAuth connect flow: its decision and reason.
    browser: Option<(&'static str, &'static str)>,
}

/// The config in force and the limiters it resolves to, swapped together on reload.
struct Active {
    config: Arc<Config>,
    limits: LimitPlan,
    sessions: Arc<SessionBinder>,
}

pub struct Proxy {
    active: ArcSwap<Active>,
    limits: Arc<RateLimits>,
    /// The shared limiter (`[rate_limiter] backend = "redis"`); `None`: `limits` alone decides.
    shared_limits: Option<Arc<RedisLimiter>>,
    audit: AuditSink,
    metrics: Arc<Metrics>,
    request_seq: AtomicU64,
    /// Allowed origins when the config lists none.
    own_origins: Vec<String>,
    /// The session key when the config gives none: random, and kept across reloads.
    process_sessions: Arc<SessionBinder>,
    /// Live legacy-transport streams, to deliver refusals of their message POSTs.
    legacy: Arc<LegacyStreams>,
    /// Per-user usage since the last flush to the store.
    usage: Arc<UsageCounters>,
    /// Request-body bytes held in memory, per key and in total.
    bodies: BodyBudget,
    /// Random per process, so request ids from restarts and replicas do not collide.
    instance: u32,
    /// The issuer keys fetched for user tokens (`jwks_url`, kept across reloads) and failed checks per key.
    user_tokens: UserTokens,
    /// Upstream OAuth connections, once the store is open (`App` attaches it).
    oauth: std::sync::OnceLock<Arc<Broker>>,
}

impl Proxy {
    /// `listen` is the bound proxy address (its port, when the config said 0). With `shared_limits`, rate
    /// limits are decided in Redis (and by `limits` only as its `fail_open` fallback).
    pub fn new(
        config: Arc<Config>,
        limits: Arc<RateLimits>,
        shared_limits: Option<Arc<RedisLimiter>>,
        audit: AuditSink,
        metrics: Arc<Metrics>,
        listen: std::net::SocketAddr,
    ) -> Self {
        let own_origins = headers::own_origins(listen, config.server.tls.is_some());
        let process_sessions = Arc::new(SessionBinder::random());
        if config.session_secret.is_none() {
            tracing::warn!("no [sessions] secret: MCP sessions are bound with a key of this process only");
        }
        let active =
            Active { limits: limits.plan(&config), sessions: sessions_for(&config, &process_sessions), config };
        Proxy {
            active: ArcSwap::from_pointee(active),
            limits,
            shared_limits,
            audit,
            metrics,
            own_origins,
            process_sessions,
            legacy: Arc::default(),
            usage: Arc::default(),
            bodies: BodyBudget::default(),
            request_seq: AtomicU64::new(0),
            instance: rand::random(),
            user_tokens: UserTokens::default(),
            oauth: std::sync::OnceLock::new(),
        }
    }

    /// Serves upstream OAuth (connect routes and tokens) from now on; once.
    pub fn attach_oauth(&self, broker: Arc<Broker>) {
        let _ = self.oauth.set(broker);
    }

    pub fn oauth(&self) -> Option<&Arc<Broker>> {
        self.oauth.get()
    }

    /// Usage counted since the last flush (the app flushes it to the store on a schedule).
    pub fn usage(&self) -> &Arc<UsageCounters> {
        &self.usage
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.active.load().config.clone()
    }

    /// Request-body bytes held in memory right now.
    pub fn buffered_body_bytes(&self) -> u64 {
        self.bodies.used()
    }

    /// Swaps in a new config atomically: requests in flight finish on the old one, the next request sees
    /// the new one. Limiters whose (scope, quota) did not change keep their buckets.
    pub fn reload(&self, config: Arc<Config>) {
        let sessions = sessions_for(&config, &self.process_sessions);
        let active = Active { limits: self.limits.plan(&config), sessions, config };
        self.active.store(Arc::new(active));
    }

    pub async fn handle(&self, request: Request<Incoming>, peer: Peer) -> Response<ProxyBody> {
        let trace = TraceContext::from_headers(request.headers());
        let request_id = format!("{:08x}-{:x}", self.instance, self.request_seq.fetch_add(1, Ordering::Relaxed));
        self.handle_traced(request, peer, request_id, trace).await
    }

    async fn handle_traced(
        &self,
        request: Request<Incoming>,
        peer: Peer,
        request_id: String,
        trace: TraceContext,
    ) -> Response<ProxyBody> {
        // One reference-count bump; the config is never cloned per request.
        let active = self.active.load_full();
        // A place in the audit queue first: a slow trail holds requests back here, before any work is done
        // for them. From here on the request ends in exactly one audit line: `Record` writes it when the
        // request ends, or from `Drop` when the client goes away first (hyper then drops this future,
        // wherever it is waiting, the upstream's answer included), through that place, without waiting.
        let permit = self.audit.reserve().await;
        if permit.is_none() {
            request_span(&request_id, &trace).in_scope(|| tracing::error!("audit writer has stopped; audit line lost"));
        }
        let mut record = Record {
            proxy: self,
            request_id,
            trace,
            path: audit_path(&active.config, request.uri().path()).into_owned(),
            started: Instant::now(),
            ctx: RequestCtx {
                json_post: body::is_json_post(request.method()),
                method: request.method().clone(),
                ..Default::default()
            },
            permit,
            done: false,
        };
        // A panic on the request path is a bug, but it must still end in an answer and an audit line:
        // it becomes a 500 here rather than a dropped connection and a request the trail never saw.
        let ids = Ids { request: &record.request_id, trace: &record.trace };
        let outcome = AssertUnwindSafe(self.pipeline(&active, &mut record.ctx, request, peer, ids))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err(Refusal { error: ProxyError::Internal, detail: Some("panic".into()) }));
        let ctx = &mut record.ctx;
        let (response, decision, reason) = match outcome {
            Ok(response) => match ctx.browser.take() {
                Some((decision, reason)) => (response, decision, reason),
                None => (response, "allow", "ok"),
            },
            Err(Refusal { error, detail }) => {
                let response = match self.deliver_on_legacy_stream(ctx, &error) {
                    true => accepted(),
                    false => error.into_response(ctx.error_id()),
                };
                // The one place a refusal is logged.
                let status = response.status().as_u16();
                request_span(&record.request_id, &record.trace)
                    .in_scope(|| tracing::info!(code = error.code(), status, detail, "request refused"));
                if let ProxyError::RateLimited(refusal) = &error {
                    ctx.limited_at = Some(refusal.level);
                }
                let decision = match error {
                    ProxyError::UpstreamUnavailable
                    | ProxyError::UpstreamTimeout
                    | ProxyError::RateLimiterUnavailable
                    | ProxyError::UserTokenKeysUnavailable
                    | ProxyError::UserTokensNotConfigured
                    | ProxyError::OAuthRefreshUnavailable
                    | ProxyError::Internal => "error",
                    _ => "deny",
                };
                (response, decision, error.code())
            }
        };
        record.finish(response.status().as_u16(), decision, reason);
        response
    }

    /// A refused message POST of the legacy transport gets its JSON-RPC error on the session's stream, as
    /// the server's own answers do; true when it was delivered there.
    fn deliver_on_legacy_stream(&self, ctx: &RequestCtx, error: &ProxyError) -> bool {
        let (Some(session), Some(upstream)) = (&ctx.legacy_session, &ctx.upstream) else { return false };
        let Some(id) = ctx.rpc.as_ref().and_then(Rpc::error_id) else { return false };
        let event = sse::render(Some("message"), None, &error.body(Some(id.as_raw())));
        self.legacy.deliver(upstream, session, event.into())
    }

    /// The steps, in order. Each `?` is a refusal that never reaches the upstream.
    async fn pipeline(
        &self,
        active: &Active,
        ctx: &mut RequestCtx,
        request: Request<Incoming>,
        peer: Peer,
        ids: Ids<'_>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let config = &active.config;
        // The OAuth connect flow's pages are for browsers: no API key, no upstream.
        if let (Some(settings), Some(broker)) = (&config.oauth, self.oauth.get())
            && Broker::is_route(settings, request.uri().path())
        {
            // Step 1's limits hold here too: header bytes, one authority.
            let (parts, body) = request.into_parts();
            headers::check_size(&parts.headers, config.server.max_header_bytes)?;
            headers::check_host(&parts)?;
            let (response, outcome) = broker.browse(config, Request::from_parts(parts, body)).await;
            (ctx.acting_user, ctx.upstream) = (outcome.user.map(Arc::from), outcome.upstream);
            ctx.browser = Some((outcome.decision, outcome.reason));
            return Ok(response);
        }
        let (mut parts, body) = request.into_parts();
        let server = &config.server;

        // Admit and judge on the headers alone: the key, the acting user, the session, the user rule and
        // the rate limits need no body, so a caller refused by any of them is refused before its body
        // is read. A refusal reads at most a small prefix of a JSON-RPC body, only to answer with its id.
        let origins = server.allowed_origins.as_deref().unwrap_or(&self.own_origins);
        let admitted = admit(config, ctx, &parts, origins);
        // Bodies are held within a budget, per key (callers without a valid key share one) and in total.
        let budget =
            BudgetLimits { total: server.max_buffered_body_bytes, per_key: server.max_buffered_body_bytes_per_key };
        let mut share = self.bodies.share(ctx.key_id.as_ref(), budget);
        let judged = match admitted {
            Ok((upstream, key)) => {
                self.judge(active, ctx, &mut parts, upstream, &key).await.map(|j| (upstream, key, j))
            }
            Err(error) => Err(error),
        };
        let (upstream, key, Judged { user, public_prefix, mut statuses }) = match judged {
            Ok(judged) => judged,
            Err(error) => {
                if ctx.json_post {
                    let prefix = body::read_prefix(body, ID_PEEK_BYTES, ID_PEEK_TIME, &mut share).await;
                    ctx.rpc = prefix.and_then(|bytes| mcp::inspect(&bytes[..]).ok());
                }
                return Err(error.into());
            }
        };
        let acting_user = &user.name;
        // Read an MCP JSON-RPC body (bounded in size, time and the budget) and inspect it: -32700 /
        // -32600 when it is not JSON-RPC, -32020 when the 2026-07-28 mirror headers disagree with the body
        // that policy is enforced on. Every later refusal answers with the request's id.
        let (body, json) =
            body::read_request(body, &parts, server.max_body_bytes, server.body_read_timeout, &mut share).await?;
        if let Some(json) = json {
            let rpc = ctx.rpc.insert(mcp::inspect(&json)?);
            mcp::check_mirrored_headers(&parts.headers, rpc)?;
        }
        // Restrict: the upstream's tool rule on every `tools/call` in the body (a blocked tool never
        // reaches the upstream), then the per-tool limits of the tools it calls.
        if let Some(rpc) = &ctx.rpc {
            if let Some(rule) = &upstream.tools
                && rpc.tool_calls().any(|tool| !rule.permits(tool))
            {
                return Err(ProxyError::ToolNotAllowed.into());
            }
            let tools = match &self.shared_limits {
                None => {
                    let tools = self.limits.check_tools(&active.limits, user.id, upstream.id, rpc, &mut statuses);
                    tools.map_err(ProxyError::RateLimited)
                }
                Some(shared) => {
                    let names = Names { user: acting_user, upstream: &upstream.name, key: &key.id };
                    shared.check_tools(&active.limits, user.id, upstream.id, names, rpc, &mut statuses).await
                }
            };
            tools?;
        }
        // Whether the client takes URL elicitation: said in this initialize, or in its session's.
        let elicit = ctx.url_elicitation || ctx.rpc.as_ref().and_then(Rpc::single).is_some_and(|m| m.url_elicitation);
        // The acting user's own credential for this upstream: never the caller's key, never another user's;
        // for an OAuth upstream, the user's connected account (refreshed first when it is about to expire).
        let (credentials, connected);
        let credential = match (&upstream.oauth, self.oauth.get()) {
            (None, _) => {
                credentials = config.credentials(&user, upstream);
                &credential::select(credentials.as_deref().unwrap_or_default(), &parts.headers)?.header_value
            }
            // A fallback user (`unknown_user = "default"`) is not who asked: no connect link is made for
            // a caller who did not prove to be that user, nor the connection used.
            (Some(_), _) if ctx.fallback => return Err(ProxyError::MissingCredential.into()),
            (Some(oauth), Some(broker)) => {
                connected = broker.credential(config, &user, upstream, oauth, elicit).await?;
                &connected
            }
            (Some(_), None) => return Err(ProxyError::MissingCredential.into()),
        };
        // Rewrite: strip client secrets and hop-by-hop headers, then inject.
        let rewrite = headers::Rewrite {
            user_header: &config.identity.user_header,
            token_header: &config.identity.token_header,
            credential,
            acting_user,
            peer: peer.addr,
            tls: peer.tls,
            request_id: ids.request,
            trace: ids.trace,
        };
        headers::rewrite_request(&mut parts, upstream, &rewrite)?;
        // Forward over the pooled client and stream the answer back.
        let response = forward::send(upstream, Request::from_parts(parts, body), &self.metrics)
            .await
            .map_err(|(error, detail)| Refusal { error, detail: Some(detail) })?;
        drop(share); // the body has gone upstream
        let mut response = forward::into_client_response(response, &self.metrics);
        // Bind the session the upstream hands out, and point the legacy endpoint event at the proxy.
        // A session handed out on an initialize that declares URL elicitation remembers it.
        let asked = respond::Asked { get: ctx.method == http::Method::GET, url_elicitation: elicit };
        let handed_out = respond::bind_sessions(
            &mut response,
            &active.sessions,
            acting_user,
            upstream,
            &public_prefix,
            asked,
            &self.legacy,
        )
        .map_err(|e| Refusal { error: ProxyError::UpstreamUnavailable, detail: Some(e) })?;
        if let Some(handed_out) = handed_out {
            ctx.session = Some(handed_out);
        }
        // Respond: clients see only the tools they may call, in JSON and SSE answers alike.
        if let (Some(rule), Some(rpc)) = (&upstream.tools, &ctx.rpc)
            && rpc.messages.iter().any(|m| m.method.as_deref() == Some("tools/list"))
        {
            response = respond::filter_tools(response, rule.clone()).await.map_err(|e| Refusal {
                error: ProxyError::UpstreamUnavailable,
                detail: Some(format!("tools/list answer: {e}")),
            })?;
        }
        // Successful answers tell the client where it stands, so it can pace itself.
        if let Some((policy, state)) = ratelimit::headers(&statuses) {
            let headers = response.headers_mut();
            for (name, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
                if let Ok(value) = http::HeaderValue::try_from(value) {
                    headers.insert(name, value);
                }
            }
        }
        Ok(response)
    }
}

/// The span of a request's log lines, which gives each its `request_id` and `trace_id`. Opened only for a
/// line (a refusal, a client gone, an audit line lost; the request path logs nothing else): entered at every poll of every
/// request, as an `Instrument`ed future does, it cost about 5 % of a request's CPU.
fn request_span(request_id: &str, trace: &TraceContext) -> tracing::Span {
    tracing::info_span!("request", request_id, trace_id = %trace.trace_id())
}

/// One request's outcome, counted (usage, metrics) and audited exactly once.
/// The request's own id and its trace.
#[derive(Clone, Copy)]
struct Ids<'a> {
    request: &'a str,
    trace: &'a TraceContext,
}

struct Record<'p> {
    proxy: &'p Proxy,
    request_id: String,
    trace: TraceContext,
    path: String,
    started: Instant,
    ctx: RequestCtx,
    /// The request's place in the audit queue (`None` only once the writer has stopped).
    permit: Option<tokio::sync::mpsc::OwnedPermit<String>>,
    done: bool,
}

impl Record<'_> {
    /// Counts the outcome and queues its audit line; only the first call counts.
    fn finish(&mut self, status: u16, decision: &'static str, reason: &'static str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let ctx = &self.ctx;
        if let (Some(user), Some(upstream)) = (&ctx.acting_user, &ctx.upstream) {
            self.proxy.usage.record(user, upstream, ctx.key_id.as_ref(), decision == "deny");
        }
        self.proxy.metrics.record(&metrics::Outcome {
            upstream: ctx.upstream.as_ref(),
            status,
            decision,
            reason,
            rate_limited: ctx.limited_at,
            rpc: ctx.rpc.as_ref(),
        });
        let line = AuditSink::line(&AuditEvent {
            request_id: &self.request_id,
            trace_id: self.trace.trace_id(),
            method: ctx.method.as_str(),
            path: &self.path,
            key_id: ctx.key_id.as_deref(),
            key_kind: ctx.key_kind.map(KeyKind::as_str),
            requested_user: ctx.requested_user.as_deref(),
            acting_user: ctx.acting_user.as_deref(),
            user_proof: ctx.token_issuer.as_ref().map(|_| "token"),
            token_issuer: ctx.token_issuer.as_deref(),
            decision,
            reason,
            fallback: ctx.fallback,
            upstream: ctx.upstream.as_deref(),
            mcp_method: ctx.rpc.as_ref().and_then(Rpc::method),
            jsonrpc_id: ctx.rpc.as_ref().and_then(Rpc::error_id),
            tool: ctx.target(|t| matches!(t, Target::Tool(_))),
            prompt: ctx.target(|t| matches!(t, Target::Prompt(_))),
            resource: ctx.target(|t| matches!(t, Target::Resource(_))),
            rate_limit_level: ctx.limited_at.map(Level::as_str),
            session: ctx.session.as_deref(),
            status,
            latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
        });
        if let Some(permit) = self.permit.take() {
            permit.send(line);
        }
    }
}

impl Drop for Record<'_> {
    /// The client went away before the request ended: its line is still written. Status 499 is nginx's
    /// "client closed request".
    fn drop(&mut self) {
        if !self.done {
            request_span(&self.request_id, &self.trace)
                .in_scope(|| tracing::info!("the client went away before the answer"));
            self.finish(499, "error", "client_gone");
        }
    }
}

/// What the header-only steps decided about an admitted request.
struct Judged<'c> {
    user: UserRef,
    /// The path prefix the client sees (with a token URL's token, which the upstream never sees).
    public_prefix: std::borrow::Cow<'c, str>,
    statuses: ratelimit::Statuses,
}

impl Proxy {
    /// The steps after the key that need no body: the acting user, the session, the user rule and the
    /// rate limits. Header work (and, with the shared limiter, one Redis round trip), so a refused caller
    /// costs no body buffering.
    async fn judge<'c>(
        &self,
        active: &'c Active,
        ctx: &mut RequestCtx,
        parts: &mut http::request::Parts,
        upstream: &'c crate::config::Upstream,
        key: &crate::store::ApiKey,
    ) -> Result<Judged<'c>, ProxyError> {
        let config = &active.config;
        // A token URL's token goes no further: the upstream sees the path without it. The legacy
        // transport's endpoint keeps it, so the client's message POSTs authenticate the same way.
        let mut public_prefix = std::borrow::Cow::Borrowed(upstream.prefix.as_str());
        if let Some((token, rest)) = token_in_path(upstream, parts.uri.path()) {
            public_prefix = format!("{}/t/{token}", upstream.prefix.trim_end_matches('/')).into();
            let stripped = match parts.uri.query() {
                Some(query) => format!("{}{rest}?{query}", upstream.prefix),
                None => format!("{}{rest}", upstream.prefix),
            };
            parts.uri = http::Uri::try_from(stripped).map_err(|_| ProxyError::InvalidPath)?;
        }
        // Identify the acting user. The requested name is recorded first so that denials are audited too.
        // A user token, where the key reads one, proves the user: the header, if sent too, must agree.
        let settings = &config.identity;
        let requested = identity::requested_user(settings, &parts.headers)?;
        ctx.requested_user = requested.map(str::to_owned);
        let proven = self.user_tokens.proven_user(settings, key, &parts.headers, requested).await?;
        let is_proven = proven.is_some();
        if let Some((user, issuer)) = proven {
            (ctx.requested_user, ctx.token_issuer) = (Some(user), Some(issuer));
        }
        let who = identity::resolve(settings, config, key, ctx.requested_user.as_deref(), is_proven)?;
        let acting_user = &who.user.name;
        ctx.acting_user = Some(acting_user.clone());
        ctx.fallback = who.fallback;
        // Sessions: a session the client presents must be the acting user's on this upstream (else 404, the
        // spec's "session not found"); the upstream gets its own id back.
        let presented = session::unbind_request(parts, &active.sessions, acting_user, &upstream.name)?;
        ctx.session = presented.fingerprint;
        ctx.legacy_session = presented.legacy;
        ctx.url_elicitation = presented.url_elicitation;
        // The upstream's user rule.
        if upstream.users.as_ref().is_some_and(|rule| !rule.permits(acting_user)) {
            return Err(ProxyError::UserNotPermitted);
        }
        // Rate limit by the resolved user: only now, so that bad keys and unknown users never create
        // limiter state, and before any work is done on the user's behalf. (Per-tool limits wait for the
        // body that names the tool.) The local limiter needs no await; the shared one is a round trip to
        // Redis, bounded by its timeout, keyed by names that mean the same on every replica.
        let check = LimitRequest {
            key: key.index,
            user: who.user.id,
            user_limit: config.user_limit(&who.user),
            upstream: upstream.id,
        };
        let statuses = match &self.shared_limits {
            None => self.limits.check(&active.limits, &check).map_err(ProxyError::RateLimited)?,
            Some(shared) => {
                let names = Names { user: acting_user, upstream: &upstream.name, key: &key.id };
                shared.check(&active.limits, &check, names).await?
            }
        };
        Ok(Judged { user: who.user, public_prefix, statuses })
    }
}

impl RequestCtx {
    /// The id a JSON-RPC error answer carries: the request's own, `null` when it has none or is unread.
    fn error_id(&self) -> Option<&RawValue> {
        match &self.rpc {
            Some(rpc) => Some(rpc.error_id().map_or(RawValue::NULL, mcp::Id::as_raw)),
            None => self.json_post.then_some(RawValue::NULL),
        }
    }

    /// The single message's target, when it is of the kind `kind` accepts.
    fn target(&self, kind: impl Fn(&Target) -> bool) -> Option<&str> {
        let target = self.rpc.as_ref()?.single()?.target.as_ref()?;
        kind(target).then(|| target.name())
    }
}

fn sessions_for(config: &Config, process: &Arc<SessionBinder>) -> Arc<SessionBinder> {
    config.session_secret.as_ref().map_or_else(|| process.clone(), |secret| Arc::new(SessionBinder::new(secret)))
}

/// The answer to a message POST of the legacy transport whose result goes to the stream.
fn accepted() -> Response<ProxyBody> {
    let mut response = Response::new(body::empty());
    *response.status_mut() = http::StatusCode::ACCEPTED;
    response
}

/// What a refusal before authentication may read of a JSON-RPC body to find the request's id.
const ID_PEEK_BYTES: usize = 16 * 1024;
const ID_PEEK_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// The header-only steps before anything else is read: size limit, path, route, origin, API key.
fn admit<'c>(
    config: &'c Config,
    ctx: &mut RequestCtx,
    parts: &http::request::Parts,
    origins: &[String],
) -> Result<(&'c crate::config::Upstream, Arc<crate::store::ApiKey>), ProxyError> {
    // Limits first: the cheapest check, and it bounds the work of every later step.
    headers::check_size(&parts.headers, config.server.max_header_bytes)?;
    // One authority: a request whose Host is missing, repeated or contradicts its target is refused.
    headers::check_host(parts)?;
    // Route: which upstream's rules apply. A path with dot segments, encoded slashes or empty segments
    // is refused outright: it could reach beyond the upstream's path once the upstream normalizes it.
    headers::check_path(parts.uri.path())?;
    let upstream = config.upstream_by_path(parts.uri.path()).ok_or(ProxyError::RouteNotFound)?;
    ctx.upstream = Some(upstream.name.clone());
    // Origin at the edge (the spec's DNS-rebinding rule), before any secret is looked at.
    headers::check_origin(parts, origins)?;
    // Authenticate: nothing about the caller is trusted, or recorded, before the key is valid. A token
    // URL carries its credential in the path, for MCP clients that only take a URL.
    let key = match token_in_path(upstream, parts.uri.path()) {
        Some((token, _)) => auth::authenticate_token(config, token, &upstream.name)?,
        None => auth::authenticate(config, &parts.headers)?,
    };
    ctx.key_id = Some(key.id.clone());
    ctx.key_kind = Some(key.kind);
    Ok((upstream, key))
}

/// The token of a token URL (`<prefix>/t/<token>[/rest]`) and the rest of the path after it.
fn token_in_path<'p>(upstream: &crate::config::Upstream, path: &'p str) -> Option<(&'p str, &'p str)> {
    let after = upstream.rest_of(path).strip_prefix("/t/")?;
    let (token, rest) = after.split_at(after.find('/').unwrap_or(after.len()));
    (!token.is_empty()).then_some((token, rest))
}

/// The request path as the audit trail records it: a token URL's token is a secret, replaced by `***`
/// exactly where the router finds it (an upstream's own prefix may contain `/t/` too). A path no
/// upstream serves may still carry a token (a mistyped or removed route): there the segment after every
/// `/t/` is replaced. Done for every request, refused ones included, before any step can fail.
fn audit_path<'p>(config: &Config, path: &'p str) -> std::borrow::Cow<'p, str> {
    if !path.contains("/t/") {
        return path.into();
    }
    if let Some(upstream) = config.upstream_by_path(path) {
        return match token_in_path(upstream, path) {
            None => path.into(),
            Some((token, rest)) => format!("{}***{rest}", &path[..path.len() - rest.len() - token.len()]).into(),
        };
    }
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find("/t/") {
        out.push_str(&rest[..at + 3]);
        let after = &rest[at + 3..];
        let end = after.find('/').unwrap_or(after.len());
        if end > 0 {
            out.push_str("***");
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out.into()
}

/// A refusal and, for upstream failures, the detail that goes to the log (never to the client).
struct Refusal {
    error: ProxyError,
    detail: Option<String>,
}

impl From<ProxyError> for Refusal {
    fn from(error: ProxyError) -> Self {
        Refusal { error, detail: None }
    }
}
