//! The shared rate limiter: the GCRA of [`super::ratelimit`] with its state in Redis, so that every
//! replica draws on one budget per user, key and upstream.
//!
//! One request is one round trip: [`GCRA`] is a Lua script that checks every level of the request in
//! the local limiter's order (most specific first), counts each level that lets it through, and stops
//! at the first that refuses, so nothing after it is used up. It reads the clock with `TIME` on the
//! server, so the replicas' clocks do not matter. Keys are stable names (see [`RedisLimiter::key`]):
//! user names, key ids, upstream and tool names and the quota, never a per-process `UserId`; each key
//! expires when its bucket is full again, so Redis holds only users that are being limited right now.
//!
//! The request never waits on Redis longer than `[rate_limiter] timeout`. A failed or late answer marks
//! Redis down (one log line, `mcp_proxy_rate_limit_backend_up` 0); from then on requests do not try it
//! at all: `on_error` decides (`fail_open`: the replica's local limiter, `fail_closed`: 503) until a
//! background task reconnects (one log line, gauge 1). Redis Cluster is not supported: the keys of one
//! request live in different hash slots.

use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::gauge::Gauge;
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

use crate::config::runtime::{OnRedisError, RedisSettings};
use crate::error::ProxyError;
use crate::policy::mcp::Rpc;
use crate::policy::ratelimit::{Level, LevelStatus, Limit, LimitPlan, LimitRequest, RateLimits, Refusal, Statuses};
use crate::store::{UpstreamId, UserId};

/// GCRA over `#KEYS` levels, as `governor` computes it (with `T` the time per request and
/// `tau = T x (burst - 1)`, a request passes when `now >= tat - tau`, and the new `tat` is
/// `max(tat, now) + T`), in whole microseconds (exact in Lua's doubles for centuries).
///
/// `ARGV[2i-1]`, `ARGV[2i]`: `T` and `tau` of `KEYS[i]`. Returns `{refused, retry_after, remaining...}`:
/// `refused` is the 1-based index of the level that refused (0: none), `retry_after` its wait in
/// microseconds, then the remaining burst of every level counted before it. Values are written with
/// `%.0f` (a plain `tostring` keeps 14 digits) and expire (`PX`) when the bucket is full again.
/// `TIME` before a write needs effect replication: the default since Redis 5, asked for on older ones.
pub const GCRA: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local out = {0, 0}
for i = 1, #KEYS do
  local t = tonumber(ARGV[2 * i - 1])
  local tau = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now) or now
  local earliest = tat - tau
  if now < earliest then
    out[1] = i
    out[2] = earliest - now
    return out
  end
  local new = math.max(tat, now) + t
  redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', math.max(1, math.ceil((new - now) / 1000)))
  out[#out + 1] = math.floor(math.min(now + tau + t - new, tau + t) / t)
end
return out
"#;

/// How long the background task waits for a connection and its first answers, and then between tries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RETRY_INTERVAL: Duration = Duration::from_millis(250);

/// One level of one request, as Redis sees it: the level, its quota and the key of its bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedLevel {
    pub level: Level,
    pub limit: Limit,
    pub key: String,
}

/// The stable names of a request's user, upstream and key, which its Redis keys are made of.
#[derive(Clone, Copy, Debug)]
pub struct Names<'a> {
    pub user: &'a str,
    pub upstream: &'a str,
    pub key: &'a str,
}

/// Redis did not answer in time, or answered with an error: `on_error` decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unavailable;

pub struct RedisLimiter {
    client: redis::Client,
    /// `None` while Redis is down: requests then do not try it (no waiting on a dead server).
    conn: ArcSwapOption<MultiplexedConnection>,
    script: redis::Script,
    timeout: Duration,
    prefix: Box<str>,
    on_error: OnRedisError,
    /// The replica's own limiter: `fail_open` falls back to it.
    local: Arc<RateLimits>,
    up: Gauge,
    /// Wakes the reconnecting task.
    wake: Arc<Notify>,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client's connection info holds the password: never printed.
        f.debug_struct("RedisLimiter").field("prefix", &self.prefix).field("up", &self.is_up()).finish()
    }
}

