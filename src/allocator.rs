//! How graphgate's allocator (mimalloc, set as the global allocator by the binary) treats
//! memory: [`tune`] runs first thing in `main`, and in benches that measure what the binary
//! does.

/// Applies both settings below, each unless its `MIMALLOC_*` variable is set.
pub fn tune() {
    keep_freed_memory_for_a_while();
    without_transparent_huge_pages();
}

/// mimalloc's `purge_delay` option (`mi_option_purge_delay` in mimalloc.h; the Rust
/// bindings do not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory committed for 10 s before mimalloc hands it back to the OS (its
/// default is 1 s), unless `MIMALLOC_PURGE_DELAY` says otherwise. Bursts of requests a few
/// seconds apart otherwise fault their connection buffers and task memory back in each
/// time: two page faults per request, 5–8 % of graphgate's CPU in bursts of 200 misses.
/// 10 s is the decay jemalloc uses by default; memory still goes back when idle.
fn keep_freed_memory_for_a_while() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads it each time it considers purging.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) };
    }
}

/// No transparent huge pages for graphgate's memory (what `MIMALLOC_ALLOW_THP=0` does, unless
/// that variable is set). mimalloc asks for huge pages on its arenas, and the kernel zeroes
/// each one, 2 MiB, at its first touch: the first burst of 200 misses after start spent over
/// half its CPU in `clear_page` (perf); without huge pages it used 20–30 ms of CPU instead of
/// 20–90 ms, and 38 MB of RSS instead of 50 MB. As Redis advises for latency-bound servers,
/// graphgate goes without.
#[cfg(target_os = "linux")]
fn without_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: prctl with integer arguments only; it sets a flag on this process.
        let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

#[cfg(not(target_os = "linux"))]
fn without_transparent_huge_pages() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is mimalloc's `mi_option_purge_delay`: it holds that option's
    /// default (1 000 ms) until graphgate sets it, so a renumbering in a mimalloc upgrade
    /// shows here instead of silently setting some other option.
    #[test]
    fn freed_memory_stays_committed_for_ten_seconds() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads an integer option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(get(), 1_000, "not mimalloc's purge_delay default");
        keep_freed_memory_for_a_while();
        assert_eq!(get(), 10_000);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_goes_without_transparent_huge_pages() {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            return;
        }
        without_transparent_huge_pages();
        // SAFETY: prctl with integer arguments only; it reads a flag of this process.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1);
    }
}
