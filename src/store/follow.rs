//! Keeps the live directory of this replica in step with a shared store: each [`Change`] the store
//! announces is applied as it arrives, off the request path.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedReceiver;

use super::live::{FileSide, LiveDirectory};
use super::model::{Change, Store};

/// The config in force when a change is applied (it renders credentials for its upstreams).
pub type CurrentSide = Arc<dyn Fn() -> Arc<dyn FileSide + Send + Sync> + Send + Sync>;

/// Applies `changes` until the sender goes. Changes that queued up while one was applied are taken
/// together: a `Resync` among them reloads everything once (and covers the users named with it), and a
/// user named several times is read once.
pub async fn follow(
    mut changes: UnboundedReceiver<Change>,
    store: Arc<dyn Store>,
    live: Arc<LiveDirectory>,
    side: CurrentSide,
) {
    while let Some(first) = changes.recv().await {
        let mut resync = false;
        let mut users = BTreeSet::new();
        let mut take = |change: Change| match change {
            Change::Resync => resync = true,
            Change::User(name) => {
                users.insert(name);
            }
        };
        take(first);
        while let Ok(change) = changes.try_recv() {
            take(change);
        }
        let (store, live, side) = (store.clone(), live.clone(), side());
        let applied = tokio::task::spawn_blocking(move || {
            if resync {
                match live.refresh_all(&*store, &*side, false) {
                    // Lenient: what the config file also declares is skipped, never refused.
                    Ok(Ok(skipped) | Err(skipped)) => {
                        for problem in skipped {
                            tracing::warn!(%problem, "store resync: not served");
                        }
                        tracing::info!(users = live.user_count(), "store resync done");
                    }
                    // The watcher reconnects and asks for another resync.
                    Err(e) => tracing::warn!(error = %e, "store resync failed; serving the last snapshot"),
                }
                return;
            }
            for user in users {
                match live.refresh_user(&*store, &*side, &user) {
                    Ok(skipped) => {
                        for problem in skipped {
                            tracing::warn!(%problem, "store change: not served");
                        }
                    }
                    Err(e) => tracing::warn!(%user, error = %e, "store change not applied; the next resync will"),
                }
            }
        })
        .await;
        if applied.is_err() {
            tracing::error!("applying a store change panicked");
        }
    }
}
