//! Giving freed heap memory back to the system.
//!
//! glibc keeps what the program frees for reuse and returns pages to the system only from the top of
//! its heap. After a burst (8,000 SSE streams that close, a store snapshot that is dropped) the freed
//! memory sits below memory still in use, so nearly all of it stays resident, and repeated bursts
//! fragment the heap further: RSS only ever grows. `malloc_trim` returns every free page, wherever it is.
//! Other builds (the container image's musl binary runs jemalloc, whose background thread returns
//! freed memory by itself) make these no-ops.

/// Connections that must have closed, net of those opened since, before a trim is worth its cost: each
/// held some 40 KiB, so this is about 20 MiB. A trim walks the whole heap holding the allocator's lock
/// (10 to 50 ms on a heap fragmented by a burst of 8,000 streams, measured), so it runs once a burst has
/// ended, never on a steady load. glibc's own statistics (`mallinfo2`) walk the heap too, so the trigger
/// is the connection count, which costs nothing to read.
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

/// Decides, from the number of open connections taken on a schedule, when a burst has ended: at least
/// [`CLOSED_WORTH_TRIMMING`] fewer are open than at the most since the last trim.
#[derive(Default)]
pub struct Trimmer {
    /// The most connections open at once since the last trim.
    peak: i64,
}

impl Trimmer {
    /// True when a burst has ended and memory should go back ([`release_freed`]); counts it as done.
    pub fn burst_ended(&mut self, open: i64) -> bool {
        self.peak = self.peak.max(open);
        if self.peak - open < CLOSED_WORTH_TRIMMING {
            return false;
        }
        self.peak = open;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_that_ends_trims_once_and_a_steady_or_growing_load_never() {
        let mut trimmer = Trimmer::default();
        // Growing, then steady with churn: no trim.
        for open in [0, 100, 4000, 8000, 8000, 7900, 8000, 7800] {
            assert!(!trimmer.burst_ended(open), "at {open} open");
        }
        // Most of the streams close: one trim, and not again at the same level.
        assert!(trimmer.burst_ended(300));
        assert!(!trimmer.burst_ended(300));
        assert!(!trimmer.burst_ended(0), "300 more closed: below what is worth a trim");
        // A second burst, and its end.
        assert!(!trimmer.burst_ended(3000));
        assert!(trimmer.burst_ended(2400));
        assert!(!trimmer.burst_ended(2000));
        assert!(trimmer.burst_ended(1800), "600 closed since the last trim");
    }
}
