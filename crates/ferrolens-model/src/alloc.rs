//! Keep freed tensor memory in the process for the next tensor (glibc's allocator).
//!
//! A forward allocates and frees tensors of a few to a few hundred MiB at every op. glibc serves
//! blocks above its mmap threshold (128 KiB, rising to at most 32 MiB as it adapts) with a
//! fresh `mmap` and returns them at `free`, and trims the heap's free top back to the kernel
//! past its trim threshold; either way the next tensor of that size faults in and zeroes fresh
//! pages (page faults, kernel page clearing and cgroup accounting showed as about 6% of a head
//! sweep's samples in `perf`). The threshold cannot go above 32 MiB, and a forward's logits are
//! larger (`[16, 15, 49152]` f32 is 47 MiB for SmolLM2, 252 MiB with Gemma 3's 262k vocabulary),
//! so [`keep_freed_memory`] also turns glibc's own `mmap` of large blocks off (`M_MMAP_MAX` 0):
//! every block comes from and goes back to the heap. The process keeps its peak heap instead of
//! handing memory back between steps. The `ferrolens` command calls it at start; a program using
//! the library may call it once before its first forward.
//!
//! glibc still maps memory when the heap cannot grow, and for a block too large for a worker
//! thread's arena (64 MiB); those blocks go back to the kernel at `free` as before.

/// Largest block served from the heap rather than its own `mmap` (glibc's maximum, 32 MiB on
/// 64-bit systems).
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// Free memory at the top of the heap kept rather than returned to the kernel (1 GiB).
pub const TRIM_THRESHOLD: usize = 1 << 30;
/// Most blocks glibc serves with their own `mmap` (`M_MMAP_MAX`): none, so that blocks above
/// [`MMAP_THRESHOLD`] (a forward's logits) are reused from the heap as well.
pub const MMAP_MAX: usize = 0;

/// Set glibc's `M_MMAP_THRESHOLD` to [`MMAP_THRESHOLD`], `M_TRIM_THRESHOLD` to
/// [`TRIM_THRESHOLD`] and `M_MMAP_MAX` to [`MMAP_MAX`] (see the module docs). Returns whether the settings were applied: `false`
/// on a non-glibc target, when glibc refused them, or when the environment already tunes the
/// allocator (`GLIBC_TUNABLES` naming `glibc.malloc`, `MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_` or `MALLOC_MMAP_MAX_`), which is left as the user set it. Call it before the threads of a
/// program start allocating.
pub fn keep_freed_memory() -> bool {
    let user_tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc"))
        || std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some()
        || std::env::var_os("MALLOC_MMAP_MAX_").is_some();
    !user_tuned && set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> bool {
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_MMAP_MAX, MMAP_MAX as libc::c_int) == 1
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
            assert!(super::set_thresholds(), "glibc refused M_MMAP_THRESHOLD = 32 MiB, M_TRIM_THRESHOLD or M_MMAP_MAX = 0");
        }
    }
}
