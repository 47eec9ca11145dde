//! Per-user rate limits: GCRA (`governor`), at three levels that all apply to a request:
//!
//! - `key`: the API key as a whole, across every user it acts as;
//! - `user`: the acting user (a per-user override, or the `[rate_limit]` default);
//! - `user_upstream`: the acting user on one upstream.
//!
//! Limiters are keyed by the interned [`UserId`] (a `u32`), never by a header value, and the check runs
//! only after the key and the user are resolved: unauthenticated input creates no limiter state.
//!
//! One limiter exists per (scope, quota) pair and is kept in a registry across config reloads, so a
//! reload keeps every bucket whose quota did not change. [`RateLimits::evict`] drops idle users' state
//! and returns the memory.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, FakeRelativeClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::Config;
use crate::policy::mcp::Rpc;
use crate::store::{UpstreamId, UserId};
use crate::sync::lock;

/// A quota as configured: `requests` per `per`, in bursts of up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    pub requests: NonZeroU32,
    pub per: Duration,
    pub burst: NonZeroU32,
}

/// The longest `per`, and the longest time to refill a whole burst, that a quota may have. The limiter
/// counts time in `u64` nanoseconds (584 years) and adds these periods to the current time; longer ones
/// would overflow inside it.
pub const MAX_PERIOD: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl Limit {
    /// The one way to make a `Limit` (config, store, admin API and CLI all come here), so every limiter
    /// is built from a quota it can hold. The error says what is out of range.
    pub fn new(requests: NonZeroU32, per: Duration, burst: Option<NonZeroU32>) -> Result<Limit, &'static str> {
        let limit = Limit { requests, per, burst: burst.unwrap_or(requests) };
        if limit.interval().is_zero() {
            return Err("more than 1e9 requests per second: the period per request must be at least 1ns");
        }
        if per > MAX_PERIOD || limit.interval().saturating_mul(limit.burst.get()) > MAX_PERIOD {
            return Err("per, and the time to refill the burst (per / requests x burst), must be at most 10 years");
        }
        Ok(limit)
    }

    fn quota(&self) -> Option<Quota> {
        Quota::with_period(self.per / self.requests.get()).map(|q| q.allow_burst(self.burst))
    }

    /// Time for one request's worth of quota to come back.
    pub fn interval(&self) -> Duration {
        self.per / self.requests.get()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    Key,
    User,
    UserUpstream,
    Tool,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Key => "key",
            Level::User => "user",
            Level::UserUpstream => "user_upstream",
            Level::Tool => "tool",
        }
    }
}

/// The clock the limiters read: real time, or `governor`'s fake clock in tests.
#[derive(Clone, Debug)]
pub enum LimitClock {
    Real(std::time::Instant),
    Fake(FakeRelativeClock),
}

impl Default for LimitClock {
    fn default() -> Self {
        LimitClock::Real(std::time::Instant::now())
    }
}

impl Clock for LimitClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        match self {
            LimitClock::Real(start) => start.elapsed().into(),
            LimitClock::Fake(clock) => clock.now(),
        }
    }
}

type KeyedLimiter = RateLimiter<u32, DashMapStateStore<u32, UserIdHash>, LimitClock, StateInformationMiddleware>;

/// Hashes a `UserId` with one multiplication (Fibonacci hashing). Safe here because the keys are not
/// chosen by clients: only users the directory already knows, after authentication, ever get state.
#[derive(Clone, Copy, Default)]
pub struct UserIdHash;

impl std::hash::BuildHasher for UserIdHash {
    type Hasher = UserIdHasher;
    fn build_hasher(&self) -> UserIdHasher {
        UserIdHasher(0)
    }
}

pub struct UserIdHasher(u64);

impl std::hash::Hasher for UserIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(u32::from(b));
        }
    }
}
type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, LimitClock, StateInformationMiddleware>;

/// How one level stands after a request was let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LevelStatus {
    pub level: Level,
    pub limit: Limit,
    pub remaining: u32,
    /// Time until the whole burst is available again.
    pub reset: Duration,
}

