//! `orcafs-devorigin --root DIR [--addr 127.0.0.1:9000] [--bucket demo] [--seed]`
//!
//! Serves DIR as S3 on a loopback address, prints one
//! `endpoint=... access_key=... secret_key=... bucket=...` line on stdout,
//! and runs until SIGINT or SIGTERM.

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use orcafs_devorigin::{DevOrigin, ACCESS_KEY, SECRET_KEY};

/// A local S3 server (s3s-fs) for orcafs's demo, tests and benchmarks.
#[derive(Debug, Parser)]
#[command(name = "orcafs-devorigin", version)]
struct Args {
    /// Directory holding the data: buckets are subdirectories, objects are files.
    #[arg(long)]
    root: PathBuf,
    /// Loopback address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:9000")]
    addr: SocketAddr,
    /// Bucket to create if missing (and to seed with --seed).
    #[arg(long, default_value = "demo")]
    bucket: String,
    /// Put the sample tree (README.txt, data/, logs/, docs/, ...) into the bucket.
    #[arg(long)]
    seed: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orcafs-devorigin: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> io::Result<()> {
    if !args.addr.ip().is_loopback() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "refusing to listen on {}: only loopback addresses (e.g. 127.0.0.1) are allowed",
                args.addr
            ),
        ));
    }
    let origin = DevOrigin::start_on(&args.root, args.addr)?;
    if !origin.root().join(&args.bucket).is_dir() {
        origin.create_bucket(&args.bucket);
    }
    if args.seed {
        origin.seed_samples(&args.bucket);
    }
    announce(&origin, &args.bucket)?;
    wait_for_signal()?;
    drop(origin);
    Ok(())
}

/// The one line scripts parse.
fn announce(origin: &DevOrigin, bucket: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "endpoint={} access_key={ACCESS_KEY} secret_key={SECRET_KEY} bucket={bucket}",
        origin.endpoint()
    )?;
    out.flush()
}

fn wait_for_signal() -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok(())
    })
}
