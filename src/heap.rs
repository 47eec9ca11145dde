//! Giving freed heap memory back to the system.
//!
//! glibc keeps what the program frees for reuse and returns pages to the system only from the top of
//! its heap. After a burst (8,000 SSE streams that close, a store snapshot that is dropped) the freed
//! memory sits below memory still in use, so nearly all of it stays resident, and repeated bursts
//! fragment the heap further: RSS only ever grows. `malloc_trim` returns every free page, wherever it is.
//! musl's allocator returns freed memory by itself; there these are no-ops.

/// How much free memory the allocator may hold before a trim is worth its cost: a steady load reuses
/// what it frees, and trimming it would only make the next requests fault their pages in again.
const WORTH_TRIMMING: usize = 16 << 20;

/// Returns every free page to the system, now.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Decides, from the allocator's statistics taken on a schedule, when a burst has ended: free memory grew
/// by more than [`WORTH_TRIMMING`] since it was last low (memory freed that nothing has reused since)
/// and is more than half of what is in use. A steady load, which reuses what it frees, never trims, and
/// memory given back once is not walked again until more is freed.
#[derive(Default)]
pub struct Trimmer {
    /// The least free memory seen since the last trim.
    low: Option<usize>,
}

impl Trimmer {
    /// Looks at the allocator and trims if a burst has ended; true when it trimmed. A trim walks the
    /// heap holding each arena's lock: call it on the blocking pool.
    pub fn tick(&mut self) -> bool {
        let Some((free, in_use)) = free_and_in_use() else { return false };
        let low = *self.low.insert(self.low.map_or(free, |low| low.min(free)));
        if free > low + WORTH_TRIMMING && free > in_use / 2 {
            release_freed();
            self.low = Some(free);
            return true;
        }
        false
    }
}

/// Bytes free in the allocator's arenas and bytes in use, summed over every arena (glibc's mallinfo2).
fn free_and_in_use() -> Option<(usize, usize)> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        Some((info.fordblks, info.uordblks))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident set size of this process, in bytes.
    fn rss() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn memory_freed_below_memory_in_use_goes_back_once_and_a_steady_heap_is_left_alone() {
        let mut trimmer = Trimmer::default();
        trimmer.tick();
        assert!(!trimmer.tick(), "nothing freed since the last look");
        // 128 MiB in 16 KiB blocks, written, then every other one freed: the freed half lies between
        // blocks in use, where glibc never gives it back by itself.
        let mut blocks: Vec<Vec<u8>> = (0..8192).map(|i| vec![i as u8 | 1; 16 << 10]).collect();
        let mut i = 0;
        blocks.retain(|_| {
            i += 1;
            i % 2 == 0
        });
        let before = rss();
        assert!(trimmer.tick(), "64 MiB freed between blocks in use");
        let after = rss();
        assert!(before - after > 32 << 20, "RSS {before} -> {after}: the freed pages went back");
        assert!(!trimmer.tick(), "what went back is not walked again");
        // Reused and freed again: a new burst.
        let again: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8 | 1; 16 << 10]).collect();
        assert!(!trimmer.tick(), "reusing free memory is no burst");
        drop(again);
        assert!(trimmer.tick(), "the reused memory freed again");
        assert!(blocks.iter().all(|b| b[0] & 1 == 1));
    }
}
