//! Keeps the live directory of this replica in step with a shared store: each [`Change`] the store
//! announces is applied as it arrives, off the request path.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use super::live::{FileSide, LiveDirectory};
use super::model::{Change, Store};

/// The config in force when a change is applied (it renders credentials for its upstreams).
pub type CurrentSide = Arc<dyn Fn() -> Arc<dyn FileSide + Send + Sync> + Send + Sync>;

/// More users queued at once than this are reloaded with one whole resync instead of one by one (a
/// bulk import elsewhere must not put minutes of re-reads ahead of a revocation).
const COLLAPSE_INTO_RESYNC: usize = 10_000;
/// After a failed apply, a whole resync is owed: retried after this, doubling up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Applies `changes` until the sender goes. Changes that queued up while one was applied are taken
/// together: a `Resync` among them reloads everything once (and covers the users named with it), and a
/// user named several times is read once. A change that fails to apply is never dropped: a whole resync
/// is owed from then on, retried with backoff until one succeeds.
pub async fn follow(
    mut changes: UnboundedReceiver<Change>,
    store: Arc<dyn Store>,
    live: Arc<LiveDirectory>,
    side: CurrentSide,
) {
    let mut retry: Option<Duration> = None;
    loop {
        let first = match retry {
            None => match changes.recv().await {
                Some(change) => Some(change),
                None => return,
            },
            Some(wait) => tokio::select! {
                change = changes.recv() => match change {
                    Some(change) => Some(change),
                    None => return,
                },
                () = tokio::time::sleep(wait) => None,
            },
        };
        let mut resync = retry.is_some();
        let mut users = BTreeSet::new();
        let mut take = |change: Change| match change {
            Change::Resync => resync = true,
            Change::User(name) => {
                users.insert(name);
            }
        };
        first.into_iter().for_each(&mut take);
        while let Ok(change) = changes.try_recv() {
            take(change);
        }
        resync |= users.len() > COLLAPSE_INTO_RESYNC;
        let (store, live, side) = (store.clone(), live.clone(), side());
        let applied = tokio::task::spawn_blocking(move || apply(&*store, &live, &*side, resync, users)).await;
        retry = match applied {
            Ok(true) => None,
            Ok(false) => Some(retry.map_or(RETRY_FIRST, |wait| (wait * 2).min(RETRY_MAX))),
            Err(_) => {
                tracing::error!("applying a store change panicked; a whole resync is owed");
                Some(RETRY_FIRST)
            }
        };
    }
}

/// One batch; false when something could not be applied (a whole resync is then owed).
fn apply(store: &dyn Store, live: &LiveDirectory, side: &dyn FileSide, resync: bool, users: BTreeSet<String>) -> bool {
    if resync {
        return match live.refresh_all(store, side, false) {
            // Lenient: what the config file also declares is skipped, never refused.
            Ok(Ok(skipped) | Err(skipped)) => {
                for problem in skipped {
                    tracing::warn!(%problem, "store resync: not served");
                }
                tracing::info!(users = live.user_count(), "store resync done");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "store resync failed; serving the last snapshot, retrying");
                false
            }
        };
    }
    let mut all = true;
    for user in users {
        match live.refresh_user(store, side, &user) {
            Ok(skipped) => {
                for problem in skipped {
                    tracing::warn!(%problem, "store change: not served");
                }
            }
            Err(e) => {
                tracing::warn!(%user, error = %e, "store change not applied; a whole resync follows");
                all = false;
            }
        }
    }
    all
}
