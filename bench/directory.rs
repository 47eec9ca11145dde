//! The live directory at scale: memory per user and the cost of one user's update, at 10 users and at
//! 1,000,000 (each with a key and a credential), in one run.
//!
//!     cargo bench --bench directory [-- USERS]
//!
//! Memory is counted by a counting allocator (bytes held after the load, the snapshot itself freed),
//! so it is the directory's own and not the allocator's retained pages. The update cost is what an
//! admin write or a change from another replica costs once the store has been read: replace one
//! user's entries (here: add 100,000 new users one at a time, then change each once).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use http::HeaderValue;
use mcp_tenant_proxy::secret::Secret;
use mcp_tenant_proxy::secret::sha256;
use mcp_tenant_proxy::store::KeyKind;
use mcp_tenant_proxy::store::live::{FileSide, LiveDirectory, Rendered};
use mcp_tenant_proxy::store::model::{CredentialSecret, Snapshot, SnapshotKey, User, UserLimit, UserSnapshot};

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

/// A config that serves upstream `github` with `Bearer {secret}` and declares nobody.
struct Config(Arc<str>);

impl FileSide for Config {
    fn has_user(&self, _: &str) -> bool {
        false
    }
    fn has_key(&self, _: &[u8; 32], _: &str) -> bool {
        false
    }
    fn render(&self, _: &str, _: &str, secret: &Secret) -> Rendered {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", secret.expose())).unwrap();
        value.set_sensitive(true);
        Rendered::Value(self.0.clone(), value)
    }
}

fn user(i: usize, prefix: &str) -> (User, SnapshotKey, CredentialSecret) {
    let id = format!("{prefix}-{i:07}");
    let key = format!("mtp_{:064x}", i);
    (
        User { id: id.clone(), rate_limit: UserLimit::Default, created_at: 0 },
        SnapshotKey {
            id: format!("k_{i:016x}"),
            sha256: sha256(key.as_bytes()),
            kind: KeyKind::Standard,
            user: id.clone(),
            act_as: vec![],
            expires_at: None,
            user_token: None,
        },
        // A GitHub token's length.
        CredentialSecret {
            user: id,
            upstream: "github".into(),
            credential_id: "default".into(),
            secret: Secret::new(format!("ghp_{i:036}")),
        },
    )
}

fn snapshot(users: usize) -> Snapshot {
    let mut s = Snapshot::default();
    for i in 0..users {
        let (u, k, c) = user(i, "user");
        s.users.push(u);
        s.keys.push(k);
        s.credentials.push(c);
    }
    s
}

/// Adds `n` new users one at a time, then changes each once; returns ns per update.
fn updates(dir: &LiveDirectory, config: &Config, n: usize) -> f64 {
    let started = Instant::now();
    for round in 0..2 {
        for i in 0..n {
            let (mut u, k, c) = user(i, "new");
            if round == 1 {
                u.rate_limit = UserLimit::Unlimited;
            }
            let name = u.id.clone();
            let snap = UserSnapshot { user: u, keys: vec![k], credentials: vec![c], tokens: vec![], taken_at: 0 };
            dir.apply(config, &name, Some((&snap).into()));
        }
    }
    started.elapsed().as_nanos() as f64 / (2 * n) as f64
}

fn main() {
    let users: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1_000_000);
    let config = Config("github".into());
    let mut small_cost = 0.0;
    for n in [10, users] {
        let base = LIVE.load(Ordering::Relaxed);
        let dir = LiveDirectory::default();
        let snap = snapshot(n);
        let started = Instant::now();
        dir.replace_all(&config, snap);
        let load = started.elapsed();
        let held = LIVE.load(Ordering::Relaxed) - base;
        let cost = updates(&dir, &config, 100_000);
        if n == 10 {
            small_cost = cost;
            println!("at {n} users: {cost:.0} ns per user update");
        } else {
            println!(
                "at {n} users: load {:.2} s, directory {} bytes per user (key and credential included), {cost:.0} ns per user update ({:.2} x the cost at 10 users)",
                load.as_secs_f64(),
                held / n as isize,
                cost / small_cost
            );
        }
    }
}
