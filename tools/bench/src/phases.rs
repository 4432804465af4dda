//! The measurements, one function per phase. Each phase sets up the state it
//! needs (fresh cache dir, fresh mount, dropped page cache), measures, and
//! unmounts; mounts are guards, so an error anywhere still unmounts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::bail;
use crate::error::{Context, Result};
use crate::fs::{Fs, MountEnv};
use crate::fsmount::FsMount;
use crate::origin::{Dataset, PlainClient, MAIN_KEY};
use crate::reads::{self, BLOCK, LARGE_BLOCK};
use crate::server::OriginServer;
use crate::sys;
use crate::MIB;

/// How long the origin must be quiet to count as idle.
const IDLE_QUIET: Duration = Duration::from_millis(300);
/// Longest wait for the origin to go idle.
const IDLE_MAX_WAIT: Duration = Duration::from_secs(60);

/// Counts that shape the run.
#[derive(Debug, Clone)]
pub struct Knobs {
    /// Random 4 KiB reads of the cached object.
    pub random_reads: usize,
    /// Random 1 MiB reads of the cached object.
    pub random_large_reads: usize,
    pub cold_random_reads: usize,
    /// Ranged GETs at once of the parallel baseline of the cold sequential read.
    pub parallel_gets: usize,
    pub readers: usize,
    pub repeat: usize,
    pub phase_limit: Duration,
    /// Phases to run; empty means all.
    pub only: Vec<Phase>,
    /// Per-connection rate of the paced origin (rows 1d, 1e), MiB/s.
    pub paced_mibps: u64,
    /// Whether the paced rounds read through Mountpoint too (`--with-peers`, `mount-s3` on PATH).
    pub mountpoint_paced: bool,
    /// Mountpoint without its cache is read in the cold rounds, beside orcafs (row 1c).
    pub mountpoint_cold: bool,
}

/// The orcafs measurements, as `--only` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// `cold` and `cached` (rows 1-3, 5a, 5d).
    Seq,
    /// Cold sequential read vs one plain GET and parallel ranged GETs (rows 1, 1b).
    Cold,
    /// Warm, hot and random re-reads of the cached object, with passthrough and without, and
    /// the same reads of the local copy (rows 2, 2b, 3, 5a, 5d); without `cold`, one unmeasured
    /// cold read fills the cache first.
    Cached,
    /// Time to first byte (row 4).
    Ttfb,
    /// Random 4 KiB reads of a cold object vs plain ranged GETs (rows 5b, 5c).
    ColdRandom,
    /// Readers of one cold object (row 6).
    Readers,
    /// Peak RSS with readers of different objects (row 7).
    Rss,
    /// Directory listings (rows 8-12).
    Dirs,
    /// Cold read with a stalled shared cache store (row 13).
    SharedStall,
    /// Cold sequential read from an origin that paces each connection, vs parallel ranged GETs
    /// and Mountpoint through the same pacing (rows 1d, 1e).
    Paced,
}

impl Knobs {
    pub fn runs(&self, phase: Phase) -> bool {
        let in_seq =
            matches!(phase, Phase::Cold | Phase::Cached) && self.only.contains(&Phase::Seq);
        self.only.is_empty() || self.only.contains(&phase) || in_seq
    }
}

/// Shared state of the measuring phases.
pub struct Bench {
    pub knobs: Knobs,
    pub origin: OriginServer,
    pub plain: PlainClient,
    pub data: Dataset,
    pub env: MountEnv,
    pub local_copy: PathBuf,
    /// Holds the large object's bytes on every sequential read; allocated and
    /// touched once so page faults stay out of the timings.
    buf: Vec<u8>,
    /// Offsets of the cached random 4 KiB reads (mount and local file alike).
    offsets: Vec<u64>,
    /// Offsets of the cached random 1 MiB reads.
    large_offsets: Vec<u64>,
}

/// Sequential cold read of the large object.
#[derive(Debug, Clone, Copy)]
pub struct ColdSeq {
    pub mibps: f64,
    pub origin_bytes: u64,
    /// Peak RSS of the filesystem process.
    pub hwm_bytes: u64,
    /// CPU the read took (None with an in-process origin).
    pub cpu: Option<CpuUse>,
}

