//! The filesystems under test and how each is mounted over the origin:
//! orcafs, and optionally rclone, s3fs and Mountpoint (`mount-s3`) configured
//! as close to it as they allow (read-only, full local disk cache, path-style
//! S3 on 127.0.0.1), and Mountpoint without its cache (its default).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use orcafs_devorigin::REGION;

use crate::error::{Context, Result};
use crate::fsmount::FsMount;
use crate::origin::BUCKET;
use crate::sys;

/// A filesystem the benchmark can mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    Orcafs,
    Rclone,
    S3fs,
    Mountpoint,
    /// `mount-s3` without `--cache`: every read goes to the origin.
    MountpointNoCache,
}

/// Where and how to mount: shared by every mount of the run.
#[derive(Debug, Clone)]
pub struct MountEnv {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub work: PathBuf,
    pub orcafs: PathBuf,
    /// Extra `orcafs mount` flags (tuning options chosen on the command line).
    pub orcafs_flags: Vec<String>,
    /// Whether this orcafs has `--no-passthrough`.
    pub no_passthrough: bool,
}

impl Fs {
    pub fn name(self) -> &'static str {
        match self {
            Fs::Orcafs => "orcafs",
            Fs::Rclone => "rclone",
            Fs::S3fs => "s3fs",
            Fs::Mountpoint => "mount-s3",
            Fs::MountpointNoCache => "mount-s3-nocache",
        }
    }

    /// Whether its program is installed (orcafs is always there).
    pub fn installed(self) -> bool {
        match self {
            Fs::Orcafs => true,
            Fs::Rclone => sys::on_path("rclone"),
            Fs::S3fs => sys::on_path("s3fs"),
            Fs::Mountpoint | Fs::MountpointNoCache => sys::on_path("mount-s3"),
        }
    }

    /// The configuration line the report shows for it.
    pub fn describe(self, env: &MountEnv) -> String {
        let shown = MountEnv {
            endpoint: "http://127.0.0.1:PORT".into(),
            access_key: "KEY".into(),
            secret_key: "SECRET".into(),
            work: PathBuf::from("WORK"),
            orcafs: PathBuf::from("orcafs"),
            orcafs_flags: env.orcafs_flags.clone(),
            no_passthrough: env.no_passthrough,
        };
        let cmd = self.command(&shown, Path::new("CACHE"), Path::new("MNT"), &[]);
        let words: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        words.join(" ")
    }

    /// Mounts the bucket at `WORK/mnt/NAME` with `cache` as its disk cache;
    /// `tag` names the log file.
    pub fn mount(self, env: &MountEnv, cache: &Path, tag: &str) -> Result<FsMount> {
        self.mount_with(env, cache, tag, &[])
    }

    /// [`Fs::mount`] with `extra` flags added to orcafs's command line (ignored for the others).
    pub fn mount_with(
        self,
        env: &MountEnv,
        cache: &Path,
        tag: &str,
        extra: &[String],
    ) -> Result<FsMount> {
        let mnt = env.work.join("mnt").join(self.name());
        let logs = env.work.join("logs");
        std::fs::create_dir_all(&logs).context("creating the log directory")?;
        if self == Fs::S3fs {
            write_s3fs_passwd(env)?;
        }
        let log = logs.join(format!("{}-{tag}.log", self.name()));
        let cmd = self.command(env, cache, &mnt, extra);
        FsMount::spawn(self.name(), cmd, &mnt, &log)
            .with_context(|| format!("mounting {} ({tag})", self.name()))
    }

    fn command(self, env: &MountEnv, cache: &Path, mnt: &Path, extra: &[String]) -> Command {
        match self {
            Fs::Orcafs => {
                let mut c = orcafs_command(env, cache, mnt);
                c.args(extra);
                c
            }
            Fs::Rclone => rclone_command(env, cache, mnt),
            Fs::S3fs => s3fs_command(env, cache, mnt),
            Fs::Mountpoint => mountpoint_command(env, Some(cache), mnt),
            Fs::MountpointNoCache => mountpoint_command(env, None, mnt),
        }
    }
}

