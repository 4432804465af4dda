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
use crate::reads::{self, BLOCK};
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
    pub random_reads: usize,
    pub cold_random_reads: usize,
    pub readers: usize,
    pub repeat: usize,
    pub phase_limit: Duration,
    /// Phases to run; empty means all.
    pub only: Vec<Phase>,
}

/// The orcafs measurements, as `--only` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// Cold sequential, warm, hot and cached random re-reads (rows 1-3, 5a).
    Seq,
    /// Time to first byte (row 4).
    Ttfb,
    /// Random reads of a cold object (row 5b).
    ColdRandom,
    /// Readers of one cold object (row 6).
    Readers,
    /// Peak RSS with readers of different objects (row 7).
    Rss,
    /// Directory listings (rows 8-12).
    Dirs,
    /// Cold read with a stalled shared cache store (row 13).
    SharedStall,
}

impl Knobs {
    pub fn runs(&self, phase: Phase) -> bool {
        self.only.is_empty() || self.only.contains(&phase)
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
    /// Offsets of the cached random-read phase (mount and local file alike).
    offsets: Vec<u64>,
}

/// Sequential cold read of the large object.
#[derive(Debug, Clone, Copy)]
pub struct ColdSeq {
    pub mibps: f64,
    pub origin_bytes: u64,
    /// Peak RSS of the filesystem process.
    pub hwm_bytes: u64,
}

/// Re-reads over a warm disk cache.
#[derive(Debug, Clone, Copy)]
pub struct Reread {
    pub warm_mibps: f64,
    pub hot_mibps: f64,
    /// Origin bytes and GetObject requests during the warm and hot reads.
    pub origin_bytes: u64,
    pub origin_gets: u64,
    pub random_iops: Option<f64>,
}

/// The local-file baselines.
#[derive(Debug, Clone, Copy)]
pub struct Local {
    pub warm_mibps: f64,
    pub hot_mibps: f64,
    pub random_iops: f64,
}

/// Random 4 KiB reads of a cold object.
#[derive(Debug, Clone, Copy)]
pub struct ColdRandom {
    pub origin_bytes: u64,
    pub requested: u64,
    pub elapsed: Duration,
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
        Bench {
            knobs,
            origin,
            plain,
            data,
            env,
            local_copy,
            buf,
            offsets,
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
    pub fn timed_main_read(&mut self, mount: &FsMount, what: &str) -> Result<Duration> {
        let path = mount.path(MAIN_KEY);
        let limit = self.knobs.phase_limit;
        let buf = &mut self.buf;
        let elapsed = mount.guarded(what, limit, || reads::read_whole_into(&path, buf))?;
        reads::verify_sha256(what, &self.buf, &self.data.main_sha256)?;
        Ok(elapsed)
    }

    /// Plain single-stream SDK GET of the large object, in MiB/s.
    pub fn plain_get(&mut self) -> Result<f64> {
        self.preload_origin(&[MAIN_KEY])?;
        let elapsed = self.plain.get_into(MAIN_KEY, &mut self.buf)?;
        reads::verify_sha256("plain GET", &self.buf, &self.data.main_sha256)?;
        Ok(self.mibps(elapsed))
    }

    /// Cold sequential read (fresh cache `FS-main`, kept for [`Bench::reread`]).
    pub fn cold_seq(&mut self, fs: Fs) -> Result<ColdSeq> {
        let cache = self.fresh_cache(&format!("{}-main", fs.name()))?;
        let mount = fs.mount(&self.env, &cache, "cold-seq")?;
        self.preload_origin(&[MAIN_KEY])?;
        self.origin.zero_counts()?;
        let elapsed = self.timed_main_read(&mount, "cold sequential read")?;
        let origin_bytes = self.origin.counts()?.get_bytes;
        let hwm_bytes = sys::proc_status_bytes(mount.pid(), "VmHWM")?;
        mount.unmount()?;
        Ok(ColdSeq {
            mibps: self.mibps(elapsed),
            origin_bytes,
            hwm_bytes,
        })
    }

    /// Warm then hot re-read over the cache the cold read filled, in a new
    /// mount; with `random`, also the cached random reads. Keeps the cache
    /// (see [`Bench::forget_cache`]).
    pub fn reread(&mut self, fs: Fs, random: bool) -> Result<Reread> {
        let cache = self.cache_dir(&format!("{}-main", fs.name()));
        let mount = fs.mount(&self.env, &cache, "reread")?;
        sys::drop_caches()?;
        self.origin.zero_counts()?;
        let warm = self.timed_main_read(&mount, "warm re-read")?;
        let hot = self.timed_main_read(&mount, "hot re-read")?;
        let counts = self.origin.counts()?;
        let random_iops = match random {
            true => Some(self.random_cached(&mount)?),
            false => None,
        };
        mount.unmount()?;
        Ok(Reread {
            warm_mibps: self.mibps(warm),
            hot_mibps: self.mibps(hot),
            origin_bytes: counts.get_bytes,
            origin_gets: counts.get_requests,
            random_iops,
        })
    }

    /// Deletes the cache of [`Bench::cold_seq`] and [`Bench::reread`].
    pub fn forget_cache(&self, fs: Fs) -> Result<()> {
        remove_dir(&self.cache_dir(&format!("{}-main", fs.name())))
    }

    fn random_cached(&self, mount: &FsMount) -> Result<f64> {
        sys::drop_caches()?;
        let path = mount.path(MAIN_KEY);
        let elapsed = mount.guarded("cached random reads", self.knobs.phase_limit, || {
            reads::random_reads(&path, &self.offsets)
        })?;
        Ok(self.offsets.len() as f64 / elapsed.as_secs_f64())
    }

    /// The same reads of the local copy: cold page cache, hot, random.
    pub fn local(&mut self) -> Result<Local> {
        sys::drop_caches()?;
        let warm = reads::read_whole_into(&self.local_copy, &mut self.buf)?;
        let hot = reads::read_whole_into(&self.local_copy, &mut self.buf)?;
        reads::verify_sha256("local copy", &self.buf, &self.data.main_sha256)?;
        sys::drop_caches()?;
        let random = reads::random_reads(&self.local_copy, &self.offsets)?;
        Ok(Local {
            warm_mibps: self.mibps(warm),
            hot_mibps: self.mibps(hot),
            random_iops: self.offsets.len() as f64 / random.as_secs_f64(),
        })
    }

    /// Random 4 KiB reads of the never-read large object: origin bytes pulled.
    pub fn cold_random(&mut self) -> Result<ColdRandom> {
        let cache = self.fresh_cache("orcafs-cold-random")?;
        let mount = Fs::Orcafs.mount(&self.env, &cache, "cold-random")?;
        let offsets =
            reads::random_offsets(self.data.main_size, self.knobs.cold_random_reads, 0xC01D);
        self.preload_origin(&[MAIN_KEY])?;
        self.origin.zero_counts()?;
        let path = mount.path(MAIN_KEY);
        let elapsed = mount.guarded("cold random reads", self.knobs.phase_limit, || {
            reads::random_reads(&path, &offsets)
        })?;
        self.wait_origin_idle()?;
        let origin_bytes = self.origin.counts()?.get_bytes;
        mount.unmount()?;
        remove_dir(&cache)?;
        Ok(ColdRandom {
            origin_bytes,
            requested: (offsets.len() * BLOCK) as u64,
            elapsed,
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

pub fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}