/// The level that refused a request, and when to retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub level: Level,
    pub limit: Limit,
    pub retry_after: Duration,
}

/// The statuses of the levels that applied, at most one per level (no allocation per request).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Statuses([Option<LevelStatus>; 4]);

impl Statuses {
    pub fn iter(&self) -> impl Iterator<Item = &LevelStatus> {
        self.0.iter().flatten()
    }

    pub fn push(&mut self, status: LevelStatus) {
        if let Some(slot) = self.0.iter_mut().find(|s| s.is_none()) {
            *slot = Some(status);
        }
    }
}

/// What a limiter counts for. Keys and upstreams are named, not numbered, so that a reload that
/// reorders the config still finds their limiters. (Users are keyed by `UserId` inside a limiter: a
/// reload must keep user ids stable, which the append-only interner in `store` is there for.)
#[derive(Clone, PartialEq, Eq, Hash)]
enum Scope {
    Key(Arc<str>),
    Upstream(Arc<str>),
    Tool(Arc<str>, Box<str>),
}

/// A limit and the limiter that enforces it, per user.
type PerUser = (Limit, Arc<KeyedLimiter>);

/// Which limiter applies to each key, user and upstream under one config.
pub struct LimitPlan {
    keys: Vec<Option<(Limit, Arc<DirectLimiter>)>>,
    upstreams: Vec<Option<PerUser>>,
    /// By upstream id: per-tool limiters.
    tools: Vec<HashMap<Box<str>, PerUser>>,
}

/// The process-wide limiter state, and the interface the request path uses: [`RateLimits::plan`] when a
/// config is loaded, [`RateLimits::check`] per request. This backend keeps the state in memory; a shared
/// one (Redis) for several replicas would implement the same two calls.
#[derive(Default)]
pub struct RateLimits {
    clock: LimitClock,
    keyed: Mutex<HashMap<(Scope, Limit), Arc<KeyedLimiter>>>,
    direct: Mutex<HashMap<(Scope, Limit), Arc<DirectLimiter>>>,
    /// The user level: one limiter per quota, found by the quota the user has (its own or the
    /// default), so users join and leave without a new plan. Kept for the life of the process.
    users: DashMap<Limit, Arc<KeyedLimiter>>,
}

impl RateLimits {
    pub fn with_clock(clock: LimitClock) -> Self {
        RateLimits { clock, ..Default::default() }
    }

    /// Resolves every level's limiter for `config`, reusing the limiter (and so the buckets) of any
    /// (scope, quota) that an earlier plan already had. Runs at start and on reload, not per request.
    pub fn plan(&self, config: &Config) -> LimitPlan {
        let dir = &config.directory;
        let mut keyed = lock(&self.keyed);
        let mut direct = lock(&self.direct);
        let mut keyed_for = |scope: Scope, limit: Option<Limit>| {
            let limit = limit?;
            let limiter = keyed.entry((scope, limit)).or_insert_with(|| {
                let quota = limit.quota().expect("validated at load");
                Arc::new(KeyedLimiter::new(quota, DashMapStateStore::with_hasher(UserIdHash), self.clock.clone()))
            });
            Some((limit, limiter.clone()))
        };
        let mut by_id = vec![None; config.upstreams.len()];
        let mut tools = vec![HashMap::new(); config.upstreams.len()];
        for upstream in &config.upstreams {
            by_id[upstream.id.0 as usize] = keyed_for(Scope::Upstream(upstream.name.clone()), upstream.rate_limit);
            for (tool, limit) in &upstream.tool_limits {
                let scope = Scope::Tool(upstream.name.clone(), tool.clone());
                if let Some(entry) = keyed_for(scope, Some(*limit)) {
                    tools[upstream.id.0 as usize].insert(tool.clone(), entry);
                }
            }
        }
        let mut keys = Vec::new();
        keys.resize_with(dir.keys().count(), || None);
        for key in dir.keys() {
            let Some(limit) = key.rate_limit else { continue };
            let limiter = direct.entry((Scope::Key(key.id.clone()), limit)).or_insert_with(|| {
                let quota = limit.quota().expect("validated at load");
                Arc::new(DirectLimiter::new(quota, InMemoryState::default(), self.clock.clone()))
            });
            keys[key.index as usize] = Some((limit, limiter.clone()));
        }
        LimitPlan { keys, upstreams: by_id, tools }
    }

