//! Whether the shared store is reachable: written by the PostgreSQL watcher
//! ([`super::postgres::watch`]), read by `/readyz` and the admin API. The embedded store is always up.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug)]
pub struct StoreHealth {
    up: AtomicBool,
}

impl Default for StoreHealth {
    /// Up: a store is only handed out once it has answered (the snapshot was read).
    fn default() -> Self {
        StoreHealth { up: AtomicBool::new(true) }
    }
}

impl StoreHealth {
    pub fn new(up: bool) -> StoreHealth {
        StoreHealth { up: AtomicBool::new(up) }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Sets the state; `true` when it changed (a transition, worth one log line).
    pub fn set(&self, up: bool) -> bool {
        self.up.swap(up, Ordering::AcqRel) != up
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reports_transitions_only() {
        let health = StoreHealth::default();
        assert!(health.is_up());
        assert!(!health.set(true));
        assert!(health.set(false));
        assert!(!health.is_up());
        assert!(!health.set(false));
        assert!(health.set(true));
        assert!(health.is_up());
    }
}
