//! Keep freed tensor memory in the process for the next tensor (glibc's allocator).
//!
//! A forward allocates and frees tensors of a few to a few dozen MiB at every op. glibc serves
//! blocks above its mmap threshold (128 KiB, rising to at most 32 MiB as it adapts) with a
//! fresh `mmap` and returns them at `free`, and trims the heap's free top back to the kernel
//! past its trim threshold; either way the next tensor of that size faults in and zeroes fresh
//! pages (page faults, kernel page clearing and cgroup accounting showed as about 6% of a head
//! sweep's samples in `perf`). [`keep_freed_memory`] raises both thresholds so that such blocks
//! come from and go back to the heap. The process keeps its peak heap instead of handing memory
//! back between steps. The `ferrolens` command calls it at start; a program using the library
//! may call it once before its first forward.

/// Largest block served from the heap rather than its own `mmap` (glibc's maximum, 32 MiB on
/// 64-bit systems).
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// Free memory at the top of the heap kept rather than returned to the kernel (1 GiB).
pub const TRIM_THRESHOLD: usize = 1 << 30;

/// Set glibc's `M_MMAP_THRESHOLD` to [`MMAP_THRESHOLD`] and `M_TRIM_THRESHOLD` to
/// [`TRIM_THRESHOLD`] (see the module docs). Returns whether the settings were applied: `false`
/// on a non-glibc target, when glibc refused them, or when the environment already tunes the
/// allocator (`GLIBC_TUNABLES` naming `glibc.malloc`, `MALLOC_MMAP_THRESHOLD_` or
/// `MALLOC_TRIM_THRESHOLD_`), which is left as the user set it. Call it before the threads of a
/// program start allocating.
pub fn keep_freed_memory() -> bool {
    let user_tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc"))
        || std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some();
    !user_tuned && set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> bool {
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_thresholds() {
        // The CI machine is Linux with glibc: the call must take effect there.
        if cfg!(all(target_os = "linux", target_env = "gnu")) && std::env::var_os("GLIBC_TUNABLES").is_none() {
            assert!(super::set_thresholds(), "glibc refused M_MMAP_THRESHOLD = 32 MiB or M_TRIM_THRESHOLD");
        }
    }
}