    /// The user-level limiter of `limit`.
    fn user_limiter(&self, limit: Limit) -> dashmap::mapref::one::Ref<'_, Limit, Arc<KeyedLimiter>> {
        if let Some(limiter) = self.users.get(&limit) {
            return limiter;
        }
        let quota = limit.quota().expect("validated at load");
        let limiter =
            Arc::new(KeyedLimiter::new(quota, DashMapStateStore::with_hasher(UserIdHash), self.clock.clone()));
        self.users.entry(limit).or_insert(limiter).downgrade()
    }

    /// Drops the state of users whose buckets are full again (indistinguishable from a fresh start), then
    /// shrinks the maps so the memory actually returns; forgets limiters no current plan uses.
    pub fn evict(&self) {
        // The sweep is O(users): it runs on the limiters taken out of the map, not under its lock, which
        // a reload's `plan` needs.
        let mut limiters: Vec<Arc<KeyedLimiter>> = {
            let mut keyed = lock(&self.keyed);
            keyed.retain(|_, limiter| Arc::strong_count(limiter) > 1);
            keyed.values().cloned().collect()
        };
        limiters.extend(self.users.iter().map(|limiter| limiter.value().clone()));
        for limiter in &limiters {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        lock(&self.direct).retain(|_, limiter| Arc::strong_count(limiter) > 1);
    }

    /// Users with limiter state, over all limiters (for tests and benchmarks).
    pub fn tracked(&self) -> usize {
        lock(&self.keyed).values().map(|l| l.len()).sum::<usize>() + self.users.iter().map(|l| l.len()).sum::<usize>()
    }

    fn now(&self) -> Nanos {
        self.clock.now()
    }
}

/// One request, as the limiters that need no body see it.
pub struct LimitRequest {
    pub key: u32,
    pub user: UserId,
    /// The user's limit (its own or the default; `None`: unlimited).
    pub user_limit: Option<Limit>,
    pub upstream: UpstreamId,
}

impl RateLimits {
    /// Checks and counts one request on the levels that need no body, before it is read. The most
    /// specific level goes first (user on upstream, user, key), and a level that refuses stops the
    /// check, so a refused request never uses up a broader level that other users share (the key's, for
    /// instance). Per-tool levels follow the body: [`RateLimits::check_tools`].
    pub fn check(&self, plan: &LimitPlan, request: &LimitRequest) -> Result<Statuses, Refusal> {
        let mut statuses = Statuses::default();
        let user = request.user.0;
        if let Some(Some((limit, limiter))) = plan.upstreams.get(request.upstream.0 as usize) {
            statuses.push(outcome(self, Level::UserUpstream, *limit, limiter.check_key(&user))?);
        }
        if let Some(limit) = request.user_limit {
            statuses.push(outcome(self, Level::User, limit, self.user_limiter(limit).check_key(&user))?);
        }
        if let Some(Some((limit, limiter))) = plan.keys.get(request.key as usize) {
            statuses.push(outcome(self, Level::Key, *limit, limiter.check())?);
        }
        Ok(statuses)
    }
}

impl LimitPlan {
    /// The levels [`RateLimits::check`] applies to `request` and their quotas, in its order (most
    /// specific first), without the limiters: what a shared backend needs to run the same check
    /// elsewhere (`policy::ratelimit_redis`).
    pub fn limits(&self, request: &LimitRequest) -> impl Iterator<Item = (Level, Limit)> {
        let user_upstream = self.upstreams.get(request.upstream.0 as usize).and_then(|l| l.as_ref());
        let key = self.keys.get(request.key as usize).and_then(|l| l.as_ref());
        let levels = [
            user_upstream.map(|(limit, _)| (Level::UserUpstream, *limit)),
            request.user_limit.map(|limit| (Level::User, limit)),
            key.map(|(limit, _)| (Level::Key, *limit)),
        ];
        levels.into_iter().flatten()
    }

