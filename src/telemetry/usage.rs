//! Per-user usage, aggregated in memory on the request path and flushed to the store on a schedule:
//! requests and denials per (user, upstream), last seen, and each key's last use. Never a database
//! write per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::store::model::{UnixTime, UsageDelta};
use crate::sync::lock;

#[derive(Default)]
struct Counts {
    requests: u64,
    denials: u64,
    last_seen: UnixTime,
}

#[derive(Default)]
struct Pending {
    usage: HashMap<(Arc<str>, Arc<str>), Counts>,
    keys: HashMap<Arc<str>, UnixTime>,
}

/// Counters since the last flush. One short lock per request; no allocation once a (user, upstream)
/// pair has been seen in the current period (the keys are the directory's own `Arc<str>`s).
#[derive(Default)]
pub struct UsageCounters {
    pending: Mutex<Pending>,
}

/// What one flush writes: usage deltas and keys' last use.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Flush {
    pub usage: Vec<UsageDelta>,
    pub keys: Vec<(String, UnixTime)>,
}

impl UsageCounters {
    /// Counts one request that had an acting user on an upstream; `denied` when the proxy refused it.
    pub fn record(&self, user: &Arc<str>, upstream: &Arc<str>, key: Option<&Arc<str>>, denied: bool) {
        let now = now();
        let mut pending = lock(&self.pending);
        let counts = pending.usage.entry((user.clone(), upstream.clone())).or_default();
        counts.requests += 1;
        counts.denials += u64::from(denied);
        counts.last_seen = now;
        if let Some(key) = key {
            pending.keys.insert(key.clone(), now);
        }
    }

    /// Takes everything counted so far, leaving the counters empty.
    pub fn take(&self) -> Flush {
        let pending = std::mem::take(&mut *lock(&self.pending));
        Flush {
            usage: pending
                .usage
                .into_iter()
                .map(|((user, upstream), c)| UsageDelta {
                    user: user.to_string(),
                    upstream: upstream.to_string(),
                    requests: c.requests,
                    denials: c.denials,
                    last_seen: c.last_seen,
                })
                .collect(),
            keys: pending.keys.into_iter().map(|(key, at)| (key.to_string(), at)).collect(),
        }
    }

    /// Puts a flush that could not be written back, so nothing counted is lost.
    pub fn restore(&self, flush: Flush) {
        let mut pending = lock(&self.pending);
        for delta in flush.usage {
            let counts = pending.usage.entry((delta.user.into(), delta.upstream.into())).or_default();
            counts.requests += delta.requests;
            counts.denials += delta.denials;
            counts.last_seen = counts.last_seen.max(delta.last_seen);
        }
        for (key, at) in flush.keys {
            let last = pending.keys.entry(key.into()).or_default();
            *last = (*last).max(at);
        }
    }
}

fn now() -> UnixTime {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as UnixTime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_user_and_upstream_and_survive_a_failed_flush() {
        let counters = UsageCounters::default();
        let (alice, bob, gh) = (Arc::from("alice"), Arc::from("bob"), Arc::from("github"));
        let key = Arc::from("alice-laptop");
        counters.record(&alice, &gh, Some(&key), false);
        counters.record(&alice, &gh, Some(&key), true);
        counters.record(&bob, &gh, None, false);
        let mut flush = counters.take();
        flush.usage.sort_by(|a, b| a.user.cmp(&b.user));
        assert_eq!(flush.usage.len(), 2);
        assert_eq!((flush.usage[0].user.as_str(), flush.usage[0].requests, flush.usage[0].denials), ("alice", 2, 1));
        assert_eq!((flush.usage[1].user.as_str(), flush.usage[1].requests, flush.usage[1].denials), ("bob", 1, 0));
        assert_eq!(flush.keys.len(), 1);
        assert_eq!(counters.take(), Flush::default(), "taken means gone");

        counters.restore(flush);
        counters.record(&alice, &gh, None, false);
        let again = counters.take();
        let alice_row = again.usage.iter().find(|d| d.user == "alice").unwrap();
        assert_eq!((alice_row.requests, alice_row.denials), (3, 1), "a failed flush is counted again, not lost");
    }
}