/// CPU seconds one read of the large object took: the origin server's process, the bench
/// process (the reader of a mount, or the plain client), and the filesystem's process.
#[derive(Debug, Clone, Copy)]
pub struct CpuUse {
    pub server: f64,
    pub bench: f64,
    pub fs: f64,
}

/// A throughput and the CPU it took.
#[derive(Debug, Clone, Copy)]
pub struct Speed {
    pub mibps: f64,
    pub cpu: Option<CpuUse>,
}

/// The reads of the whole cached object, through a mount or of the local copy, in this order.
#[derive(Debug, Clone, Copy)]
pub struct CachedReads {
    /// Offset 0 to EOF in 1 MiB `read(2)`s (`dd bs=1M`), page cache dropped; open included.
    pub warm_mibps: f64,
    /// The `open(2)` of that read, ms.
    pub warm_open_ms: f64,
    /// The same again right after, page cache kept.
    pub hot_mibps: f64,
    /// Offset 0 to EOF in 128 KiB `read(2)`s (`cat`), page cache dropped.
    pub warm_cat_mibps: f64,
    /// 4 KiB `pread`s at random offsets, one at a time, page cache dropped.
    pub random_iops: f64,
    /// 1 MiB `pread`s at random offsets, one at a time, page cache dropped.
    pub random_large_mibps: f64,
}

/// Re-reads over a warm disk cache.
#[derive(Debug, Clone, Copy)]
pub struct Reread {
    pub reads: CachedReads,
    /// Origin bytes and GetObject requests during the reads.
    pub origin_bytes: u64,
    pub origin_gets: u64,
    /// orcafs's `passthrough_opens` counter after the reads (None for the other filesystems).
    pub passthrough_opens: Option<u64>,
}

/// Random 4 KiB reads of a cold object, and the plain client's ranged GETs of the same bytes.
#[derive(Debug, Clone, Copy)]
pub struct ColdRandom {
    pub reads: usize,
    /// Bytes the origin sent during the mount's reads (HTTP headers included), its GetObject
    /// requests meanwhile, and the reads' time.
    pub origin_bytes: u64,
    pub origin_gets: u64,
    pub elapsed: Duration,
    /// orcafs's own counters after the reads: block fills, whole-chunk fills, and the body
    /// bytes it received from origin GETs.
    pub block_fills: u64,
    pub chunk_fills: u64,
    pub orcafs_body_bytes: u64,
    /// The same for the plain client's 4 KiB ranged GETs, one at a time.
    pub plain_bytes: u64,
    pub plain_gets: u64,
    pub plain_elapsed: Duration,
}

impl ColdRandom {
    /// Bytes asked for.
    pub fn requested(&self) -> u64 {
        (self.reads * BLOCK) as u64
    }

    /// What each response costs beyond its body (HTTP headers), measured on the plain GETs:
    /// bytes sent minus the bodies, per request.
    pub fn overhead_per_response(&self) -> f64 {
        let extra = self.plain_bytes.saturating_sub(self.requested()) as f64;
        extra / self.plain_gets.max(1) as f64
    }

    /// The body bytes the origin sent the mount: its bytes minus that overhead per GET.
    pub fn origin_body_bytes(&self) -> f64 {
        let body =
            self.origin_bytes as f64 - self.origin_gets as f64 * self.overhead_per_response();
        body.max(0.0)
    }

    pub fn iops(&self) -> f64 {
        self.reads as f64 / self.elapsed.as_secs_f64()
    }

    pub fn plain_iops(&self) -> f64 {
        self.reads as f64 / self.plain_elapsed.as_secs_f64()
    }
}