    /// Refuses, before anything is counted, a batch that calls one limited tool more often than its
    /// burst: it could never pass, and counting it would cost one check per call (a 10 MiB batch holds
    /// about 150,000 calls; sent to Redis as one script, that stalls every replica). So the per-tool
    /// levels of one request are at most the sum of the limited tools' bursts.
    pub fn within_bursts(&self, upstream: UpstreamId, rpc: &Rpc) -> Result<(), Refusal> {
        let Some(tools) = self.tools.get(upstream.0 as usize).filter(|t| !t.is_empty()) else { return Ok(()) };
        let mut counts: Vec<(&str, u32)> = Vec::new();
        for tool in rpc.tool_calls() {
            let Some((limit, _)) = tools.get(tool) else { continue };
            let i = counts.iter().position(|(name, _)| *name == tool).unwrap_or_else(|| {
                counts.push((tool, 0));
                counts.len() - 1
            });
            counts[i].1 += 1;
            if counts[i].1 > limit.burst.get() {
                let retry_after = limit.interval() * limit.burst.get();
                return Err(Refusal { level: Level::Tool, limit: *limit, retry_after });
            }
        }
        Ok(())
    }

    /// The quota of `tool` on `upstream`, per user, when it has one ([`RateLimits::check_tools`]).
    pub fn tool_limit(&self, upstream: UpstreamId, tool: &str) -> Option<Limit> {
        self.tools.get(upstream.0 as usize)?.get(tool).map(|(limit, _)| *limit)
    }
}

impl RateLimits {
    /// The per-tool levels alone, for the tools `rpc` calls: the request path checks them once the
    /// body is read, after the other levels (which need no body) passed.
    pub fn check_tools(
        &self,
        plan: &LimitPlan,
        user: UserId,
        upstream: UpstreamId,
        rpc: &Rpc,
        statuses: &mut Statuses,
    ) -> Result<(), Refusal> {
        let Some(tools) = plan.tools.get(upstream.0 as usize) else { return Ok(()) };
        plan.within_bursts(upstream, rpc)?;
        for tool in rpc.tool_calls() {
            if let Some((limit, limiter)) = tools.get(tool) {
                statuses.push(outcome(self, Level::Tool, *limit, limiter.check_key(&user.0))?);
            }
        }
        Ok(())
    }
}

fn outcome(
    limits: &RateLimits,
    level: Level,
    limit: Limit,
    result: Result<governor::middleware::StateSnapshot, governor::NotUntil<Nanos>>,
) -> Result<LevelStatus, Refusal> {
    match result {
        Ok(snapshot) => {
            let remaining = snapshot.remaining_burst_capacity();
            let reset = limit.interval() * (limit.burst.get() - remaining.min(limit.burst.get()));
            Ok(LevelStatus { level, limit, remaining, reset })
        }
        Err(not_until) => Err(Refusal { level, limit, retry_after: not_until.wait_time_from(limits.now()) }),
    }
}

/// Whole seconds, rounded up: `Retry-After` and the `t` of `RateLimit` never promise too early.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers): one item per level.
pub fn headers(statuses: &Statuses) -> Option<(String, String)> {
    use std::fmt::Write;
    statuses.iter().next()?;
    let (mut policy, mut state) = (String::new(), String::new());
    for (i, s) in statuses.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(policy, "{sep}\"{}\";q={};w={}", s.level.as_str(), s.limit.requests, ceil_secs(s.limit.per));
        let _ = write!(state, "{sep}\"{}\";r={};t={}", s.level.as_str(), s.remaining, ceil_secs(s.reset));
    }
    Some((policy, state))
}

/// `RateLimit-Policy` and `RateLimit` for a refused request: the refusing level, nothing left, and the
/// reset at the retry time.
pub fn refusal_headers(refusal: &Refusal) -> (String, String) {
    let status = LevelStatus { level: refusal.level, limit: refusal.limit, remaining: 0, reset: refusal.retry_after };
    headers(&Statuses([Some(status), None, None, None])).expect("one status")
}
