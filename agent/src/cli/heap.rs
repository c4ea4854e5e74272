//! The heap of a query command that reads the trail itself: one region, grown at once and
//! backed by transparent huge pages.
//!
//! A lookup through the CLI lives 40-60 ms and touches most of its memory once: DuckDB's
//! catalog and functions at open, then a few dozen 256 KiB blocks of the trail. With glibc's
//! defaults each block is a fresh mmap and the heap grows 128 KiB at a time: a `who` on the
//! 1-day bench trail took 5,600 page faults. glibc does this itself under
//! `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, which only the environment can set. Here the
//! faults fell to about 1,700 and the lookup from 59.2 to 48.3 ms (medians of 80, old and new
//! binaries alternating; docs/DESIGN-trail.md). The agent keeps glibc's defaults: it lives
//! for months and its memory is budgeted.

use std::ffi::{c_int, c_void};

/// The heap is grown by this much at once.
const REGION: usize = 64 << 20;
/// A transparent huge page on x86-64 and arm64 with 4 KiB pages.
const HUGE_PAGE: usize = 2 << 20;

/// Prepares the heap for a query command; call once, before the trail is opened. Best
/// effort: when a step fails the command runs the same, on small pages.
pub fn prepare_for_query() {
    // SAFETY: mallopt, malloc, free, sbrk(0) and madvise(MADV_HUGEPAGE) change how memory
    // is laid out and backed, never its contents; the range advised lies in the heap
    // between the block just freed and the break.
    unsafe {
        // Blocks up to 4 MiB from the heap (DuckDB's included), never handed back: the
        // process ends with the answer.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TOP_PAD, REGION as c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        // One allocation larger than the heap's top grows it by the block and the pad.
        let block = libc::malloc(HUGE_PAGE);
        if block.is_null() {
            return;
        }
        let brk = libc::sbrk(0) as usize;
        libc::free(block);
        let start = (block as usize).next_multiple_of(HUGE_PAGE);
        let end = brk & !(HUGE_PAGE - 1);
        // glibc falls back to mmap when the break cannot move: the block is then elsewhere
        // and the range below means nothing.
        if start < end && end - start <= REGION + 2 * HUGE_PAGE {
            libc::madvise(start as *mut c_void, end - start, libc::MADV_HUGEPAGE);
            // The stretch below the first whole huge page would take the next allocations
            // (DuckDB's start) on small pages: fill it, for good.
            let below = start - block as usize;
            if below > 4096 {
                libc::malloc(below - 64);
            }
        }
    }
}
