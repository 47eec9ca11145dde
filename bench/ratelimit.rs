//! Cost of the rate-limit check on the request path, and memory per tracked user.
//!
//!     cargo bench --bench ratelimit
//!     MCP_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo bench --bench ratelimit   # with the Redis limiter
//!
//! With `MCP_TEST_REDIS_URL` (as `scripts/test` exports it), the same run also measures the Redis
//! limiter against the local one: latency per check (`limiter_backend`), and wall time and CPU per
//! check of this process and of `redis-server` (its `INFO cpu`), one check at a time and 32 at once.
//!
//! Compares the proxy's limiter (keyed by the interned `UserId`, a `u32`) with a plain keyed governor
//! limiter on `String` user names, in the same run, at 10k and 1M distinct users. Memory is counted by a
//! counting allocator: bytes per tracked user after the users were seen, and after eviction.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use governor::clock::FakeRelativeClock;
use governor::{Quota, RateLimiter};
use mcp_tenant_proxy::config::Config;
use mcp_tenant_proxy::config::runtime::{OnRedisError, RedisSettings};
use mcp_tenant_proxy::policy::ratelimit::{Limit, LimitClock, LimitPlan, LimitRequest, RateLimits};
use mcp_tenant_proxy::policy::ratelimit_redis::{Names, RedisLimiter};
use mcp_tenant_proxy::store::{UpstreamId, UserId};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A config with a per-user default limit high enough never to refuse, and `users` users.
fn setup(users: u32, clock: &FakeRelativeClock) -> (RateLimits, LimitPlan) {
    let mut config = Config::from_toml(
        "rate_limit = { requests = 4000000000, per = \"1h\" }\n[upstreams.gh]\nurl = \"http://127.0.0.1:1/\"\ninject = { header = \"x\", value = \"{secret}\" }\n",
        std::path::Path::new("."),
    )
    .unwrap();
    for i in 0..users {
        config.directory.add_user(&format!("user-{i:07}"));
    }
    let limits = RateLimits::with_clock(LimitClock::Fake(clock.clone()));
    let plan = limits.plan(&config);
    (limits, plan)
}

/// The config's default user limit, as the request path passes it for a user without its own.
fn request(user: u32) -> LimitRequest {
    static LIMIT: std::sync::OnceLock<Limit> = std::sync::OnceLock::new();
    let limit = *LIMIT.get_or_init(|| {
        Limit::new(std::num::NonZeroU32::new(4_000_000_000).unwrap(), Duration::from_secs(3600), None).unwrap()
    });
    LimitRequest { key: 0, user: UserId(user), user_limit: Some(limit), upstream: UpstreamId(0) }
}

/// A fixed pseudo-random walk over the users (xorshift), so both limiters see the same sequence.
fn sequence(users: u32, len: usize) -> Vec<u32> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % users as u64) as u32
        })
        .collect()
}

fn check_cost(c: &mut Criterion) {
    let mut group = c.benchmark_group("limiter_check");
    for users in [10_000u32, 1_000_000] {
        let order = sequence(users, 1 << 20);
        let clock = FakeRelativeClock::default();
        let (limits, plan) = setup(users, &clock);
        for &u in &order {
            let _ = limits.check(&plan, &request(u)); // warm: every user tracked
        }
        let mut i = 0;
        group.bench_with_input(BenchmarkId::new("proxy_userid_u32", users), &users, |b, _| {
            b.iter(|| {
                i = (i + 1) & (order.len() - 1);
                black_box(limits.check(&plan, &request(order[i])).is_ok())
            })
        });

        let names: Vec<String> = (0..users).map(|i| format!("user-{i:07}")).collect();
        let quota = Quota::with_period(Duration::from_nanos(1)).unwrap().allow_burst(4_000_000_000.try_into().unwrap());
        let plain = RateLimiter::keyed(quota);
        for &u in &order {
            let _ = plain.check_key(&names[u as usize]);
        }
        let mut i = 0;
        group.bench_with_input(BenchmarkId::new("plain_governor_string", users), &users, |b, _| {
            b.iter(|| {
                i = (i + 1) & (order.len() - 1);
                black_box(plain.check_key(&names[order[i] as usize]).is_ok())
            })
        });
    }
    group.finish();
}

fn memory_report() {
    const USERS: u32 = 1_000_000;
    let clock = FakeRelativeClock::default();
    let (limits, plan) = setup(USERS, &clock);
    let before = LIVE.load(Ordering::Relaxed);
    for u in 0..USERS {
        let _ = limits.check(&plan, &request(u));
    }
    let tracked = LIVE.load(Ordering::Relaxed) - before;
    limits.evict();
    let kept = LIVE.load(Ordering::Relaxed) - before;
    clock.advance(Duration::from_secs(3600));
    limits.evict();
    let evicted = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "memory, {USERS} users: {:.1} bytes/user tracked; {:.1} after an eviction pass with every bucket in use; \
         {:.1} after eviction of idle users ({} still tracked)",
        tracked as f64 / USERS as f64,
        kept as f64 / USERS as f64,
        evicted as f64 / USERS as f64,
        limits.tracked()
    );

    let names: Vec<String> = (0..USERS).map(|i| format!("user-{i:07}")).collect();
    let quota = Quota::with_period(Duration::from_nanos(1)).unwrap().allow_burst(4_000_000_000.try_into().unwrap());
    let before = LIVE.load(Ordering::Relaxed);
    let plain = RateLimiter::keyed(quota);
    for name in &names {
        let _ = plain.check_key(name);
    }
    let plain_bytes = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "memory, {USERS} users, plain governor with String keys: {:.1} bytes/user",
        plain_bytes as f64 / USERS as f64
    );
}