fn orcafs_command(env: &MountEnv, cache: &Path, mnt: &Path) -> Command {
    let mut c = Command::new(&env.orcafs);
    c.arg("mount")
        .arg(BUCKET)
        .arg(mnt)
        .args(["--endpoint-url", &env.endpoint, "--force-path-style"])
        .arg("--cache-dir")
        .arg(cache)
        .arg("--foreground")
        .args(&env.orcafs_flags);
    aws_env(&mut c, env);
    c
}

/// Static credentials for the SDK-based mounts, and nothing from the caller's AWS setup.
fn aws_env(c: &mut Command, env: &MountEnv) {
    c.env("AWS_ACCESS_KEY_ID", &env.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &env.secret_key)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_ENDPOINT_URL");
}

/// `mount-s3` (Mountpoint for Amazon S3), with its local disk cache when given one.
fn mountpoint_command(env: &MountEnv, cache: Option<&Path>, mnt: &Path) -> Command {
    let mut c = Command::new("mount-s3");
    c.arg(BUCKET)
        .arg(mnt)
        .args(["--endpoint-url", &env.endpoint, "--force-path-style"])
        .args(["--region", REGION, "--read-only", "--foreground"]);
    if let Some(cache) = cache {
        c.arg("--cache").arg(cache);
    }
    aws_env(&mut c, env);
    c
}

/// `rclone mount` with an S3 remote `origin:` defined by environment variables.
fn rclone_command(env: &MountEnv, cache: &Path, mnt: &Path) -> Command {
    let mut c = Command::new("rclone");
    c.arg("mount")
        .arg(format!("origin:{BUCKET}"))
        .arg(mnt)
        .args(["--read-only", "--vfs-cache-mode", "full"])
        .arg("--cache-dir")
        .arg(cache)
        .env("RCLONE_CONFIG", env.work.join("rclone.conf"))
        .env("RCLONE_CONFIG_ORIGIN_TYPE", "s3")
        .env("RCLONE_CONFIG_ORIGIN_PROVIDER", "Other")
        .env("RCLONE_CONFIG_ORIGIN_ACCESS_KEY_ID", &env.access_key)
        .env("RCLONE_CONFIG_ORIGIN_SECRET_ACCESS_KEY", &env.secret_key)
        .env("RCLONE_CONFIG_ORIGIN_ENDPOINT", &env.endpoint)
        .env("RCLONE_CONFIG_ORIGIN_REGION", REGION)
        .env("RCLONE_CONFIG_ORIGIN_FORCE_PATH_STYLE", "true")
        // rclone 1.60 refuses to start when AWS_CA_BUNDLE is set ("unable to
        // load custom CA bundle"); the endpoint is plain http anyway.
        .env_remove("AWS_CA_BUNDLE");
    c
}

fn s3fs_command(env: &MountEnv, cache: &Path, mnt: &Path) -> Command {
    let mut c = Command::new("s3fs");
    c.arg(BUCKET).arg(mnt).arg("-f").args([
        "-o",
        &format!("url={}", env.endpoint),
        "-o",
        "use_path_request_style",
        "-o",
        &format!("passwd_file={}", s3fs_passwd_path(env).display()),
        "-o",
        "ro",
        "-o",
        &format!("use_cache={}", cache.display()),
        "-o",
        &format!("endpoint={REGION}"),
    ]);
    c
}

fn s3fs_passwd_path(env: &MountEnv) -> PathBuf {
    env.work.join("s3fs.passwd")
}

/// s3fs refuses a password file others can read.
fn write_s3fs_passwd(env: &MountEnv) -> Result<()> {
    let path = s3fs_passwd_path(env);
    std::fs::write(&path, format!("{}:{}\n", env.access_key, env.secret_key))
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))
}
