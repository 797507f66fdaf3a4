//! The bounded fuzz run of `cargo test`: each harness gets its checked-in seeds, then
//! [`CASES`] mutations of them from a fixed-seed generator, so CI repeats the same cases
//! every time (cargo-fuzz's longer runs, `bench/fuzz.sh`, explore beyond them).

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::PathBuf;

use super::drive::escaped;

/// Mutated cases per harness, on top of the seeds.
pub const CASES: usize = 10_000;

/// Bytes that change how protocol text parses: line ends, separators, escapes, NUL, and
/// the edges of ASCII.
const INTERESTING: &[u8] = &[
    b'\r', b'\n', 0, b':', b';', b'%', b'=', b'&', b',', b' ', b'\t', b'.', b'/', b'?', b'"', b'0',
    b'9', b'a', b'F', 0x7f, 0x80, 0xa0, 0xc3, 0xe9, 0xff,
];

/// A small deterministic generator (SplitMix64): the same cases on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Applies one random edit to `data`: a bit flip, an interesting byte set or inserted, a
/// range deleted or duplicated, a dictionary word inserted or overwritten, a splice with
/// `other`, or a byte run repeated.
fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8], dictionary: &[&[u8]]) {
    let len = data.len();
    match rng.below(10) {
        0 if len > 0 => {
            let at = rng.below(len);
            data[at] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let at = rng.below(len);
            data[at] = *rng.pick(INTERESTING);
        }
        2 => {
            let at = rng.below(len + 1);
            data.insert(at, *rng.pick(INTERESTING));
        }
        3 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(16));
            data.drain(at..at + n);
        }
        4 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(32));
            let piece = data[at..at + n].to_vec();
            let to = rng.below(len + 1);
            data.splice(to..to, piece);
        }
        5 | 6 if !dictionary.is_empty() => {
            let word = rng.pick(dictionary);
            let at = rng.below(len + 1);
            if rng.below(2) == 0 {
                data.splice(at..at, word.iter().copied());
            } else {
                let end = (at + word.len()).min(len);
                data.splice(at..end, word.iter().copied());
            }
        }
        7 if !other.is_empty() => {
            // Our head, their tail.
            let cut = rng.below(len + 1);
            let from = rng.below(other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        8 if len > 0 => {
            let at = rng.below(len);
            let byte = data[at];
            let n = 1 + rng.below(64);
            data.splice(at..at, std::iter::repeat_n(byte, n));
        }
        _ if len > 0 => {
            // An arbitrary byte.
            let at = rng.below(len);
            data[at] = rng.next() as u8;
        }
        _ => data.push(rng.next() as u8),
    }
}

/// The checked-in seeds of `target` (`fuzz/seeds/{target}/`), in file-name order.
pub fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seeds of {target} in {}: {e}", dir.display()))
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    files.sort();
    let seeds: Vec<_> = files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Runs `harness` on `input`; on a panic, says which case it was and its bytes, then
/// panics on.
fn check(harness: fn(&[u8]), case: &str, input: &[u8]) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| harness(input))) {
        eprintln!(
            "fuzz case {case} failed; its input ({} bytes): b\"{}\"",
            input.len(),
            escaped(input)
        );
        resume_unwind(panic);
    }
}

/// Runs `harness` on every seed of `target`, then on [`CASES`] mutations of them, stacking
/// one to eight edits per case (words from `dictionary` among them).
pub fn bounded_run(target: &str, harness: fn(&[u8]), dictionary: &[&[u8]]) {
    let seeds = seeds(target);
    for (path, bytes) in &seeds {
        check(harness, &path.display().to_string(), bytes);
    }
    // A fixed seed per target, so each one's cases stay the same as others are added.
    let mut rng = Rng(target.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }));
    for case in 0..CASES {
        let (_, base) = rng.pick(&seeds);
        let (_, other) = rng.pick(&seeds);
        let mut data = base.clone();
        for _ in 0..=rng.below(8) {
            mutate_once(&mut rng, &mut data, other, dictionary);
        }
        check(harness, &format!("{target} #{case}"), &data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_repeats_itself_and_mutates() {
        let mut a = Rng(7);
        let mut b = Rng(7);
        let mut x = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        let mut y = x.clone();
        let mut changed = 0;
        for _ in 0..1000 {
            let before = x.clone();
            mutate_once(&mut a, &mut x, b"other", &[b"word"]);
            mutate_once(&mut b, &mut y, b"other", &[b"word"]);
            assert_eq!(x, y, "the same seed gives the same cases");
            changed += usize::from(x != before);
        }
        assert!(
            changed > 900,
            "only {changed} of 1000 edits changed anything"
        );
    }
}