impl Drop for RedisLimiter {
    fn drop(&mut self) {
        // The reconnecting task holds a `Weak`: woken, it finds the limiter gone and ends.
        self.wake.notify_one();
    }
}

impl RedisLimiter {
    /// Connects (waiting at most a second), then keeps reconnecting in the background whenever Redis
    /// is lost. A Redis that is down at start is no error: `on_error` applies until it is reachable.
    pub async fn start(settings: &RedisSettings, local: Arc<RateLimits>, up: Gauge) -> Result<Arc<Self>, String> {
        let info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())
            .map_err(|_| "rate_limiter.url is not a Redis URL".to_owned())?;
        let mut redis_settings = info.redis_settings().clone();
        if let Some(user) = &settings.username {
            redis_settings = redis_settings.set_username(user);
        }
        if let Some(password) = &settings.password {
            redis_settings = redis_settings.set_password(password.expose());
        }
        let client = redis::Client::open(info.set_redis_settings(redis_settings))
            .map_err(|_| "rate_limiter: the Redis client cannot be built from these settings".to_owned())?;
        up.set(0);
        let limiter = Arc::new(RedisLimiter {
            client,
            conn: ArcSwapOption::empty(),
            script: redis::Script::new(GCRA),
            timeout: settings.timeout,
            prefix: settings.key_prefix.as_str().into(),
            on_error: settings.on_error,
            local,
            up,
            wake: Arc::new(Notify::new()),
        });
        if let Err(why) = limiter.connect().await {
            tracing::warn!(error = why, on_error = limiter.on_error_str(), "rate limits: Redis unreachable at start");
            limiter.wake.notify_one();
        }
        tokio::spawn(reconnect(Arc::downgrade(&limiter), limiter.wake.clone()));
        Ok(limiter)
    }

    /// Whether requests are decided in Redis right now.
    pub fn is_up(&self) -> bool {
        self.conn.load().is_some()
    }

    /// [`RateLimits::check`] in Redis: the levels of `request` that need no body, in one round trip.
    /// A refusal is `RateLimited`; an unreachable Redis is `on_error`'s: the local limiter's decision
    /// (`fail_open`) or `RateLimiterUnavailable` (`fail_closed`).
    pub async fn check(
        &self,
        plan: &LimitPlan,
        request: &LimitRequest,
        names: Names<'_>,
    ) -> Result<Statuses, ProxyError> {
        let levels: Vec<SharedLevel> =
            plan.limits(request).map(|(level, limit)| self.level(level, limit, names, None)).collect();
        let mut statuses = Statuses::default();
        if levels.is_empty() {
            return Ok(statuses);
        }
        match self.check_levels(&levels, &mut statuses).await {
            Ok(decision) => decision.map(|()| statuses).map_err(ProxyError::RateLimited),
            Err(Unavailable) => match self.on_error {
                OnRedisError::FailOpen => self.local.check(plan, request).map_err(ProxyError::RateLimited),
                OnRedisError::FailClosed => Err(ProxyError::RateLimiterUnavailable),
            },
        }
    }

    /// [`RateLimits::check_tools`] in Redis: the per-tool levels of the tools `rpc` calls, in one round
    /// trip; `on_error` as in [`RedisLimiter::check`].
    pub async fn check_tools(
        &self,
        plan: &LimitPlan,
        user: UserId,
        upstream: UpstreamId,
        names: Names<'_>,
        rpc: &Rpc,
        statuses: &mut Statuses,
    ) -> Result<(), ProxyError> {
        plan.within_bursts(upstream, rpc).map_err(ProxyError::RateLimited)?;
        let levels: Vec<SharedLevel> = rpc
            .tool_calls()
            .filter_map(|tool| Some(self.level(Level::Tool, plan.tool_limit(upstream, tool)?, names, Some(tool))))
            .collect();
        if levels.is_empty() {
            return Ok(());
        }
        match self.check_levels(&levels, statuses).await {
            Ok(decision) => decision.map_err(ProxyError::RateLimited),
            Err(Unavailable) => match self.on_error {
                OnRedisError::FailOpen => {
                    self.local.check_tools(plan, user, upstream, rpc, statuses).map_err(ProxyError::RateLimited)
                }
                OnRedisError::FailClosed => Err(ProxyError::RateLimiterUnavailable),
            },
        }
    }

    /// The Redis key of one level: `<prefix>:<level>:<quota>:[<upstream>:[<tool>:]]<user or key id>`.
    /// The quota is part of the name so that a changed quota starts a fresh bucket, as a reload does
    /// locally. Upstream names hold no `:`; tool names may, so they are escaped; the last part needs none.
    pub fn key(&self, level: Level, limit: Limit, names: Names<'_>, tool: Option<&str>) -> String {
        let quota = format_args!("{}/{}/{}", limit.requests, limit.per.as_nanos(), limit.burst);
        let prefix = &self.prefix;
        match level {
            Level::UserUpstream => format!("{prefix}:uu:{quota}:{}:{}", names.upstream, names.user),
            Level::User => format!("{prefix}:u:{quota}:{}", names.user),
            Level::Key => format!("{prefix}:k:{quota}:{}", names.key),
            Level::Tool => {
                let tool = tool.unwrap_or_default().replace('%', "%25").replace(':', "%3A");
                format!("{prefix}:t:{quota}:{}:{tool}:{}", names.upstream, names.user)
            }
        }
    }

    fn level(&self, level: Level, limit: Limit, names: Names<'_>, tool: Option<&str>) -> SharedLevel {
        SharedLevel { level, limit, key: self.key(level, limit, names, tool) }
    }

    /// One round trip: checks `levels` in order and counts each one that passes, up to the first that
    /// refuses. The statuses of the levels that passed go to `statuses`.
    pub async fn check_levels(
        &self,
        levels: &[SharedLevel],
        statuses: &mut Statuses,
    ) -> Result<Result<(), Refusal>, Unavailable> {
        let Some(conn) = self.conn.load_full() else { return Err(Unavailable) };
        let mut invocation = self.script.prepare_invoke();
        for level in levels {
            let (t, tau) = micros(level.limit);
            invocation.key(level.key.as_str()).arg(t).arg(tau);
        }
        let mut connection = MultiplexedConnection::clone(&conn);
        let reply = match tokio::time::timeout(self.timeout, invocation.invoke_async::<Vec<i64>>(&mut connection)).await
        {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return Err(self.lost(conn, &describe(&e))),
            Err(_) => return Err(self.lost(conn, "no answer within rate_limiter.timeout")),
        };
        let Some(outcome) = decode(levels, &reply, statuses) else {
            return Err(self.lost(conn, "the script's answer has an unexpected shape"));
        };
        Ok(outcome)
    }

    /// Marks Redis down after `conn` failed, once: the first request to see it fail logs the transition
    /// and wakes the reconnecting task; a failure on a connection already replaced changes nothing.
    fn lost(&self, conn: Arc<MultiplexedConnection>, why: &str) -> Unavailable {
        let previous = self.conn.compare_and_swap(&Some(conn.clone()), None);
        if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, &conn)) {
            self.up.set(0);
            tracing::warn!(error = why, on_error = self.on_error_str(), "rate limits: Redis unreachable");
            self.wake.notify_one();
        }
        Unavailable
    }

    /// A new connection, checked with the script itself (which also loads it): on success requests use
    /// Redis again.
    async fn connect(&self) -> Result<(), String> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT));
        let attempt = async {
            let mut conn = self.client.get_multiplexed_async_connection_with_config(&config).await?;
            self.script.prepare_invoke().invoke_async::<Vec<i64>>(&mut conn).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT * 2, attempt).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(describe(&e)),
            Err(_) => return Err("no connection within 2s".into()),
        };
        self.conn.store(Some(Arc::new(conn)));
        self.up.set(1);
        tracing::info!("rate limits: Redis reachable, limits are shared");
        Ok(())
    }

    fn on_error_str(&self) -> &'static str {
        match self.on_error {
            OnRedisError::FailOpen => "fail_open: the local limiter decides",
            OnRedisError::FailClosed => "fail_closed: limited requests get 503",
        }
    }
}

