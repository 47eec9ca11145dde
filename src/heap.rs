//! Giving freed heap memory back to the system.
//!
//! glibc keeps what the program frees for reuse and returns pages to the system only from the top of
//! its heap. After a burst (8,000 SSE streams that close, a store snapshot that is dropped) the freed
//! memory sits below memory still in use, so nearly all of it stays resident, and repeated bursts
//! fragment the heap further: RSS only ever grows. `malloc_trim` returns every free page, wherever it is.
//! Other builds (the container image's musl binary runs jemalloc, whose background thread returns
//! freed memory by itself) make these no-ops.

use std::time::{Duration, Instant};

/// Connections (and streams) that must have closed, net of those opened since, before a trim is worth
/// its cost: each held some 40 KiB, so this is about 20 MiB. A trim walks the whole heap holding the
/// allocator's lock (34 to 120 ms on heaps as fragmented as 8,000 closed streams leave one, measured
/// with a C program), so it runs once a burst has ended, never on a steady load. glibc's own statistics
/// (`mallinfo2`) walk the heap too (10 to 57 ms there), so the trigger is the count of open connections
/// (those that have spoken: a silent one holds next to nothing) and streams, which costs nothing to read.
const CLOSED_WORTH_TRIMMING: i64 = 512;

/// Returns every free page to the system, now. It holds each arena's lock while it walks the heap:
/// call it on the blocking pool, and only after memory was freed in bulk.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The least time between two trims: a load that swings by more than [`CLOSED_WORTH_TRIMMING`] (or a
/// client that opens and drops sockets to force trims) costs at most one pause this often.
const TRIMS_APART: Duration = Duration::from_secs(10);

/// Decides, from the number of open connections and streams taken on a schedule (a second apart), when a
/// burst has ended: at least [`CLOSED_WORTH_TRIMMING`] fewer are open than at the most since the last
/// trim, and that trim is [`TRIMS_APART`] ago.
#[derive(Default)]
pub struct Trimmer {
    /// The most open at once since the last trim.
    peak: i64,
    last: Option<Instant>,
}

impl Trimmer {
    /// True when a burst has ended and memory should go back ([`release_freed`]); counts it as done.
    pub fn burst_ended(&mut self, open: i64, now: Instant) -> bool {
        self.peak = self.peak.max(open);
        let rested = self.last.is_none_or(|last| now.duration_since(last) >= TRIMS_APART);
        if self.peak - open < CLOSED_WORTH_TRIMMING || !rested {
            return false;
        }
        (self.peak, self.last) = (open, Some(now));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_that_ends_trims_once_and_a_steady_or_growing_load_never() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut trimmer = Trimmer::default();
        // Growing, then steady with churn: no trim.
        for (s, open) in [0, 100, 4000, 8000, 8000, 7900, 8000, 7800].into_iter().enumerate() {
            assert!(!trimmer.burst_ended(open, at(s as u64)), "at {open} open");
        }
        // Most of the streams close: one trim, and not again at the same level.
        assert!(trimmer.burst_ended(300, at(10)));
        assert!(!trimmer.burst_ended(300, at(11)));
        assert!(!trimmer.burst_ended(0, at(12)), "300 more closed: below what is worth a trim");
        // A second burst whose end comes within TRIMS_APART of the last trim waits for it.
        assert!(!trimmer.burst_ended(3000, at(13)));
        assert!(!trimmer.burst_ended(2400, at(14)), "9 s since the last trim");
        assert!(trimmer.burst_ended(2400, at(20)));
        assert!(!trimmer.burst_ended(2000, at(31)));
        assert!(trimmer.burst_ended(1800, at(32)), "600 closed since the last trim");
    }
}