/// Medians of the time-to-first-byte samples.
#[derive(Debug, Clone)]
pub struct Ttfb {
    /// Lookup + open + first 4 KiB.
    pub mount: Vec<Duration>,
    /// The lookup (stat) part of it.
    pub lookup: Vec<Duration>,
    /// The same in a directory too big for one LIST page.
    pub big_dir: Vec<Duration>,
    pub big_dir_lookup: Vec<Duration>,
    pub plain: Vec<Duration>,
    /// The plain GET's time to its first 16 KiB (what the kernel asks orcafs for).
    pub plain_16k: Vec<Duration>,
}

/// Samples of one directory's objects.
#[derive(Default)]
struct Ttfb1 {
    mount: Vec<Duration>,
    lookup: Vec<Duration>,
    plain: Vec<Duration>,
    plain_16k: Vec<Duration>,
}

/// Several threads reading one cold object.
#[derive(Debug, Clone, Copy)]
pub struct Readers {
    pub origin_bytes: u64,
    pub elapsed: Duration,
}

/// Memory of orcafs while reading several cold objects at once.
#[derive(Debug, Clone, Copy)]
pub struct Rss {
    pub hwm_bytes: u64,
    pub idle_bytes: u64,
    pub elapsed: Duration,
    pub origin_bytes: u64,
}

impl Bench {
    pub fn new(
        knobs: Knobs,
        origin: OriginServer,
        plain: PlainClient,
        data: Dataset,
        env: MountEnv,
        local_copy: PathBuf,
    ) -> Bench {
        let mut buf = vec![0u8; data.main_size as usize];
        buf.fill(0x5a);
        let offsets = reads::random_offsets(data.main_size, knobs.random_reads, 0xB10C);
        let large_offsets = reads::random_offsets_of(
            data.main_size,
            LARGE_BLOCK,
            knobs.random_large_reads,
            0xB16B10C,
        );
        Bench {
            knobs,
            origin,
            plain,
            data,
            env,
            local_copy,
            buf,
            offsets,
            large_offsets,
        }
    }

    pub fn mibps(&self, elapsed: Duration) -> f64 {
        self.data.main_size as f64 / MIB as f64 / elapsed.as_secs_f64()
    }