/// While Redis is down: tries again every [`RETRY_INTERVAL`] until it is back, then waits to be woken.
async fn reconnect(limiter: Weak<RedisLimiter>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        loop {
            let Some(limiter) = limiter.upgrade() else { return };
            if limiter.is_up() || limiter.connect().await.is_ok() {
                break;
            }
            drop(limiter);
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }
}

/// `T` and `tau` in whole microseconds: `T` rounded up (at least 1 us), so Redis never allows more
/// than the local limiter; the difference is under a microsecond per request.
fn micros(limit: Limit) -> (u64, u64) {
    let t = limit.interval().as_nanos().div_ceil(1000).max(1) as u64;
    (t, t * u64::from(limit.burst.get() - 1))
}

/// The script's answer as the local limiter gives it: statuses for the levels that passed, the
/// refusal of the one that did not. `None` when the answer does not fit `levels`.
fn decode(levels: &[SharedLevel], reply: &[i64], statuses: &mut Statuses) -> Option<Result<(), Refusal>> {
    let (&[refused, retry_after], remaining) = reply.split_first_chunk::<2>()?;
    // The index of the refusing level, if one refused; the levels before it passed.
    let refusing = match usize::try_from(refused).ok()? {
        0 => None,
        i if i <= levels.len() => Some(i - 1),
        _ => return None,
    };
    let passed = refusing.unwrap_or(levels.len());
    if remaining.len() != passed {
        return None;
    }
    for (level, &remaining) in levels.iter().zip(remaining) {
        let remaining = u32::try_from(remaining).ok()?.min(level.limit.burst.get());
        let reset = level.limit.interval() * (level.limit.burst.get() - remaining);
        statuses.push(LevelStatus { level: level.level, limit: level.limit, remaining, reset });
    }
    let Some(i) = refusing else { return Some(Ok(())) };
    let retry_after = Duration::from_micros(u64::try_from(retry_after).ok()?);
    Some(Err(Refusal { level: levels[i].level, limit: levels[i].limit, retry_after }))
}