/// The local limiter and the Redis limiter on the same plan: one user level that never refuses.
struct Backends {
    runtime: tokio::runtime::Runtime,
    local: Arc<RateLimits>,
    redis: Arc<RedisLimiter>,
    plan: LimitPlan,
    names: Vec<String>,
    url: String,
}

fn backends(url: String, users: u32) -> Backends {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (local, plan) = setup(users, &FakeRelativeClock::default());
    let local = Arc::new(local);
    let settings = RedisSettings {
        url: url.clone(),
        username: None,
        password: None,
        timeout: Duration::from_millis(50),
        on_error: OnRedisError::FailClosed,
        key_prefix: format!("bench{}", std::process::id()),
    };
    let redis =
        runtime.block_on(RedisLimiter::start(&settings, local.clone(), Default::default())).expect("a Redis limiter");
    assert!(redis.is_up(), "Redis at MCP_TEST_REDIS_URL does not answer");
    let names = (0..users).map(|i| format!("user-{i:07}")).collect();
    Backends { runtime, local, redis, plan, names, url }
}

impl Backends {
    async fn redis_check(&self, user: u32) -> bool {
        let names = Names { user: &self.names[user as usize], upstream: "gh", key: "k" };
        self.redis.check(&self.plan, &request(user), names).await.is_ok()
    }

    /// `redis-server`'s CPU seconds so far (user + system), from `INFO cpu`.
    fn redis_cpu(&self) -> f64 {
        self.runtime.block_on(async {
            let mut conn =
                redis::Client::open(self.url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
            let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await.unwrap();
            info.lines()
                .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
                .filter_map(|l| l.split_once(':')?.1.trim().parse::<f64>().ok())
                .sum()
        })
    }
}

/// This process's CPU seconds so far (user + system), from `/proc/self/stat` (clock ticks of 10 ms).
fn process_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn backend_cost(c: &mut Criterion, b: &Backends) {
    let order = sequence(b.names.len() as u32, 1 << 16);
    let mut group = c.benchmark_group("limiter_backend");
    let mut i = 0;
    group.bench_function("local", |bench| {
        bench.iter(|| {
            i = (i + 1) & (order.len() - 1);
            black_box(b.local.check(&b.plan, &request(order[i])).is_ok())
        })
    });
    let mut i = 0;
    group.bench_function("redis", |bench| {
        bench.iter(|| {
            i = (i + 1) & (order.len() - 1);
            black_box(b.runtime.block_on(b.redis_check(order[i])))
        })
    });
    group.finish();
}

/// Wall time and CPU per check over `n` checks, `concurrency` at a time.
fn backend_cpu_report(b: &Arc<Backends>) {
    const N: usize = 40_000;
    let order = Arc::new(sequence(b.names.len() as u32, N));
    let (cpu, started) = (process_cpu(), std::time::Instant::now());
    for &u in order.iter() {
        black_box(b.local.check(&b.plan, &request(u)).is_ok());
    }
    let (wall, cpu) = (started.elapsed().as_secs_f64(), process_cpu() - cpu);
    println!(
        "local limiter, 1 at a time: {:.2} us wall and {:.2} us CPU per check",
        wall * 1e6 / N as f64,
        cpu * 1e6 / N as f64
    );
    for concurrency in [1usize, 32] {
        let (cpu, redis_cpu, started) = (process_cpu(), b.redis_cpu(), std::time::Instant::now());
        let allowed: usize = b.runtime.block_on(async {
            let tasks: Vec<_> = (0..concurrency)
                .map(|t| {
                    let (b, order) = (b.clone(), order.clone());
                    tokio::spawn(async move {
                        let mut allowed = 0;
                        for &u in order.iter().skip(t).step_by(concurrency) {
                            allowed += usize::from(b.redis_check(u).await);
                        }
                        allowed
                    })
                })
                .collect();
            let mut allowed = 0;
            for task in tasks {
                allowed += task.await.unwrap();
            }
            allowed
        });
        let (wall, cpu, redis_cpu) = (started.elapsed().as_secs_f64(), process_cpu() - cpu, b.redis_cpu() - redis_cpu);
        assert_eq!(allowed, N, "every check allowed (none fell back)");
        println!(
            "redis limiter, {concurrency} at a time: {:.2} us wall per check ({:.0} checks/s), {:.2} us CPU per check \
             in the proxy, {:.2} us in redis-server",
            wall * 1e6 / N as f64,
            N as f64 / wall,
            cpu * 1e6 / N as f64,
            redis_cpu * 1e6 / N as f64
        );
    }
}

fn main() {
    memory_report();
    let backends = match std::env::var("MCP_TEST_REDIS_URL") {
        Ok(url) => {
            let backends = Arc::new(backends(url, 10_000));
            backend_cpu_report(&backends);
            Some(backends)
        }
        Err(_) => {
            println!("MCP_TEST_REDIS_URL is not set: the Redis limiter is not measured (scripts/test sets it)");
            None
        }
    };
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    check_cost(&mut c);
    if let Some(backends) = &backends {
        backend_cost(&mut c, backends);
    }
    c.final_summary();
}
