//! Deterministic demo data: the sample tree that `seed_samples` uploads.

use std::fmt::Write as _;

use bytes::Bytes;

/// Seed of the xorshift generator behind `data/random-20MiB.bin`.
pub const SAMPLE_SEED: u64 = 0x0DCA_F5DE_5EED_2026;

const MIB: usize = 1024 * 1024;

const README: &str = "\
orcafs demo data
================

This bucket was filled by `orcafs-devorigin --seed` (or DevOrigin::seed_samples).
It is a small, fully deterministic sample tree for trying out orcafs, a read-only
FUSE filesystem over S3, against a local S3 server on 127.0.0.1:

  hello.txt                 a one-line greeting
  empty.txt                 a zero-byte object
  data/numbers.csv          1000 rows of numbers
  data/random-20MiB.bin     20 MiB of xorshift64 output (reproducible sha256)
  logs/2026/app.log         about 2 MiB of log lines
  docs/unicode-\u{fc}\u{540d}\u{524d}.txt    a key with non-ASCII characters
  docs/with space.txt       a key with a space

Nothing here is real data; regenerate it at will.
";

/// The sample tree: `(key, body)` pairs, identical on every call.
pub fn sample_objects() -> Vec<(&'static str, Bytes)> {
    vec![
        ("README.txt", Bytes::from_static(README.as_bytes())),
        ("hello.txt", Bytes::from_static(b"Hello from orcafs!\n")),
        ("empty.txt", Bytes::new()),
        ("data/numbers.csv", Bytes::from(numbers_csv(1000))),
        (
            "data/random-20MiB.bin",
            Bytes::from(pseudo_random_bytes(SAMPLE_SEED, 20 * MIB)),
        ),
        ("logs/2026/app.log", Bytes::from(app_log(2 * MIB))),
        (
            "docs/unicode-\u{fc}\u{540d}\u{524d}.txt",
            Bytes::from_static(
                "Gr\u{fc}\u{df}e, \u{540d}\u{524d} \u{2014} UTF-8 in keys and bodies.\n".as_bytes(),
            ),
        ),
        (
            "docs/with space.txt",
            Bytes::from_static(b"This key has a space in it.\n"),
        ),
    ]
}

/// `len` bytes of xorshift64 output from `seed` (little-endian words), so
/// any checksum of the result is reproducible.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = if seed == 0 { SAMPLE_SEED } else { seed };
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn numbers_csv(rows: u64) -> String {
    let mut csv = String::from("n,square,cube,hex\n");
    for n in 1..=rows {
        // Writing to a String cannot fail.
        let _ = writeln!(csv, "{n},{},{},{n:#x}", n * n, n * n * n);
    }
    csv
}

fn app_log(min_len: usize) -> String {
    const LEVELS: [&str; 4] = ["INFO", "INFO", "DEBUG", "WARN"];
    const PATHS: [&str; 4] = [
        "/data/numbers.csv",
        "/hello.txt",
        "/logs/2026/app.log",
        "/README.txt",
    ];
    let mut log = String::with_capacity(min_len + 128);
    let mut i: usize = 0;
    while log.len() < min_len {
        let (h, m, s, ms) = (i / 360_000 % 24, i / 6000 % 60, i / 100 % 60, i % 100 * 10);
        let _ = writeln!(
            log,
            "2026-01-01T{h:02}:{m:02}:{s:02}.{ms:03}Z {:<5} request id={i:08} path={} latency_ms={}",
            LEVELS[i % LEVELS.len()],
            PATHS[i % PATHS.len()],
            (i * 7919) % 250,
        );
        i += 1;
    }
    log
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_deterministic_and_sized() {
        let a = sample_objects();
        let b = sample_objects();
        assert_eq!(a, b);
        let size = |key: &str| a.iter().find(|(k, _)| *k == key).map(|(_, v)| v.len());
        assert_eq!(size("data/random-20MiB.bin"), Some(20 * MIB));
        assert_eq!(size("empty.txt"), Some(0));
        assert!(size("logs/2026/app.log").is_some_and(|n| (2 * MIB..2 * MIB + 200).contains(&n)));
        assert_eq!(numbers_csv(1000).lines().count(), 1001);
        assert_eq!(pseudo_random_bytes(7, 13), pseudo_random_bytes(7, 20)[..13]);
    }
}
