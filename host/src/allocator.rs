//! The host's memory allocator: mimalloc, set as the executable's global allocator in
//! `main.rs`, with the settings [`configure`] gives it before the first allocation.
//!
//! A batch allocates and frees hundreds of thousands of small strings and vectors (entry fields,
//! plugin commands, column arrays); with glibc's malloc, the host spent two fifths of its time
//! in `malloc`, `free` and their consolidation of freed chunks. mimalloc takes a third off the
//! host's CPU per entry (see BENCHMARKS.md, issue 25). Its defaults keep freed memory committed
//! for a second and commit its arenas eagerly, which took the host's peak RSS on the mixed load
//! from ~100 to ~175 MB; the two settings below give memory back within 10 ms and commit arena
//! memory only as it is used, for nearly all of the gain.

use std::os::raw::{c_int, c_long};

/// `mi_option_arena_eager_commit` in mimalloc 3's `mi_option_t` (include/mimalloc.h).
const ARENA_EAGER_COMMIT: c_int = 4;
/// `mi_option_purge_delay` in mimalloc 3's `mi_option_t`: milliseconds before freed memory is
/// given back to the operating system.
const PURGE_DELAY: c_int = 15;

/// Applies the host's allocator settings. The executable calls it from a constructor, before
/// Rust's start-up makes the first allocation: set later, the first arena is already committed
/// eagerly and the host keeps ~40 MB more on the mixed load. (Library users, tests among them,
/// keep their own allocator: this only tunes mimalloc, and only matters where it is the global
/// allocator.)
pub fn configure() {
    set(ARENA_EAGER_COMMIT, 0);
    set(PURGE_DELAY, 10);
}

fn set(option: c_int, value: c_long) {
    // SAFETY: `mi_option_set` only stores the value in mimalloc's option table; any option
    // index below `_mi_option_last` is valid, and the test below pins these two.
    unsafe { libmimalloc_sys::mi_option_set(option, value) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option numbers are positions in a C enum that a mimalloc upgrade may move: the
    /// defaults read through them must be those of the two options meant.
    #[test]
    fn the_option_numbers_name_the_options_meant() {
        // SAFETY: reads mimalloc's option table.
        let (eager, delay) = unsafe {
            (
                libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(PURGE_DELAY),
            )
        };
        // Defaults: eager commit "on overcommitting systems" (2), purge after 1000 ms.
        assert_eq!((eager, delay), (2, 1000));
    }
}
