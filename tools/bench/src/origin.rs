//! The S3 side: the objects put into the local origin, and the plain
//! single-stream SDK GET that orcafs is compared with.

use std::path::Path;
use std::time::{Duration, Instant};

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use bytes::Bytes;
use orcafs_devorigin::{pseudo_random_bytes, DevOrigin};
use tokio::runtime::Runtime;

use crate::bail;
use crate::error::{Context, Result};
use crate::MIB;

/// Bucket holding every benchmark object.
pub const BUCKET: &str = "bench";
/// Key of the large object of the sequential, re-read and random phases.
pub const MAIN_KEY: &str = "big.bin";

/// Sizes and counts of the objects to create.
#[derive(Debug, Clone)]
pub struct Plan {
    pub main_size: u64,
    pub ttfb_objects: usize,
    pub ttfb_size: u64,
    pub rss_objects: usize,
    pub rss_size: u64,
}

/// The objects in the origin, and what is known about them.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub main_size: u64,
    pub main_sha256: String,
    pub ttfb_keys: Vec<String>,
    /// TTFB objects in a directory of more than one LIST page (see `BIG_DIR`).
    pub ttfb_big_dir_keys: Vec<String>,
    pub rss_keys: Vec<String>,
    pub rss_size: u64,
}

/// A directory holding TTFB objects among more than 1000 others, so its lookup cannot keep a
/// complete listing and each name costs a lookup at the origin (LIST and HEAD).
pub const BIG_DIR: &str = "ttfb-big-dir";
/// Filler objects put in `BIG_DIR`.
pub const BIG_DIR_FILLERS: usize = 1000;

/// An SDK client on its own single-threaded runtime: what a plain
/// application doing one GET at a time looks like.
pub struct PlainClient {
    runtime: Runtime,
    client: Client,
}

impl PlainClient {
    pub fn new(origin: &DevOrigin) -> Result<PlainClient> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the client runtime")?;
        Ok(PlainClient {
            runtime,
            client: origin.client(),
        })
    }

    /// Creates the bucket and puts every object of `plan`; writes the large
    /// object to `local_copy` too (the local-file baseline).
    pub fn create_objects(&self, plan: &Plan, local_copy: &Path) -> Result<Dataset> {
        self.create_bucket()?;
        let main = Bytes::from(pseudo_random_bytes(1, to_usize(plan.main_size)?));
        std::fs::write(local_copy, &main)
            .with_context(|| format!("writing the local copy {}", local_copy.display()))?;
        let main_sha256 = crate::reads::sha256_hex(&main);
        self.put(MAIN_KEY, main)?;
        let ttfb_keys = self.put_series("ttfb", 10, plan.ttfb_objects, plan.ttfb_size)?;
        let ttfb_big_dir_keys = self.put_series(BIG_DIR, 50, plan.ttfb_objects, plan.ttfb_size)?;
        let rss_keys = self.put_series("rss", 100, plan.rss_objects, plan.rss_size)?;
        Ok(Dataset {
            main_size: plan.main_size,
            main_sha256,
            ttfb_keys,
            ttfb_big_dir_keys,
            rss_keys,
            rss_size: plan.rss_size,
        })
    }

    fn create_bucket(&self) -> Result<()> {
        let req = self.client.create_bucket().bucket(BUCKET);
        self.runtime
            .block_on(req.send())
            .map_err(DisplayErrorContext)
            .with_context(|| format!("creating bucket {BUCKET}"))?;
        Ok(())
    }

    /// Puts `count` objects `PREFIX/NNN.bin` of `size` bytes, each with its
    /// own content (seed `first_seed + i`).
    fn put_series(
        &self,
        prefix: &str,
        first_seed: u64,
        count: usize,
        size: u64,
    ) -> Result<Vec<String>> {
        let mut keys = Vec::with_capacity(count);
        for i in 0..count {
            let key = format!("{prefix}/{i:03}.bin");
            let body = pseudo_random_bytes(first_seed + i as u64, to_usize(size)?);
            self.put(&key, Bytes::from(body))?;
            keys.push(key);
        }
        Ok(keys)
    }

    fn put(&self, key: &str, body: Bytes) -> Result<()> {
        let len = body.len();
        let req = self
            .client
            .put_object()
            .bucket(BUCKET)
            .key(key)
            .body(ByteStream::from(body));
        self.runtime
            .block_on(req.send())
            .map_err(DisplayErrorContext)
            .with_context(|| format!("putting {BUCKET}/{key} ({} MiB)", len / MIB as usize))?;
        Ok(())
    }

    /// One GetObject of the whole `key`, its body copied into `buf` (which
    /// must be exactly the object's size). Returns the time from sending the
    /// request to the last byte.
    pub fn get_into(&self, key: &str, buf: &mut [u8]) -> Result<Duration> {
        self.runtime
            .block_on(get_into(&self.client, key, buf))
            .with_context(|| format!("plain GET of {BUCKET}/{key}"))
    }

    /// Time from sending a GetObject of `key` to receiving its first body bytes.
    pub fn first_bytes(&self, key: &str) -> Result<(Duration, Duration)> {
        self.runtime
            .block_on(first_bytes(&self.client, key))
            .with_context(|| format!("plain GET first bytes of {BUCKET}/{key}"))
    }

    /// A HeadObject, so the next request finds an open connection (orcafs
    /// has one open too once it has listed or looked something up).
    pub fn warm_up(&self, key: &str) -> Result<()> {
        let req = self.client.head_object().bucket(BUCKET).key(key);
        self.runtime
            .block_on(req.send())
            .map_err(DisplayErrorContext)
            .with_context(|| format!("head of {BUCKET}/{key}"))?;
        Ok(())
    }
}

async fn get_into(client: &Client, key: &str, buf: &mut [u8]) -> Result<Duration> {
    let started = Instant::now();
    let out = client
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .map_err(DisplayErrorContext)
        .context("sending")?;
    let mut body = out.body;
    let mut filled = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the body")?;
        let end = filled + chunk.len();
        if end > buf.len() {
            bail!("body longer than the expected {} bytes", buf.len());
        }
        buf[filled..end].copy_from_slice(&chunk);
        filled = end;
    }
    if filled != buf.len() {
        bail!("body ended at {filled} of {} bytes", buf.len());
    }
    Ok(started.elapsed())
}

/// Time to the first body bytes, and to the first `KERNEL_FIRST_READ` bytes.
async fn first_bytes(client: &Client, key: &str) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    let out = client
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .map_err(DisplayErrorContext)
        .context("sending")?;
    let mut body = out.body;
    let (mut first, mut got) = (None, 0);
    while got < KERNEL_FIRST_READ {
        match body.next().await {
            Some(Ok(chunk)) if !chunk.is_empty() => {
                first.get_or_insert(started.elapsed());
                got += chunk.len();
            }
            Some(Ok(_)) => {}
            None => bail!("body ended after {got} bytes"),
            Some(Err(e)) => bail!("reading the body: {e}"),
        }
    }
    Ok((first.unwrap_or_default(), started.elapsed()))
}

/// What the kernel asks a FUSE filesystem for when a program reads the first 4 KiB of a file
/// (its initial readahead window).
pub const KERNEL_FIRST_READ: usize = 16 << 10;

fn to_usize(n: u64) -> Result<usize> {
    usize::try_from(n).context("object size does not fit in memory")
}
