//! Locking that survives a panic elsewhere.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex` even when a thread panicked while holding it. Every structure guarded this way is
/// consistent between statements (maps and counters, updated in one call), so the data of a poisoned
/// lock is still good, and one panic must never turn into every later request or reload failing.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
