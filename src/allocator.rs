//! previewd's global allocator: mimalloc, asked for its plain `mi_malloc` blocks whenever
//! the alignment a layout needs is one every mimalloc block already has.
//!
//! Why not `mimalloc::MiMalloc` as it comes: it sends every allocation through
//! `mi_malloc_aligned`, whose fast path covers blocks of at most 1 KiB. A larger one with
//! alignment 1 (hyper's 8 KiB read buffers: two per proxied request) falls through to
//! mimalloc's over-allocating path. Under callgrind that path took about 350 instructions
//! per allocation, 4 % of the proxy's instructions per request.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::time::Duration;

use libmimalloc_sys as mi;

/// The alignment of every block `mi_malloc` returns: block sizes are whole machine words
/// and pages start 16-byte aligned, so any block is word-aligned (but a 24-byte block, for
/// one, is not 16-byte aligned).
const BLOCK_ALIGN: usize = std::mem::size_of::<usize>();

/// Whether `mi_malloc` blocks suit `align` as they are.
fn plain(align: usize) -> bool {
    align <= BLOCK_ALIGN
}

/// mimalloc with the plain entry points for word-aligned layouts (see the module doc).
pub struct MiMalloc;

// SAFETY: each method forwards to the mimalloc function with the same contract as the
// `GlobalAlloc` method (a block of at least `size` bytes, or null), choosing the aligned
// variant whenever `plain` does not hold, so every block meets the layout's alignment.
// `mi_free` frees blocks from all of them.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if plain(layout.align()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if plain(layout.align()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract), so from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl; `ptr` came from this allocator with `layout`.
        unsafe {
            if plain(layout.align()) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

/// How often a long-running previewd calls [`return_freed_memory`]: a few times mimalloc's
/// purge delay (1 s), so memory freed by a burst is back with the system seconds after
/// previewd goes idle, at the cost of one wake-up.
pub const RETURN_INTERVAL: Duration = Duration::from_secs(5);

/// Gives back to the system (`MADV_DONTNEED`) the arena pages that freed blocks left empty
/// once mimalloc's purge delay has passed, and collects the calling thread's own pages.
/// mimalloc purges only from inside later allocations, so a previewd that went idle after a
/// burst kept it all: `bench/scale.sh` read 34.5 MiB more resident 90 s after deleting
/// 10,000 links than before making them, and 6.4 MiB more with this called every
/// [`RETURN_INTERVAL`].
pub fn return_freed_memory() {
    // SAFETY: `mi_collect` takes no pointers; without `force` it collects only the calling
    // thread's pages and purges the arena pages whose delay has passed.
    unsafe { mi::mi_collect(false) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every alignment from 1 to 4096, at sizes around mimalloc's small/large boundary,
    /// through allocation, zeroed allocation and growth: the blocks meet the alignment, hold
    /// what was written and are zeroed when asked.
    #[test]
    fn blocks_meet_their_layout() {
        let sizes = [1usize, 7, 8, 24, 100, 1024, 1025, 8192, 70_000];
        for align in (0..13).map(|s| 1usize << s) {
            for &size in &sizes {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: the layouts have nonzero sizes; each block is written within its
                // size and freed once, with the layout it was made with.
                unsafe {
                    let p = MiMalloc.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xab, size);
                    let grown = MiMalloc.realloc(p, layout, size * 3);
                    assert!(!grown.is_null());
                    assert_eq!(grown as usize % align, 0, "realloc {size} align {align}");
                    assert!((0..size).all(|i| *grown.add(i) == 0xab));
                    MiMalloc.dealloc(grown, Layout::from_size_align_unchecked(size * 3, align));

                    let z = MiMalloc.alloc_zeroed(layout);
                    assert!(!z.is_null());
                    assert_eq!(z as usize % align, 0, "zeroed {size} align {align}");
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    MiMalloc.dealloc(z, layout);
                }
            }
        }
    }

    /// How many bytes of `[start, end)` are resident (mincore(2)), page by page.
    fn resident(start: usize, end: usize) -> usize {
        const PAGE: usize = 4096;
        let start = start / PAGE * PAGE;
        let pages = (end - start).div_ceil(PAGE);
        let mut in_core = vec![0u8; pages];
        // SAFETY: the range lies in mimalloc's arena, which stays mapped after the blocks are
        // freed; `in_core` has one byte per page of it.
        let rc = unsafe { libc::mincore(start as *mut c_void, pages * PAGE, in_core.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        in_core.iter().filter(|&&b| b & 1 == 1).count() * PAGE
    }

    /// 64 MiB of 8 KiB blocks (hyper's read buffers) made and freed by one thread, which
    /// then allocates nothing more, as previewd after deleting thousands of links: the
    /// memory stays resident until `return_freed_memory` runs after mimalloc's purge delay.
    #[test]
    fn freed_memory_goes_back_without_another_allocation() {
        const BLOCK: usize = 8 * 1024;
        const BLOCKS: usize = 8 * 1024;
        const HELD: usize = BLOCK * BLOCKS;
        let outcome = std::thread::spawn(|| {
            // SAFETY: each block is written within its size and freed once.
            let (start, end) = unsafe {
                let blocks: Vec<*mut c_void> = (0..BLOCKS)
                    .map(|_| {
                        let p = mi::mi_malloc(BLOCK);
                        assert!(!p.is_null());
                        p.cast::<u8>().write_bytes(1, BLOCK);
                        p
                    })
                    .collect();
                let start = blocks.iter().map(|&p| p as usize).min().unwrap_or(0);
                let end = blocks
                    .iter()
                    .map(|&p| p as usize + BLOCK)
                    .max()
                    .unwrap_or(0);
                assert!(resident(start, end) >= HELD, "the blocks were written");
                blocks.into_iter().for_each(|p| mi::mi_free(p));
                (start, end)
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                return_freed_memory();
                let left = resident(start, end);
                if left <= HELD / 4 {
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    return Err(format!("{left} of {HELD} bytes still resident"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .join();
        assert_eq!(outcome.ok(), Some(Ok(())));
    }
}