/// A Redis error for the log: its kind and the server's message, never the connection's settings.
fn describe(e: &redis::RedisError) -> String {
    if e.is_timeout() { "timed out".into() } else { e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(requests: u32, per_secs: u64, burst: u32) -> Limit {
        Limit::new(requests.try_into().unwrap(), Duration::from_secs(per_secs), Some(burst.try_into().unwrap()))
            .unwrap()
    }

    fn level(level: Level, limit: Limit) -> SharedLevel {
        SharedLevel { level, limit, key: String::new() }
    }

    #[test]
    fn microseconds_round_up_and_tau_is_burst_minus_one() {
        assert_eq!(micros(limit(2, 60, 2)), (30_000_000, 30_000_000));
        assert_eq!(micros(limit(7, 60, 1)), (8_571_429, 0));
        let fast = Limit::new(1_000_000_000.try_into().unwrap(), Duration::from_secs(1), None).unwrap();
        assert_eq!(micros(fast).0, 1, "at least a microsecond");
    }

    #[test]
    fn answers_decode_to_the_local_statuses_and_refusals() {
        let levels = [level(Level::UserUpstream, limit(2, 60, 2)), level(Level::User, limit(10, 60, 10))];
        let mut statuses = Statuses::default();
        assert_eq!(decode(&levels, &[0, 0, 1, 9], &mut statuses), Some(Ok(())));
        let got: Vec<_> = statuses.iter().map(|s| (s.level, s.remaining, s.reset.as_secs())).collect();
        assert_eq!(got, [(Level::UserUpstream, 1, 30), (Level::User, 9, 6)]);

        let mut statuses = Statuses::default();
        let refusal = decode(&levels, &[2, 5_200_000, 0], &mut statuses).unwrap().unwrap_err();
        assert_eq!((refusal.level, refusal.retry_after), (Level::User, Duration::from_millis(5200)));
        assert_eq!(statuses.iter().count(), 1, "the level before the refusal was counted");

        for bad in [&[][..], &[0], &[0, 0, 1], &[3, 0, 1, 1], &[-1, 0], &[1, -5]] {
            assert_eq!(decode(&levels, bad, &mut Statuses::default()), None, "{bad:?}");
        }
    }
}
