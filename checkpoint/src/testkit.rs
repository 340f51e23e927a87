//! Support for the property tests of podsnap's parsers of untrusted input (this crate's and the
//! coordinator's, through the `testkit` feature): a global allocator that records how much
//! memory the calling thread held at most, and byte-level mutations of valid inputs.
//!
//! A parser property says: for any input, an error or a value, never a panic, never memory out
//! of proportion to the input ([`peak_during`]), never a path outside its root. Inputs start from
//! valid ones (a real manifest, real CRIU images, real archives) and are mutated ([`mutate`]),
//! so that they reach past the first check.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting each thread's live bytes and their peak.
pub struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with`: nothing is counted while the thread's locals are torn down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counting touches only
// const-initialized thread locals without destructors (no allocation, no reentry).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract is passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Runs `f` and returns its result with the most bytes the calling thread held at once while
/// it ran, above what it held before (only with [`Counting`] as the global allocator; 0
/// otherwise). Memory other threads allocate is not counted.
pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, (peak - base).max(0) as usize)
}

/// Asserts that `f`, given an input of `input_len` bytes, held at most `per_byte` bytes per
/// input byte plus `fixed` at once; returns `f`'s result.
pub fn assert_bounded<T>(
    what: &str,
    input_len: usize,
    per_byte: usize,
    fixed: usize,
    f: impl FnOnce() -> T,
) -> T {
    let (out, peak) = peak_during(f);
    let cap = input_len.saturating_mul(per_byte).saturating_add(fixed);
    assert!(
        peak <= cap,
        "{what}: held {peak} bytes at once for {input_len} bytes of input (cap {cap})"
    );
    out
}

/// The number of cases a property runs: `PROPTEST_CASES` when set (to run deeper by hand),
/// else `default` (what CI runs).
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One mutation of a byte string: `(kind, at, value)`, positions taken modulo the length.
pub type Mutation = (u8, u32, u32);

/// Little-endian 32-bit values that make length and count fields interesting.
const EDGES: [u32; 10] = [
    0,
    1,
    3,
    4,
    0x7f,
    0x80,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
];

/// `input` with `mutations` applied in order: byte flips and sets, inserted and removed runs,
/// truncation, a duplicated run, 32-bit edge values written over (length and count fields) and
/// protobuf varints of 10 bytes.
pub fn mutate(input: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = input.to_vec();
    for &(kind, at, value) in mutations {
        let len = out.len();
        let at = if len == 0 { 0 } else { at as usize % len };
        match kind % 9 {
            0 => {
                if len > 0 {
                    out[at] ^= 1 << (value % 8);
                }
            }
            1 => {
                if len > 0 {
                    out[at] = value as u8;
                }
            }
            2 => {
                let n = (value % 16) as usize;
                out.splice(at..at, std::iter::repeat_n((value >> 8) as u8, n));
            }
            3 => {
                let end = (at + (value % 16) as usize + 1).min(len);
                out.drain(at..end);
            }
            4 => out.truncate(at),
            5 => {
                let end = (at + (value % 64) as usize + 1).min(len);
                let run = out[at..end].to_vec();
                out.splice(at..at, run);
            }
            6 | 7 => {
                let v = EDGES[value as usize % EDGES.len()].to_le_bytes();
                for (i, b) in v.iter().enumerate() {
                    if let Some(slot) = out.get_mut(at + i) {
                        *slot = *b;
                    }
                }
            }
            _ => {
                // A varint of the largest value a 64-bit field takes.
                let v = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
                let n = (value % 11) as usize;
                out.splice(at..at, v[..n.min(v.len())].iter().copied());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_of_a_thread_is_counted() {
        let ((), peak) = peak_during(|| {
            let v = vec![1u8; 1 << 20];
            drop(v);
            let _small = vec![1u8; 16];
        });
        assert!((1 << 20..(1 << 20) + 4096).contains(&peak), "{peak}");
        let ((), other) = peak_during(|| {
            std::thread::spawn(|| drop(vec![0u8; 8 << 20]))
                .join()
                .expect("thread");
        });
        assert!(other < 1 << 20, "another thread's memory is not counted: {other}");
    }

    #[test]
    fn mutations_stay_in_bounds() {
        let base = b"0123456789".to_vec();
        for kind in 0..9u8 {
            for at in [0u32, 5, 9, 10, u32::MAX] {
                for value in [0u32, 7, 255, u32::MAX] {
                    let _ = mutate(&base, &[(kind, at, value)]);
                    let _ = mutate(&[], &[(kind, at, value)]);
                }
            }
        }
        assert_eq!(mutate(&base, &[(4, 3, 0)]), b"012");
        assert_eq!(mutate(&base, &[(6, 0, 9)])[..4], [0xff; 4]);
    }
}
