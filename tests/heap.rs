//! `heap::release_freed` returns memory freed between blocks still in use, which glibc keeps resident
//! otherwise. Its own test binary: RSS is the whole process's, and no other test may trim or allocate
//! meanwhile.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn memory_freed_below_memory_in_use_goes_back_to_the_system() {
    /// Resident set size of this process, in bytes.
    fn rss() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        // SAFETY: sysconf only reads a system constant.
        pages * usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap()
    }
    // 128 MiB in 16 KiB blocks, written, then every other one freed: the freed half lies between blocks
    // in use, where glibc never gives it back by itself.
    let mut blocks: Vec<Vec<u8>> = (0..8192).map(|i| vec![i as u8 | 1; 16 << 10]).collect();
    let mut i = 0;
    blocks.retain(|_| {
        i += 1;
        i % 2 == 0
    });
    let before = rss();
    mcp_tenant_proxy::heap::release_freed();
    let after = rss();
    assert!(before.saturating_sub(after) > 32 << 20, "RSS {before} -> {after}: the freed pages went back");
    assert!(std::hint::black_box(&blocks).iter().all(|b| b[0] & 1 == 1), "what is in use is intact");
}
