//! Heap accounting by side, for `simulate`'s memory figure. `simulate` runs the dispatcher
//! and its harness (fake API, stub VMs, fake crunch-runs) in one process; the dispatcher gets
//! its own tokio runtime whose threads are marked [`Side::Dispatcher`], and [`Tally`], when
//! installed as the global allocator (the `heap-tally` feature, which `scripts/bench-e2e`
//! builds with), counts every live heap byte against the side of the thread that allocated
//! it, wherever it is freed. Without the feature nothing is counted and the figures read 0.
//!
//! Each block carries a small header in front of it holding its side, so a block allocated by
//! the dispatcher and freed by a harness thread (or the other way round) is still subtracted
//! from the side that allocated it.

// Only the counters are read in a build without the feature.
#![cfg_attr(not(feature = "heap-tally"), allow(dead_code))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Who a thread allocates for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Side {
    /// Everything not marked: the harness, the main thread, libraries' own threads.
    Harness = 0,
    /// Threads of the dispatcher's runtime.
    Dispatcher = 1,
}

thread_local! {
    static SIDE: Cell<u8> = const { Cell::new(Side::Harness as u8) };
}

/// Count this thread's allocations from now on against `side`.
pub fn mark_thread(side: Side) {
    SIDE.with(|s| s.set(side as u8));
}

struct Counters {
    live: [AtomicUsize; 2],
    peak: [AtomicUsize; 2],
}

static COUNTERS: Counters = Counters {
    live: [AtomicUsize::new(0), AtomicUsize::new(0)],
    peak: [AtomicUsize::new(0), AtomicUsize::new(0)],
};

/// Live heap bytes allocated by `side` and not yet freed.
pub fn live(side: Side) -> usize {
    COUNTERS.live[side as usize].load(Ordering::Relaxed)
}

/// The most live heap bytes `side` has had at once.
pub fn peak(side: Side) -> usize {
    COUNTERS.peak[side as usize].load(Ordering::Relaxed)
}

fn grow(side: usize, n: usize) {
    let now = COUNTERS.live[side].fetch_add(n, Ordering::Relaxed) + n;
    COUNTERS.peak[side].fetch_max(now, Ordering::Relaxed);
}

fn shrink(side: usize, n: usize) {
    COUNTERS.live[side].fetch_sub(n, Ordering::Relaxed);
}

/// The system allocator with a side tag in front of every block (see the module doc).
pub struct Tally;

/// Bytes in front of a block of alignment `align`: room for the tag, keeping the block
/// aligned.
fn header(align: usize) -> usize {
    align.max(16)
}

/// The layout asked of the system for a block of `layout`, with its header.
fn outer(layout: Layout) -> Option<Layout> {
    let h = header(layout.align());
    Layout::from_size_align(layout.size().checked_add(h)?, h).ok()
}

fn this_side() -> u8 {
    SIDE.try_with(Cell::get).unwrap_or(Side::Harness as u8)
}

impl Tally {
    /// # Safety
    /// As [`GlobalAlloc::alloc`]; `zeroed` picks `alloc_zeroed`.
    unsafe fn alloc_tagged(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let Some(full) = outer(layout) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `full` has a non-zero size (it includes the header).
        let base = unsafe {
            if zeroed {
                System.alloc_zeroed(full)
            } else {
                System.alloc(full)
            }
        };
        if base.is_null() {
            return base;
        }
        let side = this_side();
        // SAFETY: the block is `header` bytes longer than asked; the tag is its last header
        // byte, just before the returned pointer.
        unsafe {
            let p = base.add(header(layout.align()));
            p.sub(1).write(side);
            grow(side as usize, layout.size());
            p
        }
    }
}

// SAFETY: every block handed out is a system block of `outer(layout)`, offset by the header;
// dealloc and realloc undo that offset with the same layout's header before calling the
// system allocator.
unsafe impl GlobalAlloc for Tally {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.alloc_tagged(layout, false) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.alloc_tagged(layout, true) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let h = header(layout.align());
        // SAFETY: `ptr` came from `alloc_tagged` with this layout, so the header and the
        // system block are where it put them.
        unsafe {
            let side = ptr.sub(1).read();
            shrink(side as usize, layout.size());
            System.dealloc(
                ptr.sub(h),
                Layout::from_size_align_unchecked(layout.size() + h, h),
            );
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let h = header(layout.align());
        let Some(new_outer) = new_size.checked_add(h) else {
            return std::ptr::null_mut();
        };
        // SAFETY: as in `dealloc`; the system moves the header along with the block, so the
        // tag stays in front of it.
        unsafe {
            let side = ptr.sub(1).read() as usize;
            let base = System.realloc(
                ptr.sub(h),
                Layout::from_size_align_unchecked(layout.size() + h, h),
                new_outer,
            );
            if base.is_null() {
                return base;
            }
            if new_size >= layout.size() {
                grow(side, new_size - layout.size());
            } else {
                shrink(side, layout.size() - new_size);
            }
            base.add(h)
        }
    }
}

// With the feature on, the test binary counts through `Tally` too and the totals move under
// the test's feet.
#[cfg(all(test, not(feature = "heap-tally")))]
mod tests {
    use super::*;

    /// Blocks are counted against the side that allocated them, however they are resized and
    /// whichever thread frees them; large alignments keep their alignment. (The counters are
    /// global, so the test allocates through `Tally` directly and compares differences; the
    /// test binary's own allocator is the system's.)
    #[test]
    fn blocks_count_against_the_allocating_side_wherever_they_are_freed() {
        let before = (live(Side::Harness), live(Side::Dispatcher));
        let layout = Layout::from_size_align(1000, 8).unwrap();
        let wide = Layout::from_size_align(64, 256).unwrap();
        let (a, w) = std::thread::spawn(move || {
            mark_thread(Side::Dispatcher);
            // SAFETY: non-zero sizes; freed below with the same layouts.
            unsafe {
                let a = Tally.alloc(layout);
                let w = Tally.alloc_zeroed(wide);
                (a as usize, w as usize)
            }
        })
        .join()
        .unwrap();
        assert_eq!(w % 256, 0, "alignment kept");
        assert_eq!(live(Side::Dispatcher) - before.1, 1064);
        assert!(peak(Side::Dispatcher) >= 1064);
        // This (unmarked) thread grows the dispatcher's block, then frees both.
        // SAFETY: `a` and `w` are live blocks of these layouts.
        unsafe {
            let a = Tally.realloc(a as *mut u8, layout, 5000);
            assert!(!a.is_null());
            a.write_bytes(7, 5000);
            assert_eq!(live(Side::Dispatcher) - before.1, 5064);
            let h = Tally.alloc(layout);
            assert_eq!(live(Side::Harness) - before.0, 1000);
            Tally.dealloc(h, layout);
            Tally.dealloc(a, Layout::from_size_align(5000, 8).unwrap());
            Tally.dealloc(w as *mut u8, wide);
        }
        assert_eq!(
            (live(Side::Harness), live(Side::Dispatcher)),
            before,
            "everything freed"
        );
    }
}
