//! Heap settings for a process that moves large buffers all the time.
//!
//! Pieces (1–16 MiB) and activation frames are allocated and freed for every
//! transfer. glibc serves blocks that large with a fresh `mmap` and gives
//! freed memory back to the kernel early, so every piece paid for page
//! faults, zeroed pages and an `munmap`: about a seventh of a seeder's time.
//! Blocks up to 32 MiB (the largest piece, twice) now come from the heap,
//! and up to 32 MiB free at its top stays there for the next ones.

/// Largest block served from the heap (glibc's upper limit on 64-bit).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory kept at the top of a heap before it is returned (no more
/// than half of a thread's 64 MiB arena, so those still give memory back).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 32 << 20;

/// Applies the settings above; call once, first thing in `main`. Returns
/// whether the allocator took them (only glibc on Linux has them).
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; called before
        // any other thread exists.
        let (mmap, trim) = unsafe {
            (
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            )
        };
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_settings() {
        assert!(super::tune());
    }
}
