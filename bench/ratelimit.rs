//! Cost of the rate-limit check on the request path, and memory per tracked user.
//!
//!     cargo bench --bench ratelimit
//!
//! Compares the proxy's limiter (keyed by the interned `UserId`, a `u32`) with a plain keyed governor
//! limiter on `String` user names, in the same run, at 10k and 1M distinct users. Memory is counted by a
//! counting allocator: bytes per tracked user after the users were seen, and after eviction.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use governor::clock::FakeRelativeClock;
use governor::{Quota, RateLimiter};
use mcp_tenant_proxy::config::Config;
use mcp_tenant_proxy::policy::ratelimit::{Limit, LimitClock, LimitPlan, LimitRequest, RateLimits};
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

fn main() {
    memory_report();
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    check_cost(&mut c);
    c.final_summary();
}