    /// An empty cache directory `WORK/cache/NAME` (emptied if it exists).
    pub fn fresh_cache(&self, name: &str) -> Result<PathBuf> {
        let dir = self.cache_dir(name);
        remove_dir(&dir)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    fn cache_dir(&self, name: &str) -> PathBuf {
        self.env.work.join("cache").join(name)
    }

    /// Reads the origin's files of `keys` once so they sit in the page
    /// cache: the origin then costs CPU only, like a remote origin, and its
    /// disk reads neither compete with the cache writes nor add noise. (Garage
    /// keeps objects as blocks named by hash: a GET of each reads them.)
    pub fn preload_origin(&self, keys: &[&str]) -> Result<()> {
        for key in keys {
            match self.origin.object_file(key) {
                Some(path) => reads::read_whole_discard(&path)
                    .map(drop)
                    .with_context(|| format!("preloading the origin file {}", path.display()))?,
                None => self.plain.get_discard(key).map(drop)?,
            }
        }
        Ok(())
    }

    /// Waits until the origin has seen no request and sent no byte for a
    /// while, so background fills (readahead) of one step neither leak into
    /// the next one nor escape the byte count of this one.
    pub fn wait_origin_idle(&self) -> Result<()> {
        let deadline = Instant::now() + IDLE_MAX_WAIT;
        let mut last = self.origin.counts()?;
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline && quiet_since.elapsed() < IDLE_QUIET {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.origin.counts()?;
            if (now.requests, now.get_bytes) != (last.requests, last.get_bytes) {
                quiet_since = Instant::now();
                last = now;
            }
        }
        Ok(())
    }

    /// Times a full read of the large object through `mount` into the
    /// buffer, then checks its SHA-256.
    pub fn timed_main_read(
        &mut self,
        mount: &FsMount,
        what: &str,
    ) -> Result<(Duration, Option<CpuUse>)> {
        let path = mount.path(MAIN_KEY);
        let limit = self.knobs.phase_limit;
        let meter = self.cpu_meter(Some(mount.pid()));
        let buf = &mut self.buf;
        let elapsed = mount.guarded(what, limit, || reads::read_whole_into(&path, buf))?;
        let cpu = cpu_use(meter);
        reads::verify_sha256(what, &self.buf, &self.data.main_sha256)?;
        Ok((elapsed, cpu))
    }

    /// Counts the origin server's CPU and the client's: `fs` (a filesystem's process) and
    /// this one (the reader, or the plain client). None with an in-process origin.
    fn cpu_meter(&self, fs: Option<u32>) -> Option<sys::CpuMeter> {
        let mut pids = vec![self.origin.pid()?, std::process::id()];
        pids.extend(fs);
        sys::CpuMeter::start(&pids)
    }

    /// Plain single-stream SDK GET of the large object.
    pub fn plain_get(&mut self) -> Result<Speed> {
        self.preload_origin(&[MAIN_KEY])?;
        let meter = self.cpu_meter(None);
        let elapsed = self.plain.get_into(MAIN_KEY, &mut self.buf)?;
        let cpu = cpu_use(meter);
        reads::verify_sha256("plain GET", &self.buf, &self.data.main_sha256)?;
        Ok(Speed {
            mibps: self.mibps(elapsed),
            cpu,
        })
    }

    /// The large object as `parallel_gets` plain ranged GETs of contiguous ranges at once, on
    /// warm connections (to the last byte of the last one).
    pub fn plain_parallel_get(&mut self) -> Result<Speed> {
        self.parallel_get(None)
    }

    /// [`Bench::plain_parallel_get`], through `via` when given (a client of a proxy).
    pub fn parallel_get(&mut self, via: Option<&PlainClient>) -> Result<Speed> {
        self.preload_origin(&[MAIN_KEY])?;
        let parts = self.knobs.parallel_gets;
        let meter = self.cpu_meter(None);
        let client = via.unwrap_or(&self.plain);
        let elapsed = client.get_ranges_into(MAIN_KEY, &mut self.buf, parts)?;
        let cpu = cpu_use(meter);
        reads::verify_sha256("parallel ranged GETs", &self.buf, &self.data.main_sha256)?;
        Ok(Speed {
            mibps: self.mibps(elapsed),
            cpu,
        })
    }

    /// Cold sequential read (fresh cache `FS-main`, kept for [`Bench::reread`]).
    pub fn cold_seq(&mut self, fs: Fs) -> Result<ColdSeq> {
        let env = self.env.clone();
        self.cold_seq_in(fs, &env, "main")
    }

    /// [`Bench::cold_seq`] with a mount of `env` (another endpoint) and the cache `FS-TAG`.
    pub fn cold_seq_in(&mut self, fs: Fs, env: &MountEnv, tag: &str) -> Result<ColdSeq> {
        let cache = self.fresh_cache(&format!("{}-{tag}", fs.name()))?;
        let mount = fs.mount(env, &cache, &format!("cold-seq-{tag}"))?;
        self.preload_origin(&[MAIN_KEY])?;
        self.origin.zero_counts()?;
        let (elapsed, cpu) = self.timed_main_read(&mount, "cold sequential read")?;
        let origin_bytes = self.origin.counts()?.get_bytes;
        let hwm_bytes = sys::proc_status_bytes(mount.pid(), "VmHWM")?;
        mount.unmount()?;
        Ok(ColdSeq {
            mibps: self.mibps(elapsed),
            origin_bytes,
            hwm_bytes,
            cpu,
        })
    }

    /// The cached reads over the cache the cold read filled, in a new mount with `extra`
    /// orcafs flags (`--no-passthrough`). Keeps the cache (see [`Bench::forget_cache`]).
    pub fn reread(&mut self, fs: Fs, extra: &[String]) -> Result<Reread> {
        if fs == Fs::Orcafs && extra.iter().any(|f| f == NO_PASSTHROUGH) && !self.env.no_passthrough
        {
            bail!("this orcafs has no {NO_PASSTHROUGH} flag");
        }
        let cache = self.cache_dir(&format!("{}-main", fs.name()));
        let tag = match extra.is_empty() {
            true => "reread",
            false => "reread-flags",
        };
        let mount = fs.mount_with(&self.env, &cache, tag, extra)?;
        self.origin.zero_counts()?;
        let path = mount.path(MAIN_KEY);
        let limit = self.knobs.phase_limit;
        let reads = mount.guarded("cached reads", limit, || self.cached_reads(&path))?;
        let counts = self.origin.counts()?;
        let passthrough_opens = match fs {
            Fs::Orcafs => Some(
                orcafs_counter(&self.env, &mount, "passthrough_opens")
                    .context("reading orcafs's passthrough_opens")?,
            ),
            _ => None,
        };
        mount.unmount()?;
        Ok(Reread {
            reads,
            origin_bytes: counts.get_bytes,
            origin_gets: counts.get_requests,
            passthrough_opens,
        })
    }

    /// Deletes the cache of [`Bench::cold_seq`] and [`Bench::reread`].
    pub fn forget_cache(&self, fs: Fs) -> Result<()> {
        self.forget_cache_of(fs, "main")
    }

    /// Deletes the cache of [`Bench::cold_seq_in`] with `tag`.
    pub fn forget_cache_of(&self, fs: Fs, tag: &str) -> Result<()> {
        remove_dir(&self.cache_dir(&format!("{}-{tag}", fs.name())))
    }

    /// The reads of [`CachedReads`] of the large object at `path`, in its order, each
    /// sequential read's data checked against the source's SHA-256 (outside the timings).
    fn cached_reads(&mut self, path: &Path) -> Result<CachedReads> {
        let sha = self.data.main_sha256.clone();
        sys::drop_caches()?;
        let (warm, open) = reads::read_whole_timed(path, &mut self.buf, reads::READ_BUF)
            .context("warm 1 MiB reads")?;
        reads::verify_sha256("warm 1 MiB reads", &self.buf, &sha)?;
        let hot = reads::read_whole_into(path, &mut self.buf).context("hot 1 MiB reads")?;
        reads::verify_sha256("hot 1 MiB reads", &self.buf, &sha)?;
        sys::drop_caches()?;
        let cat = reads::read_whole_into_by(path, &mut self.buf, reads::CAT_BUF)
            .context("warm 128 KiB reads")?;
        reads::verify_sha256("warm 128 KiB reads", &self.buf, &sha)?;
        sys::drop_caches()?;
        let random = reads::random_reads(path, &self.offsets).context("random 4 KiB reads")?;
        sys::drop_caches()?;
        let large = reads::random_reads_of(path, &self.large_offsets, LARGE_BLOCK)
            .context("random 1 MiB reads")?;
        let large_mib = (self.large_offsets.len() * LARGE_BLOCK) as f64 / MIB as f64;
        Ok(CachedReads {
            warm_mibps: self.mibps(warm),
            warm_open_ms: open.as_secs_f64() * 1000.0,
            hot_mibps: self.mibps(hot),
            warm_cat_mibps: self.mibps(cat),
            random_iops: self.offsets.len() as f64 / random.as_secs_f64(),
            random_large_mibps: large_mib / large.as_secs_f64(),
        })
    }

    /// The same reads of the local copy.
    pub fn local(&mut self) -> Result<CachedReads> {
        let path = self.local_copy.clone();
        self.cached_reads(&path)
    }

    /// One round of random 4 KiB reads of the never-read large object (offsets seeded by
    /// `round`): first the plain client's ranged GETs of the same 4 KiB blocks, one at a time
    /// on its warm connection, then the reads through a fresh mount over a fresh cache; the
    /// origin's bytes and GETs during each.
    pub fn cold_random(&mut self, round: usize) -> Result<ColdRandom> {
        let n = self.knobs.cold_random_reads;
        let offsets = reads::random_offsets(self.data.main_size, n, 0xC01D + round as u64);
        self.preload_origin(&[MAIN_KEY])?;
        self.plain.warm_up(MAIN_KEY)?;
        self.wait_origin_idle()?;
        self.origin.zero_counts()?;
        let plain_elapsed =
            self.plain
                .get_ranges_one_at_a_time(MAIN_KEY, &offsets, BLOCK as u64)?;
        self.wait_origin_idle()?;
        let plain = self.origin.counts()?;
        let cache = self.fresh_cache("orcafs-cold-random")?;
        let mount = Fs::Orcafs.mount(&self.env, &cache, "cold-random")?;
        let path = mount.path(MAIN_KEY);
        // The name's lookup stays out of the counts (its LIST is no read's cost).
        std::fs::metadata(&path).with_context(|| format!("looking up {}", path.display()))?;
        self.wait_origin_idle()?;
        self.origin.zero_counts()?;
        let elapsed = mount.guarded("cold random reads", self.knobs.phase_limit, || {
            reads::random_reads(&path, &offsets)
        })?;
        self.wait_origin_idle()?;
        let counts = self.origin.counts()?;
        let names = ["block_fills", "fills_started", "origin_get_bytes"];
        let own =
            orcafs_counters(&self.env, &mount, &names).context("reading orcafs's counters")?;
        mount.unmount()?;
        remove_dir(&cache)?;
        Ok(ColdRandom {
            reads: n,
            origin_bytes: counts.get_bytes,
            origin_gets: counts.get_requests,
            elapsed,
            block_fills: own[0],
            chunk_fills: own[1],
            orcafs_body_bytes: own[2],
            plain_bytes: plain.get_bytes,
            plain_gets: plain.get_requests,
            plain_elapsed,
        })
    }

    /// Open + first 4 KiB of never-read objects through a fresh mount, each paired with the
    /// plain GET's first bytes of the same object taken right after it.
    pub fn ttfb(&mut self) -> Result<Ttfb> {
        let cache = self.fresh_cache("orcafs-ttfb")?;
        let keys = self.data.ttfb_keys.clone();
        let big_keys = self.data.ttfb_big_dir_keys.clone();
        // Start from a settled machine: earlier phases leave dirty pages and a full page cache.
        sys::drop_caches()?;
        self.preload_origin(
            &keys
                .iter()
                .chain(&big_keys)
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )?;
        let mount = Fs::Orcafs.mount(&self.env, &cache, "ttfb")?;
        // One read of another object first, so the mount's code is paged in (as in any mount
        // that has served a read) and its connections are open, like the plain client's.
        let warm_up = mount.path(MAIN_KEY);
        mount.guarded("warm-up read", self.knobs.phase_limit, || {
            reads::lookup_then_first_block(&warm_up)
        })?;
        self.plain.warm_up(MAIN_KEY)?;
        let small = self.first_blocks(&mount, &keys, true)?;
        let big = self.first_blocks(&mount, &big_keys, false)?;
        mount.unmount()?;
        remove_dir(&cache)?;
        Ok(Ttfb {
            mount: small.mount,
            lookup: small.lookup,
            big_dir: big.mount,
            big_dir_lookup: big.lookup,
            plain: small.plain,
            plain_16k: small.plain_16k,
        })
    }

    /// For each key (never read, in one directory): the origin idle, then `stat` + `open` +
    /// first 4 KiB, after looking up the directory once; with `plain`, then the origin idle
    /// again and the plain GET's first bytes of the same object, so both sides of each pair see
    /// the same machine (an idle machine answers slower than a busy one: same wait for both).
    fn first_blocks(&mut self, mount: &FsMount, keys: &[String], plain: bool) -> Result<Ttfb1> {
        let dir = keys
            .first()
            .and_then(|k| Path::new(k).parent())
            .context("no TTFB objects")?;
        std::fs::metadata(mount.path(&dir.to_string_lossy()))
            .context("looking up the TTFB directory")?;
        // One watchdog for all samples: a watchdog thread started per sample would run beside
        // the mount's samples only.
        let limit = self.knobs.phase_limit;
        mount.guarded("first 4 KiB of each object", limit, || {
            let mut out = Ttfb1::default();
            for key in keys {
                self.wait_origin_idle()?;
                let (lookup, first) = reads::lookup_then_first_block(&mount.path(key))?;
                out.mount.push(lookup + first);
                out.lookup.push(lookup);
                if plain {
                    self.wait_origin_idle()?;
                    let (first, kernel_read) = self.plain.first_bytes(key)?;
                    out.plain.push(first);
                    out.plain_16k.push(kernel_read);
                }
            }
            Ok(out)
        })
    }

    /// `readers` threads reading the whole cold large object at once.
    pub fn readers(&mut self, fs: Fs) -> Result<Readers> {
        let cache = self.fresh_cache(&format!("{}-readers", fs.name()))?;
        let mount = fs.mount(&self.env, &cache, "readers")?;
        let paths = vec![mount.path(MAIN_KEY); self.knobs.readers];
        self.preload_origin(&[MAIN_KEY])?;
        self.origin.zero_counts()?;
        let size = self.data.main_size;
        let elapsed = mount.guarded("concurrent readers", self.knobs.phase_limit, || {
            reads::read_concurrently(&paths, size)
        })?;
        self.wait_origin_idle()?;
        let origin_bytes = self.origin.counts()?.get_bytes;
        mount.unmount()?;
        remove_dir(&cache)?;
        Ok(Readers {
            origin_bytes,
            elapsed,
        })
    }

    /// Peak RSS of orcafs while each reader reads a different cold object.
    pub fn rss(&mut self) -> Result<Rss> {
        let cache = self.fresh_cache("orcafs-rss")?;
        let mount = Fs::Orcafs.mount(&self.env, &cache, "rss")?;
        let pid = mount.pid();
        let idle_bytes = sys::proc_status_bytes(pid, "VmRSS")?;
        let paths: Vec<PathBuf> = self.data.rss_keys.iter().map(|k| mount.path(k)).collect();
        if paths.is_empty() {
            bail!("no objects for the memory test");
        }
        self.origin.zero_counts()?;
        let size = self.data.rss_size;
        let elapsed = mount.guarded(
            "readers of different objects",
            self.knobs.phase_limit,
            || reads::read_concurrently(&paths, size),
        )?;
        let hwm_bytes = sys::proc_status_bytes(pid, "VmHWM")?;
        self.wait_origin_idle()?;
        let origin_bytes = self.origin.counts()?.get_bytes;
        mount.unmount()?;
        remove_dir(&cache)?;
        Ok(Rss {
            hwm_bytes,
            idle_bytes,
            elapsed,
            origin_bytes,
        })
    }
}

/// The orcafs flag that turns FUSE passthrough off.
pub const NO_PASSTHROUGH: &str = "--no-passthrough";

/// A counter of `orcafs status --json MNT` (its `metrics` object).
fn orcafs_counter(env: &MountEnv, mount: &FsMount, name: &str) -> Result<u64> {
    Ok(orcafs_counters(env, mount, &[name])?[0])
}

/// Counters of `orcafs status --json MNT` (its `metrics` object), in the order of `names`.
fn orcafs_counters(env: &MountEnv, mount: &FsMount, names: &[&str]) -> Result<Vec<u64>> {
    let out = std::process::Command::new(&env.orcafs)
        .args(["status", "--json"])
        .arg(mount.mountpoint())
        .output()
        .context("running orcafs status --json")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "orcafs status --json failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    names
        .iter()
        .map(|name| {
            json_counter(&text, name).with_context(|| format!("no counter {name:?} in: {text}"))
        })
        .collect()
}

/// The unsigned number after `"name":` in a JSON text (counter names are unique in it).
fn json_counter(text: &str, name: &str) -> Option<u64> {
    let key = format!("\"{name}\"");
    let rest = text[text.find(&key)? + key.len()..].trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

pub fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// The CPU a meter of [`Bench::cpu_meter`] counted.
fn cpu_use(meter: Option<sys::CpuMeter>) -> Option<CpuUse> {
    let used = meter?.stop()?;
    Some(CpuUse {
        server: *used.first()?,
        bench: *used.get(1)?,
        fs: used.get(2).copied().unwrap_or(0.0),
    })
}
