//! The directory phases (issue #14): `ls -l` of a large prefix cold and warm, the first names
//! of a cold directory, `find` / `du -s` / `ls -R` of a tree, and `ls -l` of one LIST page,
//! each beside its baseline measured in the same round: a plain paginated ListObjectsV2 on the
//! plain client's warm connection, or the same command on a local copy of the directories.
//!
//! Commands run as the programs users run (`ls`, `find`, `du`, python3's `os.scandir`) with
//! `LC_ALL=C`; their output is read (and the entries counted), so both sides pay the same.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::bail;
use crate::error::{Context, Result};
use crate::fs::Fs;
use crate::fsmount::FsMount;
use crate::origin::{DIR_LARGE, DIR_PAGE, MAIN_KEY, TREE};
use crate::phases::{remove_dir, Bench};

/// orcafs's metadata TTL in these phases, so that the warm rows are within it.
pub const METADATA_TTL: &str = "300s";

/// One round of `ls -l` of the large prefix.
#[derive(Debug, Clone, Copy)]
pub struct LargeLs {
    pub cold: Duration,
    /// Origin requests during the cold `ls -l`: all, LIST, HEAD, GET.
    pub cold_requests: [u64; 4],
    pub plain_list: Duration,
    pub warm: Duration,
    /// Origin requests during the warm `ls -l`.
    pub warm_requests: u64,
    pub local: Duration,
}

/// One round of the first names of a cold directory.
#[derive(Debug, Clone, Copy)]
pub struct FirstNames {
    /// `stat` of the directory (its lookup).
    pub lookup: Duration,
    /// `os.scandir` to its first entry.
    pub first: Duration,
    pub plain_page: Duration,
}

/// A command walking the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    Find,
    Du,
    LsR,
}

impl Walk {
    pub const ALL: [Walk; 3] = [Walk::Find, Walk::Du, Walk::LsR];

    pub fn shown(self) -> &'static str {
        match self {
            Walk::Find => "find",
            Walk::Du => "du -s",
            Walk::LsR => "ls -R",
        }
    }

    fn command(self, dir: &Path) -> Command {
        let mut c = match self {
            Walk::Find => Command::new("find"),
            Walk::Du => {
                let mut c = Command::new("du");
                c.arg("-s");
                c
            }
            Walk::LsR => {
                let mut c = Command::new("ls");
                c.arg("-R");
                c
            }
        };
        c.arg(dir);
        c
    }
}

/// One round of one tree walk.
#[derive(Debug, Clone, Copy)]
pub struct TreeWalk {
    pub cold: Duration,
    pub warm: Duration,
    pub local: Duration,
}

/// One round of the tree: each walk, and the plain LISTs of every directory.
#[derive(Debug, Clone)]
pub struct TreeRound {
    pub walks: Vec<(Walk, TreeWalk)>,
    pub plain_lists: Duration,
}

/// `ls -l` of one LIST page of objects through one filesystem.
#[derive(Debug, Clone, Copy)]
pub struct PageLs {
    pub cold: Duration,
    pub warm: Duration,
    pub warm_requests: u64,
}

/// The baselines of [`PageLs`].
#[derive(Debug, Clone, Copy)]
pub struct PageBaselines {
    pub plain_page: Duration,
    pub local: Duration,
}

/// Prints how long python3 takes to `stat` a directory, then to get the first entry of
/// `os.scandir` (python's own start-up excluded).
const FIRST_NAME: &str = "\
import os, sys, time
d = sys.argv[1]
t0 = time.perf_counter()
os.stat(d)
t1 = time.perf_counter()
it = os.scandir(d)
next(it)
t2 = time.perf_counter()
it.close()
print(t1 - t0, t2 - t1)
";

