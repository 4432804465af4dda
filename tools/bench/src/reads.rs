//! The read patterns measured, done the way applications do them: plain
//! `read(2)` with 1 MiB (`dd bs=1M`) or 128 KiB (`cat`) buffers, `pread(2)` of
//! 4 KiB or 1 MiB blocks at random offsets, and several threads reading whole
//! files at once.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::bail;
use crate::error::{Context, Result};

/// Size of each `read(2)` of the sequential readers (`dd bs=1M`).
pub const READ_BUF: usize = 1 << 20;
/// Size of each `read(2)` of `cat` (coreutils reads 128 KiB at a time).
pub const CAT_BUF: usize = 128 << 10;
/// Size of each small random read.
pub const BLOCK: usize = 4096;
/// Size of each large random read.
pub const LARGE_BLOCK: usize = 1 << 20;

/// Reads `path` from start to end with `READ_BUF` reads into `buf`, which
/// must be exactly as large as the file. Returns the time taken (open to EOF).
pub fn read_whole_into(path: &Path, buf: &mut [u8]) -> Result<Duration> {
    read_whole_into_by(path, buf, READ_BUF)
}

/// [`read_whole_into`] with `read_size` bytes asked of each `read(2)`.
pub fn read_whole_into_by(path: &Path, buf: &mut [u8], read_size: usize) -> Result<Duration> {
    read_whole_timed(path, buf, read_size).map(|(all, _)| all)
}

/// [`read_whole_into_by`], returning the time taken (open to EOF) and the `open(2)`'s share.
pub fn read_whole_timed(
    path: &Path,
    buf: &mut [u8],
    read_size: usize,
) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let opened = started.elapsed();
    let mut filled = 0;
    while filled < buf.len() {
        let end = (filled + read_size).min(buf.len());
        let n = file
            .read(&mut buf[filled..end])
            .with_context(|| format!("reading {} at offset {filled}", path.display()))?;
        if n == 0 {
            bail!(
                "{}: early EOF at {filled} of {} bytes",
                path.display(),
                buf.len()
            );
        }
        filled += n;
    }
    let mut probe = [0u8; 1];
    let extra = file
        .read(&mut probe)
        .with_context(|| format!("reading {} at its end", path.display()))?;
    if extra != 0 {
        bail!(
            "{}: longer than the expected {} bytes",
            path.display(),
            buf.len()
        );
    }
    Ok((started.elapsed(), opened))
}

/// Reads `path` to EOF with `READ_BUF` reads, discarding the data. Returns
/// the bytes read.
pub fn read_whole_discard(path: &Path) -> Result<u64> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; READ_BUF];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {} at offset {total}", path.display()))?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Reads each path whole in its own thread, all at once. Returns the wall
/// time and checks that every reader got `expect_len` bytes.
pub fn read_concurrently(paths: &[PathBuf], expect_len: u64) -> Result<Duration> {
    let started = Instant::now();
    let results: Vec<Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .iter()
            .map(|p| s.spawn(move || read_whole_discard(p)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail_panicked()))
            .collect()
    });
    let elapsed = started.elapsed();
    for (path, result) in paths.iter().zip(results) {
        let got = result?;
        if got != expect_len {
            bail!(
                "{}: read {got} bytes, expected {expect_len}",
                path.display()
            );
        }
    }
    Ok(elapsed)
}

fn bail_panicked() -> Result<u64> {
    bail!("a reader thread panicked")
}

/// `count` distinct-enough 4 KiB-aligned offsets inside a file of `size`
/// bytes, the same for the same seed.
pub fn random_offsets(size: u64, count: usize, seed: u64) -> Vec<u64> {
    random_offsets_of(size, BLOCK, count, seed)
}

/// `count` 4 KiB-aligned offsets at which reads of `len` bytes fit inside a
/// file of `size` bytes, the same for the same seed.
pub fn random_offsets_of(size: u64, len: usize, count: usize, seed: u64) -> Vec<u64> {
    let starts = (size.saturating_sub(len as u64) / BLOCK as u64 + 1).max(1);
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count)
        .map(|_| rng.u64(0..starts) * BLOCK as u64)
        .collect()
}

/// One open, then a 4 KiB `pread` at each offset, in order. Returns the
/// time of the reads (the open excluded).
pub fn random_reads(path: &Path, offsets: &[u64]) -> Result<Duration> {
    random_reads_of(path, offsets, BLOCK)
}

/// One open, then a `pread` of `len` bytes at each offset, in order, one at a
/// time. Returns the time of the reads (the open excluded).
pub fn random_reads_of(path: &Path, offsets: &[u64], len: usize) -> Result<Duration> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut block = vec![0u8; len];
    block.fill(0x5a);
    let started = Instant::now();
    for &off in offsets {
        file.read_exact_at(&mut block, off).with_context(|| {
            format!(
                "pread of {} KiB at {off} from {}",
                len >> 10,
                path.display()
            )
        })?;
    }
    Ok(started.elapsed())
}

/// Times `stat` of a name never looked up before, then [`first_block`].
pub fn lookup_then_first_block(path: &Path) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    std::fs::metadata(path).with_context(|| format!("looking up {}", path.display()))?;
    let lookup = started.elapsed();
    Ok((lookup, first_block(path)?))
}

/// Time from `open` to having the first 4 KiB of `path`.
pub fn first_block(path: &Path) -> Result<Duration> {
    let started = Instant::now();
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut block = [0u8; BLOCK];
    let n = file
        .read_at(&mut block, 0)
        .with_context(|| format!("reading the first 4 KiB of {}", path.display()))?;
    let elapsed = started.elapsed();
    if n == 0 {
        bail!("{}: empty", path.display());
    }
    Ok(elapsed)
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Checks that `data` hashes to `expected`.
pub fn verify_sha256(what: &str, data: &[u8], expected: &str) -> Result<()> {
    let got = sha256_hex(data);
    if got != expected {
        bail!("{what}: sha256 {got} differs from the source's {expected}");
    }
    Ok(())
}

/// Median of durations (the upper middle for even counts).
pub fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}
