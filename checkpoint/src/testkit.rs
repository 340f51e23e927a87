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

/// The offsets of the header blocks of a tar (walked as the tar crate walks it, sparse
/// extension blocks included).
pub fn tar_headers(tar: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(block) = tar.get(at..at + 512) {
        if block.iter().all(|b| *b == 0) {
            break;
        }
        out.push(at);
        let h = tar::Header::from_byte_slice(block);
        let mut next = at + 512;
        if h.entry_type().is_gnu_sparse() && h.as_gnu().is_some_and(|g| g.is_extended()) {
            while let Some(ext) = tar.get(next..next + 512) {
                next += 512;
                if ext[504] == 0 {
                    break;
                }
            }
        }
        let size = h.entry_size().unwrap_or(0).min(tar.len() as u64) as usize;
        at = next + size.div_ceil(512) * 512;
    }
    out
}

/// One header field change: `(header, field, value)`: the name or link name set to one of the
/// names given, the entry type, size, uid, mode or mtime set; the checksum is set again after it.
pub type TarEdit = (u32, u8, u32);

pub fn edit_tar_headers(tar: &[u8], edits: &[TarEdit], names: &[&[u8]]) -> Vec<u8> {
    let mut out = tar.to_vec();
    let at = tar_headers(&out);
    if at.is_empty() {
        return out;
    }
    const EDGES: [u64; 8] = [0, 1, 511, 512, 1 << 20, u32::MAX as u64, 1 << 40, u64::MAX >> 1];
    for &(h, field, value) in edits {
        let start = at[h as usize % at.len()];
        let mut header = tar::Header::new_old();
        header.as_mut_bytes().copy_from_slice(&out[start..start + 512]);
        let bytes = header.as_mut_bytes();
        let set = |bytes: &mut [u8; 512], range: std::ops::Range<usize>, v: &[u8]| {
            let field = &mut bytes[range];
            field.fill(0);
            let n = v.len().min(field.len());
            field[..n].copy_from_slice(&v[..n]);
        };
        match field % 7 {
            0 => set(
                bytes,
                0..100,
                names
                    .get(value as usize % names.len().max(1))
                    .copied()
                    .unwrap_or(b""),
            ),
            1 => set(
                bytes,
                157..257,
                names
                    .get(value as usize % names.len().max(1))
                    .copied()
                    .unwrap_or(b""),
            ),
            2 => bytes[156] = b"0125634LKxgS7V"[value as usize % 14],
            3 => header.set_size(EDGES[value as usize % EDGES.len()]),
            4 => header.set_uid(EDGES[value as usize % EDGES.len()]),
            5 => header.set_mode(value),
            _ => header.set_mtime(EDGES[value as usize % EDGES.len()]),
        }
        header.set_cksum();
        out[start..start + 512].copy_from_slice(header.as_bytes());
    }
    out
}

/// Values a JSON field is set to by [`mutate_json`]: escapes, empty and long names, NUL
/// bytes, numbers at the edges of the integer types and of other types than expected.
fn json_edge(i: u32) -> serde_json::Value {
    use serde_json::json;
    match i % 24 {
        0 => json!(".."),
        1 => json!("/etc/passwd"),
        2 => json!("a/../../b"),
        3 => json!(""),
        4 => json!("."),
        5 => json!("x\u{0}y"),
        6 => json!("containers/../../x"),
        7 => json!("a".repeat(300)),
        8 => json!("ü/ñ"),
        9 => json!(0),
        10 => json!(-1),
        11 => json!(u32::MAX),
        12 => json!(u64::MAX),
        13 => json!(i64::MIN),
        14 => json!(1.5),
        15 => json!(null),
        16 => json!(true),
        17 => json!([]),
        18 => json!({}),
        19 => json!(["..", "/"]),
        20 => json!({"..": {"size": 1, "digest": ""}}),
        21 => json!("sha256:"),
        22 => json!(1u64 << 53),
        _ => json!("\\x/./y//"),
    }
}

/// `value` with `picks` applied in order: each `(node, op, arg)` takes the node numbered `node`
/// (modulo the count, depth first) and sets it to an edge value, removes it from its parent,
/// duplicates it (in an array), or adds a key to it (an object).
pub fn mutate_json(value: &mut serde_json::Value, picks: &[(u32, u8, u32)]) {
    use serde_json::Value;
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    /// Applies `op` to the `n`th node under `v` (0: `v` itself); `parent_op` says whether a
    /// removal or duplication of `v` itself is asked of its parent.
    fn apply(v: &mut Value, n: &mut usize, op: u8, arg: u32) -> bool {
        if *n == 0 {
            match op % 4 {
                0 => *v = json_edge(arg),
                1 | 2 => return true, // done by the parent
                _ => match v {
                    Value::Object(o) => {
                        o.insert(format!("unknown{}", arg % 3), json_edge(arg / 3));
                    }
                    Value::Array(a) => a.push(json_edge(arg)),
                    other => *other = json_edge(arg),
                },
            }
            return false;
        }
        *n -= 1;
        match v {
            Value::Array(a) => {
                for i in 0..a.len() {
                    let size = count(&a[i]);
                    if *n < size {
                        if apply(&mut a[i], n, op, arg) {
                            if op % 4 == 1 {
                                a.remove(i);
                            } else {
                                let copy = a[i].clone();
                                a.insert(i, copy);
                            }
                        }
                        return false;
                    }
                    *n -= size;
                }
            }
            Value::Object(o) => {
                let keys: Vec<String> = o.keys().cloned().collect();
                for k in keys {
                    let size = o.get(&k).map_or(0, count);
                    if *n < size {
                        let remove = o.get_mut(&k).is_some_and(|child| apply(child, n, op, arg));
                        if remove && op % 4 == 1 {
                            o.remove(&k);
                        }
                        return false;
                    }
                    *n -= size;
                }
            }
            _ => {}
        }
        false
    }
    for &(node, op, arg) in picks {
        let mut n = node as usize % count(value);
        apply(value, &mut n, op, arg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_of_a_thread_is_counted() {
        let ((), peak) = peak_during(|| {
            let v = vec![1u8; 1 << 20];
            drop(v);
            let small: Vec<u8> = Vec::with_capacity(16);
            drop(small);
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

    #[test]
    fn json_mutations_reach_every_node() {
        let base = serde_json::json!({"a": [1, {"b": "c"}], "d": null});
        let mut seen = std::collections::BTreeSet::new();
        for node in 0..6 {
            for op in 0..4 {
                let mut v = base.clone();
                mutate_json(&mut v, &[(node, op, 1)]);
                seen.insert(v.to_string());
            }
        }
        assert!(seen.len() > 12, "{seen:?}");
        let mut v = base.clone();
        mutate_json(&mut v, &[(3, 1, 0)]); // {"b": "c"} removed from the array
        assert_eq!(v, serde_json::json!({"a": [1], "d": null}));
    }
}