impl Bench {
    /// The local copy of the small objects' directories (written once).
    pub fn local_dirs(&self) -> Result<PathBuf> {
        let root = self.env.work.join("local-dirs");
        if root.is_dir() {
            return Ok(root);
        }
        for (key, body) in &self.data.dir_objects {
            let path = root.join(key);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(root)
    }

    /// A fresh orcafs mount (fresh cache, `--metadata-ttl 300s`) that has looked up the large
    /// object, so that its connection is open and its root listed, as a plain client's
    /// connection is warm.
    fn fresh_dir_mount(&self, fs: Fs, tag: &str) -> Result<(FsMount, PathBuf)> {
        let cache = self.fresh_cache(&format!("{}-{tag}", fs.name()))?;
        let flags = ["--metadata-ttl".to_owned(), METADATA_TTL.to_owned()];
        let mount = fs.mount_with(&self.env, &cache, tag, &flags)?;
        let warm_up = mount.path(MAIN_KEY);
        mount.guarded("warm-up lookup", self.knobs.phase_limit, || {
            std::fs::metadata(&warm_up)
                .map(drop)
                .with_context(|| format!("looking up {}", warm_up.display()))
        })?;
        Ok((mount, cache))
    }

    /// Runs `f` on a fresh mount, then unmounts it and deletes its cache.
    fn on_fresh_mount<T>(
        &self,
        fs: Fs,
        tag: &str,
        f: impl FnOnce(&FsMount) -> Result<T>,
    ) -> Result<T> {
        let (mount, cache) = self.fresh_dir_mount(fs, tag)?;
        let out = f(&mount);
        mount.unmount()?;
        remove_dir(&cache)?;
        out
    }

    /// One round of `ls -l` of the large prefix: plain LIST, cold and warm `ls -l`, local.
    pub fn large_ls(&self) -> Result<LargeLs> {
        let expect = self.count_in(DIR_LARGE);
        let local = self.local_dirs()?.join(DIR_LARGE);
        self.plain.warm_up(MAIN_KEY)?;
        let (plain_list, keys) = self.plain.list_dir(&format!("{DIR_LARGE}/"))?;
        check_count("the plain LIST", keys.len(), expect)?;
        let limit = self.knobs.phase_limit;
        let mounted = self.on_fresh_mount(Fs::Orcafs, "ls-large", |m| {
            let dir = m.path(DIR_LARGE);
            self.wait_origin_idle()?;
            self.origin.zero_counts()?;
            let cold = m.guarded("cold ls -l", limit, || ls_l(&dir, expect))?;
            self.wait_origin_idle()?;
            let c = self.origin.counts()?;
            let cold_requests = [c.requests, c.list_requests, c.head_requests, c.get_requests];
            self.origin.zero_counts()?;
            let warm = m.guarded("warm ls -l", limit, || ls_l(&dir, expect))?;
            self.wait_origin_idle()?;
            Ok((cold, cold_requests, warm, self.origin.counts()?.requests))
        })?;
        let (cold, cold_requests, warm, warm_requests) = mounted;
        ls_l(&local, expect)?;
        let local = ls_l(&local, expect)?;
        Ok(LargeLs {
            cold,
            cold_requests,
            plain_list,
            warm,
            warm_requests,
            local,
        })
    }

    /// One round of the first names of the never-listed large prefix on a fresh mount, and
    /// one plain LIST page of it.
    pub fn first_names(&self) -> Result<FirstNames> {
        let limit = self.knobs.phase_limit;
        let (lookup, first) = self.on_fresh_mount(Fs::Orcafs, "first-names", |m| {
            let dir = m.path(DIR_LARGE);
            m.guarded("os.scandir first entry", limit, || first_name(&dir))
        })?;
        self.plain.warm_up(MAIN_KEY)?;
        let plain_page = self.plain.list_page(&format!("{DIR_LARGE}/"), 1000)?;
        Ok(FirstNames {
            lookup,
            first,
            plain_page,
        })
    }

    /// One round of the tree walks: each on a fresh mount cold then warm, and on the local
    /// copy; and the plain LISTs of the tree's root and each of its directories.
    pub fn tree(&self) -> Result<TreeRound> {
        let local = self.local_dirs()?.join(TREE);
        self.plain.warm_up(MAIN_KEY)?;
        let (mut plain_lists, dirs) = self.plain.list_dir(&format!("{TREE}/"))?;
        for dir in &dirs {
            plain_lists += self.plain.list_dir(dir)?.0;
        }
        let expect = self.count_in(TREE) + dirs.len();
        let limit = self.knobs.phase_limit;
        let mut walks = Vec::new();
        for walk in Walk::ALL {
            let (cold, warm) = self.on_fresh_mount(Fs::Orcafs, "tree", |m| {
                let dir = m.path(TREE);
                let cold = m.guarded(walk.shown(), limit, || run_walk(walk, &dir, expect))?;
                let warm = m.guarded(walk.shown(), limit, || run_walk(walk, &dir, expect))?;
                Ok((cold, warm))
            })?;
            run_walk(walk, &local, expect)?;
            let local = run_walk(walk, &local, expect)?;
            walks.push((walk, TreeWalk { cold, warm, local }));
        }
        Ok(TreeRound { walks, plain_lists })
    }

    /// `ls -l` of one LIST page of objects through `fs`: cold on a fresh mount, then warm.
    pub fn page_ls(&self, fs: Fs) -> Result<PageLs> {
        let expect = self.count_in(DIR_PAGE);
        let limit = self.knobs.phase_limit;
        self.on_fresh_mount(fs, "ls-page", |m| {
            let dir = m.path(DIR_PAGE);
            let cold = m.guarded("cold ls -l", limit, || ls_l(&dir, expect))?;
            self.wait_origin_idle()?;
            self.origin.zero_counts()?;
            let warm = m.guarded("warm ls -l", limit, || ls_l(&dir, expect))?;
            self.wait_origin_idle()?;
            Ok(PageLs {
                cold,
                warm,
                warm_requests: self.origin.counts()?.requests,
            })
        })
    }

    /// The baselines of [`Bench::page_ls`]: one plain LIST page and the local `ls -l`.
    pub fn page_baselines(&self) -> Result<PageBaselines> {
        let expect = self.count_in(DIR_PAGE);
        self.plain.warm_up(MAIN_KEY)?;
        let (plain_page, keys) = self.plain.list_dir(&format!("{DIR_PAGE}/"))?;
        check_count("the plain LIST", keys.len(), expect)?;
        let local = self.local_dirs()?.join(DIR_PAGE);
        ls_l(&local, expect)?;
        Ok(PageBaselines {
            plain_page,
            local: ls_l(&local, expect)?,
        })
    }

    /// Objects of the large directory, directories x objects of the tree, objects of the page.
    pub fn dir_sizes(&self) -> (usize, (usize, usize), usize) {
        (self.data.dir_large, self.data.tree, self.data.dir_page)
    }

    /// How many small objects lie under `prefix/`.
    fn count_in(&self, prefix: &str) -> usize {
        let prefix = format!("{prefix}/");
        let n = self.data.dir_objects.iter();
        n.filter(|(k, _)| k.starts_with(&prefix)).count()
    }
}

fn check_count(what: &str, got: usize, expect: usize) -> Result<()> {
    if got != expect {
        bail!("{what} found {got} entries, expected {expect}");
    }
    Ok(())
}

/// Times `ls -l DIR` and checks that it showed `expect` entries (plus its `total` line).
fn ls_l(dir: &Path, expect: usize) -> Result<Duration> {
    let mut c = Command::new("ls");
    c.arg("-l").arg(dir);
    let (elapsed, lines) = timed(c)?;
    check_count(
        &format!("ls -l {}", dir.display()),
        lines.saturating_sub(1),
        expect,
    )?;
    Ok(elapsed)
}

/// Times one walk of the tree; `find` must print every entry (`expect`) and the root.
fn run_walk(walk: Walk, dir: &Path, expect: usize) -> Result<Duration> {
    let (elapsed, lines) = timed(walk.command(dir))?;
    if walk == Walk::Find {
        check_count(
            &format!("find {}", dir.display()),
            lines.saturating_sub(1),
            expect,
        )?;
    }
    Ok(elapsed)
}

/// Runs `cmd` to its end with `LC_ALL=C`: the wall time and the lines it printed.
fn timed(mut cmd: Command) -> Result<(Duration, usize)> {
    let shown = format!("{cmd:?}");
    let started = Instant::now();
    let out = cmd
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {shown}"))?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let lines = out.stdout.iter().filter(|&&b| b == b'\n').count();
    Ok((elapsed, lines))
}

/// The lookup and the first `os.scandir` entry of `dir`, as python3 times them.
fn first_name(dir: &Path) -> Result<(Duration, Duration)> {
    let out = Command::new("python3")
        .args(["-c", FIRST_NAME])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .context("running python3 (needed for the first-names row)")?;
    if !out.status.success() {
        bail!(
            "python3 os.scandir({}) failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let secs: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match secs[..] {
        [lookup, first] => Ok((
            Duration::from_secs_f64(lookup),
            Duration::from_secs_f64(first),
        )),
        _ => bail!("python3 printed {text:?}, not two times"),
    }
}
